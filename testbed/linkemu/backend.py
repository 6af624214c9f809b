"""Which link backend to use: probe the kernel for netem, resolve ``tc`` / ``tap``.

``tc`` is Mininet's TCLink path (veth pair, HTB rate, netem delay/jitter/loss); ``tap`` is
two TAP devices joined by a userspace forwarder (:mod:`testbed.tapfwd`). The choice is made
once per process by :func:`resolve_backend` (override with
``SPECFED_LINK_BACKEND=auto|tc|tap``). :class:`LinkEmulationError` is the error of the
whole :mod:`testbed.linkemu` package.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

BACKEND_ENV = "SPECFED_LINK_BACKEND"
BACKENDS = ("tc", "tap")


class LinkEmulationError(RuntimeError):
    """A link could not be set up as asked (the message names the link and the cause)."""


@functools.cache
def netem_available() -> bool:
    """True if the kernel has the netem qdisc. Probed once per process (cached).

    As root: add a netem qdisc to ``lo`` of a throw-away network namespace
    (``unshare --net``): nothing outlives the probe. Otherwise: read
    ``CONFIG_NET_SCH_NETEM`` from /proc/config.gz or /boot/config-<release>.
    """
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("tc"):
        r = subprocess.run(
            [
                "unshare",
                "--net",
                "--",
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
            capture_output=True,
            check=False,
            timeout=10,
        )
        return r.returncode == 0
    return _config_has_netem()


def _config_has_netem() -> bool:
    import gzip

    candidates: list[tuple[Path, Callable[[Path], str]]] = [
        (Path("/proc/config.gz"), lambda p: gzip.decompress(p.read_bytes()).decode()),
        (Path(f"/boot/config-{os.uname().release}"), lambda p: p.read_text()),
    ]
    for path, read in candidates:
        with contextlib.suppress(OSError):
            text = read(path)
            return any(
                line.strip() in ("CONFIG_NET_SCH_NETEM=y", "CONFIG_NET_SCH_NETEM=m")
                for line in text.splitlines()
            )
    return False


def resolve_backend(requested: str | None = None, *, traces: bool = False) -> str:
    """The backend to use: ``requested``, else ``$SPECFED_LINK_BACKEND``, else ``auto``;
    ``auto`` means ``tap`` if ``traces`` (a link follows a rate trace, which only the tap
    backend can) or the kernel lacks netem, else ``tc``."""
    choice = (requested or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice == "auto":
        return "tc" if not traces and netem_available() else "tap"
    if choice not in BACKENDS:
        raise LinkEmulationError(
            f"link backend {choice!r} (from {'argument' if requested else BACKEND_ENV}): "
            f"expected auto, {' or '.join(BACKENDS)}"
        )
    return choice


def trace_needs_tap(where: str) -> str:
    """The error for a trace-driven link on the tc backend (``where`` names the link)."""
    return (
        f"{where}: trace-driven links need the tap backend (the tc backend cannot change "
        "its qdiscs over time); set network.backend: tap (or auto) in the scenario, or "
        "SPECFED_LINK_BACKEND=tap"
    )
