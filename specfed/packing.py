"""Bit-level pieces of the compact codec format (format version 2, docs/codecs.md).

Notation: p target, V vocabulary size, K kept entries of a position, rho their kept mass,
n the entries of a whole message (sum of K over its positions).

- LEB128 varints: unsigned, 7 bits per byte, low group first, high bit set on every byte but
  the last; canonical (no redundant zero groups), at most 5 bytes, values < 2**32.
- Bit packing: unsigned integers with per-entry widths 0..32 bits, LSB first: entry m
  occupies stream bits o_m .. o_m + w_m - 1 (o_m = sum of the widths before it), stream bit
  t is bit (t mod 8) of byte t // 8; the last byte is padded with zero bits.
- Log-probability quantization: per position, code c_v = round((log p_max - log p_v) / s) in
  0..L (L = 2**bits - 1) with the scale s = (log p_max - log p_min) / L rounded up to fp16,
  and p_hat_v = rho * exp(-c_v s) / sum_u exp(-c_u s): the offset log p_max is implied by the
  kept mass rho, which is sent (fp32).

Everything works on flat arrays of entries in position order: `starts` [P] is the offset of
each position's first entry (every position has at least one). Decoders take arrays that the
caller has already sized against the message length; they raise ValueError saying what is
wrong, which the codec turns into a CodecError.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LOG_RANGE_MAX",
    "VARINT_MAX_BYTES",
    "bit_length",
    "decode_varints",
    "dequantize_log",
    "encode_varints",
    "max_delta_varint_bytes",
    "pack_bits",
    "quantize_log",
    "unpack_bits",
    "varint_sizes",
]

VARINT_MAX_BYTES = 5
"""A varint holds values < 2**32 in at most 5 bytes."""
VARINT_LIMIT = 1 << 32
MAX_WIDTH = 32
"""Widest bit-packed field."""
LOG_RANGE_MAX = 104.0
"""Largest quantized log range in nats: log(1 / smallest positive float32) = 103.3, so every
positive float32 ratio fits."""
_VARINT_STEPS = (1 << 7, 1 << 14, 1 << 21, 1 << 28)


# ---------------------------------------------------------------------------------------------
# Varints
# ---------------------------------------------------------------------------------------------


def varint_sizes(x: np.ndarray) -> np.ndarray:
    """Bytes of each value's varint, int64 [n] (1 for x < 128, ..., 5 for x >= 2**28)."""
    x = np.asarray(x, dtype=np.int64)
    size = np.ones(x.shape, dtype=np.int64)
    for step in _VARINT_STEPS:
        size += x >= step
    return size


def encode_varints(x: np.ndarray) -> bytes:
    """Values 0 <= x < 2**32 as concatenated canonical LEB128 varints."""
    x = np.asarray(x, dtype=np.int64).reshape(-1)
    if x.size == 0:
        return b""
    if int(x.min()) < 0 or int(x.max()) >= VARINT_LIMIT:
        raise ValueError(f"varint values must be in [0, 2**32), got {int(x.min())}..{x.max()}")
    size = varint_sizes(x)
    entry = np.repeat(np.arange(x.size), size)
    group = np.arange(entry.size) - np.repeat(np.cumsum(size) - size, size)
    out = (x[entry] >> (7 * group)) & 0x7F
    out |= (group < size[entry] - 1).astype(np.int64) << 7
    return out.astype(np.uint8).tobytes()


def decode_varints(buf: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """The first `count` varints of `buf` (uint8): (values int64 [count], bytes used).

    Raises ValueError when buf holds fewer than `count` complete varints, or one is longer
    than 5 bytes, non-canonical (a last byte of 0 after others) or >= 2**32.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    ends = np.flatnonzero(buf < 0x80)[:count]
    if ends.size < count:
        raise ValueError(f"truncated varints: {ends.size} complete of {count} expected")
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    length = ends - starts + 1
    if int(length.max()) > VARINT_MAX_BYTES:
        m = int(np.argmax(length > VARINT_MAX_BYTES))
        raise ValueError(f"varint {m} is {length[m]} bytes long, at most {VARINT_MAX_BYTES}")
    redundant = (length > 1) & (buf[ends] == 0)
    if redundant.any():
        raise ValueError(f"varint {int(np.argmax(redundant))} is not canonical (ends on 0x00)")
    used = int(ends[-1]) + 1
    group = np.arange(used) - np.repeat(starts, length)
    parts = (buf[:used] & 0x7F).astype(np.int64) << (7 * group)
    values = np.add.reduceat(parts, starts)
    if int(values.max()) >= VARINT_LIMIT:
        m = int(np.argmax(values >= VARINT_LIMIT))
        raise ValueError(f"varint {m} = {values[m]} is >= 2**32")
    return values, used


def max_delta_varint_bytes(k: np.ndarray | int, vocab_size: int) -> np.ndarray:
    """The most bytes the delta-varint gaps of k distinct sorted indices in [0, V) can take,
    int64 (elementwise over an array of k).

    The gaps g_m >= 0 satisfy sum_m (g_m + 1) <= V, so sum_m g_m <= V - k. A varint grows by
    a byte at 2**7, 2**14, 2**21, 2**28; the cheapest bytes are bought first (raise as many
    gaps as the budget allows to 128, then as many of those to 16,384, ...), which is optimal
    because each step costs more than the one before. Attained by such a set of gaps.
    """
    k = np.asarray(k, dtype=np.int64)
    if int(k.min()) < 1 or int(k.max()) > vocab_size:
        raise ValueError(f"need 1 <= k <= V = {vocab_size}")
    budget, total, raised, prev = vocab_size - k, k.copy(), k.copy(), 0
    for step in _VARINT_STEPS:
        raised = np.minimum(raised, budget // (step - prev))
        total += raised
        budget = budget - raised * (step - prev)
        prev = step
    return total


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def bit_length(x: np.ndarray) -> np.ndarray:
    """Bits needed for each value 0 <= x < 2**52, int64 (0 for 0)."""
    x = np.asarray(x, dtype=np.int64)
    _, exponent = np.frexp(x.astype(np.float64))
    return np.where(x > 0, exponent, 0).astype(np.int64)


def pack_bits(values: np.ndarray, widths: np.ndarray | int) -> bytes:
    """Unsigned values [n] (each < 2**width) bit-packed LSB first, padded to whole bytes."""
    values = np.asarray(values, dtype=np.uint64).reshape(-1)
    w = np.broadcast_to(np.asarray(widths, dtype=np.int64), values.shape)
    if values.size == 0:
        return b""
    if int(w.max()) > MAX_WIDTH or int(w.min()) < 0:
        raise ValueError(f"bit widths must be in 0..{MAX_WIDTH}")
    if (values >> w.astype(np.uint64)).any():
        raise ValueError("a value does not fit its bit width")
    offset = np.cumsum(w) - w
    n_bytes = (int(offset[-1] + w[-1]) + 7) // 8
    shifted = values << (offset & 7).astype(np.uint64)  # < 2**39: 5 bytes
    lanes = np.arange(5, dtype=np.uint64)
    parts = (shifted[:, None] >> (8 * lanes)) & np.uint64(0xFF)
    where = (offset >> 3)[:, None] + lanes.astype(np.int64)
    # fields never overlap, so adding the parts of a byte is OR-ing them (sums <= 255, exact)
    acc = np.bincount(where.ravel(), weights=parts.ravel().astype(np.float64), minlength=n_bytes)
    return acc[:n_bytes].astype(np.uint8).tobytes()


def unpack_bits(buf: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The inverse of `pack_bits`: uint64 [n] from buf (uint8, exactly the packed bytes).

    Raises ValueError if buf is not ceil(sum widths / 8) bytes or the padding is not zero.
    """
    w = np.asarray(widths, dtype=np.int64)
    total = int(w.sum())
    if len(buf) != (total + 7) // 8:
        raise ValueError(f"{len(buf)} bytes of packed bits, expected {(total + 7) // 8}")
    if total % 8 and int(buf[-1]) >> (total % 8):
        raise ValueError("the padding bits after the last packed field are not zero")
    if w.size == 0:
        return np.zeros(0, dtype=np.uint64)
    offset = np.cumsum(w) - w
    padded = np.zeros(len(buf) + 8, dtype=np.uint8)
    padded[: len(buf)] = buf
    words = padded[(offset >> 3)[:, None] + np.arange(8)].view("<u8").reshape(-1)
    mask = (np.uint64(1) << w.astype(np.uint64)) - np.uint64(1)
    return (words >> (offset & 7).astype(np.uint64)) & mask


# ---------------------------------------------------------------------------------------------
# Log-probability quantization
# ---------------------------------------------------------------------------------------------


def quantize_log(
    values: np.ndarray, starts: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position log-domain quantization of kept probabilities.

    Args:
        values: [n] float32 >= 0, every position's kept values (any order within a position).
        starts: [P] offset of each position's first entry (each position non-empty).
        bits: 8 or 4 (L = 2**bits - 1 levels above 0).

    Returns:
        (scale [P] float16 >= 0, codes [n] uint8 in 0..L). The row maximum gets code 0. The
        range R = log(p_max / p_min) over the positive values (capped at LOG_RANGE_MAX; a row
        of equal values has R = 0) gives s = R / L rounded up to fp16, so no positive value is
        clipped. An exact 0 gets code L; if the positive values are all equal, R is set to
        LOG_RANGE_MAX so that the 0 comes back as e**-104 times the others. An all-zero
        position gets scale 0 and codes 0 (its rho is 0).
    """
    levels = (1 << bits) - 1
    counts = np.diff(np.append(starts, values.size))
    rows = np.repeat(np.arange(starts.size), counts)
    v = values.astype(np.float64)
    vmax = np.maximum.reduceat(v, starts)
    vmin_pos = np.minimum.reduceat(np.where(v > 0, v, np.inf), starts)
    has_zero = np.minimum.reduceat(v, starts) <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_range = np.where(np.isfinite(vmin_pos), np.log(vmax) - np.log(vmin_pos), 0.0)
        log_range = np.where(has_zero & (log_range == 0) & (vmax > 0), LOG_RANGE_MAX, log_range)
        log_range = np.minimum(log_range, LOG_RANGE_MAX)
        wanted = log_range / levels
        scale = wanted.astype(np.float16)
        short = scale.astype(np.float64) < wanted
        scale[short] = np.nextafter(scale[short], np.float16(np.inf))
        s = scale.astype(np.float64)[rows]
        x = np.log(vmax[rows]) - np.log(v)  # >= 0; +inf for zeros, NaN for all-zero rows
        codes = np.where(s > 0, np.rint(x / np.where(s > 0, s, 1.0)), 0.0)
    codes = np.where(v > 0, codes, levels)
    codes = np.where(vmax[rows] > 0, codes, 0)
    return scale, np.clip(codes, 0, levels).astype(np.uint8)


def dequantize_log(
    codes: np.ndarray, scale: np.ndarray, rho: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """p_hat [n] float32: rho * exp(-c s) / sum over the position of exp(-c s).

    Every position must hold a code 0 (the caller checks), so the denominator is >= 1.
    """
    counts = np.diff(np.append(starts, codes.size))
    rows = np.repeat(np.arange(starts.size), counts)
    d = np.exp(-codes.astype(np.float64) * scale.astype(np.float64)[rows])
    norm = np.add.reduceat(d, starts)
    return (d * (rho.astype(np.float64) / norm)[rows]).astype(np.float32)
