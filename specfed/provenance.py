"""Where a result came from: the code's git state and the versions of what ran it.

One helper for every writer of metadata (the testbed's meta.json, the server's server.json,
studies, benchmarks, the model bundle's conversion records), so that "dirty" means one thing
everywhere:

    dirty = a tracked file differs from the commit (staged or not).

Untracked files do not count (results, caches and scratch files live in the tree), and
neither do ignored ones. `git_state()["dirty"]` is None when git cannot tell (no git, not a
checkout).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["REPO", "HelpFormatter", "add_version", "git_state", "version_text", "versions"]

REPO = Path(__file__).resolve().parents[1]
"""The project's checkout (the folder holding specfed/, testbed/, ...)."""

DEFAULT_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "numpy",
    "pandas",
    "pydantic",
    "specfed-testbed",
)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """{"sha": full sha or "unknown", "short": 8 hex digits or "nogit", "dirty": bool | None}."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {
        "sha": sha or "unknown",
        "short": sha[:8] if sha else "nogit",
        "dirty": None if status is None else bool(status),
    }


def versions(distributions: tuple[str, ...] = DEFAULT_DISTRIBUTIONS) -> dict[str, str]:
    """Python's version and each distribution's installed version ("missing" if absent)."""
    out = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def version_text(prog: str) -> str:
    """`--version` output: the program, the project's version and its git state."""
    try:
        version = metadata.version("specfed-testbed")
    except metadata.PackageNotFoundError:
        version = "unknown"
    git = git_state()
    dirty = "+dirty" if git["dirty"] else ""
    return f"{prog} (specfed-testbed {version}, git {git['short']}{dirty})"


class _Version(argparse.Action):
    """`--version`: print version_text (git is asked only when the option is given)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text(parser.prog))
        parser.exit()


def add_version(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command `--version` (the project's version and git state)."""
    ap.add_argument("--version", action=_Version)
    return ap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse formatter of every command: the description as written, defaults shown."""
