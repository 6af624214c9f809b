"""Per-request policies: how the server chooses gamma, each worker's K and when a round's
replies are enough, round by round.

Notation as in the paper: gamma drafted tokens per round, K kept entries per position,
P = gamma + 1 positions per reply, alpha the per-token acceptance probability, w_i worker
weights. Each policy has a declarative *spec* (a pydantic model a `specfed.points.Point`
carries: the server varies policies per request, without rebuilding the network) and a small
runtime interface, in the manner of transformers' candidate generator:

- `GammaPolicy`: `gamma_for_round() -> int`, then `update(outcome)` with what the round did
  (drafted, accepted, measured costs). `FixedGamma` (the paper; the default),
  `HeuristicGamma` (HF assisted generation's schedule: +2 after a round with every draft
  accepted, -1 otherwise), `CostGamma` (the gamma that minimizes the expected time per token
  under the measured round costs and the estimated acceptance).
- `KPolicy`: `transmission_for(worker, n_positions) -> Transmission`, `observe(worker,
  bytes_up, t_net_ms)`. `FixedK` (every worker the point's transmission), `LinkAwareK`
  (`transmission.k: auto`: each worker the largest K whose reply fits an upload budget on
  its link, between k_min and k_max; the link estimate comes from the calibration at start
  and, with `source: observed`, from the throughput of that worker's recent replies).
- `Aggregation`: when a round may close. `WaitAll` (the paper; the default), `Quorum(M)`
  (the first M replies), `Deadline(D)` (what arrived D ms after sending, at least one). The
  server aggregates over the replies that arrived, renormalizing the weights over them.

Content vs timing: fixed gamma, the heuristic and K from the calibrated link decide from
content alone (the acceptance history, the configured link), so a record (in process, no
network) and its replay make the same decisions. Cost-based gamma, K from observed
throughput, quorum and deadline depend on when replies arrive: `timing_dependent(point)`
names them, and replay refuses them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from specfed.codecs import TOPK_HEADER_BYTES
from specfed.config import StrictModel
from specfed.messages import Transmission
from specfed.options import IndexCoding, Mode, ValueDtype

__all__ = [
    "DEFAULT_GAMMA_MAX",
    "GOODPUT_PER_RATE",
    "MAX_GAMMA",
    "Aggregation",
    "AggregationSpec",
    "CostGamma",
    "Deadline",
    "FixedGamma",
    "FixedK",
    "GammaPolicy",
    "GammaSpec",
    "HeuristicGamma",
    "KAuto",
    "KPolicy",
    "LinkAwareK",
    "LinkEstimate",
    "Quorum",
    "RoundOutcome",
    "WaitAll",
    "expected_tokens",
    "k_for_budget",
    "make_aggregation",
    "make_gamma_policy",
    "make_k_policy",
    "policy_columns",
    "reply_overhead_bytes",
    "timing_dependent",
]

MAX_GAMMA = 64
"""Largest gamma accepted anywhere (drafted tokens per round)."""
DEFAULT_GAMMA_MAX = 16
"""An adaptive gamma policy's cap when none is given (or the starting gamma, if larger)."""
GOODPUT_PER_RATE = 1448 / 1514
"""TCP payload per Ethernet frame (1448 of 1514 bytes, timestamps on): a configured link
rate in Mbit/s times this is the goodput a reply can get (what calibration measures)."""


# ----------------------------------------------------------------------------- specs


class GammaSpec(StrictModel):
    """How gamma is chosen per round (`decoding.gamma_policy`, `gamma_min`, `gamma_max`).

    `decoding.gamma` is the fixed gamma, or the adaptive policies' first round's gamma."""

    policy: Literal["fixed", "heuristic", "cost"] = "fixed"
    """fixed: decoding.gamma every round; heuristic: +2 after a round with every draft
    accepted, -1 otherwise (HF assisted generation); cost: the gamma minimizing expected
    ms per token from the measured round costs (timing-dependent: live only)"""
    gamma_min: Annotated[int, Field(ge=1, le=MAX_GAMMA, strict=True)] = 1
    """adaptive policies: the smallest gamma"""
    gamma_max: Annotated[int, Field(ge=1, le=MAX_GAMMA, strict=True)] | None = None
    """adaptive policies: the largest gamma (null = max(16, decoding.gamma)); each round
    draws 2 * gamma_max + 1 uniforms, so rounds stay coupled across gamma choices"""

    @model_validator(mode="after")
    def _range(self) -> GammaSpec:
        if self.gamma_max is not None and self.gamma_max < self.gamma_min:
            raise ValueError(f"gamma_max {self.gamma_max} is below gamma_min {self.gamma_min}")
        return self

    def cap(self, gamma: int) -> int:
        """The most tokens any round drafts with starting gamma `gamma`."""
        if self.policy == "fixed":
            return gamma
        return self.gamma_max if self.gamma_max is not None else max(DEFAULT_GAMMA_MAX, gamma)

    @property
    def is_default(self) -> bool:
        """Fixed gamma (gamma_min and gamma_max mean nothing then)."""
        return self.policy == "fixed"


class LinkEstimate(StrictModel):
    """What the server assumes of one worker's path at the start: the worker -> server TCP
    goodput (Mbit/s of payload; null = unlimited) and the round-trip time (ms)."""

    up_mbit: Annotated[float, Field(gt=0, le=1e6)] | None = None
    """worker -> server goodput, Mbit/s of TCP payload (null = unlimited)"""
    rtt_ms: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    """round-trip time of the path, ms"""
    source: Literal["configured", "calibrated", "given"] = "given"
    """where the numbers come from: the scenario's link parameters (configured), the run's
    link calibration (calibrated) or a user (given)"""


class KAuto(StrictModel):
    """Link-aware K per worker (`transmission.k: auto`): each worker's K per round is the
    largest whose reply, serialized at that worker's upload goodput, takes at most
    `budget_ms` (propagation delay excluded: K cannot change it), within [k_min, k_max]."""

    budget_ms: Annotated[float, Field(gt=0, le=1e6)]
    """upload budget per reply, ms of serialization on the worker's uplink"""
    k_min: Annotated[int, Field(ge=1, strict=True)] = 1
    """the smallest K"""
    k_max: Annotated[int, Field(ge=1, strict=True)] = 1024
    """the largest K (and at most V)"""
    source: Literal["link", "observed"] = "link"
    """link: the link estimate of the start only (content-only: replayable); observed: then
    the goodput measured on the worker's recent replies (timing-dependent: live only)"""
    links: dict[str, LinkEstimate] = Field(default_factory=dict)
    """worker name -> its link estimate at the start (a worker without one: unlimited)"""

    @model_validator(mode="after")
    def _range(self) -> KAuto:
        if self.k_max < self.k_min:
            raise ValueError(f"k_max {self.k_max} is below k_min {self.k_min}")
        return self

    @property
    def label(self) -> str:
        return f"topk-auto({self.budget_ms:g}ms,{self.k_min}-{self.k_max},{self.source})"


class AggregationSpec(StrictModel):
    """When a round's replies are enough (`aggregation`): give one of `wait: all`,
    `quorum: M` or `deadline_ms: D` (none = wait for all)."""

    wait: Literal["all"] | None = None
    """all: every asked worker's reply (the paper; the default)"""
    quorum: Annotated[int, Field(ge=1, le=100_000, strict=True)] | None = None
    """close the round at the first M replies (timing-dependent: live only)"""
    deadline_ms: Annotated[float, Field(gt=0, le=1e7)] | None = None
    """close the round D ms after sending, over the replies that arrived (at least one;
    timing-dependent: live only)"""

    @model_validator(mode="after")
    def _one_rule(self) -> AggregationSpec:
        given = [
            f"{k}: {v}"
            for k, v in (
                ("wait", self.wait),
                ("quorum", self.quorum),
                ("deadline_ms", self.deadline_ms),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"give one of wait: all, quorum: M or deadline_ms: D, got {', '.join(given)}"
            )
        return self

    @property
    def rule(self) -> Literal["all", "quorum", "deadline"]:
        if self.quorum is not None:
            return "quorum"
        if self.deadline_ms is not None:
            return "deadline"
        return "all"

    @property
    def is_default(self) -> bool:
        return self.rule == "all"

    @property
    def label(self) -> str:
        if self.quorum is not None:
            return f"quorum{self.quorum}"
        if self.deadline_ms is not None:
            return f"deadline{self.deadline_ms:g}ms"
        return "all"


def timing_dependent(
    gamma: GammaSpec, k_auto: KAuto | None, aggregation: AggregationSpec
) -> list[tuple[str, str]]:
    """(scenario field, why) for every choice whose outcome depends on when replies arrive:
    such a choice cannot be recorded in process and replayed (empty = replayable)."""
    out = []
    if gamma.policy == "cost":
        out.append(
            (
                "decoding.gamma_policy",
                "cost chooses gamma from measured round times (timing-dependent)",
            )
        )
    if k_auto is not None and k_auto.source == "observed":
        out.append(
            (
                "transmission.k_source",
                "observed chooses K from the measured throughput of replies (timing-dependent)",
            )
        )
    if aggregation.rule != "all":
        out.append(
            (
                f"aggregation.{'quorum' if aggregation.rule == 'quorum' else 'deadline_ms'}",
                f"{aggregation.rule} aggregation uses the replies that arrived in time "
                "(timing-dependent)",
            )
        )
    return out


# ----------------------------------------------------------------------------- gamma


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did, for a gamma policy. Times in ms."""

    n_drafted: int
    n_accepted: int
    t_draft_ms: float
    t_verify_ms: float
    t_aggregate_ms: float

    @property
    def n_positions(self) -> int:
        return self.n_drafted + 1


class GammaPolicy(ABC):
    """Chooses gamma per round of one request (a fresh policy per request).

    `gamma_cap` is the most any round drafts: each round draws 2 * gamma_cap + 1 uniforms
    (specfed.sampling.RoundUniforms) whatever it drafts."""

    name: ClassVar[str]

    def __init__(self, gamma: int, gamma_min: int = 1, gamma_cap: int | None = None) -> None:
        self.gamma = gamma
        self.gamma_min = gamma_min
        self.gamma_cap = gamma if gamma_cap is None else gamma_cap

    def gamma_for_round(self) -> int:
        """gamma for the next round."""
        return self.gamma

    @abstractmethod
    def update(self, outcome: RoundOutcome) -> None:
        """Learn from the round that just ended."""

    def _clamp(self, g: int) -> int:
        return max(self.gamma_min, min(self.gamma_cap, g))


class FixedGamma(GammaPolicy):
    """The paper's fixed gamma."""

    name = "fixed"

    def update(self, outcome: RoundOutcome) -> None:
        return None


class HeuristicGamma(GammaPolicy):
    """HF assisted generation's "heuristic" schedule: gamma + 2 after a round whose drafts
    were all accepted, gamma - 1 otherwise, within [gamma_min, gamma_cap]. Decides from the
    acceptance history only (replayable)."""

    name = "heuristic"

    def update(self, outcome: RoundOutcome) -> None:
        if outcome.n_drafted == 0:
            return
        full = outcome.n_accepted == outcome.n_drafted
        self.gamma = self._clamp(self.gamma + 2 if full else self.gamma - 1)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens one round emits with gamma drafts and per-token acceptance alpha
    (Leviathan et al. 2023): (1 - alpha^(gamma+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class CostGamma(GammaPolicy):
    """The gamma minimizing the expected time per token, T(gamma) / E(gamma):

        T(gamma) = c_d * gamma + c_0 + c_p * (gamma + 1)     measured round cost, ms
        E(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha)        expected tokens per round

    c_d is the draft's ms per drafted token; c_0 + c_p * P the verify and aggregation time of
    a round of P positions, a least-squares line over the last `window` rounds (its slope
    shrunk towards 0 while few gammas were tried, and kept >= 0); alpha the acceptance
    estimated from the request's rounds (accepted tokens over accepted tokens plus
    rejections, with one pseudo-count of each). Timing-dependent: live only.
    """

    name = "cost"

    def __init__(
        self, gamma: int, gamma_min: int = 1, gamma_cap: int | None = None, window: int = 16
    ) -> None:
        super().__init__(gamma, gamma_min, gamma_cap)
        self.accepted = 0
        self.rejections = 0
        self.draft_ms: deque[tuple[int, float]] = deque(maxlen=window)
        self.rounds: deque[tuple[int, float]] = deque(maxlen=window)

    @property
    def alpha(self) -> float:
        return (self.accepted + 1.0) / (self.accepted + self.rejections + 2.0)

    def costs(self) -> tuple[float, float, float]:
        """(c_d, c_0, c_p) in ms from the rounds seen so far."""
        n_draft = sum(n for n, _ in self.draft_ms)
        c_d = sum(t for _, t in self.draft_ms) / n_draft if n_draft else 0.0
        if not self.rounds:
            return c_d, 0.0, 0.0
        ps = [float(p) for p, _ in self.rounds]
        ts = [t for _, t in self.rounds]
        pm, tm = sum(ps) / len(ps), sum(ts) / len(ts)
        sxx = sum((p - pm) ** 2 for p in ps)
        sxy = sum((p - pm) * (t - tm) for p, t in zip(ps, ts, strict=True))
        c_p = max(0.0, sxy / (sxx + 1.0))  # +1: shrink the slope while gamma barely varied
        return c_d, tm - c_p * pm, c_p

    def expected_ms_per_token(self, gamma: int) -> float:
        c_d, c_0, c_p = self.costs()
        return (c_d * gamma + c_0 + c_p * (gamma + 1)) / expected_tokens(self.alpha, gamma)

    def update(self, outcome: RoundOutcome) -> None:
        if outcome.n_drafted == 0:
            return
        self.accepted += outcome.n_accepted
        self.rejections += int(outcome.n_accepted < outcome.n_drafted)
        self.draft_ms.append((outcome.n_drafted, outcome.t_draft_ms))
        self.rounds.append((outcome.n_positions, outcome.t_verify_ms + outcome.t_aggregate_ms))
        candidates = range(self.gamma_min, self.gamma_cap + 1)
        self.gamma = min(candidates, key=self.expected_ms_per_token)


def make_gamma_policy(spec: GammaSpec, gamma: int) -> GammaPolicy:
    """A fresh policy for one request starting at `gamma` (ValueError if gamma is 0 and the
    policy adapts: federated AR drafts nothing)."""
    if spec.policy == "fixed":
        return FixedGamma(gamma)
    if gamma < 1:
        raise ValueError(f"gamma_policy {spec.policy} needs gamma >= 1 (gamma 0 drafts nothing)")
    cap = spec.cap(gamma)
    if not spec.gamma_min <= gamma <= cap:
        raise ValueError(f"gamma {gamma} is outside gamma_min..gamma_max = {spec.gamma_min}..{cap}")
    cls = HeuristicGamma if spec.policy == "heuristic" else CostGamma
    return cls(gamma, spec.gamma_min, cap)


# ----------------------------------------------------------------------------- K


#: The codecs whose reply size k: auto predicts exactly (fixed-width entries): the compact
#: codecs' sizes depend on the content (delta coding) or carry per-position headers (q8, q4).
KAUTO_VALUE_DTYPES = (ValueDtype.FP32, ValueDtype.FP16)
KAUTO_CODEC_ERROR = (
    "k: auto sizes replies of fixed-width entries: use value_dtype fp32 or fp16 and "
    "index_coding fixed (compact codecs have content-dependent sizes)"
)


def reply_overhead_bytes() -> int:
    """Bytes of a top-K VERIFY_REPLY besides its P * K entries: the codec header and the
    reply frame (specfed.wire) with a 32-byte request id (a nominal figure: the choice of K
    must not depend on the request id)."""
    from specfed.wire import reply_frame_bytes

    return reply_frame_bytes(TOPK_HEADER_BYTES, "x" * 32)


def k_for_budget(
    budget_ms: float,
    up_mbit: float | None,
    n_positions: int,
    entry_bytes: int,
    k_min: int,
    k_max: int,
) -> int:
    """The largest K whose top-K reply of `n_positions` positions, `entry_bytes` bytes per
    (index, value) entry, takes at most `budget_ms` at `up_mbit` Mbit/s of goodput, within
    [k_min, k_max] (k_max when the link is unlimited)."""
    if up_mbit is None:
        return k_max
    budget_bytes = budget_ms * up_mbit * 1e3 / 8  # Mbit/s = 1e3 bit per ms
    room = (budget_bytes - reply_overhead_bytes()) / (n_positions * entry_bytes)
    k = math.floor(room + 1e-9)  # a budget that fits K exactly must give K despite round-off
    return max(k_min, min(k_max, k))


class KPolicy(ABC):
    """Chooses each worker's transmission per round. Workers are indices 0..N-1."""

    name: ClassVar[str]

    @abstractmethod
    def transmission_for(self, worker: int, n_positions: int) -> Transmission:
        """The transmission worker `worker` uses for a round of `n_positions` positions."""

    def observe(self, worker: int, bytes_up: int, t_net_ms: float) -> None:
        """A reply of `bytes_up` bytes took `t_net_ms` of network time (call time minus the
        worker's compute): used by policies that learn the link."""
        return None

    def estimate(self, worker: int) -> float:
        """The worker's current upload goodput estimate, Mbit/s (NaN: none used)."""
        return math.nan


class FixedK(KPolicy):
    """Every round the given transmission per worker (the paper: one K for all)."""

    name = "fixed"

    def __init__(self, transmissions: Sequence[Transmission]) -> None:
        self.transmissions = list(transmissions)

    def transmission_for(self, worker: int, n_positions: int) -> Transmission:
        return self.transmissions[worker]


class LinkAwareK(KPolicy):
    """`transmission.k: auto`: K per worker and round from the worker's link (`KAuto`).

    With `source: observed` every reply updates the worker's goodput estimate: a sample is
    bytes_up / (t_net - RTT) (the network time minus the path's round trip: what the reply's
    serialization took), clamped to a factor 4 of the current estimate and averaged
    geometrically (weight 1/2). A reply faster than `MIN_TRANSFER_MS` beyond the RTT only
    bounds the goodput from below.
    """

    name = "auto"
    MIN_TRANSFER_MS = 0.5
    WEIGHT = 0.5

    def __init__(
        self,
        spec: KAuto,
        transmissions: Sequence[Transmission],
        worker_names: Sequence[str],
        vocab_size: int,
    ) -> None:
        from specfed.codecs import index_bytes_for

        for tr in transmissions:
            if tr.mode != Mode.TOPK:
                raise ValueError(f"k: auto needs topk transmission, got {tr.mode}")
            if tr.value_dtype not in KAUTO_VALUE_DTYPES or tr.index_coding != IndexCoding.FIXED:
                raise ValueError(KAUTO_CODEC_ERROR)
        self.spec = spec
        self.transmissions = list(transmissions)
        self.k_max = min(spec.k_max, vocab_size)
        self.k_min = min(spec.k_min, self.k_max)
        self.entry_bytes = [
            (tr.index_bytes or index_bytes_for(vocab_size))
            + (2 if tr.value_dtype == ValueDtype.FP16 else 4)
            for tr in transmissions
        ]
        links = [spec.links.get(n) for n in worker_names]
        self.up_mbit: list[float | None] = [e.up_mbit if e else None for e in links]
        self.rtt_ms = [e.rtt_ms if e else 0.0 for e in links]

    def k_for(self, worker: int, n_positions: int) -> int:
        return k_for_budget(
            self.spec.budget_ms,
            self.up_mbit[worker],
            n_positions,
            self.entry_bytes[worker],
            self.k_min,
            self.k_max,
        )

    def transmission_for(self, worker: int, n_positions: int) -> Transmission:
        tr = self.transmissions[worker]
        return Transmission(
            Mode.TOPK,
            self.k_for(worker, n_positions),
            None,
            tr.value_dtype,
            tr.index_bytes,
            tr.index_coding,
        )

    def observe(self, worker: int, bytes_up: int, t_net_ms: float) -> None:
        if self.spec.source != "observed" or bytes_up <= 0 or not math.isfinite(t_net_ms):
            return
        transfer_ms = t_net_ms - self.rtt_ms[worker]
        sample = bytes_up * 8 / (max(transfer_ms, self.MIN_TRANSFER_MS) * 1e3)  # Mbit/s
        old = self.up_mbit[worker]
        if old is None:
            self.up_mbit[worker] = sample
        elif transfer_ms < self.MIN_TRANSFER_MS:
            self.up_mbit[worker] = max(old, sample)  # only a lower bound
        else:
            sample = min(4 * old, max(old / 4, sample))
            self.up_mbit[worker] = math.exp(
                (1 - self.WEIGHT) * math.log(old) + self.WEIGHT * math.log(sample)
            )

    def estimate(self, worker: int) -> float:
        up = self.up_mbit[worker]
        return math.inf if up is None else up


def make_k_policy(
    k_auto: KAuto | None,
    transmissions: Sequence[Transmission],
    worker_names: Sequence[str],
    vocab_size: int,
) -> KPolicy:
    """FixedK, or LinkAwareK when `k_auto` is given (ValueError if a transmission is not
    topk)."""
    if k_auto is None:
        return FixedK(transmissions)
    return LinkAwareK(k_auto, transmissions, worker_names, vocab_size)


# ----------------------------------------------------------------------------- aggregation


class Aggregation(ABC):
    """When a round may close, given what arrived. Times in ms since the requests were sent.

    `enough(n_ok, n_pending, elapsed_ms)`: close now (replies still pending are dropped: the
    server reads and discards them before it talks to that worker again). `wait_s(...)`: the
    longest to wait for the next reply before asking `enough` again (None: until it
    arrives). `min_free(n_active)`: how many workers must be free (not still answering an
    earlier round) before a round is sent; a busy worker sits the round out."""

    name: ClassVar[str]

    @abstractmethod
    def enough(self, n_ok: int, n_pending: int, elapsed_ms: float) -> bool: ...

    def wait_s(self, elapsed_ms: float) -> float | None:
        return None

    def min_free(self, n_active: int) -> int:
        return n_active


class WaitAll(Aggregation):
    """Every asked worker's reply (or its loss)."""

    name = "all"

    def enough(self, n_ok: int, n_pending: int, elapsed_ms: float) -> bool:
        return n_pending == 0


@dataclass
class Quorum(Aggregation):
    """The first `m` replies (all, when fewer than m workers can answer)."""

    m: int
    name: ClassVar[str] = "quorum"

    def enough(self, n_ok: int, n_pending: int, elapsed_ms: float) -> bool:
        return n_pending == 0 or n_ok >= self.m

    def min_free(self, n_active: int) -> int:
        return min(self.m, n_active)


@dataclass
class Deadline(Aggregation):
    """What arrived `deadline_ms` after sending; if nothing has, the first reply."""

    deadline_ms: float
    name: ClassVar[str] = "deadline"

    def enough(self, n_ok: int, n_pending: int, elapsed_ms: float) -> bool:
        return n_pending == 0 or (n_ok >= 1 and elapsed_ms >= self.deadline_ms)

    def wait_s(self, elapsed_ms: float) -> float | None:
        left = self.deadline_ms - elapsed_ms
        return left / 1e3 if left > 0 else None

    def min_free(self, n_active: int) -> int:
        return min(1, n_active)


def make_aggregation(spec: AggregationSpec) -> Aggregation:
    if spec.quorum is not None:
        return Quorum(spec.quorum)
    if spec.deadline_ms is not None:
        return Deadline(spec.deadline_ms)
    return WaitAll()


def policy_columns(
    gamma_spec: GammaSpec,
    gamma: int,
    k_auto: KAuto | None,
    aggregation: AggregationSpec,
    sparse: bool,
) -> dict[str, Any]:
    """The records columns naming a point's policies and their parameters (both tables):
    gamma_min / gamma_max for an adaptive gamma (the cap in effect), the K policy of a
    sparse transmission (fixed or auto, with its budget, range and source), the
    aggregation rule with its quorum or deadline."""
    adaptive = gamma_spec.policy != "fixed"
    return {
        "gamma_policy": gamma_spec.policy,
        "gamma_min": gamma_spec.gamma_min if adaptive else None,
        "gamma_max": gamma_spec.cap(gamma) if adaptive else None,
        "k_policy": ("auto" if k_auto is not None else "fixed") if sparse else None,
        "k_budget_ms": k_auto.budget_ms if k_auto else None,
        "k_min": k_auto.k_min if k_auto else None,
        "k_max": k_auto.k_max if k_auto else None,
        "k_source": k_auto.source if k_auto else None,
        "aggregation": aggregation.rule,
        "quorum": aggregation.quorum,
        "deadline_ms": aggregation.deadline_ms,
    }
