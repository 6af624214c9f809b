"""`analysis report` / `analysis compare` on the committed results fixture (no root, no models).

The fixture tests/fixtures/analysis-run/ is a real `testbed run` of
tests/fixtures/analysis-fixture.yaml (tiny models, w1 at 5 and 20 Mbit/s, full vs top-K
16/64/8192 x renormalize/draft-guided at gamma 4, federated AR at gamma 0, 2 repetitions);
see docs/analysis.md to regenerate it. Every number checked here is recomputed from the
fixture's CSV / JSON with pandas, independently of the analysis package.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "analysis-run"
PLOTS = (
    "summary",
    "latency_vs_link",
    "breakdown",
    "bytes_vs_k",
    "acceptance_vs_k",
    "fidelity_vs_k",
    "bound",
)
V = 8192  # tiny-v8192 models: 2-byte top-K indices, fp32 values


# ----------------------------------------------------------------------------- helpers


def config_name(tr: str, k: float, rec: str, gamma: int) -> str:
    if tr == "full":
        return "full" if gamma > 0 else "federated AR"
    return f"{tr}-{int(k)} {rec}"


def read_requests(run: Path = FIXTURE) -> pd.DataFrame:
    df = pd.read_csv(run / "requests.csv", dtype={"tokens": str, "prompt_id": str})
    df["config"] = [
        config_name(*r)
        for r in df[["transmission", "k", "reconstruction", "gamma"]].itertuples(index=False)
    ]
    return df


def read_rounds(run: Path = FIXTURE) -> pd.DataFrame:
    df = pd.read_csv(run / "rounds.csv")
    df["config"] = [
        config_name(*r)
        for r in df[["transmission", "k", "reconstruction", "gamma"]].itertuples(index=False)
    ]
    return df


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


def num(cell: str) -> float:
    """First number of a cell ('87.06 ± 1.98 (2)' -> 87.06; '-' -> nan)."""
    m = re.match(r"^-?\d+(\.\d+)?", cell)
    return float(m.group(0)) if m else float("nan")


def by_config(df: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["config"]: row for _, row in df.iterrows()}


def close(cell: str, value: float, decimals: int) -> bool:
    if np.isnan(value):
        return cell.strip() in ("-", "- ± -")
    return abs(num(cell) - value) <= 0.5 * 10**-decimals + 1e-9


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(FIXTURE), "--out", str(out)]) == 0
    return out, (out / "report.md").read_text()


# ----------------------------------------------------------------------------- report


def test_report_writes_markdown_plots_and_tables(report: tuple[Path, str], capsys) -> None:
    out, md = report
    for name in PLOTS:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in md
    assert {"summary.csv", "bytes.csv", "fidelity.csv", "bound.csv"} <= {
        p.name for p in (out / "tables").iterdir()
    }
    meta = json.loads((FIXTURE / "meta.json").read_text())
    runs = md_table(md, "## Runs")
    assert runs.loc[0, "git sha"] == meta["git"]["sha"][:12]
    assert runs.loc[0, "backend"] == meta["link_backend"]
    assert runs.loc[0, "scenario"] == "analysis-fixture"
    cal = md_table(md, "### Link calibration")
    expected = [c for g in meta["groups"] for c in g["calibration"]]
    assert len(cal) == len(expected)
    for cell, c in zip(cal["measured RTT ms"], expected, strict=True):
        assert close(cell, c["rtt"]["mean_ms"], 3)
    # one-way delay does not vary in the fixture: said so, not plotted
    assert "No link one-way delay varies" in md


def test_summary_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    req = read_requests()
    ok = req[req["status"] == "ok"]
    table = by_config(md_table(md, "## Summary per configuration"))
    assert set(table) == set(req["config"])
    for cfg, g in ok.groupby("config"):
        row = table[cfg]
        assert int(row["requests"]) == (req["config"] == cfg).sum()
        assert int(row["failed"]) == 0
        mean, sd = row["ms/token"].split(" ± ")
        assert close(mean, g["ms_per_token"].mean(), 2)
        assert close(sd, g["ms_per_token"].std(), 2)
        assert close(row["ttft ms"], g["ttft_ms"].mean(), 2)
        assert close(row["acceptance"], g["acceptance"].mean(), 3)
        assert close(row["tokens/round"], g["tokens_per_round"].mean(), 3)
        assert close(row["bytes/token"], g["bytes_per_token"].mean(), 1)
        assert close(row["logp/token"], g["logp_mean"].mean(), 4)


def test_latency_vs_bandwidth_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    req = read_requests()
    table = by_config(md_table(md, "## 1. Latency"))
    for (cfg, bw), g in req.groupby(["config", "w1_up_bw_mbit"]):
        cell = table[cfg][f"w1_bw = {bw:g}"]
        mean, rest = cell.split(" ± ")
        assert close(mean, g["ms_per_token"].mean(), 2)
        assert close(rest, g["ms_per_token"].std(), 2)
        assert rest.endswith(f"({len(g)})")


def test_breakdown_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    r = read_rounds()
    keys = ["request_id", "round"]
    slow = r.loc[r.groupby(keys)["t_call_ms"].idxmax()].set_index(keys)
    per = r.groupby(keys).agg(
        config=("config", "first"),
        bw=("w1_up_bw_mbit", "first"),
        draft=("t_draft_ms", "first"),
        compute=("t_worker_ms", "max"),
        aggregation=("t_aggregate_ms", "first"),
        t_round=("t_round_ms", "first"),
    )
    per["network"] = slow["t_call_ms"] - slow["t_worker_ms"]
    per["other"] = per["t_round"] - per[["draft", "compute", "network", "aggregation"]].sum(axis=1)
    table = md_table(md, "## 2. Round-time breakdown")
    for _, row in table.iterrows():
        g = per[(per["config"] == row["config"]) & (per["bw"] == num(row["w1_bw"]))]
        assert int(row["rounds"]) == len(g)
        for comp in ("draft", "compute", "network", "aggregation", "other"):
            assert close(row[comp], g[comp].mean(), 2), (row["config"], comp)


def test_bytes_measured_equal_documented_formula(report: tuple[Path, str]) -> None:
    _, md = report
    r = read_rounds()
    p = r["n_drafted"] + 1
    # docs/wire-protocol.md: up = 12 + 20 + payload; codecs.md: topk 16 + P K (ib + vb),
    # full 12 + 4 P V; V = 8192 -> ib = 2, fp32 -> vb = 4
    payload = np.where(
        r["transmission"] == "full", 12 + 4 * p * V, 16 + p * np.minimum(r["k"], V) * (2 + 4)
    )
    r["formula"] = 12 + 20 + payload
    assert (r["bytes_up"] == r["formula"]).all()
    req = read_requests()
    per_token = r.groupby("request_id")["formula"].sum() / req.set_index("request_id")["new_tokens"]
    req["formula_per_token"] = req["request_id"].map(per_token)
    table = by_config(md_table(md, "## 3. Bytes per token"))
    for cfg, g in r.groupby("config"):
        row = table[cfg]
        assert close(row["up_formula"], g["formula"].mean(), 1)
        assert close(row["up_measured"], g["bytes_up"].mean(), 1)
        assert num(row["max_abs_diff"]) == 0
        assert close(row["P_mean"], (g["n_drafted"] + 1).mean(), 3)
        rq = req[req["config"] == cfg]
        assert close(row["per_token_formula"], rq["formula_per_token"].mean(), 1)
        assert close(row["per_token_measured"], rq["bytes_per_token"].mean(), 1)
        assert row["index_bytes"] == ("-" if cfg in ("full", "federated AR") else "2")
    assert "Every recorded round matches the formula exactly." in md


def test_acceptance_vs_k_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    req = read_requests()
    eps = read_rounds().groupby("config")["eps_mean"].mean()
    table = by_config(md_table(md, "## 4. Acceptance"))
    for cfg, g in req.groupby("config"):
        assert close(table[cfg]["acceptance"], g["acceptance"].mean(), 3)
        assert close(table[cfg]["tokens_per_round"], g["tokens_per_round"].mean(), 3)
        assert close(table[cfg]["eps_mean"], eps[cfg], 4)


def test_fidelity_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    req = read_requests()
    key = ["prompt_id", "seed", "rep", "gamma", "temperature", "w1_up_bw_mbit"]
    full = req[req["transmission"] == "full"].set_index(key)
    rows = []
    for _, r in req[req["transmission"] != "full"].iterrows():
        ref = full.loc[tuple(r[key])]
        a, b = r["tokens"].split(), ref["tokens"].split()
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
        first = diff[0] if diff else (np.nan if a == b else min(len(a), len(b)))
        rows.append(
            {
                "config": r["config"],
                "identical": a == b,
                "first": first,
                "acc": r["acceptance"] - ref["acceptance"],
                "logp": r["logp_mean"] - ref["logp_mean"],
            }
        )
    pairs = pd.DataFrame(rows)
    table = by_config(md_table(md, "## 5. Fidelity"))
    for cfg, g in pairs.groupby("config"):
        row = table[cfg]
        assert int(row["pairs"]) == len(g) == 4
        assert close(row["identical_frac"], g["identical"].mean(), 3)
        assert close(row["first_divergence"], g["first"].mean(), 2)
        assert close(row["acceptance_diff"], g["acc"].mean(), 3)
        assert close(row["logp_diff"], g["logp"].mean(), 4)
    # K = V = 8192 is lossless: the same tokens as full transmission
    assert num(table["topk-8192 renormalize"]["identical_frac"]) == 1.0
    assert num(table["topk-16 renormalize"]["identical_frac"]) == 0.0


def test_lower_bound_ratio_equals_pandas(report: tuple[Path, str]) -> None:
    _, md = report
    r = read_rounds()
    meta = json.loads((FIXTURE / "meta.json").read_text())
    rtt = {
        (pt, g["rep"], c["a"]): c["rtt"]["mean_ms"]
        for g in meta["groups"]
        for c in g["calibration"]
        for pt in g["points"]
    }
    r["rtt"] = [rtt[k] for k in zip(r["point"], r["rep"], r["worker"], strict=True)]

    def col(what: str) -> pd.Series:
        return pd.Series(
            [row[f"{w}_{what}"] for w, (_, row) in zip(r["worker"], r.iterrows(), strict=True)],
            index=r.index,
        )

    bw_up = np.minimum(col("up_bw_mbit"), r["srv_down_bw_mbit"])
    bw_down = np.minimum(r["srv_up_bw_mbit"], col("down_bw_mbit"))
    r["wb"] = (
        r["rtt"]
        + r["bytes_up"] * 8 / (bw_up * 1e3)
        + r["bytes_down"] * 8 / (bw_down * 1e3)
        + r["t_worker_ms"]
    )
    per = r.groupby(["request_id", "round"]).agg(
        config=("config", "first"),
        draft=("t_draft_ms", "first"),
        agg=("t_aggregate_ms", "first"),
        t_round=("t_round_ms", "first"),
        wb=("wb", "max"),
    )
    per["bound"] = per["draft"] + per["wb"] + per["agg"]
    per["ratio"] = per["t_round"] / per["bound"]
    table = by_config(md_table(md, "## 6. Round time"))
    for cfg, g in per.groupby("config"):
        row = table[cfg]
        assert int(row["rounds"]) == len(g)
        assert close(row["bound_ms"], g["bound"].mean(), 2)
        assert close(row["ratio_mean"], g["ratio"].mean(), 3)
        assert close(row["ratio_min"], g["ratio"].min(), 3)
        assert int(row["below_1"]) == (g["ratio"] < 1).sum()
    assert (per["ratio"] >= 1).all()
    assert f"All {len(per)} rounds are at or above the bound" in md


# ----------------------------------------------------------------------------- variants


def _copy_fixture(dst: Path) -> Path:
    shutil.copytree(FIXTURE, dst)
    return dst


def test_failed_requests_counted_not_averaged_and_logp_optional(tmp_path: Path) -> None:
    run = _copy_fixture(tmp_path / "run")
    req = pd.read_csv(run / "requests.csv", dtype=str)
    victim = req.index[req["transmission"] == "full"][0]
    req.loc[victim, "status"] = "error"
    for c in ("ms_per_token", "e2e_ms", "acceptance"):
        req.loc[victim, c] = ""
    req.drop(columns="logp_mean").to_csv(run / "requests.csv", index=False)
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    table = by_config(md_table(md, "## Summary per configuration"))
    ok = read_requests(run)
    ok = ok[(ok["status"] == "ok") & (ok["config"] == "full")]
    assert int(table["full"]["requests"]) == 4
    assert int(table["full"]["failed"]) == 1
    assert close(table["full"]["ms/token"].split(" ± ")[0], ok["ms_per_token"].mean(), 2)
    assert "logp/token" not in table["full"]
    assert "logp_mean not measured" in md
    assert "1 failed request(s) excluded" in md
    # the failed request's rounds are out of the round statistics too
    bound = by_config(md_table(md, "## 6. Round time"))
    rounds = read_rounds(run)
    kept = rounds[rounds["request_id"].isin(ok["request_id"])]
    assert int(bound["full"]["rounds"]) == kept[["request_id", "round"]].drop_duplicates().shape[0]


def test_plots_skipped_with_a_note_when_nothing_varies(tmp_path: Path, capsys) -> None:
    run = _copy_fixture(tmp_path / "run")
    for name in ("requests.csv", "rounds.csv"):
        df = pd.read_csv(run / name, dtype=str)
        keep = (df["w1_up_bw_mbit"].astype(float) == 5) & (
            (df["transmission"] == "full") | (df["k"] == "16")
        )
        df[keep].to_csv(run / name, index=False)
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Plot skipped: no link bandwidth or delay varies" in md
    assert "Plot skipped: fewer than two values of K" in md
    assert not (out / "latency_vs_link.png").exists()
    assert not (out / "bytes_vs_k.png").exists()
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
    md = (out / "compare.md").read_text()
    table = md_table(md, "## Metrics per configuration")
    a_req = read_requests()
    assert len(table) == a_req.groupby(["config", "w1_up_bw_mbit"]).ngroups
    for _, row in table.iterrows():
        g = a_req[
            (a_req["config"] == row["config"]) & (a_req["w1_up_bw_mbit"] == num(row["w1_bw"]))
        ]
        assert close(row["ms/token A"], g["ms_per_token"].mean(), 2)
        factor = 2.0 if row["config"] in ("full", "federated AR") else 1.0
        assert close(row["ms/token B"], factor * g["ms_per_token"].mean(), 2)
        assert num(row["ms/token B/A"]) == pytest.approx(factor, abs=5e-4)
        assert num(row["bytes/token B/A"]) == pytest.approx(1.0, abs=5e-4)
    for name in ("compare_ms_per_token.png", "compare_ratios.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
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


def test_help_and_paper_dispatch(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "report" in text and "compare" in text and "paper" in text
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
