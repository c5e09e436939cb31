"""The 256-weight "K-quants" Q4_K, Q5_K and Q6_K, byte-identical to llama.cpp's reference C.

A K-quant block (a "super-block") holds 256 weights cut into sub-blocks. Every sub-block gets its own
scale (and, for Q4_K/Q5_K, its own minimum); those per-sub-block numbers are themselves quantized to
6 or 8 bits against float16 super-block scales, so a 4-bit weight costs 4.5 bits in all.

Block layouts (little-endian, fields in this order; `half` is IEEE float16):

  Q4_K, 144 bytes: half d; half dmin; uint8 scales[12]; uint8 qs[128]
      8 sub-blocks of 32 weights. Sub-block j has a 6-bit scale sc[j] and a 6-bit min m[j]:
          x = d*sc[j] * q - dmin*m[j]                 q in 0..15
      scales[12] packs the sixteen 6-bit numbers:
          bytes 0..3   sc[0..3] in bits 0-5, bits 4-5 of sc[4..7] in bits 6-7
          bytes 4..7   m[0..3]  in bits 0-5, bits 4-5 of m[4..7]  in bits 6-7
          bytes 8..11  bits 0-3 of sc[4..7] | bits 0-3 of m[4..7] << 4
      qs: the 64 weights of sub-blocks 2c and 2c+1 share 32 bytes,
          qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4   (low nibble: sub-block 2c)

  Q5_K, 176 bytes: half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]
      As Q4_K with q in 0..31: qs holds the low 4 bits exactly like Q4_K's qs, and bit j of qh[l]
      is the fifth bit of weight l of sub-block j (weight 32j + l).

  Q6_K, 210 bytes: uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d      (d comes LAST)
      16 sub-blocks of 16 weights, x = d*scales[j] * (q - 32), q in 0..63, no min.
      Each 128-weight half h owns ql[64h:64h+64] and qh[32h:32h+32]. For l < 32 and k = 0..3, weight
      128h + 32k + l keeps its low 4 bits in ql[64h + 32*(k % 2) + l] (low nibble for k < 2, high
      nibble for k >= 2) and its top 2 bits in qh[32h + l], bits 2k and 2k+1.

How the reference (quantize_row_q4_K_ref / q5_K_ref / q6_K_ref in ggml-quants.c) picks the numbers:

  Q4_K/Q5_K: every 32-weight sub-block gets a weighted least-squares fit x ~ scale*q + min
  (make_qkx2_quants: weights w = sqrt(mean(x^2)) + |x|; try 21 (Q4_K) or 16 (Q5_K) trial inverse
  scales, refit scale and min to the codes of each, keep the one with the smallest weighted squared
  error). The 8 scales and 8 mins are quantized to 6 bits against their maxima; d and dmin are
  stored as half, and the weights are re-coded against the STORED numbers.
  Q6_K: every 16-weight sub-block tries 19 trial scales of its largest-magnitude value and keeps the
  one that maximizes (sum w*x*q)^2 / sum w*q^2 with w = x^2 (make_qx_quants); the 16 scales are
  quantized to int8 against the one of largest magnitude, and the weights are re-coded.

Bit-exactness depends on following C's float32 arithmetic to the letter:
  - nearest_int(f) adds 1.5*2**23 in float32 and reads the low mantissa bits: round-half-to-even for
    |f| <= 4194303, and well-defined garbage beyond (which the clamps that follow then see).
  - sums run left to right in float32 (numpy's pairwise `sum` would not match), and every product
    keeps C's association, e.g. (w*l)*x, never w*(l*x); nothing is promoted to float64.
  - float32 -> half rounds to nearest even (numpy astype(float16)); requantization uses the stored half.
  - comparisons are strict as in C (`err < best`, running maxima with `>`: the first index wins),
    and casts wrap as in C ((uint8_t)nearest_int(...) before MIN(63, ...)).

Speed: C loops over one sub-block at a time; numpy must instead run each step of that loop over all
sub-blocks at once. The data are transposed to (32, n_subblocks) (16 rows for Q6_K), so each step of
a sequential sum adds one contiguous row across every sub-block, and blocks are processed in chunks
whose working set stays in cache. The searches remember each sub-block's winning trial parameters
rather than its codes, and recompute the codes once at the end: masked copies of (32, n) arrays
cost more in numpy than the whole trial arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import QuantType, half_bytes, half_values, split_fields

QK_K = 256

# Super-blocks per chunk: 128K weights, so one (32, 4096) float32 work array is 512 KiB and the dozen
# of them stay in or near the core's L2 cache (measured best among 128..2048).
_CHUNK_BLOCKS = 512

_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves round(f) in the mantissa
_EXACT_LIMIT = np.float32(4194303.0)  # |f| up to this, nearest_int(f) is plain round-half-even
_GROUP_MAX_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: below it a group counts as all zero

f32 = np.float32  # every constant below is cast to float32, so no operation promotes to float64


# ----------------------------------------------------------------------------- rounding and sums


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit, as int32: also for NaN, inf and |f| > 4194303."""
    bits = (np.asarray(values, dtype=f32) + _ROUND_MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _fits(*extremes: np.ndarray) -> bool:
    """True when every value lies within +-4194303, where nearest_int is plain rounding (NaN fails)."""
    return all(bool(np.all(np.abs(e) <= _EXACT_LIMIT)) for e in extremes)


def _round_clip(v: np.ndarray, lo: int, hi: int, in_range: bool) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32 codes, written over v.

    in_range (from _fits on v's extremes) allows the fast path: nearest_int is then round-half-even,
    which is monotonic, so with integer bounds clipping first gives the same codes, and np.rint
    rounds half to even in float32. Otherwise (values C would turn into garbage, NaN, inf) the
    bit-exact emulation runs.
    """
    if in_range:
        np.clip(v, lo, hi, out=v)
        np.rint(v, out=v)
    else:
        v[...] = np.clip(nearest_int(v), lo, hi)
    return v


def _seq_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum a (k, ...) array over its first axis, row 0 first, in float32: C-style loops side by side.

    from_zero: C's `float s = 0; s += t[i]` (0 + t[0]); otherwise `float s = t[0]; s += t[i]`.
    The two differ only in the sign of an all-zero sum, but each call site says which C does.
    """
    acc = terms[0] + f32(0) if from_zero else terms[0].copy()
    for row in terms[1:]:
        acc += row
    return acc


def _running_max(values: np.ndarray) -> np.ndarray:
    """C's `float m = 0; for j: if (v[j] > m) m = v[j];` over the columns of (n, k) values."""
    best = np.zeros(len(values), dtype=f32)
    for column in values.T:
        best = np.where(column > best, column, best)
    return best


def _running_absmax(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest |v|, the signed v that has it, first index winning) over columns; both 0 if none > 0."""
    best_abs = np.zeros(len(values), dtype=f32)
    best = np.zeros(len(values), dtype=f32)
    for column in values.T:
        take = np.abs(column) > best_abs
        best_abs = np.where(take, np.abs(column), best_abs)
        best = np.where(take, column, best)
    return best_abs, best


def _by_chunks(blocks: np.ndarray, type_size: int,
               quantize_chunk: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run quantize_chunk over cache-sized runs of (n, 256) blocks; C's inf/NaN arithmetic is silent."""
    blocks = np.ascontiguousarray(blocks, dtype=f32)
    out = np.empty((len(blocks), type_size), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, len(blocks), _CHUNK_BLOCKS):
            out[start:start + _CHUNK_BLOCKS] = quantize_chunk(blocks[start:start + _CHUNK_BLOCKS])
    return out


def _columns(blocks: np.ndarray, width: int) -> np.ndarray:
    """(n, 256) -> (width, n*256/width): one sub-block per column, block b's sub-blocks side by side.

    Sub-block s of block b becomes column b*(256/width) + s, so per-column results reshape to (n, 256/width).
    """
    return np.ascontiguousarray(blocks.reshape(-1, width).T)


# ----------------------------------------------------------------------------- Q4_K / Q5_K search


def _weighted_sq_err(L: np.ndarray, scale: np.ndarray, the_min: np.ndarray, X: np.ndarray, W: np.ndarray,
                     tmp: np.ndarray) -> np.ndarray:
    """sum_i w_i * ((scale*L_i + min) - x_i)^2 per column, left to right from 0 (make_qkx2's error)."""
    np.multiply(L, scale, out=tmp)
    tmp += the_min
    tmp -= X
    np.multiply(tmp, tmp, out=tmp)  # diff*diff
    tmp *= W  # w * diff
    return _seq_sum(tmp)


def _codes_qkx(X: np.ndarray, the_min: np.ndarray, iscale: np.ndarray, nmax: int,
               xmin: np.ndarray, xmax: np.ndarray, out: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) per column, into out.

    iscale*(x - min) is monotonic in x, so its extremes over a column come from xmin and xmax.
    """
    np.subtract(X, the_min, out=out)
    out *= iscale
    in_range = _fits((xmin - the_min) * iscale, (xmax - the_min) * iscale)
    return _round_clip(out, 0, nmax, in_range)


def _make_qkx2_quants(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (use_mad false) on every column of X (32, S) with weights W at once.

    Returns (scale, the_min, L): per-column float32 scale and -min, and (32, S) float32 codes.
    """
    xmin = X.min(axis=0)  # C keeps the first of equal values; only 0.0 vs -0.0 could differ, and
    xmax = X.max(axis=0)  # a signed zero in `min` changes no code and no comparison below.
    sum_w = _seq_sum(W, from_zero=False)  # float sum_w = weights[0]; sum_w += w
    sum_x = _seq_sum(W * X, from_zero=False)  # float sum_x = sum_w * x[0]; sum_x += w * x[i]
    the_min = np.minimum(xmin, f32(0))  # if (min > 0) min = 0
    flat = xmax == the_min  # if (max == min): L = 0, *the_min = -min, return 0
    flat_min = the_min.copy()

    def span() -> np.ndarray:
        # max - min with the current min; flat columns get 1 so they stay finite (they are reset at the end)
        return np.where(flat, f32(1), xmax - the_min)

    L = np.empty_like(X)
    tmp = np.empty_like(X)
    # w*l, (w*l)*x and (w*l)*l side by side, so one sequential pass over the rows makes all three sums
    products = np.empty((len(X), 3, X.shape[1]), dtype=f32)
    wl, wlx, wll = products[:, 0], products[:, 1], products[:, 2]

    iscale = f32(nmax) / span()
    scale = f32(1) / iscale
    _codes_qkx(X, the_min, iscale, nmax, xmin, xmax, out=L)
    best = _weighted_sq_err(L, scale, the_min, X, W, tmp)
    # A trial's codes are a function of the (iscale, min) it used: keep those of each column's best
    # trial and compute its codes once at the end (selecting (32, S) codes every step is slow).
    best_iscale, best_offset = iscale, the_min

    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span()  # rmin + rdelta*is + nmax
        _codes_qkx(X, the_min, iscale, nmax, xmin, xmax, out=L)
        np.multiply(W, L, out=wl)
        np.multiply(wl, X, out=wlx)
        np.multiply(wl, L, out=wll)
        sum_l, sum_xl, sum_l2 = _seq_sum(products)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive_min = this_min > 0  # if (this_min > 0) { this_min = 0; this_scale = sum_xl/sum_l2; }
        this_min = np.where(positive_min, f32(0), this_min)
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        cur_error = _weighted_sq_err(L, this_scale, this_min, X, W, tmp)
        better = (D > 0) & (cur_error < best)  # strict, as in C; NaN never wins
        best_iscale = np.where(better, iscale, best_iscale)
        best_offset = np.where(better, the_min, best_offset)  # the min these codes were made with
        best = np.where(better, cur_error, best)
        scale = np.where(better, this_scale, scale)
        the_min = np.where(better, this_min, the_min)

    _codes_qkx(X, best_offset, best_iscale, nmax, xmin, xmax, out=L)
    L[:, flat] = 0
    scale = np.where(flat, f32(0), scale)
    the_min = np.where(flat, flat_min, the_min)
    return scale, -the_min, L


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> the (n, 12) scales field of Q4_K/Q5_K (layout in the module doc)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    out[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    out[:, 8:12] = (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4
    return out


def _unpack_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 12) scales field -> (n, 8) scales and (n, 8) mins, uint8 in 0..63."""
    sc = np.empty((len(scales), 8), dtype=np.uint8)
    m = np.empty((len(scales), 8), dtype=np.uint8)
    sc[:, :4] = scales[:, 0:4] & 63
    m[:, :4] = scales[:, 4:8] & 63
    sc[:, 4:] = (scales[:, 8:12] & 0xF) | (scales[:, 0:4] >> 6) << 4
    m[:, 4:] = (scales[:, 8:12] >> 4) | (scales[:, 4:8] >> 6) << 4
    return sc, m


def _quantize_scale_min(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared part of quantize_row_q4_K_ref and _q5_K_ref on (n, 256) float32 blocks.

    Returns d and dmin (n,) float16, the (n, 12) packed scales, and (n, 8, 32) uint8 codes.
    """
    n = len(blocks)
    X = _columns(blocks, 32)
    sum_x2 = _seq_sum(X * X)  # float sum_x2 = 0; sum_x2 += x*x
    av_x = np.sqrt(sum_x2 / f32(32))  # sqrtf(sum_x2/32)
    W = av_x + np.abs(X)  # weights[l] = av_x + fabsf(x[l])
    scales, mins, L = _make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    max_scale, max_min = _running_max(scales), _running_max(mins)
    inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
    inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls): the cast to uint8 wraps before the MIN
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)

    # Re-code against the stored numbers: d = half(d)*sc, dm = half(dmin)*m; a sub-block whose d is
    # 0 keeps the codes of the search (C: `if (!d) continue;`; a NaN d is re-coded).
    dd = (d.astype(f32)[:, None] * ls.astype(f32)).reshape(-1)
    dm = (dmin.astype(f32)[:, None] * lm.astype(f32)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    V = X + dm
    V /= dd  # (x + dm)/d: a division, as in C, not a multiply by 1/d
    in_range = _fits((X.min(axis=0) + dm) / dd, (X.max(axis=0) + dm) / dd)
    np.copyto(L, _round_clip(V, 0, nmax, in_range), where=redo)
    codes = L.astype(np.uint8).T.reshape(n, 8, 32)
    return d, dmin, _pack_scale_min(ls, lm), codes


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes -> (n, 128) bytes: sub-block 2c in the low nibbles of bytes 32c..32c+31, 2c+1 high."""
    pairs = codes.reshape(len(codes), 4, 2, 32) & 0xF
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(len(codes), 128)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32) uint8 low-4-bit codes; inverse of _pack_nibbles."""
    qs = qs.reshape(len(qs), 4, 1, 32)
    return ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(len(qs), 8, 32)


def _scale_min_dequantize(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """y = (d*sc)*q - dmin*m per sub-block, in C's float32 order; q is (n, 8, 32)."""
    sc, m = _unpack_scale_min(scales)
    dl = (half_values(d) * sc.astype(f32))[:, :, None]
    ml = (half_values(dmin) * m.astype(f32))[:, :, None]
    return (dl * q.astype(f32) - ml).reshape(len(q), QK_K)


# ----------------------------------------------------------------------------- the types


class Q4_K(QuantType):
    """4.5 bits per weight: 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min.

    half d; half dmin; uint8 scales[12]; uint8 qs[128]          x = d*sc[j]*q - dmin*m[j], q in 0..15
    Search: make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1, nstep 20).
    """

    name, ggml_type, block_size, type_size = "Q4_K", 12, QK_K, 144

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, codes = _quantize_scale_min(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
        return np.concatenate([half_bytes(d), half_bytes(dmin), scales, _pack_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qs = split_fields(blocks, 2, 2, 12, 128)
        return _scale_min_dequantize(d, dmin, scales, _unpack_nibbles(qs))


class Q5_K(QuantType):
    """5.5 bits per weight: Q4_K's layout plus a fifth bit per weight in qh.

    half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]     q in 0..31
    qh[l] bit j = bit 4 of weight l of sub-block j. Search: make_qkx2_quants(31, -0.5, 0.1, 15).
    """

    name, ggml_type, block_size, type_size = "Q5_K", 13, QK_K, 176

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, codes = _quantize_scale_min(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
        high = (codes >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]  # (n, 8, 32): bit j for sub-block j
        qh = np.bitwise_or.reduce(high, axis=1)
        return np.concatenate([half_bytes(d), half_bytes(dmin), scales, qh, _pack_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qh, qs = split_fields(blocks, 2, 2, 12, 32, 128)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        return _scale_min_dequantize(d, dmin, scales, _unpack_nibbles(qs) | high << 4)


def _make_q6_quants(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, nmax 32, rmse_type 1, no weights) on every column of X (16, S) at once.

    Returns (scale (S,), codes (16, S) float32 in 0..63). An all-zero column (largest |x| below 1e-15)
    gets scale 0 and codes 0, as in C.
    """
    ax = np.abs(X)
    amax = ax.max(axis=0)
    # `if (ax > amax) { amax = ax; max = x[i]; }`: the signed value at the FIRST index reaching amax
    max_ = np.zeros_like(amax)
    for i in reversed(range(len(X))):
        max_ = np.where(ax[i] == amax, X[i], max_)
    zero = amax < _GROUP_MAX_EPS
    max_ = np.where(zero, f32(1), max_)  # keeps zero columns finite; they are reset at the end
    xmin, xmax = X.min(axis=0), X.max(axis=0)
    W = X * X  # rmse_type 1: w = x*x
    WX = W * X  # sumlx += w*x[i]*l is (w*x)*l
    # (w*x)*l and (w*l)*l side by side, so one sequential pass over the rows makes both sums
    products = np.empty((len(X), 2, X.shape[1]), dtype=f32)
    wxl, wll = products[:, 0], products[:, 1]

    L = np.empty_like(X)

    def codes(iscale: np.ndarray) -> np.ndarray:
        """MAX(-32, MIN(31, nearest_int(iscale*x))) into L; monotonic in x, so extremes come from xmin, xmax."""
        np.multiply(X, iscale, out=L)
        return _round_clip(L, -32, 31, _fits(xmin * iscale, xmax * iscale))

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes(iscale)
        np.multiply(WX, L, out=wxl)
        np.multiply(W, L, out=wll)
        np.multiply(wll, L, out=wll)
        sumlx, suml2 = _seq_sum(products)
        return sumlx, suml2

    best_iscale = f32(-32) / max_  # iscale = -nmax / max
    sumlx, suml2 = trial(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0))  # suml2 ? sumlx/suml2 : 0.0f
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(32) + f32(0.1) * f32(step)) / max_  # -(nmax + 0.1f*is)/max
        sumlx, suml2 = trial(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        # keep the winning iscale, not its (16, S) codes: they are recomputed once below
        best_iscale = np.where(take, iscale, best_iscale)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    codes(best_iscale)
    L += f32(32)
    L[:, zero] = 0
    return np.where(zero, f32(0), scale), L


class Q6_K(QuantType):
    """6.5625 bits per weight: 16 sub-blocks of 16, each with an int8 scale; no min.

    uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d      x = d*scales[j]*(q - 32), q in 0..63
    Search: make_qx_quants(16, 32, rmse_type 1) per sub-block; scales quantized by -128/max_scale.
    """

    name, ggml_type, block_size, type_size = "Q6_K", 14, QK_K, 210

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray) -> np.ndarray:
        n = len(blocks)
        X = _columns(blocks, 16)
        scales, L = _make_q6_quants(X)
        scales = scales.reshape(n, 16)
        max_abs, max_scale = _running_absmax(scales)
        zero_block = max_abs < _GROUP_MAX_EPS  # C writes an all-zero block
        iscale = f32(-128) / np.where(zero_block, f32(1), max_scale)
        d = (f32(1) / iscale).astype(np.float16)
        # int8 scales[ib] = MIN(127, nearest_int(iscale*scales[ib])); the int8 store wraps like C's
        q_scales = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)

        # Re-code against the stored d*scale; a sub-block whose d is 0 keeps its search codes.
        dd = (d.astype(f32)[:, None] * q_scales.astype(f32)).reshape(-1)
        redo = dd != 0
        dd = np.where(redo, dd, f32(1))
        V = X / dd
        in_range = _fits(X.min(axis=0) / dd, X.max(axis=0) / dd)
        recoded = _round_clip(V, -32, 31, in_range)
        recoded += f32(32)
        np.copyto(L, recoded, where=redo)

        # (n, 2 halves, 4 quarters, 32): quarter k of half h is weights 128h + 32k + l
        q = L.astype(np.uint8).T.reshape(n, 2, 4, 32)
        ql = (q[:, :, 0:2] & 0xF) | (q[:, :, 2:4] & 0xF) << 4  # (n, 2, 2, 32): bytes 64h + 32(k%2) + l
        qh = (q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
        qh = np.bitwise_or.reduce(qh, axis=2)  # (n, 2, 32): bytes 32h + l
        fields = [ql.reshape(n, 128), qh.reshape(n, 64), q_scales.view(np.uint8), half_bytes(d)]
        out = np.concatenate(fields, axis=1)
        out[zero_block] = 0
        return out

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        ql, qh, scales, d = split_fields(blocks, 128, 64, 16, 2)
        n = len(blocks)
        ql = ql.reshape(n, 2, 1, 2, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
        qh = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        q = (ql.reshape(n, 2, 4, 32) & 0xF) | (qh & 3) << 4
        q = q.reshape(n, 16, 16).astype(np.int8) - np.int8(32)
        dl = half_values(d) * np.ascontiguousarray(scales).view(np.int8).astype(f32)  # d * sc[is]
        return (dl[:, :, None] * q.astype(f32)).reshape(n, QK_K)
