"""Speculative acceptance on the aggregated target (Leviathan et al. 2023, Alg. 1).

Notation: x_1..x_gamma drafted tokens, q^(j) the draft distribution x_j was drawn from,
p_hat^(j) the server's aggregated (reconstructed) target at the same position, and
p_hat^(gamma+1) the bonus position. gamma = 0 is federated autoregressive decoding: no
drafts, one token sampled from p_hat^(1).

Randomness comes in as explicit uniforms (see `RoundUniforms`), a fixed number per round, so
two runs that differ only in how distributions are transmitted use the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Target(Protocol):
    """p_hat given position by position (specfed.reconstruct.Aggregate): acceptance reads
    one entry per drafted token and one whole row, never all P x V."""

    def entry(self, j: int, x: int) -> np.float32: ...

    def row(self, j: int) -> np.ndarray: ...


_BLOCK = 1024  # entries per block of the two-level inverse CDF


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF sample from a 1-D distribution with one uniform u in [0, 1).

    Using an explicit uniform (instead of a generator call inside) makes every random
    decision a fixed draw, so two runs that differ only in transmission stay coupled.
    Two levels keep it fast at |V| = 151,936: block sums (vectorized) locate the block
    holding u * total, then a cumulative sum over that one block locates the entry; a
    single cumsum over V is sequential and ~8x slower. Never returns a zero-mass entry.
    """
    v = len(probs)
    n_full = v - v % _BLOCK
    sums = probs[:n_full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if n_full < v:
        sums = np.append(sums, probs[n_full:].sum(dtype=np.float64))
    cdf = np.cumsum(sums)
    target = u * cdf[-1]
    b = min(int(np.searchsorted(cdf, target, side="right")), len(cdf) - 1)
    while sums[b] <= 0 and b > 0:  # rounding put u * total past the last massive block
        b -= 1
    seg = probs[b * _BLOCK : (b + 1) * _BLOCK]
    inner = np.cumsum(seg, dtype=np.float64)
    i = int(np.searchsorted(inner, target - (cdf[b - 1] if b else 0.0), side="right"))
    if i >= len(seg) or seg[i] <= 0:  # rounding at the block edge: last entry with mass
        i = int(np.flatnonzero(seg > 0)[-1]) if i >= len(seg) else i
        while seg[i] <= 0:
            i += 1
    return b * _BLOCK + i


@dataclass(frozen=True)
class RoundUniforms:
    """The 2*gamma + 1 uniforms one round consumes, whatever happens in it.

    Attributes:
        draft: [gamma] one per drafted token (inverse-CDF sampling from q^(j)).
        accept: [gamma] one per acceptance test.
        final: one for the residual sample at the first rejection, or the bonus token.
    """

    draft: np.ndarray
    accept: np.ndarray
    final: float

    @classmethod
    def draw(cls, rng: np.random.Generator, gamma: int) -> RoundUniforms:
        """Draw a round's uniforms from `rng` (always exactly 2*gamma + 1 values)."""
        u = rng.random(2 * gamma + 1)
        return cls(draft=u[:gamma], accept=u[gamma : 2 * gamma], final=float(u[-1]))


@dataclass(frozen=True)
class _Dense:
    """A dense [P, V] p_hat as a Target."""

    p: np.ndarray

    def entry(self, j: int, x: int) -> np.float32:
        return self.p[j, x]  # as stored (float32 or float64)

    def row(self, j: int) -> np.ndarray:
        return self.p[j]


def speculative_accept(
    drafts: Sequence[int],
    q: np.ndarray,
    p_hat: np.ndarray | Target,
    uniforms: RoundUniforms,
    greedy: bool = False,
) -> tuple[int, int]:
    """Run speculative acceptance; return (n_accepted, next_token).

    Args:
        drafts: x_1..x_gamma.
        q: [gamma, V] draft distributions.
        p_hat: [gamma + 1, V] aggregated target distributions, or a `Target` giving them
            entry by entry and row by row (the same draws give the same result).
        uniforms: this round's draws.
        greedy: T = 0; accept x_j iff it is argmax p_hat^(j), emit argmax at the first
            mismatch or at the bonus position (speculative sampling with one-hot p, q).

    Accept x_j with probability min(1, p_hat(x_j) / q(x_j)). At the first rejection sample
    from norm(max(0, p_hat - q)) and stop; if all gamma are accepted, sample the bonus token
    from p_hat^(gamma+1). The emitted tokens are drafts[:n_accepted] + [next_token].
    """
    gamma = len(drafts)
    target: Target = _Dense(p_hat) if isinstance(p_hat, np.ndarray) else p_hat
    row, entry = target.row, target.entry
    for j, x in enumerate(drafts):
        if greedy:
            best = int(row(j).argmax())
            if best != x:
                return j, best
            continue
        # u < p/q written without division; q(x) > 0 since x was drawn from q.
        if uniforms.accept[j] * q[j, x] < entry(j, x):
            continue
        p_j = row(j)
        residual = np.maximum(p_j - q[j], 0.0)
        if residual.sum() <= 0.0:  # p_hat == q up to rounding: any sample from p_hat is exact
            residual = p_j
        return j, sample_index(residual, uniforms.final)
    bonus = row(gamma)
    return gamma, int(bonus.argmax()) if greedy else sample_index(bonus, uniforms.final)
