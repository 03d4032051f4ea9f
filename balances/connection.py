"""The one place a Redis client is made: a single server or a Redis / Valkey Cluster, chosen by the URL.

`redis://host:port` (also rediss://, unix://, valkey://) is one server: redis-py's asyncio client with
hiredis. `redis+cluster://host:port` (or rediss+cluster://, valkey+cluster://), or any URL with
`cluster=True` (`redis.cluster = true` in the configuration), is a cluster: redis-py's asyncio RedisCluster,
seeded by that node, which discovers the others and routes each command by the slot of its key.

Every key one Lua function touches carries one hash tag {pNNN}, so each call runs on one node. The
BalanceStore batches a tick's calls itself and sends them straight to the owning primaries (`NodeClients`:
a plain client per primary, made from the same URL) rather than through redis-py's ClusterPipeline; the CDR
writer uses the same per-node clients to send WAITAOF on the connection that made the write. Commands that
name no key (FUNCTION LOAD, CONFIG GET, WAITAOF) go to the node they concern, or to every primary.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss", "valkey+cluster": "redis",
                   "valkeys+cluster": "rediss"}
PLAIN_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")

Client = aioredis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def is_valid_url(url: str) -> bool:
    scheme = urlsplit(url).scheme.lower()
    return scheme in CLUSTER_SCHEMES or scheme in PLAIN_SCHEMES


def plain_url(url: str) -> str:
    """The URL with its cluster marker taken off (what redis-py parses)."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower(), parts.scheme)
    if scheme.startswith("valkey"):  # redis-py knows the redis schemes; the protocol is the same
        scheme = scheme.replace("valkey", "redis", 1)
    return urlunsplit(parts._replace(scheme=scheme))


def open_client(url: str, *, cluster: bool = False, **options: Any) -> Client:
    """A client for `url`: a RedisCluster for a cluster URL or with `cluster`, else a plain asyncio Redis.
    `options` are redis-py connection options (socket_connect_timeout, ...). A RedisCluster must be
    initialised (`await client.initialize()`) before its slot map is read; commands initialise it too."""
    if cluster or is_cluster_url(url):
        return RedisCluster.from_url(plain_url(url), **options)
    return aioredis.Redis.from_url(plain_url(url), **options)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def duplicate(client: Client) -> Client:
    """A second client to the same server(s) with its own connections (for blocking commands like BLPOP)."""
    if isinstance(client, RedisCluster):
        seed = client.get_default_node() or client.get_primaries()[0]
        return RedisCluster(host=seed.host, port=seed.port, **_options_of(client.get_connection_kwargs()))
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool(**client.connection_pool.connection_kwargs))


_CONNECTION_OPTIONS = ("username", "password", "credential_provider", "socket_timeout", "socket_connect_timeout",
                       "socket_keepalive", "client_name", "ssl", "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs",
                       "ssl_ca_certs", "ssl_check_hostname")


def _options_of(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The connection options worth copying to another client (not redis-py's internal wiring)."""
    options = {name: kwargs[name] for name in _CONNECTION_OPTIONS if name in kwargs}
    if issubclass(kwargs.get("connection_class", object), aioredis.SSLConnection):
        options["ssl"] = True
    return options


class NodeClients:
    """A plain asyncio client per cluster node (made lazily, kept until close), so a batch for one primary
    goes out on one of its connections: pipelining per node, and WAITAOF on the connection of the write."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.ready = False  # the slot map has been read
        self._refreshing: asyncio.Future | None = None
        self._clients: dict[str, aioredis.Redis] = {}

    async def initialize(self) -> None:
        """Reads the slot map (the first call; after MOVED, `refresh`)."""
        await self.cluster.initialize()
        self.ready = True

    async def refresh(self) -> None:
        """A slot moved (MOVED, failover, resharding): read the slot map again, once for every caller that
        asks while a read is under way; clients of nodes that left the cluster are closed."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        await self.cluster.nodes_manager.initialize()
        known = {node.name for node in self.cluster.get_nodes()}
        for name in [name for name in self._clients if name not in known]:
            await self._clients.pop(name).aclose()

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        return self.node_for_slot(self.cluster.keyslot(key))

    def node_for_slot(self, slot: int) -> ClusterNode:
        return self.cluster.nodes_manager.get_node_from_slot(slot)

    def primaries(self) -> list[ClusterNode]:
        return self.cluster.get_primaries()

    def client(self, node: ClusterNode) -> aioredis.Redis:
        client = self._clients.get(node.name)
        if client is None:
            options = _options_of(self.cluster.get_connection_kwargs())
            client = aioredis.Redis(host=node.host, port=node.port, **options)
            self._clients[node.name] = client
        return client

    def client_by_name(self, name: str) -> aioredis.Redis:
        """The client of the node `host:port` (an ASK or MOVED reply names it)."""
        node = self.cluster.get_node(node_name=name)
        if node is not None:
            return self.client(node)
        host, _, port = name.rpartition(":")
        client = self._clients.get(name)
        if client is None:
            client = aioredis.Redis(host=host, port=int(port), **_options_of(self.cluster.get_connection_kwargs()))
            self._clients[name] = client
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
