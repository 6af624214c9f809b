"""Points: one combination of the per-request options a server varies without reloading.

A `Point` is what a scenario's sweep expands into (testbed/scenario), what the runner writes
for the server (`write_points`), what the server reads (`read_points`) and what its command
line's comma-separated lists expand into (`points_from_lists`): one type, one parser, one
sweep expansion (`specfed.config.cross_product`).

Full transmission has no K and no reconstruction: a point normalizes them away (None), and
sweeps that differ only there collapse into one point.

The policies (specfed.policies) are per-request options too: how gamma is chosen per round
(`gamma_policy`), link-aware K per worker (`k_auto`, with `transmission.k` its cap) and when
a round's replies are enough (`aggregation`). At their defaults (fixed gamma, the point's
K, wait for all) a point describes exactly what it did before they existed, and its
`content()` (what a trace is keyed and matched by) is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from specfed.config import ConfigError, StrictModel, cross_product, validation_problems
from specfed.messages import Transmission
from specfed.options import IndexCoding, Mode, Reconstruction, ValueDtype
from specfed.policies import (
    KAUTO_CODEC_ERROR,
    KAUTO_VALUE_DTYPES,
    MAX_GAMMA,
    AggregationSpec,
    GammaSpec,
    KAuto,
    LinkEstimate,
    policy_columns,
    timing_dependent,
)

__all__ = ["MAX_GAMMA", "Point", "points_from_lists", "read_points", "write_points"]

#: Policy fields of a Point, left out of `Point.content()` while at their defaults.
_POLICY_FIELDS = ("gamma_policy", "k_auto", "aggregation")

Gamma = Annotated[int, Field(ge=0, le=MAX_GAMMA, strict=True)]
Temperature = Annotated[float, Field(ge=0, le=100)]


class Point(StrictModel):
    """One point: the per-request options of a batch of requests, and its ids in the records.

    Attributes mirror the scenario's fields: gamma (decoding.gamma), temperature
    (decoding.temperature), transmission (transmission.mode/k/epsilon/value_dtype/
    index_coding) and
    reconstruction (transmission.reconstruction; None for full transmission).
    """

    gamma: Gamma = 4
    """drafted tokens per round (0 = federated autoregressive decoding)"""
    temperature: Temperature = 1.0
    """T applied to draft and targets alike (0 = greedy)"""
    transmission: Transmission = Transmission()
    """how every worker encodes its distributions"""
    reconstruction: Reconstruction | None = None
    """how the server rebuilds sparse payloads (None for full transmission)"""
    point: Annotated[int, Field(ge=0, strict=True)] = 0
    """the point's index in its sweep (a records column)"""
    rep: Annotated[int, Field(ge=0, strict=True)] = 0
    """the repetition (a records column)"""
    gamma_policy: GammaSpec = GammaSpec()
    """how gamma is chosen per round (fixed: `gamma` every round)"""
    k_auto: KAuto | None = None
    """link-aware K per worker and round (topk only; `transmission.k` is then its k_max)"""
    aggregation: AggregationSpec = AggregationSpec()
    """when a round's replies are enough (default: all of them)"""

    @model_validator(mode="after")
    def _reconstruction_matches_mode(self) -> Point:
        full = self.transmission.mode == Mode.FULL
        if full and self.reconstruction is not None:
            raise ValueError("full transmission has no reconstruction (give none)")
        if not full and self.reconstruction is None:
            raise ValueError(f"{self.transmission.mode} transmission needs a reconstruction")
        if self.k_auto is not None and self.transmission.mode != Mode.TOPK:
            raise ValueError(f"k: auto needs topk transmission, not {self.transmission.mode}")
        if self.gamma_policy.policy != "fixed":
            if self.gamma < 1:
                raise ValueError(
                    f"gamma_policy {self.gamma_policy.policy} needs gamma >= 1 "
                    "(gamma 0 is federated AR: nothing to adapt)"
                )
            cap = self.gamma_policy.cap(self.gamma)
            if not self.gamma_policy.gamma_min <= self.gamma <= cap:
                raise ValueError(
                    f"gamma {self.gamma} is outside gamma_min..gamma_max = "
                    f"{self.gamma_policy.gamma_min}..{cap}"
                )
        return self

    @classmethod
    def of(
        cls,
        *,
        gamma: int,
        temperature: float,
        mode: Mode | str,
        k: int | str | None = None,
        reconstruction: Reconstruction | str | None = Reconstruction.RENORMALIZE,
        epsilon: float | None = None,
        value_dtype: ValueDtype | str = ValueDtype.FP32,
        index_bytes: int | None = None,
        index_coding: IndexCoding | str = IndexCoding.FIXED,
        point: int = 0,
        rep: int = 0,
        gamma_policy: str = "fixed",
        gamma_min: int = 1,
        gamma_max: int | None = None,
        k_budget_ms: float | None = None,
        k_min: int = 1,
        k_max: int = 1024,
        k_source: str = "link",
        links: dict[str, LinkEstimate] | None = None,
        aggregation: AggregationSpec | dict[str, Any] | None = None,
    ) -> Point:
        """A point from flat options, dropping those its mode does not use (full: k,
        epsilon, reconstruction, index coding; topk: epsilon; k_budget_ms, k_min, k_max,
        k_source and links unless k is "auto"; gamma_min, gamma_max for fixed gamma).
        Raises ValueError if invalid."""
        k_auto = None
        m = Mode.parse(mode, "transmission mode")
        if k == "auto" and m == Mode.FULL:
            k = None  # full transmission has no K
        elif k == "auto":
            if k_budget_ms is None:
                raise ValueError("k: auto needs k_budget_ms (the upload budget per reply)")
            k_auto = KAuto(
                budget_ms=k_budget_ms,
                k_min=k_min,
                k_max=k_max,
                source=k_source,  # type: ignore[arg-type]
                links=dict(links or {}),
            )
            k = k_max
            dtype = ValueDtype.parse(value_dtype, "value dtype")
            coding = IndexCoding.parse(index_coding, "index coding")
            if dtype not in KAUTO_VALUE_DTYPES or coding != IndexCoding.FIXED:
                raise ValueError(KAUTO_CODEC_ERROR)
        elif isinstance(k, str):
            raise ValueError(f"k must be an integer or auto, got {k!r}")
        transmission = Transmission.of(m, k, epsilon, value_dtype, index_bytes, index_coding)
        full = transmission.mode == Mode.FULL
        fixed = gamma_policy == "fixed"
        return cls(
            gamma=gamma,
            temperature=temperature,
            transmission=transmission,
            reconstruction=None if full else Reconstruction.parse(reconstruction),
            point=point,
            rep=rep,
            gamma_policy=GammaSpec(
                policy=gamma_policy,  # type: ignore[arg-type]
                gamma_min=1 if fixed else gamma_min,
                gamma_max=None if fixed else gamma_max,
            ),
            k_auto=k_auto,
            aggregation=AggregationSpec.model_validate(aggregation or {}),
        )

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'topk64 renormalize g=4 T=1.0', with the policies
        that are not at their defaults: 'topk-auto(5ms,1-1024,link) renormalize
        g=heuristic:4 T=1.0 quorum2'."""
        parts = [self.k_auto.label if self.k_auto else self.transmission.label]
        if self.reconstruction is not None:
            parts.append(self.reconstruction.value)
        g = self.gamma_policy
        parts += [
            f"g={self.gamma}" if g.policy == "fixed" else f"g={g.policy}:{self.gamma}",
            f"T={self.temperature}",
        ]
        if not self.aggregation.is_default:
            parts.append(self.aggregation.label)
        return " ".join(parts)

    @property
    def reconstruction_or_default(self) -> Reconstruction:
        """The reconstruction the server runs (full payloads are dense: any method gives
        the same p_hat; renormalize is the cheapest)."""
        return self.reconstruction or Reconstruction.RENORMALIZE

    def columns(self) -> dict[str, Any]:
        """The record columns of this point (both tables). With k: auto, `k` is empty here
        (each rounds row carries the worker's K of that round) and `k_max` the cap."""
        return {
            "point": self.point,
            "rep": self.rep,
            **self.transmission.columns(),
            **({"k": None} if self.k_auto else {}),
            "reconstruction": self.reconstruction.value if self.reconstruction else None,
            "gamma": self.gamma,
            "temperature": self.temperature,
            **policy_columns(
                self.gamma_policy,
                self.gamma,
                self.k_auto,
                self.aggregation,
                self.transmission.mode != Mode.FULL,
            ),
        }

    def content(self) -> dict[str, Any]:
        """What the point's generation depends on, as JSON data (ids excluded): what a
        trace is keyed and matched by. Policies at their defaults are left out, so a point
        without policies has the content it had before they existed."""
        data = self.model_dump(mode="json", exclude={"point", "rep"})
        defaults = {
            "gamma_policy": self.gamma_policy.is_default,
            "k_auto": self.k_auto is None,
            "aggregation": self.aggregation.is_default,
        }
        for name in _POLICY_FIELDS:
            if defaults[name]:
                data.pop(name)
        return data

    def key(self) -> tuple[Any, ...]:
        """What makes two points the same configuration (ids excluded)."""
        policies = {k: v for k, v in self.content().items() if k in _POLICY_FIELDS}
        return (
            self.gamma,
            self.temperature,
            self.transmission,
            self.reconstruction,
            json.dumps(policies, sort_keys=True),
        )

    def with_links(self, links: dict[str, LinkEstimate]) -> Point:
        """This point with k: auto starting from `links` (e.g. a run's link calibration);
        a point without k: auto is returned as it is."""
        if self.k_auto is None:
            return self
        return self.model_copy(
            update={"k_auto": self.k_auto.model_copy(update={"links": dict(links)})}
        )

    def timing_dependent(self) -> list[tuple[str, str]]:
        """(scenario field, why) for each policy whose outcome depends on timing: such a
        point runs live only (replay and recording refuse it)."""
        return timing_dependent(self.gamma_policy, self.k_auto, self.aggregation)


_POINTS = TypeAdapter(list[Point])


def write_points(path: Path, points: Sequence[Point]) -> None:
    """Write points as a JSON list (what `read_points` and `--points-file` read)."""
    path.write_bytes(_POINTS.dump_json(list(points), indent=1))


def read_points(path: Path) -> list[Point]:
    """Read a points file; ConfigError naming the file and every bad field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("", f"cannot read: {exc}")]) from exc
    try:
        points = _POINTS.validate_json(text)
    except ValidationError as exc:
        raise ConfigError(str(path), validation_problems(exc)) from exc
    if not points:
        raise ConfigError(str(path), [("", "expected a non-empty JSON list of points")])
    return points


def points_from_lists(
    options: Mapping[str, Sequence[Any]], fixed: Mapping[str, Any] | None = None
) -> list[Point]:
    """The cross product of option lists as points, in order, duplicates dropped.

    `options` maps `Point.of` argument names (mode, k, reconstruction, gamma, temperature,
    epsilon, value_dtype, index_bytes, index_coding, gamma_policy, aggregation, ...) to lists
    of values; `fixed` gives single values.
    Points are numbered 0.. in order. Raises ConfigError listing every bad combination.
    """
    points: list[Point] = []
    seen: set[tuple[Any, ...]] = set()
    problems: list[tuple[str, str]] = []
    for combo in cross_product(dict(options)):
        args = {**(fixed or {}), **combo}
        try:
            p = Point.of(**args, point=len(points))
        except (ValueError, ValidationError) as exc:
            msg = (
                "; ".join(m for _, m in validation_problems(exc))
                if isinstance(exc, ValidationError)
                else str(exc)
            )
            problems.append((json.dumps(combo, default=str), msg))
            continue
        if p.key() not in seen:
            seen.add(p.key())
            points.append(p)
    if problems:
        raise ConfigError("options", problems)
    return points
