"""Transmission codecs: round trips, exact sizes, index widths, and rejection of bad messages.

Notation: p target [P, V], P positions, V vocabulary size, K kept entries, rho kept mass,
eps = 1 - rho.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfed.codecs import (
    MAX_POSITIONS,
    AdaptiveTopKCodec,
    Codec,
    CodecError,
    FullCodec,
    Payload,
    TopKCodec,
    adaptive_header_bytes,
    decode_any,
    index_bytes_for,
    make_codec,
)

VALUE_BYTES = {"fp32": 4, "fp16": 2}
FP16_REL = 2.0**-11  # half an fp16 ulp, relative, for normal numbers
FP16_SUBNORMAL_ABS = 2.0**-25  # half the fp16 subnormal spacing


def softmax_rows(
    rng: np.random.Generator, n_pos: int, vocab: int, scale: float = 3.0
) -> np.ndarray:
    """[P, V] float32 distributions with distinct entries (no ties in the top-K)."""
    logits = rng.standard_normal((n_pos, vocab)) * scale
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def true_top_k(p_row: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-p_row.astype(np.float64), kind="stable")[:k].tolist())


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_full_fp32_round_trip_is_exact() -> None:
    p = softmax_rows(np.random.default_rng(0), 5, 1000)
    payload = decode_any(FullCodec().encode(p))
    assert payload.is_dense and payload.dense is not None
    np.testing.assert_array_equal(payload.dense, p)
    assert payload.n_positions == 5 and payload.vocab_size == 1000
    np.testing.assert_allclose(payload.kept_mass, 1.0, atol=1e-6)
    np.testing.assert_array_equal(payload.k_per_position, [1000] * 5)


def test_full_fp16_round_trip_within_fp16_rounding() -> None:
    p = softmax_rows(np.random.default_rng(1), 3, 5000, scale=6.0)
    payload = decode_any(FullCodec(value_dtype="fp16").encode(p))
    assert payload.dense is not None and payload.dense.dtype == np.float32
    err = np.abs(payload.dense.astype(np.float64) - p)
    assert (err <= np.maximum(FP16_REL * p, FP16_SUBNORMAL_ABS)).all()
    # the fast fp16 conversion is IEEE round-to-nearest-even, bit for bit
    np.testing.assert_array_equal(payload.dense, p.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize(("n_pos", "vocab", "k"), [(1, 10, 1), (5, 1000, 64), (3, 70_000, 16)])
def test_topk_keeps_the_true_top_k(value_dtype: str, n_pos: int, vocab: int, k: int) -> None:
    p = softmax_rows(np.random.default_rng(vocab + k), n_pos, vocab)
    payload = decode_any(TopKCodec(k, value_dtype=value_dtype).encode(p))
    assert payload.n_positions == n_pos and payload.vocab_size == vocab
    np.testing.assert_array_equal(payload.k_per_position, [k] * n_pos)
    for j in range(n_pos):
        idx, val = payload.indices[j], payload.values[j]
        assert idx.dtype == np.int64 and val.dtype == np.float32
        assert set(idx.tolist()) == true_top_k(p[j], k)
        assert (np.diff(val) <= 0).all(), "entries must be sent in descending order"
        if value_dtype == "fp32":
            np.testing.assert_array_equal(val, p[j, idx])
        else:
            truth = p[j, idx].astype(np.float64)
            assert (np.abs(val - truth) <= np.maximum(FP16_REL * truth, FP16_SUBNORMAL_ABS)).all()
    if value_dtype == "fp32":
        expected_rho = [np.sort(p[j].astype(np.float64))[-k:].sum() for j in range(n_pos)]
        np.testing.assert_allclose(payload.kept_mass, expected_rho, rtol=1e-12)
        np.testing.assert_allclose(payload.eps, 1.0 - np.array(expected_rho), atol=1e-12)


def test_topk_k_larger_than_v_is_clamped_and_returns_everything() -> None:
    p = softmax_rows(np.random.default_rng(2), 2, 7)
    codec = TopKCodec(100)
    data = codec.encode(p)
    assert len(data) == codec.encoded_size(2, 7) == 16 + 2 * 7 * (2 + 4)
    payload = decode_any(data)
    for j in range(2):
        np.testing.assert_array_equal(np.sort(payload.indices[j]), np.arange(7))
        np.testing.assert_array_equal(payload.values[j], p[j, payload.indices[j]])


@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("k_max", [1, 8, 200])
def test_adaptive_k_is_minimal_for_the_mass_target(epsilon: float, k_max: int) -> None:
    rng = np.random.default_rng(int(epsilon * 100) + k_max)
    p = np.concatenate(
        [softmax_rows(rng, 3, 500, scale=s) for s in (0.5, 3.0, 8.0)], axis=0
    )  # flat, medium and peaked rows: K ranges from 1 to the cap
    codec = AdaptiveTopKCodec(epsilon=epsilon, k_max=k_max)
    data = codec.encode(p)
    payload = decode_any(data)
    ks = payload.k_per_position
    assert ks.min() >= 1 and ks.max() <= k_max
    assert len(data) == adaptive_header_bytes(9) + int(ks.sum()) * (2 + 4)
    assert len(data) <= codec.encoded_size(9, 500)
    target = 1.0 - epsilon
    for j in range(9):
        val = payload.values[j].astype(np.float64)
        assert set(payload.indices[j].tolist()) == true_top_k(p[j], int(ks[j]))
        if ks[j] < k_max:
            assert val.sum() >= target, f"position {j}: K={ks[j]} below the cap misses 1 - eps"
        if ks[j] > 1:
            assert val[:-1].sum() < target, f"position {j}: K={ks[j]} is not minimal"
    if epsilon == 1.0:
        np.testing.assert_array_equal(ks, 1)


def test_adaptive_respects_k_min_and_clamps_k_max_to_v() -> None:
    p = softmax_rows(np.random.default_rng(3), 2, 20, scale=10.0)  # peaked: 1 entry suffices
    payload = decode_any(AdaptiveTopKCodec(epsilon=0.5, k_max=4, k_min=3).encode(p))
    np.testing.assert_array_equal(payload.k_per_position, [3, 3])
    payload = decode_any(AdaptiveTopKCodec(epsilon=0.0, k_max=1000).encode(p))
    assert payload.k_per_position.max() <= 20


def test_adaptive_fp16_guarantees_mass_on_the_wire_values() -> None:
    p = softmax_rows(np.random.default_rng(4), 4, 3000, scale=2.0)
    payload = decode_any(AdaptiveTopKCodec(epsilon=0.2, k_max=3000, value_dtype="fp16").encode(p))
    assert (payload.kept_mass >= 0.8).all()
    for j in range(4):
        assert payload.values[j][:-1].astype(np.float64).sum() < 0.8


def test_payload_properties_for_hand_built_payloads() -> None:
    sparse = Payload(
        vocab_size=6,
        indices=(np.array([2, 0]), np.array([5])),
        values=(np.array([0.5, 0.25], np.float32), np.array([1.0], np.float32)),
    )
    assert sparse.n_positions == 2 and not sparse.is_dense
    np.testing.assert_array_equal(sparse.kept_mass, [0.75, 1.0])
    np.testing.assert_array_equal(sparse.eps, [0.25, 0.0])
    np.testing.assert_array_equal(sparse.k_per_position, [2, 1])
    with pytest.raises(ValueError, match="either dense or"):
        Payload(vocab_size=2, dense=np.ones((1, 2)), indices=(np.array([0]),))
    with pytest.raises(ValueError, match="equal length"):
        Payload(vocab_size=4, indices=(np.array([0, 1]),), values=(np.array([0.5]),))


# ---------------------------------------------------------------------------------------------
# Sizes and index widths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("index_bytes", [None, 3, 4])
@pytest.mark.parametrize(("n_pos", "vocab", "k"), [(1, 1, 1), (2, 300, 5), (5, 151_936, 64)])
def test_encoded_length_matches_the_documented_formula(
    value_dtype: str, index_bytes: int | None, n_pos: int, vocab: int, k: int
) -> None:
    p = softmax_rows(np.random.default_rng(5), n_pos, vocab)
    vb = VALUE_BYTES[value_dtype]
    ib = index_bytes if index_bytes is not None else (2 if vocab <= 65_536 else 3)
    topk = TopKCodec(k, value_dtype=value_dtype, index_bytes=index_bytes)
    assert len(topk.encode(p)) == topk.encoded_size(n_pos, vocab) == 16 + n_pos * k * (ib + vb)
    full = FullCodec(value_dtype=value_dtype)
    if vocab <= 1000:  # the big full message is covered by test_full_* and the size formula
        assert len(full.encode(p)) == 12 + n_pos * vocab * vb
    assert full.encoded_size(n_pos, vocab) == 12 + n_pos * vocab * vb
    adaptive = AdaptiveTopKCodec(
        epsilon=0.0, k_max=k, value_dtype=value_dtype, index_bytes=index_bytes
    )
    data = adaptive.encode(p)  # epsilon 0 never reaches the target: every K_j is the cap
    assert (
        len(data) == adaptive.encoded_size(n_pos, vocab) == 12 + 4 * n_pos + n_pos * k * (ib + vb)
    )


def test_default_index_width_boundaries() -> None:
    assert [index_bytes_for(v) for v in (1, 65_536, 65_537, 151_936, 2**24, 2**24 + 1)] == [
        2,
        2,
        3,
        3,
        3,
        4,
    ]
    assert TopKCodec(64).encoded_size(5, 151_936) == 16 + 5 * 64 * (3 + 4)
    assert TopKCodec(64).encoded_size(5, 2**24 + 1) == 16 + 5 * 64 * (4 + 4)


@pytest.mark.parametrize(
    ("vocab", "index_bytes", "width"),
    [(65_536, None, 2), (65_536, 2, 2), (65_537, None, 3), (151_936, None, 3), (151_936, 4, 4)],
)
def test_index_widths_carry_the_largest_index(
    vocab: int, index_bytes: int | None, width: int
) -> None:
    p = np.full((2, vocab), 0.5 / (vocab - 3), np.float32)
    p[:, [vocab - 1, vocab - 2, 0]] = [0.3, 0.15, 0.05]  # V - 1 is the top entry
    data = TopKCodec(3, index_bytes=index_bytes).encode(p)
    assert data[3] == width
    payload = decode_any(data)
    for j in range(2):
        np.testing.assert_array_equal(payload.indices[j], [vocab - 1, vocab - 2, 0])


def test_packed_u24_indices_round_trip_every_byte() -> None:
    vocab = 2**24
    rng = np.random.default_rng(6)
    idx = rng.choice(vocab, size=300, replace=False)
    idx[:3] = [0, 0xFFFFFF, 0x010203]
    values = np.full(300, 1.0 / 300, "<f4")
    data = (
        struct.pack("<BBBBIII", 2, 1, 1, 3, 1, vocab, 300)
        + values.tobytes()
        + idx.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    )
    np.testing.assert_array_equal(decode_any(data).indices[0], idx)


def test_explicit_index_width_too_small_for_v_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot address V = 65537"):
        TopKCodec(4, index_bytes=2).encode(np.full((1, 65_537), 1 / 65_537, np.float32))


# ---------------------------------------------------------------------------------------------
# Construction and encode-side validation
# ---------------------------------------------------------------------------------------------


def test_make_codec_builds_each_mode() -> None:
    assert make_codec("full") == FullCodec("fp32")
    assert make_codec("full", value_dtype="fp16") == FullCodec("fp16")
    assert make_codec("topk", k=64, index_bytes=4) == TopKCodec(64, "fp32", 4)
    assert make_codec("adaptive", epsilon=0.05, k_max=256) == AdaptiveTopKCodec(0.05, 256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transmission": "topk"}, "needs k"),
        ({"transmission": "topk", "k": 0}, "k must be an integer >= 1"),
        ({"transmission": "topk", "k": 2.5}, "k must be an integer >= 1"),
        ({"transmission": "topk", "k": 8, "epsilon": 0.1}, "takes no epsilon"),
        ({"transmission": "full", "k": 8}, "takes no k=8"),
        ({"transmission": "full", "index_bytes": 2}, "sends no indices"),
        ({"transmission": "adaptive", "epsilon": 0.1}, "needs epsilon and k_max"),
        ({"transmission": "adaptive", "k": 8, "epsilon": 0.1}, "not k=8"),
        ({"transmission": "adaptive", "epsilon": 1.5, "k_max": 8}, "epsilon must be"),
        ({"transmission": "topk", "k": 8, "value_dtype": "bf16"}, "value_dtype"),
        ({"transmission": "topk", "k": 8, "index_bytes": 1}, "index_bytes"),
        ({"transmission": "sparse"}, "unknown transmission"),
    ],
)
def test_make_codec_rejects_bad_combinations(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_codec(**kwargs)


def test_adaptive_k_min_above_k_max_is_refused() -> None:
    with pytest.raises(ValueError, match="k_min"):
        AdaptiveTopKCodec(epsilon=0.1, k_max=4, k_min=5)


@pytest.mark.parametrize("codec", [FullCodec(), TopKCodec(2), AdaptiveTopKCodec(0.1, 2)])
def test_encode_refuses_what_decode_would_reject(codec: Codec) -> None:
    with pytest.raises(ValueError, match=r"\[P, V\]"):
        codec.encode(np.full(4, 0.25, np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode(np.ones((1, 4), np.int64))
    bad = np.full((2, 4), 0.25, np.float32)
    bad[1, 2] = np.nan  # torch.topk puts NaN first, so top-K codecs see it too
    with pytest.raises(ValueError, match="cannot encode"):
        codec.encode(bad)
    with pytest.raises(ValueError, match="cannot encode"):
        codec.encode(np.full((1, 4), 0.6, np.float32))  # sums to 2.4


# ---------------------------------------------------------------------------------------------
# Malformed messages
# ---------------------------------------------------------------------------------------------


def small_messages() -> dict[str, bytes]:
    p = softmax_rows(np.random.default_rng(7), 2, 10)
    return {
        "full": FullCodec().encode(p),
        "full-fp16": FullCodec("fp16").encode(p),
        "topk": TopKCodec(3).encode(p),
        "topk-u24": TopKCodec(3, value_dtype="fp16", index_bytes=3).encode(p),
        "adaptive": AdaptiveTopKCodec(0.3, 5).encode(p),
    }


@pytest.mark.parametrize("name", list(small_messages()))
def test_truncation_at_every_byte_raises_codec_error(name: str) -> None:
    data = small_messages()[name]
    decode_any(data)  # the whole message is fine
    for n in range(len(data)):
        with pytest.raises(CodecError):
            decode_any(data[:n])
    with pytest.raises(CodecError, match="trailing bytes"):
        decode_any(data + b"\x00")


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def topk_message(indices: list[int], values: list[float], vocab: int = 10) -> bytes:
    """One position, fp32 values, u16 indices, K = len(indices)."""
    k = len(indices)
    header = struct.pack("<BBBBIII", 2, 1, 1, 2, 1, vocab, k)
    return header + np.array(values, "<f4").tobytes() + np.array(indices, "<u2").tobytes()


def test_hand_built_topk_message_decodes() -> None:
    payload = decode_any(topk_message([7, 2], [0.5, 0.25]))
    np.testing.assert_array_equal(payload.indices[0], [7, 2])
    np.testing.assert_array_equal(payload.values[0], [0.5, 0.25])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty message"),
        (b"\x09" + bytes(20), "unknown codec id 9"),
        (patched(topk_message([1], [0.5]), 1, b"\x02"), "format version 2"),
        (patched(topk_message([1], [0.5]), 2, b"\x07"), "unknown value dtype"),
        (patched(topk_message([1], [0.5]), 3, b"\x05"), "index bytes 5"),
        (patched(topk_message([1], [0.5]), 4, struct.pack("<I", 0)), "P = 0"),
        (patched(topk_message([1], [0.5]), 4, struct.pack("<I", MAX_POSITIONS + 1)), "P = 4097"),
        (patched(topk_message([1], [0.5]), 8, struct.pack("<I", 0)), "V = 0"),
        (patched(topk_message([1], [0.5]), 8, struct.pack("<I", 70_000)), "cannot address"),
        (topk_message(list(range(11)), [0.05] * 11), "K = 11"),  # K > V, length consistent
        (patched(topk_message([1], [0.5]), 12, struct.pack("<I", 0)), "K = 0"),
        (topk_message([3, 5, 3], [0.3, 0.2, 0.1]), "index 3 repeated in position 0"),
        (topk_message([3, 10], [0.3, 0.2]), "index 10 out of range"),
        (topk_message([3, 4], [0.3, float("nan")]), "value nan at position 0, entry 1"),
        (topk_message([3, 4], [0.3, float("inf")]), "value inf"),
        (topk_message([3, 4], [0.3, -0.1]), "value -0.1"),
        (topk_message([3, 4], [1.5, 0.1]), "value 1.5"),
        (topk_message([3, 4, 5], [0.6, 0.3, 0.2]), "sums to 1.1"),
        (topk_message([1], [0.5]) + b"\x00\x00", "trailing bytes"),
        (topk_message([1, 2], [0.5, 0.25])[:-1], "truncated"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_malformed_topk_messages_raise_codec_error(data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_any(data)


def test_malformed_full_and_adaptive_messages_raise_codec_error() -> None:
    msgs = small_messages()
    with pytest.raises(CodecError, match="index bytes 2 in byte 3, expected 0"):
        decode_any(patched(msgs["full"], 3, b"\x02"))
    nan_value = np.array([np.nan], "<f4").tobytes()
    with pytest.raises(CodecError, match="value nan"):
        decode_any(patched(msgs["full"], 12 + 4 * 7, nan_value))
    zero_row = np.zeros(10, "<f4").tobytes()  # a full row is a distribution
    with pytest.raises(CodecError, match=r"position 1 sums to 0\.000000"):
        decode_any(patched(msgs["full"], 12 + 40, zero_row))
    adaptive = msgs["adaptive"]
    with pytest.raises(CodecError, match="K = 0 at position 1"):
        decode_any(patched(adaptive, 16, struct.pack("<I", 0)))
    with pytest.raises(CodecError, match="K = 11 at position 0"):
        decode_any(patched(adaptive, 12, struct.pack("<I", 11)))
    k0, k1 = struct.unpack_from("<II", adaptive, 12)
    idx_start = 20 + 4 * (k0 + k1)
    dup = adaptive[idx_start + 2 * k0 : idx_start + 2 * k0 + 2]  # position 1's first index
    with pytest.raises(CodecError, match="repeated in position 1"):
        decode_any(patched(adaptive, idx_start + 2 * k0 + 2, dup))


def test_codec_decode_checks_the_codec_id() -> None:
    msgs = small_messages()
    assert TopKCodec(99).decode(msgs["topk"]).k_per_position.tolist() == [3, 3]  # self-describing
    with pytest.raises(CodecError, match=r"codec id 1 \(full\) in a message given to the topk"):
        TopKCodec(3).decode(msgs["full"])
    with pytest.raises(CodecError, match="codec id 2"):
        FullCodec().decode(msgs["topk"])
    with pytest.raises(TypeError, match="bytes-like"):
        decode_any("not bytes")  # type: ignore[arg-type]


def test_bytearray_input_is_copied_not_aliased() -> None:
    buf = bytearray(small_messages()["full"])
    payload = decode_any(buf)
    before = payload.dense.copy()  # type: ignore[union-attr]
    buf[12:16] = np.array([0.0], "<f4").tobytes()
    np.testing.assert_array_equal(payload.dense, before)


def valid_header_then_noise() -> st.SearchStrategy[bytes]:
    """A plausible header (any codec, small P and V, sometimes bad fields) + random body."""
    header = st.tuples(
        st.sampled_from([1, 2, 3]),
        st.sampled_from([1, 1, 1, 0, 2]),
        st.sampled_from([1, 2, 2, 0, 3]),
        st.sampled_from([0, 2, 3, 4, 1, 5]),
        st.integers(0, 4),
        st.integers(0, 40),
        st.integers(0, 45),
    ).map(lambda h: struct.pack("<BBBBIII", *h))
    return st.builds(lambda h, body: h + body, header, st.binary(max_size=400))


def mutated_valid_message() -> st.SearchStrategy[bytes]:
    msgs = list(small_messages().values())
    return st.builds(
        lambda m, pos, byte, cut: (m[: pos % len(m)] + bytes([byte]) + m[pos % len(m) + 1 :])[
            : max(cut, 0) or None
        ],
        st.sampled_from(msgs),
        st.integers(0, 10_000),
        st.integers(0, 255),
        st.integers(-50, 300),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), valid_header_then_noise(), mutated_valid_message()))
def test_decode_any_on_arbitrary_bytes_raises_only_codec_error(data: bytes) -> None:
    try:
        payload = decode_any(data)
    except CodecError:
        return
    # what decodes is a consistent payload
    assert 1 <= payload.n_positions <= MAX_POSITIONS
    assert (payload.kept_mass <= 1.0 + 1e-3).all()
    for idx in payload.indices:
        assert len(np.unique(idx)) == len(idx) and (idx < payload.vocab_size).all()
