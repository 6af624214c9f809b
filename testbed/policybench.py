"""Benchmarks of the policies (root, Mininet): each run writes JSON and plots.

    python -m testbed.policybench pareto --setting demo|demo-trace|star32 [--models qwen|tiny]
        [--compute live|replay] [--profiles auto|recorded] [--reps 3]
        [--prompts "humaneval[:2]"] [--max-new-tokens 32] [--budgets 1,4,16]
        [--fit-profiles LIVE_RUN_DIR] [--w2-link YAML] [--set PATH=VALUE ...] [--out DIR]
        One point per policy on one setting, same prompts and coupled seeds: the paper's
        fixed top-64 (the reference), fixed top-16 / top-256, link-aware K at each upload
        budget (from the link; live also from observed throughput), adaptive gamma
        (heuristic; live also cost-based) with top-64 and with link-aware K, and full
        transmission (the fidelity reference, per gamma policy). Writes the run folder,
        policies.json (per point: ms/token, tokens/round, fidelity, with 95 % confidence
        intervals: timings over repetitions, fidelity over prompts), pareto.png (ms/token
        vs each fidelity measure) and gamma.png (adaptive vs fixed gamma = 4: tokens per
        round, ms/token).

    python -m testbed.policybench stragglers [--models qwen|tiny] [--link slow|lossy]
        [--deadlines 300] [--reps 3] [--out DIR]
        A star of three workers, w3 behind a slow (1 Mbit/s, 150 ms one way) or lossy (5 %)
        link, live: wait for all vs quorum 2 vs deadline D, each with top-64, and full
        transmission (the fidelity reference). Writes stragglers.json and stragglers.png.

    python -m testbed.policybench report RUN_DIR [--reference topk64]
        Recompute policies.json and the plots from an existing run folder (loads the
        models for the fidelity pass; no network, no root).

Settings. demo: scenarios/demo.yaml's star (w1 Qwen2.5-Coder-1.5B on 20 Mbit/s / 20 ms,
w2 -0.5B on 5 Mbit/s / 50 ms; live). demo-trace: the same star with w2's link replaced by
--w2-link, a YAML mapping (default: the trace-driven link '{trace: {file:
scenarios/traces/fading-5mbit.csv, format: csv}, delay_ms: 50}', 5 -> 1 -> 2.5 Mbit/s for
10 s each, looping). star32: scenarios/scale.yaml's 32-worker star (5 / 20 / 100 Mbit/s,
5-50 ms, two worker models) in replay with the shipped
device profiles. `--compute replay` emulates compute with the shipped device profiles
(`--profiles recorded`: each point's recorded times; `--fit-profiles`: profiles fitted from
an earlier live run, this host's contention included); replay runs only
the content-only policies (fixed K, K from the link, heuristic gamma). `--models tiny` swaps
in tiny random-weight models (V = 8192; seconds, for checking the pipeline: their
acceptance and fidelity mean nothing).

Fidelity, per request against the full-transmission request of the same prompt, seed and
gamma policy (coupled seeds): identical = the share of generated tokens before the first
difference; dlogp = the request's mean log p of its tokens under the exact ensemble minus
the full request's (positive: sharper than the ensemble, as renormalized top-K makes it);
l1 = the mean over generated positions of ||p - p_hat||_1, p the exact ensemble, p_hat what
the server aggregated there (each used worker's top-K_i of that round, reconstructed, over
the replies that arrived with their renormalized weights), recomputed here with the models
(one forward pass per model and request).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from specfed.config import load_yaml, parse_yaml_text, set_path
from specfed.provenance import REPO

__all__ = [
    "dominance",
    "fidelity_table",
    "point_table",
    "policy_label",
    "policy_sweep",
    "setting_scenario",
]

TINY = {"draft": "tiny-v8192-s1", "w1": "tiny-v8192-s2", "w2": "tiny-v8192-s3"}
REFERENCE = "topk64"


# ----------------------------------------------------------------------------- scenarios


#: demo-trace's default slow link: 5 -> 1 -> 2.5 Mbit/s, 10 s each, looping.
FADING_TRACE = REPO / "scenarios" / "traces" / "fading-5mbit.csv"


def setting_scenario(
    setting: str, models: str, prompts: str, max_new_tokens: int, w2_link: Any = None
) -> dict[str, Any]:
    """The base scenario (no sweep) of a setting, as a mapping."""
    if setting in ("demo", "demo-trace"):
        raw = load_yaml(REPO / "scenarios" / "demo.yaml")
        raw.pop("sweep", None)
        if setting == "demo-trace":
            if w2_link is None:
                w2_link = {"trace": {"file": str(FADING_TRACE), "format": "csv"}, "delay_ms": 50}
            if not isinstance(w2_link, dict):
                raise SystemExit(
                    "policybench: --w2-link must be a YAML mapping for w2's link "
                    "(e.g. a trace-driven link: '{trace: {file: F, format: csv}, delay_ms: 50}')"
                )
            raw["links"]["w2"] = w2_link
    elif setting == "star32":
        raw = _scale_block(32)
        raw["compute"] = {"mode": "replay", "profiles": default_profiles(models)}
    else:
        raise SystemExit(f"policybench: unknown setting {setting!r} (demo, demo-trace, star32)")
    raw["decoding"] = {
        **raw.get("decoding", {}),
        "gamma": 4,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
    }
    raw["transmission"] = {"mode": "topk", "k": 64, "reconstruction": "renormalize"}
    raw["random_order"] = True
    raw.setdefault("timeouts", {})["point_s"] = 3600
    if models == "tiny":
        raw["models"] = _tiny_models(raw["models"])
    return raw


def default_profiles(models: str) -> str:
    """Replay's compute: the shipped device profiles for the real models; tiny test models
    have none, so they replay their recorded times."""
    return "recorded" if models == "tiny" else "auto"


def _scale_block(n_workers: int) -> dict[str, Any]:
    """scenarios/scale.yaml with its N = `n_workers` block applied (models, links), no sweep."""
    raw = load_yaml(REPO / "scenarios" / "scale.yaml")
    for block in raw.pop("sweep"):
        if block["topology.params.n_workers"] == [n_workers]:
            raw["topology"]["params"]["n_workers"] = n_workers
            raw["models"]["workers"] = block["models.workers"][0]
            raw["links"] = block["links"][0]
            return raw
    raise SystemExit(f"policybench: scenarios/scale.yaml has no block with N = {n_workers}")


def _tiny_models(m: dict[str, Any]) -> dict[str, Any]:
    """The same roles on tiny random-weight models (two worker models, like the real)."""
    names = list(m["workers"])
    workers = {w: TINY["w1"] if i % 2 == 0 else TINY["w2"] for i, w in enumerate(names)}
    return {**m, "draft": TINY["draft"], "workers": workers, "dtype": "fp32"}


def policy_sweep(live: bool, budgets: Sequence[float]) -> list[dict[str, list[Any]]]:
    """The policies of the Pareto comparison as sweep blocks (their union).

    Content-only policies always; the timing-dependent ones (K from observed throughput,
    cost-based gamma) only live. Full transmission per gamma policy is the fidelity
    reference of the points with that policy."""
    mid = [sorted(budgets)[len(budgets) // 2]]
    gammas = ["fixed", "heuristic", *(["cost"] if live else [])]
    blocks: list[dict[str, list[Any]]] = [
        {"transmission": ["full"], "gamma_policy": gammas},
        {"transmission": ["topk"], "k": [16, 64, 256], "gamma_policy": ["fixed"]},
        {"transmission": ["topk"], "k": ["auto"], "k_budget_ms": list(budgets)},
        {"transmission": ["topk"], "k": [64], "gamma_policy": gammas[1:]},
        {
            "transmission": ["topk"],
            "k": ["auto"],
            "k_budget_ms": mid,
            "gamma_policy": ["heuristic"],
        },
    ]
    if live:
        blocks.append(
            {
                "transmission": ["topk"],
                "k": ["auto"],
                "k_budget_ms": mid,
                "transmission.k_source": ["observed"],
            }
        )
    return blocks


def straggler_scenario(models: str, link: str, deadlines: Sequence[float]) -> dict[str, Any]:
    """Three workers, w3 behind a slow or lossy link; wait for all vs quorum 2 vs deadline."""
    slow = {"bw_mbit": 1, "delay_ms": 150} if link == "slow" else {
        "bw_mbit": 20, "delay_ms": 20, "loss_pct": 5,
    }  # fmt: skip
    raw: dict[str, Any] = {
        "seed": 11,
        "random_order": True,
        "topology": {"name": "star", "params": {"n_workers": 3}},
        "links": {
            "default": {"bw_mbit": 100, "delay_ms": 1},
            "w1": {"bw_mbit": 20, "delay_ms": 20},
            "w2": {"bw_mbit": 20, "delay_ms": 20},
            "w3": slow,
        },
        "models": {
            "draft": "qwen2.5-coder-0.5b",
            "workers": {
                "w1": "qwen2.5-coder-1.5b",
                "w2": "qwen2.5-coder-0.5b",
                "w3": "qwen2.5-coder-0.5b",
            },
            "dtype": "bf16",
        },
        "decoding": {"gamma": 4, "temperature": 1.0, "max_new_tokens": 32,
                     "prompts": "humaneval[:2]"},
        "transmission": {"mode": "topk", "k": 64, "reconstruction": "renormalize"},
        "sweep": [
            {"transmission": ["full"]},
            {"transmission": ["topk"], "aggregation": [{"wait": "all"}, {"quorum": 2}]},
            {"transmission": ["topk"], "deadline_ms": list(deadlines)},
        ],
        "network": {"calibrate": True},
        "timeouts": {"worker_ready_s": 600, "point_s": 3600, "round_s": 600},
    }  # fmt: skip
    if models == "tiny":
        raw["models"] = {**_tiny_models(raw["models"]), "workers": {
            "w1": TINY["w1"], "w2": TINY["w2"], "w3": TINY["w2"]}}  # fmt: skip
    return raw


def fit_profiles(run_dir: Path, raw: dict[str, Any], out: Path) -> dict[str, str]:
    """A device profile per role (draft, each worker host) fitted from a run's rounds:
    every point then waits the same cost model (a point's recorded times differ by the noise
    of the moment it was recorded). Roles missing from the run fall back to `default`."""
    from specfed.profile import role_profiles_from_rounds

    rounds = pd.read_csv(run_dir / "rounds.csv", low_memory=False)
    notes = f"fitted from the run {run_dir} (its contention)"
    return role_profiles_from_rounds(rounds, raw["models"], out / "fitted-profiles", notes)


def _run(raw: dict[str, Any], name: str, out: Path, reps: int, force: bool) -> Path:
    """Run a scenario given as a mapping; return its run folder (raises on failure)."""
    from testbed.runner import run_scenario
    from testbed.scenario import check_scenario, scenario_from_dict

    raw = {**raw, "name": name, "repetitions": reps}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    sc = scenario_from_dict(raw, str(path), path)
    check_scenario(sc)
    run_dir, ok = run_scenario(sc, out, progress=False, force=force)
    if not ok:
        raise SystemExit(f"policybench: run {run_dir} failed; see its meta.json and logs/")
    return run_dir


# ----------------------------------------------------------------------------- fidelity


def policy_label(row: pd.Series) -> str:
    """A point's policy in a few words: 'topk64', 'auto4ms', 'auto4ms-observed',
    'topk64+heuristic', 'full+cost', 'topk64 quorum2', 'topk64 deadline300ms'."""
    if row["transmission"] == "full":
        k = "full"
    elif row.get("k_policy") == "auto":
        k = f"auto{float(row['k_budget_ms']):g}ms"
        if row.get("k_source") == "observed":
            k += "-observed"
    else:
        k = f"{row['transmission']}{int(float(row['k']))}"
    g = row.get("gamma_policy", "fixed")
    label = k if g in ("fixed", None) or (isinstance(g, float) and math.isnan(g)) else f"{k}+{g}"
    agg = row.get("aggregation", "all")
    if agg == "quorum":
        label += f" quorum{int(float(row['quorum']))}"
    elif agg == "deadline":
        label += f" deadline{float(row['deadline_ms']):g}ms"
    return label


def _tokens(cell: Any) -> list[int]:
    if not isinstance(cell, str) or not cell.strip():
        return []
    return [int(t) for t in cell.split()]


def _load_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    scenario = yaml.safe_load((run_dir / "scenario.yaml").read_text())
    requests = pd.read_csv(run_dir / "requests.csv", dtype={"tokens": str}, low_memory=False)
    rounds = pd.read_csv(run_dir / "rounds.csv", low_memory=False)
    requests = requests[requests.status == "ok"].copy()
    requests["policy"] = requests.apply(policy_label, axis=1)
    return scenario, requests, rounds


def fidelity_table(run_dir: Path, log: Any = print) -> pd.DataFrame:
    """One row per ok request: identical, dlogp (vs the full request of the same prompt,
    rep and gamma policy) and l1 (mean ||p - p_hat||_1 over generated positions)."""
    scenario, requests, rounds = _load_run(run_dir)
    ref = requests[requests.transmission == "full"].set_index(["prompt_id", "rep", "gamma_policy"])
    out = []
    calc = _L1(scenario, log)
    for _, r in requests.iterrows():
        key = (r["prompt_id"], r["rep"], r["gamma_policy"])
        toks = _tokens(r["tokens"])
        identical = dlogp = math.nan
        if key in ref.index:
            full = ref.loc[key]
            full = full.iloc[0] if isinstance(full, pd.DataFrame) else full
            ftoks = _tokens(full["tokens"])
            n = 0
            while n < min(len(toks), len(ftoks)) and toks[n] == ftoks[n]:
                n += 1
            identical = n / max(1, len(toks))
            dlogp = float(r["logp_mean"]) - float(full["logp_mean"])
        l1 = 0.0 if r["transmission"] == "full" else calc.l1(r, rounds)
        out.append(
            {"request_id": r["request_id"], "identical": identical, "dlogp": dlogp, "l1": l1}
        )
    return pd.DataFrame(out)


class _L1:
    """The fidelity pass: the workers' exact distributions along a generated sequence (one
    forward pass per distinct model and sequence), and what the server aggregated there."""

    def __init__(self, scenario: dict[str, Any], log: Any) -> None:
        self.scenario = scenario
        self.log = log
        m = scenario["models"]
        self.workers: dict[str, str] = dict(m["workers"])
        w = m.get("weights") or {k: 1.0 / len(self.workers) for k in self.workers}
        self.weights = {k: float(w[k]) for k in self.workers}
        self.dtype = m.get("dtype", "bf16")
        self.models: dict[str, Any] = {}
        self.prompt_ids: dict[str, list[int]] | None = None
        self.cache: dict[tuple[str, tuple[int, ...], int], np.ndarray] = {}

    def _model(self, spec: str) -> Any:
        from specfed.models import load_model

        if spec not in self.models:
            t0 = time.perf_counter()
            self.models[spec] = load_model(spec, dtype=self.dtype)
            self.log(f"policybench: loaded {spec} in {time.perf_counter() - t0:.1f} s")
        return self.models[spec]

    def _prompts(self) -> dict[str, list[int]]:
        if self.prompt_ids is None:
            from specfed.prompts import load_prompts

            draft = self._model(self.scenario["models"]["draft"])
            self.prompt_ids = {
                p.id: list(p.token_ids) if p.token_ids else draft.encode(p.text or "")
                for p in load_prompts(self.scenario["decoding"]["prompts"])
            }
        return self.prompt_ids

    def _p(self, spec: str, seq: list[int], n_ctx: int, temperature: float) -> np.ndarray:
        from specfed.models import KVSession, probabilities

        key = (spec, tuple(seq), n_ctx)
        if key not in self.cache:
            lm = self._model(spec)
            n = len(seq) - n_ctx
            p = probabilities(KVSession(lm).sync(list(seq[:-1]), n), temperature)
            self.cache = {key: p, **{k: v for k, v in self.cache.items() if k[1] == key[1]}}
        return self.cache[key]

    def l1(self, r: pd.Series, rounds: pd.DataFrame) -> float:
        from specfed.codecs import decode_any, make_codec
        from specfed.reconstruct import reconstruct

        if r["transmission"] != "topk":
            return math.nan  # adaptive: per-position K, not reproduced here
        method = str(r["reconstruction"])
        if method == "draft-guided":
            return math.nan
        toks = _tokens(r["tokens"])
        prompt = self._prompts()[str(r["prompt_id"])]
        seq, temp = prompt + toks, float(r["temperature"])
        p = {w: self._p(m, seq, len(prompt), temp) for w, m in self.workers.items()}
        by_model: dict[str, float] = {}  # workers of one model share its distributions
        for w, m in self.workers.items():
            by_model[m] = by_model.get(m, 0.0) + self.weights[w]
        exact = np.zeros((len(toks), len(next(iter(p.values()))[0])))
        for m, weight in by_model.items():
            exact += weight * self._p(m, seq, len(prompt), temp)
        rows = rounds[rounds.request_id == r["request_id"]].sort_values(["round", "worker"])
        total, pos = 0.0, 0
        for _, rr in rows.groupby("round", sort=True):
            n = int(rr["n_emitted"].iloc[0])
            used = rr[~rr["dropped"].astype(str).isin(["True", "true", "1"])]
            wsum = sum(self.weights[w] for w in used["worker"])
            p_hat = np.zeros_like(exact[pos : pos + n], dtype=np.float64)
            for _, wr in used.iterrows():
                codec = make_codec("topk", k=int(wr["k"]), value_dtype=str(wr["value_dtype"]))
                payload = decode_any(codec.encode(p[wr["worker"]][pos : pos + n]))
                p_hat += self.weights[wr["worker"]] / wsum * reconstruct(payload, method)
            total += float(np.abs(exact[pos : pos + n] - p_hat).sum(axis=1).sum())
            pos += n
        return total / max(1, pos)


# ----------------------------------------------------------------------------- tables


def _ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval (NaN with fewer than 2 values)."""
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v.mean()), math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean()), half


#: Measures that vary with timing: their confidence intervals are over repetitions (each
#: repetition's mean over its prompts). The others are fixed by the prompts and seeds for
#: content-only policies (every repetition repeats them), so their intervals are over
#: prompts (each prompt's mean over its repetitions).
TIMED = ("ms_per_token", "tokens_per_round", "acceptance", "bytes_per_token", "gamma_mean",
         "dropped_replies")  # fmt: skip
CONTENT = ("identical", "dlogp", "l1")


def point_table(run_dir: Path, fidelity: pd.DataFrame) -> pd.DataFrame:
    """Per policy: means and 95 % confidence half-widths (timings over repetitions, fidelity
    over prompts; warm-up requests left out of ms/token unless a policy has no other)."""
    _, requests, rounds = _load_run(run_dir)
    df = requests.merge(fidelity, on="request_id", how="left")
    gam = rounds.groupby("request_id").gamma.mean().rename("gamma_mean")
    df = df.merge(gam, left_on="request_id", right_index=True, how="left")
    out = []
    for policy, g in df.groupby("policy", sort=False):
        row: dict[str, Any] = {
            "policy": policy, "requests": len(g), "reps": g.rep.nunique(),
            "prompts": g.prompt_id.nunique(),
        }  # fmt: skip
        timed = g[~g.warmup.astype(bool)]
        row["timing_includes_warmup"] = timed.empty
        for col in TIMED:
            frame = g if timed.empty or col != "ms_per_token" else timed
            row[col], row[f"{col}_ci"] = _ci(frame.groupby("rep")[col].mean().to_list())
        for col in CONTENT:
            row[col], row[f"{col}_ci"] = _ci(g.groupby("prompt_id")[col].mean().to_list())
        out.append(row)
    return pd.DataFrame(out)


def dominance(table: pd.DataFrame, reference: str = REFERENCE) -> dict[str, Any]:
    """Which policies are never worse than the reference on both axes (ms/token and the
    mean L1 fidelity) and strictly better on one: by the means, and by 95 % intervals
    (strictly better = intervals apart; not worse = not apart on the wrong side)."""
    ref = table[table.policy == reference]
    if ref.empty:
        return {"reference": reference, "error": "the reference point is missing"}
    r = ref.iloc[0]

    def apart(a: float, ah: float, b: float, bh: float) -> bool:  # a clearly below b
        ah = 0.0 if not np.isfinite(ah) else ah
        bh = 0.0 if not np.isfinite(bh) else bh
        return a + ah < b - bh

    by_means, by_ci = [], []
    for _, p in table.iterrows():
        if p.policy == reference or p.policy.startswith("full"):
            continue
        t, tr, f, fr = p.ms_per_token, r.ms_per_token, p.l1, r.l1
        if t <= tr and f <= fr and (t < tr or f < fr):
            by_means.append(p.policy)
        th, trh, fh, frh = p.ms_per_token_ci, r.ms_per_token_ci, p.l1_ci, r.l1_ci
        worse = apart(tr, trh, t, th) or apart(fr, frh, f, fh)
        better = apart(t, th, tr, trh) or apart(f, fh, fr, frh)
        if better and not worse:
            by_ci.append(p.policy)
    return {"reference": reference, "dominate_by_means": by_means, "dominate_by_ci": by_ci}


# ----------------------------------------------------------------------------- plots


def pareto_plot(table: pd.DataFrame, path: Path, title: str, reference: str = REFERENCE) -> None:
    """ms/token (x) against each fidelity measure (y), one point per policy, 95 % CIs.

    Full transmission (the fidelity reference: l1 0, identical 1) is left out of the plot
    and named in the title; the axes fit the points (a wide interval runs off the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = table[table.policy.str.startswith("full")]
    table = table[~table.policy.str.startswith("full")]
    if not full.empty:
        title += "; full transmission: " + ", ".join(
            f"{p.policy} {p.ms_per_token:.0f} ms/token" for _, p in full.iterrows()
        )
    fig, axs = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    panels = [
        ("l1", "mean ||p - p_hat||_1 per position (lower is better)"),
        ("identical", "identical fraction vs full, coupled seeds (higher is better)"),
        ("dlogp", "mean log p difference vs full"),
    ]
    for ax, (col, ylabel) in zip(axs, panels, strict=True):
        for _, p in table.iterrows():
            is_ref = p.policy == reference
            color = "crimson" if is_ref else ("grey" if p.policy.startswith("full") else "C0")
            if "auto" in p.policy:
                color = "C2"
            if "+" in p.policy and not p.policy.startswith("full"):
                color = "C1"
            if "quorum" in p.policy or "deadline" in p.policy:
                color = "C4"
            ax.errorbar(
                p.ms_per_token,
                p[col],
                xerr=p.ms_per_token_ci if np.isfinite(p.ms_per_token_ci) else None,
                yerr=p[f"{col}_ci"] if np.isfinite(p[f"{col}_ci"]) else None,
                fmt="*" if is_ref else "o",
                ms=14 if is_ref else 7,
                color=color,
                capsize=3,
            )
            ax.annotate(p.policy, (p.ms_per_token, p[col]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
        _fit(ax, table.ms_per_token, table[col])
        ax.set_xlabel("ms per token (mean over repetitions, 95 % CI)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _fit(ax: Any, x: pd.Series, y: pd.Series) -> None:
    """Axis limits from the points alone, with a margin."""
    for vals, setter in ((x, ax.set_xlim), (y, ax.set_ylim)):
        v = vals[np.isfinite(vals)]
        if len(v):
            lo, hi = float(v.min()), float(v.max())
            pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 0.05
            setter(lo - pad, hi + pad)


def _bar_limits(ax: Any, values: pd.Series, col: str) -> None:
    """From 0 to a margin above the bars (a wide interval runs off the plot)."""
    top = float(values[np.isfinite(values)].max()) if np.isfinite(values).any() else 1.0
    ax.set_ylim(0, 1.05 if col == "identical" else 1.35 * top or 1.0)


def gamma_plot(table: pd.DataFrame, path: Path, title: str) -> None:
    """Adaptive vs fixed gamma = 4 on the same transmissions: tokens/round and ms/token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[
        table.policy.str.contains(r"\+(?:heuristic|cost)$")
        | table.policy.isin([REFERENCE, "full"])
        | table.policy.str.match(r"^auto[0-9.]+ms$")
    ]
    rows = rows[rows.policy.map(lambda s: s.split("+")[0]).isin(
        {p.split("+")[0] for p in table.policy if "+" in p})]  # fmt: skip
    order = {"fixed": 0, "heuristic": 1, "cost": 2}
    rows = rows.assign(
        _base=rows.policy.map(lambda s: s.split("+")[0]),
        _g=rows.policy.map(lambda s: order.get(s.split("+")[1] if "+" in s else "fixed", 3)),
    ).sort_values(["_base", "_g"])
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, col, label in (
        (axs[0], "tokens_per_round", "tokens per round"),
        (axs[1], "ms_per_token", "ms per token"),
    ):
        err = rows[f"{col}_ci"].where(np.isfinite(rows[f"{col}_ci"]), 0.0)
        ax.bar(rows.policy, rows[col], yerr=err, capsize=3,
               color=["C1" if "+" in p else "C0" for p in rows.policy])  # fmt: skip
        _bar_limits(ax, rows[col], col)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def straggler_plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[~table.policy.str.startswith("full")]
    fig, axs = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    for ax, col, label in (
        (axs[0], "ms_per_token", "ms per token"),
        (axs[1], "l1", "mean ||p - p_hat||_1 per position"),
        (axs[2], "identical", "identical fraction vs full"),
    ):
        err = rows[f"{col}_ci"].where(np.isfinite(rows[f"{col}_ci"]), 0.0)
        ax.bar(rows.policy, rows[col], yerr=err, capsize=3, color="C4")
        _bar_limits(ax, rows[col], col)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- commands


def report(run_dir: Path, kind: str, reference: str = REFERENCE) -> dict[str, Any]:
    """policies.json (or stragglers.json) and the plots of one run folder."""
    fid = fidelity_table(run_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    table = point_table(run_dir, fid)
    fid.to_csv(run_dir / "policy-fidelity.csv", index=False)
    table.to_csv(run_dir / "policies.csv", index=False)
    meta = json.loads((run_dir / "meta.json").read_text())
    title = f"{meta.get('scenario')} ({run_dir.name})"
    result: dict[str, Any] = {
        "run": str(run_dir),
        "points": table.round(5).replace({np.nan: None}).to_dict(orient="records"),
    }
    if kind == "stragglers":
        straggler_plot(table, run_dir / "stragglers.png", title)
        result["plots"] = [str(run_dir / "stragglers.png")]
    else:
        result["claim"] = dominance(table, reference)
        pareto_plot(table, run_dir / "pareto.png", title, reference)
        gamma_plot(table, run_dir / "gamma.png", title)
        result["plots"] = [str(run_dir / "pareto.png"), str(run_dir / "gamma.png")]
    (run_dir / f"{kind}.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def _apply_sets(raw: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"policybench: --set {item!r}: expected PATH=VALUE")
        raw = set_path(raw, key, parse_yaml_text(value, f"--set {key}"))
    return raw


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m testbed.policybench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pareto", help="one point per policy on one setting")
    p.add_argument("--setting", default="demo", choices=["demo", "demo-trace", "star32"])
    p.add_argument(
        "--w2-link",
        default=None,
        help="demo-trace: w2's link block (YAML; default: scenarios/traces/fading-5mbit.csv, "
        "50 ms one way)",
    )
    p.add_argument("--budgets", default="1,4,16", help="k: auto upload budgets, ms")
    p.add_argument(
        "--fit-profiles",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="replay: emulate compute with a device profile per role fitted from this (live) "
        "run's rounds (one cost model for every point) instead of each point's recorded times",
    )
    p.add_argument(
        "--compute",
        default=None,
        choices=["live", "replay"],
        help="demo settings: live (default; every policy) or replay (the content-only "
        "policies; compute then follows device profiles, not the host's contention); "
        "star32 always replays",
    )
    p.add_argument(
        "--profiles",
        default=None,
        choices=["auto", "recorded"],
        help="replay: auto = the shipped device profile of each role's model (every point "
        "waits the same cost model, so only the policy and the network differ); recorded = "
        "each point's own recorded compute times (default: auto; recorded for --models tiny)",
    )
    s = sub.add_parser("stragglers", help="quorum / deadline vs wait for all (live)")
    s.add_argument("--link", default="slow", choices=["slow", "lossy"])
    s.add_argument("--deadlines", default="300", help="deadline_ms values, comma-separated")
    for q in (p, s):
        q.add_argument("--models", default="qwen", choices=["qwen", "tiny"])
        q.add_argument("--reps", type=int, default=3)
        q.add_argument("--prompts", default=None, help="default: humaneval[:2] (tiny: ids)")
        q.add_argument("--max-new-tokens", type=int, default=32)
        q.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
        q.add_argument("--force", action="store_true", help="run past a failed calibration")
        q.add_argument("--out", type=Path, default=REPO / "bench-results")
    r = sub.add_parser("report", help="recompute the JSON and plots of a run folder")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--kind", default="policies", choices=["policies", "stragglers"])
    r.add_argument("--reference", default=REFERENCE)
    args = ap.parse_args(argv)
    if args.cmd == "report":
        print(json.dumps(report(args.run_dir, args.kind, args.reference), indent=1, default=str))
        return 0
    prompts = args.prompts or ("humaneval[:2]" if args.models == "qwen" else "ids:1,2,3,4,5")
    t0 = time.monotonic()
    if args.cmd == "pareto":
        w2 = parse_yaml_text(args.w2_link, "--w2-link") if args.w2_link else None
        raw = setting_scenario(args.setting, args.models, prompts, args.max_new_tokens, w2)
        if args.compute == "replay":
            profiles = args.profiles or default_profiles(args.models)
            raw["compute"] = {"mode": "replay", "profiles": profiles}
        if args.fit_profiles:
            if raw.get("compute", {}).get("mode") != "replay":
                raise SystemExit("policybench: --fit-profiles needs --compute replay (or star32)")
            raw["compute"]["profiles"] = fit_profiles(args.fit_profiles, raw, args.out)
        live = raw.get("compute", {}).get("mode", "live") == "live"
        raw["sweep"] = policy_sweep(live, [float(b) for b in args.budgets.split(",")])
        mode = "live" if live else "replay"
        name, kind = f"policies-{args.setting}-{args.models}-{mode}", "policies"
    else:
        raw = straggler_scenario(
            args.models, args.link, [float(d) for d in args.deadlines.split(",")]
        )
        raw["decoding"] = {**raw["decoding"], "prompts": prompts,
                           "max_new_tokens": args.max_new_tokens}  # fmt: skip
        name, kind = f"stragglers-{args.link}-{args.models}", "stragglers"
    raw = _apply_sets(copy.deepcopy(raw), args.set)
    run_dir = _run(raw, name, args.out, args.reps, args.force)
    result = report(run_dir, kind)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
