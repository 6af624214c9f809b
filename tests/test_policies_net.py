"""Policies over real TCP on loopback (no root), and in record / replay: a straggler worker
(`specfed.worker --delay-ms`) dropped by quorum and deadline aggregation while the streams
stay in step, link-aware K and heuristic gamma from a points file, and replay of the
content-only policies (timing-dependent ones refused)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from specfed.engine import FederatedGenerator, LocalWorker
from specfed.messages import Transmission
from specfed.models import load_model
from specfed.options import Mode
from specfed.points import Point, write_points
from specfed.policies import LinkEstimate, k_for_budget
from specfed.record import RecordSpec, record_points
from tests.procs import WorkerProc, read_rows, run_server

DRAFT, W1, W2 = "tiny-v512-s1", "tiny-v512-s2", "tiny-v512-s3"
SEED, N_TOKENS, DELAY_MS = 3, 16, 250
LINKS = {"w1": LinkEstimate(up_mbit=2.0, rtt_ms=1.0), "w2": LinkEstimate(up_mbit=0.5)}


def topk(**kw):
    return Point.of(gamma=4, temperature=1.0, mode="topk", k=16, **kw)


POINTS = [
    topk(aggregation={"quorum": 1}, point=0),
    topk(point=1),  # wait for all, right after the quorum point: the streams are in step
    topk(aggregation={"deadline_ms": 100}, point=2),
    Point.of(
        gamma=2,
        temperature=1.0,
        mode="topk",
        k="auto",
        k_budget_ms=2.0,
        k_max=256,
        links=LINKS,
        gamma_policy="heuristic",
        gamma_max=6,
        point=3,
    ),
]


def _server(workers, out: Path, points, *extra: str) -> subprocess.CompletedProcess[str]:
    pf = out.parent / f"{out.name}-points.json"
    write_points(pf, points)
    return run_server(
        workers, out, draft=DRAFT, points_file=pf, prompts="ids:1,2,3,4",
        max_new_tokens=N_TOKENS, seed=SEED, extra=extra,
    )  # fmt: skip


_rows = read_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("policies")
    ws = [
        WorkerProc(W1, d / "w1.log"),
        WorkerProc(W2, d / "w2.log", "--delay-ms", str(DELAY_MS)),
    ]
    try:
        proc = _server(ws, d / "run", POINTS)
    finally:
        for w in ws:
            w.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run"


def _by_point(rows, point: int):
    return [r for r in rows if int(r["point"]) == point]


def test_straggler_dropped_over_tcp(run):
    """quorum 1 and a 100 ms deadline drop the 250 ms-slower w2: every round aggregates w1
    alone, so the tokens are those of w1 alone; each dropped reply is a row with its
    lateness, and the next point (wait for all) runs on the same connections."""
    rounds, requests = _rows(run / "rounds.csv"), _rows(run / "requests.csv")
    assert all(r["status"] == "ok" for r in requests) and len(requests) == len(POINTS)
    lm = {n: load_model(n, dtype="fp32") for n in (DRAFT, W1)}
    alone = FederatedGenerator(
        lm[DRAFT], [LocalWorker("w1", lm[W1])], transmissions=Transmission(Mode.TOPK, k=16)
    ).generate([1, 2, 3, 4], N_TOKENS, seed=SEED)
    for point, rule in ((0, "quorum"), (2, "deadline")):
        (req,) = _by_point(requests, point)
        assert req["aggregation"] == rule
        assert [int(t) for t in req["tokens"].split()] == alone.tokens
        rows = _by_point(rounds, point)
        used = [r for r in rows if r["dropped"] == "False"]
        dropped = [r for r in rows if r["dropped"] == "True"]
        assert {r["worker"] for r in used} == {"w1"}
        assert dropped and {r["worker"] for r in dropped} == {"w2"}
        assert int(req["dropped_replies"]) == len(dropped)
        for r in dropped:
            assert 0 < float(r["lateness_ms"]) < 2 * DELAY_MS
            assert float(r["t_worker_ms"]) >= DELAY_MS  # the straggler's delay is compute
        for r in used:
            assert float(r["t_round_ms"]) < DELAY_MS
    waited = _by_point(rounds, 1)
    assert {r["worker"] for r in waited} == {"w1", "w2"}
    assert all(r["dropped"] == "False" for r in waited)
    assert all(float(r["t_round_ms"]) >= DELAY_MS for r in waited)


def test_link_aware_k_and_heuristic_gamma_over_tcp(run):
    rounds = _by_point(_rows(run / "rounds.csv"), 3)
    (req,) = _by_point(_rows(run / "requests.csv"), 3)
    assert (req["k_policy"], req["k"], req["k_budget_ms"], req["gamma_policy"]) == (
        "auto", "", "2.0", "heuristic",
    )  # fmt: skip
    by_round: dict[int, dict[str, dict[str, str]]] = {}
    for r in rounds:
        by_round.setdefault(int(r["round"]), {})[r["worker"]] = r
    g = 2
    for rnd in sorted(by_round):
        rows = by_round[rnd]
        first = next(iter(rows.values()))
        assert int(first["gamma"]) == g
        n_pos = int(first["n_drafted"]) + 1
        for w, row in rows.items():
            want = k_for_budget(2.0, LINKS[w].up_mbit, n_pos, 6, 1, 256)  # V = 512: 2 + 4 B
            assert int(row["k"]) == want and float(row["up_mbit_est"]) == LINKS[w].up_mbit
        assert int(rows["w1"]["k"]) > int(rows["w2"]["k"])
        full = int(first["n_accepted"]) == int(first["n_drafted"])
        g = min(6, g + 2) if full else max(1, g - 1)
    assert len({int(r["gamma"]) for r in rounds}) > 1


SPEC = RecordSpec(
    draft=DRAFT, workers={"w1": W1, "w2": W2}, weights=[0.5, 0.5], prompts="ids:1,2,3,4",
    max_new_tokens=N_TOKENS, seed=SEED, dtype="fp32", threads=1,
)  # fmt: skip


def test_content_only_policies_replay_exactly(tmp_path):
    """K from the link and heuristic gamma decide from content alone: the record (in
    process) and the replay (over TCP) make the same choices and emit the same tokens."""
    point = POINTS[3].model_copy(update={"point": 0})
    (trace,) = record_points(SPEC, [point], tmp_path / "cache")
    replay = ["--replay", str(trace)]
    ws = [WorkerProc(m, tmp_path / f"{m}.log", *replay) for m in (W1, W2)]
    try:
        proc = _server(ws, tmp_path / "run", [point], *replay)
    finally:
        for w in ws:
            w.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    (req,) = _rows(tmp_path / "run" / "requests.csv")
    assert req["status"] == "ok" and req["compute_mode"] == "replay"
    rounds = _rows(tmp_path / "run" / "rounds.csv")
    assert len({r["gamma"] for r in rounds}) > 1 and len({r["k"] for r in rounds}) > 1


def test_replay_refuses_timing_dependent_points(tmp_path):
    (trace,) = record_points(SPEC, [POINTS[1]], tmp_path / "cache")
    nobody = [type("Addr", (), {"port": 9})()] * 2  # never reached: refused before connecting
    proc = _server(nobody, tmp_path / "run", [POINTS[0]], "--replay", str(trace))
    assert proc.returncode == 2
    assert "cannot be replayed" in proc.stderr and "aggregation.quorum" in proc.stderr
    pf = tmp_path / "p.json"
    write_points(pf, [POINTS[2]])
    rec = subprocess.run(
        [sys.executable, "-m", "specfed.record", "--draft", DRAFT, "--workers", f"w1={W1}",
         "--points-file", str(pf), "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rec.returncode == 2 and "aggregation.deadline_ms" in rec.stderr


def test_policybench_fidelity_and_claim(run, tmp_path):
    """The benchmark's tables from a run folder: full is the reference (L1 0, identical 1),
    a round without w2 aggregates far from the ensemble, every L1 lies in [0, 2]."""
    import shutil

    import yaml

    from testbed.policybench import dominance, fidelity_table, point_table

    d = tmp_path / "run"
    shutil.copytree(run, d)
    scenario = {
        "models": {"draft": DRAFT, "workers": {"w1": W1, "w2": W2},
                   "weights": {"w1": 0.5, "w2": 0.5}, "dtype": "fp32"},
        "decoding": {"prompts": "ids:1,2,3,4"},
    }  # fmt: skip
    (d / "scenario.yaml").write_text(yaml.safe_dump(scenario))
    # a full-transmission request for the reference: the wait-all point's row, retyped
    req = d / "requests.csv"
    rows = _rows(req)
    full = dict(_by_point(rows, 1)[0], point="9", transmission="full", k="", request_id="full")
    with req.open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(rows[0])).writerow(full)
    fid = fidelity_table(d, log=lambda _m: None).set_index("request_id")
    ids = {int(r["point"]): r["request_id"] for r in rows}
    assert fid.loc["full", "l1"] == 0 and fid.loc["full", "identical"] == 1
    assert fid.loc[ids[1], "identical"] == 1  # the same tokens as the retyped copy
    for p in (0, 1, 2, 3):
        assert 0 < fid.loc[ids[p], "l1"] <= 2
    assert fid.loc[ids[0], "l1"] > fid.loc[ids[1], "l1"]  # w2 dropped: half the ensemble gone
    table = point_table(d, fid.reset_index())
    assert set(table.policy) == {"topk16 quorum1", "topk16", "topk16 deadline100ms",
                                 "auto2ms+heuristic", "full"}  # fmt: skip
    claim = dominance(table, "topk16")
    assert "topk16 quorum1" not in claim["dominate_by_means"]  # faster, but far less faithful
