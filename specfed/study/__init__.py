"""The distribution-level study of the paper's Fig. 2 and Fig. 3, on real models.

    python -m specfed.study scenarios/paper_fig23.yaml      # -> results/paper-fig23/<utc>/
    python -m analysis.paper results/paper-fig23/<utc>/     # figures + report.md from its files

Modules, in the order the study runs:

    config   the study file's schema (pydantic) -> StudyConfig; load_study (no torch)
    record   step 1: one continuation per prompt and every model's logits along it (cached)
    grid     step 2: T x K x reconstruction through the real codec; bounds; summary (numbers)
    run      the whole study -> one run folder; the command line
    outputs  the run folder's file names and table vocabulary, shared with analysis.paper

`load_study`, `study_from_dict` and `StudyConfig` import without torch (`testbed validate`
uses them); `run_study` and `StudyResult` load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from specfed.study.config import StudyConfig, load_study, study_from_dict

if TYPE_CHECKING:
    from specfed.study.run import StudyResult, run_study

__all__ = ["StudyConfig", "StudyResult", "load_study", "run_study", "study_from_dict"]


def __getattr__(name: str) -> Any:
    """run_study / StudyResult on first use, so that importing the config stays light."""
    if name in ("run_study", "StudyResult"):
        from specfed.study import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
