"""The vocabulary of options: every choice a user or a peer can make, declared once.

Each option is a `str` enum (so `Mode.TOPK == "topk"` and YAML / CSV / JSON carry the plain
name). Options that travel on the wire have an explicit, documented wire code per member
(docs/wire-protocol.md, "Option codes"); encoders write `member.code` and decoders read it
with `from_code`, never a position in a list, so reordering members changes nothing on the
wire. A test pins every code to the docs table.

Adding a member is a change here (name, code, one-line meaning) plus what implements it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any, Self

__all__ = [
    "WEIGHT_SUM_TOL",
    "IndexCoding",
    "LossPolicy",
    "Mode",
    "Reconstruction",
    "ValueDtype",
    "WireOption",
    "check_weights",
]


class WireOption(enum.StrEnum):
    """A named option with an explicit wire code (`code`) and a one-line meaning (`doc`)."""

    code: int
    doc: str

    def __new__(cls, value: str, code: int = 0, doc: str = "") -> Self:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.code = code
        obj.doc = doc
        return obj

    @classmethod
    def from_code(cls, code: int) -> Self:
        """The member with wire code `code`; ValueError naming the option if none has it."""
        for member in cls:
            if member.code == code:
                return member
        raise ValueError(f"unknown {cls.__name__} code {code} (known: {cls.codes()})")

    @classmethod
    def codes(cls) -> dict[int, str]:
        """Wire code -> name, for messages and docs."""
        return {m.code: m.value for m in cls}

    @classmethod
    def names(cls) -> list[str]:
        """The member names as users write them."""
        return [m.value for m in cls]

    @classmethod
    def parse(cls, value: Any, what: str | None = None) -> Self:
        """A member from its name (or a member); ValueError listing the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown {what or cls.__name__} {value!r}; use one of {', '.join(cls.names())}"
            ) from None


class Mode(WireOption):
    """Transmission mode: which entries of p_i a worker sends. Code = the codec id byte."""

    FULL = "full", 1, "all V probabilities per position"
    TOPK = "topk", 2, "the K largest (index, probability) pairs per position"
    ADAPTIVE = "adaptive", 3, "the smallest K whose kept mass reaches 1 - epsilon, capped at k"


class Reconstruction(WireOption):
    """How the server rebuilds p_hat_i from a sparse payload (docs/codecs.md)."""

    RENORMALIZE = "renormalize", 1, "p_i / rho_i on the kept set, 0 elsewhere"
    RESIDUAL_MASS = "residual-mass", 2, "kept entries as sent, eps_i spread uniformly"
    DRAFT_GUIDED = "draft-guided", 3, "kept entries as sent, eps_i spread in proportion to q"


class ValueDtype(WireOption):
    """How probability values are written on the wire. Code = the codec header's dtype byte."""

    FP32 = "fp32", 1, "IEEE binary32, 4 bytes"
    FP16 = "fp16", 2, "IEEE binary16, 2 bytes"
    Q8 = "q8", 3, "log-probability on 256 levels (per-position scale), kept mass as fp32"
    Q4 = "q4", 4, "log-probability on 16 levels (per-position scale), kept mass as fp32"

    @property
    def bits(self) -> int:
        """Bits per value on the wire (32, 16, 8, 4)."""
        return {ValueDtype.FP32: 32, ValueDtype.FP16: 16, ValueDtype.Q8: 8, ValueDtype.Q4: 4}[self]

    @property
    def nbytes(self) -> int:
        """Whole bytes per value (fp32 4, fp16 2, q8 1); ValueError for q4 (half a byte:
        use `bits`)."""
        if self.bits % 8:
            raise ValueError(f"{self.value} values take {self.bits} bits, not whole bytes")
        return self.bits // 8

    @property
    def quantized(self) -> bool:
        """True for the quantized log-probability dtypes (top-K transmissions only)."""
        return self in (ValueDtype.Q8, ValueDtype.Q4)


class IndexCoding(WireOption):
    """How top-K token indices are written on the wire (docs/codecs.md). Code = the codec
    header's index-coding byte (format version 2; version 1 messages are `fixed`)."""

    FIXED = "fixed", 1, "2, 3 or 4 bytes per index, entries in descending order of probability"
    BITPACK = "bitpack", 2, "ceil(log2 V) bits per index, bit-packed, same order as fixed"
    DELTA_VARINT = "delta-varint", 3, "indices sorted, gaps as LEB128 varints, values permuted"
    DELTA_BITPACK = "delta-bitpack", 4, "indices sorted, gaps at the widest gap's bit width"

    @property
    def is_delta(self) -> bool:
        """True if the entries go out in ascending token order (the delta codings)."""
        return self in (IndexCoding.DELTA_VARINT, IndexCoding.DELTA_BITPACK)


class LossPolicy(enum.StrEnum):
    """What the server does when a worker fails mid-request (not on the wire)."""

    FAIL = "fail"
    """end the request with an error naming the worker (rows so far are kept)"""
    CONTINUE = "continue"
    """drop the worker, renormalize the weights over the others and go on"""


WEIGHT_SUM_TOL = 1e-6
"""How far from 1 the worker weights may sum."""


def check_weights(weights: Sequence[float], n: int, what: str = "worker") -> list[float]:
    """The mixture weights w_1..w_n as floats: n finite numbers >= 0 summing to 1.

    The one check of the weights (scenario files, study files, the server's --weights, the
    generator, the aggregation). Raises ValueError saying what is wrong.
    """
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be numbers, got {list(weights)!r}") from None
    if len(w) != n:
        raise ValueError(f"need one weight per {what}: {n} {what}s, {len(w)} weights")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    if abs(math.fsum(w) - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(
            f"weights must sum to 1 (within {WEIGHT_SUM_TOL}), sum is {math.fsum(w)!r}"
        )
    return w
