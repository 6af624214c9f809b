"""Benchmarks of compute emulation (root, Mininet); each prints JSON.

    python -m testbed.emubench fidelity [--scenario scenarios/demo.yaml] [--live-run DIR]
        Run the scenario live (or take --live-run's live rows), fit a device profile per
        role from that run's own records
        (its measured draft and verify times), replay the scenario with those profiles, and
        compare: the same tokens, ms/token per configuration (replay / live), and every
        replayed round against its analytic lower bound (profile compute + RTT + bytes/bw).

    python -m testbed.emubench scale [--scenario scenarios/scale.yaml] [--out DIR]
        A star of 1 + N workers (N = 2, 8, 16, 32) on heterogeneous links (5 / 20 / 100
        Mbit/s, 5-50 ms one way, mixed), two distinct worker models, full vs top-64 in replay
        with the shipped device profiles: the run's own link calibration under that load,
        and the testbed's own overhead per round (round time minus emulated compute minus
        the link's lower bound) against N.

The lower bound of a round: its emulated draft, then per worker the path round trip, the
request and reply serialized at the slowest link of their direction (wire bytes: TCP/IP/
Ethernet framing of 66 bytes per 1,448-byte segment) and its emulated compute; the round
waits for the slowest worker, and for every reply to cross the server's access link.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from specfed.config import load_yaml
from specfed.provenance import REPO

SEGMENT, FRAME_OVERHEAD = 1448, 66  # TCP payload per full segment, headers per segment


def wire_bytes(payload: float) -> float:
    """Bytes on the wire for a TCP payload: every segment carries 66 bytes of headers."""
    return payload + FRAME_OVERHEAD * max(1.0, math.ceil(payload / SEGMENT))


def _ser_ms(payload: float, bw_mbit: float) -> float:
    if not bw_mbit or not math.isfinite(bw_mbit):
        return 0.0
    return wire_bytes(payload) * 8 / (bw_mbit * 1e6) * 1e3


def _num(row: pd.Series, col: str, default: float = math.nan) -> float:
    v = row.get(col, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def lower_bounds(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per round: t_round_ms, the analytic lower bound lb_ms, ratio, overhead_ms.

    Compute is the emulated draft (replay) or the measured draft (live), and each worker's
    reported compute; link parameters come from the rounds' link columns."""
    out = []
    for (rid, rnd), rows in rounds.groupby(["request_id", "round"], sort=False):
        first = rows.iloc[0]
        draft = _num(first, "t_draft_emulated_ms")
        if not math.isfinite(draft):
            draft = _num(first, "t_draft_ms", 0.0)
        srv_up, srv_down = _num(first, "srv_up_bw_mbit"), _num(first, "srv_down_bw_mbit")
        srv_rtt = _num(first, "srv_up_delay_ms", 0.0) + _num(first, "srv_down_delay_ms", 0.0)
        per_worker, shared_up, fastest = [], 0.0, math.inf
        for _, r in rows.iterrows():
            w = r["worker"]
            rtt = srv_rtt + _num(r, f"{w}_up_delay_ms", 0.0) + _num(r, f"{w}_down_delay_ms", 0.0)
            down_bw = min(x for x in (_num(r, f"{w}_down_bw_mbit"), srv_up, math.inf) if x == x)
            up_bw = min(x for x in (_num(r, f"{w}_up_bw_mbit"), srv_down, math.inf) if x == x)
            compute = float(r["t_worker_ms"])
            per_worker.append(
                rtt + _ser_ms(r["bytes_down"], down_bw) + compute + _ser_ms(r["bytes_up"], up_bw)
            )
            shared_up += _ser_ms(r["bytes_up"], srv_down)
            fastest = min(fastest, rtt + compute)
        lb = draft + max(max(per_worker), fastest + shared_up)
        t_round = float(first["t_round_ms"])
        out.append(
            {
                "request_id": rid,
                "round": rnd,
                "point": first["point"],
                "transmission": first["transmission"],
                "k": first.get("k"),
                "n_workers": len(rows),
                "t_round_ms": t_round,
                "lb_ms": lb,
                "ratio": t_round / lb if lb > 0 else math.nan,
                "overhead_ms": t_round - lb,
            }
        )
    return pd.DataFrame(out)


def _run(raw: dict[str, Any], name: str, out: Path) -> Path:
    """Run a scenario given as a mapping; return its run folder (raises on failure)."""
    from testbed.runner import run_scenario
    from testbed.scenario import check_scenario, scenario_from_dict

    raw = {**raw, "name": name}
    path = out / f"{name}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    sc = scenario_from_dict(raw, str(path), path)
    check_scenario(sc)
    run_dir, ok = run_scenario(sc, out, progress=False)
    if not ok:
        raise SystemExit(f"emubench: run {run_dir} failed; see its meta.json and logs/")
    return run_dir


def _without_compute_sweep(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    sweep = raw.get("sweep", {})
    for block in sweep if isinstance(sweep, list) else [sweep]:
        block.pop("compute.mode", None)
    return raw


#: What tells configurations apart across a live and a replayed run (point ids differ).
CONFIG = [
    "transmission", "k", "epsilon", "value_dtype", "index_coding", "reconstruction", "gamma",
    "temperature",
]  # fmt: skip


def _with_config(requests: pd.DataFrame) -> pd.DataFrame:
    """The configuration columns with "-" where a setting does not apply (k of full)."""
    out = requests.astype({c: object for c in CONFIG})
    return out.fillna({c: "-" for c in CONFIG})


def _per_config(requests: pd.DataFrame) -> pd.DataFrame:
    ok = requests[(requests.status == "ok") & ~requests.warmup.astype(bool)]
    return (
        _with_config(ok)
        .groupby(CONFIG, dropna=False)
        .agg(ms_per_token=("ms_per_token", "mean"), n=("request_id", "count"))
        .reset_index()
    )


def fidelity(args: argparse.Namespace) -> dict[str, Any]:
    from specfed.profile import role_profiles_from_rounds

    raw = _without_compute_sweep(load_yaml(args.scenario))
    t0 = time.monotonic()
    if args.live_run is not None:  # an earlier run's live rows (e.g. make demo's)
        live_dir = args.live_run
    else:
        live_dir = _run({**raw, "compute": {"mode": "live"}}, "emubench-live", args.out)
    t_live = time.monotonic() - t0
    rounds = pd.read_csv(live_dir / "rounds.csv")
    rounds = rounds[rounds.compute_mode == "live"]
    files = role_profiles_from_rounds(
        rounds, raw["models"], live_dir / "fitted-profiles", f"fitted from the live run {live_dir}"
    )
    t1 = time.monotonic()
    replay_dir = _run(
        {**raw, "compute": {"mode": "replay", "profiles": files}}, "emubench-replay", args.out
    )
    t_replay = time.monotonic() - t1
    lq, rq = pd.read_csv(live_dir / "requests.csv"), pd.read_csv(replay_dir / "requests.csv")
    lq = lq[lq.compute_mode == "live"]
    same = _with_config(lq).merge(
        _with_config(rq), on=[*CONFIG, "rep", "prompt_id"], suffixes=("_live", "_replay")
    )
    cmp = _per_config(lq).merge(_per_config(rq), on=CONFIG, suffixes=("_live", "_replay"))
    cmp["ratio"] = cmp.ms_per_token_replay / cmp.ms_per_token_live
    lb = lower_bounds(pd.read_csv(replay_dir / "rounds.csv"))
    return {
        "scenario": str(args.scenario),
        "live_run": str(live_dir),
        "replay_run": str(replay_dir),
        "wall_s": {"live": round(t_live, 1), "record_and_replay": round(t_replay, 1)},
        "tokens_identical": bool((same.tokens_live == same.tokens_replay).all()),
        "requests_compared": len(same),
        "ms_per_token": cmp.round(4).to_dict(orient="records"),
        "max_abs_ratio_error": float((cmp.ratio - 1).abs().max()),
        "round_vs_lower_bound": {
            "rounds": len(lb),
            "ratio_median": float(lb.ratio.median()),
            "ratio_max": float(lb.ratio.max()),
            "share_within_1.05": float((lb.ratio <= 1.05).mean()),
            "overhead_ms_median": float(lb.overhead_ms.median()),
        },
        "profiles": files,
    }


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Run the scale scenario (N workers per sweep block) and report per N."""
    raw = load_yaml(args.scenario)
    t0 = time.monotonic()
    run_dir = _run(raw, "emubench-scale", args.out)
    wall = time.monotonic() - t0
    meta = json.loads((run_dir / "meta.json").read_text())
    rounds = pd.read_csv(run_dir / "rounds.csv")
    lb = lower_bounds(rounds)
    results = []
    for n, part_n in lb.groupby("n_workers"):
        groups = [g for g in meta["groups"] if g["values"].get("topology.params.n_workers") == n]
        cal = [c for g in groups for c in g.get("calibration", [])]
        row: dict[str, Any] = {
            "n_workers": int(n),
            "calibration_passed": f"{sum(bool(c['passed']) for c in cal)}/{len(cal)}",
            "group_wall_s": round(sum(g.get("wall_s", 0.0) for g in groups), 1),
        }
        for mode, part in part_n.groupby("transmission"):
            row[str(mode)] = {
                "rounds": len(part),
                "overhead_ms_median": float(part.overhead_ms.median()),
                "overhead_ms_p90": float(np.percentile(part.overhead_ms, 90)),
                "ratio_median": float(part.ratio.median()),
                "share_within_1.05": float((part.ratio <= 1.05).mean()),
            }
        results.append(row)
    return {
        "run": str(run_dir),
        "wall_s": round(wall, 1),
        "scale": results,
        "targets": {"topk_overhead_ms_median": {"2": 2.0, "32": 5.0}},
    }


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m testbed.emubench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity", help="live vs replay with profiles fitted from the live run")
    f.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "demo.yaml")
    f.add_argument(
        "--live-run",
        type=Path,
        default=None,
        help="use this run's live rows (compute_mode live; e.g. a `make demo` run of the same "
        "scenario) instead of running the scenario live first",
    )
    f.add_argument("--out", type=Path, default=REPO / "bench-results")
    s = sub.add_parser("scale", help="testbed overhead per round vs the number of workers")
    s.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "scale.yaml")
    s.add_argument("--out", type=Path, default=REPO / "bench-results")
    args = ap.parse_args(argv)
    result = fidelity(args) if args.cmd == "fidelity" else scale(args)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
