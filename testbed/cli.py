"""`testbed`: validate, run and calibrate scenarios; clean up after crashed runs.

    testbed validate scenarios/*.yaml         check files (no root needed)
    testbed run SCENARIO [--set PATH=VALUE] [--repetitions N] [--out DIR] [--force]
    testbed calibrate SCENARIO                measured RTT and goodput per worker link
    testbed clean                             remove what earlier runs of this project left

Delays in scenario files are ONE-WAY per link direction (ms); bandwidths in Mbit/s; loss in
percent. Runs need root (Mininet). On kernels without netem (like this project's machines)
links are emulated in user space (TAP devices + a forwarder per link); the backend used is
recorded with every result, and each run calibrates its links before trusting them.
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
    return 1 if bad else 0


def _cleanup_stale(quiet: bool = False) -> None:
    from testbed.state import cleanup_recorded

    report = cleanup_recorded()
    removed = {k: v for k, v in report.__dict__.items() if v and k != "errors"}
    if removed and not quiet:
        print(f"testbed: removed leftovers of an earlier run: {removed}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.runner import RunError, Stopped, run_scenario

    try:
        sc = load_scenario(args.scenario, args.set)
        check_scenario(sc)
    except ConfigError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2
    try:
        _cleanup_stale()
        run_dir, ok = run_scenario(
            sc, args.out, args.repetitions, args.force, progress=not args.quiet
        )
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
                    emu, w, "srv", tolerance=tol, pings=args.pings, duration_s=args.seconds
                )
                ok &= c.passed
                results.append({"point": p.label, "backend": emu.backend, **c.as_dict()})
                g = {x.src: x for x in c.goodput}
                rows.append(
                    [
                        p.label,
                        f"{w}-srv",
                        emu.backend,
                        f"{c.configured_rtt_ms:.2f}",
                        f"{c.rtt.mean_ms:.2f}",
                        f"{c.rtt_error_ms:+.2f}",
                        *(
                            f"{g[h].mbit:.2f}/{g[h].configured_mbit or 0:g} ({g[h].ratio:.3f})"
                            if h in g and g[h].ratio
                            else "-"
                            for h in (w, "srv")
                        ),
                        "PASS" if c.passed else "FAIL",
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
                "RTT meas ms",
                "error ms",
                "goodput up Mbit/s (ratio)",
                "goodput down Mbit/s (ratio)",
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
    ap = argparse.ArgumentParser(
        prog="testbed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check scenario files (no root)")
    v.add_argument("files", nargs="+", type=Path)
    r = sub.add_parser("run", help="run a scenario (root)")
    r.add_argument("scenario", type=Path)
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
    c = sub.add_parser("calibrate", help="measure every worker link vs configured (root)")
    c.add_argument("scenario", type=Path)
    c.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    c.add_argument("--pings", type=int, default=100)
    c.add_argument("--seconds", type=float, default=3.0, help="iperf3 seconds per direction")
    c.add_argument("--out", type=Path, default=Path("results"))
    k = sub.add_parser("clean", help="remove what crashed runs left (recorded items only)")
    k.add_argument(
        "--include-live",
        action="store_true",
        help="also state files whose owner process still runs",
    )
    args = ap.parse_args(argv)
    return {
        "validate": cmd_validate,
        "run": cmd_run,
        "calibrate": cmd_calibrate,
        "clean": cmd_clean,
    }[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
