"""The whole study (specfed.study.run, `python -m specfed.study`): the run folder on tiny
random-weight models, the logits cache, the command line, and the hand-over to the analysis
side (`python -m analysis.paper RUN_DIR` draws the figures and the report from the files).

Notation: p_i worker distributions, w_i weights, q draft, K kept entries, eps_i = 1 - rho_i.
"""

from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest
import yaml

from analysis import paper
from specfed.study import run
from specfed.study.outputs import (
    CONTINUATIONS_JSONL,
    CORRECT_BOUNDS,
    META_JSON,
    POSITIONS_CSV,
    STUDY_YAML,
    SUMMARY_CSV,
)
from tests.study_helpers import REPO, STUDY, assert_report_matches_summary, tiny_study

RUN_FILES = (SUMMARY_CSV, POSITIONS_CSV, META_JSON, STUDY_YAML, CONTINUATIONS_JSONL)
DRAWN_FILES = (paper.FIG2_PNG, paper.FIG3_PNG, paper.REPORT_MD)


def test_pipeline_on_tiny_models_writes_everything_and_the_report_matches_the_csv(tmp_path, capsys):
    study = tiny_study(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert run.main([str(study), "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    std = capsys.readouterr()
    assert std.out.strip() == str(out)
    assert f"figures and report: python -m analysis.paper {out}" in std.err
    for name in RUN_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in DRAWN_FILES:  # the analysis side draws them, from the files
        assert not (out / name).exists(), name

    # the analysis side: figures and report from the run folder
    assert paper.main([str(out)]) == 0
    for name in (*RUN_FILES, *DRAWN_FILES):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in (paper.FIG2_PNG, paper.FIG3_PNG):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = pd.read_csv(out / SUMMARY_CSV)
    assert len(summary) == 3 * 4 * 3  # T x K x reconstruction
    assert summary["k"].tolist()[: 4 * 3 : 3] == [2, 20, 205, 2048]
    assert (summary["n_positions"] == 10).all()
    assert summary[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    # K = |V|: exact for every reconstruction
    assert (summary.loc[summary["k_frac"] == 1.0, ["l1_mean", "dalpha_mean"]] == 0).all().all()

    text = (out / paper.REPORT_MD).read_text()
    assert_report_matches_summary(text, summary)
    assert "holds at every position" in text
    assert "same model as worker w2" in text
    assert "Without the q = p_w2 advantage: on worker(s) w1 alone" in text

    meta = json.loads((out / META_JSON).read_text())
    assert meta["record"]["cache_hits"] == 0 and meta["n_positions"] == 10
    assert set(meta["git"]) == {"sha", "short", "dirty"}  # specfed.provenance
    assert {"python", "torch", "transformers", "pydantic"} <= set(meta["versions"])
    assert meta["config"] == yaml.safe_load((out / STUDY_YAML).read_text())
    assert meta["config_file"] == str(study) and meta["k"] == {
        "0.1%": 2,
        "1%": 20,
        "10%": 205,
        "100%": 2048,
    }
    positions = pd.read_csv(out / POSITIONS_CSV)
    assert len(positions) == 10 * len(summary)
    # the draft is worker w2's model: draft-guided rebuilds w2 (q = p_w2) nearly exactly
    dg = positions[positions["reconstruction"] == "draft-guided"]
    assert dg["l1_w2"].max() < 1e-5 < dg["l1_w1"].max()
    rows = [json.loads(line) for line in (out / CONTINUATIONS_JSONL).read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["tiny/0", "tiny/1"]
    assert all(len(r["tokens"]) == r["n_positions"] == 5 for r in rows)

    # second run: every prompt from the cache, same numbers
    out2 = tmp_path / "out2"
    assert run.main([str(study), "--out", str(out2), "--cache", str(cache), "--quiet"]) == 0
    meta2 = json.loads((out2 / META_JSON).read_text())
    assert meta2["record"]["cache_hits"] == 2
    pd.testing.assert_frame_equal(summary, pd.read_csv(out2 / SUMMARY_CSV))

    # redraw: figures and report again from the CSV, the same report
    (out / paper.FIG2_PNG).unlink()
    assert paper.main([str(out)]) == 0
    assert (out / paper.FIG2_PNG).is_file()
    assert (out / paper.REPORT_MD).read_text() == text

    # --report: the study hands over to `python -m analysis.paper` in a separate process
    capsys.readouterr()
    out3 = tmp_path / "out3"
    args = [str(study), "--out", str(out3), "--cache", str(cache), "--quiet", "--report"]
    assert run.main(args) == 0
    assert "figures and report:" not in capsys.readouterr().err
    for name in (*RUN_FILES, *DRAWN_FILES):
        assert (out3 / name).is_file(), name
    summary3 = pd.read_csv(out3 / SUMMARY_CSV)
    pd.testing.assert_frame_equal(summary, summary3)
    assert_report_matches_summary((out3 / paper.REPORT_MD).read_text(), summary3)


def test_cli_overrides_and_errors(tmp_path, capsys):
    study = tiny_study(tmp_path)
    assert run.main([str(study), "--prompts", "0", "--out", str(tmp_path / "x")]) == 2
    assert f"{study}: prompts.count: must be >= 1" in capsys.readouterr().err
    out = tmp_path / "never"
    assert run.main([str(study), "--prompts", "3", "--no-cache", "--out", str(out)]) == 2
    assert not out.exists()
    assert "prompts.count: 3 prompts asked" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(study.read_text().replace("positions: 5", "positions: 5\npositions: 6"))
    assert run.main([str(bad), "--out", str(out)]) == 2
    assert "duplicate key 'positions'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--positions" in text and "--report" in text and "python -m analysis.paper" in text


def test_module_entry_point_answers_help():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "specfed.study", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("usage: python -m specfed.study")


def test_specfed_study_never_imports_analysis():
    for path in (REPO / "specfed" / "study").glob("*.py"):
        src = path.read_text()
        assert not re.search(r"^\s*(from|import) analysis\b", src, re.M), path


# --- real models (benchmark tier) ------------------------------------------------------------


@pytest.mark.slow
def test_real_models_end_to_end(tmp_path):
    """The real study, cut down: 1 HumanEval prompt, 8 positions, every T, K and method."""
    out = tmp_path / "out"
    rc = run.main(
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
    summary = pd.read_csv(out / SUMMARY_CSV)
    assert len(summary) == 3 * 5 * 3
    assert summary[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    assert (summary["n_positions"] == 8).all()
    meta = json.loads((out / META_JSON).read_text())
    assert meta["vocab_size"] == 151_936
    renorm = summary[(summary["reconstruction"] == "renormalize") & (summary["k_frac"] < 1)]
    ratio = renorm["printed_ratio_max"].dropna()  # NaN: no position resolved in that cell
    assert len(ratio) >= 8 and (ratio > 1.5).all()  # the printed step fails on real data
    assert paper.main([str(out)]) == 0
    assert (out / paper.REPORT_MD).is_file()
