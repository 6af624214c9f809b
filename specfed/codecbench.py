"""The codec trade-off: bytes on the wire against fidelity, on recorded distributions.

`python -m specfed.bench codecs` (docs/codecs.md, "The trade-off"). For every transmission of
a grid (top-K at K in {16, 64, 256} and top-p at epsilon in {1e-2, 1e-3} capped at those K,
each with every value dtype and index coding) and every temperature T, the workers'
distributions p_i = softmax(l_i / T) at the recorded positions go through the real codec in
messages of P = gamma + 1 = 5 positions (as in a round), and are measured:

- bytes per position: the message bytes (header included) / P, mean over messages;
- ||p_i - p_hat_i||_1 per worker and position, for every reconstruction (exact, float64);
- |alpha(q, p) - alpha(q, p_hat)| per position, p_hat = `specfed.reconstruct.aggregate` of
  the workers' payloads (the server's own path), q the draft's softmax at the position;
- K_j and eps_j means.

Then the target of issue 13: the codecs whose mean ||p_i - p_hat_i||_1 is at most that of
fp16 top-64 while their bytes per position are at most 60 % of fp16 top-64's 320 B, and the
Pareto front (bytes, mean L1) per reconstruction.

Fidelity does not depend on the index coding (it only reorders the entries), so it is
computed once per (mode, K, epsilon, value dtype); every other coding's decoded payload is
checked to hold the same entries. The fast L1 (`worker_l1`) is checked against
`specfed.reconstruct.reconstruct` on the first message.

Notation: p_i worker i's distribution, w_i its weight, p = sum_i w_i p_i, q the draft's, T
the temperature, K kept entries, eps = 1 - kept mass, alpha(q, p) = sum_v min(q(v), p(v)).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specfed.codecs import Payload, decode_any
from specfed.messages import Transmission
from specfed.models import probabilities
from specfed.options import IndexCoding, Mode, Reconstruction, ValueDtype
from specfed.reconstruct import Q_COMPLEMENT_MIN, RECONSTRUCTIONS, aggregate, reconstruct

__all__ = [
    "BYTES_FRACTION",
    "REFERENCE",
    "LogitsSet",
    "codec_grid",
    "evaluate_codecs",
    "plot_tradeoff",
    "qwen_logits",
    "synthetic_logits",
    "worker_l1",
]

POSITIONS_PER_MESSAGE = 5
"""P = gamma + 1 at gamma = 4: the positions of one round's message."""
REFERENCE_K = 64
REFERENCE = Transmission(Mode.TOPK, k=REFERENCE_K, value_dtype=ValueDtype.FP16)
"""The target's reference: fp16 top-64 (fixed 3-byte indices at V = 151,936: 320 B/position)."""
BYTES_FRACTION = 0.6
"""The target's byte budget: at most this fraction of the reference's K (ib + vb) bytes."""


def codec_grid(
    ks: Sequence[int] = (16, 64, 256), epsilons: Sequence[float] = (1e-2, 1e-3)
) -> list[Transmission]:
    """Top-K at every K and top-p at every (epsilon, cap K), each with every value dtype and
    index coding, in that order."""
    shapes: list[tuple[Mode, int, float | None]] = [(Mode.TOPK, k, None) for k in ks]
    shapes += [(Mode.ADAPTIVE, k, e) for e in epsilons for k in ks]
    return [
        Transmission(mode, k=k, epsilon=eps, value_dtype=vd, index_coding=ic)
        for mode, k, eps in shapes
        for vd in ValueDtype
        for ic in IndexCoding
    ]


def fidelity_key(t: Transmission) -> tuple[Any, ...]:
    """What fidelity depends on: everything but the index coding (and width)."""
    return (t.mode, t.k, t.epsilon, t.value_dtype)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class LogitsSet:
    """Recorded logits: per prompt, each worker's and the draft's [n, V] along one continuation.

    Attributes:
        workers: worker names, in weight order.
        weights: w_i, [N] float64.
        worker_logits: per prompt, one [n, V] tensor per worker (any float dtype).
        draft_logits: per prompt, the draft's [n, V].
        info: where the logits come from (models, prompts, cache, timings).
    """

    workers: list[str]
    weights: np.ndarray
    worker_logits: list[list[torch.Tensor]]
    draft_logits: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.draft_logits[0].shape[-1])

    @property
    def n_positions(self) -> int:
        return sum(int(t.shape[0]) for t in self.draft_logits)


def qwen_logits(
    study_file: Path,
    cache: Path | None,
    n_prompts: int | None = None,
    positions: int | None = None,
    log: Callable[[str], None] = print,
) -> LogitsSet:
    """The paper study's recorded logits (`specfed.study.record.record_logits`, cached; runs
    the models on a cache miss)."""
    from specfed.study.config import load_study
    from specfed.study.record import record_logits

    cfg = load_study(study_file)
    changes: dict[str, Any] = {}
    if n_prompts is not None:
        changes["n_prompts"] = n_prompts
    if positions is not None:
        changes["positions"] = positions
    if changes:
        cfg = cfg.replace(**changes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    records, info = record_logits(cfg, cache, log=log)
    names = cfg.worker_names
    return LogitsSet(
        workers=names,
        weights=cfg.w,
        worker_logits=[[r.tensor(cfg.workers[n]) for n in names] for r in records],
        draft_logits=[r.tensor(cfg.draft) for r in records],
        info={
            "source": "qwen",
            "study_file": str(study_file),
            "draft": cfg.draft,
            "workers": cfg.workers,
            "dtype": cfg.dtype,
            "prompts": info.get("prompt_ids"),
            "positions_per_prompt": cfg.positions,
            "generation": {"mode": cfg.generation_mode, "temperature": cfg.generation_temperature},
            "record": {k: v for k, v in info.items() if k != "prompt_ids"},
        },
    )


def synthetic_logits(
    n_prompts: int = 2, positions: int = 12, vocab: int = 4000, seed: int = 0
) -> LogitsSet:
    """LM-like logits for two workers and a draft: a shared Gaussian base with a per-position
    sharpness (from flat to peaked), workers and draft = base + their own noise."""
    rng = np.random.default_rng(seed)
    worker_logits, draft_logits = [], []
    for _ in range(n_prompts):
        sharp = rng.uniform(1.0, 6.0, size=(positions, 1))
        base = rng.standard_normal((positions, vocab)) * sharp
        own = [base + rng.standard_normal((positions, vocab)) * 0.5 for _ in range(3)]
        worker_logits.append([torch.from_numpy(o.astype(np.float32)) for o in own[:2]])
        draft_logits.append(torch.from_numpy(own[2].astype(np.float32)))
    return LogitsSet(
        workers=["w1", "w2"],
        weights=np.array([0.5, 0.5]),
        worker_logits=worker_logits,
        draft_logits=draft_logits,
        info={"source": "synthetic", "seed": seed, "vocab": vocab},
    )


# ---------------------------------------------------------------------------------------------
# Fidelity of one payload
# ---------------------------------------------------------------------------------------------


def worker_l1(
    p: np.ndarray, payload: Payload, method: str, q: np.ndarray | None = None
) -> np.ndarray:
    """||p_i - p_hat_i||_1 per position, [P] float64, without building p_hat_i.

    The same reconstruction as `specfed.reconstruct.reconstruct` (edge cases included): on
    the kept set S the error is sum_S |p - p_hat|; off S it is (mass of p off S) for
    renormalize, and sum_C |p - c| = sum_V |p - c| - sum_S |p - c| with c the constant
    (residual-mass) or a multiple of q (draft-guided): one dense pass per position.

    Args:
        p: [P, V] float64, the exact distributions.
        payload: the decoded message of p.
        method: a reconstruction.
        q: [G, V] draft distributions (draft-guided), G <= P.
    """
    if payload.dense is not None:
        return np.abs(p - payload.dense.astype(np.float64)).sum(axis=1)
    vocab = payload.vocab_size
    rho, eps = payload.kept_mass, payload.eps
    out = np.empty(payload.n_positions)
    for j, (idx, val) in enumerate(zip(payload.indices, payload.values, strict=True)):
        row, v, k = p[j], val.astype(np.float64), len(idx)
        p_s = row[idx]
        if method == Reconstruction.RENORMALIZE and rho[j] <= 0.0:
            out[j] = np.abs(row - 1.0 / vocab).sum()
        elif k == vocab:
            out[j] = np.abs(p_s - v).sum()
        elif method == Reconstruction.RENORMALIZE:
            out[j] = np.abs(p_s - v / rho[j]).sum() + max(row.sum() - p_s.sum(), 0.0)
        else:
            dense = None
            if method == Reconstruction.DRAFT_GUIDED and q is not None and j < q.shape[0]:
                qj = q[j].astype(np.float32).astype(np.float64)  # as aggregate sees q
                total = qj.sum()
                q_c = total - qj[idx].sum()
                if q_c > Q_COMPLEMENT_MIN * total:
                    dense = (eps[j] / q_c) * qj
            if dense is None:
                c = eps[j] / (vocab - k)
                off = np.abs(row - c).sum() - np.abs(p_s - c).sum()
            else:
                off = np.abs(row - dense).sum() - np.abs(p_s - dense[idx]).sum()
            out[j] = np.abs(p_s - v).sum() + max(off, 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sums:
    """Running sums of one transmission at one temperature."""

    bytes: int = 0
    message_positions: int = 0
    positions: int = 0
    k_sum: float = 0.0
    eps_sum: float = 0.0
    l1: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dalpha: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    worker_positions: int = 0


def _same_entries(a: Payload, b: Payload) -> bool:
    """True if two payloads keep the same (index, value) pairs at every position and the same
    kept mass."""
    for ia, va, ib, vb in zip(a.indices, a.values, b.indices, b.values, strict=True):
        oa, ob = np.argsort(ia), np.argsort(ib)
        if not (np.array_equal(ia[oa], ib[ob]) and np.array_equal(va[oa], vb[ob])):
            return False
    # kept masses summed in another order differ in the last bits of a float64
    return bool(np.allclose(a.kept_mass, b.kept_mass, rtol=1e-12, atol=1e-15))


def _messages(n: int, per: int) -> list[slice]:
    return [slice(a, min(a + per, n)) for a in range(0, n, per)]


def evaluate_codecs(
    data: LogitsSet,
    temperatures: Sequence[float],
    grid: Sequence[Transmission],
    log: Callable[[str], None] = print,
    positions_per_message: int = POSITIONS_PER_MESSAGE,
) -> list[dict[str, Any]]:
    """One row per (transmission, T) and per transmission over all T ("T": "all"): bytes per
    position, mean ||p_i - p_hat_i||_1 and mean |Delta alpha| per reconstruction, K and eps
    means. Means run over positions (and workers, for L1 and K / eps)."""
    methods = [m.value for m in RECONSTRUCTIONS]
    sums: dict[tuple[Transmission, float], _Sums] = defaultdict(_Sums)
    w = data.weights
    checked_l1 = False
    for t_index, temp in enumerate(temperatures):
        t0 = time.perf_counter()
        for prompt, (wl, dl) in enumerate(zip(data.worker_logits, data.draft_logits, strict=True)):
            p_all = [probabilities(x, temp) for x in wl]
            q_all = probabilities(dl, temp)
            for sl in _messages(q_all.shape[0], positions_per_message):
                p_i = [np.ascontiguousarray(p[sl]) for p in p_all]
                p64 = [p.astype(np.float64) for p in p_i]
                mix = sum(wi * p for wi, p in zip(w, p64, strict=True))
                q = q_all[sl]
                alpha_p = np.minimum(q.astype(np.float64), mix).sum(axis=1)
                n_pos = q.shape[0]
                reference: dict[tuple[Any, ...], list[Payload]] = {}
                for t in grid:
                    s = sums[(t, temp)]
                    codec = t.codec()
                    payloads = []
                    for p in p_i:
                        msg = codec.encode(p)
                        s.bytes += len(msg)
                        s.message_positions += n_pos
                        payloads.append(decode_any(msg))
                    s.positions += n_pos
                    key = fidelity_key(t)
                    if key in reference:
                        if not all(
                            _same_entries(a, b)
                            for a, b in zip(reference[key], payloads, strict=True)
                        ):
                            raise AssertionError(f"{t.label}: entries differ from {key}")
                        continue
                    reference[key] = payloads
                    s.worker_positions += n_pos * len(p_i)
                    s.k_sum += float(sum(pl.k_per_position.sum() for pl in payloads))
                    s.eps_sum += float(sum(pl.eps.sum() for pl in payloads))
                    for m in methods:
                        for p, pl in zip(p64, payloads, strict=True):
                            l1 = worker_l1(p, pl, m, q)
                            if not checked_l1:
                                ref = np.abs(reconstruct(pl, m, q) - p).sum(axis=1)
                                np.testing.assert_allclose(l1, ref, rtol=1e-6, atol=1e-12)
                            s.l1[m] += float(l1.sum())
                        p_hat = aggregate(payloads, w, m, q)
                        alpha_hat = np.minimum(q, p_hat).sum(axis=1, dtype=np.float64)
                        s.dalpha[m] += float(np.abs(alpha_p - alpha_hat).sum())
                    checked_l1 = True
            log(
                f"T={temp} ({t_index + 1}/{len(temperatures)}): prompt {prompt + 1}/"
                f"{len(data.draft_logits)} done, {time.perf_counter() - t0:.1f} s"
            )
    return _rows(sums, grid, temperatures, methods)


def _rows(
    sums: dict[tuple[Transmission, float], _Sums],
    grid: Sequence[Transmission],
    temperatures: Sequence[float],
    methods: list[str],
) -> list[dict[str, Any]]:
    """Turn the sums into rows; fidelity comes from the first transmission of its key."""
    first: dict[tuple[Any, ...], Transmission] = {}
    for t in grid:
        first.setdefault(fidelity_key(t), t)
    rows = []
    for t in grid:
        fid = first[fidelity_key(t)]
        labels: list[float | str] = [*temperatures, "all"]
        for temp in labels:
            temps = [float(temp)] if not isinstance(temp, str) else list(temperatures)
            b = [sums[(t, x)] for x in temps]
            f = [sums[(fid, x)] for x in temps]
            wp = sum(s.worker_positions for s in f)
            pos = sum(s.positions for s in f)
            rows.append(
                {
                    "label": t.label,
                    **t.columns(),
                    "T": temp,
                    "bytes_per_position": sum(s.bytes for s in b)
                    / sum(s.message_positions for s in b),
                    "k_mean": sum(s.k_sum for s in f) / wp,
                    "eps_mean": sum(s.eps_sum for s in f) / wp,
                    **{f"l1_{m}": sum(s.l1[m] for s in f) / wp for m in methods},
                    **{f"dalpha_{m}": sum(s.dalpha[m] for s in f) / pos for m in methods},
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Target and curve
# ---------------------------------------------------------------------------------------------


def pareto(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both bytes per position and `metric` (ascending bytes)."""
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["bytes_per_position"], r[metric])):
        if r[metric] < best:
            front.append(r)
            best = r[metric]
    return front


def target(rows: list[dict[str, Any]], reference_bytes: float) -> dict[str, Any]:
    """Issue 13's target, per reconstruction, on the all-T rows: mean L1 <= the reference's
    (fp16 top-64) and bytes per position <= BYTES_FRACTION x the reference's entry bytes.

    Also the strict form, `at_every_T`: the same two conditions at every temperature on its
    own (bytes follow the entropy, so they are largest at the highest T). Each form gives the
    smallest transmission that meets it (fewest bytes over all T), with its per-T figures.
    """
    temps = sorted({r["T"] for r in rows if r["T"] != "all"})
    by = {(r["label"], r["T"]): r for r in rows}
    overall = [r for r in rows if r["T"] == "all"]
    budget = BYTES_FRACTION * reference_bytes
    ref = by[(REFERENCE.label, "all")]
    out: dict[str, Any] = {
        "reference": REFERENCE.label,
        "reference_bytes_per_position": ref["bytes_per_position"],
        "reference_entry_bytes_per_position": reference_bytes,
        "budget_bytes_per_position": budget,
        "by_reconstruction": {},
    }

    def meets(label: str, temp: Any, key: str) -> bool:
        r, rt = by[(label, temp)], by[(REFERENCE.label, temp)]
        return bool(r[key] <= rt[key] and r["bytes_per_position"] <= budget)

    def describe(r: dict[str, Any], key: str) -> dict[str, Any]:
        return {
            "label": r["label"],
            "bytes_per_position": r["bytes_per_position"],
            "l1": r[key],
            "bytes_fraction_of_reference": r["bytes_per_position"] / reference_bytes,
            "per_temperature": {
                str(t): {
                    "bytes_per_position": by[(r["label"], t)]["bytes_per_position"],
                    "l1": by[(r["label"], t)][key],
                    "reference_l1": by[(REFERENCE.label, t)][key],
                    "holds": meets(r["label"], t, key),
                }
                for t in temps
            },
        }

    for m in RECONSTRUCTIONS:
        key = f"l1_{m.value}"
        ok = sorted(
            (r for r in overall if meets(r["label"], "all", key)),
            key=lambda r: r["bytes_per_position"],
        )
        strict = [r for r in ok if all(meets(r["label"], t, key) for t in temps)]
        out["by_reconstruction"][m.value] = {
            "reference_l1": ref[key],
            "reached": bool(ok),
            "smallest": describe(ok[0], key) if ok else None,
            "reached_at_every_T": bool(strict),
            "smallest_at_every_T": describe(strict[0], key) if strict else None,
            "candidates": [
                {"label": r["label"], "bytes_per_position": r["bytes_per_position"], "l1": r[key]}
                for r in ok
            ],
            "pareto": [
                {"label": r["label"], "bytes_per_position": r["bytes_per_position"], "l1": r[key]}
                for r in pareto(overall, key)
            ],
        }
    return out


def plot_tradeoff(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Bytes per position against mean ||p_i - p_hat_i||_1 (top row) and mean |Delta alpha|
    (bottom row), all T, one column per reconstruction: every transmission (colour = value
    dtype, marker = mode), the Pareto front, fp32 / fp16 top-K at K = 16, 64, 256, and the
    target's box (grey) on the L1 row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [r for r in rows if r["T"] == "all"]
    colours = {"fp32": "#1f77b4", "fp16": "#2ca02c", "q8": "#ff7f0e", "q4": "#d62728"}
    markers = {"topk": "o", "adaptive": "^"}
    metrics = [("l1", "mean ||p_i - p_hat_i||_1"), ("dalpha", "mean |Delta alpha|")]
    fig, axes = plt.subplots(len(metrics), len(RECONSTRUCTIONS), figsize=(15, 8.5), sharex=True)
    budget = summary["budget_bytes_per_position"]
    for row_i, (metric, ylabel) in enumerate(metrics):
        for ax, m in zip(axes[row_i], RECONSTRUCTIONS, strict=True):
            key = f"{metric}_{m.value}"
            floor = min((r[key] for r in overall if r[key] > 0), default=1e-9) / 2
            for r in overall:
                ax.scatter(
                    r["bytes_per_position"],
                    max(r[key], floor),
                    c=colours[r["value_dtype"]],
                    marker=markers[r["transmission"]],
                    s=14,
                    alpha=0.6,
                    linewidths=0,
                )
            front = pareto(overall, key)
            ax.plot(
                [r["bytes_per_position"] for r in front],
                [max(r[key], floor) for r in front],
                "k-",
                lw=0.8,
                label="Pareto front",
            )
            for vd, style in (("fp32", "--"), ("fp16", ":")):
                ref = sorted(
                    (
                        r
                        for r in overall
                        if r["transmission"] == "topk"
                        and r["value_dtype"] == vd
                        and r["index_coding"] == "fixed"
                    ),
                    key=lambda r: r["k"],
                )
                ax.plot(
                    [r["bytes_per_position"] for r in ref],
                    [max(r[key], floor) for r in ref],
                    style,
                    color=colours[vd],
                    lw=1.2,
                    label=f"{vd} top-K, fixed indices",
                )
            if metric == "l1":
                t = summary["by_reconstruction"][m.value]
                ax.fill_between([1, budget], floor, t["reference_l1"], color="grey", alpha=0.15)
                verdict = "reached" if t["reached"] else "not reached"
                if t["reached"]:
                    verdict += " (at every T)" if t["reached_at_every_T"] else " (not at every T)"
                ax.set_title(f"{m.value}: target {verdict}", fontsize=10)
            ax.axvline(budget, color="grey", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(5, None)
            ax.set_ylim(floor, None)
            ax.grid(True, which="both", lw=0.2)
            if row_i == len(metrics) - 1:
                ax.set_xlabel("bytes per position (message / P, P = 5)")
        axes[row_i][0].set_ylabel(ylabel)
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=c, label=vd) for vd, c in colours.items()
    ] + [plt.Line2D([], [], ls="", marker=mk, color="k", label=md) for md, mk in markers.items()]
    axes[0][0].legend(
        handles=handles + axes[0][0].get_legend_handles_labels()[0], fontsize=7, loc="lower left"
    )
    fig.suptitle(
        "Codec trade-off (mean over all T): grey box = the target, <= 60 % of fp16 top-64's "
        "entry bytes and mean L1 <= its mean L1"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
