import asyncio
import threading

from django.http import JsonResponse
from django.urls import path

from tests.helpers import sleep_expr
from tests.testapp.models import Book


async def gathered(request):
    """An async view that needs four slow, independent queries."""
    seconds = float(request.GET.get("sleep", "0"))
    rows = await asyncio.gather(
        *(
            Book.objects.filter(pk=pk).annotate(z=sleep_expr(seconds))
            for pk in request.GET.getlist("pk")
        )
    )
    return JsonResponse(
        {
            "titles": [row[0].title for row in rows],
            "count": await Book.objects.acount(),
            "view_thread": threading.current_thread().name,
        }
    )


urlpatterns = [path("gathered/", gathered)]
