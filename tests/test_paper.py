"""The analysis side of the paper-figure study (analysis.paper, `python -m analysis.paper
RUN_DIR`): Fig. 2, Fig. 3 and report.md drawn from a run folder's files alone, the report's
numbers equal to the CSV's, the command line, and the boundary: no torch, no models.

The run folders here are synthetic (the study's grid on random logits, written by
`specfed.study.run.write_run_folder`); tests/test_study_run.py draws a real tiny-model run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from analysis import paper
from analysis.cli import main as analysis_main
from specfed.study.grid import evaluate, summarize
from specfed.study.outputs import CORRECT_BOUNDS, META_JSON, SUMMARY_CSV
from specfed.study.run import build_meta, write_run_folder
from tests.study_helpers import (
    REPO,
    STUDY,
    assert_report_matches_summary,
    synthetic_cfg,
    synthetic_records,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished (synthetic) study run: the run folder's files, no figures, no report."""
    out = tmp_path_factory.mktemp("run")
    cfg = synthetic_cfg()
    recs = synthetic_records()
    positions = evaluate(recs, cfg, progress=False)
    summary = summarize(positions)
    meta = build_meta(cfg, recs, 500, {"cache_hits": 0}, "2026-11-30T00:00:00Z")
    meta["timing"] = {"record_s": 1.0, "grid_s": 2.0, "total_s": 3.0}
    write_run_folder(out, cfg, recs, summary, positions, meta)
    return out


def test_draw_writes_both_figures_and_a_report_that_matches_the_csv(run_dir, capsys):
    assert paper.main([str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / f) for f in (paper.FIG2_PNG, paper.FIG3_PNG, paper.REPORT_MD)]
    for png in (paper.FIG2_PNG, paper.FIG3_PNG):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = pd.read_csv(run_dir / SUMMARY_CSV)
    assert summary[[f"n_viol_{n}" for n in CORRECT_BOUNDS]].to_numpy().sum() == 0
    text = (run_dir / paper.REPORT_MD).read_text()
    assert_report_matches_summary(text, summary)
    assert "holds at every position" in text
    assert "same model as worker" not in text  # the draft "d" is no worker's model
    assert "**Below the study's size**" in text  # 2 prompts x 7 positions
    assert "`python -m analysis.paper <this folder>`" in text
    # a redraw gives the same report
    (run_dir / paper.FIG3_PNG).unlink()
    assert paper.draw(run_dir)[1] == run_dir / paper.FIG3_PNG
    assert (run_dir / paper.FIG3_PNG).is_file()
    assert (run_dir / paper.REPORT_MD).read_text() == text


def test_the_analysis_cli_dispatches_paper(run_dir, capsys):
    assert analysis_main(["paper", str(run_dir)]) == 0
    assert str(run_dir / paper.REPORT_MD) in capsys.readouterr().out


def test_not_a_run_folder(tmp_path, capsys):
    assert paper.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and SUMMARY_CSV in err and META_JSON in err
    assert paper.main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    # a study file is not a run: say how to make one
    assert paper.main([str(STUDY)]) == 2
    assert f"python -m specfed.study {STUDY}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        paper.main(["--help"])
    assert exc.value.code == 0
    assert "RUN_DIR" in capsys.readouterr().out


def test_analysis_paper_loads_neither_torch_nor_the_models():
    code = (
        "import sys, analysis.paper, analysis.cli; "
        "bad = [m for m in ('torch', 'specfed.models', 'specfed.engine', 'specfed.study.run', "
        "'specfed.study.record', 'specfed.study.grid') if m in sys.modules]; "
        "print(bad); assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_meta_json_is_what_the_report_reads(run_dir):
    meta = json.loads((run_dir / META_JSON).read_text())
    assert meta["config"]["models"]["workers"] == {"w1": "a", "w2": "b"}
    assert meta["n_positions"] == 14 and meta["positions_per_prompt"] == "7"
    assert "d" in paper.subtitle(meta) and "w=0.3" in paper.subtitle(meta)
