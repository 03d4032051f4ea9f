import redis


def test_embedded_valkey_is_durable(valkey_url):
    client = redis.Redis.from_url(valkey_url, decode_responses=True)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "always"
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    client.close()


async def test_async_client_talks_to_valkey(redis_client):
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == b"v"
