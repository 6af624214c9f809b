"""Device profiles: a measured cost model of one model's compute on one device.

Replaying a recorded point over the emulated network waits an *emulated* compute time instead
of computing. That time comes from a device profile: a small JSON file holding a linear cost
model of one causal LM (at one weight dtype and thread count) on one machine, fitted to
timings measured there, with the provenance of the measurement. Profiles are measured
(`python -m specfed.bench profile`), never invented; `scaled(speed)` answers what-if
questions ("a device ten times faster") without touching the measured numbers.

The cost model (times in ms; `context` is the sequence length AFTER the pass, i.e. the
cached tokens plus the n new ones):

    forward_ms(n, context) = a_ms + b_ms_per_token * n + c_ms_per_context * context

Each output position then costs `head_ms_per_position` (the float64 softmax over V of
`specfed.models.probabilities`, plus encoding or sampling). So, with gamma the drafted tokens
per round:

    verify_ms(n_tokens, context, n_positions)
        = forward_ms(n_tokens, context) + head_ms_per_position * n_positions
      (a worker's verify pass + its codec's encode: what `engine.LocalWorker` times as
       t_worker_ms; n_positions = gamma + 1)
    draft_ms(n_sync, c0, gamma)
        = forward_ms(n_sync, c0) + sum_{j=1}^{gamma-1} forward_ms(1, c0 + j)
          + gamma * head_ms_per_position        (0 when gamma = 0)
      (the server's `DraftProposer.propose`: one pass over the n_sync tokens committed since
       its cache, c0 = the committed length, then gamma - 1 single-token steps)

Fitting (`fit_profile`) is non-negative least squares on *relative* residuals (every sample
weighs by 1/t), so a 5 ms draft step counts as much as a 500 ms prefill. Coefficients the
samples cannot tell apart (draft rounds alone never separate a_ms from head_ms_per_position:
both count gamma times) are set to 0 and folded into the others; `fit["folded"]` says which.

This module imports neither torch nor transformers; the measuring lives in specfed.bench.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from specfed.config import ConfigError, StrictModel, validation_problems

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PROFILE_DIR",
    "CostSample",
    "DeviceProfile",
    "Dtype",
    "ForwardCost",
    "Provenance",
    "cpu_model",
    "find_profile",
    "fit_profile",
    "fit_with_holdout",
    "load_profile",
    "profile_from_rounds",
    "role_profiles_from_rounds",
    "rounds_samples",
    "save_profile",
    "shipped_profiles",
]

PROFILE_DIR = Path(__file__).resolve().parent / "device_profiles"
"""Where shipped profiles live: `<name>.json`, installed as package data."""

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A profile name: usable as a file name (`<name>.json`)."""

Dtype = Literal["bf16", "fp32"]
"""Weight dtypes a profile can describe (specfed.models.DTYPES)."""

NonNegMs = Annotated[float, Field(ge=0)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_RE.pattern)]

#: Features of a sample, in the order of the coefficient vector
#: (a_ms, b_ms_per_token, c_ms_per_context, head_ms_per_position).
COEFFICIENTS = ("a_ms", "b_ms_per_token", "c_ms_per_context", "head_ms_per_position")


class ForwardCost(StrictModel):
    """forward_ms(n, context) = a_ms + b_ms_per_token * n + c_ms_per_context * context."""

    a_ms: NonNegMs
    """fixed cost of one forward pass, ms (weights streamed once, per-call overhead)"""
    b_ms_per_token: NonNegMs
    """cost per new token in the pass, ms"""
    c_ms_per_context: NonNegMs
    """cost per token of context (cache + new tokens) after the pass, ms (attention)"""


class Provenance(StrictModel):
    """Where and how a profile was measured."""

    command: str
    """the exact command that measured (or fitted) it"""
    measured_utc: str
    """when the timings were taken, ISO 8601 UTC"""
    host: str
    """the machine's host name"""
    cpu: str
    """CPU model (/proc/cpuinfo `model name`)"""
    cores: Annotated[int, Field(ge=1)]
    """logical CPUs of the machine (os.cpu_count)"""
    git: dict[str, Any]
    """the code's git state (specfed.provenance.git_state)"""
    versions: dict[str, str]
    """Python and package versions (specfed.provenance.versions)"""
    notes: str = ""
    """anything a reader must know (load average during the measurement, ...)"""


class DeviceProfile(StrictModel):
    """One model's measured compute cost on one device (see the module docstring).

    The stored coefficients are always the measured ones; `speed` (1 in a measured file)
    divides every time the methods return: `scaled(10)` is a device ten times faster.
    """

    format: Literal[1] = 1
    """file format version"""
    name: Name
    """e.g. cpu2-qwen2.5-coder-1.5b-bf16-t1 (a shipped profile's file is <name>.json)"""
    device: Annotated[str, Field(min_length=1)]
    """human description of the device, e.g. 2-core x86_64 VM, Intel Xeon ..."""
    model: Annotated[str, Field(min_length=1)]
    """the model as the project loads it (bundle name, tiny-v<V>-s<seed>, folder)"""
    dtype: Dtype
    """weight dtype"""
    threads: Annotated[int, Field(ge=1)]
    """torch threads of the process"""
    vocab_size: Annotated[int, Field(ge=1)]
    """V, the width of the logits (the softmax and codec cost grow with it)"""
    forward: ForwardCost
    """the forward-pass cost model"""
    head_ms_per_position: NonNegMs
    """cost per output position: float64 softmax over V, plus encoding or sampling, ms"""
    fit: dict[str, Any]
    """fit quality: n samples, R^2, median / p90 relative residual, held-out error, grid"""
    provenance: Provenance
    """where and how it was measured"""
    speed: Annotated[float, Field(gt=0)] = 1.0
    """speed-up applied by `scaled` (every time divided by it); 1 = as measured"""

    # --- the cost model ------------------------------------------------------------------

    def forward_ms(self, n: int, context: int) -> float:
        """One forward pass over n >= 1 new tokens ending at sequence length `context`, ms."""
        if n < 1 or context < n:
            raise ValueError(f"forward needs n >= 1 and context >= n, got n={n}, {context=}")
        f = self.forward
        return (f.a_ms + f.b_ms_per_token * n + f.c_ms_per_context * context) / self.speed

    def verify_ms(self, n_tokens: int, context: int, n_positions: int) -> float:
        """A worker's verify pass + encode: forward over n_tokens ending at `context`, then
        n_positions (gamma + 1) output distributions, ms."""
        if not 1 <= n_positions <= n_tokens:
            raise ValueError(f"n_positions must be in [1, n_tokens={n_tokens}], got {n_positions}")
        return self.forward_ms(n_tokens, context) + self.head_ms_per_position * n_positions / (
            self.speed
        )

    def draft_ms(self, n_sync: int, context: int, gamma: int) -> float:
        """The server's draft of one round, ms: a pass over the n_sync tokens committed since
        its cache (ending at the committed length `context`), then gamma - 1 single-token
        steps, with one softmax + sample per drafted token. 0 when gamma = 0."""
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if gamma == 0:
            return 0.0
        steps = sum(self.forward_ms(1, context + j) for j in range(1, gamma))
        return (
            self.forward_ms(n_sync, context)
            + steps
            + gamma * self.head_ms_per_position / self.speed
        )

    def scaled(self, speed: float) -> DeviceProfile:
        """This profile on a device `speed` times faster (speed 10: every time / 10).

        Keeps the name and the measured coefficients; speeds compound (`scaled(2).scaled(5)`
        has speed 10)."""
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a finite number > 0, got {speed}")
        return self.model_copy(update={"speed": self.speed * speed})

    @property
    def label(self) -> str:
        """The name, with the speed-up when one is applied ("cpu2-x-bf16-t1 x10")."""
        return self.name if self.speed == 1 else f"{self.name} x{self.speed:g}"

    def coefficients(self) -> dict[str, float]:
        """The four effective coefficients (speed applied), ms."""
        f = self.forward
        raw = (f.a_ms, f.b_ms_per_token, f.c_ms_per_context, self.head_ms_per_position)
        return {k: v / self.speed for k, v in zip(COEFFICIENTS, raw, strict=True)}


# --- files -------------------------------------------------------------------------------


def shipped_profiles(directory: Path | None = None) -> list[str]:
    """Names of the shipped profiles (the `<name>.json` files of specfed/device_profiles)."""
    folder = PROFILE_DIR if directory is None else Path(directory)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def _looks_like_path(name_or_path: str | Path) -> bool:
    s = str(name_or_path)
    return isinstance(name_or_path, Path) or s.endswith(".json") or os.sep in s or "/" in s


def load_profile(name_or_path: str | Path, directory: Path | None = None) -> DeviceProfile:
    """A shipped profile by name, or a profile file by path.

    Raises ConfigError naming the file and every invalid field (`FILE: forward.a_ms: must be
    >= 0, got -1`), or, for an unknown name, listing the shipped ones."""
    folder = PROFILE_DIR if directory is None else Path(directory)
    shipped = not _looks_like_path(name_or_path)
    path = folder / f"{name_or_path}.json" if shipped else Path(name_or_path)
    if shipped and not path.is_file():
        names = shipped_profiles(folder)
        raise ConfigError(
            str(name_or_path),
            [("", f"no shipped device profile of that name (shipped: {', '.join(names) or 'none'}"
                  f", in {folder}); give a shipped name or a .json file")],
        )  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(str(path), [("", f"cannot read: {why}")]) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            str(path), [(f"line {exc.lineno}, column {exc.colno}", f"not valid JSON: {exc.msg}")]
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", "expected a JSON object (a device profile)")])
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(path), validation_problems(exc, model=DeviceProfile)) from exc
    if shipped and profile.name != path.stem:
        raise ConfigError(str(path), [("name", f"must match the file name {path.stem!r}")])
    return profile


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write `profile` as indented JSON (creating folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n", "utf-8")
    return path


def find_profile(
    model: str, dtype: str, threads: int, directory: Path | None = None
) -> DeviceProfile | None:
    """The shipped profile of `model` at `dtype` and `threads` (for `profiles: auto`); None
    when none is shipped. Raises ValueError if several match (one device per combination
    is shipped)."""
    found = [
        p
        for p in (load_profile(n, directory) for n in shipped_profiles(directory))
        if (p.model, p.dtype, p.threads) == (model, dtype, threads)
    ]
    if len(found) > 1:
        raise ValueError(
            f"several shipped profiles for {model} {dtype} threads={threads}: "
            f"{', '.join(p.name for p in found)}; name one"
        )
    return found[0] if found else None


# --- fitting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CostSample:
    """One timed operation, as the cost model sees it.

    kind "verify": a verify pass over `n_tokens` new tokens ending at sequence length
    `context`, with `n` output positions (n_positions). kind "draft": one round's draft, with
    `n_tokens` = n_sync, `context` = c0 (the committed length) and `n` = gamma drafted
    tokens. t_ms is the measured time (a median over repetitions, or one round's record).
    """

    kind: Literal["verify", "draft"]
    n_tokens: int
    context: int
    n: int
    t_ms: float

    @classmethod
    def verify(cls, n_tokens: int, context: int, n_positions: int, t_ms: float) -> CostSample:
        return cls("verify", n_tokens, context, n_positions, t_ms)

    @classmethod
    def draft(cls, n_sync: int, context: int, gamma: int, t_ms: float) -> CostSample:
        return cls("draft", n_sync, context, gamma, t_ms)

    def features(self) -> np.ndarray:
        """How many times each coefficient (a, b, c, head) counts in this sample, [4]."""
        n, c, g = self.n_tokens, self.context, self.n
        if self.kind == "verify":
            return np.array([1.0, n, c, g])
        if g == 0:
            return np.zeros(4)
        # forward(n_sync, c0) + sum_{j=1}^{g-1} forward(1, c0 + j) + g * head
        return np.array([g, n + g - 1, g * c + g * (g - 1) / 2, g], dtype=float)


def _design(samples: Sequence[CostSample]) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, 4], times [n]) of the usable samples (t > 0, some feature > 0)."""
    rows = [(s.features(), s.t_ms) for s in samples]
    rows = [(f, t) for f, t in rows if t > 0 and math.isfinite(t) and f.any()]
    if not rows:
        return np.zeros((0, 4)), np.zeros(0)
    return np.stack([f for f, _ in rows]), np.array([t for _, t in rows])


def _rank(a: np.ndarray) -> int:
    if a.shape[1] == 0:
        return 0
    norms = np.linalg.norm(a, axis=0)
    a = a / np.where(norms > 0, norms, 1.0)
    return int(np.linalg.matrix_rank(a, tol=1e-9 * max(a.shape)))


#: When the samples cannot tell coefficients apart, drop (set to 0) the head first (draft
#: rounds alone: it counts exactly like a_ms), then the context and token terms.
_DROP_ORDER = (3, 2, 1)


def _identifiable(a: np.ndarray) -> list[int]:
    """Indices of the coefficients to fit: drops, in _DROP_ORDER, columns the others span."""
    cols = [j for j in range(4) if np.any(a[:, j])]
    while _rank(a[:, cols]) < len(cols):
        for j in _DROP_ORDER:
            rest = [c for c in cols if c != j]
            if j in cols and _rank(a[:, rest]) == _rank(a[:, cols]):
                cols = rest
                break
        else:  # pragma: no cover - a alone always has rank 1
            break
    return cols


def _nnls(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative residuals: min ||(A x - t) / t|| with x >= 0."""
    from scipy.optimize import nnls

    aw = a / t[:, None]
    scale = np.linalg.norm(aw, axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    x, _ = nnls(aw / scale, np.ones(len(t)))
    return np.asarray(x / scale)


def _quality(a: np.ndarray, t: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """n, R^2 on t, and the median / p90 / max of |relative residual|."""
    if len(t) == 0:
        return {"n": 0}
    pred = a @ x
    rel = np.abs(pred - t) / t
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum((pred - t) ** 2)) / ss_tot if ss_tot > 0 else None
    return {
        "n": len(t),
        "r2": r2,
        "median_rel_residual": float(np.median(rel)),
        "p90_rel_residual": float(np.percentile(rel, 90)),
        "max_rel_residual": float(np.max(rel)),
    }


def fit_profile(
    samples: Sequence[CostSample], held_out: Sequence[CostSample] = ()
) -> tuple[ForwardCost, float, dict[str, Any]]:
    """Fit the cost model to timed samples (verify passes and/or draft rounds).

    Non-negative least squares on relative residuals. Returns (forward cost,
    head_ms_per_position, fit info): n samples, R^2, median / p90 / max relative residual,
    overall and per kind, `folded` (coefficients the samples could not separate, set to 0),
    and the same figures on `held_out` samples when given (predicted, not fitted)."""
    a, t = _design(samples)
    if len(t) == 0:
        raise ValueError("no usable samples to fit (need times > 0 of non-empty operations)")
    cols = _identifiable(a)
    x = np.zeros(4)
    x[cols] = _nnls(a[:, cols], t)
    info: dict[str, Any] = {
        "method": "non-negative least squares on relative residuals",
        **_quality(a, t, x),
        "folded": [COEFFICIENTS[j] for j in range(4) if j not in cols],
        "by_kind": {},
    }
    for kind in ("verify", "draft"):
        ak, tk = _design([s for s in samples if s.kind == kind])
        if len(tk):
            info["by_kind"][kind] = _quality(ak, tk, x)
    if held_out:
        ah, th = _design(held_out)
        info["held_out"] = _quality(ah, th, x)
    cost = ForwardCost(a_ms=float(x[0]), b_ms_per_token=float(x[1]), c_ms_per_context=float(x[2]))
    return cost, float(x[3]), info


def fit_with_holdout(
    samples: Sequence[CostSample], every: int = 5
) -> tuple[ForwardCost, float, dict[str, Any]]:
    """`fit_profile` on all samples, plus the error on every `every`-th sample predicted by
    a fit on the others (`info["held_out"]`, with the split named)."""
    samples = list(samples)
    test = samples[every - 1 :: every] if len(samples) >= 2 * every else []
    train = [s for i, s in enumerate(samples) if i % every != every - 1] if test else []
    cost, head, info = fit_profile(samples)
    if test:
        _, _, cv = fit_profile(train, held_out=test)
        info["held_out"] = {
            **cv["held_out"],
            "split": f"every {every}th sample predicted by a fit on the others",
        }
    return cost, head, info


# --- from a run's own records ------------------------------------------------------------

#: Columns of rounds.csv the fit from a run reads.
DRAFT_COLUMNS = ("context_len", "draft_new_tokens", "n_drafted", "t_draft_ms")
WORKER_COLUMNS = ("worker", "context_len", "n_tokens", "n_drafted", "t_worker_ms")
ROUND_KEYS = ("run_id", "point", "rep", "request_id", "round")


def _where(rounds: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    for col, want in filters.items():
        if col not in rounds.columns:
            raise ValueError(f"no column {col!r} to filter on in the rounds table")
        try:
            keep = rounds[col].astype(float) == float(want)
        except (TypeError, ValueError):
            keep = rounds[col].astype(str) == str(want)
        rounds = rounds[keep]
    return rounds


def _measured_ms(rows: pd.DataFrame, column: str) -> pd.Series:
    """The measured compute of each row, ms: `column` for live rows; for rows of a replay
    run (compute_mode "replay", whose `column` holds an emulated wait) the time measured
    when the trace was recorded (`<column minus _ms>_recorded_ms`), NaN if absent."""
    import pandas as pd

    t = pd.to_numeric(rows[column], errors="coerce")
    if "compute_mode" in rows.columns:
        replay = rows["compute_mode"].astype(str) == "replay"
        recorded = column.removesuffix("_ms") + "_recorded_ms"
        rec = pd.to_numeric(rows[recorded], errors="coerce") if recorded in rows else np.nan
        t = t.where(~replay, rec)
    return t


def rounds_samples(
    rounds: pd.DataFrame, role: str, filters: Mapping[str, Any] | None = None
) -> list[CostSample]:
    """Cost samples from a rounds table: role "draft" -> one draft sample per round
    (draft_ms(draft_new_tokens, context_len, n_drafted) = t_draft_ms), a worker name -> one
    verify sample per round of that worker (verify_ms(n_tokens, context_len + n_drafted,
    n_drafted + 1) = t_worker_ms). Rows of a replay run use the times measured at record
    time (t_draft_recorded_ms, t_worker_recorded_ms), never the emulated waits. Warm-up rows
    and rows without a time are skipped; `filters` keeps only rows whose column equals the
    value (e.g. {"transmission": "topk"}).
    """
    need = DRAFT_COLUMNS if role == "draft" else WORKER_COLUMNS
    missing = [c for c in need if c not in rounds.columns]
    if missing:
        raise ValueError(
            f"the rounds table lacks {', '.join(missing)} (recorded by newer runs); cannot fit "
            f"role {role!r}"
        )
    if role != "draft" and not (rounds["worker"].astype(str) == role).any():
        workers = sorted(set(rounds["worker"].astype(str)))
        raise ValueError(f"no rounds of role {role!r}; roles: draft, {', '.join(workers)}")
    rows = _where(rounds, filters or {})
    if "warmup" in rows.columns:
        warm = rows["warmup"].astype(str).str.strip().str.lower().isin(("true", "1", "1.0"))
        rows = rows[~warm]
    if role == "draft":
        keys = [k for k in ROUND_KEYS if k in rows.columns]
        rows = rows.drop_duplicates(keys) if keys else rows
        rows = rows[rows["n_drafted"] > 0].assign(t=_measured_ms(rows, "t_draft_ms"))
        rows = rows.dropna(subset=[*need, "t"])
        return [
            CostSample.draft(int(r.draft_new_tokens), int(r.context_len), int(r.n_drafted),
                             float(r.t))
            for r in rows.itertuples()
        ]  # fmt: skip
    rows = rows[rows["worker"].astype(str) == role]
    rows = rows.assign(t=_measured_ms(rows, "t_worker_ms")).dropna(subset=[*need, "t"])
    return [
        CostSample.verify(int(r.n_tokens), int(r.context_len) + int(r.n_drafted),
                          int(r.n_drafted) + 1, float(r.t))
        for r in rows.itertuples()
    ]  # fmt: skip


def profile_from_rounds(
    rounds: pd.DataFrame,
    role: str,
    *,
    model: str,
    dtype: Dtype,
    threads: int,
    vocab_size: int,
    provenance: Provenance,
    name: str | None = None,
    device: str | None = None,
    filters: Mapping[str, Any] | None = None,
) -> DeviceProfile:
    """Fit a profile from a run's own records (see `rounds_samples` for what is read).

    A profile fitted from a live run describes that run's conditions (cores shared with
    the other processes of the run), not an idle device: say so in provenance.notes."""
    samples = rounds_samples(rounds, role, filters)
    if not samples:
        raise ValueError(f"no timed rounds of role {role!r} to fit")
    cost, head, info = fit_with_holdout(samples)
    info["source"] = {"role": role, "filters": dict(filters or {})}
    return DeviceProfile(
        name=name or default_name(model, dtype, threads, provenance.cores),
        device=device or describe_device(provenance.cpu, provenance.cores),
        model=model,
        dtype=dtype,
        threads=threads,
        vocab_size=vocab_size,
        forward=cost,
        head_ms_per_position=head,
        fit=info,
        provenance=provenance,
    )


# --- provenance helpers ------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_device(cpu: str, cores: int) -> str:
    """A device description: `2-core x86_64 machine, <cpu>`."""
    return f"{cores}-core {platform.machine()} machine, {cpu}"


def default_name(model: str, dtype: str, threads: int, cores: int) -> str:
    """The default profile name `cpu<cores>-<model>-<dtype>-t<threads>` (a folder model by
    its base name)."""
    base = Path(model.rstrip("/")).name or model
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"cpu{cores}-{base}-{dtype}-t{threads}")


def role_profiles_from_rounds(
    rounds: pd.DataFrame, models: Mapping[str, Any], out_dir: Path, notes: str
) -> dict[str, str]:
    """One profile per role (draft, each worker host) fitted from a run's rounds, saved as
    `out_dir/<role>.json`; `models` is a scenario's models block. Role -> file."""
    import sys

    dtype, threads = models.get("dtype", "bf16"), models.get("threads", 1)
    prov = make_provenance(sys.argv, notes=notes)
    files: dict[str, str] = {}
    for role, model in {"draft": models["draft"], **models["workers"]}.items():
        prof = profile_from_rounds(
            rounds, role, model=model, dtype=dtype, threads=threads,
            vocab_size=int(rounds.vocab_size.iloc[0]), provenance=prov,
            name=f"fit-{role}-{model}",
        )  # fmt: skip
        files[role] = str(save_profile(prof, out_dir / f"{role}.json"))
    return files


def make_provenance(command: Sequence[str] | str, notes: str = "") -> Provenance:
    """Provenance of a measurement taken now on this machine."""
    from specfed.provenance import git_state, versions

    return Provenance(
        command=command if isinstance(command, str) else " ".join(_quote(command)),
        measured_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        host=socket.gethostname(),
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        git=git_state(),
        versions=versions(),
        notes=notes,
    )


def _quote(args: Iterable[str]) -> list[str]:
    import shlex

    return [shlex.quote(a) for a in args]
