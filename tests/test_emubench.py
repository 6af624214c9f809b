"""The analytic lower bound of a round, the per-configuration comparison (testbed.emubench)
and host ranges in scenarios."""

from __future__ import annotations

import pandas as pd
import pytest

from testbed.emubench import CONFIG, _per_config, lower_bounds, wire_bytes


def _round(**over):
    base = {
        "request_id": "r", "round": 0, "point": 0, "transmission": "topk", "k": 64,
        "t_round_ms": 0.0, "t_draft_emulated_ms": 40.0, "t_draft_ms": 41.0,
        "srv_up_bw_mbit": 1000.0, "srv_down_bw_mbit": 1000.0,
        "srv_up_delay_ms": 1.0, "srv_down_delay_ms": 1.0,
        "w1_up_bw_mbit": 5.0, "w1_down_bw_mbit": 5.0, "w1_up_delay_ms": 20.0,
        "w1_down_delay_ms": 20.0, "w2_up_bw_mbit": 100.0, "w2_down_bw_mbit": 100.0,
        "w2_up_delay_ms": 5.0, "w2_down_delay_ms": 5.0,
    }  # fmt: skip
    return {**base, **over}


@pytest.mark.filterwarnings("error")  # pandas warns of "-" put into a float column
def test_per_config_keeps_full_rows_whose_settings_do_not_apply():
    # full transmission has no k or epsilon (NaN in requests.csv): its rows must still form
    # their own configuration, not vanish from the groupby, and mix with no top-K row
    def req(transmission, k, ms, **over):
        row = {c: None for c in CONFIG}
        row.update(transmission=transmission, k=k, gamma=4, temperature=1.0)
        return {**row, "status": "ok", "warmup": False, "ms_per_token": ms,
                "request_id": "r", **over}  # fmt: skip

    rows = pd.DataFrame(
        [
            req("full", float("nan"), 1000.0),
            req("full", float("nan"), 1200.0),
            req("topk", 64.0, 300.0),
            req("topk", 64.0, 900.0, warmup=True),
            req("topk", 64.0, 900.0, status="failed"),
        ]
    )
    out = _per_config(rows).set_index("transmission")
    assert out.loc["full", "k"] == "-"
    assert out.loc["full", "ms_per_token"] == pytest.approx(1100.0)
    assert out.loc["full", "n"] == 2
    assert out.loc["topk", "ms_per_token"] == pytest.approx(300.0)
    assert out.loc["topk", "n"] == 1


def test_wire_bytes_count_segment_headers():
    assert wire_bytes(100) == 166
    assert wire_bytes(1448) == 1448 + 66
    assert wire_bytes(1449) == 1449 + 132


def test_lower_bound_is_the_slowest_worker_path():
    rows = pd.DataFrame(
        [
            _round(worker="w1", t_worker_ms=100.0, bytes_up=10_000, bytes_down=100),
            _round(worker="w2", t_worker_ms=300.0, bytes_up=10_000, bytes_down=100),
        ]
    )
    rows["t_round_ms"] = 500.0
    lb = lower_bounds(rows).iloc[0]
    w1 = 42 + wire_bytes(100) * 8 / 5e3 + 100 + wire_bytes(10_000) * 8 / 5e3
    w2 = 12 + wire_bytes(100) * 8 / 100e3 + 300 + wire_bytes(10_000) * 8 / 100e3
    assert lb.lb_ms == pytest.approx(40 + max(w1, w2))
    assert lb.ratio == pytest.approx(500 / lb.lb_ms) and lb.overhead_ms == pytest.approx(
        500 - lb.lb_ms
    )


def test_shared_server_link_bounds_many_replies():
    rows = pd.DataFrame(
        [_round(worker="w2", t_worker_ms=10.0, bytes_up=1_000_000, bytes_down=100,
                srv_down_bw_mbit=10.0)] * 4
    )  # fmt: skip
    lb = lower_bounds(rows).iloc[0]
    assert lb.lb_ms >= 40 + 4 * wire_bytes(1_000_000) * 8 / 10e3


def test_host_ranges_in_scenarios(tmp_path):
    from testbed.scenario import load_scenario

    p = tmp_path / "r.yaml"
    p.write_text(
        "name: r\ntopology: {name: star, params: {n_workers: 5}}\n"
        "links: {default: {bw_mbit: 100}, 'w1..w3': {bw_mbit: 5}, w2: {bw_mbit: 7}}\n"
        "models: {draft: tiny-v64-s1, workers: {'w1..w4': tiny-v64-s2, w5: tiny-v64-s3}}\n"
        "decoding: {prompts: 'ids:1,2'}\n"
    )
    sc = load_scenario(p)
    assert list(sc.workers) == ["w1", "w2", "w3", "w4", "w5"]
    assert sc.workers["w4"] == "tiny-v64-s2" and sc.workers["w5"] == "tiny-v64-s3"
    assert {k: v.bw_mbit for k, v in sc.spec.links.items()} == {
        "default": 100.0, "w1": 5.0, "w2": 7.0, "w3": 5.0,  # explicit w2 wins over the range
    }  # fmt: skip
    p.write_text(p.read_text().replace("'w1..w3'", "'w3..w1'"))
    with pytest.raises(ValueError, match=r"links\.w3\.\.w1: a range needs"):
        load_scenario(p)
