"""Reconstruction formulas on hand-made cases, and the fast aggregate against the reference.

Notation: p target, q draft, P positions, V vocabulary size, K kept entries, rho kept mass,
eps = 1 - rho, w_i worker weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from specfed.codecs import AdaptiveTopKCodec, FullCodec, Payload, TopKCodec, decode_any
from specfed.reconstruct import RECONSTRUCTIONS, Aggregate, aggregate, reconstruct
from specfed.sampling import RoundUniforms, speculative_accept


def sparse(vocab: int, *rows: tuple[list[int], list[float]]) -> Payload:
    return Payload(
        vocab_size=vocab,
        indices=tuple(np.array(i, np.int64) for i, _ in rows),
        values=tuple(np.array(v, np.float32) for _, v in rows),
    )


def softmax_rows(
    rng: np.random.Generator, n_pos: int, vocab: int, scale: float = 2.0
) -> np.ndarray:
    logits = rng.standard_normal((n_pos, vocab)) * scale
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


# V = 5, S = {3, 1}, p(3) = 0.5, p(1) = 0.25: rho = 0.75, eps = 0.25. All numbers are dyadic,
# so every expected value below is exact in float64.
HAND = sparse(5, ([3, 1], [0.5, 0.25]))
Q_HAND = np.array([[0.125, 0.5, 0.25, 0.0, 0.125]])  # q(C) on C = {0, 2, 4} is 0.5


def test_renormalize_formula() -> None:
    np.testing.assert_array_equal(reconstruct(HAND, "renormalize"), [[0, 1 / 3, 0, 2 / 3, 0]])


def test_residual_mass_formula() -> None:
    c = 0.25 / 3  # eps / (V - K)
    np.testing.assert_array_equal(reconstruct(HAND, "residual-mass"), [[c, 0.25, c, 0.5, c]])


def test_draft_guided_formula() -> None:
    # complement gets eps * q(v) / q(C) = 0.25 * q(v) / 0.5
    p_hat = reconstruct(HAND, "draft-guided", Q_HAND)
    np.testing.assert_array_equal(p_hat, [[0.0625, 0.25, 0.125, 0.5, 0.0625]])
    assert p_hat.sum() == 1.0


def test_draft_guided_falls_back_to_uniform_without_usable_q() -> None:
    two = sparse(5, ([3, 1], [0.5, 0.25]), ([0], [0.5]))
    uniform_row0 = [0.25 / 3, 0.25, 0.25 / 3, 0.5, 0.25 / 3]
    # q only for position 0 (G = 1 < P = 2): position 1 (the "bonus" position) is uniform
    p_hat = reconstruct(two, "draft-guided", Q_HAND)
    np.testing.assert_array_equal(p_hat[0], [0.0625, 0.25, 0.125, 0.5, 0.0625])
    np.testing.assert_array_equal(p_hat[1], [0.5, 0.125, 0.125, 0.125, 0.125])
    # no q at all
    np.testing.assert_array_equal(reconstruct(HAND, "draft-guided", None)[0], uniform_row0)
    # q puts all its mass on S: nothing to be guided by
    q_on_s = np.array([[0.0, 0.5, 0.0, 0.5, 0.0]])
    np.testing.assert_array_equal(reconstruct(HAND, "draft-guided", q_on_s)[0], uniform_row0)
    # ... and the same holds up to float rounding of the complement mass
    q_almost = np.array([[1e-12, 0.5, 0.0, 0.5, 0.0]])
    np.testing.assert_array_equal(reconstruct(HAND, "draft-guided", q_almost)[0], uniform_row0)


def test_draft_guided_with_zero_q_on_part_of_the_complement() -> None:
    q = np.array([[0.0, 0.25, 0.5, 0.25, 0.0]])  # of C = {0, 2, 4}, only 2 has draft mass
    np.testing.assert_array_equal(
        reconstruct(HAND, "draft-guided", q), [[0.0, 0.25, 0.25, 0.5, 0.0]]
    )


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
def test_k_equal_v_returns_exactly_the_input(method: str) -> None:
    # values sum to 1 - 2**-20: a small eps from rounding, ignored when nothing is missing
    vals = [0.5, 0.25, 0.125, 0.125 - 2.0**-20]
    payload = sparse(4, ([2, 0, 3, 1], vals))
    expected = np.zeros((1, 4))
    expected[0, [2, 0, 3, 1]] = vals
    q = np.full((1, 4), 0.25)
    np.testing.assert_array_equal(reconstruct(payload, method, q), expected)
    np.testing.assert_allclose(aggregate([payload], [1.0], method, q), expected, atol=1e-7)


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
def test_dense_payload_is_used_as_sent(method: str) -> None:
    p = softmax_rows(np.random.default_rng(0), 3, 50)
    payload = decode_any(FullCodec().encode(p))
    q = softmax_rows(np.random.default_rng(1), 2, 50)
    np.testing.assert_array_equal(reconstruct(payload, method, q), p.astype(np.float64))
    np.testing.assert_array_equal(aggregate([payload], [1.0], method, q), p)


def test_renormalize_with_no_kept_mass_is_uniform() -> None:
    payload = sparse(4, ([1], [0.0]), ([2], [0.5]))
    p_hat = reconstruct(payload, "renormalize")
    np.testing.assert_array_equal(p_hat, [[0.25] * 4, [0, 0, 1, 0]])
    np.testing.assert_array_equal(aggregate([payload], [1.0], "renormalize"), p_hat)


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
@pytest.mark.parametrize("k", [1, 7, 99])
def test_rows_sum_to_one(method: str, k: int) -> None:
    rng = np.random.default_rng(k)
    p = softmax_rows(rng, 4, 100)
    q = softmax_rows(rng, 3, 100)
    payload = decode_any(TopKCodec(k).encode(p))
    p_hat = reconstruct(payload, method, q)
    np.testing.assert_allclose(p_hat.sum(axis=1), 1.0, atol=1e-6)
    assert (p_hat >= 0).all()


# ---------------------------------------------------------------------------------------------
# aggregate (fast path) == sum_i w_i reconstruct (reference)
# ---------------------------------------------------------------------------------------------


def random_round(
    rng: np.random.Generator, n_workers: int, n_pos: int, vocab: int, mixed: bool
) -> tuple[list[Payload], np.ndarray]:
    """Payloads from a mix of codecs (full, fp16, topk with per-worker K, adaptive)."""
    codecs = [
        TopKCodec(int(rng.integers(1, vocab // 2))),
        AdaptiveTopKCodec(epsilon=0.1, k_max=vocab // 3),
        TopKCodec(5, value_dtype="fp16", index_bytes=3),
        FullCodec() if mixed else TopKCodec(vocab),
        FullCodec("fp16") if mixed else AdaptiveTopKCodec(0.01, vocab, value_dtype="fp16"),
    ]
    payloads = []
    for i in range(n_workers):
        p = softmax_rows(rng, n_pos, vocab, scale=float(rng.uniform(0.5, 4.0)))
        payloads.append(decode_any(codecs[i % len(codecs)].encode(p)))
    return payloads, rng.dirichlet(np.ones(n_workers))


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_aggregate_equals_weighted_sum_of_reconstructions(
    method: str, mixed: bool, seed: int
) -> None:
    rng = np.random.default_rng(100 + seed)
    n_workers, n_pos, vocab = [1, 3, 5, 6][seed], int(rng.integers(1, 6)), 300
    payloads, w = random_round(rng, n_workers, n_pos, vocab, mixed)
    n_q = int(rng.integers(0, n_pos + 1))  # q for the first G positions only, G in 0..P
    q = softmax_rows(rng, n_q, vocab) if n_q else None
    if q is not None and not payloads[0].is_dense:
        # position 0: q only on worker 0's kept set -> worker 0 falls back to uniform there
        q[0] = 0.0
        q[0, payloads[0].indices[0]] = 1.0 / len(payloads[0].indices[0])
    expected = sum(wi * reconstruct(pl, method, q) for wi, pl in zip(w, payloads, strict=True))
    got = aggregate(payloads, w, method, q)
    assert got.dtype == np.float32 and got.shape == (n_pos, vocab)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (got >= 0).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_aggregate_rows_and_entries_are_bit_for_bit_the_dense_values(
    method: str, mixed: bool, seed: int
) -> None:
    """Acceptance reads p_hat by parts (Aggregate.entry / .row): each value must be exactly
    what the dense array holds, or a replay could diverge from its record."""
    rng = np.random.default_rng(300 + seed)
    n_workers, n_pos, vocab = [1, 2, 3, 5, 6, 8][seed], int(rng.integers(1, 6)), 300
    payloads, w = random_round(rng, n_workers, n_pos, vocab, mixed)
    n_q = int(rng.integers(0, n_pos + 1))
    q = softmax_rows(rng, n_q, vocab) if n_q else None
    if seed == 5:  # a renormalize row with no kept mass, and a K = V row, in the mix
        payloads[0] = sparse(vocab, *[([1, 2], [0.0, 0.0])] * n_pos)
        payloads[1] = sparse(vocab, *[(list(range(vocab)), [1.0 / vocab] * vocab)] * n_pos)
    parts = Aggregate(payloads, w, method, q)
    dense = parts.dense()
    np.testing.assert_array_equal(dense, aggregate(payloads, w, method, q))
    for j in range(n_pos):
        np.testing.assert_array_equal(parts.row(j), dense[j])
        kept = [int(i) for pl in payloads if not pl.is_dense for i in pl.indices[j]]
        for x in {*kept, *rng.integers(0, vocab, 20).tolist()}:  # on S and off it
            assert parts.entry(j, x) == dense[j, x], (j, x)


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
@pytest.mark.parametrize("value_dtype", ["fp32", "fp16", "q8"])
def test_one_k_rounds_aggregated_at_once_give_the_row_by_row_bits(
    method: str, value_dtype: str
) -> None:
    """Every worker top-K with one K: Aggregate takes all of them at once. Adding a dense
    payload of weight 0 changes nothing but sends the round down the row-by-row path; both
    must give the same bits."""
    rng = np.random.default_rng(21)
    vocab, n_pos, n_workers = 400, 5, 7
    codec = TopKCodec(16, value_dtype=value_dtype)
    payloads = [
        decode_any(codec.encode(softmax_rows(rng, n_pos, vocab, scale=3.0)))
        for _ in range(n_workers)
    ]
    payloads[2] = sparse(vocab, *[(list(range(16)), [0.0] * 16)] * n_pos)  # rho = 0 rows
    w = np.append(rng.dirichlet(np.ones(n_workers)), 0.0)
    w[1] = 0.0  # a zero weight inside the batch too
    w /= w.sum()
    dense_zero = decode_any(FullCodec().encode(softmax_rows(rng, n_pos, vocab)))
    batched = Aggregate(payloads, w[:-1], method)
    by_rows = Aggregate([*payloads, dense_zero], w, method)
    np.testing.assert_array_equal(batched.dense(), by_rows.dense())
    for j in range(n_pos):
        for x in payloads[0].indices[j][:4]:
            assert batched.entry(j, int(x)) == by_rows.entry(j, int(x))


@pytest.mark.parametrize("greedy", [False, True])
def test_acceptance_by_parts_equals_acceptance_on_the_dense_target(greedy: bool) -> None:
    rng = np.random.default_rng(11)
    vocab, gamma = 300, 4
    for _ in range(40):
        payloads, w = random_round(rng, 3, gamma + 1, vocab, mixed=bool(rng.integers(2)))
        q = softmax_rows(rng, gamma, vocab, scale=3.0)
        drafts = [int(rng.choice(vocab, p=q[j] / q[j].sum())) for j in range(gamma)]
        u = RoundUniforms.draw(rng, gamma)
        parts = Aggregate(payloads, w, "residual-mass", q)
        assert speculative_accept(drafts, q, parts, u, greedy) == speculative_accept(
            drafts, q, parts.dense(), u, greedy
        )


def test_aggregate_draft_guided_fallback_rows_match_reference() -> None:
    payloads = [HAND, sparse(5, ([0, 4], [0.5, 0.25]))]
    q_on_s = np.array([[0.0, 0.5, 0.0, 0.5, 0.0]])  # worker 0: no q mass on C -> uniform
    expected = 0.5 * reconstruct(payloads[0], "draft-guided", q_on_s) + 0.5 * reconstruct(
        payloads[1], "draft-guided", q_on_s
    )
    np.testing.assert_allclose(
        aggregate(payloads, [0.5, 0.5], "draft-guided", q_on_s), expected, atol=1e-7
    )
    # worker 0 uniform: [1/12, 1/4, 1/12, 1/2, 1/12]; worker 1 guided: [1/2, 1/8, 0, 1/8, 1/4]
    np.testing.assert_allclose(expected[0], [7 / 24, 3 / 16, 1 / 24, 5 / 16, 1 / 6], atol=1e-15)


def test_aggregate_writes_into_out_and_skips_zero_weights() -> None:
    rng = np.random.default_rng(7)
    payloads, _ = random_round(rng, 3, 2, 40, mixed=True)
    out = np.full((2, 40), 99.0, np.float32)
    got = aggregate(payloads, [0.0, 1.0, 0.0], "residual-mass", out=out)
    assert got is out
    np.testing.assert_allclose(got, reconstruct(payloads[1], "residual-mass"), atol=1e-7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda pl: aggregate([], [], "renormalize"), "at least one payload"),
        (lambda pl: aggregate(pl, [0.5, 0.4], "renormalize"), "sum to 1"),
        (lambda pl: aggregate(pl, [1.5, -0.5], "renormalize"), ">= 0"),
        (lambda pl: aggregate(pl, [1.0], "renormalize"), "one weight per payload"),
        (lambda pl: aggregate(pl, [0.5, 0.5], "average"), "unknown reconstruction"),
        (
            lambda pl: aggregate(pl, [0.5, 0.5], "draft-guided", np.ones((3, 5)) / 5),
            "G <= P=2",
        ),
        (
            lambda pl: aggregate(pl, [0.5, 0.5], "renormalize", out=np.empty((2, 5))),
            "float32",
        ),
        (
            lambda pl: aggregate(
                [pl[0], sparse(6, ([0], [1.0]), ([0], [1.0]))], [0.5, 0.5], "renormalize"
            ),
            "worker 1: payload has V=6",
        ),
        (
            lambda pl: aggregate([pl[0], sparse(5, ([0], [1.0]))], [0.5, 0.5], "renormalize"),
            "worker 1: payload has V=5, P=1",
        ),
    ],
)
def test_aggregate_validates_its_inputs(
    call: Callable[[list[Payload]], object], message: str
) -> None:
    two = [sparse(5, ([1], [0.5]), ([2], [0.5])), sparse(5, ([3], [0.5]), ([4], [0.5]))]
    with pytest.raises(ValueError, match=message):
        call(two)
