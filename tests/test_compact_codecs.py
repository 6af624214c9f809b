"""The compact codec format (version 2): quantized values, compact indices, top-p.

Round trips, exact byte formulas (recomputed here from docs/codecs.md, independently of the
codec), tight upper bounds, the Lemma 1-style bounds with quantized values, rejection of
malformed messages, fuzzing, and the typed transmission around it (VERIFY, points, records).

Notation: p target [P, V], P positions, V vocabulary size, K kept entries, rho kept mass,
eps = 1 - rho, s a position's quantization scale, L = 2**bits - 1.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfed import packing, wire
from specfed.codecs import (
    MAX_POSITIONS,
    AdaptiveTopKCodec,
    Codec,
    CodecError,
    FullCodec,
    Payload,
    TopKCodec,
    decode_any,
    make_codec,
)
from specfed.messages import Transmission, VerifyRequest
from specfed.options import IndexCoding, Mode, ValueDtype
from specfed.points import Point, read_points, write_points
from specfed.reconstruct import RECONSTRUCTIONS, aggregate, reconstruct

DTYPES = ["fp32", "fp16", "q8", "q4"]
CODINGS = ["fixed", "bitpack", "delta-varint", "delta-bitpack"]
COMPACT = [(d, c) for d in DTYPES for c in CODINGS if not (d in ("fp32", "fp16") and c == "fixed")]
VALUE_BITS = {"fp32": 32, "fp16": 16, "q8": 8, "q4": 4}
FP16_REL = 2.0**-11


def softmax_rows(
    rng: np.random.Generator, n_pos: int, vocab: int, scale: float = 3.0
) -> np.ndarray:
    """[P, V] float32 distributions with distinct entries (no ties in the top-K)."""
    logits = rng.standard_normal((n_pos, vocab)) * scale
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def varint_len(x: int) -> int:
    n = 1
    while x >= 128:
        x >>= 7
        n += 1
    return n


def documented_size(
    codec_name: str,
    value_dtype: str,
    coding: str,
    vocab: int,
    kept: list[np.ndarray],
    index_bytes: int | None = None,
) -> int:
    """docs/codecs.md's byte formula, computed from the kept sets (independent of the codec)."""
    ks = [len(s) for s in kept]
    ib = index_bytes or next(w for w in (2, 3, 4) if vocab - 1 < 1 << (8 * w))
    if value_dtype in ("fp32", "fp16") and coding == "fixed":
        header = 16 if codec_name == "topk" else 12 + 4 * len(kept)
        return header + sum(ks) * (ib + VALUE_BITS[value_dtype] // 8)
    bits = 0
    for s, k in zip(kept, ks, strict=True):
        b = k * VALUE_BITS[value_dtype]
        b += 8 * varint_len(k) if codec_name == "adaptive" else 0
        b += 48 if value_dtype in ("q8", "q4") else 0
        gaps = np.diff(np.sort(s), prepend=-1) - 1
        if coding == "fixed":
            b += 8 * ib * k
        elif coding == "bitpack":
            b += k * math.ceil(math.log2(vocab)) if vocab > 1 else 0
        elif coding == "delta-varint":
            b += 8 * sum(varint_len(int(g)) for g in gaps)
        else:
            b += 8 + k * int(gaps.max()).bit_length()
        bits += b
    return (17 if codec_name == "topk" else 13) + math.ceil(bits / 8)


def codec_for(name: str, value_dtype: str, coding: str, k: int, epsilon: float = 0.05) -> Codec:
    if name == "topk":
        return TopKCodec(k, value_dtype=value_dtype, index_coding=coding)
    return AdaptiveTopKCodec(epsilon, k, value_dtype=value_dtype, index_coding=coding)


def quant_scale_bound(p_row: np.ndarray, idx: np.ndarray, bits: int) -> float:
    """The largest scale s the quantizer may use for this kept set: R / L rounded up to fp16."""
    v = p_row[idx].astype(np.float64)
    v = v[v > 0]
    return float(np.log(v.max() / v.min())) / (2**bits - 1) * (1 + 2.0**-10)


# ---------------------------------------------------------------------------------------------
# Round trips and sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value_dtype", "coding"), COMPACT)
@pytest.mark.parametrize("name", ["topk", "adaptive"])
@pytest.mark.parametrize(("n_pos", "vocab", "k"), [(1, 10, 1), (3, 1000, 40), (5, 151_936, 64)])
def test_round_trip_keeps_the_top_k_and_sizes_follow_the_formula(
    name: str, value_dtype: str, coding: str, n_pos: int, vocab: int, k: int
) -> None:
    rng = np.random.default_rng(vocab + k)
    p = np.concatenate([softmax_rows(rng, n_pos, vocab, scale=s) for s in (1.0, 6.0)])
    codec = codec_for(name, value_dtype, coding, k)
    data = codec.encode(p)
    assert data[0] == codec.codec_id and data[1] == 2  # format version 2
    payload = decode_any(data)
    kept = list(payload.indices)
    assert (
        len(data)
        == codec.size_of(payload)
        == documented_size(name, value_dtype, coding, vocab, kept)
    )
    assert len(data) <= codec.encoded_size(2 * n_pos, vocab)
    if name == "topk" and coding in ("fixed", "bitpack"):
        assert len(data) == codec.encoded_size(2 * n_pos, vocab)  # data-independent: exact
    for j in range(2 * n_pos):
        idx, val = payload.indices[j], payload.values[j]
        kj = len(idx)
        truth = np.argsort(-p[j].astype(np.float64), kind="stable")[:kj]
        assert set(idx.tolist()) == set(truth.tolist())
        if coding.startswith("delta"):
            assert (np.diff(idx) > 0).all(), "delta codings send ascending token ids"
        else:
            np.testing.assert_array_equal(idx, truth)  # descending probability
        exact = p[j, idx].astype(np.float64)
        if value_dtype == "fp32":
            np.testing.assert_array_equal(val, p[j, idx])
        elif value_dtype == "fp16":
            assert (np.abs(val - exact) <= np.maximum(FP16_REL * exact, 2.0**-25)).all()
        else:  # the kept mass arrives exactly (fp32); values within e**s of the truth
            rho = np.float32(np.cumsum(np.sort(exact)[::-1])[-1])
            assert payload.kept_mass[j] == pytest.approx(float(rho), rel=1e-7)
            assert float(val.sum(dtype=np.float64)) == pytest.approx(float(rho), rel=1e-6)
            s = quant_scale_bound(p[j], idx, VALUE_BITS[value_dtype])
            ratio = val.astype(np.float64) / exact
            assert (ratio <= math.exp(s) * (1 + 1e-6)).all()
            assert (ratio >= math.exp(-s) * (1 - 1e-6)).all()


@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("coding", ["delta-varint", "delta-bitpack"])
def test_delta_upper_bound_is_attained(value_dtype: str, coding: str) -> None:
    """encoded_size of a delta coding is the most any kept set can take, and a set takes it:
    delta-varint: gaps raised greedily to 128 then 16,384; delta-bitpack: one gap of V - K."""
    vocab, k, n_pos = 151_936, 64, 3
    if coding == "delta-varint":
        gaps = np.array([16_384] * 8 + [128] * 56)
    else:
        gaps = np.array([0] * (k - 1) + [vocab - k])
    worst = np.cumsum(gaps + 1) - 1
    assert worst[-1] < vocab
    p = np.full((n_pos, vocab), 1e-9, np.float32)
    p[:, worst] = np.linspace(0.5, 0.1, k, dtype=np.float32) / 20
    p /= p.sum(axis=1, keepdims=True)
    codec = TopKCodec(k, value_dtype=value_dtype, index_coding=coding)
    payload = decode_any(codec.encode(p))
    assert sorted(payload.indices[0].tolist()) == worst.tolist()
    assert len(codec.encode(p)) == codec.encoded_size(n_pos, vocab)


def test_adaptive_upper_bound_covers_every_k() -> None:
    """The adaptive bound is the maximum over K in [k_min, k_max] of every position keeping K
    (for delta-bitpack it is not at k_max when K comes near V)."""
    vocab, n_pos = 20, 2
    codec = AdaptiveTopKCodec(0.0, 20, value_dtype="q4", index_coding="delta-bitpack")
    per_k = [
        TopKCodec(k, value_dtype="q4", index_coding="delta-bitpack").encoded_size(n_pos, vocab)
        - 17
        + 13
        + n_pos * varint_len(k)  # adaptive: no u32 K, one varint K_j per position
        for k in range(1, 21)
    ]
    assert codec.encoded_size(n_pos, vocab) == max(per_k) > per_k[-1]


def test_version_1_is_unchanged_for_float_values_with_fixed_indices() -> None:
    p = softmax_rows(np.random.default_rng(1), 2, 300)
    for vd in ("fp32", "fp16"):
        data = TopKCodec(5, value_dtype=vd, index_coding="fixed").encode(p)
        assert data == TopKCodec(5, value_dtype=vd).encode(p) and data[1] == 1
        assert len(data) == 16 + 2 * 5 * (2 + VALUE_BITS[vd] // 8)


def test_fixed_index_width_is_honoured_in_version_2() -> None:
    p = softmax_rows(np.random.default_rng(2), 2, 300)
    codec = TopKCodec(5, value_dtype="q8", index_bytes=4)
    data = codec.encode(p)
    kept = list(decode_any(data).indices)
    assert data[3] == 4 and len(data) == documented_size("topk", "q8", "fixed", 300, kept, 4)
    assert len(data) == 17 + 2 * (6 + 5 * (1 + 4))


@pytest.mark.parametrize("bits_dtype", ["q8", "q4"])
def test_quantized_zero_and_flat_rows(bits_dtype: str) -> None:
    """Kept values of exactly 0 come back as (almost) 0; equal values come back exactly."""
    p = np.zeros((3, 6), np.float32)
    p[0, :3] = 1 / 3  # three equal, three zeros (K = 5 keeps two zeros)
    p[1] = 1 / 6
    p[2, 0] = 1.0
    payload = decode_any(TopKCodec(5, value_dtype=bits_dtype).encode(p))
    for j in range(3):
        np.testing.assert_allclose(payload.values[j], p[j, payload.indices[j]], atol=1e-30)


# ---------------------------------------------------------------------------------------------
# Fidelity: Lemma 1 with quantized values, top-p, aggregation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value_dtype", "coding"), COMPACT)
@pytest.mark.parametrize("method", RECONSTRUCTIONS)
def test_lemma1_style_bounds_hold(value_dtype: str, coding: str, method: str) -> None:
    """Exact (fp32) values: ||p_i - p_hat_i||_1 = 2 eps for renormalize, <= 2 eps otherwise,
    whatever the index coding. Quantized values: 2 eps <= ... (renormalize) and
    ||p_i - p_hat_i||_1 <= 2 eps + (e**s - 1) for every reconstruction, s the row's scale."""
    rng = np.random.default_rng(3)
    vocab = 2000
    p = np.concatenate([rng.dirichlet(np.full(vocab, a), 3) for a in (0.01, 0.1)]).astype(
        np.float32
    )
    q = rng.dirichlet(np.full(vocab, 0.1), 6).astype(np.float32)
    codec = TopKCodec(32, value_dtype=value_dtype, index_coding=coding)
    payload = decode_any(codec.encode(p))
    p_hat = reconstruct(payload, method, q)
    l1 = np.abs(p_hat - p.astype(np.float64)).sum(axis=1)
    eps = payload.eps
    tol = 1e-5
    for j in range(6):
        if value_dtype == "fp32":
            slack = 0.0
        elif value_dtype == "fp16":
            slack = 2 * FP16_REL
        else:
            s = quant_scale_bound(p[j], payload.indices[j], VALUE_BITS[value_dtype])
            slack = math.expm1(s)
        assert l1[j] <= 2 * eps[j] + slack + tol
        if method == "renormalize":  # eps as sent: exact for fp32 and for rho (q8, q4)
            assert l1[j] >= 2 * eps[j] - (slack if value_dtype == "fp16" else 0.0) - tol
            if value_dtype == "fp32":
                assert l1[j] == pytest.approx(2 * eps[j], abs=tol)


@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("coding", CODINGS)
def test_top_p_reaches_the_mass_on_the_wire_and_is_minimal(value_dtype: str, coding: str) -> None:
    rng = np.random.default_rng(4)
    p = np.concatenate([softmax_rows(rng, 2, 3000, scale=s) for s in (0.5, 3.0, 6.0)])
    epsilon, k_max = 0.05, 400
    codec = AdaptiveTopKCodec(epsilon, k_max, value_dtype=value_dtype, index_coding=coding)
    payload = decode_any(codec.encode(p))
    ks = payload.k_per_position
    assert ks.min() >= 1 and ks.max() <= k_max and len(set(ks.tolist())) > 2
    for j in range(6):
        if ks[j] < k_max:
            assert payload.kept_mass[j] >= 1 - epsilon
        top = np.sort(p[j].astype(np.float64))[::-1][: ks[j]]
        if ks[j] > 1 and value_dtype in ("q8", "q4"):  # minimal on the exact fp32 mass
            assert np.float32(top[:-1].sum()) < 1 - epsilon


@pytest.mark.parametrize("method", RECONSTRUCTIONS)
def test_aggregate_of_compact_payloads_equals_the_reference(method: str) -> None:
    rng = np.random.default_rng(5)
    vocab, n_pos = 500, 4
    codecs = [
        TopKCodec(20, value_dtype="q8", index_coding="delta-bitpack"),
        AdaptiveTopKCodec(0.05, 100, value_dtype="q4", index_coding="delta-varint"),
        TopKCodec(7, value_dtype="fp16", index_coding="bitpack"),
        FullCodec(),
    ]
    payloads = [
        decode_any(c.encode(softmax_rows(rng, n_pos, vocab, scale=2.0 + i)))
        for i, c in enumerate(codecs)
    ]
    w = rng.dirichlet(np.ones(len(codecs)))
    q = softmax_rows(rng, n_pos - 1, vocab)
    expected = sum(wi * reconstruct(pl, method, q) for wi, pl in zip(w, payloads, strict=True))
    np.testing.assert_allclose(aggregate(payloads, w, method, q), expected, atol=2e-7)


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transmission": "full", "value_dtype": "q8"}, "value_dtype for full"),
        ({"transmission": "full", "index_coding": "bitpack"}, "sends no indices"),
        ({"transmission": "topk", "k": 8, "index_coding": "huffman"}, "index_coding must be"),
        (
            {"transmission": "topk", "k": 8, "index_bytes": 3, "index_coding": "delta-varint"},
            "index_bytes=3 is for fixed",
        ),
        ({"transmission": "topk", "k": 8, "value_dtype": "q2"}, "value_dtype for top-K"),
    ],
)
def test_make_codec_rejects_bad_compact_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_codec(**kwargs)


@pytest.mark.parametrize(("value_dtype", "coding"), COMPACT)
def test_compact_encoders_refuse_what_decode_would_reject(value_dtype: str, coding: str) -> None:
    codec = TopKCodec(2, value_dtype=value_dtype, index_coding=coding)
    bad = np.full((2, 4), 0.25, np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="cannot encode"):
        codec.encode(bad)
    with pytest.raises(ValueError, match="cannot encode"):
        codec.encode(np.full((1, 4), 0.6, np.float32))


# ---------------------------------------------------------------------------------------------
# Malformed messages
# ---------------------------------------------------------------------------------------------


def v2_topk(
    coding: int,
    value_dtype: int,
    body: bytes,
    k: int = 2,
    n_pos: int = 1,
    vocab: int = 10,
    index_bytes: int = 0,
) -> bytes:
    """A hand-built version-2 topk message: header, u8 coding, u32 K, then `body`."""
    return (
        struct.pack("<BBBBII", 2, 2, value_dtype, index_bytes, n_pos, vocab)
        + bytes([coding])
        + struct.pack("<I", k)
    )


def q8_delta_varint(
    gaps: list[int], codes: list[int], rho: float = 0.75, scale: float = 0.5
) -> bytes:
    """topk, q8 values, delta-varint indices, one position, V = 10."""
    return (
        v2_topk(3, 3, b"", k=len(gaps))
        + np.array([rho], "<f4").tobytes()
        + np.array([scale], "<f2").tobytes()
        + bytes(codes)
        + packing.encode_varints(np.array(gaps))
    )


def test_hand_built_version_2_message_decodes() -> None:
    payload = decode_any(q8_delta_varint([2, 3], [1, 0]))  # indices 2, 6
    np.testing.assert_array_equal(payload.indices[0], [2, 6])
    e = math.exp(-0.5)
    np.testing.assert_allclose(payload.values[0], [0.75 * e / (1 + e), 0.75 / (1 + e)], rtol=1e-6)
    assert payload.kept_mass[0] == 0.75


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def small_v2_messages() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    p = softmax_rows(rng, 3, 40)
    return {
        f"{name}-{vd}-{c}": codec_for(name, vd, c, 5, epsilon=0.3).encode(p)
        for name in ("topk", "adaptive")
        for vd, c in [
            ("q8", "delta-varint"),
            ("q4", "delta-bitpack"),
            ("fp16", "bitpack"),
            ("q4", "fixed"),
            ("fp32", "delta-bitpack"),
            ("q4", "bitpack"),
        ]
    }


GOOD = q8_delta_varint([2, 3], [1, 0])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (patched(GOOD, 1, b"\x03"), "format version 3, expected 1 or 2"),
        (patched(GOOD, 2, b"\x05"), "unknown value dtype code 5"),
        (patched(GOOD, 12, b"\x09"), "unknown index coding 9 in byte 12"),
        (patched(GOOD, 3, b"\x02"), "index bytes 2 in byte 3 with delta-varint coding"),
        (
            v2_topk(1, 1, b"", index_bytes=2) + bytes(16),
            "format version 2 with fp32 values and fixed indices",
        ),
        (v2_topk(1, 3, b"", index_bytes=5), "index bytes 5"),
        (patched(GOOD, 13, struct.pack("<I", 0)), "K = 0"),
        (patched(GOOD, 13, struct.pack("<I", 11)), "K = 11"),
        (patched(GOOD, 13, struct.pack("<I", 10)), "truncated"),
        (q8_delta_varint([2, 3], [1, 0], rho=float("nan")), "rho = nan"),
        (q8_delta_varint([2, 3], [1, 0], rho=1.5), "rho = 1.5"),
        (q8_delta_varint([2, 3], [1, 0], scale=-1.0), "scale -1.0"),
        (q8_delta_varint([2, 3], [1, 0], scale=float("inf")), "scale inf"),
        (q8_delta_varint([2, 3], [1, 2]), "position 0 has no code 0"),
        (q8_delta_varint([2, 7], [1, 0]), "reach index 10"),
        (q8_delta_varint([2, 3], [1, 0]) + b"\x00", "trailing bytes"),
        (q8_delta_varint([2, 3], [1, 0])[:-1] + b"\x83\x00", "not canonical"),
        (q8_delta_varint([2, 3], [1, 0])[:-1], "index varints for 2 entries"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_malformed_version_2_messages_raise_codec_error(data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_any(data)


def test_malformed_bit_packed_sections_raise_codec_error() -> None:
    msgs = small_v2_messages()
    # delta-bitpack: a gap width above 32 (the width column follows rho and scale)
    m = msgs["topk-q4-delta-bitpack"]
    with pytest.raises(CodecError, match="gap width 33 bits at position 0"):
        decode_any(patched(m, 17 + 6 * 3, b"\x21"))
    # padding bits after the last field: 15 q4 codes + 5 gaps per position at its width
    widths = np.frombuffer(m[17 + 18 : 17 + 21], np.uint8).astype(int)
    total_bits = 15 * 4 + 5 * int(widths.sum())
    assert total_bits % 8 and len(m) == 17 + 21 + (total_bits + 7) // 8
    with pytest.raises(CodecError, match="padding bits"):
        decode_any(patched(m, len(m) - 1, bytes([m[-1] | 0x80])))
    # bitpack: a repeated index and an index >= V
    m = msgs["topk-fp16-bitpack"]  # values 3 x 5 fp16, then 15 x 6-bit indices
    start = 17 + 30
    idx = packing.unpack_bits(np.frombuffer(m[start:], np.uint8), np.full(15, 6))
    dup = idx.copy()
    dup[1] = dup[0]
    with pytest.raises(CodecError, match="repeated in position 0"):
        decode_any(m[:start] + packing.pack_bits(dup, 6))
    big = idx.copy()
    big[4] = 63
    with pytest.raises(CodecError, match="index 63 out of range"):
        decode_any(m[:start] + packing.pack_bits(big, 6))
    # adaptive K_j varints
    m = msgs["adaptive-q8-delta-varint"]
    with pytest.raises(CodecError, match="K = 0 at position 1"):
        decode_any(patched(m, 14, b"\x00"))
    with pytest.raises(CodecError, match="K_j: varint 0 is not canonical"):
        decode_any(m[:13] + b"\x85\x00" + m[14:])


@pytest.mark.parametrize("name", list(small_v2_messages()))
def test_version_2_truncation_at_every_byte_raises_codec_error(name: str) -> None:
    data = small_v2_messages()[name]
    decode_any(data)
    for n in range(len(data)):
        with pytest.raises(CodecError):
            decode_any(data[:n])
    with pytest.raises(CodecError):
        decode_any(data + b"\x00")


def v2_header_then_noise() -> st.SearchStrategy[bytes]:
    """A plausible version-2 header (small P and V, sometimes bad fields) + random body."""
    header = st.tuples(
        st.sampled_from([2, 3, 3, 1]),
        st.sampled_from([2, 2, 2, 1, 3]),
        st.sampled_from([1, 2, 3, 4, 4, 0, 5]),
        st.sampled_from([0, 0, 0, 2, 3, 4, 1]),
        st.integers(0, 4),
        st.integers(0, 70),
        st.sampled_from([1, 2, 3, 4, 4, 0, 7]),
    ).map(lambda h: struct.pack("<BBBBIIB", *h))
    return st.builds(lambda h, body: h + body, header, st.binary(max_size=300))


def mutated_v2_message() -> st.SearchStrategy[bytes]:
    msgs = list(small_v2_messages().values())
    return st.builds(
        lambda m, pos, byte, cut: (m[: pos % len(m)] + bytes([byte]) + m[pos % len(m) + 1 :])[
            : max(cut, 0) or None
        ],
        st.sampled_from(msgs),
        st.integers(0, 10_000),
        st.integers(0, 255),
        st.integers(-50, 400),
    )


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(v2_header_then_noise(), mutated_v2_message()))
def test_decode_any_on_arbitrary_version_2_bytes_raises_only_codec_error(data: bytes) -> None:
    try:
        payload = decode_any(data)
    except CodecError:
        return
    assert 1 <= payload.n_positions <= MAX_POSITIONS
    assert (payload.kept_mass <= 1.0 + 1e-3).all() and (payload.kept_mass >= 0).all()
    for idx, val in zip(payload.indices, payload.values, strict=True):
        assert len(np.unique(idx)) == len(idx) and (idx < payload.vocab_size).all()
        assert np.isfinite(val).all() and (val >= 0).all()


def test_huge_counts_in_a_short_message_are_refused_before_allocation() -> None:
    """K = V = 2**32 - 1 at P = 4096 in a few bytes: refused from the lengths alone."""
    data = struct.pack("<BBBBIIB", 2, 2, 4, 0, MAX_POSITIONS, 2**32 - 1, 4) + struct.pack(
        "<I", 2**32 - 1
    )
    with pytest.raises(CodecError, match="truncated"):
        decode_any(data + bytes(64))
    data = struct.pack("<BBBBIIB", 3, 2, 4, 0, 2, 2**32 - 1, 3) + packing.encode_varints(
        np.array([2**32 - 1, 2**32 - 1])
    )
    with pytest.raises(CodecError, match="truncated"):
        decode_any(data + bytes(64))


# ---------------------------------------------------------------------------------------------
# The typed transmission: options, VERIFY, points, records
# ---------------------------------------------------------------------------------------------


def test_option_codes_are_stable() -> None:
    assert ValueDtype.codes() == {1: "fp32", 2: "fp16", 3: "q8", 4: "q4"}
    assert IndexCoding.codes() == {
        1: "fixed",
        2: "bitpack",
        3: "delta-varint",
        4: "delta-bitpack",
    }
    assert Mode.codes() == {1: "full", 2: "topk", 3: "adaptive"}
    assert [d.bits for d in ValueDtype] == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="4 bits"):
        _ = ValueDtype.Q4.nbytes


def test_transmission_carries_the_index_coding() -> None:
    t = Transmission(Mode.TOPK, k=64, value_dtype="q8", index_coding="delta-bitpack")
    assert t.index_coding is IndexCoding.DELTA_BITPACK and t.value_dtype is ValueDtype.Q8
    assert t.codec() == TopKCodec(64, "q8", None, "delta-bitpack")
    assert t.label == "topk64:q8:delta-bitpack"
    assert t.columns() == {
        "transmission": "topk",
        "k": 64,
        "epsilon": None,
        "value_dtype": "q8",
        "index_bytes": None,
        "index_coding": "delta-bitpack",
    }
    assert t.wire_index_bytes(151_936) is None
    assert Transmission(Mode.TOPK, k=8).wire_index_bytes(151_936) == 3
    assert Transmission(Mode.TOPK, k=8, index_bytes=4).wire_index_bytes(151_936) == 4
    assert Transmission().wire_index_bytes(151_936) is None
    assert Transmission().columns()["index_coding"] == "fixed"
    # .of drops what the mode does not use; the constructor refuses it
    assert Transmission.of("full", index_coding="delta-varint") == Transmission()
    assert Transmission.of("topk", 8, index_bytes=3, index_coding="bitpack").index_bytes is None
    with pytest.raises(ValueError, match="sends no indices"):
        Transmission(Mode.FULL, index_coding="bitpack")
    with pytest.raises(ValueError, match="value_dtype for full"):
        Transmission.of("full", value_dtype="q4")
    with pytest.raises(ValueError, match="unknown index_coding 'zip'"):
        Transmission(Mode.TOPK, k=8, index_coding="zip")


@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("coding", CODINGS)
def test_verify_round_trips_every_transmission(value_dtype: str, coding: str) -> None:
    t = Transmission.of("adaptive", 256, 0.01, value_dtype, None, coding)
    req = VerifyRequest("r", 3, [1, 2, 3], 2, 1.0, t, "draft-guided", round=4)
    assert wire.decode_verify(wire.encode_verify(req), 1000) == req
    assert len(wire.frame(wire.MsgType.VERIFY, wire.encode_verify(req))) == (
        wire.verify_frame_bytes("r", 3)
    )


def test_verify_with_an_unknown_index_coding_is_malformed() -> None:
    req = VerifyRequest("r", 3, [1, 2, 3], 2, 1.0, Transmission(Mode.TOPK, k=4), "renormalize")
    body = bytearray(wire.encode_verify(req))
    coding_at = 2 + 1 + 4 + 4 + 2 + 8 + 1 + 4 + 8 + 1 + 1  # str "r", round ... index bytes
    assert body[coding_at] == 1
    body[coding_at] = 9
    with pytest.raises(wire.WireError, match="unknown IndexCoding code 9"):
        wire.decode_verify(bytes(body), 1000)
    body[coding_at] = 3  # delta-varint with index bytes 0: fine
    assert wire.decode_verify(bytes(body), 1000).transmission.index_coding == "delta-varint"


def test_points_carry_the_index_coding(tmp_path) -> None:
    pt = Point.of(
        gamma=4, temperature=1.0, mode="topk", k=64, value_dtype="q8", index_coding="delta-varint"
    )
    assert pt.columns()["index_coding"] == "delta-varint" and "q8" in pt.label
    full = Point.of(gamma=4, temperature=1.0, mode="full", index_coding="delta-varint")
    assert full.transmission.index_coding == "fixed"
    write_points(tmp_path / "p.json", [pt, full])
    assert read_points(tmp_path / "p.json") == [pt, full]


def test_per_worker_compact_transmissions_in_the_engine(tiny_family) -> None:
    """Each worker its own codec; the rows name it, and the bytes are the codec's."""
    from specfed.engine import FederatedGenerator, LocalWorker

    draft, w1, w2 = tiny_family
    tr = [
        Transmission(Mode.TOPK, k=4, value_dtype="q4", index_coding="delta-bitpack"),
        Transmission(Mode.ADAPTIVE, k=8, epsilon=0.1, value_dtype="q8", index_coding="bitpack"),
    ]
    gen = FederatedGenerator(
        draft, [LocalWorker("w1", w1), LocalWorker("w2", w2)], (0.5, 0.5), gamma=2,
        transmissions=tr, reconstruction="residual-mass",
    )  # fmt: skip
    res = gen.generate([1, 2, 3], 6, seed=0)
    for r in res.rounds:
        a, b = r.workers
        assert (a.index_coding, a.value_dtype, a.index_bytes) == ("delta-bitpack", "q4", None)
        assert (b.index_coding, b.value_dtype, b.transmission) == ("bitpack", "q8", "adaptive")
        p_count = r.n_drafted + 1
        assert 0 < a.bytes_up <= tr[0].codec().encoded_size(p_count, 8)
        assert a.bytes_up < TopKCodec(4).encoded_size(p_count, 8)  # below fp32 + u16 indices
        assert 0 < b.bytes_up <= tr[1].codec().encoded_size(p_count, 8)
        assert not math.isnan(a.local_l1) and not math.isnan(b.local_l1)


def test_payload_rho_is_checked_and_used() -> None:
    pl = Payload(
        vocab_size=5,
        indices=(np.array([1, 2]),),
        values=(np.array([0.3, 0.2], np.float32),),
        rho=np.array([0.5]),
    )
    assert pl.kept_mass.tolist() == [0.5] and pl.eps.tolist() == [0.5]
    with pytest.raises(ValueError, match="rho must be"):
        Payload(vocab_size=5, indices=(np.array([1]),), values=(np.ones(1),), rho=np.ones(2))


def test_the_documented_examples_are_byte_exact() -> None:
    """docs/codecs.md, "Format version 2", Examples."""
    p = np.zeros((2, 10), np.float32)
    p[0, [7, 2, 0, 1]] = [0.5, 0.25, 0.125, 0.125]
    p[1, [3, 4, 5, 6]] = [0.75, 0.0625, 0.0625, 0.125]
    topk = TopKCodec(2, value_dtype="q8", index_coding="delta-varint").encode(p)
    assert topk.hex(" ") == (
        "02 02 03 00 02 00 00 00 0a 00 00 00 03 02 00 00 00 "
        "00 00 40 3f 00 00 60 3f 92 19 32 1f ff 00 00 ff 02 04 03 02"
    )
    adaptive = AdaptiveTopKCodec(0.3, 4, value_dtype="q4", index_coding="delta-bitpack").encode(p)
    assert adaptive.hex(" ") == (
        "03 02 04 00 02 00 00 00 0a 00 00 00 04 02 01 "
        "00 00 40 3f 00 00 40 3f eb 29 00 00 03 02 0f 20 0e"
    )
    pl = decode_any(adaptive)
    assert [i.tolist() for i in pl.indices] == [[2, 7], [3]]
    np.testing.assert_allclose(pl.values[0], [0.2499392, 0.5000608], rtol=1e-6)
