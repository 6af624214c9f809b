"""The whole study, and its command line: record -> grid -> one run folder of result files.

    python -m specfed.study scenarios/paper_fig23.yaml [--out DIR] [--prompts N]
                            [--positions N] [--cache DIR] [--threads N] [--report]

writes results/<study name>/<utc>/ (or --out): fig23_summary.csv (one row per T, K,
reconstruction), fig23_positions.csv.gz (one row per position and grid cell), meta.json,
study.yaml (the resolved study) and continuations.jsonl (`specfed.study.outputs`). The figures
and report.md are drawn from those files by the analysis side, `python -m analysis.paper
RUN_DIR`; `--report` runs that command at the end (a separate process: specfed never imports
analysis), otherwise the command is printed.

Exit status: 0 ok, 1 a bound that must hold was violated (a bug), 2 bad input (the message
names the file and the field), or the status of `analysis.paper` if `--report` failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from specfed.config import ConfigError
from specfed.provenance import git_state, versions
from specfed.study.config import StudyConfig, load_study
from specfed.study.grid import evaluate, k_for_fraction, summarize
from specfed.study.outputs import (
    ABS_TOL,
    CONTINUATIONS_JSONL,
    CORRECT_BOUNDS,
    META_JSON,
    POSITIONS_CSV,
    STUDY_YAML,
    SUMMARY_CSV,
    frac_label,
)
from specfed.study.record import PromptLogits, default_cache_dir, record_logits

__all__ = ["StudyResult", "build_meta", "main", "run_study", "write_run_folder"]

ANALYSIS_COMMAND = ("-m", "analysis.paper")
"""How the figures and report.md are drawn from a run folder: python -m analysis.paper RUN_DIR."""


@dataclass
class StudyResult:
    """What `run_study` produced.

    Attributes:
        out: the run folder.
        summary: the summary table (also fig23_summary.csv).
        positions: the positions table (also fig23_positions.csv.gz).
        meta: meta.json's content.
        files: every file written.
    """

    out: Path
    summary: pd.DataFrame
    positions: pd.DataFrame
    meta: dict[str, Any]
    files: list[Path]

    @property
    def correct_bound_violations(self) -> int:
        """Violations of the bounds that must hold (should be 0)."""
        return int(sum(self.summary[f"n_viol_{n}"].sum() for n in CORRECT_BOUNDS))


def build_meta(
    cfg: StudyConfig,
    records: Sequence[PromptLogits],
    vocab_size: int,
    record_info: dict[str, Any],
    started_utc: str,
) -> dict[str, Any]:
    """meta.json's content (without "timing"): the resolved config, |V|, prompt and position
    counts, K per K/|V|, the record step's info (cache hits, times), git state, versions."""
    per_prompt = [r.n_positions for r in records]
    return {
        "study": "paper-fig23",
        "started_utc": started_utc,
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "vocab_size": int(vocab_size),
        "n_prompts": len(records),
        "n_positions": int(sum(per_prompt)),
        "positions_per_prompt": (
            str(per_prompt[0])
            if len(set(per_prompt)) == 1
            else f"{min(per_prompt)}-{max(per_prompt)}"
        ),
        "positions_per_prompt_min": int(min(per_prompt)),
        "k": {frac_label(f): k_for_fraction(f, int(vocab_size)) for f in cfg.k_fractions},
        "record": record_info,
        "git": git_state(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "abs_tol": ABS_TOL,
    }


def write_run_folder(
    out: Path,
    cfg: StudyConfig,
    records: Sequence[PromptLogits],
    summary: pd.DataFrame,
    positions: pd.DataFrame,
    meta: dict[str, Any],
) -> list[Path]:
    """Write the run folder's files (`specfed.study.outputs`); meta.json last.

    Returns:
        The paths written: study.yaml, continuations.jsonl, the summary and positions CSV,
        meta.json.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_YAML).write_text(
        f"# resolved from {cfg.source}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        encoding="utf-8",
    )
    with (out / CONTINUATIONS_JSONL).open("w", encoding="utf-8") as fh:
        for r in records:
            row = {
                "prompt_id": r.prompt_id,
                "prompt_tokens": len(r.prompt_tokens),
                "n_positions": r.n_positions,
                "tokens": r.tokens.tolist(),
                "text": r.text,
            }
            fh.write(json.dumps(row) + "\n")
    summary.to_csv(out / SUMMARY_CSV, index=False)
    positions.to_csv(out / POSITIONS_CSV, index=False)
    (out / META_JSON).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return [out / f for f in (STUDY_YAML, CONTINUATIONS_JSONL, SUMMARY_CSV, POSITIONS_CSV)] + [
        out / META_JSON
    ]


def run_study(
    cfg: StudyConfig,
    out: Path,
    cache: Path | None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Record (or load) the logits, run the grid, write the run folder `out`.

    Args:
        cfg: the study.
        out: the run folder (created only once there is something to write).
        cache: the logits cache folder (None: no cache).
        progress: show the grid's progress bar (stderr).
        log: progress lines.

    Raises:
        ConfigError: the prompt source holds fewer prompts than asked.
        specfed.prompts.PromptError, specfed.models.ModelError: a prompt or model spec that
            cannot be loaded.
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    records, rec_info = record_logits(cfg, cache, log=log)
    t_record = time.perf_counter() - t0
    log(f"recorded {len(records)} prompts in {t_record:.1f} s; running the grid")
    t1 = time.perf_counter()
    positions = evaluate(records, cfg, progress=progress)
    summary = summarize(positions)
    t_grid = time.perf_counter() - t1
    meta = build_meta(cfg, records, int(positions.attrs["vocab_size"]), rec_info, started)
    meta["timing"] = {
        "record_s": round(t_record, 2),
        "grid_s": round(t_grid, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    files = write_run_folder(out, cfg, records, summary, positions, meta)
    return StudyResult(out=out, summary=summary, positions=positions, meta=meta, files=files)


def analysis_command(run_dir: Path) -> list[str]:
    """The command that draws the figures and report.md of a run folder."""
    return [sys.executable, *ANALYSIS_COMMAND, str(run_dir)]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m specfed.study",
        description=(
            "The paper's Fig. 2 (aggregation bias ||p - p_hat||_1) and Fig. 3 (acceptance-rate\n"
            "bias |alpha(q, p) - alpha(q, p_hat)|) on real models: record the workers' and the\n"
            "draft's logits along real generations (cached), then sweep temperature T x payload\n"
            "K/|V| x reconstruction through the real top-K codec, checking Theorem 2 and\n"
            "Theorem 3 (with and without the 1/2) at every position. Writes a run folder: a\n"
            "summary CSV, a per-position CSV, meta.json, study.yaml, continuations.jsonl\n"
            "(docs/paper-figures.md). The figures and report.md come from\n"
            "`python -m analysis.paper RUN_DIR` (or --report)."
        ),
        epilog=(
            "examples:\n"
            "  python -m specfed.study scenarios/paper_fig23.yaml --report\n"
            "  python -m specfed.study scenarios/paper_fig23.yaml --prompts 2 --positions 8\n"
            "  python -m analysis.paper results/paper-fig23/<utc>/   # figures + report.md\n"
            "exit status: 0 ok, 1 a bound that must hold was violated (a bug), 2 bad input,\n"
            "or analysis.paper's status if --report failed"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    ap.add_argument("study", type=Path, help="study file (scenarios/paper_fig23.yaml)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: results/<study name>/<utc>/)",
    )
    ap.add_argument("--prompts", type=int, default=None, help="override prompts.count")
    ap.add_argument("--positions", type=int, default=None, help="override positions per prompt")
    ap.add_argument("--threads", type=int, default=None, help="override models.threads")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="logits cache folder (default: $SPECFED_CACHE/paper-fig23, ~/.cache/specfed/...)",
    )
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ap.add_argument(
        "--report",
        action="store_true",
        help="then draw the figures and report.md (runs python -m analysis.paper RUN_DIR)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (`python -m specfed.study`).

    Returns:
        0 on success, 1 if a bound that must hold was violated, 2 on bad input, or the
        status of the analysis command if --report failed.
    """
    args = _parser().parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    from specfed.models import ModelError
    from specfed.prompts import PromptError

    try:
        cfg = load_study(args.study)
        overrides = {
            "n_prompts": args.prompts,
            "positions": args.positions,
            "threads": args.threads,
        }
        changes = {k: v for k, v in overrides.items() if v is not None}
        if changes:
            cfg = cfg.replace(**changes)
        out = args.out or Path("results") / cfg.name / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        cache = None if args.no_cache else (args.cache or default_cache_dir())
        result = run_study(cfg, out, cache, progress=not args.quiet, log=log)
    except (ConfigError, PromptError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"wrote {len(result.files)} files to {out}")
    print(out)
    rc = 0
    if result.correct_bound_violations:
        print(
            f"error: {result.correct_bound_violations} violations of bounds that must hold "
            f"(see {out / SUMMARY_CSV}): a bug",
            file=sys.stderr,
        )
        rc = 1
    cmd = analysis_command(out)
    if not args.report:
        print(
            f"figures and report: {shlex.join(['python', *cmd[1:]])}",
            file=sys.stderr,
        )
        return rc
    done = subprocess.run(cmd, check=False)
    if done.returncode:
        print(f"error: {shlex.join(cmd)} failed (exit {done.returncode})", file=sys.stderr)
        return rc or done.returncode
    return rc
