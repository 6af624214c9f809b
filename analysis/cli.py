"""`analysis`: report on run folders, compare two runs, or draw a paper-figure study run.

    analysis report RESULTS_DIR [RESULTS_DIR ...] [--out DIR]
    analysis compare A B [--out DIR]
    analysis paper RUN_DIR       -> analysis.paper.main([RUN_DIR]): Fig. 2, Fig. 3, report.md

Exit status: 0 ok, 2 bad arguments or a folder that is not a run folder.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.load import NotARunFolder

DESCRIPTION = """\
Analyze SpecFed testbed runs (the folders `testbed run` writes under
results/<scenario>/<utc>-<sha>/: requests.csv, rounds.csv, meta.json, points.csv,
scenario.yaml). Everything is recomputed from those files; nothing in them is changed.

commands:
  report    tables, seaborn plots and report.md for one or several run folders
            (concatenated, every row tagged with its run): latency vs link bandwidth /
            delay, round-time breakdown, bytes per token vs K against the documented
            formula, acceptance vs K, fidelity vs full transmission (coupled seeds),
            round time vs the analytic lower bound
  compare   two run folders side by side: per-configuration metrics of A and B and B/A
  paper     Fig. 2, Fig. 3 and report.md of a distribution-level study run (the folder
            `python -m specfed.study STUDY_FILE` writes); arguments go to analysis.paper
"""

EPILOG = """\
examples:
  analysis report results/smoke/20261124T191344Z-613aafab/
  analysis report results/bw/RUN1 results/bw/RUN2 --out /tmp/bw-report
  analysis compare results/demo/RUN_A results/demo/RUN_B --out /tmp/a-vs-b
  analysis paper --help
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="analysis",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="{report,compare,paper}", required=True)
    rep = sub.add_parser(
        "report",
        help="tables, plots and report.md for one or several run folders",
        description="Load one or several run folders and write report.md, the PNG plots and "
        "the tables as CSV (tables/) into --out. Plots whose axis does not vary in the data "
        "are skipped with a note in the report.",
    )
    rep.add_argument("runs", nargs="+", type=Path, metavar="RESULTS_DIR", help="run folder(s)")
    rep.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <first run>/report/)"
    )
    cmp_ = sub.add_parser(
        "compare",
        help="two run folders side by side",
        description="Per-configuration metrics (ms/token, ttft, acceptance, tokens/round, "
        "bytes/token) of run A and run B and their ratio B/A; compare.md and two plots.",
    )
    cmp_.add_argument("a", type=Path, metavar="A", help="run folder A (the reference)")
    cmp_.add_argument("b", type=Path, metavar="B", help="run folder B")
    cmp_.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <A>/compare-<B name>/)"
    )
    sub.add_parser(
        "paper",
        help="figures and report of a study run (analysis.paper); `analysis paper --help`",
        add_help=False,
    )
    return ap


def _paper(argv: list[str]) -> int:
    try:
        module = importlib.import_module("analysis.paper")
    except ModuleNotFoundError as exc:
        if exc.name != "analysis.paper":
            raise
        print(
            "analysis: `analysis paper` needs the module analysis/paper.py (figures and "
            "report of a study run), which cannot be imported here",
            file=sys.stderr,
        )
        return 2
    main = getattr(module, "main", None)
    if main is None:
        print("analysis: analysis/paper.py has no main(argv) function", file=sys.stderr)
        return 2
    return int(main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "paper":
        return _paper(args_list[1:])
    args = _parser().parse_args(args_list)
    from analysis.report import write_compare, write_report

    try:
        if args.command == "report":
            out = args.out or args.runs[0] / "report"
            rep = write_report(args.runs, out, args_list)
        else:
            out = args.out or args.a / f"compare-{args.b.resolve().name}"
            rep = write_compare(args.a, args.b, out, args_list)
    except NotARunFolder as exc:
        print(f"analysis: {exc}", file=sys.stderr)
        return 2
    for n in rep.notes:
        print(f"note: {n}")
    print(f"report: {rep.path}")
    for p in rep.plots:
        print(f"plot:   {p}")
    print(f"tables: {rep.path.parent / 'tables'}/ ({len(rep.tables)} CSV)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
