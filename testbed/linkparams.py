"""Link parameters: parsing, validation and queue sizing (pure Python: no root, no Mininet).

Vocabulary and units follow Mininet's ``TCLink`` options, so that a link configured for
``TCLink`` means the same thing here:

``bw``
    link rate in Mbit/s (10**6 bit/s), counted on Ethernet frames without FCS, exactly as
    HTB counts them. ``None`` = no rate limit.
``delay``
    ONE-WAY propagation delay of one direction, ``'20ms'``, ``'500us'``, ``'0.1s'`` or a
    number in ms. A link with ``delay='20ms'`` in both directions has a 40 ms round trip.
``jitter``
    +- variation of that delay (uniform), same syntax as ``delay``.
``loss``
    independent random loss in percent (0-100), as a number or ``'2%'``.
``max_queue_size``
    drop-tail queue limit in packets (MTU-sized segments) waiting for the link; ``None``
    = sized from the bandwidth-delay product by :func:`default_queue_packets`.
``trace``
    a :class:`RateTrace` (not a TCLink option: the tap backend only): the rate (and, for a
    CSV step trace, delay and loss) follows a trace file over time instead of ``bw``.
    :func:`rate_at` gives its rate at a time since the trace clock started.

A :class:`DirectionParams` holds one direction; a :class:`LinkSpec` holds both: ``up`` is
node1 -> node2 (for a host attached to a switch, host -> switch), ``down`` the reverse.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from testbed.tapfwd import (
    OPPORTUNITY_BYTES,
    TRACE_FORMATS,
    OpportunitySchedule,
    Step,
    StepSchedule,
    TraceError,
    check_loop,
    parse_trace,
)

#: Bytes of a full-sized Ethernet frame without FCS (MTU 1500 + 14 header): the unit in
#: which a queue of "packets" is converted to and from bytes.
ETH_FRAME_BYTES = 1514
#: Default queue = max(QUEUE_BDP_FACTOR x BDP, QUEUE_FLOOR_PKTS) packets.
QUEUE_BDP_FACTOR = 2.0
#: Smallest default queue (packets). Below ~64 a GSO burst (up to 44 segments) does not
#: fit and BBR/CUBIC lose heavily on short, slow links.
QUEUE_FLOOR_PKTS = 64

#: The TCLink options this module understands (both backends honour all of them, but
#: ``trace``, which only the tap backend can follow).
EMULATION_KEYS = ("bw", "delay", "jitter", "loss", "max_queue_size", "trace")
#: Window (s) over which :func:`rate_at` counts a Mahimahi trace's delivery opportunities.
RATE_WINDOW_S = 1.0
#: TCLink options that only Mininet's tc path understands (rejected by the tap backend).
TC_ONLY_KEYS = (
    "speedup",
    "use_hfsc",
    "use_tbf",
    "latency_ms",
    "enable_ecn",
    "enable_red",
    "gro",
    "txo",
    "rxo",
)

_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|usec|ms|msec|s|sec)?\s*$")
_TIME_UNIT_MS = {"us": 1e-3, "usec": 1e-3, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3}


class LinkParamError(ValueError):
    """A link option has a bad value; the message names the link, direction and option."""


def _where(where: str, key: str) -> str:
    return f"{where}: {key}" if where else key


def _number(value: Any, where: str, key: str) -> float:
    """A finite float from an int/float or a numeric string; bools are rejected."""
    if isinstance(value, bool):
        raise LinkParamError(f"{_where(where, key)}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise LinkParamError(
                f"{_where(where, key)}: expected a number, got {value!r}"
            ) from None
    else:
        raise LinkParamError(f"{_where(where, key)}: expected a number, got {value!r}")
    if not math.isfinite(x):
        raise LinkParamError(f"{_where(where, key)}: must be finite, got {value!r}")
    return x


def parse_time_ms(value: Any, *, where: str = "", key: str = "delay") -> float:
    """Parse a delay or jitter into milliseconds.

    Accepts a number (ms, like netem), or a string with unit ``us``/``ms``/``s``
    (``'20ms'``, ``'500us'``, ``'0.1s'``, ``'20'`` = 20 ms). ``None`` means 0.
    Raises :class:`LinkParamError` for negative, non-finite or malformed values.
    """
    if value is None:
        return 0.0
    if isinstance(value, str):
        m = _TIME_RE.match(value)
        if not m:
            raise LinkParamError(
                f"{_where(where, key)}: bad time {value!r} "
                "(expected e.g. '20ms', '500us', '0.1s' or a number of ms)"
            )
        ms = float(m.group(1)) * _TIME_UNIT_MS[m.group(2) or "ms"]
    else:
        ms = _number(value, where, key)
    if ms < 0:
        raise LinkParamError(f"{_where(where, key)}: must be >= 0 ms, got {value!r}")
    return ms


def parse_bw_mbit(value: Any, *, where: str = "", key: str = "bw") -> float | None:
    """Parse a rate in Mbit/s (a positive number; ``None`` = unlimited)."""
    if value is None:
        return None
    bw = _number(value, where, key)
    if bw <= 0:
        raise LinkParamError(
            f"{_where(where, key)}: must be > 0 Mbit/s (or None for no limit), got {value!r}"
        )
    return bw


def parse_loss_pct(value: Any, *, where: str = "", key: str = "loss") -> float:
    """Parse a loss rate in percent, 0-100 (a number or ``'2%'``; ``None`` = 0)."""
    if value is None:
        return 0.0
    if isinstance(value, str) and value.strip().endswith("%"):
        value = value.strip()[:-1]
    loss = _number(value, where, key)
    if not 0.0 <= loss <= 100.0:
        raise LinkParamError(f"{_where(where, key)}: must be within 0-100 %, got {value!r}")
    return loss


def parse_queue_pkts(value: Any, *, where: str = "", key: str = "max_queue_size") -> int | None:
    """Parse a queue limit in packets (a positive integer; ``None`` = BDP default)."""
    if value is None:
        return None
    q = _number(value, where, key)
    if q < 1 or q != int(q):
        raise LinkParamError(f"{_where(where, key)}: must be a whole number >= 1, got {value!r}")
    return int(q)


def bdp_packets(bw_mbit: float, rtt_ms: float, frame_bytes: int = ETH_FRAME_BYTES) -> float:
    """Bandwidth-delay product in full-sized packets: bw [bit/s] x rtt [s] / (8 x frame)."""
    return bw_mbit * 1e6 * rtt_ms / 1e3 / (8.0 * frame_bytes)


def default_queue_packets(
    bw_mbit: float | None,
    rtt_ms: float,
    *,
    factor: float = QUEUE_BDP_FACTOR,
    floor: int = QUEUE_FLOOR_PKTS,
    frame_bytes: int = ETH_FRAME_BYTES,
) -> int:
    """Default drop-tail queue limit in packets: ``max(ceil(factor x BDP), floor)``.

    ``rtt_ms`` is the round trip the queue must cover (the link's own RTT, or better the
    longest path RTT through it). Without a rate limit no queue builds up, so the floor is
    returned. Example: 5 Mbit/s x 60 ms -> BDP 24.8 pkts -> max(50, 64) = 64; 100 Mbit/s x
    200 ms -> BDP 1651 -> 3303 packets.
    """
    if bw_mbit is None or rtt_ms <= 0:
        return floor
    return max(math.ceil(factor * bdp_packets(bw_mbit, rtt_ms, frame_bytes)), floor)


# --------------------------------------------------------------------------- rate traces


@functools.lru_cache(maxsize=32)
def _read_trace(path: str, fmt: str, mtime_ns: int, size: int) -> tuple[tuple[Any, ...], str]:
    """(parsed schedule, sha256 hex of the bytes) of a trace file; cached per file version
    (``mtime_ns`` and ``size`` are the cache key's version, not read)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    return parse_trace(text, fmt, path), hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class RateTrace:
    """A trace a link direction follows: its rate (for ``csv``, also its delay and loss)
    over time, as numbers parsed from ``file``.

    ``format``: ``mahimahi`` (``opportunities_ms``: delivery-opportunity times in ms, one
    per 1500 bytes of IP packet, non-decreasing; the last is the trace's length) or
    ``csv`` (``steps``: ``(t_s, bw_mbit, delay_ms | None, loss_pct | None)`` from t_s = 0
    on; None keeps the direction's fixed value). ``loop``: repeat it (its length is the
    last timestamp / the last row's ``t_s``); else after its end the last rate holds (csv:
    the last row; mahimahi: the mean rate). ``start_s``: the trace time (s) at which the
    trace clock starts. ``sha256`` of the file's bytes. Build one with :meth:`load`, which
    uses the one parser (:mod:`testbed.tapfwd`'s, the forwarder's own).
    """

    file: str
    format: str
    loop: bool = True
    start_s: float = 0.0
    opportunities_ms: tuple[int, ...] = field(default=(), repr=False)
    steps: tuple[Step, ...] = field(default=(), repr=False)
    sha256: str = ""
    _clock: Any = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        where = f"trace {self.file}"
        if self.format not in TRACE_FORMATS:
            raise LinkParamError(
                f"{where}: format {self.format!r}: expected {' or '.join(TRACE_FORMATS)}"
            )
        if not isinstance(self.loop, bool):
            raise LinkParamError(f"{where}: loop must be true or false, got {self.loop!r}")
        start = _number(self.start_s, where, "start_s")
        if start < 0:
            raise LinkParamError(f"{where}: start_s: must be >= 0 s, got {self.start_s!r}")
        mine, other = (
            (self.opportunities_ms, self.steps)
            if self.format == "mahimahi"
            else (self.steps, self.opportunities_ms)
        )
        if not mine or other:
            raise LinkParamError(
                f"{where}: a {self.format} trace has "
                f"{'opportunities_ms' if self.format == 'mahimahi' else 'steps'} (only)"
            )
        if self.format == "mahimahi" and self.opportunities_ms[-1] <= 0:
            raise LinkParamError(f"{where}: the last opportunity (its length) must be > 0 ms")
        try:
            check_loop(mine, self.format, self.loop, where)
        except TraceError as exc:
            raise LinkParamError(str(exc)) from None

    @classmethod
    def load(
        cls, file: str | os.PathLike[str], format: str, loop: bool = True, start_s: float = 0.0
    ) -> RateTrace:
        """Read and parse a trace file (cached per file version). Raises
        :class:`TraceError` naming the file (and the line) if it is missing or malformed."""
        path = Path(file).expanduser().resolve()
        if format not in TRACE_FORMATS:
            raise TraceError(f"{path}: unknown trace format {format!r} (expected mahimahi or csv)")
        try:
            st = path.stat()
            if not path.is_file():
                raise TraceError(f"{path}: not a file")
            schedule, digest = _read_trace(str(path), format, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            raise TraceError(f"{path}: no such trace file") from None
        except OSError as exc:
            raise TraceError(f"{path}: cannot read the trace ({exc.strerror})") from None
        check_loop(schedule, format, loop, str(path))
        key = "opportunities_ms" if format == "mahimahi" else "steps"
        return cls(str(path), format, loop, float(start_s), sha256=digest, **{key: schedule})

    @classmethod
    def from_options(cls, value: Any, *, where: str = "") -> RateTrace:
        """A RateTrace as given, or loaded from a mapping ``{file, format, loop, start_s}``."""
        if isinstance(value, RateTrace):
            return value
        if not isinstance(value, Mapping) or "file" not in value or "format" not in value:
            raise LinkParamError(
                f"{_where(where, 'trace')}: expected a RateTrace or a mapping "
                f"{{file, format, loop, start_s}}, got {value!r}"
            )
        unknown = sorted(set(value) - {"file", "format", "loop", "start_s"})
        if unknown:
            raise LinkParamError(f"{_where(where, 'trace')}: unknown key(s) {', '.join(unknown)}")
        try:
            return cls.load(
                value["file"],
                value["format"],
                bool(value.get("loop", True)),
                float(value.get("start_s", 0.0)),
            )
        except TraceError as exc:
            raise LinkParamError(f"{_where(where, 'trace')}: {exc}") from None

    @property
    def name(self) -> str:
        """The trace's name: its file name (``Verizon-LTE-driving.down``, ``steps.csv``)."""
        return Path(self.file).name

    @property
    def period_s(self) -> float:
        """The trace's length (s): its period when it loops."""
        if self.format == "mahimahi":
            return self.opportunities_ms[-1] / 1e3
        return self.steps[-1][0]

    @property
    def mean_mbit(self) -> float:
        """Mean rate (Mbit/s) over the trace's length (a one-row CSV: its rate)."""
        if self.format == "mahimahi":
            bits = len(self.opportunities_ms) * OPPORTUNITY_BYTES * 8
            return bits / (self.opportunities_ms[-1] / 1e3) / 1e6
        s = self.steps
        if len(s) == 1:
            return s[0][1]
        return sum(a[1] * (b[0] - a[0]) for a, b in itertools.pairwise(s)) / s[-1][0]

    @property
    def peak_mbit(self) -> float:
        """Highest rate (Mbit/s): a CSV trace's largest step, a Mahimahi trace's busiest
        second (its mean if it is shorter than that)."""
        if self.format == "csv":
            return max(s[1] for s in self.steps)
        ms = self.opportunities_ms
        if ms[-1] <= 1000:
            return self.mean_mbit
        per_s: dict[int, int] = {}
        for t in ms:
            per_s[t // 1000] = per_s.get(t // 1000, 0) + 1
        return max(per_s.values()) * OPPORTUNITY_BYTES * 8 / 1e6

    def clock(self) -> StepSchedule | OpportunitySchedule:
        """The forwarder's schedule of this trace on a clock that starts at 0 (trace time
        ``start_s``), as :func:`rate_at` reads it (built once)."""
        if self._clock is None:
            sched: StepSchedule | OpportunitySchedule
            if self.format == "csv":
                sched = StepSchedule(self.steps, self.loop, -self.start_s, 0.0, 0.0)
            else:
                sched = OpportunitySchedule(self.opportunities_ms, self.loop, -self.start_s)
            object.__setattr__(self, "_clock", sched)
        return self._clock

    def forwarder_args(self, tag: str) -> list[str]:
        """The forwarder's options for this trace on direction ``tag`` (``ab``/``ba``)."""
        return [
            f"--trace-{tag}", self.file,
            f"--trace-format-{tag}", self.format,
            f"--trace-loop-{tag}", "1" if self.loop else "0",
            f"--trace-start-{tag}", repr(float(self.start_s)),
            f"--trace-sha256-{tag}", self.sha256,
        ]  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What the results record of it: name, file, sha256, format, loop, start_s,
        period_s, mean and peak Mbit/s (not the schedule)."""
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "format": self.format,
            "loop": self.loop,
            "start_s": self.start_s,
            "period_s": self.period_s,
            "mean_mbit": self.mean_mbit,
            "peak_mbit": self.peak_mbit,
        }


def rate_at(trace: RateTrace, t_s: float, window_s: float = RATE_WINDOW_S) -> float:
    """The rate (Mbit/s) ``trace`` gives its link ``t_s`` seconds after the trace clock
    started (for a run: a time.monotonic() value minus the link's ``trace_start_mono_s``
    in meta.json), with its ``start_s``, loop and end applied as the forwarder does.

    CSV: the step's ``bw_mbit`` (Ethernet frames). Mahimahi: the delivery opportunities
    in ``[t_s, t_s + window_s)`` x 1500 bytes (IP packets) / ``window_s``.
    """
    clock = trace.clock()
    if isinstance(clock, StepSchedule):
        return trace.steps[clock.index(t_s)][1]
    if window_s <= 0:
        raise ValueError(f"rate_at: window_s must be > 0, got {window_s!r}")
    tau_ms = (t_s + trace.start_s) * 1e3
    n = clock.count_before(tau_ms + window_s * 1e3) - clock.count_before(tau_ms)
    return n * OPPORTUNITY_BYTES * 8 / window_s / 1e6


def trace_params_at(trace: RateTrace, t_s: float) -> tuple[float, float | None, float | None]:
    """``(bw_mbit, delay_ms, loss_pct)`` of ``trace`` at ``t_s`` (as :func:`rate_at`);
    delay and loss are None where the trace leaves the direction's fixed values (always
    for Mahimahi traces)."""
    clock = trace.clock()
    if isinstance(clock, StepSchedule):
        _t, bw, delay, loss = trace.steps[clock.index(t_s)]
        return bw, delay, loss
    return rate_at(trace, t_s), None, None


@dataclass(frozen=True)
class DirectionParams:
    """One direction of an emulated link (what leaves one end toward the other).

    Attributes: ``bw_mbit`` rate in Mbit/s (None = unlimited); ``delay_ms`` one-way delay
    in ms; ``jitter_ms`` +- uniform variation of the delay in ms; ``loss_pct`` random loss
    in %; ``max_queue_size`` queue limit in packets (None = BDP default, see
    :func:`default_queue_packets`); ``trace`` a :class:`RateTrace` the rate follows
    instead of ``bw_mbit`` (which must then be None); a CSV trace's steps may also set the
    delay and loss, ``delay_ms`` / ``loss_pct`` fill the steps that leave them empty.
    """

    bw_mbit: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    max_queue_size: int | None = None
    trace: RateTrace | None = None

    def __post_init__(self) -> None:
        # Validate values given directly (from_options validates too, with context).
        parse_bw_mbit(self.bw_mbit, key="bw_mbit")
        parse_time_ms(self.delay_ms, key="delay_ms")
        parse_time_ms(self.jitter_ms, key="jitter_ms")
        parse_loss_pct(self.loss_pct, key="loss_pct")
        parse_queue_pkts(self.max_queue_size, key="max_queue_size")
        _check_trace(self.trace, self.bw_mbit, "")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, where: str = "") -> DirectionParams:
        """Build from TCLink-style options (``bw``, ``delay``, ``jitter``, ``loss``,
        ``max_queue_size``, and ``trace``: a :class:`RateTrace` or a mapping ``{file,
        format, loop, start_s}``); other keys raise :class:`LinkParamError` naming them."""
        unknown = sorted(set(options) - set(EMULATION_KEYS))
        if unknown:
            raise LinkParamError(
                f"{where or 'link'}: unknown option(s) {', '.join(unknown)} "
                f"(known: {', '.join(EMULATION_KEYS)})"
            )
        bw = parse_bw_mbit(options.get("bw"), where=where)
        trace = options.get("trace")
        if trace is not None:
            trace = RateTrace.from_options(trace, where=where)
            _check_trace(trace, bw, where)
        return cls(
            bw_mbit=bw,
            delay_ms=parse_time_ms(options.get("delay"), where=where, key="delay"),
            jitter_ms=parse_time_ms(options.get("jitter"), where=where, key="jitter"),
            loss_pct=parse_loss_pct(options.get("loss"), where=where),
            max_queue_size=parse_queue_pkts(options.get("max_queue_size"), where=where),
            trace=trace,
        )

    def to_options(self) -> dict[str, Any]:
        """TCLink-style options (``delay``/``jitter`` as ``'<x>ms'`` strings); zero values
        and ``None`` are left out, as TCLink expects."""
        opts: dict[str, Any] = {}
        if self.bw_mbit is not None:
            opts["bw"] = self.bw_mbit
        if self.delay_ms:
            opts["delay"] = f"{self.delay_ms:g}ms"
        if self.jitter_ms:
            opts["jitter"] = f"{self.jitter_ms:g}ms"
        if self.loss_pct:
            opts["loss"] = self.loss_pct
        if self.max_queue_size is not None:
            opts["max_queue_size"] = self.max_queue_size
        if self.trace is not None:
            opts["trace"] = self.trace
        return opts

    @property
    def nominal_bw_mbit(self) -> float | None:
        """The rate queues are sized for (Mbit/s): ``bw_mbit``, or the trace's peak."""
        return self.bw_mbit if self.trace is None else self.trace.peak_mbit

    def with_default_queue(self, rtt_ms: float) -> DirectionParams:
        """This direction with ``max_queue_size`` filled from the BDP over ``rtt_ms`` if
        unset (at the trace's peak rate for a trace-driven direction)."""
        if self.max_queue_size is not None:
            return self
        return replace(self, max_queue_size=default_queue_packets(self.nominal_bw_mbit, rtt_ms))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for result metadata); the trace as :meth:`RateTrace.summary`
        (None without one)."""
        out = asdict(replace(self, trace=None))
        out["trace"] = self.trace.summary() if self.trace is not None else None
        return out


def _check_trace(trace: Any, bw_mbit: float | None, where: str) -> None:
    """A trace is a :class:`RateTrace` and comes without a fixed rate."""
    if trace is None:
        return
    if not isinstance(trace, RateTrace):
        raise LinkParamError(
            f"{_where(where, 'trace')}: expected a RateTrace, got {type(trace).__name__}"
        )
    if bw_mbit is not None:
        raise LinkParamError(
            f"{_where(where, 'trace')}: give a rate (bw) or a trace, not both: the trace "
            "sets the rate"
        )


@dataclass(frozen=True)
class LinkSpec:
    """Both directions of a link: ``up`` = node1 -> node2, ``down`` = node2 -> node1.

    In :func:`testbed.linkemu.build_net`, for a host attached to a switch ``up`` is always
    host -> switch and ``down`` switch -> host, whichever order the topology lists them.
    The link's round trip is ``up.delay_ms + down.delay_ms``.
    """

    up: DirectionParams = DirectionParams()
    down: DirectionParams = DirectionParams()

    @classmethod
    def symmetric(
        cls,
        bw_mbit: float | None = None,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        max_queue_size: int | None = None,
        trace: RateTrace | None = None,
    ) -> LinkSpec:
        """The same parameters in both directions (delay is still one-way per direction)."""
        d = DirectionParams(bw_mbit, delay_ms, jitter_ms, loss_pct, max_queue_size, trace)
        return cls(up=d, down=d)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | LinkSpec, *, where: str = "") -> LinkSpec:
        """Build from TCLink-style options.

        Top-level ``bw``/``delay``/``jitter``/``loss``/``max_queue_size`` apply to both
        directions; optional ``up`` and ``down`` mappings (same keys) override them per
        direction. Example: ``{"delay": "10ms", "up": {"bw": 10}, "down": {"bw": 50}}``.
        """
        if isinstance(options, LinkSpec):
            return options
        if not isinstance(options, Mapping):
            raise LinkParamError(
                f"{where or 'link'}: expected a mapping of link options, "
                f"got {type(options).__name__}"
            )
        base = {k: v for k, v in options.items() if k not in ("up", "down")}
        out = {}
        for name in ("up", "down"):
            sub = options.get(name) or {}
            if not isinstance(sub, Mapping):
                raise LinkParamError(f"{where or 'link'}: {name} must be a mapping of options")
            merged = {**base, **sub}
            out[name] = DirectionParams.from_options(
                merged, where=f"{where} ({name})" if where else name
            )
        return cls(up=out["up"], down=out["down"])

    @property
    def has_trace(self) -> bool:
        """Whether a direction follows a :class:`RateTrace` (only the tap backend can)."""
        return self.up.trace is not None or self.down.trace is not None

    @property
    def rtt_ms(self) -> float:
        """Configured round-trip propagation delay of this link alone (ms)."""
        return self.up.delay_ms + self.down.delay_ms

    def reversed(self) -> LinkSpec:
        """The same link seen from the other end (up and down swapped)."""
        return LinkSpec(up=self.down, down=self.up)

    def with_default_queues(self, rtt_ms: float | None = None) -> LinkSpec:
        """Fill unset queue limits from the BDP over ``rtt_ms`` (default: this link's RTT,
        plus 2 x max jitter)."""
        if rtt_ms is None:
            rtt_ms = self.rtt_ms + 2.0 * max(self.up.jitter_ms, self.down.jitter_ms)
        return LinkSpec(
            up=self.up.with_default_queue(rtt_ms), down=self.down.with_default_queue(rtt_ms)
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain dict ``{"up": {...}, "down": {...}}`` (for result metadata)."""
        return {"up": self.up.as_dict(), "down": self.down.as_dict()}


def path_specs(
    links: Mapping[tuple[str, str], LinkSpec], src: str, dst: str
) -> list[tuple[tuple[str, str], LinkSpec]]:
    """The links of the shortest path from node ``src`` to node ``dst``, in order, each as
    ``((node1, node2), spec)`` with the spec re-oriented so that ``up`` points from ``src``
    towards ``dst``. ValueError if there is no path."""
    adj: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for key in links:
        x, y = key
        adj.setdefault(x, []).append((y, key))
        adj.setdefault(y, []).append((x, key))
    prev: dict[str, tuple[str, tuple[str, str]]] = {}
    seen, todo = {src}, deque([src])
    while todo:
        n = todo.popleft()
        for m, key in adj.get(n, []):
            if m not in seen:
                seen.add(m)
                prev[m] = (n, key)
                todo.append(m)
    if dst not in seen:
        raise ValueError(f"no path from {src} to {dst}")
    hops = []
    n = dst
    while n != src:
        p, key = prev[n]
        spec = links[key]
        hops.append((key, spec if key[0] == p else spec.reversed()))
        n = p
    return hops[::-1]
