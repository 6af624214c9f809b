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
import collections
import ctypes
import fcntl
import json
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


class Direction:
    """The model of one direction: loss -> drop-tail queue -> rate -> delay (+ jitter).

    Units: times in seconds (time.monotonic), ``rate_bps`` in bit/s (0 = unlimited),
    ``loss`` as a probability, ``qlimit`` in packets (MTU-sized segments).
    """

    __slots__ = (
        "backlog",
        "busy_until",
        "delay",
        "dst",
        "jitter",
        "last_dep",
        "loss",
        "qlimit",
        "queued",
        "rate_bps",
        "rng",
        "segs",
        "stats",
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
    ) -> None:
        self.dst = dst
        self.rate_bps, self.delay, self.jitter = rate_bps, delay_s, jitter_s
        self.loss, self.qlimit, self.rng = loss, qlimit, rng
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
        if self.loss and self.rng.random() < self.loss:
            st["lost"] += 1
            return
        if self.rate_bps:
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
            self.busy_until = start + bits / self.rate_bps
            backlog.append((self.busy_until, nseg))
            self.segs += nseg
            if self.segs > st["max_queue"]:
                st["max_queue"] = self.segs
            dep = self.busy_until + self.delay
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
    ap.add_argument(
        "--gso-segs-a",
        type=int,
        default=1,
        help="segments per frame read from A: 1 = single frames, N = GSO "
        "super-frames of <= N segments (TSO), 65535 = no cap",
    )
    ap.add_argument("--gso-segs-b", type=int, default=1, help="the same for B")
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
    ab = Direction(
        fds[1],
        o.bw_ab * 1e6,
        o.delay_ab / 1e3,
        o.jitter_ab / 1e3,
        o.loss_ab / 100.0,
        o.queue_ab,
        rng,
    )
    ba = Direction(
        fds[0],
        o.bw_ba * 1e6,
        o.delay_ba / 1e3,
        o.jitter_ba / 1e3,
        o.loss_ba / 100.0,
        o.queue_ba,
        rng,
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
