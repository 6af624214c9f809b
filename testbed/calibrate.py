"""Link calibration: measured RTT, link rate and loss between Mininet hosts vs configured.

Never trust a configured delay without measuring it (a TCLink without netem silently runs
at ~0.06 ms). A calibration checks what a link *promises*, each measured so that the
others do not bias it, and robustly, so that a moment of CPU load on the host does not
fail a correct link:

- :func:`measure_rtt`: ICMP echo from a small probe (:mod:`testbed.linkprobe`) timed in
  us in the sending process (user to user like ``ping -U``, so ingress delay is not
  hidden; ping itself prints 100 ms and more in whole ms), a couple of warm-up packets
  (ARP) dropped. Judged on the **median**: a busy host adds rare multi-ms spikes (seen:
  2 of 20 probes at +6-14 ms), which move the mean by ~1 ms but not the median.
- :func:`measure_rate`: a paced UDP packet train of full-size frames, offered at 1.5 x
  the configured bottleneck rate (more if the path is lossy) so that the bottleneck stays
  busy; the receiver timestamps arrivals in the kernel, and the rate is the median over
  5 windows of the Ethernet-frame bits that arrived. Random loss is applied before the
  queue and the rate (both backends), so lost frames take no link time and do not bias
  the rate; loss on links *after* the bottleneck is corrected for by its configured
  fraction. A rate above the configured one is an error like one below.
- :func:`measure_loss`: many small UDP probes at a light load, counted at the far end
  too, so losses are split by direction; judged against the binomial band of the
  configured loss (:func:`binomial_bound`, 4 sigma).
- :func:`measure_goodput`: TCP goodput with iperf3 (the server in the sending host, the
  client in the receiving host with ``-R``, so byte counts are receive-side). It is not
  part of the pass/fail of a lossy path: TCP's goodput there depends on the congestion
  control (Mathis bound for loss-based ones), and its short-window measurement is biased
  both ways, since a lost segment holds back everything behind it until the
  retransmission arrives (0.1 s intervals of 0, 0, then 3.7 x the link's rate were
  measured at 2 Mbit/s, 85 ms, 1 %), so a window that ends after such a release counts
  bytes that crossed the link before it began (1.095 x the rate was seen).
- :func:`calibrate_pair` / :func:`calibrate_star`: all of them, compared with what the
  configuration predicts for the path, against a :class:`Tolerance`; a failed check is
  measured again (``attempts``) before the path is refused.

Predicted RTT of a path = sum over its links of both one-way delays plus the serialisation
of one ping frame (98 bytes) at each link's rate in each direction (0.78 ms per direction
at 1 Mbit/s). Predicted rate = the smallest rate on the path in that direction, counted
on Ethernet frames without FCS (as HTB and the TAP forwarder count); TCP goodput tops out
at 1448/1514 = 0.956 of it (payload per frame with timestamps).
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mininet.node import Node

from testbed.linkemu import EmuNet, read_first_line
from testbed.linkparams import ETH_FRAME_BYTES, LinkSpec, path_specs

PING_FRAME_BYTES = 98  # 56 B payload + 8 ICMP + 20 IP + 14 Ethernet
#: UDP payload of a rate-train packet: a full 1514-byte Ethernet frame (no FCS).
TRAIN_PAYLOAD_BYTES = ETH_FRAME_BYTES - 42
#: Offered rate of a train / the configured bottleneck rate (before the loss allowance).
TRAIN_OVERDRIVE = 1.5
#: Windows a train is cut into; the rate is their median.
TRAIN_WINDOWS = 5
#: Fewest and most packets of one train.
TRAIN_MIN_PACKETS, TRAIN_MAX_PACKETS = 60, 6000
#: Largest share of the slowest link on the path that loss probes may use.
LOSS_PROBE_LOAD = 0.25
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
    """Pass/fail limits.

    RTT: |median - configured| <= max(``rtt_abs_ms``, ``rtt_rel`` x configured RTT).
    Rate: |measured / configured - 1| <= ``rate_rel`` per direction. Loss: the lost count
    within ``loss_sigmas`` binomial standard deviations of the configured fraction.
    ``goodput_ratio``: TCP goodput >= ``goodput_ratio`` x the rate, judged only where TCP
    goodput is measured (``calibrate_pair(goodput=True)``) and the path has no loss.
    """

    rtt_abs_ms: float = 0.5
    rtt_rel: float = 0.03
    goodput_ratio: float = 0.90
    rate_rel: float = 0.03
    loss_sigmas: float = 4.0

    def rtt_limit_ms(self, configured_rtt_ms: float) -> float:
        """Largest acceptable |measured - configured| RTT (ms)."""
        return max(self.rtt_abs_ms, self.rtt_rel * configured_rtt_ms)


@dataclass(frozen=True)
class RttStats:
    """Round-trip times of ``received`` of ``sent`` pings, in ms (sd: sample sd).
    ``median_ms`` is what calibration judges."""

    sent: int
    received: int
    mean_ms: float
    sd_ms: float
    min_ms: float
    max_ms: float
    median_ms: float = math.nan


@dataclass(frozen=True)
class Goodput:
    """TCP goodput from ``src`` to ``dst``: payload Mbit/s over ``seconds`` after warm-up
    (or from the start, ``from_start``); ``configured_mbit`` the path's smallest rate in
    that direction (None = unlimited); ``ok`` None where not judged (see
    :class:`Tolerance`)."""

    src: str
    dst: str
    mbit: float
    seconds: float
    retransmits: int | None = None
    configured_mbit: float | None = None
    ratio: float | None = None
    ok: bool | None = None
    from_start: bool = False


@dataclass(frozen=True)
class RateStats:
    """Link rate ``src`` -> ``dst`` from a UDP train: ``mbit`` Mbit/s of Ethernet frames
    (median of ``windows_mbit``, already divided by ``loss_correction``, the surviving
    fraction of the configured loss after the bottleneck); ``sent``/``received`` packets
    of ``frame_bytes``; ``offered_mbit`` the rate the sender reached; ``seconds`` from the
    first to the last arrival; ``socket_drops`` frames the receiver's socket dropped."""

    src: str
    dst: str
    mbit: float
    windows_mbit: tuple[float, ...]
    sent: int
    received: int
    frame_bytes: int
    offered_mbit: float
    seconds: float
    socket_drops: int = 0
    loss_correction: float = 1.0
    configured_mbit: float | None = None
    ratio: float | None = None
    ok: bool | None = None


@dataclass(frozen=True)
class LossCheck:
    """Loss ``src`` -> ``dst``: ``lost`` of ``sent`` probes, against ``configured_pct``
    (the path's, in that direction); ``ok`` if ``low`` <= lost <= ``high``."""

    src: str
    dst: str
    sent: int
    lost: int
    configured_pct: float
    measured_pct: float
    low: float
    high: float
    ok: bool


@dataclass(frozen=True)
class LinkCalibration:
    """Configured vs measured for the path between hosts ``a`` and ``b``.

    ``links``: the links on the path (``(node1, node2)`` as built);
    ``rtt_error_ms`` = measured median - configured; ``rtt_ok``: within
    ``rtt_limit_ms``; ``rate`` and ``loss``: per direction (a->b first; no rate check
    where the path has no rate limit); ``goodput``: TCP, per direction, only when asked;
    ``attempts``: measurement rounds used (failed checks are measured again);
    ``problems``: one line per failed check; ``passed``: all checks ok.
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
    rate: tuple[RateStats, ...] = field(default_factory=tuple)
    loss: tuple[LossCheck, ...] = field(default_factory=tuple)
    attempts: int = 1
    problems: tuple[str, ...] = field(default_factory=tuple)

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
        median_ms=statistics.median(times_ms),
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
    from_start: bool = False,
) -> Goodput:
    """TCP goodput ``sender`` -> ``receiver`` (Mbit/s of payload) with iperf3.

    The iperf3 server runs in ``sender``, the client in ``receiver`` with ``-R``; the
    receive-side 0.1 s intervals that start after ``warmup_s`` are averaged over (about)
    ``duration_s``. That is right on a lossless path only: with loss, a lost segment
    holds back what follows it until its retransmission arrives, and a window can count
    bytes that crossed the link before it began (reads up to ~1.1 x the rate).
    ``from_start``: count every byte from the connection's start instead (slow start
    included), which can never read above the link: a lower bound. iperf3 PIDs are
    recorded in ``emu``'s state file when given.
    """
    port = next(_port)
    total = math.ceil((0.0 if from_start else warmup_s) + duration_s)
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
    first = 0.0 if from_start else warmup_s - 1e-6
    kept = [
        iv["sum"]
        for iv in result.get("intervals", [])
        if iv["sum"]["start"] >= first and not iv["sum"].get("omitted")
    ]
    seconds = sum(s["seconds"] for s in kept)
    if seconds <= 0:
        raise CalibrationError(
            f"iperf3 {sender.name} -> {receiver.name}: no interval after the {warmup_s} s warm-up"
        )
    mbit = sum(s["bytes"] for s in kept) * 8 / seconds / 1e6
    retrans = result.get("end", {}).get("sum_sent", {}).get("retransmits")
    return Goodput(
        src=sender.name,
        dst=receiver.name,
        mbit=mbit,
        seconds=seconds,
        retransmits=retrans,
        from_start=from_start,
    )


def train_rate_mbit(
    t_ns: list[int], frame_bytes: int, windows: int = TRAIN_WINDOWS
) -> tuple[float, tuple[float, ...]]:
    """Rate (Mbit/s) of a saturated train from its arrival times ``t_ns`` (ns, any
    origin): the arrivals are cut into ``windows`` runs of equal packet counts, each
    gives (frames after its first) x ``frame_bytes`` x 8 / (its last - its first
    arrival), and the median of those is the rate; one late wake-up of a forwarder or a
    pause of the sender spoils one window, not the estimate. Returns (median, windows)."""
    t = sorted(t_ns)
    n = len(t)
    windows = max(1, min(windows, (n - 1) // 2))
    if n < 3:
        raise CalibrationError(f"rate: {n} packets arrived, too few for a rate")
    bounds = [round(j * (n - 1) / windows) for j in range(windows + 1)]
    rates = []
    for i, j in itertools.pairwise(bounds):
        dt = t[j] - t[i]
        if dt > 0:
            rates.append((j - i) * frame_bytes * 8 / dt * 1e3)  # bit/ns = 1000 Mbit/s
    if not rates:
        raise CalibrationError("rate: all packets arrived at the same time")
    return statistics.median(rates), tuple(rates)


def measure_rate(
    sender: Node,
    receiver: Node,
    *,
    configured_mbit: float,
    seconds: float = 0.4,
    overdrive: float = TRAIN_OVERDRIVE,
    loss_before: float = 0.0,
    loss_after: float = 0.0,
    emu: EmuNet | None = None,
    rt_priority: int = PROBE_RT_PRIORITY,
) -> RateStats:
    """Link rate ``sender`` -> ``receiver`` (Mbit/s of Ethernet frames) from one UDP
    train of about ``seconds`` at ``configured_mbit`` (the expected bottleneck).

    The train is offered at ``overdrive`` x ``configured_mbit`` / (1 - ``loss_before``),
    so that what survives the loss up to the bottleneck still keeps it busy; frames lost
    after the bottleneck (fraction ``loss_after``) took link time, so the rate is divided
    by (1 - ``loss_after``). Raises CalibrationError if the probe fails; a sender too
    slow to keep the bottleneck busy (CPU) or drops in the receiver's socket give
    ``ok=False`` in :func:`calibrate_pair` through a low ratio, and a retry.
    """
    frame = TRAIN_PAYLOAD_BYTES + 42
    count = round(configured_mbit * 1e6 * seconds / (frame * 8))
    count = min(TRAIN_MAX_PACKETS, max(TRAIN_MIN_PACKETS, count))
    offered = overdrive * configured_mbit / max(1e-3, 1.0 - loss_before)
    base = [sys.executable, "-I", "-S", str(PROBE_PATH)]
    port = next(_port)
    prio = ["--rt-priority", str(rt_priority)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sink = receiver.popen(
            [*base, "sink", "--port", str(port), *prio],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(sink)
        _record(emu, sink, f"probe sink {receiver.name}")
        if read_first_line(sink, 10.0) != "READY":
            raise CalibrationError(f"rate probe sink in {receiver.name} did not start")
        args = ["--dst", receiver.IP(), "--port", str(port), "--count", str(count)]
        args += ["--rate", repr(offered), "--size", str(TRAIN_PAYLOAD_BYTES), *prio]
        train = sender.popen(
            [*base, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        procs.append(train)
        _record(emu, train, f"probe train {sender.name}")
        budget = count * frame * 8 / (offered * 1e6) + 30
        t_out, t_err = train.communicate(timeout=budget)
        s_out, s_err = sink.communicate(timeout=budget)
    finally:
        _end(procs)
    where = f"rate probe {sender.name} -> {receiver.name}"
    try:
        sent = json.loads(t_out)
        got = json.loads(s_out)
    except json.JSONDecodeError:
        tail = (t_err + s_err).decode(errors="replace")[-200:]
        raise CalibrationError(f"{where}: no result ({tail!r})") from None
    try:
        mbit, windows = train_rate_mbit(got["t_ns"], frame)
    except CalibrationError as exc:
        raise CalibrationError(f"{where}: {exc}") from None
    keep = max(1e-3, 1.0 - loss_after)
    return RateStats(
        src=sender.name,
        dst=receiver.name,
        mbit=mbit / keep,
        windows_mbit=tuple(w / keep for w in windows),
        sent=sent["sent"],
        received=got["received"],
        frame_bytes=frame,
        offered_mbit=sent["sent"] * frame * 8 / max(sent["send_s"], 1e-9) / 1e6,
        seconds=(max(got["t_ns"]) - min(got["t_ns"])) / 1e9,
        socket_drops=got["socket_drops"],
        loss_correction=keep,
    )


# --------------------------------------------------------------------------- prediction


def path_links(emu: EmuNet, a: str, b: str) -> list[tuple[tuple[str, str], LinkSpec]]:
    """The links from node ``a`` to node ``b`` (shortest path), each as ``((node1, node2),
    spec)`` with the spec re-oriented so that ``up`` points from ``a`` towards ``b``."""
    try:
        return path_specs(emu.links, a, b)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


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


def traced(hops: list[tuple[tuple[str, str], LinkSpec]], forward: bool | None = None) -> bool:
    """Whether a link of the path follows a trace, forward (a->b), back, or either (None).

    Such a path's rate (and with a CSV trace its delay and loss) changes over time, so a
    calibration cannot compare it with one configured figure: it is measured and recorded,
    not judged (the trace itself is recorded with the run)."""
    dirs = (True, False) if forward is None else (forward,)
    return any((s.up if f else s.down).trace is not None for _k, s in hops for f in dirs)


def path_loss(hops: list[tuple[tuple[str, str], LinkSpec]], forward: bool = True) -> float:
    """Fraction (0-1) of packets the configured loss drops along the path, forward
    (a->b) or back: 1 - prod(1 - loss of each link in that direction)."""
    keep = 1.0
    for _k, s in hops:
        keep *= 1.0 - (s.up if forward else s.down).loss_pct / 100
    return 1.0 - keep


def loss_around_bottleneck(
    hops: list[tuple[tuple[str, str], LinkSpec]], forward: bool = True
) -> tuple[float, float]:
    """(loss before and at the bottleneck, loss after it) as fractions, forward or back.
    Each link drops before its own queue and rate, so the bottleneck's own loss counts as
    before it. The bottleneck is the first link of the smallest rate."""
    dirs = [(s.up if forward else s.down) for _k, s in hops]
    rates = [d.bw_mbit if d.bw_mbit else math.inf for d in dirs]
    at = rates.index(min(rates))
    before = path_loss(hops[: at + 1], forward)
    after = path_loss(hops[at + 1 :], forward)
    return before, after


# --------------------------------------------------------------------------- calibration


def judge_rtt(
    rtt: RttStats, configured_ms: float, tol: Tolerance
) -> tuple[float, float, bool, str]:
    """(error = median - configured, limit, ok, problem or '') of an RTT measurement."""
    err = rtt.median_ms - configured_ms
    limit = tol.rtt_limit_ms(configured_ms)
    ok = abs(err) <= limit
    why = (
        ""
        if ok
        else f"RTT {rtt.median_ms:.2f} ms (median of {rtt.received}; mean {rtt.mean_ms:.2f}) "
        f"for {configured_ms:.2f} configured (limit +-{limit:.2f})"
    )
    return err, limit, ok, why


def judge_rate(r: RateStats, configured_mbit: float, tol: Tolerance) -> tuple[RateStats, str]:
    """``r`` with configured, ratio and ok set, and the problem ('' if ok or not judged).

    Not judged (``ok`` None): the sender could not offer more than the configured rate
    (+ tolerance) and the path carried all it offered, so the link was never the
    bottleneck (a link faster than the Python sender, ~400 Mbit/s and up). If the path
    carried less than it was offered, the link was the bottleneck and is judged."""
    ratio = r.mbit / configured_mbit
    carried_all = r.mbit >= (1 - tol.rate_rel) * r.offered_mbit
    if r.offered_mbit < (1 + tol.rate_rel) * configured_mbit and carried_all:
        return replace(r, configured_mbit=configured_mbit, ratio=ratio, ok=None), ""
    ok = abs(ratio - 1.0) <= tol.rate_rel and r.socket_drops == 0
    why = ""
    if not ok:
        why = (
            f"rate {r.src}->{r.dst} {r.mbit:.3f} Mbit/s for {configured_mbit:g} configured "
            f"(ratio {ratio:.3f}, limit +-{tol.rate_rel:.0%}"
        )
        if r.offered_mbit < configured_mbit:
            why += f"; the sender reached only {r.offered_mbit:.2f} Mbit/s"
        if r.socket_drops:
            why += f"; {r.socket_drops} dropped in the receiver's socket"
        why += ")"
    return replace(r, configured_mbit=configured_mbit, ratio=ratio, ok=ok), why


def judge_loss(
    src: str, dst: str, sent: int, lost: int, configured: float, tol: Tolerance
) -> tuple[LossCheck, str]:
    """Loss check of ``lost`` of ``sent`` probes against ``configured`` (fraction 0-1)."""
    low, high = binomial_bound(sent, configured, sigmas=tol.loss_sigmas)
    ok = low <= lost <= high
    c = LossCheck(
        src=src,
        dst=dst,
        sent=sent,
        lost=lost,
        configured_pct=100 * configured,
        measured_pct=100 * lost / sent if sent else 0.0,
        low=low,
        high=high,
        ok=ok,
    )
    why = (
        ""
        if ok
        else f"loss {src}->{dst} {lost} of {sent} probes for {100 * configured:g} % configured "
        f"(expected {max(0.0, low):.0f}-{high:.0f})"
    )
    return c, why


def loss_probe_plan(
    hops: list[tuple[tuple[str, str], LinkSpec]], min_count: int = 200
) -> tuple[int, float]:
    """(count, interval s) of loss probes for a path: enough that the configured loss
    is expected ~25 times in the lossier direction (200-4000; ``min_count`` on a
    lossless path), at most :data:`LOSS_PROBE_LOAD` of the slowest link, >= 0.5 ms apart."""
    p = max(path_loss(hops, True), path_loss(hops, False))
    count = min_count if p == 0 else min(4000, max(1000, min_count, math.ceil(25 / p)))
    rates = [r for fwd in (True, False) if (r := bottleneck_mbit(hops, fwd))]
    frame_ms = PING_FRAME_BYTES * 8 / (min(rates) * 1e3) if rates else 0.0
    return count, max(0.0005, frame_ms / LOSS_PROBE_LOAD / 1e3)


def calibrate_pair(
    emu: EmuNet,
    a: str,
    b: str,
    *,
    tolerance: Tolerance | None = None,
    pings: int = 50,
    attempts: int = 3,
    rate: bool = True,
    loss: bool = True,
    train_s: float = 0.4,
    goodput: bool = False,
    duration_s: float = 2.0,
    warmup_s: float | None = None,
) -> LinkCalibration:
    """Measure the path between hosts ``a`` and ``b`` and compare with the configuration
    (a path with a trace-driven link is measured and recorded, but its RTT, rate and loss
    are not judged: they follow the trace, see :func:`traced`):
    RTT (median of ``pings`` ICMP probes), link rate each way (a UDP train of about
    ``train_s`` s, where the path has a rate limit) and loss each way (UDP probes).

    A check that fails is measured again, up to ``attempts`` rounds in all, so that a
    moment of load on the host does not refuse a correct link; a wrong link fails every
    round. ``goodput``: also measure TCP goodput each way with iperf3 (``duration_s``
    after ``warmup_s``, default 12 RTTs within 0.5-3 s), judged against
    ``tolerance.goodput_ratio`` on lossless paths only (counted from the connection's
    start on lossy ones, see :func:`measure_goodput`).
    """
    tol = tolerance or Tolerance()
    net = emu.net
    ha, hb = net[a], net[b]
    hops = path_links(emu, a, b)
    want_rtt = configured_rtt_ms(hops)
    ends = ((ha, hb, True), (hb, ha, False))
    rtt: RttStats | None = None
    rtt_why = "not measured"
    rates: dict[bool, tuple[RateStats, str]] = {}
    losses: tuple[tuple[LossCheck, str], ...] = ()
    used = 0
    for used in range(1, max(1, attempts) + 1):
        last = used == max(1, attempts)
        try:
            if rtt_why:
                rtt = measure_rtt(ha, hb, count=pings, emu=emu)
                rtt_why = "" if traced(hops) else judge_rtt(rtt, want_rtt, tol)[3]
            if loss and not traced(hops) and (not losses or any(w for _c, w in losses)):
                count, interval = loss_probe_plan(hops)
                ls = measure_loss(ha, hb, count=count, interval_s=interval, emu=emu)
                losses = (
                    judge_loss(a, b, ls.sent, ls.lost_up, path_loss(hops, True), tol),
                    judge_loss(b, a, ls.server_rx, ls.lost_down, path_loss(hops, False), tol),
                )
            for src, dst, fwd in ends if rate else ():
                conf = bottleneck_mbit(hops, forward=fwd)
                if conf is None or traced(hops, fwd) or (fwd in rates and not rates[fwd][1]):
                    continue
                before, after = loss_around_bottleneck(hops, forward=fwd)
                r = measure_rate(
                    src,
                    dst,
                    configured_mbit=conf,
                    seconds=train_s,
                    loss_before=before,
                    loss_after=after,
                    emu=emu,
                )
                rates[fwd] = judge_rate(r, conf, tol)
        except CalibrationError:
            if last:
                raise
            continue
        if (
            not rtt_why
            and not any(w for _c, w in losses)
            and not any(w for _r, w in rates.values())
        ):
            break
    assert rtt is not None
    err, limit, rtt_ok, _ = judge_rtt(rtt, want_rtt, tol)
    rtt_ok = rtt_ok or traced(hops)  # a trace-driven path: measured, recorded, not judged
    problems = [w for w in (rtt_why, *(w for _c, w in losses)) if w]
    problems += [rates[f][1] for f in (True, False) if f in rates and rates[f][1]]
    results: list[Goodput] = []
    if goodput:
        lossy = path_loss(hops, True) > 0 or path_loss(hops, False) > 0
        warm = warmup_s if warmup_s is not None else min(3.0, max(0.5, 12 * want_rtt / 1e3))
        for src, dst, fwd in ends:
            g = measure_goodput(
                src, dst, duration_s=duration_s, warmup_s=warm, emu=emu, from_start=lossy
            )
            conf = bottleneck_mbit(hops, forward=fwd)
            ratio = g.mbit / conf if conf else None
            ok = None if ratio is None or lossy else tol.goodput_ratio <= ratio <= 1.0
            if ok is False:
                problems.append(
                    f"TCP goodput {g.src}->{g.dst} {g.mbit:.3f} Mbit/s for {conf:g} configured "
                    f"(ratio {ratio:.3f}, expected {tol.goodput_ratio:g}-1)"
                )
            results.append(replace(g, configured_mbit=conf, ratio=ratio, ok=ok))
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
        passed=not problems,
        rate=tuple(rates[f][0] for f in (True, False) if f in rates),
        loss=tuple(c for c, _w in losses),
        attempts=used,
        problems=tuple(problems),
    )


def calibrate_star(emu: EmuNet, center: str, **kwargs: Any) -> list[LinkCalibration]:
    """:func:`calibrate_pair` between ``center`` and every other host, one after the
    other (so measurements do not share links)."""
    return [
        calibrate_pair(emu, h.name, center, **kwargs) for h in emu.net.hosts if h.name != center
    ]
