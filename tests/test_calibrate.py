"""Calibration logic without a network (no root): estimators, judgements, retries.

The measurements themselves are replaced by fakes that return what a busy host, a lossy
link or a wrong link would give; ``tests/test_calibrate_mininet.py`` measures real links.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("mininet.node", reason="testbed.calibrate imports mininet")

import testbed.calibrate as C
from testbed.calibrate import (
    CalibrationError,
    LossStats,
    RateStats,
    Tolerance,
    binomial_bound,
    calibrate_pair,
    configured_rtt_ms,
    judge_loss,
    judge_rate,
    judge_rtt,
    loss_around_bottleneck,
    loss_probe_plan,
    path_loss,
    rtt_stats,
    train_rate_mbit,
)
from testbed.linkparams import DirectionParams, LinkSpec

FRAME = 1514

# --------------------------------------------------------------------------- estimators


def arrivals(rate_mbit: float, n: int, jitter_ns: float = 0.0, seed: int = 0) -> list[int]:
    """Arrival times (ns) of ``n`` back-to-back 1514-byte frames at ``rate_mbit``."""
    rng = random.Random(seed)
    gap = FRAME * 8 / (rate_mbit * 1e6) * 1e9
    return [round(i * gap + rng.uniform(-jitter_ns, jitter_ns)) for i in range(n)]


@pytest.mark.parametrize("rate", [1.0, 2.0, 20.0, 100.0])
def test_train_rate_is_exact_on_a_clean_train(rate: float) -> None:
    mbit, windows = train_rate_mbit(arrivals(rate, 200), FRAME)
    assert mbit == pytest.approx(rate, rel=1e-4)
    assert len(windows) == 5 and all(w == pytest.approx(rate, rel=1e-3) for w in windows)


def test_train_rate_ignores_one_pause_and_timer_noise() -> None:
    """A 20 ms stall of the forwarder (frames then leave in a burst) spoils one window of
    five, not the median; +-30 us of wake-up noise moves it by < 0.5 %."""
    t = arrivals(20.0, 400, jitter_ns=30e3, seed=1)
    for i in range(150, 170):  # held back, then released together
        t[i] = t[170] - (170 - i) * 1000
    mbit, windows = train_rate_mbit(t, FRAME)
    assert mbit == pytest.approx(20.0, rel=0.005)
    assert max(abs(w / 20 - 1) for w in windows) > 0.02  # the pause is in one window
    mean_rate = (len(t) - 1) * FRAME * 8 / (max(t) - min(t)) * 1e3
    assert mbit == pytest.approx(20.0, rel=0.005) and mean_rate != pytest.approx(mbit, rel=1e-6)


def test_train_rate_counts_only_what_arrived() -> None:
    """Frames dropped before the bottleneck (random loss, a full queue) take no link
    time: the arrivals of the survivors are still back to back."""
    t = arrivals(2.0, 100)
    assert train_rate_mbit(t, FRAME)[0] == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(CalibrationError, match="too few"):
        train_rate_mbit(t[:2], FRAME)


# --------------------------------------------------------------------------- prediction

D = DirectionParams


def hops(*specs: LinkSpec) -> list[tuple[tuple[str, str], LinkSpec]]:
    return [((f"n{i}", f"n{i + 1}"), s) for i, s in enumerate(specs)]


def test_path_loss_and_where_it_is() -> None:
    w = LinkSpec(up=D(bw_mbit=2, delay_ms=40, loss_pct=1), down=D(bw_mbit=2, delay_ms=40))
    srv = LinkSpec.symmetric(bw_mbit=100, delay_ms=1, loss_pct=2)
    h = hops(w, srv.reversed())
    assert path_loss(h, True) == pytest.approx(1 - 0.99 * 0.98)
    assert path_loss(h, False) == pytest.approx(0.02)
    # forward: bottleneck w (its own 1 % is before its queue), then 2 % after it
    assert loss_around_bottleneck(h, True) == pytest.approx((0.01, 0.02))
    # back: the 2 % of srv's link comes first, then the bottleneck
    assert loss_around_bottleneck(list(reversed(h)), False) == pytest.approx((0.02, 0.0))


def test_predicted_rtt_counts_the_probe_frame_on_every_link() -> None:
    """smoke.yaml's w2 path: 2 x (5 + 1) ms plus a 98-byte frame at 20 and 100 Mbit/s
    each way = 12.094 ms (12.09 in the refused run's message)."""
    h = hops(
        LinkSpec.symmetric(bw_mbit=20, delay_ms=5), LinkSpec.symmetric(bw_mbit=100, delay_ms=1)
    )
    want = 12 + 2 * 98 * 8 / 20e3 + 2 * 98 * 8 / 100e3
    assert configured_rtt_ms(h) == pytest.approx(want) == pytest.approx(12.094, abs=1e-3)


def test_loss_probe_plan() -> None:
    lossless = hops(LinkSpec.symmetric(bw_mbit=5, delay_ms=10))
    assert loss_probe_plan(lossless) == (200, pytest.approx(98 * 8 / 5e3 / 0.25 / 1e3))
    lossy = hops(LinkSpec.symmetric(bw_mbit=2, delay_ms=40, loss_pct=1))
    count, interval = loss_probe_plan(lossy)
    assert count == 2500 and interval * count < 5.0  # ~25 losses expected, in < 5 s
    fast = hops(LinkSpec.symmetric(bw_mbit=1000, delay_ms=1, loss_pct=10))
    assert loss_probe_plan(fast) == (1000, 0.0005)


# --------------------------------------------------------------------------- judgements


def test_rtt_is_judged_on_the_median() -> None:
    """Two probes of twenty caught a busy host (+6 and +14 ms): the mean is 1 ms off,
    the median is not. A link 3 ms off is off in every sample, and fails."""
    rng = random.Random(3)
    good = [12.094 + rng.gauss(0.08, 0.05) for _ in range(18)] + [18.1, 26.1]
    stats = rtt_stats(good, 20)
    assert abs(stats.mean_ms - 12.094) > 0.5  # the old rule (mean) refused this
    err, limit, ok, why = judge_rtt(stats, 12.094, Tolerance())
    assert ok and why == "" and limit == 0.5 and abs(err) < 0.2
    wrong = rtt_stats([x + 3.0 for x in good], 20)
    assert not judge_rtt(wrong, 12.094, Tolerance())[2]
    assert "RTT 15." in judge_rtt(wrong, 12.094, Tolerance())[3]


def _rate(mbit: float, **kw: Any) -> RateStats:
    base: dict[str, Any] = dict(
        src="w2",
        dst="srv",
        mbit=mbit,
        windows_mbit=(mbit,) * 5,
        sent=100,
        received=100,
        frame_bytes=FRAME,
        offered_mbit=3.0,
        seconds=0.6,
    )
    return RateStats(**{**base, **kw})


@pytest.mark.parametrize(
    ("ratio", "ok"), [(1.0, True), (0.98, True), (1.02, True), (0.899, False), (1.095, False)]
)
def test_rate_is_judged_both_ways(ratio: float, ok: bool) -> None:
    """Above the configured rate is as wrong as below it (1.095 is an error, not a pass)."""
    r, why = judge_rate(_rate(2.0 * ratio), 2.0, Tolerance())
    assert r.ok is ok and r.ratio == pytest.approx(ratio) and r.configured_mbit == 2.0
    assert (why == "") is ok


def test_rate_with_socket_drops_is_not_trusted() -> None:
    r, why = judge_rate(_rate(2.0, socket_drops=3), 2.0, Tolerance())
    assert not r.ok and "socket" in why
    # the sender fell short (1.9 offered) and the link queued it (1.5 carried): the link
    # was the bottleneck, and it is slow
    r, why = judge_rate(_rate(1.5, offered_mbit=1.9), 2.0, Tolerance())
    assert r.ok is False and "sender reached only 1.90" in why


def test_rate_is_not_judged_when_the_sender_cannot_fill_the_link() -> None:
    """A link faster than the sender carries everything offered: no verdict either way."""
    r, why = judge_rate(_rate(590.0, offered_mbit=600.0), 1000.0, Tolerance())
    assert r.ok is None and why == "" and r.ratio == pytest.approx(0.59)


def test_loss_is_judged_against_its_binomial_band() -> None:
    tol = Tolerance()
    low, high = binomial_bound(2500, 0.01, 4)
    assert judge_loss("w", "srv", 2500, 25, 0.01, tol)[0].ok
    assert judge_loss("w", "srv", 2500, 0, 0.01, tol)[0].ok is (low <= 0)
    bad, why = judge_loss("w", "srv", 2500, round(high) + 1, 0.01, tol)
    assert not bad.ok and "of 2500 probes for 1 %" in why
    assert not judge_loss("w", "srv", 200, 1, 0.0, tol)[0].ok  # a lossless link loses none
    assert judge_loss("w", "srv", 200, 0, 0.0, tol)[0].ok


# --------------------------------------------------------------------------- retries


SRV_LINK = LinkSpec.symmetric(100, 1)


class FakePath:
    """A star path w -> s1 -> srv whose measurements come from queues of canned results;
    counts the calls of each measurement."""

    def __init__(self, w: LinkSpec, srv: LinkSpec = SRV_LINK) -> None:
        self.emu = SimpleNamespace(
            net={n: SimpleNamespace(name=n) for n in ("w", "srv")},
            links={("w", "s1"): w, ("srv", "s1"): srv},
        )
        h = [(("w", "s1"), w), (("srv", "s1"), srv.reversed())]
        self.want = configured_rtt_ms(h)
        self.rtt: list[list[float]] = []
        self.rate_ratio: list[float] = []
        self.lost: list[int] = []
        self.calls = {"rtt": 0, "rate": 0, "loss": 0, "goodput": 0}

    def measure_rtt(self, src: Any, dst: Any, *, count: int, **_kw: Any) -> Any:
        self.calls["rtt"] += 1
        samples = self.rtt.pop(0) if len(self.rtt) > 1 else self.rtt[0]
        return rtt_stats([self.want + x for x in samples], count)

    def measure_rate(self, src: Any, dst: Any, *, configured_mbit: float, **_kw: Any) -> Any:
        self.calls["rate"] += 1
        ratio = self.rate_ratio.pop(0) if len(self.rate_ratio) > 1 else self.rate_ratio[0]
        return _rate(configured_mbit * ratio, src=src.name, dst=dst.name, offered_mbit=1e3)

    def measure_loss(self, src: Any, dst: Any, *, count: int, **_kw: Any) -> Any:
        self.calls["loss"] += 1
        lost = self.lost.pop(0) if len(self.lost) > 1 else self.lost[0]
        rx = count - lost  # the same count lost each way
        return LossStats(sent=count, server_rx=rx, received=rx - lost, lost_up=lost, lost_down=lost)


@pytest.fixture
def path(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePath]:
    p = FakePath(LinkSpec.symmetric(bw_mbit=20, delay_ms=5))
    p.rtt, p.rate_ratio, p.lost = [[0.05] * 20], [1.0], [0]
    for name in ("measure_rtt", "measure_rate", "measure_loss"):
        monkeypatch.setattr(C, name, getattr(p, name))

    def no_goodput(*_a: Any, **_k: Any) -> Any:
        p.calls["goodput"] += 1
        raise AssertionError("TCP goodput is opt-in")

    monkeypatch.setattr(C, "measure_goodput", no_goodput)
    yield p


def test_a_good_link_passes_at_once(path: FakePath) -> None:
    cal = calibrate_pair(path.emu, "w", "srv")  # type: ignore[arg-type]
    assert cal.passed and cal.attempts == 1 and cal.problems == ()
    assert path.calls == {"rtt": 1, "rate": 2, "loss": 1, "goodput": 0}
    assert [(r.src, r.dst) for r in cal.rate] == [("w", "srv"), ("srv", "w")]
    assert [(x.src, x.dst) for x in cal.loss] == [("w", "srv"), ("srv", "w")]


def test_a_busy_moment_is_measured_again(path: FakePath) -> None:
    """The first RTT round caught a stall (most probes +6 ms) and one train direction
    a pause: only those are measured again, and the link passes."""
    path.rtt = [[6.0] * 15 + [0.05] * 5, [0.05] * 20]
    path.rate_ratio = [0.93, 1.0, 1.0]
    cal = calibrate_pair(path.emu, "w", "srv", attempts=3)  # type: ignore[arg-type]
    assert cal.passed and cal.attempts == 2
    assert path.calls == {"rtt": 2, "rate": 3, "loss": 1, "goodput": 0}
    assert cal.rtt_error_ms == pytest.approx(0.05) and cal.rtt_ok


def test_a_wrong_link_fails_every_attempt(path: FakePath) -> None:
    """Delay 3 ms off, rate 10 % low: still refused after 3 rounds, both named."""
    path.rtt = [[3.0 + 0.05 * (i % 3) for i in range(20)]]
    path.rate_ratio = [0.9]
    cal = calibrate_pair(path.emu, "w", "srv", attempts=3)  # type: ignore[arg-type]
    assert not cal.passed and cal.attempts == 3 and not cal.rtt_ok
    assert path.calls["rtt"] == 3 and path.calls["rate"] == 6
    assert len(cal.problems) == 3 and cal.problems[0].startswith("RTT 15.")
    assert all("ratio 0.900" in p for p in cal.problems[1:])


def test_attempts_1_measures_once(path: FakePath) -> None:
    path.rtt = [[6.0] * 20, [0.05] * 20]
    cal = calibrate_pair(path.emu, "w", "srv", attempts=1)  # type: ignore[arg-type]
    assert not cal.passed and cal.attempts == 1 and path.calls["rtt"] == 1


def test_a_probe_error_is_retried_then_raised(
    path: FakePath, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def flaky(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise CalibrationError("probe sink in srv did not start")
        return path.measure_rate(*a, **k)

    monkeypatch.setattr(C, "measure_rate", flaky)
    assert calibrate_pair(path.emu, "w", "srv").passed  # type: ignore[arg-type]

    def broken(*_a: Any, **_k: Any) -> Any:
        raise CalibrationError("icmp w -> srv: no reply out of 20")

    monkeypatch.setattr(C, "measure_rtt", broken)
    with pytest.raises(CalibrationError, match="no reply"):
        calibrate_pair(path.emu, "w", "srv")  # type: ignore[arg-type]


def test_the_lossy_link_of_the_issue_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """w2: {bw_mbit: 2, delay_ms: 40, loss_pct: 1}: calibrated on what the link
    promises (rate, delay, loss), not on TCP goodput; a train is offered enough to keep
    the bottleneck busy after the loss."""
    p = FakePath(LinkSpec.symmetric(bw_mbit=2, delay_ms=40, loss_pct=1))
    p.rtt, p.rate_ratio, p.lost = [[0.1] * 20], [1.0], [25]
    seen: list[dict[str, Any]] = []

    def rate(src: Any, dst: Any, **kw: Any) -> Any:
        seen.append(kw)
        return p.measure_rate(src, dst, **kw)

    for name in ("measure_rtt", "measure_loss"):
        monkeypatch.setattr(C, name, getattr(p, name))
    monkeypatch.setattr(C, "measure_rate", rate)
    cal = calibrate_pair(p.emu, "w", "srv", pings=20)  # type: ignore[arg-type]
    assert cal.passed, cal.problems
    assert [x.configured_pct for x in cal.loss] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert cal.loss[0].sent == 2500
    assert seen[0]["configured_mbit"] == 2 and seen[0]["loss_before"] == pytest.approx(0.01)


def test_as_dict_keeps_the_keys_analysis_reads(path: FakePath) -> None:
    d = calibrate_pair(path.emu, "w", "srv").as_dict()  # type: ignore[arg-type]
    for key in ("a", "b", "configured_rtt_ms", "rtt_error_ms", "goodput", "passed"):
        assert key in d
    assert {"mean_ms", "sd_ms", "median_ms"} <= set(d["rtt"])
    assert {"rate", "loss", "attempts", "problems", "rtt_limit_ms", "rtt_ok"} <= set(d)
    assert {"src", "dst", "mbit", "ratio", "ok"} <= set(d["rate"][0])
    assert statistics.median([0.05] * 20) == pytest.approx(d["rtt_error_ms"])
