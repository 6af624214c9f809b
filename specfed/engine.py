"""The federated speculative-decoding loop (server side) and the worker interface.

Notation: p_i worker i's target distribution, w_i its weight, p = sum_i w_i p_i the federated
target, q the draft, gamma drafted tokens per round, T temperature, V vocabulary size.

One round (ARCHITECTURE.md): draft gamma tokens from q; send each worker the tokens after its
committed prefix; each worker runs one forward pass and returns p_i^(1..gamma+1) encoded by
its transmission codec; the server decodes, reconstructs and aggregates p_hat, and runs
speculative acceptance. gamma = 0 is federated autoregressive decoding (no draft model).

`FederatedGenerator` talks to workers only through `WorkerClient.verify`, so the same loop
runs with in-process workers (`LocalWorker`, here) and with remote ones over TCP.

Policies (specfed.policies) decide per round: gamma (`GammaPolicy`), each worker's K
(`KPolicy`) and when the replies are enough (`Aggregation`); their defaults (fixed gamma,
one transmission per worker, wait for all) are the paper's scheme.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from specfed.codecs import Payload, decode_any
from specfed.messages import BadReply, Transmission, VerifyReply, VerifyRequest, check_reply
from specfed.metrics import alpha as alpha_fn
from specfed.models import (
    Draft,
    DraftProposer,
    HasVocabulary,
    LoadedModel,
    Verifier,
    check_same_vocabulary,
    common_prefix,
)
from specfed.options import LossPolicy, Reconstruction, check_weights
from specfed.policies import (
    AggregationSpec,
    GammaPolicy,
    GammaSpec,
    KAuto,
    RoundOutcome,
    make_aggregation,
    make_gamma_policy,
    make_k_policy,
)
from specfed.reconstruct import Aggregate, reconstruct
from specfed.sampling import RoundUniforms, speculative_accept

if TYPE_CHECKING:
    from specfed.points import Point


class WorkerLost(RuntimeError):
    """A worker disconnected, timed out or failed mid-request."""

    def __init__(self, worker: str, reason: str) -> None:
        super().__init__(f"worker {worker!r} lost: {reason}")
        self.worker = worker
        self.reason = reason


class Proposer(Protocol):
    """The server's drafting side: a draft model (models.DraftProposer) or a replay of a
    recorded one (specfed.replay.ReplayProposer). Names the vocabulary it drafts in."""

    name: str
    vocab_size: int
    fingerprint: str
    eos_token_ids: frozenset[int]

    def propose(
        self,
        request_id: str,
        committed: Sequence[int],
        gamma: int,
        temperature: float,
        uniforms: np.ndarray,
    ) -> Draft: ...

    def end(self, request_id: str) -> None: ...


class WorkerClient(Protocol):
    """The server's view of a worker; in-process or remote."""

    name: str
    model_name: str
    vocab_size: int
    fingerprint: str

    def verify(self, request: VerifyRequest) -> VerifyReply: ...

    def end(self, request_id: str) -> None: ...

    def score(self, sequence: Sequence[int], n_context: int, temperature: float) -> np.ndarray:
        """p_i(x_t | x_<t) [len(sequence) - n_context] float64 for the generated tokens."""
        ...


@runtime_checkable
class SplitCall(Protocol):
    """A worker whose VERIFY call splits in two (specfed.client.RemoteWorker): send the
    request, then read the reply as its connection (`fileno`) becomes readable. A round
    that waits for all such workers sends every request from the server's thread and reads
    the replies as they come, a bit of each at a time, in one select() loop: no thread
    hand-offs on the critical path, and large replies still arrive side by side."""

    def send_verify(self, request: VerifyRequest) -> None:
        """Send the request (WorkerLost on failure)."""
        ...

    def read_step(self) -> VerifyReply | None:
        """Called when `fileno` is readable (or the deadline passed): read what arrived of
        the reply to the request sent last; the reply once whole, else None (WorkerLost on
        failure, or once `call_deadline` has passed)."""
        ...

    def fileno(self) -> int: ...

    @property
    def call_deadline(self) -> float:
        """time.monotonic() by which the pending call's reply must be read."""
        ...


def local_l1(p: np.ndarray, payload: Payload, method: Reconstruction | None) -> float:
    """Mean over positions of ||p - p_hat||_1 for one worker, from its exact p [P, V].

    Draft-guided needs the draft's q, which a worker does not have: NaN.
    """
    if payload.dense is not None:
        return float(np.abs(p - payload.dense).sum(axis=1).mean())
    if method == Reconstruction.DRAFT_GUIDED:
        return math.nan
    if method in (None, Reconstruction.RENORMALIZE):  # Lemma 1: exactly 2 eps
        return float(np.mean(2.0 * payload.eps))
    if method == Reconstruction.RESIDUAL_MASS:
        return _residual_mass_l1(p, payload)
    p_hat = reconstruct(payload, method)
    return float(np.abs(p.astype(np.float64) - p_hat).sum(axis=1).mean())


def _residual_mass_l1(p: np.ndarray, payload: Payload) -> float:
    """||p - p_hat||_1 for residual-mass (p_hat = the sent values on S, eps / (V - K) on
    the complement), without building p_hat: one pass over V per position.

    sum_{v not in S} |p(v) - fill| = sum_v |p(v) - fill| - sum_{v in S} |p(v) - fill|.
    """
    vocab = payload.vocab_size
    total = 0.0
    for j, (idx, val) in enumerate(zip(payload.indices, payload.values, strict=True)):
        row = p[j].astype(np.float64)
        kept = row[idx]
        l1 = float(np.abs(kept - val).sum())
        if vocab > len(idx):
            fill = float(payload.eps[j]) / (vocab - len(idx))
            l1 += float(np.abs(row - fill).sum() - np.abs(kept - fill).sum())
        total += l1
    return total / payload.n_positions


class LocalWorker:
    """A worker in this process: a Verifier plus its codec. Also the body of the TCP worker."""

    def __init__(self, name: str, lm: LoadedModel) -> None:
        self.name = name
        self.lm = lm
        self.model_name = lm.name
        self.vocab_size = lm.vocab_size
        self.fingerprint = lm.fingerprint
        self.verifier = Verifier(lm)
        self.max_context = lm.max_context

    def verify(self, request: VerifyRequest, arrived: float | None = None) -> VerifyReply:
        t0 = time.perf_counter()  # the model's own compute, whenever the request arrived
        p = self.verifier.verify(
            request.request_id,
            request.start,
            request.tokens,
            request.n_positions,
            request.temperature,
        )
        payload = request.transmission.codec().encode(p)
        t1 = time.perf_counter()
        l1 = math.nan
        if request.measure_fidelity:
            l1 = local_l1(p, decode_any(payload), request.reconstruction)
        return VerifyReply(
            payload,
            (t1 - t0) * 1e3,
            l1,
            request_id=request.request_id,
            round=request.round,
            t_fidelity_ms=(time.perf_counter() - t1) * 1e3,
            bytes_up=len(payload),
            bytes_down=4 * len(request.tokens),
        )

    def end(self, request_id: str) -> None:
        self.verifier.end(request_id)

    def score(self, sequence: Sequence[int], n_context: int, temperature: float) -> np.ndarray:
        """One forward pass over the whole sequence, on a fresh cache."""
        return score_sequence(self.lm, sequence, n_context, temperature)


def score_sequence(
    lm: LoadedModel, sequence: Sequence[int], n_context: int, temperature: float
) -> np.ndarray:
    """p(x_t | x_<t) at temperature T (T = 0: T = 1) for t >= n_context, float64 [n]."""
    from specfed.models import KVSession, probabilities

    n = len(sequence) - n_context
    if n < 1 or n_context < 1:
        raise ValueError(f"score needs 1 <= n_context < len(sequence), got {n_context}")
    p = probabilities(KVSession(lm).sync(list(sequence[:-1]), n), temperature)
    return p[np.arange(n), np.asarray(sequence[n_context:])].astype(np.float64)


@dataclass
class WorkerRound:
    """One worker's part of one round (one row of the rounds table).

    transmission, k, epsilon, value_dtype, index_bytes and index_coding are the worker's own
    transmission (index_bytes as sent: the width chosen for V when the transmission left it
    open; None for full and the non-fixed index codings).
    Times in ms: t_call_ms from the start of sending the request to the end of reading the
    reply; t_fidelity_ms the worker's time measuring local_l1 (testbed overhead); t_net_ms =
    t_call_ms - t_worker_ms - t_fidelity_ms (network, framing and queueing); t_decode_ms
    checking the reply against its request and decoding its payload (server overhead).
    dropped: the reply came after the round closed (quorum / deadline aggregation) and was
    not aggregated; lateness_ms how long after the close it arrived. up_mbit_est: the
    upload goodput (Mbit/s) the K policy assumed for this worker this round (NaN: fixed K).
    """

    worker: str
    transmission: str
    k: int | None
    epsilon: float | None
    value_dtype: str
    index_bytes: int | None
    index_coding: str
    k_mean: float
    bytes_up: int
    bytes_down: int
    n_tokens: int
    t_worker_ms: float
    t_worker_recorded_ms: float
    t_send_ms: float
    t_call_ms: float
    t_fidelity_ms: float
    t_net_ms: float
    t_decode_ms: float
    eps_mean: float
    local_l1: float
    dropped: bool = False
    lateness_ms: float = math.nan
    up_mbit_est: float = math.nan


@dataclass
class RoundRecord:
    """One round: drafting, verification by every worker, aggregation and acceptance.

    Times in ms. t_start_s is the round's start on the monotonic clock (seconds; shared by
    every process and Mininet host of a machine, so rounds line up with link traces);
    t_round_ms runs from the start of drafting to the emitted tokens;
    t_aggregate_ms covers reconstruct + aggregate + accept (decoding is per worker:
    WorkerRound.t_decode_ms). Computing the metrics
    (alpha, eps) and writing records happen after the clock stops, and are excluded from a
    request's ttft and e2e times too. alpha is the mean over draft positions of
    alpha(q, p_hat) = sum_v min(q(v), p_hat(v)). gamma is the round's gamma as the gamma
    policy chose it (n_drafted is less in a request's last round); n_busy counts the workers
    not asked this round because they were still answering an earlier one (whose reply was
    dropped). `workers` holds the aggregated replies and the dropped ones (dropped = True).
    """

    round: int
    gamma: int
    t_start_s: float
    context_len: int
    draft_new_tokens: int
    t_draft_emulated_ms: float
    t_draft_recorded_ms: float
    n_drafted: int
    n_accepted: int
    n_emitted: int
    t_draft_ms: float
    t_verify_ms: float
    t_aggregate_ms: float
    t_round_ms: float
    alpha: float
    workers: list[WorkerRound]
    emitted: list[int] = field(default_factory=list)
    """the tokens this round emitted (not a table column)"""
    n_busy: int = 0


@dataclass
class GenerationResult:
    """One request: the generated tokens and the per-round records."""

    request_id: str
    prompt_tokens: int
    tokens: list[int]
    rounds: list[RoundRecord]
    ttft_ms: float
    e2e_ms: float
    events: list[str] = field(default_factory=list)

    @property
    def n_drafted(self) -> int:
        return sum(r.n_drafted for r in self.rounds)

    @property
    def n_accepted(self) -> int:
        return sum(r.n_accepted for r in self.rounds)

    def summary(self) -> dict[str, Any]:
        """Per-request record (ARCHITECTURE.md, requests table)."""
        n_new = len(self.tokens)
        bytes_up = sum(w.bytes_up for r in self.rounds for w in r.workers)
        return {
            "request_id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": n_new,
            "rounds": len(self.rounds),
            "ttft_ms": self.ttft_ms,
            "e2e_ms": self.e2e_ms,
            "ms_per_token": self.e2e_ms / n_new if n_new else math.nan,
            "acceptance": self.n_accepted / self.n_drafted if self.n_drafted else math.nan,
            "tokens_per_round": n_new / len(self.rounds) if self.rounds else math.nan,
            "bytes_up_total": bytes_up,
            "bytes_per_token": bytes_up / n_new if n_new else math.nan,
            "dropped_replies": sum(w.dropped for r in self.rounds for w in r.workers),
            "busy_skips": sum(r.n_busy for r in self.rounds),
        }

    def round_rows(self) -> list[dict[str, Any]]:
        """Rounds table rows: one per (round, worker)."""
        rows = []
        for r in self.rounds:
            base = {k: v for k, v in asdict(r).items() if k not in ("workers", "emitted")}
            for w in r.workers:
                rows.append({"request_id": self.request_id, **base, **asdict(w)})
        return rows


def ensemble_logp(per_worker: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray) -> float:
    """Mean over tokens of log sum_i w_i p_i(x_t): the log-probability per token of a
    sequence under the exact federated target p."""
    p = np.zeros_like(per_worker[0])
    for w, pi in zip(weights, per_worker, strict=True):
        p += w * pi
    return float(np.mean(np.log(np.maximum(p, 1e-300))))


@dataclass(frozen=True)
class _Answer:
    """A worker's checked reply: the reply, its decoded payload, the call time (request
    sent -> reply read) and the time spent checking and decoding it, ms; t_read the
    time.perf_counter() when the reply was read."""

    reply: VerifyReply
    payload: Payload
    t_call_ms: float
    t_decode_ms: float
    t_read: float = 0.0


@dataclass
class _Late:
    """A call whose reply the round did not wait for: read (and recorded) when it comes."""

    future: Future[_Answer]
    request: VerifyRequest
    t_close: float
    up_mbit_est: float
    held: _Held


@dataclass
class _Held:
    """A round's record waiting for its dropped replies before it is handed to on_round
    (records go out in round order)."""

    record: RoundRecord
    rows: dict[int, WorkerRound]
    waiting: set[int]


class FederatedGenerator:
    """Federated speculative decoding over N workers (in-process or remote).

    Args:
        draft: the server's draft model, or a Proposer (a replayed draft); None only when
            gamma = 0.
        workers: the N workers.
        weights: w_i >= 0 summing to 1 (None = equal weights).
        transmissions: one Transmission for all workers, or one per worker (per-worker K);
            None = full fp32.
        reconstruction: "renormalize", "residual-mass" or "draft-guided".
        gamma: drafted tokens per round (0 = federated autoregressive decoding); with an
            adaptive gamma policy, the first round's gamma.
        temperature: T (0 = greedy).
        measure_fidelity: workers report ||p_i - p_hat_i||_1 (costs them O(V) per position).
        parallel: call the workers concurrently (remote workers); in-process workers share
            this process's cores, so they run one after another by default.
        on_worker_loss: "fail" ends the request with WorkerLost (records up to the loss are
            kept by `on_round`); "continue" drops the worker, renormalizes the weights over
            the others, records the event and goes on.
        gamma_policy: how gamma is chosen per round (default: fixed).
        k_auto: link-aware K per worker and round (topk transmissions only; default: the
            given transmissions every round).
        aggregation: when a round's replies are enough (default: all). Quorum and deadline
            call the workers concurrently (one thread per worker) whatever `parallel` says.
        keep_warm_ms: while a round that waits for all (parallel, remote workers) waits,
            re-run the check, decode and aggregation of the last reply every this many ms,
            results dropped, so the round's own run finds them in the CPU caches (the
            server sets it for replay, where the testbed's own overhead is measured against
            emulated compute; live, it would take CPU from models sharing the host).
    """

    def __init__(
        self,
        draft: LoadedModel | Proposer | None,
        workers: Sequence[WorkerClient],
        weights: Sequence[float] | None = None,
        transmissions: Transmission | Sequence[Transmission] | None = None,
        reconstruction: Reconstruction | str = Reconstruction.RENORMALIZE,
        gamma: int = 4,
        temperature: float = 1.0,
        measure_fidelity: bool = True,
        parallel: bool = False,
        on_worker_loss: LossPolicy | str = LossPolicy.FAIL,
        gamma_policy: GammaSpec | None = None,
        k_auto: KAuto | None = None,
        aggregation: AggregationSpec | None = None,
        keep_warm_ms: float | None = None,
    ) -> None:
        if not workers:
            raise ValueError("at least one worker is needed")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if gamma > 0 and draft is None:
            raise ValueError("gamma > 0 needs a draft model")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        self.workers = list(workers)
        n = len(self.workers)
        w = np.asarray([1.0 / n] * n if weights is None else check_weights(weights, n))
        self.weights = w
        if transmissions is None:
            transmissions = Transmission()
        if isinstance(transmissions, Transmission):
            transmissions = [transmissions] * n
        if len(transmissions) != n:
            raise ValueError(f"{len(transmissions)} transmissions for {n} workers")
        self.transmissions = list(transmissions)
        self.reconstruction = Reconstruction.parse(reconstruction, "reconstruction")
        self.gamma = gamma
        self.temperature = temperature
        self.measure_fidelity = measure_fidelity
        self.on_worker_loss = LossPolicy(on_worker_loss)
        self.gamma_spec = gamma_policy or GammaSpec()
        make_gamma_policy(self.gamma_spec, gamma)  # ValueError now, not in the first request
        self.aggregation_spec = aggregation or AggregationSpec()
        self.aggregation = make_aggregation(self.aggregation_spec)
        if self.aggregation_spec.quorum is not None and self.aggregation_spec.quorum > n:
            raise ValueError(f"quorum {self.aggregation_spec.quorum} exceeds the {n} workers")
        # Waiting for all workers that split their calls: one select() loop in this thread.
        self.multiplexed = (
            parallel
            and self.aggregation_spec.rule == "all"
            and all(isinstance(wk, SplitCall) for wk in self.workers)
        )
        self.keep_warm_s = None if keep_warm_ms is None else keep_warm_ms / 1e3
        self._warm_with: tuple[VerifyRequest, VerifyReply] | None = None
        self._last_call_ms: dict[int, float] = {}  # per worker: its last call, send to reply
        concurrent = (parallel and not self.multiplexed) or self.aggregation_spec.rule != "all"
        # One thread per worker: a worker's calls run in order on its own connection, so a
        # dropped call's reply is read before that worker is asked anything else.
        self.lanes: list[ThreadPoolExecutor] | None = (
            [ThreadPoolExecutor(1, thread_name_prefix=f"worker-{wk.name}") for wk in self.workers]
            if concurrent
            else None
        )
        self.proposer: Proposer | None = (
            DraftProposer(draft) if isinstance(draft, LoadedModel) else draft
        )
        reference: HasVocabulary = self.proposer if self.proposer is not None else self.workers[0]
        for wk in self.workers:
            check_same_vocabulary(reference, wk)
        self.vocab_size = self.workers[0].vocab_size
        self.eos: frozenset[int] = (
            self.proposer.eos_token_ids if self.proposer is not None else frozenset()
        )
        self.k_policy = make_k_policy(
            k_auto, self.transmissions, [wk.name for wk in self.workers], self.vocab_size
        )

    @classmethod
    def for_point(
        cls,
        point: Point,
        draft: LoadedModel | Proposer | None,
        workers: Sequence[WorkerClient],
        weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> FederatedGenerator:
        """The generator of a point's per-request options and policies (the one way the
        server and the recorder build it, so both make the same choices)."""
        return cls(
            draft if point.gamma > 0 else None,
            workers,
            weights,
            transmissions=point.transmission,
            reconstruction=point.reconstruction_or_default,
            gamma=point.gamma,
            temperature=point.temperature,
            gamma_policy=point.gamma_policy,
            k_auto=point.k_auto,
            aggregation=point.aggregation,
            **kwargs,
        )

    def close(self) -> None:
        """End the worker threads (idle ones; the generator is not used afterwards)."""
        for lane in self.lanes or []:
            lane.shutdown(wait=False)

    def score(self, prompt: Sequence[int], tokens: Sequence[int]) -> float:
        """Mean log-probability per generated token under the exact ensemble p (all
        workers, the original weights), asked of the workers after the request: neither
        timed nor counted as traffic. NaN if a worker cannot answer."""
        if not tokens:
            return math.nan
        seq = [*prompt, *tokens]
        try:
            per = [w.score(seq, len(prompt), self.temperature) for w in self.workers]
        except WorkerLost:
            return math.nan
        return ensemble_logp(per, self.weights)

    def _call(self, i: int, request: VerifyRequest) -> _Answer:
        """One worker's round: the call (timed), then the reply checked against the request
        and decoded (timed apart). A bad reply is that worker's failure (WorkerLost)."""
        t0 = time.perf_counter()
        reply = self.workers[i].verify(request)
        return self._checked(i, request, reply, t0)

    def _checked(self, i: int, request: VerifyRequest, reply: VerifyReply, t0: float) -> _Answer:
        """The reply read now to a request sent at t0, checked and decoded (WorkerLost if
        bad)."""
        worker = self.workers[i]
        t1 = time.perf_counter()
        try:
            payload = check_reply(request, reply, self.vocab_size)
        except BadReply as exc:
            raise WorkerLost(worker.name, f"bad reply in round {request.round}: {exc}") from exc
        return _Answer(reply, payload, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, t1)

    def _verify_all(
        self, requests: dict[int, VerifyRequest]
    ) -> tuple[dict[int, _Answer], dict[int, str], dict[int, Future[_Answer]]]:
        """Send one round to the given workers and wait as the aggregation rule says.

        Returns (answers by worker index, loss reasons by index, the calls still running
        when the round closed: their replies are dropped)."""
        replies: dict[int, _Answer] = {}
        lost: dict[int, str] = {}
        if self.multiplexed:
            return (*self._verify_multiplexed(requests), {})
        if self.lanes is None:  # one after another, in this thread
            for i, req in requests.items():
                try:
                    replies[i] = self._call(i, req)
                except WorkerLost as exc:
                    lost[i] = exc.reason
            return replies, lost, {}
        t0 = time.perf_counter()
        pending = {i: self.lanes[i].submit(self._call, i, r) for i, r in requests.items()}
        try:
            while True:
                for i, fut in list(pending.items()):
                    if fut.done():
                        del pending[i]
                        try:
                            replies[i] = fut.result()
                        except WorkerLost as exc:
                            lost[i] = exc.reason
                elapsed_ms = (time.perf_counter() - t0) * 1e3
                if self.aggregation.enough(len(replies), len(pending), elapsed_ms):
                    return replies, lost, pending
                wait(
                    pending.values(),
                    timeout=self.aggregation.wait_s(elapsed_ms),
                    return_when=FIRST_COMPLETED,
                )
        except BaseException:  # any other failure: let the other calls end before it spreads
            wait(pending.values())
            raise

    def _verify_multiplexed(
        self, requests: dict[int, VerifyRequest]
    ) -> tuple[dict[int, _Answer], dict[int, str]]:
        """Wait for all (SplitCall workers): send every request, then read the replies as
        their connections become readable, a step at a time; a worker past its call
        deadline is lost.

        The requests go out slowest worker first (by its last call, send to reply): the
        round waits for that one, so its call should not also wait behind the sends of the
        others (at N = 32, ~0.5 ms of sends)."""
        replies: dict[int, _Answer] = {}
        lost: dict[int, str] = {}
        sent: dict[int, float] = {}
        workers: list[Any] = self.workers  # every one a SplitCall (checked in __init__)
        last = self._last_call_ms
        order = sorted(requests, key=lambda i: -last.get(i, 0.0))  # stable: index order at first
        for i in order:
            req = requests[i]
            t0 = time.perf_counter()
            try:
                workers[i].send_verify(req)
            except WorkerLost as exc:
                lost[i] = exc.reason
                continue
            sent[i] = t0
        with selectors.DefaultSelector() as sel:
            for i in sent:
                sel.register(workers[i].fileno(), selectors.EVENT_READ, i)
            while sent:
                now = time.monotonic()
                due = min(workers[i].call_deadline for i in sent)
                timeout = due - now
                if self.keep_warm_s is not None:
                    timeout = min(timeout, self.keep_warm_s)
                events = sel.select(max(0.0, timeout))
                if not events:
                    self._keep_warm()
                ready = {key.data for key, _ in events}
                now = time.monotonic()
                ready |= {i for i in sent if workers[i].call_deadline <= now}  # they time out
                for i in sorted(ready):
                    fd = workers[i].fileno()
                    try:
                        reply = workers[i].read_step()
                        if reply is None:  # more to come
                            continue
                        sel.unregister(fd)
                        self._warm_with = (requests[i], reply)
                        replies[i] = answer = self._checked(i, requests[i], reply, sent.pop(i))
                        last[i] = answer.t_call_ms
                    except WorkerLost as exc:
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(fd)
                        sent.pop(i, None)
                        lost[i] = exc.reason
        return replies, lost

    def _keep_warm(self) -> None:
        """Check and decode the last reply read, and aggregate it, to nothing: keeps the
        code and data of the round's critical path in the CPU caches while the round waits
        (on a shared host, after 100 ms idle they run ~10x slower: 0.4 ms instead of 0.04
        to decode a top-64 reply). Results are dropped; nothing is recorded."""
        if self.keep_warm_s is None or self._warm_with is None:
            return
        request, reply = self._warm_with
        with contextlib.suppress(BadReply, ValueError):
            payload = check_reply(request, reply, self.vocab_size)
            Aggregate([payload], [1.0], self.reconstruction, None).row(0)

    def _worker_row(
        self,
        i: int,
        answer: _Answer,
        request: VerifyRequest,
        up_mbit_est: float,
        lateness_ms: float = math.nan,
    ) -> WorkerRound:
        """The rounds-table row of worker i's answer to `request` (dropped if late)."""
        reply, t_call_ms, tr = answer.reply, answer.t_call_ms, request.transmission
        return WorkerRound(
            worker=self.workers[i].name,
            transmission=tr.mode.value,
            k=tr.k,
            epsilon=tr.epsilon,
            value_dtype=tr.value_dtype.value,
            index_bytes=tr.wire_index_bytes(self.vocab_size),
            index_coding=tr.index_coding.value,
            k_mean=float(np.mean(answer.payload.k_per_position)),
            bytes_up=reply.bytes_up,
            bytes_down=reply.bytes_down,
            n_tokens=len(request.tokens),
            t_worker_ms=reply.t_worker_ms,
            t_worker_recorded_ms=reply.t_recorded_ms,
            t_send_ms=reply.t_send_ms,
            t_call_ms=t_call_ms,
            t_fidelity_ms=reply.t_fidelity_ms,
            t_net_ms=t_call_ms - reply.t_worker_ms - reply.t_fidelity_ms,
            t_decode_ms=answer.t_decode_ms,
            eps_mean=float(np.mean(answer.payload.eps)),
            local_l1=reply.local_l1,
            dropped=not math.isnan(lateness_ms),
            lateness_ms=lateness_ms,
            up_mbit_est=up_mbit_est,
        )

    def _settle(self, late: dict[int, _Late], block: bool) -> dict[int, str]:
        """Read the dropped calls that finished (all of them if `block`): each becomes a
        dropped row of its round, and its network time teaches the K policy. Returns the
        workers whose dropped call failed (lost), with the reason."""
        lost: dict[int, str] = {}
        for i, lt in list(late.items()):
            if not (block or lt.future.done()):
                continue
            del late[i]
            lt.held.waiting.discard(i)
            try:
                answer = lt.future.result()
            except WorkerLost as exc:
                lost[i] = exc.reason
                continue
            except Exception as exc:
                lost[i] = f"{type(exc).__name__}: {exc}"
                continue
            row = self._worker_row(
                i, answer, lt.request, lt.up_mbit_est, (answer.t_read - lt.t_close) * 1e3
            )
            lt.held.rows[i] = row
            self.k_policy.observe(i, row.bytes_up, row.t_net_ms)
        return lost

    @staticmethod
    def _release(held: list[_Held], on_round: Callable[[RoundRecord], None] | None) -> None:
        """Hand out the finished records in round order (a record waits for its dropped
        replies)."""
        while held and not held[0].waiting:
            h = held.pop(0)
            h.record.workers = [h.rows[i] for i in sorted(h.rows)]
            if on_round is not None:
                on_round(h.record)

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        seed: int,
        request_id: str | None = None,
        eos_token_ids: frozenset[int] | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` after `prompt` (token ids).

        All randomness comes from numpy's PCG64 seeded with `seed`, 2*gamma_cap + 1 uniforms
        per round (gamma_cap = gamma for a fixed gamma), so runs that differ only in
        transmission or reconstruction are coupled. `on_round` is called with each round's
        record as soon as it is complete (the server appends it to its tables; a round with
        dropped replies is complete when they have been read), so a failure keeps every
        earlier round.
        """
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        rid = request_id or uuid.uuid4().hex[:12]
        eos = self.eos if eos_token_ids is None else eos_token_ids
        rng = np.random.default_rng(seed)
        gamma_policy: GammaPolicy = make_gamma_policy(self.gamma_spec, self.gamma)
        committed = list(prompt)
        seen: list[list[int]] = [[] for _ in self.workers]
        active = list(range(len(self.workers)))
        weights = self.weights.copy()
        events: list[str] = []
        out: list[int] = []
        rounds: list[RoundRecord] = []
        late: dict[int, _Late] = {}
        held: list[_Held] = []
        inflight: dict[int, Future[_Answer]] = {}
        buffer = np.empty((0, self.vocab_size), np.float32)

        def scratch(n_pos: int) -> np.ndarray:
            """p_hat's [n_pos, V] array for the round's metrics, reused round after round
            (a fresh one is 3 MB at P = 5, V = 151,936)."""
            nonlocal buffer
            if len(buffer) < n_pos:
                buffer = np.empty((n_pos, self.vocab_size), np.float32)
            return buffer[:n_pos]

        t_start = time.perf_counter()
        ttft_ms = math.nan
        bookkeeping_s = 0.0  # metrics and record writing, excluded from ttft and e2e

        def drop_lost(lost: dict[int, str], where: str, answered: bool = True) -> None:
            """Apply the loss policy to the workers in `lost` (WorkerLost if it says fail,
            or if nobody is left / nobody answered the round)."""
            nonlocal active, weights
            names = ", ".join(f"{self.workers[i].name} ({why})" for i, why in lost.items())
            remaining = [i for i in active if i not in lost]
            if self.on_worker_loss == LossPolicy.FAIL or not remaining or not answered:
                raise WorkerLost(names, f"in {where} of request {rid}")
            active = remaining
            weights[list(lost)] = 0.0
            weights /= weights.sum()
            events.append(
                f"{where}: lost {names}; weights renormalized to "
                + ", ".join(f"{self.workers[i].name}={weights[i]:.3f}" for i in active)
            )

        try:
            while len(out) < max_new_tokens and not (out and out[-1] in eos):
                t0 = time.perf_counter()
                n_round = len(rounds)
                if late:  # dropped replies that came meanwhile
                    lost_late = self._settle(late, block=False)
                    if lost_late:
                        drop_lost(lost_late, f"round {n_round}")
                t_start_mono = time.monotonic()
                uniforms = RoundUniforms.draw(rng, gamma_policy.gamma_cap)
                round_gamma = gamma_policy.gamma_for_round()
                gamma = min(round_gamma, max_new_tokens - len(out) - 1)
                drafts: list[int] = []
                q: np.ndarray | None = None
                t_draft_ms = 0.0
                context_len = len(committed)
                draft: Draft | None = None
                if self.proposer is not None and gamma > 0:
                    draft = self.proposer.propose(
                        rid, committed, gamma, self.temperature, uniforms.draft
                    )
                    drafts, q, t_draft_ms = draft.tokens, draft.q, draft.t_ms
                seq = committed + drafts
                n_pos = len(drafts) + 1
                need = self.aggregation.min_free(len(active))
                while late and len(active) - len(late) < need:  # wait for busy workers
                    wait([lt.future for lt in late.values()], return_when=FIRST_COMPLETED)
                    lost_late = self._settle(late, block=False)
                    if lost_late:
                        drop_lost(lost_late, f"round {n_round}")
                free = [i for i in active if i not in late]
                requests = {}
                estimates = {}
                made: dict[tuple[int, Transmission], VerifyRequest] = {}
                for i in free:
                    start = min(common_prefix(seen[i], seq), len(seq) - n_pos)
                    estimates[i] = self.k_policy.estimate(i)
                    tr = self.k_policy.transmission_for(i, n_pos)
                    if (start, tr) not in made:  # workers asked the same share one request
                        made[start, tr] = VerifyRequest(
                            rid,
                            start,
                            seq[start:],
                            n_pos,
                            self.temperature,
                            tr,
                            self.reconstruction,
                            self.measure_fidelity,
                            round=n_round,
                        )
                    requests[i] = made[start, tr]
                t_v = time.perf_counter()
                replies, lost, pending = self._verify_all(requests)
                inflight = dict(pending)
                t_close = time.perf_counter()
                t_verify_ms = (t_close - t_v) * 1e3
                for i in [*replies, *pending]:  # a dropped call's worker processes it too
                    seen[i] = seq
                if lost:
                    drop_lost(lost, f"round {n_round}", answered=bool(replies))

                t_a = time.perf_counter()
                used = [i for i in active if i in replies]
                w_used = weights[used]
                if len(used) < len(active):  # renormalize over the replies that arrived
                    w_used = w_used / w_used.sum()
                payloads = {i: replies[i].payload for i in used}
                # p_hat by parts: acceptance reads an entry per draft and one row, not P x V
                target = Aggregate([payloads[i] for i in used], w_used, self.reconstruction, q)
                n_acc, token = speculative_accept(
                    drafts,
                    q if q is not None else np.zeros((0, self.vocab_size), np.float32),
                    target,
                    uniforms,
                    greedy=self.temperature == 0,
                )
                t_aggregate_ms = (time.perf_counter() - t_a) * 1e3
                gamma_policy.update(
                    RoundOutcome(len(drafts), n_acc, t_draft_ms, t_verify_ms, t_aggregate_ms)
                )

                emitted = [*drafts[:n_acc], token]
                for j, tok in enumerate(emitted):
                    if tok in eos:
                        emitted = emitted[: j + 1]
                        break
                emitted = emitted[: max_new_tokens - len(out)]
                out.extend(emitted)
                committed.extend(emitted)
                t_end = time.perf_counter()
                t_round_ms = (t_end - t0) * 1e3
                if not rounds:
                    ttft_ms = (t_end - t_start - bookkeeping_s) * 1e3
                # Bookkeeping from here on (metrics, records, the on_round callback that
                # writes them to disk) is not part of the protocol: kept out of the clocks.
                alpha = math.nan
                if q is not None and len(drafts):
                    p_hat = target.dense(scratch(n_pos))
                    alpha = float(alpha_fn(q, p_hat[: len(drafts)]).mean())
                rows = {}
                for i in used:
                    rows[i] = self._worker_row(i, replies[i], requests[i], estimates[i])
                    self.k_policy.observe(i, rows[i].bytes_up, rows[i].t_net_ms)
                record = RoundRecord(
                    round=n_round,
                    gamma=round_gamma,
                    t_start_s=t_start_mono,
                    context_len=context_len,
                    draft_new_tokens=draft.n_sync if draft is not None else 0,
                    t_draft_emulated_ms=draft.t_emulated_ms if draft is not None else math.nan,
                    t_draft_recorded_ms=draft.t_recorded_ms if draft is not None else math.nan,
                    n_drafted=len(drafts),
                    n_accepted=n_acc,
                    n_emitted=len(emitted),
                    t_draft_ms=t_draft_ms,
                    t_verify_ms=t_verify_ms,
                    t_aggregate_ms=t_aggregate_ms,
                    t_round_ms=t_round_ms,
                    alpha=alpha,
                    workers=[rows[i] for i in used],
                    emitted=list(emitted),
                    n_busy=len(active) - len(free),
                )
                rounds.append(record)
                entry = _Held(record, rows, set(pending))
                held.append(entry)
                for i, fut in pending.items():
                    late[i] = _Late(fut, requests[i], t_close, estimates[i], entry)
                inflight = {}
                self._release(held, on_round)
                bookkeeping_s += time.perf_counter() - t_end
        finally:
            t_done = time.perf_counter()
            for fut in inflight.values():  # an error left calls running: let them end
                with contextlib.suppress(Exception):
                    fut.result()
            lost_late = self._settle(late, block=True)  # keep every connection in step
            for i, why in lost_late.items():
                events.append(f"after the last round: lost {self.workers[i].name} ({why})")
                if i in active:
                    active.remove(i)
            for h in held:
                h.waiting.clear()
            self._release(held, on_round)
            bookkeeping_s += time.perf_counter() - t_done
            if self.proposer is not None:
                self.proposer.end(rid)
            for i in active:
                with contextlib.suppress(WorkerLost):
                    self.workers[i].end(rid)
        return GenerationResult(
            request_id=rid,
            prompt_tokens=len(prompt),
            tokens=out,
            rounds=rounds,
            ttft_ms=ttft_ms,
            e2e_ms=(time.perf_counter() - t_start - bookkeeping_s) * 1e3,
            events=events,
        )


def mixture(
    lms: Sequence[LoadedModel], weights: Sequence[float], context: Sequence[int], temperature: float
) -> np.ndarray:
    """The exact federated target p = sum_i w_i p_i after `context`, [V] float64 (for tests
    and fidelity studies; the generator never uses it)."""
    from specfed.models import KVSession, probabilities

    for lm in lms[1:]:
        check_same_vocabulary(lms[0], lm)
    p = np.zeros(lms[0].vocab_size)
    for lm, w in zip(lms, weights, strict=True):
        p += w * probabilities(KVSession(lm).sync(list(context), 1), temperature)[0]
    return p
