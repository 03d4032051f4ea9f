"""The active rate card on disk: which versions the OCS rates with, and how a new version is added.

Layout: `<data_dir>/ratecards/<version>.toml`, one file per version (the set is one versioned card). While
that directory holds no version, the configured `charging.ratecard` file is the card, as in the spine.
`install_version` is what `ocs ratecard load` does: validate the file, check the versioning rule
(ratecards.check_new_version: a new version takes effect at least one reload interval after `now`), copy
the configured card in as the first version when the directory is still empty (it keeps rating the time
before the new version), then write the new file atomically, and say what changed.

There is no Redis-side rate card store yet: every OCS process reads these files — the online-charging
integration re-reads them every reload interval (`charging.ratecard_reload_seconds`, default 60 s), which
is why a version must be on disk one interval before it takes effect. This module is the only one that
reads or writes them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgspec

from ratecards import (
    DEFAULT_RELOAD_INTERVAL,
    RateCard,
    RateCardError,
    Rater,
    check_new_version,
    compile_card,
    describe_changes,
    effective_epoch,
    load_ratecard,
    parse_ratecard,
)

__all__ = ["LoadResult", "active_card_files", "install_version", "load_active_cards", "load_active_rater",
           "reload_interval", "versions_directory"]

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class LoadResult(msgspec.Struct):
    version: str
    effective_from: int | None  # epoch seconds
    path: str
    changed: bool  # False: this exact version was already loaded
    seeded: str | None  # the configured card copied in as the first version, if that happened now
    changes: list[str]  # what the version changes compared with the one before it


def versions_directory(config: Any) -> Path:
    return Path(config.data_dir) / "ratecards"


def reload_interval(config: Any) -> float:
    """How far ahead a new version must take effect (the OCS's rate-card reload interval)."""
    return float(getattr(config.charging, "ratecard_reload_seconds", DEFAULT_RELOAD_INTERVAL))


def active_card_files(config: Any) -> list[Path]:
    """The version files in force: <data_dir>/ratecards/*.toml, else the configured rate card."""
    directory = versions_directory(config)
    files = sorted(directory.glob("*.toml")) if directory.is_dir() else []
    return files or [Path(config.charging.ratecard)]


def load_active_cards(config: Any) -> list[RateCard]:
    return [load_ratecard(path) for path in active_card_files(config)]


def load_active_rater(config: Any) -> Rater:
    """The active versions compiled into one Rater (RateCardError when they do not form one card)."""
    return compile_card(load_active_cards(config))


def _file_for(directory: Path, card: RateCard) -> Path:
    if not _FILE_NAME.match(card.version) or len(card.version) > 100:
        raise RateCardError(f"version {card.version!r} cannot name a file: use letters, digits, '_', '-', '.'",
                            source=f"rate card {card.version!r}", field="version")
    return directory / f"{card.version}.toml"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def install_version(config: Any, file: str | Path, *, now: float, interval: float | None = None) -> LoadResult:
    """Validate `file` and add it to the active card as a new version (idempotent for the same content)."""
    interval = reload_interval(config) if interval is None else interval
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RateCardError(f"cannot read rate card: {exc}", source=str(file)) from None
    new = parse_ratecard(text, source=str(file))
    directory = versions_directory(config)
    stored = sorted(directory.glob("*.toml")) if directory.is_dir() else []
    seed_path = None if stored else Path(config.charging.ratecard)
    existing = [load_ratecard(path) for path in (stored or [seed_path])]
    check_new_version(existing, new, now=now, reload_interval=interval)
    target = _file_for(directory, new)
    if any(card.version == new.version for card in existing) and (stored or target.is_file()):
        return LoadResult(version=new.version, effective_from=effective_epoch(new), path=str(target),
                          changed=False, seeded=None, changes=["already loaded: nothing changed"])
    directory.mkdir(parents=True, exist_ok=True)
    seeded = None
    if seed_path is not None and existing[0].version != new.version:
        seed_target = _file_for(directory, existing[0])
        _write_atomically(seed_target, seed_path.read_text(encoding="utf-8"))
        seeded = str(seed_target)
    start = effective_epoch(new)
    before = [c for c in existing if c.version != new.version
              and (start is None or (effective_epoch(c) or float("-inf")) < start)]
    previous = max(before, key=lambda c: effective_epoch(c) or float("-inf")) if before else None
    _write_atomically(target, text)
    return LoadResult(version=new.version, effective_from=start, path=str(target), changed=True, seeded=seeded,
                      changes=describe_changes(previous, new))
