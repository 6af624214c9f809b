"""Append-only CSV tables, written row by row so a crash keeps everything before it.

The rounds table has one row per (request, round, worker); the requests table one row per
request. Columns are fixed when a table is created (the header); every row is flushed and
fsync'ed before the next round starts, so a SIGKILL loses at most the round in flight.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pandas as pd
from tabulate import tabulate

#: The policies of a point (specfed.policies.policy_columns): how gamma is chosen, the K
#: policy with its budget / range / source, the aggregation rule with its quorum or deadline.
POLICY_COLUMNS = (
    "gamma_policy", "gamma_min", "gamma_max", "k_policy", "k_budget_ms", "k_min", "k_max",
    "k_source", "aggregation", "quorum", "deadline_ms",
)  # fmt: skip
#: Every parameter of a point is a column of both tables (specfed.points.Point.columns),
#: with the vocabulary size and the warm-up flag; rounds rows carry the worker's own
#: transmission (per-worker settings; with k: auto the K of that worker and round), the
#: index width actually sent, and the round's gamma (an adaptive policy's choice).
POINT_COLUMNS = (
    "transmission", "k", "epsilon", "value_dtype", "index_bytes", "index_coding",
    "reconstruction", "gamma", "temperature", "vocab_size", *POLICY_COLUMNS,
)  # fmt: skip
ROUND_COLUMNS = (
    "run_id", "point", "rep", "request_id", "prompt_id", "warmup", "round", "t_start_s",
    "worker",
    *POINT_COLUMNS, "compute_mode", "context_len", "draft_new_tokens", "n_drafted",
    "n_accepted", "n_emitted", "n_tokens", "bytes_up", "bytes_down", "t_draft_ms",
    "t_draft_emulated_ms", "t_draft_recorded_ms", "t_send_ms", "t_worker_ms",
    "t_worker_recorded_ms", "t_fidelity_ms", "t_net_ms", "t_call_ms", "t_decode_ms", "t_verify_ms",
    "t_aggregate_ms", "t_round_ms", "alpha", "eps_mean", "local_l1", "k_mean", "n_busy",
    "dropped", "lateness_ms", "up_mbit_est",
)  # fmt: skip
REQUEST_COLUMNS = (
    "run_id", "point", "rep", "request_id", "prompt_id", "warmup", *POINT_COLUMNS,
    "compute_mode", "seed",
    "status", "prompt_tokens", "new_tokens",
    "rounds", "ttft_ms", "e2e_ms", "ms_per_token", "acceptance", "tokens_per_round",
    "bytes_up_total", "bytes_per_token", "logp_mean", "dropped_replies", "busy_skips",
    "events", "tokens",
)  # fmt: skip


class RecordsError(RuntimeError):
    """A table cannot be appended to (its header differs from the columns to write)."""


def _fsync(fh: IO[str]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


class EventLog:
    """events.jsonl: one JSON object per line, flushed and fsync'ed like the tables."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, event: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(dict(event), default=str) + "\n")
        _fsync(self._fh)

    def close(self) -> None:
        self._fh.close()


class Table:
    """A CSV file with a fixed header; `append` writes and flushes one row.

    Extra constant columns (`tags`, e.g. the link parameters the testbed knows) are added
    to every row after the standard columns.
    """

    def __init__(self, path: Path, columns: Sequence[str], tags: Mapping[str, Any] | None = None):
        self.path = path
        self.tags = dict(tags or {})
        self.columns = [*columns, *(k for k in self.tags if k not in columns)]
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != self.columns:
                raise RecordsError(
                    f"{path} exists with other columns ({len(header)} vs {len(self.columns)}: "
                    f"{_column_diff(header, self.columns)}); write to a new folder (--out)"
                )
        self._fh = path.open("a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self._writer.writeheader()
            self._sync()

    def append(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({**self.tags, **{k: _cell(v) for k, v in row.items()}})
        self._sync()

    def _sync(self) -> None:
        _fsync(self._fh)

    def close(self) -> None:
        self._fh.close()


def _column_diff(old: Sequence[str], new: Sequence[str]) -> str:
    gone = [c for c in old if c not in new]
    added = [c for c in new if c not in old]
    if not gone and not added:
        return "same columns in another order"
    return "; ".join(
        x
        for x in (f"only in the file: {gone}" if gone else "", f"new: {added}" if added else "")
        if x
    )


def _cell(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return v


def summary_table(requests: pd.DataFrame, by: Sequence[str]) -> str:
    """Per-configuration means of the requests table (ms per token, ttft in ms, acceptance,
    tokens per round, bytes per token), grouped by the columns `by`, as a markdown table."""
    table = (
        requests.groupby(list(by), dropna=False, sort=False)
        .agg(
            requests=("request_id", "count"),
            ms_per_token=("ms_per_token", "mean"),
            ttft_ms=("ttft_ms", "mean"),
            acceptance=("acceptance", "mean"),
            tokens_per_round=("tokens_per_round", "mean"),
            bytes_per_token=("bytes_per_token", "mean"),
        )
        .reset_index()
    )
    return tabulate(table, headers="keys", floatfmt=".4g", tablefmt="github", showindex=False)
