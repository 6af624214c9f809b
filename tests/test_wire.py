"""The frame and message decoders never crash or hang on bad input (property-based)."""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfed import wire
from specfed.messages import Transmission, VerifyReply, VerifyRequest
from specfed.options import Mode, ValueDtype
from specfed.wire import MsgType, WireError

V = 1000
DECODERS = [
    wire.Hello.decode,
    lambda b: wire.decode_verify(b, V),
    wire.decode_reply,
    wire.decode_error,
    wire.decode_end,
    lambda b: wire.decode_score(b, V),
    wire.decode_score_reply,
]


def _request(**kw):
    base = dict(
        request_id="r1",
        start=3,
        tokens=[1, 2, 999],
        n_positions=2,
        temperature=0.7,
        transmission=Transmission(Mode.TOPK, k=64, index_bytes=3),
        reconstruction="draft-guided",
        measure_fidelity=False,
    )
    return VerifyRequest(**{**base, **kw})


def test_round_trips():
    req = _request()
    got = wire.decode_verify(wire.encode_verify(req), V)
    assert got == req
    ad = _request(
        transmission=Transmission(Mode.ADAPTIVE, k=256, epsilon=0.05, value_dtype=ValueDtype.FP16)
    )
    back = wire.decode_verify(wire.encode_verify(ad), V).transmission
    assert (back.mode, back.k, back.value_dtype) == ("adaptive", 256, "fp16")
    assert back.epsilon == pytest.approx(0.05)
    rep = wire.decode_reply(
        wire.encode_reply(VerifyReply(b"abc", 12.5, math.nan, request_id="r1", round=3))
    )
    assert rep.payload == b"abc" and rep.t_worker_ms == 12.5 and math.isnan(rep.local_l1)
    assert (rep.request_id, rep.round) == ("r1", 3)
    h = wire.Hello(151936, "abcd", "qwen", "worker")
    assert wire.Hello.decode(h.encode()) == h
    assert wire.decode_error(wire.encode_error(wire.ErrorCode.VOCABULARY, "x")) == (4, "x")
    assert wire.decode_score(wire.encode_score("r", [5, 6, 7], 1, 0.5), V) == (
        "r",
        [5, 6, 7],
        1,
        0.5,
    )
    np.testing.assert_array_equal(
        wire.decode_score_reply(wire.encode_score_reply(np.array([0.25, 1.0]))), [0.25, 1.0]
    )
    with pytest.raises(WireError, match="n_context"):
        wire.decode_score(wire.encode_score("r", [5, 6], 2, 1.0), V)
    with pytest.raises(WireError, match="outside"):
        wire.decode_score_reply(wire.encode_score_reply(np.array([1.5])))
    kind, body = wire.parse_frame(wire.frame(MsgType.END, wire.encode_end("r1")))
    assert kind == MsgType.END and wire.decode_end(body) == "r1"


def test_frame_sizes_match_formulas():
    req = _request(tokens=list(range(17)))
    assert len(wire.frame(MsgType.VERIFY, wire.encode_verify(req))) == wire.verify_frame_bytes(
        "r1", 17
    )
    reply = VerifyReply(b"x" * 321, 1.0, request_id="r1")
    assert len(wire.frame(MsgType.VERIFY_REPLY, wire.encode_reply(reply))) == (
        wire.reply_frame_bytes(321, "r1")
    )


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("tokens", [1, 2, V], "token id"),
        ("n_positions", 4, "n_positions"),
        ("temperature", -1.0, "temperature"),
    ],
)
def test_invalid_verify_fields_named(field, value, match):
    with pytest.raises(WireError, match=match):
        wire.decode_verify(wire.encode_verify(_request(**{field: value})), V)


def test_header_checks():
    good = wire.frame(MsgType.END, wire.encode_end("r"))
    with pytest.raises(WireError, match="magic"):
        wire.parse_frame(good[:4] + b"XXXX" + good[8:])
    with pytest.raises(WireError, match="version"):
        wire.parse_frame(good[:8] + bytes([wire.PROTOCOL_VERSION + 1]) + good[9:])
    with pytest.raises(WireError, match="unknown message type"):
        wire.parse_frame(good[:9] + b"\x63" + good[10:])
    with pytest.raises(WireError, match="exceeds the cap"):
        wire.parse_frame(struct.pack(">I4sBBH", 2**31, b"SPFD", wire.PROTOCOL_VERSION, 1, 0))
    with pytest.raises(WireError, match="says"):
        wire.parse_frame(good[:-1])
    for cut in range(len(good)):
        with pytest.raises(WireError):
            wire.parse_frame(good[:cut])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_frames_only_raise_wire_error(data):
    try:
        kind, _body = wire.parse_frame(data, max_frame=1 << 16)
    except WireError:
        return
    assert isinstance(kind, MsgType)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(DECODERS))), st.binary(max_size=200))
def test_random_bodies_only_raise_wire_error(which, data):
    with contextlib.suppress(WireError):
        DECODERS[which](data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=100), st.integers(min_value=0, max_value=255))
def test_corrupted_verify_bodies(cut, flip):
    body = bytearray(wire.encode_verify(_request()))
    if cut < len(body):
        body[cut] ^= flip
    for data in (bytes(body), bytes(body[:cut])):
        try:
            req = wire.decode_verify(data, V)
        except WireError:
            continue
        assert all(0 <= t < V for t in req.tokens) and req.n_positions <= len(req.tokens)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=2**16, max_value=2**32 - 1))
def test_huge_length_refused_before_reading(length):
    """A connection that announces a huge frame is refused after the 12-byte header,
    without waiting for (or allocating) the body."""
    a, b = socket.socketpair()
    a.settimeout(2)
    b.sendall(struct.pack(">I4sBBH", length, b"SPFD", wire.PROTOCOL_VERSION, 3, 0))
    conn = wire.Connection(a, max_frame=2**16)
    with pytest.raises(WireError, match="exceeds the cap"):
        conn.recv()
    assert conn.bytes_received == wire.HEADER.size
    a.close()
    b.close()


def test_truncated_stream_times_out_not_hangs():
    a, b = socket.socketpair()
    a.settimeout(0.2)
    frame = wire.frame(MsgType.END, wire.encode_end("abc"))
    b.sendall(frame[:-2])
    conn = wire.Connection(a)
    with pytest.raises(TimeoutError):
        conn.recv()
    b.close()
    with pytest.raises(ConnectionError):
        conn.recv()
    a.close()


def _step_until_frame(conn: wire.Connection) -> tuple[MsgType, bytes, int]:
    """recv_step whenever the socket is readable, as the server's select loop does."""
    import select

    while True:
        assert select.select([conn.sock], [], [], 5)[0], "no data within 5 s"
        got = conn.recv_step()
        if got is not None:
            return got


@pytest.mark.parametrize("cuts", [[1], [5, 12, 13], [12], [3, 700, 1 << 20, (1 << 20) + 9]])
def test_recv_step_assembles_frames_sent_in_pieces(cuts: list[int]) -> None:
    import threading

    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    conn = wire.Connection(b)
    body = bytes(range(256)) * 5000  # 1.28 MB: more than one READ_CHUNK
    data = wire.frame(MsgType.VERIFY_REPLY, body) + wire.frame(MsgType.END, b"xy")

    def send() -> None:
        for lo, hi in zip([0, *cuts], [*cuts, len(data)], strict=True):
            a.sendall(data[lo:hi])
            time.sleep(0.01)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        kind, got, n = _step_until_frame(conn)
        assert (kind, got, n) == (MsgType.VERIFY_REPLY, body, len(body) + wire.HEADER.size)
        assert _step_until_frame(conn)[:2] == (MsgType.END, b"xy")
        assert conn.bytes_received == len(data)
    finally:
        sender.join()
        a.close()
        b.close()


def test_recv_step_refuses_an_oversized_frame_after_its_header_and_a_closed_peer() -> None:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    conn = wire.Connection(b, max_frame=1000)
    a.sendall(wire.frame(MsgType.VERIFY_REPLY, b"z" * 5000)[:20])
    with pytest.raises(WireError, match=r"exceeds|too large|max"):
        _step_until_frame(conn)
    a2, b2 = socket.socketpair()
    b2.settimeout(5)
    conn2 = wire.Connection(b2)
    a2.sendall(wire.frame(MsgType.VERIFY_REPLY, b"z" * 50)[:30])
    a2.close()
    with pytest.raises(ConnectionError, match="peer closed"):
        _step_until_frame(conn2)
    for s in (a, b, b2):
        s.close()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_TIMESTAMPNS is Linux's")
def test_arrived_is_when_the_kernel_received_the_frame_not_when_it_was_read() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
        with a, b:
            conn = wire.Connection(b, rx_timestamps=True)
            plain = wire.Connection(socket.socket())  # no timestamps: arrived is now
            assert conn.rx_timestamps
            time.sleep(0.05)  # the kernel turns receive timestamps on asynchronously
            ages = []
            for _ in range(3):
                a.sendall(wire.frame(MsgType.END, wire.encode_end("r1")))
                time.sleep(0.08)  # the frame waits in the socket, as behind a busy CPU
                kind, body, _ = conn.recv()
                ages.append(time.perf_counter() - conn.arrived())
                assert kind == MsgType.END and wire.decode_end(body) == "r1"
            assert all(0.07 <= age <= 0.5 for age in ages[1:]), ages  # the first may lack one
            assert time.perf_counter() - plain.arrived() < 0.01
            plain.close()
