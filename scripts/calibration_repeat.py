#!/usr/bin/env python3
"""Calibrate a scenario's network many times: how often does a correct link pass?

Builds the network of a scenario's first point once, the way ``testbed run`` does
(:func:`testbed.netbuild.scenario_net`: the scenario's links as typed
:class:`testbed.linkparams.LinkSpec` values from :func:`testbed.scenario.link_specs`, then
:func:`testbed.linkemu.build_net`), then runs :func:`testbed.calibrate.calibrate_pair`
between every worker and ``srv`` ``--runs`` times, with the runner's arguments (20 pings)
and the scenario's tolerance. Prints one line per run and a JSON summary: passes, passes
on the first attempt, and how many runs the old criterion (mean RTT) would have refused.
Needs root (Mininet)::

    python scripts/calibration_repeat.py scenarios/smoke.yaml --runs 20
    python scripts/calibration_repeat.py scenarios/smoke.yaml --runs 20 --load matmul

``--load matmul`` runs a torch matmul loop on one thread beside it (a model's worth of
CPU load on one core) for the whole measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.calibrate import Tolerance, calibrate_pair  # noqa: E402
from testbed.netbuild import scenario_net, tolerance  # noqa: E402
from testbed.scenario import expand, load_scenario  # noqa: E402

MATMUL_LOAD = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(768, 768)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", type=Path, nargs="?", default=REPO / "scenarios/smoke.yaml")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pings", type=int, default=20, help="as the runner")
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--load", choices=["none", "matmul"], default="none")
    ap.add_argument("--json", type=Path, help="write every calibration here")
    o = ap.parse_args(argv)
    sc = load_scenario(o.scenario)
    point = expand(sc, 1)[0]
    workers = list(point.scenario.workers)
    load = None
    if o.load == "matmul":
        load = subprocess.Popen([sys.executable, "-c", MATMUL_LOAD])
        time.sleep(3.0)  # torch import
    rows: list[dict[str, Any]] = []
    tol: Tolerance = tolerance(point.scenario.spec.network)
    emu = scenario_net(point, label="calibration-repeat")
    try:
        print("links:", {f"{a}-{b}": spec.as_dict() for (a, b), spec in emu.links.items()})
        for run in range(1, o.runs + 1):
            for w in workers:
                t0 = time.monotonic()
                c = calibrate_pair(emu, w, "srv", tolerance=tol, pings=o.pings, attempts=o.attempts)
                mean_err = c.rtt.mean_ms - c.configured_rtt_ms
                row = {
                    "run": run,
                    "path": f"{w}-srv",
                    "seconds": round(time.monotonic() - t0, 2),
                    "mean_rule_ok": abs(mean_err) <= tol.rtt_limit_ms(c.configured_rtt_ms),
                    **c.as_dict(),
                }
                rows.append(row)
                rates = " ".join(f"{r.ratio:.4f}" for r in c.rate if r.ratio is not None)
                print(
                    f"run {run:2d} {w}-srv {'PASS' if c.passed else 'FAIL'} "
                    f"attempts {c.attempts} {row['seconds']:.1f} s: RTT median "
                    f"{c.rtt_error_ms:+.3f} ms, mean {mean_err:+.3f} ms, rate {rates}, loss "
                    + " ".join(f"{x.lost}/{x.sent}" for x in c.loss)
                    + (f" | {'; '.join(c.problems)}" if c.problems else ""),
                    flush=True,
                )
    finally:
        report = emu.teardown()
        if load is not None:
            load.kill()
            load.wait()
    summary = {
        "scenario": str(o.scenario),
        "load": o.load,
        "runs": o.runs,
        "per_path": {
            p: {
                "passed": sum(r["passed"] for r in rs),
                "passed_first_attempt": sum(r["passed"] and r["attempts"] == 1 for r in rs),
                "mean_rtt_rule_would_pass": sum(r["mean_rule_ok"] for r in rs),
                "rate_not_judged": sum(any(x["ok"] is None for x in r["rate"]) for r in rs),
            }
            for p in sorted({r["path"] for r in rows})
            for rs in [[r for r in rows if r["path"] == p]]
        },
        "runs_all_paths_passed": sum(
            all(r["passed"] for r in rows if r["run"] == run) for run in range(1, o.runs + 1)
        ),
        "teardown_clean": report.clean,
    }
    print(json.dumps(summary, indent=2))
    if o.json:
        o.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    return 0 if summary["runs_all_paths_passed"] == o.runs else 1


if __name__ == "__main__":
    sys.exit(main())
