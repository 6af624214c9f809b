"""The SpecFed wire protocol: framed, versioned binary messages over TCP (docs/wire-protocol.md).

Every frame is

    offset  size  field
    0       4     length: u32 big-endian, number of bytes after this field (>= 8)
    4       4     magic b"SPFD"
    8       1     protocol version (PROTOCOL_VERSION)
    9       1     message type (MsgType)
    10      2     reserved, must be 0
    12      ...   body, laid out per message type below (little-endian numbers)

A receiver reads the 4-byte length first and refuses a frame above its cap before reading
the rest into memory. Bodies are parsed with struct / numpy only: never pickle or eval.
Any malformed input raises WireError with what was wrong; the transport closes the
connection after sending an ERROR frame where it can.
"""

from __future__ import annotations

import contextlib
import enum
import math
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specfed.messages import Transmission, VerifyReply, VerifyRequest
from specfed.options import IndexCoding, Mode, Reconstruction, ValueDtype

MAGIC = b"SPFD"
PROTOCOL_VERSION = 3
HEADER = struct.Struct(">I4sBBH")  # length, magic, version, type, reserved
FRAME_OVERHEAD = HEADER.size  # 12 bytes per frame, body excluded
DEFAULT_MAX_FRAME = 64 * 2**20  # bytes; a full fp32 round at V=151,936, gamma=16 is 10.3 MB
MAX_STRING = 4096  # bytes in any length-prefixed string
MAX_TOKENS = 1 << 20  # tokens in one VERIFY
READ_CHUNK = 1 << 20  # bytes read at a time (a body's buffer grows with what arrived)


class WireError(ValueError):
    """A frame or message that breaks the protocol; the message says what and where.

    `code` is the ErrorCode the receiver answers with before closing the connection.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class MsgType(enum.IntEnum):
    HELLO = 1  # server -> worker: who the server is, what vocabulary it expects
    HELLO_OK = 2  # worker -> server: the worker's model and vocabulary
    VERIFY = 3  # server -> worker: one round's tokens and transmission options
    VERIFY_REPLY = 4  # worker -> server: encoded distributions + timing
    END = 5  # server -> worker: a request is over, free its KV cache (no reply)
    ERROR = 6  # either way: code + message; the sender closes the connection after it
    SCORE = 7  # server -> worker: a finished sequence, for fidelity (not counted as traffic)
    SCORE_REPLY = 8  # worker -> server: p_i(x_t) of every generated token


class ErrorCode(enum.IntEnum):
    MALFORMED = 1  # a frame or body that breaks the protocol
    TOO_LARGE = 2  # a frame above the receiver's cap for its type
    VERSION = 3  # another protocol version
    VOCABULARY = 4  # the models' vocabularies differ
    BAD_REQUEST = 5  # a well-formed request the worker cannot serve (e.g. past its context)
    INTERNAL = 6  # the worker failed
    AUTH = 7  # the handshake's shared token is missing or wrong
    BUSY = 8  # the worker serves its maximum number of connections


#: Largest body each message type may announce (bytes), checked from the 12-byte header
#: before any body byte is read: a HELLO is a few strings, an END one string; VERIFY and
#: SCORE carry up to MAX_TOKENS token ids; replies are bounded by the connection's cap.
BODY_CAPS: dict[MsgType, int] = {
    MsgType.HELLO: 4 + 4 * (2 + MAX_STRING),
    MsgType.HELLO_OK: 4 + 4 * (2 + MAX_STRING),
    MsgType.END: 2 + MAX_STRING,
    MsgType.ERROR: 2 + 2 + MAX_STRING,
    MsgType.VERIFY: 2 + MAX_STRING + 64 + 4 * MAX_TOKENS,
    MsgType.SCORE: 2 + MAX_STRING + 16 + 4 * MAX_TOKENS,
}


# --- body helpers --------------------------------------------------------------------------


class _Reader:
    """Sequential reader over a body with bounds checks that raise WireError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = memoryview(data), 0, what

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(
                f"{self.what}: truncated body: needs {n} more bytes at offset {self.pos}, "
                f"has {len(self.data) - self.pos}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def string(self) -> str:
        (n,) = self.unpack("H")
        if n > MAX_STRING:
            raise WireError(f"{self.what}: string of {n} bytes exceeds {MAX_STRING}")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"{self.what}: string is not UTF-8") from exc

    def done(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > MAX_STRING:
        raise WireError(f"string of {len(b)} bytes exceeds {MAX_STRING}")
    return struct.pack("<H", len(b)) + b


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """HELLO / HELLO_OK body: u32 vocab_size, str fingerprint, str model, str role, str token.

    str = u16 byte length + UTF-8 bytes. `token` is the optional shared secret a worker
    started with --auth-token-file demands (empty: none); a HELLO_OK always sends it empty.
    """

    vocab_size: int
    fingerprint: str
    name: str
    role: str = "server"
    token: str = field(default="", repr=False)

    def encode(self) -> bytes:
        return struct.pack("<I", self.vocab_size) + b"".join(
            _string(s) for s in (self.fingerprint, self.name, self.role, self.token)
        )

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        r = _Reader(body, "HELLO")
        (vocab,) = r.unpack("I")
        out = cls(vocab, r.string(), r.string(), r.string(), r.string())
        r.done()
        return out


# VERIFY fixed part (docs/wire-protocol.md): u32 round, u32 start, u16 n_positions,
# f64 temperature, then the transmission: u8 mode code, u32 k, f64 epsilon, u8 value dtype
# code, u8 index bytes, u8 index coding code; u8 reconstruction code, u8 flags (bit 0:
# measure fidelity), u32 n_tokens.
_VERIFY = struct.Struct("<IIHdBIdBBBBBI")
_NO_RECONSTRUCTION = 0  # full transmission: the server reconstructs nothing


def _transmission_fields(t: Transmission) -> tuple[int, int, float, int, int, int]:
    """A Transmission as (mode code, k, epsilon, value dtype code, index bytes, index coding
    code).

    Fields the mode does not use are written as 0 (k, index bytes) and NaN (epsilon); the
    reader takes them from the mode, never from the placeholder."""
    return (
        t.mode.code,
        t.k if t.k is not None else 0,
        t.epsilon if t.epsilon is not None else math.nan,
        t.value_dtype.code,
        t.index_bytes if t.index_bytes is not None else 0,
        t.index_coding.code,
    )


def _transmission(mode: int, k: int, eps: float, vdt: int, ib: int, ic: int) -> Transmission:
    """The inverse of `_transmission_fields`; ValueError on unknown codes or bad values."""
    m = Mode.from_code(mode)
    return Transmission(
        m,
        k=k if m in (Mode.TOPK, Mode.ADAPTIVE) else None,
        epsilon=eps if m == Mode.ADAPTIVE else None,
        value_dtype=ValueDtype.from_code(vdt),
        index_bytes=(ib or None) if m != Mode.FULL else None,
        index_coding=IndexCoding.from_code(ic),
    )


def encode_verify(req: VerifyRequest) -> bytes:
    """VERIFY body: str request_id, the fixed fields above, then n_tokens x u32 token ids."""
    fixed = _VERIFY.pack(
        req.round,
        req.start,
        req.n_positions,
        req.temperature,
        *_transmission_fields(req.transmission),
        req.reconstruction.code if req.reconstruction is not None else _NO_RECONSTRUCTION,
        int(req.measure_fidelity),
        len(req.tokens),
    )
    return _string(req.request_id) + fixed + np.asarray(req.tokens, dtype="<u4").tobytes()


def decode_verify(body: bytes, vocab_size: int) -> VerifyRequest:
    """Parse and validate a VERIFY body (token ids must be < vocab_size)."""
    r = _Reader(body, "VERIFY")
    rid = r.string()
    (rnd, start, n_pos, temp, mode, k, eps, vdt, ib, ic, rec, flags, n_tok) = r.unpack(
        _VERIFY.format.lstrip("<")
    )
    if n_tok > MAX_TOKENS:
        raise WireError(f"VERIFY: {n_tok} tokens exceeds {MAX_TOKENS}")
    tokens = np.frombuffer(r.take(4 * n_tok), dtype="<u4")
    r.done()
    problems = []
    transmission = reconstruction = None
    try:
        transmission = _transmission(mode, k, eps, vdt, ib, ic)
    except ValueError as exc:
        problems.append(f"transmission ({exc})")
    try:
        reconstruction = None if rec == _NO_RECONSTRUCTION else Reconstruction.from_code(rec)
    except ValueError as exc:
        problems.append(str(exc))
    if not (n_tok >= n_pos >= 1):
        problems.append(f"n_positions {n_pos} with {n_tok} tokens")
    if not (math.isfinite(temp) and temp >= 0):
        problems.append(f"temperature {temp}")
    if n_tok and int(tokens.max()) >= vocab_size:
        problems.append(f"token id {int(tokens.max())} >= V={vocab_size}")
    if problems or transmission is None:
        raise WireError("VERIFY: invalid " + ", ".join(problems))
    return VerifyRequest(
        rid,
        start,
        tokens.tolist(),
        n_pos,
        temp,
        transmission,
        reconstruction,
        bool(flags & 1),
        round=rnd,
    )


# u32 round, f64 t_worker_ms, f64 local_l1, f64 t_fidelity_ms, f64 t_recorded_ms,
# u32 payload length
_REPLY = struct.Struct("<IddddI")


def encode_reply(reply: VerifyReply) -> bytes:
    """VERIFY_REPLY body: str request_id, u32 round (the request and round it answers),
    f64 t_worker_ms, f64 local_l1 (NaN = not measured), f64 t_fidelity_ms (measuring it),
    f64 t_recorded_ms (replay: the compute measured at record time; NaN live), u32 n,
    n payload bytes."""
    return (
        _string(reply.request_id)
        + _REPLY.pack(
            reply.round,
            reply.t_worker_ms,
            reply.local_l1,
            reply.t_fidelity_ms,
            reply.t_recorded_ms,
            len(reply.payload),
        )
        + reply.payload
    )


def decode_reply(body: bytes) -> VerifyReply:
    r = _Reader(body, "VERIFY_REPLY")
    rid = r.string()
    rnd, t_ms, l1, t_fid, t_rec, n = r.unpack("IddddI")
    payload = bytes(r.take(n))
    r.done()
    return VerifyReply(
        payload, t_ms, l1, request_id=rid, round=rnd, t_recorded_ms=t_rec, t_fidelity_ms=t_fid
    )


def verify_frame_bytes(request_id: str, n_tokens: int) -> int:
    """Bytes of one VERIFY frame on the wire: 12 header + 2 + len(id) + 40 fixed + 4 per token."""
    return FRAME_OVERHEAD + 2 + len(request_id.encode("utf-8")) + _VERIFY.size + 4 * n_tokens


def reply_frame_bytes(payload_bytes: int, request_id: str) -> int:
    """Bytes of one VERIFY_REPLY frame: 12 header + 2 + len(id) + 40 fixed + the payload."""
    return FRAME_OVERHEAD + 2 + len(request_id.encode("utf-8")) + _REPLY.size + payload_bytes


def read_token(path: Path) -> str:
    """The shared handshake secret from a file (first line, stripped): a file, not a
    command-line argument, so it does not show in the process list. ValueError if empty."""
    try:
        token = (
            path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        )
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise ValueError(f"--auth-token-file {path}: cannot read: {exc}") from exc
    if not token:
        raise ValueError(f"--auth-token-file {path}: the file holds no token")
    if len(token.encode()) > MAX_STRING:
        raise ValueError(f"--auth-token-file {path}: the token exceeds {MAX_STRING} bytes")
    return token


def parse_addr(text: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), with an error that says what was expected."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {text!r} must look like HOST:PORT, e.g. 10.0.0.2:7100")
    return host.strip("[]"), int(port)


_SCORE = struct.Struct("<dII")  # f64 temperature, u32 n_context, u32 n_tokens


def encode_score(
    request_id: str, sequence: Sequence[int], n_context: int, temperature: float
) -> bytes:
    """SCORE body: str request_id, f64 T, u32 n_context (prompt length), u32 n, n x u32 ids.

    The worker returns p_i(x_t | x_<t) at temperature T (T = 0: at T = 1) for every token
    after the first n_context."""
    return (
        _string(request_id)
        + _SCORE.pack(temperature, n_context, len(sequence))
        + np.asarray(sequence, dtype="<u4").tobytes()
    )


def decode_score(body: bytes, vocab_size: int) -> tuple[str, list[int], int, float]:
    """Parse a SCORE body: (request_id, sequence, n_context, temperature)."""
    r = _Reader(body, "SCORE")
    rid = r.string()
    temp, n_ctx, n = r.unpack("dII")
    if n > MAX_TOKENS:
        raise WireError(f"SCORE: {n} tokens exceeds {MAX_TOKENS}")
    seq = np.frombuffer(r.take(4 * n), dtype="<u4")
    r.done()
    if not 1 <= n_ctx < n:
        raise WireError(f"SCORE: n_context {n_ctx} must be in [1, {n})")
    if not (math.isfinite(temp) and temp >= 0):
        raise WireError(f"SCORE: invalid temperature {temp}")
    if int(seq.max()) >= vocab_size:
        raise WireError(f"SCORE: token id {int(seq.max())} >= V={vocab_size}")
    return rid, seq.tolist(), n_ctx, temp


def encode_score_reply(probs: np.ndarray) -> bytes:
    """SCORE_REPLY body: u32 n, n x f64 probabilities."""
    return struct.pack("<I", len(probs)) + np.asarray(probs, dtype="<f8").tobytes()


def decode_score_reply(body: bytes) -> np.ndarray:
    r = _Reader(body, "SCORE_REPLY")
    (n,) = r.unpack("I")
    probs = np.frombuffer(r.take(8 * n), dtype="<f8").copy()
    r.done()
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1 + 1e-6).all()):
        raise WireError("SCORE_REPLY: probabilities outside [0, 1]")
    return probs


def encode_error(code: ErrorCode | int, message: str) -> bytes:
    """ERROR body: u16 code, str message (truncated to MAX_STRING bytes)."""
    msg = message.encode("utf-8")[:MAX_STRING].decode("utf-8", "ignore")
    return struct.pack("<H", int(code)) + _string(msg)


def decode_error(body: bytes) -> tuple[int, str]:
    r = _Reader(body, "ERROR")
    (code,) = r.unpack("H")
    msg = r.string()
    r.done()
    return code, msg


def encode_end(request_id: str) -> bytes:
    """END body: str request_id."""
    return _string(request_id)


def decode_end(body: bytes) -> str:
    r = _Reader(body, "END")
    rid = r.string()
    r.done()
    return rid


# --- frames --------------------------------------------------------------------------------


def frame(msg_type: MsgType, body: bytes) -> bytes:
    """A complete frame: header + body."""
    return HEADER.pack(8 + len(body), MAGIC, PROTOCOL_VERSION, int(msg_type), 0) + body


def parse_header(head: bytes, max_frame: int) -> tuple[MsgType, int]:
    """Validate a 12-byte header; return (type, body length). Raises WireError (with the
    ErrorCode to answer) for a bad magic or version, an unknown type, or a frame above
    `max_frame` or above its type's cap (BODY_CAPS)."""
    if len(head) != HEADER.size:
        raise WireError(f"frame header needs {HEADER.size} bytes, got {len(head)}")
    length, magic, version, mtype, reserved = HEADER.unpack(head)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r} (not a SpecFed peer?)")
    if version != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {version}, this side speaks {PROTOCOL_VERSION}", ErrorCode.VERSION
        )
    if length < 8:
        raise WireError(f"frame length {length} is below the 8-byte minimum")
    if length + 4 > max_frame:
        raise WireError(
            f"frame of {length + 4} bytes exceeds the cap of {max_frame} bytes", ErrorCode.TOO_LARGE
        )
    try:
        kind = MsgType(mtype)
    except ValueError as exc:
        raise WireError(f"unknown message type {mtype}") from exc
    if reserved:
        raise WireError(f"reserved header field is {reserved}, must be 0")
    cap = BODY_CAPS.get(kind)
    if cap is not None and length - 8 > cap:
        raise WireError(
            f"{kind.name} body of {length - 8} bytes exceeds the cap of {cap} bytes for its type",
            ErrorCode.TOO_LARGE,
        )
    return kind, length - 8


def parse_frame(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[MsgType, bytes]:
    """Parse one complete frame held in memory (used by tests and fuzzing)."""
    kind, n = parse_header(data[: HEADER.size], max_frame)
    body = data[HEADER.size :]
    if len(body) != n:
        raise WireError(f"frame says {n} body bytes, has {len(body)}")
    return kind, body


# Linux only (Python lacks the constant before 3.14); SCM_TIMESTAMPNS has the same value.
# Elsewhere 35 may name another option, so none is set there.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35) if sys.platform == "linux" else None
_TIMESPEC = struct.Struct("qq")  # struct timespec on 64-bit Linux


class Connection:
    """A TCP connection carrying frames, counting the bytes it moves (framing included).

    Every blocking call is bounded by the socket timeout; `socket.timeout` propagates.

    With ``rx_timestamps`` (Linux), `recv` also notes when the kernel received the last
    packet of the frame (SO_TIMESTAMPNS), and `arrived` gives it on the time.perf_counter()
    clock: the time the frame was on this host, however late this process got a CPU to read
    it (on a busy host, several ms later).
    """

    def __init__(
        self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME, rx_timestamps: bool = False
    ) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.bytes_sent = 0
        self.bytes_received = 0
        self.timeout = sock.gettimeout()
        self._part = bytearray()  # recv_step: the frame read so far
        self._part_kind: MsgType | None = None  # its type once the header is in
        self._part_len = 0  # its body length once the header is in
        self._rx_ns: int | None = None  # kernel receive time (CLOCK_REALTIME) of the last read
        self.rx_timestamps = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames: no Nagle
            if rx_timestamps and SO_TIMESTAMPNS is not None:
                with contextlib.suppress(OSError):  # refused: `arrived` falls back to now
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                    self.rx_timestamps = True

    def arrived(self) -> float:
        """time.perf_counter() when the kernel received the last packet of the frame `recv`
        returned last (now, without a kernel timestamp: timestamps off, or the first
        packets after a host first enables them)."""
        now = time.perf_counter()
        if self._rx_ns is None:
            return now
        age = (time.time_ns() - self._rx_ns) / 1e9
        return now - min(max(age, 0.0), 1.0)  # a wall-clock step cannot move it far

    def _recv_into(self, buf: memoryview, n: int) -> int:
        if not self.rx_timestamps:
            return self.sock.recv_into(buf, n)
        k, ancillary, _, _ = self.sock.recvmsg_into([buf[:n]], 64)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = _TIMESPEC.unpack_from(data)
                self._rx_ns = sec * 1_000_000_000 + nsec
        return k

    def send(self, msg_type: MsgType, body: bytes) -> int:
        """Send one frame; return its size in bytes."""
        return self.send_frame(frame(msg_type, body))

    def send_frame(self, data: bytes) -> int:
        """Send a frame built by `frame` (framed ahead of time); return its size in bytes."""
        self.sock.sendall(data)
        self.bytes_sent += len(data)
        return len(data)

    def _read_exact(self, n: int, deadline: float | None) -> bytes:
        """n bytes, read as they arrive: memory grows with the bytes received (at most
        READ_CHUNK ahead of them), never with what a peer merely announces."""
        buf = bytearray()
        chunk = memoryview(bytearray(min(n, READ_CHUNK)))
        try:
            while len(buf) < n:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"deadline passed with {len(buf)} of {n} bytes read")
                    self.sock.settimeout(min(left, self.timeout) if self.timeout else left)
                k = self._recv_into(chunk, min(n - len(buf), len(chunk)))
                if k == 0:
                    raise ConnectionError(
                        f"peer closed the connection ({len(buf)} of {n} bytes read)"
                    )
                buf += chunk[:k]
        finally:
            if deadline is not None:
                self.sock.settimeout(self.timeout)  # the idle timeout again for the next read
        self.bytes_received += n
        return bytes(buf)

    def recv(
        self, deadline: float | None = None, frame_timeout_s: float | None = None
    ) -> tuple[MsgType, bytes, int]:
        """Receive one frame: (type, body, frame size in bytes).

        Oversized frames are refused after reading only their 12-byte header. Each socket
        read waits at most the socket timeout; `deadline` (time.monotonic()) bounds the whole
        frame; `frame_timeout_s` bounds it too, counted from its first byte (so a peer that
        trickles one byte at a time cannot hold a connection forever). Raises WireError,
        ConnectionError or TimeoutError.
        """
        self._rx_ns = None
        first = self._read_exact(1, deadline)
        if frame_timeout_s is not None:
            limit = time.monotonic() + frame_timeout_s
            deadline = limit if deadline is None else min(deadline, limit)
        head = first + self._read_exact(HEADER.size - 1, deadline)
        kind, n = parse_header(head, self.max_frame)
        return kind, self._read_exact(n, deadline), HEADER.size + n

    def recv_step(self) -> tuple[MsgType, bytes, int] | None:
        """One read toward the next frame, for a caller that select()s on many connections:
        call it when the socket is readable. Returns (type, body, frame size) once the frame
        is complete, else None (call again when readable). Checks as `recv` does: the header
        first, an oversized frame refused before its body is read, memory growing only with
        the bytes received. Raises WireError or ConnectionError.

        A caller waiting for several large replies must read them this way, a bit of each
        as it comes: reading one whole frame after another stalls the other senders once
        their socket buffers are full, and the transfers that shared the links in parallel
        would cross them one after another."""
        buf = self._part
        if self._part_kind is None:
            want = HEADER.size - len(buf)
        else:
            want = min(self._part_len - (len(buf) - HEADER.size), READ_CHUNK)
        data = self.sock.recv(want) if want > 0 else b""
        if want > 0 and not data:
            raise ConnectionError(f"peer closed the connection ({len(buf)} bytes of a frame read)")
        buf += data
        if self._part_kind is None:
            if len(buf) < HEADER.size:
                return None
            self._part_kind, self._part_len = parse_header(bytes(buf), self.max_frame)
        if len(buf) < HEADER.size + self._part_len:
            return None
        kind, n = self._part_kind, HEADER.size + self._part_len
        body = bytes(memoryview(buf)[HEADER.size :])
        self._part, self._part_kind, self._part_len = bytearray(), None, 0
        self.bytes_received += n
        return kind, body, n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
