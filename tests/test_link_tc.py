"""Unit tests (no root): the tc backend's commands, with a fake node that records them.

The netem path cannot run on a kernel without netem, so this checks what it would ask
tc to do: HTB for the rate, netem for delay/jitter/loss with a limit that adds the delay
line to max_queue_size, a pfifo under HTB when no netem is needed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mininet.link", reason="mininet is not importable")

from testbed.linkemu import EmuTCIntf, LinkEmulationError, nodes
from testbed.linkparams import DirectionParams, LinkParamError


class FakeNode:
    """Stands in for a Mininet node: records commands, answers '' (success)."""

    name = "w1"

    def __init__(self, tc_error: str = "") -> None:
        self.cmds: list[str] = []
        self.tc_error = tc_error

    def cmd(self, *args: object, **_kw: object) -> str:
        line = " ".join(str(a) for a in args)
        self.cmds.append(line)
        if line.startswith("tc qdisc show"):
            return "qdisc noqueue 0: root refcnt 2"
        if self.tc_error and line.startswith("tc qdisc add") and "netem" in line:
            return self.tc_error
        return ""


def make_intf(node: FakeNode) -> EmuTCIntf:
    intf = EmuTCIntf.__new__(EmuTCIntf)
    intf.name, intf.node, intf.mac, intf.ip, intf.prefixLen = "w1-eth0", node, None, None, None
    return intf


def tc_lines(node: FakeNode) -> list[str]:
    return [c for c in node.cmds if c.startswith("tc ") and "show" not in c]


def test_netem_delay_loss_and_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes, "netem_available", lambda: True)
    node = FakeNode()
    egress = DirectionParams(bw_mbit=10, delay_ms=20, jitter_ms=1, loss_pct=2, max_queue_size=100)
    make_intf(node).config(egress=egress)
    lines = tc_lines(node)
    assert any("htb rate 10.000000Mbit" in c for c in lines)
    netem = [c for c in lines if "netem" in c]
    # 100 waiting + 10 Mbit/s x 21 ms in the delay line (17.3 -> 17) + 1
    assert netem == [
        "tc qdisc add dev w1-eth0  parent 5:1  handle 10: netem "
        "delay 20ms 1ms loss 2.00000 limit 118"
    ]


def test_rate_only_uses_pfifo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes, "netem_available", lambda: False)
    node = FakeNode()
    make_intf(node).config(egress=DirectionParams(bw_mbit=20, max_queue_size=64))
    lines = tc_lines(node)
    assert not any("netem" in c for c in lines)
    assert lines[-1] == "tc qdisc add dev w1-eth0 parent 5:1 handle 10: pfifo limit 64"


def test_no_netem_refuses_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes, "netem_available", lambda: False)
    with pytest.raises(LinkEmulationError, match="w1-eth0: delay/jitter/loss need the netem"):
        make_intf(FakeNode()).config(egress=DirectionParams(bw_mbit=20, delay_ms=5))


def test_tc_errors_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes, "netem_available", lambda: True)
    node = FakeNode(tc_error="Error: Specified qdisc kind is unknown.")
    with pytest.raises(LinkEmulationError, match="qdisc kind is unknown"):
        make_intf(node).config(egress=DirectionParams(delay_ms=5))


def test_mininet_style_options_mean_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """TCLink's keyword options (Mininet's API) are parsed once into the same numbers:
    the same tc commands as the typed ``egress``; both at once are refused."""
    monkeypatch.setattr(nodes, "netem_available", lambda: True)
    typed, mininet_style = FakeNode(), FakeNode()
    egress = DirectionParams(bw_mbit=10, delay_ms=20, jitter_ms=1, loss_pct=2, max_queue_size=100)
    make_intf(typed).config(egress=egress)
    make_intf(mininet_style).config(
        bw=10, delay="20ms", jitter="1000us", loss="2%", max_queue_size=100
    )
    assert tc_lines(mininet_style) == tc_lines(typed)
    with pytest.raises(LinkParamError, match="w1-eth0: delay: bad time"):
        make_intf(FakeNode()).config(delay="20 mss")
    with pytest.raises(LinkParamError, match="not both"):
        make_intf(FakeNode()).config(egress=egress, bw=5)


def test_tc_strings_only_at_the_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fractional numbers reach tc as TCLink's strings, and the netem limit is computed
    from the numbers (0.5 ms + 0.25 ms at 100 Mbit/s: 6.19 -> 6 packets + 1)."""
    monkeypatch.setattr(nodes, "netem_available", lambda: True)
    node = FakeNode()
    egress = DirectionParams(bw_mbit=100, delay_ms=0.5, jitter_ms=0.25, max_queue_size=10)
    make_intf(node).config(egress=egress)
    netem = [c for c in tc_lines(node) if "netem" in c]
    assert netem == [
        "tc qdisc add dev w1-eth0  parent 5:1  handle 10: netem delay 0.5ms 0.25ms limit 17"
    ]


def test_gso_segments_cap_the_burst() -> None:
    from testbed.linkemu import gso_segments

    assert gso_segments(DirectionParams(bw_mbit=100)) == 8  # 8 x 1514 B = 0.97 ms
    assert gso_segments(DirectionParams(bw_mbit=20)) == 1  # single frames below ~25 Mbit/s
    assert gso_segments(DirectionParams(bw_mbit=1000)) == 82
    assert gso_segments(DirectionParams()) == 65535  # no rate: no serialisation
    assert gso_segments(DirectionParams(bw_mbit=100, loss_pct=1)) == 1
    assert gso_segments(DirectionParams(bw_mbit=100, max_queue_size=10)) == 1
