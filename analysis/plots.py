"""Seaborn / matplotlib figures of the report and of `analysis compare`; one PNG per function.

Every figure is drawn from the tidy tables of analysis.tables (never from raw rows, except
the ECDFs, which draw the `requests` and `round_times` frames). Every configuration has its
registry style (analysis.styles): name, colour, marker, line style. Error bars are the
tables' 95 % intervals; a point whose interval could not be computed (one repetition) is
drawn without one and the panel says so. Panels are split by the settings that vary besides
the plotted axis (`facets`), so no point averages over link settings. Axes go logarithmic
where values span a factor of 10 or more. Times in ms, sizes in bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.frames import Axis, Results, minimal_columns, setting_labels
from analysis.styles import Style
from analysis.tables import BREAKDOWN_TOKEN, FIDELITY_BETTER

#: Fixed colours of the time components (stacked bars), away from the registry's hues.
COMPONENT_COLORS = {
    "draft": "#8c564b",
    "compute": "#e7ba52",
    "fidelity": "#f7b6d2",
    "network": "#7b68b5",
    "decode": "#17becf",
    "dispatch": "#bcbd22",
    "aggregation": "#d62728",
    "other": "#c7c7c7",
    "outside_rounds": "#5f5f5f",
}
DPI = 130
#: Values spanning at least this factor get a log axis.
LOG_SPAN = 10.0
NO_CI = "no interval where n < 2 (one repetition or pair)"


def theme() -> None:
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend_right(
    ax: Axes, title: str | None = None, handles: list | None = None, gather: object = None
) -> None:
    """A legend right of `ax` with the handles of `ax` (or of every axes in `gather`, an
    array of axes), one per label."""
    labels: list[str] = []
    if handles is None:
        handles = []
        for a in np.asarray(gather).flat if gather is not None else [ax]:
            h, lbl = a.get_legend_handles_labels()
            handles += h
            labels += lbl
    else:
        labels = [h.get_label() for h in handles]
    seen: dict[str, Any] = {}
    for h, lbl in zip(handles, labels, strict=True):
        seen.setdefault(lbl, h)
    if seen:
        ax.legend(
            list(seen.values()), list(seen), title=title, loc="upper left",
            bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small",
        )  # fmt: skip


def _plain_log(ax: Axes, which: str = "xy") -> None:
    """Log axes labelled as plain numbers: 1, 2, 5 x 10^n over up to two decades, powers of
    ten beyond."""
    for name in which:
        axis = ax.xaxis if name == "x" else ax.yaxis
        lo, hi = ax.get_xlim() if name == "x" else ax.get_ylim()
        decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 0.0
        subs = (1.0, 2.0, 5.0) if decades <= 2.2 else (1.0,)
        axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())


def _wide(values: Sequence[float] | np.ndarray | pd.Series) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return v.size >= 2 and float(v.max()) / float(v.min()) >= LOG_SPAN


def _log_y_if_wide(ax: Axes, values: Sequence[float] | np.ndarray | pd.Series) -> None:
    if _wide(values):
        ax.set_yscale("log")
        _plain_log(ax, "y")


def _x_ticks(ax: Axes, values: Sequence[float] | pd.Series, base: int = 2) -> None:
    """Log x (base 2) when the values span a factor of 4; the values as ticks."""
    vals = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    if len(vals) >= 2 and vals[-1] / vals[0] >= 4:
        ax.set_xscale("log", base=base)
    if 0 < len(vals) <= 8:
        ax.set_xticks(vals)
        ax.set_xticklabels([f"{v:g}" for v in vals])
        ax.minorticks_off()


def _errorbar(
    ax: Axes, x: np.ndarray, t: pd.DataFrame, st: Style, label: str, line: bool = True
) -> bool:
    """Mean with its interval as error bars; returns True if some point has no interval."""
    m = t["mean"].to_numpy(dtype=float)
    lo = t["ci_low"].to_numpy(dtype=float)
    hi = t["ci_high"].to_numpy(dtype=float)
    yerr = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
    ax.errorbar(
        x, m, yerr=yerr, color=st.color, marker=st.marker, ls=st.linestyle if line else "none",
        capsize=3, markersize=7, label=label, markeredgecolor="black", markeredgewidth=0.4,
    )  # fmt: skip
    return bool(np.isnan(lo).any() or np.isnan(hi).any())


def _note(ax: Axes, text: str) -> None:
    ax.text(
        0.01, 0.01, text, transform=ax.transAxes, fontsize="x-small", color="#444444",
        va="bottom", ha="left",
    )  # fmt: skip


def _moves_with(table: pd.DataFrame, column: str, axis: str) -> bool:
    """Whether `column` and the plotted `axis` determine each other (e.g. the swept
    `links.default.bw_mbit` and the path bottleneck it sets): then it is the axis itself,
    not a setting to split panels by."""
    if axis not in table or column == axis:
        return column == axis
    pair = table[[column, axis]].astype(str)
    return bool(
        (pair.groupby(axis)[column].nunique() <= 1).all()
        and (pair.groupby(column)[axis].nunique() <= 1).all()
    )


def facets(
    res: Results, table: pd.DataFrame, exclude: Sequence[str] = (), axis: str | None = None
) -> list[tuple[str, pd.DataFrame]]:
    """Sub-tables per value of the settings that vary in `table`, `exclude`d columns aside
    (those an axis plots, and with `axis` every setting that moves one to one with it),
    and the recorded queue sizes (derived from the bandwidth-delay product, they move with
    the links; a swept `links.*.queue_pkts` still splits); titled 'col=value, ...' ('' if
    none varies)."""
    cols = [
        c
        for c in res.settings
        if c not in exclude
        and c in table
        and not (c.endswith("_queue_pkts") and "." not in c)
        and not (axis is not None and _moves_with(table, c, axis))
    ]
    cols = minimal_columns(table, [c for c in cols if table[c].nunique(dropna=False) > 1])
    if not cols:
        return [("", table)]
    order = table.sort_values(cols, kind="stable", na_position="first")
    labels = setting_labels(table, cols)
    ordered = dict.fromkeys(setting_labels(order, cols))
    return [(str(lbl), table[labels == lbl]) for lbl in ordered]


def _grid(
    n: int, ncols_max: int = 3, w: float = 5.4, h: float = 4.0, rows: int = 1
) -> tuple[Figure, np.ndarray]:
    ncols = min(n, ncols_max)
    nrows = rows * math.ceil(n / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(w * ncols + 2.6, h * nrows), squeeze=False)
    return fig, axs


def _hide_unused(axs: np.ndarray, used: int) -> None:
    for ax in list(axs.flat)[used:]:
        ax.set_visible(False)


def _configs(res: Results, table: pd.DataFrame) -> list[str]:
    present = set(table["config"])
    return [c for c in res.config_order() if c in present]


# ----------------------------------------------------------------------------- summary


#: Markers telling settings apart (one dot per setting on a configuration's row).
SETTING_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h")


def _setting_offset(j: int, n: int) -> float:
    """Vertical offset of setting j of n on a configuration's row (rows are 1 apart)."""
    return -0.35 + 0.7 / max(1, n) * (j + 0.5)


def _config_axis(ax: Any, names: list[str], values: pd.Series) -> None:
    """Configurations as rows, top to bottom; a log x axis where the values span decades."""
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize="small")
    ax.invert_yaxis()
    if _wide(values):
        ax.set_xscale("log")
        _plain_log(ax, "x")


def summary(res: Results, table: pd.DataFrame, path: Path) -> Path:
    """Per configuration and setting: ms per token and up bytes per token, 95 % intervals,
    one dot per setting (never pooled over settings)."""
    metrics = [
        ("ms_per_token", "ms per token (end to end)"),
        ("bytes_per_token", "up bytes per token"),
    ]
    names = _configs(res, table)
    settings = list(dict.fromkeys(table["setting"]))
    palette = sns.color_palette("colorblind", max(1, len(settings)))
    fig, axs = plt.subplots(
        1, 2, figsize=(13, 0.42 * len(names) * max(1, len(settings)) ** 0.5 + 2.2)
    )
    missing = False
    for ax, (metric, xlabel) in zip(axs, metrics, strict=True):
        t = table[table["metric"] == metric]
        ys = {c: i for i, c in enumerate(names)}
        for j, s in enumerate(settings):
            d = t[t["setting"] == s]
            y = np.array([ys[c] for c in d["config"]]) + _setting_offset(j, len(settings))
            m = d["mean"].to_numpy(dtype=float)
            lo, hi = d["ci_low"].to_numpy(dtype=float), d["ci_high"].to_numpy(dtype=float)
            missing |= bool(np.isnan(lo).any())
            ax.errorbar(
                m, y, xerr=np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)]),
                ls="none", marker=SETTING_MARKERS[j % len(SETTING_MARKERS)], color=palette[j],
                capsize=2.5, markersize=6, label=s if s != "-" else "all runs",
            )  # fmt: skip
        _config_axis(ax, names, t["mean"])
        ax.set_xlabel(xlabel + (" (log)" if _wide(t["mean"]) else "") + " — lower is better")
    axs[0].set_title("Latency per generated token\nmean and 95 % CI over repetitions")
    axs[1].set_title("Upstream bytes per generated token\n(worker → server, all workers)")
    axs[1].set_yticklabels([])
    if missing:
        _note(axs[0], NO_CI)
    _legend_right(axs[1], "setting")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- link axes


def _lines_vs(res: Results, ax: Axes, t: pd.DataFrame, x: str, names: list[str]) -> bool:
    missing = False
    for cfg in names:
        d = t[t["config"] == cfg].sort_values(x)
        if d.empty:
            continue
        missing |= _errorbar(ax, d[x].to_numpy(dtype=float), d, res.styles[cfg], cfg)
    return missing


def vs_axis(
    res: Results,
    table: pd.DataFrame,
    axis: Axis,
    path: Path,
    ylabel: str,
    title: str,
    ref: float | None = None,
) -> Path:
    """One line per configuration of `table`'s mean vs `axis`, one panel per setting of
    the other settings (and per baseline, if the table has one)."""
    rows = list(dict.fromkeys(table["baseline"])) if "baseline" in table else [None]
    cols = facets(res, table, axis.related, axis.column)
    ncols = len(cols)
    fig, axs = plt.subplots(
        len(rows), ncols, figsize=(5.6 * ncols + 2.8, 4.3 * len(rows)), squeeze=False
    )
    names = _configs(res, table)
    for (r, row), (c, (label, part)) in itertools.product(enumerate(rows), enumerate(cols)):
        ax = axs[r][c]
        sub = part if row is None else part[part["baseline"] == row]
        if sub.empty:
            ax.text(0.5, 0.5, "no pairs in this setting", transform=ax.transAxes, ha="center")
            ax.set_axis_off()
            continue
        missing = _lines_vs(res, ax, sub, axis.column, names)
        _x_ticks(ax, sub[axis.column])
        ax.set_xlabel(axis.label)
        _log_y_if_wide(ax, sub[["mean", "ci_low", "ci_high"]].to_numpy().ravel())
        yl = ylabel if row is None else ylabel.format(baseline=row)
        ax.set_ylabel(yl)
        if ref is not None:
            ax.axhline(ref, color="black", lw=0.9, ls="--")
        ax.set_title(
            (f"{title}" if row is None else f"{title} over {row}")
            + (f"\n{label}" if label else ""),
            fontsize="medium",
        )
        if missing:
            _note(ax, NO_CI)
    _legend_right(axs[0][-1], "configuration", gather=axs)
    fig.tight_layout()
    return _save(fig, path)


def latency_vs(res: Results, table: pd.DataFrame, axis: Axis, path: Path) -> Path:
    """ms per token vs a link axis (bandwidth or path RTT), 95 % CI over repetitions."""
    return vs_axis(
        res, table, axis, path, "ms per token (lower is better)",
        f"Latency vs {axis.label.split(' (')[0]}, mean ± 95 % CI",
    )  # fmt: skip


def speedup_vs(res: Results, table: pd.DataFrame, axis: Axis, path: Path) -> Path:
    """Paired speedup over federated AR (top row) and SD-full (bottom row) vs a link axis."""
    return vs_axis(
        res, table, axis, path, "speedup over {baseline} (×; > 1 = faster)",
        "Paired speedup", ref=1.0,
    )  # fmt: skip


def speedup_dots(res: Results, table: pd.DataFrame, path: Path) -> Path:
    """Paired speedup per configuration when no link parameter varies: one panel per
    baseline, one dot per setting."""
    baselines = list(dict.fromkeys(table["baseline"]))
    names = _configs(res, table)
    fig, axs = plt.subplots(
        1, len(baselines), figsize=(6.2 * len(baselines) + 2, 0.45 * len(names) + 2), squeeze=False
    )
    settings = list(dict.fromkeys(table["setting"])) if "setting" in table else [""]
    for ax, b in zip(axs[0], baselines, strict=True):
        t = table[table["baseline"] == b]
        ys = {c: i for i, c in enumerate(names)}
        for cfg, d in t.groupby("config", sort=False):
            st = res.styles[str(cfg)]
            for j, setting in enumerate(settings):  # one dot per setting, offset, own marker
                ds = d[d["setting"] == setting] if "setting" in d else d
                if ds.empty:
                    continue
                off = _setting_offset(j, len(settings))
                y = np.full(len(ds), ys[str(cfg)] + off, dtype=float)
                m = ds["mean"].to_numpy(dtype=float)
                err = np.vstack([np.nan_to_num(m - ds["ci_low"]), np.nan_to_num(ds["ci_high"] - m)])
                marker = SETTING_MARKERS[j % len(SETTING_MARKERS)] if len(settings) > 1 else None
                ax.errorbar(m, y, xerr=err, ls="none", marker=marker or st.marker,
                            color=st.color, capsize=3)  # fmt: skip
        if len(settings) > 1:
            for j, setting in enumerate(settings):
                ax.plot([], [], ls="none", color="grey", label=str(setting),
                        marker=SETTING_MARKERS[j % len(SETTING_MARKERS)])  # fmt: skip
            ax.legend(title="setting", fontsize="small", loc="best")
        ax.axvline(1.0, color="black", lw=0.9, ls="--")
        _config_axis(ax, names, t["mean"])
        ax.set_xlabel(f"speedup over {b} (×; > 1 = faster)")
        ax.set_title(f"Paired speedup over {b}, geometric mean ± 95 % CI")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- distributions


def ecdf(res: Results, path: Path) -> Path:
    """ECDFs of per-round time, ms per token and TTFT per configuration; one row of panels
    per setting."""
    req = res.included_requests
    rt = res.included_round_times
    panels = [
        (rt, "t_round_ms", "round time (ms)"),
        (req, "ms_per_token", "ms per token"),
        (req, "ttft_ms", "time to first token (ms)"),
    ]
    rows = facets(res, req)
    fig, axs = plt.subplots(len(rows), 3, figsize=(16.5, 3.6 * len(rows) + 0.6), squeeze=False)
    names = _configs(res, req)
    for r, (label, sub) in enumerate(rows):
        for c, (df, col, xlabel) in enumerate(panels):
            ax = axs[r][c]
            d = df[df["setting"].isin(set(sub["setting"]))]
            for cfg in names:
                v = np.sort(d.loc[d["config"] == cfg, col].dropna().to_numpy(dtype=float))
                if v.size == 0:
                    continue
                st = res.styles[cfg]
                y = np.arange(1, v.size + 1) / v.size
                ax.step(np.r_[v[0], v], np.r_[0.0, y], where="post", color=st.color,
                        ls=st.linestyle, label=cfg)  # fmt: skip
                ax.plot(v[-1:], y[-1:], marker=st.marker, color=st.color, ls="none")
            if _wide(d[col]):
                ax.set_xscale("log")
                _plain_log(ax, "x")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("fraction ≤ x")
            ax.set_ylim(0, 1.02)
            ax.set_title((f"{xlabel}" + (f"\n{label}" if label else "")), fontsize="medium")
    fig.suptitle("Empirical CDFs (left is better; marker at each configuration's maximum)")
    _legend_right(axs[0][-1], "configuration", gather=axs)
    fig.tight_layout()
    return _save(fig, path)


def accepted_length(res: Results, table: pd.DataFrame, path: Path) -> Path:
    """Tokens emitted per round: fraction of rounds per value, one panel per configuration,
    one bar per setting."""
    names = _configs(res, table)
    settings = list(dict.fromkeys(table["setting"]))
    palette = sns.color_palette("colorblind", max(1, len(settings)))
    fig, axs = _grid(len(names), 4, 4.0, 3.2)
    width = 0.8 / max(1, len(settings))
    for ax, cfg in zip(axs.flat, names, strict=False):
        t = table[table["config"] == cfg]
        st = res.styles[cfg]
        for j, s in enumerate(settings):
            d = t[t["setting"] == s]
            ax.bar(
                d["tokens_emitted"] - 0.4 + width * (j + 0.5), d["fraction"], width=width,
                color=palette[j], edgecolor=st.color, linewidth=1.5,
                label=s if s != "-" else "all runs",
            )  # fmt: skip
        gmax = int(t["gamma"].max()) + 1 if len(t) else 1
        ax.set_xticks(range(1, gmax + 1))
        ax.set_xlim(0.4, gmax + 0.6)
        ax.set_ylim(0, 1.05)
        n = int(t["n_rounds"].max()) if len(t) else 0
        ax.set_title(
            f"{cfg} ({n} rounds)",
            fontsize="small",
            color=st.color if st.color != "#1b1b1b" else "black",
        )
        ax.set_xlabel("tokens emitted per round")
        ax.set_ylabel("fraction of rounds")
    _hide_unused(axs, len(names))
    fig.suptitle("Accepted length: tokens emitted per round (rounds that drafted the full γ)")
    handles = [
        Patch(facecolor=palette[j], label=s if s != "-" else "all runs")
        for j, s in enumerate(settings)
    ]
    _legend_right(axs.flat[min(len(names), axs.shape[1]) - 1], "setting", handles)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- breakdown


def breakdown(res: Results, table: pd.DataFrame, path: Path) -> Path:
    """Stacked mean time per token (top row) and per round (bottom row) along the critical
    path, one column per setting; components add up to ms per token / round time."""
    cols = facets(res, table)
    names = _configs(res, table)
    width = max(4.6, 0.5 * len(names) + 1.6)
    fig, axs = plt.subplots(2, len(cols), figsize=(width * len(cols) + 2, 9.0), squeeze=False)
    for c, (label, sub) in enumerate(cols):
        for r, per in enumerate(("token", "round")):
            ax = axs[r][c]
            t = sub[sub["per"] == per]
            x = np.arange(len(names))
            bottom = np.zeros(len(names))
            comps = BREAKDOWN_TOKEN if per == "token" else BREAKDOWN_TOKEN[:-1]
            for comp in comps:
                v = t[t["component"] == comp].set_index("config")["mean"].reindex(names)
                vals = np.nan_to_num(np.clip(v.to_numpy(dtype=float), 0, None))
                ax.bar(x, vals, bottom=bottom, color=COMPONENT_COLORS[comp], label=comp, width=0.7)
                bottom += vals
            tot = t[t["component"] == "total"].set_index("config").reindex(names)
            m = tot["mean"].to_numpy(dtype=float)
            err = np.vstack([np.nan_to_num(m - tot["ci_low"]), np.nan_to_num(tot["ci_high"] - m)])
            ax.errorbar(
                x, m, yerr=err, ls="none", color="black", capsize=3, label="total ± 95 % CI"
            )
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize="small")
            ax.set_ylabel(f"ms per {per} (mean)")
            head = f"Per {per}" + (f" — {label}" if label else "")
            ax.set_title(head, fontsize="medium")
    fig.suptitle(
        "Time along the critical path (the worker whose reply arrived last); the components "
        "add up to ms per token (top) and to the round time (bottom)"
    )
    _legend_right(axs[0][-1], "component", gather=axs)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- K axis


def _family_k(res: Results, ax: Axes, t: pd.DataFrame, ref: pd.DataFrame | None = None) -> bool:
    """Lossy families vs K (mean ± CI), full configurations as horizontal lines."""
    missing = False
    lossy = t[t["transmission"] != "full"]
    fams = [st.name for st in sorted(res.family_styles.values(), key=lambda s: s.order)]
    for fam in fams:
        d = lossy[lossy["family"] == fam].sort_values("k")
        if d.empty:
            continue
        missing |= _errorbar(ax, d["k"].to_numpy(dtype=float), d, res.family_styles[fam], fam)
        for _, row in d.iterrows():  # K's own marker and colour on top of the family line
            st = res.styles.get(str(row["config"]))
            if st is not None:
                ax.plot([row["k"]], [row["mean"]], marker=st.marker, color=st.color, ls="none",
                        markersize=8, markeredgecolor="black", markeredgewidth=0.5)  # fmt: skip
    if ref is not None:
        for cfg, g in ref.groupby("config", sort=False):
            st = res.styles[str(cfg)]
            ax.axhline(
                float(g["mean"].mean()), color=st.color, ls=st.linestyle, lw=1.3, label=str(cfg)
            )
    _x_ticks(ax, lossy["k"])
    ax.set_xlabel("K (kept entries per position)")
    return missing


def acceptance_vs_k(res: Results, summary: pd.DataFrame, path: Path) -> Path:
    """Acceptance (Wilson 95 %) and tokens per round (t 95 %) vs K; full transmission as
    horizontal lines; one column per setting."""
    s = summary[summary["metric"].isin(["acceptance", "tokens_per_round"])]
    cols = facets(res, s)
    fig, axs = plt.subplots(2, len(cols), figsize=(5.6 * len(cols) + 2.8, 8.2), squeeze=False)
    for c, (label, sub) in enumerate(cols):
        for r, (metric, ylabel) in enumerate(
            (
                ("acceptance", "acceptance (accepted / drafted)"),
                ("tokens_per_round", "tokens per round"),
            )
        ):
            ax = axs[r][c]
            t = sub[(sub["metric"] == metric) & (sub["gamma"] > 0)]
            missing = _family_k(res, ax, t, t[t["transmission"] == "full"])
            ax.set_ylabel(ylabel + " — higher is better")
            if metric == "acceptance":
                ax.set_ylim(-0.03, 1.03)
            else:
                ax.set_ylim(bottom=0)
            ax.set_title(
                f"{ylabel.split(' (')[0].capitalize()} vs K" + (f"\n{label}" if label else ""),
                fontsize="medium",
            )
            if missing:
                _note(ax, NO_CI)
    _legend_right(axs[0][-1], gather=axs)
    fig.tight_layout()
    return _save(fig, path)


def bytes_vs_k(res: Results, table: pd.DataFrame, path: Path) -> Path:
    """Log-log: up bytes per worker-round and per token vs K, measured (markers) over the
    documented formula (wide band); full transmission as horizontal lines."""
    fig, axs = plt.subplots(1, 2, figsize=(12.5, 4.6))
    t = table.drop_duplicates(["config"])  # bytes do not depend on link settings
    lossy = t[t["transmission"] != "full"]
    full = t[t["transmission"] == "full"]
    for ax, (meas, form, what) in zip(
        axs,
        (
            ("up_bytes_measured", "up_bytes_formula", "up bytes per worker and round"),
            ("bytes_per_token_measured", "bytes_per_token_formula", "up bytes per generated token"),
        ),
        strict=True,
    ):
        for fam, g in lossy.groupby("family", sort=False):
            st = res.family_styles[str(fam)]
            g = g.sort_values("k")
            ax.plot(g["k"], g[form], color=st.color, lw=6, alpha=0.25, solid_capstyle="round")
            ax.plot(g["k"], g[meas], color=st.color, ls=st.linestyle, label=f"{fam}")
            for _, row in g.iterrows():
                cs = res.styles[str(row["config"])]
                ax.plot([row["k"]], [row[meas]], marker=cs.marker, color=cs.color, ls="none",
                        markeredgecolor="black", markeredgewidth=0.5)  # fmt: skip
        for _, row in full.iterrows():
            st = res.styles[str(row["config"])]
            ax.axhline(row[meas], color=st.color, ls=st.linestyle, lw=1.2, label=str(row["config"]))
            ax.axhline(row[form], color=st.color, lw=6, alpha=0.2)
        ax.plot([], [], color="grey", lw=6, alpha=0.3, label="documented formula (wide band)")
        _x_ticks(ax, lossy["k"])
        ax.set_yscale("log")
        ax.set_xlabel("K (kept entries per position)")
        ax.set_ylabel(f"{what} (bytes, log)")
        ax.set_title(what.capitalize())
    v = table["vocab_size"].dropna().unique()
    fig.suptitle(
        "Up bytes vs K: measured vs specfed.wire.reply_frame_bytes(codec size)"
        + (f"; V = {v[0]:,.0f}" if len(v) == 1 else "")
    )
    _legend_right(axs[1])
    fig.tight_layout()
    return _save(fig, path)


_FIDELITY_LABELS = {
    "identical_fraction": "fraction identical to full",
    "first_divergence": "first differing token (index)",
    "acceptance_diff": "acceptance, lossy − full",
    "logp_diff": "log p per token, lossy − full (nats)",
}


def fidelity_vs_k(res: Results, table: pd.DataFrame, path: Path) -> Path:
    """Paired fidelity vs full transmission vs K, one panel per metric (the title says which
    way is better), one row per setting."""
    metrics = [m for m in _FIDELITY_LABELS if m in set(table["metric"])]
    rows = facets(res, table)
    fig, axs = plt.subplots(
        len(rows),
        len(metrics),
        figsize=(4.8 * len(metrics) + 2.6, 3.9 * len(rows) + 0.4),
        squeeze=False,
    )
    for r, (label, sub) in enumerate(rows):
        for c, metric in enumerate(metrics):
            ax = axs[r][c]
            missing = _family_k(res, ax, sub[sub["metric"] == metric])
            if metric in ("acceptance_diff", "logp_diff"):
                ax.axhline(0, color="black", lw=0.8)
            if metric == "identical_fraction":
                ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(_FIDELITY_LABELS[metric])
            better = FIDELITY_BETTER[metric].split(" (")[0]
            arrow = {"higher": "↑", "closer to 0": "→0←"}.get(better, "")
            head = _FIDELITY_LABELS[metric].split(",")[0].capitalize()
            ax.set_title(
                f"{head} — {better} is better {arrow}" + (f"\n{label}" if label else ""),
                fontsize="medium",
            )
            if missing:
                _note(ax, NO_CI)
    fig.suptitle("Fidelity vs full transmission on the same prompt and seed (paired; 95 % CI)")
    _legend_right(axs[0][-1], "family", gather=axs)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- trade-off


def tradeoff(res: Results, summary: pd.DataFrame, fidelity: pd.DataFrame, path: Path) -> Path:
    """ms per token against bytes per token and against fidelity (identical fraction, and
    log p difference if measured), one dot per configuration, one row per setting. Better
    is down and left for bytes, down and right for fidelity."""
    ms = summary[summary["metric"] == "ms_per_token"]
    by = summary[summary["metric"] == "bytes_per_token"][[*res.keys, "mean"]]
    base = ms.merge(by.rename(columns={"mean": "bytes_per_token"}), on=res.keys, how="left")
    xs: list[tuple[str, str]] = [("bytes_per_token", "up bytes per token (log) — left is better")]
    for metric in ("identical_fraction", "logp_diff"):
        f = fidelity[fidelity["metric"] == metric] if not fidelity.empty else fidelity
        if len(f):
            base = base.merge(
                f[[*res.keys, "mean"]].rename(columns={"mean": metric}), on=res.keys, how="left"
            )
            better = "right" if metric == "identical_fraction" else "closer to 0"
            xs.append((metric, f"{_FIDELITY_LABELS[metric]} — {better} is better"))
    rows = facets(res, base)
    fig, axs = plt.subplots(
        len(rows), len(xs), figsize=(5.2 * len(xs) + 2.8, 4.0 * len(rows) + 0.4), squeeze=False
    )
    names = _configs(res, base)
    for r, (label, sub) in enumerate(rows):
        for c, (x, xlabel) in enumerate(xs):
            ax = axs[r][c]
            for cfg in names:
                d = sub[sub["config"] == cfg]
                if x not in d or d[x].isna().all():
                    continue
                st = res.styles[cfg]
                m = d["mean"].to_numpy(dtype=float)
                err = np.vstack([np.nan_to_num(m - d["ci_low"]), np.nan_to_num(d["ci_high"] - m)])
                ax.errorbar(d[x], m, yerr=err, ls="none", marker=st.marker, color=st.color,
                            markersize=8, capsize=3, label=cfg, markeredgecolor="black",
                            markeredgewidth=0.4)  # fmt: skip
            if x == "bytes_per_token":
                ax.set_xscale("log")
                _plain_log(ax, "x")
            elif x == "identical_fraction":
                ax.set_xlim(-0.05, 1.05)
            else:
                ax.axvline(0, color="black", lw=0.8)
            _log_y_if_wide(ax, sub["mean"])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms per token — lower is better")
            ax.set_title(
                ("Latency vs " + x.replace("_", " ")) + (f"\n{label}" if label else ""),
                fontsize="medium",
            )
    _legend_right(axs[0][-1], "configuration", gather=axs)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- bound


def bound(res: Results, rounds: pd.DataFrame, path: Path) -> Path:
    """Measured round time vs the analytic lower bound (per round), and the ratio."""
    names = _configs(res, rounds)
    fig, axs = plt.subplots(
        1, 2, figsize=(14, 0.3 * len(names) + 4.4), gridspec_kw={"width_ratios": [1, 1.2]}
    )
    ax = axs[0]
    for cfg in names:
        d = rounds[rounds["config"] == cfg]
        st = res.styles[cfg]
        ax.scatter(
            d["bound_ms"],
            d["t_round_ms"],
            marker=st.marker,
            color=st.color,
            s=24,
            alpha=0.75,
            label=cfg,
        )
    lo = float(np.nanmin(rounds[["bound_ms", "t_round_ms"]].to_numpy())) * 0.8
    hi = float(np.nanmax(rounds[["bound_ms", "t_round_ms"]].to_numpy())) * 1.25
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="measured = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _plain_log(ax)
    ax.set_xlabel("analytic lower bound per round (ms)")
    ax.set_ylabel("measured round time (ms)")
    ax.set_title("Round time vs lower bound (one point per round)")
    handles, _ = ax.get_legend_handles_labels()
    ax = axs[1]
    for i, cfg in enumerate(names):
        d = rounds[rounds["config"] == cfg]
        st = res.styles[cfg]
        jitter = np.random.default_rng(i).uniform(-0.25, 0.25, len(d))
        ax.scatter(d["ratio"], i + jitter, color=st.color, marker=st.marker, s=14, alpha=0.6)
        ax.scatter([d["ratio"].mean()], [i], marker="|", s=400, color="black", zorder=5)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize="small")
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xlim(left=min(0.98, float(rounds["ratio"].min()) - 0.02))
    ax.set_xlabel("measured / bound (>= 1 expected; dashed: 1)")
    ax.set_title("Ratio per round (black bar: mean)")
    _legend_right(ax, "configuration", handles)
    src = rounds["rtt_source"].value_counts()
    fig.suptitle(
        "Analytic lower bound: t_draft + max_w(RTT_w + bytes / path bottleneck + t_worker) + "
        "t_aggregate; RTT " + ", ".join(f"{k} ({v} rounds)" for k, v in src.items())
    )
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- compare


def compare_bars(table: pd.DataFrame, styles: dict[str, Style], a: str, b: str, path: Path) -> Path:
    """ms per token (mean ± 95 % CI over repetitions) per configuration, run A next to B."""
    t = table[table["metric"] == "ms_per_token"]
    names = list(t["label"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4.6))
    for off, side, hatch, lbl in ((-0.2, "a", "", a), (0.2, "b", "//", b)):
        colors = [styles[c].color if c in styles else "grey" for c in t["config"]]
        m = t[f"mean_{side}"].to_numpy(dtype=float)
        err = np.vstack(
            [np.nan_to_num(m - t[f"ci_low_{side}"]), np.nan_to_num(t[f"ci_high_{side}"] - m)]
        )
        ax.bar(
            x + off, m, yerr=err, width=0.38, color=colors, edgecolor="black", hatch=hatch,
            capsize=3, label=f"{side.upper()}: {lbl}",
        )  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize="small")
    ax.set_ylabel("ms per token (mean ± 95 % CI)")
    _log_y_if_wide(ax, t[["mean_a", "mean_b"]].to_numpy().ravel())
    ax.set_title("Latency per configuration: A (plain) vs B (hatched)")
    _legend_right(ax)
    return _save(fig, path)


def compare_ratios(table: pd.DataFrame, path: Path) -> Path:
    """B / A per configuration and metric (dot plot, 1 = no change)."""
    df = table[np.isfinite(table["ratio_b_a"].astype(float))]
    labels = list(dict.fromkeys(table["label"]))
    metrics = list(dict.fromkeys(table["metric"]))
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * max(4, len(labels)) + 1.5))
    if not df.empty:
        sns.stripplot(
            data=df, y="label", x="ratio_b_a", hue="metric", order=labels, hue_order=metrics,
            dodge=True, jitter=False, size=7, palette="colorblind", ax=ax,
        )  # fmt: skip
        pos = df["ratio_b_a"][df["ratio_b_a"] > 0]
        if len(pos) == len(df) and _wide(pos):
            ax.set_xscale("log")
            _plain_log(ax, "x")
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.set_xlabel("B / A")
    ax.set_ylabel("")
    ax.set_title("Change from A to B per configuration (1 = equal)")
    _legend_right(ax, "metric")
    return _save(fig, path)


__all__ = [
    "acceptance_vs_k",
    "accepted_length",
    "bound",
    "breakdown",
    "bytes_vs_k",
    "compare_bars",
    "compare_ratios",
    "ecdf",
    "facets",
    "fidelity_vs_k",
    "latency_vs",
    "speedup_dots",
    "speedup_vs",
    "summary",
    "theme",
    "tradeoff",
]


def rate_over_time(rates: pd.DataFrame, path: Path) -> Path:
    """Trace-driven links: each traced direction's rate at every round's start (line) and
    the round times (dots, one colour per transmission), against time since the first
    round."""
    keys = list(rates.groupby(["run", "link", "direction"]).groups)
    fig, axs = plt.subplots(len(keys), 1, figsize=(8, 2.8 * len(keys)), squeeze=False)
    for ax, key in zip(axs[:, 0], keys, strict=True):
        part = rates[(rates.run == key[0]) & (rates.link == key[1]) & (rates.direction == key[2])]
        part = part.sort_values("t_s")
        ax.step(part["t_s"], part["rate_mbit"], where="post", color="0.3", label="link rate")
        ax.set_ylabel("rate, Mbit/s")
        ax.set_xlabel("time since the first round, s")
        ax.set_title(f"{key[1]} {key[2]} ({part['trace'].iloc[0]}), run {key[0]}", fontsize=9)
        right = ax.twinx()
        for name, grp in part.groupby("transmission", dropna=False):
            right.plot(grp["t_s"], grp["t_round_ms"], ".", label=f"round time, {name}")
        right.set_ylabel("round time, ms")
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc="upper right")
    return _save(fig, path)
