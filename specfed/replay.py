"""Replay: serve a recorded point over the real network, waiting emulated compute time.

The server's `ReplayProposer` stands in for the draft model and a worker's `ReplayWorker`
for its model: each looks up the recorded item for the request in front of it by content
(specfed.trace), waits the emulated compute time, and answers exactly what was recorded.
Aggregation and acceptance still run for real on the server, and the tokens each round
emits must equal the recorded ones (`check_round`): a mismatch, or a request the trace does
not hold, is a TraceMismatch naming the request and round, never a silent divergence.

Emulated compute time comes from `ComputeTimes`:
    "recorded"          the compute measured on this machine when the trace was recorded
    a device profile    specfed.profile: a measured cost model (name or file)
each divided by `speed` (speed 10 = a device ten times faster). Nothing here imports torch:
a replay worker is a light process, so dozens fit on a small machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from specfed.messages import VerifyReply, VerifyRequest
from specfed.trace import (
    TraceMismatch,
    TraceSet,
    draft_key,
    q_from_bytes,
    request_content,
    score_key,
    verify_key,
)

__all__ = [
    "ComputeTimes",
    "ProfileTimes",
    "RecordedTimes",
    "ReplayProposer",
    "ReplayWorker",
    "compute_times",
    "precise_timers",
    "wait_until",
]


class ComputeTimes(Protocol):
    """How long an emulated computation takes, ms."""

    @property
    def label(self) -> str: ...

    @property
    def speed(self) -> float: ...

    def draft_ms(self, n_sync: int, context: int, gamma: int, recorded_ms: float) -> float: ...

    def verify_ms(
        self, n_tokens: int, context: int, n_positions: int, recorded_ms: float
    ) -> float: ...


@dataclass(frozen=True)
class RecordedTimes:
    """The compute measured when the trace was recorded, divided by `speed`."""

    speed: float = 1.0
    label: str = "recorded"

    def draft_ms(self, n_sync: int, context: int, gamma: int, recorded_ms: float) -> float:
        return recorded_ms / self.speed

    def verify_ms(self, n_tokens: int, context: int, n_positions: int, recorded_ms: float) -> float:
        return recorded_ms / self.speed


@dataclass(frozen=True)
class ProfileTimes:
    """A device profile's cost model (specfed.profile), divided by `speed`."""

    profile: Any
    speed: float = 1.0

    @property
    def label(self) -> str:
        return str(self.profile.name)

    def draft_ms(self, n_sync: int, context: int, gamma: int, recorded_ms: float) -> float:
        return float(self.profile.draft_ms(n_sync, context, gamma)) / self.speed

    def verify_ms(self, n_tokens: int, context: int, n_positions: int, recorded_ms: float) -> float:
        return float(self.profile.verify_ms(n_tokens, context, n_positions)) / self.speed


def compute_times(spec: str, speed: float = 1.0) -> ComputeTimes:
    """ "recorded", or a device profile (a shipped name or a file), at `speed`."""
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a finite number > 0, got {speed}")
    if spec == "recorded":
        return RecordedTimes(speed)
    from specfed.profile import load_profile

    return ProfileTimes(load_profile(spec), speed)


def precise_timers() -> bool:
    """Wake from sleeps on time in this thread and the threads it starts later: Linux lets a
    sleep overshoot by the thread's timer slack (50 us by default) to batch wake-ups; an
    emulated compute wait wants 1 ns. Returns False where that cannot be set (not Linux)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return int(libc.prctl(29, 1, 0, 0, 0)) == 0  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        return False


class _Lateness:
    """How late this process's sleeps wake, on average (s): an EWMA over the last ~20."""

    mean = 0.0
    CAP = 1e-3  # one wake-up delayed by a busy host must not pull every later one early


def wait_until(deadline: float) -> None:
    """Sleep until time.perf_counter() reaches `deadline`, waking early by the mean lateness
    of this process's earlier sleeps (as the link forwarder does), so emulated compute is
    on time on average: a sleep on a virtual CPU wakes ~0.1-0.2 ms late. No busy wait:
    dozens of replay processes share a few cores."""
    wake = deadline - _Lateness.mean
    left = wake - time.perf_counter()
    if left <= 0:
        return
    time.sleep(left)
    late = time.perf_counter() - wake  # how late this wake-up came
    _Lateness.mean += 0.05 * (min(late, _Lateness.CAP) - _Lateness.mean)


class ReplayProposer:
    """The server's draft, replayed: same interface as models.DraftProposer."""

    def __init__(self, traces: TraceSet, times: ComputeTimes) -> None:
        vocab = traces.vocab
        self.traces = traces
        self.times = times
        self.name = str(vocab["draft"])
        self.vocab_size = int(vocab["vocab_size"])
        self.fingerprint = str(vocab["fingerprint"])
        self.eos_token_ids = frozenset(int(t) for t in vocab["eos_token_ids"])
        self.rounds: dict[str, int] = {}
        self.expected: dict[str, list[int] | None] = {}

    def propose(
        self,
        request_id: str,
        committed: Sequence[int],
        gamma: int,
        temperature: float,
        uniforms: np.ndarray,
    ) -> Any:
        from specfed.models import Draft

        t0 = time.perf_counter()
        rnd = self.rounds.get(request_id, 0)
        name = f"draft/{draft_key(committed, gamma, temperature)}"
        found = self.traces.find(name)
        if found is None:
            raise TraceMismatch(
                f"request {request_id} round {rnd}: the trace holds no draft after these "
                f"{len(committed)} tokens (the trajectory left the recorded one)"
            )
        trace, info = found
        emulated = self.times.draft_ms(int(info["n_sync"]), len(committed), gamma, info["t_ms"])
        q = q_from_bytes(trace.read(name), gamma, self.vocab_size)  # inside the wait
        wait_until(t0 + emulated / 1e3)
        self.expected[request_id] = info.get("emitted")
        return Draft(
            list(info["tokens"]),
            q,
            (time.perf_counter() - t0) * 1e3,
            int(info["n_sync"]),
            t_emulated_ms=emulated,
            t_recorded_ms=float(info["t_ms"]),
        )

    def check_round(self, request_id: str, emitted: Sequence[int]) -> None:
        """After a round: the emitted tokens must be the recorded ones (TraceMismatch)."""
        rnd = self.rounds.get(request_id, 0)
        self.rounds[request_id] = rnd + 1
        expected = self.expected.pop(request_id, None)
        if expected is not None and list(emitted) != list(expected):
            raise TraceMismatch(
                f"request {request_id} round {rnd}: emitted {list(emitted)} but the trace "
                f"recorded {list(expected)} (aggregation or acceptance differs from the record)"
            )

    def end(self, request_id: str) -> None:
        self.rounds.pop(request_id, None)
        self.expected.pop(request_id, None)


class ReplayWorker:
    """A worker's model, replayed from traces: the backend of `specfed.worker --replay`.

    Answers VERIFY and SCORE with the recorded bytes of its model's stream. A VERIFY reply
    comes back at once with `not_before` = the end of the emulated compute, counted from
    `arrived`: time.perf_counter() when the kernel received the request's last packet, so
    waiting for a CPU on a busy host does not delay the reply, and decoding the request
    and finding its reply are part of the emulated compute, as they are part of a real
    device's. The worker service frames the reply, waits until `not_before`, then sends
    it (after the wait only a send is left)."""

    def __init__(self, name: str, traces: TraceSet, stream: str, times: ComputeTimes) -> None:
        streams = traces.traces[0].meta.get("streams", {})
        if stream not in streams:
            raise TraceMismatch(
                f"the traces hold no stream for model {stream!r} (they hold "
                f"{', '.join(streams) or 'none'})"
            )
        info = streams[stream]
        self.name = name
        self.model_name = stream
        self.traces = traces
        self.times = times
        self.vocab_size = int(info["vocab_size"])
        self.fingerprint = str(info["fingerprint"])
        self.max_context = int(info["max_context"])
        self.held: dict[str, list[int]] = {}

    def verify(self, request: VerifyRequest, arrived: float | None = None) -> VerifyReply:
        t0 = time.perf_counter() if arrived is None else arrived
        content = request_content(request, self.held.get(request.request_id, []))
        key = verify_key(
            content, request.n_positions, request.temperature, request.transmission,
            request.reconstruction, request.measure_fidelity,
        )  # fmt: skip
        name = f"reply/{self.model_name}/{key}"
        found = self.traces.find(name)
        if found is None:
            raise TraceMismatch(
                f"request {request.request_id} round {request.round}: the trace holds no reply "
                f"of {self.model_name} for this content ({len(content)} tokens)"
            )
        trace, info = found
        self.held[request.request_id] = content
        emulated = self.times.verify_ms(
            len(request.tokens), len(content), request.n_positions, float(info["t_ms"])
        )
        payload = trace.read(name)
        l1 = info.get("local_l1")
        return VerifyReply(
            payload,
            emulated,
            math.nan if l1 is None else float(l1),
            request_id=request.request_id,
            round=request.round,
            t_recorded_ms=float(info["t_ms"]),
            bytes_up=len(payload),
            bytes_down=4 * len(request.tokens),
            not_before=t0 + emulated / 1e3,
        )

    def score(self, sequence: Sequence[int], n_context: int, temperature: float) -> np.ndarray:
        name = f"score/{self.model_name}/{score_key(sequence, n_context, temperature)}"
        found = self.traces.find(name)
        if found is None:
            raise TraceMismatch(f"the trace holds no SCORE of {self.model_name} for this sequence")
        trace, _ = found
        return np.frombuffer(trace.read(name), dtype="<f8").copy()

    def end(self, request_id: str) -> None:
        self.held.pop(request_id, None)
