"""No silent escape from async atomic(): Django's own a* methods run in the block."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group, User
from django.db import connections
from django.db.models import QuerySet
from django.db.transaction import TransactionManagementError

from asynchrormous import atomic
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    pass


def _committed_names():
    try:
        return sorted(Author.objects.values_list("name", flat=True))
    finally:
        connections.close_all()


async def committed_names():
    # run_in_executor copies no context: this thread knows nothing of any block.
    return await asyncio.get_running_loop().run_in_executor(None, _committed_names)


async def test_djangos_asave_and_arefresh_from_db_run_in_the_block(books):
    """Author has an AsyncManager but not AsyncModelMixin: Django's own methods."""
    ann = await Author.objects.aget(name="Ann")
    with pytest.raises(Boom):
        async with asyncio.timeout(20), atomic():
            await Author.objects.filter(pk=ann.pk).aupdate(name="Updated")
            await ann.arefresh_from_db()
            assert ann.name == "Updated"  # reads the block's write
            ann.name = "Saved"
            await ann.asave()  # the row the block updated: no deadlock, no lock wait
            await Author(name="New").asave()
            assert await Author.objects.filter(name__in=["Saved", "New"]).acount() == 2
            raise Boom
    assert await committed_names() == ["Ann", "Bob"]  # all of it rolled back


async def test_plain_querysets_and_related_managers_of_other_models_run_in_the_block(
    books,
):
    group = await sync_to_async(Group.objects.create)(name="g")
    with pytest.raises(Boom):
        async with asyncio.timeout(20), atomic():
            # A QuerySet.as_manager() without AsyncQuerySetMixin, and a related
            # manager of a model whose default manager is not an AsyncManager.
            await QuerySet(Author).acreate(name="Plain")
            assert await QuerySet(Author).filter(name="Plain").acount() == 1
            await group.user_set.acreate(username="member")
            assert await group.user_set.acount() == 1
            raise Boom
    assert await committed_names() == ["Ann", "Bob"]
    assert not await sync_to_async(User.objects.exists)()


def save_in_another_thread(author):
    try:
        author.save()
    finally:
        connections.close_all()


async def test_sync_code_on_another_thread_cannot_write_outside_the_block(books):
    ann = await Author.objects.aget(name="Ann")
    ann.name = "Escaped"
    async with asyncio.timeout(20), atomic():
        with pytest.raises(TransactionManagementError, match="AsyncModelMixin"):
            await sync_to_async(save_in_another_thread, thread_sensitive=False)(ann)
    assert await committed_names() == ["Ann", "Bob"]


async def test_outside_any_block_djangos_own_methods_are_untouched(books):
    ann = await Author.objects.aget(name="Ann")
    ann.name = "Renamed"
    await ann.asave()
    await sync_to_async(save_in_another_thread, thread_sensitive=False)(ann)
    assert await committed_names() == ["Bob", "Renamed"]
