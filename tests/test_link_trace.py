"""Trace-driven links: the trace parsers (Mahimahi, CSV steps), rate_at, the forwarder's
trace models, the scenario syntax, the tc refusal and the records (no root); and a
Mininet test (root) where measured TCP goodput follows a generated 20 -> 2 -> 20 Mbit/s
step trace phase by phase.

Every trace is generated here (Mahimahi is not packaged in this Debian release).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from testbed import tapfwd
from testbed.linkparams import (
    DirectionParams,
    LinkParamError,
    LinkSpec,
    RateTrace,
    rate_at,
    trace_params_at,
)
from testbed.tapfwd import (
    VNET_HDR_LEN,
    Direction,
    OpportunitySchedule,
    StepSchedule,
    TraceError,
    parse_mahimahi,
    parse_steps,
)
from tests.netenv import mininet_missing

REPO = Path(__file__).resolve().parents[1]
PLAIN = bytes(VNET_HDR_LEN)  # virtio_net_hdr of a plain (non-GSO) frame
FULL = PLAIN + bytes(1514)  # a full-sized Ethernet frame: 1500 bytes of IP packet
#: The step trace of the issue: 20 -> 2 -> 20 Mbit/s, 4 s each.
PHASES = ((4.0, 20.0), (4.0, 2.0), (4.0, 20.0))


def steps_csv(phases: Sequence[tuple[float, float]], header: bool = True) -> str:
    """A CSV step trace with one row per phase and an end row (the trace's length)."""
    rows, t = [], 0.0
    for dur, mbit in phases:
        rows.append(f"{t:g},{mbit:g}")
        t += dur
    rows.append(f"{t:g},{phases[-1][1]:g}")
    return ("t_s,bw_mbit\n" if header else "") + "\n".join(rows) + "\n"


def mahimahi_lines(phases: Sequence[tuple[float, float]]) -> str:
    """A Mahimahi trace with evenly spread delivery opportunities at each phase's rate
    (one opportunity = 1500 bytes = 12,000 bits); the last line is the total length."""
    out: list[int] = []
    start_ms = 0
    for dur, mbit in phases:
        dur_ms = round(dur * 1e3)
        count = round(mbit * 1e6 * dur / 12_000)
        out += [start_ms + (i + 1) * dur_ms // count for i in range(count)]
        start_ms += dur_ms
    return "\n".join(map(str, out)) + "\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- parsers


def test_parse_mahimahi_counts_repeated_lines() -> None:
    text = "# a comment\n1\n1\n\n2\n5\n"
    assert parse_mahimahi(text) == (1, 1, 2, 5)
    assert parse_mahimahi("0\n0\n3") == (0, 0, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1\n2\nx3\n", r"f\.txt: line 3: expected a whole number of milliseconds, got 'x3'"),
        ("1\n2.5\n", r"f\.txt: line 2: expected a whole number"),
        ("5\n4\n", r"f\.txt: line 2: 4 ms comes after 5 ms"),
        ("-1\n3\n", r"f\.txt: line 1: must be >= 0 ms"),
        ("0\n0\n", r"f\.txt: line 2: the last timestamp is the trace's length and must be > 0"),
        ("\n# nothing\n", r"f\.txt: no delivery opportunities"),
    ],
)
def test_parse_mahimahi_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_mahimahi(text, "f.txt")


def test_parse_steps_columns_and_defaults() -> None:
    # header in another order; an empty delay keeps the fixed value (None)
    text = "bw_mbit, t_s, loss_pct, delay_ms\n20, 0, 0, 5\n2, 4, 1,\n20, 8\n"
    assert parse_steps(text) == (
        (0.0, 20.0, 5.0, 0.0),
        (4.0, 2.0, None, 1.0),
        (8.0, 20.0, None, None),
    )
    # no header: t_s, bw_mbit, delay_ms, loss_pct
    assert parse_steps("0,10,3\n1.5,5\n") == ((0.0, 10.0, 3.0, None), (1.5, 5.0, None, None))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t_s,bw_mbit\n0,20\n4,fast\n", r"s\.csv: line 3: bw_mbit: expected a number, got 'fast'"),
        ("0,20\n4,0\n", r"s\.csv: line 2: bw_mbit: must be > 0 Mbit/s"),
        ("0,20\n4,2,1,150\n", r"s\.csv: line 2: loss_pct: must be within 0-100"),
        ("0,20,-3\n", r"s\.csv: line 1: delay_ms: must be >= 0"),
        ("1,20\n", r"s\.csv: line 1: the first step must start at t_s = 0"),
        ("0,20\n4,2\n4,3\n", r"s\.csv: line 3: t_s 4 does not come after 4"),
        ("0,20\n4,2,1,1,9\n", r"s\.csv: line 2: 5 values for 4 columns"),
        ("t_s,rate\n0,20\n", r"s\.csv: line 1: header 't_s,rate'"),
        ("0,20\n,3\n", r"s\.csv: line 2: t_s: a value is required"),
        ("0,inf\n", r"s\.csv: line 1: bw_mbit: must be finite"),
        ("t_s,bw_mbit\n", r"s\.csv: no steps"),
    ],
)
def test_parse_steps_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_steps(text, "s.csv")


def test_load_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.csv: no such trace file"):
        RateTrace.load(tmp_path / "nope.csv", "csv")
    one = write(tmp_path, "one.csv", "0,20\n")
    with pytest.raises(TraceError, match=r"one\.csv: a looping CSV trace needs at least two rows"):
        RateTrace.load(one, "csv", loop=True)
    assert RateTrace.load(one, "csv", loop=False).mean_mbit == 20.0
    bad = write(tmp_path, "bad.down", "1\n2\nthree\n")
    with pytest.raises(TraceError, match=r"bad\.down: line 3"):
        RateTrace.load(bad, "mahimahi")
    with pytest.raises(TraceError, match="unknown trace format 'pcap'"):
        RateTrace.load(one, "pcap")


def test_load_is_typed_and_cached_per_file_version(tmp_path: Path) -> None:
    p = write(tmp_path, "steps.csv", steps_csv(PHASES))
    t = RateTrace.load(p, "csv", start_s=1)
    assert t.name == "steps.csv" and t.file == str(p.resolve())
    assert t.steps == ((0.0, 20.0, None, None), (4.0, 2.0, None, None), (8.0, 20.0, None, None),
                       (12.0, 20.0, None, None))  # fmt: skip
    assert (t.period_s, t.peak_mbit) == (12.0, 20.0)
    assert t.mean_mbit == pytest.approx(14.0)
    assert RateTrace.load(p, "csv", start_s=1) == t
    time.sleep(0.01)
    p.write_text(steps_csv(((4.0, 10.0), (4.0, 1.0))))
    assert RateTrace.load(p, "csv").steps[0][1] == 10.0  # re-read after a change
    m = RateTrace.load(write(tmp_path, "m.up", mahimahi_lines(PHASES)), "mahimahi")
    assert m.period_s == 12.0 and len(m.opportunities_ms) == 6667 + 667 + 6667
    assert m.mean_mbit == pytest.approx(14001 * 12_000 / 12 / 1e6)
    assert m.peak_mbit == pytest.approx(20.0, rel=0.01)


# --------------------------------------------------------------------------- rate_at


def test_rate_at_csv_loops_or_holds(tmp_path: Path) -> None:
    p = write(tmp_path, "steps.csv", steps_csv(PHASES))
    loop = RateTrace.load(p, "csv")
    got = [rate_at(loop, t) for t in (0, 3.99, 4.0, 7.99, 8.0, 11.99, 12.0, 16.5, 120.0 + 5)]
    assert got == [20, 20, 2, 2, 20, 20, 20, 2, 2]
    once = RateTrace.load(p, "csv", loop=False, start_s=2.0)  # starts 2 s into the trace
    assert [rate_at(once, t) for t in (0, 1.99, 2.0, 6.0, 1000.0)] == [20, 20, 2, 20, 20]
    delays = write(tmp_path, "d.csv", "t_s,bw_mbit,delay_ms,loss_pct\n0,5,10,\n1,6,,2\n2,5\n")
    d = RateTrace.load(delays, "csv")
    assert trace_params_at(d, 0.5) == (5.0, 10.0, None)
    assert trace_params_at(d, 1.5) == (6.0, None, 2.0)
    assert trace_params_at(d, 2.5) == (5.0, 10.0, None)  # looped


def test_rate_at_mahimahi_counts_opportunities(tmp_path: Path) -> None:
    # 1 opportunity at 1 ms, 2 at 2 ms, 1 at 3 and 4: five in 4 ms = 15 Mbit/s
    m = RateTrace.load(write(tmp_path, "m", "1\n2\n2\n3\n4\n"), "mahimahi")
    assert rate_at(m, 0.0, window_s=0.004) == pytest.approx(12.0)  # 1, 2, 2, 3 (4 is out)
    assert rate_at(m, 0.004, window_s=0.004) == pytest.approx(15.0)  # 4, then 5, 6, 6, 7
    assert rate_at(m, 0.0, window_s=0.008) == pytest.approx(13.5)
    assert rate_at(m, 40.0) == pytest.approx(15.0)
    phases = RateTrace.load(write(tmp_path, "p", mahimahi_lines(PHASES)), "mahimahi")
    for t, want in ((1.0, 20.0), (5.0, 2.0), (9.0, 20.0), (13.0, 20.0), (17.0, 2.0)):
        assert rate_at(phases, t) == pytest.approx(want, rel=0.01)
    once = RateTrace.load(write(tmp_path, "p1", mahimahi_lines(PHASES)), "mahimahi", loop=False)
    assert rate_at(once, 5.0) == pytest.approx(2.0, rel=0.01)
    assert rate_at(once, 17.0) == pytest.approx(once.mean_mbit, rel=0.01)  # after the end
    with pytest.raises(ValueError, match="window_s"):
        rate_at(m, 0.0, window_s=0)


def test_schedule_boundaries_agree_with_brute_force() -> None:
    """The opportunity index arithmetic (loop, no loop, repeated and 0 ms lines) against
    an explicit list of opportunity times."""
    rng = random.Random(5)
    for _ in range(300):
        ms = sorted(rng.randint(0, 10) for _ in range(rng.randint(1, 8)))
        ms[-1] = max(ms[-1], 1)
        for loop in (True, False):
            s = OpportunitySchedule(tuple(ms), loop, 0.0)
            times = [s.time_ms(k) for k in range(300)]
            assert times == sorted(times)
            for tau in [rng.uniform(-2, 80) for _ in range(10)] + [float(x) for x in range(40)]:
                assert s.count_before(tau) == sum(t < tau for t in times)
                if float(tau) == round(tau, 0):
                    want = next(k for k, t in enumerate(times) if t > tau)
                    assert s.first_after(tau / 1e3) == want


# --------------------------------------------------------------------------- forwarder model


def saturate(d: Direction, t_end: float, in_mbit: float) -> list[float]:
    """Offer full-sized frames at ``in_mbit`` until ``t_end`` (s); departure times."""
    gap = 1514 * 8 / (in_mbit * 1e6)
    t = 0.0
    while t < t_end:
        d.arrive(FULL, t)
        t += gap
    return [dep for dep, _ in d.queued]


def goodput_mbit(deps: Sequence[float], a: float, b: float, bits: int) -> float:
    return sum(a <= x < b for x in deps) * bits / (b - a) / 1e6


def test_forwarder_follows_a_step_trace(tmp_path: Path) -> None:
    """Saturated, the serialiser delivers each phase's rate (Ethernet frames), and the
    trace loops after 12 s."""
    t = RateTrace.load(write(tmp_path, "s.csv", steps_csv(PHASES)), "csv")
    sched = StepSchedule(t.steps, True, 0.0, 0.0, 0.0)
    d = Direction(-1, 0.0, 0.0, 0.0, 0.0, 10**7, random.Random(1), sched)
    deps = saturate(d, 16.0, 30.0)
    for a, b, want in ((0.1, 3.9, 20), (4.1, 7.9, 2), (8.1, 11.9, 20), (12.1, 15.9, 20)):
        assert goodput_mbit(deps, a, b, 1514 * 8) == pytest.approx(want, rel=0.01)


def test_step_serialisation_spans_a_boundary() -> None:
    """A 1000-byte frame at 8 Mbit/s (1 ms) starting 0.5 ms before a drop to 0.8 Mbit/s:
    half its bits at 8, half at 0.8 Mbit/s (5 ms) -> leaves at 5.5 ms after its start."""
    steps = ((0.0, 8.0, None, None), (0.0105, 0.8, None, None), (1.0, 8.0, None, None))
    d = Direction(-1, 0.0, 0.0, 0.0, 0.0, 100, random.Random(1), StepSchedule(steps, True, 0, 0, 0))
    d.arrive(PLAIN + bytes(1000), now=0.010)
    assert d.queued[0][0] == pytest.approx(0.0155)


def test_step_delay_and_loss_per_step() -> None:
    """A step's delay applies where serialisation ends, its loss at arrival; empty cells
    keep the fixed delay (7 ms) and loss (0)."""
    steps = ((0.0, 100.0, None, None), (1.0, 100.0, 30.0, 100.0), (2.0, 100.0, 2.0, None),
             (3.0, 100.0, None, None))  # fmt: skip
    sched = StepSchedule(steps, True, 0.0, 0.007, 0.0)
    d = Direction(-1, 0.0, 0.007, 0.0, 0.0, 100, random.Random(1), sched)
    d.arrive(PLAIN + bytes(60), now=0.5)
    for i in range(50):
        d.arrive(PLAIN + bytes(60), now=1.0 + i * 0.01)  # all lost (100 %)
    d.arrive(PLAIN + bytes(60), now=2.5)
    d.arrive(PLAIN + bytes(60), now=3.5)  # looped: step 0 again
    ser = 60 * 8 / 100e6  # a 60-byte frame at 100 Mbit/s
    assert d.stats["lost"] == 50
    assert [x for x, _ in d.queued] == pytest.approx(
        [0.5 + ser + 0.007, 2.5 + ser + 0.002, 3.5 + ser + 0.007]
    )


def test_forwarder_follows_a_mahimahi_trace(tmp_path: Path) -> None:
    """Saturated: one 1500-byte IP packet per delivery opportunity, so each phase's rate."""
    t = RateTrace.load(write(tmp_path, "m", mahimahi_lines(PHASES)), "mahimahi")
    sched = OpportunitySchedule(t.opportunities_ms, True, 0.0)
    d = Direction(-1, 0.0, 0.0, 0.0, 0.0, 10**7, random.Random(1), sched)
    deps = saturate(d, 16.0, 30.0)
    for a, b, want in ((0.1, 3.9, 20), (4.1, 7.9, 2), (8.1, 11.9, 20), (12.1, 15.9, 20)):
        assert goodput_mbit(deps, a, b, 1500 * 8) == pytest.approx(want, rel=0.01)
    assert set(deps[:20]) <= {ms / 1e3 for ms in t.opportunities_ms}  # leave on opportunities


def test_mahimahi_opportunities_are_shared_spanned_and_lost() -> None:
    """As Mahimahi's link shell: small packets share an opportunity, a big one spans two,
    an opportunity that finds the queue empty is lost, and a packet never uses an
    opportunity from before its arrival."""
    sched = OpportunitySchedule((1, 2, 3, 4, 5, 6, 7, 8, 9, 10), True, 0.0)
    d = Direction(-1, 0.0, 0.0, 0.0, 0.0, 100, random.Random(1), sched)
    small = PLAIN + bytes(14 + 700)  # 700 bytes of IP packet
    d.arrive(small, 0.0)
    d.arrive(small, 0.0)  # 1400 of the 1500 bytes at 1 ms
    d.arrive(small, 0.0)  # 100 at 1 ms + 600 at 2 ms
    d.arrive(FULL, 0.0)  # 900 at 2 ms + 600 at 3 ms
    d.arrive(small, 0.0045)  # queue empty: 3 ms's rest and 4 ms are lost -> 5 ms
    d.arrive(FULL, 0.0095)  # next: 10 ms
    d.arrive(FULL, 0.0101)  # 10 ms is past: loops to 11 ms (the next cycle's 1 ms)
    deps = [x for x, _ in d.queued]
    assert deps == pytest.approx([0.001, 0.001, 0.002, 0.003, 0.005, 0.010, 0.011])


def test_mahimahi_gso_frames_count_ip_bytes() -> None:
    """A 3-segment GSO frame of 3 x 1448 payload bytes is 3 x 1500 IP bytes: three
    opportunities (the 14-byte Ethernet header of each segment is not counted)."""
    from tests.test_link_forwarder import tcp_frame

    sched = OpportunitySchedule(tuple(range(1, 11)), True, 0.0)
    d = Direction(-1, 0.0, 0.0, 0.0, 0.0, 100, random.Random(1), sched)
    d.arrive(tcp_frame(3 * 1448, gso_size=1448), 0.0)  # 32-byte TCP header: 1500 per segment
    d.arrive(tcp_frame(1448), 0.0)
    assert [x for x, _ in d.queued] == pytest.approx([0.003, 0.004])


def test_non_looping_mahimahi_continues_at_the_mean_rate() -> None:
    sched = OpportunitySchedule((2, 4), False, 0.0)  # two in 4 ms: one per 2 ms after the end
    d = Direction(-1, 0.0, 0.0, 0.0, 0.0, 100, random.Random(1), sched)
    for _ in range(4):
        d.arrive(FULL, 0.0)
    assert [x for x, _ in d.queued] == pytest.approx([0.002, 0.004, 0.006, 0.008])


def run_forwarder(*args: str) -> subprocess.CompletedProcess[str]:
    """The forwarder as links start it; trace errors are found before any TAP is made."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(Path(tapfwd.__file__)), "--name-a", "ta0",
         "--name-b", "tb0", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_forwarder_reports_trace_errors(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.csv", "0,20\n4,-2\n")
    r = run_forwarder("--trace-ab", str(bad), "--trace-format-ab", "csv")
    assert r.returncode == 1
    assert r.stdout.startswith(f"ERROR ta0<->tb0: {bad}: line 2: bw_mbit: must be > 0")
    good = write(tmp_path, "good.csv", steps_csv(PHASES))
    r = run_forwarder("--trace-ba", str(good), "--trace-format-ba", "csv",
                      "--trace-sha256-ba", "0" * 64)  # fmt: skip
    assert r.returncode == 1 and "the file changed since it was read" in r.stdout
    r = run_forwarder("--trace-ba", str(tmp_path / "gone"))
    assert r.returncode == 1 and "No such file" in r.stdout


def test_forwarder_options_build_the_schedules(tmp_path: Path) -> None:
    p = write(tmp_path, "s.csv", "t_s,bw_mbit,delay_ms\n0,20,\n4,2,9\n8,20\n")
    t = RateTrace.load(p, "csv", loop=False, start_s=3.0)
    argv = ["--name-a", "a", "--name-b", "b", "--delay-ab", "5", *t.forwarder_args("ab")]
    o = tapfwd._parse_args(argv)
    parsed = tapfwd.read_trace_arg(o, "ab")
    assert parsed == t.steps and tapfwd.read_trace_arg(o, "ba") is None
    sched = tapfwd.trace_schedule(o, "ab", parsed, epoch=100.0)
    assert isinstance(sched, StepSchedule) and not sched.loop
    assert sched.origin == 97.0  # trace time 3 s at the epoch
    assert sched.index(101.5) == 1 and sched.delay[1] == 0.009 and sched.delay[0] == 0.005


# --------------------------------------------------------------------------- link parameters


def test_direction_params_carry_the_trace(tmp_path: Path) -> None:
    p = write(tmp_path, "s.csv", steps_csv(PHASES))
    t = RateTrace.load(p, "csv")
    with pytest.raises(LinkParamError, match=r"give a rate .* or a trace, not both"):
        DirectionParams(bw_mbit=10, trace=t)
    d = DirectionParams.from_options(
        {"trace": {"file": str(p), "format": "csv"}, "delay": "5ms"}, where="link x"
    )
    assert d.trace == t and d.bw_mbit is None and d.delay_ms == 5
    assert DirectionParams.from_options(d.to_options()) == d
    with pytest.raises(LinkParamError, match=r"link x: trace: give a rate"):
        DirectionParams.from_options({"trace": t, "bw": 5}, where="link x")
    with pytest.raises(LinkParamError, match=r"link x: trace: .*nope: no such trace file"):
        DirectionParams.from_options({"trace": {"file": "nope", "format": "csv"}}, where="link x")
    with pytest.raises(LinkParamError, match=r"link x: trace: unknown key\(s\) rate"):
        DirectionParams.from_options({"trace": {"file": p, "format": "csv", "rate": 1}},
                                     where="link x")  # fmt: skip
    # queues are sized at the trace's peak rate; metadata holds a summary, not the schedule
    assert (
        d.with_default_queue(100.0).max_queue_size
        == DirectionParams(bw_mbit=20).with_default_queue(100.0).max_queue_size
    )
    meta = d.as_dict()
    assert meta["trace"]["name"] == "s.csv" and meta["trace"]["sha256"] == t.sha256
    assert "steps" not in meta["trace"] and meta["bw_mbit"] is None
    json.dumps(meta)
    assert LinkSpec(up=d).has_trace and not LinkSpec.symmetric(bw_mbit=5).has_trace


def test_gso_is_off_on_trace_directions(tmp_path: Path) -> None:
    pytest.importorskip("mininet.link", reason="mininet is not importable")
    from testbed.linkemu import gso_segments

    t = RateTrace.load(write(tmp_path, "s.csv", "0,100\n1,100\n"), "csv")
    assert gso_segments(DirectionParams(trace=t)) == 1
    assert gso_segments(DirectionParams(bw_mbit=100)) == 8


# --------------------------------------------------------------------------- scenarios

SCENARIO: dict[str, Any] = {
    "name": "trace-test",
    "topology": {"name": "star", "params": {"n_workers": 2}},
    "links": {"default": {"bw_mbit": 100, "delay_ms": 1}},
    "models": {"draft": "tiny-v8-s1", "workers": {"w1": "tiny-v8-s2", "w2": "tiny-v8-s3"}},
    "decoding": {"prompts": "ids:1,2,3"},
}
HOSTS = ["srv", "w1", "w2"]
TOPO_LINKS = [("srv", "s1"), ("w1", "s1"), ("w2", "s1")]


def scenario(links: dict[str, Any]) -> dict[str, Any]:
    return {**SCENARIO, "links": {**SCENARIO["links"], **links}}


def test_scenario_trace_syntax_and_precedence(tmp_path: Path) -> None:
    """A trace replaces an inherited bw_mbit; a more specific bw_mbit replaces a trace;
    relative files resolve against the scenario's folder (the validation context)."""
    from testbed.scenario import link_specs
    from testbed.scenario.schema import ScenarioSpec

    write(tmp_path, "steps.csv", steps_csv(PHASES))
    write(tmp_path, "cell.down", mahimahi_lines(PHASES))
    raw = scenario(
        {
            "w1": {"trace": {"file": "steps.csv", "format": "csv"}, "delay_ms": 5,
                   "down": {"bw_mbit": 50}},
            "w2": {"down": {"trace": {"file": "cell.down", "format": "mahimahi", "loop": False,
                                      "start_s": 2}}},
        }
    )  # fmt: skip
    spec = ScenarioSpec.model_validate(raw, context={"base_dir": tmp_path})
    assert spec.links["w1"].trace is not None
    assert spec.links["w1"].trace.file == str(tmp_path / "steps.csv")  # stored resolved
    default, per = link_specs(spec.links, HOSTS, TOPO_LINKS)
    w1, w2 = per["w1"], per["w2"]
    assert w1.up.trace is not None and w1.up.trace.name == "steps.csv" and w1.up.bw_mbit is None
    assert (w1.up.delay_ms, w1.down.trace, w1.down.bw_mbit) == (5.0, None, 50.0)
    assert w2.up == DirectionParams(bw_mbit=100, delay_ms=1)
    assert w2.down.trace == RateTrace.load(tmp_path / "cell.down", "mahimahi", False, 2.0)
    assert w2.down.bw_mbit is None and not default.has_trace
    # the resolved scenario (as written to a run folder) validates without the context
    again = ScenarioSpec.model_validate(spec.model_dump(mode="json"))
    assert again.links["w1"].trace == spec.links["w1"].trace
    assert link_specs(again.links, HOSTS, TOPO_LINKS)[1]["w1"].up.trace == w1.up.trace


def test_scenario_trace_errors(tmp_path: Path) -> None:
    from testbed.scenario import ScenarioError, scenario_from_dict

    write(tmp_path, "bad.csv", "t_s,bw_mbit\n0,20\n4,x\n")
    bad = str(tmp_path / "bad.csv")
    good = str(write(tmp_path, "good.csv", steps_csv(PHASES)))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"w1": {"trace": {"file": bad, "format": "csv"}}},
         rf"links\.w1\.trace\.file: {bad}: line 3: bw_mbit: expected a number"),
        ({"w1": {"up": {"trace": {"file": str(tmp_path / "nope"), "format": "mahimahi"}}}},
         r"links\.w1\.up\.trace\.file: .*nope: no such trace file"),
        ({"w1": {"bw_mbit": 5, "trace": {"file": good, "format": "csv"}}},
         r"links\.w1: give bw_mbit or trace, not both"),
        ({"w1": {"trace": {"file": bad, "format": "pcap"}}},
         r"links\.w1\.trace\.format: expected one of mahimahi, csv; got 'pcap'"),
        ({"w1": {"trace": {"file": bad, "format": "csv", "speed": 2}}},
         r"links\.w1\.trace\.speed: unknown field"),
    ]  # fmt: skip
    for links, message in cases:
        with pytest.raises(ScenarioError) as exc:
            scenario_from_dict(scenario(links), "sc.yaml")
        assert any(re.search(message, f"{p}: {m}") for p, m in exc.value.problems), (
            message,
            exc.value.problems,
        )
        assert "sc.yaml" in str(exc.value)


def test_validate_reports_the_trace_file_line(tmp_path: Path) -> None:
    """`testbed validate` (check_file) on a scenario file with a broken trace."""
    import yaml

    from testbed.scenario import check_file

    write(tmp_path, "bad.down", "1\n2\n1\n")
    data = scenario({"w2": {"trace": {"file": str(tmp_path / "bad.down"), "format": "mahimahi"}}})
    path = write(tmp_path, "sc.yaml", yaml.safe_dump(data))
    r = check_file(path)
    assert not r.ok
    assert (
        "links.w2.trace.file" in r.message and "bad.down: line 3: 1 ms comes after 2" in r.message
    )


# --------------------------------------------------------------------------- tc backend, records


class FakeNode:
    """A node for the no-root tc tests: records commands, answers '' (success)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cmds: list[str] = []
        self.pid = None
        self.inNamespace = True

    def cmd(self, *args: object, **_kw: object) -> str:
        self.cmds.append(" ".join(str(a) for a in args))
        return ""


def test_tc_backend_refuses_trace_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With netem (faked), tc still cannot follow a trace: the link is refused by name
    before anything is created; `auto` picks the tap backend for trace links."""
    pytest.importorskip("mininet.link", reason="mininet is not importable")
    from testbed.linkemu import EmuLink, EmuTCIntf, LinkEmulationError, backend, nodes
    from testbed.linkemu import links as links_mod

    monkeypatch.setattr(nodes, "netem_available", lambda: True)
    monkeypatch.setattr(backend, "netem_available", lambda: True)
    monkeypatch.delenv("SPECFED_LINK_BACKEND", raising=False)
    t = RateTrace.load(write(tmp_path, "s.csv", steps_csv(PHASES)), "csv")
    spec = LinkSpec(up=DirectionParams(trace=t, delay_ms=5), down=DirectionParams(bw_mbit=10))
    monkeypatch.setattr(links_mod, "default_state", lambda: pytest.fail("state touched"))
    with pytest.raises(
        LinkEmulationError, match=r"link w1<->s1: trace-driven links need the tap backend"
    ):
        EmuLink(FakeNode("w1"), FakeNode("s1"), spec=spec, backend="tc")
    node = FakeNode("w1")
    intf = EmuTCIntf.__new__(EmuTCIntf)
    intf.name, intf.node, intf.mac, intf.ip, intf.prefixLen = "w1-eth0", node, None, None, None
    with pytest.raises(LinkEmulationError, match="interface w1-eth0: trace-driven links need"):
        intf.config(egress=DirectionParams(trace=t))
    assert not node.cmds  # no tc command ran
    assert backend.resolve_backend() == "tc"
    assert backend.resolve_backend(traces=True) == "tap"
    assert backend.resolve_backend("tc", traces=True) == "tc"  # asked for: refused per link


def test_records_name_the_trace_and_its_start(tmp_path: Path) -> None:
    """`_link_tags` has a constant `<host>_<dir>_trace` column; link_metadata has the
    trace summary and the trace clock's start (time.monotonic())."""
    pytest.importorskip("mininet.net", reason="mininet is not importable")
    from testbed.linkemu import EmuNet
    from testbed.runner import _link_tags

    t = RateTrace.load(write(tmp_path, "s.csv", steps_csv(PHASES)), "csv")
    links = {
        ("w1", "s1"): LinkSpec(up=DirectionParams(bw_mbit=5), down=DirectionParams(trace=t)),
        ("srv", "s1"): LinkSpec.symmetric(bw_mbit=100),
    }
    emu = EmuNet(None, "tap", {}, links, None, 0.0, trace_starts={("w1", "s1"): 123.5})  # type: ignore[arg-type]
    tags = _link_tags(emu, ["w1"])
    assert (tags["w1_up_trace"], tags["w1_down_trace"], tags["srv_down_trace"]) == ("", "s.csv", "")
    assert (tags["w1_up_bw_mbit"], tags["w1_down_bw_mbit"]) == (5, "")
    meta = emu.link_metadata()
    assert meta[0]["trace_start_mono_s"] == 123.5 and "trace_start_mono_s" not in meta[1]
    assert meta[0]["down"]["trace"]["name"] == "s.csv" and meta[0]["up"]["trace"] is None
    json.dumps(meta)


# --------------------------------------------------------------------------- Mininet


def _mininet_reason() -> str | None:
    return mininet_missing(("mnexec", "ip", "iperf3"))


@pytest.fixture
def star_topo() -> Any:
    from mininet.topo import Topo

    class Star(Topo):
        def build(self) -> None:
            sw = self.addSwitch("s1")
            for name in ("srv", "w1"):
                self.addLink(self.addHost(name), sw)

    return Star()


def rx_bytes(pid: int, intf: str) -> int:
    """Bytes received so far by ``intf`` in the network namespace of process ``pid``
    (its /proc/PID/net/dev: no shell, no fork)."""
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == intf:
                return int(rest.split()[0])
    raise AssertionError(f"no interface {intf} in /proc/{pid}/net/dev")


def delivery_windows(
    emu: Any, sender: str, receiver: str, seconds: float, port: int
) -> list[tuple[float, float, float]]:
    """Saturate ``sender -> receiver`` with TCP for ``seconds`` (iperf3, client in the
    receiver with -R; both recorded in the net's state file) while sampling the bytes the
    link delivers to the receiver (its eth0's rx counter, the frames the forwarder wrote)
    every 50 ms; windows of >= 0.25 s from the run's second second on, as
    ``(t0, t1, Mbit/s of frames)`` on the time.monotonic() clock. The kernel counters do
    not stall with a busy receiver process, as iperf3's own intervals do."""
    snd, rcv = emu.net[sender], emu.net[receiver]
    intf = f"{receiver}-eth0"
    procs = []
    try:
        server = snd.popen(["iperf3", "-s", "-1", "-p", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        procs.append(server)
        emu.state.record_process(server.pid, role=f"iperf3 server {sender}")
        for _ in range(100):
            if f":{port} " in snd.cmd("ss -ltnH"):
                break
            time.sleep(0.05)
        client = rcv.popen(
            ["iperf3", "-c", snd.IP(), "-p", str(port), "-R", "-J", "-t", f"{seconds:g}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(client)
        emu.state.record_process(client.pid, role=f"iperf3 client {receiver}")
        samples = []
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end and client.poll() is None:
            samples.append((time.monotonic(), rx_bytes(rcv.pid, intf)))
            time.sleep(0.05)
        out, _ = client.communicate(timeout=30)
        assert "error" not in json.loads(out), out[-300:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=10)
    windows = []
    i = next(n for n, (t, _b) in enumerate(samples) if t >= samples[0][0] + 1.0)
    for j in range(i + 1, len(samples)):
        (t0, b0), (t1, b1) = samples[i], samples[j]
        if t1 - t0 >= 0.25:
            windows.append((t0, t1, (b1 - b0) * 8 / (t1 - t0) / 1e6))
            i = j
    return windows


@pytest.mark.mininet
@pytest.mark.parametrize("fmt", ["csv", "mahimahi"])
def test_goodput_follows_the_trace_phases(tmp_path: Path, star_topo: Any, fmt: str) -> None:
    """w1's down link follows 20 -> 2 -> 20 Mbit/s (4 s each, looping; 5 ms one way)
    while TCP (iperf3, BBR) saturates it srv -> w1. Measured in 0.25 s windows of what the
    link delivered, per phase occurrence (its first 1 s and last 0.25 s left out: TCP
    adapts): no window is faster than the phase's rate (+3 %), and the 75th percentile
    reaches 0.85 of it (TCP goodput is 1448/1514 of these frames). Rates in frames: the
    CSV rate counts Ethernet frames, a Mahimahi opportunity 1500 bytes of IP packet (1514
    of frame). Measured here, 0.25 s windows: 19.9-20.2 and 1.96-2.02 Mbit/s of frames
    (CSV), 20.1-20.3 and 2.00-2.06 (Mahimahi: 20 x 1514/1500 = 20.19); iperf3's TCP
    goodput 19.1 / 1.90-1.95 and 19.3 / 1.90-1.95 on an idle machine. The phases are found
    with rate_at from the link's recorded trace start, as the analysis would."""
    reason = _mininet_reason()
    if reason:
        pytest.skip(reason)
    from testbed.linkemu import build_net

    text = steps_csv(PHASES) if fmt == "csv" else mahimahi_lines(PHASES)
    trace = RateTrace.load(write(tmp_path, f"phases.{fmt}", text), fmt)
    frame_factor = 1.0 if fmt == "csv" else 1514 / 1500
    spec = LinkSpec(
        up=DirectionParams(bw_mbit=20, delay_ms=5), down=DirectionParams(trace=trace, delay_ms=5)
    )
    emu = build_net(star_topo, {"w1": spec}, label="test-trace", state_dir=tmp_path, seed=1)
    try:
        assert emu.backend == "tap"
        start = emu.trace_starts[("w1", "s1")]
        meta = emu.link_metadata()
        assert [m.get("trace_start_mono_s") for m in meta if m["node1"] == "w1"] == [start]
        windows = delivery_windows(emu, "srv", "w1", 14.0, 5301)
    finally:
        assert emu.teardown().clean
    # group the windows by phase occurrence: the trace's step at the window, kept only if
    # it lies wholly inside the step minus the margins
    by_phase: dict[tuple[int, float], list[float]] = {}
    for t0, t1, mbit in windows:
        a, b = t0 - start, t1 - start
        k, pos = divmod(a, 4.0)
        if pos < 1.0 or pos + (b - a) > 3.75:
            continue
        want = rate_at(trace, (k + 0.5) * 4.0, window_s=1.0)
        # ~42 opportunities in a 2 Mbit/s window: +-1 of them is 2.4 %
        assert rate_at(trace, a, window_s=b - a) == pytest.approx(want, rel=0.05)
        by_phase.setdefault((int(k), want), []).append(mbit / frame_factor)
    rates = sorted({round(w) for _k, w in by_phase})
    assert len(by_phase) >= 3 and rates == [2, 20], by_phase
    for (k, want), mbits in sorted(by_phase.items()):
        high = statistics.quantiles(mbits, n=4)[2] if len(mbits) > 1 else mbits[0]
        where = f"phase {k} ({want:g} Mbit/s): {[round(x, 2) for x in mbits]}"
        assert max(mbits) <= 1.03 * want, where
        assert high >= 0.85 * want, where
