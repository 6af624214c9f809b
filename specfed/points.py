"""Points: one combination of the per-request options a server varies without reloading.

A `Point` is what a scenario's sweep expands into (testbed/scenario), what the runner writes
for the server (`write_points`), what the server reads (`read_points`) and what its command
line's comma-separated lists expand into (`points_from_lists`): one type, one parser, one
sweep expansion (`specfed.config.cross_product`).

Full transmission has no K and no reconstruction: a point normalizes them away (None), and
sweeps that differ only there collapse into one point.
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

__all__ = ["MAX_GAMMA", "Point", "points_from_lists", "read_points", "write_points"]

MAX_GAMMA = 64
"""Largest gamma accepted anywhere (drafted tokens per round)."""

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

    @model_validator(mode="after")
    def _reconstruction_matches_mode(self) -> Point:
        full = self.transmission.mode == Mode.FULL
        if full and self.reconstruction is not None:
            raise ValueError("full transmission has no reconstruction (give none)")
        if not full and self.reconstruction is None:
            raise ValueError(f"{self.transmission.mode} transmission needs a reconstruction")
        return self

    @classmethod
    def of(
        cls,
        *,
        gamma: int,
        temperature: float,
        mode: Mode | str,
        k: int | None = None,
        reconstruction: Reconstruction | str | None = Reconstruction.RENORMALIZE,
        epsilon: float | None = None,
        value_dtype: ValueDtype | str = ValueDtype.FP32,
        index_bytes: int | None = None,
        index_coding: IndexCoding | str = IndexCoding.FIXED,
        point: int = 0,
        rep: int = 0,
    ) -> Point:
        """A point from flat options, dropping those its mode does not use (full: k,
        epsilon, reconstruction, index coding; topk: epsilon). Raises ValueError if invalid."""
        transmission = Transmission.of(mode, k, epsilon, value_dtype, index_bytes, index_coding)
        full = transmission.mode == Mode.FULL
        return cls(
            gamma=gamma,
            temperature=temperature,
            transmission=transmission,
            reconstruction=None if full else Reconstruction.parse(reconstruction),
            point=point,
            rep=rep,
        )

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'topk64 renormalize g=4 T=1.0'."""
        parts = [self.transmission.label]
        if self.reconstruction is not None:
            parts.append(self.reconstruction.value)
        return " ".join([*parts, f"g={self.gamma}", f"T={self.temperature}"])

    @property
    def reconstruction_or_default(self) -> Reconstruction:
        """The reconstruction the server runs (full payloads are dense: any method gives
        the same p_hat; renormalize is the cheapest)."""
        return self.reconstruction or Reconstruction.RENORMALIZE

    def columns(self) -> dict[str, Any]:
        """The record columns of this point (both tables)."""
        return {
            "point": self.point,
            "rep": self.rep,
            **self.transmission.columns(),
            "reconstruction": self.reconstruction.value if self.reconstruction else None,
            "gamma": self.gamma,
            "temperature": self.temperature,
        }

    def key(self) -> tuple[Any, ...]:
        """What makes two points the same configuration (ids excluded)."""
        return (self.gamma, self.temperature, self.transmission, self.reconstruction)


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
    epsilon, value_dtype, index_bytes, index_coding) to lists of values; `fixed` gives single
    values.
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
