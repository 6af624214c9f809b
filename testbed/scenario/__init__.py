"""Scenario files: schema, loading with overrides, sweep expansion, typed links, checks.

A scenario is a YAML mapping (see scenarios/*.yaml and docs/scenario-reference.md, which is
generated from the schema):

    name, description, seed, repetitions, random_order
    topology:     {name: star, params: {n_workers: 2}}  or  {file: my.py, name: mytopo}
    links:        default / <host> / <node1>-<node2>: {bw_mbit, delay_ms, loss_pct,
                  jitter_ms, queue_pkts, up: {...}, down: {...}}; delays are ONE-WAY
    models:       draft, workers: {w1: model, ...}, weights, dtype, threads
    decoding:     gamma, temperature, max_new_tokens, prompts
    transmission: mode (full|topk|adaptive), k, reconstruction, epsilon, value_dtype
    sweep:        {dotted.path: [values...]} or a list of such blocks
    network:      backend, tcp_congestion, tcp_slow_start_after_idle, calibrate, tolerances
    timeouts:     worker_ready_s, connect_s, read_s, round_s, point_s
    on_worker_loss: fail | continue

Modules: `schema` (the pydantic models), `sweep` (load, overrides, expansion into points),
`links` (scenario links -> LinkSpec), `check` (`testbed validate`), `reference` (the field
reference and JSON Schema).
"""

from testbed.scenario.check import ValidationReport, build_topology, check_file, check_scenario
from testbed.scenario.links import LinkKeyError, link_specs, resolve_link
from testbed.scenario.schema import ScenarioSpec
from testbed.scenario.sweep import (
    REQUEST_PATHS,
    SWEEP_SHORTHANDS,
    Scenario,
    ScenarioError,
    ScenarioPoint,
    expand,
    group_points,
    load_scenario,
    scenario_from_dict,
)

__all__ = [
    "REQUEST_PATHS",
    "SWEEP_SHORTHANDS",
    "LinkKeyError",
    "Scenario",
    "ScenarioError",
    "ScenarioPoint",
    "ScenarioSpec",
    "ValidationReport",
    "build_topology",
    "check_file",
    "check_scenario",
    "expand",
    "group_points",
    "link_specs",
    "load_scenario",
    "resolve_link",
    "scenario_from_dict",
]
