"""The cache servers of tests/cache_servers.py answer, and stop and start on cue."""

import os

import pytest
import redis
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from tests import cache_servers
from tests.cache_servers import (
    Unavailable,
    memcached_fixture,  # noqa: F401 (the disposable_memcached fixture)
    memcached_location,
    redis_fixture,  # noqa: F401 (the disposable_redis fixture)
    redis_location,
)


def memcached_client(location):
    host, _, port = location.rpartition(":")
    return Client((host, int(port)), connect_timeout=2, timeout=2)


def test_redis_location_is_a_database_of_the_shared_redis_claimed_by_this_process():
    location = redis_location()
    assert location == redis_location()
    db = int(location.rpartition("/")[2])
    assert location == f"redis://127.0.0.1:6379/{db}"
    assert db in cache_servers.TEST_DBS
    client = redis.Redis.from_url(location)
    client.set("asynchrormous-test", b"1")
    assert client.get("asynchrormous-test") == b"1"
    claim = redis.Redis(db=0).get(cache_servers.CLAIM_KEY.format(db))
    assert claim.decode().startswith(f"{os.getpid()}:")
    client.close()


# Above the kernel's largest pid_max (2**22): no process has it.
GONE = "4194305:gone"


def claim_a_free_db(claims, owner):
    key = cache_servers.CLAIM_KEY.format
    for db in cache_servers.TEST_DBS:
        if claims.set(key(db), owner, nx=True, ex=60):
            return db
    pytest.skip("every test database of the shared Redis is claimed")


def test_a_claim_left_by_a_process_that_is_gone_is_taken_over(monkeypatch):
    redis_location()  # this process's own claim is not a free one
    claims = redis.Redis(db=0)
    db = claim_a_free_db(claims, GONE)
    monkeypatch.setattr(cache_servers, "TEST_DBS", range(db, db + 1))
    try:
        assert cache_servers._claim_db() == db
        assert claims.get(cache_servers.CLAIM_KEY.format(db)).decode() == (
            cache_servers._owner()
        )
    finally:
        cache_servers._release_db(db)
        assert not claims.exists(cache_servers.CLAIM_KEY.format(db))
        claims.close()


def test_a_claim_of_a_live_process_is_left_alone(monkeypatch):
    redis_location()
    claims = redis.Redis(db=0)
    db = claim_a_free_db(claims, f"{os.getppid()}:parent")
    monkeypatch.setattr(cache_servers, "TEST_DBS", range(db, db + 1))
    try:
        with pytest.raises(RuntimeError, match="claimed by a live process"):
            cache_servers._claim_db()
    finally:
        claims.delete(cache_servers.CLAIM_KEY.format(db))
        claims.close()


def test_memcached_location_is_one_server_for_the_process():
    try:
        location = memcached_location()
    except Unavailable as exc:
        pytest.skip(str(exc))
    assert location == memcached_location()
    client = memcached_client(location)
    client.set("asynchrormous-test", b"1")
    assert client.get("asynchrormous-test") == b"1"
    client.close()


def test_a_disposable_redis_stops_and_starts_again_on_the_same_port(
    disposable_redis,
):
    location = disposable_redis.location
    client = redis.Redis.from_url(location, socket_connect_timeout=2)
    client.set("k", b"v")
    disposable_redis.stop()
    assert cache_servers.refuses(disposable_redis.port)
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    disposable_redis.start()
    assert disposable_redis.location == location
    assert client.get("k") is None  # nothing persisted
    client.set("k", b"again")
    assert client.get("k") == b"again"
    client.close()


def test_a_disposable_memcached_stops_and_starts_again_on_the_same_port(
    disposable_memcached,
):
    location = disposable_memcached.location
    client = memcached_client(location)
    client.set("k", b"v")
    disposable_memcached.stop()
    assert cache_servers.refuses(disposable_memcached.port)
    with pytest.raises((OSError, MemcacheUnexpectedCloseError)):
        client.get("k")  # the connection it had is closed
    with pytest.raises(ConnectionRefusedError):
        client.get("k")
    disposable_memcached.start()
    assert disposable_memcached.location == location
    assert client.get("k") is None
    client.set("k", b"again")
    assert client.get("k") == b"again"
    client.close()


def test_starting_a_running_server_is_refused(disposable_redis):
    with pytest.raises(RuntimeError, match="already running"):
        disposable_redis.start()
