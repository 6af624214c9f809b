"""Scenario files: load, validate (errors name the file and the field), override, sweep.

A scenario is a YAML mapping (see scenarios/*.yaml, every field commented there):

    name, seed, repetitions, random_order
    topology:     {name: star, params: {n_workers: 2}}  or  {file: my.py, name: mytopo}
    links:        default: {bw_mbit, delay_ms, loss_pct, jitter_ms, queue_pkts}
                  <host>: {...} overrides for that host's access link
                  <node1>-<node2>: {...} a switch-to-switch link (e.g. e1-s0)
                  any of them may hold up: {...} / down: {...} per direction
                  (up = host -> switch, or node1 -> node2); delays are ONE-WAY
    models:       draft, workers: {w1: model, ...}, weights: {w1: 0.5, ...}, dtype,
                  threads (torch threads per process)
    decoding:     gamma, temperature, max_new_tokens, prompts
    transmission: mode (full|topk|adaptive), k, reconstruction, epsilon, value_dtype
    sweep:        {dotted.path: [values...]}; shorthands: transmission, k, reconstruction,
                  gamma, temperature
    network:      backend (auto|tc|tap), tcp_congestion, tcp_slow_start_after_idle,
                  calibrate, rtt_tolerance_ms, rtt_tolerance_pct, goodput_min_ratio
    timeouts:     worker_ready_s, connect_s, read_s, round_s, point_s
    on_worker_loss: fail | continue

A sweep expands to points (the cross product of its lists) x repetitions. Points that differ
only in per-request options (REQUEST_PATHS) share one network and one set of worker
processes; anything else rebuilds.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TRANSMISSIONS = ("full", "topk", "adaptive")
RECONSTRUCTIONS = ("renormalize", "residual-mass", "draft-guided")
#: Options the server takes per request: sweeping them reuses the running net and workers.
REQUEST_PATHS = (
    "decoding.gamma",
    "decoding.temperature",
    "transmission.mode",
    "transmission.k",
    "transmission.reconstruction",
    "transmission.epsilon",
    "transmission.value_dtype",
)
SWEEP_SHORTHANDS = {
    "transmission": "transmission.mode",
    "k": "transmission.k",
    "reconstruction": "transmission.reconstruction",
    "gamma": "decoding.gamma",
    "temperature": "decoding.temperature",
}
LINK_KEYS = ("bw_mbit", "delay_ms", "loss_pct", "jitter_ms", "queue_pkts")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "repetitions": 1,
    "random_order": False,
    "topology": {"name": "star", "params": {}},
    "links": {"default": {}},
    "models": {"weights": None, "dtype": "bf16", "threads": 1},
    "decoding": {"gamma": 4, "temperature": 1.0, "max_new_tokens": 32, "prompts": "humaneval[:4]"},
    "transmission": {
        "mode": "full",
        "k": None,
        "reconstruction": "renormalize",
        "epsilon": 0.01,
        "value_dtype": "fp32",
    },
    "sweep": {},
    "network": {
        "backend": "auto",
        "tcp_congestion": "bbr",
        "tcp_slow_start_after_idle": 0,
        "calibrate": True,
        "rtt_tolerance_ms": 0.5,
        "rtt_tolerance_pct": 3.0,
        "goodput_min_ratio": 0.90,
    },
    "timeouts": {
        "worker_ready_s": 600.0,
        "connect_s": 10.0,
        "read_s": 120.0,
        "round_s": 300.0,
        "point_s": 3600.0,
    },
    "on_worker_loss": "fail",
}


class ScenarioError(ValueError):
    """A scenario file is malformed; the message starts with `file: field.path:`."""


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: `data` holds every field, defaults filled in."""

    path: Path
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def workers(self) -> dict[str, str]:
        """Worker host -> model."""
        return dict(self.data["models"]["workers"])

    def get(self, path: str) -> Any:
        """The value at a dotted path (e.g. 'links.w1.bw_mbit')."""
        node: Any = self.data
        for part in path.split("."):
            node = node[part]
        return node


@dataclass(frozen=True)
class Point:
    """One sweep point: its index, the values it sets, and the resolved scenario."""

    index: int
    values: dict[str, Any]
    scenario: Scenario
    rep: int = 0

    @property
    def infra_key(self) -> str:
        """Everything but the per-request options: equal keys share a net and workers."""
        data = copy.deepcopy(self.scenario.data)
        for path in REQUEST_PATHS:
            section, key = path.split(".")
            data[section].pop(key, None)
        data.pop("sweep", None)
        data.pop("repetitions", None)
        return repr(sorted(_flatten(data).items()))

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "base"


# --- validation -----------------------------------------------------------------------


class _Checker:
    """Collects the first error with its field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, msg: str) -> None:
        raise ScenarioError(f"{self.source}: {path or '<top>'}: {msg}")

    def mapping(self, value: Any, path: str, allowed: Sequence[str] | None = None) -> dict:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        if allowed is not None:
            extra = sorted(set(value) - set(allowed))
            if extra:
                self.fail(
                    f"{path}.{extra[0]}" if path else extra[0],
                    f"unknown field; expected one of {', '.join(allowed)}",
                )
        return dict(value)

    def number(
        self,
        value: Any,
        path: str,
        lo: float | None = None,
        hi: float | None = None,
        integer: bool = False,
        optional: bool = False,
    ) -> Any:
        if value is None and optional:
            return None
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            kind = "an integer" if integer else "a number"
            self.fail(path, f"expected {kind}, got {value!r}")
        if lo is not None and value < lo:
            self.fail(path, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            self.fail(path, f"must be <= {hi}, got {value}")
        return value

    def choice(self, value: Any, path: str, options: Sequence[Any]) -> Any:
        if value not in options:
            self.fail(path, f"expected one of {', '.join(map(str, options))}; got {value!r}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {value!r}")
        return value


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v)
            if isinstance(out.get(k), dict) and isinstance(v, Mapping)
            else copy.deepcopy(v)
        )
    return out


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_link(c: _Checker, value: Any, path: str, directional: bool = True) -> None:
    allowed = [*LINK_KEYS, *(("up", "down") if directional else ())]
    link = c.mapping(value, path, allowed)
    for key in LINK_KEYS:
        if key in link:
            lim = {"loss_pct": (0, 100), "bw_mbit": (1e-3, 1e5), "queue_pkts": (1, 1e7)}
            lo, hi = lim.get(key, (0, 1e5))
            c.number(
                link[key],
                f"{path}.{key}",
                lo,
                hi,
                integer=key == "queue_pkts",
                optional=key in ("bw_mbit", "queue_pkts"),
            )
    for d in ("up", "down"):
        if d in link:
            _check_link(c, link[d], f"{path}.{d}", directional=False)


def validate(raw: Any, source: str) -> dict[str, Any]:
    """Check a parsed scenario (defaults merged in) and return it; ScenarioError otherwise."""
    c = _Checker(source)
    top = c.mapping(raw, "", [*DEFAULTS, "name", "description"])
    if "name" not in top:
        c.fail("name", "missing (every scenario needs a name; it names the results folder)")
    data = _merge(DEFAULTS, top)
    c.string(data["name"], "name")
    c.number(data["seed"], "seed", 0, integer=True)
    c.number(data["repetitions"], "repetitions", 1, 1000, integer=True)
    if not isinstance(data["random_order"], bool):
        c.fail("random_order", f"expected true or false, got {data['random_order']!r}")

    topo = c.mapping(data["topology"], "topology", ["name", "params", "file"])
    c.string(topo.get("name"), "topology.name")
    c.mapping(topo.get("params", {}), "topology.params")

    models = c.mapping(
        data["models"], "models", ["draft", "workers", "weights", "dtype", "threads"]
    )
    c.string(models.get("draft"), "models.draft")
    workers = c.mapping(models.get("workers"), "models.workers")
    if not workers:
        c.fail("models.workers", "needs at least one worker, e.g. {w1: qwen2.5-coder-1.5b}")
    for host, model in workers.items():
        c.string(model, f"models.workers.{host}")
    if models.get("weights") is not None:
        weights = c.mapping(models["weights"], "models.weights", list(workers))
        if set(weights) != set(workers):
            c.fail("models.weights", f"give a weight for every worker: {', '.join(workers)}")
        for host, w in weights.items():
            c.number(w, f"models.weights.{host}", 0)
        if abs(sum(weights.values()) - 1.0) > 1e-6:
            c.fail("models.weights", f"must sum to 1, sum is {sum(weights.values())}")
    c.choice(models["dtype"], "models.dtype", ["fp32", "bf16"])
    c.number(models["threads"], "models.threads", 1, 256, integer=True)

    dec = c.mapping(data["decoding"], "decoding", list(DEFAULTS["decoding"]))
    c.number(dec["gamma"], "decoding.gamma", 0, 64, integer=True)
    c.number(dec["temperature"], "decoding.temperature", 0, 100)
    c.number(dec["max_new_tokens"], "decoding.max_new_tokens", 1, 100000, integer=True)
    c.string(dec["prompts"], "decoding.prompts")

    tr = c.mapping(data["transmission"], "transmission", list(DEFAULTS["transmission"]))
    c.choice(tr["mode"], "transmission.mode", TRANSMISSIONS)
    c.number(tr["k"], "transmission.k", 1, integer=True, optional=True)
    if tr["mode"] != "full" and tr["k"] is None:
        c.fail("transmission.k", f"{tr['mode']} transmission needs k (K, or the cap on K)")
    c.choice(tr["reconstruction"], "transmission.reconstruction", RECONSTRUCTIONS)
    c.number(tr["epsilon"], "transmission.epsilon", 0, 1)
    c.choice(tr["value_dtype"], "transmission.value_dtype", ["fp32", "fp16"])

    links = c.mapping(data["links"], "links")
    for key, value in links.items():
        _check_link(c, value, f"links.{key}")

    net = c.mapping(data["network"], "network", list(DEFAULTS["network"]))
    c.choice(net["backend"], "network.backend", ["auto", "tc", "tap"])
    c.string(net["tcp_congestion"], "network.tcp_congestion")
    c.choice(net["tcp_slow_start_after_idle"], "network.tcp_slow_start_after_idle", [0, 1])
    c.choice(net["calibrate"], "network.calibrate", [True, False])
    c.number(net["rtt_tolerance_ms"], "network.rtt_tolerance_ms", 0)
    c.number(net["rtt_tolerance_pct"], "network.rtt_tolerance_pct", 0)
    c.number(net["goodput_min_ratio"], "network.goodput_min_ratio", 0, 1)

    to = c.mapping(data["timeouts"], "timeouts", list(DEFAULTS["timeouts"]))
    for key, value in to.items():
        c.number(value, f"timeouts.{key}", 0.1)
    c.choice(data["on_worker_loss"], "on_worker_loss", ["fail", "continue"])

    blocks = data["sweep"] if isinstance(data["sweep"], list) else [data["sweep"]]
    for n, block in enumerate(blocks):
        where = f"sweep[{n}]" if isinstance(data["sweep"], list) else "sweep"
        for key, values in c.mapping(block, where).items():
            if not isinstance(values, list) or not values:
                c.fail(f"{where}.{key}", f"expected a non-empty list of values, got {values!r}")
            section = SWEEP_SHORTHANDS.get(key, key).split(".")[0]
            if section not in DEFAULTS or section in ("sweep", "repetitions"):
                c.fail(
                    f"{where}.{key}",
                    "not a scenario field (use a dotted path such as links.w1.bw_mbit, "
                    "or transmission, k, reconstruction, gamma, temperature)",
                )
    return data


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Read, apply `--set path=value` overrides (values parsed as YAML) and validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ScenarioError(f"{path}:{where}: not valid YAML: {exc}") from exc
    if raw is None:
        raise ScenarioError(f"{path}: the file is empty")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ScenarioError(f"--set {item!r}: expected PATH=VALUE, e.g. decoding.gamma=6")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ScenarioError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
        raw = _set_path(raw, SWEEP_SHORTHANDS.get(key, key), parsed, f"--set {key}")
    return Scenario(path, validate(raw, str(path)))


def _set_path(data: Any, path: str, value: Any, what: str) -> dict[str, Any]:
    """A copy of `data` with the dotted `path` set to `value` (intermediate maps created)."""
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{what}: the scenario is not a mapping")
    out = copy.deepcopy(dict(data))
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ScenarioError(f"{what}: {part!r} is not a mapping")
        node[part] = dict(child)
        node = node[part]
    node[parts[-1]] = value
    return out


def expand(scenario: Scenario, repetitions: int | None = None) -> list[Point]:
    """Sweep points x repetitions, in run order.

    Order: repetition-major; within a repetition points are grouped by network (infra_key)
    so a group shares one net and one set of workers. With random_order, groups and the
    points inside each group are shuffled per repetition (seeded by the scenario seed).
    Full transmission ignores k and reconstruction, so duplicates differing only there
    are dropped.
    """
    raw = scenario["sweep"]
    combos: list[dict[str, Any]] = []
    for block in raw if isinstance(raw, list) else [raw]:
        sweep = {SWEEP_SHORTHANDS.get(k, k): v for k, v in block.items()}
        combos += [
            dict(zip(sweep, combo, strict=True)) for combo in itertools.product(*sweep.values())
        ]
    points: list[Point] = []
    seen: set[str] = set()
    for values in combos:
        data = copy.deepcopy(scenario.data)
        data["sweep"] = {}
        for k, v in values.items():
            data = _set_path(data, k, v, f"sweep.{k}")
        if data["transmission"]["mode"] == "full":
            data["transmission"]["k"] = None
            data["transmission"]["reconstruction"] = "renormalize"
            values = {
                k: v
                for k, v in values.items()
                if k not in ("transmission.k", "transmission.reconstruction")
            }
        resolved = Scenario(scenario.path, validate(data, f"{scenario.path} (sweep {values})"))
        key = repr(sorted(_flatten(resolved.data).items()))
        if key in seen:
            continue
        seen.add(key)
        points.append(Point(len(points), values, resolved))
    reps = repetitions if repetitions is not None else scenario["repetitions"]
    rng = random.Random(scenario["seed"])
    ordered: list[Point] = []
    for rep in range(reps):
        groups: dict[str, list[Point]] = {}
        for p in points:
            groups.setdefault(p.infra_key, []).append(p)
        batches = list(groups.values())
        if scenario["random_order"]:
            rng.shuffle(batches)
            for b in batches:
                rng.shuffle(b)
        ordered += [Point(p.index, p.values, p.scenario, rep) for b in batches for p in b]
    return ordered


def link_options(
    scenario: Scenario, topo_hosts: Sequence[str], topo_links: Sequence[tuple[str, str]]
) -> tuple[dict, dict[Any, dict]]:
    """Scenario links -> (default TCLink-style options, {host | (n1, n2): options}).

    `default` applies to every link; a host key merges over it for that host's access
    link; an 'A-B' key for the link between nodes A and B.
    """
    links = scenario["links"]
    default = _tclink(links.get("default", {}))
    per: dict[Any, dict] = {}
    pairs = {f"{a}-{b}": (a, b) for a, b in topo_links} | {
        f"{b}-{a}": (b, a) for a, b in topo_links
    }
    for key, value in links.items():
        if key == "default":
            continue
        merged = _tclink(_merge(links.get("default", {}), value))
        if key in topo_hosts:
            per[key] = merged
        elif key in pairs:
            per[pairs[key]] = merged
        else:
            raise ScenarioError(
                f"{scenario.path}: links.{key}: no such host or link in topology "
                f"{scenario['topology']['name']} (hosts: {', '.join(topo_hosts)}; links: "
                f"{', '.join(f'{a}-{b}' for a, b in topo_links)})"
            )
    return default, per


def _tclink(link: Mapping[str, Any]) -> dict[str, Any]:
    """Scenario link fields (explicit units) -> TCLink option names (bw, delay, ...)."""
    names: dict[str, tuple[str, Callable[[Any], Any]]] = {
        "bw_mbit": ("bw", float),
        "delay_ms": ("delay", lambda v: f"{v}ms"),
        "loss_pct": ("loss", float),
        "jitter_ms": ("jitter", lambda v: f"{v}ms"),
        "queue_pkts": ("max_queue_size", int),
    }
    out: dict[str, Any] = {}
    for key, value in link.items():
        if key in ("up", "down"):
            out[key] = _tclink(value)
        elif value is not None:
            name, conv = names[key]
            out[name] = conv(value)
    return out


def _is_study(path: Path) -> bool:
    """Study files (analysis/paper.py) have a top-level `study:` section; scenarios never."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, Mapping) and "study" in raw


@dataclass
class ValidationReport:
    """What `testbed validate` prints per file."""

    path: Path
    ok: bool
    message: str
    points: int = 0
    groups: int = 0
    extra: list[str] = field(default_factory=list)


def check_file(path: str | Path) -> ValidationReport:
    """Validate one scenario file fully: schema, sweep, topology, link keys, prompts."""
    from specfed.prompts import PromptError, load_prompts
    from topologies import TopologyError, load_topology

    p = Path(path)
    if _is_study(p):  # a distribution-level study file (analysis.paper), not a network run
        from analysis.paper import StudyConfigError, load_study

        try:
            load_study(p)
        except StudyConfigError as exc:
            return ValidationReport(p, False, str(exc))
        return ValidationReport(
            p, True, "ok (distribution-level study: python -m analysis.paper FILE)"
        )
    try:
        sc = load_scenario(p)
        points = expand(sc, 1)
        for pt in points:
            s = pt.scenario
            topo_cls = load_topology(s["topology"]["name"], s["topology"].get("file"))
            try:
                topo = topo_cls(**s["topology"].get("params", {}))
            except (TypeError, ValueError) as exc:
                raise ScenarioError(f"{p}: topology.params: {exc}") from exc
            hosts = topo.hosts()
            for host in s.workers:
                if host not in hosts or host == "srv":
                    raise ScenarioError(
                        f"{p}: models.workers.{host}: not a worker host of "
                        f"topology {s['topology']['name']} ({', '.join(hosts)})"
                    )
            link_options(s, hosts, topo.links())
            try:
                load_prompts(s["decoding"]["prompts"])
            except PromptError as exc:
                raise ScenarioError(f"{p}: decoding.prompts: {exc}") from exc
        groups = len({pt.infra_key for pt in points})
        return ValidationReport(p, True, "ok", len(points), groups)
    except (ScenarioError, TopologyError) as exc:
        return ValidationReport(p, False, str(exc))
