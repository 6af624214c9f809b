"""speculative_accept on hand-made distributions: exact acceptance, residual, bonus."""

from __future__ import annotations

import numpy as np
import pytest

from specfed.sampling import RoundUniforms, speculative_accept


def U(accept, final, gamma=None):
    accept = np.asarray(accept, dtype=float)
    return RoundUniforms(draft=np.zeros(len(accept)), accept=accept, final=final)


Q = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
P = np.array([[0.25, 0.25, 0.5], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]])


def test_accept_probability_is_min_one_p_over_q():
    # x1 = 0: p/q = 0.5 -> accepted iff u < 0.5
    assert speculative_accept([0, 2], Q, P, U([0.49, 0.0], 0.0))[0] == 2
    n, tok = speculative_accept([0, 2], Q, P, U([0.51, 0.0], 0.0))
    assert n == 0
    # residual norm(max(0, p - q)) = (0, 0, 1): token 2 whatever the uniform
    assert tok == 2


def test_all_accepted_samples_bonus():
    assert speculative_accept([0, 2], Q, P, U([0.0, 0.99], 0.3)) == (2, 2)


def test_gamma_zero_samples_from_p():
    p = np.array([[0.1, 0.6, 0.3]])
    empty = np.zeros((0, 3))
    got = [speculative_accept([], empty, p, U([], u))[1] for u in (0.05, 0.5, 0.69, 0.71)]
    assert got == [0, 1, 1, 2]


def test_greedy_accepts_argmax_only():
    assert speculative_accept([2, 2], Q, P, U([1, 1], 0.0), greedy=True) == (2, 2)
    assert speculative_accept([0, 2], Q, P, U([0, 0], 0.0), greedy=True) == (0, 2)


def test_residual_falls_back_to_p_when_p_equals_q():
    q = np.array([[0.5, 0.5]])
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    # u * q(x) = 0.5 * 1.0 is not < 0.5: rejected; max(0, p - q) = 0 -> sample p
    assert speculative_accept([1], q, p, U([1.0], 0.75)) == (0, 1)


def test_round_uniforms_fixed_count():
    rng = np.random.default_rng(0)
    u = RoundUniforms.draw(rng, 4)
    assert u.draft.shape == (4,) and u.accept.shape == (4,) and 0 <= u.final < 1
    assert RoundUniforms.draw(np.random.default_rng(0), 4).final == pytest.approx(u.final)
