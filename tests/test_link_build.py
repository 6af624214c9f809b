"""Unit tests (no root, no network): how build_net and EmuLink arrive at each link's
LinkSpec -- typed specs only into build_net, orientation of host and pair keys, the
topology's own options parsed once, TCLink-style options on EmuLink parsed once."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mininet.topo", reason="mininet is not importable")

from mininet.topo import Topo

from testbed.linkemu import build_net, link_spec, queue_rtts
from testbed.linkemu.net import _mininet_options, _resolve_specs
from testbed.linkparams import DirectionParams, LinkParamError, LinkSpec

UP10_DOWN50 = LinkSpec(
    up=DirectionParams(bw_mbit=10, delay_ms=2), down=DirectionParams(bw_mbit=50, delay_ms=3)
)


class Star(Topo):
    """``srv`` on switch ``s1`` listed host first; ``w1`` listed switch first (so the
    topology's link is (s1, w1)); ``w2`` declares its own TCLink-style options."""

    def build(self) -> None:
        sw = self.addSwitch("s1")
        self.addLink(self.addHost("srv"), sw)
        self.addLink(sw, self.addHost("w1"))
        self.addLink(
            self.addHost("w2"),
            sw,
            bw=5,
            delay="3ms",
            params1={"loss": 1, "mac": "00:00:00:00:00:02"},
            params2={"jitter": "500us"},
        )


class TwoSwitches(Topo):
    """``w1`` with two links (one to each switch)."""

    def build(self) -> None:
        s1, s2 = self.addSwitch("s1"), self.addSwitch("s2")
        w1 = self.addHost("w1")
        self.addLink(w1, s1)
        self.addLink(w1, s2)


def test_build_net_takes_link_specs_only(tmp_path: Path) -> None:
    """TCLink-style mappings are refused with a TypeError that says how to build a
    LinkSpec, before anything is created (no state file)."""
    with pytest.raises(
        TypeError,
        match=r"link_params\['w1'\] must be a LinkSpec, got dict.*"
        r"LinkSpec\.from_options",
    ):
        build_net(Star(), {"w1": {"bw": 10, "delay": "5ms"}}, state_dir=tmp_path)
    with pytest.raises(TypeError, match="default must be a LinkSpec, got dict"):
        build_net(Star(), default={"bw": 10}, state_dir=tmp_path)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_host_and_pair_keys_are_oriented() -> None:
    """A host key's ``up`` is host -> switch whichever order the topology lists them; a
    pair key's ``up`` is its first node -> its second."""
    default = LinkSpec.symmetric(bw_mbit=100, delay_ms=1)
    specs = _resolve_specs(Star(), {"w1": UP10_DOWN50}, default)
    assert specs[("s1", "w1")] == UP10_DOWN50.reversed()  # up = s1 -> w1
    assert specs[("srv", "s1")] == default
    specs = _resolve_specs(Star(), {("srv", "s1"): UP10_DOWN50, ("w1", "s1"): UP10_DOWN50}, default)
    assert specs[("srv", "s1")] == UP10_DOWN50
    assert specs[("s1", "w1")] == UP10_DOWN50.reversed()


def test_topology_options_are_parsed_once() -> None:
    """w2's topology options (top level both ways, params1 = w2 -> s1, params2 = s1 -> w2)
    become its LinkSpec; the Mininet options left for addLink carry no shaping."""
    specs = _resolve_specs(Star(), {}, LinkSpec())
    assert specs[("w2", "s1")] == LinkSpec(
        up=DirectionParams(bw_mbit=5, delay_ms=3, loss_pct=1),
        down=DirectionParams(bw_mbit=5, delay_ms=3, jitter_ms=0.5),
    )
    options = _mininet_options(Star().linkInfo("w2", "s1"))
    assert options["params1"] == {"mac": "00:00:00:00:00:02"}
    assert options["params2"] == {}
    assert not {"node1", "node2", "bw", "delay"} & set(options)
    # link_params override the topology's options
    assert _resolve_specs(Star(), {"w2": UP10_DOWN50}, LinkSpec())[("w2", "s1")] == UP10_DOWN50


def test_bad_keys_name_the_problem() -> None:
    with pytest.raises(LinkParamError, match="'w9' is not a host"):
        _resolve_specs(Star(), {"w9": UP10_DOWN50}, LinkSpec())
    with pytest.raises(LinkParamError, match="no link w1-srv"):
        _resolve_specs(Star(), {("w1", "srv"): UP10_DOWN50}, LinkSpec())
    with pytest.raises(LinkParamError, match="host 'w1' has 2 links"):
        _resolve_specs(TwoSwitches(), {"w1": UP10_DOWN50}, LinkSpec())


def test_queues_are_sized_for_the_longest_two_link_path() -> None:
    specs = {
        ("a", "s1"): LinkSpec.symmetric(bw_mbit=5, delay_ms=30),  # RTT 60
        ("b", "s1"): LinkSpec.symmetric(bw_mbit=50, delay_ms=5, jitter_ms=1),  # 10 + 2
        ("srv", "s1"): LinkSpec(),  # 0
    }
    assert queue_rtts(specs) == {("a", "s1"): 72.0, ("b", "s1"): 72.0, ("srv", "s1"): 60.0}


def test_emulink_options_are_parsed_once() -> None:
    """EmuLink's TCLink-style options (Mininet's API): popped from each direction's
    interface options and parsed into one LinkSpec; a spec and options together, or a
    spec that is no LinkSpec, are refused."""
    p1 = {"bw": 10, "delay": "2ms", "mac": "00:00:00:00:00:01"}
    p2 = {"bw": 50, "delay": 3}
    assert link_spec(None, p1, p2, "w1", "s1") == UP10_DOWN50
    assert p1 == {"mac": "00:00:00:00:00:01"} and p2 == {}
    assert link_spec(UP10_DOWN50, {"mac": "x"}, {}, "w1", "s1") is UP10_DOWN50
    with pytest.raises(LinkParamError, match=r"link w1<->s1: give spec= .*\(bw\), not both"):
        link_spec(UP10_DOWN50, {}, {"bw": 5}, "w1", "s1")
    with pytest.raises(TypeError, match="spec must be a LinkSpec, got dict"):
        link_spec({"bw": 5}, {}, {}, "w1", "s1")  # type: ignore[arg-type]
    with pytest.raises(LinkParamError, match=r"link w1<->s1 \(s1->w1\): delay: bad time"):
        link_spec(None, {}, {"delay": "3 mss"}, "w1", "s1")
