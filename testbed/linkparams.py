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

A :class:`DirectionParams` holds one direction; a :class:`LinkSpec` holds both: ``up`` is
node1 -> node2 (for a host attached to a switch, host -> switch), ``down`` the reverse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Bytes of a full-sized Ethernet frame without FCS (MTU 1500 + 14 header): the unit in
#: which a queue of "packets" is converted to and from bytes.
ETH_FRAME_BYTES = 1514
#: Default queue = max(QUEUE_BDP_FACTOR x BDP, QUEUE_FLOOR_PKTS) packets.
QUEUE_BDP_FACTOR = 2.0
#: Smallest default queue (packets). Below ~64 a GSO burst (up to 44 segments) does not
#: fit and BBR/CUBIC lose heavily on short, slow links.
QUEUE_FLOOR_PKTS = 64

#: The TCLink options this module understands (both backends honour all of them).
EMULATION_KEYS = ("bw", "delay", "jitter", "loss", "max_queue_size")
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


@dataclass(frozen=True)
class DirectionParams:
    """One direction of an emulated link (what leaves one end toward the other).

    Attributes: ``bw_mbit`` rate in Mbit/s (None = unlimited); ``delay_ms`` one-way delay
    in ms; ``jitter_ms`` +- uniform variation of the delay in ms; ``loss_pct`` random loss
    in %; ``max_queue_size`` queue limit in packets (None = BDP default, see
    :func:`default_queue_packets`).
    """

    bw_mbit: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    max_queue_size: int | None = None

    def __post_init__(self) -> None:
        # Validate values given directly (from_options validates too, with context).
        parse_bw_mbit(self.bw_mbit, key="bw_mbit")
        parse_time_ms(self.delay_ms, key="delay_ms")
        parse_time_ms(self.jitter_ms, key="jitter_ms")
        parse_loss_pct(self.loss_pct, key="loss_pct")
        parse_queue_pkts(self.max_queue_size, key="max_queue_size")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, where: str = "") -> DirectionParams:
        """Build from TCLink-style options (``bw``, ``delay``, ``jitter``, ``loss``,
        ``max_queue_size``); other keys raise :class:`LinkParamError` naming them."""
        unknown = sorted(set(options) - set(EMULATION_KEYS))
        if unknown:
            raise LinkParamError(
                f"{where or 'link'}: unknown option(s) {', '.join(unknown)} "
                f"(known: {', '.join(EMULATION_KEYS)})"
            )
        return cls(
            bw_mbit=parse_bw_mbit(options.get("bw"), where=where),
            delay_ms=parse_time_ms(options.get("delay"), where=where, key="delay"),
            jitter_ms=parse_time_ms(options.get("jitter"), where=where, key="jitter"),
            loss_pct=parse_loss_pct(options.get("loss"), where=where),
            max_queue_size=parse_queue_pkts(options.get("max_queue_size"), where=where),
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
        return opts

    def with_default_queue(self, rtt_ms: float) -> DirectionParams:
        """This direction with ``max_queue_size`` filled from the BDP over ``rtt_ms`` if unset."""
        if self.max_queue_size is not None:
            return self
        return replace(self, max_queue_size=default_queue_packets(self.bw_mbit, rtt_ms))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for result metadata)."""
        return asdict(self)


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
    ) -> LinkSpec:
        """The same parameters in both directions (delay is still one-way per direction)."""
        d = DirectionParams(bw_mbit, delay_ms, jitter_ms, loss_pct, max_queue_size)
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
