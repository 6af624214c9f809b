"""Tidy frames of one or several run folders: every parameter a column, grouped by all of them.

`load_results` reads run folders (analysis.runs) and returns `Results`:

    requests      one row per request, every column of requests.csv plus the derived
                  columns below (failed and warm-up requests included, flagged)
    rounds        one row per (request, round, worker): rounds.csv plus the same derived
                  columns; transmission, k, epsilon, value_dtype, index_bytes are the
                  request's (its configuration), the worker's own are `worker_<name>`
    round_times   one row per (request, round): the critical path (analysis.tables)

Derived columns:

    run                   the run folder's name (#2, #3 ... if two folders share one)
    git_sha               the run's commit (short sha, `-dirty` if tracked files differed)
    ok                    status == "ok"
    included              ok, and not a warm-up request unless keep_warmup
    config, config_order, family
                          the configuration's registry name (analysis.styles), suffixed
                          with gamma / T / fp16 / index width where those vary
    setting               the values of the varying settings, e.g.
                          "links.w1.bw_mbit=5, links.w1.delay_ms=10" ("-" if none varies)
    <w>_path_rtt_ms       configured RTT of worker w's path to srv: the sum of the one-way
                          delays of every link on it, both directions (ms)
    <w>_path_bw_up_mbit   bottleneck bandwidth worker -> srv on that path (Mbit/s, inf =
    <w>_path_bw_down_mbit unlimited); and srv -> worker
    <link>_bw_mbit        min(up, down) bandwidth of a link whose bandwidth varies
    bottleneck_bw_mbit, max_path_rtt_ms
                          over workers: the smallest up bottleneck, the largest path RTT
    <scenario path>       run-level scenario fields that differ between the runs loaded
                          (models.*, decoding.max_new_tokens, network.*, ...), by dotted path

A *setting* column is any column other than the per-request options that can change a
result: every link parameter, every swept dotted path, the scenario fields above,
compute_mode, V, link_backend, git_sha (unless pool_commits), and any other records column
constant within every point and repetition. Statistics group by the configuration's
options (SCHEME) and every setting column that varies in the data loaded.

Notation as in the paper: gamma drafted tokens per round, K kept entries, V vocabulary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.runs import (
    LINK_COLUMN,
    NotARunFolder,
    Run,
    flatten,
    read_run,
    worker_path,
)
from analysis.styles import Style, config_style, family_style

__all__ = ["SCHEME", "UNITS", "Axis", "Results", "load_results"]

#: The per-request options of a configuration (records columns), grouped by everywhere.
SCHEME = [
    "transmission", "k", "epsilon", "value_dtype", "index_bytes", "index_coding",
    "reconstruction", "gamma", "temperature",
]  # fmt: skip
#: The statistical unit: one repetition of one point in one run folder.
UNITS = ["run", "rep"]
_LINK = re.compile(LINK_COLUMN)
#: Line styles of the gamma / T variants of one configuration (in sorted (gamma, T) order).
VARIANT_LINESTYLES = ("-", "--", "-.", ":")
#: Scenario fields that are never run-level setting columns: names, seeds, sweeps, the
#: per-request options (columns already) and the links (link columns already).
_NOT_SETTINGS = (
    "name", "description", "seed", "repetitions", "random_order", "sweep", "links",
    "transmission", "decoding.gamma", "decoding.temperature", "timeouts",
)  # fmt: skip
_LINK_PARAM_ORDER = ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts")


@dataclass(frozen=True)
class Axis:
    """A link quantity the data varies along: a column, its label, and the setting columns
    that move with it (left out of the facets of its plots)."""

    kind: str  # "bandwidth" or "rtt"
    column: str
    label: str
    related: tuple[str, ...] = ()


@dataclass
class Results:
    """Run folders as tidy frames (module docstring), with what the statistics group by."""

    runs: list[Run]
    requests: pd.DataFrame
    rounds: pd.DataFrame
    round_times: pd.DataFrame
    #: the setting columns that vary (grouped by, beyond SCHEME)
    settings: list[str]
    #: the fewest of them that tell the settings apart (the `setting` label)
    label_columns: list[str]
    hosts: list[str]
    workers: list[str]
    axes: list[Axis]
    keep_warmup: bool = False
    pool_commits: bool = False
    notes: list[str] = field(default_factory=list)
    styles: dict[str, Style] = field(default_factory=dict)
    family_styles: dict[str, Style] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """What every statistic groups by: the configuration and every varying setting."""
        return ["config", *SCHEME, *self.settings]

    @property
    def included_requests(self) -> pd.DataFrame:
        """Requests that enter the statistics (ok; warm-up only with keep_warmup)."""
        return self.requests[self.requests["included"]]

    @property
    def included_rounds(self) -> pd.DataFrame:
        return self.rounds[self.rounds["included"]] if not self.rounds.empty else self.rounds

    @property
    def included_round_times(self) -> pd.DataFrame:
        rt = self.round_times
        return rt[rt["included"]] if not rt.empty else rt

    def config_order(self) -> list[str]:
        """Configuration names in registry order."""
        df = self.requests[["config", "config_order"]].drop_duplicates("config")
        return list(df.sort_values(["config_order", "config"])["config"])

    def axis(self, kind: str) -> Axis | None:
        return next((a for a in self.axes if a.kind == kind), None)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table the report exports, by file name (analysis.tables.all_tables)."""
        from analysis.tables import all_tables

        return all_tables(self)


# ----------------------------------------------------------------------------- loading


def _unique_labels(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        n = seen.get(run.label, 0)
        seen[run.label] = n + 1
        if n:
            run.label = f"{run.label}#{n + 1}"


def _numeric(s: pd.Series) -> pd.Series:
    """Numbers where every non-empty value is one; else the column as it is."""
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return s
    conv = pd.to_numeric(s, errors="coerce")
    if conv.notna().sum() == s.notna().sum():
        return conv.astype(float)
    return s


def _scenario_columns(runs: list[Run], present: set[str]) -> dict[str, dict[str, Any]]:
    """Run-level scenario fields that differ between the runs: path -> {run label: value}."""
    flat = {
        r.label: {
            k: v
            for k, v in flatten(r.scenario).items()
            if not any(k == p or k.startswith(p + ".") for p in _NOT_SETTINGS)
        }
        for r in runs
    }
    paths = sorted({p for f in flat.values() for p in f} - present)
    out = {}
    for p in paths:
        values = {label: f.get(p) for label, f in flat.items()}
        if len({repr(v) for v in values.values()}) > 1:
            out[p] = values
    return out


def _concat(runs: list[Run], what: str) -> pd.DataFrame:
    parts = []
    for run in runs:
        df: pd.DataFrame = getattr(run, what)
        if df.empty:
            continue
        d = df.copy()
        d.insert(0, "run", run.label)
        d.insert(1, "git_sha", run.git)
        parts.append(d)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


#: The policy columns (docs/policies.md): text ones with the value a run without policies
#: means, numeric ones (empty where the policy does not use them).
POLICY_DEFAULTS = {"gamma_policy": "fixed", "k_policy": "fixed", "k_source": "link",
                   "aggregation": "all"}  # fmt: skip
POLICY_NUMBERS = ("gamma_min", "gamma_max", "k_budget_ms", "k_min", "k_max", "quorum",
                  "deadline_ms")  # fmt: skip


def policy_suffix(row: Mapping[str, Any]) -> str:
    """What a configuration's name adds for its policies ('' at the paper's defaults):
    ' auto(4ms)' (link-aware K; 'observed' when it follows the replies), ' γ:heuristic',
    ' quorum 2', ' deadline 300ms'."""
    out = ""
    if row.get("k_policy") == "auto":
        src = ",observed" if row.get("k_source") == "observed" else ""
        out += f" auto({float(row['k_budget_ms']):g}ms{src})"
    if row.get("gamma_policy", "fixed") != "fixed":
        out += f" γ:{row['gamma_policy']}"
    if row.get("aggregation") == "quorum":
        out += f" quorum {int(row['quorum'])}"
    elif row.get("aggregation") == "deadline":
        out += f" deadline {float(row['deadline_ms']):g}ms"
    return out


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Dtypes of the point columns and of every link / dotted column."""
    for c in ("k", "epsilon", "index_bytes", "temperature", "vocab_size"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    if "gamma" in df:
        df["gamma"] = pd.to_numeric(df["gamma"]).astype(int)
    if "reconstruction" in df:
        df["reconstruction"] = df["reconstruction"].fillna("none").astype(str)
    if "value_dtype" in df:
        df["value_dtype"] = df["value_dtype"].fillna("fp32").astype(str)
    if "transmission" in df:  # runs from before the column existed: fixed-width indices
        coding = df["index_coding"] if "index_coding" in df else pd.Series("fixed", df.index)
        df["index_coding"] = coding.fillna("fixed").astype(str)
    if "transmission" in df:  # runs from before the policies: their defaults
        for c, default in POLICY_DEFAULTS.items():
            df[c] = df[c].fillna(default).astype(str) if c in df else default
        for c in POLICY_NUMBERS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float) if c in df else np.nan
    if "warmup" in df:
        df["warmup"] = df["warmup"].fillna(False).astype(bool)
    for c in df.columns:
        if _LINK.match(c) or "." in c:
            df[c] = _numeric(df[c])
    return df


def _fill_dotted(df: pd.DataFrame, runs: list[Run]) -> pd.DataFrame:
    """A dotted (swept) column missing in some run: that run's scenario value."""
    flat = {r.label: flatten(r.scenario) for r in runs}
    for c in [c for c in df.columns if "." in c]:
        missing = df[c].isna()
        if missing.any():
            df.loc[missing, c] = df.loc[missing, "run"].map(
                lambda label, c=c: flat.get(label, {}).get(c, np.nan)
            )
        df[c] = _numeric(df[c])
    return df


def _link_names(columns: Iterable[str]) -> list[str]:
    names: dict[str, None] = {}
    for c in columns:
        if m := _LINK.match(c):
            names[m["link"]] = None
    return list(names)


def _col(df: pd.DataFrame, name: str, fill: float) -> np.ndarray:
    if name not in df:
        return np.full(len(df), fill)
    return pd.to_numeric(df[name], errors="coerce").astype(float).fillna(fill).to_numpy()


def _paths(
    run: Run, workers: list[str]
) -> dict[tuple[int, int], dict[str, list[tuple[str, bool]]]]:
    """(point, rep) -> worker -> its links to srv, from the groups' topology in meta.json
    (a star of access links when meta.json has none)."""
    hosts = {*workers, "srv"}
    out: dict[tuple[int, int], dict[str, list[tuple[str, bool]]]] = {}
    default = {w: [(w, True), ("srv", False)] for w in workers}
    for g in run.meta.get("groups", []):
        edges = [(str(x["node1"]), str(x["node2"])) for x in g.get("links") or []]
        paths = {w: worker_path(edges, w, hosts) for w in workers} if edges else default
        for pt in g.get("points", []):
            out[(int(pt), int(g.get("rep", 0)))] = paths
    out[(-1, -1)] = default
    return out


def upload_link_columns(res: Results, rows: pd.DataFrame) -> list[list[str]]:
    """For each row of `rows` (run, point, rep, worker): the bandwidth columns of the links
    its worker's replies cross towards srv, in order (`w1_up_bw_mbit`, `srv_down_bw_mbit`,
    `e1-s0_up_bw_mbit`, ...)."""
    tables = {run.label: _paths(run, res.workers) for run in res.runs}
    out = []
    for run, point, rep, worker in rows[["run", "point", "rep", "worker"]].itertuples(index=False):
        table = tables.get(run, {})
        paths = table.get((int(point), int(rep)), table.get((-1, -1), {}))
        hops = paths.get(worker) or [(worker, True), ("srv", False)]
        out.append([f"{name}_{'up' if fwd else 'down'}_bw_mbit" for name, fwd in hops])
    return out


def _add_paths(df: pd.DataFrame, runs: list[Run], workers: list[str]) -> pd.DataFrame:
    """<w>_path_rtt_ms, <w>_path_bw_up_mbit, <w>_path_bw_down_mbit per row."""
    new: dict[str, np.ndarray] = {
        f"{w}_{s}": np.full(len(df), np.nan)
        for w in workers
        for s in ("path_rtt_ms", "path_bw_up_mbit", "path_bw_down_mbit")
    }
    for run in runs:
        table = _paths(run, workers)
        in_run = (df["run"] == run.label).to_numpy()
        if not in_run.any():
            continue
        sub = df[in_run]
        keys = list(zip(sub["point"].astype(int), sub["rep"].astype(int), strict=True))
        for key in dict.fromkeys(keys):
            rows = np.flatnonzero(in_run)[[k == key for k in keys]]
            paths = table.get(key, table[(-1, -1)])
            part = df.iloc[rows]
            for w in workers:
                hops = paths.get(w) or []
                if not hops:
                    continue
                rtt = sum(
                    _col(part, f"{name}_{d}_delay_ms", 0.0)
                    for name, _ in hops
                    for d in ("up", "down")
                )
                up = np.min(
                    [
                        _col(part, f"{n}_{'up' if fwd else 'down'}_bw_mbit", np.inf)
                        for n, fwd in hops
                    ],
                    axis=0,
                )
                down = np.min(
                    [
                        _col(part, f"{n}_{'down' if fwd else 'up'}_bw_mbit", np.inf)
                        for n, fwd in hops
                    ],
                    axis=0,
                )
                new[f"{w}_path_rtt_ms"][rows] = rtt
                new[f"{w}_path_bw_up_mbit"][rows] = up
                new[f"{w}_path_bw_down_mbit"][rows] = down
    return df.assign(**new)


def _config_names(
    df: pd.DataFrame, styles: dict[str, Style], family_styles: dict[str, Style]
) -> pd.DataFrame:
    """config, config_order and family of every row (registry names and styles)."""
    multi_gamma = df.loc[df["gamma"] > 0, "gamma"].nunique() > 1
    multi_temp = df["temperature"].nunique() > 1
    lossy = df["transmission"] != "full"
    multi_dtype = df["value_dtype"].nunique() > 1
    multi_ib = df.loc[lossy, "index_bytes"].nunique() > 1
    multi_coding = df.loc[lossy, "index_coding"].nunique() > 1
    variants = sorted(
        {(int(g), float(t)) for g, t in zip(df["gamma"], df["temperature"], strict=True) if g > 0}
    )
    names, orders, fams = [], [], []
    policy_cols = [c for c in (*POLICY_DEFAULTS, *POLICY_NUMBERS) if c in df]
    policy_rows = iter(df[policy_cols].to_dict("records") if policy_cols else [{}] * len(df))
    policy_order: dict[str, int] = {}
    cols = ["transmission", "k", "reconstruction", "gamma", "temperature", "epsilon"]
    for (tr, k, rec, g, t, eps), vdt, ib, coding in zip(
        df[cols].itertuples(index=False),
        df["value_dtype"],
        df["index_bytes"],
        df["index_coding"],
        strict=True,
    ):
        g = int(g)
        e = float(eps) if tr == "adaptive" else None
        st = config_style(str(tr), float(k), str(rec), g, e)
        suffix, extra = "", 0.0
        if multi_gamma and g > 0:
            suffix += f" γ={g}"
            extra += g * 1e-3
        if multi_temp:
            suffix += f" T={float(t):g}"
            extra += float(t) * 1e-5
        if multi_dtype and vdt != "fp32":
            suffix += f" {vdt}"
            extra += 1e-7
        if multi_coding and tr != "full" and coding != "fixed":
            suffix += f" {coding}"
            extra += 1e-7
        if multi_ib and tr != "full" and math.isfinite(ib):
            suffix += f" idx{int(ib)}B"
            extra += ib * 1e-8
        ls = st.linestyle
        if (multi_gamma or multi_temp) and g > 0:
            ls = VARIANT_LINESTYLES[variants.index((g, float(t))) % len(VARIANT_LINESTYLES)]
        pol = next(policy_rows)
        if policy := policy_suffix(pol):
            suffix += policy
            extra += 1e-9 * policy_order.setdefault(policy, len(policy_order) + 1)
        if pol.get("k_policy") == "auto":  # K varies per worker and round: no K in the name
            st = replace(st, name=st.name.replace("-? ", " "))
        name = st.name + suffix
        styles.setdefault(name, replace(st, name=name, order=st.order + extra, linestyle=ls))
        fam = family_style(str(tr), str(rec), g)
        fam = replace(fam, name=fam.name + suffix, order=fam.order + extra, linestyle=ls)
        family_styles.setdefault(fam.name, fam)
        names.append(name)
        orders.append(st.order + extra)
        fams.append(fam.name)
    return df.assign(config=names, config_order=orders, family=fams)


#: Columns of requests.csv that describe the request's outcome (not taken by its rounds).
REQUEST_ONLY = (
    "status", "prompt_tokens", "new_tokens", "rounds", "ttft_ms", "e2e_ms", "ms_per_token",
    "acceptance", "tokens_per_round", "bytes_up_total", "bytes_per_token", "logp_mean",
    "events", "tokens",
)  # fmt: skip
#: Records columns that are settings when they vary (how compute ran, V, link backend).
SETTING_COLUMNS = ("compute_mode", "vocab_size", "link_backend")
#: Records columns that are never settings: ids, per-request outcomes, per-prompt values.
NOT_SETTINGS = frozenset(
    {"run", "run_id", "point", "rep", "request_id", "prompt_id", "warmup", "seed", *SCHEME}
    | set(REQUEST_ONLY)
    | set(POLICY_DEFAULTS)
    | set(POLICY_NUMBERS)
)


def _constant_per_point(df: pd.DataFrame, col: str) -> bool:
    """True if `col` takes one value within every (run, point, rep)."""
    n = df.groupby(["run", "point", "rep"], dropna=False)[col].nunique(dropna=False)
    return bool((n <= 1).all())


def _candidates(
    df: pd.DataFrame, scenario_cols: list[str], pool_commits: bool, raw: Sequence[str]
) -> list[str]:
    """Setting columns in label priority: swept dotted paths, commit, scenario fields, link
    parameters (bandwidth, delay, jitter, loss, queue), SETTING_COLUMNS, then any other
    records column constant within every point and repetition (a column a newer testbed
    adds is grouped by rather than averaged over)."""
    dotted = [c for c in df.columns if "." in c and c not in scenario_cols]
    links = [c for c in df.columns if _LINK.match(c)]
    links.sort(key=lambda c: _LINK_PARAM_ORDER.index(_LINK.match(c)["param"]))  # type: ignore[index]
    out = [*dotted, *([] if pool_commits else ["git_sha"]), *scenario_cols, *links]
    out += [c for c in SETTING_COLUMNS if c in df]
    known = set(out) | NOT_SETTINGS | {"git_sha", "status"}
    return out + [c for c in raw if c in df and c not in known and _constant_per_point(df, c)]


def _varying(df: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    return [c for c in cols if c in df and df[c].nunique(dropna=False) > 1]


def minimal_columns(df: pd.DataFrame, candidates: Sequence[str]) -> list[str]:
    """The fewest candidates, in order, that split df as finely as all of them do."""
    if df.empty or not candidates:
        return []
    target = df.groupby(list(candidates), dropna=False).ngroups
    chosen: list[str] = []
    current = 1
    for c in candidates:
        if current >= target:
            break
        n = df.groupby([*chosen, c], dropna=False).ngroups
        if n > current:
            chosen.append(c)
            current = n
    return chosen


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return "unlimited" if math.isnan(v) or math.isinf(v) else f"{v:g}"
    return str(v)


def setting_labels(df: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """'col=value, ...' per row ('-' without columns)."""
    if not columns:
        return pd.Series("-", index=df.index, dtype=str)
    return pd.Series(
        [
            ", ".join(f"{c}={_fmt_value(v)}" for c, v in zip(columns, row, strict=True))
            for row in df[list(columns)].itertuples(index=False)
        ],
        index=df.index,
        dtype=str,
    )


def _is_host(name: str, hosts: set[str]) -> bool:
    return name in hosts


def _related(columns: Iterable[str], links: set[str], params: set[str]) -> tuple[str, ...]:
    """Columns of `links`' parameters `params` (records and dotted scenario paths)."""
    out = []
    for c in columns:
        m = _LINK.match(c)
        if m and m["link"] in links and m["param"] in params:
            out.append(c)
            continue
        parts = c.split(".")
        if len(parts) >= 3 and parts[0] == "links" and parts[1] in links and parts[-1] in params:
            out.append(c)
    return tuple(out)


def _axes(df: pd.DataFrame, workers: list[str], hosts: set[str]) -> tuple[pd.DataFrame, list[Axis]]:
    """The bandwidth and RTT axes along which the included requests vary (module doc)."""
    inc = df[df["included"]]
    axes: list[Axis] = []
    links = _link_names(df.columns)
    bw_links = [
        n
        for n in links
        if any(
            f"{n}_{d}_bw_mbit" in inc and inc[f"{n}_{d}_bw_mbit"].nunique(dropna=False) > 1
            for d in ("up", "down")
        )
    ]
    new: dict[str, Any] = {}
    related_params = {"bw_mbit", "queue_pkts"}
    if len(bw_links) == 1:
        n = bw_links[0]
        col = f"{n}_bw_mbit"
        new[col] = np.minimum(
            _col(df, f"{n}_up_bw_mbit", np.inf), _col(df, f"{n}_down_bw_mbit", np.inf)
        )
        what = f"{n} access-link bandwidth" if _is_host(n, hosts) else f"{n} link bandwidth"
        axes.append(
            Axis(
                "bandwidth",
                col,
                f"{what} (Mbit/s)",
                (*_related(df.columns, {n}, related_params), col),
            )
        )
    elif bw_links:
        col = "bottleneck_bw_mbit"
        new[col] = np.min([_col(df, f"{w}_path_bw_up_mbit", np.inf) for w in workers], axis=0)
        axes.append(
            Axis(
                "bandwidth",
                col,
                "slowest worker's path bottleneck, worker → srv (Mbit/s)",
                (*_related(df.columns, set(bw_links), related_params), col),
            )
        )
    rtt_workers = [
        w for w in workers if f"{w}_path_rtt_ms" in inc and inc[f"{w}_path_rtt_ms"].nunique() > 1
    ]
    delay_links = {
        n
        for n in links
        if any(
            f"{n}_{d}_delay_ms" in inc and inc[f"{n}_{d}_delay_ms"].nunique(dropna=False) > 1
            for d in ("up", "down")
        )
    }
    related = _related(df.columns, delay_links, {"delay_ms", "queue_pkts"})
    if len(rtt_workers) == 1:
        w = rtt_workers[0]
        axes.append(
            Axis(
                "rtt",
                f"{w}_path_rtt_ms",
                f"{w}–srv path RTT, configured (ms)",
                (*related, f"{w}_path_rtt_ms"),
            )
        )
    elif rtt_workers:
        new["max_path_rtt_ms"] = np.max(
            [_col(df, f"{w}_path_rtt_ms", 0.0) for w in workers], axis=0
        )
        axes.append(
            Axis(
                "rtt",
                "max_path_rtt_ms",
                "farthest worker's path RTT to srv, configured (ms)",
                (*related, "max_path_rtt_ms", *(f"{w}_path_rtt_ms" for w in rtt_workers)),
            )
        )
    return df.assign(**new), axes


def load_results(
    paths: Sequence[str | Path] | str | Path,
    *,
    keep_warmup: bool = False,
    pool_commits: bool = False,
) -> Results:
    """Read run folders into tidy frames (module docstring). NotARunFolder if a path is not
    a run folder, or if no request was recorded."""
    if isinstance(paths, str | Path):
        paths = [paths]
    runs = [read_run(Path(p)) for p in paths]
    if not runs:
        raise NotARunFolder("no run folder given")
    _unique_labels(runs)
    notes: list[str] = []
    requests = _concat(runs, "requests")
    if requests.empty:
        raise NotARunFolder(
            "no request was recorded in "
            + ", ".join(str(r.path) for r in runs)
            + ": nothing to analyze"
        )
    requests = _fill_dotted(_normalize(requests), runs)
    raw_columns = list(requests.columns)
    scen = _scenario_columns(runs, set(requests.columns))
    for path, values in scen.items():
        requests[path] = _numeric(requests["run"].map(values))
    if "logp_mean" not in requests:
        requests["logp_mean"] = np.nan
    requests["logp_mean"] = pd.to_numeric(requests["logp_mean"], errors="coerce")
    requests["ok"] = requests["status"] == "ok"
    requests["included"] = requests["ok"] & (keep_warmup | ~requests["warmup"])
    rounds_raw = _concat(runs, "rounds")
    workers = sorted(set(rounds_raw["worker"].dropna())) if not rounds_raw.empty else []
    hosts = {*workers, "srv"}
    requests = _add_paths(requests, runs, workers)
    styles: dict[str, Style] = {}
    family_styles: dict[str, Style] = {}
    requests = _config_names(requests, styles, family_styles)
    inc = requests[requests["included"]]
    cands = _candidates(requests, list(scen), pool_commits, raw_columns)
    settings = _varying(inc if not inc.empty else requests, cands)
    label_columns = minimal_columns(inc if not inc.empty else requests, settings)
    requests["setting"] = setting_labels(requests, label_columns)
    requests, axes = _axes(requests, workers, hosts)
    commits = sorted(requests["git_sha"].unique())
    if len(commits) > 1:
        notes.append(
            (
                f"runs from {len(commits)} commits pooled (--pool-commits): "
                if pool_commits
                else f"runs from {len(commits)} commits kept apart (git_sha is a setting; "
                "--pool-commits pools them): "
            )
            + ", ".join(commits)
        )
    n_warm = int((requests["ok"] & requests["warmup"]).sum())
    if n_warm and not keep_warmup:
        notes.append(
            f"{n_warm} warm-up request(s) left out of the statistics (--keep-warmup keeps them)"
        )
    rounds = _rounds(rounds_raw, requests, notes)
    from analysis.tables import critical_path

    res = Results(
        runs=runs,
        requests=requests,
        rounds=rounds,
        round_times=pd.DataFrame(),
        settings=settings,
        label_columns=label_columns,
        hosts=sorted(hosts, key=lambda h: (h == "srv", h)),
        workers=workers,
        axes=axes,
        keep_warmup=keep_warmup,
        pool_commits=pool_commits,
        notes=notes,
        styles=styles,
        family_styles=family_styles,
    )
    res.round_times = critical_path(res)
    return res


#: A worker's own transmission in a round (per-worker settings): `worker_<name>` in rounds.
WORKER_OWN = (
    "transmission", "k", "epsilon", "value_dtype", "index_bytes", "index_coding",
    "reconstruction",
)  # fmt: skip


def _rounds(raw: pd.DataFrame, requests: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Each round row: its own columns (every rounds.csv column but the request's; the
    worker's transmission as worker_*) and every column of its request (configuration,
    settings, derived columns)."""
    if raw.empty:
        return raw
    r = _normalize(raw).rename(columns={c: f"worker_{c}" for c in WORKER_OWN})
    req = requests.drop(columns=[c for c in REQUEST_ONLY if c in requests])
    # the request's columns replace the round's copies (constants, ids, swept values)
    r = r.drop(columns=[c for c in req.columns if c in r and c not in ("run", "request_id")])
    r = r.merge(req, on=["run", "request_id"], how="left")
    orphan = r["config"].isna()
    if orphan.any():
        n = r.loc[orphan, ["run", "request_id"]].drop_duplicates().shape[0]
        notes.append(
            f"{n} request(s) have rounds but no requests.csv row (interrupted): their rounds "
            "are left out"
        )
        r = r[~orphan].copy()
    r["ok"] = r["ok"].astype(bool)
    r["included"] = r["included"].astype(bool)
    return r.reset_index(drop=True)
