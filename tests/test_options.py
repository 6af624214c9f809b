"""The vocabulary of options: every wire code is pinned to docs/wire-protocol.md, so a
reorder or renumbering of an enum fails here, not silently on the wire."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from specfed import wire
from specfed.codecs import CODEC_IDS
from specfed.options import (
    IndexCoding,
    LossPolicy,
    Mode,
    Reconstruction,
    ValueDtype,
    check_weights,
)

DOC = Path(__file__).parents[1] / "docs" / "wire-protocol.md"
OPTIONS = {
    "transmission mode": Mode,
    "reconstruction": Reconstruction,
    "value dtype": ValueDtype,
    "index coding": IndexCoding,
}


def documented_codes() -> dict[str, dict[str, int]]:
    """{option: {name: code}} from the docs' "Option codes" table."""
    section = DOC.read_text().split("## Option codes", 1)[1].split("\n## ", 1)[0]
    out: dict[str, dict[str, int]] = {}
    for option, name, code in re.findall(
        r"^\| ([a-z ]+) \| ([a-z0-9-]+) \| (\d+) \|$", section, re.M
    ):
        out.setdefault(option, {})[name] = int(code)
    return out


def test_every_code_matches_the_docs():
    docs = documented_codes()
    assert set(docs) == set(OPTIONS)
    for option, enum in OPTIONS.items():
        assert docs[option] == {m.value: m.code for m in enum}, option


def test_codes_are_unique_and_round_trip():
    for enum in OPTIONS.values():
        codes = [m.code for m in enum]
        assert len(set(codes)) == len(codes) and 0 not in codes  # 0 is "none" on the wire
        for m in enum:
            assert enum.from_code(m.code) is m and enum(m.value) is m
        with pytest.raises(ValueError, match="unknown"):
            enum.from_code(99)


def test_codec_ids_are_the_mode_codes():
    assert {m.code: m.value for m in Mode} == CODEC_IDS


def test_error_codes_match_the_docs():
    section = DOC.read_text().split("ERROR codes:", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", section, re.M))
    assert {int(k): v for k, v in rows.items()} == {c.value: c.name for c in wire.ErrorCode}


def test_parse_names_the_choices():
    assert Mode.parse("topk") is Mode.TOPK
    with pytest.raises(ValueError, match="unknown --transmission 'zip'; use one of full"):
        Mode.parse("zip", "--transmission")
    assert LossPolicy("continue") is LossPolicy.CONTINUE


@pytest.mark.parametrize(
    ("weights", "n", "match"),
    [
        ([0.5], 2, "one weight per worker"),
        ([0.7, 0.7], 2, "sum to 1"),
        ([float("nan"), 1], 2, "finite"),
        ([-0.5, 1.5], 2, "finite and >= 0"),
        (["x", 1], 2, "numbers"),
    ],
)
def test_check_weights(weights, n, match):
    with pytest.raises(ValueError, match=match):
        check_weights(weights, n)
    assert check_weights([0.25, 0.75], 2) == [0.25, 0.75]
