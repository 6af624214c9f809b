"""Calibration against real emulated links (root + Mininet): a lossy link passes, a
wrong link fails, a busy host does not fail a correct link. About a minute."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.netenv import mininet_missing

pytestmark = pytest.mark.mininet


def _skip_reason() -> str | None:
    return mininet_missing(("mnexec", "ip", "iperf3"))


_reason = _skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from mininet.topo import Topo  # noqa: E402

from testbed.calibrate import calibrate_pair  # noqa: E402
from testbed.linkemu import EmuNet, build_net  # noqa: E402
from testbed.linkparams import LinkSpec  # noqa: E402

LINKS = {
    "e": LinkSpec.symmetric(bw_mbit=2, delay_ms=40, loss_pct=1),  # the w2
    "f": LinkSpec.symmetric(bw_mbit=20, delay_ms=5),  # smoke.yaml's w2
    "g": LinkSpec.symmetric(bw_mbit=5, delay_ms=10),  # smoke.yaml's w1
    "h": LinkSpec.symmetric(bw_mbit=20, delay_ms=5, loss_pct=3),
}
SRV_LINK = LinkSpec.symmetric(bw_mbit=100, delay_ms=1)  # smoke.yaml's default


class Star(Topo):
    def build(self, names: tuple[str, ...] = ()) -> None:
        sw = self.addSwitch("s1")
        for name in ("srv", *names):
            self.addLink(self.addHost(name), sw)


@pytest.fixture(scope="module")
def star() -> Iterator[EmuNet]:
    emu = build_net(Star(names=tuple(LINKS)), LINKS, default=SRV_LINK, label="test-calib", seed=2)
    yield emu
    assert emu.teardown().clean


def believing(emu: EmuNet, host: str, spec: LinkSpec) -> EmuNet:
    """``emu`` as seen by someone whose configuration says ``host``'s link is ``spec``
    (the emulated link is unchanged): what calibration must catch."""
    view = copy.copy(emu)
    view.links = {k: (spec if host in k else v) for k, v in emu.links.items()}
    return view


def test_lossy_link_passes_twice(star: EmuNet) -> None:
    """2 Mbit/s, 40 ms, 1 % loss, two repetitions: both pass without --force, with the
    rate within 3 % and the loss checked on >= 1000 probes each way."""
    for _rep in range(2):
        cal = calibrate_pair(star, "e", "srv", pings=20)
        assert cal.passed, cal.problems
        assert len(cal.rate) == 2 and all(abs(r.ratio - 1) <= 0.03 for r in cal.rate if r.ratio)
        assert all(x.sent >= 1000 and x.configured_pct == pytest.approx(1.0) for x in cal.loss)


def test_tcp_goodput_on_a_lossy_link_never_reads_above_the_link(star: EmuNet) -> None:
    """Counted from the connection's start, TCP goodput cannot exceed what the link
    carried (payload ceiling 1448/1514 = 0.956), where 0.1 s windows read up to 1.095."""
    cal = calibrate_pair(star, "e", "srv", pings=20, goodput=True, duration_s=2.0)
    assert len(cal.goodput) == 2
    for g in cal.goodput:
        assert g.from_start and g.ok is None  # not judged on a lossy path
        assert g.ratio is not None and 0.3 < g.ratio <= 0.957, g


@pytest.mark.parametrize(
    ("host", "believed", "what"),
    [
        ("f", LinkSpec.symmetric(bw_mbit=20, delay_ms=6.5), "RTT"),  # 3 ms RTT off
        ("g", LinkSpec.symmetric(bw_mbit=5, delay_ms=8.5), "RTT"),
        ("f", LinkSpec.symmetric(bw_mbit=22, delay_ms=5), "rate"),  # link 9 % slow
        ("f", LinkSpec.symmetric(bw_mbit=18, delay_ms=5), "rate"),  # link 11 % fast
        ("h", LinkSpec.symmetric(bw_mbit=20, delay_ms=5), "loss"),  # 3 % loss unconfigured
    ],
)
def test_a_wrong_link_is_refused(star: EmuNet, host: str, believed: LinkSpec, what: str) -> None:
    cal = calibrate_pair(believing(star, host, believed), host, "srv", pings=20)
    assert not cal.passed and cal.attempts == 3
    assert any(p.startswith(what) for p in cal.problems), cal.problems


def test_a_busy_host_does_not_fail_a_correct_link(star: EmuNet) -> None:
    """Two CPU hogs (the 2-core machine's worth) beside the calibration: smoke.yaml's
    links still pass, three times each."""
    hog = [sys.executable, "-c", "while True: pass"]
    hogs = [subprocess.Popen(hog) for _ in range(2)]
    try:
        for _ in range(3):
            for host in ("f", "g"):
                cal = calibrate_pair(star, host, "srv", pings=20)
                assert cal.passed, cal.problems
    finally:
        for p in hogs:
            p.kill()
            p.wait()
