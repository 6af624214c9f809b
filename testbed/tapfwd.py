#!/usr/bin/env python3
"""Userspace link emulator: one process joins two TAP devices, A and B, into one link.

Started by :mod:`testbed.linkemu` (one process per emulated link, both directions); it is
a standalone program that imports only the standard library, so it starts in ~20 ms.

For each direction (A->B and B->A) every Ethernet frame read from one TAP goes through::

    arrival t -> random loss (loss %) -> drop-tail queue (packets)
              -> serialisation at the rate (Mbit/s) -> one-way delay (+- jitter)
              -> written into the other TAP

with, for frame i of ``bits_i`` bits (Ethernet header + payload, no FCS, as HTB counts)::

    start_i  = max(t_i, busy_until)             # wait behind the frames queued before it
    busy_until = start_i + bits_i / rate        # end of its serialisation
    depart_i = max(busy_until + delay + U(-jitter, +jitter), depart_{i-1})

so frames never overtake each other (jitter without reordering) and the queue holds the
frames whose serialisation has not ended yet. A frame arriving when that queue already
holds ``max_queue_size`` packets is dropped (drop-tail).

A direction may follow a **rate trace** (``--trace-ab FILE --trace-format-ab FORMAT``):

``mahimahi``
    Mahimahi's packet-delivery format: one integer millisecond per line, each a delivery
    opportunity for 1500 bytes of IP packet (the Ethernet header is not counted, as in
    Mahimahi's link shell); a repeated line is several opportunities in that millisecond.
    A frame of B bytes leaves at the opportunity that completes its B bytes (frames may
    share one opportunity or span several, in order); an opportunity that finds the queue
    empty is lost. Such a trace replaces the rate.
``csv``
    steps ``t_s, bw_mbit[, delay_ms[, loss_pct]]``: from ``t_s`` on, the rate (counted on
    Ethernet frames, like ``--bw``), the one-way delay and the loss of the step apply (an
    empty delay or loss cell keeps ``--delay`` / ``--loss``). A frame's serialisation
    spans step boundaries at each step's rate; loss is drawn with the step at its arrival,
    delay taken from the step in which its serialisation ends.

The trace clock: trace time ``tau = (monotonic - epoch) + start_s`` (``--trace-epoch``,
default: when the TAPs are up). A looping trace repeats with its length (mahimahi: the
last timestamp, as Mahimahi; csv: the last row's ``t_s``, so that row only marks the
end); a trace that does not loop holds its last rate after the end (csv: the last row;
mahimahi: the trace's mean rate, as evenly spaced opportunities).
:func:`parse_mahimahi` and :func:`parse_steps` are THE parsers of both formats
(:mod:`testbed.linkparams` imports them).

The TAPs are non-persistent: they disappear when this process exits, whatever the cause.
Device A is created inside the network namespace of ``--netns-a PID`` (B likewise), by
entering that namespace with setns(2) before opening /dev/net/tun; without the option the
device stays in the forwarder's own namespace (the root one, for Mininet switches).

The TAPs use IFF_VNET_HDR with checksum offload. With ``--gso-segs-a N`` (N > 1) the
kernel may also hand over GSO super-frames of up to N segments read from A (TSO; B
likewise): ~2.5x less CPU at 100 Mbit/s. A super-frame counts as its number of MTU-sized
segments for the queue, its bits are the sum of the segments' frames, and it leaves when
its last segment would have been serialised, so its first segments arrive late by up to
(N-1) segment times: the caller caps N to about 1 ms of serialisation at the link's rate
(single frames below ~25 Mbit/s). Random loss applies per frame, so lossy directions get
single frames, to keep loss per packet.

Protocol with the parent: one line on stdout, ``READY <pid> <ifindex_a> <ifindex_b>``, or
``ERROR <message>`` and exit status 1. The process dies with its parent
(PR_SET_PDEATHSIG), and SIGTERM/SIGINT/SIGHUP end it cleanly (the handler raises: PEP 475
would otherwise restart select()). With ``--stats FILE`` it writes per-direction counters
(JSON) when it ends.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import fcntl
import hashlib
import json
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

# ioctl numbers and flags from <linux/if_tun.h> and <linux/sockios.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
SIOCSIFTXQLEN = 0x8943
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR_LEN = 10  # struct virtio_net_hdr without num_buffers
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29
MAX_FRAME = 65536 + VNET_HDR_LEN + 14  # largest GSO frame plus headers (bytes)
READ_BURST = 64  # frames read from one TAP per wake-up


class Stop(Exception):
    """Raised by the signal handler to leave the main loop."""


def _stop(_signum: int, _frame: Any) -> None:
    raise Stop()


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns_net(fd: int) -> None:
    """Move this (single-threaded) process into the network namespace open at ``fd``."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def open_tap(name: str, gso_segs: int, txqueuelen: int) -> tuple[int, int]:
    """Create TAP ``name`` in the current namespace; return (fd, ifindex).

    ``gso_segs``: 1 = the kernel hands over single frames; N > 1 = GSO super-frames of at
    most N segments (TSO offload on, ``gso_max_segs`` N; N >= 65535: no cap).
    ``txqueuelen`` (packets) is the ring between the kernel and this process; the default
    500 drops frames silently at 100 Mbit/s, 10000 does not.
    """
    if len(name.encode()) > 15:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        offload = TUN_F_CSUM | (TUN_F_TSO4 | TUN_F_TSO6 if gso_segs > 1 else 0)
        fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
        if 1 < gso_segs < 65535:  # netlink only; `ip` runs in our current namespace
            subprocess.run(
                ["ip", "link", "set", "dev", name, "gso_max_segs", str(gso_segs)],
                check=True,
                capture_output=True,
            )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = struct.pack("16si20x", name.encode(), txqueuelen)
            fcntl.ioctl(s.fileno(), SIOCSIFTXQLEN, ifreq)
        return fd, socket.if_nametoindex(name)
    except BaseException:
        os.close(fd)
        raise


def header_len(frame: bytes, off: int = 0) -> int:
    """Bytes of Ethernet (+ VLAN) + IPv4/IPv6 + TCP/UDP headers of the frame at ``off``.

    For anything it cannot parse it falls back to the virtio ``hdr_len`` (or 54 bytes).
    """
    try:
        l3 = off + 14
        ethertype = (frame[l3 - 2] << 8) | frame[l3 - 1]
        while ethertype in (0x8100, 0x88A8):  # VLAN tags
            l3 += 4
            ethertype = (frame[l3 - 2] << 8) | frame[l3 - 1]
        if ethertype == 0x0800:
            l4 = l3 + (frame[l3] & 0x0F) * 4
            proto = frame[l3 + 9]
        elif ethertype == 0x86DD:
            l4 = l3 + 40
            proto = frame[l3 + 6]
        else:
            raise ValueError(ethertype)
        if proto == 6:
            return l4 - off + (frame[l4 + 12] >> 4) * 4
        if proto == 17:
            return l4 - off + 8
        raise ValueError(proto)
    except (IndexError, ValueError):
        hdr_len = struct.unpack_from("<H", frame, 2)[0] if off else 0
        return hdr_len if 0 < hdr_len < 256 else 54


# --------------------------------------------------------------------------- rate traces

#: Bytes of IP packet one Mahimahi delivery opportunity carries (Mahimahi's PACKET_SIZE
#: is 1504 with its 4-byte TUN header).
OPPORTUNITY_BYTES = 1500
#: Ethernet header bytes per frame (or GSO segment), not counted against opportunities.
ETH_HEADER_BYTES = 14
TRACE_FORMATS = ("mahimahi", "csv")
#: Columns of a CSV step trace, in their default order (a header line may reorder them).
STEP_COLUMNS = ("t_s", "bw_mbit", "delay_ms", "loss_pct")

#: One CSV step: (t_s, bw_mbit, delay_ms or None, loss_pct or None); None = the fixed value.
Step = tuple[float, float, float | None, float | None]


class TraceError(ValueError):
    """A trace file is malformed; the message names the file and the line."""


def _content_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) of the lines that are neither blank nor
    ``#`` comments."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append((n, line))
    return out


def parse_mahimahi(text: str, source: str = "<trace>") -> tuple[int, ...]:
    """Delivery-opportunity times (ms, non-decreasing) of a Mahimahi packet-delivery trace.

    One whole number of milliseconds per line, each a delivery opportunity for 1500 bytes;
    a value repeated on k lines is k opportunities in that millisecond. The last value is
    the trace's length (its period when it loops) and must be > 0. Blank lines and ``#``
    comments are skipped. Raises :class:`TraceError` naming ``source`` and the line.
    """
    times: list[int] = []
    prev = 0
    for n, line in _content_lines(text):
        try:
            ms = int(line)
        except ValueError:
            raise TraceError(
                f"{source}: line {n}: expected a whole number of milliseconds, got {line!r}"
            ) from None
        if ms < 0:
            raise TraceError(f"{source}: line {n}: must be >= 0 ms, got {ms}")
        if ms < prev:
            raise TraceError(
                f"{source}: line {n}: {ms} ms comes after {prev} ms (timestamps must not decrease)"
            )
        times.append(ms)
        prev = ms
    if not times:
        raise TraceError(
            f"{source}: no delivery opportunities (expected one millisecond timestamp per line)"
        )
    if times[-1] <= 0:
        raise TraceError(
            f"{source}: line {n}: the last timestamp is the trace's length and must be > 0 ms"
        )
    return tuple(times)


def _cell(text: str, column: str, source: str, n: int) -> float | None:
    """A CSV cell as a finite float (None if empty), checked against its column's range."""
    if not text:
        if column in ("t_s", "bw_mbit"):
            raise TraceError(f"{source}: line {n}: {column}: a value is required")
        return None
    try:
        x = float(text)
    except ValueError:
        raise TraceError(f"{source}: line {n}: {column}: expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise TraceError(f"{source}: line {n}: {column}: must be finite, got {text!r}")
    if column == "bw_mbit" and x <= 0:
        raise TraceError(f"{source}: line {n}: bw_mbit: must be > 0 Mbit/s, got {text}")
    if column == "loss_pct" and not 0 <= x <= 100:
        raise TraceError(f"{source}: line {n}: loss_pct: must be within 0-100 %, got {text}")
    if x < 0:
        raise TraceError(f"{source}: line {n}: {column}: must be >= 0, got {text}")
    return x


def parse_steps(text: str, source: str = "<trace>") -> tuple[Step, ...]:
    """Steps of a CSV step trace: ``(t_s, bw_mbit, delay_ms | None, loss_pct | None)``.

    Columns ``t_s, bw_mbit, delay_ms, loss_pct`` in that order, the last two optional; a
    first line of names (``t_s,bw_mbit,...``, any order, ``t_s`` and ``bw_mbit`` required)
    sets another order. Each row's values hold from its ``t_s`` (seconds, the first row at
    0, strictly increasing) until the next row's; ``bw_mbit`` > 0 on every row; an empty
    ``delay_ms`` / ``loss_pct`` cell keeps the direction's fixed value. Blank lines and
    ``#`` comments are skipped. Raises :class:`TraceError` naming ``source`` and the line.
    """
    lines = _content_lines(text)
    columns = list(STEP_COLUMNS)
    if lines:
        n, first = lines[0]
        names = [c.strip() for c in first.split(",")]
        try:
            float(names[0])
        except ValueError:
            unknown = [c for c in names if c not in STEP_COLUMNS]
            if unknown or len(set(names)) != len(names) or not {"t_s", "bw_mbit"} <= set(names):
                raise TraceError(
                    f"{source}: line {n}: header {first!r}: expected distinct column names "
                    f"from {', '.join(STEP_COLUMNS)}, with t_s and bw_mbit"
                ) from None
            columns = names
            lines = lines[1:]
    steps: list[Step] = []
    for n, line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) > len(columns):
            raise TraceError(
                f"{source}: line {n}: {len(cells)} values for {len(columns)} columns "
                f"({', '.join(columns)})"
            )
        if len(cells) < 2:
            raise TraceError(f"{source}: line {n}: expected at least t_s and bw_mbit, got {line!r}")
        row = {c: _cell(v, c, source, n) for c, v in zip(columns, cells, strict=False)}
        t_s, bw = row["t_s"], row["bw_mbit"]
        assert t_s is not None and bw is not None
        if not steps and t_s != 0:
            raise TraceError(
                f"{source}: line {n}: the first step must start at t_s = 0, got {t_s:g}"
            )
        if steps and t_s <= steps[-1][0]:
            raise TraceError(
                f"{source}: line {n}: t_s {t_s:g} does not come after {steps[-1][0]:g} "
                "(steps must be in increasing time)"
            )
        steps.append((t_s, bw, row.get("delay_ms"), row.get("loss_pct")))
    if not steps:
        raise TraceError(f"{source}: no steps (expected rows t_s, bw_mbit, delay_ms, loss_pct)")
    return tuple(steps)


def parse_trace(text: str, fmt: str, source: str = "<trace>") -> tuple[Any, ...]:
    """``parse_mahimahi`` or ``parse_steps`` by ``fmt`` (``mahimahi`` / ``csv``)."""
    if fmt == "mahimahi":
        return parse_mahimahi(text, source)
    if fmt == "csv":
        return parse_steps(text, source)
    raise TraceError(f"{source}: unknown trace format {fmt!r} (expected mahimahi or csv)")


def check_loop(schedule: tuple[Any, ...], fmt: str, loop: bool, source: str) -> None:
    """A looping CSV trace needs a length: at least two rows (the last row's t_s)."""
    if loop and fmt == "csv" and len(schedule) < 2:
        raise TraceError(
            f"{source}: a looping CSV trace needs at least two rows (the last row's t_s is "
            "its length); give another row or loop: false"
        )


class StepSchedule:
    """A CSV step trace on one clock (seconds): rate, delay and loss per step.

    ``origin`` is the clock time of trace time 0 (epoch - start_s). Rates in bit/s of
    Ethernet frames, delays in s, loss as a probability; ``delay_s`` / ``loss`` fill the
    steps that leave them empty. Looping: steps 0..n-2 repeat every ``t[n-1]`` seconds;
    not looping: the last step holds for ever.
    """

    __slots__ = ("bps", "delay", "last", "loop", "loss", "origin", "period", "t")

    def __init__(
        self, steps: tuple[Step, ...], loop: bool, origin: float, delay_s: float, loss: float
    ) -> None:
        check_loop(steps, "csv", loop, "trace")
        self.t = [s[0] for s in steps]
        self.bps = [s[1] * 1e6 for s in steps]
        self.delay = [delay_s if s[2] is None else s[2] / 1e3 for s in steps]
        self.loss = [loss if s[3] is None else s[3] / 100.0 for s in steps]
        self.loop = loop
        self.period = self.t[-1] if loop else math.inf
        self.last = len(steps) - 2 if loop else len(steps) - 1  # index of the last step used
        self.origin = origin

    def locate(self, now: float) -> tuple[int, int]:
        """(cycle, step index) in force at clock time ``now``."""
        tau = now - self.origin
        cycle = 0
        if self.loop:
            cycle = math.floor(tau / self.period)
            tau -= cycle * self.period
        i = bisect.bisect_right(self.t, tau) - 1
        return cycle, min(max(i, 0), self.last)

    def index(self, now: float) -> int:
        """The step index in force at clock time ``now``."""
        return self.locate(now)[1]

    def finish(self, start: float, bits: float) -> float:
        """Clock time at which ``bits`` whose serialisation starts at ``start`` are sent,
        each step's part at that step's rate."""
        cycle, i = self.locate(start)
        t = start
        while True:
            if i == self.last and not self.loop:
                return t + bits / self.bps[i]
            end = self.origin + cycle * self.period + self.t[i + 1]
            done = t + bits / self.bps[i]
            if done <= end:
                return done
            if end > t:
                bits -= (end - t) * self.bps[i]
                t = end
            if i == self.last:
                cycle, i = cycle + 1, 0
            else:
                i += 1


class OpportunitySchedule:
    """A Mahimahi trace on one clock (seconds): delivery opportunities of 1500 bytes.

    Opportunity ``k`` (0, 1, ...) of a looping trace of ``n`` lines happens at
    ``origin + (k // n) * period + ms[k % n]`` (ms converted to s), period = the last
    timestamp; without loop, the opportunities after the last one come evenly spaced at
    the trace's mean rate. The state (``k``, ``left``) is the opportunity the last frame
    ended in and the bytes it has left.
    """

    __slots__ = ("k", "left", "loop", "ms", "n", "origin", "period_ms", "spacing_ms")

    def __init__(self, ms: tuple[int, ...], loop: bool, origin: float) -> None:
        self.ms = list(ms)
        self.n = len(ms)
        self.period_ms = ms[-1]
        self.spacing_ms = self.period_ms / self.n  # after the end of a trace that does not loop
        self.loop = loop
        self.origin = origin
        self.k = -1
        self.left = 0

    def time_ms(self, k: int) -> float:
        """Trace time (ms) of opportunity ``k``."""
        if self.loop:
            cycle, j = divmod(k, self.n)
            return cycle * self.period_ms + self.ms[j]
        if k < self.n:
            return self.ms[k]
        return self.period_ms + (k - self.n + 1) * self.spacing_ms

    def time(self, k: int) -> float:
        """Clock time (s) of opportunity ``k``."""
        return self.origin + self.time_ms(k) / 1e3

    def count_before(self, tau_ms: float) -> int:
        """How many opportunities happen before trace time ``tau_ms`` (strictly): the
        index of the first one at or after it. The trace has none before time 0."""
        if self.loop:
            # cycle c spans (c*P, (c+1)*P]: its last opportunity is at (c+1)*P
            cycle = math.floor(tau_ms / self.period_ms)
            r = tau_ms - cycle * self.period_ms
            prev = bisect.bisect_left(self.ms, r + self.period_ms)  # of cycle - 1
            return max(0, (cycle - 1) * self.n + prev + bisect.bisect_left(self.ms, r))
        if tau_ms <= self.period_ms:
            return bisect.bisect_left(self.ms, tau_ms)
        k = self.n + max(0, math.ceil((tau_ms - self.period_ms) / self.spacing_ms) - 1)
        return self._settle(k, tau_ms, before=True)

    def first_after(self, now: float) -> int:
        """Index of the first opportunity strictly after clock time ``now``."""
        tau_ms = (now - self.origin) * 1e3
        if self.loop:
            # the opportunities at or before tau: all of the cycles before, and the part
            # of this one (r < P, so never all of it)
            cycle = math.floor(tau_ms / self.period_ms)
            r = tau_ms - cycle * self.period_ms
            return max(0, cycle * self.n + bisect.bisect_right(self.ms, r))
        j = bisect.bisect_right(self.ms, tau_ms)
        if j < self.n:
            return j
        k = self.n + math.floor((tau_ms - self.period_ms) / self.spacing_ms)
        return self._settle(k, tau_ms, before=False)

    def _settle(self, k: int, tau_ms: float, before: bool) -> int:
        """Correct an index after the end found by division (rounding) against
        :meth:`time_ms` itself: the first opportunity at or after ``tau_ms``
        (``before``), or strictly after it."""

        def past(i: int) -> bool:
            t = self.time_ms(i)
            return t >= tau_ms if before else t > tau_ms

        while k > self.n and past(k - 1):
            k -= 1
        while not past(k):
            k += 1
        return k

    def finish(self, now: float, busy_until: float, nbytes: int) -> float:
        """Clock time at which a frame of ``nbytes`` (IP bytes) arriving at ``now`` is
        delivered: after the frames before it (``busy_until`` = when the last one left),
        in the opportunities that cover its bytes. An idle link starts from the first
        opportunity after ``now`` (the unused rest of earlier ones is lost)."""
        if busy_until > now:
            k, left = self.k, self.left
        else:
            k, left = self.first_after(now), OPPORTUNITY_BYTES
        while nbytes > left:
            nbytes -= left
            k += 1
            left = OPPORTUNITY_BYTES
        self.k, self.left = k, left - nbytes
        return self.time(k)


class Direction:
    """The model of one direction: loss -> drop-tail queue -> rate -> delay (+ jitter).

    Units: times in seconds (time.monotonic), ``rate_bps`` in bit/s (0 = unlimited),
    ``loss`` as a probability, ``qlimit`` in packets (MTU-sized segments). ``trace`` (a
    :class:`StepSchedule` or :class:`OpportunitySchedule`) replaces the fixed rate (and
    for steps, the delay and loss) over time.
    """

    __slots__ = (
        "backlog",
        "busy_until",
        "delay",
        "dst",
        "jitter",
        "last_dep",
        "loss",
        "opps",
        "qlimit",
        "queued",
        "rate_bps",
        "rng",
        "segs",
        "stats",
        "steps",
    )

    def __init__(
        self,
        dst: int,
        rate_bps: float,
        delay_s: float,
        jitter_s: float,
        loss: float,
        qlimit: int,
        rng: random.Random,
        trace: StepSchedule | OpportunitySchedule | None = None,
    ) -> None:
        self.dst = dst
        self.rate_bps, self.delay, self.jitter = rate_bps, delay_s, jitter_s
        self.loss, self.qlimit, self.rng = loss, qlimit, rng
        self.steps = trace if isinstance(trace, StepSchedule) else None
        self.opps = trace if isinstance(trace, OpportunitySchedule) else None
        self.queued: collections.deque[tuple[float, bytes]] = collections.deque()
        self.backlog: collections.deque[tuple[float, int]] = collections.deque()
        self.segs = 0  # packets whose serialisation has not ended yet
        self.busy_until = 0.0
        self.last_dep = 0.0
        self.stats = {
            "rx": 0,
            "tx": 0,
            "lost": 0,
            "qdrop": 0,
            "txerr": 0,
            "rx_bytes": 0,
            "tx_bytes": 0,
            "max_queue": 0,
        }

    @staticmethod
    def wire(frame: bytes) -> tuple[int, int]:
        """(bits on the link, packets) of a frame with its virtio_net_hdr in front.

        A GSO super-frame of ``payload`` bytes becomes ``ceil(payload / gso_size)``
        segments, each carrying the frame's headers again. The header length is parsed
        from the frame: the virtio ``hdr_len`` is only the skb's linear length, which for
        frames that crossed a TAP and a bridge is the whole frame.
        """
        body = len(frame) - VNET_HDR_LEN
        if frame[1] == 0:  # gso_type NONE: one plain frame
            return body * 8, 1
        gso_size = struct.unpack_from("<H", frame, 4)[0] or 1
        hdr = header_len(frame, VNET_HDR_LEN)
        payload = body - hdr
        nseg = max(1, -(-payload // gso_size))
        return (payload + nseg * hdr) * 8, nseg

    def arrive(self, frame: bytes, now: float) -> None:
        """Admit (or drop) a frame that arrived at ``now`` and schedule its departure."""
        st = self.stats
        st["rx"] += 1
        steps = self.steps
        loss = self.loss if steps is None else steps.loss[steps.index(now)]
        if loss and self.rng.random() < loss:
            st["lost"] += 1
            return
        if self.rate_bps or steps is not None or self.opps is not None:
            backlog = self.backlog
            while backlog and backlog[0][0] <= now:
                self.segs -= backlog.popleft()[1]
            bits, nseg = self.wire(frame)
            # A full queue drops the frame; an empty one takes even a super-frame
            # larger than the limit (a real queue would take its first segments).
            if self.segs and self.segs + nseg > self.qlimit:
                st["qdrop"] += 1
                return
            start = self.busy_until if self.busy_until > now else now
            if steps is not None:
                self.busy_until = steps.finish(start, bits)
            elif self.opps is not None:
                ip_bytes = max(1, bits // 8 - nseg * ETH_HEADER_BYTES)
                self.busy_until = self.opps.finish(now, self.busy_until, ip_bytes)
            else:
                self.busy_until = start + bits / self.rate_bps
            backlog.append((self.busy_until, nseg))
            self.segs += nseg
            if self.segs > st["max_queue"]:
                st["max_queue"] = self.segs
            delay = self.delay if steps is None else steps.delay[steps.index(self.busy_until)]
            dep = self.busy_until + delay
        else:
            dep = now + self.delay
        if self.jitter:
            dep += self.rng.uniform(-self.jitter, self.jitter)
        if dep < self.last_dep:  # no reordering
            dep = self.last_dep
        self.last_dep = dep
        st["rx_bytes"] += len(frame) - VNET_HDR_LEN
        self.queued.append((dep, frame))

    def release(self, now: float) -> float | None:
        """Write every frame due by ``now``; return the next departure time (or None)."""
        q = self.queued
        st = self.stats
        while q and q[0][0] <= now:
            frame = q.popleft()[1]
            try:
                os.write(self.dst, frame)
                st["tx"] += 1
                st["tx_bytes"] += len(frame) - VNET_HDR_LEN
            except OSError:
                st["txerr"] += 1
        return q[0][0] if q else None


def run(
    fd_a: int, fd_b: int, ab: Direction, ba: Direction, early_s: float, adaptive: bool = True
) -> None:
    """Forward until a signal or a vanished device.

    Frames are released ``early_s`` + (if ``adaptive``) the measured mean wake-up
    lateness of select() before they are due, so that they leave on time on average:
    a timed wake-up arrives tens of microseconds late, more on a busy or virtual CPU.
    """
    by_fd = {fd_a: ab, fd_b: ba}
    rfds = [fd_a, fd_b]
    clock = time.monotonic
    read = os.read
    sel = select.select
    late = 0.0  # EWMA of how late timed wake-ups are (s)
    while True:
        # a frame is late twice: its arrival is seen one wake-up late, and its departure
        # one timed wake-up late; both wake-ups take about the same time
        early = early_s + 2.0 * late
        now = clock() + early
        n1 = ab.release(now)
        n2 = ba.release(now)
        nxt = n1 if n2 is None else (n2 if n1 is None or n2 < n1 else n1)
        if nxt is None:
            timeout = None
        else:
            wake = nxt - early
            timeout = max(0.0, wake - clock())
        ready = sel(rfds, (), (), timeout)[0]
        if not ready:
            if adaptive and timeout:
                lag = clock() - wake
                late += 0.05 * ((lag if lag < 1e-3 else 1e-3) - late)
            continue
        now = clock()
        for fd in ready:
            d = by_fd[fd]
            for _ in range(READ_BURST):
                try:
                    frame = read(fd, MAX_FRAME)
                except BlockingIOError:
                    break
                except OSError:  # device deleted under us: the link is gone
                    return
                d.arrive(frame, now)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name-a", required=True, help="TAP device A (<= 15 bytes)")
    ap.add_argument("--name-b", required=True, help="TAP device B")
    ap.add_argument("--netns-a", type=int, default=0, help="create A in the netns of this PID")
    ap.add_argument("--netns-b", type=int, default=0, help="create B in the netns of this PID")
    for d, text in (("ab", "A->B"), ("ba", "B->A")):
        ap.add_argument(f"--bw-{d}", type=float, default=0.0, help=f"{text} rate, Mbit/s (0=off)")
        ap.add_argument(f"--delay-{d}", type=float, default=0.0, help=f"{text} one-way delay, ms")
        ap.add_argument(f"--jitter-{d}", type=float, default=0.0, help=f"{text} +- jitter, ms")
        ap.add_argument(f"--loss-{d}", type=float, default=0.0, help=f"{text} loss, percent")
        ap.add_argument(f"--queue-{d}", type=int, default=1000, help=f"{text} queue, packets")
        ap.add_argument(f"--trace-{d}", default=None, help=f"{text} rate trace file")
        ap.add_argument(
            f"--trace-format-{d}", choices=TRACE_FORMATS, default="mahimahi", help="its format"
        )
        ap.add_argument(
            f"--trace-loop-{d}", type=int, choices=(0, 1), default=1, help="1 = repeat it"
        )
        ap.add_argument(
            f"--trace-start-{d}", type=float, default=0.0, help="start this far into it, s"
        )
        ap.add_argument(
            f"--trace-sha256-{d}", default="", help="refuse the file unless its sha256 is this"
        )
    ap.add_argument(
        "--gso-segs-a",
        type=int,
        default=1,
        help="segments per frame read from A: 1 = single frames, N = GSO "
        "super-frames of <= N segments (TSO), 65535 = no cap",
    )
    ap.add_argument("--gso-segs-b", type=int, default=1, help="the same for B")
    ap.add_argument(
        "--trace-epoch",
        type=float,
        default=0.0,
        help="time.monotonic() at which the traces start (0 = when the TAPs are up)",
    )
    ap.add_argument("--txqueuelen", type=int, default=10000, help="TAP ring size, packets")
    ap.add_argument(
        "--early-us",
        type=float,
        default=0.0,
        help="release frames this many microseconds early (on top of the "
        "measured wake-up lateness)",
    )
    ap.add_argument(
        "--no-adaptive", action="store_true", help="do not compensate the measured wake-up lateness"
    )
    ap.add_argument(
        "--rt-priority",
        type=int,
        default=0,
        help="run SCHED_FIFO at this priority (1-99; 0 = normal scheduling)",
    )
    ap.add_argument("--parent", type=int, default=0, help="exit at once if not our parent")
    ap.add_argument("--seed", type=int, default=None, help="seed for loss and jitter")
    ap.add_argument("--stats", default=None, help="write JSON counters here on exit")
    return ap.parse_args(argv)


def read_trace_arg(o: argparse.Namespace, d: str) -> tuple[Any, ...] | None:
    """The parsed trace of direction ``d`` (``ab``/``ba``), or None without one."""
    path = getattr(o, f"trace_{d}")
    if not path:
        return None
    fmt = getattr(o, f"trace_format_{d}")
    with open(path, "rb") as f:
        data = f.read()
    want = getattr(o, f"trace_sha256_{d}")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise TraceError(f"{path}: the file changed since it was read (sha256 differs)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    schedule = parse_trace(text, fmt, path)
    check_loop(schedule, fmt, bool(getattr(o, f"trace_loop_{d}")), path)
    return schedule


def trace_schedule(
    o: argparse.Namespace, d: str, schedule: tuple[Any, ...] | None, epoch: float
) -> StepSchedule | OpportunitySchedule | None:
    """Direction ``d``'s parsed trace on the monotonic clock (trace time 0 at
    ``epoch - start``)."""
    if schedule is None:
        return None
    loop = bool(getattr(o, f"trace_loop_{d}"))
    origin = epoch - getattr(o, f"trace_start_{d}")
    if getattr(o, f"trace_format_{d}") == "csv":
        delay_s, loss = getattr(o, f"delay_{d}") / 1e3, getattr(o, f"loss_{d}") / 100.0
        return StepSchedule(schedule, loop, origin, delay_s, loss)
    return OpportunitySchedule(schedule, loop, origin)


def main(argv: list[str] | None = None) -> int:
    """Set up the two TAPs, report READY, forward until told to stop."""
    o = _parse_args(argv)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _libc.prctl(PR_SET_TIMERSLACK, 1)  # ns: wake from select() on time (default 50 us)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop)
    if o.rt_priority:
        # A busy CPU (LLM workers) would otherwise delay wake-ups by a scheduler slice
        # (~3-4 ms). RT throttling (sched_rt_runtime_us) still bounds a runaway forwarder.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(o.rt_priority))
        except OSError as exc:
            print(f"tapfwd: SCHED_FIFO unavailable ({exc}); normal scheduling", file=sys.stderr)
    if o.parent and os.getppid() != o.parent:  # parent died before PDEATHSIG was armed
        return 1
    try:
        schedules = {d: read_trace_arg(o, d) for d in ("ab", "ba")}
    except (OSError, TraceError) as exc:
        print(f"ERROR {o.name_a}<->{o.name_b}: {exc}", flush=True)
        return 1
    try:
        home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        fds: list[int] = []
        ifindex: list[int] = []
        for name, pid, segs in (
            (o.name_a, o.netns_a, o.gso_segs_a),
            (o.name_b, o.netns_b, o.gso_segs_b),
        ):
            if pid:
                ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns_net(ns)
                finally:
                    os.close(ns)
            fd, idx = open_tap(name, segs, o.txqueuelen)
            fds.append(fd)
            ifindex.append(idx)
            if pid:
                setns_net(home)
        os.close(home)
    except Stop:
        return 1
    except Exception as exc:  # report to the parent on the protocol line
        print(f"ERROR {o.name_a}<->{o.name_b}: {exc}", flush=True)
        return 1
    rng = random.Random(o.seed)
    epoch = o.trace_epoch or time.monotonic()
    ab = Direction(
        fds[1],
        o.bw_ab * 1e6,
        o.delay_ab / 1e3,
        o.jitter_ab / 1e3,
        o.loss_ab / 100.0,
        o.queue_ab,
        rng,
        trace_schedule(o, "ab", schedules["ab"], epoch),
    )
    ba = Direction(
        fds[0],
        o.bw_ba * 1e6,
        o.delay_ba / 1e3,
        o.jitter_ba / 1e3,
        o.loss_ba / 100.0,
        o.queue_ba,
        rng,
        trace_schedule(o, "ba", schedules["ba"], epoch),
    )
    try:
        print(f"READY {os.getpid()} {ifindex[0]} {ifindex[1]}", flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # close the pipe to the parent; later prints go nowhere
        os.close(devnull)
        run(fds[0], fds[1], ab, ba, o.early_us / 1e6, adaptive=not o.no_adaptive)
    except (Stop, BrokenPipeError):
        pass
    if o.stats:
        with open(o.stats, "w", encoding="utf-8") as f:
            json.dump({"ab": ab.stats, "ba": ba.stats}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
