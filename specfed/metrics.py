"""Fidelity metrics for compressed transmission, and the paper's bounds as numbers.

Notation (the paper's, arXiv 2604.25777, and Leviathan et al.'s): p target, q draft,
P positions (gamma + 1), V vocabulary size, K kept entries, rho kept mass, eps = 1 - rho,
w_i worker weights; p_hat the server's reconstruction of p.

Distributions are arrays whose last axis is the vocabulary: [V], [P, V], [N, P, V], ...;
every metric reduces that axis and returns float64 with the leading shape.

Bounds, per position (docs/codecs.md and tests/test_bounds.py):

- Lemma 1:   ||p_i - p_hat_i||_1 = 2 eps_i (renormalize), <= 2 eps_i (residual-mass,
  draft-guided).
- Theorem 2: ||p - p_hat||_1 <= sum_i w_i ||p_i - p_hat_i||_1 <= 2 sum_i w_i eps_i.
- Theorem 3: |alpha(q, p) - alpha(q, p_hat)| <= (1/2) ||p - p_hat||_1 <= sum_i w_i eps_i.
  The printed paper drops the 1/2 in the middle step, which makes that step false (renormalize
  reaches ||p - p_hat||_1 = 2 eps); the end-to-end bound sum_i w_i eps_i is right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "acceptance_bias",
    "alpha",
    "kept_mass_eps",
    "l1",
    "lemma1_bound",
    "theorem2_bound",
    "theorem3_bound",
    "tv",
]


def l1(p: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    """||p - p_hat||_1 over the last axis: [..., V], [..., V] -> [...] float64."""
    return np.abs(np.asarray(p, np.float64) - np.asarray(p_hat, np.float64)).sum(axis=-1)


def tv(p: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    """Total variation distance (1/2) ||p - p_hat||_1: [..., V] -> [...] float64."""
    return 0.5 * l1(p, p_hat)


def kept_mass_eps(p: np.ndarray, k: int) -> np.ndarray:
    """eps = 1 - (mass of the K largest entries) over the last axis: [..., V] -> [...] float64.

    The eps a top-K codec leaves at each position of p (K > V is clamped to V). Computed
    against a total of 1, as the paper does; clipped to [0, 1].
    """
    p64 = np.asarray(p, np.float64)
    k = min(int(k), p64.shape[-1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = np.partition(p64, p64.shape[-1] - k, axis=-1)[..., p64.shape[-1] - k :]
    return np.clip(1.0 - top.sum(axis=-1), 0.0, 1.0)


def alpha(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Acceptance rate alpha(q, p) = sum_v min(q(v), p(v)) = 1 - TV(q, p).

    [..., V], [..., V] -> [...] float64: the probability that speculative sampling accepts a
    token drafted from q when verifying against p.
    """
    return np.minimum(np.asarray(q, np.float64), np.asarray(p, np.float64)).sum(axis=-1)


def acceptance_bias(q: np.ndarray, p: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    """|alpha(q, p) - alpha(q, p_hat)|: [..., V] x 3 -> [...] float64 (the paper's Fig. 3)."""
    return np.abs(alpha(q, p) - alpha(q, p_hat))


def lemma1_bound(eps: np.ndarray | float) -> np.ndarray:
    """Lemma 1: ||p_i - p_hat_i||_1 <= 2 eps_i (equality for renormalize). Elementwise."""
    return 2.0 * np.asarray(eps, np.float64)


def theorem2_bound(weights: Sequence[float] | np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Theorem 2: ||p - p_hat||_1 <= 2 sum_i w_i eps_i.

    Args:
        weights: [N] w_i.
        eps: [N] or [N, P] eps_i (per worker, optionally per position).

    Returns:
        [] or [P] float64.
    """
    return 2.0 * theorem3_bound(weights, eps)


def theorem3_bound(weights: Sequence[float] | np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Theorem 3 (with the 1/2): |alpha(q, p) - alpha(q, p_hat)| <= sum_i w_i eps_i.

    Args:
        weights: [N] w_i.
        eps: [N] or [N, P] eps_i.

    Returns:
        [] or [P] float64.
    """
    w = np.asarray(weights, np.float64)
    e = np.asarray(eps, np.float64)
    if w.ndim != 1 or e.shape[:1] != w.shape:
        raise ValueError(f"weights [N] and eps [N, ...] must agree: {w.shape} vs {e.shape}")
    return np.tensordot(w, e, axes=(0, 0))
