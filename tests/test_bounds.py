"""The paper's bounds (Lemma 1, Theorems 2 and 3), checked numerically on random distributions.

Notation: p_i worker i's target, p = sum_i w_i p_i the federated target, p_hat_i its
reconstruction from the top-K message, p_hat = sum_i w_i p_hat_i, q the draft, rho_i the kept
mass and eps_i = 1 - rho_i, all per position; alpha(q, p) = sum_v min(q(v), p(v)).

Test distributions are Dirichlet samples rounded to multiples of 2**-24: exactly representable
in float32 and summing to exactly 1, so "= 2 eps" can be checked to 1e-9 rather than to the
float32 rounding of a row sum.
"""

from __future__ import annotations

import numpy as np
import pytest

from specfed.codecs import Payload, TopKCodec, decode_any
from specfed.metrics import (
    acceptance_bias,
    alpha,
    kept_mass_eps,
    l1,
    lemma1_bound,
    theorem2_bound,
    theorem3_bound,
    tv,
)
from specfed.reconstruct import RECONSTRUCTIONS, aggregate, reconstruct

GRID = 2**24
CONCENTRATIONS = (0.05, 0.3, 1.0)
VOCABS = (50, 1000)
KS = (1, 5, 40)
N_POS = 3
TOL = 1e-12  # float64 slack on inequalities


def dyadic_dirichlet(
    rng: np.random.Generator, concentration: float, n: int, vocab: int
) -> np.ndarray:
    """[n, V] float32 rows of Dirichlet(concentration), in multiples of 2**-24, summing to 1."""
    x = rng.dirichlet(np.full(vocab, concentration), size=n) * GRID
    counts = np.floor(x).astype(np.int64)
    for row, frac in zip(counts, x - counts, strict=True):
        deficit = GRID - int(row.sum())  # < V: hand one unit to the largest remainders
        row[np.argsort(-frac, kind="stable")[:deficit]] += 1
    assert (counts.sum(axis=1) == GRID).all()
    return (counts / GRID).astype(np.float32)


def top_k_payload(p: np.ndarray, k: int) -> Payload:
    return decode_any(TopKCodec(k).encode(p))


# ---------------------------------------------------------------------------------------------
# Lemma 1: ||p_i - p_hat_i||_1 = 2 eps_i (renormalize), <= 2 eps_i (the others)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concentration", CONCENTRATIONS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", KS)
def test_lemma1(concentration: float, vocab: int, k: int) -> None:
    rng = np.random.default_rng([int(concentration * 100), vocab, k])
    p = dyadic_dirichlet(rng, concentration, N_POS, vocab)
    q = dyadic_dirichlet(rng, 1.0, N_POS, vocab)
    payload = top_k_payload(p, k)
    eps = payload.eps
    np.testing.assert_array_equal(eps, kept_mass_eps(p, k))  # exact: dyadic sums
    assert (eps > 0).any() or concentration < 0.1

    l1_renorm = l1(p, reconstruct(payload, "renormalize"))
    np.testing.assert_allclose(l1_renorm, lemma1_bound(eps), rtol=0, atol=1e-9)
    for method in ("residual-mass", "draft-guided"):
        l1_method = l1(p, reconstruct(payload, method, q))
        assert (l1_method <= lemma1_bound(eps) + TOL).all(), (method, l1_method, eps)
    # residual-mass is never worse than renormalize, position by position
    assert (l1(p, reconstruct(payload, "residual-mass")) <= l1_renorm + TOL).all()


# ---------------------------------------------------------------------------------------------
# Theorems 2 and 3 on the federated mixture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concentration", CONCENTRATIONS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("n_workers", [1, 2, 4])
@pytest.mark.parametrize("method", RECONSTRUCTIONS)
def test_theorems_2_and_3(concentration: float, vocab: int, n_workers: int, method: str) -> None:
    """Theorem 2: ||p - p_hat||_1 <= sum_i w_i ||p_i - p_hat_i||_1 <= 2 sum_i w_i eps_i.
    Theorem 3: |alpha(q, p) - alpha(q, p_hat)| <= 1/2 ||p - p_hat||_1 <= sum_i w_i eps_i.
    Each worker has its own K (per-worker K is allowed).
    """
    rng = np.random.default_rng([int(concentration * 100), vocab, n_workers])
    w = rng.dirichlet(np.ones(n_workers))
    p_i = [dyadic_dirichlet(rng, concentration, N_POS, vocab) for _ in range(n_workers)]
    payloads = [top_k_payload(p, int(rng.choice(KS))) for p in p_i]
    q_draft = dyadic_dirichlet(rng, 0.5, N_POS - 1, vocab)  # gamma = 2 drafts, bonus has no q

    p = sum(wi * pi.astype(np.float64) for wi, pi in zip(w, p_i, strict=True))
    p_hat_i = [reconstruct(pl, method, q_draft) for pl in payloads]
    p_hat = sum(wi * ph for wi, ph in zip(w, p_hat_i, strict=True))
    eps = np.stack([pl.eps for pl in payloads])  # [N, P]

    # Theorem 2
    lhs = l1(p, p_hat)
    mid = sum(wi * l1(pi, ph) for wi, pi, ph in zip(w, p_i, p_hat_i, strict=True))
    bound2 = theorem2_bound(w, eps)
    assert bound2.shape == (N_POS,)
    assert (lhs <= mid + TOL).all(), (lhs, mid)
    assert (mid <= bound2 + TOL).all(), (mid, bound2)
    # ... and the server's float32 fast path satisfies it too
    fast = aggregate(payloads, w, method, q_draft)
    assert (l1(p, fast) <= bound2 + 1e-6).all()

    # Theorem 3, for the draft itself and for unrelated q's
    bound3 = theorem3_bound(w, eps)
    np.testing.assert_allclose(bound2, 2 * bound3, rtol=1e-15)
    for q in (
        np.vstack([q_draft, dyadic_dirichlet(rng, 0.5, 1, vocab)]),
        dyadic_dirichlet(rng, concentration, N_POS, vocab),
        dyadic_dirichlet(rng, 5.0, N_POS, vocab),
    ):
        bias = acceptance_bias(q, p, p_hat)
        assert (bias <= 0.5 * lhs + TOL).all(), (bias, lhs)
        assert (0.5 * lhs <= bound3 + TOL).all(), (lhs, bound3)


def test_printed_theorem3_chain_without_the_half_is_false() -> None:
    """The middle step of Theorem 3 needs its 1/2. A two-token counterexample.

    Derivation. alpha(q, p) = sum_v min(q(v), p(v)) = 1 - TV(q, p) = 1 - 1/2 ||q - p||_1 for
    distributions q, p (min(a, b) = (a + b - |a - b|) / 2, summed over v). So

        |alpha(q, p) - alpha(q, p_hat)| = 1/2 | ||q - p_hat||_1 - ||q - p||_1 |
                                        <= 1/2 ||p - p_hat||_1      (triangle inequality)
                                        <= 1/2 * 2 sum_i w_i eps_i  (Theorem 2)
                                         = sum_i w_i eps_i.

    The printed chain drops the 1/2 in the middle:

        |alpha(q, p) - alpha(q, p_hat)| <= ||p - p_hat||_1 <= sum_i w_i eps_i.

    Its first step is true (just loose) but its second is false: Theorem 2 only gives
    ||p - p_hat||_1 <= 2 sum_i w_i eps_i, and renormalize reaches it (Lemma 1).

    Counterexample: V = 2, one worker (w = 1), K = 1, p = (3/4, 1/4), renormalize.
    S = {0}, rho = 3/4, eps = 1/4, p_hat = (1, 0), ||p - p_hat||_1 = 1/4 + 1/4 = 1/2 > eps.
    With q = (0, 1): alpha(q, p) = 1/4, alpha(q, p_hat) = 0, so the bias is 1/4: the 1/2 form
    holds with equality at both steps (1/4 = 1/2 * 1/2 = eps), so it is also tight.
    """
    p = np.array([[0.75, 0.25]], np.float32)
    q = np.array([[0.0, 1.0]])
    payload = top_k_payload(p, 1)
    p_hat = reconstruct(payload, "renormalize")
    np.testing.assert_array_equal(p_hat, [[1.0, 0.0]])
    w, eps = [1.0], payload.eps[None, :]  # [N=1, P=1]
    np.testing.assert_array_equal(eps, [[0.25]])

    dist = l1(p, p_hat)
    printed_middle_ok = dist <= theorem3_bound(w, eps)
    assert dist[0] == 0.5 and not printed_middle_ok[0], "printed chain: 1/2 <= 1/4 is false"

    bias = acceptance_bias(q, p, p_hat)
    np.testing.assert_array_equal(alpha(q, p), [0.25])
    np.testing.assert_array_equal(alpha(q, p_hat), [0.0])
    assert bias[0] == 0.5 * dist[0] == theorem3_bound(w, eps)[0] == 0.25  # 1/2 form, tight
    assert bias[0] <= dist[0]  # the printed first step is merely loose


# ---------------------------------------------------------------------------------------------
# The metric helpers themselves
# ---------------------------------------------------------------------------------------------


def test_metric_helpers_on_hand_made_numbers() -> None:
    p = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    p_hat = np.array([[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    q = np.array([[0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(l1(p, p_hat), [0.5, 0.0])
    np.testing.assert_array_equal(tv(p, p_hat), [0.25, 0.0])
    np.testing.assert_array_equal(alpha(q, p), [0.25, 0.25])
    np.testing.assert_array_equal(alpha(q, p_hat), [0.5, 0.25])
    np.testing.assert_array_equal(acceptance_bias(q, p, p_hat), [0.25, 0.0])
    np.testing.assert_array_equal(kept_mass_eps(p, 1), [0.5, 0.75])
    np.testing.assert_array_equal(kept_mass_eps(p, 9), [0.0, 0.0])
    np.testing.assert_array_equal(lemma1_bound(np.array([0.1, 0.25])), [0.2, 0.5])
    w = [0.25, 0.75]
    np.testing.assert_allclose(theorem3_bound(w, np.array([0.2, 0.4])), 0.35, rtol=1e-15)
    np.testing.assert_allclose(theorem2_bound(w, np.array([0.2, 0.4])), 0.7, rtol=1e-15)
    np.testing.assert_allclose(
        theorem3_bound(w, np.array([[0.2, 0.0], [0.4, 1.0]])), [0.35, 0.75], rtol=1e-15
    )
    with pytest.raises(ValueError, match="must agree"):
        theorem3_bound(w, np.array([0.1, 0.2, 0.3]))
