"""The server's side of a worker connection: a WorkerClient that talks the wire protocol."""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ClassVar, TypeVar

import numpy as np

from specfed import wire
from specfed.engine import WorkerLost
from specfed.messages import VerifyReply, VerifyRequest
from specfed.models import HasVocabulary, ModelError
from specfed.wire import Connection, ErrorCode, MsgType, WireError

T = TypeVar("T")


class RemoteWorker:
    """A worker process reached over TCP (implements engine.WorkerClient).

    Args:
        name: the worker's name in records (w1, w2, ...).
        addr: (host, port).
        server_model: the draft (or reference) model, announced in the HELLO handshake.
        connect_timeout_s / read_timeout_s: bounds on connecting and on each socket read.
        round_timeout_s: bound on one whole VERIFY exchange.
        token: the shared secret of a worker started with --auth-token-file ("" = none).
    Raises ModelError when the vocabularies differ (either side may notice), WorkerLost when
    the worker cannot be reached, refuses the handshake or breaks the protocol.
    """

    _last_encoded: ClassVar[tuple[VerifyRequest, bytes] | None] = None
    """The last VERIFY frame built, with its request (kept alive, so `is` is safe)."""

    def __init__(
        self,
        name: str,
        addr: tuple[str, int],
        server_model: HasVocabulary,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
        round_timeout_s: float = 300.0,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        token: str = "",
    ) -> None:
        self.name = name
        self.addr = addr
        self.round_timeout_s = round_timeout_s
        try:
            sock = socket.create_connection(addr, timeout=connect_timeout_s)
        except OSError as exc:
            raise WorkerLost(name, f"cannot connect to {addr[0]}:{addr[1]}: {exc}") from exc
        sock.settimeout(read_timeout_s)
        self.conn = Connection(sock, max_frame)
        hello = wire.Hello(
            server_model.vocab_size, server_model.fingerprint, server_model.name, token=token
        )
        try:
            self.conn.send(MsgType.HELLO, hello.encode())
            kind, body, _ = self.conn.recv(time.monotonic() + read_timeout_s)
            if kind == MsgType.ERROR:
                code, msg = wire.decode_error(body)
                if code == ErrorCode.VOCABULARY:
                    raise ModelError(f"worker {name} at {addr[0]}:{addr[1]} refused: {msg}")
                raise WorkerLost(name, f"refused the handshake: {msg}")
            if kind != MsgType.HELLO_OK:
                raise WorkerLost(name, f"answered HELLO with {kind.name}")
            peer = wire.Hello.decode(body)
            if (peer.fingerprint, peer.vocab_size) != (hello.fingerprint, hello.vocab_size):
                raise ModelError(
                    f"worker {name} at {addr[0]}:{addr[1]} answered with another vocabulary: "
                    f"model {peer.name!r} (fingerprint {peer.fingerprint}, V={peer.vocab_size}) "
                    f"vs server model {server_model.name!r} (fingerprint {hello.fingerprint}, "
                    f"V={hello.vocab_size})"
                )
        except (OSError, WireError) as exc:
            self.conn.close()
            raise WorkerLost(name, f"handshake with {addr[0]}:{addr[1]} failed: {exc}") from exc
        except BaseException:
            self.conn.close()
            raise
        self.model_name = peer.name
        self.vocab_size = peer.vocab_size
        self.fingerprint = peer.fingerprint
        self._pending: tuple[int, float] | None = None  # (bytes sent, ms) of a sent VERIFY
        self._call_deadline = math.inf

    def _exchange(
        self, kind: MsgType, body: bytes, expect: MsgType, decode: Callable[[bytes], T]
    ) -> tuple[T, int, int, float]:
        """Send one frame and decode the reply of type `expect`.

        Returns (decoded reply, bytes sent, bytes received, ms spent sending). Any failure
        (timeout, reset, protocol error, an ERROR frame from the worker) closes the
        connection and raises WorkerLost.
        """
        try:
            t0 = time.perf_counter()
            deadline = time.monotonic() + self.round_timeout_s
            n_down = self.conn.send(kind, body)
            t_send_ms = (time.perf_counter() - t0) * 1e3
        except OSError as exc:
            self.close()
            raise WorkerLost(self.name, f"{type(exc).__name__}: {exc}") from exc
        decoded, n_up = self._read(expect, decode, deadline)
        return decoded, n_down, n_up, t_send_ms

    def _read(
        self, expect: MsgType, decode: Callable[[bytes], T], deadline: float
    ) -> tuple[T, int]:
        """Read and decode one reply of type `expect` by `deadline` (time.monotonic());
        returns (decoded, frame bytes). Any failure closes the connection (WorkerLost)."""
        try:
            got, reply, n_up = self.conn.recv(deadline)
            _check_kind(got, reply, expect)
            return decode(reply), n_up
        except (OSError, WireError) as exc:  # OSError includes timeouts and resets
            self.close()
            raise WorkerLost(self.name, f"{type(exc).__name__}: {exc}") from exc

    def verify(self, request: VerifyRequest) -> VerifyReply:
        """One VERIFY exchange; bytes_up/bytes_down are whole frames as sent and received."""
        self.send_verify(request)
        return self.read_verify()

    # The two halves of verify (engine.SplitCall): a server waiting for several workers
    # sends every request, then reads each reply when its socket is readable.

    def send_verify(self, request: VerifyRequest) -> None:
        """Send a VERIFY request; `read_verify` reads its reply. The same request object
        sent to several workers (the engine shares one between workers asked the same) is
        encoded once."""
        try:
            t0 = time.perf_counter()
            self._call_deadline = time.monotonic() + self.round_timeout_s
            last = RemoteWorker._last_encoded
            if last is None or last[0] is not request:
                last = RemoteWorker._last_encoded = (request, wire.frame(
                    MsgType.VERIFY, wire.encode_verify(request)
                ))  # fmt: skip
            n_down = self.conn.send_frame(last[1])
            self._pending = (n_down, (time.perf_counter() - t0) * 1e3)
        except OSError as exc:
            self.close()
            raise WorkerLost(self.name, f"{type(exc).__name__}: {exc}") from exc

    def read_verify(self) -> VerifyReply:
        """The reply to the request sent last (blocks until it is whole)."""
        if self._pending is None:
            raise RuntimeError("read_verify without a request sent")
        (n_down, t_send_ms), self._pending = self._pending, None
        reply, n_up = self._read(MsgType.VERIFY_REPLY, wire.decode_reply, self._call_deadline)
        return replace(reply, bytes_up=n_up, bytes_down=n_down, t_send_ms=t_send_ms)

    def read_step(self) -> VerifyReply | None:
        """When the connection is readable: read what arrived of the reply to the request
        sent last; the reply once whole, else None. Past `call_deadline` the worker is lost
        (WorkerLost, TimeoutError), whatever has arrived."""
        if self._pending is None:
            raise RuntimeError("read_step without a request sent")
        try:
            if time.monotonic() >= self._call_deadline:
                raise TimeoutError(
                    f"no whole reply within the round timeout ({self.round_timeout_s:g} s)"
                )
            got = self.conn.recv_step()
            if got is None:
                return None
            kind, body, n_up = got
            _check_kind(kind, body, MsgType.VERIFY_REPLY)
            reply = wire.decode_reply(body)
        except (OSError, WireError) as exc:  # OSError includes timeouts and resets
            self.close()
            raise WorkerLost(self.name, f"{type(exc).__name__}: {exc}") from exc
        (n_down, t_send_ms), self._pending = self._pending, None
        return replace(reply, bytes_up=n_up, bytes_down=n_down, t_send_ms=t_send_ms)

    @property
    def call_deadline(self) -> float:
        """time.monotonic() by which the pending reply must be read (round_timeout_s)."""
        return self._call_deadline

    def fileno(self) -> int:
        return self.conn.sock.fileno()

    def score(self, sequence: Sequence[int], n_context: int, temperature: float) -> np.ndarray:
        """p_i(x_t) of the generated tokens, from the worker (a SCORE exchange)."""
        body = wire.encode_score("score", sequence, n_context, temperature)
        probs, _, _, _ = self._exchange(
            MsgType.SCORE, body, MsgType.SCORE_REPLY, wire.decode_score_reply
        )
        if len(probs) != len(sequence) - n_context:
            self.close()
            raise WorkerLost(
                self.name,
                f"SCORE_REPLY holds {len(probs)} probabilities for "
                f"{len(sequence) - n_context} generated tokens",
            )
        return probs

    def end(self, request_id: str) -> None:
        """Tell the worker to free the request's KV cache (best effort, no reply)."""
        with contextlib.suppress(OSError):
            self.conn.send(MsgType.END, wire.encode_end(request_id))

    def close(self) -> None:
        self.conn.close()


def _check_kind(got: MsgType, body: bytes, expect: MsgType) -> None:
    """A reply frame must be of type `expect`; an ERROR frame says why it is not (WireError
    either way)."""
    if got == MsgType.ERROR:
        code, msg = wire.decode_error(body)
        raise WireError(f"worker error {code}: {msg}")
    if got != expect:
        raise WireError(f"expected {expect.name}, got {got.name}")
