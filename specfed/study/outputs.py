"""What a study run leaves behind: the run folder's file names and the vocabulary of its tables.

The contract between `specfed.study` (which writes a run folder) and `analysis.paper` (which
reads it to draw the figures and the report): file names, the grid's keys, the checks behind
the `viol_*` / `n_viol_*` columns and the tolerances they were made with. Pure constants and
formatting, no torch, so the analysis side can import it.

Notation (the paper's): p_i worker i's distribution, w_i its weight, p = sum_i w_i p_i, q the
draft's, p_hat the reconstruction, eps_i = 1 - (mass of p_i kept), alpha(q, p) =
sum_v min(q(v), p(v)).
"""

from __future__ import annotations

__all__ = [
    "ABS_TOL",
    "CONTINUATIONS_JSONL",
    "CORRECT_BOUNDS",
    "GROUP_KEYS",
    "META_JSON",
    "POSITIONS_CSV",
    "RESOLVED_FACTOR",
    "STUDY_YAML",
    "SUMMARY_CSV",
    "SUMMARY_METRICS",
    "VIOLATIONS",
    "frac_label",
]

SUMMARY_CSV = "fig23_summary.csv"
"""One row per (T, K, reconstruction): `specfed.study.grid.summarize`."""
POSITIONS_CSV = "fig23_positions.csv.gz"
"""One row per (prompt, position, T, K, reconstruction): `specfed.study.grid.evaluate`."""
META_JSON = "meta.json"
"""The resolved config, sizes (|V|, prompts, positions, K values), git state, versions, timing."""
STUDY_YAML = "study.yaml"
"""The resolved study file (every default filled in)."""
CONTINUATIONS_JSONL = "continuations.jsonl"
"""Per prompt: the generated continuation's tokens and text."""

ABS_TOL = 1e-9
"""Absolute tolerance (on top of the float32 slack) before a bound counts as violated: float64
sums over |V| = 151,936 terms carry errors of order 1e-11."""

RESOLVED_FACTOR = 1000.0
"""A position is *resolved* when sum_i w_i eps_i > RESOLVED_FACTOR (slack + ABS_TOL): rounding
can then move a ratio to the bound by at most 0.1 %. Ratio statistics use resolved positions."""

GROUP_KEYS = ["temperature", "k", "k_frac", "reconstruction"]
"""The grid: one summary row per combination."""

SUMMARY_METRICS = ("l1", "bound_l1", "dalpha", "bound_alpha", "l1_workers")
"""Metrics summarized by mean, sd and max (per-position columns of the positions table)."""

VIOLATIONS: dict[str, str] = {
    "lemma1": "||p_i - p_hat_i||_1 <= 2 eps_i for every worker i (Lemma 1)",
    "thm2_step": "||p - p_hat||_1 <= sum_i w_i ||p_i - p_hat_i||_1 (Theorem 2, first step)",
    "thm2": "||p - p_hat||_1 <= 2 sum_i w_i eps_i (Theorem 2)",
    "half_step": "|alpha(q, p) - alpha(q, p_hat)| <= 1/2 ||p - p_hat||_1 (Theorem 3, 1st step)",
    "thm3": "|alpha(q, p) - alpha(q, p_hat)| <= sum_i w_i eps_i (Theorem 3)",
    "printed_thm3": "||p - p_hat||_1 <= sum_i w_i eps_i (the printed Theorem 3's middle step)",
}
"""Violation flags (positions table: viol_<name>; summary: n_viol_<name>) -> what they check.
Only "printed_thm3" may be non-zero."""

CORRECT_BOUNDS = ("lemma1", "thm2_step", "thm2", "half_step", "thm3")
"""Bounds that must hold at every position; a violation of any of them is a bug."""


def frac_label(frac: float) -> str:
    """K/|V| as a percentage: 0.0001 -> "0.01%"."""
    return f"{frac * 100:g}%"
