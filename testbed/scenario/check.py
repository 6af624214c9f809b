"""`testbed validate`: a scenario checked as far as it can be without root.

Beyond the schema (testbed.scenario.schema) and the sweep: the topology exists and builds with
its params, every worker is a worker host of it, every `links` key names a host or a link of
it, and the prompt spec loads. A topology given by `file` is Python code: it is imported
(executed) here, as Mininet's --custom does. Study files (a top-level `study:` section) are
checked with their own schema (specfed.study).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specfed.config import ConfigError, load_yaml
from testbed.scenario.links import LinkKeyError, link_specs
from testbed.scenario.sweep import Scenario, ScenarioPoint, expand, load_scenario

__all__ = ["ValidationReport", "build_topology", "check_file", "check_scenario", "is_study"]


@dataclass
class ValidationReport:
    """What `testbed validate` prints per file."""

    path: Path
    ok: bool
    message: str
    points: int = 0
    groups: int = 0
    extra: list[str] = field(default_factory=list)


def is_study(raw: Any) -> bool:
    """Study files (python -m specfed.study) have a top-level `study:` section."""
    return isinstance(raw, dict) and "study" in raw


def build_topology(scenario: Scenario) -> Any:
    """The scenario's Topo instance (imports a topology file: it is code).

    Raises ConfigError naming topology.* when it cannot be found or built.
    """
    from topologies import TopologyError, load_topology

    t = scenario.spec.topology
    try:
        cls = load_topology(t.name, t.file)
        return cls(**t.params)
    except TopologyError as exc:
        raise ConfigError(str(scenario.path), [("topology", str(exc))]) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(scenario.path), [("topology.params", str(exc))]) from exc


def _check_point(point: ScenarioPoint) -> list[tuple[str, str]]:
    """Problems of one resolved point against its topology and prompt spec."""
    from specfed.prompts import PromptError, load_prompts

    s = point.scenario
    topo = build_topology(s)
    hosts = topo.hosts()
    problems = [
        (f"models.workers.{host}", f"not a worker host of topology {s.spec.topology.name} "
         f"({', '.join(hosts)})")
        for host in s.workers
        if host not in hosts or host == "srv"
    ]  # fmt: skip
    try:
        link_specs(s.spec.links, hosts, topo.links(), s.spec.topology.name)
    except LinkKeyError as exc:
        path, _, msg = str(exc).partition(": ")
        problems.append((path, msg))
    try:
        load_prompts(s.spec.decoding.prompts)
    except PromptError as exc:
        problems.append(("decoding.prompts", str(exc)))
    if s.spec.compute.mode == "replay":
        from testbed.compute import roles

        try:
            roles(s)
        except ConfigError as exc:
            problems += exc.problems
    return problems


def _check_models(sc: Scenario) -> list[tuple[str, str]]:
    """Every model names something loadable offline, and (where the tokenizers are present)
    the draft and every worker share one vocabulary."""
    from specfed.models import ModelError, peek_vocabulary

    m = sc.spec.models
    problems: list[tuple[str, str]] = []
    seen: dict[str, tuple[int, str] | None] = {}
    for path, spec in [("models.draft", m.draft)] + [
        (f"models.workers.{w}", model) for w, model in m.workers.items()
    ]:
        try:
            seen[path] = peek_vocabulary(spec) if spec not in seen else seen[spec]
        except ModelError as exc:
            problems.append((path, str(exc)))
            continue
        seen[spec] = seen[path]
    reference = seen.get("models.draft")
    for path, vocab in seen.items():
        if path.startswith("models.workers.") and reference and vocab and vocab != reference:
            problems.append(
                (path, f"its vocabulary (V={vocab[0]}, fingerprint {vocab[1]}) differs from the "
                 f"draft's (V={reference[0]}, fingerprint {reference[1]}): draft and workers "
                 "must come from one tokenizer family")
            )  # fmt: skip
    return problems


def check_scenario(sc: Scenario) -> tuple[int, int]:
    """Check a loaded scenario beyond its schema: every sweep point against its topology,
    links and prompts. Returns (points, network groups); ConfigError lists every problem."""
    points = expand(sc, 1)
    problems: list[tuple[str, str]] = []
    for key in dict.fromkeys(pt.infra_key for pt in points):
        first = next(pt for pt in points if pt.infra_key == key)
        problems += [
            x for x in _check_point(first) + _check_models(first.scenario) if x not in problems
        ]
    if problems:
        raise ConfigError(str(sc.path), problems)
    return len(points), len({pt.infra_key for pt in points})


def check_file(path: str | Path, overrides: Sequence[str] = ()) -> ValidationReport:
    """Validate one scenario (or study) file fully, reporting every problem found."""
    p = Path(path)
    try:
        raw = load_yaml(p)
        if is_study(raw) and not overrides:
            from specfed.study import load_study

            load_study(p)
            return ValidationReport(
                p, True, "ok (distribution-level study: python -m specfed.study FILE)"
            )
        n_points, n_groups = check_scenario(load_scenario(p, overrides))
        return ValidationReport(p, True, "ok", n_points, n_groups)
    except ConfigError as exc:
        return ValidationReport(p, False, str(exc))
