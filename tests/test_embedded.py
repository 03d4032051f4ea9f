import redis

from balances.embedded import EmbeddedValkey


def test_embedded_valkey_is_durable(valkey_url):
    client = redis.Redis.from_url(valkey_url, decode_responses=True)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "always"
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    client.close()


async def test_async_client_talks_to_valkey(redis_client):
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == b"v"


def test_embedded_valkey_keeps_session_hashes_compact(tmp_path):
    """Session hashes hold values of a few hundred bytes; the embedded server keeps them in listpack form."""
    server = EmbeddedValkey(tmp_path / "v")
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        client.hset("ses:{p000}:x", mapping={"cdr": "x" * 300, "a:0": "y" * 200, "state": "open"})
        assert client.object("encoding", "ses:{p000}:x") == b"listpack"
        client.close()
    finally:
        server.stop()
