"""A worker against a hostile client: bounded memory, connections and time per frame;
requests past the model's context refused; documented error codes; optional shared token.
(No root: a worker process on 127.0.0.1 with a tiny model.)"""

from __future__ import annotations

import socket
import struct
import time

import psutil
import pytest

from specfed import wire
from specfed.client import RemoteWorker
from specfed.engine import WorkerLost
from specfed.messages import Transmission, VerifyRequest
from specfed.models import load_model, make_tiny_model
from specfed.options import Mode
from specfed.wire import ErrorCode, MsgType
from tests.procs import WorkerProc

V = 64
CONTEXT = 256  # the tiny model's max_position_embeddings in this test


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_model(root / "w", vocab_size=V, seed=31, max_position_embeddings=CONTEXT)
    make_tiny_model(root / "d", vocab_size=V, seed=32, max_position_embeddings=CONTEXT)
    return root


@pytest.fixture(scope="module")
def draft(models):
    return load_model(str(models / "d"), dtype="fp32")


@pytest.fixture(scope="module")
def worker(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "w.log"
    proc = WorkerProc(
        models / "w", log, "--max-connections", "4", "--frame-timeout", "2", "--idle-timeout", "30"
    )
    yield proc
    proc.stop()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(10)
    return s


def _read_error(s: socket.socket) -> tuple[int, str]:
    conn = wire.Connection(s)
    kind, body, _ = conn.recv(time.monotonic() + 10)
    assert kind == MsgType.ERROR
    return wire.decode_error(body)


def _hello(draft, token: str = "") -> bytes:
    return wire.frame(
        MsgType.HELLO, wire.Hello(draft.vocab_size, draft.fingerprint, "t", token=token).encode()
    )


def test_announced_hello_of_64_mib_is_refused_from_its_header(worker):
    """A HELLO is a few strings: 64 MiB announced (under the frame cap) is refused after its
    12-byte header, nothing allocated."""
    rss0 = psutil.Process(worker.proc.pid).memory_info().rss
    socks = []
    for _ in range(6):
        s = _connect(worker.port)
        s.sendall(struct.pack(">I4sBBH", 64 * 2**20 - 100, b"SPFD", wire.PROTOCOL_VERSION, 1, 0))
        socks.append(s)
    for s in socks:
        code, msg = _read_error(s)
        assert code == ErrorCode.TOO_LARGE and "HELLO" in msg
        s.close()
    grown = psutil.Process(worker.proc.pid).memory_info().rss - rss0
    assert grown < 32 * 2**20, f"worker grew by {grown / 2**20:.0f} MiB"


def test_stalled_body_does_not_allocate_what_it_announces(worker, draft):
    """A VERIFY announcing 4 MB whose body never comes costs memory only for what arrived."""
    rss0 = psutil.Process(worker.proc.pid).memory_info().rss
    socks = []
    for _ in range(3):
        s = _connect(worker.port)
        s.sendall(_hello(draft))
        wire.Connection(s).recv(time.monotonic() + 10)  # HELLO_OK
        s.sendall(struct.pack(">I4sBBH", 8 + 4 * 2**20, b"SPFD", wire.PROTOCOL_VERSION, 3, 0))
        s.sendall(b"x" * 100)
        socks.append(s)
    time.sleep(0.5)
    grown = psutil.Process(worker.proc.pid).memory_info().rss - rss0
    for s in socks:
        s.close()
    assert grown < 8 * 2**20, f"worker grew by {grown / 2**20:.1f} MiB for 300 bytes received"


def test_connection_limit(worker, draft):
    time.sleep(2.5)  # connections of earlier tests have timed out (frame timeout 2 s)
    held = [_connect(worker.port) for _ in range(4)]
    for s in held:
        s.sendall(_hello(draft))
        kind, _, _ = wire.Connection(s).recv(time.monotonic() + 10)
        assert kind == MsgType.HELLO_OK
    extra = _connect(worker.port)
    code, msg = _read_error(extra)
    assert code == ErrorCode.BUSY and "4 connections" in msg
    for s in [*held, extra]:
        s.close()


def test_a_trickled_frame_is_cut_off_by_the_frame_timeout(worker, draft):
    """One byte per 0.3 s resets an idle timeout forever; the frame timeout (2 s) does not."""
    time.sleep(0.5)
    s = _connect(worker.port)
    frame = _hello(draft)
    t0 = time.monotonic()
    closed_after = None
    for b in frame * 10:
        try:
            s.sendall(bytes([b]))
        except OSError:
            closed_after = time.monotonic() - t0
            break
        time.sleep(0.3)
        s.setblocking(False)
        try:
            if s.recv(1 << 16) == b"":
                closed_after = time.monotonic() - t0
                break
        except BlockingIOError:
            pass
        finally:
            s.setblocking(True)
        if time.monotonic() - t0 > 8:
            break
    s.close()
    assert closed_after is not None and closed_after < 4.5, closed_after


def test_verify_past_the_model_context_is_refused(worker, draft):
    client = RemoteWorker("w", ("127.0.0.1", worker.port), draft)
    req = VerifyRequest("r", 0, [1] * (CONTEXT + 10), 2, 1.0, Transmission(Mode.TOPK, k=4))
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match=rf"{CONTEXT + 10} tokens exceed the model's context"):
        client.verify(req)
    assert time.monotonic() - t0 < 2  # refused, not computed


def test_version_mismatch_answers_code_3(worker):
    s = _connect(worker.port)
    s.sendall(struct.pack(">I4sBBH", 8, b"SPFD", wire.PROTOCOL_VERSION + 1, 1, 0))
    code, msg = _read_error(s)
    s.close()
    assert code == ErrorCode.VERSION == 3 and "protocol version" in msg


def test_shared_token(models, draft, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    proc = WorkerProc(models / "w", tmp_path / "w.log", "--auth-token-file", str(token))
    try:
        with pytest.raises(WorkerLost, match="wrong or missing token"):
            RemoteWorker("w", ("127.0.0.1", proc.port), draft)
        with pytest.raises(WorkerLost, match="wrong or missing token"):
            RemoteWorker("w", ("127.0.0.1", proc.port), draft, token="guess")
        ok = RemoteWorker("w", ("127.0.0.1", proc.port), draft, token="s3cret-token")
        reply = ok.verify(VerifyRequest("r", 0, [1, 2, 3], 2, 1.0, Transmission(Mode.TOPK, k=4)))
        assert reply.request_id == "r" and reply.payload
        ok.close()
    finally:
        proc.stop()
