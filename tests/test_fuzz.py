"""Fuzz targets: the reply validator and the scenario loader only ever raise their own,
clear errors, whatever they are given (hypothesis)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specfed.config import ConfigError
from specfed.messages import BadReply, Transmission, VerifyReply, VerifyRequest, check_reply
from specfed.options import Mode
from testbed.scenario import scenario_from_dict

V = 256
REQUEST = VerifyRequest("r1", 3, [1, 2, 3, 4], 3, 1.0, Transmission(Mode.TOPK, k=8), round=2)
GOOD = Transmission(Mode.TOPK, k=8).codec().encode(np.full((3, V), 1.0 / V, dtype=np.float32))

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.one_of(
        st.binary(max_size=400),
        st.binary(min_size=1, max_size=64).map(lambda b: GOOD[: len(GOOD) - len(b)] + b),
        st.integers(0, len(GOOD) - 1).map(
            lambda i: GOOD[:i] + bytes([GOOD[i] ^ 0x5A]) + GOOD[i + 1 :]
        ),
    ),
    rid=st.sampled_from(["r1", "r2", ""]),
    rnd=st.integers(0, 5),
    t_ms=floats,
    l1=floats,
)
def test_reply_validator_only_raises_bad_reply(payload, rid, rnd, t_ms, l1):
    reply = VerifyReply(payload, t_ms, l1, request_id=rid, round=rnd)
    try:
        p = check_reply(REQUEST, reply, V)
    except BadReply:
        return
    # what passes is usable: right shape, the request it answers, finite values
    assert (rid, rnd) == ("r1", 2) and math.isfinite(t_ms) and t_ms >= 0
    assert p.vocab_size == V and p.n_positions == 3
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in p.values)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), floats, st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "name", "seed", "repetitions", "topology", "links", "models", "decoding", "transmission",
    "sweep", "network", "timeouts", "compute", "on_worker_loss", "x",
]  # fmt: skip
BASE = {
    "name": "f",
    "models": {"draft": "tiny-v64-s1", "workers": {"w1": "tiny-v64-s2"}},
    "decoding": {"prompts": "ids:1,2"},
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), st.booleans())
def test_scenario_loader_only_raises_config_error(fields, keep_base):
    raw = {**BASE, **fields} if keep_base else fields
    try:
        sc = scenario_from_dict(raw, "fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml")
        return
    assert sc.spec.name and yaml.safe_dump(sc.data)  # a valid scenario round-trips to YAML


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_yaml_text_only_raises_config_error(text):
    from specfed.config import parse_yaml_text

    try:
        raw = parse_yaml_text(text, "t.yaml")
    except ConfigError:
        return
    with contextlib.suppress(ConfigError):
        scenario_from_dict(raw, "t.yaml")
