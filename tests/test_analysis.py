"""`analysis report` / `compare` / `analysis.load` on committed results fixtures (no root,
no models).

tests/fixtures/analysis-run/ is a real `testbed run` of tests/fixtures/analysis-fixture.yaml
(tiny models, star of 2 workers, w1's bandwidth 5 / 20 Mbit/s and one-way delay 10 / 40 ms;
full, top-K 16 x renormalize / draft-guided, top-K 8192 (= V, lossless), adaptive top-K,
federated AR; two prompts, 2 repetitions in random order). tests/fixtures/analysis-two-tier/
holds two runs of tests/fixtures/analysis-two-tier.yaml (two tiers; the switch-to-switch link
e1-s0 swept 5 / 20 Mbit/s). docs/analysis.md says how to regenerate them.

Every number checked here is recomputed from the fixture's CSV / JSON with pandas and scipy,
independently of the analysis package (its own Wilson, t interval, byte formula and
critical path).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import analysis
from analysis.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "analysis-run"
TWO_TIER = sorted((Path(__file__).parent / "fixtures" / "analysis-two-tier").iterdir())
PLOTS = (
    "summary",
    "latency_vs_bandwidth",
    "latency_vs_rtt",
    "speedup_vs_bandwidth",
    "speedup_vs_rtt",
    "breakdown",
    "ecdf",
    "accepted_length",
    "bytes_vs_k",
    "acceptance_vs_k",
    "fidelity_vs_k",
    "tradeoff",
    "bound",
)
TABLES = (
    "runs", "calibration", "summary", "latency", "speedup", "speedup_pairs", "breakdown",
    "accepted_length", "bytes", "fidelity", "fidelity_pairs", "bound", "requests",
    "round_times",
)  # fmt: skip
SETTING = ["links.w1.bw_mbit", "links.w1.delay_ms"]  # what the fixture sweeps besides options
V = 8192  # tiny-v8192 models: 2-byte top-K indices, fp32 values
Z = stats.norm.ppf(0.975)


# ----------------------------------------------------------------------------- helpers


def config_name(tr: str, k: float, rec: str, gamma: int, eps: float) -> str:
    if tr == "full":
        return "full" if gamma > 0 else "federated AR"
    if tr == "adaptive":
        return f"adaptive-{int(k)} {rec} eps={eps:g}"
    return f"{tr}-{int(k)} {rec}"


def _configs(df: pd.DataFrame) -> list[str]:
    cols = ["transmission", "k", "reconstruction", "gamma", "epsilon"]
    return [config_name(*r) for r in df[cols].itertuples(index=False)]


def read_requests(run: Path = FIXTURE) -> pd.DataFrame:
    df = pd.read_csv(run / "requests.csv", dtype={"tokens": str, "prompt_id": str})
    df["config"] = _configs(df)
    df["warmup"] = df["warmup"].astype(str) == "True"
    return df


def read_rounds(run: Path = FIXTURE) -> pd.DataFrame:
    df = pd.read_csv(run / "rounds.csv", dtype={"prompt_id": str})
    req = read_requests(run).set_index("request_id")
    # the configuration is the request's (rounds carry the worker's own transmission)
    df["config"] = df["request_id"].map(req["config"])
    df["warmup"] = df["request_id"].map(req["warmup"])
    return df


def t_ci(values: np.ndarray, lower: float = 0.0) -> tuple[float, float, float]:
    """Mean and t 95 % interval (scipy), cut at `lower`."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    if v.std() == 0:
        return m, m, m
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=m, scale=stats.sem(v))
    return m, max(min(lower, m), lo), hi


def wilson(k: float, n: float) -> tuple[float, float, float]:
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    if np.isnan(a) or np.isnan(b):
        return bool(np.isnan(a) and np.isnan(b))
    return abs(a - b) <= tol * max(1.0, abs(b))


def row(table: pd.DataFrame, **match: object) -> pd.Series:
    m = np.ones(len(table), dtype=bool)
    for k, v in match.items():
        m &= (table[k] == v).to_numpy()
    assert m.sum() == 1, (match, int(m.sum()))
    return table[m].iloc[0]


def md_table(md: str, heading: str, nth: int = 0) -> pd.DataFrame:
    """The nth markdown table after the line starting with `heading`, as strings."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    tables: list[list[str]] = []
    current: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    rows = [[c.strip() for c in t.strip("|").split("|")] for t in tables[nth]]
    return pd.DataFrame(rows[2:], columns=rows[0])


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(FIXTURE), "--out", str(out)]) == 0
    return out, (out / "report.md").read_text()


def table(report: tuple[Path, str], name: str) -> pd.DataFrame:
    return pd.read_csv(report[0] / "tables" / f"{name}.csv")


# ----------------------------------------------------------------------------- report


def test_report_writes_markdown_plots_and_tables(report: tuple[Path, str]) -> None:
    out, md = report
    for name in PLOTS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in md
    for name in TABLES:
        assert (out / "tables" / f"{name}.csv").is_file(), name
        assert (out / "tables" / f"{name}.parquet").is_file(), name
    meta = json.loads((FIXTURE / "meta.json").read_text())
    runs = md_table(md, "## Runs")
    assert runs.loc[0, "git_sha"] == meta["git"]["sha"][:12]
    assert runs.loc[0, "link_backend"] == meta["link_backend"]
    assert runs.loc[0, "scenario"] == "analysis-fixture"
    cal = table(report, "calibration")
    expected = [c for g in meta["groups"] for c in g["calibration"]]
    assert len(cal) == len(expected)
    assert np.allclose(cal["measured_rtt_ms"], [c["rtt"]["mean_ms"] for c in expected])


def test_exported_tables_are_tidy_numeric_and_load_with_pandas(report: tuple[Path, str]) -> None:
    out, md = report
    name_ok = re.compile(r"^[a-z0-9_]+$|^links\.[A-Za-z0-9-]+\.[a-z_.]+$|^[a-z0-9]+(-[a-z0-9]+)?_")
    for name in TABLES:
        csv = pd.read_csv(out / "tables" / f"{name}.csv")
        pq = pd.read_parquet(out / "tables" / f"{name}.parquet")
        assert list(csv.columns) == list(pq.columns), name
        assert len(csv) == len(pq) > 0, name
        for c in csv.columns:
            assert name_ok.match(c), (name, c)  # snake_case, dotted scenario paths, link columns
        for c in ("mean", "ci_low", "ci_high", "n", "n_obs", "fraction", "rounds"):
            if c in csv:
                assert pd.api.types.is_numeric_dtype(csv[c]), (name, c)
                assert pd.api.types.is_numeric_dtype(pq[c]), (name, c)
        text = csv.select_dtypes(exclude="number").astype(str)
        assert not text.apply(lambda s: s.str.contains("±")).any().any(), name
    summ = pd.read_parquet(out / "tables" / "summary.parquet")
    assert summ["n"].dtype.kind == "i" and summ["mean"].dtype.kind == "f"
    assert {"config", "metric", "mean", "ci_low", "ci_high", "n", *SETTING} <= set(summ.columns)
    # readable cells stay in the markdown
    assert " ± " in md_table(md, "## Summary per configuration")["ms/token"].iloc[0]


def _rep_ci(req: pd.DataFrame, col: str) -> dict[tuple, tuple[float, float, float, int]]:
    """(config, bw, delay) -> mean, CI, n over repetitions of the per-repetition means."""
    out = {}
    for key, g in req.groupby(["config", *SETTING]):
        per_rep = g.groupby("rep")[col].mean().to_numpy()
        out[key] = (*t_ci(per_rep), len(per_rep))
    return out


def test_summary_is_a_t_interval_over_repetitions_without_warmup(report: tuple[Path, str]) -> None:
    _, md = report
    summ = table(report, "summary")
    req = read_requests()
    inc = req[(req["status"] == "ok") & ~req["warmup"]]
    assert req["warmup"].sum() == 6  # one per network group
    for col in ("ms_per_token", "ttft_ms", "bytes_per_token", "tokens_per_round"):
        for (cfg, bw, dl), (m, lo, hi, n) in _rep_ci(inc, col).items():
            r = row(summ, config=cfg, metric=col, **{SETTING[0]: bw, SETTING[1]: dl})
            assert close(r["mean"], m) and close(r["ci_low"], lo) and close(r["ci_high"], hi)
            assert r["n"] == n == 2
            g = req[(req["config"] == cfg) & (req[SETTING[0]] == bw) & (req[SETTING[1]] == dl)]
            assert r["n_obs"] == (~g["warmup"]).sum()
            assert r["n_warmup_left_out"] == g["warmup"].sum()
            assert r["n_requests"] == len(g)
    shown = md_table(md, "## Summary per configuration")
    r = row(summ, config="full", metric="ms_per_token", **{SETTING[0]: 5.0, SETTING[1]: 10.0})
    cell = shown[(shown["config"] == "full") & shown["setting"].str.contains("bw_mbit=5,")]
    assert cell["ms/token"].iloc[0] == f"{r['mean']:.2f} ± {r['ci_high'] - r['mean']:.2f}"
    assert "6 warm-up request(s)" in md and "**left out**" in md


def test_keep_warmup_counts_them(tmp_path: Path) -> None:
    res = analysis.load(FIXTURE, keep_warmup=True)
    summ = res.tables()["summary"]
    ms = summ[summ["metric"] == "ms_per_token"]
    assert (ms["n_obs"] == ms["n_requests"]).all()
    assert (ms["n_warmup_left_out"] == 0).all()
    assert (
        main(["report", str(FIXTURE), "--out", str(tmp_path), "--keep-warmup", "--no-plots"]) == 0
    )
    assert "**kept** in the statistics" in (tmp_path / "report.md").read_text()


def test_acceptance_is_wilson_over_distinct_generations(report: tuple[Path, str]) -> None:
    summ = table(report, "summary")
    rounds = read_rounds()
    per_round = rounds.drop_duplicates(["request_id", "round"])
    counts = per_round.groupby("request_id")[["n_accepted", "n_drafted"]].sum()
    req = read_requests()
    req = req[(req["status"] == "ok") & ~req["warmup"] & (req["gamma"] > 0)]
    req = req.join(counts, on="request_id")
    for (cfg, bw, dl), g in req.groupby(["config", *SETTING]):
        distinct = g.drop_duplicates(["prompt_id", "seed", "tokens"])
        p, lo, hi = wilson(distinct["n_accepted"].sum(), distinct["n_drafted"].sum())
        r = row(summ, config=cfg, metric="acceptance", **{SETTING[0]: bw, SETTING[1]: dl})
        assert close(r["mean"], p) and close(r["ci_low"], lo) and close(r["ci_high"], hi)
        assert 0.0 <= r["ci_low"] <= r["mean"] <= r["ci_high"] <= 1.0
        assert r["n"] == len(distinct)
    assert row(summ, config="topk-16 draft-guided", metric="acceptance",
               **{SETTING[0]: 20.0, SETTING[1]: 10.0})["ci_high"] == 1.0  # fmt: skip


COMPONENTS = [
    "draft", "compute", "fidelity", "network", "decode", "dispatch", "aggregation", "other",
]  # fmt: skip


def _critical(rounds: pd.DataFrame) -> pd.DataFrame:
    """Per round: the worker whose reply was done last (call + decode) and its path."""
    keys = ["request_id", "round"]
    rounds = rounds.assign(done=rounds["t_call_ms"] + rounds["t_decode_ms"])
    crit = rounds.loc[rounds.groupby(keys)["done"].idxmax()].set_index(keys)
    per = pd.DataFrame(
        {
            "config": crit["config"],
            "rep": crit["rep"],
            "warmup": crit["warmup"],
            "bw": crit[SETTING[0]],
            "delay": crit[SETTING[1]],
            "gamma": crit["gamma"],
            "n_drafted": crit["n_drafted"],
            "n_emitted": crit["n_emitted"],
            "draft": crit["t_draft_ms"],
            "compute": crit["t_worker_ms"],
            "fidelity": crit["t_fidelity_ms"],
            "network": crit["t_call_ms"] - crit["t_worker_ms"] - crit["t_fidelity_ms"],
            "decode": crit["t_decode_ms"],
            "dispatch": crit["t_verify_ms"] - crit["done"],
            "aggregation": crit["t_aggregate_ms"],
            "t_round": crit["t_round_ms"],
        }
    )
    per["other"] = per["t_round"] - per[COMPONENTS[:-1]].sum(axis=1)
    return per


def test_breakdown_follows_the_critical_path_and_adds_up(report: tuple[Path, str]) -> None:
    per = _critical(read_rounds())
    # the remainder is never negative and small: a typical round leaves < 1 ms, and on
    # average < 5 % of the round time in every config (a loaded CPU's rare pauses land here);
    # the thread hand-offs around the parallel calls are their own component, never < 0
    assert (per["other"] >= 0).all() and (per["dispatch"] >= 0).all()
    assert (per.groupby("config")["other"].median() < 1.0).all()
    share = per.groupby("config")["other"].mean() / per.groupby("config")["t_round"].mean()
    assert (share < 0.05).all(), share
    bd = table(report, "breakdown")
    inc = per[~per["warmup"]]
    for (cfg, bw, dl), g in inc.groupby(["config", "bw", "delay"]):
        sub = bd[(bd["config"] == cfg) & (bd[SETTING[0]] == bw) & (bd[SETTING[1]] == dl)]
        rnd = sub[sub["per"] == "round"].set_index("component")
        for comp in COMPONENTS:
            m, _lo, _hi = t_ci(g.groupby("rep")[comp].mean().to_numpy())
            assert close(rnd.loc[comp, "mean"], m), (cfg, comp)
        assert close(rnd.loc[COMPONENTS, "mean"].sum(), rnd.loc["total", "mean"])
        tok = sub[sub["per"] == "token"].set_index("component")
        parts = [*COMPONENTS, "outside_rounds"]
        assert (tok.loc[parts, "mean"] >= 0).all()
        assert close(tok.loc[parts, "mean"].sum(), tok.loc["total", "mean"])
    # per token, federated AR and full are compared fairly: AR's round is one token
    summ = table(report, "summary")
    ms = row(
        summ, config="federated AR", metric="ms_per_token", **{SETTING[0]: 5.0, SETTING[1]: 10.0}
    )
    tot = bd[(bd["config"] == "federated AR") & (bd[SETTING[0]] == 5.0) & (bd[SETTING[1]] == 10.0)
             & (bd["per"] == "token") & (bd["component"] == "total")]  # fmt: skip
    assert close(tot["mean"].iloc[0], ms["mean"])


def test_accepted_length_histogram(report: tuple[Path, str]) -> None:
    _, md = report
    al = table(report, "accepted_length")
    per = _critical(read_rounds())
    per = per[~per["warmup"] & (per["n_drafted"] == per["gamma"])]
    for (cfg, bw, dl), g in per.groupby(["config", "bw", "delay"]):
        want = g["n_emitted"].value_counts(normalize=True)
        got = al[(al["config"] == cfg) & (al[SETTING[0]] == bw) & (al[SETTING[1]] == dl)]
        assert dict(zip(got["tokens_emitted"], got["fraction"], strict=True)) == pytest.approx(
            want.to_dict()
        )
        assert close(got["fraction"].sum(), 1.0)
    assert set(al.loc[al["config"] == "federated AR", "tokens_emitted"]) == {1}
    assert set(al.loc[al["config"] == "topk-16 draft-guided", "tokens_emitted"]) == {5}
    assert "## 4. Distributions" in md


def test_speedup_is_paired_geometric_mean(report: tuple[Path, str]) -> None:
    sp = table(report, "speedup")
    req = read_requests()
    req = req[(req["status"] == "ok") & ~req["warmup"]]
    key = ["rep", "prompt_id", "seed", *SETTING]
    for name, base in (
        ("federated AR", req[req["config"] == "federated AR"]),
        ("full", req[req["config"] == "full"]),
    ):
        b = base.set_index(key)["ms_per_token"]
        for (cfg, bw, dl), g in req[req["config"] != name].groupby(["config", *SETTING]):
            if name == "full" and cfg == "federated AR":
                continue
            keys = list(g[key].itertuples(index=False, name=None))
            ratios = [
                b[k] / ms for k, ms in zip(keys, g["ms_per_token"], strict=True) if k in b.index
            ]
            got = sp[(sp["config"] == cfg) & (sp["baseline"] == name) & (sp[SETTING[0]] == bw)
                     & (sp[SETTING[1]] == dl)]  # fmt: skip
            if not ratios:
                assert got.empty
                continue
            m, lo, hi = t_ci(np.log(ratios), lower=-np.inf)
            r = got.iloc[0]
            assert r["n"] == len(ratios)
            assert close(r["mean"], math.exp(m))
            if len(ratios) > 1:
                assert close(r["ci_low"], math.exp(lo)) and close(r["ci_high"], math.exp(hi))
            assert r["ci_low"] > 0 or np.isnan(r["ci_low"])


def test_bytes_measured_equal_documented_formula(report: tuple[Path, str]) -> None:
    _, md = report
    r = read_rounds()
    p = r["n_drafted"] + 1
    # docs/wire-protocol.md: VERIFY_REPLY = 12 (frame header) + 2 + len(request_id) + 40
    # (u32 round, f64 t_worker_ms, f64 local_l1, f64 t_fidelity_ms, f64 t_recorded_ms, u32 n)
    # + payload;
    # docs/codecs.md: full 12 + 4 P V; top-K 16 + P K (2 + 4); adaptive 12 + 4P + sum K_j (2 + 4)
    payload = np.select(
        [r["transmission"] == "full", r["transmission"] == "topk"],
        [12 + 4 * p * V, 16 + p * np.minimum(r["k"].fillna(0), V) * 6],
        12 + 4 * p + (p * r["k_mean"]).round() * 6,
    )
    r["formula"] = 12 + 2 + r["request_id"].str.len() + 40 + payload
    assert (r["bytes_up"] == r["formula"]).all()
    assert set(r["transmission"]) == {"full", "topk", "adaptive"}
    by = table(report, "bytes")
    assert (by["max_abs_diff_bytes"] == 0).all()
    inc = r[~r["warmup"]]
    for (cfg, bw, dl), g in inc.groupby(["config", SETTING[0], SETTING[1]]):
        got = row(by, config=cfg, **{SETTING[0]: bw, SETTING[1]: dl})
        assert close(got["up_bytes_formula"], g["formula"].mean())
        assert close(got["positions_mean"], (g["n_drafted"] + 1).mean())
    assert "Every recorded round matches the formula exactly." in md


def test_fidelity_is_paired_with_wilson_for_identical(report: tuple[Path, str]) -> None:
    fid = table(report, "fidelity")
    req = read_requests()
    req = req[(req["status"] == "ok") & ~req["warmup"]]
    key = ["rep", "prompt_id", "seed", "gamma", *SETTING]
    full = req[req["transmission"] == "full"].set_index(key)
    for (cfg, bw, dl), g in req[req["transmission"] != "full"].groupby(["config", *SETTING]):
        pairs = []
        for _, r in g.iterrows():
            k = tuple(r[key])
            if k in full.index:
                ref = full.loc[k]
                pairs.append((r["prompt_id"], r["tokens"], ref["tokens"],
                              r["logp_mean"] - ref["logp_mean"]))  # fmt: skip
        distinct = pd.DataFrame(pairs, columns=["prompt", "a", "b", "logp"]).drop_duplicates(
            ["prompt", "a", "b"]
        )
        got = fid[(fid["config"] == cfg) & (fid[SETTING[0]] == bw) & (fid[SETTING[1]] == dl)]
        ident = got.set_index("metric").loc["identical_fraction"]
        p, lo, hi = wilson(float((distinct["a"] == distinct["b"]).sum()), float(len(distinct)))
        assert (
            close(ident["mean"], p) and close(ident["ci_low"], lo) and close(ident["ci_high"], hi)
        )
        assert ident["n"] == len(distinct)
        logp = got.set_index("metric").loc["logp_diff"]
        assert close(logp["mean"], distinct["logp"].mean())
    assert set(fid["better"].dropna()) >= {"higher", "higher (later)"}
    k8192 = fid[
        (fid["config"] == "topk-8192 renormalize") & (fid["metric"] == "identical_fraction")
    ]
    assert (k8192["mean"] == 1.0).all()  # K = V is lossless
    k16 = fid[(fid["config"] == "topk-16 renormalize") & (fid["metric"] == "identical_fraction")]
    assert (k16["mean"] == 0.0).all()


def test_lower_bound_ratio_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    r = read_rounds()
    meta = json.loads((FIXTURE / "meta.json").read_text())
    rtt = {
        (pt, g["rep"], c["a"]): c["rtt"].get("median_ms", c["rtt"]["mean_ms"])
        for g in meta["groups"]
        for c in g["calibration"]
        for pt in g["points"]
    }
    r["rtt"] = [rtt[k] for k in zip(r["point"], r["rep"], r["worker"], strict=True)]

    def own(what: str) -> pd.Series:
        return pd.Series([row_[f"{w}_{what}"] for w, (_, row_) in zip(r["worker"], r.iterrows(),
                          strict=True)], index=r.index)  # fmt: skip

    # star: the worker's path is its access link and srv's; bytes on the wire add 66 header
    # bytes per 1448-byte TCP segment (the links count Ethernet frames)
    def wire(b: pd.Series) -> pd.Series:
        return b + 66 * np.maximum(1, np.ceil(b / 1448))

    bw_up = np.minimum(own("up_bw_mbit"), r["srv_down_bw_mbit"])
    bw_down = np.minimum(r["srv_up_bw_mbit"], own("down_bw_mbit"))
    down_ms = wire(r["bytes_down"]) * 8 / (bw_down * 1e3)
    r["wb"] = (
        r["rtt"] + wire(r["bytes_up"]) * 8 / (bw_up * 1e3) + down_ms + r["t_worker_ms"]
        + r["t_decode_ms"]
    )  # fmt: skip
    r["start"] = r["rtt"] + down_ms + r["t_worker_ms"]  # the earliest a reply can leave
    r["srv_in"] = wire(r["bytes_up"]) * 8 / (r["srv_down_bw_mbit"] * 1e3)  # all of them, in turn
    per = (
        r[~r["warmup"]]
        .groupby(["request_id", "round"])
        .agg(
            config=("config", "first"),
            draft=("t_draft_ms", "first"),
            agg=("t_aggregate_ms", "first"),
            t_round=("t_round_ms", "first"),
            wb=("wb", "max"),
            start=("start", "min"),
            srv_in=("srv_in", "sum"),
        )
    )
    slowest = np.maximum(per["wb"], per["start"] + per["srv_in"])
    per["ratio"] = per["t_round"] / (per["draft"] + slowest + per["agg"])
    bt = table(report, "bound")
    for cfg, g in per.groupby("config"):
        got = bt[bt["config"] == cfg]
        assert got["rounds"].sum() == len(g)
        assert close(got["ratio_min"].min(), g["ratio"].min())
    assert (per["ratio"] >= 1).all()
    assert f"All {len(per)} rounds are at or above the bound" in md


# ----------------------------------------------------------------------------- two runs


def test_two_runs_with_a_swept_switch_link_keep_its_points_apart(tmp_path: Path) -> None:
    res = analysis.load(TWO_TIER)
    assert "links.e1-s0.bw_mbit" in res.settings
    axis = res.axis("bandwidth")
    assert axis is not None and axis.column == "e1-s0_bw_mbit" and "e1-s0" in axis.label
    # w1's path: w1-e1, e1-s0, s0-srv: 1 + 5 + 1 ms one way, both directions
    assert set(res.requests["w1_path_rtt_ms"]) == {14.0}
    summ = res.tables()["summary"]
    ms = summ[summ["metric"] == "ms_per_token"]
    assert len(ms) == 4  # 2 configurations x 2 uplink bandwidths, never averaged together
    req = pd.concat([read_requests(p).assign(run=p.name) for p in TWO_TIER])
    req = req[(req["status"] == "ok") & ~req["warmup"]]
    for (cfg, bw), g in req.groupby(["config", "links.e1-s0.bw_mbit"]):
        per_unit = g.groupby(["run", "rep"])["ms_per_token"].mean().to_numpy()
        m, lo, _hi = t_ci(per_unit)
        r = row(ms, config=cfg, **{"links.e1-s0.bw_mbit": bw})
        assert r["n"] == 2 and close(r["mean"], m) and close(r["ci_low"], lo)
    full = ms[ms["config"] == "full"].set_index("links.e1-s0.bw_mbit")["mean"]
    assert full[5.0] > 1.5 * full[20.0]  # the shared uplink is the bottleneck of full
    out = tmp_path / "out"
    assert main(["report", *map(str, TWO_TIER), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "latency_vs_bandwidth.png" in md and "e1-s0 link bandwidth" in md
    assert (out / "speedup_vs_bandwidth.png").is_file()


def test_runs_from_two_commits_are_kept_apart_unless_pooled(tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(TWO_TIER[1], other)
    meta = json.loads((other / "meta.json").read_text())
    meta["git"] = {"sha": "f" * 40, "short": "ffffffff", "dirty": False}
    (other / "meta.json").write_text(json.dumps(meta))
    apart = analysis.load([TWO_TIER[0], other])
    assert "git_sha" in apart.settings
    ms = apart.tables()["summary"].query("metric == 'ms_per_token'")
    assert len(ms) == 8 and (ms["n"] == 1).all()
    assert any("kept apart" in n for n in apart.notes)
    pooled = analysis.load([TWO_TIER[0], other], pool_commits=True)
    ms = pooled.tables()["summary"].query("metric == 'ms_per_token'")
    assert len(ms) == 4 and (ms["n"] == 2).all()
    assert any("pooled" in n for n in pooled.notes)


def test_compute_mode_and_new_constant_columns_are_settings(tmp_path: Path) -> None:
    runs = []
    for mode in ("live", "emulated"):
        run = shutil.copytree(FIXTURE, tmp_path / mode)
        for name in ("requests.csv", "rounds.csv"):
            df = pd.read_csv(run / name, dtype=str)
            df["compute_mode"] = mode
            df["device_profile"] = f"profile-{mode}"  # a column a newer testbed might add
            df.to_csv(run / name, index=False)
        runs.append(run)
    res = analysis.load(runs)
    assert {"compute_mode", "device_profile"} <= set(res.settings)
    assert "compute_mode" in res.label_columns and "device_profile" not in res.label_columns
    ms = res.tables()["summary"].query("metric == 'ms_per_token'")
    one = analysis.load(FIXTURE).tables()["summary"].query("metric == 'ms_per_token'")
    assert len(ms) == 2 * len(one)  # live and emulated compute never averaged together
    assert set(ms["compute_mode"]) == {"live", "emulated"}


# ----------------------------------------------------------------------------- API


def test_load_api_returns_tidy_frames() -> None:
    res = analysis.load(FIXTURE)
    req, rnd, rt = res.requests, res.rounds, res.round_times
    assert len(req) == len(read_requests()) and len(rnd) == len(read_rounds())
    assert len(rt) == read_rounds().drop_duplicates(["request_id", "round"]).shape[0]
    for col in ("run", "git_sha", "config", "setting", "included", "warmup", "w1_path_rtt_ms",
                "w1_path_bw_up_mbit", *SETTING):  # fmt: skip
        assert col in req and col in rnd, col
    for col in ("draft_ms", "compute_ms", "network_ms", "aggregation_ms", "other_ms",
                "bound_ms", "critical_worker"):  # fmt: skip
        assert col in rt, col
    # rounds carry the request's configuration and the worker's own transmission
    assert (rnd["k"].fillna(-1) == rnd["worker_k"].fillna(-1)).all()
    assert res.keys[:2] == ["config", "transmission"]
    assert set(res.tables()) == set(TABLES)
    assert req["w1_path_rtt_ms"].isin([22.0, 82.0]).all()


# ----------------------------------------------------------------------------- variants


def _copy_fixture(dst: Path) -> Path:
    shutil.copytree(FIXTURE, dst)
    return dst


def test_failed_requests_counted_not_averaged_and_logp_optional(tmp_path: Path) -> None:
    run = _copy_fixture(tmp_path / "run")
    req = pd.read_csv(run / "requests.csv", dtype=str)
    victim = req.index[(req["transmission"] == "full") & (req["warmup"] == "False")
                       & (req["gamma"] == "4")][0]  # fmt: skip
    req.loc[victim, "status"] = "error"
    for c in ("ms_per_token", "e2e_ms", "acceptance"):
        req.loc[victim, c] = ""
    req.drop(columns="logp_mean").to_csv(run / "requests.csv", index=False)
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert not list(out.glob("*.png")) and "not drawn (--no-plots)" in md
    summ = pd.read_csv(out / "tables" / "summary.csv")
    bw, dl = float(req.loc[victim, SETTING[0]]), float(req.loc[victim, SETTING[1]])
    r = row(summ, config="full", metric="ms_per_token", **{SETTING[0]: bw, SETTING[1]: dl})
    assert r["n_failed"] == 1 and r["n_requests"] == 4
    ok = read_requests(run)
    ok = ok[(ok["status"] == "ok") & ~ok["warmup"] & (ok["config"] == "full")
            & (ok[SETTING[0]] == bw) & (ok[SETTING[1]] == dl)]  # fmt: skip
    assert r["n_obs"] == len(ok)
    assert close(r["mean"], ok.groupby("rep")["ms_per_token"].mean().mean())
    assert "logp_mean" not in set(summ["metric"])
    assert "logp_mean not measured" in md
    assert "1 failed request(s) excluded" in md
    # the failed request's rounds are out of the round statistics too
    bt = pd.read_csv(out / "tables" / "bound.csv")
    rounds = read_rounds(run)
    kept = rounds[rounds["request_id"].isin(ok["request_id"])]
    got = row(bt, config="full", **{SETTING[0]: bw, SETTING[1]: dl})
    assert got["rounds"] == kept[["request_id", "round"]].drop_duplicates().shape[0]


def test_plots_skipped_with_a_note_when_nothing_varies(tmp_path: Path, capsys) -> None:
    run = _copy_fixture(tmp_path / "run")
    for name in ("requests.csv", "rounds.csv"):
        df = pd.read_csv(run / name, dtype=str)
        keep = (df[SETTING[0]].astype(float) == 5) & (
            (df["transmission"] == "full") | (df["k"] == "16")
        )
        df[keep].to_csv(run / name, index=False)
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Plot skipped: no link bandwidth or delay varies" in md
    assert "Plot skipped: fewer than two values of K" in md
    assert not (out / "latency_vs_bandwidth.png").exists()
    assert not (out / "bytes_vs_k.png").exists()
    assert (out / "speedup.png").exists()  # per configuration, no link axis
    assert (out / "bound.png").exists() and (out / "breakdown.png").exists()
    assert "plot skipped" in capsys.readouterr().out


def test_compare_table_and_plots(tmp_path: Path, capsys) -> None:
    b = _copy_fixture(tmp_path / "b")
    req = pd.read_csv(b / "requests.csv", dtype=str)
    full = req["transmission"] == "full"
    req.loc[full, "ms_per_token"] = (req.loc[full, "ms_per_token"].astype(float) * 2).astype(str)
    req.to_csv(b / "requests.csv", index=False)
    out = tmp_path / "cmp"
    assert main(["compare", str(FIXTURE), str(b), "--out", str(out)]) == 0
    t = pd.read_csv(out / "tables" / "compare.csv")
    a_req = read_requests()
    a_req = a_req[(a_req["status"] == "ok") & ~a_req["warmup"]]
    ms = t[t["metric"] == "ms_per_token"]
    assert len(ms) == a_req.groupby(["config", *SETTING]).ngroups
    for (cfg, bw, dl), g in a_req.groupby(["config", *SETTING]):
        r = row(ms, config=cfg, **{SETTING[0]: bw, SETTING[1]: dl})
        assert close(r["mean_a"], g.groupby("rep")["ms_per_token"].mean().mean())
        factor = 2.0 if cfg in ("full", "federated AR") else 1.0
        assert r["ratio_b_a"] == pytest.approx(factor)
    assert np.allclose(t.loc[t["metric"] == "bytes_per_token", "ratio_b_a"], 1.0)
    for name in ("compare_ms_per_token.png", "compare_ratios.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "tables" / "compare.parquet").is_file()
    printed = capsys.readouterr().out
    assert f"report: {out / 'compare.md'}" in printed
    assert str(out / "compare_ratios.png") in printed


# ----------------------------------------------------------------------------- CLI


def test_not_a_run_folder_names_folder_and_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "requests.csv is missing" in err
    (tmp_path / "requests.csv").write_text("run_id\n")
    assert main(["compare", str(FIXTURE), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "rounds.csv is missing" in err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_run_folder_of_an_older_testbed_is_refused(tmp_path: Path, capsys) -> None:
    run = _copy_fixture(tmp_path / "old")
    req = pd.read_csv(run / "requests.csv", dtype=str)
    req.drop(columns=["warmup", "index_bytes"]).to_csv(run / "requests.csv", index=False)
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "warmup" in err and "older testbed" in err


def test_exit_status_1_on_failure_with_the_error_on_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    import analysis.report

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(analysis.report, "write_report", boom)
    assert main(["report", str(FIXTURE), "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "disk full" in captured.err and captured.out == ""


def test_help_version_and_paper_dispatch(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "report" in text and "compare" in text and "paper" in text
    assert "Exit status: 0 ok, 1 failure, 2 bad input" in text
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" in text and "--keep-warmup" in text and "--pool-commits" in text
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("analysis ")
    with pytest.raises(SystemExit) as exc:
        main(["report"])  # missing RESULTS_DIR: bad input
    assert exc.value.code == 2
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    fake = types.ModuleType("analysis.paper")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "analysis.paper", fake)
    assert main(["paper", "study.yaml", "--quiet"]) == 0
    assert seen == [["study.yaml", "--quiet"]]
    monkeypatch.setitem(sys.modules, "analysis.paper", None)  # import fails
    assert main(["paper"]) == 2
    assert "analysis/paper.py" in capsys.readouterr().err


def test_registry_gives_fixed_styles() -> None:
    from analysis.styles import FEDERATED_AR, FULL, config_style

    a = config_style("topk", 16, "renormalize", 4)
    assert a == config_style("topk", 16.0, "renormalize", 4)
    assert a.name == "topk-16 renormalize"
    assert config_style("topk", 64, "renormalize", 4).color != a.color
    assert config_style("topk", 16, "draft-guided", 4).marker != a.marker
    assert config_style("full", None, "none", 4) == FULL
    assert config_style("full", None, "none", 0) == FEDERATED_AR
    assert config_style("topk", 16, "renormalize", 0).name == "federated AR topk-16 renormalize"
    # K is told apart by marker and by hue, not by shade alone
    ks = [config_style("topk", k, "renormalize", 4) for k in (16, 64, 256, 1024)]
    assert len({s.marker for s in ks}) == 4
    hues = []
    for s in ks:
        import colorsys

        from matplotlib.colors import to_rgb

        hues.append(colorsys.rgb_to_hls(*to_rgb(s.color))[0])
    assert len({round(h, 3) for h in hues}) == 4


def test_policies_name_configurations_and_older_runs_default_to_the_papers(
    tmp_path: Path,
) -> None:
    """The fixture predates the policy columns: it loads with the paper's defaults (fixed
    gamma, fixed K, wait for all). Policy columns that vary split configurations and name
    them: a link-aware K point shows its budget instead of a K, a quorum point its M."""
    old = analysis.load(FIXTURE).requests
    assert set(old["gamma_policy"]) == {"fixed"} and set(old["aggregation"]) == {"all"}
    run = _copy_fixture(tmp_path / "run")
    req = pd.read_csv(run / "requests.csv", dtype=str)
    topk = req.index[req["transmission"] == "topk"]
    points = sorted(req.loc[topk, "point"].unique())
    auto, quorum = req["point"] == points[0], req["point"] == points[-1]
    req["k_policy"] = np.where(req["transmission"] == "full", "", "fixed")
    req["aggregation"] = "all"
    req.loc[auto, ["k_policy", "k_budget_ms", "k"]] = ["auto", "4", ""]
    req.loc[quorum, ["aggregation", "quorum"]] = ["quorum", "2"]
    req.to_csv(run / "requests.csv", index=False)
    names = analysis.load(run).requests.groupby("point")["config"].first()
    assert re.fullmatch(r"topk \S+ auto\(4ms\)", names[int(points[0])])
    assert names[int(points[-1])].endswith(" quorum 2")
    for p in (points[0], points[-1]):  # no other point carries these names
        assert (names == names[int(p)]).sum() == 1


def test_lower_bound_counts_replies_sharing_a_group_uplink() -> None:
    """Two-tier: both workers' replies cross the uplink e1-s0 one after another, so no round
    can end before the first of them could start plus both serialized on it."""
    res = analysis.load(TWO_TIER, keep_warmup=True)
    r = res.rounds

    def wire(b: pd.Series) -> pd.Series:
        return b + 66 * np.maximum(1, np.ceil(b / 1448))

    rate = pd.to_numeric(r["e1-s0_up_bw_mbit"])
    r = r.assign(uplink_ms=wire(r["bytes_up"]) * 8 / (rate * 1e3))
    per = r.groupby(["run", "request_id", "round"])
    shared = per["uplink_ms"].sum()
    rt = res.round_times.set_index(["run", "request_id", "round"])
    fixed = per["t_draft_ms"].first() + per["t_aggregate_ms"].first()
    bound = rt["bound_ms"] - fixed.reindex(rt.index)
    assert (bound.reindex(shared.index) >= shared - 1e-9).all()
    full = rt["transmission"] == "full"  # 2 x 0.15 MB replies: the shared uplink dominates
    assert (bound[full] > 1.5 * (shared[full.index[full]] / 2)).all()
    assert (rt["t_round_ms"] >= rt["bound_ms"] * 0.999).all()
