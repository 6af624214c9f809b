"""Network tests (root + Mininet): measured link accuracy, per-direction shaping, loss,
TCP settings, backends, and crash-safe cleanup. About 40 s in all.

Each emulated link is checked by measuring it, never by reading back its configuration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netenv import mininet_missing

pytestmark = pytest.mark.mininet


def _skip_reason() -> str | None:
    return mininet_missing(("mnexec", "ip", "tc", "iperf3", "ping"))


_reason = _skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from mininet.topo import Topo  # noqa: E402

from testbed.calibrate import (  # noqa: E402
    Tolerance,
    binomial_bound,
    calibrate_pair,
    measure_goodput,
    measure_loss,
    measure_rtt,
)
from testbed.linkemu import (  # noqa: E402
    EmuNet,
    LinkEmulationError,
    TcpConfigError,
    TcpSettings,
    build_net,
    configure_tcp,
    link_backend,
    netem_available,
    resolve_backend,
)
from testbed.linkparams import DirectionParams, LinkSpec  # noqa: E402
from testbed.state import (  # noqa: E402
    StateRecords,
    cleanup_recorded,
    link_ifindex,
    pids_in_netns,
    proc_matches,
    read_state,
)

REPO = Path(__file__).resolve().parents[1]


class Star(Topo):
    """Hosts ``srv`` and ``names`` on one switch (test-local topology)."""

    def build(self, names: tuple[str, ...] = ("w1",)) -> None:
        sw = self.addSwitch("s1")
        for name in ("srv", *names):
            self.addLink(self.addHost(name), sw)


# srv's link is not shaped, so each srv<->X path measures X's link alone.
STAR_LINKS = {
    "a": LinkSpec.symmetric(bw_mbit=5, delay_ms=30),
    "b": LinkSpec.symmetric(bw_mbit=50, delay_ms=5),
    "c": LinkSpec(
        up=DirectionParams(bw_mbit=10, delay_ms=2), down=DirectionParams(bw_mbit=50, delay_ms=2)
    ),
    "d": LinkSpec(up=DirectionParams(delay_ms=1, loss_pct=2), down=DirectionParams(delay_ms=1)),
}


@pytest.fixture(scope="module")
def star() -> Iterator[EmuNet]:
    emu = build_net(Star(names=tuple(STAR_LINKS)), STAR_LINKS, label="test-star", seed=1)
    yield emu
    report = emu.teardown()
    assert report.clean, report


def _root_names() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _assert_gone(rec: StateRecords) -> None:
    """Nothing the state records list is still there (processes, namespaces, devices)."""
    for p in rec.processes:
        assert not proc_matches(p.pid, p.start), f"process {p} still alive"
    for ns in rec.netns_records:
        assert pids_in_netns(ns.inode) == [], f"namespace of {ns.role} still has processes"
    for link in rec.links:
        if link.netns_pid is None:
            assert link_ifindex(link.name) is None, f"{link.kind} {link.name} still exists"
    ip_br = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    for link in rec.links:
        if link.netns_pid is None:
            assert link.name not in ip_br.split()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in rec.named_netns:
        assert name not in netns


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("host", ["a", "b"])
def test_rtt_and_goodput_match_configuration(star: EmuNet, host: str) -> None:
    """(5 Mbit/s, 30 ms) and (50 Mbit/s, 5 ms): RTT within max(0.5 ms, 3 %), goodput
    >= 0.90 x the rate, both directions."""
    cal = calibrate_pair(star, host, "srv", tolerance=Tolerance(), goodput=True, duration_s=2.0)
    spec = STAR_LINKS[host]
    assert spec.up.bw_mbit is not None
    serialisation_ms = 2 * 98 * 8 / (spec.up.bw_mbit * 1e3)  # one probe frame each way
    want = 2 * spec.up.delay_ms + serialisation_ms
    assert cal.configured_rtt_ms == pytest.approx(want)
    assert cal.rtt_ok, f"RTT {cal.rtt.mean_ms:.3f} ms vs {cal.configured_rtt_ms:.3f} ms"
    assert len(cal.goodput) == 2
    for g in cal.goodput:
        assert g.configured_mbit == STAR_LINKS[host].up.bw_mbit
        assert g.ok, f"goodput {g.src}->{g.dst} {g.mbit:.2f} Mbit/s (ratio {g.ratio:.3f})"
        assert g.ratio is not None and g.ratio < 1.0  # shaped: never above the rate
    assert cal.passed


def test_per_direction_rates(star: EmuNet) -> None:
    """up 10 Mbit/s (c -> switch), down 50 Mbit/s (switch -> c), measured each way."""
    c, srv = star.net["c"], star.net["srv"]
    up = measure_goodput(c, srv, duration_s=2.0, warmup_s=0.5, emu=star)
    down = measure_goodput(srv, c, duration_s=2.0, warmup_s=0.5, emu=star)
    assert 0.90 * 10 <= up.mbit <= 10
    assert 0.90 * 50 <= down.mbit <= 50
    spec = star.links[("c", "s1")]
    assert (spec.up.bw_mbit, spec.down.bw_mbit) == (10, 50)


def test_loss_is_per_direction_and_binomial(star: EmuNet) -> None:
    """2 % loss on d's uplink only: 1000 probes, 4-sigma binomial bound; none lost down."""
    loss = measure_loss(star.net["d"], star.net["srv"], count=1000, interval_s=0.002, emu=star)
    low, high = binomial_bound(loss.sent, 0.02, sigmas=4)
    assert low <= loss.lost_up <= high, loss
    assert loss.lost_down <= 1, loss


def test_rtt_methods_agree(star: EmuNet) -> None:
    b, srv = star.net["b"], star.net["srv"]
    icmp = measure_rtt(b, srv, count=30, emu=star)
    udp = measure_rtt(b, srv, count=30, method="udp", emu=star)
    ping = measure_rtt(b, srv, count=30, method="ping")
    assert icmp.sent == icmp.received == udp.received == ping.received == 30
    assert abs(icmp.mean_ms - ping.mean_ms) < 0.2
    # the UDP probe is a Python process on both ends: a few tenths of a ms slower than
    # ICMP on a busy host (0.35 ms measured once under a full test run); the calibration's
    # tolerance is 0.5 ms, and it judges the median
    assert abs(icmp.median_ms - udp.median_ms) < 0.5


# --------------------------------------------------------------------------- settings


def test_tcp_settings_are_pinned_in_every_host(star: EmuNet) -> None:
    want = {"net.ipv4.tcp_congestion_control": "bbr", "net.ipv4.tcp_slow_start_after_idle": "0"}
    assert set(star.tcp) == {h.name for h in star.net.hosts}
    assert all(v == want for v in star.tcp.values())
    a = star.net["a"]
    assert a.cmd("sysctl -n net.ipv4.tcp_congestion_control").strip() == "bbr"
    try:
        # a namespace may only choose one of the root's tcp_allowed_congestion_control
        got = configure_tcp([a], TcpSettings("reno", 1))
        assert got == {
            "a": {
                "net.ipv4.tcp_congestion_control": "reno",
                "net.ipv4.tcp_slow_start_after_idle": "1",
            }
        }
        with pytest.raises(TcpConfigError, match="host a"):
            configure_tcp([a], TcpSettings("no_such_cc"))
    finally:
        configure_tcp([a])


def test_backend_is_reported(star: EmuNet, monkeypatch: pytest.MonkeyPatch) -> None:
    assert star.backend == link_backend(star.net) == link_backend(star) == resolve_backend()
    assert all(link_backend(link) == star.backend for link in star.net.links)
    assert isinstance(netem_available(), bool)
    if not netem_available():
        assert star.backend == "tap" or os.environ.get("SPECFED_LINK_BACKEND") == "tc"
    monkeypatch.setenv("SPECFED_LINK_BACKEND", "tap")
    assert resolve_backend() == "tap"
    monkeypatch.setenv("SPECFED_LINK_BACKEND", "netem")
    with pytest.raises(LinkEmulationError, match="SPECFED_LINK_BACKEND"):
        resolve_backend()


def test_everything_created_is_recorded(star: EmuNet) -> None:
    rec = read_state(star.state.path)
    roles = [p.role for p in rec.processes]
    assert sum(r.startswith("host ") for r in roles) == len(star.net.hosts)
    assert sum(r.startswith("switch ") for r in roles) == len(star.net.switches)
    if star.backend == "tap":
        assert sum(r.startswith("forwarder ") for r in roles) == len(star.net.links)
    assert len(rec.netns_records) == len(star.net.hosts)
    bridge = star.net["s1"].bridge_name
    assert [(r.name, r.ifindex) for r in rec.links if r.kind == "bridge"] == [
        (bridge, link_ifindex(bridge))
    ]
    for link in star.net.links:
        for intf in (link.intf1, link.intf2):
            if not intf.node.inNamespace:  # switch ports: tagged and recorded with ifindex
                assert intf.name.startswith(bridge)
                assert any(
                    r.name == intf.name and r.ifindex == link_ifindex(intf.name) for r in rec.links
                )


def test_emulink_in_plain_mininet_code(tmp_path: Path) -> None:
    """Mininet's own API: EmuLink with TCLink's keyword options (both directions, params2
    for switch -> host) parses them once into its spec and shapes the link as asked
    (4 ms + 6 ms one way: 10 ms RTT measured); net.stop() leaves nothing."""
    import functools

    from mininet.net import Mininet

    from testbed.linkemu import EmuBridge, EmuHost, EmuLink
    from testbed.state import StateFile, cleanup_file

    state = StateFile.create(label="test-plain", directory=tmp_path)
    net = Mininet(
        topo=None,
        link=functools.partial(EmuLink, state=state),
        switch=functools.partial(EmuBridge, state=state),
        host=functools.partial(EmuHost, state=state),
        controller=None,
        build=False,
        waitConnected=False,
    )
    try:
        h1, h2, s1 = net.addHost("h1"), net.addHost("h2"), net.addSwitch("s1")
        link = net.addLink(h1, s1, bw=20, delay="4ms", params2={"delay": "6ms"})
        net.addLink(h2, s1)
        assert link.spec == LinkSpec(
            up=DirectionParams(bw_mbit=20, delay_ms=4, max_queue_size=64),
            down=DirectionParams(bw_mbit=20, delay_ms=6, max_queue_size=64),
        )
        net.build()
        net.start()
        rtt = measure_rtt(h1, h2, count=20)
        assert rtt.received == 20
        assert 10.0 <= rtt.mean_ms <= 11.0, rtt
    finally:
        net.stop()
    rec = read_state(state.path)
    state.close()
    assert cleanup_file(state.path, include_live=True).clean
    _assert_gone(rec)


# --------------------------------------------------------------------------- teardown


def test_normal_run_leaves_nothing() -> None:
    before = _root_names()
    emu = build_net(
        Star(names=("w1", "w2")),
        {"w1": LinkSpec.symmetric(bw_mbit=10, delay_ms=2)},
        label="test-normal",
    )
    rec = read_state(emu.state.path)
    assert emu.net.ping([emu.net["w1"], emu.net["srv"]], timeout="2") == 0.0
    report = emu.teardown()
    assert report.clean and not emu.state.path.exists()
    _assert_gone(rec)
    assert not {n for n in _root_names() - before if n.startswith("sf")}
    assert emu.teardown().files == []  # idempotent


CRASH_CHILD = """
import json, subprocess, sys, time
from mininet.topo import Topo
from testbed.linkemu import build_net
from testbed.linkparams import LinkSpec
class Star(Topo):
    def build(self):
        sw = self.addSwitch("s1")
        for name in ("srv", "w1", "w2"):
            self.addLink(self.addHost(name), sw)
emu = build_net(Star(), {"w1": LinkSpec.symmetric(bw_mbit=10, delay_ms=5)}, label="test-crash")
# a worker-like process in its own session: it outlives the crash and holds the netns
emu.net["w1"].popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"state": str(emu.state.path), "bridge": emu.net["s1"].bridge_name}),
      flush=True)
time.sleep(600)
"""


def _child_env() -> dict[str, str]:
    import mininet

    paths = [str(Path(mininet.__file__).resolve().parents[1]), str(REPO)]
    if "site-packages" in paths[0] or "dist-packages" in paths[0]:  # whole Debian tree
        paths[0] = str(Path(mininet.__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *sys.path[1:]])}


def test_crash_then_cleanup_recorded() -> None:
    """SIGKILL a process that built a net; cleanup_recorded() removes exactly what it
    recorded; a new net builds fine afterwards."""
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        env=_child_env(),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line, "child did not build its net"
        info = json.loads(line)
        state = Path(info["state"])
        rec = read_state(state)
        assert any(p.role.startswith("process in w1") for p in rec.processes)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    time.sleep(0.3)  # PDEATHSIG / SIGHUP reach the forwarders and host shells
    assert link_ifindex(info["bridge"]) is not None  # the bridge outlives the crash
    report = cleanup_recorded(paths=[state])
    assert report.clean, report
    assert info["bridge"] in report.deleted_bridges
    _assert_gone(rec)
    assert not state.exists()
    # and the machine is fit for the next run
    emu = build_net(
        Star(names=("w1",)), {"w1": LinkSpec.symmetric(bw_mbit=20, delay_ms=1)}, label="after"
    )
    try:
        assert emu.net.ping([emu.net["w1"], emu.net["srv"]], timeout="2") == 0.0
    finally:
        assert emu.teardown().clean


FORGETFUL_CHILD = """
import json
from mininet.topo import Topo
from testbed.linkemu import build_net
from testbed.linkparams import LinkSpec
class Star(Topo):
    def build(self):
        sw = self.addSwitch("s1")
        for name in ("srv", "w1"):
            self.addLink(self.addHost(name), sw)
emu = build_net(
    Star(), {"w1": LinkSpec.symmetric(bw_mbit=10, delay_ms=1)}, label="test-forgetful"
)
print(json.dumps({"state": str(emu.state.path), "bridge": emu.net["s1"].bridge_name}))
# exits without emu.teardown()
"""


def test_forgotten_teardown_is_cleaned_at_exit() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORGETFUL_CHILD],
        capture_output=True,
        cwd=REPO,
        env=_child_env(),
        timeout=60,
        check=True,
    ).stdout
    info = json.loads(out.decode().strip().splitlines()[-1])
    assert not Path(info["state"]).exists()
    assert link_ifindex(info["bridge"]) is None


# --------------------------------------------------------------------------- tc backend


def test_tc_backend_refuses_what_the_kernel_cannot_do() -> None:
    if netem_available():
        pytest.skip("this kernel has netem: TCLink's delay works here")
    before = _root_names()
    with pytest.raises(LinkEmulationError, match="netem"):
        build_net(
            Star(),
            {"w1": LinkSpec.symmetric(bw_mbit=10, delay_ms=5)},
            backend="tc",
            label="test-tc",
        )
    assert not {n for n in _root_names() - before if n.startswith("sf")}


def test_tc_backend_rate_and_queue() -> None:
    emu = build_net(
        Star(), {"w1": LinkSpec.symmetric(bw_mbit=20)}, backend="tc", label="test-tc-rate"
    )
    try:
        assert emu.backend == "tc"
        qdiscs = emu.net["w1"].cmd("tc qdisc show dev w1-eth0")
        assert "htb" in qdiscs and "limit 64p" in qdiscs
        g = measure_goodput(emu.net["w1"], emu.net["srv"], duration_s=1.5, warmup_s=0.5, emu=emu)
        assert 0.90 * 20 <= g.mbit <= 20
    finally:
        assert emu.teardown().clean
