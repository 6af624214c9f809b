"""Unit tests (no root): link option parsing, validation and BDP queue sizing."""

from __future__ import annotations

import math

import pytest

from testbed.linkparams import (
    QUEUE_FLOOR_PKTS,
    DirectionParams,
    LinkParamError,
    LinkSpec,
    bdp_packets,
    default_queue_packets,
    parse_bw_mbit,
    parse_loss_pct,
    parse_queue_pkts,
    parse_time_ms,
)


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("20ms", 20.0),
        ("500us", 0.5),
        ("0.1s", 100.0),
        ("1.5 msec", 1.5),
        ("20", 20.0),
        (20, 20.0),
        (2.5, 2.5),
        (0, 0.0),
        (None, 0.0),
        ("1e3us", 1.0),
    ],
)
def test_parse_time_ms(value: object, ms: float) -> None:
    assert parse_time_ms(value) == pytest.approx(ms)


@pytest.mark.parametrize(
    "value", ["20 mss", "abc", "", "ms", "-5ms", -1, float("nan"), float("inf"), True, [20]]
)
def test_parse_time_ms_rejects(value: object) -> None:
    with pytest.raises(LinkParamError, match="delay"):
        parse_time_ms(value, where="link w1 (up)")


def test_errors_name_link_and_option() -> None:
    with pytest.raises(LinkParamError, match=r"link w1 \(up\): delay: bad time '20 mss'"):
        parse_time_ms("20 mss", where="link w1 (up)")
    with pytest.raises(LinkParamError, match=r"w2.*loss.*0-100"):
        LinkSpec.from_options({"loss": 150}, where="w2")


def test_parse_bw() -> None:
    assert parse_bw_mbit(10) == 10.0
    assert parse_bw_mbit("2.5") == 2.5
    assert parse_bw_mbit(None) is None
    for bad in (0, -5, "fast", float("nan")):
        with pytest.raises(LinkParamError, match="bw"):
            parse_bw_mbit(bad)


def test_parse_loss() -> None:
    assert parse_loss_pct(2) == 2.0
    assert parse_loss_pct("2%") == 2.0
    assert parse_loss_pct(100) == 100.0
    assert parse_loss_pct(None) == 0.0
    for bad in (100.1, -1, "x%"):
        with pytest.raises(LinkParamError, match="loss"):
            parse_loss_pct(bad)


def test_parse_queue() -> None:
    assert parse_queue_pkts(100) == 100
    assert parse_queue_pkts(None) is None
    for bad in (0, -3, 1.5, "many"):
        with pytest.raises(LinkParamError, match="max_queue_size"):
            parse_queue_pkts(bad)


def test_bdp_and_default_queue() -> None:
    # 100 Mbit/s x 200 ms = 2.5 MB = 1651.3 frames of 1514 bytes
    assert bdp_packets(100, 200) == pytest.approx(2.5e6 / 1514)
    assert default_queue_packets(100, 200) == math.ceil(2 * 2.5e6 / 1514) == 3303
    assert default_queue_packets(50, 10) == 83  # 2 x 41.3
    assert default_queue_packets(5, 60) == QUEUE_FLOOR_PKTS  # 2 x 24.8 < floor
    assert default_queue_packets(None, 100) == QUEUE_FLOOR_PKTS
    assert default_queue_packets(1000, 0) == QUEUE_FLOOR_PKTS
    assert default_queue_packets(10, 100, factor=1.0, floor=1) == 83
    # never below the BDP itself: BBR loses heavily with a queue below the BDP
    for bw in (1, 10, 100):
        for rtt in (2, 20, 200):
            assert default_queue_packets(bw, rtt) >= bdp_packets(bw, rtt)


def test_link_spec_per_direction() -> None:
    spec = LinkSpec.from_options(
        {"delay": "10ms", "loss": 1, "up": {"bw": 10}, "down": {"bw": 50, "loss": 0}}, where="w1"
    )
    assert spec.up == DirectionParams(bw_mbit=10, delay_ms=10, loss_pct=1)
    assert spec.down == DirectionParams(bw_mbit=50, delay_ms=10, loss_pct=0)
    assert spec.rtt_ms == 20.0  # one-way delay per direction
    assert spec.reversed().up == spec.down
    assert LinkSpec.from_options(spec) is spec


def test_link_spec_rejects_unknown_keys() -> None:
    with pytest.raises(LinkParamError, match=r"w1 \(up\): unknown option\(s\) dealy"):
        LinkSpec.from_options({"dealy": "5ms"}, where="w1")
    with pytest.raises(LinkParamError, match="up must be a mapping"):
        LinkSpec.from_options({"up": 5}, where="w1")
    with pytest.raises(LinkParamError, match="expected a mapping"):
        LinkSpec.from_options(["bw", 5])  # type: ignore[arg-type]


def test_default_queues_fill_only_unset() -> None:
    spec = LinkSpec(
        up=DirectionParams(bw_mbit=100, delay_ms=50),
        down=DirectionParams(bw_mbit=100, delay_ms=50, max_queue_size=10),
    )
    full = spec.with_default_queues()
    assert full.up.max_queue_size == default_queue_packets(100, 100)
    assert full.down.max_queue_size == 10
    assert spec.with_default_queues(200).up.max_queue_size == default_queue_packets(100, 200)


def test_options_round_trip() -> None:
    d = DirectionParams(bw_mbit=12.5, delay_ms=0.25, jitter_ms=1, loss_pct=0.5, max_queue_size=77)
    assert d.to_options() == {
        "bw": 12.5,
        "delay": "0.25ms",
        "jitter": "1ms",
        "loss": 0.5,
        "max_queue_size": 77,
    }
    assert DirectionParams.from_options(d.to_options()) == d
    assert DirectionParams().to_options() == {}


def test_direct_construction_is_validated() -> None:
    with pytest.raises(LinkParamError):
        DirectionParams(bw_mbit=-1)
    with pytest.raises(LinkParamError):
        DirectionParams(loss_pct=101)
    with pytest.raises(LinkParamError):
        LinkSpec.symmetric(delay_ms=-2)
