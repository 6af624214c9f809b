"""The codec trade-off benchmark's pieces: the fast L1, the grid, the target and the curve.

Notation: p_i worker i's distribution, p_hat_i its reconstruction, K kept entries, T the
temperature.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from specfed import bench
from specfed.codecbench import (
    REFERENCE,
    codec_grid,
    evaluate_codecs,
    pareto,
    synthetic_logits,
    target,
    worker_l1,
)
from specfed.codecs import AdaptiveTopKCodec, FullCodec, TopKCodec, decode_any
from specfed.reconstruct import RECONSTRUCTIONS, reconstruct


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
def test_worker_l1_equals_the_dense_reconstruction(method: str) -> None:
    rng = np.random.default_rng(0)
    vocab = 500
    p = rng.dirichlet(np.full(vocab, 0.05), 4)
    p[3] = 0.0
    p[3, :5] = 0.2  # a position whose complement has no mass
    q = rng.dirichlet(np.full(vocab, 0.05), 3).astype(np.float32)
    q[1, :] = 0.0
    q[1, :3] = 1 / 3  # q without mass on the complement: the uniform fallback
    p32 = p.astype(np.float32)
    for codec in (
        TopKCodec(5, value_dtype="q8", index_coding="delta-varint"),
        TopKCodec(vocab),
        AdaptiveTopKCodec(0.1, 50, value_dtype="q4"),
        FullCodec("fp16"),
    ):
        pl = decode_any(codec.encode(p32))
        ref = np.abs(reconstruct(pl, method, q) - p32.astype(np.float64)).sum(axis=1)
        got = worker_l1(p32.astype(np.float64), pl, method, q)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_grid_is_every_dtype_and_coding_per_shape() -> None:
    grid = codec_grid((16, 64), (0.01,))
    assert len(grid) == (2 + 2) * 4 * 4
    assert REFERENCE in grid
    assert {t.label for t in grid} >= {"topk64:fp16", "adaptive(0.01,64):q8:delta-bitpack"}


def test_evaluate_codecs_on_synthetic_logits() -> None:
    data = synthetic_logits(n_prompts=1, positions=7, vocab=300, seed=1)
    grid = codec_grid((4, 64), (0.05,))
    rows = evaluate_codecs(data, [0.8, 1.2], grid, log=lambda _: None)
    assert len(rows) == len(grid) * 3
    by = {(r["label"], r["T"]): r for r in rows}
    for t in grid:
        for temp in (0.8, 1.2, "all"):
            r = by[(t.label, temp)]
            assert r["bytes_per_position"] > 0 and 0 <= r["eps_mean"] <= 1
            for m in RECONSTRUCTIONS:
                assert 0 <= r[f"l1_{m.value}"] <= 2 and 0 <= r[f"dalpha_{m.value}"] <= 1
        # the index coding changes the bytes, never the fidelity
        same = by[(t.label, "all")]
        fixed = next(
            by[(u.label, "all")]
            for u in grid
            if (u.mode, u.k, u.epsilon, u.value_dtype) == (t.mode, t.k, t.epsilon, t.value_dtype)
        )
        assert same["l1_renormalize"] == fixed["l1_renormalize"]
    # bytes: the 7 positions go out as messages of 5 + 2
    r = by[("topk4", "all")]
    assert r["bytes_per_position"] == pytest.approx((2 * 16 + 7 * 4 * 6) / 7)
    # renormalize sits on Lemma 1: mean L1 = 2 mean eps with exact values
    assert r["l1_renormalize"] == pytest.approx(2 * r["eps_mean"], rel=1e-6)
    # more entries, less error
    assert by[("topk64", "all")]["l1_renormalize"] < r["l1_renormalize"]


def test_target_and_pareto_on_hand_made_rows() -> None:
    def row(label: str, b: float, l1: float, temp: object = "all") -> dict:
        return {
            "label": label,
            "T": temp,
            "bytes_per_position": b,
            **{f"l1_{m.value}": l1 for m in RECONSTRUCTIONS},
        }

    rows = [
        row(REFERENCE.label, 323.2, 0.010),
        row("a", 150.0, 0.009),  # reaches it
        row("b", 100.0, 0.011),  # cheaper but worse
        row("c", 200.0, 0.005),  # better but over budget
        *[row(x, b, v, 1.0) for x, b, v in [(REFERENCE.label, 323.2, 0.01), ("a", 150, 0.012)]],
    ]
    t = target(rows, 320.0)
    assert t["budget_bytes_per_position"] == 192.0
    r = t["by_reconstruction"]["renormalize"]
    assert r["reached"] and r["smallest"]["label"] == "a"
    assert r["smallest"]["bytes_fraction_of_reference"] == pytest.approx(150 / 320)
    assert r["smallest"]["per_temperature"]["1.0"]["holds"] is False
    assert not r["reached_at_every_T"] and r["smallest_at_every_T"] is None
    assert [x["label"] for x in r["pareto"]] == ["b", "a", "c"]
    assert [x["label"] for x in pareto([x for x in rows if x["T"] == "all"], "l1_renormalize")] == [
        "b",
        "a",
        "c",
    ]
    rows[1]["l1_renormalize"] = 0.02
    assert not target(rows, 320.0)["by_reconstruction"]["renormalize"]["reached"]


def test_codecs_command_prints_json(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    argv = [
        "codecs", "--source", "synthetic", "--vocab", "300", "--prompts", "1", "--positions",
        "5", "--temperatures", "1.0", "--ks", "8,64", "--epsilons", "0.1", "--threads", "1",
        "--plot", str(tmp_path / "t.png"),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "codecs" and out["vocab_size"] == 300
    assert out["grid"]["transmissions"] == 4 * 16
    assert out["target"]["reference"] == "topk64:fp16"
    assert out["target"]["reference_entry_bytes_per_position"] == 64 * (2 + 2)
    assert set(out["target"]["by_reconstruction"]) == {m.value for m in RECONSTRUCTIONS}
    assert all(math.isfinite(r["l1_renormalize"]) for r in out["rows"])
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_round_compact_only_prints_every_compact_codec(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["round", "--compact-only", "--reps", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    labels = {t.label for t in bench.COMPACT_ROUND}
    assert "topk64:q8:delta-bitpack" in labels and "topk64" in labels
    assert set(out["targets"]["compact_round_ms_at_N4 (<= 5)"]) == labels
    assert {r["reconstruction"] for r in out["compact_server_round_N4"]} == {
        m.value for m in RECONSTRUCTIONS
    }
    by = {r["label"]: r["bytes_per_worker"] for r in out["compact_server_round_N4"]}
    assert by["topk64:q8:delta-bitpack"] < by["topk64:fp16"] < by["topk64"] == 16 + 5 * 64 * 7
