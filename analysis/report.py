"""analyze -> plot -> report: report.md with its tables and plots, and `compare` of two runs.

Everything is recomputed from the run folders (analysis.frames, analysis.tables). Every
table is exported tidy under <out>/tables/ as <name>.csv and <name>.parquet (long format,
numeric columns, module analysis.tables); report.md shows readable cells: "mean ± half
width" for symmetric 95 % intervals, "mean [low, high]" for asymmetric ones (Wilson,
geometric, cut at a bound), "mean (n=1)" without one. Decimals per unit: ms 2, bytes 1,
fractions and ratios 3, nats 4.
"""

from __future__ import annotations

import functools
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from analysis import tables as T
from analysis.frames import SCHEME, Results, load_results
from analysis.stats import LEVEL, unit_means
from specfed.wire import reply_frame_bytes

# ----------------------------------------------------------------------------- cells


def fmt(x: Any, digits: int = 2) -> str:
    """A cell: fixed decimals, '-' for missing."""
    if x is None:
        return "-"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        x = float(x)
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}"
    return str(x)


def ci_cell(m: float, lo: float, hi: float, digits: int = 2, n: int | None = None) -> str:
    """'m ± h' (symmetric interval), 'm [lo, hi]' (asymmetric), 'm (n=1)' (none), '-'."""
    if m is None or not np.isfinite(m):
        return "-"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{fmt(m, digits)}" + (f" (n={n})" if n is not None else " (no CI)")
    a, b = m - lo, hi - m
    if abs(a - b) < 0.5 * 10**-digits:
        return f"{fmt(m, digits)} ± {fmt(b, digits)}"
    return f"{fmt(m, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def md_table(df: pd.DataFrame, formats: dict[str, int] | None = None) -> str:
    """A GitHub markdown table; float columns with the decimals in `formats` (default 2)."""
    if df.empty:
        return "(no rows)"
    formats = formats or {}
    cells = pd.DataFrame(
        {
            c: [fmt(v, formats.get(str(c), 2)) for v in df[c].to_numpy(dtype=object)]
            for c in df.columns
        }
    )
    return str(
        tabulate(cells, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)
    )


def _tidy_for_parquet(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding mixed types become text (parquet needs one type a column)."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            kinds = {type(v) for v in out[c].dropna()}
            if len(kinds) > 1 or (kinds and not kinds <= {str}):
                out[c] = out[c].map(lambda v: v if v is None or v != v else str(v))
    return out


@dataclass
class Report:
    """What `report` / `compare` wrote: the markdown file, plots, exported tables, notes."""

    path: Path
    plots: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Writer:
    def __init__(self, out: Path, draw: bool = True) -> None:
        self.out = out
        self.draw = draw
        self.lines: list[str] = []
        self.plots: list[Path] = []
        self.tables: list[Path] = []
        self.notes: list[str] = []

    def __call__(self, *text: str) -> None:
        self.lines.extend(text)

    def export(self, name: str, df: pd.DataFrame) -> str:
        """Write tables/<name>.csv and .parquet; the markdown link to both."""
        base = self.out / "tables" / name
        base.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(base.with_suffix(".csv"), index=False)
        _tidy_for_parquet(df).to_parquet(base.with_suffix(".parquet"), index=False)
        self.tables += [base.with_suffix(".csv"), base.with_suffix(".parquet")]
        return f"(tidy table: [tables/{name}.csv](tables/{name}.csv), `.parquet` beside it)"

    def table(
        self,
        name: str,
        tidy: pd.DataFrame,
        shown: pd.DataFrame,
        formats: dict[str, int] | None = None,
    ) -> None:
        link = self.export(name, tidy)
        self(md_table(shown, formats), "", link, "")

    def plot(self, make: Callable[[Path], Path], name: str, alt: str) -> None:
        if not self.draw:
            self(f"*Plot `{name}.png` not drawn (--no-plots).*", "")
            return
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


def _swept_text(res: Results) -> str:
    paths = list(dict.fromkeys(p for r in res.runs for p in r.swept))
    return ", ".join(f"`{p}`" for p in paths) if paths else "nothing"


def _group_cols(res: Results) -> list[str]:
    return ["config", "setting"]


def _wide(
    res: Results,
    long: pd.DataFrame,
    metrics: dict[str, tuple[str, int]],
    extra: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per group: `extra` columns, then one readable cell per metric."""
    rows = []
    for _, g in long.groupby([*res.keys], dropna=False, sort=False):
        first = g.iloc[0]
        row: dict[str, Any] = {"config": first["config"], "setting": first["setting"]}
        for c in extra:
            row[c] = first[c]
        by = g.set_index("metric")
        for metric, (header, digits) in metrics.items():
            if metric in by.index:
                r = by.loc[metric]
                row[header] = ci_cell(r["mean"], r["ci_low"], r["ci_high"], digits, int(r["n"]))
        rows.append(row)
    out = pd.DataFrame(rows)
    if "setting" in out and (out["setting"] == "-").all():
        out = out.drop(columns="setting")
    return out


def _drop_single_setting(df: pd.DataFrame) -> pd.DataFrame:
    if "setting" in df and (df["setting"] == "-").all():
        return df.drop(columns="setting")
    return df


# ----------------------------------------------------------------------------- report


def write_report(
    paths: Sequence[Path],
    out: Path,
    argv: Sequence[str] | None = None,
    *,
    keep_warmup: bool = False,
    pool_commits: bool = False,
    draw: bool = True,
) -> Report:
    """Load the run folders, compute every table, draw the plots (unless `draw` is False),
    write out/report.md."""
    from analysis import plots

    res = load_results([Path(p) for p in paths], keep_warmup=keep_warmup, pool_commits=pool_commits)
    out.mkdir(parents=True, exist_ok=True)
    plots.theme()
    w = _Writer(out, draw)
    w.notes.extend(res.notes)
    n_warm = int((res.requests["ok"] & res.requests["warmup"]).sum())
    warm = (
        f"{n_warm} warm-up request(s) (the first request each set of worker processes served, "
        "paying their warm-up) are "
        + (
            "**kept** in the statistics (--keep-warmup)."
            if keep_warmup
            else "**left out** of the statistics (--keep-warmup keeps them)."
        )
    )
    commits = sorted(res.requests["git_sha"].unique())
    commit_text = (
        f"Runs from {len(commits)} commits ({', '.join(commits)}) are "
        + (
            "pooled (--pool-commits)."
            if pool_commits
            else "kept apart: `git_sha` is a setting (--pool-commits pools them)."
        )
        if len(commits) > 1
        else f"All runs are from commit {commits[0]}."
    )
    w(
        "# SpecFed run report",
        "",
        f"Runs: {', '.join(f'`{r.path}`' for r in res.runs)}. Swept: {_swept_text(res)}.",
        f"Regenerate with `{_command(argv)}`. Every number below is recomputed from the runs' "
        "`requests.csv` / `rounds.csv` / `meta.json`; only requests with status `ok` enter "
        "the statistics (failed ones are counted). " + warm + " " + commit_text,
        "",
        "Times in ms, bandwidth in Mbit/s, one-way delays in ms, RTTs are path round trips "
        "(configured: the sum of every link's one-way delays both ways), sizes in bytes.",
        "",
        "## How to read the numbers",
        "",
        "- Groups: every statistic is per configuration and **setting**: the values of every "
        "varying link parameter, swept scenario path, V and commit. Varying here: "
        + (", ".join(f"`{c}`" for c in res.settings) if res.settings else "nothing")
        + "; a setting is named by the fewest of them that tell the settings apart ("
        + (", ".join(f"`{c}`" for c in res.label_columns) if res.label_columns else "-")
        + ").",
        f"- Means: {LEVEL:.0%} confidence interval over **repetitions** (the unit is one "
        "repetition of a point in one run: its mean over prompts; Student's t over the units, "
        "cut at the quantity's range). n = repetitions; one repetition gives no interval.",
        "- Fractions (acceptance = accepted / drafted, identical sequences): Wilson intervals "
        "over the distinct generations (repetitions replay the same seeds, so a generation "
        "repeated token for token is counted once).",
        "- Paired comparisons (speedup, fidelity): each request against the baseline request "
        "of the same run, repetition, prompt, seed and setting; speedup = geometric mean of "
        "the ratios with a t interval on their logarithms; fidelity differences with a t "
        "interval over the distinct pairs.",
        "- Cells: `mean ± half-width`, or `mean [low, high]` where the interval is not "
        "symmetric, or `mean (n=1)` where n is too small for one.",
        "",
        "## Runs",
        "",
    )
    runs = T.runs_table(res)
    w.table("runs", runs, runs.assign(git_sha=runs["git_sha"].str[:12]), {"vocab_size": 0})
    cal = T.calibration_table(res)
    w("### Link calibration (per network group and worker path)", "")
    if cal.empty:
        w("No calibration in meta.json (network.calibrate off).", "")
    else:
        fm = {c: 3 for c in cal.columns if c.endswith(("_ms", "_ratio"))}
        w.table("calibration", cal, cal, fm)
        bad = cal[~cal["passed"]]
        if len(bad):
            w.notes.append(f"{len(bad)} calibrated path(s) out of tolerance (see the table)")

    # ------------------------------------------------------------------ summary
    summ = T.summary_table(res)
    w("## Summary per configuration and setting", "")
    n_req = len(res.requests)
    n_failed = int((~res.requests["ok"]).sum())
    w(
        f"{n_req} requests, {n_failed} failed (left out). ms/token = e2e / new tokens; "
        "acceptance = accepted / drafted drafts (Wilson); tokens/round = emitted tokens per "
        "round; bytes/token = up bytes (all workers) / new tokens; logp/token = mean log p "
        "of the generated tokens under the exact ensemble (nats, if measured).",
        "",
    )
    metrics = {
        "ms_per_token": ("ms/token", 2),
        "ttft_ms": ("ttft ms", 2),
        "acceptance": ("acceptance", 3),
        "tokens_per_round": ("tokens/round", 3),
        "bytes_per_token": ("bytes/token", 1),
        "logp_mean": ("logp/token", 4),
    }
    shown = _wide(res, summ, metrics, ["n_requests", "n_failed", "n_warmup_left_out"])
    reps = summ[summ["metric"] == "ms_per_token"].set_index(["config", "setting"])["n"]
    shown.insert(
        2 if "setting" in shown else 1,
        "reps",
        [
            int(reps.get((c, s), 0))
            for c, s in zip(
                shown["config"],
                shown.get("setting", pd.Series("-", index=shown.index)),
                strict=True,
            )
        ],
    )
    shown = shown.rename(
        columns={"n_requests": "requests", "n_failed": "failed", "n_warmup_left_out": "warm-up out"}
    )
    w.table("summary", summ, shown)
    if n_failed:
        w.notes.append(
            f"{n_failed} failed request(s) excluded from the statistics (see events.jsonl)"
        )
    if not res.requests["logp_mean"].notna().any():
        w("logp_mean not measured in these runs.", "")
    if summ["config"].nunique() > 1 or summ["setting"].nunique() > 1:
        w.plot(lambda p: plots.summary(res, summ, p), "summary", "per configuration and setting")

    # ------------------------------------------------------------------ 1
    w("## 1. Latency vs link bandwidth and RTT", "")
    lat = T.latency_table(res)
    w.export("latency", lat)
    if res.axes:
        for axis in res.axes:
            name = "latency_vs_bandwidth" if axis.kind == "bandwidth" else "latency_vs_rtt"
            w(f"ms per token vs {axis.label} (column `{axis.column}` of tables/latency.csv), "
              "one line per configuration, one panel per other setting.", "")  # fmt: skip
            w.plot(
                functools.partial(plots.latency_vs, res, lat, axis),
                name,
                f"ms per token vs {axis.kind}",
            )
        for kind, what in (("bandwidth", "bandwidth"), ("rtt", "path RTT")):
            if res.axis(kind) is None:
                w.notes.append(f"latency vs {what}: not plotted (no link {what} varies)")
                w(f"*No link {what} varies in these runs: latency vs {what} not plotted.*", "")
    else:
        w.skip("latency vs bandwidth / RTT", "no link bandwidth or delay varies in these runs")
    piv = lat.assign(
        cell=[
            ci_cell(m, lo, hi, 2, n)
            for m, lo, hi, n in zip(
                lat["mean"], lat["ci_low"], lat["ci_high"], lat["n"], strict=True
            )
        ]
    )
    piv = piv.pivot_table(
        index="config", columns="setting", values="cell", aggfunc="first", sort=False
    )
    piv = piv.reindex([c for c in res.config_order() if c in piv.index]).reset_index()
    w("ms per token, mean ± 95 % CI over repetitions:", "", md_table(piv.fillna("-")), "")

    # ------------------------------------------------------------------ 2
    w("## 2. Speedup over federated AR and over SD-full (paired)", "")
    pairs = T.speedup_pairs(res)
    sp = T.speedup_table(res, pairs)
    if sp.empty:
        w.skip(
            "speedup",
            "no request has a federated-AR or SD-full partner on the same prompt, seed and setting",
        )
    else:
        w.export("speedup_pairs", pairs)
        w(
            "Speedup = baseline ms/token / ms/token of the same run, repetition, prompt, seed "
            "and setting (federated AR: full transmission at gamma = 0; full: full "
            "transmission at the same gamma). > 1 is faster. Geometric mean over the pairs, "
            "95 % CI.",
            "",
        )
        shown = _drop_single_setting(
            sp.assign(
                speedup=[
                    ci_cell(m, lo, hi, 3, n)
                    for m, lo, hi, n in zip(
                        sp["mean"], sp["ci_low"], sp["ci_high"], sp["n"], strict=True
                    )
                ]
            )[["config", "setting", "baseline", "speedup", "n"]].rename(columns={"n": "pairs"})
        )
        w.table("speedup", sp, shown)
        if res.axes:
            for axis in res.axes:
                name = "speedup_vs_bandwidth" if axis.kind == "bandwidth" else "speedup_vs_rtt"
                w.plot(
                    functools.partial(plots.speedup_vs, res, sp, axis),
                    name,
                    f"speedup vs {axis.kind}",
                )
        else:
            w.plot(lambda p: plots.speedup_dots(res, sp, p), "speedup", "speedup per configuration")

    # ------------------------------------------------------------------ 3
    w("## 3. Where the time goes: per token and per round", "")
    bd = T.breakdown_table(res)
    if bd.empty:
        w.skip("time breakdown", "no round of an included request recorded")
    else:
        w(
            "Along the critical path of each round, the worker whose reply arrived last "
            "(largest t_call + t_decode): draft = t_draft; compute = its t_worker; fidelity = "
            "its t_fidelity (measuring local_l1: testbed overhead); network = its t_net = "
            "t_call - t_worker - t_fidelity (transfer, framing, queueing); decode = its "
            "t_decode (checking and decoding its reply; 0 in records without the column, "
            "where decoding is inside t_aggregate); dispatch = t_verify - its (t_call + "
            "t_decode): handing the calls to their threads and joining them; aggregation = "
            "t_aggregate (reconstruct, aggregate, accept); other = t_round - t_draft - "
            "t_verify - t_aggregate (building the requests, emitting the tokens; >= 0). Per "
            "round they add up to the round time; per token (each request's sums over its "
            "rounds / new tokens, plus outside_rounds = (e2e - sum of round times) / new "
            "tokens) to ms/token. Per token is the fair "
            "comparison: federated AR needs one round per token, speculative decoding fewer.",
            "",
        )
        for per in ("token", "round"):
            t = bd[bd["per"] == per]
            comps = T.BREAKDOWN_TOKEN if per == "token" else T.BREAKDOWN
            rows = []
            for _, g in t.groupby(res.keys, dropna=False, sort=False):
                by = g.set_index("component")
                row = {"config": g["config"].iloc[0], "setting": g["setting"].iloc[0]}
                for comp in comps:
                    row[comp] = by.loc[comp, "mean"]
                tot = by.loc["total"]
                row[f"total ms/{per}"] = ci_cell(
                    tot["mean"], tot["ci_low"], tot["ci_high"], 2, int(tot["n"])
                )
                rows.append(row)
            w(f"Mean ms per {per}:", "")
            w(md_table(_drop_single_setting(pd.DataFrame(rows))), "")
        w(w.export("breakdown", bd), "")
        rt = res.included_round_times
        neg = rt[rt["other_ms"] < 0]
        if len(neg):
            w.notes.append(
                f"time breakdown: {len(neg)} round(s) with other < 0 "
                f"(min {neg['other_ms'].min():.3f} ms)"
            )
        w.plot(lambda p: plots.breakdown(res, bd, p), "breakdown", "time per token and per round")

    # ------------------------------------------------------------------ 4
    w("## 4. Distributions: ECDFs and accepted length", "")
    w.plot(lambda p: plots.ecdf(res, p), "ecdf", "ECDFs of round time, ms per token, TTFT")
    al = T.accepted_length_table(res)
    if al.empty:
        w.skip("accepted length", "no round recorded")
    else:
        w(
            "Tokens emitted per round (accepted drafts + 1) over the rounds that drafted the "
            "full gamma (a request's last round may draft fewer to stop at max_new_tokens): "
            "fraction of rounds per value.",
            "",
        )
        piv = al.pivot_table(
            index=["config", "setting"],
            columns="tokens_emitted",
            values="fraction",
            aggfunc="first",
            sort=False,
            fill_value=0.0,
        )
        piv.columns = [f"{int(c)}" for c in piv.columns]
        piv = piv.reset_index()
        nr = al.drop_duplicates(["config", "setting"]).set_index(["config", "setting"])["n_rounds"]
        piv["rounds"] = [
            int(nr[(c, s)]) for c, s in zip(piv["config"], piv["setting"], strict=True)
        ]
        w.table(
            "accepted_length",
            al,
            _drop_single_setting(piv),
            {c: 3 for c in piv.columns if c.isdigit()},
        )
        w.plot(
            lambda p: plots.accepted_length(res, al, p),
            "accepted_length",
            "accepted-length histogram",
        )

    # ------------------------------------------------------------------ 5
    w("## 5. Bytes per token vs K", "")
    by = T.bytes_table(res)
    if by.empty:
        w.skip("bytes vs K", "no round recorded")
    else:
        w(
            "Up bytes (worker -> server) per worker and round: measured vs the documented size "
            "`specfed.wire.reply_frame_bytes(payload, request_id)` "
            f"({reply_frame_bytes(0, '')} + len(request_id) + payload: frame header, id and "
            "reply fields, docs/wire-protocol.md) with the payload from the codec of the "
            "round's own transmission "
            "columns: full / top-K `Transmission.codec().encoded_size(P, V)`, adaptive "
            "12 + 4P + sum_j K_j (index + value bytes), sum_j K_j = P k_mean (docs/codecs.md); "
            "P = n_drafted + 1. Per token: the request's total over rounds and workers / new "
            "tokens (measured: requests.csv bytes_per_token).",
            "",
        )
        cols = ["config", "setting", "vocab_size", "index_bytes_sent", "positions_mean",
                "up_bytes_measured", "up_bytes_formula", "max_abs_diff_bytes",
                "bytes_per_token_measured", "bytes_per_token_formula"]  # fmt: skip
        digits = {"vocab_size": 0, "index_bytes_sent": 0, "positions_mean": 3,
                  **{c: 1 for c in cols if "bytes" in c and c != "index_bytes_sent"}}  # fmt: skip
        w.table("bytes", by, _drop_single_setting(by[cols]), digits)
        mism = by[by["max_abs_diff_bytes"] > 0]
        if len(mism):
            names = ", ".join(dict.fromkeys(mism["config"]))
            w.notes.append(f"bytes: measured differs from the formula for {names}")
            w(f"**Measured bytes differ from the formula for: {names}.**", "")
        else:
            w("Every recorded round matches the formula exactly.", "")
        if by.loc[by["transmission"] != "full", "k"].nunique() >= 2:
            w.plot(lambda p: plots.bytes_vs_k(res, by, p), "bytes_vs_k", "bytes per token vs K")
        else:
            w.skip("bytes vs K", "fewer than two values of K")

    # ------------------------------------------------------------------ 6
    w("## 6. Acceptance and tokens per round vs K", "")
    w(
        "From the summary table: acceptance with Wilson intervals over distinct generations, "
        "tokens per round with t intervals over repetitions; full transmission as horizontal "
        "lines.",
        "",
    )
    lossy_k = summ.loc[
        (summ["transmission"] != "full") & (summ["metric"] == "acceptance"), "k"
    ].nunique()
    if lossy_k >= 2:
        w.plot(lambda p: plots.acceptance_vs_k(res, summ, p), "acceptance_vs_k", "acceptance vs K")
    else:
        w.skip("acceptance vs K", "fewer than two values of K")

    # ------------------------------------------------------------------ 7
    w("## 7. Fidelity vs full transmission (paired, coupled seeds)", "")
    fp = T.fidelity_pairs(res)
    fid = T.fidelity_table(res, fp)
    if fid.empty:
        w.skip("fidelity", "no lossy request has a coupled full-transmission request")
    else:
        w.export("fidelity_pairs", fp)
        w(
            "Each lossy request against the full-transmission request of the same run, "
            "repetition, prompt, seed, gamma, temperature and setting (they differ only in "
            "transmission / K / reconstruction), one pair per distinct pair of generations. "
            "identical = fraction of pairs with identical tokens (Wilson; **higher is "
            "better**); first divergence = index of the first differing token over the pairs "
            "that differ (**later is better**); acceptance and log p per token under the exact "
            "ensemble, lossy - full (**closer to 0 is better**: 0 = as full; a lossy "
            "reconstruction that sharpens p raises log p without being closer to it).",
            "",
        )
        fid_cells = {
            "identical_fraction": ("identical", 3),
            "first_divergence": ("first divergence", 2),
            "acceptance_diff": ("acceptance diff", 3),
            "logp_diff": ("logp diff", 4),
        }
        shown = _wide(res, fid, fid_cells)
        pairs_n = fid[fid["metric"] == "identical_fraction"].set_index(["config", "setting"])["n"]
        shown.insert(
            2 if "setting" in shown else 1,
            "pairs",
            [
                int(pairs_n.get((c, s), 0))
                for c, s in zip(
                    shown["config"],
                    shown.get("setting", pd.Series("-", index=shown.index)),
                    strict=True,
                )
            ],
        )
        w.table("fidelity", fid, shown)
        if not res.requests["logp_mean"].notna().any():
            w("logp_mean not measured in these runs.", "")
        if fid.loc[fid["transmission"] != "full", "k"].nunique() >= 2:
            w.plot(lambda p: plots.fidelity_vs_k(res, fid, p), "fidelity_vs_k", "fidelity vs K")
        else:
            w.skip("fidelity vs K", "fewer than two values of K")
        w.plot(
            lambda p: plots.tradeoff(res, summ, fid, p),
            "tradeoff",
            "ms per token vs bytes and fidelity",
        )

    # ------------------------------------------------------------------ 8
    w("## 8. Round time vs analytic lower bound", "")
    rt = res.included_round_times
    if rt.empty:
        w.skip("lower bound", "no round recorded")
    else:
        src = rt["rtt_source"].value_counts()
        w(
            "Per round: bound = t_draft + max over workers of (RTT_w + 8 bytes_up_w / "
            "bw_up_w + 8 bytes_down_w / bw_down_w + t_worker_w) + t_aggregate, with bw the "
            "bottleneck of the worker's path to / from srv, bytes counted on the wire "
            "(TCP/IP/Ethernet headers), and no earlier than the replies sharing a link (the "
            "server's access link, a group's uplink) can all cross it after the first could "
            "start. RTT_w: the measured calibration "
            "RTT of the worker's path in its network group (meta.json), else the configured "
            "path RTT; "
            + ", ".join(f"{k} for {v} rounds" for k, v in src.items())
            + ". Ratio = measured t_round / bound.",
            "",
        )
        bt = T.bound_table(res)
        cols = [
            "config",
            "setting",
            "rounds",
            "round_ms_mean",
            "bound_ms_mean",
            "ratio_mean",
            "ratio_min",
            "rounds_below_bound",
        ]
        w.table("bound", bt, _drop_single_setting(bt[cols]), {"ratio_mean": 3, "ratio_min": 3})
        below = int(bt["rounds_below_bound"].sum())
        if below:
            msg = (
                f"{below} round(s) ran faster than the analytic lower bound (ratio < 1, min "
                f"{rt['ratio'].min():.3f}): the emulated links or the bound's inputs "
                "(calibrated RTT, configured bandwidth) deserve a look"
            )
            w.notes.append(msg)
            w(f"**Warning: {msg}.**", "")
        else:
            w(
                f"All {len(rt)} rounds are at or above the bound "
                f"(min ratio {rt['ratio'].min():.3f}).",
                "",
            )
        w.plot(lambda p: plots.bound(res, rt, p), "bound", "round time vs lower bound")

    # ------------------------------------------------------------------ link traces
    rates = T.link_rates(res)
    if not rates.empty:
        w("## Links that follow a trace", "")
        w(
            "The rate each trace-driven link direction had at the start of every round (from "
            "the trace, its start time in meta.json and the rounds' `t_start_s`), with the "
            "round times.",
            "",
        )
        w.export("link_rates", rates)
        w.plot(
            lambda p: plots.rate_over_time(rates, p), "rate_over_time", "link rate and round time"
        )

    # ------------------------------------------------------------------ frames
    w("## Exported tables", "")
    w.export("requests", res.requests)
    w.export("round_times", res.round_times)
    w(
        "Every table above is under `tables/` as CSV and parquet, long format with numeric "
        "columns: `summary` (group keys, metric, mean, ci_low, ci_high, n, n_obs, interval, "
        "request counts), `latency`, `speedup`, `speedup_pairs`, `breakdown`, "
        "`accepted_length`, `bytes`, `fidelity`, `fidelity_pairs`, `bound`, `runs`, "
        "`calibration`, and the frames `requests` (one row per request) and `round_times` "
        "(one row per round, critical path). In Python: `analysis.load(RUN_DIR, ...)` "
        "(docs/analysis.md).",
        "",
    )
    w("## Notes", "")
    w(*(f"- {n}" for n in w.notes) if w.notes else ["- none"])
    w("")
    path = out / "report.md"
    path.write_text("\n".join(w.lines) + "\n", encoding="utf-8")
    return Report(path, w.plots, w.tables, w.notes)


# ----------------------------------------------------------------------------- compare

COMPARE_METRICS = {
    "ms_per_token": ("ms/token", 2),
    "ttft_ms": ("ttft ms", 2),
    "tokens_per_round": ("tokens/round", 3),
    "bytes_per_token": ("bytes/token", 1),
    "acceptance": ("acceptance", 3),
}


def compare_table(a: Results, b: Results) -> tuple[pd.DataFrame, list[str]]:
    """Long: per configuration, setting (the settings varying in either run and present in
    both) and metric: mean, 95 % CI and n of A and of B (t over repetitions; acceptance:
    mean of per-request acceptance, t), and B/A."""
    settings = [
        c
        for c in dict.fromkeys([*a.settings, *b.settings])
        if c in a.requests and c in b.requests and c != "git_sha"
    ]
    keys = ["config", *SCHEME, *settings]

    def side(res: Results, tag: str) -> pd.DataFrame:
        req = res.included_requests
        parts = []
        for m in COMPARE_METRICS:
            t = unit_means(req, keys, m, ("run", "rep"), (0.0, math.inf))
            parts.append(t.assign(metric=m))
        t = pd.concat(parts, ignore_index=True).drop(columns="n_obs")
        return t.rename(columns={c: f"{c}_{tag}" for c in ("mean", "ci_low", "ci_high", "n")})

    t = side(a, "a").merge(side(b, "b"), on=[*keys, "metric"], how="outer")
    t["ratio_b_a"] = t["mean_b"] / t["mean_a"]
    order = {c: i for i, c in enumerate(dict.fromkeys([*a.config_order(), *b.config_order()]))}
    t["_o"] = t["config"].map(order)
    t["_m"] = t["metric"].map({m: i for i, m in enumerate(COMPARE_METRICS)})
    t = t.sort_values(["_o", *settings, "_m"], na_position="first").drop(columns=["_o", "_m"])
    t["label"] = [
        cfg
        + (
            " @ "
            + ", ".join(
                f"{c}={v:g}" if isinstance(v, float) else f"{c}={v}"
                for c, v in zip(settings, vals, strict=True)
            )
            if settings
            else ""
        )
        for cfg, *vals in t[["config", *settings]].itertuples(index=False)
    ]
    return t.reset_index(drop=True), settings


def write_compare(
    path_a: Path,
    path_b: Path,
    out: Path,
    argv: Sequence[str] | None = None,
    *,
    keep_warmup: bool = False,
) -> Report:
    """Two run folders side by side: compare.md, the tidy table and two plots."""
    from analysis import plots

    a = load_results([Path(path_a)], keep_warmup=keep_warmup)
    b = load_results([Path(path_b)], keep_warmup=keep_warmup)
    out.mkdir(parents=True, exist_ok=True)
    plots.theme()
    w = _Writer(out)
    la, lb = a.runs[0].label, b.runs[0].label
    t, settings = compare_table(a, b)
    w(
        "# SpecFed run comparison",
        "",
        f"A = `{a.runs[0].path}` (commit {a.runs[0].git}), B = `{b.runs[0].path}` (commit "
        f"{b.runs[0].git}). Regenerate with `{_command(argv)}`.",
        "Means over the included requests per configuration"
        + (f" and {', '.join(settings)}" if settings else "")
        + " with 95 % CIs over repetitions; B/A > 1 means B is larger. Warm-up requests are "
        + ("kept." if keep_warmup else "left out (--keep-warmup keeps them)."),
        "",
        "## Runs",
        "",
    )
    runs = pd.concat([T.runs_table(a).assign(side="A"), T.runs_table(b).assign(side="B")])
    runs = runs[["side", *[c for c in runs.columns if c != "side"]]]
    w.table("runs", runs, runs.assign(git_sha=runs["git_sha"].str[:12]), {"vocab_size": 0})
    w("## Metrics per configuration", "")
    rows = []
    for label, g in t.groupby("label", sort=False):
        row: dict[str, Any] = {"configuration": label}
        by = g.set_index("metric")
        for m, (head, digits) in COMPARE_METRICS.items():
            if m not in by.index:
                continue
            r = by.loc[m]
            row[f"{head} A"] = ci_cell(
                r["mean_a"], r["ci_low_a"], r["ci_high_a"], digits, _n(r["n_a"])
            )
            row[f"{head} B"] = ci_cell(
                r["mean_b"], r["ci_low_b"], r["ci_high_b"], digits, _n(r["n_b"])
            )
            row[f"{head} B/A"] = fmt(r["ratio_b_a"], 3)
        rows.append(row)
    w.table("compare", t, pd.DataFrame(rows))
    only = t[t["mean_a"].isna() | t["mean_b"].isna()]
    if len(only):
        w.notes.append(f"{only['label'].nunique()} configuration(s) present in one run only")
    styles = {**a.styles, **b.styles}
    w.plot(
        lambda p: plots.compare_bars(t, styles, la, lb, p),
        "compare_ms_per_token",
        "ms per token A vs B",
    )
    w.plot(lambda p: plots.compare_ratios(t, p), "compare_ratios", "B/A per metric")
    w("## Notes", "")
    w(*(f"- {n}" for n in w.notes) if w.notes else ["- none"])
    w("")
    path = out / "compare.md"
    path.write_text("\n".join(w.lines) + "\n", encoding="utf-8")
    return Report(path, w.plots, w.tables, w.notes)


def _n(x: Any) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None
