"""Read a run folder's tables; the summary table `testbed run` prints at the end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from specfed import records

KEYS = ["transmission", "k", "epsilon", "value_dtype", "reconstruction", "gamma", "temperature"]


def load_requests(run_dir: Path) -> pd.DataFrame:
    """The requests table of a run (empty frame if none was written)."""
    path = Path(run_dir) / "requests.csv"
    return pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame()


def summary_table(run_dir: Path) -> str:
    """Mean over prompts and repetitions per per-request configuration and link setting."""
    df = load_requests(run_dir)
    if df.empty:
        return "(no request finished)"
    ok = df[df["status"] == "ok"]
    varying = [
        c
        for c in df.columns
        if (c.endswith(("_bw_mbit", "_delay_ms", "_loss_pct", "_jitter_ms")) or "." in c)
        and ok[c].nunique() > 1
    ]  # link parameters and swept scenario paths that differ between points
    by = [c for c in KEYS if c in ok and ok[c].notna().any()] + varying
    text = records.summary_table(ok, by)
    failed = len(df) - len(ok)
    return text + (f"\n{failed} request(s) failed: see events.jsonl" if failed else "")
