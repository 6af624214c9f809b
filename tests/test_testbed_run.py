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


def test_smoke_scenario_end_to_end(env, tmp_path):
    out = tmp_path / "results"
    res = run_cli("run", str(SMOKE), "--out", str(out), "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = run_dir_of(out)
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


def test_bad_scenario_refused_before_anything_starts(env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("bw_mbit: 5,", "bw_mbit: -5,"))
    res = run_cli("run", str(bad), "--out", str(tmp_path / "r"), env=env)
    assert res.returncode == 2
    assert f"{bad}: links.w1.bw_mbit: must be >= 0.001" in res.stderr
    assert not (tmp_path / "r").exists()
