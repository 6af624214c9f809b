"""Step 2 of the study (specfed.study.grid): the bounds on synthetic distributions, the
softmax precisions, K per K/|V|, and the grid's independence of the chunk size.

Notation: p_i worker distributions, w_i weights, q draft, K kept entries, eps_i = 1 - rho_i,
alpha(q, p) = sum_v min(q(v), p(v)).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from specfed.reconstruct import RECONSTRUCTIONS
from specfed.study import grid
from specfed.study.grid import evaluate, k_for_fraction, summarize
from specfed.study.outputs import ABS_TOL, CORRECT_BOUNDS, VIOLATIONS
from tests.study_helpers import logits, synthetic_cfg, synthetic_records, targets


def test_k_for_fraction_is_at_least_one_and_at_most_v():
    assert k_for_fraction(0.0001, 2048) == 1
    assert k_for_fraction(1.0, 2048) == 2048
    assert k_for_fraction(0.5, 3) == 2  # halves round up


@pytest.mark.parametrize("temperature", [0.8, 1.2])
def test_bounds_hold_for_every_k_and_reconstruction(temperature):
    t = targets(temperature=temperature)
    v = t.p_i.shape[2]
    printed = 0
    for k in (1, 15, 300, v - 1, v):
        payloads = t.encode(k)
        for method in RECONSTRUCTIONS:
            m = t.metrics(payloads, method)
            tol = m["slack"] + ABS_TOL
            assert (m["l1"] <= m["bound_l1"] + tol).all()  # Theorem 2
            assert (m["dalpha"] <= 0.5 * m["l1"] + tol).all()  # Theorem 3, 1st step
            assert (m["dalpha"] <= m["bound_alpha"] + tol).all()  # Theorem 3 (with the 1/2)
            assert (m["l1_i"] <= 2 * m["eps_i"] + t.slack_i + ABS_TOL).all()  # Lemma 1
            for name in CORRECT_BOUNDS:
                assert not m[f"viol_{name}"].any(), (k, method, name)
            printed += int(m["viol_printed_thm3"].sum())
            if k == v:  # nothing left out: exact for every reconstruction
                assert np.all(m["l1"] == 0.0) and np.all(m["dalpha"] == 0.0)
    assert printed > 0  # the printed (no 1/2) middle step fails on these distributions


def test_metrics_flag_every_check_of_the_outputs_vocabulary():
    t = targets(n_workers=1, c=3, v=200)
    m = t.metrics(t.encode(5), "renormalize")
    assert {k for k in m if k.startswith("viol_")} == {f"viol_{n}" for n in VIOLATIONS}
    assert set(CORRECT_BOUNDS) == set(VIOLATIONS) - {"printed_thm3"}


def test_renormalize_l1_is_exactly_two_eps_for_one_worker():
    t = targets(n_workers=1)
    for k in (1, 40, 1000):
        m = t.metrics(t.encode(k), "renormalize")
        eps = m["eps_i"][0]
        assert eps.min() > 1e-3  # a real test: eps is not ~0
        np.testing.assert_allclose(m["l1"], 2 * eps, rtol=0, atol=float(t.slack.max()) + 1e-9)
        np.testing.assert_allclose(m["l1"], m["bound_l1"], rtol=0, atol=1e-6)
        assert m["viol_printed_thm3"].all()  # 2 eps > eps at every position


def test_fp64_softmax_is_normalized_where_fp32_drifts():
    lg = logits(6, 150_000, seed=3, scale=2.0).to(torch.bfloat16)
    p64 = grid.softmax(lg, 1.2, "fp64")
    p32 = grid.softmax(lg, 1.2, "fp32")
    assert p64.dtype == p32.dtype == np.float32
    defect = lambda p: np.abs(1 - p.astype(np.float64).sum(axis=1)).max()  # noqa: E731
    assert defect(p64) < 1e-7
    assert defect(p32) >= defect(p64)
    np.testing.assert_allclose(p32, p64, rtol=1e-3, atol=1e-12)
    with pytest.raises(ValueError, match="fp16"):
        grid.softmax(lg, 1.0, "fp16")


def test_evaluate_is_the_same_whatever_the_chunk_size():
    recs = synthetic_records()
    a = evaluate(recs, synthetic_cfg(chunk_positions=32), progress=False)
    b = evaluate(recs, synthetic_cfg(chunk_positions=3), progress=False)
    assert len(a) == 2 * 7 * 2 * 3 * 3
    keys = ["prompt_id", "position", "temperature", "k", "reconstruction"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    s = summarize(a)
    assert len(s) == 2 * 3 * 3
    assert (s["n_positions"] == 14).all()
    assert s[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    c = summarize(evaluate(recs, synthetic_cfg(softmax="fp32"), progress=False))
    assert c[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    # the weighted mixture is what the bound uses: 2 sum_i w_i eps_i
    np.testing.assert_allclose(a["bound_l1"], 2 * (0.3 * a["eps_w1"] + 0.7 * a["eps_w2"]))
    # plain names in the tables (not enum objects): the CSV and the analysis side read them
    assert {type(r) for r in a["reconstruction"]} == {str}
    assert list(dict.fromkeys(c["reconstruction"])) == list(RECONSTRUCTIONS)  # study order
