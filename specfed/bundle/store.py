"""Writing into the cache safely: cross-process locks, temporary siblings, atomic JSON.

Several workers may start at once and ask for the same model; a run may be killed at any
point. So a step that prepares something takes `locked(key)`, writes into a
`temp_sibling` of its result and renames it into place, and removes the leftovers of
crashed runs (`remove_stale_temps`) first.
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
    "locked",
    "locked_step",
    "read_json",
    "remove_stale_temps",
    "temp_sibling",
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


def remove_stale_temps(final: Path) -> None:
    """Remove leftovers `.<final name>.tmp-*` of crashed runs (call while holding the lock)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        log.info("removing leftover of an interrupted run: %s", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def temp_sibling(final: Path) -> Path:
    """A temporary path next to `final` (same filesystem, so a rename is atomic)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON: readers see the old file or the new one."""
    tmp = temp_sibling(path)
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
