"""Read run folders (`testbed run` output) as they are: one `Run` per folder, nothing derived.

A run folder is results/<scenario>/<utc>-<sha>/ with:

    requests.csv      one row per request: specfed.records.REQUEST_COLUMNS, then constant
                      columns: link_backend, every link's parameters
                      ({host}_{up|down}_{bw_mbit|delay_ms|jitter_ms|loss_pct|queue_pkts} for an
                      access link, up = host -> switch; {a}-{b}_{up|down}_... for any other
                      link) and every swept scenario path that is not a per-request option,
                      by its dotted name (`links.e1-s0.bw_mbit`, `decoding.max_new_tokens`)
    rounds.csv        one row per (request, round, worker): specfed.records.ROUND_COLUMNS
                      (the worker's own transmission columns) and the same constant columns
    meta.json         git {sha, short, dirty}, versions, kernel, link backend, and per network
                      group: its points, repetition, links (the topology's edges) and link
                      calibration
    points.csv        point, rep, values (JSON of the swept dotted paths)       [optional]
    scenario.yaml     the resolved scenario                                     [optional]
    server-g<N>.json  each server group's command line and model information    [optional]

Every point parameter is read from the tables' columns; points.csv and scenario.yaml only
describe the run (what was swept, run-level constants such as the models).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from specfed.records import POINT_COLUMNS, POLICY_COLUMNS

__all__ = [
    "LINK_COLUMN",
    "REQUIRED_FILES",
    "NotARunFolder",
    "Run",
    "check_run_folder",
    "flatten",
    "git_label",
    "link_name",
    "read_run",
    "worker_path",
]

REQUIRED_FILES = ("requests.csv", "rounds.csv", "meta.json")
#: Point columns added after runs were first written: absent means their default
#: (index_coding: fixed-width indices; the policies: fixed gamma and K, wait for all).
_LATER_POINT_COLUMNS = ("index_coding", *POLICY_COLUMNS)
_POINT = tuple(c for c in POINT_COLUMNS if c not in _LATER_POINT_COLUMNS)
#: Columns a requests.csv must hold to be analysed (logp_mean, events and tokens are optional).
REQUIRED_REQUEST_COLUMNS = (
    "run_id", "point", "rep", "request_id", "prompt_id", "warmup", *_POINT, "seed",
    "status", "new_tokens", "rounds", "ttft_ms", "e2e_ms", "ms_per_token", "acceptance",
    "tokens_per_round", "bytes_up_total", "bytes_per_token",
)  # fmt: skip
REQUIRED_ROUND_COLUMNS = (
    "run_id", "point", "rep", "request_id", "prompt_id", "round", "worker", *_POINT,
    "n_drafted", "n_accepted", "n_emitted", "bytes_up", "bytes_down", "t_draft_ms",
    "t_worker_ms", "t_net_ms", "t_call_ms", "t_verify_ms", "t_aggregate_ms", "t_round_ms",
    "eps_mean", "k_mean",
)  # fmt: skip
#: A link-parameter column: `{link}_{up|down}_{param}`.
LINK_COLUMN = (
    r"^(?P<link>.+)_(?P<dir>up|down)_(?P<param>bw_mbit|delay_ms|jitter_ms|loss_pct|queue_pkts)$"
)
_STRINGS = (
    "run_id", "request_id", "prompt_id", "transmission", "reconstruction", "value_dtype",
    "status", "events", "tokens", "worker", "link_backend",
)  # fmt: skip


class NotARunFolder(ValueError):
    """A path given as a run folder is not one (or not one this analysis can read); the
    message names it and what is wrong."""


@dataclass
class Run:
    """One run folder, as read (tables untouched but for dtypes)."""

    path: Path
    label: str
    meta: dict[str, Any]
    scenario: dict[str, Any]
    servers: list[dict[str, Any]]
    points: pd.DataFrame
    requests: pd.DataFrame
    rounds: pd.DataFrame

    @property
    def git(self) -> str:
        """The run's commit as `git_label` writes it."""
        return git_label(self.meta)

    @property
    def swept(self) -> list[str]:
        """The dotted paths the run sweeps (points.csv), in order."""
        keys: dict[str, None] = {}
        for values in self.points.get("values", []):
            if isinstance(values, str) and values:
                keys.update(dict.fromkeys(json.loads(values)))
        return list(keys)


def git_label(meta: Mapping[str, Any]) -> str:
    """A run's commit: the short sha, with `-dirty` if tracked files differed from it."""
    git = meta.get("git") or {}
    short = str(git.get("short") or str(git.get("sha", "unknown"))[:8])
    return f"{short}-dirty" if git.get("dirty") else short


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


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    if path.stat().st_size == 0:
        return pd.DataFrame(columns=list(required))
    head = pd.read_csv(path, nrows=0).columns
    missing = [c for c in required if c not in head]
    if missing:
        raise NotARunFolder(
            f"{path} lacks the columns {', '.join(missing)}: it was written by an older "
            "testbed (before complete records); rerun the scenario with this version"
        )
    df = pd.read_csv(path, dtype={c: "str" for c in _STRINGS if c in head})
    if "warmup" in df:
        df["warmup"] = df["warmup"].map(_bool).astype(bool)
    return df


def _bool(x: Any) -> bool:
    return str(x).strip().lower() in ("true", "1", "yes")


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
    servers = [
        json.loads(p.read_text(encoding="utf-8")) for p in sorted(path.glob("server-g*.json"))
    ]
    points = pd.DataFrame(columns=["point", "rep", "values"])
    if (path / "points.csv").is_file() and (path / "points.csv").stat().st_size:
        points = pd.read_csv(path / "points.csv", dtype={"values": "str"})
    return Run(
        path=path,
        label=label or path.name,
        meta=meta,
        scenario=scenario,
        servers=servers,
        points=points,
        requests=_read_csv(path / "requests.csv", REQUIRED_REQUEST_COLUMNS),
        rounds=_read_csv(path / "rounds.csv", REQUIRED_ROUND_COLUMNS),
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- topology


def link_name(a: str, b: str, hosts: set[str]) -> tuple[str, str]:
    """The column name of link (a, b) and the node its `up` direction leaves from.

    As the testbed names them: a host's access link by the host (up = host -> switch), any
    other link `a-b` (up = a -> b)."""
    if a in hosts or b in hosts:
        host = a if a in hosts else b
        return host, host
    return f"{a}-{b}", a


def worker_path(
    edges: Iterable[tuple[str, str]], worker: str, hosts: set[str], server: str = "srv"
) -> list[tuple[str, bool]]:
    """The links from `worker` to `server` as (column name, True if crossed in its `up`
    direction), by breadth-first search over the topology's edges; [] if not connected."""
    adj: dict[str, list[tuple[str, str, str]]] = {}
    for a, b in edges:
        name, up_from = link_name(a, b, hosts)
        adj.setdefault(a, []).append((b, name, up_from))
        adj.setdefault(b, []).append((a, name, up_from))
    prev: dict[str, tuple[str, str, bool]] = {}
    seen, todo = {worker}, deque([worker])
    while todo:
        node = todo.popleft()
        if node == server:
            break
        for nxt, name, up_from in adj.get(node, []):
            if nxt not in seen:
                seen.add(nxt)
                prev[nxt] = (node, name, node == up_from)
                todo.append(nxt)
    if server not in seen:
        return []
    hops: list[tuple[str, bool]] = []
    node = server
    while node != worker:
        before, name, up = prev[node]
        hops.append((name, up))
        node = before
    return hops[::-1]
