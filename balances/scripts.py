"""The Lua code of balances/lua as one Redis Functions library, named by the SHA1 of its source.

common.lua (exact integer JSON, pricing, buckets and wallets, the ledger, CDR records) is the library's
prelude, defined once when the library loads instead of on every call as an EVAL script would; each of charge,
event, topup, provision, close, bucket, member and catalog becomes a function whose body is its .lua file (`KEYS` and
`ARGV` are the callback's parameters). Library and function names carry the first 12 hex digits of the
source's SHA1, so two versions of the OCS can share one server during an upgrade and a changed script can
never be called by its old name. Works on Valkey 8/9 and Redis >= 7 (FUNCTION LOAD / FCALL); on Redis
Cluster load it on every primary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

LUA_DIR = Path(__file__).resolve().parent / "lua"
COMMON = "common.lua"
NAMES = ("charge", "event", "topup", "provision", "close", "bucket", "member", "catalog", "billshock")


@dataclass(frozen=True)
class Library:
    version: str  # first 12 hex digits of the SHA1 of the library body
    source: str  # what FUNCTION LOAD receives
    functions: dict[str, str] = field(default_factory=dict)  # script name -> FCALL name

    @property
    def name(self) -> str:
        return f"ocs_{self.version}"


def _read(filename: str) -> str:
    return (LUA_DIR / filename).read_text(encoding="utf-8")


def build_library() -> Library:
    body = [_read(COMMON)]
    for name in NAMES:
        body.append(f"\n-- ==== {name}.lua ====\nlocal function {name}_body(KEYS, ARGV)\n"
                    f"if not fmt then bind() end\n{_read(name + '.lua')}\nend\n")
    text = "".join(body)
    version = hashlib.sha1(text.encode()).hexdigest()[:12]
    functions = {name: f"ocs_{name}_{version}" for name in NAMES}
    registrations = "".join(
        f"redis.register_function('{functions[name]}', {name}_body)\n" for name in NAMES
    )
    source = f"#!lua name=ocs_{version}\n{text}\n{registrations}"
    return Library(version, source, functions)


def is_missing_function(error: BaseException) -> bool:
    """FCALL of a function the server does not have (restart without persistence, FUNCTION FLUSH)."""
    return isinstance(error, ResponseError) and str(error).startswith("Function not found")


async def load_library(redis: Any, library: Library) -> None:
    """FUNCTION LOAD, tolerating a library that another process has loaded already."""
    try:
        await redis.execute_command("FUNCTION", "LOAD", library.source)
    except ResponseError as exc:
        if "already exists" not in str(exc):
            raise
