"""Scenario files: field-level errors, overrides, sweep expansion, link mapping (no root)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from testbed.linkparams import DirectionParams, LinkSpec
from testbed.scenario import ScenarioError, check_file, expand, link_specs, load_scenario

BASE = {
    "name": "t",
    "topology": {"name": "star", "params": {"n_workers": 2}},
    "links": {"default": {"bw_mbit": 100, "delay_ms": 1}, "w1": {"bw_mbit": 5}},
    "models": {"draft": "tiny-v64-s1", "workers": {"w1": "tiny-v64-s2", "w2": "tiny-v64-s3"}},
    "decoding": {"prompts": "ids:1,2,3"},
}


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def with_(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("decoding.gamma", -1, r"decoding\.gamma: must be >= 0"),
        ("decoding.gamma", "four", r"decoding\.gamma: expected an integer, got 'four'"),
        ("transmission.mode", "zip", r"transmission\.mode: expected one of full, topk, adaptive"),
        ("transmission.mode", "topk", r"transmission\.k: topk transmission needs k"),
        ("links.w1.loss_pct", 150, r"links\.w1\.loss_pct: must be <= 100"),
        ("links.w1.delay", 5, r"links\.w1\.delay: unknown field; expected one of bw_mbit"),
        ("links.w2.up.bw_mbit", "fast", r"links\.w2\.up\.bw_mbit: expected a number"),
        ("models.weights", {"w1": 0.7, "w2": 0.7}, r"models\.weights: must sum to 1"),
        ("models.workers", {}, r"models\.workers: needs at least one worker"),
        ("sweep.k", 64, r"sweep\.k: expected a non-empty list"),
        ("sweep.bogus", [1], r"sweep\.bogus: not a scenario field"),
        ("network.backend", "ovs", r"network\.backend: expected one of auto, tc, tap"),
        ("colour", "red", r"colour: unknown field"),
    ],
)
def test_field_level_errors_name_file_and_field(tmp_path, path, value, match):
    p = write(tmp_path, with_(path, value))
    with pytest.raises(ScenarioError, match=match) as info:
        load_scenario(p)
    assert str(info.value).startswith(str(p))


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nlinks: {default: [\n")
    with pytest.raises(ScenarioError, match=r"bad\.yaml: line \d+, column \d+: not valid YAML"):
        load_scenario(p)
    with pytest.raises(ScenarioError, match="empty"):
        load_scenario(write(tmp_path, None, "empty.yaml"))  # type: ignore[arg-type]
    with pytest.raises(ScenarioError, match="name: missing"):
        load_scenario(write(tmp_path, {"models": BASE["models"]}, "noname.yaml"))


def test_check_file_catches_topology_and_host_mistakes(tmp_path):
    r = check_file(write(tmp_path, with_("links.w9", {"bw_mbit": 1})))
    assert not r.ok and "links.w9: no such host or link in topology star" in r.message
    r = check_file(write(tmp_path, with_("models.workers", {"w1": "x", "w7": "y"}), "b.yaml"))
    assert not r.ok and "models.workers.w7: not a worker host" in r.message
    r = check_file(write(tmp_path, with_("topology.name", "ring"), "c.yaml"))
    assert not r.ok and "unknown topology 'ring'" in r.message
    r = check_file(write(tmp_path, with_("decoding.prompts", "humaneval[300:]"), "d.yaml"))
    assert not r.ok and "decoding.prompts" in r.message
    assert check_file(write(tmp_path, BASE, "ok.yaml")).ok


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    sc = load_scenario(p, ["decoding.gamma=6", "links.w2.delay_ms=20", "k=32", "transmission=topk"])
    assert sc.get("decoding.gamma") == 6 and sc.get("links.w2.delay_ms") == 20
    assert sc.get("transmission.k") == 32 and sc.get("transmission.mode") == "topk"
    with pytest.raises(ScenarioError, match=r"--set 'gamma': expected PATH=VALUE"):
        load_scenario(p, ["gamma"])
    with pytest.raises(ScenarioError, match=r"decoding\.gamma: expected an integer"):
        load_scenario(p, ["gamma=lots"])


def test_sweep_expansion_groups_by_network(tmp_path):
    data = with_(
        "sweep",
        {
            "transmission": ["full", "topk"],
            "k": [16, 64],
            "reconstruction": ["renormalize", "draft-guided"],
            "links.w1.bw_mbit": [5, 50],
        },
    )
    sc = load_scenario(write(tmp_path, {**data, "repetitions": 2}))
    points = expand(sc)
    # full ignores k and reconstruction: 1 + 2*2 per bandwidth, x 2 bandwidths, x 2 reps
    assert len(points) == (1 + 4) * 2 * 2
    assert len({p.index for p in points}) == 10
    groups = []
    for p in points:
        if not groups or groups[-1] != (p.rep, p.infra_key):
            groups.append((p.rep, p.infra_key))
    assert len(groups) == 4  # 2 bandwidths x 2 repetitions, each contiguous
    full = [p for p in points if p.values.get("transmission.mode") == "full"]
    assert all(p.scenario.get("transmission.k") is None for p in full)


def test_random_order_is_seeded_and_keeps_groups(tmp_path):
    data = {
        **with_("sweep", {"k": [1, 2, 3, 4], "links.w1.bw_mbit": [5, 50]}),
        "random_order": True,
        "repetitions": 3,
        "seed": 3,
    }
    data["transmission"] = {"mode": "topk", "k": 1}
    sc = load_scenario(write(tmp_path, data))
    a, b = expand(sc), expand(sc)
    assert [(p.index, p.rep) for p in a] == [(p.index, p.rep) for p in b]
    orders = {tuple(p.index for p in a if p.rep == r) for r in range(3)}
    assert len(orders) > 1  # shuffled differently per repetition


def test_link_specs_are_typed_numbers_per_direction(tmp_path):
    data = with_(
        "links.w2", {"delay_ms": 20, "up": {"bw_mbit": 10}, "down": {"bw_mbit": 50}, "loss_pct": 1}
    )
    sc = load_scenario(write(tmp_path, data))
    default, per = link_specs(
        sc.spec.links, ["srv", "w1", "w2"], [("srv", "s1"), ("w1", "s1"), ("w2", "s1")]
    )
    assert default == LinkSpec.symmetric(bw_mbit=100.0, delay_ms=1.0)
    assert per["w1"] == LinkSpec.symmetric(bw_mbit=5.0, delay_ms=1.0)
    assert per["w2"] == LinkSpec(
        up=DirectionParams(bw_mbit=10.0, delay_ms=20.0, loss_pct=1.0),
        down=DirectionParams(bw_mbit=50.0, delay_ms=20.0, loss_pct=1.0),
    )
    assert isinstance(per["w2"].up.delay_ms, float)


def test_every_shipped_scenario_validates():
    files = sorted(Path(__file__).parents[1].glob("scenarios/*.yaml"))
    assert files
    for f in files:
        r = check_file(f)
        assert r.ok, r.message


def test_user_topology_file_and_pair_keys(tmp_path):
    topo_file = tmp_path / "mytopo.py"
    topo_file.write_text(
        "from mininet.topo import Topo\n\n\n"
        "class Line(Topo):\n"
        "    def build(self, n_workers=1):\n"
        "        a, b = self.addSwitch('s1'), self.addSwitch('s2')\n"
        "        self.addLink(a, b)\n"
        "        self.addLink(self.addHost('srv'), a)\n"
        "        for i in range(1, n_workers + 1):\n"
        "            self.addLink(self.addHost(f'w{i}'), b)\n\n\n"
        "topos = {'line': Line}\n"
    )
    data = with_("topology", {"file": str(topo_file), "name": "line", "params": {"n_workers": 2}})
    data["links"]["s1-s2"] = {"bw_mbit": 7, "delay_ms": 30}
    p = write(tmp_path, data)
    assert check_file(p).ok, check_file(p).message
    from topologies import load_topology

    topo = load_topology("line", topo_file)(n_workers=2)
    _, per = link_specs(load_scenario(p).spec.links, topo.hosts(), topo.links())
    assert per[("s1", "s2")] == LinkSpec.symmetric(bw_mbit=7.0, delay_ms=30.0)
    bad = write(tmp_path, with_("topology", {"file": str(topo_file), "name": "ring"}), "b.yaml")
    assert "unknown topology 'ring'" in check_file(bad).message


def test_two_tier_uplink_keys(tmp_path):
    sc = load_scenario(Path(__file__).parents[1] / "scenarios" / "many_workers.yaml")
    from topologies import load_topology

    topo = load_topology("two-tier")(n_groups=2, workers_per_group=2)
    default, per = link_specs(sc.spec.links, topo.hosts(), topo.links())
    assert per[("e1", "s0")].up.bw_mbit == 50.0 and per[("e2", "s0")].up.delay_ms == 20.0
    assert default == LinkSpec.symmetric(bw_mbit=100.0, delay_ms=1.0)


def test_every_error_of_a_file_at_once(tmp_path):
    data = with_("decoding.gamma", -1)
    data["links"]["w1"]["loss_pct"] = 150
    data["network"] = {"backend": "ovs"}
    data["colour"] = "red"
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, data))
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(str(tmp_path / "s.yaml")) for line in lines)
    for field in ("decoding.gamma", "links.w1.loss_pct", "network.backend", "colour"):
        assert any(f": {field}: " in line for line in lines), field


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("name", "../../../tmp/x", r"name: must be one path component"),
        ("name", "/tmp/x", r"name: must be one path component"),
        ("decoding.temperature", float("nan"), r"decoding\.temperature: must be a finite number"),
        ("links.w1.delay_ms", float("inf"), r"links\.w1\.delay_ms: must be a finite number"),
        ("timeouts.point_s", float("inf"), r"timeouts\.point_s: must be a finite number"),
        ("timeouts.point_s", 1e9, r"timeouts\.point_s: must be <= 604800"),
        ("transmission.epsilon", 0, r"transmission\.epsilon: must be > 0"),
        (
            "network.tcp_congestion",
            "bbr; touch /tmp/x",
            r"network\.tcp_congestion: expected one of",
        ),
        ("models.weights", {"w1": float("nan"), "w2": 0.5}, r"models\.weights\.w1: must be a fin"),
    ],
)
def test_hostile_values_refused(tmp_path, path, value, match):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(with_(path, value)))
    with pytest.raises(ScenarioError, match=match):
        load_scenario(p)


def test_duplicate_keys_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text(yaml.safe_dump(BASE) + "seed: 1\nseed: 2\n")
    with pytest.raises(
        ScenarioError, match=r"dup\.yaml: line \d+, column 1: .*duplicate key 'seed'"
    ):
        load_scenario(p)


def test_field_reference_and_json_schema_are_current():
    """docs/scenario-reference.md and docs/scenario.schema.json are generated from the schema."""
    from testbed.scenario import reference

    assert reference.main(["--check"]) == 0, "run: python -m testbed.scenario.reference"
    md = reference.reference_markdown()
    for field in ("bw_mbit", "delay_ms", "max_new_tokens", "tcp_congestion", "point_s"):
        assert f"`{field}`" in md


def test_json_schema_validates_the_shipped_scenarios_shape():
    import json

    from testbed.scenario import reference

    schema = json.loads(reference.json_schema())
    assert schema["required"] == ["name", "models"]
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("models.workers.w1", "qwen2.5-coder-3b", r"models\.workers\.w1: .*qwen2\.5-coder"),
        ("models.draft", "someorg/some-model", r"models\.draft: .*hub id"),
        ("models.workers.w2", "/no/such/folder", r"models\.workers\.w2: no such file"),
        ("models.workers.w2", "tiny-v65-s3", r"models\.workers\.w2: its vocabulary \(V=65"),
    ],
)
def test_models_are_checked_at_validation(tmp_path, path, value, match):
    r = check_file(write(tmp_path, with_(path, value)))
    assert not r.ok and re.search(match, r.message), r.message


def test_peek_vocabulary_matches_the_loaded_model():
    from specfed.models import load_model, peek_vocabulary

    lm = load_model("tiny-v64-s5")
    assert peek_vocabulary("tiny-v64-s5") == (lm.vocab_size, lm.fingerprint)


def test_cli_validate_plan_version_and_exit_codes(tmp_path, capsys):
    from testbed import cli

    ok = write(tmp_path, with_("sweep", {"k": [4, 8], "transmission": ["topk"]}), "ok.yaml")
    assert cli.main(["validate", str(ok)]) == 0
    bad = write(tmp_path, with_("decoding.gamma", -1), "bad.yaml")
    assert cli.main(["validate", str(bad)]) == 2
    capsys.readouterr()
    assert cli.main(["plan", str(ok), "--repetitions", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 network group(s), 4 point runs, 4 requests" in out
    assert cli.main(["plan", str(bad)]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and "specfed-testbed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--help"])
    assert "(default: results)" in capsys.readouterr().out


def test_cli_list_shows_runs(tmp_path, capsys):
    from testbed import cli

    run = tmp_path / "results" / "demo" / "20260101T000000Z-abc"
    run.mkdir(parents=True)
    (run / "meta.json").write_text(
        '{"scenario": "demo", "git": {"short": "abcdef12", "dirty": true}, "ok": true, '
        '"finished_utc": "x", "started_utc": "2026-01-01T00:00:00"}'
    )
    (run / "requests.csv").write_text("request_id,status\na,ok\nb,error\nc,ok\n")
    assert cli.main(["list", "--out", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "abcdef12+dirty" in out and " ok " in out and " 2 " in out


def test_one_header_for_groups_of_different_sizes():
    """A sweep over the number of workers writes every group's rows under one header: the
    runner's columns cover each group's links and roles (scenarios/scale.yaml: N = 2..32)."""
    from types import SimpleNamespace

    from testbed.runner import _compute_tags, _link_tags, tag_columns
    from testbed.scenario import expand, load_scenario
    from testbed.scenario.paths import configured_specs

    sc = load_scenario(Path(__file__).parent.parent / "scenarios" / "scale.yaml")
    points = expand(sc)
    swept = list(dict.fromkeys(path for p in points for path in p.values))
    cols = tag_columns(points, swept)
    assert len(cols) == len(set(cols))
    for n in (2, 32):
        p = next(p for p in points if len(p.scenario.spec.models.workers) == n)
        workers = list(p.scenario.spec.models.workers)
        net = SimpleNamespace(links=configured_specs(p.scenario), backend="tap")
        own = {**_link_tags(net, workers), **_compute_tags({}, ["draft", *workers])}
        assert set(own) <= set(cols)
    assert "w32_up_bw_mbit" in cols and "w32_profile" in cols
