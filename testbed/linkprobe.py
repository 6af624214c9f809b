#!/usr/bin/env python3
"""UDP round-trip probe with microsecond resolution and per-direction loss counts.

``ping`` prints RTTs of 100 ms and more in whole milliseconds, too coarse to check a 2 %
tolerance; this probe times each packet with ``time.monotonic_ns`` in the sending process
(user to user, like ``ping -U``). Standalone (stdlib only), run inside Mininet hosts::

    linkprobe.py echo --port P                 # prints READY, echoes until killed
    linkprobe.py ping --dst IP --port P --count N --interval S [--size 56]
                                               # prints one JSON line, see below
    linkprobe.py ping --icmp --dst IP --count N --interval S
                                               # ICMP echo: RTT only, no server

Probe packets are ``--size`` bytes of UDP payload (56, as ping, makes a 98-byte frame).
The echo server counts the probes it received, so the client can split losses by
direction: ``lost_up`` = sent - received by the server, ``lost_down`` = received by the
server - replies received. Output JSON: ``sent``, ``server_rx``, ``received``,
``lost_up``, ``lost_down``, ``rtt_us`` (list, in the order received).

With ``--icmp`` the probe sends ICMP echo requests from a raw socket instead and the
destination's kernel answers (no process to wake there, as with ping): the RTT measure.

``--rt-priority N`` runs the probe SCHED_FIFO so that a busy CPU does not add its
scheduling delay to what is meant to be the network's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import struct
import sys
import time

HDR = struct.Struct("!BIQI")  # type, seq, client send time (ns), server rx count
PROBE, REPLY, COUNT_REQ, COUNT_REPLY, WARM = 1, 2, 3, 4, 5


def _realtime(priority: int) -> None:
    if priority:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except OSError as exc:
            print(f"linkprobe: SCHED_FIFO unavailable ({exc})", file=sys.stderr)


def echo(port: int) -> None:
    """Echo probes back (type REPLY) with the running count of probes received."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    print("READY", flush=True)
    count = 0
    while True:
        data, addr = s.recvfrom(65536)
        if len(data) < HDR.size:
            continue
        kind, seq, t_ns, _ = HDR.unpack_from(data)
        if kind == PROBE:
            count += 1
            s.sendto(HDR.pack(REPLY, seq, t_ns, count) + data[HDR.size :], addr)
        elif kind == WARM:
            s.sendto(HDR.pack(WARM, seq, t_ns, count) + data[HDR.size :], addr)
        elif kind == COUNT_REQ:
            s.sendto(HDR.pack(COUNT_REPLY, seq, t_ns, count), addr)


def ping(
    dst: str, port: int, count: int, interval_s: float, size: int, warmup: int, timeout_s: float
) -> dict[str, object]:
    """Send ``count`` probes every ``interval_s`` s (after ``warmup`` uncounted ones),
    collect replies for 4 x the slowest RTT seen (0.25 s to ``timeout_s``) after the last,
    then ask the server how many probes it received."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((dst, port))
    s.setblocking(False)
    pad = b"\0" * max(0, size - HDR.size)
    clock = time.monotonic_ns
    rtts: list[float] = []
    server_rx = 0

    def drain(until_ns: int, want: int | None = None) -> None:
        nonlocal server_rx
        while True:
            left = (until_ns - clock()) / 1e9
            if left <= 0 or (want is not None and len(rtts) >= want):
                return
            if not select.select([s], [], [], left)[0]:
                return
            while True:
                try:
                    data = s.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                now = clock()
                kind, _seq, t_ns, rx = HDR.unpack_from(data)
                if kind == REPLY:
                    rtts.append((now - t_ns) / 1e3)
                    server_rx = max(server_rx, rx)

    for i in range(warmup):  # ARP and caches; not counted
        s.send(HDR.pack(WARM, i, clock(), 0) + pad)
        drain(clock() + int(0.2e9))
    rtts.clear()
    start = clock()
    for i in range(count):
        due = start + int(i * interval_s * 1e9)
        drain(due)
        s.send(HDR.pack(PROBE, i, clock(), 0) + pad)
    # wait for the stragglers: 4 x the slowest RTT seen (>= 0.25 s), at most timeout_s
    wait_s = min(timeout_s, max(0.25, 4e-6 * max(rtts, default=timeout_s * 1e6 / 4)))
    drain(clock() + int(wait_s * 1e9), want=count)
    for attempt in range(10):  # the count itself may be lost: retry
        s.send(HDR.pack(COUNT_REQ, attempt, clock(), 0))
        r, _, _ = select.select([s], [], [], 0.3)
        got = False
        while r:
            try:
                data = s.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                break
            kind, _seq, _t, rx = HDR.unpack_from(data)
            if kind == COUNT_REPLY:
                server_rx, got = rx, True
        if got:
            break
    return {
        "sent": count,
        "server_rx": server_rx,
        "received": len(rtts),
        "lost_up": count - server_rx,
        "lost_down": server_rx - len(rtts),
        "rtt_us": rtts,
    }


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_ping(
    dst: str, count: int, interval_s: float, size: int, warmup: int, timeout_s: float
) -> dict[str, object]:
    """Like :func:`ping`, with ICMP echo (the kernel of ``dst`` answers, no process
    there): ``count`` requests of ``size`` payload bytes (56 = ping's 98-byte frames).
    Needs CAP_NET_RAW. Loss is counted for the round trip only."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.setblocking(False)
    ident = os.getpid() & 0xFFFF
    clock = time.monotonic_ns
    pad = b"\0" * max(0, size - 8)
    rtts: list[float] = []
    counted: set[int] = set()

    def send(seq: int) -> None:
        body = struct.pack("!Q", clock()) + pad
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        csum = _checksum(hdr + body)
        s.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, seq) + body, (dst, 0))

    def drain(until_ns: int, want: int | None = None) -> None:
        while True:
            left = (until_ns - clock()) / 1e9
            if left <= 0 or (want is not None and len(rtts) >= want):
                return
            if not select.select([s], [], [], left)[0]:
                return
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                now = clock()
                off = (data[0] & 0x0F) * 4
                kind, _code, _c, rid, seq = struct.unpack_from("!BBHHH", data, off)
                if kind != 0 or rid != ident or seq in counted or seq < warmup:
                    continue
                counted.add(seq)
                rtts.append((now - struct.unpack_from("!Q", data, off + 8)[0]) / 1e3)

    for i in range(warmup):  # ARP and caches; not counted
        send(i)
        drain(clock() + int(0.2e9))
    start = clock()
    for i in range(count):
        drain(start + int(i * interval_s * 1e9))
        send(warmup + i)
    wait_s = min(timeout_s, max(0.25, 4e-6 * max(rtts, default=timeout_s * 1e6 / 4)))
    drain(clock() + int(wait_s * 1e9), want=count)
    return {"sent": count, "received": len(rtts), "rtt_us": rtts}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``echo`` or ``ping`` (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--rt-priority", type=int, default=0)
    p = sub.add_parser("ping")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, default=0, help="UDP echo server port (not --icmp)")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between probes")
    p.add_argument("--size", type=int, default=56, help="UDP payload bytes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=2.0, help="s to wait after the last")
    p.add_argument("--rt-priority", type=int, default=0)
    p.add_argument(
        "--icmp",
        action="store_true",
        help="ICMP echo (kernel answers; no echo server, no per-direction loss)",
    )
    o = ap.parse_args(argv)
    _realtime(o.rt_priority)
    if o.mode == "echo":
        with contextlib.suppress(KeyboardInterrupt):
            echo(o.port)
        return 0
    if o.icmp:
        out = icmp_ping(o.dst, o.count, o.interval, o.size, o.warmup, o.timeout)
    else:
        out = ping(o.dst, o.port, o.count, o.interval, o.size, o.warmup, o.timeout)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
