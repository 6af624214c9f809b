"""`analysis`: report on run folders, compare two runs, or draw a paper-figure study run.

    analysis report RESULTS_DIR [RESULTS_DIR ...] [--out DIR] [--keep-warmup] [--pool-commits]
                    [--no-plots]
    analysis compare A B [--out DIR] [--keep-warmup]
    analysis paper RUN_DIR       -> analysis.paper.main([RUN_DIR]): Fig. 2, Fig. 3, report.md
    analysis --version

Exit status: 0 ok; 1 failure (an unexpected error while analysing); 2 bad input (bad
arguments, a folder that is not a run folder). Errors go to stderr; what was written goes
to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from analysis.runs import NotARunFolder

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

DESCRIPTION = """\
Analyze SpecFed testbed runs (the folders `testbed run` writes under
results/<scenario>/<utc>-<sha>/: requests.csv, rounds.csv, meta.json, ...). Everything is
recomputed from those files; nothing in them is changed. Statistics group by every
parameter that varies (configuration, link settings, swept paths, commit), give 95 %
intervals over repetitions (Wilson for fractions, paired for comparisons), and leave out
warm-up requests unless asked.

commands:
  report    tidy tables (CSV + parquet), seaborn plots and report.md for one or several
            run folders: summary, latency vs bandwidth and path RTT, paired speedup over
            federated AR and SD-full, time per token and per round, ECDFs, accepted
            length, bytes vs K against the documented formula, acceptance vs K, paired
            fidelity, round time vs the analytic lower bound
  compare   two run folders side by side: per-configuration metrics of A and B and B/A
  paper     Fig. 2, Fig. 3 and report.md of a distribution-level study run (the folder
            `python -m specfed.study STUDY_FILE` writes); arguments go to analysis.paper

--out is the folder the command writes into (created if missing): report.md or
compare.md, the PNG plots, and tables/. Exit status: 0 ok, 1 failure, 2 bad input.
"""

EPILOG = """\
examples:
  analysis report results/smoke/20261124T191344Z-613aafab/
  analysis report results/bw/RUN1 results/bw/RUN2 --out /tmp/bw-report
  analysis compare results/demo/RUN_A results/demo/RUN_B --out /tmp/a-vs-b
  analysis paper --help
in Python: analysis.load(RUN_DIR) -> tidy frames (docs/analysis.md)
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help text, descriptions as written."""


def _parser() -> argparse.ArgumentParser:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="analysis", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    add_version(ap)
    sub = ap.add_subparsers(dest="command", metavar="{report,compare,paper}", required=True)
    rep = sub.add_parser(
        "report",
        help="tables, plots and report.md for one or several run folders",
        description="Load one or several run folders (concatenated, every row tagged with\n"
        "its run) and write report.md, the PNG plots and every table as CSV and parquet\n"
        "(tables/) into --out. Plots whose axis does not vary in the data are skipped\n"
        "with a note in the report.",
        formatter_class=_Formatter,
    )
    rep.add_argument(
        "runs", nargs="+", type=Path, metavar="RESULTS_DIR",
        help="run folder(s): results/<scenario>/<utc>-<sha>/",
    )  # fmt: skip
    rep.add_argument(
        "--out", type=Path, default=None,
        help="folder to write report.md, the plots and tables/ into; None = <first run>/report/",
    )  # fmt: skip
    rep.add_argument(
        "--keep-warmup", action="store_true",
        help="keep warm-up requests (the first request each set of worker processes "
        "served) in the statistics",
    )  # fmt: skip
    rep.add_argument(
        "--no-plots", action="store_true",
        help="write report.md and the tables only, no PNG (faster)",
    )  # fmt: skip
    rep.add_argument(
        "--pool-commits", action="store_true",
        help="pool runs from different git commits (otherwise the commit is a setting and "
        "their results are kept apart)",
    )  # fmt: skip
    cmp_ = sub.add_parser(
        "compare",
        help="two run folders side by side",
        description="Per configuration and setting: ms/token, ttft, tokens/round,\n"
        "bytes/token and acceptance of run A and run B (95 % CIs over repetitions) and\n"
        "B/A; compare.md, tables/compare.csv (+ parquet) and two plots into --out.",
        formatter_class=_Formatter,
    )
    cmp_.add_argument("a", type=Path, metavar="A", help="run folder A (the reference)")
    cmp_.add_argument("b", type=Path, metavar="B", help="run folder B")
    cmp_.add_argument(
        "--out", type=Path, default=None,
        help="folder to write compare.md, the plots and tables/ into; None = "
        "<A>/compare-<B name>/",
    )  # fmt: skip
    cmp_.add_argument(
        "--keep-warmup", action="store_true",
        help="keep warm-up requests in the statistics",
    )  # fmt: skip
    sub.add_parser(
        "paper",
        help="figures and report of a study run (analysis.paper); `analysis paper --help`",
        description="Fig. 2, Fig. 3 and report.md of a distribution-level study run\n"
        "(analysis.paper); every argument after `paper` goes to it unchanged.",
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
            rep = write_report(
                args.runs, out, args_list,
                keep_warmup=args.keep_warmup, pool_commits=args.pool_commits,
                draw=not args.no_plots,
            )  # fmt: skip
        else:
            out = args.out or args.a / f"compare-{args.b.resolve().name}"
            rep = write_compare(args.a, args.b, out, args_list, keep_warmup=args.keep_warmup)
    except NotARunFolder as exc:
        print(f"analysis: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"analysis: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for n in rep.notes:
        print(f"note: {n}")
    print(f"report: {rep.path}")
    for p in rep.plots:
        print(f"plot:   {p}")
    n_csv = sum(p.suffix == ".csv" for p in rep.tables)
    print(f"tables: {rep.path.parent / 'tables'}/ ({n_csv} tables, CSV + parquet)")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
