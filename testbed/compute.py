"""The compute side of a scenario run: live, or record once and replay (compute.mode).

For a replay group: `ensure_traces` records what is missing with `python -m specfed.record`
(a subprocess in the root namespace, before the network is built; traces are cached and
reused across runs), `role_compute` says where each role's emulated compute comes from (a
device profile, or the times measured at record time), and `replay_args` gives the worker /
server command-line options.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specfed.config import ConfigError
from specfed.points import write_points
from specfed.provenance import REPO
from testbed.scenario import Scenario, ScenarioPoint

__all__ = ["RoleCompute", "ensure_traces", "replay_args", "role_compute"]


class ComputeError(RuntimeError):
    """Recording failed, or a role has no usable device profile."""


@dataclass(frozen=True)
class RoleCompute:
    """Where one role's (draft or worker) emulated compute comes from.

    `source` is "recorded" or the path of a device profile file; `profile` is the loaded
    profile's name (or "recorded"); `speed` divides every emulated time."""

    role: str
    source: str
    profile: str
    speed: float
    document: dict[str, Any] | None = None


def role_compute(sc: Scenario, role: str, model: str) -> RoleCompute:
    """The compute of `role` running `model` (ConfigError naming compute.profiles when the
    profile is missing or was measured for another model, dtype or thread count)."""
    c, m = sc.spec.compute, sc.spec.models
    spec = c.role_profile(role)
    speed = c.role_speed(role)
    if spec == "recorded":
        return RoleCompute(role, "recorded", "recorded", speed)
    from specfed.profile import find_profile, load_profile

    where = f"compute.profiles.{role}" if isinstance(c.profiles, dict) else "compute.profiles"
    try:
        if spec == "auto":
            profile = find_profile(model, m.dtype, m.threads)
            if profile is None:
                raise ValueError(
                    f"no shipped device profile for {model} ({m.dtype}, {m.threads} thread(s)): "
                    f"measure one with `python -m specfed.bench profile --model {model} --dtype "
                    f"{m.dtype} --threads {m.threads} --out FILE` and name the file here, or use "
                    "recorded"
                )
        else:
            profile = load_profile(spec)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        raise ConfigError(str(sc.path), [(where, str(exc))]) from exc
    mismatch = [
        f"{what} {mine!r} (the role runs {theirs!r})"
        for what, mine, theirs in (
            ("model", profile.model, model),
            ("dtype", profile.dtype, m.dtype),
            ("threads", profile.threads, m.threads),
        )
        if mine != theirs
    ]
    if mismatch:
        raise ConfigError(
            str(sc.path),
            [(where, f"profile {profile.name} was measured for " + ", ".join(mismatch))],
        )
    is_file = spec != "auto" and Path(spec).is_file()
    return RoleCompute(
        role,
        str(Path(spec).resolve()) if is_file else profile.name,  # a file, or a shipped name
        profile.name,
        speed,
        profile.model_dump(mode="json"),
    )


def roles(sc: Scenario) -> dict[str, RoleCompute]:
    """Every role's compute: the draft, then each worker host."""
    m = sc.spec.models
    out = {"draft": role_compute(sc, "draft", m.draft)}
    for w, model in m.workers.items():
        out[w] = role_compute(sc, w, model)
    return out


def ensure_traces(group: list[ScenarioPoint], work_dir: Path, log: Path) -> list[Path]:
    """The traces of a group's points, recording the missing ones (in a subprocess, models
    loaded once per distinct model). Raises ComputeError with the recorder's last lines."""
    sc = group[0].scenario
    s = sc.spec
    points_file = work_dir / f"record-{group[0].index}-r{group[0].rep}.json"
    write_points(points_file, [p.request for p in group])
    argv = [
        sys.executable, "-m", "specfed.record",
        "--draft", s.models.draft,
        "--workers", ",".join(f"{w}={m}" for w, m in s.models.workers.items()),
        "--points-file", str(points_file),
        "--prompts", s.decoding.prompts,
        "--max-new-tokens", str(s.decoding.max_new_tokens),
        "--seed", str(s.seed),
        "--dtype", s.models.dtype,
        "--threads", str(s.models.threads),
        "--json",
    ]  # fmt: skip
    if s.models.weights:
        argv += ["--weights", ",".join(repr(s.models.weights[w]) for w in s.models.workers)]
    with log.open("ab") as fh:
        proc = subprocess.run(argv, cwd=str(REPO), stdout=subprocess.PIPE, stderr=fh, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise ComputeError(f"recording failed (status {proc.returncode}); see {log}:\n{tail}")
    paths = json.loads(proc.stdout)
    return [Path(paths[str(p.index)]) for p in group]


def replay_args(traces: list[Path], rc: RoleCompute) -> list[str]:
    """Command-line options of a replaying worker or server."""
    out = [a for t in traces for a in ("--replay", str(t))]
    return [*out, "--compute", rc.source, "--speed", repr(rc.speed)]
