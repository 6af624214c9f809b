"""Writing into the cache safely: cross-process locks, temporary siblings, atomic JSON.

Several workers may start at once and ask for the same model; a run may be killed at any
point. So a step that prepares something takes `locked(key)` (or runs as a `locked_step`),
writes into the path `fresh_temp(result)` gives it (which removes the leftovers of crashed
runs first) and renames it into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from specfed.bundle.registry import BundleModel, cache_dir, get_entry

__all__ = [
    "fresh_temp",
    "locked",
    "locked_step",
    "read_json",
    "utc_now",
    "write_json_atomic",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(key: str) -> Iterator[None]:
    """Hold an exclusive lock on `key` across processes (several workers may start at once).

    Not re-entrant within one process: public functions take it, the helpers they call
    (`assemble_entry`, `convert_entry`) never do.
    """
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{key}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing %s (lock %s)", key, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked_step(name: str, step: Callable[[BundleModel], Path]) -> Path:
    """Run one preparation `step` on bundle model `name` while holding that model's lock."""
    entry = get_entry(name)
    with locked(entry.name):
        return step(entry)


def fresh_temp(final: Path) -> Path:
    """The temporary path to write `final` through, renamed into place when complete.

    Creates the folder of `final` and removes the leftovers of crashed runs next to it, so
    call it while holding the lock of `final`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    return _temp_sibling(final)


def _remove_stale_temps(final: Path) -> None:
    """Remove leftovers `.<final name>.tmp-*` of crashed runs (call while holding the lock)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        log.info("removing leftover of an interrupted run: %s", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _temp_sibling(final: Path) -> Path:
    """A temporary path next to `final` (same filesystem, so a rename is atomic)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON: readers see the old file or the new one."""
    tmp = _temp_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def utc_now() -> str:
    """The time now, UTC, to the second: `2025-01-31T12:00:00Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
