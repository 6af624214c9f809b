"""The paper's Fig. 2 and Fig. 3 drawn from a study run's summary table (fig23_summary.csv).

Notation (the paper's): p = sum_i w_i p_i the federated target, p_hat its reconstruction from
top-K payloads, q the draft, T the temperature, K the entries kept per position, |V| the
vocabulary size, eps_i = 1 - (mass of p_i kept), alpha(q, p) = sum_v min(q(v), p(v)).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from specfed.study.outputs import frac_label

__all__ = ["FIG2_PNG", "FIG3_PNG", "FIGURES", "plot_figures", "subtitle"]

FIG2_PNG = "fig2_aggregation_bias.png"
FIG3_PNG = "fig3_acceptance_bias.png"


def _recon_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a reconstruction: the project's scheme registry (analysis.styles)."""
    from analysis.styles import family_style

    st = family_style("topk", method, gamma=1)
    return st.color, st.marker


FIGURES: dict[str, dict[str, str]] = {
    "fig2": {
        "file": FIG2_PNG,
        "metric": "l1",
        "bound": "bound_l1",
        "bound_label": "Theorem 2 bound 2 Σ w·ε",
        "ylabel": "mean ‖p − p̂‖₁",
        "title": "Fig. 2 on real models: aggregation bias",
    },
    "fig3": {
        "file": FIG3_PNG,
        "metric": "dalpha",
        "bound": "bound_alpha",
        "bound_label": "Theorem 3 bound Σ w·ε",
        "ylabel": "mean |α(q,p) − α(q,p̂)|",
        "title": "Fig. 3 on real models: acceptance-rate bias",
    },
}


def plot_figures(summary: pd.DataFrame, out: Path, subtitle: str = "") -> list[Path]:
    """Fig. 2 and Fig. 3: the paper's layout plus a row that reads the gaps.

    Top row (the paper's): one panel per T, x = K/|V| (log), y = mean bias (log), one line per
    reconstruction (fixed colour and marker), the bound dashed. Exact zeros (K = |V|) sit on a
    "0 (exact)" floor line below the smallest lossy value. Fig. 2 also draws sum_i w_i eps_i
    dotted: the printed Theorem 3 claims ||p - p_hat||_1 stays below it.

    Bottom row: mean bias / mean bound per K < |V| (linear, 1 = the bound); Fig. 2 marks 0.5,
    the printed Theorem 3's claim in these units.

    Returns:
        The two PNG paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    temps = sorted(summary["temperature"].unique())
    methods = list(dict.fromkeys(summary["reconstruction"]))
    fracs = sorted(summary["k_frac"].unique())
    lossy = summary[summary["k_frac"] < 1.0]
    paths = []
    for spec in FIGURES.values():
        metric, bound_col = f"{spec['metric']}_mean", f"{spec['bound']}_mean"
        values = lossy[[metric, bound_col, "bound_alpha_mean"]].to_numpy().ravel()
        positive = values[values > 0]
        floor = float(positive.min()) / 5 if positive.size else 1e-12
        fig, axes = plt.subplots(
            2,
            len(temps),
            figsize=(4.3 * len(temps), 6.4),
            sharey="row",
            sharex=True,
            squeeze=False,
            gridspec_kw={"height_ratios": [3, 1.7]},
        )
        for col, temp in enumerate(temps):
            ax, ax_r = axes[0][col], axes[1][col]
            sub = summary[summary["temperature"] == temp].sort_values("k_frac")
            ref = sub[sub["reconstruction"] == methods[0]]
            x = ref["k_frac"].to_numpy()
            bound = ref[bound_col].to_numpy()
            ax.plot(x, np.maximum(bound, floor), "k--", lw=1.4, label=spec["bound_label"])
            ax_r.axhline(1.0, color="k", ls="--", lw=1.4)
            if spec["metric"] == "l1":
                ax.plot(
                    x,
                    np.maximum(ref["bound_alpha_mean"].to_numpy(), floor),
                    ls=":",
                    color="0.45",
                    lw=1.4,
                    label="Σ w·ε (printed Thm 3 claims ‖p − p̂‖₁ ≤ this)",
                )
                ax_r.axhline(0.5, color="0.45", ls=":", lw=1.4)
            for method in methods:
                color, marker = _recon_style(method)
                s = sub[sub["reconstruction"] == method]
                style = {"marker": marker, "color": color, "lw": 1.8, "ms": 6, "zorder": 3}
                ax.plot(s["k_frac"], np.maximum(s[metric].to_numpy(), floor), label=method, **style)
                sl = s[(s["k_frac"] < 1.0) & (s[bound_col] > 0)]
                ax_r.plot(sl["k_frac"], sl[metric] / sl[bound_col], **style)
            ax.axhline(floor, color="0.75", lw=0.8, zorder=0)
            ax.text(fracs[0], floor * 1.3, "0 (exact)", fontsize=8, color="0.4", va="bottom")
            ax.set_yscale("log")
            ax.set_title(f"T = {temp:g}")
            ax_r.set_ylim(0, 1.1)
            for a in (ax, ax_r):
                a.set_xscale("log")
                a.xaxis.set_major_locator(FixedLocator(fracs))
                a.xaxis.set_minor_locator(NullLocator())
                a.grid(True, which="major", alpha=0.3)
            ax_r.set_xticklabels([frac_label(f) for f in fracs], fontsize=8)
            ax_r.set_xlabel("payload K/|V|")
        axes[0][0].set_ylabel(spec["ylabel"])
        axes[1][0].set_ylabel("mean bias / mean bound")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
        fig.suptitle(spec["title"] + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = out / spec["file"]
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)
    return paths


def subtitle(meta: Mapping[str, Any]) -> str:
    """One line under the figures' titles: models, weights, sizes (from meta.json)."""
    cfg = meta.get("config", {})
    models = cfg.get("models", {})
    workers = models.get("workers", {})
    weights = models.get("weights", {})
    return (
        f"draft {models.get('draft')}; workers "
        + ", ".join(f"{m} (w={weights.get(n, 0):g})" for n, m in workers.items())
        + f"; {meta.get('n_prompts')} prompts, {meta.get('n_positions')} positions, "
        f"|V| = {meta.get('vocab_size')}"
    )
