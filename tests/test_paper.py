"""The Fig. 2 / Fig. 3 study (analysis.paper): config validation, bounds on synthetic logits,
and the whole pipeline on tiny random-weight models (outputs exist, report matches the CSV).

Notation: p_i worker distributions, w_i weights, q draft, K kept entries, eps_i = 1 - rho_i.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from analysis import paper
from analysis.paper import (
    ABS_TOL,
    CORRECT_BOUNDS,
    PromptLogits,
    StudyConfig,
    StudyConfigError,
    Targets,
    evaluate,
    k_for_fraction,
    load_study,
    summarize,
)
from specfed.reconstruct import RECONSTRUCTIONS

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "scenarios" / "paper_fig23.yaml"


def _logits(c: int, v: int, seed: int, scale: float) -> torch.Tensor:
    """[c, v] float32 logits with heavy tails, so top-K leaves eps from ~0 to ~1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, v, generator=g) * scale


def _targets(n_workers: int = 2, c: int = 12, v: int = 3000, temperature: float = 1.0):
    l_i = [_logits(c, v, seed=10 + i, scale=3.0 + i) for i in range(n_workers)]
    l_q = _logits(c, v, seed=99, scale=3.5)
    w = np.full(n_workers, 1.0 / n_workers)
    return Targets.from_logits(l_i, w, l_q, temperature)


# --- config ----------------------------------------------------------------------------------


def test_study_file_loads_with_the_briefs_grid():
    cfg = load_study(STUDY)
    assert cfg.draft == "qwen2.5-coder-0.5b"
    assert cfg.workers == {"w1": "qwen2.5-coder-1.5b", "w2": "qwen2.5-coder-0.5b"}
    assert cfg.w.tolist() == [0.5, 0.5]
    assert cfg.n_prompts >= 8 and cfg.positions >= 32
    assert cfg.temperatures == (0.8, 1.0, 1.2)
    assert cfg.reconstructions == RECONSTRUCTIONS
    assert cfg.models == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]  # draft shared with w2
    ks = [k_for_fraction(f, 151_936) for f in cfg.k_fractions]
    assert ks == [15, 152, 1519, 15194, 151936]


def test_k_for_fraction_is_at_least_one_and_at_most_v():
    assert k_for_fraction(0.0001, 2048) == 1
    assert k_for_fraction(1.0, 2048) == 2048
    assert k_for_fraction(0.5, 3) == 2  # halves round up


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["models"]["weights"].update(w1=0.4), "models.weights"),
        (lambda d: d["models"].update(weights={"w1": 1.0}), "models.weights"),
        (lambda d: d["study"].update(k_fractions=[0.01, 0.0]), "study.k_fractions"),
        (lambda d: d["study"].update(temperatures=[1.0, -1]), "study.temperatures"),
        (lambda d: d["study"].update(reconstructions=["renormalise"]), "study.reconstructions"),
        (lambda d: d["generation"].update(mode="beam"), "generation.mode"),
        (lambda d: d.update(positions="32"), "positions"),
        (lambda d: d["study"].update(temperature=[1.0]), "study.temperature"),
        (lambda d: d["models"].pop("draft"), "models.draft"),
        (lambda d: d["models"].update(dtype="fp8"), "models.dtype"),
        (lambda d: d["study"].update(softmax="fp16"), "study.softmax"),
    ],
)
def test_bad_study_names_file_and_field(tmp_path, edit, field):
    data = yaml.safe_load(STUDY.read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyConfigError) as exc:
        load_study(bad)
    assert str(exc.value).startswith(f"{bad}: {field}:"), str(exc.value)


def test_unknown_field_suggests_the_close_one(tmp_path):
    data = yaml.safe_load(STUDY.read_text())
    data["study"]["k_fraction"] = data["study"].pop("k_fractions")
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyConfigError, match=r"study\.k_fraction: unknown field; did you mean"):
        load_study(bad)


# --- the bounds on synthetic distributions ---------------------------------------------------


@pytest.mark.parametrize("temperature", [0.8, 1.2])
def test_bounds_hold_for_every_k_and_reconstruction(temperature):
    t = _targets(temperature=temperature)
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


def test_renormalize_l1_is_exactly_two_eps_for_one_worker():
    t = _targets(n_workers=1)
    for k in (1, 40, 1000):
        m = t.metrics(t.encode(k), "renormalize")
        eps = m["eps_i"][0]
        assert eps.min() > 1e-3  # a real test: eps is not ~0
        np.testing.assert_allclose(m["l1"], 2 * eps, rtol=0, atol=float(t.slack.max()) + 1e-9)
        np.testing.assert_allclose(m["l1"], m["bound_l1"], rtol=0, atol=1e-6)
        assert m["viol_printed_thm3"].all()  # 2 eps > eps at every position


def test_fp64_softmax_is_normalized_where_fp32_drifts():
    logits = _logits(6, 150_000, seed=3, scale=2.0).to(torch.bfloat16)
    p64 = paper.softmax(logits, 1.2, "fp64")
    p32 = paper.softmax(logits, 1.2, "fp32")
    assert p64.dtype == p32.dtype == np.float32
    defect = lambda p: np.abs(1 - p.astype(np.float64).sum(axis=1)).max()  # noqa: E731
    assert defect(p64) < 1e-7
    assert defect(p32) >= defect(p64)
    np.testing.assert_allclose(p32, p64, rtol=1e-3, atol=1e-12)


def test_bf16_logits_round_trip_exactly():
    x = _logits(4, 64, seed=1, scale=5.0).to(torch.bfloat16)
    stored = paper._logits_to_numpy(x)
    assert stored.dtype == np.uint16
    rec = PromptLogits("p", np.arange(3), np.arange(4), {"m": stored})
    assert torch.equal(rec.tensor("m"), x)


def _synthetic_records(n_prompts: int = 2, n: int = 7, v: int = 500) -> list[PromptLogits]:
    recs = []
    for j in range(n_prompts):
        logits = {
            m: paper._logits_to_numpy(_logits(n, v, seed=100 * j + s, scale=4.0).bfloat16())
            for s, m in enumerate(("d", "a", "b"))
        }
        recs.append(PromptLogits(f"p{j}", np.arange(5), np.arange(n), logits))
    return recs


def _synthetic_cfg(**changes) -> StudyConfig:
    cfg = StudyConfig(
        name="synthetic",
        seed=0,
        draft="d",
        workers={"w1": "a", "w2": "b"},
        weights={"w1": 0.3, "w2": 0.7},
        temperatures=(0.8, 1.2),
        k_fractions=(0.002, 0.02, 1.0),
    )
    return cfg.replace(**changes) if changes else cfg


def test_evaluate_is_the_same_whatever_the_chunk_size():
    recs = _synthetic_records()
    a = evaluate(recs, _synthetic_cfg(chunk_positions=32), progress=False)
    b = evaluate(recs, _synthetic_cfg(chunk_positions=3), progress=False)
    assert len(a) == 2 * 7 * 2 * 3 * 3
    keys = ["prompt_id", "position", "temperature", "k", "reconstruction"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    s = summarize(a)
    assert len(s) == 2 * 3 * 3
    assert (s["n_positions"] == 14).all()
    assert s[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    c = summarize(evaluate(recs, _synthetic_cfg(softmax="fp32"), progress=False))
    assert c[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    # the weighted mixture is what the bound uses: 2 sum_i w_i eps_i
    np.testing.assert_allclose(a["bound_l1"], 2 * (0.3 * a["eps_w1"] + 0.7 * a["eps_w2"]))


# --- the whole pipeline on tiny models -------------------------------------------------------


def _tiny_study(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    lines = []
    for i in range(2):
        text = " ".join(f"t{(7 * i + j) % 997}" for j in range(5))
        lines.append(json.dumps({"id": f"tiny/{i}", "prompt": text}))
    prompts.write_text("\n".join(lines))
    data = yaml.safe_load(STUDY.read_text())
    data["models"] = {
        "draft": "tiny-v2048-s1",
        "workers": {"w1": "tiny-v2048-s2", "w2": "tiny-v2048-s1"},  # w2 shares the draft
        "weights": {"w1": 0.5, "w2": 0.5},
        "dtype": "bf16",
        "threads": 1,
    }
    data["prompts"] = {"source": str(prompts), "count": 2}
    data["positions"] = 5
    data["study"]["k_fractions"] = [0.001, 0.01, 0.1, 1.0]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _report_table(text: str) -> pd.DataFrame:
    """The report's mean-bias table, parsed back into numbers."""
    rows = []
    section = text.split("## Mean biases", 1)[1].split("## Files", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or not re.fullmatch(r"[0-9.]+", cells[0]):
            continue
        rows.append(
            {
                "temperature": float(cells[0]),
                "k": int(cells[1]),
                "reconstruction": cells[3],
                "l1_mean": float(cells[4]),
                "bound_l1_mean": float(cells[5]),
                "dalpha_mean": float(cells[6]),
                "bound_alpha_mean": float(cells[7]),
                "n_viol_printed_thm3": int(cells[8].split("/")[0]),
            }
        )
    return pd.DataFrame(rows)


def test_pipeline_on_tiny_models_writes_everything_and_the_report_matches_the_csv(tmp_path):
    study = _tiny_study(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert paper.main([str(study), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    for name in (
        paper.SUMMARY_CSV,
        paper.POSITIONS_CSV,
        paper.FIG2_PNG,
        paper.FIG3_PNG,
        paper.REPORT_MD,
        paper.META_JSON,
        "study.yaml",
        "continuations.jsonl",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in (paper.FIG2_PNG, paper.FIG3_PNG):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = pd.read_csv(out / paper.SUMMARY_CSV)
    assert len(summary) == 3 * 4 * 3  # T x K x reconstruction
    assert summary["k"].tolist()[: 4 * 3 : 3] == [2, 20, 205, 2048]
    assert (summary["n_positions"] == 10).all()
    assert summary[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    # K = |V|: exact for every reconstruction
    assert (summary.loc[summary["k_frac"] == 1.0, ["l1_mean", "dalpha_mean"]] == 0).all().all()

    text = (out / paper.REPORT_MD).read_text()
    table = _report_table(text)
    assert len(table) == len(summary)
    merged = table.merge(summary, on=["temperature", "k", "reconstruction"], suffixes=("", "_csv"))
    assert len(merged) == len(summary)
    for col in ("l1_mean", "bound_l1_mean", "dalpha_mean", "bound_alpha_mean"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_csv"], rtol=1e-3, atol=0)
    assert (merged["n_viol_printed_thm3"] == merged["n_viol_printed_thm3_csv"]).all()
    n_printed = int(summary["n_viol_printed_thm3"].sum())
    assert f"violated at {n_printed} of {int(summary['n_positions'].sum())} position" in text
    assert "holds at every position" in text
    assert "same model as worker w2" in text
    assert "Without the q = p_w2 advantage: on worker(s) w1 alone" in text

    meta = json.loads((out / paper.META_JSON).read_text())
    assert meta["record"]["cache_hits"] == 0 and meta["n_positions"] == 10
    positions = pd.read_csv(out / paper.POSITIONS_CSV)
    assert len(positions) == 10 * len(summary)
    # the draft is worker w2's model: draft-guided rebuilds w2 (q = p_w2) nearly exactly
    dg = positions[positions["reconstruction"] == "draft-guided"]
    assert dg["l1_w2"].max() < 1e-5 < dg["l1_w1"].max()

    # second run: every prompt from the cache, same numbers
    out2 = tmp_path / "out2"
    assert paper.main([str(study), "--out", str(out2), "--cache", str(cache), "--quiet"]) == 0
    meta2 = json.loads((out2 / paper.META_JSON).read_text())
    assert meta2["record"]["cache_hits"] == 2
    pd.testing.assert_frame_equal(summary, pd.read_csv(out2 / paper.SUMMARY_CSV))

    # replot: figures and report again from the CSV
    (out / paper.FIG2_PNG).unlink()
    assert paper.main(["--replot", str(out)]) == 0
    assert (out / paper.FIG2_PNG).is_file()
    assert (out / paper.REPORT_MD).read_text() == text


def test_cli_overrides_and_errors(tmp_path, capsys):
    study = _tiny_study(tmp_path)
    assert paper.main([str(study), "--prompts", "0", "--out", str(tmp_path / "x")]) == 2
    assert f"{study}: prompts.count: must be >= 1" in capsys.readouterr().err
    out = tmp_path / "never"
    assert paper.main([str(study), "--prompts", "3", "--no-cache", "--out", str(out)]) == 2
    assert not out.exists()
    assert "prompts.count: 3 prompts asked" in capsys.readouterr().err
    assert paper.main(["--replot", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exc:
        paper.main(["--help"])
    assert exc.value.code == 0
    assert "--positions" in capsys.readouterr().out


# --- real models (benchmark tier) ------------------------------------------------------------


@pytest.mark.slow
def test_real_models_end_to_end(tmp_path):
    """The real study, cut down: 1 HumanEval prompt, 8 positions, every T, K and method."""
    out = tmp_path / "out"
    rc = paper.main(
        [
            str(STUDY),
            "--prompts",
            "1",
            "--positions",
            "8",
            "--out",
            str(out),
            "--quiet",
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    summary = pd.read_csv(out / paper.SUMMARY_CSV)
    assert len(summary) == 3 * 5 * 3
    assert summary[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    assert (summary["n_positions"] == 8).all()
    meta = json.loads((out / paper.META_JSON).read_text())
    assert meta["vocab_size"] == 151_936
    renorm = summary[(summary["reconstruction"] == "renormalize") & (summary["k_frac"] < 1)]
    ratio = renorm["printed_ratio_max"].dropna()  # NaN: no position resolved in that cell
    assert len(ratio) >= 8 and (ratio > 1.5).all()  # the printed step fails on real data
