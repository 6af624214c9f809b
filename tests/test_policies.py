"""Policies (specfed.policies): adaptive gamma, link-aware K, quorum / deadline aggregation.

Unit tests of each policy's decisions, then the engine with in-process tiny workers (one of
them slowed by a wrapper): per-round gamma and K in the records, greedy equivalence with
federated AR, dropped replies with their lateness, weights renormalized over the replies
that arrived, and a dropped worker's cache kept consistent. TCP and replay: tests/
test_policies_net.py.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from specfed.codecs import decode_any, index_bytes_for, make_codec
from specfed.config import ConfigError
from specfed.engine import FederatedGenerator, LocalWorker, WorkerLost
from specfed.messages import Transmission, VerifyReply, VerifyRequest
from specfed.options import Mode, ValueDtype
from specfed.points import Point
from specfed.policies import (
    GOODPUT_PER_RATE,
    AggregationSpec,
    CostGamma,
    Deadline,
    GammaSpec,
    HeuristicGamma,
    KAuto,
    LinkAwareK,
    LinkEstimate,
    Quorum,
    RoundOutcome,
    WaitAll,
    expected_tokens,
    k_for_budget,
    reply_overhead_bytes,
)
from specfed.records import POLICY_COLUMNS, REQUEST_COLUMNS, ROUND_COLUMNS
from specfed.wire import reply_frame_bytes

PROMPT = [1, 2, 3]
TOPK = Transmission(Mode.TOPK, k=3)


def outcome(n_drafted: int, n_accepted: int, **kw: float) -> RoundOutcome:
    return RoundOutcome(
        n_drafted,
        n_accepted,
        kw.get("t_draft_ms", 1.0),
        kw.get("t_verify_ms", 10.0),
        kw.get("t_aggregate_ms", 0.0),
    )


# ----------------------------------------------------------------------------- gamma


def test_heuristic_gamma_follows_hf_schedule():
    g = HeuristicGamma(4, gamma_min=2, gamma_cap=9)
    seen = []
    for drafted, accepted in [(4, 4), (6, 6), (8, 8), (9, 3), (8, 0), (7, 1), (6, 0), (5, 0),
                              (4, 0), (3, 0), (2, 2)]:  # fmt: skip
        assert g.gamma_for_round() == drafted if drafted >= 2 else True
        g.update(outcome(drafted, accepted))
        seen.append(g.gamma_for_round())
    # +2 on all accepted (capped at 9), -1 otherwise (floored at 2)
    assert seen == [6, 8, 9, 8, 7, 6, 5, 4, 3, 2, 4]
    g.update(outcome(0, 0))  # a round without drafts teaches nothing
    assert g.gamma_for_round() == 4


def test_expected_tokens_formula():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    # Monte Carlo: accept each draft with prob alpha until the first rejection; +1 token
    rng = np.random.default_rng(0)
    alpha, gamma = 0.7, 4
    u = rng.random((200_000, gamma)) < alpha
    n_acc = np.where(u.all(axis=1), gamma, u.argmin(axis=1))
    assert (n_acc + 1).mean() == pytest.approx(expected_tokens(alpha, gamma), rel=0.01)


def test_cost_gamma_minimizes_expected_time_per_token():
    # Expensive verification, cheap drafts, high acceptance: long drafts pay.
    g = CostGamma(2, gamma_min=1, gamma_cap=12)
    for _ in range(10):
        g.update(outcome(2, 2, t_draft_ms=2.0, t_verify_ms=200.0))
    assert g.alpha == pytest.approx(21 / 22)
    c_d, c_0, c_p = g.costs()
    assert c_d == pytest.approx(1.0) and c_p == 0.0 and c_0 == pytest.approx(200.0)
    best = min(range(1, 13), key=lambda n: (c_d * n + c_0) / expected_tokens(g.alpha, n))
    assert g.gamma_for_round() == best >= 8
    # Rejections everywhere and costly drafts: the smallest gamma.
    g = CostGamma(6, gamma_min=1, gamma_cap=12)
    for _ in range(10):
        g.update(outcome(6, 0, t_draft_ms=300.0, t_verify_ms=50.0))
    assert g.gamma_for_round() == 1


def test_cost_gamma_learns_the_cost_per_position():
    g = CostGamma(4, gamma_min=1, gamma_cap=8)
    for n in (1, 2, 3, 4, 5, 6) * 3:  # verify = 10 ms + 30 ms per position
        g.rounds.append((n + 1, 10.0 + 30.0 * (n + 1)))
    _, c_0, c_p = g.costs()
    assert c_p == pytest.approx(30.0, rel=0.05) and c_0 == pytest.approx(10.0, abs=8.0)


def test_gamma_spec_validation():
    assert GammaSpec().cap(4) == 4
    assert GammaSpec(policy="heuristic").cap(4) == 16
    assert GammaSpec(policy="heuristic").cap(20) == 20
    with pytest.raises(ValueError, match="below gamma_min"):
        GammaSpec(policy="cost", gamma_min=5, gamma_max=3)
    with pytest.raises(ValueError, match="needs gamma >= 1"):
        Point.of(gamma=0, temperature=1.0, mode="full", gamma_policy="heuristic")
    with pytest.raises(ValueError, match="outside gamma_min"):
        Point.of(gamma=10, temperature=1.0, mode="full", gamma_policy="heuristic", gamma_max=8)


# ----------------------------------------------------------------------------- K


def test_k_for_budget_is_the_largest_k_that_fits():
    vocab, positions = 151_936, 5
    entry = index_bytes_for(vocab) + 4
    for budget_ms, mbit in [(5.0, 4.78), (2.0, 19.1), (20.0, 4.78), (1.0, 100.0)]:
        k = k_for_budget(budget_ms, mbit, positions, entry, 1, 100_000)
        budget_bytes = budget_ms * mbit * 1e3 / 8

        def reply_bytes(kk: int) -> int:
            return reply_frame_bytes(make_codec("topk", k=kk).encoded_size(positions, vocab), "")

        rid = 32  # the nominal request id length the choice assumes
        assert reply_bytes(k) + rid <= budget_bytes < reply_bytes(k + 1) + rid
    assert reply_overhead_bytes() == reply_frame_bytes(16, "x" * 32)
    assert k_for_budget(0.01, 1.0, 5, 7, 8, 64) == 8  # floor
    assert k_for_budget(1e4, 1e3, 5, 7, 8, 64) == 64  # cap
    assert k_for_budget(1.0, None, 5, 7, 8, 64) == 64  # unlimited link


def test_link_aware_k_per_worker_and_positions():
    spec = KAuto(
        budget_ms=5.0,
        k_min=4,
        k_max=4096,
        links={"fast": LinkEstimate(up_mbit=19.1, rtt_ms=42), "slow": LinkEstimate(up_mbit=4.78)},
    )
    pol = LinkAwareK(spec, [Transmission(Mode.TOPK, k=4096)] * 3, ["fast", "slow", "x"], 151_936)
    k_fast, k_slow = pol.k_for(0, 5), pol.k_for(1, 5)
    assert k_fast > 3 * k_slow > 0
    assert pol.k_for(1, 9) < k_slow  # more positions per reply: fewer entries each
    assert pol.k_for(2, 5) == 4096  # no estimate: unlimited
    tr = pol.transmission_for(1, 5)
    assert (tr.mode, tr.k) == (Mode.TOPK, k_slow)
    pol.observe(1, 10_000, 1.0)  # source link: observations change nothing
    assert pol.k_for(1, 5) == k_slow
    with pytest.raises(ValueError, match="needs topk"):
        LinkAwareK(spec, [Transmission(Mode.FULL)], ["fast"], 100)
    compact = Transmission(Mode.TOPK, k=64, value_dtype=ValueDtype.Q8)
    with pytest.raises(ValueError, match="fixed-width entries"):
        LinkAwareK(spec, [compact], ["fast"], 100)
    fp16 = Transmission(Mode.TOPK, k=64, value_dtype=ValueDtype.FP16)
    assert LinkAwareK(spec, [fp16], ["fast"], 151_936).k_for(0, 5) > k_fast  # 5 B entries


def test_k_auto_refuses_content_dependent_codecs():
    for extra in ({"index_coding": "delta-varint"}, {"value_dtype": "q8"}):
        with pytest.raises(ValueError, match="fixed-width entries"):
            Point.of(gamma=4, temperature=1.0, mode="topk", k="auto", k_budget_ms=5.0, **extra)
    assert Point.of(
        gamma=4, temperature=1.0, mode="topk", k="auto", k_budget_ms=5.0, value_dtype="fp16"
    ).k_auto


def test_configured_estimate_of_a_traced_link_is_its_mean_rate(tmp_path):
    from testbed.linkparams import LinkSpec, RateTrace
    from testbed.scenario.paths import path_estimate

    trace = tmp_path / "steps.csv"
    trace.write_text("t_s,bw_mbit\n0,20\n1,4\n2,4\n")
    spec = LinkSpec.symmetric(delay_ms=10, trace=RateTrace.load(trace, "csv"))
    est = path_estimate({("w1", "srv"): spec}, "w1")
    assert est.up_mbit == pytest.approx(12 * GOODPUT_PER_RATE)
    assert est.rtt_ms == 20


def test_link_aware_k_observed_tracks_a_slower_link():
    spec = KAuto(budget_ms=5.0, source="observed", links={"w": LinkEstimate(up_mbit=20, rtt_ms=40)})
    pol = LinkAwareK(spec, [Transmission(Mode.TOPK, k=1024)], ["w"], 151_936)
    k0 = pol.k_for(0, 5)
    for _ in range(12):  # replies of 10 kB take 40 ms RTT + 40 ms: 2 Mbit/s
        pol.observe(0, 10_000, 80.0)
    assert pol.estimate(0) == pytest.approx(2.0, rel=0.05)
    assert pol.k_for(0, 5) < k0 / 5
    pol.observe(0, 1000, 40.1)  # faster than measurable beyond the RTT: a lower bound only
    assert pol.estimate(0) >= 2.0 * 0.95


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_rules():
    assert WaitAll().enough(3, 0, 1e9) and not WaitAll().enough(3, 1, 1e9)
    assert WaitAll().min_free(5) == 5
    q = Quorum(2)
    assert not q.enough(1, 2, 1e9) and q.enough(2, 1, 0.0) and q.enough(0, 0, 0.0)
    assert q.min_free(5) == 2 and q.min_free(1) == 1
    d = Deadline(100.0)
    assert not d.enough(2, 1, 99.0) and d.enough(1, 1, 100.0) and not d.enough(0, 1, 500.0)
    assert d.enough(0, 0, 1.0)  # nothing pending: all lost, the caller decides
    assert d.wait_s(40.0) == pytest.approx(0.06) and d.wait_s(150.0) is None
    assert d.min_free(3) == 1


def test_aggregation_spec():
    assert AggregationSpec().rule == "all" and AggregationSpec(wait="all").is_default
    assert AggregationSpec(quorum=2).rule == "quorum"
    assert AggregationSpec(deadline_ms=50).label == "deadline50ms"
    with pytest.raises(ValueError, match="give one of"):
        AggregationSpec(quorum=2, deadline_ms=10)


# ----------------------------------------------------------------------------- points, records


def test_default_point_content_and_columns_are_unchanged():
    """Without policies a point's content (what traces are keyed by) is what it was."""
    p = Point.of(gamma=4, temperature=1.0, mode="topk", k=64, point=3, rep=1)
    legacy = p.model_dump(
        mode="json", exclude={"point", "rep", "gamma_policy", "k_auto", "aggregation"}
    )
    assert p.content() == legacy
    cols = p.columns()
    assert cols["k"] == 64 and cols["gamma"] == 4
    assert {c: cols[c] for c in POLICY_COLUMNS} == {
        "gamma_policy": "fixed", "gamma_min": None, "gamma_max": None, "k_policy": "fixed",
        "k_budget_ms": None, "k_min": None, "k_max": None, "k_source": None,
        "aggregation": "all", "quorum": None, "deadline_ms": None,
    }  # fmt: skip
    assert set(POLICY_COLUMNS) < set(ROUND_COLUMNS) and set(POLICY_COLUMNS) < set(REQUEST_COLUMNS)
    for c in ("dropped", "lateness_ms", "up_mbit_est", "n_busy"):
        assert c in ROUND_COLUMNS
    assert {"dropped_replies", "busy_skips"} < set(REQUEST_COLUMNS)


def test_policy_point_label_columns_and_timing():
    p = Point.of(
        gamma=4, temperature=1.0, mode="topk", k="auto", k_budget_ms=5, k_max=512,
        gamma_policy="cost", aggregation={"deadline_ms": 200},
    )  # fmt: skip
    assert p.label == "topk-auto(5ms,1-512,link) renormalize g=cost:4 T=1.0 deadline200ms"
    cols = p.columns()
    assert cols["k"] is None and cols["k_max"] == 512 and cols["k_policy"] == "auto"
    assert cols["gamma_max"] == 16 and cols["aggregation"] == "deadline"
    assert [w for w, _ in p.timing_dependent()] == [
        "decoding.gamma_policy",
        "aggregation.deadline_ms",
    ]
    assert "k_auto" in p.content() and "aggregation" in p.content()
    replayable = Point.of(
        gamma=4, temperature=1.0, mode="topk", k="auto", k_budget_ms=5, gamma_policy="heuristic"
    )
    assert replayable.timing_dependent() == []
    links = {"w1": LinkEstimate(up_mbit=3.0, rtt_ms=10.0, source="calibrated")}
    assert replayable.with_links(links).k_auto.links == links  # type: ignore[union-attr]
    assert p.key() != replayable.key()
    with pytest.raises(ValueError, match="needs k_budget_ms"):
        Point.of(gamma=4, temperature=1.0, mode="topk", k="auto")
    with pytest.raises(ValueError, match="needs topk"):
        Point(
            transmission=Transmission(Mode.ADAPTIVE, k=8, epsilon=0.1),
            reconstruction="renormalize",
            k_auto=KAuto(budget_ms=1.0),
        )
    # full transmission drops k: auto like any K
    assert Point.of(gamma=4, temperature=1.0, mode="full", k="auto").k_auto is None


def test_record_refuses_timing_dependent_points(tmp_path):
    from specfed.record import RecordSpec, record_points

    spec = RecordSpec("tiny-v64-s1", {"w1": "tiny-v64-s2"}, None, "ids:1,2", 4, 0, "fp32")
    points = [
        Point.of(gamma=4, temperature=1.0, mode="topk", k=8, aggregation={"quorum": 1}),
        Point.of(gamma=4, temperature=1.0, mode="topk", k=8, gamma_policy="cost"),
    ]
    with pytest.raises(ConfigError) as err:
        record_points(spec, points, tmp_path)
    msg = str(err.value)
    assert "aggregation.quorum" in msg and "decoding.gamma_policy" in msg and "run it live" in msg
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- engine


class SlowWorker:
    """A worker that takes `delay_s(round)` more per VERIFY (a straggler), and checks that
    every reply holds the distributions of a fresh forward pass over what it should hold
    (its cache stays consistent when its replies are dropped)."""

    def __init__(self, inner: LocalWorker, delay_s, check: bool = False) -> None:
        self.inner = inner
        self.name = inner.name
        self.model_name = inner.model_name
        self.vocab_size = inner.vocab_size
        self.fingerprint = inner.fingerprint
        self.delay_s = delay_s
        self.check = check
        self.held: dict[str, list[int]] = {}
        self.calls: list[int] = []
        self.mismatch = 0.0

    def verify(self, request: VerifyRequest) -> VerifyReply:
        content = self.held.get(request.request_id, [])[: request.start] + list(request.tokens)
        self.held[request.request_id] = content
        reply = self.inner.verify(request)
        self.calls.append(request.round)
        if self.check:
            fresh = self.inner.lm
            from specfed.models import KVSession, probabilities

            p = probabilities(
                KVSession(fresh).sync(content, request.n_positions), request.temperature
            )
            got = decode_any(reply.payload).dense
            assert got is not None
            self.mismatch = max(self.mismatch, float(np.abs(got - p).max()))
        time.sleep(self.delay_s(request.round))
        return reply

    def end(self, request_id: str) -> None:
        self.inner.end(request_id)

    def score(self, sequence, n_context, temperature):
        return self.inner.score(sequence, n_context, temperature)


def test_greedy_sd_with_adaptive_gamma_equals_federated_ar(tiny_family):
    """At T = 0 speculative decoding emits the argmax of p whatever gamma each round uses."""
    draft, w1, w2 = tiny_family
    workers = [LocalWorker("w1", w1), LocalWorker("w2", w2)]
    ar = FederatedGenerator(None, workers, (0.3, 0.7), gamma=0, temperature=0)
    want = ar.generate(PROMPT, 20, seed=0).tokens
    for policy in ("heuristic", "cost"):
        gen = FederatedGenerator(
            draft, workers, (0.3, 0.7), gamma=2, temperature=0,
            gamma_policy=GammaSpec(policy=policy, gamma_max=6),
        )  # fmt: skip
        res = gen.generate(PROMPT, 20, seed=0)
        assert res.tokens == want
        gammas = [r.gamma for r in res.rounds]
        assert len(set(gammas)) > 1 and max(gammas) <= 6 and gammas[0] == 2


def test_heuristic_gamma_in_the_records_is_reproducible(tiny_family):
    draft, w1, w2 = tiny_family
    workers = [LocalWorker("w1", w1), LocalWorker("w2", w2)]
    gen = FederatedGenerator(
        draft, workers, gamma=3, transmissions=TOPK,
        gamma_policy=GammaSpec(policy="heuristic", gamma_min=1, gamma_max=7),
    )  # fmt: skip
    a, b = gen.generate(PROMPT, 24, seed=5), gen.generate(PROMPT, 24, seed=5)
    assert a.tokens == b.tokens and [r.gamma for r in a.rounds] == [r.gamma for r in b.rounds]
    g = 3
    for r in a.rounds:  # the recorded gamma follows the +2 / -1 schedule of the history
        assert r.gamma == g and r.n_drafted == min(g, r.n_drafted)
        g = min(7, g + 2) if r.n_accepted == r.n_drafted else max(1, g - 1)


def test_link_aware_k_in_the_records(tiny_family):
    draft, w1, w2 = tiny_family  # V = 8: K between 1 and 8
    workers = [LocalWorker("w1", w1), LocalWorker("w2", w2)]
    overhead = reply_overhead_bytes()
    # budgets in bytes: w1 fits 6 entries per position, w2 2 (5 positions x 6 bytes each)
    k_auto = KAuto(
        budget_ms=1.0,
        links={
            "w1": LinkEstimate(up_mbit=(overhead + 6 * 30) * 8 / 1e3),
            "w2": LinkEstimate(up_mbit=(overhead + 2 * 30) * 8 / 1e3),
        },
    )
    gen = FederatedGenerator(
        draft, workers, gamma=4, transmissions=Transmission(Mode.TOPK, k=8), k_auto=k_auto
    )
    res = gen.generate(PROMPT, 11, seed=1)
    full_rounds = [r for r in res.rounds if r.n_drafted == 4]
    assert full_rounds
    for r in full_rounds:
        ks = {w.worker: w.k for w in r.workers}
        assert ks == {"w1": 6, "w2": 2}
        assert {w.worker: round(w.up_mbit_est, 6) for w in r.workers} == {
            n: round(e.up_mbit, 6)
            for n, e in k_auto.links.items()  # type: ignore[arg-type]
        }
    short = [r for r in res.rounds if r.n_drafted < 4]
    for r in short:  # fewer positions: the same budget holds more entries each
        assert all(w.k >= {"w1": 6, "w2": 2}[w.worker] for w in r.workers)


def one_worker_tokens(lm, seed: int, n: int, draft) -> list[int]:
    gen = FederatedGenerator(draft, [LocalWorker("w1", lm)], gamma=3, transmissions=TOPK)
    return gen.generate(PROMPT, n, seed=seed).tokens


@pytest.mark.parametrize("aggregation", [{"quorum": 1}, {"deadline_ms": 60.0}])
def test_straggler_dropped_weights_renormalized(tiny_family, aggregation):
    """w2 is always slower than the rule waits: every round aggregates w1 alone (weight 1),
    so the tokens are those of w1 alone; w2's late replies are rows with their lateness."""
    draft, w1, w2 = tiny_family
    slow = SlowWorker(LocalWorker("w2", w2), lambda rnd: 0.25)
    gen = FederatedGenerator(
        draft, [LocalWorker("w1", w1), slow], (0.3, 0.7), transmissions=TOPK, gamma=3,
        aggregation=AggregationSpec(**aggregation),
    )  # fmt: skip
    emitted: list[int] = []
    res = gen.generate(PROMPT, 12, seed=4, on_round=lambda r: emitted.append(r.round))
    assert res.tokens == one_worker_tokens(w1, 4, 12, draft)
    assert emitted == list(range(len(res.rounds)))  # records in round order, all of them
    dropped = [w for r in res.rounds for w in r.workers if w.dropped]
    used = [w for r in res.rounds for w in r.workers if not w.dropped]
    assert {w.worker for w in used} == {"w1"} and len(used) == len(res.rounds)
    assert dropped and all(w.worker == "w2" for w in dropped)
    for w in dropped:  # came after the close: about the delay minus the rule's wait
        assert 0 < w.lateness_ms < 400 and w.t_worker_ms > 0 and w.bytes_up > 0
    # w2 answers every round it is asked; while busy it sits rounds out
    assert len(slow.calls) == len(dropped)
    assert len(dropped) + sum(r.n_busy for r in res.rounds) == len(res.rounds)
    s = res.summary()
    assert s["dropped_replies"] == len(dropped) and s["busy_skips"] == len(res.rounds) - len(
        dropped
    )
    assert math.isnan(used[0].lateness_ms)


def test_deadline_that_nobody_misses_equals_waiting_for_all(tiny_family):
    draft, w1, w2 = tiny_family
    base = FederatedGenerator(
        draft, [LocalWorker("w1", w1), LocalWorker("w2", w2)], (0.3, 0.7), transmissions=TOPK
    )
    want = base.generate(PROMPT, 12, seed=2)
    gen = FederatedGenerator(
        draft, [LocalWorker("w1", w1), SlowWorker(LocalWorker("w2", w2), lambda r: 0.01)],
        (0.3, 0.7), transmissions=TOPK, aggregation=AggregationSpec(deadline_ms=5000),
    )  # fmt: skip
    res = gen.generate(PROMPT, 12, seed=2)
    assert res.tokens == want.tokens
    assert not any(w.dropped for r in res.rounds for w in r.workers)


def test_dropped_worker_stays_consistent(tiny_family):
    """w2 misses the deadline in round 0 only; it rejoins later, and every reply it gives
    holds the distributions of a fresh forward pass over the committed prefix + drafts (its
    cache was cropped right). w1 takes 40 ms a call, so rounds last long enough for w2's
    late reply to come back within the request."""
    draft, w1, w2 = tiny_family
    slow = SlowWorker(LocalWorker("w2", w2), lambda rnd: 0.3 if rnd == 0 else 0.0, check=True)
    gen = FederatedGenerator(
        draft, [SlowWorker(LocalWorker("w1", w1), lambda rnd: 0.04), slow],
        transmissions=Transmission(Mode.FULL), gamma=3,
        aggregation=AggregationSpec(deadline_ms=100),
    )  # fmt: skip
    res = gen.generate(PROMPT, 30, seed=3)
    rows = [(r.round, w.worker, w.dropped) for r in res.rounds for w in r.workers]
    assert (0, "w2", True) in rows
    rejoined = [rnd for rnd, wk, dropped in rows if wk == "w2" and not dropped]
    assert rejoined and min(rejoined) >= 1
    assert slow.mismatch < 1e-5


def test_quorum_waits_for_busy_workers_when_it_needs_them(tiny_family):
    """quorum 2 of 2: nothing is ever dropped (the round waits for both)."""
    draft, w1, w2 = tiny_family
    gen = FederatedGenerator(
        draft, [LocalWorker("w1", w1), SlowWorker(LocalWorker("w2", w2), lambda r: 0.02)],
        transmissions=TOPK, aggregation=AggregationSpec(quorum=2),
    )  # fmt: skip
    res = gen.generate(PROMPT, 8, seed=0)
    assert all(len(r.workers) == 2 and not any(w.dropped for w in r.workers) for r in res.rounds)
    with pytest.raises(ValueError, match="exceeds the 2 workers"):
        FederatedGenerator(
            draft, [LocalWorker("w1", w1), LocalWorker("w2", w2)],
            aggregation=AggregationSpec(quorum=3),
        )  # fmt: skip


class DyingWorker(SlowWorker):
    """Slow, and its call for round `die` fails after the delay (a crash while late)."""

    def __init__(self, inner: LocalWorker, die: int) -> None:
        super().__init__(inner, lambda rnd: 0.2)
        self.die = die

    def verify(self, request: VerifyRequest) -> VerifyReply:
        reply = super().verify(request)
        if request.round >= self.die:
            raise WorkerLost(self.name, "connection reset (test)")
        return reply


@pytest.mark.parametrize("policy", ["continue", "fail"])
def test_a_late_call_that_fails_is_a_loss(tiny_family, policy):
    draft, w1, w2 = tiny_family
    # w1 takes 40 ms a round: the request outlasts w2's 200 ms late call, whose failure is
    # then noticed mid-request (one noticed after the last round is only an event)
    gen = FederatedGenerator(
        draft,
        [SlowWorker(LocalWorker("w1", w1), lambda r: 0.04),
         DyingWorker(LocalWorker("w2", w2), die=0)],
        transmissions=TOPK, aggregation=AggregationSpec(quorum=1), on_worker_loss=policy,
    )  # fmt: skip
    if policy == "fail":
        with pytest.raises(WorkerLost, match="w2"):
            gen.generate(PROMPT, 30, seed=0)
        return
    res = gen.generate(PROMPT, 30, seed=0)
    assert len(res.tokens) == 30
    assert any("lost w2" in e for e in res.events)


# ----------------------------------------------------------------------------- scenarios

SCENARIO = """
name: pol
topology: {name: star, params: {n_workers: 2}}
links:
  default: {bw_mbit: 100, delay_ms: 1}
  w1: {bw_mbit: 20, delay_ms: 20}
  w2: {delay_ms: 50, up: {bw_mbit: 5}, down: {bw_mbit: 50}}
models: {draft: tiny-v64-s1, workers: {w1: tiny-v64-s2, w2: tiny-v64-s3}}
transmission: {mode: topk, k: 64}
"""


def scenario(tmp_path, extra: str = "", *overrides: str):
    from testbed.scenario import load_scenario

    path = tmp_path / "pol.yaml"
    path.write_text(SCENARIO + extra)
    return load_scenario(path, overrides)


def problems(tmp_path, extra: str = "", *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        scenario(tmp_path, extra, *overrides)
    return str(err.value)


def test_scenario_policies_expand_into_one_network(tmp_path):
    from testbed.scenario import expand, group_points

    sc = scenario(
        tmp_path,
        "sweep:\n"
        "  - {k: [64]}\n"
        "  - {k: [auto], k_budget_ms: [2, 8], transmission.k_source: [link, observed]}\n"
        "  - {gamma_policy: [heuristic, cost], decoding.gamma_max: [8]}\n"
        "  - {quorum: [1]}\n"
        "  - {deadline_ms: [300]}\n"
        "  - {aggregation: [{wait: all}, {quorum: 2}]}\n",
    )
    points = expand(sc)
    assert len(group_points(points)) == 1  # policies are per-request options
    labels = [p.request.label for p in points]
    assert len(labels) == len(set(labels)) == 1 + 4 + 2 + 1 + 1 + 1  # wait: all == [64]
    auto = [p.request for p in points if p.request.k_auto is not None]
    assert {(a.k_auto.budget_ms, a.k_auto.source) for a in auto} == {  # type: ignore[union-attr]
        (2.0, "link"), (8.0, "link"), (2.0, "observed"), (8.0, "observed"),
    }  # fmt: skip
    links = auto[0].k_auto.links  # type: ignore[union-attr]
    # w1: 20 Mbit/s, RTT 2 x 20 + 2 x 1; w2: 5 Mbit/s up, RTT 2 x 50 + 2 x 1
    assert links["w1"].up_mbit == pytest.approx(20 * 1448 / 1514)
    assert links["w2"].up_mbit == pytest.approx(5 * 1448 / 1514)
    assert (links["w1"].rtt_ms, links["w2"].rtt_ms, links["w2"].source) == (42, 102, "configured")
    gammas = [p.request.gamma_policy for p in points if p.request.gamma_policy.policy != "fixed"]
    assert {g.gamma_max for g in gammas} == {8}


def test_scenario_policy_errors_name_the_field(tmp_path):
    msg = problems(tmp_path, "", "transmission.k=auto")
    assert "transmission.k_budget_ms: k: auto needs k_budget_ms" in msg
    msg = problems(tmp_path, "", "transmission.mode=adaptive", "transmission.k=auto")
    assert "transmission.k: auto is link-aware top-K" in msg
    msg = problems(tmp_path, "aggregation: {quorum: 3}\n")
    assert "aggregation.quorum: 3 exceeds the 2 workers" in msg
    msg = problems(tmp_path, "aggregation: {quorum: 1, deadline_ms: 5}\n")
    assert "aggregation: give one of wait: all, quorum: M or deadline_ms: D" in msg
    msg = problems(tmp_path, "", "decoding.gamma=0", "decoding.gamma_policy=heuristic")
    assert "decoding.gamma_policy: heuristic needs gamma >= 1" in msg
    msg = problems(tmp_path, "", "decoding.gamma_policy=cost", "decoding.gamma_max=2")
    assert "decoding.gamma_max: gamma 4 must lie in gamma_min..gamma_max = 1..2" in msg
    msg = problems(tmp_path, "", "transmission.k_min=9", "transmission.k_max=8")
    assert "transmission.k_max: k_max 8 is below k_min 9" in msg


def test_scenario_replay_refuses_timing_dependent_policies(tmp_path):
    replay = "compute: {mode: replay, profiles: recorded}\n"
    scenario(tmp_path, replay, "decoding.gamma_policy=heuristic", "transmission.k=auto",
             "transmission.k_budget_ms=5")  # fmt: skip
    for override, field in [
        ("decoding.gamma_policy=cost", "decoding.gamma_policy"),
        ("aggregation.deadline_ms=100", "aggregation.deadline_ms"),
        ("aggregation.quorum=1", "aggregation.quorum"),
    ]:
        msg = problems(tmp_path, replay, override)
        assert f"{field}: " in msg and "use compute.mode: live" in msg
    msg = problems(
        tmp_path, replay, "transmission.k=auto", "transmission.k_budget_ms=5",
        "transmission.k_source=observed",
    )  # fmt: skip
    assert "transmission.k_source: observed chooses K" in msg
    # in a sweep: refused when the points are expanded, named with the point
    from testbed.scenario import expand

    with pytest.raises(ConfigError) as err:
        expand(scenario(tmp_path, replay + "sweep: {quorum: [1]}\n"))
    assert "aggregation.quorum" in str(err.value) and "sweep point" in str(err.value)


def test_calibrated_estimates_from_the_runner():
    from testbed.runner import calibrated_estimates

    cal = [
        {"a": "w1", "b": "srv", "rtt": {"mean_ms": 42.1},
         "goodput": [{"src": "w1", "dst": "srv", "mbit": 19.1},
                     {"src": "srv", "dst": "w1", "mbit": 19.0}]},
        {"a": "w2", "b": "srv", "rtt": {"mean_ms": 102.3}, "goodput": []},
    ]  # fmt: skip
    est = calibrated_estimates(cal)
    assert est["w1"] == LinkEstimate(up_mbit=19.1, rtt_ms=42.1, source="calibrated")
    assert est["w2"].up_mbit is None and est["w2"].rtt_ms == 102.3
    # today's calibration: median RTT, link rate from a UDP train (no TCP goodput)
    cal = [
        {"a": "w1", "b": "srv", "rtt": {"mean_ms": 42.5, "median_ms": 42.2}, "goodput": [],
         "rate": [{"src": "w1", "dst": "srv", "mbit": 19.9},
                  {"src": "srv", "dst": "w1", "mbit": 5.0}]},
        {"a": "w2", "b": "srv", "rtt": {"mean_ms": 9.0, "median_ms": math.nan}, "rate": []},
    ]  # fmt: skip
    est = calibrated_estimates(cal)
    assert est["w1"].rtt_ms == 42.2
    assert est["w1"].up_mbit == pytest.approx(19.9 * GOODPUT_PER_RATE)
    assert est["w2"].up_mbit is None and est["w2"].rtt_ms == 9.0


def test_sweep_keeps_inherited_link_fields(tmp_path):
    """A direction override keeps the delay its link block gives, in every sweep point (the
    expanded points are re-validated from the scenario's data)."""
    from testbed.scenario import build_topology, expand, link_specs

    sc = scenario(tmp_path, "sweep: {quorum: [1, 2]}\n")
    for s in (sc, *(p.scenario for p in expand(sc))):
        topo = build_topology(s)
        _, per = link_specs(s.spec.links, topo.hosts(), topo.links(), "star")
        assert (per["w2"].up.delay_ms, per["w2"].up.bw_mbit) == (50.0, 5.0)
        assert (per["w2"].down.delay_ms, per["w2"].down.bw_mbit) == (50.0, 50.0)


def test_points_file_and_server_options_carry_the_policies(tmp_path):
    from specfed.points import read_points, write_points
    from specfed.server import parse_args, points_from_args

    args = parse_args(
        ["--draft", "d", "--workers", "127.0.0.1:1,127.0.0.1:2", "--out", str(tmp_path),
         "--transmission", "topk", "--k", "auto,64", "--k-budget-ms", "4", "--k-max", "512",
         "--gamma-policy", "fixed,heuristic", "--gamma-max", "8",
         "--aggregation", "all,quorum:1,deadline:250"]
    )  # fmt: skip
    points = points_from_args(args)
    assert len(points) == 2 * 2 * 3
    labels = {p.label for p in points}
    assert "topk-auto(4ms,1-512,link) renormalize g=heuristic:4 T=1.0 deadline250ms" in labels
    assert "topk64 renormalize g=4 T=1.0 quorum1" in labels
    path = tmp_path / "points.json"
    write_points(path, points)
    assert read_points(path) == points
    bad = parse_args(["--draft", "d", "--workers", "h:1", "--out", str(tmp_path), "--k", "8",
                      "--transmission", "topk", "--aggregation", "first:2"])  # fmt: skip
    with pytest.raises(ValueError, match="unknown aggregation 'first:2'"):
        points_from_args(bad)


@pytest.mark.parametrize("setting", ["demo", "demo-trace", "star32"])
def test_policybench_settings_are_valid_replay_scenarios(setting, tmp_path):
    """Every Pareto setting with the replay policy set loads and checks as a scenario (tiny
    models: no bundle needed); demo-trace puts w2 on the shipped fading trace, star32 has
    32 workers (tiny models replay their recorded compute: they have no device profile)."""
    from testbed.policybench import default_profiles, policy_sweep, setting_scenario
    from testbed.scenario import check_scenario, scenario_from_dict

    raw = setting_scenario(setting, "tiny", "ids:1,2", 8)
    raw["compute"] = {"mode": "replay", "profiles": default_profiles("tiny")}
    raw["sweep"] = policy_sweep(False, [1.0, 4.0])
    sc = scenario_from_dict(raw, f"{setting}.yaml", tmp_path / f"{setting}.yaml")
    n_points, n_groups = check_scenario(sc)
    assert n_groups == 1 and n_points >= 8
    if setting == "demo-trace":
        assert sc.spec.links["w2"].trace.file.endswith("fading-5mbit.csv")
    if setting == "star32":
        assert len(sc.spec.models.workers) == 32
