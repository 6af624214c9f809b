"""Step 2 of the study: the grid T x K x reconstruction over the recorded logits (numbers only).

For every T, K and reconstruction: p_i = softmax(l_i / T), q = softmax(l_q / T); each p_i goes
through the real top-K codec (fp32 values) and back, is reconstructed
(`specfed.reconstruct.reconstruct`, dense float64) and aggregated. Per position:
||p - p_hat||_1 against Theorem 2's 2 sum_i w_i eps_i, |alpha(q, p) - alpha(q, p_hat)|
against Theorem 3's sum_i w_i eps_i, and the checks of every step of both chains
(`specfed.study.outputs.VIOLATIONS`), among them the printed Theorem 3's middle step
||p - p_hat||_1 <= sum_i w_i eps_i (false as printed; the correct one has the 1/2).

Bound checks allow the float32 normalization defect of the inputs: a worker's fp32 softmax
sums to 1 only within rounding, and each bound moves by at most
slack = sum_i w_i |1 - sum_v p_i(v)|, so a step counts as violated only where it fails by
more than slack + ABS_TOL.

Notation (the paper's, arXiv 2604.25777, and Leviathan et al.'s): p_i worker i's target
distribution, w_i its weight, p = sum_i w_i p_i, q the draft's distribution, T the
temperature, V the vocabulary (|V| its size), K the entries a top-K payload keeps per position,
rho_i the kept mass, eps_i = 1 - rho_i, p_hat_i the reconstruction of p_i and
p_hat = sum_i w_i p_hat_i, alpha(q, p) = sum_v min(q(v), p(v)).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from specfed.codecs import Payload, decode_any, make_codec
from specfed.metrics import alpha, l1, theorem2_bound, theorem3_bound
from specfed.models import probabilities
from specfed.reconstruct import reconstruct
from specfed.study.config import SOFTMAX_PRECISIONS, StudyConfig
from specfed.study.outputs import (
    ABS_TOL,
    GROUP_KEYS,
    RESOLVED_FACTOR,
    SUMMARY_METRICS,
    VIOLATIONS,
    frac_label,
)
from specfed.study.record import PromptLogits

__all__ = ["Targets", "evaluate", "k_for_fraction", "softmax", "summarize"]


def k_for_fraction(frac: float, vocab_size: int) -> int:
    """K = round(frac |V|) (halves up), at least 1 and at most |V|."""
    return int(min(vocab_size, max(1, math.floor(frac * vocab_size + 0.5))))


def softmax(logits: torch.Tensor, temperature: float, precision: str = "fp64") -> np.ndarray:
    """softmax(logits / T) as float32 [C, V] (see `specfed.study.config.SOFTMAX_PRECISIONS`).

    Args:
        logits: [C, V] in any float dtype (bf16 logits are exact in both precisions).
        temperature: T > 0.
        precision: "fp64" (`specfed.models.probabilities`, the testbed workers' computation:
            float64, rounded once to float32) or "fp32" (torch's float32 softmax).
    """
    if precision == "fp64":
        return probabilities(logits, temperature)
    if precision != "fp32":
        raise ValueError(f"softmax precision {precision!r}: use one of {SOFTMAX_PRECISIONS}")
    return torch.softmax(logits.float() / temperature, dim=-1).numpy()


@dataclass
class Targets:
    """The exact distributions at C positions for one temperature, and what every grid cell
    of those positions shares.

    Attributes:
        p_i: [N, C, V] float32, each worker's softmax(l_i / T) as the worker computes it.
        w: [N] float64 weights.
        q: [C, V] float32 draft distributions softmax(l_q / T).
        p: [C, V] float64, p = sum_i w_i p_i (computed).
        alpha_p: [C] float64, alpha(q, p) (computed).
        slack_i: [N, C] float64, |1 - sum_v p_i(v)|: the fp32 normalization defect (computed).
    """

    p_i: np.ndarray
    w: np.ndarray
    q: np.ndarray
    p: np.ndarray = field(init=False)
    alpha_p: np.ndarray = field(init=False)
    slack_i: np.ndarray = field(init=False)
    _p_i64: np.ndarray = field(init=False, repr=False)
    _q64: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n, c, v = self.p_i.shape
        if self.w.shape != (n,) or self.q.shape != (c, v):
            raise ValueError(
                f"Targets: p_i {self.p_i.shape}, w {self.w.shape}, q {self.q.shape} disagree"
            )
        self._p_i64 = self.p_i.astype(np.float64)
        self._q64 = self.q.astype(np.float64)
        self.p = np.tensordot(self.w, self._p_i64, axes=(0, 0))
        self.alpha_p = alpha(self._q64, self.p)
        self.slack_i = np.abs(1.0 - self._p_i64.sum(axis=2))

    @classmethod
    def from_logits(
        cls,
        l_i: Sequence[torch.Tensor],
        w: np.ndarray,
        l_q: torch.Tensor,
        temperature: float,
        precision: str = "fp64",
    ) -> Targets:
        """p_i = softmax(l_i / T), q = softmax(l_q / T), float32 (`softmax`).

        Args:
            l_i: N worker logits [C, V] (any float dtype).
            w: [N] weights.
            l_q: draft logits [C, V].
            temperature: T > 0.
            precision: "fp64" or "fp32" (SOFTMAX_PRECISIONS).
        """
        p_i = np.stack([softmax(li, temperature, precision) for li in l_i])
        q = softmax(l_q, temperature, precision)
        return cls(p_i=p_i, w=np.asarray(w, np.float64), q=q)

    @property
    def slack(self) -> np.ndarray:
        """[C] float64, sum_i w_i |1 - sum_v p_i(v)|: how far the bounds may move by rounding."""
        return np.asarray(self.w @ self.slack_i)

    def encode(self, k: int) -> list[Payload]:
        """Each p_i through the real top-K codec (fp32 values) and back: N payloads of C rows."""
        codec = make_codec("topk", k=k)
        return [decode_any(codec.encode(pi)) for pi in self.p_i]

    def metrics(self, payloads: Sequence[Payload], method: str) -> dict[str, np.ndarray]:
        """The per-position metrics of one grid cell (one K, one reconstruction).

        Args:
            payloads: the N decoded payloads (`encode`).
            method: a reconstruction; draft-guided uses q.

        Returns:
            name -> [C] float64 (or bool for the violation flags), plus "eps_i" and "l1_i"
            as [N, C]: eps_i per worker, ||p_i - p_hat_i||_1 per worker, l1 = ||p - p_hat||_1,
            alpha_p_hat = alpha(q, p_hat), dalpha = |alpha(q, p) - alpha(q, p_hat)|,
            bound_l1 = 2 sum_i w_i eps_i, bound_alpha = sum_i w_i eps_i,
            l1_workers = sum_i w_i ||p_i - p_hat_i||_1, slack, and one "viol_<name>" bool per
            entry of VIOLATIONS.
        """
        n, c, v = self.p_i.shape
        eps_i = np.stack([pl.eps for pl in payloads])  # [N, C]
        l1_i = np.empty((n, c))
        p_hat = np.zeros((c, v))
        for i, pl in enumerate(payloads):
            p_hat_i = reconstruct(pl, method, self.q if method == "draft-guided" else None)
            l1_i[i] = l1(self._p_i64[i], p_hat_i)
            p_hat_i *= self.w[i]
            p_hat += p_hat_i
            del p_hat_i
        l1_p = l1(self.p, p_hat)
        alpha_p_hat = alpha(self._q64, p_hat)
        dalpha = np.abs(self.alpha_p - alpha_p_hat)
        bound_alpha = theorem3_bound(self.w, eps_i)
        bound_l1 = theorem2_bound(self.w, eps_i)
        l1_workers = self.w @ l1_i
        slack = self.slack
        tol = slack + ABS_TOL
        return {
            "eps_i": eps_i,
            "l1_i": l1_i,
            "l1": l1_p,
            "alpha_p": self.alpha_p,
            "alpha_p_hat": alpha_p_hat,
            "dalpha": dalpha,
            "bound_l1": bound_l1,
            "bound_alpha": bound_alpha,
            "l1_workers": l1_workers,
            "slack": slack,
            "viol_lemma1": (l1_i > 2.0 * eps_i + self.slack_i + ABS_TOL).any(axis=0),
            "viol_thm2_step": l1_p > l1_workers + tol,
            "viol_thm2": l1_p > bound_l1 + tol,
            "viol_half_step": dalpha > 0.5 * l1_p + tol,
            "viol_thm3": dalpha > bound_alpha + tol,
            "viol_printed_thm3": l1_p > bound_alpha + tol,
        }


def evaluate(
    records: Sequence[PromptLogits],
    cfg: StudyConfig,
    progress: bool = True,
) -> pd.DataFrame:
    """The grid over T x K x reconstruction at every recorded position.

    Positions are processed in chunks of `cfg.chunk_positions` (memory stays bounded);
    p_i, q and p are computed once per chunk and T, each payload once per chunk, T and K.

    Returns:
        The positions table: one row per (prompt, position, T, K, reconstruction) with
        prompt_id, position, token, temperature, k, k_frac, reconstruction, eps_<worker>,
        l1_<worker>, and the scalar metrics of `Targets.metrics` (viol_* as bool);
        attrs["vocab_size"] = |V|.
    """
    from tqdm import tqdm

    if not records:
        raise ValueError("evaluate: no recorded prompt")
    vocab = records[0].logits[cfg.draft].shape[1]
    ks = [k_for_fraction(f, vocab) for f in cfg.k_fractions]
    names = cfg.worker_names
    w = cfg.w
    n_cells = sum(math.ceil(r.n_positions / cfg.chunk_positions) for r in records)
    bar = tqdm(
        total=n_cells * len(cfg.temperatures),
        desc="grid",
        unit="chunk x T",
        disable=not progress,
        file=sys.stderr,
    )
    frames: list[pd.DataFrame] = []
    for rec in records:
        tensors = {m: rec.tensor(m) for m in cfg.models}
        for start in range(0, rec.n_positions, cfg.chunk_positions):
            sl = slice(start, min(start + cfg.chunk_positions, rec.n_positions))
            c = sl.stop - sl.start
            for temp in cfg.temperatures:
                targets = Targets.from_logits(
                    [tensors[cfg.workers[n]][sl] for n in names],
                    w,
                    tensors[cfg.draft][sl],
                    temp,
                    cfg.softmax,
                )
                for k, frac in zip(ks, cfg.k_fractions, strict=True):
                    payloads = targets.encode(k)
                    for method in cfg.reconstructions:
                        m = targets.metrics(payloads, method)
                        cols: dict[str, Any] = {
                            "prompt_id": [rec.prompt_id] * c,
                            "position": np.arange(sl.start, sl.stop),
                            "token": rec.tokens[sl],
                            "temperature": temp,
                            "k": k,
                            "k_frac": frac,
                            "reconstruction": method.value,
                        }
                        for i, nm in enumerate(names):
                            cols[f"eps_{nm}"] = m["eps_i"][i]
                            cols[f"l1_{nm}"] = m["l1_i"][i]
                        cols.update(
                            {key: val for key, val in m.items() if key not in ("eps_i", "l1_i")}
                        )
                        frames.append(pd.DataFrame(cols))
                bar.update()
    bar.close()
    out = pd.concat(frames, ignore_index=True)
    out.attrs["vocab_size"] = vocab
    return out


def summarize(positions: pd.DataFrame) -> pd.DataFrame:
    """The tidy summary: one row per (T, K, K/|V|, reconstruction).

    Columns: temperature, k, k_frac, k_label, reconstruction, n_positions; <metric>_mean,
    <metric>_sd, <metric>_max for metric in SUMMARY_METRICS; eps_<w>_mean and l1_<w>_mean per
    worker; n_viol_<name> per entry of VIOLATIONS (all positions, with the slack tolerance);
    n_resolved (positions where sum_i w_i eps_i > RESOLVED_FACTOR (slack + ABS_TOL)) and
    n_viol_printed_thm3_resolved among them; over resolved positions, printed_ratio_max =
    max ||p - p_hat||_1 / sum_i w_i eps_i (the printed middle step claims <= 1, the correct
    chain allows 2) and thm3_ratio_max = max |alpha(q, p) - alpha(q, p_hat)| / sum_i w_i eps_i
    (<= 1); slack_max.
    Rows are sorted by T, K and the reconstructions' order in the positions table.
    """
    df = positions
    g = df.groupby(GROUP_KEYS, sort=True)
    out = g.size().rename("n_positions").to_frame()
    for metric in SUMMARY_METRICS:
        out[f"{metric}_mean"] = g[metric].mean()
        out[f"{metric}_sd"] = g[metric].std(ddof=1).fillna(0.0)
        out[f"{metric}_max"] = g[metric].max()
    per_worker = [c for c in df.columns if c.startswith(("eps_", "l1_")) and c != "l1_workers"]
    for col in per_worker:
        out[f"{col}_mean"] = g[col].mean()
    for name in VIOLATIONS:
        out[f"n_viol_{name}"] = g[f"viol_{name}"].sum().astype(int)
    keys = [df[k] for k in GROUP_KEYS]
    resolved = df["bound_alpha"] > RESOLVED_FACTOR * (df["slack"] + ABS_TOL)
    out["n_resolved"] = resolved.groupby(keys).sum().astype(int)
    printed = df["viol_printed_thm3"] & resolved
    out["n_viol_printed_thm3_resolved"] = printed.groupby(keys).sum().astype(int)
    ratio = (df["l1"] / df["bound_alpha"]).where(resolved)
    out["printed_ratio_max"] = ratio.groupby(keys).max()
    thm3_ratio = (df["dalpha"] / df["bound_alpha"]).where(resolved)
    out["thm3_ratio_max"] = thm3_ratio.groupby(keys).max()
    out["slack_max"] = g["slack"].max()
    out = out.reset_index()
    out.insert(3, "k_label", [frac_label(f) for f in out["k_frac"]])
    # Reconstructions in the study's order (first appearance), not alphabetical.
    order = {m: i for i, m in enumerate(dict.fromkeys(df["reconstruction"]))}
    out["_order"] = out["reconstruction"].map(order)
    out = out.sort_values(["temperature", "k", "_order"]).drop(columns="_order")
    return out.reset_index(drop=True)
