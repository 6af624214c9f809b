"""Loading a scenario (with `--set` overrides) and expanding its sweep into points.

A sweep expands to points (the cross product of its lists, or the union of several such
blocks) x repetitions. Each point is a whole resolved scenario, validated like the file; its
per-request options become a `specfed.points.Point`, the type the server reads. Points that
differ only in per-request options (REQUEST_PATHS) share one network and one set of worker
processes (`infra_key`); anything else rebuilds.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from specfed.config import (
    ConfigError,
    cross_product,
    get_path,
    load_yaml,
    parse_yaml_text,
    set_path,
    validation_problems,
)
from specfed.options import Mode, Reconstruction
from specfed.points import Point
from specfed.policies import GammaSpec, KAuto, timing_dependent
from testbed.scenario.schema import ScenarioSpec

__all__ = [
    "REQUEST_PATHS",
    "SWEEP_SHORTHANDS",
    "Scenario",
    "ScenarioError",
    "ScenarioPoint",
    "expand",
    "group_points",
    "load_scenario",
    "scenario_from_dict",
]

#: Options the server takes per request: sweeping them reuses the running net and workers.
REQUEST_PATHS = (
    "decoding.gamma",
    "decoding.temperature",
    "decoding.gamma_policy",
    "decoding.gamma_min",
    "decoding.gamma_max",
    "transmission.mode",
    "transmission.k",
    "transmission.reconstruction",
    "transmission.epsilon",
    "transmission.value_dtype",
    "transmission.index_coding",
    "transmission.k_budget_ms",
    "transmission.k_min",
    "transmission.k_max",
    "transmission.k_source",
    "aggregation.wait",
    "aggregation.quorum",
    "aggregation.deadline_ms",
)
SWEEP_SHORTHANDS = {
    "transmission": "transmission.mode",
    "k": "transmission.k",
    "reconstruction": "transmission.reconstruction",
    "gamma": "decoding.gamma",
    "temperature": "decoding.temperature",
    "gamma_policy": "decoding.gamma_policy",
    "k_budget_ms": "transmission.k_budget_ms",
    "quorum": "aggregation.quorum",
    "deadline_ms": "aggregation.deadline_ms",
}

ScenarioError = ConfigError
"""A scenario is invalid: every line names the file and the field."""


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file (`spec`), with the file it came from."""

    path: Path
    spec: ScenarioSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def workers(self) -> dict[str, str]:
        """Worker host -> model, in file order."""
        return dict(self.spec.models.workers)

    @property
    def data(self) -> dict[str, Any]:
        """Every field, defaults filled in, as plain YAML/JSON values; except links, which
        keep only the fields given: a link field left out inherits (from the link's block,
        then `default`), so filling in defaults would change what it inherits (a `w2:
        {delay_ms: 50, up: {bw_mbit: 5}}` would lose its up delay after a sweep)."""
        data = self.spec.model_dump(mode="json")
        data["links"] = {
            k: v.model_dump(mode="json", exclude_unset=True) for k, v in self.spec.links.items()
        }
        return data

    def get(self, path: str) -> Any:
        """The value at a dotted path (e.g. 'links.w1.bw_mbit'), as plain data."""
        return get_path(self.data, path)


def _known_path(path: str) -> bool:
    """Whether a dotted sweep path names a scenario field (dict keys such as link and
    worker names are free)."""
    from testbed.scenario.schema import Link, Models

    head, _, rest = path.partition(".")
    if head not in ScenarioSpec.model_fields or head in ("sweep", "repetitions", "name"):
        return False
    if not rest:
        return True
    if head == "links":
        key, _, field = rest.partition(".")
        if not field:
            return bool(key)
        fld, _, sub = field.partition(".")
        if fld in ("up", "down"):
            return sub in Link.model_fields and sub not in ("up", "down")
        return fld in Link.model_fields and not sub
    if head == "models" and rest.split(".")[0] in ("workers", "weights"):
        return len(rest.split(".")) <= 2
    if head == "topology" and rest.startswith("params"):
        return True
    section = ScenarioSpec.model_fields[head].annotation
    fields = getattr(section, "model_fields", {})
    return rest in fields or (head == "models" and rest in Models.model_fields)


def _check_sweep(raw: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """Problems of the sweep's shape and paths (values are checked per point)."""
    sweep = raw.get("sweep", {})
    blocks = sweep if isinstance(sweep, list) else [sweep]
    problems = []
    if not isinstance(sweep, dict | list):
        return [
            ("sweep", f"expected a mapping of path -> [values], or a list of them, got {sweep!r}")
        ]
    for n, block in enumerate(blocks):
        where = f"sweep[{n}]" if isinstance(sweep, list) else "sweep"
        if not isinstance(block, dict):
            problems.append((where, f"expected a mapping of path -> [values], got {block!r}"))
            continue
        for key, values in block.items():
            if not isinstance(values, list) or not values:
                problems.append((f"{where}.{key}", f"expected a non-empty list, got {values!r}"))
            if not _known_path(SWEEP_SHORTHANDS.get(str(key), str(key))):
                problems.append(
                    (
                        f"{where}.{key}",
                        "not a scenario field (use a dotted path such as links.w1.bw_mbit, "
                        f"or one of {', '.join(SWEEP_SHORTHANDS)})",
                    )
                )
    return problems


_RANGE = re.compile(r"^(?P<p>[A-Za-z_]+)(?P<a>\d+)\.\.(?P=p)?(?P<b>\d+)$")


def expand_ranges(mapping: Any, where: str, problems: list[tuple[str, str]]) -> Any:
    """A mapping whose keys may name ranges of hosts, `w1..w16` (or `w1..16`): each range
    becomes one key per host with the same value, in order; explicit keys win over ranges."""
    if not isinstance(mapping, dict):
        return mapping
    out: dict[Any, Any] = {}
    explicit = {k: v for k, v in mapping.items() if not (isinstance(k, str) and _RANGE.match(k))}
    for key, value in mapping.items():
        m = _RANGE.match(key) if isinstance(key, str) else None
        if m is None:
            out[key] = value
            continue
        a, b = int(m["a"]), int(m["b"])
        if not 1 <= a <= b <= 4096:
            problems.append((f"{where}.{key}", "a range needs 1 <= first <= last <= 4096"))
            continue
        for i in range(a, b + 1):
            out.setdefault(f"{m['p']}{i}", value)
    out.update(explicit)
    return out


def scenario_from_dict(raw: Any, source: str, path: Path | None = None) -> Scenario:
    """Validate a parsed scenario; ConfigError listing every problem at once.

    Host keys of `links`, `models.workers` and `models.weights` may be ranges (`w1..w32`)."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", f"expected a mapping of fields, got {raw!r}")])
    problems: list[tuple[str, str]] = []
    raw = dict(raw)
    if "links" in raw:
        raw["links"] = expand_ranges(raw["links"], "links", problems)
    if isinstance(raw.get("models"), dict):
        models = dict(raw["models"])
        for key in ("workers", "weights"):
            if key in models:
                models[key] = expand_ranges(models[key], f"models.{key}", problems)
        raw["models"] = models
    try:
        # relative file paths in the scenario (link traces) are relative to its folder
        base = (path or Path(source)).parent if (path or Path(source)).suffix else None
        spec = ScenarioSpec.model_validate(raw, context={"base_dir": base})
    except ValidationError as exc:
        problems += validation_problems(exc, model=ScenarioSpec)
        spec = None
    problems += _check_sweep(raw, source)
    if spec is not None:
        problems += _check_policies(spec)
    if problems or spec is None:
        raise ConfigError(source, problems)
    return Scenario(path or Path(source), spec)


def _check_policies(spec: ScenarioSpec) -> list[tuple[str, str]]:
    """Problems of the policies against the rest of the scenario: a quorum larger than the
    workers, a timing-dependent policy in replay mode (it cannot be recorded in process)."""
    problems = []
    n = len(spec.models.workers)
    quorum = spec.aggregation.quorum
    if quorum is not None and quorum > n:
        problems.append(("aggregation.quorum", f"{quorum} exceeds the {n} workers"))
    if spec.compute.mode == "replay":
        t = spec.transmission
        k_auto = (
            KAuto(budget_ms=t.k_budget_ms or 1.0, source=t.k_source)
            if t.k == "auto" and t.mode == Mode.TOPK
            else None
        )
        gamma = GammaSpec(policy=spec.decoding.gamma_policy)
        for where, why in timing_dependent(gamma, k_auto, spec.aggregation):
            problems.append(
                (where, f"{why}: compute.mode replay cannot replay it; use compute.mode: live")
            )
    return problems


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Read a scenario file, apply `--set PATH=VALUE` overrides (values parsed as YAML;
    the sweep shorthands work as paths) and validate it."""
    path = Path(path)
    raw = load_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--set {item!r}", [("", "expected PATH=VALUE, e.g. decoding.gamma=6")]
            )
        parsed = parse_yaml_text(value, f"--set {key}")
        if not isinstance(raw, dict):
            break  # reported by validation
        try:
            raw = set_path(raw, SWEEP_SHORTHANDS.get(key, key), parsed)
        except ValueError as exc:
            raise ConfigError(f"--set {key}", [("", str(exc))]) from exc
    return scenario_from_dict(raw, str(path), path)


@dataclass(frozen=True)
class ScenarioPoint:
    """One sweep point x repetition: its index, the values it sets, the resolved scenario."""

    index: int
    values: dict[str, Any]
    scenario: Scenario
    rep: int = 0

    @property
    def request(self) -> Point:
        """The per-request options, as the server reads them."""
        from testbed.scenario.paths import configured_estimates

        s = self.scenario.spec
        t, d = s.transmission, s.decoding
        auto = t.k == "auto" and t.mode == Mode.TOPK
        return Point.of(
            gamma=d.gamma,
            temperature=d.temperature,
            mode=t.mode,
            k=t.k,
            reconstruction=t.reconstruction,
            epsilon=t.epsilon,
            value_dtype=t.value_dtype,
            index_coding=t.index_coding,
            point=self.index,
            rep=self.rep,
            gamma_policy=d.gamma_policy,
            gamma_min=d.gamma_min,
            gamma_max=d.gamma_max,
            k_budget_ms=t.k_budget_ms,
            k_min=t.k_min,
            k_max=t.k_max,
            k_source=t.k_source,
            links=configured_estimates(self.scenario) if auto else None,
            aggregation=s.aggregation,
        )

    @property
    def infra_key(self) -> str:
        """Everything but the per-request options: equal keys share a net and workers."""
        data = self.scenario.data
        for path in REQUEST_PATHS:
            section, key = path.split(".")
            data[section].pop(key, None)
        for key in ("sweep", "repetitions", "description"):
            data.pop(key, None)
        return json.dumps(data, sort_keys=True)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "base"


def expand(scenario: Scenario, repetitions: int | None = None) -> list[ScenarioPoint]:
    """Sweep points x repetitions, in run order.

    Order: repetition-major; within a repetition points are grouped by network (infra_key)
    so a group shares one net and one set of workers. With random_order, groups and the
    points inside each group are shuffled per repetition (seeded by the scenario seed).
    Full transmission has no k and reconstruction, so points differing only there collapse.
    Raises ConfigError listing every invalid point.
    """
    spec = scenario.spec
    base = scenario.data
    base["sweep"] = {}
    points: list[ScenarioPoint] = []
    seen: set[str] = set()
    problems: list[tuple[str, str]] = []
    combos = cross_product(
        [{SWEEP_SHORTHANDS.get(k, k): v for k, v in b.items()} for b in _blocks(spec.sweep)]
    )
    for values in combos:
        data = base
        for k, v in values.items():
            data = set_path(data, k, v)
        if data["transmission"]["mode"] == Mode.FULL.value:  # no K, no reconstruction
            data = set_path(data, "transmission.k", None)
            data = set_path(data, "transmission.reconstruction", Reconstruction.RENORMALIZE.value)
            values = {
                k: v
                for k, v in values.items()
                if k not in ("transmission.k", "transmission.reconstruction")
            }
        source = f"{scenario.path} (sweep {values})"
        try:
            resolved = scenario_from_dict(data, source, scenario.path)
        except ConfigError as exc:
            problems += [(p, f"{m} (in sweep point {values})") for p, m in exc.problems]
            continue
        point = ScenarioPoint(len(points), values, resolved)
        try:
            request = point.request
        except (ValueError, ValidationError) as exc:
            problems.append(("transmission", f"{exc} (in sweep point {values})"))
            continue
        key = point.infra_key + repr(request.key())
        if key in seen:
            continue
        seen.add(key)
        points.append(point)
    if problems:
        raise ConfigError(str(scenario.path), problems)
    reps = repetitions if repetitions is not None else spec.repetitions
    rng = random.Random(spec.seed)
    ordered: list[ScenarioPoint] = []
    for rep in range(reps):
        groups: dict[str, list[ScenarioPoint]] = {}
        for p in points:
            groups.setdefault(p.infra_key, []).append(p)
        batches = list(groups.values())
        if spec.random_order:
            rng.shuffle(batches)
            for b in batches:
                rng.shuffle(b)
        ordered += [ScenarioPoint(p.index, p.values, p.scenario, rep) for b in batches for p in b]
    return ordered


def _blocks(sweep: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> list[dict[str, Any]]:
    return sweep if isinstance(sweep, list) else [sweep]


def group_points(points: Sequence[ScenarioPoint]) -> list[list[ScenarioPoint]]:
    """Consecutive points of one repetition that share a network, as groups (run order)."""
    groups: list[list[ScenarioPoint]] = []
    for p in points:
        if groups and groups[-1][0].infra_key == p.infra_key and groups[-1][0].rep == p.rep:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups
