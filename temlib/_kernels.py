"""Compiled kernels (numba) of the per-pattern front end and of template drawing.

One pass per pattern over what :mod:`temlib.descriptors` does in NumPy steps
(``prefilter`` -> ``polar_transform`` -> ``descriptors_from_polar``): the intermediate
images stay in cache instead of making a round trip through memory per step, and the
kernels hold no GIL, so :func:`temlib._runtime.split_apply` threads run them on every
core. The NumPy steps stay the reference (and what tuning, which reuses polar images
over many settings, runs); ``tests/test_descriptors.py`` checks the two agree.
Compiled on first use and cached on disk (``cache=True``).

Both entry points, :func:`binned_samples` (the classifier's polar input) and
:func:`polar_descriptors` (the descriptors), share one sampler: the pattern, blurred
or not, in a zero-bordered frame, read bilinearly at offsets from its centre, each
sample added to a bin. They check their geometry first: the compiled loops assume
finite coordinates.
"""

from __future__ import annotations

import numba
import numpy as np

SMOOTH_MIN_PX = 0.3  # a Gaussian narrower than this (px) is skipped


def gaussian_taps(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """SciPy's normalised 1-D Gaussian of ``gaussian_filter`` (radius ``int(truncate sigma + 0.5)``).

    ``[1]`` (no blur) below :data:`SMOOTH_MIN_PX`.
    """
    if not sigma >= SMOOTH_MIN_PX:
        return np.ones(1, np.float32)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1).astype(float)
    g = np.exp(-0.5 / sigma**2 * x**2)
    return (g / g.sum()).astype(np.float32)


def bilinear_corners(rows: np.ndarray, cols: np.ndarray, dtype=np.float64):
    """The four pixels around each point and their bilinear weights, for splatting.

    Returns four ``(r, c, w)``: int64 rows and columns (``floor`` and ``floor + 1``) and
    the weights in ``dtype``; the weights of a point sum to one.
    """
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = (rows - r0).astype(dtype), (cols - c0).astype(dtype)
    return (
        (r0, c0, (1 - fr) * (1 - fc)),
        (r0 + 1, c0, fr * (1 - fc)),
        (r0, c0 + 1, (1 - fr) * fc),
        (r0 + 1, c0 + 1, fr * fc),
    )


def _stack(patterns: np.ndarray) -> np.ndarray:
    p = np.asarray(patterns)
    if p.ndim != 3:
        raise ValueError(f"Patterns of shape {p.shape} are not a stack; expected (N, ky, kx)")
    if p.dtype not in (np.uint8, np.uint16, np.float32):  # the compiled types
        p = p.astype(np.float32)
    return np.ascontiguousarray(p)


def _geometry(n: int, centers: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    c = np.ascontiguousarray(centers, np.float64).reshape(n, 2)
    s = np.ones(n, np.float32) if scale is None else np.asarray(scale, np.float32).reshape(n)
    if not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise ValueError(
            "Beam centres or calibrations hold NaN or infinite values; expected finite numbers"
        )
    return c, np.ascontiguousarray(s)


def _bins(out_index: np.ndarray, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.ascontiguousarray(out_index, np.int64).ravel()
    count = np.bincount(idx, minlength=n_out)
    return idx, (1.0 / np.maximum(count, 1)).astype(np.float32)


@numba.njit(nogil=True, cache=True)
def _reflect(i, n):
    """SciPy's 'reflect' boundary (d c b a | a b c d | d c b a) for an index off [0, n)."""
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - i - 1
    return i


@numba.njit(nogil=True, cache=True)
def _median(x, keys):
    """Median of 1-D float32 ``x`` (NumPy's: the mean of the two middle values if even).

    Exact, by bisection on the float's bits mapped to order-preserving int32 ``keys`` (a
    scratch buffer): 32 branch-free counting passes are faster than a quickselect's
    mispredicted branches on the short rows (180 values) of a polar image.
    """
    n = x.shape[0]
    u = x.view(np.int32)
    lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
    for i in range(n):
        v = u[i]
        key = v if v >= 0 else v ^ np.int32(0x7FFFFFFF)
        keys[i] = key
        lo, hi = min(lo, key), max(hi, key)
    k = n // 2
    while lo < hi:  # the smallest key with more than k keys at or below it: the k-th smallest
        mid = np.int32((np.int64(lo) + np.int64(hi)) >> 1)
        c = np.int32(0)
        for i in range(n):
            c += np.int32(1) if keys[i] <= mid else np.int32(0)
        if c >= k + 1:
            hi = mid
        else:
            lo = mid + np.int32(1)
    m, below, low = x[0], 0, np.float32(-np.inf)
    for i in range(n):
        if keys[i] == lo:
            m = x[i]
        elif keys[i] < lo:
            below += 1
            low = max(low, x[i])
    if n % 2:
        return m
    if below < k:  # the lower middle value ties with the k-th
        low = m
    return (low + m) / np.float32(2)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _bilinear(flat, w, rr, cc):
    """Bilinear sample at (rr, cc) >= 0 of a row-major image ``flat`` of width ``w``."""
    one = np.float32(1.0)
    r0, c0 = np.int32(rr), np.int32(cc)
    fr, fc = rr - np.float32(r0), cc - np.float32(c0)
    j = r0 * w + c0
    top = flat[j] * (one - fc) + flat[j + 1] * fc
    bot = flat[j + w] * (one - fc) + flat[j + w + 1] * fc
    return top * (one - fr) + bot * fr


@numba.njit(nogil=True, cache=True, fastmath=True)
def _blur_into(img, gauss, tmp, padrow, out):
    """Separable Gaussian of ``img`` (mode 'reflect', as SciPy) into ``out[1:ky+1, 1:kx+1]``."""
    ky, kx = img.shape
    rad = (gauss.shape[0] - 1) // 2
    for i in range(ky):  # along rows: whole image rows at a time (vectorised over columns)
        t_row = tmp[i]
        t_row[:] = 0.0
        for t in range(-rad, rad + 1):
            g = gauss[t + rad]
            src = img[_reflect(i + t, ky)]
            for j in range(kx):
                t_row[j] += g * src[j]
    for i in range(ky):  # along columns: a reflect-padded copy of the row, then shifted sums
        t_row = tmp[i]
        for j in range(kx + 2 * rad):
            padrow[j] = t_row[_reflect(j - rad, kx)]
        o_row = out[i + 1]
        for j in range(kx):
            o_row[j + 1] = 0.0
        for t in range(2 * rad + 1):
            g = gauss[t]
            for j in range(kx):
                o_row[j + 1] += g * padrow[j + t]


@numba.njit(nogil=True, cache=True, fastmath=True)
def _box_peaks(patterns, r0, c0, gauss, inside, out):
    """Per pattern: flat index in the box of the maximum of its blurred box where ``inside``."""
    n = patterns.shape[0]
    by, bx = inside.shape
    rad = (gauss.shape[0] - 1) // 2
    box = np.empty((by, bx), np.float32)
    tmp = np.empty((by, bx), np.float32)
    padrow = np.empty(bx + 2 * rad, np.float32)
    blur = np.zeros((by + 2, bx + 2), np.float32)
    for k in range(n):
        for i in range(by):  # the box as contiguous float32 rows (vectorised blur)
            for j in range(bx):
                box[i, j] = patterns[k, r0 + i, c0 + j]
        _blur_into(box, gauss, tmp, padrow, blur)
        best, arg = -np.inf, 0
        for i in range(by):
            for j in range(bx):
                if inside[i, j] and blur[i + 1, j + 1] > best:
                    best, arg = blur[i + 1, j + 1], i * bx + j
        out[k] = arg


def box_peaks(
    patterns: np.ndarray,
    origin: tuple[int, int],
    inside: np.ndarray,
    sigma: float,
    truncate: float = 3.0,
) -> np.ndarray:
    """(N,) flat indices of the maxima, within the (by, bx) mask ``inside``, of the boxes
    ``patterns[:, r0:r0 + by, c0:c0 + bx]`` (``origin`` = (r0, c0)) blurred by a Gaussian of
    ``sigma`` px (SciPy's ``gaussian_filter``, mode 'reflect', on the box alone); first
    maximum on ties. The patterns stay in their dtype: only the boxes are converted."""
    p = _stack(patterns)
    m = np.ascontiguousarray(inside, bool)
    r0, c0 = int(origin[0]), int(origin[1])
    if r0 < 0 or c0 < 0 or r0 + m.shape[0] > p.shape[1] or c0 + m.shape[1] > p.shape[2]:
        raise ValueError(
            f"Box {m.shape} at {(r0, c0)} does not fit patterns of {p.shape[1:]}; expected it inside"
        )
    out = np.empty(len(p), np.int64)
    _box_peaks(p, r0, c0, gaussian_taps(sigma, truncate), m, out)
    return out


@numba.njit(nogil=True, cache=True, fastmath=True)
def _load(img, gauss, tmp, padrow, pad):
    """The pattern (blurred with ``gauss`` unless it has one tap) into ``pad``'s 1 px zero border."""
    ky, kx = img.shape
    if gauss.shape[0] > 1:
        _blur_into(img, gauss, tmp, padrow, pad)
    else:
        pad[1 : ky + 1, 1 : kx + 1] = img


@numba.njit(nogil=True, cache=True, fastmath=True)
def _sample_binned(pad, cy, cx, sc, dy, dx, out_index, inv_count, out):
    """``out[out_index[s]]`` = mean of bilinear samples at ``(cy, cx) + sc (dy, dx)[s]`` of ``pad``.

    Float32 coordinates, as :func:`temlib.io.sample_about`; off the frame reads 0 (the border).
    """
    ky, kx = pad.shape[0] - 3, pad.shape[1] - 3
    flat = pad.ravel()
    w = pad.shape[1]
    cy1, cx1 = np.float32(cy + 1.0), np.float32(cx + 1.0)
    ry, rx, zero = np.float32(ky + 1.0), np.float32(kx + 1.0), np.float32(0.0)
    out[:] = 0.0
    for s in range(dy.shape[0]):
        rr = min(max(cy1 + sc * dy[s], zero), ry)
        cc = min(max(cx1 + sc * dx[s], zero), rx)
        out[out_index[s]] += _bilinear(flat, w, rr, cc)
    out *= inv_count


@numba.njit(nogil=True, cache=True)
def _scratch(ky, kx, rad):
    return (
        np.empty((ky, kx), np.float32),
        np.empty(kx + 2 * rad, np.float32),
        np.zeros((ky + 3, kx + 3), np.float32),
    )


@numba.njit(nogil=True, cache=True)
def _binned_stack(p, centers, scale, gauss, dy, dx, out_index, inv_count, out):
    tmp, padrow, pad = _scratch(p.shape[1], p.shape[2], (gauss.shape[0] - 1) // 2)
    for n in range(p.shape[0]):
        _load(p[n], gauss, tmp, padrow, pad)
        _sample_binned(
            pad, centers[n, 0], centers[n, 1], scale[n], dy, dx, out_index, inv_count, out[n]
        )


def binned_samples(
    patterns, centers, dy, dx, out_index, n_out: int, sigma_px: float = 0.0, scale=None
) -> np.ndarray:
    """(N, n_out) bin means of bilinear samples of (N, ky, kx) patterns, in one compiled pass each.

    Sample ``s`` of pattern ``n`` is read at ``centers[n] + scale[n] * (dy[s], dx[s])`` (px;
    off the frame reads 0) of the pattern blurred by a Gaussian of ``sigma_px`` (SciPy's
    ``gaussian_filter``, mode 'reflect'; none below :data:`SMOOTH_MIN_PX`), and averaged
    into bin ``out_index[s]``: the numbers of ``io.sample_about`` after the filter.
    """
    p = _stack(patterns)
    c, s = _geometry(len(p), centers, scale)
    idx, inv = _bins(out_index, n_out)
    out = np.empty((len(p), n_out), np.float32)
    _binned_stack(
        p, c, s, gaussian_taps(sigma_px), np.asarray(dy, np.float32).ravel(),
        np.asarray(dx, np.float32).ravel(), idx, inv, out,
    )  # fmt: skip
    return out


@numba.njit(nogil=True, cache=True, fastmath=True)
def _descriptor_of_polar(polar, bg, width, noise, gamma, weight, zero_mean, folded, unfolded):
    """In place on one (n_r, 2 n_theta) polar image: background, robust noise, clip,
    ``I ** gamma``; then folded (and, when ``unfolded`` has rows, unfolded) descriptors:
    radial weight, zero mean, unit norm."""
    n_r, n2 = polar.shape
    nt = n2 // 2
    row = np.empty(n2, np.float32)
    row2 = np.empty(n2, np.float32)
    keys = np.empty(n2, np.int32)
    h = width // 2
    for i in range(n_r):
        p = polar[i]
        med = np.float32(0.0)  # the median of p after the background is taken away
        if bg == 1:
            p -= _median(p, keys)
        elif bg == 2:  # grey opening (erosion then dilation), wrapping around
            for k in range(n2):
                m = p[k]
                for t in range(-h, h + 1):
                    m = min(m, p[(k + t) % n2])
                row[k] = m
            for k in range(n2):
                m = row[k]
                for t in range(-h, h + 1):
                    m = max(m, row[(k + t) % n2])
                row2[k] = m
            p -= row2
        if noise > 0:
            if bg != 1:  # (after subtracting the median, the median is 0)
                med = _median(p, keys)
            for k in range(n2):
                row2[k] = abs(p[k] - med)
            p -= np.float32(noise * 1.4826) * _median(row2, keys)
        for k in range(n2):
            v = max(p[k], np.float32(0.0))
            p[k] = np.sqrt(v) if gamma == 0.5 else v**gamma
    for i in range(n_r):
        w = weight[i]
        for k in range(nt):
            folded[i, k] = (polar[i, k] + polar[i, k + nt]) * w
    _normalise(folded, zero_mean)
    if unfolded.shape[0] > 0:
        for i in range(n_r):
            for k in range(n2):
                unfolded[i, k] = polar[i, k] * weight[i]
        _normalise(unfolded, zero_mean)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _normalise(d, zero_mean):
    if zero_mean:
        d -= np.float32(d.mean())
    ss = 0.0
    for i in range(d.shape[0]):
        for k in range(d.shape[1]):
            ss += np.float64(d[i, k]) ** 2
    if ss > 0:
        d /= np.float32(np.sqrt(ss))


@numba.njit(nogil=True, cache=True)
def _descriptor_stack(
    p, centers, gauss, dy, dx, out_index, inv_count, bg, width, noise, gamma, weight,
    zero_mean, folded, unfolded,
):  # fmt: skip
    n_r, n2 = folded.shape[1], 2 * folded.shape[2]
    tmp, padrow, pad = _scratch(p.shape[1], p.shape[2], (gauss.shape[0] - 1) // 2)
    polar = np.empty((n_r, n2), np.float32)
    none = np.empty((0, n2), np.float32)
    flat = polar.ravel()
    for n in range(p.shape[0]):
        _load(p[n], gauss, tmp, padrow, pad)
        _sample_binned(
            pad, centers[n, 0], centers[n, 1], np.float32(1.0), dy, dx, out_index, inv_count, flat
        )
        u = unfolded[n] if unfolded.shape[0] > 0 else none
        _descriptor_of_polar(polar, bg, width, noise, gamma, weight, zero_mean, folded[n], u)


def polar_descriptors(
    patterns, centers, dy, dx, out_index, n_r: int, n_theta: int, sigma_px: float,
    background: int, width: int, noise: float, gamma: float, weight, zero_mean: bool,
    unfolded: bool,
):  # fmt: skip
    """Folded (N, n_r, n_theta) and, with ``unfolded``, unfolded (N, n_r, 2 n_theta) descriptors.

    The polar image is :func:`binned_samples`' (bins ``out_index`` over n_r x 2 n_theta);
    ``background`` 0/1/2 = none/median/opening of ``width`` bins per radius, then ``noise``
    robust standard deviations off, clip, ``I ** gamma``, fold, radial ``weight``, zero mean,
    unit norm: :func:`temlib.descriptors.descriptors_from_polar`. Without ``unfolded`` the
    second array is empty (N, 0, 0) and not computed.
    """
    p = _stack(patterns)
    n = len(p)
    c, _ = _geometry(n, centers, None)
    idx, inv = _bins(out_index, n_r * 2 * n_theta)
    folded = np.empty((n, n_r, n_theta), np.float32)
    unf = np.empty((n, n_r, 2 * n_theta) if unfolded else (0, n_r, 2 * n_theta), np.float32)
    _descriptor_stack(
        p, c, gaussian_taps(sigma_px), np.asarray(dy, np.float32).ravel(),
        np.asarray(dx, np.float32).ravel(), idx, inv, int(background), int(width), float(noise),
        float(gamma), np.asarray(weight, np.float32), bool(zero_mean), folded, unf,
    )  # fmt: skip
    return folded, (unf if unfolded else unf[:, :0, :0])


# --------------------------------------------------------------------------------------
# Templates: Gaussian spots drawn on the polar grid
# --------------------------------------------------------------------------------------

SPOT_CUT = 6.5  # a template spot is drawn out to this many sigma (beyond: < 7e-10 of its peak)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _draw_spots(xy, w, rb, th_bins, period, s2, cut, weight, zero_mean, out):
    n_r, n_th = out.shape[1], out.shape[2]
    rb0 = rb[0]
    dr = (rb[n_r - 1] - rb[0]) / max(n_r - 1, 1)
    step = np.float32(period / n_th)
    arc = np.empty(n_th, np.float32)
    half_period = np.float32(period / 2)
    for t in range(out.shape[0]):
        o = out[t]
        o[:] = 0
        for s in range(w.shape[1]):
            ws = w[t, s]
            if ws == 0:
                continue
            x, y = xy[t, s, 0], xy[t, s, 1]
            r = np.float32(np.sqrt(x * x + y * y))
            k0 = max(0, int(np.floor((r - cut - rb0) / dr)))
            k1 = min(n_r - 1, int(np.ceil((r + cut - rb0) / dr)))  # bin centres rb0 + k dr
            if k0 > k1:
                continue
            th = np.float32(np.arctan2(y, x)) % np.float32(period)
            if r * half_period <= cut:  # the spot's arc spans the whole circle
                j0, j1 = 0, n_th - 1
            else:
                half = cut / r
                j0 = int(np.floor((th - half) / step))
                j1 = int(np.ceil((th + half) / step))
                if j1 - j0 + 1 > n_th:
                    j0, j1 = 0, n_th - 1
            for j in range(j0, j1 + 1):
                jj = j % n_th
                d = (th_bins[jj] - th + half_period) % np.float32(period) - half_period
                arc[jj] = np.exp(-((r * d) ** 2) / s2)
            for k in range(k0, k1 + 1):
                rk = rb[k] - r
                a = ws * np.exp(-(rk * rk) / s2)
                for j in range(j0, j1 + 1):
                    jj = j % n_th
                    o[k, jj] += a * arc[jj]
        for k in range(n_r):  # radial weight, then zero mean and unit norm as the patterns'
            o[k] *= weight[k]
        _normalise(o, zero_mean)


def draw_spots(
    xy: np.ndarray, weight: np.ndarray, radii: np.ndarray, azimuths: np.ndarray, period: float,
    sigma: float, radial_weight: np.ndarray, zero_mean: bool,
) -> np.ndarray:  # fmt: skip
    """(T, n_r, n_azimuth) template descriptors: spot s of template t a Gaussian of width ``sigma``.

    Each spot adds ``weight * exp(-((r_k - r)^2 + (r d_j)^2) / (2 sigma^2))`` at the
    evenly spaced bin-centre radii ``r_k`` and the azimuths ``j period / n_azimuth``
    (``azimuths``, over [0, period)), ``d_j`` the azimuth difference wrapped to
    [-period/2, period/2): :func:`temlib.descriptors.template_descriptors`' drawing, only
    over the bins within :data:`SPOT_CUT` sigma of the spot instead of all of them. Then
    each template times ``radial_weight`` (n_r,), less its mean when ``zero_mean``, unit L2
    norm (all zero stays zero): ``descriptors._finish``, by the patterns' :func:`_normalise`.
    """
    xy = np.ascontiguousarray(xy, np.float32)  # shapes checked by template_descriptors
    w = np.ascontiguousarray(weight, np.float32)
    if not np.isfinite(xy).all():  # the compiled loop turns coordinates into bin indices
        raise ValueError("Spot positions hold NaN or infinite values; expected finite numbers")
    rb = np.ascontiguousarray(radii, np.float32)
    th = np.ascontiguousarray(azimuths, np.float32)
    out = np.empty((len(xy), len(rb), len(th)), np.float32)
    rw = np.ascontiguousarray(radial_weight, np.float32)
    if rw.shape != rb.shape:
        raise ValueError(f"Radial weight of shape {rw.shape}; expected {rb.shape}, one per radius")
    _draw_spots(
        xy, w, rb, th, float(period), np.float32(2 * sigma**2), np.float32(SPOT_CUT * sigma),
        rw, bool(zero_mean), out,
    )  # fmt: skip
    return out
