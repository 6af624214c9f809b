"""`testbed plan`: what a scenario will run, and about how long it will take, before running it.

The estimate is a model, not a measurement, and says which parts it could not estimate:

- per group: building the network (~2 s), calibrating every worker path (~3 s each), the
  workers loading their models (live) or the traces being recorded (replay, when missing);
- per request: rounds = max_new_tokens / expected tokens per round, with an assumed
  acceptance rate (0.8 by default: E[tokens per round] = (1 - a^(gamma+1)) / (1 - a)), and a
  round = draft + the slowest worker's (round trip + request and reply serialization +
  verify). Compute comes from the shipped device profiles of the models (or the role's
  replay profile); a model without one makes the estimate a lower bound, said in the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from testbed.scenario import ScenarioPoint, expand, group_points
from testbed.scenario.sweep import Scenario

__all__ = ["PlanRow", "plan"]

GROUP_SETUP_S = 2.0
CALIBRATION_S_PER_WORKER = 3.0
MODEL_LOAD_S = 8.0


@dataclass
class PlanRow:
    """One group of the plan."""

    group: int
    rep: int
    points: int
    values: str
    requests: int
    seconds: float
    complete: bool  # False: some compute had no profile (the figure is a lower bound)


def _profile(model: str, dtype: str, threads: int) -> Any:
    try:
        from specfed.profile import find_profile

        return find_profile(model, dtype, threads)
    except (ImportError, ValueError):
        return None


def _expected_tokens(gamma: int, acceptance: float) -> float:
    if gamma == 0:
        return 1.0
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (gamma + 1)) / (1 - a)


def _payload_bytes(point: ScenarioPoint, vocab: int) -> float:
    t = point.request.transmission
    positions = point.request.gamma + 1
    return float(t.codec().encoded_size(positions, vocab)) + 60


def _path(topo: Any, per: dict[Any, Any], default: Any, a: str, b: str) -> tuple[float, float]:
    """(round-trip delay ms, bottleneck rate a -> b in Mbit/s) along the topology's path."""
    links = topo.links()
    adj: dict[str, list[str]] = {}
    for x, y in links:
        adj.setdefault(x, []).append(y)
        adj.setdefault(y, []).append(x)
    prev: dict[str, str] = {a: a}
    queue = [a]
    while queue:
        node = queue.pop(0)
        for nxt in adj.get(node, []):
            if nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    rtt, bw, node = 0.0, math.inf, b
    while node != a and node in prev:
        x, y = prev[node], node  # traversed x -> y on the way from a to b
        if (x, y) in per:
            spec = per[(x, y)]
        elif (y, x) in per:
            spec = per[(y, x)].reversed()
        elif x in per:  # a host's access link: up = host -> switch
            spec = per[x]
        elif y in per:
            spec = per[y].reversed()
        else:
            spec = default
        rtt += spec.rtt_ms
        up = spec.up
        rate = up.trace.mean_mbit if up.trace is not None else up.bw_mbit  # a trace: its mean
        if rate is not None:
            bw = min(bw, rate)
        node = x
    return rtt, bw


def _request_seconds(point: ScenarioPoint, acceptance: float) -> tuple[float, bool]:
    from testbed.scenario import build_topology, link_specs

    s = point.scenario.spec
    req = point.request
    complete = True
    draft = _profile(s.models.draft, s.models.dtype, s.models.threads)
    vocab = draft.vocab_size if draft is not None else 151_936
    context = 200  # a typical prompt + half the generated tokens
    tokens = _expected_tokens(req.gamma, acceptance)
    draft_ms = 0.0
    if req.gamma > 0:
        if draft is None:
            complete = False
        else:
            draft_ms = draft.draft_ms(1, context, req.gamma)
    topo = build_topology(point.scenario)
    default, per = link_specs(s.links, topo.hosts(), topo.links(), s.topology.name)
    payload = _payload_bytes(point, vocab)
    slowest = 0.0
    for w, model in s.models.workers.items():
        prof = _profile(model, s.models.dtype, s.models.threads)
        verify_ms = 0.0
        if prof is None:
            complete = False
        else:
            verify_ms = prof.verify_ms(req.gamma + 1, context, req.gamma + 1)
        rtt, up_bw = _path(topo, per, default, w, "srv")
        ser_ms = payload * 8 / (up_bw * 1e6) * 1e3 if math.isfinite(up_bw) else 0.0
        slowest = max(slowest, rtt + verify_ms + ser_ms)
    # every reply also crosses the server's own access link, one after another
    srv_in, srv_links = math.inf, [k for k in topo.links() if "srv" in k]
    if srv_links:
        a, b = srv_links[0]
        spec = per.get("srv", per.get((a, b), default))
        down = spec.down if a == "srv" or "srv" in per else spec.up
        srv_in = down.bw_mbit if down.bw_mbit is not None else math.inf
    shared_ms = len(s.models.workers) * payload * 8 / (srv_in * 1e6) * 1e3
    slowest = max(slowest, shared_ms)
    rounds = math.ceil(s.decoding.max_new_tokens / tokens)
    return rounds * (draft_ms + slowest) / 1e3, complete


def plan(
    scenario: Scenario, repetitions: int | None = None, acceptance: float = 0.8
) -> list[PlanRow]:
    """The groups a run would execute, in order, with estimated seconds each."""
    from specfed.prompts import load_prompts

    points = expand(scenario, repetitions)
    n_prompts = len(load_prompts(scenario.spec.decoding.prompts))
    rows = []
    for gi, group in enumerate(group_points(points)):
        s = group[0].scenario.spec
        seconds = (
            GROUP_SETUP_S + CALIBRATION_S_PER_WORKER * len(s.models.workers) * s.network.calibrate
        )
        seconds += MODEL_LOAD_S if s.compute.mode == "live" else 1.0
        complete = True
        for p in group:
            per_request, ok = _request_seconds(p, acceptance)
            seconds += per_request * n_prompts
            complete &= ok
        rows.append(
            PlanRow(
                gi + 1,
                group[0].rep,
                len(group),
                "; ".join(p.label for p in group),
                len(group) * n_prompts,
                seconds,
                complete,
            )
        )
    return rows
