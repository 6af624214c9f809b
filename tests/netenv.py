"""What the Mininet tests need, checked in one place (root, Mininet, the tools, TUN)."""

from __future__ import annotations

import os
import shutil


def mininet_missing(tools: tuple[str, ...] = ("mnexec", "ip", "iperf3")) -> str | None:
    """Why Mininet tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TAP devices)"
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        return "mininet is not importable (Debian package 'mininet'; see docs/link-emulation.md)"
    for tool in tools:
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None
