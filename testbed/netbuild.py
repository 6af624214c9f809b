"""One way from a scenario point to a running emulated network (for `run` and `calibrate`).

The scenario's links become typed `LinkSpec`s (testbed.scenario.links) and go to
`testbed.linkemu.build_net` as numbers; the network section gives the backend, the TCP
settings and the calibration tolerance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.scenario import ScenarioPoint, build_topology, link_specs

if TYPE_CHECKING:
    from testbed.calibrate import Tolerance
    from testbed.linkemu import EmuNet
    from testbed.scenario.schema import Network

__all__ = ["scenario_net", "tolerance"]


def scenario_net(point: ScenarioPoint, label: str) -> EmuNet:
    """Build and start the network of `point` (root). The caller tears it down."""
    from testbed.linkemu import TcpSettings, build_net

    sc = point.scenario
    topo = build_topology(sc)
    default, per = link_specs(sc.spec.links, topo.hosts(), topo.links(), sc.spec.topology.name)
    net = sc.spec.network
    return build_net(
        topo,
        per,
        default=default,
        backend=None if net.backend == "auto" else net.backend,
        tcp=TcpSettings(net.tcp_congestion, net.tcp_slow_start_after_idle),
        label=label,
        seed=sc.spec.seed,
    )


def tolerance(network: Network) -> Tolerance:
    """The calibration tolerance a scenario's network section asks for."""
    from testbed.calibrate import Tolerance

    return Tolerance(
        rtt_abs_ms=network.rtt_tolerance_ms,
        rtt_rel=network.rtt_tolerance_pct / 100,
        goodput_ratio=network.goodput_min_ratio,
        rate_rel=network.rate_tolerance_pct / 100,
        loss_sigmas=network.loss_sigmas,
    )
