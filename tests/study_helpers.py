"""Helpers shared by the study's tests (tests/test_study_*.py) and the analysis side's
(tests/test_paper.py): synthetic logits and records, the tiny-model study file, the report's
mean-bias table parsed back into numbers.

Notation: p_i worker distributions, w_i weights, q draft, K kept entries, eps_i = 1 - rho_i.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from specfed.study.config import StudyConfig, study_from_dict
from specfed.study.grid import Targets
from specfed.study.record import PromptLogits, logits_to_numpy

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "scenarios" / "paper_fig23.yaml"


def logits(c: int, v: int, seed: int, scale: float) -> torch.Tensor:
    """[c, v] float32 logits with heavy tails, so top-K leaves eps from ~0 to ~1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, v, generator=g) * scale


def targets(n_workers: int = 2, c: int = 12, v: int = 3000, temperature: float = 1.0) -> Targets:
    l_i = [logits(c, v, seed=10 + i, scale=3.0 + i) for i in range(n_workers)]
    l_q = logits(c, v, seed=99, scale=3.5)
    w = np.full(n_workers, 1.0 / n_workers)
    return Targets.from_logits(l_i, w, l_q, temperature)


def synthetic_records(n_prompts: int = 2, n: int = 7, v: int = 500) -> list[PromptLogits]:
    """Records of models "d" (the draft), "a" and "b" (the workers), bf16 logits."""
    recs = []
    for j in range(n_prompts):
        lg = {
            m: logits_to_numpy(logits(n, v, seed=100 * j + s, scale=4.0).bfloat16())
            for s, m in enumerate(("d", "a", "b"))
        }
        recs.append(PromptLogits(f"p{j}", np.arange(5), np.arange(n), lg))
    return recs


def synthetic_cfg(**changes: Any) -> StudyConfig:
    """Two workers w1 = "a", w2 = "b" (w = 0.3, 0.7), draft "d"; 2 T x 3 K x 3 methods."""
    cfg = study_from_dict(
        {
            "name": "synthetic",
            "seed": 0,
            "models": {
                "draft": "d",
                "workers": {"w1": "a", "w2": "b"},
                "weights": {"w1": 0.3, "w2": 0.7},
            },
            "study": {"temperatures": [0.8, 1.2], "k_fractions": [0.002, 0.02, 1.0]},
        }
    )
    return cfg.replace(**changes) if changes else cfg


def tiny_study(tmp_path: Path) -> Path:
    """The shipped study file on tiny random-weight models: 2 prompts x 5 positions, V = 2048."""
    prompts = tmp_path / "prompts.jsonl"
    lines = []
    for i in range(2):
        text = " ".join(f"t{(7 * i + j) % 997}" for j in range(5))
        lines.append(json.dumps({"id": f"tiny/{i}", "prompt": text}))
    prompts.write_text("\n".join(lines))
    data = yaml.safe_load(STUDY.read_text())
    data["models"] = {
        "draft": "tiny-v2048-s1",
        "workers": {"w1": "tiny-v2048-s2", "w2": "tiny-v2048-s1"},  # w2 shares the draft
        "weights": {"w1": 0.5, "w2": 0.5},
        "dtype": "bf16",
        "threads": 1,
    }
    data["prompts"] = {"source": str(prompts), "count": 2}
    data["positions"] = 5
    data["study"]["k_fractions"] = [0.001, 0.01, 0.1, 1.0]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def report_table(text: str) -> pd.DataFrame:
    """The report's mean-bias table, parsed back into numbers."""
    rows = []
    section = text.split("## Mean biases", 1)[1].split("## Files", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or not re.fullmatch(r"[0-9.]+", cells[0]):
            continue
        rows.append(
            {
                "temperature": float(cells[0]),
                "k": int(cells[1]),
                "reconstruction": cells[3],
                "l1_mean": float(cells[4]),
                "bound_l1_mean": float(cells[5]),
                "dalpha_mean": float(cells[6]),
                "bound_alpha_mean": float(cells[7]),
                "n_viol_printed_thm3": int(cells[8].split("/")[0]),
            }
        )
    return pd.DataFrame(rows)


def assert_report_matches_summary(text: str, summary: pd.DataFrame) -> None:
    """Every number of the report's mean-bias table equals the summary CSV's (3 digits)."""
    table = report_table(text)
    assert len(table) == len(summary)
    merged = table.merge(summary, on=["temperature", "k", "reconstruction"], suffixes=("", "_csv"))
    assert len(merged) == len(summary)
    for col in ("l1_mean", "bound_l1_mean", "dalpha_mean", "bound_alpha_mean"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_csv"], rtol=1e-3, atol=0)
    assert (merged["n_viol_printed_thm3"] == merged["n_viol_printed_thm3_csv"]).all()
    n_printed = int(summary["n_viol_printed_thm3"].sum())
    assert f"violated at {n_printed} of {int(summary['n_positions'].sum())} position" in text
