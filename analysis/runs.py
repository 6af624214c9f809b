"""Load run folders (`testbed run` output) into pandas, one row per request / round.

A run folder is results/<scenario>/<utc>-<sha>/ with (ARCHITECTURE.md, "Records"):

    requests.csv   one row per request (specfed.records.REQUEST_COLUMNS + link tag columns)
    rounds.csv     one row per (request, round, worker) (ROUND_COLUMNS + the same tags)
    meta.json      git state, versions, link backend, per-group link calibration
    points.csv     point, rep, values (JSON of the swept dotted paths)   [optional]
    scenario.yaml  the resolved scenario                                  [optional]
    server.json    the server's command line, V of the draft              [optional]

Several folders are concatenated; every row gets a `run` column (the folder's name). Derived
columns added here (nothing else is ever written back):

    config, config_order     the registry name of the transmission configuration
                             (analysis.styles), one per (transmission, k, reconstruction,
                             gamma[, epsilon]); suffixed with gamma / T when those vary
    family                   the configuration without K (series of K-axis plots)
    value_dtype, epsilon     per point, from points.csv over scenario.yaml defaults
    vocab_size               V of the run (server.json, else the model name, else full rows)
    ok                       requests: status == "ok"; rounds: their request is ok
    <host>_bw, <host>_delay  per host: min(up, down) Mbit/s (unlimited = inf) and the mean
                             of the up/down one-way delays, ms

Notation as in the paper: gamma drafted tokens per round, K kept entries, V vocabulary.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.styles import Style, config_style, family_style

REQUIRED_FILES = ("requests.csv", "rounds.csv", "meta.json")
KEY_COLUMNS = ["transmission", "k", "reconstruction", "gamma", "temperature"]
_STR_COLUMNS = {
    c: "str"
    for c in (
        "run_id",
        "request_id",
        "prompt_id",
        "transmission",
        "reconstruction",
        "status",
        "events",
        "tokens",
        "worker",
        "link_backend",
    )
}
_TAG = re.compile(r"^(?P<host>[A-Za-z0-9]+)_(?P<dir>up|down)_(?P<what>bw_mbit|delay_ms|loss_pct)$")
_TINY = re.compile(r"tiny-v(?P<v>\d+)-s\d+")
VALUE_BYTES = {"fp32": 4, "fp16": 2}
#: Line styles of the gamma / T variants of one configuration (in sorted (gamma, T) order).
VARIANT_LINESTYLES = ("-", "--", "-.", ":")


class NotARunFolder(ValueError):
    """A path given as a run folder is not one; the message names it and what is missing."""


@dataclass
class Run:
    """One run folder, as read (tables untouched but for dtypes)."""

    path: Path
    label: str
    meta: dict[str, Any]
    scenario: dict[str, Any]
    server: dict[str, Any]
    points: pd.DataFrame
    requests: pd.DataFrame
    rounds: pd.DataFrame


@dataclass
class Data:
    """Several runs concatenated, with the derived columns of the module docstring."""

    runs: list[Run]
    requests: pd.DataFrame
    rounds: pd.DataFrame
    hosts: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: registry style of every configuration / family present (name -> Style)
    styles: dict[str, Style] = field(default_factory=dict)
    family_styles: dict[str, Style] = field(default_factory=dict)

    @property
    def ok_requests(self) -> pd.DataFrame:
        return self.requests[self.requests["ok"]]

    @property
    def ok_rounds(self) -> pd.DataFrame:
        return self.rounds[self.rounds["ok"]]

    def config_order(self) -> list[str]:
        """Configuration names in registry order."""
        df = self.requests[["config", "config_order"]].drop_duplicates("config")
        return list(df.sort_values(["config_order", "config"])["config"])


def check_run_folder(path: Path) -> None:
    """Raise NotARunFolder naming the folder and the first missing file."""
    if not path.exists():
        raise NotARunFolder(f"{path}: no such folder (expected a run folder of `testbed run`)")
    if not path.is_dir():
        raise NotARunFolder(f"{path}: not a folder (expected a run folder of `testbed run`)")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            inner = sorted(
                p.parent.name
                for p in path.glob("*/requests.csv")
                if (p.parent / "meta.json").is_file()
            )
            hint = (
                f"; it holds run folders: {', '.join(inner[:5])}{' ...' if len(inner) > 5 else ''}"
                if inner
                else ""
            )
            raise NotARunFolder(
                f"{path} is not a run folder: {name} is missing (a run folder is "
                f"results/<scenario>/<utc>-<sha>/ written by `testbed run`, holding "
                f"{', '.join(REQUIRED_FILES)}){hint}"
            )


def _read_csv(path: Path) -> pd.DataFrame:
    if path.stat().st_size == 0:
        return pd.DataFrame()
    head = pd.read_csv(path, nrows=0).columns
    dtypes = {c: t for c, t in _STR_COLUMNS.items() if c in head}
    return pd.read_csv(path, dtype=dtypes)


def read_run(path: Path, label: str | None = None) -> Run:
    """Read one run folder (NotARunFolder if it is not one)."""
    path = Path(path)
    check_run_folder(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise NotARunFolder(f"{path / 'meta.json'}: not valid JSON ({exc})") from exc
    scenario: dict[str, Any] = {}
    if (path / "scenario.yaml").is_file():
        scenario = yaml.safe_load((path / "scenario.yaml").read_text(encoding="utf-8")) or {}
    server: dict[str, Any] = {}
    if (path / "server.json").is_file():
        server = json.loads((path / "server.json").read_text(encoding="utf-8"))
    points = pd.DataFrame(columns=["point", "rep", "values"])
    if (path / "points.csv").is_file() and (path / "points.csv").stat().st_size:
        points = pd.read_csv(path / "points.csv", dtype={"values": "str"})
    return Run(
        path=path,
        label=label or path.name,
        meta=meta,
        scenario=scenario,
        server=server,
        points=points,
        requests=_read_csv(path / "requests.csv"),
        rounds=_read_csv(path / "rounds.csv"),
    )


def vocab_size(run: Run) -> float:
    """V of a run: server.json, else a tiny model's name, else a full-transmission round
    (bytes_up = 12 + 20 + 12 + 4 P V for fp32); NaN if none of these is there."""
    v = (run.server.get("draft") or {}).get("vocab_size")
    if v:
        return float(v)
    draft = str((run.scenario.get("models") or {}).get("draft", ""))
    if m := _TINY.fullmatch(draft):
        return float(m["v"])
    r = run.rounds
    if not r.empty and "transmission" in r:
        full = r[r["transmission"] == "full"]
        if not full.empty:
            p = full["n_drafted"].astype(float) + 1
            v_est = (full["bytes_up"].astype(float) - 44) / (4 * p)
            return float(np.round(v_est.median()))
    return math.nan


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _point_options(run: Run) -> pd.DataFrame:
    """value_dtype and epsilon per point: the swept value, else the scenario's."""
    tr = run.scenario.get("transmission") or {}
    rows = []
    for point, values in zip(run.points["point"], run.points["values"], strict=True):
        v = json.loads(values) if isinstance(values, str) and values else {}
        rows.append(
            {
                "point": int(point),
                "value_dtype": v.get("transmission.value_dtype", tr.get("value_dtype", "fp32")),
                "epsilon": _float(v.get("transmission.epsilon", tr.get("epsilon"))),
            }
        )
    if not rows:
        return pd.DataFrame({"point": pd.Series(dtype=int), "value_dtype": [], "epsilon": []})
    return pd.DataFrame(rows).drop_duplicates("point")


def swept_paths(runs: list[Run]) -> list[str]:
    """The dotted paths any run sweeps (from points.csv)."""
    keys: dict[str, None] = {}
    for run in runs:
        for values in run.points["values"]:
            if isinstance(values, str) and values:
                keys.update(dict.fromkeys(json.loads(values)))
    return list(keys)


def _add_config(
    df: pd.DataFrame,
    multi_gamma: bool,
    multi_temp: bool,
    styles: dict[str, Style],
    family_styles: dict[str, Style],
) -> pd.DataFrame:
    keys = df[["transmission", "k", "reconstruction", "gamma", "temperature", "epsilon"]]
    # several gamma / T values: the same colour and marker, one line style per variant
    variants = sorted(
        {
            (int(g), float(t))
            for g, t in zip(df["gamma"], df["temperature"], strict=True)
            if int(g) > 0
        }
    )
    names, orders, fams = [], [], []
    for tr, k, rec, g, t, eps in keys.itertuples(index=False):
        g = int(g)
        eps = float(eps) if tr == "adaptive" else None
        st = config_style(str(tr), float(k), str(rec), g, eps)
        suffix, extra = "", 0.0
        if multi_gamma and g > 0:
            suffix += f" γ={g}"
            extra += g * 1e-3
        if multi_temp:
            suffix += f" T={float(t):g}"
            extra += float(t) * 1e-5
        name, order = st.name + suffix, st.order + extra
        names.append(name)
        orders.append(order)
        ls = st.linestyle
        if suffix and g > 0:
            ls = VARIANT_LINESTYLES[variants.index((g, float(t))) % len(VARIANT_LINESTYLES)]
        styles.setdefault(name, replace(st, name=name, order=order, linestyle=ls))
        fam = family_style(str(tr), str(rec), g)
        fam = replace(fam, name=fam.name + suffix, order=fam.order + extra, linestyle=ls)
        fams.append(fam.name)
        family_styles.setdefault(fam.name, fam)
    out = df.copy()
    out["config"] = names
    out["config_order"] = orders
    out["family"] = fams
    return out


def _add_links(df: pd.DataFrame, hosts: list[str]) -> pd.DataFrame:
    out = df.copy()
    for h in hosts:
        bw = [
            pd.to_numeric(out.get(f"{h}_{d}_bw_mbit", pd.Series(np.nan, index=out.index)))
            .astype(float)
            .fillna(np.inf)
            for d in ("up", "down")
        ]
        dl = [
            pd.to_numeric(out.get(f"{h}_{d}_delay_ms", pd.Series(np.nan, index=out.index)))
            .astype(float)
            .fillna(0.0)
            for d in ("up", "down")
        ]
        out[f"{h}_bw"] = np.minimum(bw[0], bw[1])
        out[f"{h}_delay"] = (dl[0] + dl[1]) / 2
    return out


def load(paths: list[Path]) -> Data:
    """Read and concatenate run folders, adding the derived columns (module docstring)."""
    labels: dict[str, int] = {}
    runs = []
    for p in paths:
        run = read_run(Path(p))
        n = labels.get(run.label, 0)
        labels[run.label] = n + 1
        if n:
            run.label = f"{run.label}#{n + 1}"
        runs.append(run)
    notes: list[str] = []
    req_parts: list[pd.DataFrame] = []
    rnd_parts: list[pd.DataFrame] = []
    for run in runs:
        opts = _point_options(run)
        v = vocab_size(run)
        for df, parts, what in (
            (run.requests, req_parts, "requests"),
            (run.rounds, rnd_parts, "rounds"),
        ):
            if df.empty:
                notes.append(f"{run.label}: {what}.csv holds no row")
                continue
            d = df.copy()
            d.insert(0, "run", run.label)
            d = d.merge(opts, on="point", how="left") if not opts.empty else d
            if "value_dtype" not in d:
                d["value_dtype"] = "fp32"
                d["epsilon"] = math.nan
            d["value_dtype"] = d["value_dtype"].fillna("fp32")
            d["vocab_size"] = v
            parts.append(d)
    if not req_parts:
        raise NotARunFolder(
            "no request was recorded in "
            + ", ".join(str(r.path) for r in runs)
            + ": nothing to analyze"
        )
    requests = pd.concat(req_parts, ignore_index=True)
    rounds = pd.concat(rnd_parts, ignore_index=True) if rnd_parts else pd.DataFrame()
    for df in (requests, rounds):
        if df.empty:
            continue
        df["k"] = pd.to_numeric(df["k"], errors="coerce").astype(float)
        df["gamma"] = pd.to_numeric(df["gamma"]).astype(int)
        df["temperature"] = pd.to_numeric(df["temperature"]).astype(float)
        df["reconstruction"] = df["reconstruction"].fillna("none")
    if "logp_mean" in requests:
        requests["logp_mean"] = pd.to_numeric(requests["logp_mean"], errors="coerce")
    requests["ok"] = requests["status"] == "ok"
    hosts = sorted(
        {m["host"] for c in requests.columns if (m := _TAG.match(c))},
        key=lambda h: (h == "srv", h),
    )
    ok_gamma = requests.loc[requests["gamma"] > 0, "gamma"].unique()
    multi_gamma = len(ok_gamma) > 1
    multi_temp = requests["temperature"].nunique() > 1
    styles: dict[str, Style] = {}
    family_styles: dict[str, Style] = {}
    requests = _add_config(requests, multi_gamma, multi_temp, styles, family_styles)
    requests = _add_links(requests, hosts)
    workers: list[str] = [h for h in hosts if h != "srv"]
    if not rounds.empty:
        # a round row's transmission may be a worker's own (per-worker K); the configuration
        # is the request's
        cfg = requests[["run", "request_id", "config", "config_order", "family", "ok"]]
        rounds = rounds.merge(cfg, on=["run", "request_id"], how="left")
        orphan = rounds["config"].isna()
        if orphan.any():
            n = rounds.loc[orphan, ["run", "request_id"]].drop_duplicates().shape[0]
            notes.append(
                f"{n} request(s) have rounds but no requests.csv row (interrupted): "
                "their rounds are left out"
            )
            rounds = rounds[~orphan].copy()
        rounds["ok"] = rounds["ok"].astype(bool)
        rounds = _add_links(rounds, hosts)
        workers = sorted(set(workers) | set(rounds["worker"].dropna().unique()))
    return Data(runs, requests, rounds, hosts, workers, notes, styles, family_styles)
