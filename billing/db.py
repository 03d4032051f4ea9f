"""The billing database: SQLite by default, PostgreSQL when a URL is configured, one portable SQL dialect.

Why a thin wrapper and no ORM: the billing code writes plain SQL that both engines run unchanged
(`?` placeholders, `INSERT ... ON CONFLICT DO NOTHING`, `UPDATE ... FROM`, BIGINT for micro-units, dates as
ISO text, times as epoch ms). This module translates placeholders for psycopg, opens transactions the same
way on both (SQLite: BEGIN IMMEDIATE, so writers queue instead of failing halfway), applies the numbered
migrations in billing/migrations.py once each, and hands out ids from a counters table inside the caller's
transaction (no SERIAL/AUTOINCREMENT differences; a rolled-back transaction leaves no gap).

Imports only the standard library and, for PostgreSQL URLs, psycopg (v3).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from billing.migrations import MIGRATIONS

__all__ = ["Database", "DatabaseError", "connect"]


class DatabaseError(RuntimeError):
    """The database cannot be opened or migrated, worded for the operator."""


_PLACEHOLDER = re.compile(r"\?")


class Database:
    """One connection to the billing database. Not shared between threads."""

    def __init__(self, conn: Any, dialect: str, url: str) -> None:
        self.conn = conn
        self.dialect = dialect  # "sqlite" | "postgresql"
        self.url = url
        self._in_tx = False
        self._sql_cache: dict[str, str] = {}

    # ---- statements --------------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        if self.dialect == "sqlite":
            return sql
        cached = self._sql_cache.get(sql)
        if cached is None:
            cached = self._sql_cache[sql] = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
        return cached

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        cur = self.conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            return cur.rowcount
        finally:
            cur.close()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Run one statement per row (one round trip per batch on PostgreSQL); returns rows changed."""
        rows = list(rows)
        if not rows:
            return 0
        cur = self.conn.cursor()
        try:
            cur.executemany(self._sql(sql), rows)
            return cur.rowcount
        finally:
            cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self.conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            return [tuple(row) for row in cur.fetchall()]
        finally:
            cur.close()

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.cursor()
        try:
            cur.execute(self._sql(sql), tuple(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            cur.close()

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    # ---- transactions ------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Database]:
        """All or nothing. `lock` names a row of the locks table taken first, so that operations which must
        not interleave (bill runs, finalization, guiding) queue behind each other on PostgreSQL too."""
        if self._in_tx:
            raise DatabaseError("nested billing transactions are not supported")
        self._in_tx = True
        try:
            if self.dialect == "sqlite":
                self.conn.execute("BEGIN IMMEDIATE")
            else:
                self.conn.execute("BEGIN")
            try:
                if lock is not None:
                    if not self.execute("UPDATE locks SET taken = taken + 1 WHERE name = ?", (lock,)):
                        self.execute("INSERT INTO locks (name, taken) VALUES (?, 1) ON CONFLICT (name) DO NOTHING",
                                     (lock,))
                        self.execute("UPDATE locks SET taken = taken + 1 WHERE name = ?", (lock,))
                yield self
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        finally:
            self._in_tx = False

    def next_ids(self, name: str, count: int = 1) -> int:
        """Reserve `count` ids from counter `name` (inside a transaction); returns the first one."""
        if not self._in_tx:
            raise DatabaseError("next_ids needs a transaction")
        if not self.execute("UPDATE counters SET value = value + ? WHERE name = ?", (count, name)):
            self.execute("INSERT INTO counters (name, value) VALUES (?, ?)", (name, count))
        return int(self.scalar("SELECT value FROM counters WHERE name = ?", (name,))) - count + 1

    def peek_counter(self, name: str) -> int:
        return int(self.scalar("SELECT value FROM counters WHERE name = ?", (name,)) or 0)

    # ---- schema ------------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The newest migration applied (the table exists once migrate() has run)."""
        return int(self.scalar("SELECT MAX(version) FROM schema_migrations") or 0)

    def migrate(self) -> list[int]:
        """Apply the migrations not applied yet, each in its own transaction; returns their versions."""
        self.conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                          "description TEXT NOT NULL)")
        applied = []
        current = self.schema_version()
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            with self.transaction():
                if self.scalar("SELECT version FROM schema_migrations WHERE version = ?", (version,)):
                    continue  # another process applied it while we waited for the lock
                for statement in statements:
                    self.conn.execute(statement)
                self.execute("INSERT INTO schema_migrations (version, description) VALUES (?, ?)",
                             (version, description))
            applied.append(version)
        return applied

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, *, migrate: bool = True) -> Database:
    """Open `sqlite:///path`, a plain file path, or `postgresql://...`; apply migrations."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError:  # pragma: no cover - psycopg is a dependency
            raise DatabaseError("PostgreSQL needs psycopg: pip install 'psycopg[binary]'") from None
        try:
            conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {str(exc).strip().splitlines()[0]}") from None
        db = Database(conn, "postgresql", url)
    else:
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("sqlite:")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open SQLite database {path}: {exc}") from None
        db = Database(conn, "sqlite", url)
    if migrate:
        try:
            db.migrate()
        except Exception:
            db.close()
            raise
    return db
