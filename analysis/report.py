"""analyze -> plot -> report: report.md with its tables and plots, and `compare` of two runs.

Everything is recomputed from the run folders' CSVs (analysis.load, analysis.tables); every
table of report.md is also written as CSV under <out>/tables/ for reuse. Numbers in
report.md use fixed decimals per unit: ms 2, bytes 1, fractions and ratios 3, nats 4.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from analysis import tables as T
from analysis.load import Data, load, swept_paths


def fmt(x: Any, digits: int = 2) -> str:
    """A cell: fixed decimals, '-' for missing."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def pm(m: float, sd: float, digits: int = 2) -> str:
    """mean ± sd ('-' without a value; sd '-' with one sample)."""
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{fmt(m, digits)} ± {fmt(sd, digits)}"


def _pm_cols(df: pd.DataFrame, col: str, digits: int) -> list[str]:
    """pm() of df[col] and df[col + '_sd'], row by row."""
    return [pm(m, s, digits) for m, s in zip(df[col], df[f"{col}_sd"], strict=True)]


def md_table(df: pd.DataFrame, formats: dict[str, int] | None = None) -> str:
    """A GitHub markdown table; float columns with the decimals in `formats` (default 2)."""
    if df.empty:
        return "(no rows)"
    formats = formats or {}
    cells = pd.DataFrame(
        {
            c: [
                fmt(v.item() if hasattr(v, "item") else v, formats.get(str(c), 2))
                for v in df[c].to_numpy(dtype=object)
            ]
            for c in df.columns
        }
    )
    return str(
        tabulate(cells, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)
    )


@dataclass
class Report:
    """What `report` wrote: the markdown file, the plots, the CSV tables, the notes."""

    path: Path
    plots: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lines: list[str] = []
        self.plots: list[Path] = []
        self.tables: list[Path] = []
        self.notes: list[str] = []

    def __call__(self, *text: str) -> None:
        self.lines.extend(text)

    def table(self, name: str, df: pd.DataFrame, formats: dict[str, int] | None = None) -> None:
        path = self.out / "tables" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        self.tables.append(path)
        self(
            md_table(df, formats), "", f"(table as CSV: [tables/{name}.csv](tables/{name}.csv))", ""
        )

    def plot(self, make: Callable[[Path], Path], name: str, alt: str) -> None:
        path = make(self.out / f"{name}.png")
        self.plots.append(path)
        self(f"![{alt}]({name}.png)", "")

    def skip(self, what: str, why: str) -> None:
        self.notes.append(f"{what}: plot skipped ({why})")
        self(f"*Plot skipped: {why}.*", "")


def _command(argv: Sequence[str] | None) -> str:
    return "analysis " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )


def _swept_text(data: Data) -> str:
    paths = swept_paths(data.runs)
    return ", ".join(f"`{p}`" for p in paths) if paths else "nothing"


def write_report(paths: Sequence[Path], out: Path, argv: Sequence[str] | None = None) -> Report:
    """Load the run folders, compute every table, draw the plots, write out/report.md."""
    from analysis import plots

    data = load([Path(p) for p in paths])
    out.mkdir(parents=True, exist_ok=True)
    plots.theme()
    w = _Writer(out)
    w.notes.extend(data.notes)
    w(
        "# SpecFed run report",
        "",
        f"Runs: {', '.join(f'`{r.path}`' for r in data.runs)}. Swept: {_swept_text(data)}.",
        f"Regenerate with `{_command(argv)}`. Every number below is recomputed from the runs' "
        "`requests.csv` / `rounds.csv` / `meta.json`; only requests with status `ok` enter "
        "the statistics (failed ones are counted). Times in ms, bandwidth in Mbit/s, "
        "one-way delays in ms, sizes in bytes.",
        "",
        "## Runs",
        "",
    )
    w.table("runs", T.runs_table(data), {"V": 0})
    cal = T.calibration_table(data)
    w("### Link calibration (per network group and worker path)", "")
    if cal.empty:
        w("No calibration in meta.json (network.calibrate off).", "")
    else:
        w.table(
            "calibration",
            cal,
            {"configured RTT ms": 3, "measured RTT ms": 3, "RTT sd ms": 3, "error ms": 3,
             "goodput up ratio": 3, "goodput down ratio": 3},
        )  # fmt: skip
        bad = cal[cal["passed"] == False]  # noqa: E712
        if len(bad):
            w.notes.append(f"{len(bad)} calibrated path(s) out of tolerance (see the table)")

    # ------------------------------------------------------------------ summary
    summ = T.summary_table(data)
    failed = int(summ["failed"].sum())
    w("## Summary per configuration", "")
    w(
        f"{int(summ['requests'].sum())} requests, {failed} failed (excluded from the means). "
        "ms/token = e2e / new tokens, mean ± sd over repetitions, prompts and link settings; "
        "acceptance = accepted / drafted; bytes/token = up bytes (all workers) / new tokens.",
        "",
    )
    ms = [pm(m, s) for m, s in zip(summ["ms/token"], summ["ms/token sd"], strict=True)]
    shown = summ.assign(**{"ms/token": ms}).drop(columns="ms/token sd")
    w.table(
        "summary", shown, {"acceptance": 3, "tokens/round": 3, "bytes/token": 1, "logp/token": 4}
    )
    if failed:
        w.notes.append(
            f"{failed} failed request(s) excluded from the statistics (see events.jsonl)"
        )
    if len(summ) > 1:
        w.plot(lambda p: plots.summary_bars(data, summ, p), "summary", "per configuration")

    # ------------------------------------------------------------------ 1
    w("## 1. Latency vs link bandwidth and delay", "")
    axes = T.link_axes(data)
    if axes:
        for axis in axes:
            t = T.latency_vs_link(data, axis)
            w(f"ms per token vs {axis.label}: mean ± sd (n requests).", "")
            piv = t.assign(
                cell=[
                    f"{pm(m, s)} ({n})" for m, s, n in zip(t["mean"], t["sd"], t["n"], strict=True)
                ]
            )
            piv = piv.pivot(index="config", columns=axis.column, values="cell")
            piv = piv.reindex([c for c in data.config_order() if c in piv.index])
            piv.columns = [f"{axis.column} = {c:g}" for c in piv.columns]
            w.table(f"latency_vs_{axis.column}", piv.reset_index())
        w.plot(
            lambda p: plots.latency_vs_link(data, axes, p),
            "latency_vs_link",
            "ms per token vs link",
        )
        kinds = {a.kind for a in axes}
        for k, what in (("bw", "bandwidth"), ("delay", "one-way delay")):
            if k not in kinds:
                w.notes.append(f"latency vs {what}: not plotted (no link {what} varies)")
                w(f"*No link {what} varies in these runs: latency vs {what} not plotted.*", "")
    else:
        w.skip("latency vs bandwidth / delay", "no link bandwidth or delay varies in these runs")

    # ------------------------------------------------------------------ 2
    rounds = T.per_round(data)
    w("## 2. Round-time breakdown", "")
    if rounds.empty:
        w.skip("round-time breakdown", "no round of an ok request recorded")
    else:
        facet = next((a.column for a in axes if a.kind == "bw"), axes[0].column if axes else None)
        flabel = next((a.label for a in axes if a.column == facet), "")
        bt = T.breakdown_table(data, rounds, facet)
        w(
            "Mean ms per round. draft = t_draft; compute = max over workers of t_worker; "
            "network = t_call - t_worker of the slowest worker (largest t_call); aggregation = "
            "t_aggregate (decode, reconstruct, aggregate, accept); other = t_round - the four "
            "(negative when the worker with the largest compute is not the slowest one).",
            "",
        )
        w.table("breakdown", bt, {"rounds": 0})
        if (bt["other"] < 0).any():
            w.notes.append("round-time breakdown: 'other' < 0 for some configuration (drawn as 0)")
        w.plot(
            lambda p: plots.breakdown(data, bt, facet, flabel, p),
            "breakdown",
            "round-time breakdown",
        )

    # ------------------------------------------------------------------ 3
    w("## 3. Bytes per token vs K", "")
    bt3 = T.bytes_table(data)
    if bt3.empty:
        w.skip("bytes vs K", "no round recorded")
    else:
        w(
            "Up bytes (worker -> server) per worker and round: measured mean vs the documented "
            "formula 12 + 20 + payload (docs/wire-protocol.md, docs/codecs.md) with P = "
            "n_drafted + 1 from each round, payload full = 12 + vb P V, top-K = 16 + P min(K, V) "
            "(ib + vb), adaptive = 12 + 4P + (ib + vb) sum_j K_j; ib = smallest of 2/3/4 bytes "
            "holding V - 1, vb = 4 (fp32) or 2 (fp16). Per token: the request's total over its "
            "rounds and workers / new tokens (measured: requests.csv bytes_per_token).",
            "",
        )
        cols = ["config", "V", "index_bytes", "P_mean", "up_measured", "up_formula",
                "max_abs_diff", "per_token_measured", "per_token_formula"]  # fmt: skip
        w.table("bytes", bt3[cols], {"V": 0, "index_bytes": 0, "P_mean": 3, "up_measured": 1,
                                     "up_formula": 1, "max_abs_diff": 1, "per_token_measured": 1,
                                     "per_token_formula": 1})  # fmt: skip
        mism = bt3[bt3["max_abs_diff"] > 0]
        if len(mism):
            w.notes.append(
                "bytes: measured differs from the formula for " + ", ".join(mism["config"])
            )
            w(
                "**Measured bytes differ from the formula for: "
                + ", ".join(mism["config"])
                + ".**",
                "",
            )
        else:
            w("Every recorded round matches the formula exactly.", "")
        if bt3.loc[bt3["transmission"] != "full", "K"].nunique() >= 2:
            w.plot(lambda p: plots.bytes_vs_k(data, bt3, p), "bytes_vs_k", "bytes per token vs K")
        else:
            w.skip("bytes vs K", "fewer than two values of K")

    # ------------------------------------------------------------------ 4
    w("## 4. Acceptance and tokens per round vs K", "")
    ak = T.per_config_k(data)
    w(
        "Mean ± sd over ok requests; eps_mean = mean over rounds and workers of 1 - kept mass "
        "(0 for full transmission).",
        "",
    )
    ak_shown = ak.assign(
        acceptance=_pm_cols(ak, "acceptance", 3),
        tokens_per_round=_pm_cols(ak, "tokens_per_round", 3),
    ).drop(columns=["acceptance_sd", "tokens_per_round_sd", "family", "transmission"])
    w.table("acceptance", ak_shown, {"K": 0, "eps_mean": 4})
    lossy_k = ak.loc[ak["transmission"] != "full", "K"].nunique()
    if lossy_k >= 2:
        w.plot(lambda p: plots.acceptance_vs_k(data, p), "acceptance_vs_k", "acceptance vs K")
    else:
        w.skip("acceptance vs K", "fewer than two values of K")

    # ------------------------------------------------------------------ 5
    w("## 5. Fidelity vs full transmission (coupled seeds)", "")
    pairs = T.fidelity_pairs(data)
    if pairs.empty:
        w.skip("fidelity", "no lossy request has a coupled full-transmission request")
    else:
        pairs.to_csv(out / "tables" / "fidelity_pairs.csv", index=False)
        ft = T.fidelity_table(data, pairs)
        w(
            "Each lossy request is paired with the full-transmission request of the same run, "
            "prompt, seed, repetition, gamma, temperature and link settings (the runs couple "
            "their randomness: they differ only in transmission / K / reconstruction). "
            "identical = fraction of pairs with identical token sequences; first divergence = "
            "mean index of the first differing token over the pairs that differ; acceptance "
            "and log p per token (under the exact ensemble p, if measured): lossy vs full.",
            "",
        )
        cols = ["config", "pairs", "identical_frac", "first_divergence", "acceptance",
                "acceptance_full", "acceptance_diff"]  # fmt: skip
        if T.has_logp(data):
            cols += ["logp", "logp_full", "logp_diff"]
        else:
            w("logp_mean not measured in these runs.", "")
        w.table("fidelity", ft[cols], {"pairs": 0, "identical_frac": 3, "first_divergence": 2,
                                       "acceptance": 3, "acceptance_full": 3,
                                       "acceptance_diff": 3, "logp": 4, "logp_full": 4,
                                       "logp_diff": 4})  # fmt: skip
        if ft["K"].nunique() >= 2:
            w.plot(lambda p: plots.fidelity_vs_k(data, pairs, p), "fidelity_vs_k", "fidelity vs K")
        else:
            w.skip("fidelity vs K", "fewer than two values of K")

    # ------------------------------------------------------------------ 6
    w("## 6. Round time vs analytic lower bound", "")
    if rounds.empty:
        w.skip("lower bound", "no round recorded")
    else:
        src = rounds["rtt_source"].value_counts()
        w(
            "Per round: bound = t_draft + max over workers of (RTT_w + 8 bytes_up_w / "
            "min(bw_up_w, bw_down_srv) + 8 bytes_down_w / min(bw_up_srv, bw_down_w) + "
            "t_worker_w) + t_aggregate. RTT_w: the measured calibration RTT of the worker's "
            "path in its network group (meta.json), else the configured one (sum of the "
            "worker's and srv's one-way delays, up and down); "
            + ", ".join(f"{k} for {v} rounds" for k, v in src.items())
            + ". Ratio = measured t_round / bound, mean and min over rounds.",
            "",
        )
        bt6 = T.bound_table(data, rounds)
        w.table("bound", bt6, {"rounds": 0, "ratio_mean": 3, "ratio_min": 3, "below_1": 0})
        below = int(bt6["below_1"].sum())
        if below:
            msg = (
                f"{below} round(s) ran faster than the analytic lower bound (ratio < 1, min "
                f"{rounds['ratio'].min():.3f}): the emulated links or the bound's inputs "
                "(calibrated RTT, configured bandwidth) deserve a look"
            )
            w.notes.append(msg)
            w(f"**Warning: {msg}.**", "")
        else:
            w(f"All {len(rounds)} rounds are at or above the bound (min ratio "
              f"{rounds['ratio'].min():.3f}).", "")  # fmt: skip
        w.plot(lambda p: plots.bound(data, rounds, p), "bound", "round time vs lower bound")

    w("## Notes", "")
    w(*(f"- {n}" for n in w.notes) if w.notes else ["- none"])
    w("")
    path = out / "report.md"
    path.write_text("\n".join(w.lines) + "\n", encoding="utf-8")
    return Report(path, w.plots, w.tables, w.notes)


# ----------------------------------------------------------------------------- compare

COMPARE_METRICS = {
    "ms/token": "ms_per_token",
    "ttft ms": "ttft_ms",
    "acceptance": "acceptance",
    "tokens/round": "tokens_per_round",
    "bytes/token": "bytes_per_token",
}


def compare_table(a: Data, b: Data) -> tuple[pd.DataFrame, list[str]]:
    """Per configuration (and link setting varying in either run): A, B and B/A."""
    link_cols = sorted(
        {ax.column for d in (a, b) for ax in T.link_axes(d) if not ax.column.startswith("slowest")}
        & set(a.requests.columns)
        & set(b.requests.columns)
    )
    by = ["config", *link_cols]

    def side(d: Data) -> pd.DataFrame:
        ok = d.ok_requests
        g = ok.groupby(by, sort=False, dropna=False)
        t = g[list(COMPARE_METRICS.values())].mean()
        t.columns = list(COMPARE_METRICS)
        t["ms/token sd"] = g["ms_per_token"].std()
        t["requests"] = g.size()
        t["failed"] = d.requests[~d.requests["ok"]].groupby(by, sort=False, dropna=False).size()
        t["failed"] = t["failed"].fillna(0).astype(int)
        return t

    ta, tb = side(a), side(b)
    t = ta.merge(tb, left_index=True, right_index=True, how="outer", suffixes=(" A", " B"))
    for m in COMPARE_METRICS:
        t[f"{m} B/A"] = t[f"{m} B"] / t[f"{m} A"]
    order = {c: i for i, c in enumerate([*a.config_order(), *b.config_order()])}
    t = t.reset_index()
    t["_o"] = t["config"].map(order)
    t = t.sort_values(["_o", *link_cols]).drop(columns="_o").reset_index(drop=True)
    return t, link_cols


def write_compare(
    path_a: Path, path_b: Path, out: Path, argv: Sequence[str] | None = None
) -> Report:
    """Two run folders side by side: compare.md, a table and two plots."""
    from analysis import plots

    a, b = load([Path(path_a)]), load([Path(path_b)])
    out.mkdir(parents=True, exist_ok=True)
    plots.theme()
    w = _Writer(out)
    la, lb = a.runs[0].label, b.runs[0].label
    t, link_cols = compare_table(a, b)
    w(
        "# SpecFed run comparison",
        "",
        f"A = `{a.runs[0].path}`, B = `{b.runs[0].path}`. Regenerate with `{_command(argv)}`.",
        "Means over ok requests per configuration"
        + (f" and {', '.join(link_cols)}" if link_cols else "")
        + "; B/A > 1 means B is larger.",
        "",
        "## Runs",
        "",
    )
    runs = pd.concat([T.runs_table(a).assign(side="A"), T.runs_table(b).assign(side="B")])
    w.table("runs", runs[["side", *[c for c in runs.columns if c != "side"]]], {"V": 0})
    w("## Metrics per configuration", "")
    cols = [*(["config", *link_cols])]
    for m in COMPARE_METRICS:
        cols += [f"{m} A", f"{m} B", f"{m} B/A"]
    cols += ["requests A", "requests B", "failed A", "failed B"]
    fmts = {c: 3 for c in cols if c.endswith("B/A") or c.startswith(("acceptance", "tokens/round"))}
    fmts.update({c: 1 for c in cols if c.startswith("bytes/token") and not c.endswith("B/A")})
    fmts.update({c: 0 for c in cols if c.startswith(("requests", "failed"))})
    w.table("compare", t[cols], fmts)
    only = t[t["requests A"].isna() | t["requests B"].isna()]
    if len(only):
        w.notes.append(f"{len(only)} configuration row(s) present in one run only")
    styles = {**a.styles, **b.styles}
    label = pd.Series(
        [
            cfg + (" @ " + ", ".join(f"{c}={v:g}" for c, v in zip(link_cols, vals, strict=True)))
            if link_cols
            else cfg
            for cfg, *vals in t[["config", *link_cols]].itertuples(index=False)
        ],
        index=t.index,
    )
    bars = t.assign(config=label)
    styles.update(
        {lbl: styles[c] for lbl, c in zip(label, t["config"], strict=True) if c in styles}
    )
    w.plot(
        lambda p: plots.compare_bars(bars, styles, la, lb, p),
        "compare_ms_per_token",
        "ms per token A vs B",
    )
    w.plot(
        lambda p: plots.compare_ratios(bars, list(COMPARE_METRICS), p),
        "compare_ratios",
        "B/A per metric",
    )
    w("## Notes", "")
    w(*(f"- {n}" for n in w.notes) if w.notes else ["- none"])
    w("")
    path = out / "compare.md"
    path.write_text("\n".join(w.lines) + "\n", encoding="utf-8")
    return Report(path, w.plots, w.tables, w.notes)
