"""Two tiers: groups of workers behind edge switches that share an uplink to the server."""

from __future__ import annotations

from mininet.topo import Topo


class TwoTierTopo(Topo):
    """``srv`` on core switch ``s0``; edge switches ``e1``..``eG`` each uplinked to ``s0``;
    ``workers_per_group`` workers behind each edge switch, numbered w1, w2, ... in order.

    A scenario keys a worker's access link by its host name and an edge uplink (the shared
    bottleneck of its group) by the pair ``e1-s0``.
    """

    def build(self, n_groups: int = 2, workers_per_group: int = 2) -> None:
        if n_groups < 1 or workers_per_group < 1:
            raise ValueError(
                f"two-tier: n_groups and workers_per_group must be >= 1, "
                f"got {n_groups} and {workers_per_group}"
            )
        core = self.addSwitch("s0")
        self.addLink(self.addHost("srv"), core)
        n = 0
        for g in range(1, n_groups + 1):
            edge = self.addSwitch(f"e{g}")
            self.addLink(edge, core)
            for _ in range(workers_per_group):
                n += 1
                self.addLink(self.addHost(f"w{n}"), edge)
