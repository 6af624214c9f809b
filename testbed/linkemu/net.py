"""Building a whole net: TCP settings per host, per-link :class:`LinkSpec` resolution,
:func:`build_net` and its result :class:`EmuNet`.

:func:`build_net` builds and starts a Mininet net (LinuxBridge switches, no controller)
from a ``Topo`` and a :class:`~testbed.linkparams.LinkSpec` per link, records everything
it creates in a state file (:mod:`testbed.state`) and pins TCP settings in every host
(:func:`configure_tcp`). Link parameters stay numbers (Mbit/s, ms, %, packets) from the
caller to each :class:`~testbed.linkemu.links.EmuLink`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import secrets
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mininet.net import Mininet
from mininet.node import Node
from mininet.topo import Topo

from testbed.linkemu.backend import resolve_backend
from testbed.linkemu.links import EmuLink
from testbed.linkemu.nodes import EmuBridge, EmuHost
from testbed.linkparams import EMULATION_KEYS, LinkParamError, LinkSpec
from testbed.state import CleanupReport, StateFile, cleanup_file

# --------------------------------------------------------------------------- TCP settings


@dataclass(frozen=True)
class TcpSettings:
    """TCP settings pinned in every host namespace (they are per namespace, and users'
    kernels differ: Debian defaults to cubic, this project's machines to bbr).

    ``congestion_control``: net.ipv4.tcp_congestion_control (default ``bbr``);
    ``slow_start_after_idle``: net.ipv4.tcp_slow_start_after_idle (default 0: a connection
    idle between rounds keeps its window instead of restarting from the initial one).
    """

    congestion_control: str = "bbr"
    slow_start_after_idle: int = 0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9_]{1,32}", str(self.congestion_control)):
            raise ValueError(
                f"TCP congestion control {self.congestion_control!r}: expected a kernel name "
                "such as bbr, cubic or reno"
            )
        if self.slow_start_after_idle not in (0, 1):
            raise ValueError(
                f"slow_start_after_idle must be 0 or 1, got {self.slow_start_after_idle!r}"
            )

    def sysctls(self) -> dict[str, str]:
        """The sysctl keys and values this stands for."""
        return {
            "net.ipv4.tcp_congestion_control": self.congestion_control,
            "net.ipv4.tcp_slow_start_after_idle": str(int(self.slow_start_after_idle)),
        }


class TcpConfigError(RuntimeError):
    """A TCP sysctl could not be set in a host (e.g. an unknown congestion control)."""


def configure_tcp(
    hosts: Iterable[Node],
    settings: TcpSettings | None = None,
) -> dict[str, dict[str, str]]:
    """Set ``settings`` (default :class:`TcpSettings`) in each host's namespace and read
    them back. Returns ``{host: {sysctl key: value read back}}`` for the run metadata;
    raises :class:`TcpConfigError` naming the host if a value did not stick."""
    want = (settings or TcpSettings()).sysctls()
    assign = " ".join(shlex.quote(f"{k}={v}") for k, v in want.items())  # values checked too
    keys = " ".join(shlex.quote(k) for k in want)
    result: dict[str, dict[str, str]] = {}
    for host in hosts:
        out = host.cmd(f"sysctl -q -w {assign} >/dev/null 2>&1; sysctl -n {keys}")
        got = dict(zip(want, out.split(), strict=False))
        if got != want:
            allowed = host.cmd("sysctl -n net.ipv4.tcp_allowed_congestion_control").split()
            hint = ""
            if want["net.ipv4.tcp_congestion_control"] not in allowed:
                hint = (
                    f"; a network namespace may only choose one of the root namespace's "
                    f"net.ipv4.tcp_allowed_congestion_control ({' '.join(allowed)})"
                )
            raise TcpConfigError(f"host {host.name}: wanted {want}, got {got}{hint}")
        result[host.name] = got
    return result


# --------------------------------------------------------------------------- build_net

#: A link in ``link_params``: a host name (its only link) or a ``(node1, node2)`` pair.
LinkKey = str | tuple[str, str]
#: Per-link parameters for :func:`build_net`: host name or (node1, node2) -> LinkSpec.
LinkParams = (
    Mapping[LinkKey, LinkSpec] | Mapping[str, LinkSpec] | Mapping[tuple[str, str], LinkSpec]
)


@dataclass
class EmuNet:
    """A started net and what is needed to record and tear it down.

    ``net``: the Mininet object; ``backend``: :func:`link_backend` of the net; ``tcp``: the
    values :func:`configure_tcp` read back per host; ``links``: the effective
    :class:`LinkSpec` per link, keyed ``(node1, node2)`` with ``up`` = node1 -> node2;
    ``state``: the run's state file; ``setup_s``: build + start time in seconds;
    ``trace_starts``: for each trace-driven link, the time.monotonic() at which its trace
    clock started (trace time ``start_s``; one clock for the whole net).
    """

    net: Mininet
    backend: str
    tcp: dict[str, dict[str, str]]
    links: dict[tuple[str, str], LinkSpec]
    state: StateFile
    setup_s: float
    trace_starts: dict[tuple[str, str], float] = field(default_factory=dict)
    _down: bool = field(default=False, repr=False)

    def teardown(self) -> CleanupReport:
        """Stop the net (Mininet's ``net.stop()``), then make sure everything recorded is
        gone and remove the state file. Idempotent."""
        if self._down:
            return CleanupReport()
        self._down = True
        try:
            self.net.stop()
        finally:
            report = cleanup_file(self.state.path, include_live=True)
            self.state.close()
        return report

    def cleanup_at_exit(self) -> None:
        """Registered with ``atexit``: if the net was never torn down, remove what its
        state file lists (without Mininet, which may be half gone at exit)."""
        if not self._down:
            self._down = True
            with contextlib.suppress(Exception):
                cleanup_file(self.state.path, include_live=True)
                self.state.close()

    def link_metadata(self) -> list[dict[str, Any]]:
        """One dict per link (nodes, backend, both directions' parameters) for results.

        A direction's ``trace`` is its :meth:`~testbed.linkparams.RateTrace.summary` (name,
        file, sha256, format, loop, start_s, ...) or None; a trace-driven link also has
        ``trace_start_mono_s``: the time.monotonic() (one clock for every host of the
        machine) at which its trace clock started, so that the rate at any moment ``t`` is
        ``rate_at(trace, t - trace_start_mono_s)`` (:func:`testbed.linkparams.rate_at`).
        """
        out = []
        for (a, b), spec in self.links.items():
            row: dict[str, Any] = {"node1": a, "node2": b, "backend": self.backend}
            row.update(spec.as_dict())
            if (a, b) in self.trace_starts:
                row["trace_start_mono_s"] = self.trace_starts[(a, b)]
            out.append(row)
        return out

    def __enter__(self) -> EmuNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def link_backend(obj: Any) -> str:
    """Which backend a link or a whole net used: ``'tc'``, ``'tap'``, ``'mixed'``,
    ``'veth'`` (plain Mininet links) or ``'none'`` (no links). For result metadata."""
    if isinstance(obj, EmuLink):
        return obj.backend
    if isinstance(obj, EmuNet):
        obj = obj.net
    links = getattr(obj, "links", None)
    if links is None:
        raise TypeError(f"link_backend: expected an EmuLink, EmuNet or Mininet, got {obj!r}")
    kinds = {link.backend if isinstance(link, EmuLink) else "veth" for link in links}
    if not kinds:
        return "none"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def require_spec(value: object, where: str) -> LinkSpec:
    """``value`` if it is a :class:`LinkSpec`; else a :class:`TypeError` saying how to
    build one (``where`` names the argument, e.g. ``"link_params['w1']"``)."""
    if isinstance(value, LinkSpec):
        return value
    raise TypeError(
        f"build_net: {where} must be a LinkSpec, got {type(value).__name__}; build one with "
        "LinkSpec.from_options({'bw': 10, 'delay': '5ms'}) (TCLink-style options), "
        "LinkSpec.symmetric(bw_mbit=10, delay_ms=5) or LinkSpec(up=..., down=...)"
    )


def _topology_spec(info: Mapping[str, Any], a: str, b: str) -> LinkSpec | None:
    """The LinkSpec the topology itself declares for link ``a``-``b`` (TCLink-style
    options at the top level for both directions, in ``params1`` for a -> b and in
    ``params2`` for b -> a), parsed once; None if it declares none."""
    own = {k: info[k] for k in EMULATION_KEYS if k in info}
    up = {k: v for k, v in (info.get("params1") or {}).items() if k in EMULATION_KEYS}
    down = {k: v for k, v in (info.get("params2") or {}).items() if k in EMULATION_KEYS}
    if not (own or up or down):
        return None
    return LinkSpec.from_options({**own, "up": up, "down": down}, where=f"topology link {a}-{b}")


def _mininet_options(info: Mapping[str, Any]) -> dict[str, Any]:
    """A topology link's options for ``Mininet.addLink`` without the nodes and without
    the shaping options, which :func:`_topology_spec` turned into the link's LinkSpec."""
    out = {k: v for k, v in info.items() if k not in ("node1", "node2", *EMULATION_KEYS)}
    for side in ("params1", "params2"):
        if side in out:
            out[side] = {k: v for k, v in out[side].items() if k not in EMULATION_KEYS}
    return out


def _resolve_specs(
    topo: Topo, link_params: LinkParams, default: LinkSpec
) -> dict[tuple[str, str], LinkSpec]:
    """Map each topology link (node1, node2) to its LinkSpec oriented node1 -> node2:
    ``link_params``' entry, else the topology's own options, else ``default``."""
    hosts = set(topo.hosts())
    links = [(a, b) for a, b in topo.links(sort=True)]
    by_host: dict[str, list[tuple[str, str]]] = {}
    for a, b in links:
        for n in (a, b):
            if n in hosts:
                by_host.setdefault(n, []).append((a, b))
    specs = {}
    for a, b in links:
        own = _topology_spec(topo.linkInfo(a, b), a, b)
        specs[(a, b)] = own if own is not None else default
    for key, value in link_params.items():
        spec = require_spec(value, f"link_params[{key!r}]")
        if isinstance(key, tuple):
            x, y = key
            if (x, y) in specs:
                specs[(x, y)] = spec
            elif (y, x) in specs:
                specs[(y, x)] = spec.reversed()
            else:
                raise LinkParamError(f"link_params: no link {x}-{y} in the topology")
            continue
        if key not in by_host:
            raise LinkParamError(f"link_params: {key!r} is not a host of the topology")
        if len(by_host[key]) != 1:
            raise LinkParamError(
                f"link_params: host {key!r} has {len(by_host[key])} links; "
                "key them by (node1, node2) instead"
            )
        a, b = by_host[key][0]
        specs[(a, b)] = spec if a == key else spec.reversed()
    return specs


def queue_rtts(specs: Mapping[tuple[str, str], LinkSpec]) -> dict[tuple[str, str], float]:
    """The RTT (ms) each link's default queues are sized for: the longest two-link path
    through it, i.e. its own RTT (+ 2 x jitter) plus the largest such RTT of any other
    link (right for stars and the edge links of two-tier trees)."""
    rtts = {k: s.rtt_ms + 2 * max(s.up.jitter_ms, s.down.jitter_ms) for k, s in specs.items()}
    out = {}
    for key, rtt in rtts.items():
        others = [r for k, r in rtts.items() if k != key]
        out[key] = rtt + (max(others) if others else 0.0)
    return out


def build_net(
    topo: Topo,
    link_params: LinkParams | None = None,
    *,
    default: LinkSpec | None = None,
    backend: str | None = None,
    tcp: TcpSettings | None = None,
    label: str = "net",
    state_dir: Path | None = None,
    seed: int | None = None,
    ip_base: str = "10.0.0.0/8",
) -> EmuNet:
    """Build and start a Mininet net from ``topo`` with :class:`EmuLink` links,
    :class:`EmuBridge` switches (no controller) and :class:`EmuHost` hosts.

    ``link_params`` maps a host name (its only link, ``up`` = host -> switch) or a
    ``(node1, node2)`` pair (``up`` = node1 -> node2) to a :class:`LinkSpec` (Mbit/s, ms,
    %, packets). Other links get ``default`` (no shaping if None) or the TCLink-style
    options the topology declared for them (parsed once). TCLink-style option mappings
    are not accepted here (:class:`TypeError`): build them into a LinkSpec with
    ``LinkSpec.from_options(...)``. Default queues are sized for the longest two-link path
    through each link (:func:`queue_rtts`); each link gets its effective LinkSpec as
    ``EmuLink(spec=...)`` and :attr:`EmuNet.links` records it. Trace-driven links need
    the tap backend (``auto`` picks it for them); their trace clocks all start at one
    time.monotonic() taken just before the first link is built
    (:attr:`EmuNet.trace_starts`). TCP is pinned with
    :func:`configure_tcp` (``tcp``, default :class:`TcpSettings`). Everything created is
    recorded in a new state file (``state_dir``, default :func:`testbed.state.state_dir`);
    on error the partial net is torn down before the exception propagates.
    """
    t0 = time.monotonic()
    default_spec = LinkSpec() if default is None else require_spec(default, "default")
    specs = _resolve_specs(topo, link_params or {}, default_spec)
    chosen = resolve_backend(backend, traces=any(s.has_trace for s in specs.values()))
    state = StateFile.create(label=label, directory=state_dir)
    tag = _fresh_tag()
    net = Mininet(
        topo=None,
        switch=functools.partial(EmuBridge, state=state, tag=tag),
        host=functools.partial(EmuHost, state=state),
        link=functools.partial(EmuLink, backend=chosen, state=state, seed=seed),
        controller=None,
        build=False,
        ipBase=ip_base,
        waitConnected=False,
    )
    emu = EmuNet(net=net, backend=chosen, tcp={}, links={}, state=state, setup_s=0.0)
    atexit.register(emu.cleanup_at_exit)
    try:
        for name in topo.hosts():
            net.addHost(name, **topo.nodeInfo(name))
        for name in topo.switches():
            info = dict(topo.nodeInfo(name))
            info.pop("cls", None)
            net.addSwitch(name, **info)
        rtts = queue_rtts(specs)
        epoch = time.monotonic()
        for (a, b), spec in specs.items():
            full = spec.with_default_queues(rtts[(a, b)])
            link = net.addLink(
                a, b, spec=full, trace_epoch=epoch, **_mininet_options(topo.linkInfo(a, b))
            )
            emu.links[(a, b)] = link.spec
            if link.trace_start_mono_s is not None:
                emu.trace_starts[(a, b)] = link.trace_start_mono_s
        net.build()
        net.start()
        emu.tcp = configure_tcp(net.hosts, tcp)
    except BaseException:
        emu.teardown()
        raise
    emu.backend = link_backend(net)
    emu.setup_s = time.monotonic() - t0
    return emu


def _fresh_tag() -> str:
    """A device-name tag (``sf`` + 4 hex digits) that no root-namespace device uses."""
    names = os.listdir("/sys/class/net")
    while True:
        tag = "sf" + secrets.token_hex(2)
        if not any(n.startswith(tag) for n in names):
            return tag
