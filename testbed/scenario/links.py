"""Scenario links -> typed `LinkSpec` per topology link (numbers in ms, Mbit/s, percent).

`links.default` applies to every link; a host name's block merges over it for that host's
access link; an `A-B` block for the link between nodes A and B. Within a block, the fields
given for both directions merge with `up` / `down` overrides (up = host -> switch, or
node1 -> node2). A field left out inherits; `bw_mbit: null` sets "unlimited".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from testbed.linkparams import DirectionParams, LinkSpec
from testbed.scenario.schema import Direction, Link

__all__ = ["LinkKeyError", "link_specs", "resolve_link"]

_DIRECTION_FIELDS = tuple(Direction.model_fields)


class LinkKeyError(ValueError):
    """A `links` key names no host or link of the topology."""


def _given(block: Direction | None) -> dict[str, Any]:
    """The fields a block sets explicitly (left-out fields inherit)."""
    if block is None:
        return {}
    return {f: getattr(block, f) for f in _DIRECTION_FIELDS if f in block.model_fields_set}


def _direction(values: Mapping[str, Any]) -> DirectionParams:
    d = Direction.model_validate(dict(values))  # defaults for what nobody set
    return DirectionParams(
        bw_mbit=d.bw_mbit,
        delay_ms=d.delay_ms,
        jitter_ms=d.jitter_ms,
        loss_pct=d.loss_pct,
        max_queue_size=d.queue_pkts,
    )


def resolve_link(block: Link | None, default: Link | None) -> LinkSpec:
    """The LinkSpec of one link: `block` merged over `default`, each side's directions."""
    base = {**_given(default), **_given(block)}
    out = {}
    for name in ("up", "down"):
        over = {
            **_given(getattr(default, name) if default else None),
            **_given(getattr(block, name) if block else None),
        }
        out[name] = _direction({**base, **over})
    return LinkSpec(up=out["up"], down=out["down"])


def link_specs(
    links: Mapping[str, Link],
    topo_hosts: Sequence[str],
    topo_links: Sequence[tuple[str, str]],
    topology_name: str = "",
) -> tuple[LinkSpec, dict[Any, LinkSpec]]:
    """Scenario links -> (default LinkSpec, {host | (node1, node2): LinkSpec}).

    Raises LinkKeyError naming the key and what the topology has.
    """
    default_block = links.get("default")
    default = resolve_link(None, default_block)
    per: dict[Any, LinkSpec] = {}
    pairs = {f"{a}-{b}": (a, b) for a, b in topo_links} | {
        f"{b}-{a}": (b, a) for a, b in topo_links
    }
    for key, block in links.items():
        if key == "default":
            continue
        spec = resolve_link(block, default_block)
        if key in topo_hosts:
            per[key] = spec
        elif key in pairs:
            per[pairs[key]] = spec
        else:
            raise LinkKeyError(
                f"links.{key}: no such host or link in topology {topology_name} "
                f"(hosts: {', '.join(topo_hosts)}; links: "
                f"{', '.join(f'{a}-{b}' for a, b in topo_links)})"
            )
    return default, per
