"""Each worker's path to the server as the scenario configures it: the link estimate that
link-aware K (`transmission.k: auto`) starts from when no calibration is available (replay,
and `testbed validate`). A live run replaces it with the run's link calibration.

The path is the shortest one from the worker host to `srv` in the topology; its upload
goodput is the smallest configured rate (a trace-driven link's mean rate) in the worker ->
server direction times the TCP
payload share of a frame (`specfed.policies.GOODPUT_PER_RATE`); its RTT the sum of both
one-way delays of every link on it. Loss and jitter are not part of the estimate (a
calibration measures their effect).
"""

from __future__ import annotations

from collections.abc import Mapping

from specfed.policies import GOODPUT_PER_RATE, LinkEstimate
from testbed.linkparams import LinkSpec, path_specs
from testbed.scenario.sweep import Scenario

__all__ = ["configured_estimates", "configured_specs", "path_estimate"]

SERVER = "srv"


def path_estimate(
    specs: Mapping[tuple[str, str], LinkSpec], src: str, dst: str = SERVER
) -> LinkEstimate:
    """The configured estimate of the path src -> dst over links oriented node1 -> node2
    (`up` = node1 -> node2). ValueError if there is no path."""
    rates, rtt = [], 0.0
    for _key, spec in path_specs(specs, src, dst):  # oriented: up = src -> dst
        forward = spec.up
        rate = forward.trace.mean_mbit if forward.trace is not None else forward.bw_mbit
        if rate:  # a trace-driven link: its mean rate
            rates.append(rate)
        rtt += spec.up.delay_ms + spec.down.delay_ms
    up = min(rates) * GOODPUT_PER_RATE if rates else None
    return LinkEstimate(up_mbit=up, rtt_ms=rtt, source="configured")


def configured_specs(scenario: Scenario) -> dict[tuple[str, str], LinkSpec]:
    """Every link of the scenario's topology with the spec the real net gives it, oriented
    as the net builds it (builds the topology object, no network: no root needed)."""
    from testbed.linkemu.net import _resolve_specs
    from testbed.scenario.check import build_topology
    from testbed.scenario.links import link_specs

    sc = scenario.spec
    topo = build_topology(scenario)
    default, per = link_specs(sc.links, topo.hosts(), topo.links(), sc.topology.name)
    return dict(_resolve_specs(topo, per, default))


def configured_estimates(scenario: Scenario) -> dict[str, LinkEstimate]:
    """Worker host -> its configured path estimate to the server (no root needed)."""
    specs = configured_specs(scenario)
    return {w: path_estimate(specs, w) for w in scenario.spec.models.workers}
