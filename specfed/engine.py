"""The federated speculative-decoding loop (server side) and the worker interface.

Notation: p_i worker i's target distribution, w_i its weight, p = sum_i w_i p_i the federated
target, q the draft, gamma drafted tokens per round, T temperature, V vocabulary size.

One round (ARCHITECTURE.md): draft gamma tokens from q; send each worker the tokens after its
committed prefix; each worker runs one forward pass and returns p_i^(1..gamma+1) encoded by
its transmission codec; the server decodes, reconstructs and aggregates p_hat, and runs
speculative acceptance. gamma = 0 is federated autoregressive decoding (no draft model).

`FederatedGenerator` talks to workers only through `WorkerClient.verify`, so the same loop
runs with in-process workers (`LocalWorker`, here) and with remote ones over TCP.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

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
from specfed.reconstruct import aggregate, reconstruct
from specfed.sampling import RoundUniforms, speculative_accept


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

    def verify(self, request: VerifyRequest) -> VerifyReply:
        t0 = time.perf_counter()
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
    alpha(q, p_hat) = sum_v min(q(v), p_hat(v)).
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
    sent -> reply read) and the time spent checking and decoding it, ms."""

    reply: VerifyReply
    payload: Payload
    t_call_ms: float
    t_decode_ms: float


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
        gamma: drafted tokens per round (0 = federated autoregressive decoding).
        temperature: T (0 = greedy).
        measure_fidelity: workers report ||p_i - p_hat_i||_1 (costs them O(V) per position).
        parallel: call the workers concurrently (remote workers); in-process workers share
            this process's cores, so they run one after another by default.
        on_worker_loss: "fail" ends the request with WorkerLost (records up to the loss are
            kept by `on_round`); "continue" drops the worker, renormalizes the weights over
            the others, records the event and goes on.
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
        self.pool = ThreadPoolExecutor(len(self.workers)) if parallel else None
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
        worker = self.workers[i]
        t0 = time.perf_counter()
        reply = worker.verify(request)
        t1 = time.perf_counter()
        try:
            payload = check_reply(request, reply, self.vocab_size)
        except BadReply as exc:
            raise WorkerLost(worker.name, f"bad reply in round {request.round}: {exc}") from exc
        return _Answer(reply, payload, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)

    def _verify_all(
        self, requests: dict[int, VerifyRequest]
    ) -> tuple[dict[int, _Answer], dict[int, str]]:
        """Send one round to the given workers (concurrently if parallel).

        Returns (answers by worker index, loss reasons by index).
        """
        replies: dict[int, _Answer] = {}
        lost: dict[int, str] = {}
        pool = self.pool
        futures = {i: pool.submit(self._call, i, r) for i, r in requests.items()} if pool else {}
        for i, req in requests.items():
            try:
                replies[i] = futures[i].result() if futures else self._call(i, req)
            except WorkerLost as exc:
                lost[i] = exc.reason
        return replies, lost

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

        All randomness comes from numpy's PCG64 seeded with `seed`, 2*gamma + 1 uniforms per
        round, so runs that differ only in transmission or reconstruction are coupled.
        `on_round` is called with each round's record as soon as it exists (the server
        appends it to its tables), so a failure keeps every earlier round.
        """
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        rid = request_id or uuid.uuid4().hex[:12]
        eos = self.eos if eos_token_ids is None else eos_token_ids
        rng = np.random.default_rng(seed)
        committed = list(prompt)
        seen: list[list[int]] = [[] for _ in self.workers]
        active = list(range(len(self.workers)))
        weights = self.weights.copy()
        events: list[str] = []
        out: list[int] = []
        rounds: list[RoundRecord] = []
        t_start = time.perf_counter()
        ttft_ms = math.nan
        bookkeeping_s = 0.0  # metrics and record writing, excluded from ttft and e2e
        try:
            while len(out) < max_new_tokens and not (out and out[-1] in eos):
                t0 = time.perf_counter()
                t_start_mono = time.monotonic()
                uniforms = RoundUniforms.draw(rng, self.gamma)
                gamma = min(self.gamma, max_new_tokens - len(out) - 1)
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
                requests = {}
                for i in active:
                    start = min(common_prefix(seen[i], seq), len(seq) - n_pos)
                    requests[i] = VerifyRequest(
                        rid,
                        start,
                        seq[start:],
                        n_pos,
                        self.temperature,
                        self.transmissions[i],
                        self.reconstruction,
                        self.measure_fidelity,
                        round=len(rounds),
                    )
                t_v = time.perf_counter()
                replies, lost = self._verify_all(requests)
                t_verify_ms = (time.perf_counter() - t_v) * 1e3
                for i in replies:
                    seen[i] = seq
                if lost:
                    names = ", ".join(f"{self.workers[i].name} ({why})" for i, why in lost.items())
                    if self.on_worker_loss == LossPolicy.FAIL or len(lost) == len(active):
                        raise WorkerLost(names, f"in round {len(rounds)} of request {rid}")
                    active = [i for i in active if i not in lost]
                    weights[list(lost)] = 0.0
                    weights /= weights.sum()
                    events.append(
                        f"round {len(rounds)}: lost {names}; weights renormalized to "
                        + ", ".join(f"{self.workers[i].name}={weights[i]:.3f}" for i in active)
                    )

                t_a = time.perf_counter()
                payloads = {i: replies[i].payload for i in active}
                p_hat = aggregate(
                    [payloads[i] for i in active], weights[active], self.reconstruction, q
                )
                n_acc, token = speculative_accept(
                    drafts,
                    q if q is not None else np.zeros((0, self.vocab_size), np.float32),
                    p_hat,
                    uniforms,
                    greedy=self.temperature == 0,
                )
                t_aggregate_ms = (time.perf_counter() - t_a) * 1e3

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
                    alpha = float(alpha_fn(q, p_hat[: len(drafts)]).mean())
                worker_rows = []
                for i in active:
                    answer = replies[i]
                    reply, t_call_ms = answer.reply, answer.t_call_ms
                    tr = self.transmissions[i]
                    worker_rows.append(
                        WorkerRound(
                            worker=self.workers[i].name,
                            transmission=tr.mode.value,
                            k=tr.k,
                            epsilon=tr.epsilon,
                            value_dtype=tr.value_dtype.value,
                            index_bytes=tr.wire_index_bytes(self.vocab_size),
                            index_coding=tr.index_coding.value,
                            k_mean=float(np.mean(payloads[i].k_per_position)),
                            bytes_up=reply.bytes_up,
                            bytes_down=reply.bytes_down,
                            n_tokens=len(requests[i].tokens),
                            t_worker_ms=reply.t_worker_ms,
                            t_worker_recorded_ms=reply.t_recorded_ms,
                            t_send_ms=reply.t_send_ms,
                            t_call_ms=t_call_ms,
                            t_fidelity_ms=reply.t_fidelity_ms,
                            t_net_ms=t_call_ms - reply.t_worker_ms - reply.t_fidelity_ms,
                            t_decode_ms=answer.t_decode_ms,
                            eps_mean=float(np.mean(payloads[i].eps)),
                            local_l1=reply.local_l1,
                        )
                    )
                record = RoundRecord(
                    round=len(rounds),
                    gamma=self.gamma,
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
                    workers=worker_rows,
                    emitted=list(emitted),
                )
                rounds.append(record)
                if on_round is not None:
                    on_round(record)
                bookkeeping_s += time.perf_counter() - t_end
        finally:
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
