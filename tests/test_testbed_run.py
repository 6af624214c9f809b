"""`testbed run` end to end in Mininet (root): the smoke scenario, and crash safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from specfed.records import REQUEST_COLUMNS, ROUND_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "scenarios" / "smoke.yaml"

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0, reason="Mininet needs root"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="Mininet is not installed"),
]


@pytest.fixture
def env(tmp_path):
    """A private state directory: these tests see and clean only their own records."""
    return {**os.environ, "SPECFED_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbed.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dir_of(out: Path) -> Path:
    (d,) = list((out / "smoke").iterdir())
    return d


def recorded(state_dir: Path) -> dict[str, list]:
    """What the state files list: process pids and device names."""
    found: dict[str, list] = {"pids": [], "links": []}
    for f in state_dir.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "process":
                found["pids"].append((rec["pid"], rec["start"]))
            elif rec["kind"] in ("link", "bridge", "tap"):
                found["links"].append(rec["name"])
    return found


def alive(pid: int, start: int) -> bool:
    """The recorded process still runs (a zombie has ended: it only waits to be reaped by
    init, to which a SIGKILLed runner's children are reparented)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == start and fields[0] != "Z"


def device_names() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke scenario run live, then replayed (recorded once into a private trace
    cache, then served over the same emulated network with the recorded compute times)."""
    base = tmp_path_factory.mktemp("smoke")
    env = {
        **os.environ,
        "SPECFED_STATE_DIR": str(base / "state"),
        "SPECFED_CACHE": str(base / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    runs = {}
    for mode, extra in (
        ("live", []),
        ("replay", ["--set", "compute.mode=replay", "--set", "compute.profiles=recorded"]),
    ):
        out = base / mode
        res = run_cli("run", str(SMOKE), "--out", str(out), "--quiet", *extra, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[mode] = run_dir_of(out)
    runs["state"] = base / "state"
    runs["cache"] = base / "cache"
    return runs


def test_smoke_scenario_end_to_end(smoke_runs):
    run = smoke_runs["live"]
    tmp_path = run.parents[2]
    rounds, requests = pd.read_csv(run / "rounds.csv"), pd.read_csv(run / "requests.csv")
    assert list(rounds.columns[: len(ROUND_COLUMNS)]) == list(ROUND_COLUMNS)
    assert list(requests.columns[: len(REQUEST_COLUMNS)]) == list(REQUEST_COLUMNS)
    for col in ("w1_up_bw_mbit", "w1_down_delay_ms", "w2_up_bw_mbit", "link_backend"):
        assert col in requests.columns and col in rounds.columns
    assert set(requests.status) == {"ok"} and set(requests.transmission) == {"full", "topk"}
    meta = json.loads((run / "meta.json").read_text())
    assert meta["ok"] and meta["git"]["sha"] and meta["link_backend"] in ("tap", "tc")
    assert all(c["passed"] for g in meta["groups"] for c in g["calibration"])
    assert (run / "scenario.yaml").exists() and (run / "logs").is_dir()

    # full transmission: w1's network time per round is at least bytes / bandwidth
    w1 = rounds[rounds.worker == "w1"]
    full = w1[w1.transmission == "full"]
    serialization_ms = full.bytes_up * 8 / (full.w1_up_bw_mbit * 1e6) * 1e3
    assert (full.t_net_ms >= serialization_ms).all(), (full.t_net_ms, serialization_ms)
    assert serialization_ms.max() > 200  # 164 KB at 5 Mbit/s: the check is not vacuous
    # top-K rounds are faster than full ones on the 5 Mbit/s link (medians: one round can
    # be delayed by the shared CPU, and a request's last round may send fewer positions)
    topk = w1[w1.transmission == "topk"]
    assert topk.t_round_ms.median() < full.t_round_ms.median()
    # a normal run leaves nothing behind: its state file is removed only once every
    # recorded process, device and namespace is gone (checked by the teardown)
    assert not list((tmp_path / "state").glob("*.jsonl"))
    assert all(g["teardown"]["left"] == [] for g in meta["groups"])


def test_smoke_replay_equals_the_live_run(smoke_runs):
    """Replay emits exactly the recorded tokens for every point of the smoke scenario, and
    the bytes on the wire equal the live run's, round by round."""
    live, replay = smoke_runs["live"], smoke_runs["replay"]
    lq, rq = pd.read_csv(live / "requests.csv"), pd.read_csv(replay / "requests.csv")
    assert set(rq.status) == {"ok"} and set(rq.compute_mode) == {"replay"}
    key = ["point", "prompt_id"]
    merged = lq.merge(rq, on=key, suffixes=("_live", "_replay"))
    assert len(merged) == len(lq) == len(rq) > 0
    assert (merged.tokens_live == merged.tokens_replay).all()
    lr, rr = pd.read_csv(live / "rounds.csv"), pd.read_csv(replay / "rounds.csv")
    cols = ["point", "prompt_id", "round", "worker"]
    m = lr.merge(rr, on=cols, suffixes=("_live", "_replay"))
    assert len(m) == len(lr) == len(rr)
    assert (m.bytes_up_live == m.bytes_up_replay).all()
    assert (m.bytes_down_live == m.bytes_down_replay).all()
    # every token came from a trace, and the traces are in the cache for the next run
    meta = json.loads((replay / "meta.json").read_text())
    traces = [t for g in meta["groups"] for t in g["compute"]["traces"]]
    assert traces and all(Path(t).exists() for t in traces)
    assert all(str(smoke_runs["cache"]) in t for t in traces)
    for col in ("draft_profile", "w1_profile", "w1_speed"):
        assert set(rq[col]) <= {"recorded", 1.0}
    # the emulated compute is honoured: each round lasts at least the emulated draft plus
    # the critical worker's emulated compute and its serialization on the slow link
    w1 = rr[rr.worker == "w1"]
    floor = (
        w1.t_draft_emulated_ms.fillna(0)
        + w1.t_worker_ms
        + (w1.bytes_up * 8 / (w1.w1_up_bw_mbit * 1e6) * 1e3)
    )
    assert (w1.t_round_ms >= floor).all()


def test_sigkill_then_clean_leaves_nothing_and_next_run_works(env, tmp_path):
    state = tmp_path / "state"
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testbed.cli",
            "run",
            str(SMOKE),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "decoding.max_new_tokens=400",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    rounds_csv = None
    while time.monotonic() < deadline:  # wait until the server writes rounds
        runs = list((out / "smoke").glob("*/rounds.csv")) if (out / "smoke").exists() else []
        if runs and runs[0].stat().st_size > 2000:
            rounds_csv = runs[0]
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    assert rounds_csv is not None, "no round was recorded within 240 s"
    rec = recorded(state)
    assert rec["pids"] and rec["links"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = rounds_csv.read_text()
    assert kept.count("\n") > 1  # the rows written before the crash are intact

    res = run_cli("clean", env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not [p for p in rec["pids"] if alive(*p)]
    assert not set(rec["links"]) & device_names()
    assert not list(state.glob("*.jsonl"))
    assert rounds_csv.read_text() == kept

    res = run_cli("run", str(SMOKE), "--out", str(tmp_path / "again"), "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(state.glob("*.jsonl"))


def test_sigterm_tears_down_keeps_rows_and_resumes(env, tmp_path):
    """SIGTERM (what timeout, a CI cancel or kill send) during a request: the run tears down
    every process, device and state file it made, keeps its rows, and exits non-zero."""
    state = tmp_path / "state"
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.cli", "run", str(SMOKE), "--out", str(out), "--quiet",
         "--set", "decoding.max_new_tokens=400"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    rounds_csv = None
    while time.monotonic() < deadline:
        runs = list((out / "smoke").glob("*/rounds.csv")) if (out / "smoke").exists() else []
        if runs and runs[0].stat().st_size > 2000:
            rounds_csv = runs[0]
            break
        assert proc.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.5)
    assert rounds_csv is not None, "no round was recorded within 240 s"
    rec = recorded(state)
    assert rec["pids"] and rec["links"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert not [p for p in rec["pids"] if alive(*p)]
    assert not set(rec["links"]) & device_names()
    assert not list(state.glob("*.jsonl"))
    assert rounds_csv.read_text().count("\n") > 1
    meta = json.loads((rounds_csv.parent / "meta.json").read_text())
    assert meta["ok"] is False and meta["stopped"] == "stopped by SIGTERM"

    # --resume continues in the same folder: the unfinished points run again, the finished
    # ones are kept once, and the run ends complete
    run = rounds_csv.parent
    before = pd.read_csv(run / "requests.csv")
    done_before = before[before.status == "ok"][["point", "rep", "prompt_id"]]
    res = run_cli("run", "--resume", str(run), "--quiet", env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    after = pd.read_csv(run / "requests.csv")
    ok = after[after.status == "ok"]
    assert not ok.duplicated(["point", "rep", "prompt_id"]).any()
    assert len(ok) == 2  # smoke: 2 points x 1 prompt, all finished now
    keys = ["point", "rep", "prompt_id"]
    assert set(map(tuple, done_before.values)) <= set(map(tuple, ok[keys].values))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["ok"] is True and len(meta["resumed"]) == 1 and "stopped" not in meta
    assert set(ok.run_id) == {run.name}


def test_bad_scenario_refused_before_anything_starts(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("bw_mbit: 5,", "bw_mbit: -5,"))
    res = run_cli("run", str(bad), "--out", str(tmp_path / "r"), env=env)
    assert res.returncode == 2
    assert f"{bad}: links.w1.bw_mbit: must be >= 0.001" in res.stderr
    assert not (tmp_path / "r").exists()


def test_trace_driven_link_rates_in_records_and_report(env, tmp_path):
    """A step trace on w1's link (20 -> 2 -> 20 Mbit/s, 2 s each, looping): the run follows
    it, and the report gives each round's link rate at its start, from the trace."""
    trace = tmp_path / "steps.csv"
    trace.write_text("t_s,bw_mbit\n0,20\n2,2\n4,20\n6,20\n")
    out = tmp_path / "results"
    res = run_cli(
        "run", str(SMOKE), "--out", str(out), "--quiet",
        "--set", "links.w1.bw_mbit=null",
        "--set", f"links.w1.trace={{file: {trace}, format: csv}}",
        "--set", "decoding.max_new_tokens=60",
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    run = run_dir_of(out)
    requests = pd.read_csv(run / "requests.csv")
    assert set(requests.w1_up_trace) == {"steps.csv"}
    from analysis import load
    from analysis.tables import link_rates

    rates = link_rates(load(run))
    assert not rates.empty and set(rates.link) == {"w1-s1"}
    assert set(rates.rate_mbit) <= {20.0, 2.0} and len(set(rates.rate_mbit)) == 2
    # the trace's rate at each round's start follows the trace's clock (period 6 s)
    meta = json.loads((run / "meta.json").read_text())
    start = next(lk["trace_start_mono_s"] for g in meta["groups"] for lk in g["links"]
                 if "trace_start_mono_s" in lk)  # fmt: skip
    rounds = pd.read_csv(run / "rounds.csv").drop_duplicates(["request_id", "round"])
    phase = ((rounds.t_start_s - start) % 6.0).to_numpy()
    expected = [2.0 if 2 <= t < 4 else 20.0 for t in phase]
    got = rates[rates.direction == "up"].sort_values(["request_id", "round"]).rate_mbit
    assert sorted(got) == sorted(expected)
