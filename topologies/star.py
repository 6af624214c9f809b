"""Star: the server and every worker on their own access link to one switch."""

from __future__ import annotations

from mininet.topo import Topo


class StarTopo(Topo):
    """``srv`` and ``w1``..``wN`` each on its own link to switch ``s1``.

    The heterogeneous case: every worker's link (keyed by its host name in a scenario) can
    have its own bandwidth, delay and loss; the server's link (``srv``) is shared by all.
    """

    def build(self, n_workers: int = 2) -> None:
        if n_workers < 1:
            raise ValueError(f"star: n_workers must be >= 1, got {n_workers}")
        sw = self.addSwitch("s1")
        self.addLink(self.addHost("srv"), sw)
        for i in range(1, n_workers + 1):
            self.addLink(self.addHost(f"w{i}"), sw)
