"""The 256-weight "K-quants" Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, byte-identical to llama.cpp's reference C.

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

Bit-exactness follows C's float32 arithmetic to the letter (the shared rules and helpers are in
_common.py), and here also: float32 -> half rounds to nearest even (numpy astype(float16));
requantization uses the stored half; running maxima compare with `>` (the first index wins); casts
wrap as in C ((uint8_t)nearest_int(...) before MIN(63, ...)).

Speed: C loops over one sub-block at a time; numpy must instead run each step of that loop over all
sub-blocks at once. The data are transposed to (32, n_subblocks) (16 rows for Q6_K), so each step of
a sequential sum adds one contiguous row across every sub-block, and blocks are processed in chunks
whose working set stays in cache. The searches remember each sub-block's winning trial parameters
rather than its codes, and recompute the codes once at the end: masked copies of (32, n) arrays
cost more in numpy than the whole trial arithmetic.
"""

from __future__ import annotations

import numpy as np

from ._common import (
    GROUP_MAX_EPS,
    QK_K,
    THOROUGH_GRID,
    alternate,
    columns,
    f32,
    fits,
    make_qkx2_quants,
    make_qx_quants,
    nearest_int,
    pack_2bit_codes,
    pack_k_fifth_bits,
    pack_k_nibbles,
    pack_q6_k_codes,
    pack_scale_min,
    round_clip,
    running_absmax,
    seq_sum,
    unpack_2bit_codes,
    unpack_k_fifth_bits,
    unpack_k_nibbles,
    unpack_q6_k_codes,
    unpack_scale_min,
)
from .base import ChunkedQuant, half_bytes, half_values, split_fields

# A Q4_K/Q5_K block before packing (_store_scale_min): d, dmin (n,) half, packed scales (n, 12), codes (n, 8, 32).
ScaleMinFields = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

# ----------------------------------------------------------------------------- running maxima


def _running_max(values: np.ndarray) -> np.ndarray:
    """C's `float m = 0; for j: if (v[j] > m) m = v[j];` over the columns of (n, k) values."""
    best = np.zeros(len(values), dtype=f32)
    for column in values.T:
        best = np.where(column > best, column, best)
    return best


# ----------------------------------------------------------------------------- Q4_K / Q5_K search


def _scale_min_weights(blocks: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) blocks -> their sub-block columns X (32, 8n) and the weights W that Q4_K/Q5_K's search
    minimises: av_x + |x| with av_x the sub-block's root mean square (the reference), or, given the
    (n, 256) importance, importance * sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2) over the super-block."""
    X = columns(blocks, 32)
    if importance is None:
        sum_x2 = seq_sum(X * X)  # float sum_x2 = 0; sum_x2 += x*x
        av_x = np.sqrt(sum_x2 / f32(32))  # sqrtf(sum_x2/32)
        return X, av_x + np.abs(X)  # weights[l] = av_x + fabsf(x[l])
    sum_x2 = seq_sum(np.square(np.ascontiguousarray(blocks.T)))  # all 256 weights, left to right
    sigma2 = f32(2) * sum_x2 / f32(QK_K)
    return X, columns(importance, 32) * np.sqrt(np.repeat(sigma2, 8) + X * X)


def _quantize_scale_min(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> ScaleMinFields:
    """The shared part of quantize_row_q4_K_ref and _q5_K_ref on (n, 256) float32 blocks.

    Returns d and dmin (n,) float16, the (n, 12) packed scales, and (n, 8, 32) uint8 codes.
    """
    n = len(blocks)
    X, W = _scale_min_weights(blocks)
    scales, mins, L = make_qkx2_quants(X, W, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)

    max_scale, max_min = _running_max(scales), _running_max(mins)
    inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
    inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls): the cast to uint8 wraps before the MIN
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
    return _store_scale_min(X, L, max_scale / f32(63), max_min / f32(63), ls, lm, nmax)


def _quantize_scale_min_weighted(
    blocks: np.ndarray, importance: np.ndarray, nmax: int, cap_codes: bool
) -> ScaleMinFields:
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
    sub_block_weight = seq_sum(W).reshape(n, 8)
    scales, mins, L = make_qkx2_quants(X, W, nmax, rmin=-0.9, rdelta=0.05, nstep=36)
    d, ls = _make_qp_quants(scales.reshape(n, 8), sub_block_weight, nmax=63)
    dmin, lm = _make_qp_quants(mins.reshape(n, 8), sub_block_weight, nmax=63)
    if cap_codes:
        ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    return _store_scale_min(X, L, d, dmin, ls, lm, nmax)


def _store_scale_min(
    X: np.ndarray, L: np.ndarray, d: np.ndarray, dmin: np.ndarray, ls: np.ndarray, lm: np.ndarray, nmax: int
) -> ScaleMinFields:
    """Store d, dmin (n,) as half and the (n, 8) 6-bit codes ls, lm packed, then re-code the weights
    X (32, 8n) against the STORED numbers, overwriting the search's codes L.

    Returns d and dmin (n,) float16, the (n, 12) packed scales, and (n, 8, 32) uint8 codes.
    """
    n = len(ls)
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    packed = pack_scale_min(ls, lm)
    sc, m = unpack_scale_min(packed)  # what C reads back (get_scale_min_k4)

    # d = half(d)*sc, dm = half(dmin)*m; a sub-block whose d is 0 keeps the codes of the search
    # (C: `if (!d) continue;`; a NaN d is re-coded).
    dd = (d.astype(f32)[:, None] * sc.astype(f32)).reshape(-1)
    dm = (dmin.astype(f32)[:, None] * m.astype(f32)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    V = X + dm
    V /= dd  # (x + dm)/d: a division, as in C, not a multiply by 1/d
    in_range = fits((X.min(axis=0) + dm) / dd, (X.max(axis=0) + dm) / dd)
    np.copyto(L, round_clip(V, 0, nmax, in_range), where=redo)
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
    zero = largest < GROUP_MAX_EPS  # C: all codes 0, scale 0
    largest = np.where(zero, f32(1), largest)  # keeps all-zero rows finite; they are reset at the end

    def weighted_sq_err(scale: np.ndarray, codes: np.ndarray) -> np.ndarray:
        diff = x - scale[:, None] * codes
        return seq_sum(((w * diff) * diff).T)  # mse += w*diff*diff

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
    l = codes.astype(f32)  # noqa: E741 (named as in ggml-quants.c)
    wx = w * x
    sumlx = seq_sum((wx * l).T)  # sumlx += w*x[i]*l, with the int l
    suml2 = seq_sum(((w * l) * l).T)
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
            take = (slx > 0) & (sl2 > 0) & (new != L[:, i]) & (new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2)
            L[:, i] = np.where(take, new_code & 0xFF, L[:, i])
            sumlx = np.where(take, new_slx, sumlx)
            suml2 = np.where(take, new_sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    return np.where(zero, f32(0), scale), np.where(zero[:, None], 0, L).astype(np.uint8)


def _scale_min_dequantize(d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """y = (d*sc)*q - dmin*m per sub-block, in C's float32 order; q is (n, 8, 32)."""
    sc, m = unpack_scale_min(scales)
    dl = (half_values(d) * sc.astype(f32))[:, :, None]
    ml = (half_values(dmin) * m.astype(f32))[:, :, None]
    return (dl * q.astype(f32) - ml).reshape(len(q), QK_K)


# ----------------------------------------------------------------------------- search="thorough"

# The thorough search: _common.THOROUGH_GRID's trial scales per sub-block, 6-bit codes within
# _CODE_RADIUS of the rounded fit, then _common.alternate's refits of (d, dmin). Least-squares refits
# of each sub-block's own (scale, min) were tried and bought under 0.2% of error, so they are left out.
_CODE_RADIUS = 2


def _search_scale_min_thoroughly(
    blocks: np.ndarray, importance: np.ndarray | None, nmax: int, reference: ScaleMinFields
) -> ScaleMinFields:
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
    scale, offset, _ = make_qkx2_quants(X, W, nmax, **THOROUGH_GRID)
    start = (_running_max(scale.reshape(n, 8)) / f32(63), _running_max(offset.reshape(n, 8)) / f32(63))

    def refit(codes: tuple[np.ndarray, ...], d: np.ndarray, dmin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ls, lm = codes
        return _refit_super_block(X, W, ls, lm, d, dmin, nmax)

    (d, dmin), (ls, lm) = alternate(
        pick=lambda d, dmin: _pick_sub_block_codes(X, W, scale, offset, d, dmin, nmax),
        refit=refit,
        start=start,
    )
    thorough = _store_scale_min(X, np.zeros_like(X), d, dmin, ls, lm, nmax)

    Wb = W.T.reshape(n, QK_K)
    keep = _stored_block_error(blocks, Wb, thorough) < _stored_block_error(blocks, Wb, reference)
    d, dmin, scales, codes = (
        np.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, b) for a, b in zip(thorough, reference, strict=True)
    )
    return d, dmin, scales, codes


def _codes_and_error(
    X: np.ndarray, W: np.ndarray, scale: np.ndarray, offset: np.ndarray, nmax: int
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


def _pick_sub_block_codes(
    X: np.ndarray, W: np.ndarray, scale: np.ndarray, offset: np.ndarray, d: np.ndarray, dmin: np.ndarray, nmax: int
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
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
    return best.reshape(n, 8).sum(axis=1), (
        best_sc.reshape(n, 8).astype(np.int32),
        best_m.reshape(n, 8).astype(np.int32),
    )


def _refit_super_block(
    X: np.ndarray, W: np.ndarray, ls: np.ndarray, lm: np.ndarray, d: np.ndarray, dmin: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray]:
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


def _stored_block_error(blocks: np.ndarray, weights: np.ndarray, fields: ScaleMinFields) -> np.ndarray:
    """(n,) float64 sum of w*(x - decoded)^2 per super-block, decoding exactly as llama.cpp does."""
    d, dmin, scales, codes = fields
    decoded = _scale_min_dequantize(half_bytes(d), half_bytes(dmin), scales, codes).astype(np.float64)
    return (weights.astype(np.float64) * (blocks - decoded) ** 2).sum(axis=1)


# ----------------------------------------------------------------------------- the types


class _KQuant(ChunkedQuant):
    """A K-quant: blocks of 256 weights (super-blocks), encoded a cache-sized run at a time."""

    block_size = QK_K


class Q4_K(_KQuant):
    """4.5 bits per weight: 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min.

    half d; half dmin; uint8 scales[12]; uint8 qs[128]          x = d*sc[j]*q - dmin*m[j], q in 0..15
    Search: make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1, nstep 20); with an imatrix,
    quantize_row_q4_K_impl's make_qkx3_quants + make_qp_quants (_quantize_scale_min_weighted).
    """

    name, ggml_type, type_size = "Q4_K", 12, 144
    searches = ("reference", "thorough")

    @classmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        if importance is None:
            fields = _quantize_scale_min(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
        else:
            fields = _quantize_scale_min_weighted(blocks, importance, nmax=15, cap_codes=False)
        if thorough:
            fields = _search_scale_min_thoroughly(blocks, importance, 15, fields)
        d, dmin, scales, codes = fields
        return np.concatenate([half_bytes(d), half_bytes(dmin), scales, pack_k_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qs = split_fields(blocks, 2, 2, 12, 128)
        return _scale_min_dequantize(d, dmin, scales, unpack_k_nibbles(qs))


class Q5_K(_KQuant):
    """5.5 bits per weight: Q4_K's layout plus a fifth bit per weight in qh.

    half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]     q in 0..31
    qh[l] bit j = bit 4 of weight l of sub-block j. Search: make_qkx2_quants(31, -0.5, 0.1, 15); with
    an imatrix, quantize_row_q5_K_impl's make_qkx3_quants + make_qp_quants, as Q4_K.
    """

    name, ggml_type, type_size = "Q5_K", 13, 176
    searches = ("reference", "thorough")

    @classmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        if importance is None:
            fields = _quantize_scale_min(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
        else:
            fields = _quantize_scale_min_weighted(blocks, importance, nmax=31, cap_codes=True)
        if thorough:
            fields = _search_scale_min_thoroughly(blocks, importance, 31, fields)
        d, dmin, scales, codes = fields
        qh = pack_k_fifth_bits(codes)
        return np.concatenate([half_bytes(d), half_bytes(dmin), scales, qh, pack_k_nibbles(codes)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, scales, qh, qs = split_fields(blocks, 2, 2, 12, 32, 128)
        return _scale_min_dequantize(d, dmin, scales, unpack_k_nibbles(qs) | unpack_k_fifth_bits(qh) << 4)


def _make_q6_quants(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(16, nmax 32, rmse_type 1, no weights): Q6_K's reference search, w = x*x."""
    return make_qx_quants(X, 32, X * X)


def _store_q6_k(X: np.ndarray, L: np.ndarray, d: np.ndarray, q_scales: np.ndarray) -> np.ndarray:
    """Re-code X (16, 16n) against the stored half d (n,) and int8 q_scales (n, 16), and pack the
    (n, 210) Q6_K blocks; a sub-block whose d*scale is 0 keeps its codes in L (C: `if (!d) continue;`)."""
    n = len(d)
    dd = (d.astype(f32)[:, None] * q_scales.astype(f32)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    V = X / dd
    in_range = fits(X.min(axis=0) / dd, X.max(axis=0) / dd)
    recoded = round_clip(V, -32, 31, in_range)
    recoded += f32(32)
    L = np.where(redo, recoded, L)

    ql, qh = pack_q6_k_codes(L.astype(np.uint8).T.reshape(n, QK_K))
    return np.concatenate([ql, qh, q_scales.view(np.uint8), half_bytes(d)], axis=1)


def _search_q6_k_thoroughly(
    blocks: np.ndarray, importance: np.ndarray | None, scales: np.ndarray, max_scale: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """search="thorough" for Q6_K, the Q4_K/Q5_K idea with one int8 scale per 16 weights and no min:
    start from the reference's d = max_scale/-128 (and d nudged by -1%, +1%), let each sub-block
    pick its int8 scale within _CODE_RADIUS of round(scale/d) by the error of the stored block, refit
    d by least squares (alternate); keep the reference block wherever it is at least as good. The
    weights are the reference's: x*x, or the imatrix. scales (n, 16) are the sub-block fits,
    reference the (n, 210) reference blocks."""
    n = len(blocks)
    X = columns(blocks, 16)
    W = X * X if importance is None else columns(importance, 16)
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

    (d,), (sc,) = alternate(pick, refit, start=(max_scale / f32(-128),))
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
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        n = len(blocks)
        X = columns(blocks, 16)
        if importance is None:
            scales, L = _make_q6_quants(X)
        else:
            scales, L = make_qx_quants(X, 32, columns(importance, 16))
        scales = scales.reshape(n, 16)
        max_abs, max_scale = running_absmax(scales.T)
        zero_block = max_abs < GROUP_MAX_EPS  # C writes an all-zero block
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
        q = unpack_q6_k_codes(ql, qh).reshape(n, 16, 16).astype(np.int8) - np.int8(32)
        dl = half_values(d) * np.ascontiguousarray(scales).view(np.int8).astype(f32)  # d * sc[is]
        return (dl[:, :, None] * q.astype(f32)).reshape(n, QK_K)


# ----------------------------------------------------------------------------- Q3_K


def _make_q3_quants(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(16, nmax 4, do_rmse true) on every column of X (16, S): codes from -4/max, the
    signed value of largest magnitude, then up to 5 passes that move one code at a time while that
    raises (sum w*x*l)^2 / sum w*l^2, w = x*x. Returns (scale (S,), codes (16, S) float32 in 0..7);
    an all-zero column gets scale 0 and codes 0.

    C stops a column after a pass that changes nothing, and so does this: the next pass would see
    the same state and change nothing either, so each pass runs only on the columns the last one changed.
    """
    amax, max_ = running_absmax(X)
    zero = amax < GROUP_MAX_EPS
    max_ = np.where(zero, f32(1), max_)  # keeps zero columns finite; they are reset at the end
    iscale = f32(-4) / max_
    L = round_clip(X * iscale, -4, 3, fits(X.min(axis=0) * iscale, X.max(axis=0) * iscale))
    W = X * X
    WX = W * X
    sumlx = seq_sum(WX * L)  # sumlx += w*x[i]*l
    suml2 = seq_sum((W * L) * L)  # suml2 += w*l*l
    active = np.arange(X.shape[1])
    for _ in range(5):
        Xa, Wa, WXa, La = X[:, active], W[:, active], WX[:, active], L[:, active]
        slx_total, sl2_total = sumlx[active], suml2[active]
        changed = np.zeros(len(active), dtype=bool)
        for i in range(len(X)):
            x, w, wx, code = Xa[i], Wa[i], WXa[i], La[i]
            slx = slx_total - wx * code
            sl2 = sl2_total - (w * code) * code
            new = np.clip(nearest_int(x * sl2 / slx), -4, 3).astype(f32)
            new_slx = slx + wx * new
            new_sl2 = sl2 + (w * new) * new
            take = new_slx * new_slx * sl2_total > slx_total * slx_total * new_sl2
            take &= slx > 0
            take &= new != code
            take &= new_sl2 > 0
            np.copyto(code, new, where=take)
            np.copyto(slx_total, new_slx, where=take)
            np.copyto(sl2_total, new_sl2, where=take)
            changed |= take
        L[:, active], sumlx[active], suml2[active] = La, slx_total, sl2_total
        active = active[changed]
        if not active.size:
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    L += f32(4)
    L[:, zero] = 0
    return np.where(zero, f32(0), scale), L


def _pack_q3_k_scales(codes: np.ndarray) -> np.ndarray:
    """(n, 16) 6-bit scale codes -> the (n, 12) scales field of Q3_K (layout in Q3_K's docstring)."""
    codes = codes.astype(np.uint8)
    out = np.empty((len(codes), 12), dtype=np.uint8)
    out[:, :8] = (codes[:, :8] & 0xF) | (codes[:, 8:] & 0xF) << 4
    high = (codes >> 4).reshape(len(codes), 4, 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]
    out[:, 8:] = np.bitwise_or.reduce(high, axis=1)  # scale j: bits 2*(j//4) of byte 8 + j%4
    return out


def _unpack_q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """The (n, 12) scales field -> (n, 16) signed scales (code - 32) as float32."""
    low = np.concatenate([scales[:, :8] & 0xF, scales[:, :8] >> 4], axis=1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]
    high = ((scales[:, None, 8:12] >> shifts) & 3).reshape(len(scales), 16)
    return ((low | high << 4).astype(np.int8) - np.int8(32)).astype(f32)


def _store_q3_k(X: np.ndarray, L: np.ndarray, d: np.ndarray, scale_codes: np.ndarray) -> np.ndarray:
    """Re-code X (16, 16n) against the stored half d (n,) and 6-bit scale codes (n, 16), and pack the
    (n, 110) Q3_K blocks; a sub-block whose d*(code - 32) is 0 keeps its codes in L (C: `if (!d) continue;`)."""
    n = len(d)
    scales = _pack_q3_k_scales(scale_codes)
    dd = (d.astype(f32)[:, None] * _unpack_q3_k_scales(scales)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    recoded = round_clip(X / dd, -4, 3, fits(X.min(axis=0) / dd, X.max(axis=0) / dd))
    recoded += f32(4)
    codes = np.where(redo, recoded, L).astype(np.uint8).T.reshape(n, QK_K)
    high = codes > 3  # the third bit of weight 32k + l goes to bit k of hmask[l]
    hmask = np.bitwise_or.reduce(
        high.reshape(n, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1
    )
    return np.concatenate([hmask, pack_2bit_codes(codes - 4 * high), scales, half_bytes(d)], axis=1)


def _q3_k_scale_codes(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q3_K_ref's scale step: (n, 16) sub-block scales -> d (n,) float16 and (n, 16)
    6-bit codes, against -32/max_scale (the signed scale of largest magnitude); all 0 when that is 0."""
    _, max_scale = running_absmax(scales.T)
    nonzero = max_scale != 0  # C: `if (max_scale)`, which NaN passes
    iscale = f32(-32) / np.where(nonzero, max_scale, f32(1))
    # int8_t l = nearest_int(...): the int8 store wraps before MAX(-32, MIN(31, l)) + 32
    wrapped = (nearest_int(iscale[:, None] * scales) + 128) % 256 - 128
    codes = np.where(nonzero[:, None], np.clip(wrapped, -32, 31) + 32, 0)
    d = np.where(nonzero, f32(1) / iscale, f32(0)).astype(np.float16)
    return d, codes


def _importance_weights(blocks: np.ndarray, importance: np.ndarray, width: int, spread: float) -> np.ndarray:
    """importance * sqrt(sigma2 + x^2) on the (width, S) sub-block columns of (n, 256) blocks, with
    sigma2 = spread * sum(x^2) / 256 over each super-block (spread 2 for Q3_K-Q5_K, 1 for Q2_K)."""
    X = columns(blocks, width)
    sum_x2 = seq_sum(np.square(np.ascontiguousarray(blocks.T)))  # all 256 weights, left to right
    sigma2 = f32(spread) * sum_x2 / f32(QK_K)
    return columns(importance, width) * np.sqrt(np.repeat(sigma2, QK_K // width) + X * X)


class Q3_K(_KQuant):
    """3.4375 bits per weight: 16 sub-blocks of 16, each with a 6-bit signed scale; no min.

    uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d      x = d*(sc[j] - 32) * (q - 4), q in 0..7
    Weight 32k + l (k = 0..7) keeps its third bit in bit k of hmask[l]; its low 2 bits sit in qs as
    in all 2-bit types: in 128-weight half h, weight 128h + 32k + l in bits 2k, 2k+1 of qs[32h + l].
    scales: byte j < 8 holds the low 4 bits of sc[j] (low nibble) and of sc[j+8] (high nibble);
    byte 8 + j%4 holds the top 2 bits of sc[j] at bits 2*(j//4).
    Search: make_q3_quants (w = x*x, code by code refinement) per sub-block, scales against
    -32/max_scale. With an imatrix (quantize_row_q3_K_impl): make_qx_quants(nmax 4) per sub-block
    weighted by importance * sqrt(sigma2 + x^2), and the 16 scales by make_qx_quants(nmax 32)
    weighted by each sub-block's total weight.
    """

    name, ggml_type, type_size = "Q3_K", 11, 110

    @classmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        n = len(blocks)
        X = columns(blocks, 16)
        if importance is None:
            scales, L = _make_q3_quants(X)
            d, codes = _q3_k_scale_codes(scales.reshape(n, 16))
            return _store_q3_k(X, L, d, codes)
        W = _importance_weights(blocks, importance, 16, spread=2)
        scales, L = make_qx_quants(X, 4, W)
        sub_block_weight = seq_sum(W)  # float sumw = 0; sumw += weight[l]
        d_block, codes = make_qx_quants(
            np.ascontiguousarray(scales.reshape(n, 16).T), 32, np.ascontiguousarray(sub_block_weight.reshape(n, 16).T)
        )
        return _store_q3_k(X, L, d_block.astype(np.float16), codes.T.astype(np.int32))

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        hmask, qs, scales, d = split_fields(blocks, 32, 64, 12, 2)
        n = len(blocks)
        high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = unpack_2bit_codes(qs).astype(np.int8) - np.int8(4) * (1 - high.reshape(n, QK_K)).astype(np.int8)
        dl = half_values(d) * _unpack_q3_k_scales(scales)  # d_all * (scales[is] - 32)
        return (dl[:, :, None] * q.reshape(n, 16, 16).astype(f32)).reshape(n, QK_K)


# ----------------------------------------------------------------------------- Q2_K


def _store_q2_k(X: np.ndarray, L: np.ndarray, d: np.ndarray, dmin: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Re-code X (16, 16n) against the stored half d, dmin (n,) and the (n, 16) scale bytes (4-bit
    scale | 4-bit min << 4), and pack the (n, 84) Q2_K blocks; a sub-block whose d*scale is 0 keeps
    its codes in L (C: `if (!d) continue;`)."""
    n = len(d)
    dd = (d.astype(f32)[:, None] * (scales & 0xF).astype(f32)).reshape(-1)
    dm = (dmin.astype(f32)[:, None] * (scales >> 4).astype(f32)).reshape(-1)
    redo = dd != 0
    dd = np.where(redo, dd, f32(1))
    V = X + dm
    V /= dd  # (x + dm)/d
    recoded = round_clip(V, 0, 3, fits((X.min(axis=0) + dm) / dd, (X.max(axis=0) + dm) / dd))
    codes = np.where(redo, recoded, L).astype(np.uint8).T.reshape(n, QK_K)
    return np.concatenate([scales, pack_2bit_codes(codes), half_bytes(d), half_bytes(dmin)], axis=1)


def _q2_k_codes_against_max(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q2_K_ref's 4-bit codes of (n, 16) non-negative scales (or mins) against
    15/max: (codes int (n, 16), the half super-block scale (n,)); both 0 where the max is not > 0."""
    largest = _running_max(values)
    positive = largest > 0
    iscale = f32(15) / np.where(positive, largest, f32(1))
    codes = np.where(positive[:, None], nearest_int(iscale[:, None] * values), 0)
    return codes, np.where(positive, largest / f32(15), f32(0)).astype(np.float16)


class Q2_K(_KQuant):
    """2.625 bits per weight: 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit min.

    uint8 scales[16]; uint8 qs[64]; half d; half dmin      x = d*(scales[j] & 15)*q - dmin*(scales[j] >> 4)
    q in 0..3, packed as Q3_K's low bits: weight 128h + 32k + l in bits 2k, 2k+1 of qs[32h + l].
    Search: make_qkx2_quants(nmax 3, rmin -0.5, rdelta 0.1, nstep 15) with weights |x| judged by the
    weighted ABSOLUTE error; the 16 scales and 16 mins against 15/their maxima. With an imatrix
    (quantize_row_q2_K_impl): weights importance * sqrt(sigma2 + x^2), sigma2 = mean(x^2), the
    make_qkx3_quants grid (rmin -0.9, rdelta 0.05, nstep 36), and make_qp_quants for the scales and mins.
    """

    name, ggml_type, type_size = "Q2_K", 10, 84

    @classmethod
    def _quantize_chunk(
        cls, blocks: np.ndarray, importance: np.ndarray | None = None, thorough: bool = False
    ) -> np.ndarray:
        n = len(blocks)
        X = columns(blocks, 16)
        if importance is None:
            scales, mins, L = make_qkx2_quants(X, np.abs(X), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
            ls, d = _q2_k_codes_against_max(scales.reshape(n, 16))
            lm, dmin = _q2_k_codes_against_max(mins.reshape(n, 16))
        else:
            W = _importance_weights(blocks, importance, 16, spread=1)
            scales, mins, L = make_qkx2_quants(X, W, 3, rmin=-0.9, rdelta=0.05, nstep=36)
            sub_block_weight = seq_sum(W).reshape(n, 16)  # sw[j] += weight[l], from 0
            d_scales, ls = _make_qp_quants(scales.reshape(n, 16), sub_block_weight, nmax=15)
            d_mins, lm = _make_qp_quants(mins.reshape(n, 16), sub_block_weight, nmax=15)
            d, dmin = d_scales.astype(np.float16), d_mins.astype(np.float16)
        packed = ((ls.astype(np.int32) & 0xFF) | lm.astype(np.int32) << 4) & 0xFF  # uint8 stores wrap
        return _store_q2_k(X, L, d, dmin, packed.astype(np.uint8))

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        scales, qs, d, dmin = split_fields(blocks, 16, 64, 2, 2)
        n = len(blocks)
        dl = (half_values(d) * (scales & 0xF).astype(f32))[:, :, None]
        ml = (half_values(dmin) * (scales >> 4).astype(f32))[:, :, None]
        return (dl * unpack_2bit_codes(qs).reshape(n, 16, 16).astype(f32) - ml).reshape(n, QK_K)
