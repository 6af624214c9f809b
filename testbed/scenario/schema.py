"""The scenario file's schema: one pydantic model per section, every field documented.

The models are the single source of truth for a scenario's fields: their types, defaults,
ranges and meanings. `testbed validate` checks files against them, the JSON Schema for
editors and the field reference (docs/scenario-reference.md) are generated from them
(`python -m testbed.scenario.reference`). Units: ms, Mbit/s, percent, seconds; link delays
are ONE-WAY per direction.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SkipValidation, ValidationInfo, field_validator, model_validator

from specfed.config import StrictModel
from specfed.options import IndexCoding, LossPolicy, Mode, Reconstruction, ValueDtype
from specfed.policies import DEFAULT_GAMMA_MAX, MAX_GAMMA, AggregationSpec

__all__ = [
    "SAFE_NAME",
    "TCP_CONGESTION",
    "AggregationSpec",
    "Compute",
    "Decoding",
    "Direction",
    "Link",
    "Models",
    "Network",
    "ScenarioSpec",
    "Timeouts",
    "Topology",
    "Trace",
    "TransmissionBlock",
]

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A name that is one safe path component (it names the results folder)."""

TCP_CONGESTION = (
    "bbr", "cubic", "reno", "bic", "cdg", "dctcp", "highspeed", "htcp", "hybla", "illinois",
    "lp", "nv", "scalable", "vegas", "veno", "westwood", "yeah",
)  # fmt: skip
"""Linux TCP congestion-control names a scenario may ask for (the kernel must allow it)."""

Int = Annotated[int, Field(strict=True)]
Seconds = Annotated[float, Field(ge=0.1, le=7 * 24 * 3600)]


class Trace(StrictModel):
    """A trace the rate follows (the tap backend only; see docs/link-emulation.md). The
    trace clock starts when the network's links are built. The file is read and checked
    when the scenario is: an error names the file and the line."""

    format: Literal["mahimahi", "csv"]
    """mahimahi: one millisecond timestamp per line, each a delivery opportunity for 1500
    bytes; csv: steps `t_s, bw_mbit, delay_ms, loss_pct` (delay and loss optional)"""
    loop: bool = True
    """repeat the trace (its length: mahimahi's last timestamp, csv's last row's t_s);
    false: after its end the last rate holds (csv: the last row; mahimahi: its mean rate)"""
    start_s: Annotated[float, Field(ge=0, le=1e7)] = 0.0
    """trace time (s) at which the trace clock starts"""
    file: Annotated[str, Field(min_length=1)]
    """the trace file: absolute, or relative to the scenario file's folder (stored resolved)"""

    @field_validator("file")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        path = Path(v).expanduser()
        if not path.is_absolute():
            base = (info.context or {}).get("base_dir")
            path = Path(base) / path if base is not None else path
        from testbed.linkparams import RateTrace
        from testbed.tapfwd import TraceError

        fmt, loop = info.data.get("format"), info.data.get("loop", True)
        if fmt is None:  # reported on `format`
            return str(path.resolve())
        try:
            return RateTrace.load(path, fmt, loop).file
        except TraceError as exc:
            raise ValueError(str(exc)) from None


class Direction(StrictModel):
    """One direction of a link. A field left out inherits (from the link, then `default`);
    `bw_mbit: null` means no rate limit. `trace` and `bw_mbit` both set the rate: the one
    given at the most specific place wins (an `up` block over the link, the link over
    `default`); a trace and a bw_mbit other than null in one block is an error."""

    bw_mbit: Annotated[float, Field(ge=1e-3, le=1e5)] | None = None
    """rate in Mbit/s (10^6 bit/s of Ethernet frames); null = unlimited"""
    delay_ms: Annotated[float, Field(ge=0, le=1e5)] = 0.0
    """ONE-WAY propagation delay of this direction, ms"""
    loss_pct: Annotated[float, Field(ge=0, le=100)] = 0.0
    """independent random packet loss, percent"""
    jitter_ms: Annotated[float, Field(ge=0, le=1e5)] = 0.0
    """+- uniform variation of the delay, ms (no reordering)"""
    queue_pkts: Annotated[int, Field(ge=1, le=10_000_000, strict=True)] | None = None
    """drop-tail queue limit in packets; null = twice the bandwidth-delay product (>= 64)"""
    trace: Trace | None = None
    """the rate (csv: also delay and loss per step) follows this trace instead of bw_mbit;
    {file, format: mahimahi|csv, loop, start_s}; the tap backend only"""

    @model_validator(mode="after")
    def _rate_or_trace(self) -> Direction:
        if self.trace is not None and self.bw_mbit is not None:
            raise ValueError(
                "give bw_mbit or trace, not both: the trace sets the rate "
                "(bw_mbit given elsewhere, e.g. in default, is overridden by it)"
            )
        return self


class Link(Direction):
    """A link: fields for both directions, and optional per-direction overrides. `up` is
    host -> switch for a host's access link, node1 -> node2 for an `A-B` key."""

    up: Direction | None = None
    """overrides for the up direction"""
    down: Direction | None = None
    """overrides for the down direction"""


class Topology(StrictModel):
    """Which topology to build (structure only; link parameters come from `links`)."""

    name: Annotated[str, Field(min_length=1)] = "star"
    """a registered topology (star, two-tier) or one in `file`'s `topos = {...}`"""
    params: dict[str, Any] = Field(default_factory=dict)
    """keyword arguments of the topology class, e.g. {n_workers: 2}"""
    file: str | None = None
    """a Python file with a Mininet-style `topos = {name: class}` registry. It is CODE:
    `testbed validate` and `testbed run` import and execute it, like Mininet's --custom"""


class Models(StrictModel):
    """Which model runs where."""

    draft: Annotated[str, Field(min_length=1)]
    """the server's draft model: bundle name, HF folder, .gguf file, or tiny-v<V>-s<seed>"""
    workers: dict[str, Annotated[str, Field(min_length=1)]]
    """worker host -> its target model, e.g. {w1: qwen2.5-coder-1.5b}"""
    weights: dict[str, Annotated[float, Field(ge=0)]] | None = None
    """worker host -> w_i (>= 0, sum 1) of the mixture p = sum_i w_i p_i; null = equal"""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """weight dtype of every model; softmax and codecs always run in fp32 or better"""
    threads: Annotated[int, Field(ge=1, le=256, strict=True)] = 1
    """torch threads per process"""

    @field_validator("workers")
    @classmethod
    def _some_workers(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("needs at least one worker, e.g. {w1: qwen2.5-coder-1.5b}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_match(
        cls, v: dict[str, float] | None, info: ValidationInfo
    ) -> dict[str, float] | None:
        workers = info.data.get("workers")
        if v is None or workers is None:
            return v
        if set(v) != set(workers):
            raise ValueError(f"give a weight for every worker: {', '.join(workers)}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"must sum to 1, sum is {sum(v.values())}")
        return v


class Decoding(StrictModel):
    """How requests are decoded."""

    gamma: Annotated[int, Field(ge=0, le=MAX_GAMMA, strict=True)] = 4
    """drafted tokens per round (0 = federated autoregressive decoding)"""
    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    """T for draft and targets (0 = greedy)"""
    max_new_tokens: Annotated[int, Field(ge=1, le=100_000, strict=True)] = 32
    """tokens generated per request"""
    prompts: Annotated[str, Field(min_length=1)] = "humaneval[:4]"
    """humaneval[a:b], a .jsonl file with a "prompt" per line, ids:1,2,3, or a literal prompt"""
    gamma_policy: Literal["fixed", "heuristic", "cost"] = "fixed"
    """gamma per round. fixed: `gamma` every round (the paper); heuristic: start at `gamma`,
    +2 after a round whose drafts were all accepted, -1 otherwise (HF assisted generation;
    decided from content: replayable); cost: the gamma minimizing the expected ms per token
    from the measured round costs and the estimated acceptance (timing-dependent: live only)"""
    gamma_min: Annotated[int, Field(ge=1, le=MAX_GAMMA, strict=True)] = 1
    """adaptive gamma policies: the smallest gamma"""
    gamma_max: Annotated[int, Field(ge=1, le=MAX_GAMMA, strict=True)] | None = None
    """adaptive gamma policies: the largest gamma (null = max(16, gamma)); every round draws
    the uniforms of gamma_max drafts, so points stay coupled whatever gamma a round uses"""

    @field_validator("gamma_policy")
    @classmethod
    def _adaptive_needs_drafts(cls, v: str, info: ValidationInfo) -> str:
        if v != "fixed" and info.data.get("gamma") == 0:
            raise ValueError(f"{v} needs gamma >= 1 (gamma 0 is federated AR: nothing to adapt)")
        return v

    @field_validator("gamma_max")
    @classmethod
    def _gamma_range(cls, v: int | None, info: ValidationInfo) -> int | None:
        lo, gamma = info.data.get("gamma_min"), info.data.get("gamma")
        if info.data.get("gamma_policy", "fixed") == "fixed" or lo is None or gamma is None:
            return v
        hi = v if v is not None else max(DEFAULT_GAMMA_MAX, gamma)
        if hi < lo:
            raise ValueError(f"gamma_max {hi} is below gamma_min {lo}")
        if not lo <= gamma <= hi:
            raise ValueError(f"gamma {gamma} must lie in gamma_min..gamma_max = {lo}..{hi}")
        return v


class TransmissionBlock(StrictModel):
    """How workers encode their distributions, and how the server rebuilds them."""

    mode: Mode = Mode.FULL
    """full: all V probabilities; topk: the K largest; adaptive: smallest K with mass >= 1-eps"""
    k: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] | None = None
    """topk: K, or auto (link-aware K per worker and round, see k_budget_ms); adaptive: the
    cap on K (ignored by full)"""
    reconstruction: Reconstruction = Reconstruction.RENORMALIZE
    """renormalize, residual-mass or draft-guided (ignored by full)"""
    epsilon: Annotated[float, Field(gt=0, lt=1)] = 0.01
    """adaptive: the mass left out per position (ignored by the other modes)"""
    value_dtype: ValueDtype = ValueDtype.FP32
    """probability values on the wire: fp32, fp16, or (top-K and adaptive only) q8 / q4:
    log-probabilities quantized per position, the kept mass sent exactly"""
    index_coding: IndexCoding = IndexCoding.FIXED
    """top-K indices on the wire: fixed (2-4 bytes), bitpack (ceil(log2 V) bits), or sorted
    and delta-coded: delta-varint, delta-bitpack (ignored by full)"""
    k_budget_ms: Annotated[float, Field(gt=0, le=1e6)] | None = None
    """k: auto: the upload budget per reply, ms: each worker's K is the largest whose reply
    serializes within it at the worker's upload goodput (propagation delay excluded)"""
    k_min: Annotated[int, Field(ge=1, strict=True)] = 1
    """k: auto: the smallest K"""
    k_max: Annotated[int, Field(ge=1, strict=True)] = 1024
    """k: auto: the largest K (and at most V)"""
    k_source: Literal["link", "observed"] = "link"
    """k: auto: link = from each worker's path at the start (calibrated live, configured in
    replay: content-only, replayable); observed = then from the goodput of the worker's
    recent replies (timing-dependent: live only)"""

    @field_validator("k")
    @classmethod
    def _k_for_sparse(cls, v: int | str | None, info: ValidationInfo) -> int | str | None:
        mode = info.data.get("mode")
        if v is None and mode in (Mode.TOPK, Mode.ADAPTIVE):
            raise ValueError(f"{mode} transmission needs k (K, or the cap on K)")
        if v == "auto" and mode == Mode.ADAPTIVE:
            raise ValueError("auto is link-aware top-K: it needs mode topk")
        return v

    @field_validator("k_budget_ms")
    @classmethod
    def _auto_needs_budget(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None and info.data.get("k") == "auto" and info.data.get("mode") == Mode.TOPK:
            raise ValueError("k: auto needs k_budget_ms (the upload budget per reply, ms)")
        return v

    @field_validator("k_max")
    @classmethod
    def _k_range(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("k_min")
        if lo is not None and v < lo:
            raise ValueError(f"k_max {v} is below k_min {lo}")
        return v


class Network(StrictModel):
    """Link emulation, TCP settings and calibration."""

    backend: Literal["auto", "tc", "tap"] = "auto"
    """tc: Mininet TCLink (needs netem); tap: userspace forwarder per link; auto: tc if netem"""
    tcp_congestion: Literal[TCP_CONGESTION] = "bbr"  # type: ignore[valid-type]
    """TCP congestion control pinned in every host (the kernel must allow it)"""
    tcp_slow_start_after_idle: Literal[0, 1] = 0
    """net.ipv4.tcp_slow_start_after_idle in every host"""
    calibrate: bool = True
    """measure every worker path's RTT and goodput before trusting it"""
    rtt_tolerance_ms: Annotated[float, Field(ge=0, le=1e4)] = 0.5
    """calibration: allowed error of the median RTT, ms (or rtt_tolerance_pct, the larger)"""
    rtt_tolerance_pct: Annotated[float, Field(ge=0, le=100)] = 3.0
    """calibration: allowed error of the median RTT, percent of the configured RTT"""
    rate_tolerance_pct: Annotated[float, Field(gt=0, le=100)] = 3.0
    """calibration: allowed error of each direction's measured rate (a paced UDP train),
    percent of the configured rate, both ways"""
    loss_sigmas: Annotated[float, Field(gt=0, le=20)] = 4.0
    """calibration: a direction's measured loss must lie within this many binomial
    standard deviations of the configured loss"""
    goodput_min_ratio: Annotated[float, Field(ge=0, le=1)] = 0.90
    """calibration with TCP goodput (testbed calibrate --goodput): least goodput / rate on
    lossless paths"""


class Timeouts(StrictModel):
    """Bounds on waiting, seconds (0.1 s to 7 days)."""

    worker_ready_s: Seconds = 600.0
    """a worker process loading its model"""
    connect_s: Seconds = 10.0
    """the server connecting to a worker"""
    read_s: Seconds = 120.0
    """one socket read"""
    round_s: Seconds = 300.0
    """one worker's whole round (request sent -> reply read)"""
    point_s: Seconds = 3600.0
    """one point (all its requests); a group of points gets this times its size"""


ROLE_KEY = r"^(default|draft|[A-Za-z0-9][A-Za-z0-9_-]*)$"


class Compute(StrictModel):
    """Where compute time comes from. live: the models run in the worker and server
    processes on this host's CPU (its contention included). replay: each point is recorded
    once in process (a trace, cached and reused), then replayed over the emulated network
    with the same bytes, each process waiting an emulated compute time instead of computing."""

    mode: Literal["live", "replay"] = "live"
    """live: compute for real; replay: record once, replay with emulated compute"""
    profiles: Literal["auto", "recorded"] | dict[str, str] = "auto"
    """replay: the emulated compute per role. auto: the shipped device profile of each
    role's model, dtype and threads; recorded: the times measured when the trace was
    recorded (this host, one process); or {default: P, draft: P, w1: P, ...} with P a
    shipped profile name, a profile file, auto or recorded"""
    speed: (
        Annotated[float, Field(gt=0, le=1e6)] | dict[str, Annotated[float, Field(gt=0, le=1e6)]]
    ) = 1.0
    """replay: divide each role's emulated compute by this (10 = a device ten times
    faster); a number, or {default: x, draft: y, w1: z}"""

    @field_validator("profiles", "speed")
    @classmethod
    def _role_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            bad = [k for k in v if not re.fullmatch(ROLE_KEY, str(k))]
            if bad:
                raise ValueError(f"unknown role(s) {bad}: use default, draft or a worker host")
        return v

    def role_profile(self, role: str) -> str:
        """The profile spec of a role (draft or a worker host): auto, recorded, name or file."""
        if isinstance(self.profiles, str):
            return self.profiles
        return self.profiles.get(role, self.profiles.get("default", "auto"))

    def role_speed(self, role: str) -> float:
        if isinstance(self.speed, dict):
            return float(self.speed.get(role, self.speed.get("default", 1.0)))
        return float(self.speed)


Sweep = dict[str, list[Any]]


class ScenarioSpec(StrictModel):
    """A scenario file: what to build, what to run, what to vary."""

    name: Annotated[str, Field(pattern=SAFE_NAME)]
    """names the results folder results/<name>/...: letters, digits, '.', '_', '-'"""
    description: str = ""
    """free text, copied into the results"""
    seed: Annotated[int, Field(ge=0, strict=True)] = 0
    """request i of every point uses seed + i (points are coupled)"""
    repetitions: Annotated[int, Field(ge=1, le=1000, strict=True)] = 1
    """how many times every point runs"""
    random_order: bool = False
    """shuffle groups and points per repetition (seeded by `seed`)"""
    topology: Topology = Topology()
    """the network's structure"""
    links: dict[str, Link] = Field(default_factory=lambda: {"default": Link()})
    """`default` (every link), a host name (its access link), or `A-B` (the link A-B)"""
    models: Models
    """models of the server and the workers"""
    decoding: Decoding = Decoding()
    """decoding options"""
    transmission: TransmissionBlock = TransmissionBlock()
    """transmission options"""
    sweep: SkipValidation[Sweep | list[Sweep]] = Field(default_factory=dict)
    """{dotted.path: [values]} (their cross product), or a list of such blocks (the union);
    shorthands: transmission, k, reconstruction, gamma, temperature"""
    network: Network = Network()
    """link emulation and calibration"""
    timeouts: Timeouts = Timeouts()
    """timeouts"""
    compute: Compute = Compute()
    """live compute, or record once and replay with emulated compute time"""
    on_worker_loss: LossPolicy = LossPolicy.FAIL
    """fail: end the request; continue: drop the worker, renormalize the weights"""
    aggregation: AggregationSpec = AggregationSpec()
    """when a round's replies are enough: {wait: all} (the default), {quorum: M} (the first
    M replies) or {deadline_ms: D} (what arrived D ms after sending, at least one); the
    server aggregates over the replies that arrived, renormalizing the weights over them,
    and records every dropped reply with its lateness. Quorum and deadline depend on timing:
    live only"""

    @model_validator(mode="before")
    @classmethod
    def _name_first(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data:
            data = {**data}
            # pydantic says "missing"; say what the name is for.
            data.setdefault("name", None)
        return data

    @field_validator("name", mode="before")
    @classmethod
    def _name_given(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("missing (every scenario needs a name; it names the results folder)")
        if isinstance(v, str) and ("/" in v or v in (".", "..")):
            raise ValueError(f"must be one path component (no '/'), got {v!r}")
        return v
