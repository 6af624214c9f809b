"""Topologies: structure only (hosts, switches, links). Link parameters come from scenarios.

Every topology names its server host ``srv`` and its workers ``w1``..``wN``, so scenario
files can key links and models by those names. Register new topologies in ``topos`` (the
Mininet convention), or keep them in a file of your own with its own ``topos = {...}`` and
point a scenario at it with ``topology: {file: path/to/file.py, name: ...}``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from topologies.star import StarTopo
from topologies.two_tier import TwoTierTopo

topos: dict[str, Any] = {"star": StarTopo, "two-tier": TwoTierTopo}


class TopologyError(ValueError):
    """A topology could not be found or built; the message says which and why."""


def load_topology(name: str, file: str | Path | None = None) -> Any:
    """The Topo class called `name`, from this package's registry or from `file`'s."""
    registry = topos
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise TopologyError(f"topology file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"user_topology_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise TopologyError(f"cannot load topology file {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found = getattr(module, "topos", None)
        if not isinstance(found, dict):
            raise TopologyError(f"{path} has no `topos = {{...}}` registry")
        registry = found
    if name not in registry:
        where = str(file) if file else "topologies/"
        raise TopologyError(
            f"unknown topology {name!r} in {where}; known: {', '.join(sorted(registry))}"
        )
    return registry[name]
