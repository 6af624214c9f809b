"""Every number of the report, as tidy pandas tables computed from `Results` (analysis.frames).

Tables are long: one row per group and metric, the group's keys as columns (the
configuration's options and every varying setting, analysis.frames), then numeric `mean`,
`ci_low`, `ci_high`, `n` (the units the interval is over) and `n_obs`, and the kind of
interval (analysis.stats). Names are snake_case with units (ms_per_token, ttft_ms).

Notation as in the paper: gamma drafted tokens per round, P = n_drafted + 1 positions a
worker sends per round, K kept entries per position, V vocabulary size, eps = 1 - kept mass.
Times in ms, bandwidths in Mbit/s, sizes in bytes. Statistics use the included requests
(status "ok"; warm-up requests only with keep_warmup) and their rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np
import pandas as pd

from analysis.frames import UNITS, Results, upload_link_columns
from analysis.stats import geometric_interval, t_interval, unit_means, wilson
from specfed.codecs import adaptive_header_bytes
from specfed.messages import Transmission
from specfed.options import ValueDtype
from specfed.wire import reply_frame_bytes

__all__ = [
    "BASELINES",
    "BREAKDOWN",
    "FIDELITY_BETTER",
    "all_tables",
    "critical_path",
    "formula_up_bytes",
]

#: Round-time components along the critical path (ms); `other` = t_round - the rest.
BREAKDOWN = [
    "draft", "compute", "fidelity", "network", "decode", "dispatch", "aggregation", "other",
]  # fmt: skip
#: Per token, also the time of a request outside its rounds: e2e - sum of t_round.
BREAKDOWN_TOKEN = [*BREAKDOWN, "outside_rounds"]
#: The baselines of the speedup table: name -> how its requests are told apart.
BASELINES = {
    "federated AR": "full transmission, gamma = 0, fp32",
    "full": "full transmission, the same gamma > 0, fp32",
}
#: Which direction is better for each fidelity metric.
FIDELITY_BETTER = {
    "identical_fraction": "higher",
    "first_divergence": "higher (later)",
    "acceptance_diff": "closer to 0 (0 = as full)",
    "logp_diff": "closer to 0 (0 = as likely under the ensemble as full)",
}
_INTERVAL_T = "t95 over repetitions"
_INTERVAL_WILSON = "wilson95 over distinct sequences"
_INTERVAL_PAIRS = "t95 over distinct pairs"
_INTERVAL_GEO = "t95 on log ratios over pairs"


# ----------------------------------------------------------------------------- helpers


def _group_info(res: Results) -> list[str]:
    """Columns that are constant within a group and describe it (not keys)."""
    axes = [a.column for a in res.axes if a.column not in res.keys]
    return ["setting", "config_order", "family", *axes]


def _attach(res: Results, t: pd.DataFrame, src: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add the group's describing columns to a table keyed by res.keys; registry order."""
    if t.empty:
        return t
    src = res.requests if src is None else src
    info = [c for c in _group_info(res) if c not in t.columns]
    meta = src[[*res.keys, *info]].drop_duplicates(res.keys)
    out = t.merge(meta, on=res.keys, how="left")
    lead = [*res.keys, *[c for c in ("setting",) if c in out]]
    rest = [c for c in out.columns if c not in lead and c != "config_order"]
    by = ["config_order", *res.settings]
    out = out.sort_values(by, kind="stable", na_position="first").reset_index(drop=True)
    return out[[*lead, *rest]]


def _order(res: Results, t: pd.DataFrame, then: Sequence[str] = ()) -> pd.DataFrame:
    if t.empty:
        return t
    order = {c: i for i, c in enumerate(res.config_order())}
    by = ["_o", *res.settings, *then]
    return (
        t.assign(_o=t["config"].map(order))
        .sort_values(by, kind="stable", na_position="first")
        .drop(columns="_o")
        .reset_index(drop=True)
    )


def _distinct(df: pd.DataFrame, keys: Sequence[str], extra: Sequence[str]) -> pd.DataFrame:
    """One row per group and distinct generation: repetitions replay the same seeds, so a
    generation repeated token for token adds no information about a fraction."""
    cols = [c for c in extra if c in df]
    return df.drop_duplicates([*keys, *cols]) if cols else df


def _request_counts(res: Results, t: pd.DataFrame) -> pd.DataFrame:
    """n_requests (all), n_failed and n_warmup (left out) per group."""
    req = res.requests
    g = req.groupby(res.keys, dropna=False, sort=False)
    counts = pd.DataFrame(
        {
            "n_requests": g.size(),
            "n_failed": g["ok"].agg(lambda s: int((~s).sum())),
            "n_warmup_left_out": g.apply(
                lambda d: int((d["ok"] & d["warmup"] & ~d["included"]).sum()),
                include_groups=False,
            ),
        }
    ).reset_index()
    return t.merge(counts, on=res.keys, how="left")


# ----------------------------------------------------------------------------- metadata


def runs_table(res: Results) -> pd.DataFrame:
    """One row per run: scenario, commit, backend, request counts, V."""
    rows = []
    for run in res.runs:
        req = res.requests[res.requests["run"] == run.label]
        git = run.meta.get("git") or {}
        groups = run.meta.get("groups", [])
        v = req["vocab_size"].dropna()
        rows.append(
            {
                "run": run.label,
                "scenario": str(run.meta.get("scenario", "")),
                "git_sha": str(git.get("sha", "unknown")),
                "git_dirty": bool(git.get("dirty", False)),
                "link_backend": str(run.meta.get("link_backend", "")),
                "kernel": str(run.meta.get("kernel", "")),
                "started_utc": str(run.meta.get("started_utc", "")),
                "groups": len(groups),
                "groups_ok": sum(g.get("status") == "ok" for g in groups),
                "requests": len(req),
                "failed": int((~req["ok"]).sum()),
                "warmup": int(req["warmup"].sum()),
                "vocab_size": float(v.iloc[0]) if len(v) else math.nan,
            }
        )
    return pd.DataFrame(rows)


def calibration_table(res: Results) -> pd.DataFrame:
    """Per run, network group and worker path: configured vs measured RTT (the median, or
    the mean of runs made before calibration judged medians), rate ratios (paced UDP
    train), loss counts, TCP goodput ratios where measured, attempts."""
    rows = []
    for run in res.runs:
        for gi, g in enumerate(run.meta.get("groups", [])):
            values = ", ".join(f"{k}={v}" for k, v in (g.get("values") or {}).items())
            for c in g.get("calibration") or []:
                rtt = c.get("rtt") or {}
                a, b = c.get("a"), c.get("b")

                def by_dir(key: str, field: str, c: dict[str, Any] = c) -> dict[str, Any]:
                    return {
                        f"{x.get('src')}->{x.get('dst')}": x.get(field) for x in c.get(key) or []
                    }

                gp, rate = by_dir("goodput", "ratio"), by_dir("rate", "ratio")
                lost, sent = by_dir("loss", "lost"), by_dir("loss", "sent")
                up, down = f"{a}->{b}", f"{b}->{a}"
                rows.append(
                    {
                        "run": run.label,
                        "group": gi,
                        "rep": int(g.get("rep", 0)),
                        "values": values,
                        "path": f"{a}-{b}",
                        "configured_rtt_ms": _f(c.get("configured_rtt_ms")),
                        "measured_rtt_ms": _f(rtt.get("median_ms", rtt.get("mean_ms"))),
                        "rtt_sd_ms": _f(rtt.get("sd_ms")),
                        "rtt_error_ms": _f(c.get("rtt_error_ms")),
                        "rate_up_ratio": _f(rate.get(up)),
                        "rate_down_ratio": _f(rate.get(down)),
                        "loss_up_lost": _f(lost.get(up)),
                        "loss_up_sent": _f(sent.get(up)),
                        "loss_down_lost": _f(lost.get(down)),
                        "loss_down_sent": _f(sent.get(down)),
                        "goodput_up_ratio": _f(gp.get(up)),
                        "goodput_down_ratio": _f(gp.get(down)),
                        "attempts": _f(c.get("attempts", 1)),
                        "passed": bool(c.get("passed")),
                    }
                )
    return pd.DataFrame(rows)


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def calibration_rtt(res: Results) -> pd.DataFrame:
    """(run, point, rep, worker) -> measured calibration RTT of the worker's path (median;
    the mean for older runs), ms."""
    rows = []
    for run in res.runs:
        for g in run.meta.get("groups", []):
            for c in g.get("calibration") or []:
                worker = c.get("a") if c.get("b") == "srv" else c.get("b")
                rtt = c.get("rtt") or {}
                mean = rtt.get("median_ms", rtt.get("mean_ms"))
                if mean is None:
                    continue
                for pt in g.get("points", []):
                    rows.append((run.label, int(pt), int(g.get("rep", 0)), worker, float(mean)))
    cols = ["run", "point", "rep", "worker", "rtt_measured_ms"]
    return pd.DataFrame(rows, columns=cols).drop_duplicates(cols[:4])


# ----------------------------------------------------------------------------- rounds


def _own(r: pd.DataFrame, what: str) -> np.ndarray:
    """Each round row's value of `<worker>_<what>` (its own worker's column)."""
    out = np.full(len(r), np.nan)
    for w in r["worker"].dropna().unique():
        col = f"{w}_{what}"
        if col in r:
            m = (r["worker"] == w).to_numpy()
            out[m] = pd.to_numeric(r.loc[m, col], errors="coerce").to_numpy(dtype=float)
    return out


#: TCP payload bytes per full-sized segment, and the TCP/IP/Ethernet header bytes around it:
#: a link's rate counts Ethernet frames, a record counts the frames' TCP payload.
TCP_SEGMENT_BYTES, SEGMENT_HEADER_BYTES = 1448, 66


def _shared_link_bound(
    res: Results,
    r: pd.DataFrame,
    up: np.ndarray,
    down: np.ndarray,
    bw_down: np.ndarray,
    keys: list[str],
) -> pd.Series:
    """Per round: the latest of, over every link some replies share on their way to srv
    (the server's access link, a group's uplink), the earliest those replies can start
    (RTT + request + compute) plus all of them serialized on it one after another."""
    start = (
        np.nan_to_num(r["rtt_ms"].to_numpy(dtype=float))
        + down * 8 / (bw_down * 1e3)
        + r["t_worker_ms"].to_numpy(dtype=float)
    )
    long = []
    for i, cols in enumerate(upload_link_columns(res, r)):
        for col in cols:
            rate = pd.to_numeric(r[col].iloc[i], errors="coerce") if col in r else np.nan
            if np.isfinite(rate) and rate > 0:  # no rate limit: no serialization term
                long.append((i, col, start[i], up[i] * 8 / (rate * 1e3)))
    if not long:
        return pd.Series(dtype=float)
    df = pd.DataFrame(long, columns=["row", "link", "start_ms", "ser_ms"])
    for k in keys:
        df[k] = r[k].to_numpy()[df["row"].to_numpy()]
    per_link = df.groupby([*keys, "link"], sort=False).agg(
        start_ms=("start_ms", "min"), ser_ms=("ser_ms", "sum")
    )
    return (per_link["start_ms"] + per_link["ser_ms"]).groupby(level=keys, sort=False).max()


def wire_bytes(payload: np.ndarray) -> np.ndarray:
    """Bytes a TCP payload takes on an emulated link: every segment adds 66 header bytes."""
    return payload + SEGMENT_HEADER_BYTES * np.maximum(1.0, np.ceil(payload / TCP_SEGMENT_BYTES))


def critical_path(res: Results) -> pd.DataFrame:
    """One row per (run, request, round) of ok requests: the critical-path breakdown and the
    analytic lower bound.

    The critical worker is the one whose reply was done last: largest t_call_ms +
    t_decode_ms (checking and decoding its reply, in the same thread; records without
    t_decode_ms decode inside t_aggregate and count 0 here). Components (ms): draft =
    t_draft; compute = the critical worker's t_worker; fidelity = its t_fidelity (measuring
    local_l1 after its compute: testbed overhead; 0 in records without the column); network
    = its t_net (= t_call - t_worker - t_fidelity: transfer, framing, queueing); decode =
    its t_decode; dispatch = t_verify - its
    (t_call + t_decode): handing the calls to their threads and joining them (>= 0);
    aggregation = t_aggregate (reconstruct, aggregate, accept); other = t_round - t_draft -
    t_verify - t_aggregate (>= 0: building the requests, emitting the tokens). They add up
    to t_round.

    Lower bound (ms), bytes counted on the wire (`wire_bytes`: TCP/IP/Ethernet headers of
    every segment): t_draft + max(max over workers of (RTT_w + 8 bytes_up / bw_up_w + 8
    bytes_down / bw_down_w + t_worker_w + t_decode_w), the earliest a reply can start plus
    every reply serialized on each link several replies share (the server's access link, a
    group's uplink): max over links L of (min over w crossing L of (RTT_w + 8 bytes_down /
    bw_down_w + t_worker_w) + sum over w crossing L of 8 bytes_up_w / bw_L)) + t_aggregate,
    with RTT_w the
    measured calibration RTT of the worker's path (else the configured path RTT) and
    bw_up_w / bw_down_w the bottleneck bandwidth of its path towards / from srv.
    """
    r = res.rounds[res.rounds["ok"]].copy() if not res.rounds.empty else pd.DataFrame()
    if r.empty:
        return pd.DataFrame()
    for c in ("t_draft_ms", "t_worker_ms", "t_net_ms", "t_call_ms", "t_verify_ms",
              "t_aggregate_ms", "t_round_ms"):  # fmt: skip
        r[c] = r[c].astype(float)
    decode = r["t_decode_ms"].astype(float).fillna(0.0) if "t_decode_ms" in r else 0.0
    r["t_decode_ms"] = decode
    r["t_fidelity_ms"] = (
        r["t_fidelity_ms"].astype(float).fillna(0.0) if "t_fidelity_ms" in r else 0.0
    )
    r["t_done_ms"] = r["t_call_ms"] + r["t_decode_ms"]
    cal = calibration_rtt(res)
    r = r.merge(cal, on=["run", "point", "rep", "worker"], how="left")
    measured = r["rtt_measured_ms"].to_numpy(dtype=float)
    configured = _own(r, "path_rtt_ms")
    r["rtt_ms"] = np.where(np.isnan(measured), configured, measured)
    r["rtt_source"] = np.where(np.isnan(measured), "configured", "measured")
    bw_up = np.nan_to_num(_own(r, "path_bw_up_mbit"), nan=np.inf)
    bw_down = np.nan_to_num(_own(r, "path_bw_down_mbit"), nan=np.inf)
    up = wire_bytes(r["bytes_up"].to_numpy(dtype=float))
    down = wire_bytes(r["bytes_down"].to_numpy(dtype=float))
    r["worker_bound_ms"] = (
        np.nan_to_num(r["rtt_ms"].to_numpy(dtype=float))
        + up * 8 / (bw_up * 1e3)
        + down * 8 / (bw_down * 1e3)
        + r["t_worker_ms"].to_numpy(dtype=float)
        + r["t_decode_ms"].to_numpy(dtype=float)
    )
    keys = ["run", "request_id", "round"]
    crit = r.loc[r.groupby(keys, sort=False)["t_done_ms"].idxmax()].set_index(keys)
    per = r.groupby(keys, sort=False).agg(
        bytes_up=("bytes_up", "sum"),
        bytes_down=("bytes_down", "sum"),
        max_worker_bound_ms=("worker_bound_ms", "max"),
        n_workers=("worker", "size"),
    )
    shared = _shared_link_bound(res, r, up, down, bw_down, keys)
    per["max_worker_bound_ms"] = np.maximum(
        per["max_worker_bound_ms"], shared.reindex(per.index).fillna(0.0)
    )
    req_cols = [
        c for c in res.requests.columns if c in crit.columns and c not in ("run", "request_id")
    ]
    out = crit[req_cols].copy()
    out["critical_worker"] = crit["worker"]
    for c in ("n_drafted", "n_accepted", "n_emitted", "t_round_ms"):
        out[c] = crit[c]
    out["draft"] = crit["t_draft_ms"]
    out["compute"] = crit["t_worker_ms"]
    out["fidelity"] = crit["t_fidelity_ms"]
    out["network"] = crit["t_net_ms"]
    out["decode"] = crit["t_decode_ms"]
    out["dispatch"] = crit["t_verify_ms"] - crit["t_done_ms"]
    out["aggregation"] = crit["t_aggregate_ms"]
    out["other"] = out["t_round_ms"] - out[BREAKDOWN[:-1]].sum(axis=1)
    out = out.join(per)
    out["bound_ms"] = out["draft"] + out["max_worker_bound_ms"] + out["aggregation"]
    out["ratio"] = out["t_round_ms"] / out["bound_ms"]
    out["rtt_source"] = crit["rtt_source"]
    out = out.rename(columns={c: f"{c}_ms" for c in BREAKDOWN})
    return out.drop(columns="max_worker_bound_ms").reset_index()


# ----------------------------------------------------------------------------- summary


#: Request metrics summarised over repetitions: column -> what it is.
REQUEST_METRICS = {
    "ms_per_token": "e2e_ms / new tokens",
    "ttft_ms": "time to the first emitted token",
    "e2e_ms": "request time",
    "tokens_per_round": "emitted tokens per round",
    "bytes_per_token": "up bytes (all workers) per new token",
    "logp_mean": "mean log p per token under the exact ensemble (nats)",
}


def request_counts(res: Results) -> pd.DataFrame:
    """Per included request: drafted and accepted tokens over its rounds."""
    rt = res.round_times
    if rt.empty:
        return pd.DataFrame(columns=["run", "request_id", "drafted", "accepted"])
    return (
        rt.groupby(["run", "request_id"], sort=False)
        .agg(drafted=("n_drafted", "sum"), accepted=("n_accepted", "sum"))
        .reset_index()
    )


#: The range of each summarised quantity (t intervals are cut to it); default [0, inf).
RANGES: dict[str, tuple[float, float]] = {
    "logp_mean": (-math.inf, 0.0),
    "eps_mean": (0.0, 1.0),
    "acceptance_diff": (-1.0, 1.0),
    "logp_diff": (-math.inf, math.inf),
}


def _t_metric(res: Results, df: pd.DataFrame, col: str, metric: str | None = None) -> pd.DataFrame:
    name = metric or col
    t = unit_means(df, res.keys, col, UNITS, RANGES.get(name, (0.0, math.inf)))
    if t.empty:
        return t
    return t.assign(metric=name, interval=_INTERVAL_T)


def acceptance_rows(res: Results) -> pd.DataFrame:
    """Acceptance = accepted / drafted over the group's distinct generations, Wilson."""
    req = res.included_requests
    req = req[req["gamma"] > 0].merge(request_counts(res), on=["run", "request_id"], how="left")
    req = _distinct(req, res.keys, ["prompt_id", "seed", "tokens"])
    rows = []
    for key, g in req.groupby(res.keys, dropna=False, sort=False):
        acc, drafted = float(g["accepted"].sum()), float(g["drafted"].sum())
        p, lo, hi = wilson(acc, drafted)
        rows.append((*key, p, lo, hi, len(g), int(drafted)))
    cols = [*res.keys, "mean", "ci_low", "ci_high", "n", "n_obs"]
    return pd.DataFrame(rows, columns=cols).assign(metric="acceptance", interval=_INTERVAL_WILSON)


def summary_table(res: Results) -> pd.DataFrame:
    """Long: per group and metric, mean and 95 % interval (module docstring); metrics:
    ms_per_token, ttft_ms, e2e_ms, tokens_per_round, bytes_per_token, logp_mean (if
    measured), acceptance (Wilson, gamma > 0), eps_mean and round_ms (rounds)."""
    req = res.included_requests
    parts = [
        _t_metric(res, req, c)
        for c in REQUEST_METRICS
        if c != "logp_mean" or req["logp_mean"].notna().any()
    ]
    parts.append(acceptance_rows(res))
    if not res.included_rounds.empty:
        parts.append(_t_metric(res, res.included_rounds, "eps_mean"))
        parts.append(_t_metric(res, res.included_round_times, "t_round_ms", "round_ms"))
    t = pd.concat([p for p in parts if not p.empty], ignore_index=True)
    t = _request_counts(res, t)
    metric_order = [*REQUEST_METRICS, "acceptance", "eps_mean", "round_ms"]
    t["_m"] = t["metric"].map({m: i for i, m in enumerate(metric_order)})
    t = _attach(res, t.sort_values("_m", kind="stable").drop(columns="_m"))
    cols = [c for c in t.columns if c not in ("metric",)]
    i = cols.index("mean")
    return t[[*cols[:i], "metric", *cols[i:]]]


def latency_table(res: Results) -> pd.DataFrame:
    """ms per token per group (mean, t95 over repetitions) with the axis columns."""
    return _attach(res, _t_metric(res, res.included_requests, "ms_per_token"))


# ----------------------------------------------------------------------------- speedup


def _baseline_mask(df: pd.DataFrame, name: str) -> pd.Series:
    full = (df["transmission"] == "full") & (df["value_dtype"] == "fp32")
    return full & ((df["gamma"] == 0) if name == "federated AR" else (df["gamma"] > 0))


def speedup_pairs(res: Results) -> pd.DataFrame:
    """Each included request next to the baseline request of the same run, repetition,
    prompt, seed, temperature and settings (and gamma, for the `full` baseline):
    speedup = baseline ms_per_token / ms_per_token."""
    req = res.included_requests
    pair = ["run", "rep", "prompt_id", "seed", "temperature", *res.settings]
    parts = []
    for name in BASELINES:
        key = [*pair, *(["gamma"] if name == "full" else [])]
        base = req[_baseline_mask(req, name)]
        if base.empty:
            continue
        base = base.drop_duplicates(key)[[*key, "config", "request_id", "ms_per_token"]]
        base = base.rename(
            columns={
                "config": "baseline_config",
                "request_id": "baseline_request_id",
                "ms_per_token": "baseline_ms_per_token",
            }
        )
        cand = req[~_baseline_mask(req, name)]
        if name == "full":
            cand = cand[cand["gamma"] > 0]
        m = cand.merge(base, on=key, how="inner")
        if m.empty:
            continue
        m["baseline"] = name
        m["speedup"] = m["baseline_ms_per_token"] / m["ms_per_token"]
        parts.append(m)
    if not parts:
        return pd.DataFrame()
    cols = [*res.keys, "baseline", "baseline_config", "run", "rep", "prompt_id", "seed",
            "request_id", "baseline_request_id", "ms_per_token", "baseline_ms_per_token",
            "speedup"]  # fmt: skip
    return pd.concat(parts, ignore_index=True)[cols]


def speedup_table(res: Results, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per group and baseline: geometric-mean speedup over the pairs, t95 on log ratios."""
    pairs = speedup_pairs(res) if pairs is None else pairs
    if pairs.empty:
        return pd.DataFrame()
    rows = []
    for key, g in pairs.groupby([*res.keys, "baseline"], dropna=False, sort=False):
        m, lo, hi, n = geometric_interval(g["speedup"])
        rows.append((*key, g["baseline_config"].iloc[0], m, lo, hi, n))
    cols = [*res.keys, "baseline", "baseline_config", "mean", "ci_low", "ci_high", "n"]
    t = pd.DataFrame(rows, columns=cols).assign(metric="speedup", interval=_INTERVAL_GEO)
    return _attach(res, t)


# ----------------------------------------------------------------------------- breakdown


def breakdown_table(res: Results) -> pd.DataFrame:
    """Long: per group, `per` (token or round) and component, the mean ms and t95 over
    repetitions. Per round the components add up to t_round_ms (component `total`); per
    token they are each request's sums over its rounds / new tokens, plus `outside_rounds`
    = (e2e - sum of t_round) / new tokens, and add up to ms_per_token (`total`)."""
    rt = res.included_round_times
    if rt.empty:
        return pd.DataFrame()
    parts = []
    for comp in [*BREAKDOWN, "total"]:
        col = "t_round_ms" if comp == "total" else f"{comp}_ms"
        parts.append(_t_metric(res, rt, col, comp).assign(per="round"))
    comps = [f"{c}_ms" for c in BREAKDOWN]
    per_req = rt.groupby(["run", "request_id"], sort=False)[[*comps, "t_round_ms"]].sum()
    req = res.included_requests.merge(per_req.reset_index(), on=["run", "request_id"], how="inner")
    n_new = req["new_tokens"].astype(float)
    for c in BREAKDOWN:
        req[f"tok_{c}"] = req[f"{c}_ms"] / n_new
    req["tok_outside_rounds"] = (req["e2e_ms"].astype(float) - req["t_round_ms"]) / n_new
    req["tok_total"] = req["ms_per_token"].astype(float)
    for comp in [*BREAKDOWN_TOKEN, "total"]:
        parts.append(_t_metric(res, req, f"tok_{comp}", comp).assign(per="token"))
    t = pd.concat(parts, ignore_index=True).rename(columns={"metric": "component"})
    t["unit"] = np.where(t["per"] == "token", "ms/token", "ms/round")
    t = _attach(res, t)
    lead = [c for c in t.columns if c not in ("per", "component", "unit")]
    i = lead.index("mean")
    return t[[*lead[:i], "per", "component", "unit", *lead[i:]]]


def accepted_length_table(res: Results) -> pd.DataFrame:
    """Per group: the distribution of tokens emitted per round (accepted drafts + 1), over
    the rounds that drafted the full gamma (the last round of a request may draft fewer to
    stop at max_new_tokens); gamma = 0: every round emits one token."""
    rt = res.included_round_times
    if rt.empty:
        return pd.DataFrame()
    full = rt[rt["n_drafted"] == rt["gamma"]]
    counts = (
        full.groupby([*res.keys, "n_emitted"], dropna=False, sort=False)
        .size()
        .rename("rounds")
        .reset_index()
        .rename(columns={"n_emitted": "tokens_emitted"})
    )
    total = counts.groupby(res.keys, dropna=False, sort=False)["rounds"].transform("sum")
    counts["fraction"] = counts["rounds"] / total
    counts["n_rounds"] = total
    t = _attach(res, counts)
    return t.sort_values(
        ["config", *res.settings, "tokens_emitted"], kind="stable", na_position="first"
    ).pipe(lambda d: _order(res, d, ["tokens_emitted"]))


# ----------------------------------------------------------------------------- bytes


@cache
def _transmission(
    mode: str, k: float, eps: float, vdt: str, ib: float, coding: str = "fixed"
) -> Transmission:
    def opt_int(x: float) -> int | None:
        return None if not math.isfinite(x) else int(x)

    return Transmission.of(
        mode,
        opt_int(k),
        None if not math.isfinite(eps) else eps,
        vdt,
        opt_int(ib) if coding == "fixed" else None,
        coding,
    )


def formula_is_exact(value_dtype: str, index_coding: str) -> bool:
    """Whether a message's size is a formula of (P, V, K) alone: format version 1 (fp32 or
    fp16 values, fixed-width indices). Version 2 sizes depend on the data (delta codes,
    quantized rows): their formula is an upper bound (docs/codecs.md)."""
    return index_coding == "fixed" and not ValueDtype.parse(value_dtype).quantized


def formula_up_bytes(
    request_id: str,
    mode: str,
    p: int,
    v: int,
    k: float,
    epsilon: float,
    value_dtype: str,
    index_bytes: float,
    k_mean: float,
    index_coding: str = "fixed",
) -> int:
    """The documented bytes of one VERIFY_REPLY frame (specfed.wire.reply_frame_bytes) around
    the codec's payload: full and top-K `Transmission.codec().encoded_size(P, V)`; adaptive
    12 + 4P + sum_j K_j (index + value bytes) with sum_j K_j = P k_mean (docs/codecs.md).
    For format-2 messages (see `formula_is_exact`) the codec's upper bound."""
    coding = index_coding if isinstance(index_coding, str) and index_coding else "fixed"
    if mode == "adaptive" and formula_is_exact(value_dtype, coding):
        ib = int(index_bytes)
        vb = ValueDtype.parse(value_dtype).nbytes
        payload = adaptive_header_bytes(p) + round(p * k_mean) * (ib + vb)
    else:
        tr = _transmission(mode, k, epsilon, value_dtype, index_bytes, coding)
        payload = tr.codec().encoded_size(p, v)
    return reply_frame_bytes(payload, request_id)


def bytes_rounds(res: Results) -> pd.DataFrame:
    """Included rounds with P and the documented up bytes of each (worker's own options)."""
    r = res.included_rounds.copy()
    if r.empty:
        return r
    r["P"] = r["n_drafted"].astype(int) + 1
    codings = list(r["worker_index_coding"]) if "worker_index_coding" in r else ["fixed"] * len(r)
    r["formula_up"] = [
        formula_up_bytes(rid, m, p, int(v), k, e, d, ib, km, c)
        for rid, m, p, v, k, e, d, ib, km, c in zip(
            r["request_id"],
            r["worker_transmission"],
            r["P"],
            r["vocab_size"],
            r["worker_k"].astype(float),
            r["worker_epsilon"].astype(float),
            r["worker_value_dtype"],
            r["worker_index_bytes"].astype(float),
            r["k_mean"].astype(float),
            codings,
            strict=True,
        )
    ]
    r["formula_exact"] = [
        formula_is_exact(d, c) for d, c in zip(r["worker_value_dtype"], codings, strict=True)
    ]
    return r


def bytes_table(res: Results) -> pd.DataFrame:
    """Per group: measured vs documented up bytes per worker-round and per token."""
    r = bytes_rounds(res)
    if r.empty:
        return pd.DataFrame()
    r["abs_diff"] = (r["bytes_up"].astype(float) - r["formula_up"]).abs()
    msg = (
        r.groupby(res.keys, dropna=False, sort=False)
        .agg(
            vocab_size=("vocab_size", "first"),
            index_bytes_sent=("worker_index_bytes", "max"),
            positions_mean=("P", "mean"),
            up_bytes_measured=("bytes_up", "mean"),
            up_bytes_formula=("formula_up", "mean"),
            max_abs_diff_bytes=("abs_diff", "max"),
            worker_rounds=("P", "size"),
        )
        .reset_index()
    )
    per_req = (
        r.groupby(["run", "request_id"], sort=False)
        .agg(formula_total=("formula_up", "sum"))
        .reset_index()
    )
    req = res.included_requests.merge(per_req, on=["run", "request_id"], how="inner")
    req["formula_per_token"] = req["formula_total"] / req["new_tokens"].astype(float)
    tok = (
        req.groupby(res.keys, dropna=False, sort=False)
        .agg(
            bytes_per_token_measured=("bytes_per_token", "mean"),
            bytes_per_token_formula=("formula_per_token", "mean"),
        )
        .reset_index()
    )
    return _attach(res, msg.merge(tok, on=res.keys, how="left"))


# ----------------------------------------------------------------------------- fidelity


def _tokens(s: Any) -> list[str]:
    return s.split() if isinstance(s, str) else []


def first_divergence(a: list[str], b: list[str]) -> float:
    """Index of the first differing token; min(len) if one is a prefix of the other; NaN
    if identical."""
    if a == b:
        return math.nan
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return float(i)
    return float(min(len(a), len(b)))


def fidelity_pairs(res: Results) -> pd.DataFrame:
    """Each included lossy request next to the full-transmission request of the same run,
    repetition, prompt, seed, gamma, temperature and settings (coupled seeds: they differ
    only in transmission / K / reconstruction); one row per distinct pair of generations
    per group (repetitions replay the same seeds and give the same pair)."""
    req = res.included_requests
    key = ["run", "rep", "prompt_id", "seed", "gamma", "temperature", *res.settings]
    full = req[(req["transmission"] == "full") & (req["value_dtype"] == "fp32")]
    full = full.drop_duplicates(key)[[*key, "request_id", "tokens", "acceptance", "logp_mean"]]
    full = full.rename(
        columns={
            "request_id": "full_request_id",
            "tokens": "full_tokens",
            "acceptance": "full_acceptance",
            "logp_mean": "full_logp_mean",
        }
    )
    lossy = req[req["transmission"] != "full"]
    m = lossy.merge(full, on=key, how="inner")
    if m.empty:
        return pd.DataFrame()
    m = _distinct(m, res.keys, ["prompt_id", "seed", "tokens", "full_tokens"])
    a = [_tokens(x) for x in m["tokens"]]
    b = [_tokens(x) for x in m["full_tokens"]]
    m["identical"] = [x == y for x, y in zip(a, b, strict=True)]
    m["first_divergence"] = [first_divergence(x, y) for x, y in zip(a, b, strict=True)]
    m["acceptance_diff"] = m["acceptance"].astype(float) - m["full_acceptance"].astype(float)
    m["logp_diff"] = m["logp_mean"].astype(float) - m["full_logp_mean"].astype(float)
    cols = [*res.keys, "run", "rep", "prompt_id", "seed", "request_id", "full_request_id",
            "identical", "first_divergence", "acceptance", "full_acceptance", "acceptance_diff",
            "logp_mean", "full_logp_mean", "logp_diff"]  # fmt: skip
    return m[cols].reset_index(drop=True)


def fidelity_table(res: Results, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long: per lossy group and metric (FIDELITY_BETTER says which way is better):
    identical_fraction (Wilson), first_divergence (over the pairs that diverge),
    acceptance_diff and logp_diff (lossy - full, paired; logp only if measured)."""
    pairs = fidelity_pairs(res) if pairs is None else pairs
    if pairs.empty:
        return pd.DataFrame()
    rows = []
    for key, g in pairs.groupby(res.keys, dropna=False, sort=False):
        p, lo, hi = wilson(float(g["identical"].sum()), float(len(g)))
        rows.append((*key, "identical_fraction", p, lo, hi, len(g), _INTERVAL_WILSON))
        stats: list[tuple[str, pd.Series]] = [("first_divergence", g["first_divergence"])]
        if (g["gamma"] > 0).all():
            stats.append(("acceptance_diff", g["acceptance_diff"]))
        if g["logp_diff"].notna().any():
            stats.append(("logp_diff", g["logp_diff"]))
        for name, s in stats:
            m, lo, hi, n = t_interval(s, *RANGES.get(name, (0.0, math.inf)))
            rows.append((*key, name, m, lo, hi, n, _INTERVAL_PAIRS))
    cols = [*res.keys, "metric", "mean", "ci_low", "ci_high", "n", "interval"]
    t = pd.DataFrame(rows, columns=cols)
    t["better"] = t["metric"].map(FIDELITY_BETTER)
    return _attach(res, t)


# ----------------------------------------------------------------------------- bound


def bound_table(res: Results) -> pd.DataFrame:
    """Per group: measured round time vs the analytic lower bound (critical_path)."""
    rt = res.included_round_times
    if rt.empty:
        return pd.DataFrame()
    t = (
        rt.groupby(res.keys, dropna=False, sort=False)
        .agg(
            rounds=("ratio", "size"),
            round_ms_mean=("t_round_ms", "mean"),
            bound_ms_mean=("bound_ms", "mean"),
            ratio_mean=("ratio", "mean"),
            ratio_min=("ratio", "min"),
            rounds_below_bound=("ratio", lambda s: int((s < 1).sum())),
        )
        .reset_index()
    )
    return _attach(res, t)


# ----------------------------------------------------------------------------- all


#: The exported tables: file name -> function of Results. `requests` and `round_times` are
#: the tidy per-request and per-round frames the ECDFs are drawn from.
TABLES: dict[str, Callable[[Results], pd.DataFrame]] = {
    "runs": runs_table,
    "calibration": calibration_table,
    "summary": summary_table,
    "latency": latency_table,
    "speedup": speedup_table,
    "speedup_pairs": speedup_pairs,
    "breakdown": breakdown_table,
    "accepted_length": accepted_length_table,
    "bytes": bytes_table,
    "fidelity": fidelity_table,
    "fidelity_pairs": fidelity_pairs,
    "bound": bound_table,
    "requests": lambda res: res.requests,
    "round_times": lambda res: res.round_times,
}


def all_tables(res: Results) -> dict[str, pd.DataFrame]:
    """Every table of TABLES (empty ones included)."""
    return {name: fn(res) for name, fn in TABLES.items()}


# ----------------------------------------------------------------------------- link traces


def link_rates(res: Results) -> pd.DataFrame:
    """For runs with trace-driven links: one row per (round, traced link direction) with
    the rate the trace gave that direction at the round's start (`rate_mbit`), next to the
    round's time. The round's start (`t_start_s`, monotonic clock) minus the link's trace
    start (`trace_start_mono_s` in meta.json) is the trace time; `t_s` is seconds since the
    run's first round. Empty when no link follows a trace (or for runs before t_start_s)."""
    from testbed.linkparams import RateTrace, rate_at
    from testbed.tapfwd import TraceError

    rows: list[dict[str, Any]] = []
    for run in res.runs:
        r = run.rounds
        if r.empty or "t_start_s" not in r:
            continue
        per_round = r.drop_duplicates(["request_id", "round"])
        t0 = float(per_round["t_start_s"].min())
        for g in run.meta.get("groups", []):
            mine = per_round[
                per_round["point"].isin(g.get("points", [])) & (per_round["rep"] == g.get("rep", 0))
            ]
            for link in g.get("links") or []:
                start = link.get("trace_start_mono_s")
                for d in ("up", "down"):
                    summary = (link.get(d) or {}).get("trace")
                    if start is None or not summary:
                        continue
                    try:
                        trace = RateTrace.load(
                            summary["file"], summary["format"], summary["loop"], summary["start_s"]
                        )
                    except (TraceError, OSError, KeyError):
                        continue  # the trace file is gone: its summary stays in meta.json
                    for _, x in mine.iterrows():
                        rows.append(
                            {
                                "run": run.label,
                                "link": f"{link['node1']}-{link['node2']}",
                                "direction": d,
                                "trace": summary.get("name"),
                                "request_id": x["request_id"],
                                "round": int(x["round"]),
                                "point": int(x["point"]),
                                "transmission": x.get("transmission"),
                                "t_s": float(x["t_start_s"]) - t0,
                                "rate_mbit": rate_at(trace, float(x["t_start_s"]) - start),
                                "t_round_ms": float(x["t_round_ms"]),
                            }
                        )
    return pd.DataFrame(rows)
