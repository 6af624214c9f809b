"""Traces: a point generated once in process, to be replayed over the emulated network.

Speculative decoding over the network is deterministic given the seeds, the models and the
transmission settings: the network changes only *when* replies arrive, not *what* they hold.
So a point is recorded once (`record_points`: the same FederatedGenerator, seeds and codecs
as a live run, workers in process) and replayed by the server and worker programs
(`specfed.replay`), which send the recorded bytes and wait an emulated compute time.

A trace is content-addressed. Every recorded item is stored under a key computed from what
the replaying side knows when it needs it:

    draft/<key>    the server's draft for a committed sequence (tokens, q rows, n_sync,
                   measured time, and the tokens the round then emitted)
    reply/<model>/<key>   a worker's exact encoded reply for a request content (the full
                   sequence it holds, positions, T, transmission, reconstruction, fidelity
                   flag), with its local L1 and measured compute time
    score/<model>/<key>   a worker's SCORE answer for a finished sequence

so a replay can never serve content that does not belong to the request in front of it: a
trajectory that leaves the trace (a lost worker, a policy that depends on timing, a wrong
trace) finds no key and fails with a clear error. Workers that run the same model share one
stream, so their identical replies are computed and stored once (32 workers over two models
cost two models' compute in the record).

File: one zip per point (`<cache>/traces/<key>.zip`, deflate level 1), `meta.json` first
(format, what it depends on, vocabulary, prompts, the requests and their emitted tokens,
sizes, measured times, provenance). The cache key hashes everything a trace depends on
(`trace_key`), so a bandwidth sweep records once and every later run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from specfed.messages import Transmission, VerifyReply, VerifyRequest
from specfed.options import Reconstruction

__all__ = [
    "TRACE_FORMAT",
    "Trace",
    "TraceError",
    "TraceMismatch",
    "draft_key",
    "score_key",
    "trace_dir",
    "trace_key",
    "verify_key",
]

TRACE_FORMAT = 1
"""Version of the trace layout; part of every trace key."""


class TraceError(RuntimeError):
    """A trace is missing, corrupted or not the one this run needs; the message says which."""


class TraceMismatch(TraceError):
    """The live trajectory left the trace: no recorded item for this request content, or
    the tokens emitted differ from the recorded ones. Names the request and round."""


def _h(*parts: Any, tokens: Sequence[int] = ()) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    h.update(np.asarray(tokens, dtype="<u4").tobytes())
    return h.hexdigest()[:32]


def draft_key(committed: Sequence[int], gamma: int, temperature: float) -> str:
    """Key of the server's draft after `committed` (prompt + emitted tokens)."""
    return _h("draft", gamma, repr(float(temperature)), tokens=committed)


def verify_key(
    sequence: Sequence[int],
    n_positions: int,
    temperature: float,
    transmission: Transmission,
    reconstruction: Reconstruction | None,
    measure_fidelity: bool,
) -> str:
    """Key of a worker's reply: the whole sequence it holds after the request's tokens, and
    everything else that shapes the reply's bytes."""
    rec = reconstruction.value if reconstruction is not None else None
    return _h(
        "verify",
        n_positions,
        repr(float(temperature)),
        transmission.columns(),
        rec,
        bool(measure_fidelity),
        tokens=sequence,
    )


def score_key(sequence: Sequence[int], n_context: int, temperature: float) -> str:
    """Key of a worker's SCORE answer."""
    return _h("score", n_context, repr(float(temperature)), tokens=sequence)


def trace_key(depends_on: Mapping[str, Any]) -> str:
    """The cache key of a trace: a hash of everything it depends on (a JSON mapping)."""
    return _h("trace", TRACE_FORMAT, dict(depends_on))


def trace_dir() -> Path:
    """Where traces are cached: <SPECFED_CACHE>/traces (outside git)."""
    from specfed.bundle import cache_dir

    return cache_dir() / "traces"


# ----------------------------------------------------------------------------- reading


@dataclass
class Trace:
    """A recorded point, opened for replay (members are read lazily, thread-safe).

    `meta` holds the metadata; `index` maps member names to their small records (times,
    L1, n_sync, emitted tokens). Payloads and q rows are read on demand.
    """

    path: Path
    meta: dict[str, Any]
    index: dict[str, dict[str, Any]]
    _zip: zipfile.ZipFile = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Trace:
        """Open a trace file; TraceError naming it if it is unreadable or corrupted."""
        path = Path(path)
        try:
            zf = zipfile.ZipFile(path)
            meta = json.loads(zf.read("meta.json"))
            index = json.loads(zf.read("index.json"))
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise TraceError(f"trace {path}: unreadable or corrupted ({exc})") from exc
        if meta.get("format") != TRACE_FORMAT:
            raise TraceError(
                f"trace {path}: format {meta.get('format')!r}, this code reads {TRACE_FORMAT}"
            )
        return cls(path, meta, index, zf)

    def close(self) -> None:
        self._zip.close()

    def has(self, name: str) -> bool:
        return name in self.index

    def read(self, name: str) -> bytes:
        """A member's bytes; TraceError if absent or corrupted (CRC checked by zipfile)."""
        if name not in self.index:
            raise TraceError(f"trace {self.path}: no member {name}")
        with self._lock:
            try:
                return self._zip.read(name)
            except (OSError, zipfile.BadZipFile, KeyError) as exc:
                raise TraceError(f"trace {self.path}: member {name} corrupted ({exc})") from exc

    @property
    def vocab(self) -> dict[str, Any]:
        """{"vocab_size", "fingerprint", "eos_token_ids", "draft"} of the recorded draft."""
        return dict(self.meta["vocab"])


class TraceSet:
    """Several traces (the points of one group) looked up as one content-addressed store.

    Keys are content hashes, so two traces holding the same key hold the same item."""

    def __init__(self, traces: Sequence[Trace]) -> None:
        if not traces:
            raise TraceError("no trace given")
        self.traces = list(traces)
        first = self.traces[0].vocab
        for t in self.traces[1:]:
            if (t.vocab["vocab_size"], t.vocab["fingerprint"]) != (
                first["vocab_size"],
                first["fingerprint"],
            ):
                raise TraceError(f"traces {self.traces[0].path} and {t.path}: vocabularies differ")

    @classmethod
    def open(cls, paths: Iterable[str | Path]) -> TraceSet:
        return cls([Trace.open(p) for p in paths])

    @property
    def vocab(self) -> dict[str, Any]:
        return self.traces[0].vocab

    def find(self, name: str) -> tuple[Trace, dict[str, Any]] | None:
        for t in self.traces:
            if name in t.index:
                return t, t.index[name]
        return None

    def close(self) -> None:
        for t in self.traces:
            t.close()


# ----------------------------------------------------------------------------- writing


class TraceWriter:
    """Collects a point's items and writes them as one zip (atomically: temp + rename)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.index: dict[str, dict[str, Any]] = {}
        self._members: dict[str, bytes] = {}
        self.bytes_by_kind: dict[str, int] = {"draft": 0, "reply": 0, "score": 0}

    def add(self, name: str, data: bytes, info: dict[str, Any]) -> None:
        """Store a member once (the same key again is the same content: ignored)."""
        if name in self.index:
            return
        self.index[name] = info
        self._members[name] = data
        self.bytes_by_kind[name.split("/", 1)[0]] += len(data)

    def close(self) -> int:
        """Write the zip; return its size in bytes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{time.time_ns()}.tmp")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                zf.writestr("meta.json", json.dumps(self.meta, indent=1, default=str))
                zf.writestr("index.json", json.dumps(self.index))
                for name, data in self._members.items():
                    zf.writestr(name, data)
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self.path.stat().st_size


def q_bytes(q: np.ndarray) -> bytes:
    """Draft rows [gamma, V] as little-endian float32 bytes (exact)."""
    return np.ascontiguousarray(q, dtype="<f4").tobytes()


def q_from_bytes(data: bytes, gamma: int, vocab_size: int) -> np.ndarray:
    q = np.frombuffer(data, dtype="<f4")
    if q.size != gamma * vocab_size:
        raise TraceError(f"draft rows hold {q.size} values, expected {gamma} x {vocab_size}")
    return q.reshape(gamma, vocab_size)


def reply_info(reply: VerifyReply) -> dict[str, Any]:
    return {
        "t_ms": reply.t_worker_ms,
        "local_l1": None if math.isnan(reply.local_l1) else reply.local_l1,
    }


def score_bytes(probs: np.ndarray) -> bytes:
    return np.asarray(probs, dtype="<f8").tobytes()


def request_content(request: VerifyRequest, held: Sequence[int]) -> list[int]:
    """The whole sequence a worker holds after `request`: its previous sequence cut at
    `start`, plus the request's tokens."""
    if request.start > len(held):
        raise TraceMismatch(
            f"request {request.request_id} round {request.round}: starts at {request.start} "
            f"but only {len(held)} tokens were sent before"
        )
    return [*held[: request.start], *request.tokens]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """python -m specfed.trace list | info TRACE...: what the trace cache holds."""
    import argparse
    import sys

    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m specfed.trace",
        description="List the trace cache, or describe traces (point, requests, sizes).",
    )
    add_version(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every trace in the cache ($SPECFED_CACHE/traces)")
    info = sub.add_parser("info", help="one JSON object per trace")
    info.add_argument("traces", nargs="+", type=Path)
    args = ap.parse_args(argv)
    paths = sorted(trace_dir().glob("*.zip")) if args.cmd == "list" else args.traces
    status = 0
    for path in paths:
        try:
            t = Trace.open(path)
        except TraceError as exc:
            print(f"specfed.trace: {exc}", file=sys.stderr)
            status = 2
            continue
        m = t.meta
        print(
            json.dumps(
                {
                    "trace": str(path),
                    "bytes": path.stat().st_size,
                    "point": m["point"],
                    "draft": m["vocab"]["draft"],
                    "workers": m["workers"],
                    "requests": len(m["requests"]),
                    "tokens": [len(r["tokens"]) for r in m["requests"]],
                    "stored_bytes": m.get("bytes"),
                    "stored_bytes_per_request": m.get("bytes_per_request"),
                    "created_utc": m.get("created_utc"),
                }
            )
        )
        t.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
