"""BalanceStore: the one object the rest of the OCS uses to reach balances, sessions and CDR streams.

Every change goes through a Lua function of the library in balances/lua (see scripts.py), so it is atomic in
one Redis Cluster slot. Calls made during one event-loop tick are sent together: each call appends to a
pending list and gets a future, the first call of a tick schedules a flush with `loop.call_soon`, and the
flush sends one pipeline (transaction=False) of FCALLs and resolves the futures. Under load a CCR therefore
costs a share of one round trip instead of one round trip. A server without the library (restarted without
persistence, FUNCTION FLUSH) gets it loaded and the calls retried once; any other Redis error reaches the
caller of that one call.

Index keys (idx:, sidx:) live outside the partitions and are cached in process, so a CCR whose subscriber
or session is known costs exactly one FCALL.

Every call is bounded (`call_timeout`): a Redis that is down, busy or too slow makes the call fail at once
with StoreUnavailable (a ConnectionError) instead of leaving the caller waiting; a call whose caller gave up
before its batch was sent is not sent. The session-ownership, peer-registry and queue methods at the end
serve ocs.routing and ocs.supervision (server-initiated messages, supervision); they are plain names and
strings here, nothing of Diameter.

The balance model's operator side (buckets with metadata, sharing groups, postpaid accounts, status, the
expiry/rollover sweep, adjustments, the ledger and its history) is here too; every balance change goes
through a function that writes its ledger entry in the same call (see lua/common.lua). Operator calls take
`now_ms` like the charges; without it they use the wall clock (never Redis TIME).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
from redis._parsers.hiredis import _AsyncHiredisParser as _HiredisParser
from redis.exceptions import AskError, MovedError, ResponseError, WatchError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from balances import keys as k
from balances.buckets import MAX_EXACT, bucket_meta, bucket_states, check_bucket, check_id, check_subscriber
from balances.connection import NodeClients, duplicate, is_cluster, open_client
from balances.ledger import history as ledger_history
from balances.ledger import parse_entry
from balances.model import (
    EVENT,
    INITIAL,
    STATUSES,
    TERMINATION,
    UPDATE,
    AccountChange,
    Bucket,
    BucketState,
    ChargeOutcome,
    ChargeRequest,
    LedgerEntry,
    Location,
    Subscriber,
    TopupResult,
    full_schedules,
)
from balances.scripts import Library, build_library, is_missing_function, load_library

SESSION_INDEX_TTL_MS = 86_400_000  # sidx of a closed session lives as long as its stored answers
PROVISION_CHUNK = 1000
SCAN_PAGE = 1000
CLUSTER_REDIRECTS = 5  # MOVED / ASK replies followed for one command before its caller hears the error
_ASKING = b"*1\r\n$6\r\nASKING\r\n"
# error replies that mean "not now" (a long script, loading, failover), not "wrong request"
UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")


class StoreUnavailable(ConnectionError):
    """Redis is unreachable, busy or did not answer within the call timeout: nothing is known to have changed
    (a late-executing call is made harmless by duplicate detection when the request is retried)."""


class UnknownSubscriber(Exception):
    """No subscriber with that MSISDN."""


class SubscriberExists(Exception):
    """provision() without replace for an MSISDN that is already provisioned."""


class UnknownGroup(Exception):
    """No sharing group with that id (create_group first)."""


class _TopupAnswer(msgspec.Struct):
    applied: bool = False
    balance: int = 0
    reference: str | None = None
    unknown: bool = False


class _AccountAnswer(msgspec.Struct):
    applied: bool = False
    balance: int = 0
    entries: int = 0
    unknown: bool = False
    error: str | None = None


class _MemberAnswer(msgspec.Struct):
    old: str = ""
    unknown: bool = False
    error: str | None = None


class _Reservation(msgspec.Struct):
    u: int
    b: dict[str, int]


class SessionOwner(msgspec.Struct):
    """Who owns a session: the gateway that sent its latest CCR and the peer connection it came through."""

    session_id: str
    partition: int
    msisdn: str
    state: str  # "open" or "closed"
    origin_host: str  # Origin-Host of the latest CCR: Destination-Host of a RAR/ASR
    origin_realm: str  # Origin-Realm of the latest CCR: Destination-Realm of a RAR/ASR
    peer: str  # Origin-Host of the connected peer it came through (the gateway itself, or a relay)
    last: int  # last activity, ms


class CloseResult(msgspec.Struct):
    closed: bool  # this call closed the session
    due_ms: int | None = None  # open and not yet silent for its Tcc: when it will be


_outcome_decoder = msgspec.json.Decoder(ChargeOutcome)
_topup_decoder = msgspec.json.Decoder(_TopupAnswer)
_reservation_decoder = msgspec.json.Decoder(_Reservation)
_account_decoder = msgspec.json.Decoder(_AccountAnswer)
_member_decoder = msgspec.json.Decoder(_MemberAnswer)
_encoder = msgspec.json.Encoder()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _now(now_ms: int | None) -> int:
    """The caller's time; the wall clock only where an operator call gives none (never Redis TIME)."""
    return now_ms if now_ms is not None else time.time_ns() // 1_000_000


def _pairs(reply: Any) -> Iterable[tuple[Any, Any]]:
    """A raw HGETALL reply (flat RESP2 list or RESP3 map) as (field, value) pairs."""
    if isinstance(reply, dict):
        return reply.items()
    return zip(reply[::2], reply[1::2], strict=True)


def _bulk(value: Any) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _pack(command: Sequence[Any]) -> bytes:
    """A command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(command) + b"".join(map(_bulk, command))


def _command_key(command: Sequence[Any]) -> Any:
    """The key a command is routed by on a cluster: the first key (FCALL/EVALSHA: after numkeys); None for
    a command without one. A command's keys must share one slot, as for any cluster client."""
    name = command[0].upper() if isinstance(command[0], str) else bytes(command[0]).upper().decode()
    if name in ("FCALL", "FCALL_RO", "EVALSHA", "EVAL"):
        return command[3] if int(command[2]) > 0 else None
    return command[1] if len(command) > 1 else None


def _pack_fcall(function: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    """FCALL in RESP. Function name and keys are ASCII text in practice: formatted as one str and encoded
    once (a third less than a bulk string each); anything else takes the general path."""
    text = f"${len(function)}\r\n{function}\r\n${len(str(len(keys)))}\r\n{len(keys)}\r\n" + "".join(
        [f"${len(key)}\r\n{key}\r\n" for key in keys])
    if text.isascii():
        head = b"*%d\r\n$5\r\nFCALL\r\n" % (3 + len(keys) + len(args)) + text.encode()
    else:
        head = (b"*%d\r\n$5\r\nFCALL\r\n" % (3 + len(keys) + len(args)) + _bulk(function) + _bulk(len(keys))
                + b"".join(map(_bulk, keys)))
    return head + b"".join(map(_bulk, args))


async def _hiredis_roundtrip(connection: Any, data: bytes, count: int) -> list[Any]:
    """Writes `data` (count commands) on a connected redis-py connection with the hiredis parser and reads
    the count replies from its Reader: error replies as ResponseError values, RESP3 push messages handed to
    the parser's handler as redis-py does; the whole exchange bounded by the connection's socket_timeout
    (redis TimeoutError), a socket error is a redis ConnectionError. The caller disconnects on any error."""
    parser = connection._parser
    reader = parser._reader
    push_type = parser._hiredis_PushNotificationType
    timeout = connection.socket_timeout
    replies: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            writer = connection._writer
            writer.write(data)
            await writer.drain()
            while len(replies) < count:
                reply = reader.gets()
                if reply is _NOT_ENOUGH_DATA:
                    await parser.read_from_socket()
                    continue
                if push_type is not None and type(reply) is push_type:
                    await parser.handle_push_response(reply)
                    continue
                if isinstance(reply, RedisConnectionError):
                    raise reply
                replies.append(reply)
    except TimeoutError:
        raise RedisTimeoutError(f"no reply from Redis within {timeout} s") from None
    except OSError as exc:
        raise RedisConnectionError(f"Redis connection failed: {exc}") from exc
    if connection.health_check_interval:
        connection.next_health_check = asyncio.get_running_loop().time() + connection.health_check_interval
    return replies


class _Call:
    """One function call waiting for the next flush; `extra` are plain commands sent just before it."""

    __slots__ = ("function", "keys", "args", "extra", "future", "deadline")

    def __init__(self, function: str, keys: Sequence[str], args: Sequence[Any],
                 extra: Sequence[tuple], future: asyncio.Future, deadline: float) -> None:
        self.function = function
        self.keys = keys
        self.args = args
        self.extra = extra
        self.future = future
        self.deadline = deadline  # loop time after which the caller hears StoreUnavailable


class _LocationCache:
    """A bounded dict: the oldest entries go first when full (index keys rarely change)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[str, Location] = {}

    def get(self, key: str) -> Location | None:
        return self.entries.get(key)

    def put(self, key: str, location: Location) -> None:
        entries = self.entries
        entries[key] = location
        if len(entries) > self.limit:
            del entries[next(iter(entries))]

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)


class BalanceStore:
    """Balances, reservations and sessions in Redis/Valkey; see the module docstring for batching."""

    def __init__(self, redis: aioredis.Redis, partitions: int | None = None, *, max_inflight: int = 4,
                 max_batch: int = 256, cache_size: int = 1_000_000, call_timeout: float | None = None) -> None:
        self.redis = redis  # a plain client or a RedisCluster (balances.connection.open_client)
        # on a cluster: a client per primary, to which the batcher sends each command by its key's slot
        self._nodes: NodeClients | None = NodeClients(redis) if is_cluster(redis) else None
        self.call_timeout = call_timeout  # seconds; None waits as long as Redis takes
        self._blocking: aioredis.Redis | None = None  # own connection for BLPOP (take_request)
        self._wanted_partitions = partitions
        self._partitions: int | None = None
        self.library: Library = build_library()
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self.pipelines_sent = 0  # pipelines the batcher has sent (tests and benchmarks read it)
        self.calls_sent = 0  # function calls in them
        self._pending: list[_Call] = []
        self._sending: list[list[_Call]] = []  # batches sent and not yet answered
        self._watchdog: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._ready_task: asyncio.Task | None = None
        self._owns_client = False
        self._msisdns = _LocationCache(cache_size)
        self._imsis = _LocationCache(cache_size)
        self._sessions = _LocationCache(cache_size)

    @classmethod
    async def connect(cls, url: str, partitions: int | None = None, *, cluster: bool = False,
                      **options: Any) -> BalanceStore:
        """A store on its own client (redis-py asyncio + hiredis); close() closes the client. A cluster URL
        (redis+cluster://) or `cluster` makes it a Redis Cluster client (balances.connection)."""
        timeout = options.get("call_timeout")
        client = open_client(url, cluster=cluster, socket_connect_timeout=max(timeout or 5.0, 1.0))
        store = cls(client, partitions, **options)
        store._owns_client = True
        await store.ready()
        return store

    async def close(self) -> None:
        """Waits for calls in flight, then closes the client if connect() made it."""
        while self._pending or self._tasks:
            if self._pending and not self._flush_scheduled:
                self._flush()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._blocking is not None:
            await self._blocking.aclose()
            self._blocking = None
        if self._nodes is not None:
            await self._nodes.aclose()
        if self._owns_client:
            await self.redis.aclose()

    # ---- install: partitions and functions -------------------------------------------------------------

    async def ready(self) -> None:
        """Reads (or installs) the partition count and loads the function library; idempotent."""
        if self._partitions is not None:
            return
        if self._ready_task is None:
            self._ready_task = asyncio.ensure_future(self._install())
        try:
            await asyncio.shield(self._ready_task)
        except Exception:
            self._ready_task = None
            raise

    async def _install(self) -> None:
        wanted = self._wanted_partitions
        if wanted is not None and not 1 <= wanted <= k.MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1..{k.MAX_PARTITIONS}")
        if self._nodes is not None:
            await self._nodes.initialize()
        await self.redis.set(k.PARTITIONS_KEY, wanted or k.DEFAULT_PARTITIONS, nx=True)
        installed = int(await self.redis.get(k.PARTITIONS_KEY))
        if wanted is not None and installed != wanted:
            raise ValueError(f"{k.PARTITIONS_KEY} is {installed}, not {wanted}: partitions are fixed at install")
        await self._load_library()
        self._partitions = installed

    async def _load_library(self) -> None:
        """FUNCTION LOAD on the server, or on every primary of a cluster (a function runs on the node that
        owns its keys); called again whenever a node answers "Function not found" (a node that was
        restarted without persistence, a primary added by resharding)."""
        if self._nodes is None:
            await load_library(self.redis, self.library)
            return
        await asyncio.gather(*(load_library(self._nodes.client(node), self.library)
                               for node in self._nodes.primaries()))

    async def client_for(self, key: str) -> aioredis.Redis:
        """A plain client of the server holding `key` (its primary on a cluster): for MULTI/EXEC over one
        partition's keys (ocs.audit) and anything else that must reach that node itself."""
        if self._nodes is None:
            return self.redis
        if not self._nodes.ready:
            await self._nodes.initialize()
        return self._nodes.client(self._nodes.node_for_key(key))

    async def primary_clients(self) -> list[aioredis.Redis]:
        """A plain client per primary (the server alone without a cluster): what a SCAN must visit."""
        if self._nodes is None:
            return [self.redis]
        if not self._nodes.ready:
            await self._nodes.initialize()
        return [self._nodes.client(node) for node in self._nodes.primaries()]

    @property
    def partitions(self) -> int:
        if self._partitions is None:
            raise RuntimeError("BalanceStore not ready: await store.ready() (connect() does)")
        return self._partitions

    def partition_for(self, msisdn: str) -> int:
        """The partition of a new subscriber: crc32(msisdn) % P."""
        return k.partition_of(msisdn, self.partitions)

    # ---- batching --------------------------------------------------------------------------------------

    def _enqueue(self, function: str, keys: Sequence[str], args: Sequence[Any],
                 extra: Sequence[tuple] = ()) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = 0.0
        if self.call_timeout is not None:
            deadline = loop.time() + self.call_timeout
            if self._watchdog is None:
                self._watchdog = loop.call_at(deadline, self._expire)
        self._pending.append(_Call(function, keys, args, extra, future, deadline))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        """Sends what is pending in pipelines of at most max_batch calls, at most max_inflight pipelines at a
        time; the rest waits for a pipeline to come back. Several moderate pipelines in flight let Redis
        work on one while this process encodes the next and decodes the last; the cap keeps batches growing
        under load instead of connections."""
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and self._inflight < self.max_inflight:
            # callers that gave up (call timeout) are not sent
            batch = [call for call in self._pending[:self.max_batch] if not call.future.done()]
            del self._pending[:self.max_batch]
            if not batch:
                continue
            self._inflight += 1
            task = loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _expire(self) -> None:
        """The one timer bounding every call (cheaper than a timer per call): callers whose deadline passed,
        waiting for a pipeline slot or for Redis, hear StoreUnavailable; re-armed for the next deadline."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = None
        for call in itertools.chain(self._pending, *self._sending):
            if call.future.done():
                continue
            if call.deadline <= now:
                call.future.set_exception(StoreUnavailable(
                    f"no answer from Redis within {self.call_timeout * 1000:.0f} ms"))
            elif earliest is None or call.deadline < earliest:
                earliest = call.deadline
        if earliest is not None:  # at most 8 scans per call_timeout, however many calls are waiting
            self._watchdog = loop.call_at(max(earliest, now + self.call_timeout / 8), self._expire)

    def _sent(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, batch: list[_Call]) -> None:
        self._sending.append(batch)
        try:
            results = await self._execute(batch)
            retry = [call for call, result in zip(batch, results, strict=True)
                     if type(result) is not bytes and is_missing_function(result)]
            if retry:
                await self._load_library()
                again = dict(zip(map(id, retry), await self._execute(retry), strict=True))
                results = [again.get(id(call), result) for call, result in zip(batch, results, strict=True)]
        except BaseException as exc:  # connection lost, cancelled: every caller of the batch hears it
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._sending.remove(batch)
        for call, result in zip(batch, results, strict=True):
            future = call.future
            if future.done():  # the caller was cancelled
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        """One pipeline for the batch; the result (or error) of each call's FCALL, in order (an error of a
        call's extra command counts as the call's error)."""
        chunks = []
        replies_per_call = []
        cluster = self._nodes is not None
        routes: list[Any] = []  # on a cluster: the key each command is routed by
        for call in batch:
            for command in call.extra:
                chunks.append(_pack(command))
                if cluster:
                    routes.append(_command_key(command))
            if call.function:
                chunks.append(_pack_fcall(call.function, call.keys, call.args))
                if cluster:
                    routes.append(call.keys[0] if call.keys else None)
            replies_per_call.append(len(call.extra) + (1 if call.function else 0))
        self.pipelines_sent += 1
        self.calls_sent += len(batch)
        replies = await (self._cluster_roundtrip(chunks, routes) if cluster else self._roundtrip(chunks))
        if replies_per_call.count(1) == len(batch):  # one reply per call: the replies are the results
            return replies
        results = []
        position = 0
        for count in replies_per_call:
            mine = replies[position:position + count]
            position += count
            results.append(next((r for r in mine if isinstance(r, ResponseError)), mine[-1]))
        return results

    async def _roundtrip(self, packed: list[bytes], client: aioredis.Redis | None = None) -> list[Any]:
        """Sends packed commands on one pooled connection and reads every reply; error replies come back as
        ResponseError values. The commands are packed here (_pack) rather than by redis-py's generic packer,
        which costs more than all the rest of a charge() on this side; redis-py still owns the connection
        (pool, auth, TLS, RESP parsing with hiredis). `client`: a cluster node's (default: the server's).

        With redis-py's hiredis parser (the installed one), the batch is written and its replies taken from
        the parser's hiredis Reader here (`_hiredis_roundtrip`): one timeout for the whole pipeline instead
        of a wait_for Task for the write and a timeout context per reply."""
        pool = (client or self.redis).connection_pool
        connection = await pool.get_connection()
        try:
            if type(connection._parser) is _HiredisParser and connection.is_connected:
                return await _hiredis_roundtrip(connection, b"".join(packed), len(packed))
            await connection.send_packed_command(b"".join(packed), check_health=False)
            replies: list[Any] = []
            for _ in range(len(packed)):
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:  # an error reply; the connection is fine
                    replies.append(error)
            return replies
        except BaseException:
            await connection.disconnect(nowait=True)  # replies may be left unread
            raise
        finally:
            await pool.release(connection)

    async def _cluster_roundtrip(self, packed: list[bytes], routes: Sequence[Any]) -> list[Any]:
        """_roundtrip on a cluster: each command goes to the primary owning the slot of its key (`routes`;
        None: any primary), one pipeline per node, all nodes at once; replies in the order of `packed`. A
        MOVED reply (failover, resharding) re-sends that command to the node it names and re-reads the slot
        map, an ASK reply (a slot being migrated) re-sends it there after ASKING; neither ran the command."""
        nodes = self._nodes
        assert nodes is not None
        if not nodes.ready:
            await nodes.initialize()
        replies: list[Any] = [None] * len(packed)
        todo = list(range(len(packed)))
        redirected: dict[int, str] = {}  # command -> the node a MOVED or ASK reply named
        asking: set[int] = set()  # ... after an ASK: sent after ASKING
        for attempt in range(CLUSTER_REDIRECTS + 1):
            groups: dict[str, tuple[aioredis.Redis, list[int]]] = {}
            for index in todo:
                if index in redirected:
                    client, name = nodes.client_by_name(redirected[index]), redirected[index]
                else:
                    key = routes[index]
                    node = nodes.node_for_key(key) if key is not None else nodes.primaries()[0]
                    client, name = nodes.client(node), node.name
                groups.setdefault(name, (client, []))[1].append(index)
            answers = await asyncio.gather(*(
                self._roundtrip([chunk for i in indexes for chunk in
                                 ((_ASKING, packed[i]) if i in asking else (packed[i],))], client)
                for client, indexes in groups.values()), return_exceptions=True)
            failed = next((answer for answer in answers if isinstance(answer, BaseException)), None)
            if failed is not None:
                if isinstance(failed, RedisConnectionError | RedisTimeoutError):
                    await self._refresh_slots()  # a primary is gone: a replica may have taken over
                raise failed
            todo, moved, sent_asking, redirected, asking = [], False, asking, {}, set()
            for (_, indexes), answer in zip(groups.values(), answers, strict=True):
                replies_of_node = iter(answer)
                for index in indexes:
                    if index in sent_asking:
                        next(replies_of_node)  # ASKING's +OK
                    reply = replies[index] = next(replies_of_node)
                    if isinstance(reply, AskError) and attempt < CLUSTER_REDIRECTS:  # MovedError is one too
                        todo.append(index)
                        redirected[index] = f"{reply.host}:{reply.port}"
                        if isinstance(reply, MovedError):
                            moved = True
                        else:
                            asking.add(index)
            if not todo:
                break
            if moved:
                await self._refresh_slots()
        return replies

    async def _refresh_slots(self) -> None:
        assert self._nodes is not None
        try:
            await self._nodes.refresh()
        except Exception:  # the next call tries again; its caller hears the original error
            pass

    async def _bounded(self, awaitable: Any, timed: bool = False) -> Any:
        """Redis down, busy or slow becomes StoreUnavailable. A call's future is bounded by _expire; any other
        awaitable (`timed`) gets a wait_for of call_timeout."""
        try:
            if not timed or self.call_timeout is None:
                return await awaitable
            return await asyncio.wait_for(awaitable, self.call_timeout)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
            raised = self._unavailable(exc)
            if raised is exc:
                raise
            raise raised from exc

    def _unavailable(self, exc: Exception) -> Exception:
        """What a caller hears for a Redis error: StoreUnavailable when Redis is down, busy or slow (a timeout,
        a lost connection, a BUSY/LOADING/... reply), the error itself otherwise."""
        if isinstance(exc, TimeoutError):
            return StoreUnavailable(f"no answer from Redis within {(self.call_timeout or 0) * 1000:.0f} ms")
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            return StoreUnavailable(f"Redis unavailable: {exc}")
        if isinstance(exc, ResponseError) and str(exc).startswith(UNAVAILABLE_REPLIES):
            return StoreUnavailable(f"Redis busy: {exc}")
        return exc

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any],
                    extra: Sequence[tuple] = ()) -> Any:
        if self._partitions is None:
            await self._bounded(self.ready(), timed=True)
        try:  # _bounded's untimed case, inlined: this runs once per CCR
            return await self._enqueue(self.library.functions[name], keys, args, extra)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
            raised = self._unavailable(exc)
            if raised is exc:
                raise
            raise raised from exc

    async def _commands(self, *commands: tuple) -> Any:
        """Plain commands riding in the tick's pipeline, bounded like a call; the last one's reply."""
        if self._partitions is None:
            await self._bounded(self.ready(), timed=True)
        return await self._bounded(self._enqueue("", (), (), commands))

    # ---- locating subscribers and sessions ------------------------------------------------------------

    async def _get(self, key: str) -> Any:
        """A GET that rides in the tick's pipeline: index look-ups of concurrent CCR-Is share a round trip
        (and a connection) with the charges instead of each taking a pooled connection of its own."""
        return await self._commands(("GET", key))

    async def locate_msisdn(self, msisdn: str) -> Location | None:
        location = self._msisdns.get(msisdn)
        if location is None:
            value = await self._get(k.idx_msisdn_key(msisdn))
            if value is None:
                return None
            location = k.parse_location(value)
            self._msisdns.put(msisdn, location)
        return location

    async def locate_imsi(self, imsi: str) -> Location | None:
        location = self._imsis.get(imsi)
        if location is None:
            value = await self._get(k.idx_imsi_key(imsi))
            if value is None:
                return None
            location = k.parse_location(value)
            self._imsis.put(imsi, location)
        return location

    async def locate_session(self, session_id: str) -> Location | None:
        location = self._sessions.get(session_id)
        if location is None:
            value = await self._get(k.sidx_key(session_id))
            if value is None:
                return None
            location = k.parse_location(value)
            self._sessions.put(session_id, location)
        return location

    def forget(self, *, msisdn: str | None = None, session_id: str | None = None, imsi: str | None = None) -> None:
        """Drops cached locations (after a stale-plan answer, a re-provisioning, ...)."""
        if msisdn is not None:
            self._msisdns.drop(msisdn)
        if session_id is not None:
            self._sessions.drop(session_id)
        if imsi is not None:
            self._imsis.drop(imsi)

    # ---- charging --------------------------------------------------------------------------------------

    async def charge(self, request: ChargeRequest, session_location: Location | None = None) -> ChargeOutcome:
        """One CCR: one FCALL of charge.lua (event.lua for EVENT), batched with the tick's other calls.
        CCR-I also writes sidx:<session-id> and adds the session to its subscriber's subses: set in the same
        pipeline; CCR-T gives sidx the closed-session TTL and takes the session out of subses:.
        `session_location`: the session's index value with its rating keys (CCR-I; a CCR-U that brings new
        keys rewrites it in the same pipeline)."""
        outcome = _outcome_decoder.decode(await self._charge_call(request, session_location))
        if outcome.need_schedules:
            # a schedule named by id alone is not known to the function (a fresh or restarted Valkey, a new
            # library): nothing was charged; once more with the schedules in full (kept there from then on)
            outcome = _outcome_decoder.decode(await self._charge_call(full_schedules(request), session_location))
            if outcome.need_schedules:
                raise ResponseError("charge: a schedule named by id is unknown to the function and to this process")
        p = request.partition
        if session_location is not None and request.request_type == UPDATE:
            self._sessions.put(request.session_id, session_location)
        if request.request_type == INITIAL:
            if outcome.result_code == 2001:
                self._sessions.put(request.session_id, session_location
                                   or Location(p, request.msisdn, request.plan, request.group))
            elif outcome.result_code != 5012 or outcome.stale_plan is not None:
                # no session was created (5030, 4010, stale plan): take back the index entry; 5012 without
                # stale_plan means the session exists and the entry is its own
                await self._commands(("DEL", k.sidx_key(request.session_id)),
                                     ("SREM", k.subscriber_sessions_key(p, request.msisdn), request.session_id))
        if outcome.stale_plan is not None:
            keys = session_location or self._sessions.get(request.session_id) or Location(p, request.msisdn, "")
            self.forget(msisdn=request.msisdn, session_id=request.session_id)
            if request.request_type in (UPDATE, TERMINATION):  # the session's index entry names the old ones
                fresh = Location(p, request.msisdn, outcome.stale_plan, outcome.stale_group or "", keys.plmn,
                                 keys.destination)
                await self._commands(("SET", k.sidx_key(request.session_id), k.location_value(fresh), "XX",
                                      "KEEPTTL"))
        elif request.request_type == TERMINATION:
            self._sessions.drop(request.session_id)
        return outcome

    async def _charge_call(self, request: ChargeRequest, session_location: Location | None) -> Any:
        """The FCALL of one charge (with its index commands riding before it); its raw reply."""
        p = request.partition
        payload = _encoder.encode(request)
        group_keys = (k.group_key(p, request.group),) if request.group else ()
        if request.request_type == EVENT:
            keys = (k.sub_key(p, request.msisdn), k.bal_key(p, request.msisdn),
                    k.evt_key(p, request.session_id, request.request_number), k.cdr_key(p), k.ledger_key(p),
                    k.expiry_key(p), k.usage_counters_key(p, request.msisdn), *group_keys)
            return await self._call("event", keys, (payload,))
        else:
            keys = (k.sub_key(p, request.msisdn), k.bal_key(p, request.msisdn),
                    k.ses_key(p, request.session_id), k.open_key(p), k.cdr_key(p), k.ledger_key(p),
                    k.expiry_key(p), k.usage_counters_key(p, request.msisdn), k.schedules_key(p), *group_keys)
            extra: tuple[tuple, ...] = ()
            subses = k.subscriber_sessions_key(p, request.msisdn)
            if request.request_type == INITIAL:
                location = session_location or Location(p, request.msisdn, request.plan, request.group)
                extra = (("SET", k.sidx_key(request.session_id), k.location_value(location)),
                         ("SADD", subses, request.session_id))
            elif request.request_type == UPDATE and session_location is not None:
                extra = (("SET", k.sidx_key(request.session_id), k.location_value(session_location), "XX",
                          "KEEPTTL"),)
            elif request.request_type == TERMINATION:
                extra = (("PEXPIRE", k.sidx_key(request.session_id), SESSION_INDEX_TTL_MS),
                         ("SREM", subses, request.session_id))
            return await self._call("charge", keys, (payload,), extra)

    async def topup(self, msisdn: str, amount: int, reference: str | None, now_ms: int) -> TopupResult:
        """Credits `amount` micro-units to the money bucket; a reference already used changes nothing."""
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise ValueError("a top-up amount is a positive integer number of micro-units")
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        p = location.partition
        keys = [k.sub_key(p, msisdn), k.bal_key(p, msisdn), k.ledger_key(p)]
        if reference:
            keys.append(k.tup_key(p, reference))
        raw = await self._call("topup", keys, (msisdn, str(amount), reference or "", str(now_ms)))
        answer = _topup_decoder.decode(raw)
        if answer.unknown:
            self.forget(msisdn=msisdn)
            raise UnknownSubscriber(msisdn)
        return TopupResult(applied=answer.applied, balance=answer.balance, reference=answer.reference)

    # ---- buckets, accounts and groups: operator changes (each balance change with its ledger entry) -------

    async def _bucket_call(self, op: str, *, msisdn: str = "", group: str = "", now_ms: int | None = None,
                           reference: str | None = None, **fields: Any) -> AccountChange:
        """One FCALL of bucket.lua on a subscriber's wallet (msisdn) or a group's (group)."""
        if msisdn:
            location = await self.locate_msisdn(msisdn)
            if location is None:
                raise UnknownSubscriber(msisdn)
            p = location.partition
            keys = [k.bal_key(p, msisdn), k.ledger_key(p), k.expiry_key(p), k.sub_key(p, msisdn)]
        else:
            partition = await self.group_partition(group)
            if partition is None:
                raise UnknownGroup(group)
            p = partition
            keys = [k.group_key(p, group), k.ledger_key(p), k.expiry_key(p)]
        if reference:
            keys.append(k.operation_key(p, op, reference))
        payload = _encoder.encode({"op": op, "msisdn": msisdn, "group": group, "now_ms": _now(now_ms),
                                   "idempotent": bool(reference), "reference": reference or "", **fields})
        answer = _account_decoder.decode(await self._call("bucket", keys, (payload,)))
        if answer.unknown:
            self.forget(msisdn=msisdn)
            raise UnknownSubscriber(msisdn)
        if answer.error is not None:
            raise ValueError(answer.error)
        return AccountChange(applied=answer.applied, balance=answer.balance, entries=answer.entries)

    @staticmethod
    def _owner(bucket: str, msisdn: str, group: str | None) -> dict[str, str]:
        """'@<id>' names a bucket of the subscriber's group."""
        if bucket.startswith("@"):
            if not group:
                raise ValueError(f"{msisdn} is in no group: there is no bucket {bucket}")
            return {"group": group, "bucket": bucket[1:]}
        return {"msisdn": msisdn, "bucket": bucket}

    async def add_bucket(self, msisdn: str, bucket: Bucket, *, reference: str | None = None, kind: str = "credit",
                         now_ms: int | None = None) -> AccountChange:
        """Adds bucket.amount to the subscriber's bucket bucket.id and sets its metadata (creating it if
        needed), after expiring what has expired: a bundle, an add-on, a renewal. Ledger entry of type `kind`;
        with a reference it is applied once."""
        check_bucket(bucket, shared=False)
        return await self._bucket_call("credit", msisdn=msisdn, now_ms=now_ms, reference=reference,
                                       bucket=bucket.id, amount=bucket.amount, meta=bucket_meta(bucket), kind=kind)

    async def add_group_bucket(self, group: str, bucket: Bucket, *, reference: str | None = None,
                               kind: str = "credit", now_ms: int | None = None) -> AccountChange:
        """add_bucket for a group's shared bucket (member_limits allowed)."""
        check_bucket(bucket, shared=True)
        return await self._bucket_call("credit", group=group, now_ms=now_ms, reference=reference,
                                       bucket=bucket.id, amount=bucket.amount, meta=bucket_meta(bucket), kind=kind)

    async def adjust(self, msisdn: str, bucket: str, amount: int, reason: str, reference: str | None = None, *,
                     now_ms: int | None = None) -> AccountChange:
        """An operator correction of one bucket (signed; '@<id>' = the subscriber's group's bucket) with an
        "adjustment" ledger entry carrying the reason; with a reference it is applied once."""
        if not isinstance(amount, int) or isinstance(amount, bool) or amount == 0 or abs(amount) > MAX_EXACT:
            raise ValueError("an adjustment is a non-zero integer (micro-units for money)")
        if not reason:
            raise ValueError("an adjustment needs a reason")
        sub = await self.subscriber(msisdn)
        if sub is None:
            raise UnknownSubscriber(msisdn)
        owner = self._owner(bucket, msisdn, sub.group)
        return await self._bucket_call("adjust", now_ms=now_ms, reference=reference, amount=amount, reason=reason,
                                       **owner)

    async def set_member_limit(self, group: str, bucket: str, msisdn: str, limit: int | None, *,
                               now_ms: int | None = None) -> None:
        """The most units `msisdn` may use of the group's bucket over its life (None: no limit)."""
        if limit is not None and (not isinstance(limit, int) or not 0 <= limit <= MAX_EXACT):
            raise ValueError("a member limit is a non-negative integer")
        await self._bucket_call("limit", group=group, bucket=bucket, member=msisdn, limit=limit, now_ms=now_ms)

    async def settle(self, msisdn: str, now_ms: int) -> AccountChange:
        """Expires and rolls over the subscriber's (and its group's) buckets whose validity ended at now_ms."""
        sub = await self.subscriber(msisdn)
        if sub is None:
            raise UnknownSubscriber(msisdn)
        change = await self._bucket_call("settle", msisdn=msisdn, now_ms=now_ms)
        if sub.group:
            more = await self._bucket_call("settle", group=sub.group, now_ms=now_ms)
            change = AccountChange(True, 0, change.entries + more.entries)
        return change

    async def expire_buckets(self, now_ms: int) -> int:
        """The sweep (cron / operator): every wallet with a bucket whose validity ended by now_ms is settled
        (expiry, rollover); returns the ledger entries written. The charge functions do the same lazily for the
        subscribers they touch."""
        await self.ready()
        written = 0
        for p in range(self.partitions):
            while True:
                due = [_text(m) for m in await self.redis.zrangebyscore(k.expiry_key(p), "-inf", now_ms, 0, SCAN_PAGE)]
                for member in due:
                    kind, _, name = member.partition(":")
                    try:
                        if kind == "m":
                            written += (await self._bucket_call("settle", msisdn=name, now_ms=now_ms)).entries
                        else:
                            written += (await self._bucket_call("settle", group=name, now_ms=now_ms)).entries
                    except (UnknownSubscriber, UnknownGroup):
                        await self.redis.zrem(k.expiry_key(p), member)
                if len(due) < SCAN_PAGE:
                    break
        return written

    async def roll_over(self, msisdn: str, now_ms: int) -> int:
        """Period end: unused units of ended buckets with a rollover rule move into the next period's bucket
        (up to the cap), the rest expires. `msisdn` = "all" does every subscriber and group (the sweep).
        Returns the ledger entries written."""
        if msisdn == "all":
            return await self.expire_buckets(now_ms)
        return (await self.settle(msisdn, now_ms)).entries

    async def set_status(self, msisdn: str, status: str) -> str:
        """active | barred | suspended | terminated; returns the previous status."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        return await self._member_call(msisdn, {"op": "status", "status": status})

    async def set_account(self, msisdn: str, kind: str, credit_limit: int = 0) -> str:
        """prepaid, or postpaid with a credit limit (micro-units); returns the previous kind."""
        check_subscriber(Subscriber(msisdn=msisdn, kind=kind, credit_limit=credit_limit))
        return await self._member_call(msisdn, {"op": "account", "kind": kind, "credit_limit": credit_limit})

    async def _member_call(self, msisdn: str, args: dict, group: str | None = None) -> str:
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        p = location.partition
        keys = [k.sub_key(p, msisdn), k.bal_key(p, msisdn)]
        if group:
            keys += [k.group_key(p, group), k.group_members_key(p, group)]
        answer = _member_decoder.decode(await self._call("member", keys, (_encoder.encode(args),)))
        if answer.unknown:
            self.forget(msisdn=msisdn)
            raise UnknownSubscriber(msisdn)
        if answer.error is not None:
            raise ValueError(answer.error)
        return answer.old

    # groups

    async def create_group(self, group: str, partition: int | None = None) -> int:
        """A sharing group (family, company) in one partition (default: crc32 of its id); its members are
        provisioned into that partition, so a member's keys and the shared buckets share one hash tag.
        Returns the partition; an existing group keeps its own."""
        check_id("group", group)
        await self.ready()
        wanted = partition if partition is not None else k.partition_of(group, self.partitions)
        if not 0 <= wanted < self.partitions:
            raise ValueError(f"partition {wanted} outside 0..{self.partitions - 1}")
        await self.redis.set(k.idx_group_key(group), wanted, nx=True)
        return int(await self.redis.get(k.idx_group_key(group)))

    async def group_partition(self, group: str) -> int | None:
        value = await self._commands(("GET", k.idx_group_key(group)))
        return None if value is None else int(value)

    async def group_members(self, group: str) -> list[str]:
        p = await self.group_partition(group)
        if p is None:
            raise UnknownGroup(group)
        return sorted(_text(m) for m in await self.redis.smembers(k.group_members_key(p, group)))

    async def group_balances(self, group: str) -> list[BucketState]:
        p = await self.group_partition(group)
        if p is None:
            raise UnknownGroup(group)
        fields = await self._commands(("HGETALL", k.group_key(p, group)))
        return bucket_states(dict(_pairs(fields)))

    async def join_group(self, msisdn: str, group: str) -> None:
        """Makes an existing subscriber a member; it must already live in the group's partition (provision new
        members with Subscriber.group instead: a subscriber never moves)."""
        p = await self.group_partition(group)
        if p is None:
            raise UnknownGroup(group)
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        if location.partition != p:
            raise ValueError(f"{msisdn} is in partition {location.partition}, group {group} in {p}: only a "
                             "subscriber provisioned into the group's partition can join")
        await self._member_call(msisdn, {"op": "join", "group": group}, group)
        await self._reindex(location, group)

    async def leave_group(self, msisdn: str) -> None:
        """Refused (ValueError) while the subscriber's sessions hold units of the shared buckets."""
        sub = await self.subscriber(msisdn)
        if sub is None:
            raise UnknownSubscriber(msisdn)
        if not sub.group:
            return
        await self._member_call(msisdn, {"op": "leave", "group": sub.group}, sub.group)
        location = await self.locate_msisdn(msisdn)
        assert location is not None
        await self._reindex(location, "")

    async def _reindex(self, location: Location, group: str) -> None:
        """The index entries name the group: the next CCR sends the right keys (a cached stale entry elsewhere
        is answered stale by the charge function and refreshed)."""
        sub = await self.subscriber(location.msisdn)
        value = k.location_value(Location(location.partition, location.msisdn, location.plan, group))
        commands: list[tuple] = [("SET", k.idx_msisdn_key(location.msisdn), value)]
        if sub is not None and sub.imsi:
            commands.append(("SET", k.idx_imsi_key(sub.imsi), value))
        await self._pipeline(commands)
        self.forget(msisdn=location.msisdn, imsi=sub.imsi if sub is not None else None)

    # the ledger

    async def ledger(self, partition: int, start: str = "-", end: str = "+") -> list[LedgerEntry]:
        """The partition's ledger entries from `start` to `end` (stream ids, inclusive), read in pages."""
        entries: list[LedgerEntry] = []
        key = k.ledger_key(partition)
        while True:
            page = await self.redis.xrange(key, start, end, count=SCAN_PAGE)
            entries.extend(parse_entry(entry_id, fields) for entry_id, fields in page)
            if len(page) < SCAN_PAGE:
                return entries
            start = "(" + _text(page[-1][0])

    async def history(self, msisdn: str) -> list[dict[str, Any]]:
        """The ledger lines of the subscriber's buckets (and its group's shared ones) with running balances:
        a balance explained line by line (reads the partition's whole ledger)."""
        sub = await self.subscriber(msisdn)
        if sub is None or sub.partition is None:
            raise UnknownSubscriber(msisdn)
        return ledger_history(await self.ledger(sub.partition), msisdn, sub.group or "")

    async def close_session(self, session_id: str, cause: str, now_ms: int) -> bool:
        """Closes an open session outside Diameter (administrator, RAA/ASA 5002): releases its reservations and
        writes the closing CDR record. False when the session is unknown or not open."""
        return (await self.close_session_if(session_id, cause, now_ms)).closed

    async def close_session_if(self, session_id: str, cause: str, now_ms: int, *, before_ms: int | None = None,
                               origin_host: str | None = None, tcc: dict | None = None) -> CloseResult:
        """close_session, only if the conditions hold when the script runs (see close.lua): last activity
        earlier than `before_ms`; latest CCR from `origin_host`; silent for its Tcc (`tcc`: min, max, default
        in ms, vt: {rating group: Validity-Time seconds}). Concurrent callers close a session once."""
        location = await self.locate_session(session_id)
        if location is None:
            return CloseResult(False)
        p, msisdn = location.partition, location.msisdn
        keys = (k.sub_key(p, msisdn), k.bal_key(p, msisdn), k.ses_key(p, session_id), k.open_key(p),
                k.cdr_key(p), k.subscriber_sessions_key(p, msisdn))
        if location.group:
            keys += (k.group_key(p, location.group),)
        conditions: dict[str, Any] = {}
        if before_ms is not None:
            conditions["before"] = before_ms
        if origin_host is not None:
            conditions["origin_host"] = origin_host
        if tcc is not None:
            conditions["tcc"] = tcc
        args = (session_id, msisdn, cause, str(now_ms), _encoder.encode(conditions) if conditions else "")
        reply = await self._call("close", keys, args)
        code = int(reply[0])
        if code == 1:
            await self._commands(("PEXPIRE", k.sidx_key(session_id), SESSION_INDEX_TTL_MS))
            self._sessions.drop(session_id)
            return CloseResult(True)
        if code == 2:
            return CloseResult(False, int(reply[1]))
        return CloseResult(False)

    # ---- provisioning ----------------------------------------------------------------------------------

    def _provision_commands(self, sub: Subscriber, partition: int, money: int, allowances: dict[str, int] | None,
                            replace: bool, buckets: Sequence[Bucket] = (), now_ms: int | None = None) -> list[tuple]:
        if not isinstance(money, int) or any(not isinstance(v, int) for v in (allowances or {}).values()):
            raise ValueError("money and allowances are integers")
        check_subscriber(sub)
        ids = {"money", *(allowances or {})}
        for bucket in buckets:
            check_bucket(bucket, shared=False)
            if bucket.id in ids and not (bucket.id == "money" and money == 0):
                raise ValueError(f"bucket {bucket.id!r} is given twice")
            ids.add(bucket.id)
        payload = _encoder.encode({
            "msisdn": sub.msisdn, "imsi": sub.imsi, "plan": sub.plan, "status": sub.status,
            "currency": sub.currency, "kind": sub.kind, "credit_limit": sub.credit_limit, "group": sub.group,
            "money": money, "allowances": allowances or {}, "replace": replace, "now_ms": _now(now_ms),
            "buckets": [{"id": b.id, "amount": b.amount, "meta": bucket_meta(b)} for b in buckets],
        })
        keys = [k.sub_key(partition, sub.msisdn), k.bal_key(partition, sub.msisdn), k.ledger_key(partition),
                k.expiry_key(partition)]
        if sub.group:
            keys.append(k.group_members_key(partition, sub.group))
        commands: list[tuple] = [("FCALL", self.library.functions["provision"], len(keys), *keys, payload)]
        value = k.location_value(Location(partition, sub.msisdn, sub.plan, sub.group or ""))
        only_new = () if replace else ("NX",)
        commands.append(("SET", k.idx_msisdn_key(sub.msisdn), value, *only_new))
        if sub.imsi:
            commands.append(("SET", k.idx_imsi_key(sub.imsi), value, *only_new))
        return commands

    async def _pipeline(self, commands: Iterable[tuple]) -> list[Any]:
        """Plain commands in one round trip; when the server lacks the function library it is loaded and the
        commands re-sent (callers only send commands that are safe to repeat). Raises the first error."""
        commands = list(commands)
        packed = [_pack(command) for command in commands]
        routes = [_command_key(command) for command in commands] if self._nodes is not None else None
        for attempt in range(2):
            if routes is None:
                results = await self._roundtrip(packed)
            else:
                results = await self._cluster_roundtrip(packed, routes)
            if attempt == 0 and any(is_missing_function(r) for r in results):
                await self._load_library()
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results
        raise AssertionError("unreachable")

    async def _known_locations(self, msisdns: list[str]) -> list[Location | None]:
        """Where each MSISDN already is (a subscriber never moves), None when not provisioned."""
        values = await self._pipeline(("GET", k.idx_msisdn_key(m)) for m in msisdns)
        return [None if v is None else k.parse_location(v) for v in values]

    async def _known_partitions(self, msisdns: list[str]) -> list[int | None]:
        return [None if at is None else at.partition for at in await self._known_locations(msisdns)]

    async def provision(self, sub: Subscriber, money: int = 0, allowances: dict[str, int] | None = None, *,
                        replace: bool = False, buckets: Sequence[Bucket] = (), now_ms: int | None = None) -> int:
        """Creates the subscriber, its balances (the spine's `money` and `allowances`, and `buckets` with
        metadata) and its index keys, with a "provision" ledger entry; returns its partition. Raises
        SubscriberExists unless `replace` (which keeps the partition, the group and open reservations). A
        group member (sub.group) is placed in the group's partition."""
        return (await self._provision([(sub, money, allowances or {}, buckets)], replace, now_ms, single=True))[0]

    async def provision_many(self, subs: list[tuple], *, replace: bool = False, now_ms: int | None = None) -> int:
        """Bulk provisioning, pipelined in chunks, of (Subscriber, money, allowances[, buckets]) tuples; returns
        how many were created (or replaced). Existing subscribers are skipped unless `replace`."""
        return sum(1 for code in await self._provision(subs, replace, now_ms, single=False) if code is not None)

    async def _provision(self, subs: list[tuple], replace: bool, now_ms: int | None, single: bool) -> list:
        await self.ready()
        out: list = []
        groups = {sub.group for sub, *_ in subs if sub.group}
        group_partitions = {group: await self.group_partition(group) for group in groups}
        for group, partition in group_partitions.items():
            if partition is None:
                raise UnknownGroup(group)
        for start in range(0, len(subs), PROVISION_CHUNK):
            chunk = subs[start:start + PROVISION_CHUNK]
            known = await self._known_locations([row[0].msisdn for row in chunk])
            commands: list[tuple] = []
            firsts = []
            for row, at in zip(chunk, known, strict=True):
                sub, money, allowances = row[0], row[1], row[2]
                buckets = row[3] if len(row) > 3 else ()
                if at is not None and not replace:
                    if single:
                        raise SubscriberExists(sub.msisdn)
                    out.append(None)
                    continue
                partition = self._partition_of(sub, group_partitions)
                if at is not None:
                    if at.group != (sub.group or ""):
                        raise ValueError(f"subscriber {sub.msisdn} is in group {at.group or '(none)'}: join or "
                                         "leave groups with join_group / leave_group")
                    partition = at.partition
                firsts.append((sub, len(commands), len(out)))
                out.append(partition)
                commands += self._provision_commands(sub, partition, money, allowances, replace, buckets, now_ms)
            if not commands:
                continue
            results = await self._pipeline(commands)
            stale_imsis = []
            for sub, first, position in firsts:
                code, old_imsi = int(results[first][0]), _text(results[first][1])
                if code == 0:
                    if single:
                        raise SubscriberExists(sub.msisdn)
                    out[position] = None
                if code == 2 and old_imsi and old_imsi != (sub.imsi or ""):
                    stale_imsis.append(k.idx_imsi_key(old_imsi))
                    self._imsis.drop(old_imsi)
                self._forget_subscriber(sub)
            if stale_imsis:
                await self.redis.delete(*stale_imsis)
        return out

    def _partition_of(self, sub: Subscriber, group_partitions: dict[str, int | None] | None = None) -> int:
        if sub.group:
            partition = (group_partitions or {}).get(sub.group)
            if partition is None:
                raise UnknownGroup(sub.group)
            if sub.partition is not None and sub.partition != partition:
                raise ValueError(f"a member of group {sub.group} lives in the group's partition {partition}")
            return partition
        if sub.partition is not None:
            if not 0 <= sub.partition < self.partitions:
                raise ValueError(f"partition {sub.partition} outside 0..{self.partitions - 1}")
            return sub.partition
        return self.partition_for(sub.msisdn)

    def _forget_subscriber(self, sub: Subscriber) -> None:
        self._msisdns.drop(sub.msisdn)
        if sub.imsi:
            self._imsis.drop(sub.imsi)

    # ---- reading ---------------------------------------------------------------------------------------

    async def subscriber(self, msisdn: str) -> Subscriber | None:
        location = await self.locate_msisdn(msisdn)
        if location is None:
            return None
        p = location.partition
        raw_fields, money_meta = await self._pipeline([("HGETALL", k.sub_key(p, msisdn)),
                                                       ("HGET", k.bal_key(p, msisdn), "money:m")])
        fields = {_text(f): _text(v) for f, v in _pairs(raw_fields)}
        if not fields:
            return None
        limit = 0
        if money_meta is not None:
            limit = int(msgspec.json.decode(money_meta).get("credit_limit") or 0)
        return Subscriber(msisdn=fields.get("msisdn", msisdn), imsi=fields.get("imsi"),
                          plan=fields.get("plan", ""), status=fields.get("status", ""),
                          currency=fields.get("currency", ""), partition=p, kind=fields.get("kind", "prepaid"),
                          credit_limit=limit, group=fields.get("group"))

    async def balances(self, msisdn: str) -> list[BucketState]:
        """Every bucket with its balance and reservation (money first), then the group's shared buckets for a
        member ('@<id>', with the member's limit and use). Metadata as provisioned (None: the spine's)."""
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        p = location.partition
        own, group = await self._pipeline([("HGETALL", k.bal_key(p, msisdn)), ("HGET", k.sub_key(p, msisdn), "group")])
        states = bucket_states(dict(_pairs(own)))
        if group is not None:
            name = _text(group)
            shared = await self._commands(("HGETALL", k.group_key(p, name)))
            states += bucket_states(dict(_pairs(shared)), group=name, member=msisdn)
        return states

    async def count_open_sessions(self) -> int:
        await self.ready()
        counts = await self._pipeline(("ZCARD", k.open_key(p)) for p in range(self.partitions))
        return sum(counts)

    async def open_sessions(self, limit: int = 1000) -> list[dict]:
        """Open sessions, least recently active first: session_id, msisdn, plan, partition, created, last
        (ms), origin_host, peer and reservations {rating group: {"granted": units, "buckets": {bucket: amount}}}."""
        await self.ready()
        if limit <= 0:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in range(self.partitions):
                pipe.zrange(k.open_key(p), 0, limit - 1, withscores=True)
            ranges = await pipe.execute()
        members = sorted((float(score), p, _text(sid)) for p, reply in enumerate(ranges)
                         for sid, score in reply)[:limit]
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, p, sid in members:
                pipe.hgetall(k.ses_key(p, sid))
            hashes = await pipe.execute()
        sessions = []
        for (score, p, sid), reply in zip(members, hashes, strict=True):
            fields = {_text(f): v for f, v in reply.items()}
            reservations = {}
            for name, value in fields.items():
                if name.startswith("r:"):
                    held = _reservation_decoder.decode(value)
                    reservations[int(name[2:])] = {"granted": held.u, "buckets": held.b}
            sessions.append({
                "session_id": sid, "partition": p,
                "msisdn": _text(fields.get("msisdn", b"")), "plan": _text(fields.get("plan", b"")),
                "created": int(fields.get("created", 0)), "last": int(score),
                "origin_host": _text(fields.get("origin_host", b"")),
                "peer": _text(fields.get("peer", b"")) or _text(fields.get("origin_host", b"")),
                "reservations": reservations,
            })
        return sessions

    # ---- session ownership (ocs.routing, ocs.supervision) ------------------------------------------------

    async def session_owner(self, session_id: str) -> SessionOwner | None:
        """Who owns the session now (refreshed by every CCR); None when the session is unknown."""
        location = await self.locate_session(session_id)
        if location is None:
            return None
        state, msisdn, host, realm, peer, last = await self._commands(
            ("HMGET", k.ses_key(location.partition, session_id), "state", "msisdn", "origin_host",
             "origin_realm", "peer", "last"))
        if state is None:
            return None
        host = _text(host or b"")
        return SessionOwner(session_id=session_id, partition=location.partition,
                            msisdn=_text(msisdn or location.msisdn), state=_text(state), origin_host=host,
                            origin_realm=_text(realm or b""), peer=_text(peer or b"") or host,
                            last=int(last or 0))

    async def subscriber_sessions(self, msisdn: str) -> list[str]:
        """The subscriber's open session ids (members of subses: that are no longer open are dropped)."""
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        p = location.partition
        index = k.subscriber_sessions_key(p, msisdn)
        members = sorted(_text(m) for m in await self.redis.smembers(index))
        if not members:
            return []
        states = await self._pipeline(("HMGET", k.ses_key(p, sid), "state", "msisdn") for sid in members)
        open_ids = [sid for sid, (state, owner) in zip(members, states, strict=True)
                    if state == b"open" and _text(owner or b"") == msisdn]
        gone = [sid for sid in members if sid not in open_ids]
        if gone:
            await self.redis.srem(index, *gone)
        return open_ids

    async def idle_sessions(self, after_ms: float, upto_ms: int) -> list[tuple[str, int]]:
        """(session id, last activity) of the open sessions whose last activity is in (after_ms, upto_ms]:
        the supervision sweep reads each session once per quiet period, not on every pass."""
        await self.ready()
        low = "-inf" if after_ms == float("-inf") else f"({int(after_ms)}"
        found: list[tuple[str, int]] = []
        partitions = list(range(self.partitions))
        offset = 0
        while partitions:
            pages = await self._pipeline(
                ("ZRANGEBYSCORE", k.open_key(p), low, upto_ms, "WITHSCORES", "LIMIT", offset, SCAN_PAGE)
                for p in partitions)
            full = []
            for p, page in zip(partitions, pages, strict=True):
                if page and not isinstance(page[0], list | tuple):  # flat [member, score, ...] (RESP2)
                    page = [page[i:i + 2] for i in range(0, len(page), 2)]
                found.extend((_text(member), int(float(score))) for member, score in page)
                if len(page) == SCAN_PAGE:
                    full.append(p)
            partitions, offset = full, offset + SCAN_PAGE
        return found

    async def sessions_of_host(self, origin_host: str) -> list[str]:
        """Open session ids whose latest CCR came from `origin_host` (case-insensitive): a scan of every
        open:{p}, for the rare event of a peer restart."""
        await self.ready()
        wanted = origin_host.lower()
        found: list[str] = []
        for p in range(self.partitions):
            start = 0
            while True:
                ids = [_text(m) for m in await self.redis.zrange(k.open_key(p), start, start + SCAN_PAGE - 1)]
                if not ids:
                    break
                hosts = await self._pipeline(("HGET", k.ses_key(p, sid), "origin_host") for sid in ids)
                found.extend(sid for sid, host in zip(ids, hosts, strict=True)
                             if host is not None and _text(host).lower() == wanted)
                if len(ids) < SCAN_PAGE:
                    break
                start += SCAN_PAGE
        return found

    # ---- peer registry and per-process request queues (ocs.routing) ------------------------------------

    async def claim_peer(self, peer: str, owner: str, lease_ms: int, state_id: int | None) -> int | None:
        """This process now holds the connection to `peer` (taking it over from any other). Records the peer's
        Origin-State-Id and returns the one recorded before (None if none): a change means it restarted."""
        commands: list[tuple] = [("SET", k.peer_key(peer), owner, "PX", lease_ms)]
        if state_id is not None:
            commands.append(("SET", k.peer_state_key(peer), state_id, "GET"))
        results = await self._pipeline(commands)
        if state_id is None or results[-1] is None:
            return None
        return int(results[-1])

    async def refresh_peers(self, peers: Iterable[str], owner: str, lease_ms: int) -> None:
        """Extends the lease of every peer this process holds (or takes a lapsed one back); a peer another
        process has claimed since is left to it."""
        peers = list(peers)
        if not peers:
            return
        results = await self._pipeline(
            command for peer in peers
            for command in (("SET", k.peer_key(peer), owner, "PX", lease_ms, "NX"), ("GET", k.peer_key(peer))))
        extend = [peer for i, peer in enumerate(peers) if results[2 * i] is None and results[2 * i + 1] is not None
                  and _text(results[2 * i + 1]) == owner]
        if extend:
            await self._pipeline(("PEXPIRE", k.peer_key(peer), lease_ms) for peer in extend)

    async def release_peer(self, peer: str, owner: str) -> None:
        """The connection to `peer` is gone: drop the registry entry if it is still this process's."""
        key = k.peer_key(peer)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                current = await pipe.get(key)
                if current is None or _text(current) != owner:
                    return
                pipe.multi()
                pipe.delete(key)
                await pipe.execute()
            except WatchError:
                pass  # claimed by another process meanwhile: it is theirs now

    async def peer_owner(self, peer: str) -> str | None:
        """The process holding the connection to `peer`, if its lease is live."""
        value = await self.redis.get(k.peer_key(peer))
        return None if value is None else _text(value)

    async def push_request(self, owner: str, payload: bytes, ttl_ms: int) -> None:
        """Queues a request for process `owner` (the queue vanishes after ttl_ms if nobody takes it)."""
        await self._pipeline([("RPUSH", k.queue_key(owner), payload), ("PEXPIRE", k.queue_key(owner), ttl_ms)])

    async def take_request(self, owner: str, timeout_s: float) -> bytes | None:
        """The next request queued for this process, waiting up to timeout_s (BLPOP on a connection of its
        own, so charging never waits behind it)."""
        if self._blocking is None:
            self._blocking = duplicate(self.redis)
        reply = await self._blocking.blpop([k.queue_key(owner)], timeout=timeout_s)
        return None if reply is None else reply[1]

    async def post_reply(self, request_id: str, payload: bytes, ttl_ms: int) -> None:
        await self._pipeline([("RPUSH", k.reply_key(request_id), payload),
                              ("PEXPIRE", k.reply_key(request_id), ttl_ms)])

    async def wait_reply(self, request_id: str, timeout_s: float) -> bytes | None:
        """The reply to a queued request, or None after timeout_s."""
        reply = await self.redis.blpop([k.reply_key(request_id)], timeout=timeout_s)
        return None if reply is None else reply[1]

    # ---- the product catalog (ocs.catalog decides what; lua/catalog.lua applies it in one call) -----------

    async def _catalog_call(self, msisdn: str, args: dict[str, Any], reference: str | None = None) -> CatalogResult:
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        p = location.partition
        keys = [k.sub_key(p, msisdn), k.bal_key(p, msisdn), k.ledger_key(p), k.expiry_key(p), k.renewal_key(p),
                k.cdr_key(p)]  # the fee records of the purchase or period go to the partition's CDR stream
        if reference:
            keys.append(k.operation_key(p, args["op"], reference))
        payload = _encoder.encode({"msisdn": msisdn, **args})
        answer = _catalog_decoder.decode(await self._call("catalog", keys, (payload,)))
        if answer.unknown:
            self.forget(msisdn=msisdn)
            raise UnknownSubscriber(msisdn)
        if answer.error is not None:
            raise CatalogRefused(answer.code or "refused", answer.error)
        return answer

    @staticmethod
    def _grants(buckets: Sequence[Bucket], source: str | None = None) -> list[dict[str, Any]]:
        out = []
        for bucket in buckets:
            check_bucket(bucket, shared=False)
            meta = bucket_meta(bucket)
            if source:
                meta["source"] = source
            out.append({"id": bucket.id, "amount": bucket.amount, "meta": meta})
        return out

    def _bonuses(self, bonuses: Sequence[Bonus]) -> list[dict[str, Any]]:
        return [{"name": check_id("promotion", b.name), "once": b.once, "buckets": self._grants(b.buckets, "promotion")}
                for b in bonuses]

    async def buy_addon(self, msisdn: str, name: str, price: int, buckets: Sequence[Bucket], *, reference: str,
                        plans: Sequence[str] = (), repeatable: bool = True, bonuses: Sequence[Bonus] = (),
                        now_ms: int | None = None) -> CatalogResult:
        """Debits `price` micro-units from the money bucket and creates the add-on's buckets, in one call with a
        "purchase" ledger entry; applied once per reference (a repeat answers duplicate=True, nothing changed).
        CatalogRefused (nothing changed): code "funds" (balance + credit limit − reserved < price), "eligible"
        (the subscriber's catalog plan is not in `plans`), "repeat" (bought before and not repeatable),
        "status" (terminated)."""
        if not isinstance(price, int) or isinstance(price, bool) or not 0 <= price <= MAX_EXACT:
            raise ValueError("a price is a non-negative integer number of micro-units")
        if not reference:
            raise ValueError("a purchase needs a reference")
        args = {"op": "purchase", "now_ms": _now(now_ms), "name": check_id("add-on", name), "price": price,
                "plans": list(plans), "repeatable": repeatable, "reference": reference,
                "buckets": self._grants(buckets, "addon"), "bonuses": self._bonuses(bonuses)}
        return await self._catalog_call(msisdn, args, reference)

    async def plan_period(self, msisdn: str, mode: str, *, product: str, rating_plan: str, start: int, end: int,
                          fee: int, buckets: Sequence[Bucket], expect_end: int | None = None,
                          anchor: int | None = None, bonuses: Sequence[Bonus] = (), suspend_unpaid: bool = False,
                          now_ms: int | None = None) -> CatalogResult:
        """One period of a catalog plan: `mode` "start" (a new subscriber's first period), "renew" (only if the
        record's period_end is `expect_end`: idempotent per period; a prepaid subscriber who cannot pay gets
        status "unpaid", and "suspended" when `suspend_unpaid`) or "change" (another plan from now on: the
        buckets the old plan's periods granted end now). Charges `fee`, grants `buckets` (source "plan"),
        writes the subscriber's plan, product and period, and its due time in renew:{pNNN}, with a "renewal"
        ledger entry. CatalogRefused "funds" for start/change a prepaid balance does not cover. The index
        keys are the caller's (set_plan_index)."""
        if mode not in ("start", "renew", "change"):
            raise ValueError("mode is start, renew or change")
        if not isinstance(fee, int) or isinstance(fee, bool) or not 0 <= fee <= MAX_EXACT:
            raise ValueError("a fee is a non-negative integer number of micro-units")
        args: dict[str, Any] = {"op": "period", "mode": mode, "now_ms": _now(now_ms), "product": product,
                                "rating_plan": rating_plan, "start": start, "finish": end, "fee": fee,
                                "buckets": self._grants(buckets, "plan"), "bonuses": self._bonuses(bonuses),
                                "suspend_unpaid": suspend_unpaid}
        if expect_end is not None:
            args["expect_end"] = expect_end
        if anchor is not None:
            args["anchor"] = anchor
        return await self._catalog_call(msisdn, args)

    async def grant_bonuses(self, msisdn: str, bonuses: Sequence[Bonus], *, reference: str,
                            now_ms: int | None = None) -> CatalogResult:
        """Promotion bonuses outside a purchase or a period (a top-up): once per reference; a `once` bonus once
        per subscriber."""
        args = {"op": "bonus", "now_ms": _now(now_ms), "reference": reference, "bonuses": self._bonuses(bonuses)}
        return await self._catalog_call(msisdn, args, reference)

    async def plan_record(self, msisdn: str) -> dict[str, str] | None:
        """The catalog fields of the subscriber record: plan, product, period_start, period_end, anchor, status,
        kind, suspended_for (absent ones are left out); None for an unknown subscriber."""
        location = await self.locate_msisdn(msisdn)
        if location is None:
            return None
        names = ("msisdn", "plan", "product", "period_start", "period_end", "anchor", "status", "kind",
                 "suspended_for")
        values = await self._commands(("HMGET", k.sub_key(location.partition, msisdn), *names))
        if values[0] is None:
            return None
        return {name: _text(value) for name, value in zip(names, values, strict=True) if value is not None}

    async def set_plan_index(self, msisdn: str, plan: str) -> None:
        """After a plan change: the index entries name the new plan (a process with the old one cached is
        answered stale plan by the charge function and refreshes)."""
        location = await self.locate_msisdn(msisdn)
        if location is None:
            raise UnknownSubscriber(msisdn)
        sub = await self.subscriber(msisdn)
        value = k.location_value(Location(location.partition, msisdn, plan, location.group))
        commands: list[tuple] = [("SET", k.idx_msisdn_key(msisdn), value)]
        if sub is not None and sub.imsi:
            commands.append(("SET", k.idx_imsi_key(sub.imsi), value))
        await self._pipeline(commands)
        self.forget(msisdn=msisdn, imsi=sub.imsi if sub is not None else None)

    async def due_renewals(self, now_ms: int, limit: int = SCAN_PAGE) -> list[tuple[str, int]]:
        """(msisdn, period end) of the subscribers whose catalog period ended by now_ms, earliest first, at most
        `limit` per partition (renew:{pNNN})."""
        await self.ready()
        pages = await self._pipeline(("ZRANGEBYSCORE", k.renewal_key(p), "-inf", now_ms, "WITHSCORES", "LIMIT", 0,
                                      limit) for p in range(self.partitions))
        due: list[tuple[str, int]] = []
        for page in pages:
            if page and not isinstance(page[0], list | tuple):  # flat [member, score, ...] (RESP2)
                page = [page[i:i + 2] for i in range(0, len(page), 2)]
            due.extend((_text(member), int(float(score))) for member, score in page)
        return sorted(due, key=lambda item: item[1])

    async def drop_renewal(self, msisdn: str) -> None:
        """The subscriber leaves the renewal schedule (no catalog plan any more, or unknown to the catalog)."""
        location = await self.locate_msisdn(msisdn)
        partition = location.partition if location is not None else None
        if partition is None:
            await self.ready()
            await self._pipeline(("ZREM", k.renewal_key(p), msisdn) for p in range(self.partitions))
        else:
            await self._commands(("ZREM", k.renewal_key(partition), msisdn))


class CatalogRefused(ValueError):
    """A catalog operation the subscriber's balance or record does not allow; nothing changed. `code`: funds,
    eligible, repeat, status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Bonus(msgspec.Struct):
    """A promotion's bonus buckets; `once`: granted once per subscriber (counted in the subscriber record)."""

    name: str
    buckets: list[Bucket]
    once: bool = True


class CatalogResult(msgspec.Struct):
    """What a catalog call did: applied (False: not due, unpaid or a duplicate), the buckets and bonuses it
    created, the money balance after."""

    applied: bool = False
    status: str = ""  # bought | granted | start | renew | change | not-due | unpaid
    buckets: list[str] = []
    bonuses: list[str] = []
    balance: int = 0
    old_plan: str = ""
    subscriber_status: str = ""
    duplicate: bool = False
    unknown: bool = False
    error: str | None = None
    code: str | None = None


_catalog_decoder = msgspec.json.Decoder(CatalogResult)
