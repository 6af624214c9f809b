"""Real pretrained models from the offline bundle.

- CI smoke (not slow): SmolLM2-135M as draft and as a worker process over TCP loopback.
- slow tier (`make test-slow`): the Qwen2.5-Coder pair, greedy SD == greedy AR, and the
  paper's bounds on real distributions.
"""

from __future__ import annotations

import numpy as np
import pytest

from specfed.codecs import make_codec
from specfed.engine import FederatedGenerator, LocalWorker
from specfed.messages import Transmission
from specfed.metrics import alpha, l1
from specfed.models import KVSession, load_model, probabilities
from specfed.options import Mode
from specfed.prompts import load_prompts
from specfed.reconstruct import RECONSTRUCTIONS, reconstruct
from tests.procs import WorkerProc


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", dtype="fp32")


def test_real_smoke_smollm_over_tcp(smollm, tmp_path):
    """One real worker process serving SmolLM2; the server drafts with SmolLM2 too.

    Same model on both sides: full transmission accepts every draft, greedy SD equals
    greedy AR token for token, and top-K at K = 64 keeps most of the mass."""
    from specfed.bundle import ensure_model
    from specfed.client import RemoteWorker

    worker = WorkerProc(ensure_model("smollm2-135m"), tmp_path / "w.log")
    try:
        client = RemoteWorker("w1", worker.addr, smollm)
        ids = smollm.encode("def fibonacci(n):")
        ar = FederatedGenerator(None, [client], gamma=0, temperature=0)
        sd = FederatedGenerator(smollm, [client], gamma=4, temperature=0)
        no_eos: frozenset[int] = frozenset()
        a = ar.generate(ids, 16, 0, eos_token_ids=no_eos)
        b = sd.generate(ids, 16, 0, eos_token_ids=no_eos)
        assert a.tokens == b.tokens and len(a.tokens) == 16
        assert b.n_accepted == b.n_drafted  # draft == target
        assert len(b.rounds) < len(a.rounds)
        topk = FederatedGenerator(
            smollm, [client], gamma=4, temperature=1.0, transmissions=Transmission(Mode.TOPK, k=64)
        )
        res = topk.generate(ids, 16, seed=3)
        eps = [w.eps_mean for r in res.rounds for w in r.workers]
        assert min(eps) >= 0 and max(eps) < 0.9
        assert res.rounds[0].workers[0].bytes_up < 10_000
        client.close()
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def qwen():
    return {
        "draft": load_model("qwen2.5-coder-0.5b", dtype="fp32"),
        "big": load_model("qwen2.5-coder-1.5b", dtype="fp32"),
    }


@pytest.mark.slow
def test_qwen_greedy_sd_equals_greedy_ar(qwen):
    draft, big = qwen["draft"], qwen["big"]
    workers = [LocalWorker("w1", big), LocalWorker("w2", draft)]
    ar = FederatedGenerator(None, workers, gamma=0, temperature=0, measure_fidelity=False)
    sd = FederatedGenerator(draft, workers, gamma=4, temperature=0, measure_fidelity=False)
    for p in load_prompts("humaneval[:2]"):
        ids = draft.encode(p.text or "")
        a, b = ar.generate(ids, 32, 0), sd.generate(ids, 32, 0)
        assert a.tokens == b.tokens, p.id
        assert b.n_accepted > 0


@pytest.mark.slow
def test_qwen_bounds_on_real_distributions(qwen):
    """Lemma 1, Theorem 2, Theorem 3 (1/2 form) on the workers' real distributions along
    a real generation, with the draft's real q, for top-K at several K."""
    draft, big = qwen["draft"], qwen["big"]
    ids = draft.encode(load_prompts("humaneval[:1]")[0].text or "")
    text = (
        ids
        + FederatedGenerator(
            None, [LocalWorker("w", big)], gamma=0, temperature=0, measure_fidelity=False
        )
        .generate(ids, 24, 0)
        .tokens
    )
    n = len(text) - len(ids)
    positions = slice(len(ids) - 1, len(text) - 1)

    def dists(lm):
        # rows sum to 1 within ~1e-8 (float64 softmax); for renormalize
        # ||p - p_hat||_1 = 2 eps + (sum p - 1) exactly, so Lemma 1 is checked to 1e-5
        return probabilities(KVSession(lm).sync(text, len(text))[positions], 1.0)

    p1, p2, q = dists(big), dists(draft), dists(draft)
    w = np.array([0.5, 0.5])
    p = w[0] * p1.astype(np.float64) + w[1] * p2
    for k in (16, 64, 256):
        codec = make_codec("topk", k=k)
        pay = [codec.decode(codec.encode(pi)) for pi in (p1, p2)]
        eps = np.stack([pl.eps for pl in pay])  # [2, n]
        for method in RECONSTRUCTIONS:
            hats = [reconstruct(pl, method, q) for pl in pay]
            local = np.stack([l1(pi, h) for pi, h in zip((p1, p2), hats, strict=True)])
            if method == "renormalize":
                np.testing.assert_allclose(local, 2 * eps, atol=1e-5)
            assert (local <= 2 * eps + 1e-5).all(), (k, method)
            p_hat = w[0] * hats[0] + w[1] * hats[1]
            agg = l1(p, p_hat)
            assert (agg <= w @ local + 1e-5).all() and (agg <= 2 * (w @ eps) + 1e-5).all()
            bias = np.abs(alpha(q, p) - alpha(q, p_hat))
            assert (bias <= 0.5 * agg + 1e-5).all() and (bias <= w @ eps + 1e-5).all()
    assert n == 24
