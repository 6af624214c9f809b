"""Every number of the report, as pandas tables computed from the loaded CSVs (analysis.load).

Notation as in the paper: gamma drafted tokens per round, P = n_drafted + 1 positions a
worker sends per round, K kept entries per position, V vocabulary size, eps = 1 - kept mass.
Times in ms, bandwidths in Mbit/s, sizes in bytes. Statistics use requests with status "ok"
(and their rounds) only; failed requests are counted, never averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.load import VALUE_BYTES, Data

#: Frame bytes around a codec payload in a VERIFY_REPLY (docs/wire-protocol.md): 12 frame
#: header + 20 fixed reply fields.
REPLY_OVERHEAD = 12 + 20
FULL_HEADER = 12
TOPK_HEADER = 16
ADAPTIVE_HEADER = 12  # + 4 P (docs/codecs.md)


def index_bytes_for(v: float) -> float:
    """The automatic top-K index width: the smallest of 2, 3, 4 bytes that holds V - 1."""
    if not math.isfinite(v):
        return math.nan
    for width in (2, 3, 4):
        if v - 1 < 1 << (8 * width):
            return float(width)
    return math.nan


def formula_up_bytes(
    transmission: str, p: float, v: float, k: float, value_bytes: float, k_mean: float
) -> float:
    """Documented bytes of one VERIFY_REPLY (worker -> server, one round):
    12 + 20 + payload, payload = full 12 + P V vb; topk 16 + P min(K, V) (ib + vb);
    adaptive 12 + 4 P + (ib + vb) sum_j K_j (sum_j K_j = P k_mean)."""
    ib = index_bytes_for(v)
    if transmission == "full":
        payload = FULL_HEADER + p * v * value_bytes
    elif transmission == "topk":
        payload = TOPK_HEADER + p * min(k, v) * (ib + value_bytes)
    elif transmission == "adaptive":
        payload = ADAPTIVE_HEADER + 4 * p + round(p * k_mean) * (ib + value_bytes)
    else:
        return math.nan
    return REPLY_OVERHEAD + payload


def _order(data: Data, df: pd.DataFrame, then: str | None = None) -> pd.DataFrame:
    """Rows in registry order of their configuration (then by `then`)."""
    order = {c: i for i, c in enumerate(data.config_order())}
    by = ["_o", *([then] if then else [])]
    return (
        df.assign(_o=df["config"].map(order))
        .sort_values(by, kind="stable")
        .drop(columns="_o")
        .reset_index(drop=True)
    )


# ----------------------------------------------------------------------------- metadata


def runs_table(data: Data) -> pd.DataFrame:
    """One row per run: scenario, git, backend, request counts."""
    rows = []
    for run in data.runs:
        req = data.requests[data.requests["run"] == run.label]
        git = run.meta.get("git") or {}
        rows.append(
            {
                "run": run.label,
                "scenario": run.meta.get("scenario", ""),
                "git sha": str(git.get("sha", "unknown"))[:12],
                "dirty": bool(git.get("dirty", False)),
                "backend": run.meta.get("link_backend", ""),
                "kernel": run.meta.get("kernel", ""),
                "started (UTC)": str(run.meta.get("started_utc", ""))[:19],
                "groups ok": sum(g.get("status") == "ok" for g in run.meta.get("groups", [])),
                "groups": len(run.meta.get("groups", [])),
                "requests": len(req),
                "failed": int((~req["ok"]).sum()),
                "V": run_v(data, run.label),
            }
        )
    return pd.DataFrame(rows)


def run_v(data: Data, label: str) -> float:
    v = data.requests.loc[data.requests["run"] == label, "vocab_size"]
    return float(v.iloc[0]) if len(v) else math.nan


def calibration_table(data: Data) -> pd.DataFrame:
    """Per run, group and worker path: configured vs measured RTT, goodput ratios."""
    rows = []
    for run in data.runs:
        for gi, g in enumerate(run.meta.get("groups", [])):
            values = ", ".join(f"{k}={v}" for k, v in (g.get("values") or {}).items())
            for c in g.get("calibration") or []:
                rtt = c.get("rtt") or {}
                gp = {
                    f"{x.get('src')}->{x.get('dst')}": x.get("ratio") for x in c.get("goodput", [])
                }
                rows.append(
                    {
                        "run": run.label,
                        "group": gi,
                        "rep": g.get("rep"),
                        "values": values,
                        "path": f"{c.get('a')}-{c.get('b')}",
                        "configured RTT ms": c.get("configured_rtt_ms"),
                        "measured RTT ms": rtt.get("mean_ms"),
                        "RTT sd ms": rtt.get("sd_ms"),
                        "error ms": c.get("rtt_error_ms"),
                        "goodput up ratio": gp.get(f"{c.get('a')}->{c.get('b')}"),
                        "goodput down ratio": gp.get(f"{c.get('b')}->{c.get('a')}"),
                        "passed": c.get("passed"),
                    }
                )
    return pd.DataFrame(rows)


def calibration_rtt(data: Data) -> pd.DataFrame:
    """(run, point, rep, worker) -> measured calibration RTT mean, ms."""
    rows = []
    for run in data.runs:
        for g in run.meta.get("groups", []):
            for c in g.get("calibration") or []:
                worker = c.get("a") if c.get("b") == "srv" else c.get("b")
                mean = (c.get("rtt") or {}).get("mean_ms")
                if mean is None:
                    continue
                for pt in g.get("points", []):
                    rows.append(
                        {
                            "run": run.label,
                            "point": int(pt),
                            "rep": int(g.get("rep", 0)),
                            "worker": worker,
                            "rtt_measured_ms": float(mean),
                        }
                    )
    cols = ["run", "point", "rep", "worker", "rtt_measured_ms"]
    return pd.DataFrame(rows, columns=cols).drop_duplicates(cols[:4])


# ----------------------------------------------------------------------------- summary


def mean_sd(s: pd.Series) -> tuple[float, float]:
    s = s.dropna().astype(float)
    if s.empty:
        return math.nan, math.nan
    return float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else math.nan


def summary_table(data: Data) -> pd.DataFrame:
    """Per configuration: requests (all), failed, and means over ok requests."""
    req = data.requests
    rows = []
    for cfg, g in req.groupby("config", sort=False):
        ok = g[g["ok"]]
        m, sd = mean_sd(ok["ms_per_token"])
        row: dict[str, Any] = {
            "config": cfg,
            "requests": len(g),
            "failed": int((~g["ok"]).sum()),
            "ms/token": m,
            "ms/token sd": sd,
            "ttft ms": ok["ttft_ms"].astype(float).mean(),
            "acceptance": ok["acceptance"].astype(float).mean(),
            "tokens/round": ok["tokens_per_round"].astype(float).mean(),
            "bytes/token": ok["bytes_per_token"].astype(float).mean(),
        }
        if has_logp(data):
            row["logp/token"] = ok["logp_mean"].mean()
        rows.append(row)
    return _order(data, pd.DataFrame(rows))


def has_logp(data: Data) -> bool:
    """logp_mean is optional (absent or empty = not measured)."""
    return "logp_mean" in data.requests and bool(data.ok_requests["logp_mean"].notna().any())


# ----------------------------------------------------------------------------- 1: links


@dataclass(frozen=True)
class LinkAxis:
    """A link parameter the data varies along: a request column and how to label it."""

    kind: str  # "bw" or "delay"
    column: str
    label: str


def link_axes(data: Data) -> list[LinkAxis]:
    """Bandwidth and one-way delay axes along which the ok requests vary.

    One host whose value varies: that host's access link. Several: the slowest worker's
    (smallest bandwidth, largest one-way delay over workers)."""
    req = data.ok_requests
    axes = []
    for kind, agg, unit, what in (
        ("bw", np.min, "Mbit/s", "bandwidth"),
        ("delay", np.max, "ms", "one-way delay"),
    ):
        varying = [
            h for h in data.hosts if f"{h}_{kind}" in req and req[f"{h}_{kind}"].nunique() > 1
        ]
        if not varying:
            continue
        if len(varying) == 1:
            h = varying[0]
            axes.append(LinkAxis(kind, f"{h}_{kind}", f"{h} access-link {what} ({unit})"))
        else:
            col = f"slowest_worker_{kind}"
            req_cols = [f"{w}_{kind}" for w in data.workers if f"{w}_{kind}" in data.requests]
            for df in (data.requests, data.rounds):
                if not df.empty:
                    df[col] = agg(df[req_cols].to_numpy(dtype=float), axis=1)
            axes.append(LinkAxis(kind, col, f"slowest worker's access-link {what} ({unit})"))
    return axes


def latency_vs_link(data: Data, axis: LinkAxis) -> pd.DataFrame:
    """ms per token per configuration and link value: mean, sd, n over ok requests."""
    req = data.ok_requests
    t = (
        req.groupby(["config", axis.column], sort=False)["ms_per_token"]
        .agg(mean="mean", sd="std", n="count")
        .reset_index()
    )
    order = {c: i for i, c in enumerate(data.config_order())}
    t["_o"] = t["config"].map(order)
    return t.sort_values(["_o", axis.column]).drop(columns="_o").reset_index(drop=True)


# ----------------------------------------------------------------------------- rounds


def per_round(data: Data) -> pd.DataFrame:
    """One row per (run, request, round) of ok requests: the breakdown and the lower bound.

    Breakdown (ms): draft = t_draft; compute = max over workers of t_worker; network =
    t_call - t_worker of the slowest worker (largest t_call); aggregation = t_aggregate;
    other = t_round - the four (scheduling, threads, framing outside t_call).
    Lower bound (ms): t_draft + max over workers of (RTT_w + 8 bytes_up / bw_up +
    8 bytes_down / bw_down + t_worker) + t_aggregate, with RTT_w the measured calibration
    RTT of the worker's path (else configured: the sum of the worker's and srv's one-way
    delays) and bw_up = min(worker up, srv down), bw_down = min(srv up, worker down).
    """
    r = data.ok_rounds.copy()
    if r.empty:
        return pd.DataFrame()
    for c in ("t_draft_ms", "t_worker_ms", "t_call_ms", "t_aggregate_ms", "t_round_ms"):
        r[c] = r[c].astype(float)

    def host_col(what: str, host_of_row: pd.Series) -> np.ndarray:
        out = np.full(len(r), np.nan)
        for h in host_of_row.unique():
            col = f"{h}_{what}"
            if col in r:
                m = (host_of_row == h).to_numpy()
                out[m] = pd.to_numeric(r.loc[m, col], errors="coerce").to_numpy(dtype=float)
        return out

    worker = r["worker"]
    srv = pd.Series("srv", index=r.index)
    inf_if_nan = lambda a: np.where(np.isnan(a), np.inf, a)  # noqa: E731
    zero_if_nan = lambda a: np.where(np.isnan(a), 0.0, a)  # noqa: E731
    w_up = inf_if_nan(host_col("up_bw_mbit", worker))
    w_down = inf_if_nan(host_col("down_bw_mbit", worker))
    s_up = inf_if_nan(host_col("up_bw_mbit", srv))
    s_down = inf_if_nan(host_col("down_bw_mbit", srv))
    rtt_cfg = (
        zero_if_nan(host_col("up_delay_ms", worker))
        + zero_if_nan(host_col("down_delay_ms", worker))
        + zero_if_nan(host_col("up_delay_ms", srv))
        + zero_if_nan(host_col("down_delay_ms", srv))
    )
    cal = calibration_rtt(data)
    r = r.merge(cal, on=["run", "point", "rep", "worker"], how="left")
    measured = r["rtt_measured_ms"].to_numpy(dtype=float)
    r["rtt_ms"] = np.where(np.isnan(measured), rtt_cfg, measured)
    r["rtt_source"] = np.where(np.isnan(measured), "configured", "measured")
    bw_up = np.minimum(w_up, s_down)
    bw_down = np.minimum(s_up, w_down)
    r["t_ser_up_ms"] = r["bytes_up"].astype(float).to_numpy() * 8 / (bw_up * 1e3)
    r["t_ser_down_ms"] = r["bytes_down"].astype(float).to_numpy() * 8 / (bw_down * 1e3)
    r["worker_bound_ms"] = r["rtt_ms"] + r["t_ser_up_ms"] + r["t_ser_down_ms"] + r["t_worker_ms"]
    keys = ["run", "request_id", "round"]
    slow = r.loc[r.groupby(keys, sort=False)["t_call_ms"].idxmax()]
    g = r.groupby(keys, sort=False)
    out = g.agg(
        config=("config", "first"),
        family=("family", "first"),
        point=("point", "first"),
        rep=("rep", "first"),
        transmission=("transmission", "first"),
        k=("k", "first"),
        gamma=("gamma", "first"),
        n_drafted=("n_drafted", "first"),
        draft=("t_draft_ms", "first"),
        compute=("t_worker_ms", "max"),
        aggregation=("t_aggregate_ms", "first"),
        t_round_ms=("t_round_ms", "first"),
        max_worker_bound=("worker_bound_ms", "max"),
        rtt_source=("rtt_source", "first"),
    ).reset_index()
    net = (slow["t_call_ms"] - slow["t_worker_ms"]).to_numpy()
    out["network"] = net
    out["slowest_worker"] = slow["worker"].to_numpy()
    out["other"] = out["t_round_ms"] - out[["draft", "compute", "network", "aggregation"]].sum(
        axis=1
    )
    out["bound_ms"] = out["draft"] + out["max_worker_bound"] + out["aggregation"]
    out["ratio"] = out["t_round_ms"] / out["bound_ms"]
    link_cols = [c for c in data.requests.columns if c.endswith(("_bw", "_delay"))]
    req_links = data.requests[["run", "request_id", *link_cols]]
    return out.merge(req_links, on=["run", "request_id"], how="left")


BREAKDOWN = ["draft", "compute", "network", "aggregation", "other"]


def breakdown_table(data: Data, rounds: pd.DataFrame, facet: str | None) -> pd.DataFrame:
    """Mean ms per round of each component, per configuration (and facet value)."""
    by = ["config", *([facet] if facet else [])]
    t = rounds.groupby(by, sort=False)[[*BREAKDOWN, "t_round_ms"]].mean()
    t["rounds"] = rounds.groupby(by, sort=False).size()
    return _order(data, t.reset_index(), facet)


def bound_table(data: Data, rounds: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: measured round time vs the analytic lower bound."""
    t = (
        rounds.groupby("config", sort=False)
        .agg(
            rounds=("ratio", "size"),
            measured_ms=("t_round_ms", "mean"),
            bound_ms=("bound_ms", "mean"),
            ratio_mean=("ratio", "mean"),
            ratio_min=("ratio", "min"),
            below_1=("ratio", lambda s: int((s < 1).sum())),
        )
        .reset_index()
    )
    return _order(data, t)


# ----------------------------------------------------------------------------- 3: bytes


def bytes_rounds(data: Data) -> pd.DataFrame:
    """Rounds of ok requests with P and the documented up bytes per worker and round."""
    r = data.ok_rounds.copy()
    if r.empty:
        return r
    r["P"] = r["n_drafted"].astype(int) + 1
    vb = r["value_dtype"].map(VALUE_BYTES).astype(float)
    r["formula_up"] = [
        formula_up_bytes(tr, p, v, k, b, km)
        for tr, p, v, k, b, km in zip(
            r["transmission"],
            r["P"],
            r["vocab_size"],
            r["k"],
            vb,
            r["k_mean"].astype(float),
            strict=True,
        )
    ]
    return r


def bytes_table(data: Data) -> pd.DataFrame:
    """Per configuration: measured vs documented up bytes per worker-round and per token."""
    r = bytes_rounds(data)
    if r.empty:
        return pd.DataFrame()
    per_req = (
        r.groupby(["run", "request_id"], sort=False)
        .agg(formula_total=("formula_up", "sum"), measured_total=("bytes_up", "sum"))
        .reset_index()
    )
    req = data.ok_requests.merge(per_req, on=["run", "request_id"], how="left")
    req["formula_per_token"] = req["formula_total"] / req["new_tokens"].astype(float)
    msg = (
        r.groupby("config", sort=False)
        .agg(
            transmission=("transmission", "first"),
            K=("k", "first"),
            V=("vocab_size", "first"),
            P_mean=("P", "mean"),
            up_measured=("bytes_up", "mean"),
            up_formula=("formula_up", "mean"),
        )
        .reset_index()
    )
    diff = (r["bytes_up"].astype(float) - r["formula_up"]).abs().groupby(r["config"]).max()
    msg["max_abs_diff"] = msg["config"].map(diff)
    tok = (
        req.groupby("config", sort=False)
        .agg(
            per_token_measured=("bytes_per_token", "mean"),
            per_token_formula=("formula_per_token", "mean"),
        )
        .reset_index()
    )
    t = msg.merge(tok, on="config", how="left")
    t["index_bytes"] = [
        index_bytes_for(v) if tr != "full" else math.nan
        for tr, v in zip(t["transmission"], t["V"], strict=True)
    ]
    fam = data.requests.drop_duplicates("config").set_index("config")["family"]
    t["family"] = t["config"].map(fam)
    gam = data.requests.drop_duplicates("config").set_index("config")["gamma"]
    t["gamma"] = t["config"].map(gam)
    return _order(data, t)


# ----------------------------------------------------------------------------- 4: acceptance


def per_config_k(data: Data) -> pd.DataFrame:
    """Per configuration: family, K, gamma, acceptance and tokens per round (mean, sd)."""
    req = data.ok_requests
    t = (
        req.groupby("config", sort=False)
        .agg(
            family=("family", "first"),
            transmission=("transmission", "first"),
            K=("k", "first"),
            gamma=("gamma", "first"),
            requests=("ms_per_token", "size"),
            acceptance=("acceptance", "mean"),
            acceptance_sd=("acceptance", "std"),
            tokens_per_round=("tokens_per_round", "mean"),
            tokens_per_round_sd=("tokens_per_round", "std"),
        )
        .reset_index()
    )
    eps = data.ok_rounds.groupby("config")["eps_mean"].mean() if not data.rounds.empty else None
    t["eps_mean"] = t["config"].map(eps) if eps is not None else math.nan
    return _order(data, t)


# ----------------------------------------------------------------------------- 5: fidelity


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


def coupling_columns(data: Data) -> list[str]:
    """Columns two requests must share to be coupled: run, prompt, seed, rep, gamma, T and
    every link parameter (they differ only in transmission / K / reconstruction)."""
    links = [c for c in data.requests.columns if c.endswith(("_bw_mbit", "_delay_ms", "_loss_pct"))]
    return ["run", "prompt_id", "seed", "rep", "gamma", "temperature", *links]


def _key(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """One string per row from `cols` (missing values included, as '<na>')."""
    return pd.Series(
        ["|".join(map(str, row)) for row in df[cols].astype(object).fillna("<na>").to_numpy()],
        index=df.index,
    )


def fidelity_pairs(data: Data) -> pd.DataFrame:
    """Each lossy ok request next to its coupled full-transmission request."""
    req = data.ok_requests.copy()
    key_cols = coupling_columns(data)
    req["_key"] = _key(req, key_cols)
    full = req[req["transmission"] == "full"].drop_duplicates("_key").set_index("_key")
    lossy = req[req["transmission"] != "full"]
    rows = []
    logp = has_logp(data)
    for _, row in lossy.iterrows():
        if row["_key"] not in full.index:
            continue
        ref = full.loc[row["_key"]]
        a, b = _tokens(row["tokens"]), _tokens(ref["tokens"])
        rows.append(
            {
                "config": row["config"],
                "family": row["family"],
                "K": row["k"],
                "gamma": row["gamma"],
                "run": row["run"],
                "request_id": row["request_id"],
                "full_request_id": ref["request_id"],
                "identical": a == b,
                "first_divergence": first_divergence(a, b),
                "acceptance": float(row["acceptance"]),
                "acceptance_full": float(ref["acceptance"]),
                "logp": float(row["logp_mean"]) if logp else math.nan,
                "logp_full": float(ref["logp_mean"]) if logp else math.nan,
            }
        )
    return pd.DataFrame(rows)


def fidelity_table(data: Data, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per lossy configuration: pairs, identical fraction, mean first divergence (over the
    pairs that diverge), acceptance lossy vs full, logp lossy vs full (if measured)."""
    if pairs.empty:
        return pd.DataFrame()
    t = (
        pairs.groupby("config", sort=False)
        .agg(
            family=("family", "first"),
            K=("K", "first"),
            gamma=("gamma", "first"),
            pairs=("identical", "size"),
            identical_frac=("identical", "mean"),
            first_divergence=("first_divergence", "mean"),
            acceptance=("acceptance", "mean"),
            acceptance_full=("acceptance_full", "mean"),
            logp=("logp", "mean"),
            logp_full=("logp_full", "mean"),
        )
        .reset_index()
    )
    t["acceptance_diff"] = t["acceptance"] - t["acceptance_full"]
    t["logp_diff"] = t["logp"] - t["logp_full"]
    return _order(data, t)
