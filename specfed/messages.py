"""What server and workers say to each other, as types: below both the engine and the wire.

`Transmission` is the one typed form of "how a worker encodes its distributions": the
scenario's transmission block, the server's command line, a point file and a VERIFY frame
all become one, and it is validated in one place (constructing it builds its codec, whose
constructor checks the parameters). `VerifyRequest` / `VerifyReply` are one round's
exchange with one worker; `specfed.wire` turns them into bytes, `specfed.engine` produces
and consumes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from specfed.codecs import Codec, CodecError, Payload, decode_any, index_bytes_for, make_codec
from specfed.options import IndexCoding, Mode, Reconstruction, ValueDtype

__all__ = ["BadReply", "Transmission", "VerifyReply", "VerifyRequest", "check_reply"]


@dataclass(frozen=True)
class Transmission:
    """How a worker encodes its distributions p_i^(1..gamma+1).

    Attributes:
        mode: full, topk or adaptive (`specfed.options.Mode`).
        k: topk: K, the entries kept per position; adaptive: the cap on K; full: None.
        epsilon: adaptive only: keep the smallest K whose mass reaches 1 - epsilon.
        value_dtype: how values are written on the wire (`specfed.options.ValueDtype`): fp32,
            fp16, or (top-K modes) q8 / q4 quantized log-probabilities.
        index_bytes: fixed index coding's width in bytes, 2, 3 or 4 (None = the smallest
            that holds V - 1); full and the other index codings: None.
        index_coding: how top-K indices are written (`specfed.options.IndexCoding`): fixed,
            bitpack, delta-varint or delta-bitpack; full: fixed.

    A parameter that does not belong to the mode is an error; `Transmission.of` drops such
    parameters instead (a scenario's defaults give every mode an epsilon, say).
    """

    mode: Mode = Mode.FULL
    k: int | None = None
    epsilon: float | None = None
    value_dtype: ValueDtype = ValueDtype.FP32
    index_bytes: int | None = None
    index_coding: IndexCoding = IndexCoding.FIXED

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode, "transmission mode"))
        object.__setattr__(self, "value_dtype", ValueDtype.parse(self.value_dtype, "value_dtype"))
        coding = IndexCoding.parse(self.index_coding, "index_coding")
        object.__setattr__(self, "index_coding", coding)
        for name in ("k", "index_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.epsilon is not None and not (
            isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon)
        ):
            raise ValueError(f"epsilon must be a finite number, got {self.epsilon!r}")
        # The codec's constructor is the one place that checks the parameters.
        codec = make_codec(
            self.mode.value,
            k=self.k if self.mode == Mode.TOPK else None,
            epsilon=self.epsilon if self.mode == Mode.ADAPTIVE else None,
            k_max=self.k if self.mode == Mode.ADAPTIVE else None,
            value_dtype=self.value_dtype.value,
            index_bytes=self.index_bytes,
            index_coding=self.index_coding.value,
        )
        if self.mode == Mode.ADAPTIVE and self.k is None:
            raise ValueError("adaptive transmission needs k (the cap on K)")
        if self.mode != Mode.ADAPTIVE and self.epsilon is not None:
            raise ValueError(f"{self.mode} transmission takes no epsilon={self.epsilon!r}")
        self.__dict__["_codec"] = codec  # not a field: no effect on eq, repr, asdict

    @classmethod
    def of(
        cls,
        mode: Mode | str,
        k: int | None = None,
        epsilon: float | None = None,
        value_dtype: ValueDtype | str = ValueDtype.FP32,
        index_bytes: int | None = None,
        index_coding: IndexCoding | str = IndexCoding.FIXED,
    ) -> Transmission:
        """The transmission for `mode`, keeping only the parameters that mode uses (full: no
        k, epsilon, index_bytes or index_coding; topk: no epsilon; index_bytes only with the
        fixed index coding). A value dtype full cannot send (q8, q4) stays an error."""
        m = Mode.parse(mode, "transmission mode")
        coding = IndexCoding.parse(index_coding, "index_coding")
        if m == Mode.FULL:
            coding = IndexCoding.FIXED
        return cls(
            m,
            k=None if m == Mode.FULL else k,
            epsilon=epsilon if m == Mode.ADAPTIVE else None,
            value_dtype=ValueDtype.parse(value_dtype, "value_dtype"),
            index_bytes=index_bytes if m != Mode.FULL and coding == IndexCoding.FIXED else None,
            index_coding=coding,
        )

    def codec(self) -> Codec:
        """The codec that implements this transmission."""
        codec: Codec = self.__dict__["_codec"]
        return codec

    def wire_index_bytes(self, vocab_size: int) -> int | None:
        """The fixed index width this transmission sends for V = vocab_size (the automatic
        width when index_bytes is None); None for full and the non-fixed index codings."""
        if self.mode == Mode.FULL or self.index_coding != IndexCoding.FIXED:
            return None
        return self.index_bytes or index_bytes_for(vocab_size)

    @property
    def label(self) -> str:
        """Short name for tables: full, topk64, adaptive(0.01,256), then :<value dtype> unless
        fp32 and :<index coding> unless fixed, e.g. topk64:q8:delta-bitpack."""
        if self.mode == Mode.TOPK:
            name = f"topk{self.k}"
        elif self.mode == Mode.ADAPTIVE:
            name = f"adaptive({self.epsilon},{self.k})"
        else:
            name = "full"
        if self.value_dtype != ValueDtype.FP32:
            name = f"{name}:{self.value_dtype}"
        if self.index_coding != IndexCoding.FIXED:
            name = f"{name}:{self.index_coding}"
        return name

    def columns(self) -> dict[str, Any]:
        """The record columns that describe this transmission."""
        return {
            "transmission": self.mode.value,
            "k": self.k,
            "epsilon": self.epsilon,
            "value_dtype": self.value_dtype.value,
            "index_bytes": self.index_bytes,
            "index_coding": self.index_coding.value,
        }


@dataclass(frozen=True)
class VerifyRequest:
    """What the server asks of one worker in one round.

    The worker crops its KV cache of `request_id` to `start` tokens, runs one forward pass over
    `tokens` and returns its distributions at the last `n_positions` (= gamma + 1) positions.
    `round` numbers the rounds of a request from 0; the reply names the request and round it
    answers, so a stale or misrouted reply is detected.
    """

    request_id: str
    start: int
    tokens: list[int]
    n_positions: int
    temperature: float
    transmission: Transmission
    reconstruction: Reconstruction | None = Reconstruction.RENORMALIZE
    measure_fidelity: bool = True
    round: int = 0

    def __post_init__(self) -> None:
        if self.reconstruction is not None:
            rec = Reconstruction.parse(self.reconstruction, "reconstruction")
            object.__setattr__(self, "reconstruction", rec)


@dataclass(frozen=True)
class VerifyReply:
    """A worker's answer to one VerifyRequest.

    Attributes:
        payload: the codec's bytes (what crosses the network).
        t_worker_ms: the worker's compute: forward pass + softmax + encode (in replay: the
            emulated compute it waited, from its device profile).
        t_recorded_ms: replay only: the compute measured when the trace was recorded (NaN
            when computing for real).
        t_fidelity_ms: time the worker spent measuring local_l1 after its compute: testbed
            overhead, neither compute nor network.
        local_l1: mean over positions of ||p_i - p_hat_i||_1, computed by the worker from its
            exact p_i (NaN for draft-guided: the worker does not have q; NaN if not measured).
        request_id, round: the request and round this reply answers.
        bytes_up: bytes the reply took on the wire (payload alone in process; frames on TCP).
        bytes_down: bytes the request took on the wire.
        t_send_ms: time the server spent writing the request (0 in process).
        not_before: worker side only, never on the wire: the time.perf_counter() before
            which the reply must not leave (replay: the end of the emulated compute; 0: at
            once). The worker frames the reply first, then waits, then sends.
    """

    payload: bytes
    t_worker_ms: float
    local_l1: float = math.nan
    request_id: str = ""
    round: int = 0
    t_recorded_ms: float = math.nan
    t_fidelity_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    t_send_ms: float = 0.0
    not_before: float = 0.0


class BadReply(ValueError):
    """A reply that does not answer its request (stale, misrouted) or holds unusable values."""


def check_reply(request: VerifyRequest, reply: VerifyReply, vocab_size: int) -> Payload:
    """Validate a worker's reply against the request it answers; return its decoded payload.

    Checks: the request id and round it names, a finite non-negative compute time, a local
    L1 that is NaN or within [0, 2], and a payload that decodes (the codec checks values:
    finite, in [0, 1], indices < V, row sums) with the request's V and number of positions.
    Raises BadReply saying what was wrong.
    """
    if reply.request_id != request.request_id or reply.round != request.round:
        raise BadReply(
            f"answers request {reply.request_id!r} round {reply.round}, but request "
            f"{request.request_id!r} round {request.round} was asked (a stale or misrouted reply)"
        )
    for what, t in (("worker time", reply.t_worker_ms), ("fidelity time", reply.t_fidelity_ms)):
        if not (math.isfinite(t) and t >= 0):
            raise BadReply(f"{what} {t!r} ms is not a finite number >= 0")
    if not (math.isnan(reply.local_l1) or 0.0 <= reply.local_l1 <= 2.0 + 1e-6):
        raise BadReply(f"local L1 {reply.local_l1!r} is outside [0, 2]")
    try:
        payload = decode_any(reply.payload)
    except CodecError as exc:
        raise BadReply(f"payload: {exc}") from None
    if payload.vocab_size != vocab_size:
        raise BadReply(f"payload has V={payload.vocab_size}, the request's V is {vocab_size}")
    if payload.n_positions != request.n_positions:
        raise BadReply(
            f"payload has {payload.n_positions} positions, the request asked for "
            f"{request.n_positions}"
        )
    return payload
