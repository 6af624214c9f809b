"""The paper's Fig. 2 (aggregation bias) and Fig. 3 (acceptance-rate bias) on real models.

Notation (the paper's, arXiv 2604.25777, and Leviathan et al.'s): p_i worker i's target
distribution, w_i its weight, p = sum_i w_i p_i the federated target, q the draft's
distribution, T the temperature, V the vocabulary (|V| its size), K the entries a top-K
payload keeps per position, rho_i the kept mass, eps_i = 1 - rho_i, p_hat_i the server's
reconstruction of p_i and p_hat = sum_i w_i p_hat_i, alpha(q, p) = sum_v min(q(v), p(v)).

The paper simulates this at the distribution level; here the distributions are real:

1. Record. For each prompt, one continuation is generated once (federated speculative
   decoding with full fp32 transmission, so it is an exact sample from p at the generation
   temperature, or greedy; `generation.mode`), then every distinct model runs ONCE over
   prompt + continuation (`KVSession.sync`) to give its logits at every generated position:
   l_i per worker and l_q for the draft, [positions, V]. They are cached on disk (bf16 logits
   are stored as their raw 16-bit patterns, exactly) so that a rerun skips the models.
2. Grid. For every T, K and reconstruction: p_i = softmax(l_i / T), q = softmax(l_q / T);
   each p_i goes through the real top-K codec (fp32 values) and back, is reconstructed
   (`specfed.reconstruct.reconstruct`, dense float64) and aggregated. Per position:
   ||p - p_hat||_1 against Theorem 2's 2 sum_i w_i eps_i, |alpha(q, p) - alpha(q, p_hat)|
   against Theorem 3's sum_i w_i eps_i, and the checks of every step of both chains, among
   them the printed Theorem 3's middle step ||p - p_hat||_1 <= sum_i w_i eps_i (false as
   printed; the correct one has the 1/2).
3. Outputs (one folder): fig23_summary.csv (one row per T, K, reconstruction),
   fig23_positions.csv.gz (one row per position and grid cell), fig2_aggregation_bias.png,
   fig3_acceptance_bias.png, report.md, meta.json, study.yaml (the resolved config),
   continuations.jsonl.

Command line (`--help` for every option):

    python -m analysis.paper scenarios/paper_fig23.yaml [--out DIR] [--prompts N]
                             [--positions N] [--cache DIR] [--threads N]
    python -m analysis.paper --replot RUN_DIR     # figures + report again from the CSV

Bound checks allow the float32 normalization defect of the inputs: a worker's fp32 softmax
sums to 1 only within rounding, and each bound moves by at most
slack = sum_i w_i |1 - sum_v p_i(v)|, so a step counts as violated only where it fails by
more than slack + ABS_TOL.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import platform
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from specfed.codecs import Payload, decode_any, make_codec
from specfed.metrics import alpha, l1, theorem2_bound, theorem3_bound
from specfed.models import DTYPES, probabilities
from specfed.reconstruct import RECONSTRUCTIONS, reconstruct

__all__ = [
    "ABS_TOL",
    "GENERATION_MODES",
    "PromptLogits",
    "StudyConfig",
    "StudyConfigError",
    "StudyResult",
    "Targets",
    "evaluate",
    "k_for_fraction",
    "load_study",
    "main",
    "plot_figures",
    "record_logits",
    "run_study",
    "summarize",
    "write_report",
]

ABS_TOL = 1e-9
"""Absolute tolerance (on top of the float32 slack) before a bound counts as violated: float64
sums over |V| = 151,936 terms carry errors of order 1e-11."""

RESOLVED_FACTOR = 1000.0
"""A position is *resolved* when sum_i w_i eps_i > RESOLVED_FACTOR (slack + ABS_TOL): rounding
can then move a ratio to the bound by at most 0.1 %. Ratio statistics use resolved positions."""

SOFTMAX_PRECISIONS = ("fp64", "fp32")
"""How p_i and q are computed from the logits. fp64: `specfed.models.probabilities`, what the
testbed's workers send: softmax in float64, rounded to float32 (row sums within ~4e-8 of 1).
fp32: torch's plain float32 softmax, for comparison: over |V| = 151,936 it leaves row sums off
by up to ~1e-4 (every entry scaled by the error of the fp32 normalizer), the size of the top-K
bias at K = 10 % (the workers used it until this study found that)."""

GENERATION_MODES = ("sampled", "greedy")
"""How the continuation is generated: `sampled` = federated speculative decoding with full
transmission at `generation.temperature` (an exact sample from p), `greedy` = argmax of p."""

CACHE_FORMAT = 1
"""Version of the logits cache files; part of every cache key."""

SUMMARY_CSV = "fig23_summary.csv"
POSITIONS_CSV = "fig23_positions.csv.gz"
FIG2_PNG = "fig2_aggregation_bias.png"
FIG3_PNG = "fig3_acceptance_bias.png"
REPORT_MD = "report.md"
META_JSON = "meta.json"

GROUP_KEYS = ["temperature", "k", "k_frac", "reconstruction"]
"""The grid: one summary row per combination."""

#: Metrics summarized by mean, sd and max (per-position columns of the positions table).
SUMMARY_METRICS = ("l1", "bound_l1", "dalpha", "bound_alpha", "l1_workers")
#: Violation flags (positions table) -> what they check. Only "printed_thm3" may be non-zero.
VIOLATIONS: dict[str, str] = {
    "lemma1": "||p_i - p_hat_i||_1 <= 2 eps_i for every worker i (Lemma 1)",
    "thm2_step": "||p - p_hat||_1 <= sum_i w_i ||p_i - p_hat_i||_1 (Theorem 2, first step)",
    "thm2": "||p - p_hat||_1 <= 2 sum_i w_i eps_i (Theorem 2)",
    "half_step": "|alpha(q, p) - alpha(q, p_hat)| <= 1/2 ||p - p_hat||_1 (Theorem 3, 1st step)",
    "thm3": "|alpha(q, p) - alpha(q, p_hat)| <= sum_i w_i eps_i (Theorem 3)",
    "printed_thm3": "||p - p_hat||_1 <= sum_i w_i eps_i (the printed Theorem 3's middle step)",
}
CORRECT_BOUNDS = ("lemma1", "thm2_step", "thm2", "half_step", "thm3")
"""Bounds that must hold at every position; a violation of any of them is a bug."""


class StudyConfigError(ValueError):
    """A study file is invalid; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# Study config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig:
    """A validated study (see scenarios/paper_fig23.yaml for every field, commented).

    Attributes:
        name: the study's name (default output folder results/<name>/<utc>/).
        seed: base seed; prompt j's generation uses seed ^ crc32(prompt id).
        draft: the draft model (q).
        workers: worker name -> model (p_i), in file order.
        weights: worker name -> w_i (sum 1).
        dtype: weight dtype of the models, "bf16" or "fp32" (softmax and after: fp32).
        threads: torch threads (None: torch's default).
        prompt_source: a `specfed.prompts` spec (humaneval, humaneval[10:], a .jsonl file).
        n_prompts: how many prompts of the source, from its start.
        positions: generated positions per prompt (fewer if a prompt ends on EOS).
        generation_mode: one of GENERATION_MODES.
        generation_temperature: T of the sampled generation (not used by greedy).
        gamma: drafted tokens per round of the generation (0: federated autoregressive).
        temperatures: the grid's T values (> 0).
        k_fractions: the grid's K/|V| values in (0, 1]; K = max(1, round(frac |V|)).
        reconstructions: the grid's reconstructions (`specfed.reconstruct.RECONSTRUCTIONS`).
        softmax: precision of softmax(l / T), one of SOFTMAX_PRECISIONS (p_i is float32 in
            both: the codec sends fp32 values).
        chunk_positions: positions evaluated at once (memory: about 12 dense [chunk, V]
            float64 arrays, 0.5 GB at 32 positions and |V| = 151,936).
        source: the file it came from ("<memory>" when built in code).
    """

    name: str
    seed: int
    draft: str
    workers: dict[str, str]
    weights: dict[str, float]
    dtype: str = "bf16"
    threads: int | None = None
    prompt_source: str = "humaneval"
    n_prompts: int = 8
    positions: int = 32
    generation_mode: str = "sampled"
    generation_temperature: float = 1.0
    gamma: int = 4
    temperatures: tuple[float, ...] = (0.8, 1.0, 1.2)
    k_fractions: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0)
    reconstructions: tuple[str, ...] = RECONSTRUCTIONS
    softmax: str = "fp64"
    chunk_positions: int = 32
    source: str = "<memory>"

    @property
    def worker_names(self) -> list[str]:
        """Worker names in file order."""
        return list(self.workers)

    @property
    def w(self) -> np.ndarray:
        """[N] float64, the weights w_i in worker order."""
        return np.array([self.weights[n] for n in self.workers], dtype=np.float64)

    @property
    def models(self) -> list[str]:
        """Distinct models (draft first, then workers in order); each runs once per prompt."""
        return list(dict.fromkeys([self.draft, *self.workers.values()]))

    def to_dict(self) -> dict[str, Any]:
        """The config in the file's layout (for study.yaml in the output folder)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "models": {
                "draft": self.draft,
                "workers": dict(self.workers),
                "weights": dict(self.weights),
                "dtype": self.dtype,
                "threads": self.threads,
            },
            "prompts": {"source": self.prompt_source, "count": self.n_prompts},
            "positions": self.positions,
            "generation": {
                "mode": self.generation_mode,
                "temperature": self.generation_temperature,
                "gamma": self.gamma,
            },
            "study": {
                "temperatures": list(self.temperatures),
                "k_fractions": list(self.k_fractions),
                "reconstructions": list(self.reconstructions),
                "softmax": self.softmax,
                "chunk_positions": self.chunk_positions,
            },
        }

    def replace(self, **changes: Any) -> StudyConfig:
        """A copy with some fields changed, validated again."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__} | changes
        cfg = StudyConfig(**data)
        validate(cfg)
        return cfg


_SCHEMA: dict[str, Any] = {
    "name": None,
    "seed": None,
    "models": {"draft": None, "workers": None, "weights": None, "dtype": None, "threads": None},
    "prompts": {"source": None, "count": None},
    "positions": None,
    "generation": {"mode": None, "temperature": None, "gamma": None},
    "study": {
        "temperatures": None,
        "k_fractions": None,
        "reconstructions": None,
        "softmax": None,
        "chunk_positions": None,
    },
}
_REQUIRED = ("models.draft", "models.workers")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file.

    Raises:
        StudyConfigError: "FILE: FIELD: what is wrong" for the first problem found.
    """
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StudyConfigError(f"{where}: cannot read the study file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise StudyConfigError(f"{where}: not valid YAML: {exc}") from exc
    return study_from_dict(raw, where)


def study_from_dict(raw: Any, where: str = "<memory>") -> StudyConfig:
    """Validate a parsed study mapping (the file's layout) into a StudyConfig."""

    def fail(fld: str, msg: str) -> StudyConfigError:
        return StudyConfigError(f"{where}: {fld}: {msg}")

    if not isinstance(raw, dict):
        raise fail("<top>", f"expected a mapping of fields, got {type(raw).__name__}")
    _check_keys(raw, _SCHEMA, "", fail)
    for req in _REQUIRED:
        if _get(raw, req) is None:
            raise fail(req, "missing (required)")

    def get(fld: str, default: Any) -> Any:
        v = _get(raw, fld)
        return default if v is None else v

    workers = get("models.workers", None)
    if not isinstance(workers, dict) or not workers:
        raise fail("models.workers", "expected a mapping worker name -> model, e.g. {w1: m}")
    weights_raw = get("models.weights", None)
    if weights_raw is None:
        weights_raw = {n: 1.0 / len(workers) for n in workers}
    if not isinstance(weights_raw, dict):
        raise fail("models.weights", "expected a mapping worker name -> weight")
    if set(weights_raw) != set(workers):
        raise fail(
            "models.weights",
            f"give one weight per worker ({', '.join(map(str, workers))}), got "
            f"{', '.join(map(str, weights_raw)) or 'none'}",
        )
    defaults = StudyConfig(name="", seed=0, draft="", workers={}, weights={})
    prompts = get("prompts", {})
    if isinstance(prompts, str):  # shorthand: prompts: humaneval[:8]
        prompts = {"source": prompts}
    try:
        cfg = StudyConfig(
            name=str(get("name", "paper-fig23")),
            seed=_int(get("seed", 0), "seed", fail),
            draft=_str(get("models.draft", None), "models.draft", fail),
            workers={str(k): _str(v, f"models.workers.{k}", fail) for k, v in workers.items()},
            weights={str(k): _float(weights_raw[k], f"models.weights.{k}", fail) for k in workers},
            dtype=str(get("models.dtype", defaults.dtype)),
            threads=(
                None
                if _get(raw, "models.threads") is None
                else _int(_get(raw, "models.threads"), "models.threads", fail)
            ),
            prompt_source=_str(prompts.get("source", "humaneval"), "prompts.source", fail),
            n_prompts=_int(prompts.get("count", defaults.n_prompts), "prompts.count", fail),
            positions=_int(get("positions", defaults.positions), "positions", fail),
            generation_mode=str(get("generation.mode", defaults.generation_mode)),
            generation_temperature=_float(
                get("generation.temperature", defaults.generation_temperature),
                "generation.temperature",
                fail,
            ),
            gamma=_int(get("generation.gamma", defaults.gamma), "generation.gamma", fail),
            temperatures=_floats(
                get("study.temperatures", defaults.temperatures), "study.temperatures", fail
            ),
            k_fractions=_floats(
                get("study.k_fractions", defaults.k_fractions), "study.k_fractions", fail
            ),
            reconstructions=tuple(
                str(r)
                for r in _list(
                    get("study.reconstructions", defaults.reconstructions),
                    "study.reconstructions",
                    fail,
                )
            ),
            softmax=str(get("study.softmax", defaults.softmax)),
            chunk_positions=_int(
                get("study.chunk_positions", defaults.chunk_positions),
                "study.chunk_positions",
                fail,
            ),
            source=where,
        )
    except AttributeError as exc:  # prompts given as something other than a mapping
        raise fail("prompts", "expected {source: SPEC, count: N} or a prompt spec") from exc
    validate(cfg)
    return cfg


def validate(cfg: StudyConfig) -> None:
    """Check the values of a StudyConfig; StudyConfigError names the file and the field."""

    def fail(fld: str, msg: str) -> StudyConfigError:
        return StudyConfigError(f"{cfg.source}: {fld}: {msg}")

    if not _NAME.match(cfg.name):
        raise fail("name", f"{cfg.name!r}: use letters, digits, '-' and '_' (a folder name)")
    for n in cfg.workers:
        if not _NAME.match(n):
            raise fail(f"models.workers.{n}", "worker names are letters, digits, '-', '_'")
    if cfg.dtype not in DTYPES:
        raise fail("models.dtype", f"{cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise fail("models.threads", f"must be >= 1, got {cfg.threads}")
    for n, wi in cfg.weights.items():
        if not (math.isfinite(wi) and wi >= 0):
            raise fail(f"models.weights.{n}", f"must be a finite number >= 0, got {wi}")
    if abs(sum(cfg.weights.values()) - 1.0) > 1e-6:
        raise fail("models.weights", f"must sum to 1, sum is {sum(cfg.weights.values()):g}")
    if cfg.n_prompts < 1:
        raise fail("prompts.count", f"must be >= 1, got {cfg.n_prompts}")
    if cfg.positions < 1:
        raise fail("positions", f"must be >= 1, got {cfg.positions}")
    if cfg.generation_mode not in GENERATION_MODES:
        raise fail(
            "generation.mode", f"{cfg.generation_mode!r}: use one of {', '.join(GENERATION_MODES)}"
        )
    if not cfg.generation_temperature > 0:
        raise fail("generation.temperature", f"must be > 0, got {cfg.generation_temperature}")
    if cfg.gamma < 0:
        raise fail("generation.gamma", f"must be >= 0, got {cfg.gamma}")
    if not cfg.temperatures:
        raise fail("study.temperatures", "give at least one temperature")
    for t in cfg.temperatures:
        if not (math.isfinite(t) and t > 0):
            raise fail("study.temperatures", f"every T must be > 0, got {t}")
    if not cfg.k_fractions:
        raise fail("study.k_fractions", "give at least one K/|V|")
    for f in cfg.k_fractions:
        if not 0 < f <= 1:
            raise fail("study.k_fractions", f"every K/|V| must be in (0, 1], got {f}")
    if not cfg.reconstructions:
        raise fail("study.reconstructions", "give at least one reconstruction")
    for r in cfg.reconstructions:
        if r not in RECONSTRUCTIONS:
            raise fail("study.reconstructions", f"{r!r}: use any of {', '.join(RECONSTRUCTIONS)}")
    for fld, values in (
        ("study.temperatures", cfg.temperatures),
        ("study.k_fractions", cfg.k_fractions),
        ("study.reconstructions", cfg.reconstructions),
    ):
        if len(set(values)) != len(values):
            raise fail(fld, f"duplicate values in {list(values)}")
    if cfg.softmax not in SOFTMAX_PRECISIONS:
        raise fail("study.softmax", f"{cfg.softmax!r}: use one of {', '.join(SOFTMAX_PRECISIONS)}")
    if cfg.chunk_positions < 1:
        raise fail("study.chunk_positions", f"must be >= 1, got {cfg.chunk_positions}")


def _check_keys(
    raw: Mapping[str, Any],
    schema: Mapping[str, Any],
    prefix: str,
    fail: Callable[[str, str], StudyConfigError],
) -> None:
    for key, value in raw.items():
        fld = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            known = ", ".join(f"{prefix}{k}" for k in schema)
            raise fail(fld, f"unknown field{hint} (known here: {known})")
        sub = schema[key]
        if isinstance(sub, dict) and value is not None:
            if key == "prompts" and isinstance(value, str):
                continue
            if not isinstance(value, dict):
                raise fail(fld, f"expected a mapping, got {type(value).__name__}")
            _check_keys(value, sub, f"{fld}.", fail)


def _get(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _int(v: Any, fld: str, fail: Callable[[str, str], StudyConfigError]) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(fld, f"expected an integer, got {v!r}")
    return v


def _float(v: Any, fld: str, fail: Callable[[str, str], StudyConfigError]) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise fail(fld, f"expected a number, got {v!r}")
    return float(v)


def _str(v: Any, fld: str, fail: Callable[[str, str], StudyConfigError]) -> str:
    if not isinstance(v, str) or not v:
        raise fail(fld, f"expected a non-empty string, got {v!r}")
    return v


def _list(v: Any, fld: str, fail: Callable[[str, str], StudyConfigError]) -> list[Any]:
    if not isinstance(v, list | tuple):
        raise fail(fld, f"expected a list, got {v!r}")
    return list(v)


def _floats(v: Any, fld: str, fail: Callable[[str, str], StudyConfigError]) -> tuple[float, ...]:
    return tuple(_float(x, f"{fld}[{i}]", fail) for i, x in enumerate(_list(v, fld, fail)))


def k_for_fraction(frac: float, vocab_size: int) -> int:
    """K = round(frac |V|) (halves up), at least 1 and at most |V|."""
    return int(min(vocab_size, max(1, math.floor(frac * vocab_size + 0.5))))


def frac_label(frac: float) -> str:
    """K/|V| as a percentage: 0.0001 -> "0.01%"."""
    return f"{frac * 100:g}%"


# ---------------------------------------------------------------------------------------------
# Step 1: record the logits along real generations (cached)
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptLogits:
    """One prompt's generated continuation and every model's logits along it.

    Attributes:
        prompt_id: e.g. "HumanEval/0".
        prompt_tokens: [L] int64, the prompt's token ids.
        tokens: [n] int64, the generated continuation x_1..x_n.
        logits: model name -> [n, V]; row j holds the logits after prompt + x_1..x_j, the
            distribution x_{j+1} is drawn from. float32, or uint16 (raw bf16 bit patterns,
            see `tensor`).
        text: the continuation decoded (for the record).
    """

    prompt_id: str
    prompt_tokens: np.ndarray
    tokens: np.ndarray
    logits: dict[str, np.ndarray]
    text: str = ""

    @property
    def n_positions(self) -> int:
        """n, the number of generated positions."""
        return len(self.tokens)

    def tensor(self, model: str) -> torch.Tensor:
        """Model's logits as a torch tensor [n, V] in their stored dtype (bf16 or fp32)."""
        arr = self.logits[model]
        if arr.dtype == np.uint16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def _logits_to_numpy(logits: torch.Tensor) -> np.ndarray:
    """[n, V] logits -> numpy, bf16 as exact uint16 bit patterns, anything else as float32."""
    logits = logits.detach().contiguous()
    if logits.dtype == torch.bfloat16:
        return logits.view(torch.int16).numpy().view(np.uint16).copy()
    return logits.float().numpy().copy()


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The generation seed of one prompt: stable whatever the prompt's place in the set."""
    return (seed ^ zlib.crc32(prompt_id.encode())) & 0x7FFFFFFF


def cache_key(cfg: StudyConfig, prompt_id: str, prompt_text: str) -> str:
    """Hash of everything the recorded logits of one prompt depend on."""
    spec = {
        "format": CACHE_FORMAT,
        "draft": cfg.draft,
        "workers": [cfg.workers[n] for n in cfg.workers],
        "weights": [cfg.weights[n] for n in cfg.workers],
        "dtype": cfg.dtype,
        "mode": cfg.generation_mode,
        "temperature": cfg.generation_temperature if cfg.generation_mode == "sampled" else 0,
        "gamma": cfg.gamma,
        "positions": cfg.positions,
        "seed": prompt_seed(cfg.seed, prompt_id),
        "prompt": hashlib.sha256(prompt_text.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _cache_file(cache: Path, cfg: StudyConfig, prompt_id: str, prompt_text: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt_id).strip("_") or "prompt"
    return cache / f"{slug}-{cache_key(cfg, prompt_id, prompt_text)}.npz"


def default_cache_dir() -> Path:
    """Where logits are cached by default: $SPECFED_CACHE/paper-fig23 (outside git)."""
    from specfed.bundle import cache_dir

    return cache_dir() / "paper-fig23"


def _save(path: Path, rec: PromptLogits, models: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, Any] = {
        "prompt_id": np.array(rec.prompt_id),
        "prompt_tokens": rec.prompt_tokens,
        "tokens": rec.tokens,
        "models": np.array(list(models)),
        "text": np.array(rec.text),
    }
    arrays.update({f"logits_{i}": rec.logits[m] for i, m in enumerate(models)})
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load(path: Path) -> PromptLogits:
    with np.load(path, allow_pickle=False) as z:
        models = [str(m) for m in z["models"]]
        return PromptLogits(
            prompt_id=str(z["prompt_id"]),
            prompt_tokens=z["prompt_tokens"],
            tokens=z["tokens"],
            logits={m: z[f"logits_{i}"] for i, m in enumerate(models)},
            text=str(z["text"]),
        )


def record_logits(
    cfg: StudyConfig,
    cache: Path | None,
    log: Callable[[str], None] = print,
) -> tuple[list[PromptLogits], dict[str, Any]]:
    """Step 1: the continuation and every model's logits for each prompt, from the cache or
    by running the models (each distinct model is loaded once; the draft and a worker that
    name the same model share it).

    Args:
        cfg: the study.
        cache: folder of cached .npz files (None: no cache, always run the models).
        log: progress lines.

    Returns:
        (records in prompt order, info: cache hits, times in s, prompt ids).
    """
    from specfed.prompts import load_prompts

    prompts = load_prompts(cfg.prompt_source)
    if len(prompts) < cfg.n_prompts:
        raise StudyConfigError(
            f"{cfg.source}: prompts.count: {cfg.n_prompts} prompts asked, but "
            f"{cfg.prompt_source!r} holds {len(prompts)}"
        )
    prompts = prompts[: cfg.n_prompts]
    texts = [p.text if p.text is not None else repr(p.token_ids) for p in prompts]
    files = [
        _cache_file(cache, cfg, p.id, t) if cache is not None else None
        for p, t in zip(prompts, texts, strict=True)
    ]
    records: list[PromptLogits | None] = [None] * len(prompts)
    for j, f in enumerate(files):
        if f is not None and f.is_file():
            try:
                records[j] = _load(f)
            except (OSError, ValueError, KeyError) as exc:
                log(f"cache file {f} unreadable ({exc}); recomputing")
    hits = sum(r is not None for r in records)
    info: dict[str, Any] = {
        "cache_dir": str(cache) if cache is not None else None,
        "cache_hits": hits,
        "t_load_s": 0.0,
        "t_generate_s": 0.0,
        "t_logits_s": 0.0,
    }
    todo = [j for j, r in enumerate(records) if r is None]
    if todo:
        from specfed.engine import FederatedGenerator, LocalWorker, Transmission
        from specfed.models import KVSession, LoadedModel, load_model

        t0 = time.perf_counter()
        lms: dict[str, LoadedModel] = {}
        for m in cfg.models:
            t = time.perf_counter()
            lms[m] = load_model(m, cfg.dtype)
            log(f"loaded {m} ({cfg.dtype}) in {time.perf_counter() - t:.1f} s")
        info["t_load_s"] = time.perf_counter() - t0
        draft = lms[cfg.draft]
        greedy = cfg.generation_mode == "greedy"
        gen = FederatedGenerator(
            draft if cfg.gamma > 0 else None,
            [LocalWorker(n, lms[m]) for n, m in cfg.workers.items()],
            weights=list(cfg.w),
            transmissions=Transmission("full"),
            gamma=cfg.gamma,
            temperature=0.0 if greedy else cfg.generation_temperature,
            measure_fidelity=False,
        )
        for j in todo:
            p = prompts[j]
            ids = list(p.token_ids) if p.token_ids is not None else draft.encode(p.text or "")
            t = time.perf_counter()
            res = gen.generate(ids, cfg.positions, seed=prompt_seed(cfg.seed, p.id))
            t_gen = time.perf_counter() - t
            info["t_generate_s"] += t_gen
            n = len(res.tokens)
            if n == 0:
                raise RuntimeError(f"prompt {p.id}: the generation produced no token")
            if n < cfg.positions:
                log(f"prompt {p.id}: ended on EOS after {n} of {cfg.positions} positions")
            t = time.perf_counter()
            # Row j of the logits must be the distribution of x_{j+1}: feed prompt + x_1..x_{n-1}
            # and keep the logits after its last n tokens (prompt[-1], x_1, ..., x_{n-1}).
            seq = ids + res.tokens[:-1]
            logits = {m: _logits_to_numpy(KVSession(lms[m]).sync(seq, n)) for m in cfg.models}
            t_log = time.perf_counter() - t
            info["t_logits_s"] += t_log
            rec = PromptLogits(
                prompt_id=p.id,
                prompt_tokens=np.asarray(ids, dtype=np.int64),
                tokens=np.asarray(res.tokens, dtype=np.int64),
                logits=logits,
                text=draft.decode(res.tokens),
            )
            f = files[j]
            if f is not None:
                _save(f, rec, cfg.models)
            records[j] = rec
            log(
                f"[{j + 1}/{len(prompts)}] {p.id}: {n} positions, generation {t_gen:.1f} s, "
                f"{len(cfg.models)} logit passes {t_log:.1f} s"
            )
        del gen, lms
    info["prompt_ids"] = [p.id for p in prompts]
    out = [r for r in records if r is not None]
    for r in out:
        missing = [m for m in cfg.models if m not in r.logits]
        if missing:
            raise RuntimeError(f"prompt {r.prompt_id}: no logits for {missing}")
    return out, info


# ---------------------------------------------------------------------------------------------
# Step 2: the grid
# ---------------------------------------------------------------------------------------------


def softmax(logits: torch.Tensor, temperature: float, precision: str = "fp64") -> np.ndarray:
    """softmax(logits / T) as float32 [C, V] (see SOFTMAX_PRECISIONS).

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
    """Step 2: the grid over T x K x reconstruction at every recorded position.

    Positions are processed in chunks of `cfg.chunk_positions` (memory stays bounded);
    p_i, q and p are computed once per chunk and T, each payload once per chunk, T and K.

    Returns:
        The positions table: one row per (prompt, position, T, K, reconstruction) with
        prompt_id, position, token, temperature, k, k_frac, reconstruction, eps_<worker>,
        l1_<worker>, and the scalar metrics of `Targets.metrics` (viol_* as bool).
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
                            "reconstruction": method,
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


# ---------------------------------------------------------------------------------------------
# Step 3: figures and report
# ---------------------------------------------------------------------------------------------


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


SOFTMAX_TEXT = {
    "fp64": (
        "p_i = softmax(l_i / T) and q computed in float64 and rounded once to float32 (row "
        "sums within ~4e-8 of 1); the codec sends fp32 values; reconstruction and metrics in "
        "float64."
    ),
    "fp32": (
        "p_i and q from torch's plain float32 softmax (not what the workers send): "
        "row sums off by up to ~1e-4 at this |V|, which blurs biases below that; the codec "
        "sends fp32 values; reconstruction and metrics in float64."
    ),
}


def fmt(x: float) -> str:
    """Numbers in the report: 3 significant digits, scientific ("1.23e-04")."""
    return f"{x:.3e}" if x != 0 else "0"


def _worker_ranking(lossy: pd.DataFrame, worker: str, methods: Sequence[str]) -> str:
    """ "w1: 0.01% draft-guided (1.2e-02; renormalize 2.1x, ...), ..." from the summary rows."""
    col = f"l1_{worker}_mean"
    parts = []
    for frac, cell in lossy.groupby("k_frac"):
        mean = cell.groupby("reconstruction")[col].mean()
        best = str(mean.idxmin())
        others = ", ".join(
            f"{m} {_ratio_text(mean[m] / mean[best] if mean[best] > 0 else math.inf)}"
            for m in methods
            if m != best
        )
        parts.append(f"{frac_label(float(frac))} {best} ({fmt(mean[best])}; {others})")
    return f"{worker}: " + ", ".join(parts)


def _pct(part: float, whole: float) -> str:
    return f"{100 * float(part) / float(whole):.1f} %" if whole else "n/a"


def _ratio_text(r: float) -> str:
    return "∞" if not math.isfinite(r) else f"{r:.2f}×"


def write_report(summary: pd.DataFrame, meta: Mapping[str, Any], path: Path) -> str:
    """The markdown report: which reconstruction wins and by how much, the Theorem 3 checks,
    and the table of mean biases (every number comes from `summary`, the CSV's rows).

    Returns:
        The report's text (also written to `path`).
    """
    cfg = meta.get("config", {})
    models = cfg.get("models", {})
    workers: dict[str, str] = models.get("workers", {})
    weights: dict[str, float] = models.get("weights", {})
    precision = str(cfg.get("study", {}).get("softmax", "fp64"))
    methods = list(dict.fromkeys(summary["reconstruction"]))
    temps = sorted(summary["temperature"].unique())
    lossy = summary[summary["k_frac"] < 1.0]
    lines: list[str] = []
    add = lines.append
    add(f"# SpecFed Fig. 2 / Fig. 3 on real models: {cfg.get('name', '')}")
    add("")
    gen = cfg.get("generation", {})
    mode = gen.get("mode", "?")
    gen_text = (
        f"sampled once per prompt at T = {gen.get('temperature')} by federated speculative "
        f"decoding (gamma = {gen.get('gamma')}) with full fp32 transmission, i.e. an exact "
        f"sample from the federated target p; seed {cfg.get('seed')} (per prompt: seed XOR "
        "crc32(prompt id))"
        if mode == "sampled"
        else f"greedy federated decoding (argmax of p, gamma = {gen.get('gamma')})"
    )
    add(
        f"- Run {meta.get('started_utc', '?')}, git {meta.get('git', {}).get('sha', '?')[:10]}"
        f"{' (dirty)' if meta.get('git', {}).get('dirty') else ''}."
    )
    add(
        f"- Draft q = {models.get('draft')}; workers "
        + ", ".join(f"{n} = {m} (w = {weights.get(n, float('nan')):g})" for n, m in workers.items())
        + f"; model weights in {models.get('dtype')}; |V| = {meta.get('vocab_size')}. "
        + SOFTMAX_TEXT.get(precision, precision)
    )
    add(
        f"- {meta.get('n_prompts')} prompts ({cfg.get('prompts', {}).get('source')}), "
        f"{meta.get('n_positions')} positions in all ({meta.get('positions_per_prompt')} per "
        f"prompt). Continuations: {gen_text}. Each model then ran once over prompt + "
        "continuation for its logits at every generated position."
    )
    add(
        "- Grid: T ∈ {"
        + ", ".join(f"{t:g}" for t in temps)
        + "}, K ∈ {"
        + ", ".join(
            f"{k} ({lab})"
            for k, lab in dict.fromkeys(zip(summary["k"], summary["k_label"], strict=True))
        )
        + "}, reconstructions "
        + ", ".join(methods)
        + "; real top-K codec with fp32 values; dense float64 reconstruction."
    )
    timing = meta.get("timing", {})
    add(
        f"- Time: record {timing.get('record_s', float('nan')):.1f} s "
        f"({meta.get('record', {}).get('cache_hits', 0)} of {meta.get('n_prompts')} prompts from "
        f"the cache), grid {timing.get('grid_s', float('nan')):.1f} s, total "
        f"{timing.get('total_s', float('nan')):.1f} s."
    )
    if meta.get("n_prompts", 0) < 8 or meta.get("positions_per_prompt_min", 0) < 32:
        add("- **Below the study's size** (8 prompts x 32 positions): a smoke run, not a result.")
    shared = [n for n, m in workers.items() if m == models.get("draft")]
    if shared:
        add(
            f"- Note: the draft is the same model as worker {', '.join(shared)}, so q = p_"
            f"{shared[0]} at every position and T, and draft-guided reconstruction rebuilds that "
            "worker's tail exactly (up to float32 rounding); see l1 per worker below."
        )
    add("")

    # --- who wins ------------------------------------------------------------------------------
    add("## Which reconstruction is best")
    add("")
    for metric, label in (("l1", "aggregation bias ‖p − p̂‖₁"), ("dalpha", "acceptance bias |Δα|")):
        col = f"{metric}_mean"
        wins: dict[str, int] = dict.fromkeys(methods, 0)
        cells = 0
        for (_t, _k), cell in lossy.groupby(["temperature", "k"]):
            vals = cell.set_index("reconstruction")[col]
            if vals.max() <= 0:
                continue
            wins[str(vals.idxmin())] += 1
            cells += 1
        best = max(wins, key=lambda m: wins[m])
        add(
            f"- **{label}**: {best} has the lowest mean in {wins[best]} of {cells} (T, K) cells "
            f"with K < |V|"
            + (
                " ("
                + ", ".join(f"{m}: {c}" for m, c in wins.items() if c and m != best)
                + " for the others)"
                if any(c for m, c in wins.items() if m != best)
                else ""
            )
            + "."
        )
        if len(methods) > 1:
            for frac, cell in lossy.groupby("k_frac"):
                parts = []
                for other in methods:
                    if other == best:
                        continue
                    r = []
                    for t in temps:
                        row = cell[cell["temperature"] == t].set_index("reconstruction")[col]
                        r.append(row[other] / row[best] if row[best] > 0 else math.inf)
                    parts.append(f"{other} / {best} = {_ratio_text(min(r))}–{_ratio_text(max(r))}")
                b = cell[cell["reconstruction"] == best][col]
                add(
                    f"  - K/|V| = {frac_label(float(frac))}: {best} mean {fmt(b.min())}–"
                    f"{fmt(b.max())} over T; ratio of means " + "; ".join(parts) + "."
                )
    own = [n for n, m in workers.items() if m != models.get("draft")]
    if shared and own and len(methods) > 1:
        add(
            f"- Without the q = p_{shared[0]} advantage: on worker(s) {', '.join(own)} alone "
            "(‖p_i − p̂_i‖₁, mean over positions and T), per K/|V|: "
            + "; ".join(_worker_ranking(lossy, n, methods) for n in own)
            + "."
        )
    add("")
    add("Per-worker mean ‖p_i − p̂_i‖₁ (Lemma 1), averaged over T:")
    add("")
    wcols = [f"l1_{n}_mean" for n in workers if f"l1_{n}_mean" in summary]
    add("| K/\\|V\\| | reconstruction | " + " | ".join(f"‖p_{n} − p̂_{n}‖₁" for n in workers) + " |")
    add("|---|---|" + "---|" * len(wcols))
    per_worker = lossy.groupby(["k_frac", "reconstruction"], sort=True)[wcols].mean()
    for (frac, method), row in per_worker.iterrows():
        add(
            f"| {frac_label(float(frac))} | {method} | "
            + " | ".join(fmt(float(row[c])) for c in wcols)
            + " |"
        )
    add("")

    # --- theorem checks ------------------------------------------------------------------------
    add("## Theorem 3 as printed vs with the 1/2")
    add("")
    n_eval = int(summary["n_positions"].sum())
    n_res = int(summary["n_resolved"].sum())
    n_printed = int(summary["n_viol_printed_thm3"].sum())
    n_printed_res = int(summary["n_viol_printed_thm3_resolved"].sum())
    by_method = summary.groupby("reconstruction", sort=False)
    add(
        f"- Printed middle step ‖p − p̂‖₁ ≤ Σ w·ε: **violated at {n_printed} of {n_eval} "
        f"position evaluations** ({_pct(n_printed, n_eval)}; position x T x K x "
        f"reconstruction). Among the {n_res} evaluations where Σ w·ε is resolved (> "
        f"{RESOLVED_FACTOR:g}x the rounding slack): {n_printed_res} ({_pct(n_printed_res, n_res)})"
        "; by reconstruction "
        + "; ".join(
            f"{m} {int(g['n_viol_printed_thm3_resolved'].sum())} of "
            f"{int(g['n_resolved'].sum())} ({_pct(g['n_viol_printed_thm3_resolved'].sum(), g['n_resolved'].sum())})"  # noqa: E501
            for m, g in by_method
        )
        + f". Largest ‖p − p̂‖₁ / Σ w·ε: {summary['printed_ratio_max'].max():.3f} (the printed "
        "step claims ≤ 1; the correct chain allows 2)."
    )
    correct = {name: int(summary[f"n_viol_{name}"].sum()) for name in CORRECT_BOUNDS}
    verdict = "holds at every position" if not any(correct.values()) else "**VIOLATED: a bug**"
    add(
        f"- Correct form |Δα| ≤ ½ ‖p − p̂‖₁ ≤ Σ w·ε {verdict}, as do Lemma 1 and Theorem 2: "
        + "; ".join(f"{VIOLATIONS[n]}: {c} violations" for n, c in correct.items())
        + f" (of {n_eval} each)."
    )
    add(
        f"- Tightness over resolved positions: largest |Δα| / Σ w·ε = "
        f"{summary['thm3_ratio_max'].max():.3f} (Theorem 3 requires ≤ 1); largest "
        f"‖p − p̂‖₁ / 2 Σ w·ε = {summary['printed_ratio_max'].max() / 2:.3f} (Theorem 2 "
        "requires ≤ 1)."
    )
    add(
        f"- Checks allow the float32 normalization defect Σ w |1 − Σ_v p_i(v)| (at most "
        f"{summary['slack_max'].max():.2e} here, softmax {precision}) + {ABS_TOL:g}."
    )
    add("")

    # --- table ---------------------------------------------------------------------------------
    add("## Mean biases (the figures' data; fig23_summary.csv has sd, max and every count)")
    add("")
    add(
        "| T | K | K/\\|V\\| | reconstruction | mean ‖p−p̂‖₁ | mean 2Σwε | mean \\|Δα\\| "
        "| mean Σwε | printed Thm 3 violations |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    for _, r in summary.iterrows():
        add(
            f"| {r['temperature']:g} | {int(r['k'])} | {r['k_label']} | {r['reconstruction']} | "
            f"{fmt(r['l1_mean'])} | {fmt(r['bound_l1_mean'])} | {fmt(r['dalpha_mean'])} | "
            f"{fmt(r['bound_alpha_mean'])} | {int(r['n_viol_printed_thm3'])} / "
            f"{int(r['n_positions'])} |"
        )
    add("")
    add("## Files")
    add("")
    add(
        f"{SUMMARY_CSV} (one row per T, K, reconstruction), {POSITIONS_CSV} (one row per "
        f"position and cell), {FIG2_PNG}, {FIG3_PNG}, continuations.jsonl, study.yaml (the "
        f"resolved study), {META_JSON}. Redraw: `python -m analysis.paper --replot <this folder>`."
    )
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------
# The whole study
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """What `run_study` produced.

    Attributes:
        out: the output folder.
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


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"sha": "unknown", "dirty": None}
    return {"sha": sha, "dirty": dirty}


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def _subtitle(meta: Mapping[str, Any]) -> str:
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


def run_study(
    cfg: StudyConfig,
    out: Path,
    cache: Path | None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Record (or load) the logits, run the grid, write every output into `out`."""
    t0 = time.perf_counter()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    records, rec_info = record_logits(cfg, cache, log=log)
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    t_record = time.perf_counter() - t0
    log(f"recorded {len(records)} prompts in {t_record:.1f} s; running the grid")
    t1 = time.perf_counter()
    positions = evaluate(records, cfg, progress=progress)
    summary = summarize(positions)
    t_grid = time.perf_counter() - t1
    per_prompt = [r.n_positions for r in records]
    meta: dict[str, Any] = {
        "study": "paper-fig23",
        "started_utc": started,
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "vocab_size": int(positions.attrs["vocab_size"]),
        "n_prompts": len(records),
        "n_positions": int(sum(per_prompt)),
        "positions_per_prompt": (
            str(per_prompt[0])
            if len(set(per_prompt)) == 1
            else f"{min(per_prompt)}-{max(per_prompt)}"
        ),
        "positions_per_prompt_min": int(min(per_prompt)),
        "k": {
            frac_label(f): k_for_fraction(f, int(positions.attrs["vocab_size"]))
            for f in cfg.k_fractions
        },
        "record": rec_info,
        "git": _git_state(),
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "abs_tol": ABS_TOL,
    }
    files = [out / "study.yaml", out / "continuations.jsonl", out / SUMMARY_CSV]
    (out / "study.yaml").write_text(
        f"# resolved from {cfg.source}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        encoding="utf-8",
    )
    with (out / "continuations.jsonl").open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(
                json.dumps(
                    {
                        "prompt_id": r.prompt_id,
                        "prompt_tokens": len(r.prompt_tokens),
                        "n_positions": r.n_positions,
                        "tokens": r.tokens.tolist(),
                        "text": r.text,
                    }
                )
                + "\n"
            )
    summary.to_csv(out / SUMMARY_CSV, index=False)
    positions.to_csv(out / POSITIONS_CSV, index=False)
    files.append(out / POSITIONS_CSV)
    meta["timing"] = {
        "record_s": round(t_record, 2),
        "grid_s": round(t_grid, 2),
        "total_s": round(time.perf_counter() - t0, 2),
    }
    files += plot_figures(summary, out, _subtitle(meta))
    meta["timing"]["total_s"] = round(time.perf_counter() - t0, 2)
    write_report(summary, meta, out / REPORT_MD)
    (out / META_JSON).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    files += [out / REPORT_MD, out / META_JSON]
    return StudyResult(out=out, summary=summary, positions=positions, meta=meta, files=files)


def replot(run_dir: Path) -> list[Path]:
    """Figures and report again from a finished run's CSV and meta.json (no model, no grid)."""
    summary = pd.read_csv(run_dir / SUMMARY_CSV)
    meta = json.loads((run_dir / META_JSON).read_text(encoding="utf-8"))
    paths = plot_figures(summary, run_dir, _subtitle(meta))
    write_report(summary, meta, run_dir / REPORT_MD)
    return [*paths, run_dir / REPORT_MD]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m analysis.paper",
        description=(
            "The paper's Fig. 2 (aggregation bias ||p - p_hat||_1) and Fig. 3 (acceptance-rate\n"
            "bias |alpha(q, p) - alpha(q, p_hat)|) on real models: record the workers' and the\n"
            "draft's logits along real generations (cached), then sweep temperature T x payload\n"
            "K/|V| x reconstruction through the real top-K codec, checking Theorem 2 and\n"
            "Theorem 3 (with and without the 1/2) at every position. Writes a summary CSV, a\n"
            "per-position CSV, the two figures and a markdown report (docs/paper-figures.md)."
        ),
        epilog=(
            "examples:\n"
            "  python -m analysis.paper scenarios/paper_fig23.yaml\n"
            "  python -m analysis.paper scenarios/paper_fig23.yaml --prompts 2 --positions 8\n"
            "  python -m analysis.paper --replot results/paper-fig23/<utc>/\n"
            "exit status: 0 ok, 1 a bound that must hold was violated (a bug), 2 bad input"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("study", nargs="?", type=Path, help="study file (scenarios/paper_fig23.yaml)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: results/<study name>/<utc>/)",
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
        "--replot",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="only redraw the figures and the report of a finished run from its CSV",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (also `analysis.paper.main` for the analysis CLI).

    Returns:
        0 on success, 1 if a bound that must hold was violated, 2 on bad input.
    """
    ap = _parser()
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.replot is not None:
        if args.study is not None:
            ap.error("give either a study file or --replot RUN_DIR, not both")
        missing = [f for f in (SUMMARY_CSV, META_JSON) if not (args.replot / f).is_file()]
        if missing:
            print(
                f"error: {args.replot}: not a finished run (no {', '.join(missing)})",
                file=sys.stderr,
            )
            return 2
        for p in replot(args.replot):
            print(p)
        return 0
    if args.study is None:
        ap.error("a study file is required (e.g. scenarios/paper_fig23.yaml), or --replot")
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
    except StudyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / cfg.name / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    cache = None if args.no_cache else (args.cache or default_cache_dir())
    from specfed.models import ModelError
    from specfed.prompts import PromptError

    try:
        result = run_study(cfg, out, cache, progress=not args.quiet, log=log)
    except (StudyConfigError, PromptError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log(f"wrote {len(result.files)} files to {out}")
    print(out / REPORT_MD)
    if result.correct_bound_violations:
        print(
            f"error: {result.correct_bound_violations} violations of bounds that must hold "
            f"(see {out / REPORT_MD}): a bug",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
