"""Bit-level pieces of the compact codec format: varints, bit packing, log quantization.

Notation: V vocabulary size, K kept entries of a position, g the gaps between sorted indices,
s a position's quantization scale, L = 2**bits - 1.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfed import packing

BOUNDARIES = [0, 1, 127, 128, 16_383, 16_384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**32 - 1]


def test_varints_round_trip_at_every_size_boundary() -> None:
    x = np.array(BOUNDARIES, dtype=np.int64)
    data = packing.encode_varints(x)
    np.testing.assert_array_equal(packing.varint_sizes(x), [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    assert len(data) == int(packing.varint_sizes(x).sum())
    assert data[:4] == bytes([0x00, 0x01, 0x7F, 0x80]) and data[4] == 0x01  # 128 = 0x80 0x01
    values, used = packing.decode_varints(np.frombuffer(data + b"\x05", np.uint8), len(x))
    np.testing.assert_array_equal(values, x)
    assert used == len(data)  # the byte after the last varint is not read


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50))
def test_varints_round_trip(xs: list[int]) -> None:
    data = packing.encode_varints(np.array(xs, dtype=np.int64))
    values, used = packing.decode_varints(np.frombuffer(data, np.uint8), len(xs))
    assert values.tolist() == xs and used == len(data)


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (b"\x80\x80", 1, "truncated varints: 0 complete of 1"),
        (b"\x01\x80", 2, "truncated varints: 1 complete of 2"),
        (b"\x80\x80\x80\x80\x80\x01", 1, "6 bytes long"),
        (b"\x81\x00", 1, "not canonical"),
        (b"\xff\xff\xff\xff\x10", 1, ">= 2\\*\\*32"),
    ],
)
def test_bad_varints_are_refused(data: bytes, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        packing.decode_varints(np.frombuffer(data, np.uint8), count)


def test_varint_encoder_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="2\\*\\*32"):
        packing.encode_varints(np.array([2**32]))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        packing.encode_varints(np.array([-1]))


@pytest.mark.parametrize("vocab", [10, 200, 20_000, 151_936, 2**22, 2**32 - 1])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_max_delta_varint_bytes_matches_brute_force(vocab: int, k: int) -> None:
    """The greedy bound equals the best over every gap vector made of threshold values
    (an optimal gap is 0 or just at a varint size step: anything in between wastes budget)."""
    if k > vocab:
        return
    steps = [0, 2**7, 2**14, 2**21, 2**28]
    best = max(
        int(packing.varint_sizes(np.array(g)).sum())
        for g in itertools.product(steps, repeat=k)
        if sum(g) <= vocab - k
    )
    assert int(packing.max_delta_varint_bytes(k, vocab)) == best


def test_max_delta_varint_bytes_vectorized_and_at_qwen_v() -> None:
    ks = np.array([1, 16, 64, 256, 151_936])
    got = packing.max_delta_varint_bytes(ks, 151_936)
    assert got.tolist() == [int(packing.max_delta_varint_bytes(int(k), 151_936)) for k in ks]
    assert got[2] == 136  # K = 64: 64 gaps >= 128 and 8 of them >= 16,384
    assert got[-1] == 151_936  # K = V: every gap is 0, one byte each


def test_bit_length() -> None:
    x = np.array([0, 1, 2, 3, 4, 255, 256, 2**32 - 1, 2**32])
    assert packing.bit_length(x).tolist() == [0, 1, 2, 2, 3, 8, 9, 32, 33]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 32), min_size=1, max_size=60), st.integers(0, 2**32))
def test_pack_bits_round_trips(widths: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = np.array(widths, dtype=np.int64)
    values = (rng.integers(0, 2**32, size=w.size, dtype=np.uint64)) & (
        (np.uint64(1) << w.astype(np.uint64)) - np.uint64(1)
    )
    data = packing.pack_bits(values, w)
    assert len(data) == (int(w.sum()) + 7) // 8
    np.testing.assert_array_equal(packing.unpack_bits(np.frombuffer(data, np.uint8), w), values)


def test_pack_bits_is_lsb_first() -> None:
    # 3 (2 bits) then 1 (3 bits) then 0x1f (5 bits): bits 11 100 11111 -> 0b11100111, 0b11
    data = packing.pack_bits(np.array([3, 1, 31]), np.array([2, 3, 5]))
    assert data == bytes([0b11100111, 0b11])


def test_unpack_bits_checks_length_and_padding() -> None:
    w = np.array([3, 3])
    with pytest.raises(ValueError, match="expected 1"):
        packing.unpack_bits(np.zeros(2, np.uint8), w)
    with pytest.raises(ValueError, match="padding bits"):
        packing.unpack_bits(np.array([0b01000000], np.uint8), w)
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack_bits(np.array([8]), 3)


def test_quantize_log_levels_and_relative_error() -> None:
    """Code 0 at each position's maximum; dequantized ratios to the maximum within e**(s/2)
    before the common renormalization; rows with equal values and all-zero rows."""
    rng = np.random.default_rng(0)
    v = np.concatenate(
        [rng.dirichlet(np.ones(50) * 0.2), [0.25, 0.25, 0.25], [0.0, 0.0], [0.5, 0.0]]
    ).astype(np.float32)
    starts = np.array([0, 50, 53, 55])
    for bits in (8, 4):
        scale, codes = packing.quantize_log(v, starts, bits)
        levels = 2**bits - 1
        assert codes.max() <= levels
        assert codes[0:50][np.argmax(v[:50])] == 0
        s = float(scale[0])
        logs = np.log(v[:50].astype(np.float64))
        assert s * levels >= logs.max() - logs[v[:50] > 0].min()  # no positive value clipped
        recon = logs.max() - codes[:50] * s
        assert np.abs(recon - logs).max() <= s / 2 + 1e-12
        assert codes[50:53].tolist() == [0, 0, 0] and scale[1] == 0  # equal values: exact
        assert codes[53:55].tolist() == [0, 0] and scale[2] == 0  # all zero: rho carries it
        assert codes[55:57].tolist() == [0, levels]  # an exact 0 -> the last level
        rho = np.array([v[:50].sum(), 0.75, 0.0, 0.5], np.float32)
        p_hat = packing.dequantize_log(codes, scale, rho, starts)
        np.testing.assert_allclose(
            [p_hat[a:b].sum(dtype=np.float64) for a, b in [(0, 50), (50, 53), (53, 55), (55, 57)]],
            rho,
            rtol=1e-6,
        )
        assert p_hat[56] < 1e-30 * p_hat[55]  # the 0 comes back as e**-104 of its neighbour
