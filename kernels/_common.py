"""The C arithmetic and bit packing the types share: what makes legacy.py's and kquants.py's
numpy byte-identical to ggml-quants.c, written once.

Bit-exactness depends on following C's float32 arithmetic to the letter:
  - nearest_int(f) adds 1.5*2**23 in float32 and reads the low mantissa bits: round-half-to-even for
    |f| <= 4194303, and well-defined garbage beyond (which the clamps that follow then see).
  - sums run left to right in float32 (numpy's pairwise `sum` would not match), and every product
    keeps C's association, e.g. (w*l)*x, never w*(l*x); nothing is promoted to float64.
  - comparisons are strict as in C (`err < best`: the first index wins).

The searches (make_qx_quants, make_qkx2_quants) work on columns: C loops over one (sub-)block at a
time; numpy runs each step of that loop over all of them at once, with the data transposed to
(weights per block, n_blocks) by `columns`, so each step of a sequential sum adds one contiguous row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import numpy as np

QK_K = 256  # weights per K-quant super-block

# Super-blocks per chunk: 128K weights, so one (32, 4096) float32 work array is 512 KiB and the dozen
# of them stay in or near the core's L2 cache (measured best among 128..2048).
_CHUNK_BLOCKS = 512

_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves round(f) in the mantissa
_EXACT_LIMIT = np.float32(4194303.0)  # |f| up to this, nearest_int(f) is plain round-half-even
GROUP_MAX_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS: below it a group counts as all zero

f32 = np.float32  # every constant is cast to float32, so no operation promotes to float64


# ----------------------------------------------------------------------------- rounding and sums


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int, bit for bit, as int32: also for NaN, inf and |f| > 4194303."""
    bits = (np.asarray(values, dtype=f32) + _ROUND_MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def fits(*extremes: np.ndarray) -> bool:
    """True when every value lies within +-4194303, where nearest_int is plain rounding (NaN fails)."""
    return all(bool(np.all(np.abs(e) <= _EXACT_LIMIT)) for e in extremes)


def round_clip(v: np.ndarray, lo: int, hi: int, in_range: bool) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(v))) as float32 codes, written over v.

    in_range (from fits on v's extremes) allows the fast path: nearest_int is then round-half-even,
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


def seq_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Sum a (k, ...) array over its first axis, row 0 first, in float32: C-style loops side by side.

    from_zero: C's `float s = 0; s += t[i]` (0 + t[0]); otherwise `float s = t[0]; s += t[i]`.
    The two differ only in the sign of an all-zero sum, but each call site says which C does.
    """
    acc = terms[0] + f32(0) if from_zero else terms[0].copy()
    for row in terms[1:]:
        acc += row
    return acc


def running_absmax(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C's `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from 0 down the rows of (k, S) values:
    per column the largest |v| and the signed v that has it, the first row winning; 0 and 0 if no
    |v| > 0 (so an all-NaN column reads as all zero, as in C)."""
    best_abs = np.zeros(values.shape[1:], dtype=f32)
    best = np.zeros(values.shape[1:], dtype=f32)
    for row in values:
        magnitude = np.abs(row)
        take = magnitude > best_abs
        best_abs = np.where(take, magnitude, best_abs)
        best = np.where(take, row, best)
    return best_abs, best


def by_chunks(
    blocks: np.ndarray, type_size: int, quantize_chunk: Callable[..., np.ndarray], weights: np.ndarray | None = None
) -> np.ndarray:
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


def columns(blocks: np.ndarray, width: int) -> np.ndarray:
    """(n, 256) -> (width, n*256/width): one sub-block per column, block b's sub-blocks side by side.

    Sub-block s of block b becomes column b*(256/width) + s, so per-column results reshape to (n, 256/width).
    """
    return np.ascontiguousarray(blocks.reshape(-1, width).T)


# ----------------------------------------------------------------------------- the searches


def _weighted_sq_err(
    L: np.ndarray,
    scale: np.ndarray,
    the_min: np.ndarray,
    X: np.ndarray,
    W: np.ndarray,
    tmp: np.ndarray,
    use_mad: bool = False,
) -> np.ndarray:
    """sum_i w_i * ((scale*L_i + min) - x_i)^2 per column, left to right from 0 (make_qkx2's error);
    use_mad: sum_i w_i * |(scale*L_i + min) - x_i| instead (Q2_K's reference)."""
    np.multiply(L, scale, out=tmp)
    tmp += the_min
    tmp -= X
    if use_mad:
        np.abs(tmp, out=tmp)  # fabsf(diff)
    else:
        np.multiply(tmp, tmp, out=tmp)  # diff*diff
    tmp *= W  # w * diff
    return seq_sum(tmp)


def _codes_qkx(
    X: np.ndarray,
    the_min: np.ndarray,
    iscale: np.ndarray,
    nmax: int,
    xmin: np.ndarray,
    xmax: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) per column, into out.

    iscale*(x - min) is monotonic in x, so its extremes over a column come from xmin and xmax.
    """
    np.subtract(X, the_min, out=out)
    out *= iscale
    in_range = fits((xmin - the_min) * iscale, (xmax - the_min) * iscale)
    return round_clip(out, 0, nmax, in_range)


def make_qkx2_quants(
    X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants on every column of X (n, S) with weights W at once.

    use_mad: judge trials by the weighted absolute error rather than the squared one (only Q2_K's
    reference asks for it).

    Given weights, make_qkx3_quants (the imatrix paths) is the same arithmetic: only its `max <= min`
    test differs from `max == min`, and max >= min always holds once min is clamped to <= 0.

    Returns (scale, the_min, L): per-column float32 scale and -min, and (32, S) float32 codes.
    """
    xmin, xmax = X.min(axis=0), X.max(axis=0)
    sum_w = seq_sum(W, from_zero=False)  # float sum_w = weights[0]; sum_w += w
    sum_x = seq_sum(W * X, from_zero=False)  # float sum_x = sum_w * x[0]; sum_x += w * x[i]
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
    best = _weighted_sq_err(L, scale, the_min, X, W, tmp, use_mad)
    # A trial's codes are a function of the (iscale, min) it used: keep those of each column's best
    # trial and compute its codes once at the end (selecting (32, S) codes every step is slow).
    best_iscale, best_offset = iscale, the_min

    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / span()  # rmin + rdelta*is + nmax
        _codes_qkx(X, the_min, iscale, nmax, xmin, xmax, out=L)
        np.multiply(W, L, out=wl)
        np.multiply(wl, X, out=wlx)
        np.multiply(wl, L, out=wll)
        sum_l, sum_xl, sum_l2 = seq_sum(products)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive_min = this_min > 0  # if (this_min > 0) { this_min = 0; this_scale = sum_xl/sum_l2; }
        this_min = np.where(positive_min, f32(0), this_min)
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        cur_error = _weighted_sq_err(L, this_scale, this_min, X, W, tmp, use_mad)
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


def make_qx_quants(X: np.ndarray, nmax: int, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, rmse_type 1) on every column of X (n, S) with weights W at once.

    W is x*x for rmse_type 1 without an imatrix, else the weights C passes (Q6_K: the imatrix
    itself; Q4_0/Q5_0: importance * sqrt(sigma2 + x^2)). Returns (scale (S,), codes (n, S) float32 in
    0..2*nmax-1). An all-zero column (largest |x| below 1e-15) gets scale 0 and codes 0, as in C.
    """
    amax, max_ = running_absmax(X)
    zero = amax < GROUP_MAX_EPS
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
        return round_clip(L, -nmax, nmax - 1, fits(xmin * iscale, xmax * iscale))

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes(iscale)
        np.multiply(WX, L, out=wxl)
        np.multiply(W, L, out=wll)
        np.multiply(wll, L, out=wll)
        sumlx, suml2 = seq_sum(products)
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


# ----------------------------------------------------------------------------- the thorough searches


class TrialGrid(TypedDict):
    """make_qkx2_quants' trial inverse scales: (rmin + rdelta*step + nmax)/(max-min) for step 0..nstep."""

    rmin: float
    rdelta: float
    nstep: int


# What every thorough search shares: the finer trial grid of make_qkx2_quants (41 trial inverse
# scales (nmax-1 .. nmax+1)/(max-min), twice as fine as the K-quant reference's), d nudged by these
# factors at the start, and _SUPER_ROUNDS least-squares refits of the block scales.
THOROUGH_GRID: TrialGrid = {"rmin": -1.0, "rdelta": 0.05, "nstep": 40}
_D_NUDGES = (0.99, 1.01)
_SUPER_ROUNDS = 3


def alternate(
    pick: Callable[..., tuple[np.ndarray, tuple[np.ndarray, ...]]],
    refit: Callable[..., tuple[np.ndarray, ...]],
    start: tuple[np.ndarray, ...],
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The loop every thorough search shares (kquants.py's and legacy.py's), over the (n,) per-block scales
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
            best = tuple(np.where(better, new, old) for new, old in zip(candidate, best, strict=True))
            codes = tuple(np.where(better[:, None], new, old) for new, old in zip(new_codes, codes, strict=True))
        candidates = []
    return best, codes


# ----------------------------------------------------------------------------- bit packing


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes of the 32-weight quants -> (n, 16) bytes: weight j in the low nibble of byte j,
    weight j+16 in its high nibble."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) low-4-bit codes; inverse of pack_nibbles."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of weight j at bit j of a little-endian uint32."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def unpack_fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes -> (n, 32) fifth bits (0 or 1); inverse of pack_fifth_bits."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def pack_k_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, 8, 32) codes -> (n, 128) bytes: sub-block 2c in the low nibbles of bytes 32c..32c+31, 2c+1 high."""
    pairs = codes.reshape(len(codes), 4, 2, 32) & 0xF
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(len(codes), 128)


def unpack_k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32) uint8 low-4-bit codes; inverse of pack_k_nibbles."""
    qs = qs.reshape(len(qs), 4, 1, 32)
    return ((qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(len(qs), 8, 32)


def pack_2bit_codes(codes: np.ndarray) -> np.ndarray:
    """(n, 256) codes in 0..3 -> (n, 64) bytes: in each 128-weight half h, weight 128h + 32k + l sits
    in bits 2k, 2k+1 of byte 32h + l (the qs of Q2_K, Q3_K and TQ2_0)."""
    quarters = codes.reshape(len(codes), 2, 4, 32).astype(np.uint8) & 3
    shifted = quarters << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return np.bitwise_or.reduce(shifted, axis=2).reshape(len(codes), 64)


def unpack_2bit_codes(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes -> (n, 256) uint8 codes in 0..3; inverse of pack_2bit_codes."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(len(qs), 2, 1, 32) >> shifts) & 3).reshape(len(qs), QK_K)


def pack_k_fifth_bits(codes: np.ndarray) -> np.ndarray:
    """(n, 8, 32) Q5_K codes -> (n, 32) qh: bit j of qh[l] is bit 4 of weight l of sub-block j."""
    high = (codes >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.bitwise_or.reduce(high, axis=1)


def unpack_k_fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 32) qh -> (n, 8, 32) fifth bits (0 or 1); inverse of pack_k_fifth_bits."""
    return (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1


def pack_q6_k_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) Q6_K codes in 0..63 -> ql (n, 128) and qh (n, 64), the layout in kquants.Q6_K."""
    n = len(codes)
    q = codes.reshape(n, 2, 4, 32)  # quarter k of half h is weights 128h + 32k + l
    ql = (q[:, :, 0:2] & 0xF) | (q[:, :, 2:4] & 0xF) << 4  # (n, 2, 2, 32): bytes 64h + 32(k%2) + l
    qh = (q >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(qh, axis=2)  # (n, 2, 32): bytes 32h + l
    return ql.reshape(n, 128), qh.reshape(n, 64)


def unpack_q6_k_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """ql (n, 128) and qh (n, 64) -> (n, 256) uint8 codes in 0..63; inverse of pack_q6_k_codes."""
    n = len(ql)
    low = ql.reshape(n, 2, 1, 2, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
    high = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((low.reshape(n, 2, 4, 32) & 0xF) | (high & 3) << 4).reshape(n, QK_K)


def pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> the (n, 12) scales field of Q4_K/Q5_K (layout in kquants' doc)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((len(sc), 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    out[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    out[:, 8:12] = (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4
    return out


def unpack_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 12) scales field -> (n, 8) scales and (n, 8) mins, uint8 in 0..63."""
    sc = np.empty((len(scales), 8), dtype=np.uint8)
    m = np.empty((len(scales), 8), dtype=np.uint8)
    sc[:, :4] = scales[:, 0:4] & 63
    m[:, :4] = scales[:, 4:8] & 63
    sc[:, 4:] = (scales[:, 8:12] & 0xF) | (scales[:, 0:4] >> 6) << 4
    m[:, 4:] = (scales[:, 8:12] >> 4) | (scales[:, 4:8] >> 6) << 4
    return sc, m
