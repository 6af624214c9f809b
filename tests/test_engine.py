"""The federated SD engine: KV sessions, losslessness, coupling, vocabulary checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import specfed.engine as engine
from specfed.engine import FederatedGenerator, LocalWorker, mixture
from specfed.messages import Transmission
from specfed.models import KVSession, ModelError, make_tiny_model, probabilities
from specfed.options import Mode
from specfed.sampling import sample_index

CONTEXT = [1, 2, 3]
WEIGHTS = (0.3, 0.7)


def make_generator(tiny_family, gamma, **kw):
    draft, w1, w2 = tiny_family
    workers = [LocalWorker("w1", w1), LocalWorker("w2", w2)]
    return FederatedGenerator(draft, workers, WEIGHTS, gamma=gamma, **kw)


def test_kv_session_crop_matches_fresh_forward(tiny_family):
    """Cropping and re-appending gives the logits of a fresh full forward pass."""
    lm = tiny_family[1]
    s = KVSession(lm)
    s.forward(0, [1, 2, 3, 4, 5, 6], 1)
    got = s.forward(3, [7, 0], 2)  # drop 4 5 6, append 7 0
    with torch.inference_mode():
        ref = lm.model(input_ids=torch.tensor([[1, 2, 3, 7, 0]])).logits[0, -2:]
    assert s.tokens == [1, 2, 3, 7, 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="holds 5"):
        s.forward(6, [1], 1)


def test_sync_reuses_common_prefix(tiny_family):
    s = KVSession(tiny_family[1])
    s.sync([1, 2, 3, 4], 1)
    logits = s.sync([1, 2, 3, 4], 2)  # nothing new: the last 2 tokens are re-fed
    assert logits.shape == (2, 8) and s.tokens == [1, 2, 3, 4]


def test_sample_index_inverse_cdf():
    p = np.array([0.2, 0.0, 0.5, 0.3])
    assert [sample_index(p, u) for u in (0.0, 0.19, 0.2, 0.69, 0.7, 0.999)] == [0, 0, 2, 2, 3, 3]


def _samples(gen, n, n_tokens):
    """First n_tokens emitted tokens for seeds 0..n-1 (max_new_tokens = gamma+1 so the first
    round is a full speculative round)."""
    out = np.empty((n, n_tokens), dtype=np.int64)
    for seed in range(n):
        toks = gen.generate(CONTEXT, max(gen.gamma + 1, n_tokens), seed=seed).tokens
        out[seed] = toks[:n_tokens]
    return out


def _chi2_pvalue(observed_counts, expected_probs):
    """Chi-square goodness of fit, merging cells with expected count < 5 into one."""
    n = observed_counts.sum()
    exp = expected_probs * n
    small = exp < 5
    obs_m = np.append(observed_counts[~small], observed_counts[small].sum())
    exp_m = np.append(exp[~small], exp[small].sum())
    keep = exp_m > 0
    return stats.chisquare(obs_m[keep], exp_m[keep] * obs_m[keep].sum() / exp_m[keep].sum()).pvalue


def _expected(tiny_family, temperature=1.0):
    """Exact mixture p for the first token and the joint of the first two tokens."""
    _, w1, w2 = tiny_family
    p1 = mixture([w1, w2], WEIGHTS, CONTEXT, temperature)
    joint = np.stack(
        [p1[a] * mixture([w1, w2], WEIGHTS, [*CONTEXT, a], temperature) for a in range(8)]
    )
    return p1, joint


def _wrong_accept(drafts, q, p_hat, uniforms, greedy=False):
    """Negative control: the classic bug of resampling from p_hat (not max(0, p_hat - q))
    after a rejection."""
    for j, x in enumerate(drafts):
        if uniforms.accept[j] * q[j, x] < p_hat.entry(j, x):
            continue
        return j, sample_index(p_hat.row(j), uniforms.final)
    return len(drafts), sample_index(p_hat.row(len(drafts)), uniforms.final)


N_SAMPLES = 2500


@pytest.mark.statistical
@pytest.mark.parametrize("gamma", [1, 3])
def test_full_transmission_is_lossless(tiny_family, gamma):
    """Emitted tokens follow the mixture p exactly (first token and 2-token continuation)."""
    p1, joint = _expected(tiny_family)
    gen = make_generator(tiny_family, gamma, measure_fidelity=False)
    s = _samples(gen, N_SAMPLES, 2)
    pv1 = _chi2_pvalue(np.bincount(s[:, 0], minlength=8), p1)
    pv2 = _chi2_pvalue(np.bincount(s[:, 0] * 8 + s[:, 1], minlength=64), joint.ravel())
    assert pv1 > 1e-3 and pv2 > 1e-3, (pv1, pv2)


@pytest.mark.statistical
def test_negative_control_fails(tiny_family, monkeypatch):
    """The same test rejects a wrong residual rule, so it has the power to catch bugs."""
    p1, joint = _expected(tiny_family)
    monkeypatch.setattr(engine, "speculative_accept", _wrong_accept)
    gen = make_generator(tiny_family, 3, measure_fidelity=False)
    s = _samples(gen, N_SAMPLES, 2)
    pv1 = _chi2_pvalue(np.bincount(s[:, 0], minlength=8), p1)
    pv2 = _chi2_pvalue(np.bincount(s[:, 0] * 8 + s[:, 1], minlength=64), joint.ravel())
    assert min(pv1, pv2) < 1e-6, (pv1, pv2)


def test_draft_and_target_actually_differ(tiny_family):
    """Guard for the statistical tests: acceptance is well below 1 with these models."""
    gen = make_generator(tiny_family, 3, measure_fidelity=False)
    results = [gen.generate(CONTEXT, 16, seed=s) for s in range(20)]
    acc = sum(r.n_accepted for r in results) / sum(r.n_drafted for r in results)
    assert 0.2 < acc < 0.9, acc


@pytest.mark.parametrize("reconstruction", ["renormalize", "residual-mass", "draft-guided"])
def test_topk_with_k_equal_v_is_full(tiny_family, reconstruction):
    full = make_generator(tiny_family, 3, reconstruction=reconstruction)
    topk = make_generator(
        tiny_family, 3, reconstruction=reconstruction, transmissions=Transmission(Mode.TOPK, k=8)
    )
    for seed in range(10):
        a = full.generate(CONTEXT, 12, seed=seed)
        b = topk.generate(CONTEXT, 12, seed=seed)
        assert a.tokens == b.tokens
        assert [r.n_accepted for r in a.rounds] == [r.n_accepted for r in b.rounds]


def test_same_seed_same_output_and_records(tiny_family):
    gen = make_generator(tiny_family, 2, transmissions=Transmission(Mode.TOPK, k=3))
    a, b = gen.generate(CONTEXT, 10, seed=7), gen.generate(CONTEXT, 10, seed=7)
    assert a.tokens == b.tokens and len(a.tokens) == 10
    rows = a.round_rows()
    assert len(rows) == 2 * len(a.rounds)
    for r in rows:
        assert r["bytes_up"] > 0 and 0 <= r["eps_mean"] <= 1
        assert r["n_emitted"] == min(r["n_accepted"] + 1, 10) or r["round"] == len(a.rounds) - 1
        assert r["local_l1"] == pytest.approx(2 * r["eps_mean"])  # Lemma 1, renormalize
    s = a.summary()
    assert s["new_tokens"] == 10 and s["bytes_up_total"] == sum(r["bytes_up"] for r in rows)


def test_gamma_zero_is_autoregressive(tiny_family):
    """gamma = 0 needs no draft and samples each token from the mixture."""
    _, w1, w2 = tiny_family
    gen = FederatedGenerator(
        None, [LocalWorker("w1", w1), LocalWorker("w2", w2)], WEIGHTS, gamma=0, temperature=0
    )
    res = gen.generate(CONTEXT, 5, seed=0)
    assert [r.n_drafted for r in res.rounds] == [0] * 5
    ctx = list(CONTEXT)
    for tok in res.tokens:  # greedy AR: argmax of the exact mixture each step
        assert tok == int(mixture([w1, w2], WEIGHTS, ctx, 1.0).argmax())
        ctx.append(tok)


def test_greedy_sd_equals_greedy_ar(tiny_family):
    draft, w1, w2 = tiny_family
    workers = [LocalWorker("w1", w1), LocalWorker("w2", w2)]
    ar = FederatedGenerator(None, workers, WEIGHTS, gamma=0, temperature=0)
    sd = FederatedGenerator(draft, workers, WEIGHTS, gamma=3, temperature=0)
    assert sd.generate(CONTEXT, 20, 0).tokens == ar.generate(CONTEXT, 20, 0).tokens


def test_vocabulary_mismatch_refused(tiny_family):
    draft = tiny_family[0]
    other = make_tiny_model(vocab_size=9, seed=5)
    with pytest.raises(ModelError, match=r"tiny-v9-s5.*tiny-v8-s1|tiny-v8-s1.*tiny-v9-s5"):
        FederatedGenerator(draft, [LocalWorker("w1", other)], gamma=2)


def test_bad_arguments_are_clear(tiny_family):
    draft, w1, _ = tiny_family
    with pytest.raises(ValueError, match="weights"):
        FederatedGenerator(draft, [LocalWorker("w1", w1)], [0.5], gamma=2)
    with pytest.raises(ValueError, match="reconstruction"):
        FederatedGenerator(draft, [LocalWorker("w1", w1)], reconstruction="nope")
    with pytest.raises(ValueError, match="draft"):
        FederatedGenerator(None, [LocalWorker("w1", w1)], gamma=2)


def test_probabilities_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    np.testing.assert_allclose(
        probabilities(logits, 0.5)[0], torch.softmax(logits[0] * 2, -1).numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(probabilities(logits, 0)[0], probabilities(logits, 1)[0])


def test_per_worker_k(tiny_family):
    """Each worker can use its own transmission (per-worker K); records show it."""
    gen = make_generator(
        tiny_family, 2, transmissions=[Transmission(Mode.TOPK, k=2), Transmission(Mode.FULL)]
    )
    res = gen.generate(CONTEXT, 6, seed=0)
    for r in res.rounds:
        w1, w2 = r.workers
        assert (w1.transmission, w1.k_mean, w2.transmission, w2.k_mean) == ("topk", 2, "full", 8)
        assert w1.bytes_up < w2.bytes_up and w2.eps_mean < 1e-6 < w1.eps_mean
