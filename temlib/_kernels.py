"""Compiled kernels (numba) of the per-pattern front end.

One pass per pattern over what :mod:`temlib.descriptors` does in NumPy steps
(``prefilter`` -> ``polar_transform`` -> ``descriptors_from_polar``): the intermediate
images stay in cache instead of making a round trip through memory per step, and the
kernels hold no GIL, so :func:`temlib._runtime.split_apply` threads run them on every
core. The NumPy steps stay the reference (and what tuning, which reuses polar images
over many settings, runs); ``tests/test_descriptors.py`` checks the two agree.
Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np


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
def _front_end_one(
    img, cy, cx, gauss, dy, dx, ov, bg, width, noise, gamma, weight, zero_mean,
    folded, unfolded, tmp, padrow, pad, polar, row, row2, keys,
):  # fmt: skip
    """One pattern: blur, polar sampling, background, ``I ** gamma``, folding, normalisation."""
    ky, kx = img.shape
    n_r, n2 = folded.shape[0], unfolded.shape[1]
    nt = n2 // 2
    # pad: the (blurred) pattern with a 1 px zero border, where off-frame samples land
    if gauss.shape[0] > 1:
        _blur_into(img, gauss, tmp, padrow, pad)
    else:
        pad[1 : ky + 1, 1 : kx + 1] = img
    flat = pad.ravel()
    w = pad.shape[1]
    cy1, cx1 = np.float32(cy + 1.0), np.float32(cx + 1.0)  # float32 coordinates, as io.sample_about
    ry, rx, zero = np.float32(ky + 1.0), np.float32(kx + 1.0), np.float32(0.0)
    for i in range(n_r):  # bilinear polar samples, ``ov`` radii averaged per bin
        p = polar[i]
        p[:] = 0.0
        for o in range(ov):
            dys, dxs = dy[i * ov + o], dx[i * ov + o]
            for k in range(n2):
                rr = min(max(cy1 + dys[k], zero), ry)
                cc = min(max(cx1 + dxs[k], zero), rx)
                p[k] += _bilinear(flat, w, rr, cc)
        p /= ov
    # per radius along azimuth: background, robust noise, clip, intensity transform
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
    # fold, radial weight, zero mean, unit norm (the folded and the unfolded image)
    for i in range(n_r):
        w = weight[i]
        for k in range(nt):
            folded[i, k] = (polar[i, k] + polar[i, k + nt]) * w
        for k in range(n2):
            unfolded[i, k] = polar[i, k] * w
    for d in (folded, unfolded):
        if zero_mean:
            d -= np.float32(d.mean())
        ss = 0.0
        for i in range(d.shape[0]):
            for k in range(d.shape[1]):
                ss += np.float64(d[i, k]) ** 2
        if ss > 0:
            d /= np.float32(np.sqrt(ss))


@numba.njit(nogil=True, cache=True)
def front_end(
    p, centers, gauss, dy, dx, ov, bg, width, noise, gamma, weight, zero_mean, folded, unfolded
):
    """Descriptors of a stack of patterns into ``folded`` (N, n_r, n_theta) and ``unfolded``.

    ``p`` (N, ky, kx) float32 patterns, ``centers`` (N, 2) (row, col) px, ``gauss`` the
    normalised 1-D prefilter (length 1: none), ``dy``/``dx`` (n_r * ov, 2 n_theta) polar
    offsets (px), ``bg`` 0/1/2 = none/median/opening of ``width`` bins, ``noise`` the
    robust-noise factor, ``weight`` (n_r,) the radial weight.
    """
    ky, kx = p.shape[1], p.shape[2]
    n2 = unfolded.shape[2]
    rad = (gauss.shape[0] - 1) // 2
    tmp = np.empty((ky, kx), np.float32)
    padrow = np.empty(kx + 2 * rad, np.float32)
    pad = np.zeros((ky + 3, kx + 3), np.float32)
    polar = np.empty((unfolded.shape[1], n2), np.float32)
    row = np.empty(n2, np.float32)
    row2 = np.empty(n2, np.float32)
    keys = np.empty(n2, np.int32)
    for n in range(p.shape[0]):
        _front_end_one(
            p[n], centers[n, 0], centers[n, 1], gauss, dy, dx, ov, bg, width, noise, gamma,
            weight, zero_mean, folded[n], unfolded[n], tmp, padrow, pad, polar, row, row2, keys,
        )  # fmt: skip


@numba.njit(nogil=True, cache=True, fastmath=True)
def binned_samples(p, centers, scale, gauss, dy, dx, out_index, inv_count, out):
    """Mean bilinear samples of (optionally blurred) patterns, binned: ``out`` (N, n_out).

    Sample ``s`` of pattern ``n`` is read at ``centers[n] + scale[n] * (dy[s], dx[s])`` (px;
    off the frame reads 0) of the pattern blurred with ``gauss`` (length 1: not blurred), as
    :func:`temlib.io.sample_about` after SciPy's ``gaussian_filter``; it is added to bin
    ``out_index[s]``, and each bin is multiplied by ``inv_count`` (1 / its number of samples).
    """
    n_pat, ky, kx = p.shape
    rad = (gauss.shape[0] - 1) // 2
    tmp = np.empty((ky, kx), np.float32)
    padrow = np.empty(kx + 2 * rad, np.float32)
    pad = np.zeros((ky + 3, kx + 3), np.float32)
    flat = pad.ravel()
    w = pad.shape[1]
    ry, rx, zero = np.float32(ky + 1.0), np.float32(kx + 1.0), np.float32(0.0)
    for n in range(n_pat):
        if rad > 0:
            _blur_into(p[n], gauss, tmp, padrow, pad)
        else:
            pad[1 : ky + 1, 1 : kx + 1] = p[n]
        o = out[n]
        o[:] = 0.0
        cy1, cx1 = np.float32(centers[n, 0] + 1.0), np.float32(centers[n, 1] + 1.0)
        sc = np.float32(scale[n])
        for s in range(dy.shape[0]):
            rr = min(max(cy1 + sc * dy[s], zero), ry)
            cc = min(max(cx1 + sc * dx[s], zero), rx)
            o[out_index[s]] += _bilinear(flat, w, rr, cc)
        o *= inv_count
