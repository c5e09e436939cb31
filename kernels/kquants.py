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

With an importance matrix (llama-quantize --imatrix: quantize_row_q4_K_impl / _q5_K_impl / _q6_K_impl)
the layouts are the same and the searches change: Q4_K/Q5_K weight each x by importance *
sqrt(sigma2 + x^2), sigma2 = 2*mean(x^2) over the super-block, fit sub-blocks with 37 trial scales,
and quantize the 8 scales and 8 mins with make_qp_quants (a weighted fit of their own) rather than
against their maxima; Q6_K weights make_qx_quants by the importance itself.

search="thorough" (_search_scale_min_thoroughly, _search_q6_k_thoroughly; legacy.py's for the 32-weight
quants) writes the same layouts from a search judged by the error of the stored block, never worse
than the reference on any block.

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

import functools
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


def _by_chunks(blocks: np.ndarray, type_size: int, quantize_chunk: Callable[..., np.ndarray],
               weights: np.ndarray | None = None) -> np.ndarray:
    """Run quantize_chunk over cache-sized runs of (n, block_size) blocks; C's inf/NaN arithmetic is silent.

    weights: a per-weight array shaped like blocks (an importance), cut alongside and passed as
    quantize_chunk(blocks, weights). A run holds _CHUNK_BLOCKS * 256 weights, whatever the block size.
    """
    blocks = np.ascontiguousarray(blocks, dtype=f32)
    step = max(1, _CHUNK_BLOCKS * QK_K // blocks.shape[1])
    out = np.empty((len(blocks), type_size), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, len(blocks), step):
            run = slice(start, start + step)
            args = (blocks[run],) if weights is None else (blocks[run], weights[run])
            out[run] = quantize_chunk(*args)
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

    Given weights, make_qkx3_quants (the imatrix paths) is the same arithmetic: only its `max <= min`
    test differs from `max == min`, and max >= min always holds once min is clamped to <= 0.

    Returns (scale, the_min, L): per-column float32 scale and -min, and (32, S) float32 codes.
    """
    xmin, xmax = X.min(axis=0), X.max(axis=0)
    sum_w = _seq_sum(W, from_zero=False)  # float sum_w = weights[0]; sum_w += w
    sum_x = _seq_sum(W * X, from_zero=False)  # float sum_x = sum_w * x[0]; sum_x += w * x[i]
    the_min = np.where(xmin > 0, f32(0), xmin)  # if (min > 0) min = 0
    # C's min is the FIRST of equal minima: a zero minimum keeps the sign of the first zero, which
    # Q4_1/Q5_1 store as m when no trial beats the first guess.
    zero_min = np.flatnonzero(xmin == 0)
    if zero_min.size:
        zeros = X[:, zero_min]
        the_min[zero_min] = zeros[(zeros == 0).argmax(axis=0), np.arange(zero_min.size)]
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


def _scale_min_weights(blocks: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) blocks -> their sub-block columns X (32, 8n) and the weights W that Q4_K/Q5_K's search
    minimises: av_x + |x| with av_x the sub-block's root mean square (the reference), or, given the
    (n, 256) importance, importance * sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2) over the super-block."""
    X = _columns(blocks, 32)
    if importance is None:
        sum_x2 = _seq_sum(X * X)  # float sum_x2 = 0; sum_x2 += x*x
        av_x = np.sqrt(sum_x2 / f32(32))  # sqrtf(sum_x2/32)
        return X, av_x + np.abs(X)  # weights[l] = av_x + fabsf(x[l])
    sum_x2 = _seq_sum(np.square(np.ascontiguousarray(blocks.T)))  # all 256 weights, left to right
    sigma2 = f32(2) * sum_x2 / f32(QK_K)
    return X, _columns(importance, 32) * np.sqrt(np.repeat(sigma2, 8) + X * X)


def _quantize_scale_min(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared part of quantize_row_q4_K_ref and _q5_K_ref on (n, 256) float32 blocks.

    Returns d and dmin (n,) float16, the (n, 12) packed scales, and (n, 8, 32) uint8 codes.
    """
    n = len(blocks)
    X, W = _scale_min_weights(blocks)
    scales, mins, L = _make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    max_scale, max_min = _running_max(scales), _running_max(mins)
    inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
    inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls): the cast to uint8 wraps before the MIN
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
    return _store_scale_min(X, L, max_scale / f32(63), max_min / f32(63), ls, lm, nmax)


def _quantize_scale_min_weighted(blocks: np.ndarray, importance: np.ndarray, nmax: int, cap_codes: bool
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_K_impl / _q5_K_impl: what llama-quantize runs when given an imatrix.

    Each weight counts importance * sqrt(sigma2 + x^2) (_scale_min_weights); sub-blocks are fitted
    by make_qkx3_quants (37 trial scales from rmin -0.9 in steps of 0.05), and the 8 scales and 8
    mins are each quantized by make_qp_quants, weighted by every sub-block's total weight, instead of
    against their maxima. importance is (n, 256) like blocks.
    cap_codes: q5_K_impl caps the 6-bit codes with MIN(63, .), q4_K_impl does not; they differ only
    when a degenerate sub-block fit gives a negative scale, whose code wraps as a uint8.
    """
    n = len(blocks)
    X, W = _scale_min_weights(blocks, importance)
    sub_block_weight = _seq_sum(W).reshape(n, 8)
    scales, mins, L = _make_qkx2_quants(X, W, nmax, rmin=-0.9, rdelta=0.05, nstep=36)
    d, ls = _make_qp_quants(scales.reshape(n, 8), sub_block_weight, nmax=63)
    dmin, lm = _make_qp_quants(mins.reshape(n, 8), sub_block_weight, nmax=63)
    if cap_codes:
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    return _store_scale_min(X, L, d, dmin, ls, lm, nmax)


def _store_scale_min(X: np.ndarray, L: np.ndarray, d: np.ndarray, dmin: np.ndarray, ls: np.ndarray,
                     lm: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Store d, dmin (n,) as half and the (n, 8) 6-bit codes ls, lm packed, then re-code the weights
    X (32, 8n) against the STORED numbers, overwriting the search's codes L.

    Returns d and dmin (n,) float16, the (n, 12) packed scales, and (n, 8, 32) uint8 codes.
    """
    n = len(ls)
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    packed = _pack_scale_min(ls, lm)
    sc, m = _unpack_scale_min(packed)  # what C reads back (get_scale_min_k4)

    # d = half(d)*sc, dm = half(dmin)*m; a sub-block whose d is 0 keeps the codes of the search
    # (C: `if (!d) continue;`; a NaN d is re-coded).
    dd = (d.astype(f32)[:, None] * sc.astype(f32)).reshape(-1)
    dm = (dmin.astype(f32)[:, None] * m.astype(f32)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    V = X + dm
    V /= dd  # (x + dm)/d: a division, as in C, not a multiply by 1/d
    in_range = _fits((X.min(axis=0) + dm) / dd, (X.max(axis=0) + dm) / dd)
    np.copyto(L, _round_clip(V, 0, nmax, in_range), where=redo)
    codes = L.astype(np.uint8).T.reshape(n, 8, 32)
    return d, dmin, packed, codes


def _make_qp_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants on every row of (n, k) non-negative x with weights w: one scale per row for
    codes 0..nmax, from 9 trial scales, then refined one code at a time (5 passes).

    Returns (scale (n,), codes (n, k) uint8). The codes are C's uint8 stores: a negative x (only from
    a degenerate fit) wraps, and the refinement then reads the wrapped code back, as C does.
    """
    largest = np.zeros(len(x), dtype=f32)
    for column in x.T:
        largest = np.where(largest > column, largest, column)  # max = MAX(max, x[i])
    zero = largest < _GROUP_MAX_EPS  # C: all codes 0, scale 0
    largest = np.where(zero, f32(1), largest)  # keeps all-zero rows finite; they are reset at the end

    def weighted_sq_err(scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
        diff = x - scale[:, None] * codes
        return _seq_sum(((w * diff) * diff).T)  # mse += w*diff*diff

    iscale = f32(nmax) / largest
    first = nearest_int(iscale[:, None] * x) & 0xFF  # stored unclamped into uint8 L
    best = weighted_sq_err(f32(1) / iscale, first.astype(f32))
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (f32(0.1) * f32(step) + f32(nmax)) / largest
        codes = np.minimum(nmax, nearest_int(trial[:, None] * x)).astype(f32)
        err = weighted_sq_err(f32(1) / trial, codes)
        better = err < best
        best = np.where(better, err, best)
        iscale = np.where(better, trial, iscale)

    codes = np.minimum(nmax, nearest_int(iscale[:, None] * x))
    l = codes.astype(f32)
    wx = w * x
    sumlx = _seq_sum((wx * l).T)  # sumlx += w*x[i]*l, with the int l
    suml2 = _seq_sum(((w * l) * l).T)
    L = (codes & 0xFF).astype(f32)
    # C stops early after a pass that changes nothing; the passes after it would change nothing either.
    for _ in range(5):
        for i in range(x.shape[1]):
            slx = sumlx - wx[:, i] * L[:, i]
            sl2 = suml2 - (w[:, i] * L[:, i]) * L[:, i]
            new_code = np.minimum(nmax, nearest_int(x[:, i] * sl2 / slx))
            new = new_code.astype(f32)
            new_slx = slx + wx[:, i] * new
            new_sl2 = sl2 + (w[:, i] * new) * new
            take = ((slx > 0) & (sl2 > 0) & (new != L[:, i])
                    & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2))
            L[:, i] = np.where(take, new_code & 0xFF, L[:, i])
            sumlx = np.where(take, new_slx, sumlx)
            suml2 = np.where(take, new_sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    return np.where(zero, f32(0), scale), np.where(zero[:, None], 0, L).astype(np.uint8)


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


# ----------------------------------------------------------------------------- search="thorough"

# The thorough search: 41 trial inverse scales (nmax-1 .. nmax+1)/(max-min) per sub-block, twice as
# fine as the reference's; 6-bit codes within _CODE_RADIUS of the rounded fit; d nudged by these
# factors at the start; _SUPER_ROUNDS least-squares refits of (d, dmin). Least-squares refits of each
# sub-block's own (scale, min) were tried and bought under 0.2% of error, so they are left out.
_THOROUGH_GRID = {"rmin": -1.0, "rdelta": 0.05, "nstep": 40}
_CODE_RADIUS = 2
_D_NUDGES = (0.99, 1.01)
_SUPER_ROUNDS = 3


def _search_scale_min_thoroughly(blocks: np.ndarray, importance: np.ndarray | None, nmax: int,
                                 reference: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """search="thorough" for Q4_K/Q5_K: the same block layout, with lower weighted error.

    The reference fixes each sub-block's (scale, min) first and only then rounds them to 6-bit codes
    against d = largest/63, so the numbers it stores are not the ones it optimised. Here every
    candidate is judged by the error of the STORED block (half d and dmin, 6-bit sc and m, and the
    codes nearest to each weight), with the weights the reference minimises (_scale_min_weights):
      1. fit each sub-block's (scale, min) as the reference does, on a finer grid;
      2. d, dmin = largest/63 as the reference (and d nudged by -1%, +1%); each sub-block picks its
         (sc, m) among the codes within _CODE_RADIUS of its rounded fit, by that exact error;
      3. alternate: refit (d, dmin) by least squares given all the integer codes, round to half,
         re-pick (sc, m) and with them the weight codes; keep it where the super-block's error falls;
      4. keep the reference block wherever it is at least as good, so no block gets worse.
    reference: (d, dmin, scales, codes) as _store_scale_min returns them, as is the result.
    """
    n = len(blocks)
    X, W = _scale_min_weights(blocks, importance)
    scale, offset, _ = _make_qkx2_quants(X, W, nmax, **_THOROUGH_GRID)
    start = (_running_max(scale.reshape(n, 8)) / f32(63), _running_max(offset.reshape(n, 8)) / f32(63))
    (d, dmin), (ls, lm) = _alternate(
        pick=lambda d, dmin: _pick_sub_block_codes(X, W, scale, offset, d, dmin, nmax),
        refit=lambda codes, d, dmin: _refit_super_block(X, W, *codes, d, dmin, nmax),
        start=start)
    thorough = _store_scale_min(X, np.zeros_like(X), d, dmin, ls, lm, nmax)

    Wb = W.T.reshape(n, QK_K)
    keep = _stored_block_error(blocks, Wb, thorough) < _stored_block_error(blocks, Wb, reference)
    return tuple(np.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, b) for a, b in zip(thorough, reference))


def _alternate(pick: Callable[..., tuple[np.ndarray, tuple[np.ndarray, ...]]],
               refit: Callable[..., tuple[np.ndarray, ...]],
               start: tuple[np.ndarray, ...]) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The loop every thorough search shares (here and in legacy.py), over the (n,) per-block scales
    (d, and dmin or m if any).

    pick(*scales) -> ((n,) error, per-sub-block codes (n, k) each): the best sub-block codes for the
    stored scales. refit(codes, *scales) -> scales fitted to those codes by least squares. Starting
    from `start` and d nudged by _D_NUDGES, then _SUPER_ROUNDS refits, a candidate replaces the
    current scales of each super-block whose error it lowers. Returns (scales, codes).
    """
    best = start
    best_err, codes = pick(*best)
    candidates = [(best[0] * f32(nudge),) + best[1:] for nudge in _D_NUDGES]
    for _ in range(_SUPER_ROUNDS):
        candidates.append(refit(codes, *best))
        for candidate in candidates:
            err, new_codes = pick(*candidate)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = tuple(np.where(better, new, old) for new, old in zip(candidate, best))
            codes = tuple(np.where(better[:, None], new, old) for new, old in zip(new_codes, codes))
        candidates = []
    return best, codes


def _codes_and_error(X: np.ndarray, W: np.ndarray, scale: np.ndarray, offset: np.ndarray, nmax: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per column: sum w*(y - x)^2 with y = scale*q - offset, q the nearest code in 0..nmax; and q.
    A zero scale decodes every weight to -offset (q = 0)."""
    codes = X + offset
    codes /= np.where(scale != 0, scale, f32(1))
    np.clip(codes, 0, nmax, out=codes)
    np.rint(codes, out=codes)
    codes *= scale != 0
    diff = codes * scale
    diff -= offset
    diff -= X
    diff *= diff
    diff *= W
    return diff.sum(axis=0), codes


def _pick_sub_block_codes(X: np.ndarray, W: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                          d: np.ndarray, dmin: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Given float32 d, dmin (n,) (stored as half), each sub-block's best 6-bit (sc, m) within
    _CODE_RADIUS of round(scale/d), round(offset/dmin). Returns the (n,) error of each super-block
    and the (n, 8) sc and m."""
    n = len(d)
    d_stored = np.repeat(d.astype(np.float16).astype(f32), 8)
    dmin_stored = np.repeat(dmin.astype(np.float16).astype(f32), 8)
    sc0 = np.rint(np.where(d_stored > 0, scale / np.where(d_stored > 0, d_stored, f32(1)), f32(0)))
    m0 = np.rint(np.where(dmin_stored > 0, offset / np.where(dmin_stored > 0, dmin_stored, f32(1)), f32(0)))
    best = np.full(X.shape[1], np.inf, dtype=f32)
    best_sc, best_m = sc0, m0
    steps = range(-_CODE_RADIUS, _CODE_RADIUS + 1)
    for dsc in steps:
        sc = np.clip(sc0 + dsc, 0, 63)
        for dm in steps:
            m = np.clip(m0 + dm, 0, 63)
            err, _ = _codes_and_error(X, W, d_stored * sc, dmin_stored * m, nmax)
            better = err < best
            best = np.where(better, err, best)
            best_sc, best_m = np.where(better, sc, best_sc), np.where(better, m, best_m)
    return best.reshape(n, 8).sum(axis=1), (best_sc.reshape(n, 8).astype(np.int32),
                                            best_m.reshape(n, 8).astype(np.int32))


def _refit_super_block(X: np.ndarray, W: np.ndarray, ls: np.ndarray, lm: np.ndarray, d: np.ndarray,
                       dmin: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (d, dmin) of each super-block, x ~ d*a - dmin*m with a = sc*q, given the 6-bit
    codes and the weight codes they give with the current (d, dmin); sums in float64. Where the fit
    is degenerate or leaves the format's signs (d > 0, dmin >= 0), the current numbers stay."""
    n = len(d)
    sc, m = ls.reshape(-1).astype(f32), lm.reshape(-1).astype(f32)
    d_stored = np.repeat(d.astype(np.float16).astype(f32), 8)
    dmin_stored = np.repeat(dmin.astype(np.float16).astype(f32), 8)
    _, codes = _codes_and_error(X, W, d_stored * sc, dmin_stored * m, nmax)
    a = sc * codes
    wa = W * a
    # per sub-block sums; m is constant within one, so the sums with m factor it out
    sw, swa, swaa, swx, swax = (v.sum(axis=0, dtype=np.float64) for v in (W, wa, wa * a, W * X, wa * X))
    m = m.astype(np.float64)

    def total(v: np.ndarray) -> np.ndarray:
        return v.reshape(n, 8).sum(axis=1)

    saa, sab, sbb = total(swaa), total(m * swa), total(m * m * sw)
    sax, sbx = total(swax), total(m * swx)
    det = saa * sbb - sab * sab
    new_d = ((sax * sbb - sab * sbx) / det).astype(f32)
    new_dmin = ((sab * sax - saa * sbx) / det).astype(f32)
    ok = (det > 0) & np.isfinite(new_d) & np.isfinite(new_dmin) & (new_d > 0) & (new_dmin >= 0)
    return np.where(ok, new_d, d), np.where(ok, new_dmin, dmin)


def _stored_block_error(blocks: np.ndarray, weights: np.ndarray, fields: tuple[np.ndarray, ...]) -> np.ndarray:
    """(n,) float64 sum of w*(x - decoded)^2 per super-block, decoding exactly as llama.cpp does."""
    d, dmin, scales, codes = fields
    decoded = _scale_min_dequantize(half_bytes(d), half_bytes(dmin), scales, codes).astype(np.float64)
    return (weights.astype(np.float64) * (blocks - decoded) ** 2).sum(axis=1)


# ----------------------------------------------------------------------------- the types


class _KQuant(QuantType):
    """A K-quant: its `_quantize_chunk(blocks, importance=None)` encodes a cache-sized run of
    (n, 256) super-blocks, given their (n, 256) slice of the imatrix or None; a type with a thorough
    search also takes `thorough=True`."""

    block_size = QK_K

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _by_chunks(blocks, cls.type_size, cls._quantize_chunk)

    @classmethod
    def quantize_rows(cls, rows: np.ndarray, importance: np.ndarray | None = None,
                      search: str = "reference") -> np.ndarray:
        quantize_chunk = cls._quantize_chunk
        if search == "thorough" and "thorough" in cls.searches:
            quantize_chunk = functools.partial(quantize_chunk, thorough=True)
        per_weight = None if importance is None else np.broadcast_to(importance, rows.shape).reshape(-1, QK_K)
        return _by_chunks(rows.reshape(-1, QK_K), cls.type_size, quantize_chunk, per_weight).reshape(len(rows), -1)


class Q4_K(_KQuant):
    """4.5 bits per weight: 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min.

    half d; half dmin; uint8 scales[12]; uint8 qs[128]          x = d*sc[j]*q - dmin*m[j], q in 0..15
    Search: make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1, nstep 20); with an imatrix,
    quantize_row_q4_K_impl's make_qkx3_quants + make_qp_quants (_quantize_scale_min_weighted).
    """

    name, ggml_type, type_size = "Q4_K", 12, 144
    searches = ("reference", "thorough")

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, importance: np.ndarray | None = None,
                        thorough: bool = False) -> np.ndarray:
        if importance is None:
            fields = _quantize_scale_min(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
        else:
            fields = _quantize_scale_min_weighted(blocks, importance, nmax=15, cap_codes=False)
        if thorough:
            fields = _search_scale_min_thoroughly(blocks, importance, 15, fields)
        d, dmin, scales, codes = fields
        return np.concatenate([half_bytes(d), half_bytes(dmin), scales, _pack_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qs = split_fields(blocks, 2, 2, 12, 128)
        return _scale_min_dequantize(d, dmin, scales, _unpack_nibbles(qs))


class Q5_K(_KQuant):
    """5.5 bits per weight: Q4_K's layout plus a fifth bit per weight in qh.

    half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]     q in 0..31
    qh[l] bit j = bit 4 of weight l of sub-block j. Search: make_qkx2_quants(31, -0.5, 0.1, 15); with
    an imatrix, quantize_row_q5_K_impl's make_qkx3_quants + make_qp_quants, as Q4_K.
    """

    name, ggml_type, type_size = "Q5_K", 13, 176
    searches = ("reference", "thorough")

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, importance: np.ndarray | None = None,
                        thorough: bool = False) -> np.ndarray:
        if importance is None:
            fields = _quantize_scale_min(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
        else:
            fields = _quantize_scale_min_weighted(blocks, importance, nmax=31, cap_codes=True)
        if thorough:
            fields = _search_scale_min_thoroughly(blocks, importance, 31, fields)
        d, dmin, scales, codes = fields
        high = (codes >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]  # (n, 8, 32): bit j for sub-block j
        qh = np.bitwise_or.reduce(high, axis=1)
        return np.concatenate([half_bytes(d), half_bytes(dmin), scales, qh, _pack_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qh, qs = split_fields(blocks, 2, 2, 12, 32, 128)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        return _scale_min_dequantize(d, dmin, scales, _unpack_nibbles(qs) | high << 4)


def _make_q6_quants(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, nmax 32, rmse_type 1, no weights): Q6_K's reference search, w = x*x."""
    return _make_qx_quants(X, 32, X * X)


def _make_qx_quants(X: np.ndarray, nmax: int, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, rmse_type 1) on every column of X (n, S) with weights W at once.

    W is x*x for rmse_type 1 without an imatrix, else the weights C passes (Q6_K: the imatrix
    itself; Q4_0/Q5_0: importance * sqrt(sigma2 + x^2)). Returns (scale (S,), codes (n, S) float32 in
    0..2*nmax-1). An all-zero column (largest |x| below 1e-15) gets scale 0 and codes 0, as in C.
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
    WX = W * X  # sumlx += w*x[i]*l is (w*x)*l
    # (w*x)*l and (w*l)*l side by side, so one sequential pass over the rows makes both sums
    products = np.empty((len(X), 2, X.shape[1]), dtype=f32)
    wxl, wll = products[:, 0], products[:, 1]

    L = np.empty_like(X)

    def codes(iscale: np.ndarray) -> np.ndarray:
        """MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x))) into L; monotonic in x, so the extremes
        come from xmin, xmax."""
        np.multiply(X, iscale, out=L)
        return _round_clip(L, -nmax, nmax - 1, _fits(xmin * iscale, xmax * iscale))

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes(iscale)
        np.multiply(WX, L, out=wxl)
        np.multiply(W, L, out=wll)
        np.multiply(wll, L, out=wll)
        sumlx, suml2 = _seq_sum(products)
        return sumlx, suml2

    best_iscale = f32(-nmax) / max_  # iscale = -nmax / max
    sumlx, suml2 = trial(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0))  # suml2 ? sumlx/suml2 : 0.0f
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / max_  # -(nmax + 0.1f*is)/max
        sumlx, suml2 = trial(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        # keep the winning iscale, not its (16, S) codes: they are recomputed once below
        best_iscale = np.where(take, iscale, best_iscale)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    codes(best_iscale)
    L += f32(nmax)
    L[:, zero] = 0
    return np.where(zero, f32(0), scale), L


def _store_q6_k(X: np.ndarray, L: np.ndarray, d: np.ndarray, q_scales: np.ndarray) -> np.ndarray:
    """Re-code X (16, 16n) against the stored half d (n,) and int8 q_scales (n, 16), and pack the
    (n, 210) Q6_K blocks; a sub-block whose d*scale is 0 keeps its codes in L (C: `if (!d) continue;`)."""
    n = len(d)
    dd = (d.astype(f32)[:, None] * q_scales.astype(f32)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    V = X / dd
    in_range = _fits(X.min(axis=0) / dd, X.max(axis=0) / dd)
    recoded = _round_clip(V, -32, 31, in_range)
    recoded += f32(32)
    L = np.where(redo, recoded, L)

    # (n, 2 halves, 4 quarters, 32): quarter k of half h is weights 128h + 32k + l
    q = L.astype(np.uint8).T.reshape(n, 2, 4, 32)
    ql = (q[:, :, 0:2] & 0xF) | (q[:, :, 2:4] & 0xF) << 4  # (n, 2, 2, 32): bytes 64h + 32(k%2) + l
    qh = (q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(qh, axis=2)  # (n, 2, 32): bytes 32h + l
    fields = [ql.reshape(n, 128), qh.reshape(n, 64), q_scales.view(np.uint8), half_bytes(d)]
    return np.concatenate(fields, axis=1)


def _search_q6_k_thoroughly(blocks: np.ndarray, importance: np.ndarray | None, scales: np.ndarray,
                            max_scale: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """search="thorough" for Q6_K, the Q4_K/Q5_K idea with one int8 scale per 16 weights and no min:
    start from the reference's d = max_scale/-128 (and d nudged by -1%, +1%), let each sub-block
    pick its int8 scale within _CODE_RADIUS of round(scale/d) by the error of the stored block, refit
    d by least squares (_alternate); keep the reference block wherever it is at least as good. The
    weights are the reference's: x*x, or the imatrix. scales (n, 16) are the sub-block fits,
    reference the (n, 210) reference blocks."""
    n = len(blocks)
    X = _columns(blocks, 16)
    W = X * X if importance is None else _columns(importance, 16)
    scale = scales.reshape(-1)

    def pick(d: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray]]:
        d_stored = np.repeat(d.astype(np.float16).astype(f32), 16)
        sc0 = np.rint(np.where(d_stored != 0, scale / np.where(d_stored != 0, d_stored, f32(1)), f32(0)))
        best, best_sc = np.full(X.shape[1], np.inf, dtype=f32), sc0
        for step in range(-_CODE_RADIUS, _CODE_RADIUS + 1):
            sc = np.clip(sc0 + step, -128, 127)
            err, _ = _codes_and_error(X, W, d_stored * sc, f32(32) * d_stored * sc, 63)  # y = d*sc*(q - 32)
            better = err < best
            best, best_sc = np.where(better, err, best), np.where(better, sc, best_sc)
        return best.reshape(n, 16).sum(axis=1), (best_sc.reshape(n, 16),)

    def refit(codes: tuple[np.ndarray], d: np.ndarray) -> tuple[np.ndarray]:
        """d = sum w*x*a / sum w*a^2 with a = sc*(q - 32), summed in float64."""
        sc = codes[0].reshape(-1).astype(f32)
        dd = np.repeat(d.astype(np.float16).astype(f32), 16) * sc
        _, q = _codes_and_error(X, W, dd, f32(32) * dd, 63)
        a = sc * (q - f32(32))
        numerator = (W * a * X).sum(axis=0, dtype=np.float64).reshape(n, 16).sum(axis=1)
        denominator = (W * a * a).sum(axis=0, dtype=np.float64).reshape(n, 16).sum(axis=1)
        new_d = (numerator / denominator).astype(f32)
        return (np.where((denominator > 0) & np.isfinite(new_d), new_d, d),)

    (d,), (sc,) = _alternate(pick, refit, start=(max_scale / f32(-128),))
    thorough = _store_q6_k(X, np.full_like(X, 32), d.astype(np.float16), sc.astype(np.int8))

    def error(data: np.ndarray) -> np.ndarray:
        decoded = Q6_K.dequantize_blocks(data).astype(np.float64)
        return (W.T.reshape(n, QK_K).astype(np.float64) * (blocks - decoded) ** 2).sum(axis=1)

    return np.where((error(thorough) < error(reference))[:, None], thorough, reference)


class Q6_K(_KQuant):
    """6.5625 bits per weight: 16 sub-blocks of 16, each with an int8 scale; no min.

    uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d      x = d*scales[j]*(q - 32), q in 0..63
    Search: make_qx_quants(16, 32, rmse_type 1) per sub-block, weighted by x*x, or by the imatrix
    itself when given (quantize_row_q6_K_impl); scales quantized by -128/max_scale. Thorough:
    _search_q6_k_thoroughly.
    """

    name, ggml_type, type_size = "Q6_K", 14, 210

    searches = ("reference", "thorough")

    @classmethod
    def _quantize_chunk(cls, blocks: np.ndarray, importance: np.ndarray | None = None,
                        thorough: bool = False) -> np.ndarray:
        n = len(blocks)
        X = _columns(blocks, 16)
        if importance is None:
            scales, L = _make_q6_quants(X)
        else:
            scales, L = _make_qx_quants(X, 32, _columns(importance, 16))
        scales = scales.reshape(n, 16)
        max_abs, max_scale = _running_absmax(scales)
        zero_block = max_abs < _GROUP_MAX_EPS  # C writes an all-zero block
        iscale = f32(-128) / np.where(zero_block, f32(1), max_scale)
        d = (f32(1) / iscale).astype(np.float16)
        # int8 scales[ib] = MIN(127, nearest_int(iscale*scales[ib])); the int8 store wraps like C's
        q_scales = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        out = _store_q6_k(X, L, d, q_scales)
        out[zero_block] = 0
        if thorough:
            out = _search_q6_k_thoroughly(blocks, importance, scales, max_scale, out)
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
