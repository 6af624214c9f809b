"""Seaborn figures of the report and of `analysis compare`; one PNG per function.

Every configuration is drawn with its registry style (analysis.styles): same name, colour,
marker and line style in every figure. Functions take the loaded data and the tables of
analysis.tables, write one PNG and return its path. Times in ms, sizes in bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.load import Data
from analysis.styles import Style
from analysis.tables import BREAKDOWN, LinkAxis

#: Fixed colours of the round-time components (stacked bars).
#: Chosen away from the registry's families (blues, oranges, greens, greys).
COMPONENT_COLORS = {
    "draft": "#8c564b",
    "compute": "#e7ba52",
    "network": "#7b68b5",
    "aggregation": "#d62728",
    "other": "#c7c7c7",
}
_DASHES = {"-": "", "--": (4, 2), ":": (1, 2), "-.": (4, 1.5, 1, 1.5)}
DPI = 130


def theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_right(ax: Axes, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    _drop_legend(ax)
    if handles:
        ax.legend(
            handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0),
            frameon=False, fontsize="small",
        )  # fmt: skip


def _drop_legend(ax: Axes) -> None:
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()


def _seaborn_styles(styles: dict[str, Style], names: Sequence[str]) -> dict[str, dict]:
    return {
        "palette": {n: styles[n].color for n in names},
        "markers": {n: styles[n].marker for n in names},
        "dashes": {n: _DASHES.get(styles[n].linestyle, "") for n in names},
    }


def _plain_log(ax: Axes, which: str = "xy") -> None:
    """Log axes labelled 1, 2, 5 x 10^n as plain numbers."""
    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())


def _log_x_if_wide(ax: Axes, values: Sequence[float], base: int = 2) -> None:
    vals = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    if len(vals) >= 2 and vals[-1] / vals[0] >= 4:
        ax.set_xscale("log", base=base)
    if 0 < len(vals) <= 8:
        ax.set_xticks(vals)
        ax.set_xticklabels([f"{v:g}" for v in vals])
        ax.minorticks_off()


# ----------------------------------------------------------------------------- 1


def latency_vs_link(data: Data, axes_: list[LinkAxis], path: Path) -> Path:
    """ms per token vs each varying link parameter, one panel each; mean ± sd."""
    req = data.ok_requests
    names = [c for c in data.config_order() if c in set(req["config"])]
    kw = _seaborn_styles(data.styles, names)
    fig, axs = plt.subplots(1, len(axes_), figsize=(6.2 * len(axes_) + 2.5, 4.4), squeeze=False)
    for ax, axis in zip(axs[0], axes_, strict=True):
        sns.lineplot(
            data=req, x=axis.column, y="ms_per_token", hue="config", style="config",
            hue_order=names, style_order=names, errorbar="sd", err_style="bars",
            err_kws={"capsize": 3}, markersize=7, ax=ax, **kw,
        )  # fmt: skip
        _log_x_if_wide(ax, req[axis.column])
        ax.set_xlabel(axis.label)
        ax.set_ylabel("ms per token (end to end)")
        ax.set_ylim(bottom=0)
        n = req.groupby(["config", axis.column]).size()
        count = f"{n.min()}-{n.max()}" if n.min() != n.max() else f"{n.min()}"
        what = axis.label.split(" (")[0]
        ax.set_title(f"Latency vs {what}\nmean ± sd over {count} requests per point")
        _drop_legend(ax)
    _legend_right(axs[0][-1], "configuration")
    return _save(fig, path)


# ----------------------------------------------------------------------------- 2


def breakdown(
    data: Data, table: pd.DataFrame, facet: str | None, facet_label: str, path: Path
) -> Path:
    """Stacked bars: mean ms per round of draft / compute / network / aggregation / other."""
    facets = sorted(table[facet].unique()) if facet else [None]
    names = [c for c in data.config_order() if c in set(table["config"])]
    width = max(5.0, 0.55 * len(names) + 1.5)
    fig, axs = plt.subplots(
        1, len(facets), figsize=(width * len(facets) + 1.8, 4.8), squeeze=False, sharey=True
    )
    for ax, fv in zip(axs[0], facets, strict=True):
        t = table if fv is None else table[table[facet] == fv]
        t = t.set_index("config").reindex(names)
        x = np.arange(len(names))
        bottom = np.zeros(len(names))
        for comp in BREAKDOWN:
            vals = np.clip(t[comp].to_numpy(dtype=float), 0, None)
            vals = np.nan_to_num(vals)
            ax.bar(x, vals, bottom=bottom, color=COMPONENT_COLORS[comp], label=comp, width=0.7)
            bottom += vals
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize="small")
        if fv is None:
            ax.set_title("all rounds")
        else:
            what, _, unit = facet_label.partition(" (")
            ax.set_title(f"{what} = {fv:g} {unit.rstrip(')')}".strip())
        ax.set_xlabel("")
    axs[0][0].set_ylabel("ms per round (mean)")
    fig.suptitle("Round-time breakdown (network: t_call - t_worker of the slowest worker)")
    _legend_right(axs[0][-1], "component")
    return _save(fig, path)


# ----------------------------------------------------------------------------- 3


def bytes_vs_k(data: Data, table: pd.DataFrame, path: Path) -> Path:
    """Log-log: up bytes per worker-round and per token vs K, measured and documented."""
    fig, axs = plt.subplots(1, 2, figsize=(12.5, 4.6))
    lossy = table[table["transmission"] != "full"]
    full = table[table["transmission"] == "full"]
    for ax, (meas, form, what) in zip(
        axs,
        (
            ("up_measured", "up_formula", "up bytes per worker and round"),
            ("per_token_measured", "per_token_formula", "up bytes per generated token"),
        ),
        strict=True,
    ):
        for fam, g in lossy.groupby("family", sort=False):
            st = data.family_styles[str(fam)]
            g = g.sort_values("K")
            ax.plot(g["K"], g[form], color=st.color, lw=5, alpha=0.25, solid_capstyle="round")
            ax.plot(
                g["K"], g[meas], color=st.color, marker=st.marker, ls=st.linestyle,
                label=f"{fam}: measured",
            )  # fmt: skip
        for _, row in full.iterrows():
            st = data.styles[str(row["config"])]
            ax.axhline(
                row[meas],
                color=st.color,
                ls=st.linestyle,
                lw=1.2,
                label=f"{row['config']}: measured",
            )
            ax.axhline(row[form], color=st.color, lw=5, alpha=0.2)
        ax.plot([], [], color="grey", lw=5, alpha=0.3, label="documented formula (wide band)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ks = sorted(lossy["K"].dropna().unique())
        if ks:
            ax.set_xticks(ks)
            ax.set_xticklabels([f"{k:g}" for k in ks])
            ax.minorticks_off()
        ax.set_xlabel("K (kept entries per position)")
        ax.set_ylabel(f"{what} (bytes)")
        ax.set_title(what.capitalize())
    v = table["V"].dropna().unique()
    fig.suptitle(
        "Up bytes vs K: measured vs documented 12 + 20 + payload; payload top-K = "
        "16 + P K (ib + vb), full = 12 + 4 P V" + (f"; V = {v[0]:,.0f}" if len(v) == 1 else "")
    )
    _legend_right(axs[1])
    return _save(fig, path)


# ----------------------------------------------------------------------------- 4


def _k_lines(
    data: Data, ax: Axes, df: pd.DataFrame, y: str, ref: pd.DataFrame | None, sd: bool = True
) -> None:
    """Lossy families vs K (mean ± sd over requests), full configurations as horizontal lines."""
    lossy = df[df["transmission"] != "full"]
    present = set(lossy["family"])
    fams = [
        st.name
        for st in sorted(data.family_styles.values(), key=lambda st: st.order)
        if st.name in present
    ]
    if fams:
        kw = _seaborn_styles(data.family_styles, fams)
        sns.lineplot(
            data=lossy, x="k", y=y, hue="family", style="family", hue_order=fams,
            style_order=fams, errorbar="sd" if sd else None, err_style="bars",
            err_kws={"capsize": 3}, markersize=7, ax=ax, **kw,
        )  # fmt: skip
    if ref is not None:
        for cfg, g in ref.groupby("config", sort=False):
            if g[y].notna().any():
                st = data.styles[str(cfg)]
                ax.axhline(g[y].mean(), color=st.color, ls=st.linestyle, lw=1.3, label=f"{cfg}")
    ax.set_xscale("log", base=2)
    ks = sorted(lossy["k"].dropna().unique())
    if ks:
        ax.set_xticks(ks)
        ax.set_xticklabels([f"{k:g}" for k in ks])
        ax.minorticks_off()
    ax.set_xlabel("K (kept entries per position)")


def acceptance_vs_k(data: Data, path: Path) -> Path:
    """Acceptance and tokens per round vs K per family; full as reference lines."""
    req = data.ok_requests
    full = req[req["transmission"] == "full"]
    fig, axs = plt.subplots(1, 2, figsize=(12.5, 4.4))
    _k_lines(data, axs[0], req[req["gamma"] > 0], "acceptance", full[full["gamma"] > 0])
    axs[0].set_ylabel("acceptance (accepted / drafted)")
    axs[0].set_ylim(-0.03, 1.03)
    axs[0].set_title("Acceptance vs K (mean ± sd over requests)")
    _k_lines(data, axs[1], req, "tokens_per_round", full)
    axs[1].set_ylabel("tokens per round")
    axs[1].set_ylim(bottom=0)
    axs[1].set_title("Tokens per round vs K (mean ± sd over requests)")
    _drop_legend(axs[0])
    _legend_right(axs[1])
    return _save(fig, path)


# ----------------------------------------------------------------------------- 5


def fidelity_vs_k(data: Data, pairs: pd.DataFrame, path: Path) -> Path:
    """Coupled-seed fidelity vs K: identical sequences, first divergence, acceptance and
    (if measured) log-probability per token, lossy minus full."""
    p = pairs.rename(columns={"K": "k"}).assign(
        identical=pairs["identical"].astype(float),
        acceptance_diff=pairs["acceptance"] - pairs["acceptance_full"],
        logp_diff=pairs["logp"] - pairs["logp_full"],
        transmission="lossy",
    )
    panels = [
        ("identical", "fraction identical to full", "Identical sequences", (-0.03, 1.03)),
        ("first_divergence", "token index", "First divergence (diverging pairs)", None),
        ("acceptance_diff", "acceptance lossy - full", "Acceptance change vs full", None),
    ]
    if p["logp_diff"].notna().any():
        panels.append(
            ("logp_diff", "nats per token, lossy - full", "log p under exact ensemble", None)
        )
    ncol = 2 if len(panels) == 4 else len(panels)
    nrow = math.ceil(len(panels) / ncol)
    fig, axs = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 2.4, 4.0 * nrow), squeeze=False)
    for ax, (col, ylabel, title, ylim) in zip(axs.flat, panels, strict=False):
        _k_lines(data, ax, p, col, None)
        if col != "identical" and col != "first_divergence":
            ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ylim:
            ax.set_ylim(*ylim)
        _drop_legend(ax)
        ax.set_xlabel("K")
    n = pairs.groupby("config").size()
    count = f"{n.min()}-{n.max()}" if n.min() != n.max() else f"{n.min()}"
    fig.suptitle(
        f"Fidelity vs full transmission, coupled seeds ({count} pairs per configuration; "
        "mean ± sd over pairs)"
    )
    handles = [
        plt.Line2D([], [], color=st.color, marker=st.marker, ls=st.linestyle, label=st.name)
        for st in sorted(data.family_styles.values(), key=lambda st: st.order)
        if st.name in set(pairs["family"])
    ]
    axs[0][-1].legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
        fontsize="small", title="family",
    )  # fmt: skip
    for ax in list(axs.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- 6


def bound(data: Data, rounds: pd.DataFrame, path: Path) -> Path:
    """Measured round time vs the analytic lower bound (per round), and the ratio."""
    names = [c for c in data.config_order() if c in set(rounds["config"])]
    kw = _seaborn_styles(data.styles, names)
    fig, axs = plt.subplots(
        1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 1.2]}, layout="constrained"
    )
    ax = axs[0]
    sns.scatterplot(
        data=rounds, x="bound_ms", y="t_round_ms", hue="config", style="config",
        hue_order=names, style_order=names, palette=kw["palette"], markers=kw["markers"],
        s=28, alpha=0.75, ax=ax,
    )  # fmt: skip
    lo = float(np.nanmin(rounds[["bound_ms", "t_round_ms"]].to_numpy())) * 0.8
    hi = float(np.nanmax(rounds[["bound_ms", "t_round_ms"]].to_numpy())) * 1.25
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="measured = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log(ax)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("analytic lower bound per round (ms)")
    ax.set_ylabel("measured round time (ms)")
    ax.set_title("Round time vs lower bound (one point per round)")
    handles, labels = ax.get_legend_handles_labels()
    _drop_legend(ax)
    ax = axs[1]
    sns.stripplot(
        data=rounds, y="config", x="ratio", hue="config", order=names, hue_order=names,
        palette=kw["palette"], size=4, alpha=0.6, jitter=0.25, ax=ax, legend=False,
    )  # fmt: skip
    means = rounds.groupby("config")["ratio"].mean().reindex(names)
    ax.scatter(means.to_numpy(), np.arange(len(names)), marker="|", s=400, color="black",
               zorder=5)  # fmt: skip
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xlim(left=min(0.98, float(rounds["ratio"].min()) - 0.02))
    ax.set_xlabel("measured / bound (>= 1 expected; dashed: 1)")
    ax.set_ylabel("")
    ax.set_title("Ratio per round (black bar: mean)")
    ax.legend(
        handles, labels, title="configuration", loc="upper left", bbox_to_anchor=(1.01, 1.0),
        frameon=False, fontsize="small",
    )  # fmt: skip
    src = rounds["rtt_source"].value_counts()
    fig.suptitle(
        "Analytic lower bound: t_draft + max_w(RTT_w + bytes/bottleneck bw + t_worker) + "
        "t_aggregate; RTT " + ", ".join(f"{k} ({v} rounds)" for k, v in src.items())
    )
    return _save(fig, path)


# ----------------------------------------------------------------------------- compare


def summary_bars(data: Data, summ: pd.DataFrame, path: Path) -> Path:
    """Per configuration: ms per token (mean ± sd) and bytes per token (log scale), side by
    side: the first thing to look at in a run that compares configurations."""
    names = list(summ["config"])
    x = np.arange(len(names))
    colors = [data.styles[n].color if n in data.styles else "grey" for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8.0, 1.5 * len(names) + 3), 4.6))
    a1.bar(x, summ["ms/token"], yerr=summ["ms/token sd"].fillna(0), color=colors,
           edgecolor="black", capsize=3)  # fmt: skip
    a1.set_ylabel("ms per token (mean ± sd)")
    a1.set_title("Latency per generated token")
    a2.bar(x, summ["bytes/token"], color=colors, edgecolor="black")
    a2.set_yscale("log")
    a2.set_ylabel("bytes per token, worker -> server (log)")
    a2.set_title("Upstream bytes per generated token")
    for ax in (a1, a2):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def compare_bars(table: pd.DataFrame, styles: dict[str, Style], a: str, b: str, path: Path) -> Path:
    """ms per token (mean ± sd) per configuration, run A next to run B."""
    names = list(table["config"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4.6))
    for off, side, hatch, lbl in ((-0.2, "A", "", a), (0.2, "B", "//", b)):
        colors = [styles[n].color if n in styles else "grey" for n in names]
        ax.bar(
            x + off, table[f"ms/token {side}"], yerr=table[f"ms/token sd {side}"], width=0.38,
            color=colors, edgecolor="black", hatch=hatch, capsize=3, label=f"{side}: {lbl}",
        )  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize="small")
    ax.set_ylabel("ms per token (mean ± sd)")
    ax.set_title("Latency per configuration: A (plain) vs B (hatched)")
    _legend_right(ax)
    return _save(fig, path)


def compare_ratios(table: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """B / A per configuration and metric (dot plot, 1 = no change)."""
    rows = [
        {"config": c, "metric": m, "ratio": r}
        for c, *vals in table[["config", *[f"{m} B/A" for m in metrics]]].itertuples(index=False)
        for m, r in zip(metrics, vals, strict=True)
        if r is not None and not (isinstance(r, float) and math.isnan(r))
    ]
    df = pd.DataFrame(rows, columns=["config", "metric", "ratio"])
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * max(4, table.shape[0]) + 1.5))
    if not df.empty:
        sns.stripplot(
            data=df, y="config", x="ratio", hue="metric", order=list(table["config"]),
            hue_order=metrics, dodge=True, jitter=False, size=7, palette="colorblind", ax=ax,
        )  # fmt: skip
        pos = df["ratio"][df["ratio"] > 0]
        if len(pos) == len(df) and pos.max() / pos.min() > 10:
            ax.set_xscale("log")
            _plain_log(ax, "x")
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xlabel("B / A")
    ax.set_ylabel("")
    ax.set_title("Change from A to B per configuration (1 = equal)")
    _legend_right(ax, "metric")
    return _save(fig, path)
