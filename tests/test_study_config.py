"""The study file's schema (specfed.study.config): the shipped file, every field's checks, all
problems of a file reported at once, duplicate keys refused, StudyConfig's flat names.

Notation: p_i worker distributions, w_i weights, q draft, K kept entries, |V| vocabulary size.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from specfed.config import ConfigError, get_path
from specfed.reconstruct import RECONSTRUCTIONS
from specfed.study import StudyConfig, load_study, study_from_dict
from specfed.study.config import _PATHS, DTYPE_NAMES, StudyConfigError
from specfed.study.grid import k_for_fraction
from tests.study_helpers import REPO, STUDY


def _write(tmp_path, data, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_study_file_loads_with_the_briefs_grid():
    cfg = load_study(STUDY)
    assert isinstance(cfg, StudyConfig)
    assert cfg.draft == "qwen2.5-coder-0.5b"
    assert cfg.workers == {"w1": "qwen2.5-coder-1.5b", "w2": "qwen2.5-coder-0.5b"}
    assert cfg.w.tolist() == [0.5, 0.5]
    assert cfg.n_prompts >= 8 and cfg.positions >= 32
    assert cfg.temperatures == (0.8, 1.0, 1.2)
    assert cfg.reconstructions == RECONSTRUCTIONS
    assert cfg.models == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]  # draft shared with w2
    ks = [k_for_fraction(f, 151_936) for f in cfg.k_fractions]
    assert ks == [15, 152, 1519, 15194, 151936]
    assert cfg.source == str(STUDY)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["models"]["weights"].update(w1=0.4), "models.weights"),
        (lambda d: d["models"].update(weights={"w1": 1.0}), "models.weights"),
        (lambda d: d["study"].update(k_fractions=[0.01, 0.0]), "study.k_fractions"),
        (lambda d: d["study"].update(temperatures=[1.0, -1]), "study.temperatures"),
        (lambda d: d["study"].update(reconstructions=["renormalise"]), "study.reconstructions"),
        (lambda d: d["generation"].update(mode="beam"), "generation.mode"),
        (lambda d: d.update(positions="32"), "positions"),
        (lambda d: d["study"].update(temperature=[1.0]), "study.temperature"),
        (lambda d: d["models"].pop("draft"), "models.draft"),
        (lambda d: d["models"].update(dtype="fp8"), "models.dtype"),
        (lambda d: d["study"].update(softmax="fp16"), "study.softmax"),
        (lambda d: d["study"].update(temperatures=[1.0, 1.0]), "study.temperatures"),
        (lambda d: d["models"]["weights"].update(w1=-0.5, w2=1.5), "models.weights.w1"),
        (lambda d: d["models"].update(threads=0), "models.threads"),
        (lambda d: d["models"]["workers"].update({"9x": "m"}), "models.workers"),
        (lambda d: d.update(name="a b"), "name"),
        (lambda d: d["generation"].update(gamma=True), "generation.gamma"),
    ],
)
def test_bad_study_names_file_and_field(tmp_path, edit, field):
    data = yaml.safe_load(STUDY.read_text())
    edit(data)
    bad = _write(tmp_path, data)
    with pytest.raises(StudyConfigError) as exc:
        load_study(bad)
    assert str(exc.value).startswith(f"{bad}: {field}:"), str(exc.value)
    assert isinstance(exc.value, ConfigError) and exc.value.source == str(bad)


def test_unknown_field_suggests_the_close_one(tmp_path):
    data = yaml.safe_load(STUDY.read_text())
    data["study"]["k_fraction"] = data["study"].pop("k_fractions")
    bad = _write(tmp_path, data, "typo.yaml")
    with pytest.raises(StudyConfigError, match=r"study\.k_fraction: unknown field; did you mean"):
        load_study(bad)
    with pytest.raises(ConfigError, match=r"did you mean study\.k_fractions\? \(expected one of"):
        load_study(bad)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    data = yaml.safe_load(STUDY.read_text())
    data["models"]["weights"] = {"w1": 0.4, "w2": 0.4}
    data["models"]["dtype"] = "fp8"
    data["prompts"]["count"] = 0
    data["generation"]["temperature"] = 0
    data["study"]["k_fractions"] = [0.01, 1.5]
    data["study"]["reconstructions"] = ["renormalise", "draft-guided"]
    data["study"]["chunk_positon"] = 8
    data["positions"] = "32"
    bad = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_study(bad)
    expected = [
        ("models.weights", "must sum to 1, sum is 0.8"),
        ("models.dtype", "expected one of bf16, fp32; got 'fp8'"),
        ("prompts.count", "must be >= 1"),
        ("positions", "expected an integer, got '32'"),
        ("generation.temperature", "must be > 0"),
        ("study.k_fractions", "must be in (0, 1], not 1.5"),
        ("study.reconstructions", "unknown reconstruction 'renormalise'"),
        ("study.chunk_positon", "did you mean study.chunk_positions?"),
    ]
    assert [p for p, _ in exc.value.problems] == [p for p, _ in expected]
    lines = str(exc.value).splitlines()
    assert len(lines) == len(expected)
    for line, (path, text) in zip(lines, expected, strict=True):
        assert line.startswith(f"{bad}: {path}: ") and text in line, line


def test_duplicate_keys_are_refused(tmp_path):
    text = STUDY.read_text().replace("positions: 32", "positions: 32\npositions: 64", 1)
    assert text.count("\npositions:") == 2
    bad = tmp_path / "dup.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_study(bad)
    msg = str(exc.value)
    assert msg.startswith(f"{bad}: line ") and "duplicate key 'positions'" in msg, msg


def test_unreadable_or_empty_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_study(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty"):
        load_study(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match=r"^x\.yaml: expected a mapping"):
        study_from_dict([1, 2], "x.yaml")


def test_defaults_and_shorthands():
    cfg = study_from_dict(
        {"models": {"draft": "d", "workers": {"a": "m1", "b": "m2", "c": "m3"}}, "prompts": "p"}
    )
    assert cfg.name == "paper-fig23" and cfg.seed == 0 and cfg.source == "<memory>"
    assert cfg.weights == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}  # equal by default
    assert cfg.prompt_source == "p" and cfg.n_prompts == 8
    assert (cfg.positions, cfg.dtype, cfg.threads) == (32, "bf16", None)
    assert (cfg.generation_mode, cfg.generation_temperature, cfg.gamma) == ("sampled", 1.0, 4)
    assert cfg.k_fractions == (0.0001, 0.001, 0.01, 0.1, 1.0)
    assert cfg.reconstructions == RECONSTRUCTIONS
    assert (cfg.softmax, cfg.chunk_positions) == ("fp64", 32)
    assert cfg.worker_names == ["a", "b", "c"] and cfg.models == ["d", "m1", "m2", "m3"]
    # a section whose fields are all commented out is its defaults
    empty = study_from_dict({"models": {"draft": "d", "workers": {"a": "m"}}, "study": None})
    assert empty.temperatures == (0.8, 1.0, 1.2)


def test_flat_names_are_the_files_fields():
    cfg = load_study(STUDY)
    data = cfg.to_dict()
    for flat, path in _PATHS.items():
        value = getattr(cfg, flat)
        assert (list(value) if isinstance(value, tuple) else value) == get_path(data, path)


def test_to_dict_round_trips_and_is_plain_yaml():
    cfg = load_study(STUDY)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # no enum objects in it
    again = study_from_dict(yaml.safe_load(text), "again.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert list(cfg.to_dict()) == [
        "name",
        "seed",
        "models",
        "prompts",
        "positions",
        "generation",
        "study",
    ]


def test_replace_validates_again_and_names_the_files_field():
    cfg = load_study(STUDY)
    small = cfg.replace(n_prompts=2, positions=4, threads=None, chunk_positions=3)
    assert (small.n_prompts, small.positions, small.threads, small.chunk_positions) == (
        2,
        4,
        None,
        3,
    )
    assert small.source == cfg.source and cfg.n_prompts == 8  # cfg itself unchanged
    with pytest.raises(ConfigError, match=rf"^{STUDY}: prompts\.count: must be >= 1"):
        cfg.replace(n_prompts=0)
    with pytest.raises(TypeError, match="n_prompt"):
        cfg.replace(n_prompt=2)


def test_dtype_names_are_the_models_dtypes():
    from specfed.models import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)


def test_loading_a_study_file_does_not_import_torch():
    code = (
        "import sys; from specfed.study.config import load_study; "
        f"load_study({str(STUDY)!r}); import specfed.study; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
