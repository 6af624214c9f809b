"""Policies in Mininet (root): a worker behind a slow link dropped by the deadline rule, and
link-aware K starting from the run's link calibration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0, reason="Mininet needs root"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="Mininet is not installed"),
]

SCENARIO = """
name: policies-mininet
seed: 5
topology: {name: star, params: {n_workers: 2}}
links:
  default: {bw_mbit: 100, delay_ms: 1}
  w1: {bw_mbit: 20, delay_ms: 5}
  w2: {bw_mbit: 2, delay_ms: 150}      # the straggler: RTT about 300 ms
models:
  draft: tiny-v8192-s1
  workers: {w1: tiny-v8192-s2, w2: tiny-v8192-s3}
  dtype: fp32
decoding: {gamma: 4, temperature: 1.0, max_new_tokens: 12, prompts: "ids:1,2,3,4,5"}
transmission: {mode: topk, k: 32, k_budget_ms: 2}
sweep:
  - {aggregation: [{wait: all}, {deadline_ms: 100}]}
  - {k: [auto]}
timeouts: {worker_ready_s: 120, point_s: 300}
"""


def test_deadline_drops_the_slow_link_and_k_starts_from_calibration(tmp_path):
    path = tmp_path / "policies-mininet.yaml"
    path.write_text(SCENARIO)
    env = {**os.environ, "SPECFED_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "run", str(path), "--out", str(tmp_path / "out"),
         "--quiet"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = list((tmp_path / "out" / "policies-mininet").iterdir())
    req = pd.read_csv(run_dir / "requests.csv")
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert (req.status == "ok").all() and len(req) == 3
    waited = req[(req.aggregation == "all") & (req.k_policy == "fixed")].iloc[0]
    deadline = req[req.aggregation == "deadline"].iloc[0]
    assert deadline.ms_per_token < waited.ms_per_token
    assert deadline.dropped_replies > 0 and waited.dropped_replies == 0
    late = rounds[(rounds.request_id == deadline.request_id) & rounds.dropped]
    assert set(late.worker) == {"w2"}
    assert (late.lateness_ms > 0).all() and (late.t_call_ms > 300).all()  # RTT 300 ms
    # k: auto starts from the measured links: w1's 20 Mbit/s fits a larger K than w2's 2
    points = [p for f in run_dir.glob("points-g*.json") for p in json.loads(f.read_text())]
    (auto,) = [p for p in points if p.get("k_auto")]
    links = auto["k_auto"]["links"]
    assert {e["source"] for e in links.values()} == {"calibrated"}
    assert 15 < links["w1"]["up_mbit"] < 20 and 1.5 < links["w2"]["up_mbit"] < 2
    assert 290 < links["w2"]["rtt_ms"] < 320
    k_rows = rounds[rounds.k_policy == "auto"]
    k_by_worker = k_rows.groupby("worker").k.min()
    assert k_by_worker["w1"] > 5 * k_by_worker["w2"]
