"""`ocs serve --workers N`: N server processes sharing the Diameter port (SO_REUSEPORT), each with its own loop.

Theory of operation. The supervisor (this module, no event loop of its own) loads and checks the configuration
and the rate card once, starts the embedded Valkey when no Redis URL is configured (once: the workers get its
URL), provisions the demo data if asked, then starts N workers with `python -m ocs.workers` (fork + exec: a
fresh interpreter, nothing inherited from a loop or a Redis client). Each worker is a whole `ServerApp` bound
with SO_REUSEPORT to the same host:port; the kernel hands each new *connection* to one of them (a hash of the
4-tuple), so a gateway's requests all go to the worker that accepted its connection: with few gateway
connections the spread can be uneven.

Everything that must work across workers already works across `ocs serve` processes, because all state is
in Redis: a session continues on any connection (its owner is refreshed by every CCR), a duplicate gets the
stored answer whichever worker it reaches, and RAR/ASR go through the peer registry to the worker holding the
gateway's connection (`ocs.routing`; each worker's process id is `host:pid:random`). Every worker runs a CDR
writer (one leaseholder per partition: exactly once whichever worker writes) and a Tcc sweep (the close
script decides atomically; a session is closed once). All workers advertise the supervisor's Origin-State-Id:
the server as a whole keeps its state in Redis, so a worker's restart is not a restart a gateway must see.

The worker gets the checked configuration as JSON in the environment (`OCS_WORKER_CONFIG`, not a config
variable), with the Redis URL filled in and its own /metrics port: metrics.port + worker index (0..N-1;
metrics.port 0 keeps /metrics off for all). A diameter.port of 0 is chosen once by the supervisor (it holds
a bound, non-listening SO_REUSEPORT socket on it, which receives no connections).

Lifecycle: a worker reports ready on a pipe once it listens; one that exits before that during start makes
the whole start fail (port in use, Redis down: the same error as a single process would give). Later, a
worker that exits is restarted after a back-off (0.5 s doubling to 30 s; reset once one ran a minute), and
logged. SIGTERM/SIGINT to the supervisor → SIGTERM to every worker (each sends DPR, finishes its requests,
drains the CDR streams: the single-process stop) → waits for all (SIGKILL after `stop_timeout`) → stops the
embedded Valkey. Workers die with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no orphans
serving the port.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import msgspec

from ocs.config import Config

log = logging.getLogger("ocs.workers")

CONFIG_ENV = "OCS_WORKER_CONFIG"
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0
STABLE_SECONDS = 60.0  # a worker that ran this long resets the back-off
START_TIMEOUT = 60.0


class WorkerStartError(RuntimeError):
    """The workers could not all be started (the message says why): nothing is left running."""


def worker_config(config: Config, index: int, redis_url: str, port: int) -> Config:
    """Worker `index`'s configuration: the shared Redis URL and port, its own /metrics port."""
    metrics_port = config.metrics.port + index if config.metrics.port else 0
    return msgspec.structs.replace(
        config,
        redis=msgspec.structs.replace(config.redis, url=redis_url),
        diameter=msgspec.structs.replace(config.diameter, port=port),
        metrics=msgspec.structs.replace(config.metrics, port=metrics_port),
    )


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port some process listens on (SO_REUSEPORT would otherwise join another server's group)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise WorkerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """A free port for diameter.port = 0, held (bound, never listening) until the pool stops."""
    holder = socket.socket(_family(host), socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, 0))
    return holder, holder.getsockname()[1]


class _Worker:
    """One worker slot: the running process (if any), its ready pipe and its restart back-off."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen | None = None
        self.ready_fd: int | None = None  # read end, until the worker said ready (or closed it)
        self.ready = False
        self.started_at = 0.0
        self.failures = 0  # consecutive exits of workers that ran less than STABLE_SECONDS
        self.restart_at: float | None = None


class WorkerPool:
    """The supervisor of `ocs serve --workers N`; `run()` returns when stopped by SIGTERM/SIGINT."""

    def __init__(self, config: Config, workers: int, *, log_level: str = "INFO",
                 prepare: Callable[[str], None] | None = None, stop_timeout: float = 60.0) -> None:
        from ocs.server import RedisHandle

        if workers < 1:
            raise ValueError("at least one worker")
        self.config = config
        self.count = workers
        self.log_level = log_level
        self.prepare = prepare  # called once with the Redis URL before the workers start (the demo data)
        self.stop_timeout = stop_timeout
        self.redis = RedisHandle(config)
        self.origin_state_id = int(time.time()) & 0xFFFFFFFF
        self.workers = [_Worker(index) for index in range(workers)]
        self.port = config.diameter.port
        self._port_holder: socket.socket | None = None
        self._stop_signal: int | None = None
        self._url = ""

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until a stop signal, stop everything. Raises WorkerStartError."""
        from ocs.server import load_rater

        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            load_rater(self.config)  # a bad rate card fails here once, not in N workers (raises ConfigError)
            host = self.config.diameter.listen_host
            if self.port:
                _check_port_free(host, self.port)
            else:
                self._port_holder, self.port = _reserve_port(host)
            try:
                self._url = self.redis.start()
            except Exception as exc:
                raise WorkerStartError(f"cannot start the embedded Valkey: {exc}") from None
            if self.prepare is not None:
                self.prepare(self._url)
            if self._stop_signal is None:
                self._start_all()
            if self._stop_signal is None:
                log.info("%d workers serving Diameter on %s:%d (SO_REUSEPORT)", self.count, host, self.port)
            while self._stop_signal is None:
                self._supervise_once(0.2)
            log.info("stopping %d workers (%s)", self.count, signal.Signals(self._stop_signal).name)
            return 0
        finally:
            clean = self._stop_workers()
            self.redis.stop()
            if self._port_holder is not None:
                self._port_holder.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if not clean:
                log.error("some workers had to be killed")

    def _request_stop(self, signum: int, _frame: object) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _start_all(self) -> None:
        """Starts every worker and waits until all listen; one that exits first fails the whole start."""
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + START_TIMEOUT
        while self._stop_signal is None and not all(worker.ready for worker in self.workers):
            for worker in self.workers:
                if not worker.ready and worker.process is not None and worker.process.poll() is not None:
                    raise WorkerStartError(f"worker {worker.index} exited during start "
                                           f"({_exit_text(worker.process.returncode)}); see its log above")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"the workers did not start within {START_TIMEOUT:g} s")
            self._read_ready(0.1)

    def _spawn(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[CONFIG_ENV] = msgspec.json.encode(worker_config(self.config, worker.index, self._url, self.port)).decode()
        command = [sys.executable, "-m", "ocs.workers", "--index", str(worker.index), "--ready-fd", str(write_fd),
                   "--parent", str(os.getpid()), "--origin-state-id", str(self.origin_state_id),
                   "--log-level", self.log_level]
        try:
            worker.process = subprocess.Popen(command, env=env, pass_fds=(write_fd,), stdin=subprocess.DEVNULL)
        finally:
            os.close(write_fd)
        worker.ready_fd, worker.ready = read_fd, False
        worker.started_at = time.monotonic()
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _read_ready(self, timeout: float) -> None:
        """Waits up to `timeout` for a worker's ready line (or its pipe closing); doubles as the loop's sleep."""
        fds = {worker.ready_fd: worker for worker in self.workers if worker.ready_fd is not None}
        if not fds:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(fds), [], [], timeout)
        for fd in readable:
            worker = fds[fd]
            data = os.read(fd, 64)
            if data.startswith(b"ready"):
                worker.ready = True
                log.info("worker %d ready (pid %d)", worker.index, worker.process.pid if worker.process else 0)
            os.close(fd)
            worker.ready_fd = None

    def _supervise_once(self, timeout: float) -> None:
        """Notices exited workers, restarts them when their back-off is over."""
        self._read_ready(timeout)
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is not None and process.poll() is not None:
                lived = now - worker.started_at
                worker.failures = 0 if lived >= STABLE_SECONDS else worker.failures + 1
                delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(worker.failures - 1, 0))
                log.warning("worker %d (pid %d) exited (%s) after %.1f s; restarting in %.1f s", worker.index,
                            process.pid, _exit_text(process.returncode), lived, delay)
                self._forget(worker)
                worker.restart_at = now + delay
            if worker.process is None and worker.restart_at is not None and now >= worker.restart_at \
                    and self._stop_signal is None:
                self._spawn(worker)

    def _forget(self, worker: _Worker) -> None:
        if worker.ready_fd is not None:
            os.close(worker.ready_fd)
            worker.ready_fd = None
        worker.process, worker.ready = None, False

    def _stop_workers(self) -> bool:
        """SIGTERM to every worker (each stops as a single `ocs serve` does), then waits; SIGKILL the rest."""
        running = [w.process for w in self.workers if w.process is not None and w.process.poll() is None]
        for process in running:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.stop_timeout
        clean = True
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop within %g s: killed", process.pid, self.stop_timeout)
                process.kill()
                process.wait()
                clean = False
        for worker in self.workers:
            if worker.process is not None:
                worker.process.poll()  # reaped: no zombie left
            self._forget(worker)
        return clean


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


# ---- the worker process ----------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGTERM to this worker when the supervisor dies (Linux); exit now if it is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        raise SystemExit(1)


def worker_main(argv: list[str] | None = None) -> int:
    """One worker: a ServerApp on the shared port with the supervisor's configuration."""
    parser = argparse.ArgumentParser(prog="python -m ocs.workers", description="an `ocs serve --workers` worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--origin-state-id", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [worker {args.index}] %(name)s: %(message)s")
    _die_with_parent(args.parent)
    raw = os.environ.pop(CONFIG_ENV, None)
    if raw is None:
        log.error("%s is not set: workers are started by `ocs serve --workers N`", CONFIG_ENV)
        return 2
    config = msgspec.json.decode(raw, type=Config)

    import uvloop

    from ocs.server import ServerApp

    app = ServerApp(config)
    app.reuse_port = True
    app.origin_state_id = args.origin_state_id
    start = app.start

    async def start_then_report() -> None:
        await start()
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
        log.info("worker %d listening (process id %s, metrics port %s)", args.index,
                 app.router.process_id if app.router else "?", config.metrics.port or "off")

    app.start = start_then_report  # type: ignore[method-assign]
    try:
        uvloop.run(app.serve_forever())
    except Exception as exc:
        log.error("worker %d failed: %s", args.index, exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
