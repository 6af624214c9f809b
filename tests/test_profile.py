"""Device profiles (specfed.profile): the cost model, its fit, files, and the measuring command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specfed.config import ConfigError
from specfed.profile import (
    PROFILE_DIR,
    CostSample,
    DeviceProfile,
    Provenance,
    find_profile,
    fit_profile,
    fit_with_holdout,
    load_profile,
    profile_from_rounds,
    rounds_samples,
    save_profile,
    shipped_profiles,
)

REPO = Path(__file__).resolve().parents[1]
PROV = Provenance(
    command="test",
    measured_utc="2026-01-01T00:00:00+00:00",
    host="h",
    cpu="c",
    cores=2,
    git={"sha": "x", "short": "x", "dirty": False},
    versions={"python": "3.11"},
)
TRUE = {"a_ms": 30.0, "b_ms_per_token": 2.0, "c_ms_per_context": 0.02, "head_ms_per_position": 3.0}


def make_profile(
    a: float = 30.0,
    b: float = 2.0,
    c: float = 0.02,
    h: float = 3.0,
    *,
    name: str = "cpu2-m-bf16-t1",
    model: str = "m",
    dtype: str = "bf16",
    threads: int = 1,
) -> DeviceProfile:
    return DeviceProfile.model_validate(
        {
            "name": name,
            "device": "test device",
            "model": model,
            "dtype": dtype,
            "threads": threads,
            "vocab_size": 1000,
            "forward": {"a_ms": a, "b_ms_per_token": b, "c_ms_per_context": c},
            "head_ms_per_position": h,
            "fit": {"n": 0},
            "provenance": PROV.model_dump(),
        }
    )


# --- the formulas ----------------------------------------------------------------------


def test_formulas_by_hand():
    p = make_profile(a=10, b=2, c=0.5, h=3)
    assert p.forward_ms(4, 100) == pytest.approx(10 + 8 + 50)
    assert p.verify_ms(5, 105, 5) == pytest.approx(10 + 10 + 52.5 + 15)
    # draft(n_sync=2, c0=50, gamma=3) = f(2, 50) + f(1, 51) + f(1, 52) + 3 h
    expect = (10 + 4 + 25) + (10 + 2 + 25.5) + (10 + 2 + 26) + 9
    assert p.draft_ms(2, 50, 3) == pytest.approx(expect)
    assert p.draft_ms(1, 50, 1) == pytest.approx(10 + 2 + 25 + 3)
    assert p.draft_ms(7, 50, 0) == 0.0


def test_features_match_formulas():
    """The fit's features times the coefficients give exactly the profile's formulas."""
    p = make_profile(a=7, b=1.5, c=0.03, h=2.5)
    x = np.array(list(p.coefficients().values()))
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, ctx, g = int(rng.integers(1, 40)), int(rng.integers(40, 2000)), int(rng.integers(0, 9))
        npos = int(rng.integers(1, n + 1))
        assert CostSample.verify(n, ctx, npos, 1).features() @ x == pytest.approx(
            p.verify_ms(n, ctx, npos)
        )
        assert CostSample.draft(n, ctx, g, 1).features() @ x == pytest.approx(p.draft_ms(n, ctx, g))


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.forward_ms(0, 5),
        lambda p: p.forward_ms(5, 4),
        lambda p: p.verify_ms(3, 10, 4),
        lambda p: p.verify_ms(3, 10, 0),
        lambda p: p.draft_ms(1, 10, -1),
    ],
)
def test_formulas_refuse_impossible_passes(call):
    with pytest.raises(ValueError):
        call(make_profile())


def test_scaled_divides_every_time_and_keeps_the_measurement():
    p = make_profile(a=10, b=2, c=0.5, h=3)
    fast = p.scaled(10)
    assert fast.name == p.name and fast.speed == 10 and fast.label == f"{p.name} x10"
    assert fast.forward == p.forward  # the measured numbers stay as measured
    assert fast.forward_ms(4, 100) == pytest.approx(p.forward_ms(4, 100) / 10)
    assert fast.verify_ms(5, 105, 5) == pytest.approx(p.verify_ms(5, 105, 5) / 10)
    assert fast.draft_ms(2, 50, 3) == pytest.approx(p.draft_ms(2, 50, 3) / 10)
    assert fast.coefficients()["head_ms_per_position"] == pytest.approx(0.3)
    assert fast.scaled(0.5).speed == 5
    assert p.speed == 1 and p.label == p.name
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            p.scaled(bad)


# --- the fit ---------------------------------------------------------------------------


def synthetic_samples(p: DeviceProfile, noise: float, seed: int = 0) -> list[CostSample]:
    """Verify passes and draft rounds over a bench-like grid, timed by `p` with
    multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    out = []
    for ctx in (64, 256, 512, 1024):
        for n in range(1, 6):
            for npos in sorted({1, n}):
                t = p.verify_ms(n, ctx + n, npos)
                out.append(CostSample.verify(n, ctx + n, npos, t * rng.lognormal(0, noise)))
        for n_sync in (1, 2):
            for g in (1, 2, 4):
                t = p.draft_ms(n_sync, ctx, g)
                out.append(CostSample.draft(n_sync, ctx, g, t * rng.lognormal(0, noise)))
    for P in (32, 128, 512):
        out.append(CostSample.verify(P, P, 5, p.verify_ms(P, P, 5) * rng.lognormal(0, noise)))
        out.append(CostSample.draft(P, P, 4, p.draft_ms(P, P, 4) * rng.lognormal(0, noise)))
    return out


def test_fit_recovers_exact_coefficients():
    p = make_profile(**dict(zip("abch", TRUE.values(), strict=True)))
    cost, head, info = fit_profile(synthetic_samples(p, noise=0.0))
    got = {**cost.model_dump(), "head_ms_per_position": head}
    assert got == pytest.approx(TRUE, rel=1e-6)
    assert info["r2"] == pytest.approx(1.0) and info["median_rel_residual"] < 1e-9
    assert info["folded"] == [] and info["n"] == len(synthetic_samples(p, 0.0))
    assert set(info["by_kind"]) == {"verify", "draft"}


def test_fit_recovers_coefficients_under_noise():
    p = make_profile(**dict(zip("abch", TRUE.values(), strict=True)))
    cost, head, info = fit_with_holdout(synthetic_samples(p, noise=0.02))
    got = {**cost.model_dump(), "head_ms_per_position": head}
    for k, v in TRUE.items():
        assert got[k] == pytest.approx(v, rel=0.1), k
    assert info["median_rel_residual"] < 0.03
    assert info["held_out"]["n"] > 0 and info["held_out"]["median_rel_residual"] < 0.05


def test_fit_keeps_coefficients_non_negative():
    """Times that fall with context would need c < 0: the fit clamps it at 0."""
    samples = [CostSample.verify(1, ctx, 1, 50.0 - ctx / 100) for ctx in (100, 500, 1000, 2000)]
    samples += [CostSample.verify(4, 4, 4, 60.0), CostSample.verify(4, 4, 1, 55.0)]
    cost, head, _ = fit_profile(samples)
    assert min(cost.a_ms, cost.b_ms_per_token, cost.c_ms_per_context, head) >= 0
    assert cost.c_ms_per_context == 0


def test_draft_rounds_alone_fold_the_head_into_a():
    """a_ms and head_ms_per_position both count gamma times in a draft round: not separable."""
    p = make_profile(a=20, b=1, c=0.01, h=4)
    samples = [s for s in synthetic_samples(p, 0.0) if s.kind == "draft"]
    cost, head, info = fit_profile(samples)
    assert info["folded"] == ["head_ms_per_position"] and head == 0
    assert cost.a_ms == pytest.approx(24, rel=1e-6)
    assert cost.b_ms_per_token == pytest.approx(1, rel=1e-6)
    refit = make_profile(cost.a_ms, cost.b_ms_per_token, cost.c_ms_per_context, head)
    assert refit.draft_ms(2, 300, 4) == pytest.approx(p.draft_ms(2, 300, 4), rel=1e-6)


def test_fit_refuses_no_samples():
    with pytest.raises(ValueError, match="no usable samples"):
        fit_profile([CostSample.draft(1, 10, 0, 0.0)])


# --- the passes the code runs are the passes the model counts ---------------------------


def test_cost_model_counts_the_passes_the_engine_runs(tiny_family, monkeypatch):
    """Every forward pass of a federated generation, grouped by round: the draft runs one
    pass over n_sync tokens ending at the committed length c0, then gamma - 1 single-token
    passes ending at c0 + j; the worker runs one pass ending at c0 + n_drafted with
    n_drafted + 1 output positions (what rounds_samples assumes of the records)."""
    from specfed.engine import FederatedGenerator, LocalWorker
    from specfed.models import KVSession

    draft, w1, _ = tiny_family
    calls: list[tuple[str, int, int, int]] = []  # (who, n new tokens, context after, n_logits)
    real_forward = KVSession.forward

    def spy(self, start, tokens, n_logits):
        who = "draft" if self.lm is draft else "worker"
        calls.append((who, len(tokens), start + len(tokens), n_logits))
        return real_forward(self, start, tokens, n_logits)

    monkeypatch.setattr(KVSession, "forward", spy)
    gamma, prompt = 3, [1, 2, 3, 4, 5, 6, 7]
    gen = FederatedGenerator(
        draft, [LocalWorker("w1", w1)], gamma=gamma, temperature=1.0, measure_fidelity=False
    )
    marks = []
    result = gen.generate(prompt, 14, seed=3, on_round=lambda r: marks.append(len(calls)))
    context_len = len(prompt)
    begin, prev = 0, None
    for r, end in zip(result.rounds, marks, strict=True):
        mine, begin = calls[begin:end], end
        d = [c[1:] for c in mine if c[0] == "draft"]
        w = [c[1:] for c in mine if c[0] == "worker"]
        # the worker: one pass ending at context_len + n_drafted, n_drafted + 1 positions
        assert len(w) == 1
        n_tokens, ctx_after, n_pos = w[0]
        assert ctx_after == context_len + r.n_drafted and n_pos == r.n_drafted + 1
        assert n_tokens == (len(prompt) + r.n_drafted if r.round == 0 else r.n_drafted + 1)
        # the draft: a sync pass ending at c0 = context_len, then n_drafted - 1 steps
        if r.n_drafted:
            n_sync = d[0][0]
            assert d == [(n_sync, context_len, 1)] + [
                (1, context_len + j, 1) for j in range(1, r.n_drafted)
            ]
            if prev is None:
                assert n_sync == len(prompt)
            else:  # the drafts after the accepted ones were never in the draft's cache
                assert n_sync == (2 if prev.n_accepted == prev.n_drafted else 1)
        else:
            assert d == []
        context_len += r.n_emitted
        prev = r
    assert len(result.rounds) > 2


# --- fit from a run's records ----------------------------------------------------------


def synthetic_rounds(draft: DeviceProfile, workers: dict[str, DeviceProfile], seed: int = 0):
    """A rounds table as a run writes it: points gamma 0 and 4, requests of varied prompt
    length, acceptance drawn at random; times from the given profiles (1 % noise); plus
    warm-up rows with absurd times that the fit must skip."""
    rng = np.random.default_rng(seed)
    rows = []
    for point, gamma in enumerate((0, 4)):
        for req in range(8):
            warm = req == 0
            committed = int(rng.integers(20, 300))
            n_sync, n_tokens = committed, committed + gamma
            for rnd in range(10):
                acc = int(rng.integers(0, gamma + 1))
                t_draft = draft.draft_ms(n_sync, committed, gamma) * rng.lognormal(0, 0.01)
                for name, prof in workers.items():
                    t_w = prof.verify_ms(max(n_tokens, 1), committed + gamma, gamma + 1)
                    rows.append(
                        {
                            "run_id": "r",
                            "point": point,
                            "rep": 0,
                            "request_id": f"q{point}-{req}",
                            "warmup": warm,
                            "round": rnd,
                            "worker": name,
                            "gamma": gamma,
                            "transmission": "topk",
                            "k": 64.0,
                            "context_len": committed,
                            "draft_new_tokens": n_sync if gamma else 0,
                            "n_drafted": gamma,
                            "n_tokens": max(n_tokens, 1),
                            "t_draft_ms": (t_draft if gamma else 0.0) * (50 if warm else 1),
                            "t_worker_ms": t_w * rng.lognormal(0, 0.01) * (50 if warm else 1),
                        }
                    )
                emitted = acc + 1
                n_sync = 1 if acc < gamma else 2
                n_tokens = gamma + 1 if gamma else 1
                committed += emitted
    return pd.DataFrame(rows)


def test_profile_from_rounds_recovers_a_worker():
    w1 = make_profile(**dict(zip("abch", TRUE.values(), strict=True)))
    w2 = make_profile(a=80, b=5, c=0.05, h=3)
    rounds = synthetic_rounds(make_profile(a=10, b=1, c=0.01, h=2), {"w1": w1, "w2": w2})
    p = profile_from_rounds(
        rounds, "w1", model="m", dtype="bf16", threads=1, vocab_size=1000, provenance=PROV
    )
    got = p.coefficients()
    for k, v in TRUE.items():
        assert got[k] == pytest.approx(v, rel=0.15), k
    assert p.fit["median_rel_residual"] < 0.02 and p.fit["source"]["role"] == "w1"
    assert p.name == "cpu2-m-bf16-t1" and p.model == "m"
    # warm-up rounds skipped: 7 requests x 10 rounds x 2 points
    assert p.fit["n"] == 7 * 10 * 2
    p2 = profile_from_rounds(
        rounds, "w2", model="m", dtype="bf16", threads=1, vocab_size=1000, provenance=PROV
    )
    assert p2.coefficients()["a_ms"] == pytest.approx(80, rel=0.15)


def test_profile_from_rounds_recovers_the_draft():
    true = make_profile(a=10, b=1, c=0.01, h=2)
    rounds = synthetic_rounds(true, {"w1": make_profile(), "w2": make_profile()})
    p = profile_from_rounds(
        rounds, "draft", model="d", dtype="bf16", threads=1, vocab_size=1000, provenance=PROV
    )
    assert p.fit["n"] == 7 * 10  # one sample per round (not per worker row), gamma > 0 only
    assert p.fit["folded"] == ["head_ms_per_position"]
    assert p.coefficients()["a_ms"] == pytest.approx(12, rel=0.1)  # a + head
    for n_sync, ctx in ((1, 100), (2, 400), (150, 150)):
        assert p.draft_ms(n_sync, ctx, 4) == pytest.approx(true.draft_ms(n_sync, ctx, 4), rel=0.03)


def test_rounds_samples_columns_and_filters():
    rounds = synthetic_rounds(make_profile(), {"w1": make_profile()})
    assert len(rounds_samples(rounds, "w1", {"gamma": 4})) == 70
    assert len(rounds_samples(rounds, "w1", {"transmission": "full"})) == 0
    s = rounds_samples(rounds, "w1", {"gamma": 4})[0]
    row = rounds[(rounds.gamma == 4) & ~rounds.warmup].iloc[0]
    assert (s.kind, s.n_tokens, s.context, s.n) == (
        "verify",
        row.n_tokens,
        row.context_len + 4,
        5,
    )
    # a replay run's t_worker_ms is an emulated wait: the recorded compute is used instead
    live = [x.t_ms for x in rounds_samples(rounds.assign(compute_mode="live"), "w1")]
    replay = rounds.assign(
        compute_mode="replay", t_worker_recorded_ms=rounds.t_worker_ms, t_worker_ms=1.0
    )
    assert [x.t_ms for x in rounds_samples(replay, "w1")] == live
    assert rounds_samples(replay.drop(columns=["t_worker_recorded_ms"]), "w1") == []
    as_text = rounds.assign(warmup=rounds.warmup.map({True: "True", False: ""}))
    assert len(rounds_samples(as_text, "w1", {"gamma": 4})) == 70  # CSV-read flags
    with pytest.raises(ValueError, match="lacks context_len"):
        rounds_samples(rounds.drop(columns=["context_len"]), "draft")
    with pytest.raises(ValueError, match="roles: draft, w1"):
        rounds_samples(rounds, "w9")


def test_bench_profile_from_run(tmp_path):
    from specfed.bench import main

    w1 = make_profile(**dict(zip("abch", TRUE.values(), strict=True)))
    run = tmp_path / "run"
    run.mkdir()
    rounds = synthetic_rounds(make_profile(a=10, b=1, c=0.01, h=2), {"w1": w1})
    rounds["vocab_size"] = 512
    rounds.to_csv(run / "rounds.csv", index=False)
    (run / "scenario.yaml").write_text(
        "models: {draft: tiny-v512-s1, workers: {w1: tiny-v512-s2}, dtype: fp32, threads: 1}\n"
    )
    (run / "meta.json").write_text(
        json.dumps(
            {
                "host": "elsewhere",
                "started_utc": "2026-01-02T03:04:05+00:00",
                "git": {"sha": "abc", "short": "abc", "dirty": False},
            }
        )
    )
    out = tmp_path / "w1.json"
    argv = ["profile", "--from-run", str(run), "--role", "w1", "--out", str(out)]
    assert main([*argv, "--where", "transmission=topk"]) == 0
    p = load_profile(out)
    assert (p.model, p.dtype, p.threads, p.vocab_size) == ("tiny-v512-s2", "fp32", 1, 512)
    assert p.provenance.measured_utc.startswith("2026-01-02") and p.provenance.host == "elsewhere"
    assert "LIVE run" in p.provenance.notes and p.provenance.git["sha"] == "abc"
    assert p.coefficients()["a_ms"] == pytest.approx(30, rel=0.15)


# --- files -----------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    p = make_profile()
    path = save_profile(p, tmp_path / "sub" / "x.json")
    assert load_profile(path) == p
    assert load_profile(str(path)) == p


def write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_invalid_profile_names_file_and_fields(tmp_path):
    data = make_profile().model_dump(mode="json")
    data["forward"]["a_ms"] = -1
    data["dtype"] = "fp16"
    data["threads"] = 0
    data["colour"] = "red"
    del data["provenance"]["cpu"]
    path = write(tmp_path, "bad.json", data)
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    text = str(exc.value)
    for line in (
        f"{path}: forward.a_ms: must be >= 0.0, got -1",
        f"{path}: dtype: expected one of bf16, fp32",
        f"{path}: threads: must be >= 1, got 0",
        f"{path}: colour: unknown field",
        f"{path}: provenance.cpu: missing (required)",
    ):
        assert line in text, text


def test_invalid_json_and_missing_files(tmp_path):
    path = write(tmp_path, "broken.json", '{"name": "x",\n  oops}')
    with pytest.raises(ConfigError, match=r"broken.json: line 2, column 3: not valid JSON"):
        load_profile(path)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_profile(write(tmp_path, "list.json", [1, 2]))
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=r"no shipped device profile .*shipped: none"):
        load_profile("cpu2-nothing", directory=tmp_path / "empty")


def test_shipped_and_find_profile(tmp_path):
    names = {
        "cpu2-a-bf16-t1": ("a", "bf16", 1),
        "cpu2-a-fp32-t1": ("a", "fp32", 1),
        "cpu2-b-bf16-t1": ("b", "bf16", 1),
    }
    for name, (model, dtype, threads) in names.items():
        p = make_profile(name=name, model=model, dtype=dtype, threads=threads)
        save_profile(p, tmp_path / f"{name}.json")
    assert shipped_profiles(tmp_path) == sorted(names)
    assert load_profile("cpu2-a-fp32-t1", directory=tmp_path).dtype == "fp32"
    found = find_profile("a", "bf16", 1, directory=tmp_path)
    assert found is not None and found.name == "cpu2-a-bf16-t1"
    assert find_profile("a", "bf16", 2, directory=tmp_path) is None
    assert find_profile("c", "bf16", 1, directory=tmp_path) is None
    save_profile(make_profile(name="other-a-bf16-t1", model="a"), tmp_path / "other-a-bf16-t1.json")
    with pytest.raises(ValueError, match="several shipped profiles"):
        find_profile("a", "bf16", 1, directory=tmp_path)
    # a shipped file must carry its own name
    save_profile(make_profile(name="wrong"), tmp_path / "cpu2-c-bf16-t1.json")
    with pytest.raises(ConfigError, match="name: must match the file name"):
        load_profile("cpu2-c-bf16-t1", directory=tmp_path)


def test_shipped_profiles_are_valid_and_unique():
    """Every shipped profile loads, is measured (provenance, samples), and is the only one
    for its model, dtype and threads (what `profiles: auto` looks up)."""
    seen = set()
    for name in shipped_profiles():
        p = load_profile(name)
        assert p.speed == 1 and p.fit["n"] > 0 and p.provenance.command.startswith("python -m")
        key = (p.model, p.dtype, p.threads)
        assert key not in seen, key
        seen.add(key)
        assert find_profile(*key) == p
    assert PROFILE_DIR == REPO / "specfed" / "device_profiles"


# --- measuring -------------------------------------------------------------------------


def test_bench_profile_end_to_end(tmp_path):
    """`python -m specfed.bench profile --quick` on a tiny model writes a loadable profile."""
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "specfed.bench", "profile", "--model", "tiny-v512-s1",
           "--dtype", "fp32", "--quick", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    p = load_profile(out)
    assert printed["written"] == str(out)
    assert printed["name"] == p.name == f"cpu{os.cpu_count()}-tiny-v512-s1-fp32-t1"
    assert (p.model, p.dtype, p.threads, p.vocab_size) == ("tiny-v512-s1", "fp32", 1, 512)
    grid = p.fit["measurement"]["grid"]
    n_expected = len(grid["contexts"]) * (
        len(grid["verify_n_tokens_n_positions"]) + len(grid["draft_n_sync_gamma"])
    ) + 2 * len(grid["prefills"])
    assert p.fit["n"] == n_expected == len(p.fit["samples"])
    assert all(s[4] > 0 for s in p.fit["samples"])
    assert "held_out" in p.fit and p.fit["r2"] is not None
    assert p.forward_ms(1, 10) > 0 and p.verify_ms(3, 20, 3) > p.forward_ms(3, 20) - 1e-12
    prov = p.provenance
    assert "--model tiny-v512-s1" in prov.command and "--quick" in prov.command
    assert prov.cpu and prov.cores >= 1 and prov.git["sha"] and prov.versions["torch"]
    assert "load average" in prov.notes
