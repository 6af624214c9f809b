"""Figures and report of a paper-figure study run (the run folder `python -m specfed.study` writes).

    python -m analysis.paper RUN_DIR        # fig2_aggregation_bias.png, fig3_acceptance_bias.png,
    analysis paper RUN_DIR                  #   report.md, written into RUN_DIR

Reads only RUN_DIR/fig23_summary.csv and RUN_DIR/meta.json (names in
`specfed.study.outputs`), so it redraws a finished run in seconds, without models and without
the grid. Modules: `analysis.paper_figures` (Fig. 2 and Fig. 3), `analysis.paper_report`
(report.md). docs/paper-figures.md describes the study, its files and its results.

Notation (the paper's, arXiv 2604.25777): p = sum_i w_i p_i the federated target, p_hat its
reconstruction from top-K payloads, q the draft, T the temperature, K the entries kept per
position, |V| the vocabulary size, eps_i = 1 - (mass of p_i kept).

Exit status: 0 ok, 2 RUN_DIR is not a finished study run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from analysis.paper_figures import FIG2_PNG, FIG3_PNG, plot_figures, subtitle
from analysis.paper_report import REPORT_MD, write_report
from specfed.study.outputs import META_JSON, SUMMARY_CSV

__all__ = [
    "FIG2_PNG",
    "FIG3_PNG",
    "REPORT_MD",
    "NotAStudyRun",
    "check_run_dir",
    "draw",
    "main",
    "plot_figures",
    "write_report",
]


class NotAStudyRun(ValueError):
    """The folder is not a finished study run; the message says what is missing."""


def check_run_dir(run_dir: Path) -> None:
    """Raise NotAStudyRun unless `run_dir` holds a study run's summary CSV and meta.json."""
    if run_dir.is_file():
        raise NotAStudyRun(
            f"{run_dir} is a file, not a run folder; if it is a study file, run it first: "
            f"python -m specfed.study {run_dir}"
        )
    if not run_dir.is_dir():
        raise NotAStudyRun(f"{run_dir}: no such folder")
    missing = [f for f in (SUMMARY_CSV, META_JSON) if not (run_dir / f).is_file()]
    if missing:
        raise NotAStudyRun(f"{run_dir}: not a finished study run (no {', '.join(missing)})")


def draw(run_dir: Path) -> list[Path]:
    """Fig. 2, Fig. 3 and report.md of a finished run, from its summary CSV and meta.json.

    Returns:
        The paths written (two PNG, report.md), all inside `run_dir`.

    Raises:
        NotAStudyRun: `run_dir` lacks the summary CSV or meta.json.
    """
    check_run_dir(run_dir)
    summary = pd.read_csv(run_dir / SUMMARY_CSV)
    meta = json.loads((run_dir / META_JSON).read_text(encoding="utf-8"))
    paths = plot_figures(summary, run_dir, subtitle(meta))
    write_report(summary, meta, run_dir / REPORT_MD)
    return [*paths, run_dir / REPORT_MD]


def _parser() -> argparse.ArgumentParser:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m analysis.paper",
        description=(
            "Draw the paper's Fig. 2 (aggregation bias ||p - p_hat||_1) and Fig. 3\n"
            "(acceptance-rate bias |alpha(q, p) - alpha(q, p_hat)|) and write report.md for a\n"
            "study run, from its fig23_summary.csv and meta.json (docs/paper-figures.md). The\n"
            "run folder comes from `python -m specfed.study STUDY_FILE`."
        ),
        epilog=(
            "examples:\n"
            "  python -m specfed.study scenarios/paper_fig23.yaml  # writes RUN_DIR\n"
            "  python -m analysis.paper results/paper-fig23/<utc>/\n"
            "exit status: 0 ok, 2 not a finished study run"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    ap.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a study run folder")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (also `analysis paper RUN_DIR`); prints the paths written.

    Returns:
        0 on success, 2 if the folder is not a finished study run.
    """
    args = _parser().parse_args(argv)
    try:
        paths = draw(args.run_dir)
    except NotAStudyRun as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
