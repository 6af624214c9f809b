"""Analysis of SpecFed testbed runs: run folders -> tidy pandas frames -> tables, seaborn
plots and a markdown report (Pantheon's analyze -> plot -> report in one command).

    analysis report results/<scenario>/<run>/ [more runs] [--out DIR]
    analysis compare RUN_A RUN_B [--out DIR]
    analysis paper RUN_DIR      (figures + report of a `python -m specfed.study` run)

In Python (notebooks): `analysis.load(RUN_DIR, ...)` returns the tidy frames (`Results`:
requests, rounds, round_times, and `tables()` for every exported table); docs/analysis.md.

Modules: runs (read run folders), frames (tidy frames, every parameter a column), stats
(intervals), styles (the configuration registry: name, colour, marker), tables (every
number), plots (the figures), report (report.md / compare.md), cli; paper, paper_figures,
paper_report: Fig. 2 / Fig. 3 and report.md of a study run folder. Separate from specfed
and testbed: it reads only the files a run leaves behind (and imports specfed's byte
formulas and option types, never its models).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from analysis.frames import Results

__all__ = ["load"]


def load(
    runs: str | Path | Sequence[str | Path],
    *,
    keep_warmup: bool = False,
    pool_commits: bool = False,
) -> Results:
    """Read one or several run folders into tidy frames.

    Args:
        runs: a run folder (results/<scenario>/<utc>-<sha>/) or a list of them.
        keep_warmup: keep the warm-up requests (the first request each set of worker
            processes served) in the statistics; by default they are left out.
        pool_commits: pool runs from different git commits; by default the commit
            (`git_sha`) is a setting, so their results are kept apart.

    Returns:
        `analysis.frames.Results`: `.requests` (one row per request), `.rounds` (one row per
        request, round and worker), `.round_times` (one row per round: the critical-path
        breakdown and lower bound), `.keys` (what statistics group by), `.settings`,
        `.notes`, and `.tables()`: every table `analysis report` exports, by name.

    Raises:
        analysis.runs.NotARunFolder: a path is not a run folder this version can read.
    """
    from analysis.frames import load_results

    return load_results(runs, keep_warmup=keep_warmup, pool_commits=pool_commits)
