"""The study file (scenarios/paper_fig23.yaml): its schema, and the StudyConfig the code reads.

A study file has the sections `models`, `prompts`, `positions`, `generation` and `study` (every
field is commented in scenarios/paper_fig23.yaml). `StudyFile` is its schema, a pydantic model
on `specfed.config.StrictModel`: unknown fields, wrong types, out-of-range values and unknown
names are refused, and `load_study` / `study_from_dict` report *every* problem of a file at
once as `specfed.config.ConfigError`, one `FILE: field.path: what was expected (got VALUE)`
line each. `StudyConfig` wraps a validated `StudyFile` and gives the code flat names
(`cfg.draft`, `cfg.temperatures`, `cfg.w`, ...).

Nothing here imports torch: `testbed validate` checks study files with `load_study`.

Notation (the paper's): p_i worker i's distribution, w_i its weight, q the draft's, T the
temperature, K the entries a top-K payload keeps per position, |V| the vocabulary size.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from specfed.config import ConfigError, StrictModel, load_yaml, set_path, validation_problems
from specfed.options import Reconstruction

__all__ = [
    "DTYPE_NAMES",
    "GENERATION_MODES",
    "SOFTMAX_PRECISIONS",
    "ConfigError",
    "GenerationSection",
    "GridSection",
    "ModelsSection",
    "PromptsSection",
    "StudyConfig",
    "StudyConfigError",
    "StudyFile",
    "load_study",
    "study_from_dict",
]

StudyConfigError = ConfigError
"""The error of an invalid study file (an alias: it is `specfed.config.ConfigError`)."""

Dtype = Literal["bf16", "fp32"]
GenerationMode = Literal["sampled", "greedy"]
SoftmaxPrecision = Literal["fp64", "fp32"]

DTYPE_NAMES: tuple[str, ...] = typing.get_args(Dtype)
"""Weight dtypes of the models: the keys of `specfed.models.DTYPES` (a test pins them)."""

GENERATION_MODES: tuple[str, ...] = typing.get_args(GenerationMode)
"""How the continuation is generated: `sampled` = federated speculative decoding with full
transmission at `generation.temperature` (an exact sample from p), `greedy` = argmax of p."""

SOFTMAX_PRECISIONS: tuple[str, ...] = typing.get_args(SoftmaxPrecision)
"""How p_i and q are computed from the logits. fp64: `specfed.models.probabilities`, what the
testbed's workers send: softmax in float64, rounded to float32 (row sums within ~4e-8 of 1).
fp32: torch's plain float32 softmax, for comparison: over |V| = 151,936 it leaves row sums off
by up to ~1e-4 (every entry scaled by the error of the fp32 normalizer), the size of the top-K
bias at K = 10 % (the workers used it until this study found that)."""

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_NAME_RULE = "use letters, digits, '-' and '_', starting with a letter (a folder name)"


# --- value checks with the messages users read ----------------------------------------------


def _at_least(lo: int | float) -> AfterValidator:
    def check(v: int | float) -> int | float:
        if v < lo:
            raise ValueError(f"must be >= {lo:g}")
        return v

    return AfterValidator(check)


def _above(lo: float) -> AfterValidator:
    def check(v: float) -> float:
        if not v > lo:
            raise ValueError(f"must be > {lo:g}")
        return v

    return AfterValidator(check)


def _folder_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError(_NAME_RULE)
    return v


def _check_grid_values(
    values: tuple[Any, ...], what: str, rule: str = "", ok: Callable[[Any], bool] | None = None
) -> None:
    """A grid axis: at least one value, each obeying `ok` (`rule` says how), no duplicates."""
    if not values:
        raise ValueError(f"give at least one {what}")
    problems = []
    bad = [v for v in values if ok is not None and not ok(v)]
    if bad:
        problems.append(f"every {what} must be {rule}, not {', '.join(f'{v:g}' for v in bad)}")
    dup = list(dict.fromkeys(str(v) for v in values if values.count(v) > 1))
    if dup:
        problems.append(f"duplicate values {', '.join(dup)}")
    if problems:
        raise ValueError("; ".join(problems))


NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
ModelSpec = NonEmptyStr
"""Any `specfed.models.load_model` spec: a bundle name, HF folder, .gguf file, hub id, or
tiny-v<V>-s<seed> (a random-weight test model)."""
Weight = Annotated[StrictFloat, _at_least(0)]
Count = Annotated[StrictInt, _at_least(1)]


# --- the sections ------------------------------------------------------------------------------


class ModelsSection(StrictModel):
    """`models:` the draft q, the workers p_i and their weights w_i."""

    draft: ModelSpec
    """The draft model (q, the server's)."""
    workers: dict[StrictStr, ModelSpec]
    """Worker name -> model (p_i), in file order; all share the draft's vocabulary."""
    weights: dict[StrictStr, Weight] = Field(default_factory=dict)
    """Worker name -> w_i >= 0, summing to 1 (default: equal weights)."""
    dtype: Dtype = "bf16"
    """Weight dtype of the models (softmax and after: fp32 or better)."""
    threads: Annotated[StrictInt, _at_least(1)] | None = None
    """Torch threads (None: torch's default)."""

    @model_validator(mode="before")
    @classmethod
    def _equal_weights_by_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("weights") is None:
            workers = data.get("workers")
            data = {k: v for k, v in data.items() if k != "weights"}
            if isinstance(workers, Mapping) and workers:
                data["weights"] = {n: 1.0 / len(workers) for n in workers}
        return data

    @field_validator("workers")
    @classmethod
    def _worker_names(cls, workers: dict[str, str]) -> dict[str, str]:
        if not workers:
            raise ValueError("give at least one worker: a mapping worker name -> model")
        bad = [n for n in workers if not _NAME.match(n)]
        if bad:
            raise ValueError(f"worker name(s) {', '.join(map(repr, bad))}: {_NAME_RULE}")
        return workers

    @field_validator("weights")
    @classmethod
    def _one_weight_per_worker_summing_to_1(
        cls, weights: dict[str, float], info: ValidationInfo
    ) -> dict[str, float]:
        workers = info.data.get("workers")
        if workers is not None and set(weights) != set(workers):
            raise ValueError(
                f"give one weight per worker ({', '.join(workers)}), got "
                f"{', '.join(weights) or 'none'}"
            )
        total = sum(weights.values())
        if weights and abs(total - 1.0) > 1e-6:
            raise ValueError(f"must sum to 1, sum is {total:g}")
        return weights


class PromptsSection(StrictModel):
    """`prompts:` which prompts (a spec string alone is short for `{source: SPEC}`)."""

    source: NonEmptyStr = "humaneval"
    """A `specfed.prompts` spec: humaneval, humaneval[10:], a .jsonl file."""
    count: Count = 8
    """How many prompts of the source, from its start."""


class GenerationSection(StrictModel):
    """`generation:` how the ONE continuation per prompt is produced."""

    mode: GenerationMode = "sampled"
    """sampled (an exact sample from p by federated SD with full transmission) or greedy."""
    temperature: Annotated[StrictFloat, _above(0)] = 1.0
    """T of the sampled generation (not used by greedy)."""
    gamma: Annotated[StrictInt, _at_least(0)] = 4
    """Drafted tokens per round of the generation (0: federated autoregressive)."""


class GridSection(StrictModel):
    """`study:` the grid T x K/|V| x reconstruction, and how it is computed."""

    temperatures: tuple[StrictFloat, ...] = (0.8, 1.0, 1.2)
    """The grid's T values (> 0): p_i = softmax(l_i / T), q likewise."""
    k_fractions: tuple[StrictFloat, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0)
    """The grid's K/|V| values in (0, 1]; K = max(1, round(frac |V|))."""
    reconstructions: tuple[Reconstruction, ...] = tuple(Reconstruction)
    """The grid's reconstructions (`specfed.options.Reconstruction`)."""
    softmax: SoftmaxPrecision = "fp64"
    """Precision of softmax(l / T), one of SOFTMAX_PRECISIONS (p_i is float32 in both)."""
    chunk_positions: Count = 32
    """Positions evaluated at once (memory: about 12 dense [chunk, V] float64 arrays)."""

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        _check_grid_values(values, "T", "> 0", lambda t: t > 0)
        return values

    @field_validator("k_fractions")
    @classmethod
    def _k_fractions(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        _check_grid_values(values, "K/|V|", "in (0, 1]", lambda f: 0 < f <= 1)
        return values

    @field_validator("reconstructions", mode="before")
    @classmethod
    def _known_reconstructions(cls, values: Any) -> Any:
        if isinstance(values, list | tuple):
            bad = [r for r in values if not (isinstance(r, str) and r in Reconstruction.names())]
            if bad:
                raise ValueError(
                    f"unknown reconstruction {', '.join(map(repr, bad))}; use any of "
                    f"{', '.join(Reconstruction.names())}"
                )
        return values

    @field_validator("reconstructions")
    @classmethod
    def _some_reconstructions(
        cls, values: tuple[Reconstruction, ...]
    ) -> tuple[Reconstruction, ...]:
        _check_grid_values(values, "reconstruction")
        return values


class StudyFile(StrictModel):
    """A study file, section by section (scenarios/paper_fig23.yaml comments every field)."""

    name: Annotated[StrictStr, AfterValidator(_folder_name)] = "paper-fig23"
    """The study's name (default output folder results/<name>/<utc>/)."""
    seed: StrictInt = 0
    """Base seed; prompt j's generation uses seed XOR crc32(prompt id)."""
    models: ModelsSection
    prompts: PromptsSection = PromptsSection()
    positions: Count = 32
    """Generated positions per prompt (fewer if a prompt ends on EOS)."""
    generation: GenerationSection = GenerationSection()
    study: GridSection = GridSection()

    @field_validator("prompts", "generation", "study", mode="before")
    @classmethod
    def _section_shorthands(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # a section whose fields are all commented out: the defaults
            return {}
        if info.field_name == "prompts" and isinstance(value, str):  # prompts: humaneval[:8]
            return {"source": value}
        return value


# --- loading --------------------------------------------------------------------------------


def _fields_of_section(parts: list[str]) -> list[str]:
    """Field names of the section of StudyFile at `parts` ([] = the top level)."""
    model: type[BaseModel] = StudyFile
    for part in parts:
        field = model.model_fields.get(part)
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _unknown_field_hint(path: str) -> str:
    """ "unknown field; did you mean study.k_fractions? (expected one of ...)"."""
    parts = path.split(".")
    known = _fields_of_section(parts[:-1])
    prefix = "".join(f"{p}." for p in parts[:-1])
    close = difflib.get_close_matches(parts[-1], known, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"unknown field{hint} (expected one of {', '.join(known)})"


def study_from_dict(raw: Any, where: str = "<memory>") -> StudyConfig:
    """Validate a parsed study mapping (the file's layout) into a StudyConfig.

    Args:
        raw: the parsed file.
        where: the file's name, for the messages.

    Raises:
        ConfigError: one "WHERE: field.path: what was expected (got VALUE)" line per problem,
            every problem of `raw` at once.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(where, [("", f"expected a mapping of fields, got {type(raw).__name__}")])
    try:
        spec = StudyFile.model_validate(dict(raw))
    except ValidationError as exc:
        problems = [
            (path, _unknown_field_hint(path) if msg.startswith("unknown field") else msg)
            for path, msg in validation_problems(exc, model=StudyFile)
        ]
        raise ConfigError(where, problems) from None
    return StudyConfig(spec, where)


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file (YAML; duplicate keys are refused).

    Raises:
        ConfigError: the file cannot be read or parsed, or any field is invalid (every
            problem at once, each line naming the file and the field).
    """
    return study_from_dict(load_yaml(path), str(path))


# --- what the code reads ----------------------------------------------------------------------

_PATHS: dict[str, str] = {
    "name": "name",
    "seed": "seed",
    "draft": "models.draft",
    "workers": "models.workers",
    "weights": "models.weights",
    "dtype": "models.dtype",
    "threads": "models.threads",
    "prompt_source": "prompts.source",
    "n_prompts": "prompts.count",
    "positions": "positions",
    "generation_mode": "generation.mode",
    "generation_temperature": "generation.temperature",
    "gamma": "generation.gamma",
    "temperatures": "study.temperatures",
    "k_fractions": "study.k_fractions",
    "reconstructions": "study.reconstructions",
    "softmax": "study.softmax",
    "chunk_positions": "study.chunk_positions",
}
"""StudyConfig's flat names -> the file's dotted field paths (`StudyConfig.replace`)."""


@dataclass(frozen=True)
class StudyConfig:
    """A validated study: the file's sections (`spec`) under the flat names the code uses.

    Build it with `load_study` or `study_from_dict`; `replace` changes fields and validates
    again. Attributes (all read-only):
        name, seed: the study's name and base seed.
        draft: the draft model (q). workers: worker name -> model (p_i), in file order.
        weights: worker name -> w_i (sum 1). dtype: "bf16" or "fp32". threads: torch threads
        or None. prompt_source, n_prompts: the prompts. positions: generated positions per
        prompt. generation_mode, generation_temperature, gamma: how the continuation is made.
        temperatures, k_fractions, reconstructions, softmax, chunk_positions: the grid.
        source: the file it came from ("<memory>" when built in code).
    """

    spec: StudyFile
    source: str = "<memory>"

    # -- the file's fields under flat names (see _PATHS) --
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def draft(self) -> str:
        return self.spec.models.draft

    @property
    def workers(self) -> dict[str, str]:
        return dict(self.spec.models.workers)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.spec.models.weights)

    @property
    def dtype(self) -> str:
        return self.spec.models.dtype

    @property
    def threads(self) -> int | None:
        return self.spec.models.threads

    @property
    def prompt_source(self) -> str:
        return self.spec.prompts.source

    @property
    def n_prompts(self) -> int:
        return self.spec.prompts.count

    @property
    def positions(self) -> int:
        return self.spec.positions

    @property
    def generation_mode(self) -> str:
        return self.spec.generation.mode

    @property
    def generation_temperature(self) -> float:
        return self.spec.generation.temperature

    @property
    def gamma(self) -> int:
        return self.spec.generation.gamma

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.spec.study.temperatures

    @property
    def k_fractions(self) -> tuple[float, ...]:
        return self.spec.study.k_fractions

    @property
    def reconstructions(self) -> tuple[Reconstruction, ...]:
        return self.spec.study.reconstructions

    @property
    def softmax(self) -> str:
        return self.spec.study.softmax

    @property
    def chunk_positions(self) -> int:
        return self.spec.study.chunk_positions

    # -- derived --
    @property
    def worker_names(self) -> list[str]:
        """Worker names in file order."""
        return list(self.spec.models.workers)

    @property
    def w(self) -> np.ndarray:
        """[N] float64, the weights w_i in worker order."""
        return np.array([self.weights[n] for n in self.worker_names], dtype=np.float64)

    @property
    def models(self) -> list[str]:
        """Distinct models (draft first, then workers in order); each runs once per prompt."""
        return list(dict.fromkeys([self.draft, *self.workers.values()]))

    def to_dict(self) -> dict[str, Any]:
        """The study in the file's layout, every default filled in (study.yaml of a run)."""
        return self.spec.model_dump(mode="json")

    def replace(self, **changes: Any) -> StudyConfig:
        """A copy with some fields changed (flat names: n_prompts=2, threads=1, ...),
        validated again; ConfigError names the file and the file's field path."""
        unknown = sorted(set(changes) - set(_PATHS))
        if unknown:
            raise TypeError(f"StudyConfig.replace: unknown field(s) {', '.join(unknown)}")
        data = self.to_dict()
        for flat, value in changes.items():
            if isinstance(value, tuple):
                value = list(value)
            data = set_path(data, _PATHS[flat], value)
        return study_from_dict(data, self.source)
