"""The three versions of the dashboard, and ``/`` pointing at the first."""

from django.urls import path
from django.views.generic import RedirectView

from catalogue import views

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="sync", permanent=False)),
    path("sync/", views.sync_dashboard, name="sync"),
    path("background/", views.background_dashboard, name="background"),
    path("gather/", views.gather_dashboard, name="gather"),
]
