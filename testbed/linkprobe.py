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

The rate measure is a paced UDP packet train::

    linkprobe.py sink --port P                 # prints READY, then one JSON line at END
    linkprobe.py train --dst IP --port P --count N --rate MBIT [--size 1472]
                                               # prints one JSON line: sent, send_s

``train`` sends ``--count`` packets of ``--size`` UDP payload bytes paced at ``--rate``
Mbit/s of Ethernet frames (payload + 42 bytes of UDP, IP and Ethernet headers), catching
up at once on packets that fell due while it was descheduled, then END packets. ``sink``
timestamps each arrival in the kernel (SO_TIMESTAMPNS, so its own wake-up latency does not
count), has a large receive buffer, and counts the packets its socket dropped
(SO_RXQ_OVFL). Its JSON: ``received``, ``size`` (payload bytes), ``seq`` and ``t_ns``
(per packet, in arrival order; ns after the first arrival), ``socket_drops``.

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
PROBE, REPLY, COUNT_REQ, COUNT_REPLY, WARM, TRAIN, END = 1, 2, 3, 4, 5, 6, 7
UDP_IP_ETH_BYTES = 42  # 8 UDP + 20 IPv4 + 14 Ethernet (no FCS)
# <asm-generic/socket.h>; on 64-bit Linux the "old" timestamp is a 64-bit timespec
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SINK_RCVBUF = 32 << 20  # bytes: a whole train, even if the sink is not scheduled


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


def sink(port: int, first_timeout_s: float, idle_s: float) -> dict[str, object]:
    """Receive one train: from the first packet until END or ``idle_s`` without packets
    (``first_timeout_s`` for the first). Arrival times are the kernel's (SO_TIMESTAMPNS)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SINK_RCVBUF)
    except OSError:  # not root: as much as rmem_max allows
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SINK_RCVBUF)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    s.bind(("0.0.0.0", port))
    print("READY", flush=True)
    seqs: list[int] = []
    stamps: list[int] = []
    size = 0
    drops = 0
    timeout = first_timeout_s
    anc = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4)
    while True:
        if not select.select([s], [], [], timeout)[0]:
            break
        data, ancdata, _flags, _addr = s.recvmsg(65536, anc)
        if len(data) < HDR.size:
            continue
        kind, seq, _t, _ = HDR.unpack_from(data)
        if kind == END:
            break
        if kind != TRAIN:
            continue
        t_ns = time.time_ns()  # fallback if the kernel gave no timestamp
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS and len(cdata) >= 16:
                sec, nsec = struct.unpack_from("qq", cdata)
                t_ns = sec * 1_000_000_000 + nsec
            elif level == socket.SOL_SOCKET and ctype == SO_RXQ_OVFL and len(cdata) >= 4:
                drops = struct.unpack_from("I", cdata)[0]
        seqs.append(seq)
        stamps.append(t_ns)
        size = len(data)
        timeout = idle_s
    t0 = stamps[0] if stamps else 0
    return {
        "received": len(seqs),
        "size": size,
        "seq": seqs,
        "t_ns": [t - t0 for t in stamps],
        "socket_drops": drops,
    }


def train(dst: str, port: int, count: int, rate_mbit: float, size: int) -> dict[str, object]:
    """Send ``count`` TRAIN packets of ``size`` payload bytes paced at ``rate_mbit`` Mbit/s
    of Ethernet frames (late packets go at once), then 5 END packets 20 ms apart."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect((dst, port))
    pad = b"\0" * max(0, size - HDR.size)
    gap_ns = (size + UDP_IP_ETH_BYTES) * 8 / (rate_mbit * 1e6) * 1e9
    clock = time.monotonic_ns
    sent = 0
    start = clock()
    for i in range(count):
        wait_ns = start + int(i * gap_ns) - clock()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)  # never spin: forwarders share our priority
        try:
            s.send(HDR.pack(TRAIN, i, clock(), 0) + pad)
            sent += 1
        except OSError:  # ENOBUFS: the local queue is full; the packet is not sent
            pass
    send_s = (clock() - start) / 1e9
    for i in range(5):
        with contextlib.suppress(OSError):
            s.send(HDR.pack(END, count + i, clock(), 0))
        time.sleep(0.02)
    return {"sent": sent, "count": count, "send_s": send_s}


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
    k = sub.add_parser("sink")
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--first-timeout", type=float, default=10.0, help="s to wait for the first")
    k.add_argument("--idle", type=float, default=1.0, help="s without packets that end it")
    k.add_argument("--rt-priority", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("--dst", required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--count", type=int, default=100)
    t.add_argument("--rate", type=float, required=True, help="Mbit/s of Ethernet frames")
    t.add_argument("--size", type=int, default=1472, help="UDP payload bytes")
    t.add_argument("--rt-priority", type=int, default=0)
    o = ap.parse_args(argv)
    _realtime(o.rt_priority)
    if o.mode == "sink":
        print(json.dumps(sink(o.port, o.first_timeout, o.idle)), flush=True)
        return 0
    if o.mode == "train":
        print(json.dumps(train(o.dst, o.port, o.count, o.rate, o.size)))
        return 0
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
