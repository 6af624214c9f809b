"""A SpecFed worker: serves one target model to servers over TCP.

    python -m specfed.worker --model qwen2.5-coder-1.5b --listen 127.0.0.1:7100

(listen on a routable address, e.g. 10.0.0.2:7100 inside a Mininet host, only on networks you
control: see --auth-token-file.)

It loads the model once, then serves any number of connections and requests, one KV cache
per (connection, request). Each connection starts with a HELLO handshake (protocol version,
vocabulary fingerprint and size); a server whose vocabulary differs is refused with an error
naming both models. Then each VERIFY frame is answered with one VERIFY_REPLY (the codec's
bytes + the worker's compute time), and a SCORE frame (a finished sequence) with the
probability of each generated token, for fidelity measurements. Model compute is
serialized: one forward pass at a time.

A malformed, truncated, oversized or unknown frame gets an ERROR reply where possible and
its connection is closed; the process keeps serving the others. Protocol: docs/wire-protocol.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import itertools
import logging
import math
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from specfed import wire
from specfed.messages import VerifyReply, VerifyRequest
from specfed.replay import wait_until
from specfed.wire import Connection, ErrorCode, MsgType, WireError, parse_addr, read_token

log = logging.getLogger("specfed.worker")


class Backend(Protocol):
    """What a worker serves: a model in this process (engine.LocalWorker) or a replay of a
    recorded one (replay.ReplayWorker)."""

    model_name: str
    vocab_size: int
    fingerprint: str
    max_context: int

    def verify(self, request: VerifyRequest, arrived: float | None = None) -> VerifyReply:
        """Answer one request; `arrived` is time.perf_counter() when its frame reached this host (a
        replay starts its emulated compute there; a live model times its own)."""
        ...

    def score(self, sequence: Sequence[int], n_context: int, temperature: float) -> np.ndarray: ...

    def end(self, request_id: str) -> None: ...


class WorkerService:
    """The worker's state shared by all connections: the model, a compute lock and limits.

    Args:
        worker: the model and its codec (or its replay).
        max_frame: largest frame accepted, bytes (each message type has a smaller cap too).
        idle_timeout_s: close a connection that sends nothing for this long.
        frame_timeout_s: a frame must arrive whole within this long of its first byte.
        max_connections: connections served at once; more are refused with ERROR BUSY.
        token: the shared secret a HELLO must carry ("" = none required).
        exit_after: fault injection: die abruptly on the (N+1)-th VERIFY.
        delay_ms: fault injection: a slower device; every VERIFY reply waits this long more
            (after the compute, outside the compute lock) and reports it as compute.
    """

    def __init__(
        self,
        worker: Backend,
        max_frame: int,
        idle_timeout_s: float,
        exit_after: int | None = None,
        *,
        frame_timeout_s: float = 60.0,
        max_connections: int = 16,
        token: str = "",
        delay_ms: float = 0.0,
    ) -> None:
        self.worker = worker
        self.exit_after = exit_after
        self.delay_ms = delay_ms
        self.n_verified = 0
        self.max_frame = max_frame
        self.idle_timeout_s = idle_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.token = token
        self.compute = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self._ids = itertools.count(1)

    def _check_fits(self, start: int, n_tokens: int, what: str) -> None:
        """Refuse a request past the model's context (it would hold the compute lock for
        nothing and fail, or worse, run)."""
        limit = self.worker.max_context
        if start + n_tokens > limit:
            raise RequestError(
                f"{what}: {start + n_tokens} tokens exceed the model's context of {limit}"
            )

    def _handshake(self, conn: Connection, peer: str, cid: int) -> bool:
        """Answer the HELLO; False if the peer was refused (an ERROR frame was sent)."""
        kind, body, _ = conn.recv(frame_timeout_s=self.frame_timeout_s)
        if kind != MsgType.HELLO:
            raise WireError(f"expected HELLO first, got {kind.name}")
        hello = wire.Hello.decode(body)
        me = self.worker
        if self.token and not hmac.compare_digest(hello.token.encode(), self.token.encode()):
            log.warning("refused %s: missing or wrong shared token", peer)
            conn.send(MsgType.ERROR, wire.encode_error(ErrorCode.AUTH, "wrong or missing token"))
            return False
        if (hello.fingerprint, hello.vocab_size) != (me.fingerprint, me.vocab_size):
            msg = (
                f"vocabulary mismatch: server model {hello.name!r} (fingerprint "
                f"{hello.fingerprint}, V={hello.vocab_size}) vs worker model {me.model_name!r} "
                f"(fingerprint {me.fingerprint}, V={me.vocab_size})"
            )
            log.warning("refused %s: %s", peer, msg)
            conn.send(MsgType.ERROR, wire.encode_error(ErrorCode.VOCABULARY, msg))
            return False
        conn.send(
            MsgType.HELLO_OK,
            wire.Hello(me.vocab_size, me.fingerprint, me.model_name, "worker").encode(),
        )
        log.info("connection %d from %s (%s)", cid, peer, hello.name)
        return True

    def serve_connection(self, sock: socket.socket, peer: str) -> None:
        """Handshake, then answer frames until the peer closes, errs or idles out."""
        conn = Connection(sock, self.max_frame, rx_timestamps=True)
        sock.settimeout(self.idle_timeout_s)
        if not self.slots.acquire(blocking=False):
            log.warning("refused %s: %d connections already served", peer, self.max_connections)
            with contextlib.suppress(OSError):
                conn.send(
                    MsgType.ERROR,
                    wire.encode_error(
                        ErrorCode.BUSY, f"worker busy: {self.max_connections} connections open"
                    ),
                )
            conn.close()
            return
        cid = next(self._ids)
        open_requests: set[str] = set()
        try:
            if self._handshake(conn, peer, cid):
                self._serve_frames(conn, peer, cid, open_requests)
        except RequestError as exc:
            log.warning("connection %d from %s: %s", cid, peer, exc)
            with contextlib.suppress(OSError):
                conn.send(MsgType.ERROR, wire.encode_error(ErrorCode.BAD_REQUEST, str(exc)))
        except WireError as exc:
            log.warning("connection %d from %s: %s", cid, peer, exc)
            with contextlib.suppress(OSError):
                conn.send(MsgType.ERROR, wire.encode_error(exc.code, str(exc)))
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.info("connection %d from %s ended: %s", cid, peer, exc)
        finally:
            with self.compute:
                for key in open_requests:
                    self.worker.end(key)
            conn.close()
            self.slots.release()

    def _serve_frames(self, conn: Connection, peer: str, cid: int, open_requests: set[str]) -> None:
        me = self.worker
        while True:
            kind, body, _ = conn.recv(frame_timeout_s=self.frame_timeout_s)
            arrived = conn.arrived()  # when the request was on this host, not when we got to it
            if kind == MsgType.VERIFY:
                req = wire.decode_verify(body, me.vocab_size)
                self._check_fits(req.start, len(req.tokens), "VERIFY")
                key = f"{cid}/{req.request_id}"
                open_requests.add(key)
                with self.compute:
                    self.n_verified += 1
                    if self.exit_after is not None and self.n_verified > self.exit_after:
                        log.warning("--exit-after %d reached: exiting now", self.exit_after)
                        os._exit(3)  # a crash, for failure experiments: no goodbye
                    try:
                        reply = replace(
                            me.verify(_rekey(req, key), arrived), request_id=req.request_id
                        )
                    except (ValueError, RuntimeError) as exc:  # ModelError, TraceMismatch
                        raise RequestError(str(exc)) from exc
                    if self.delay_ms > 0:
                        reply = replace(
                            reply,
                            t_worker_ms=reply.t_worker_ms + self.delay_ms,
                            not_before=max(reply.not_before, time.perf_counter())
                            + self.delay_ms / 1e3,
                        )
                    data = wire.frame(MsgType.VERIFY_REPLY, wire.encode_reply(reply))
                    wait_until(reply.not_before)  # replay: the end of the emulated compute
                conn.send_frame(data)
            elif kind == MsgType.SCORE:
                rid, seq, n_ctx, temp = wire.decode_score(body, me.vocab_size)
                self._check_fits(0, len(seq), "SCORE")
                log.debug("score %s: %d tokens", rid, len(seq) - n_ctx)
                with self.compute:
                    try:
                        probs = me.score(seq, n_ctx, temp)
                    except (ValueError, RuntimeError) as exc:  # ModelError, TraceMismatch
                        raise RequestError(str(exc)) from exc
                conn.send(MsgType.SCORE_REPLY, wire.encode_score_reply(probs))
            elif kind == MsgType.END:
                key = f"{cid}/{wire.decode_end(body)}"
                with self.compute:
                    me.end(key)
                open_requests.discard(key)
            elif kind == MsgType.ERROR:
                code, msg = wire.decode_error(body)
                log.warning("peer %s sent error %d: %s", peer, code, msg)
                return
            else:
                raise WireError(f"unexpected {kind.name} from a server")


def _live_backend(args: argparse.Namespace) -> Backend:
    """The model itself (imports torch and transformers)."""
    import torch

    from specfed.engine import LocalWorker
    from specfed.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return LocalWorker(args.model, load_model(args.model, dtype=args.dtype))


def _replay_backend(args: argparse.Namespace) -> Backend:
    """The model's recorded replies (no torch: a light process)."""
    from specfed.replay import ReplayWorker, compute_times, precise_timers
    from specfed.trace import TraceSet

    precise_timers()  # before the connection threads start: they inherit it

    return ReplayWorker(
        args.model, TraceSet.open(args.replay), args.model, compute_times(args.compute, args.speed)
    )


class RequestError(ValueError):
    """A well-formed request the worker cannot serve (answered with ERROR BAD_REQUEST)."""


def _rekey(req: VerifyRequest, key: str) -> VerifyRequest:
    """The same request under a per-connection session key (two servers may reuse ids)."""
    return replace(req, request_id=key)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    service: WorkerService


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.service.serve_connection(
            self.request, f"{self.client_address[0]}:{self.client_address[1]}"
        )


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m specfed.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    ap.add_argument(
        "--model",
        required=True,
        help="target model: bundle name (see `python -m specfed.bundle list`), "
        "HF folder, .gguf file or hub id",
    )
    ap.add_argument("--listen", default="127.0.0.1:7100", help="HOST:PORT to listen on")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=["fp32", "bf16"],
        help="weight dtype; softmax and codecs stay fp32",
    )
    ap.add_argument(
        "--max-frame",
        type=int,
        default=wire.DEFAULT_MAX_FRAME,
        help="largest frame accepted, bytes (default: %(default)s)",
    )
    ap.add_argument(
        "--idle-timeout",
        type=float,
        default=900.0,
        help="close a connection silent for this long, s (default: %(default)s)",
    )
    ap.add_argument(
        "--frame-timeout",
        type=float,
        default=60.0,
        help="a frame must arrive whole within this long of its first byte, s",
    )
    ap.add_argument(
        "--max-connections",
        type=int,
        default=16,
        help="connections served at once; more are refused (ERROR busy)",
    )
    ap.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="file holding a shared secret every server must present in its HELLO (for "
        "workers on networks you do not control; the server takes the same option). Off by "
        "default: inside Mininet the network is the project's own",
    )
    ap.add_argument(
        "--exit-after",
        type=int,
        default=None,
        metavar="N",
        help="fault injection: die abruptly on the (N+1)-th VERIFY, as a crashed "
        "worker would (for worker-loss experiments)",
    )
    ap.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="fault injection: a slower device; every VERIFY reply waits this many ms more "
        "(reported as compute), e.g. for straggler experiments",
    )
    ap.add_argument(
        "--replay",
        type=Path,
        action="append",
        default=[],
        metavar="TRACE",
        help="replay mode: serve --model's recorded replies from these traces (repeatable; "
        "python -m specfed.record makes them) instead of computing; no model is loaded",
    )
    ap.add_argument(
        "--compute",
        default="recorded",
        help="replay: the emulated compute time per VERIFY: 'recorded' (measured when the "
        "trace was recorded) or a device profile (a shipped name or a file: specfed.profile)",
    )
    ap.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="replay: divide every emulated compute time by this (10 = ten times faster)",
    )
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        host, port = parse_addr(args.listen, "--listen")
        token = read_token(args.auth_token_file) if args.auth_token_file else ""
    except ValueError as exc:
        ap.error(str(exc))
    for name in ("idle_timeout", "frame_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value <= 7 * 24 * 3600):
            ap.error(f"--{name.replace('_', '-')}: must be in (0, 604800] s, got {value}")
    if args.max_connections < 1:
        ap.error(f"--max-connections: must be >= 1, got {args.max_connections}")
    if not (math.isfinite(args.delay_ms) and 0 <= args.delay_ms <= 3_600_000):
        ap.error(f"--delay-ms: must be in [0, 3600000], got {args.delay_ms}")
    t0 = time.perf_counter()
    try:
        backend = _replay_backend(args) if args.replay else _live_backend(args)
    except (ValueError, RuntimeError, OSError) as exc:  # ModelError, TraceError
        print(f"specfed.worker: cannot load model: {exc}", file=sys.stderr)
        return 2
    service = WorkerService(
        backend,
        args.max_frame,
        args.idle_timeout,
        args.exit_after,
        frame_timeout_s=args.frame_timeout,
        max_connections=args.max_connections,
        token=token,
        delay_ms=args.delay_ms,
    )
    server = _Server((host, port), _Handler, bind_and_activate=True)
    server.service = service

    def stop(signum: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound_host, bound_port = server.server_address[:2]
    mode = f"replay compute={args.compute} speed={args.speed:g}" if args.replay else "live"
    print(
        f"specfed.worker ready on {bound_host!s}:{bound_port} model={args.model} "
        f"dtype={args.dtype} V={backend.vocab_size} fingerprint={backend.fingerprint} "
        f"pid={os.getpid()} load_s={time.perf_counter() - t0:.1f} mode={mode}",
        flush=True,
    )
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
