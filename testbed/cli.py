"""`testbed`: plan, validate, run and calibrate scenarios; list runs; clean up after crashes.

    testbed validate scenarios/*.yaml         check files (no root needed)
    testbed plan SCENARIO                     points x repetitions per network group, with an
                                              estimated time (no root)
    testbed run SCENARIO [--set PATH=VALUE] [--repetitions N] [--out DIR] [--force] [--report]
    testbed run --resume RUN_DIR              continue an interrupted run in its folder
    testbed list [--out DIR]                  runs: scenario, commit, status, requests done
    testbed calibrate SCENARIO                measured RTT and goodput per worker link
    testbed clean                             remove what earlier runs of this project left

Delays in scenario files are ONE-WAY per link direction (ms); bandwidths in Mbit/s; loss in
percent. Runs need root (Mininet). On kernels without netem (like this project's machines)
links are emulated in user space (TAP devices + a forwarder per link); the backend used is
recorded with every result, and each run calibrates its links before trusting them.

A `topology.file` in a scenario is Python code: `validate`, `plan`, `run` and `calibrate`
import and execute it (as Mininet's --custom does). Only use files you trust.

--out is the results root everywhere: a run writes results/<scenario>/<utc>-<commit>/.
Exit status: 0 ok, 1 a run or calibration failed, 2 bad input (a scenario, an option).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from tabulate import tabulate

from specfed.config import ConfigError
from testbed.scenario import check_file, check_scenario, expand, load_scenario

_ENVIRONMENT = """environment variables:
  SPECFED_CACHE          models, converted checkpoints and traces (default ~/.cache/specfed)
  SPECFED_STATE_DIR      state files of running networks, for cleanup (default .state/)
  SPECFED_LINK_BACKEND   force the link backend: tc (needs netem) or tap
  HF_HUB_OFFLINE         set to 1 in every process the testbed starts (no model hub)
"""


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        r = check_file(f)
        if r.ok and r.message != "ok":
            print(f"ok    {f}: {r.message}")
        elif r.ok:
            print(f"ok    {f}: {r.points} points in {r.groups} network group(s)")
        else:
            bad += 1
            print(f"ERROR {r.message}")
    return 2 if bad else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from testbed.plan import plan

    try:
        sc = load_scenario(args.scenario, args.set)
        check_scenario(sc)
        rows = plan(sc, args.repetitions, args.acceptance)
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2
    table = [
        [
            r.group,
            r.rep,
            r.points,
            r.requests,
            f"{r.seconds / 60:.1f}" + ("" if r.complete else "+"),
            r.values[:70] + ("..." if len(r.values) > 70 else ""),
        ]
        for r in rows
    ]
    print(tabulate(table, headers=["group", "rep", "points", "requests", "est. min", "values"]))
    total = sum(r.seconds for r in rows)
    lower = (
        ""
        if all(r.complete for r in rows)
        else " (at least: '+' marks groups whose models have no device profile)"
    )
    print(
        f"{len(rows)} network group(s), {sum(r.points for r in rows)} point runs, "
        f"{sum(r.requests for r in rows)} requests; estimated {total / 60:.1f} min{lower}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from testbed.runner import run_status

    rows = [run_status(d) for d in sorted(args.out.glob("*/*/meta.json"))]
    if not rows:
        print(f"no runs under {args.out}")
        return 0
    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0])))
    return 0


def _cleanup_stale(quiet: bool = False) -> None:
    from testbed.state import cleanup_recorded

    report = cleanup_recorded()
    warnings = ("errors", "skipped", "bad_records")
    removed = {k: v for k, v in report.__dict__.items() if v and k not in warnings}
    if removed and not quiet:
        print(f"testbed: removed leftovers of an earlier run: {removed}", file=sys.stderr)
    for key in warnings:
        for item in getattr(report, key, []) or []:
            print(f"testbed: warning: state file {key.replace('_', ' ')}: {item}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.runner import RunError, Stopped, resume_run, run_scenario

    if (args.scenario is None) == (args.resume is None):
        print("testbed: give a SCENARIO, or --resume RUN_DIR (not both)", file=sys.stderr)
        return 2
    if args.resume is not None and (args.set or args.repetitions is not None):
        print("testbed: --resume continues a run as it was: no --set or --repetitions",
              file=sys.stderr)  # fmt: skip
        return 2
    sc = None
    if args.scenario is not None:
        try:
            sc = load_scenario(args.scenario, args.set)
            check_scenario(sc)
        except ConfigError as exc:
            print(f"testbed: {exc}", file=sys.stderr)
            return 2
    try:
        _cleanup_stale()
        if sc is not None:
            run_dir, ok = run_scenario(
                sc, args.out, args.repetitions, args.force, progress=not args.quiet
            )
        else:
            run_dir, ok = resume_run(args.resume, args.force, progress=not args.quiet)
    except RunError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"\ntestbed: {exc}; what the run started was torn down", file=sys.stderr)
        return 128 + exc.signum
    from testbed.results import summary_table

    print(summary_table(run_dir))
    print(f"results: {run_dir}")
    if args.report:  # hand over to the analysis command (analysis/ is not imported here)
        cmd = [sys.executable, "-m", "analysis.cli", "report", str(run_dir)]
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"testbed: the report failed: {' '.join(cmd)}", file=sys.stderr)
            ok = False
    return 0 if ok else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    from testbed.calibrate import calibrate_pair
    from testbed.netbuild import scenario_net, tolerance

    if os.geteuid() != 0:
        print("testbed: calibrate needs root (Mininet)", file=sys.stderr)
        return 2
    try:
        sc = load_scenario(args.scenario, args.set)
        check_scenario(sc)
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2
    _cleanup_stale()
    seen, rows, results = set(), [], []
    ok = True
    for p in expand(sc, 1):
        if p.infra_key in seen:
            continue
        seen.add(p.infra_key)
        s = p.scenario
        tol = tolerance(s.spec.network)
        with scenario_net(p, label="calibrate") as emu:
            for w in s.workers:
                c = calibrate_pair(
                    emu, w, "srv", tolerance=tol, pings=args.pings, goodput=args.goodput,
                    duration_s=args.seconds,
                )  # fmt: skip
                ok &= c.passed
                results.append({"point": p.label, "backend": emu.backend, **c.as_dict()})
                rate = {r.src: r for r in c.rate}
                loss = {x.src: x for x in c.loss}
                rows.append(
                    [
                        p.label,
                        f"{w}-srv",
                        emu.backend,
                        f"{c.configured_rtt_ms:.2f}",
                        f"{c.rtt.median_ms:.2f}",
                        f"{c.rtt_error_ms:+.2f}",
                        *(
                            f"{rate[h].mbit:.2f}/{rate[h].configured_mbit or 0:g} "
                            f"({rate[h].ratio:.3f})"
                            if h in rate and rate[h].ratio is not None
                            else "-"
                            for h in (w, "srv")
                        ),
                        *(
                            f"{loss[h].lost}/{loss[h].sent} ({loss[h].configured_pct:g} %)"
                            if h in loss
                            else "-"
                            for h in (w, "srv")
                        ),
                        c.attempts,
                        "PASS" if c.passed else "FAIL: " + "; ".join(c.problems),
                    ]
                )
    print(
        tabulate(
            rows,
            headers=[
                "point",
                "path",
                "backend",
                "RTT conf ms",
                "RTT median ms",
                "error ms",
                "rate up Mbit/s (ratio)",
                "rate down Mbit/s (ratio)",
                "lost up (conf)",
                "lost down (conf)",
                "attempts",
                "result",
            ],
            tablefmt="github",
        )
    )
    out = args.out / sc.name
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"calibration-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"stored: {path}")
    return 0 if ok else 1


def cmd_clean(args: argparse.Namespace) -> int:
    from testbed.state import cleanup_recorded

    report = cleanup_recorded(include_live=args.include_live)
    print(json.dumps(report.__dict__, indent=2, default=str))
    return 0 if report.clean else 1


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import HelpFormatter, version_text

    fmt = HelpFormatter
    ap = argparse.ArgumentParser(
        prog="testbed", description=__doc__, epilog=_ENVIRONMENT, formatter_class=fmt
    )
    ap.add_argument("--version", action="version", version=version_text("testbed"))
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    v = sub.add_parser(
        "validate",
        help="check scenario files (no root)",
        description="Check scenario (or study) files: schema, sweep, topology, links, models, "
        "prompts and compute profiles; every problem of a file is reported at once.",
        formatter_class=fmt,
    )
    v.add_argument("files", nargs="+", type=Path, help="scenario or study files")
    p = sub.add_parser(
        "plan",
        help="points, groups and an estimated time (no root)",
        description="List what `testbed run` would execute: network groups in run order, "
        "points and requests, and an estimated time (a model: see testbed/plan.py).",
        formatter_class=fmt,
    )
    p.add_argument("scenario", type=Path, help="scenario file")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field (as for run)")  # fmt: skip
    p.add_argument("--repetitions", type=int, default=None, help="override repetitions")
    p.add_argument("--acceptance", type=float, default=0.8,
                   help="assumed acceptance rate of the drafts, for the estimate")  # fmt: skip
    r = sub.add_parser(
        "run",
        help="run a scenario (root)",
        description="Build each network group in Mininet, calibrate its links, start the "
        "workers and the server in their hosts, and collect the records.",
        formatter_class=fmt,
    )
    r.add_argument("scenario", type=Path, nargs="?", default=None, help="scenario file")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. decoding.gamma=6 or links.w1.bw_mbit=5",
    )
    r.add_argument("--repetitions", type=int, default=None, help="override repetitions")
    r.add_argument("--out", type=Path, default=Path("results"), help="results root")
    r.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run in its folder: points whose requests did not all "
        "finish run again; rows are appended",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="run even if link calibration is out of tolerance (recorded)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--report",
        action="store_true",
        help="then write the analysis report (plots + report.md) into the run folder",
    )
    ls = sub.add_parser(
        "list",
        help="runs under the results root",
        description="One line per run: scenario, run id, commit, status, requests done.",
        formatter_class=fmt,
    )
    ls.add_argument("--out", type=Path, default=Path("results"), help="results root")
    c = sub.add_parser(
        "calibrate",
        help="measure every worker link vs configured (root)",
        description="Build each network group and measure every worker path's RTT, rate and "
        "loss against its configuration, without starting any model.",
        formatter_class=fmt,
    )
    c.add_argument("scenario", type=Path, help="scenario file")
    c.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field")  # fmt: skip
    c.add_argument("--pings", type=int, default=100, help="RTT probes per path")
    c.add_argument(
        "--goodput", action="store_true", help="also measure TCP goodput each way (iperf3)"
    )
    c.add_argument("--seconds", type=float, default=3.0, help="TCP goodput seconds per direction")
    c.add_argument("--out", type=Path, default=Path("results"), help="results root")
    k = sub.add_parser(
        "clean",
        help="remove what crashed runs left (recorded items only)",
        description="Remove the processes, devices and namespaces that earlier runs of this "
        "project recorded creating and left behind; nothing else (never by name).",
        formatter_class=fmt,
    )
    k.add_argument(
        "--include-live",
        action="store_true",
        help="also state files whose owner process still runs",
    )
    args = ap.parse_args(argv)
    return {
        "validate": cmd_validate,
        "plan": cmd_plan,
        "run": cmd_run,
        "list": cmd_list,
        "calibrate": cmd_calibrate,
        "clean": cmd_clean,
    }[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
