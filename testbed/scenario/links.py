"""Scenario links -> typed `LinkSpec` per topology link (numbers in ms, Mbit/s, percent).

`links.default` applies to every link; a host name's block merges over it for that host's
access link; an `A-B` block for the link between nodes A and B. Within a block, the fields
given for both directions merge with `up` / `down` overrides (up = host -> switch, or
node1 -> node2). A field left out inherits; `bw_mbit: null` sets "unlimited". `trace` and
`bw_mbit` are two ways to set the rate: the one set at the more specific place wins (a trace
in `w1` overrides the `bw_mbit` of `default`, and `w1.down.bw_mbit` the trace of `w1`). A
trace becomes a typed `RateTrace` (its file parsed once, cached).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from testbed.linkparams import DirectionParams, LinkSpec, RateTrace
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
    t = d.trace
    return DirectionParams(
        bw_mbit=d.bw_mbit if t is None else None,
        delay_ms=d.delay_ms,
        jitter_ms=d.jitter_ms,
        loss_pct=d.loss_pct,
        max_queue_size=d.queue_pkts,
        trace=None if t is None else RateTrace.load(t.file, t.format, t.loop, t.start_s),
    )


def _merge(blocks: Sequence[Direction | None]) -> dict[str, Any]:
    """The fields of `blocks` merged in order (later ones win); a trace set in a later
    block drops an earlier `bw_mbit` and a later `bw_mbit` an earlier trace."""
    out: dict[str, Any] = {}
    for block in blocks:
        given = _given(block)
        if given.get("trace") is not None:
            out.pop("bw_mbit", None)
        if "bw_mbit" in given:
            out.pop("trace", None)
        out.update(given)
    return out


def resolve_link(block: Link | None, default: Link | None) -> LinkSpec:
    """The LinkSpec of one link: `block` merged over `default`, each side's directions
    (the per-direction blocks of both over the fields for both directions)."""
    out = {}
    for name in ("up", "down"):
        levels = [
            default,
            block,
            getattr(default, name) if default else None,
            getattr(block, name) if block else None,
        ]
        out[name] = _direction(_merge(levels))
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
