"""Unit tests (no root, no TAP devices) of the forwarder's per-direction link model."""

from __future__ import annotations

import math
import os
import random
import struct
from collections.abc import Iterator

import pytest

from testbed import tapfwd
from testbed.tapfwd import VNET_HDR_LEN, Direction, header_len

PLAIN = bytes(VNET_HDR_LEN)  # virtio_net_hdr of a plain (non-GSO) frame


def tcp_frame(
    payload: int, *, gso_size: int = 0, ipv6: bool = False, vnet_hdr_len: int = 0
) -> bytes:
    """A virtio header + Ethernet + IPv4/IPv6 + TCP (32-byte header) frame."""
    gso_type = (4 if ipv6 else 1) if gso_size else 0
    vnet = struct.pack("<BBHHHH", 1, gso_type, vnet_hdr_len, gso_size, 0, 0)
    eth = bytes(12) + (b"\x86\xdd" if ipv6 else b"\x08\x00")
    ip = (
        (bytes([0x60]) + bytes(5) + b"\x06" + bytes(33))
        if ipv6
        else (bytes([0x45]) + bytes(8) + b"\x06" + bytes(10))
    )
    tcp = bytes(12) + bytes([8 << 4]) + bytes(19)
    return vnet + eth + ip + tcp + bytes(payload)


@pytest.fixture
def sink() -> Iterator[int]:
    """Write end of a pipe standing in for the destination TAP."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield w
    os.close(r)
    os.close(w)


def test_header_len() -> None:
    assert header_len(tcp_frame(0), VNET_HDR_LEN) == 14 + 20 + 32
    assert header_len(tcp_frame(0, ipv6=True), VNET_HDR_LEN) == 14 + 40 + 32
    udp = PLAIN + bytes(12) + b"\x08\x00" + bytes([0x45]) + bytes(8) + b"\x11" + bytes(30)
    assert header_len(udp, VNET_HDR_LEN) == 14 + 20 + 8
    garbage = struct.pack("<BBHHHH", 1, 1, 60, 1448, 0, 0) + bytes(4)
    assert header_len(garbage, VNET_HDR_LEN) == 60  # falls back to virtio hdr_len


def test_wire_counts_segments_with_headers() -> None:
    plain = PLAIN + bytes(1514)
    assert Direction.wire(plain) == (1514 * 8, 1)
    # A 2-segment GSO frame whose virtio hdr_len is the whole frame (as after a bridge)
    gso = tcp_frame(2 * 1448, gso_size=1448, vnet_hdr_len=66 + 2 * 1448)
    assert Direction.wire(gso) == ((2 * 1448 + 2 * 66) * 8, 2)
    gso3 = tcp_frame(2 * 1448 + 100, gso_size=1448)
    assert Direction.wire(gso3) == ((2 * 1448 + 100 + 3 * 66) * 8, 3)


def test_rate_then_delay(sink: int) -> None:
    # 1000-byte frames at 8 Mbit/s: 1 ms each; 10 ms one-way delay
    d = Direction(sink, 8e6, 0.010, 0.0, 0.0, 100, random.Random(1))
    for _ in range(3):
        d.arrive(PLAIN + bytes(1000), now=0.0)
    deps = [t for t, _ in d.queued]
    assert deps == pytest.approx([0.011, 0.012, 0.013])
    d.arrive(PLAIN + bytes(1000), now=0.020)  # link idle again: no queueing
    assert d.queued[-1][0] == pytest.approx(0.031)


def test_drop_tail_queue(sink: int) -> None:
    d = Direction(sink, 8e6, 0.0, 0.0, 0.0, 3, random.Random(1))
    for _ in range(5):
        d.arrive(PLAIN + bytes(1000), now=0.0)
    assert len(d.queued) == 3 and d.stats["qdrop"] == 2
    # 2.5 ms later two frames have left the queue: room for two more
    for _ in range(3):
        d.arrive(PLAIN + bytes(1000), now=0.0025)
    assert d.stats["qdrop"] == 3 and d.stats["max_queue"] == 3


def test_empty_queue_takes_a_big_gso_frame(sink: int) -> None:
    d = Direction(sink, 8e6, 0.0, 0.0, 0.0, 4, random.Random(1))
    d.arrive(tcp_frame(10 * 1448, gso_size=1448), now=0.0)  # 10 segments > limit 4
    assert len(d.queued) == 1
    d.arrive(PLAIN + bytes(100), now=0.0)
    assert d.stats["qdrop"] == 1


def test_loss_is_binomial(sink: int) -> None:
    n, p = 20000, 0.02
    d = Direction(sink, 0.0, 0.0, 0.0, p, 10, random.Random(7))
    for i in range(n):
        d.arrive(PLAIN + bytes(60), now=i * 1e-3)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(d.stats["lost"] - n * p) < 4 * sd


def test_jitter_never_reorders(sink: int) -> None:
    d = Direction(sink, 0.0, 0.020, 0.005, 0.0, 10, random.Random(3))
    for i in range(2000):
        d.arrive(PLAIN + bytes(60), now=i * 1e-3)
    deps = [t - i * 1e-3 for i, (t, _) in enumerate(d.queued)]
    assert all(
        b >= a
        for a, b in zip([t for t, _ in d.queued], [t for t, _ in list(d.queued)[1:]], strict=False)
    )
    assert min(deps) >= 0.015 - 1e-9 and max(deps) <= 0.025 + 1e-9
    assert 0.019 < sum(deps) / len(deps) < 0.022  # FIFO clamp biases the mean up a little


def test_release_writes_due_frames(sink: int) -> None:
    d = Direction(sink, 0.0, 0.005, 0.0, 0.0, 10, random.Random(1))
    d.arrive(PLAIN + b"a" * 60, now=0.0)
    d.arrive(PLAIN + b"b" * 60, now=0.001)
    assert d.release(0.004) == pytest.approx(0.005)
    assert d.release(0.0055) == pytest.approx(0.006)
    assert d.stats["tx"] == 1
    assert d.release(1.0) is None
    assert d.stats["tx"] == 2 and d.stats["tx_bytes"] == 120


def test_cli_defaults() -> None:
    o = tapfwd._parse_args(["--name-a", "a0", "--name-b", "b0", "--bw-ab", "10"])
    assert (o.bw_ab, o.bw_ba, o.txqueuelen, o.gso_segs_a) == (10.0, 0.0, 10000, 1)
