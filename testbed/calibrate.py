"""Link calibration: measured RTT, loss and TCP goodput between Mininet hosts vs configured.

Never trust a configured delay without measuring it (a TCLink without netem silently runs
at ~0.06 ms). These primitives measure what a path really does:

- :func:`measure_rtt`: ICMP echo from a small probe (:mod:`testbed.linkprobe`) timed in
  us in the sending process (user to user like ``ping -U``, so ingress delay is not
  hidden; ping itself prints 100 ms and more in whole ms), a couple of warm-up packets
  (ARP) dropped, then mean / sd / min / max in ms.
- :func:`measure_loss`: many UDP probes at a short interval, counted at the far end too,
  so losses are split by direction.
- :func:`measure_goodput`: iperf3, the server in the sending host and the client in the
  receiving host with ``-R``, so the per-interval byte counts are receive-side; the first
  ``warmup_s`` (TCP start-up) are dropped; Mbit/s of payload.
- :func:`calibrate_pair` / :func:`calibrate_star`: both, compared with what the
  configuration predicts for the path, against a :class:`Tolerance`.

Predicted RTT of a path = sum over its links of both one-way delays plus the serialisation
of one ping frame (98 bytes) at each link's rate in each direction (0.78 ms per direction
at 1 Mbit/s). Predicted goodput = the smallest rate on the path in that direction; the
ratio measured/configured tops out at 1448/1514 = 0.956 (TCP payload per Ethernet frame
with timestamps).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mininet.node import Node

from testbed.linkemu import EmuNet, read_first_line
from testbed.linkparams import LinkSpec

PING_FRAME_BYTES = 98  # 56 B payload + 8 ICMP + 20 IP + 14 Ethernet
_PING_RE = re.compile(r"icmp_seq=(\d+) .*time=([0-9.]+) ms")
_SUMMARY_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")
_port = itertools.cycle(range(5301, 6300))
PROBE_PATH = Path(__file__).with_name("linkprobe.py")
#: SCHED_FIFO priority of the probe processes, so that they measure the network and not
#: the CPU's queue (0 = normal scheduling).
PROBE_RT_PRIORITY = 1


class CalibrationError(RuntimeError):
    """A measurement could not be made (the message names the hosts and the tool)."""


@dataclass(frozen=True)
class Tolerance:
    """Pass/fail limits: RTT error <= max(``rtt_abs_ms``, ``rtt_rel`` x configured RTT);
    goodput >= ``goodput_ratio`` x configured rate."""

    rtt_abs_ms: float = 0.5
    rtt_rel: float = 0.03
    goodput_ratio: float = 0.90

    def rtt_limit_ms(self, configured_rtt_ms: float) -> float:
        """Largest acceptable |measured - configured| RTT (ms)."""
        return max(self.rtt_abs_ms, self.rtt_rel * configured_rtt_ms)


@dataclass(frozen=True)
class RttStats:
    """Round-trip times of ``received`` of ``sent`` pings, in ms (sd: sample sd)."""

    sent: int
    received: int
    mean_ms: float
    sd_ms: float
    min_ms: float
    max_ms: float


@dataclass(frozen=True)
class Goodput:
    """TCP goodput from ``src`` to ``dst``: payload Mbit/s over ``seconds`` after warm-up;
    ``configured_mbit`` the path's smallest rate in that direction (None = unlimited)."""

    src: str
    dst: str
    mbit: float
    seconds: float
    retransmits: int | None = None
    configured_mbit: float | None = None
    ratio: float | None = None
    ok: bool | None = None


@dataclass(frozen=True)
class LinkCalibration:
    """Configured vs measured for the path between hosts ``a`` and ``b``.

    ``links``: the links on the path (``(node1, node2)`` as built);
    ``rtt_error_ms`` = measured mean - configured; ``rtt_ok``: within
    ``rtt_limit_ms``; ``goodput``: per direction (a->b first); ``passed``: all checks ok.
    """

    a: str
    b: str
    links: tuple[tuple[str, str], ...]
    configured_rtt_ms: float
    rtt: RttStats
    rtt_error_ms: float
    rtt_limit_ms: float
    rtt_ok: bool
    goodput: tuple[Goodput, ...] = field(default_factory=tuple)
    passed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for ``meta.json``)."""
        return asdict(self)


# --------------------------------------------------------------------------- measurements


def _parse_rtts(text: str) -> tuple[list[float], int]:
    times = [float(m.group(2)) for m in _PING_RE.finditer(text)]
    m = _SUMMARY_RE.search(text)
    sent = int(m.group(1)) if m else len(times)
    return times, sent


def rtt_stats(times_ms: list[float], sent: int) -> RttStats:
    """Summarise RTTs (ms); raises CalibrationError when none came back."""
    if not times_ms:
        raise CalibrationError(f"no reply out of {sent}")
    sd = statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0
    return RttStats(
        sent=sent,
        received=len(times_ms),
        mean_ms=statistics.fmean(times_ms),
        sd_ms=sd,
        min_ms=min(times_ms),
        max_ms=max(times_ms),
    )


def _record(emu: EmuNet | None, proc: subprocess.Popen[bytes], role: str) -> None:
    if emu is not None:
        with contextlib.suppress(ProcessLookupError):
            emu.state.record_process(proc.pid, role=role)


def _end(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f:
                f.close()


def run_probe(
    src: Node,
    dst: Node,
    *,
    count: int,
    interval_s: float,
    size: int = 56,
    warmup: int = 2,
    icmp: bool = False,
    emu: EmuNet | None = None,
    rt_priority: int = PROBE_RT_PRIORITY,
) -> dict[str, Any]:
    """Run :mod:`testbed.linkprobe` from ``src`` to ``dst`` and return its JSON.

    UDP (default): an echo server in ``dst``; JSON ``sent``, ``server_rx``, ``received``,
    ``lost_up``, ``lost_down``, ``rtt_us``. ``icmp``: ICMP echo answered by ``dst``'s
    kernel; JSON ``sent``, ``received``, ``rtt_us``.
    """
    base = [sys.executable, "-I", "-S", str(PROBE_PATH)]
    args = [
        "--dst",
        dst.IP(),
        "--count",
        str(count),
        "--interval",
        repr(interval_s),
        "--size",
        str(size),
        "--warmup",
        str(warmup),
        "--rt-priority",
        str(rt_priority),
    ]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if icmp:
            args.append("--icmp")
        else:
            port = next(_port)
            server = dst.popen(
                [*base, "echo", "--port", str(port), "--rt-priority", str(rt_priority)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            procs.append(server)
            _record(emu, server, f"probe echo {dst.name}")
            if read_first_line(server, 10.0) != "READY":
                raise CalibrationError(f"probe echo server in {dst.name} did not start")
            args += ["--port", str(port)]
        client = src.popen([*base, "ping", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(client)
        _record(emu, client, f"probe client {src.name}")
        out, err = client.communicate(timeout=count * interval_s + 30)
    finally:
        _end(procs)
    try:
        result: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        raise CalibrationError(
            f"probe {src.name} -> {dst.name}: no result ({err.decode(errors='replace')[-200:]!r})"
        ) from None
    return result


def measure_rtt(
    src: Node,
    dst: Node,
    *,
    count: int = 50,
    interval_s: float = 0.02,
    method: str = "icmp",
    emu: EmuNet | None = None,
) -> RttStats:
    """RTT from host ``src`` to host ``dst`` (ms), after 2 uncounted warm-up packets, with
    98-byte frames (as ping's) timed in us by the sending process (as ``ping -U``).

    ``method``: ``"icmp"`` (default: ICMP echo answered by ``dst``'s kernel,
    :mod:`testbed.linkprobe`); ``"udp"`` (UDP echo server in ``dst``: adds that process's
    wake-up, ~0.1 ms); ``"ping"`` (``ping -U``; prints 100 ms and more in whole ms).
    """
    if method == "ping":
        ip = dst.IP()
        out = src.cmd(
            f"ping -n -U -c 2 -i 0.05 -W 2 {ip} >/dev/null 2>&1; "
            f"ping -n -U -c {count} -i {interval_s:g} -W 2 {ip}"
        )
        times, sent = _parse_rtts(out)
    elif method in ("icmp", "udp"):
        r = run_probe(src, dst, count=count, interval_s=interval_s, icmp=method == "icmp", emu=emu)
        times, sent = [us / 1e3 for us in r["rtt_us"]], r["sent"]
    else:
        raise ValueError(f"measure_rtt: method {method!r}: expected 'icmp', 'udp' or 'ping'")
    try:
        return rtt_stats(times, sent)
    except CalibrationError as exc:
        raise CalibrationError(f"{method} {src.name} -> {dst.name}: {exc}") from None


@dataclass(frozen=True)
class LossStats:
    """Probe counts: ``sent`` by src, ``server_rx`` reached dst, ``received`` came back.
    ``lost_up``/``lost_down``: lost src->dst / dst->src."""

    sent: int
    server_rx: int
    received: int
    lost_up: int
    lost_down: int

    @property
    def up_pct(self) -> float:
        """Measured loss src->dst (%)."""
        return 100.0 * self.lost_up / self.sent if self.sent else 0.0

    @property
    def down_pct(self) -> float:
        """Measured loss dst->src (%), of the probes that reached dst."""
        return 100.0 * self.lost_down / self.server_rx if self.server_rx else 0.0


def measure_loss(
    src: Node, dst: Node, *, count: int = 1000, interval_s: float = 0.002, emu: EmuNet | None = None
) -> LossStats:
    """Send ``count`` UDP probes ``src`` -> ``dst`` every ``interval_s`` and count, per
    direction, how many were lost."""
    r = run_probe(src, dst, count=count, interval_s=interval_s, emu=emu)
    return LossStats(
        sent=r["sent"],
        server_rx=r["server_rx"],
        received=r["received"],
        lost_up=r["lost_up"],
        lost_down=r["lost_down"],
    )


def binomial_bound(n: int, p: float, sigmas: float = 4.0) -> tuple[float, float]:
    """(low, high) count of events expected out of ``n`` trials of probability ``p``,
    +- ``sigmas`` standard deviations (normal approximation)."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


def _wait_listening(host: Node, port: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if host.cmd(f"ss -Hltn 'sport = :{port}'").strip():
            return
        time.sleep(0.02)
    raise CalibrationError(f"iperf3 server in {host.name} not listening on {port}")


def measure_goodput(
    sender: Node,
    receiver: Node,
    *,
    duration_s: float = 2.0,
    warmup_s: float = 1.0,
    emu: EmuNet | None = None,
) -> Goodput:
    """TCP goodput ``sender`` -> ``receiver`` (Mbit/s of payload) with iperf3.

    The iperf3 server runs in ``sender``, the client in ``receiver`` with ``-R``; the
    receive-side 0.1 s intervals that start after ``warmup_s`` are averaged over (about)
    ``duration_s``. iperf3 PIDs are recorded in ``emu``'s state file when given.
    """
    port = next(_port)
    total = math.ceil(warmup_s + duration_s)
    server = sender.popen(
        ["iperf3", "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [server]
    try:
        _record(emu, server, f"iperf3 server {sender.name}")
        _wait_listening(sender, port)
        client = receiver.popen(
            [
                "iperf3",
                "-c",
                sender.IP(),
                "-p",
                str(port),
                "-R",
                "-J",
                "-i",
                "0.1",
                "-t",
                str(total),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(client)
        _record(emu, client, f"iperf3 client {receiver.name}")
        out, err = client.communicate(timeout=total + 15)
    finally:
        _end(procs)
    try:
        result = json.loads(out)
    except json.JSONDecodeError:
        raise CalibrationError(
            f"iperf3 {sender.name} -> {receiver.name}: no JSON "
            f"({err.decode(errors='replace')[-200:]!r})"
        ) from None
    if "error" in result:
        raise CalibrationError(f"iperf3 {sender.name} -> {receiver.name}: {result['error']}")
    kept = [
        iv["sum"]
        for iv in result.get("intervals", [])
        if iv["sum"]["start"] >= warmup_s - 1e-6 and not iv["sum"].get("omitted")
    ]
    seconds = sum(s["seconds"] for s in kept)
    if seconds <= 0:
        raise CalibrationError(
            f"iperf3 {sender.name} -> {receiver.name}: no interval after the {warmup_s} s warm-up"
        )
    mbit = sum(s["bytes"] for s in kept) * 8 / seconds / 1e6
    retrans = result.get("end", {}).get("sum_sent", {}).get("retransmits")
    return Goodput(
        src=sender.name, dst=receiver.name, mbit=mbit, seconds=seconds, retransmits=retrans
    )


# --------------------------------------------------------------------------- prediction


def path_links(emu: EmuNet, a: str, b: str) -> list[tuple[tuple[str, str], LinkSpec]]:
    """The links from node ``a`` to node ``b`` (shortest path), each as ``((node1, node2),
    spec)`` with the spec re-oriented so that ``up`` points from ``a`` towards ``b``."""
    adj: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for key in emu.links:
        x, y = key
        adj.setdefault(x, []).append((y, key))
        adj.setdefault(y, []).append((x, key))
    prev: dict[str, tuple[str, tuple[str, str]]] = {}
    seen = {a}
    todo = deque([a])
    while todo:
        n = todo.popleft()
        for m, key in adj.get(n, []):
            if m not in seen:
                seen.add(m)
                prev[m] = (n, key)
                todo.append(m)
    if b not in seen:
        raise CalibrationError(f"no path from {a} to {b}")
    hops = []
    n = b
    while n != a:
        p, key = prev[n]
        spec = emu.links[key]
        hops.append((key, spec if key[0] == p else spec.reversed()))
        n = p
    return hops[::-1]


def configured_rtt_ms(
    hops: list[tuple[tuple[str, str], LinkSpec]], frame_bytes: int = PING_FRAME_BYTES
) -> float:
    """Predicted ping RTT (ms) over ``hops``: one-way delays both ways plus serialisation
    of a ``frame_bytes`` frame at each link's rate in each direction."""
    total = 0.0
    for _key, spec in hops:
        for d in (spec.up, spec.down):
            total += d.delay_ms
            if d.bw_mbit:
                total += frame_bytes * 8 / (d.bw_mbit * 1e3)
    return total


def bottleneck_mbit(
    hops: list[tuple[tuple[str, str], LinkSpec]],
    forward: bool = True,
) -> float | None:
    """Smallest rate (Mbit/s) on the path, forward (a->b) or back; None if unlimited."""
    rates = [(s.up if forward else s.down).bw_mbit for _k, s in hops]
    limited = [r for r in rates if r]
    return min(limited) if limited else None


# --------------------------------------------------------------------------- calibration


def calibrate_pair(
    emu: EmuNet,
    a: str,
    b: str,
    *,
    tolerance: Tolerance | None = None,
    pings: int = 50,
    goodput: bool = True,
    duration_s: float = 2.0,
    warmup_s: float | None = None,
) -> LinkCalibration:
    """Measure RTT (and TCP goodput both ways) between hosts ``a`` and ``b`` and compare
    with the configuration. ``warmup_s`` default: 12 RTTs, within 0.5-3 s."""
    tol = tolerance or Tolerance()
    net = emu.net
    ha, hb = net[a], net[b]
    hops = path_links(emu, a, b)
    want_rtt = configured_rtt_ms(hops)
    rtt = measure_rtt(ha, hb, count=pings, emu=emu)
    err = rtt.mean_ms - want_rtt
    limit = tol.rtt_limit_ms(want_rtt)
    results: list[Goodput] = []
    if goodput:
        warm = warmup_s if warmup_s is not None else min(3.0, max(0.5, 12 * want_rtt / 1e3))
        for src, dst, fwd in ((ha, hb, True), (hb, ha, False)):
            g = measure_goodput(src, dst, duration_s=duration_s, warmup_s=warm, emu=emu)
            conf = bottleneck_mbit(hops, forward=fwd)
            ratio = g.mbit / conf if conf else None
            ok = None if ratio is None else ratio >= tol.goodput_ratio
            results.append(
                Goodput(
                    src=g.src,
                    dst=g.dst,
                    mbit=g.mbit,
                    seconds=g.seconds,
                    retransmits=g.retransmits,
                    configured_mbit=conf,
                    ratio=ratio,
                    ok=ok,
                )
            )
    rtt_ok = abs(err) <= limit
    passed = rtt_ok and all(g.ok is not False for g in results)
    return LinkCalibration(
        a=a,
        b=b,
        links=tuple(k for k, _ in hops),
        configured_rtt_ms=want_rtt,
        rtt=rtt,
        rtt_error_ms=err,
        rtt_limit_ms=limit,
        rtt_ok=rtt_ok,
        goodput=tuple(results),
        passed=passed,
    )


def calibrate_star(emu: EmuNet, center: str, **kwargs: Any) -> list[LinkCalibration]:
    """:func:`calibrate_pair` between ``center`` and every other host, one after the
    other (so measurements do not share links)."""
    return [
        calibrate_pair(emu, h.name, center, **kwargs) for h in emu.net.hosts if h.name != center
    ]
