"""Physics-based synthetic bright-field TEM images of cavities (voids, bubbles) with labels.

Imaging model (simplified phase contrast of a foil with holes in it):

1. A cavity removes material along the beam over its chord ``t(x, y)`` (nm). Relative to
   the surrounding foil, the exit wave inside it is
   ``psi = exp(t / (2 L)) exp(i phi)``, ``phi = -sigma V0 t``, with the interaction
   constant ``sigma`` (7.288e-3 rad/(V nm) at 200 kV), the mean inner potential ``V0``
   (20-28 V for metals) and an absorption length ``L`` (less matter, more transmitted
   electrons). The full ``exp(i phi)`` is used: the weak-phase approximation fails once
   ``sigma V0 t`` nears 1, i.e. for cavities above about 3 nm.
2. The objective lens: ``chi(q) = pi lambda df q^2 + (pi/2) Cs lambda^3 q^4`` (``df < 0``
   is under-focus), spatial and temporal coherence envelopes and a soft objective
   aperture. The image is ``|IFFT(FFT(psi) exp(-i chi) E_s E_t A)|^2``.
3. Only the wave *difference* ``psi - 1`` is non-zero, inside each cavity, and the
   propagator spreads it by about ``lambda |df| q_max``: each cavity (or cluster of
   cavities whose patches touch) is propagated in a small patch, not the whole frame.
   The patch intensity change is blurred by the camera's point-spread function and laid
   onto the background: ``I = B + B_local dI`` (local level matched, the background's own
   texture and noise kept inside the cavity).

Under-focus then gives a bright centre with a dark Fresnel fringe, over-focus a dark
centre with a bright fringe; neither is drawn by hand. Fresnel fringes are about
``sqrt(lambda |df|)`` wide.

Shapes: spheres and faceted cavities (truncated octahedra, {111} faces cut by {100},
randomly oriented). Sizes are log-normal. Backgrounds: a folder of the user's BF-TEM
images (real cavities in them stay, labelled ``real`` where the user gave YOLO labels
``<stem>.txt`` next to the image or in ``labels/``) or an embedded synthetic background
(thickness gradient, bend contours, mottled contrast, black dots, noise).

Labels of every image: YOLO txt (box of the cavity itself, not its fringe), instance
masks (16-bit PNG), COCO json, a per-cavity table (``cavities.csv``) and a per-image table
(``images.csv``: nm/px, defocus, foil thickness, true swelling). See
:func:`generate_dataset` and ``temlib cavity generate``. Only the cavities a person could
see are labelled: Rose's criterion on their signal-to-noise ratio in the final image
(:func:`visibility_snr`, ``GeneratorConfig.min_snr``); the others are drawn all the same.

Coordinates: ``(row, col)`` arrays; continuous positions have pixel ``(r, c)`` covering
``[r, r + 1) x [c, c + 1)``; boxes are ``[x1, y1, x2, y2]`` with ``x`` = column.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import scipy.fft as sfft

from .boxio import _xyxy, list_images, read_image, read_yolo_txt, write_yolo_txt

log = logging.getLogger(__name__)

WAVELENGTH_NM = 2.5079e-3  # electron wavelength at 200 kV
SIGMA = 7.288e-3  # interaction constant at 200 kV, rad / (V nm)


# --------------------------------------------------------------------------- optics


def transfer_function(
    shape: tuple[int, int],
    px_nm: float,
    df_nm: float,
    cs_mm: float = 1.2,
    alpha_mrad: float = 0.1,
    focal_spread_nm: float = 5.0,
    aperture_inv_nm: float | None = None,
    wavelength_nm: float = WAVELENGTH_NM,
) -> np.ndarray:
    """Objective-lens transfer function with coherence envelopes, ``(M, N)`` complex64.

    ``H(q) = exp(-i chi(q)) E_s(q) E_t(q) A(q)`` with
    ``chi = pi lambda df q^2 + (pi/2) Cs lambda^3 q^4``,
    ``E_s = exp(-(pi alpha)^2 (df q + Cs lambda^2 q^3)^2)``,
    ``E_t = exp(-(pi lambda Delta)^2 q^4 / 2)`` and a soft aperture ``A``.

    Parameters
    ----------
    shape
        ``(M, N)`` of the (unshifted, FFT-ordered) frequency grid.
    px_nm
        Pixel size, nm.
    df_nm
        Defocus, nm; negative = under-focus.
    cs_mm
        Spherical aberration, mm.
    alpha_mrad
        Illumination semi-angle, mrad (spatial coherence).
    focal_spread_nm
        Focal spread Delta, nm (temporal coherence).
    aperture_inv_nm
        Objective aperture radius in 1/nm (``None``: none).
    """
    # single precision (computed for every patch shape of every image): against double
    # precision the result differs by at most 3e-6 at 0.3-1 nm/px and |df| 0.25-3 um
    f32 = np.float32
    q2 = (sfft.fftfreq(shape[0], d=px_nm) ** 2).astype(f32)[:, None] + (
        sfft.fftfreq(shape[1], d=px_nm) ** 2
    ).astype(f32)[None, :]
    q = np.sqrt(q2)
    lam = wavelength_nm
    cs = cs_mm * 1e6
    chi = q2 * (f32(np.pi * lam * df_nm) + f32(0.5 * np.pi * cs * lam**3) * q2)
    alpha = alpha_mrad * 1e-3
    spread = q * (f32(df_nm) + f32(cs * lam**2) * q2)  # df q + Cs lambda^2 q^3
    env = np.exp(
        -f32((np.pi * alpha) ** 2) * (spread * spread)
        - f32(0.5 * (np.pi * lam * focal_spread_nm) ** 2) * (q2 * q2)
    )
    if aperture_inv_nm:
        edge = 0.05 * aperture_inv_nm
        env *= f32(0.5) * (1 - np.tanh((q - f32(aperture_inv_nm)) / f32(edge)))
    H = np.empty(q2.shape, np.complex64)  # env exp(-i chi)
    H.real = env * np.cos(chi)
    H.imag = -env * np.sin(chi)
    return H


# --------------------------------------------------------------------------- shapes


def _rotation(rng) -> np.ndarray:
    """A uniformly random rotation matrix (3, 3)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


_OCT = np.array(
    [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float
) / np.sqrt(3)
_CUBE = np.vstack([np.eye(3), -np.eye(3)])


def faceted_planes(
    radius: float, truncation: float, rotation: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Half-spaces ``n . p <= d`` of a truncated octahedron.

    Parameters
    ----------
    radius
        Distance of the {111} faces from the centre (the inscribed radius), nm or px.
    truncation
        Distance of the {100} faces over ``radius``: ``sqrt(3)`` (1.732) is a plain
        octahedron, 1.0 a cube-like cuboctahedral shape; 1.1-1.5 look like real voids.
    rotation
        ``(3, 3)`` rotation applied to the shape.

    Returns
    -------
    normals, distances
        ``(14, 3)`` unit normals and ``(14,)`` distances.
    """
    n = np.vstack([_OCT, _CUBE]) @ rotation.T
    d = np.concatenate([np.full(8, radius), np.full(6, truncation * radius)])
    return n, d


def polyhedron_vertices(normals: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Vertices ``(V, 3)`` of the convex polyhedron ``normals @ p <= distances``."""
    from itertools import combinations

    idx = np.array(list(combinations(range(len(normals)), 3)))
    a = normals[idx]
    det = np.linalg.det(a)
    ok = np.abs(det) > 1e-9
    p = np.linalg.solve(a[ok], distances[idx[ok]][..., None])[..., 0]
    tol = 1e-7 * max(1.0, distances.max())
    p = p[np.all(p @ normals.T <= distances + tol, axis=1)]
    _, first = np.unique(np.round(p / (1e3 * tol)), axis=0, return_index=True)
    return p[np.sort(first)]


def polyhedron_volume(vertices: np.ndarray) -> float:
    """Volume of the convex hull of ``vertices`` ``(V, 3)``."""
    from scipy.spatial import ConvexHull

    return float(ConvexHull(vertices).volume)


def chord_sphere(yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    """Chord length through a sphere of ``radius`` centred at 0 at positions ``(yy, xx)``.

    ``yy`` and ``xx`` broadcast (e.g. a column and a row); the result has their dtype.
    """
    return 2 * np.sqrt(np.maximum(radius**2 - yy**2 - xx**2, 0))


def chord_polyhedron(
    yy: np.ndarray, xx: np.ndarray, normals: np.ndarray, distances: np.ndarray
) -> np.ndarray:
    """Chord length along z through ``normals @ p <= distances`` at positions ``(yy, xx)``.

    ``normals`` columns are ``(x, y, z)``; the beam runs along z. ``yy`` and ``xx``
    broadcast (e.g. a column and a row); the result has their shape and (float) dtype.
    """
    shape = np.broadcast_shapes(np.shape(yy), np.shape(xx))
    dtype = np.result_type(yy, xx, np.float32)
    zmax = np.full(shape, np.inf, dtype)  # the beam leaves through the upward faces
    zmin = np.full(shape, -np.inf, dtype)  # and enters through the downward ones
    inside = np.ones(shape, bool)
    # one face at a time on the broadcast grid (Python floats keep the inputs' precision)
    for (nx, ny, nz), d in zip(normals.tolist(), distances.tolist(), strict=True):
        if abs(nz) <= 1e-12:  # face parallel to the beam: outside it, nothing
            inside &= (d - nx * xx - ny * yy) >= 0
        elif nz > 0:
            np.minimum(zmax, (d / nz - (nx / nz) * xx) - (ny / nz) * yy, out=zmax)
        else:
            np.maximum(zmin, (d / nz - (nx / nz) * xx) - (ny / nz) * yy, out=zmin)
    t = np.where(inside, zmax - zmin, 0)
    return np.maximum(t, 0, out=t)


@dataclasses.dataclass
class Cavity:
    """One cavity: centre ``(row, col)`` in px, size in nm, shape.

    ``radius_nm`` is the sphere radius or, for faceted cavities, the {111} face distance.
    """

    row: float
    col: float
    radius_nm: float
    faceted: bool = False
    truncation: float = 1.3
    rotation: np.ndarray | None = None

    def planes_nm(self):
        return faceted_planes(self.radius_nm, self.truncation, self.rotation)

    @functools.cached_property
    def _geometry(self) -> dict:
        return self._compute_geometry()

    def geometry(self) -> dict:
        """Projected half-extents ``hx, hy`` and box-centre offset ``x0, y0`` (nm), ``volume``
        (nm^3) and equivalent-sphere diameter ``d_eq`` (nm)."""
        return self._geometry

    def _compute_geometry(self) -> dict:
        if not self.faceted:
            r = self.radius_nm
            return dict(hx=r, hy=r, x0=0.0, y0=0.0, volume=4 / 3 * np.pi * r**3, d_eq=2 * r)
        from scipy.spatial import ConvexHull

        v = polyhedron_vertices(*self.planes_nm())
        vol = polyhedron_volume(v)
        xy = v[:, :2]
        x0 = 0.5 * (v[:, 0].max() + v[:, 0].min())
        y0 = 0.5 * (v[:, 1].max() + v[:, 1].min())
        return dict(
            hx=0.5 * (v[:, 0].max() - v[:, 0].min()),
            hy=0.5 * (v[:, 1].max() - v[:, 1].min()),
            x0=x0,
            y0=y0,
            volume=vol,
            d_eq=(6 * vol / np.pi) ** (1 / 3),
            hull_xy=xy[ConvexHull(xy).vertices],
        )

    def scaled(self, factor: float) -> Cavity:
        """The same cavity with every length times ``factor`` (geometry scaled, not recomputed)."""
        new = dataclasses.replace(self, radius_nm=self.radius_nm * factor)
        g = dict(self.geometry())
        for k in ("hx", "hy", "x0", "y0", "d_eq"):
            g[k] = g[k] * factor
        g["volume"] = g["volume"] * factor**3
        if "hull_xy" in g:
            g["hull_xy"] = g["hull_xy"] * factor
        new.__dict__["_geometry"] = g  # fills the cached_property
        return new

    def outline_px(self, px_nm: float, n: int = 24) -> np.ndarray:
        """Projected outline ``(P, 2)`` as ``[x, y]`` (column, row) in px of the frame."""
        if not self.faceted:
            a = np.linspace(0, 2 * np.pi, n, endpoint=False)
            r = self.radius_nm / px_nm
            return np.c_[self.col + r * np.cos(a), self.row + r * np.sin(a)]
        hull = self.geometry()["hull_xy"]
        return np.c_[self.col + hull[:, 0] / px_nm, self.row + hull[:, 1] / px_nm]

    def chord(self, yy_nm: np.ndarray, xx_nm: np.ndarray) -> np.ndarray:
        """Chord (nm) at offsets ``(yy, xx)`` (nm) from the centre."""
        if not self.faceted:
            return chord_sphere(yy_nm, xx_nm, self.radius_nm)
        return chord_polyhedron(yy_nm, xx_nm, *self.planes_nm())


# --------------------------------------------------------------------------- imaging


@dataclasses.dataclass(frozen=True)
class Optics:
    """Microscope and material settings of one image (200 kV by default).

    ``df_nm`` < 0 is under-focus. ``v0`` mean inner potential (V), ``absorption_nm``
    absorption length of the foil (nm), ``psf_px`` Gaussian sigma of the camera
    point-spread function (px).
    """

    df_nm: float = -1000.0
    v0: float = 24.0
    absorption_nm: float = 150.0
    cs_mm: float = 1.2
    alpha_mrad: float = 0.1
    focal_spread_nm: float = 5.0
    aperture_inv_nm: float | None = None
    psf_px: float = 0.7
    wavelength_nm: float = WAVELENGTH_NM
    sigma: float = SIGMA


_PATCH_SIZES = np.array(
    [16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024]
)


def _fast_len(n: int) -> int:
    """A patch size >= n from a short list (FFT-friendly; transfer functions get reused)."""
    n = int(n)
    if n <= _PATCH_SIZES[-1]:
        return int(_PATCH_SIZES[np.searchsorted(_PATCH_SIZES, n)])
    return sfft.next_fast_len(n, real=False)


def _patch_margin_px(optics: Optics, px_nm: float) -> int:
    qmax = 0.5 / px_nm if not optics.aperture_inv_nm else min(0.5 / px_nm, optics.aperture_inv_nm)
    spread_nm = optics.wavelength_nm * abs(optics.df_nm) * qmax + 3 * np.sqrt(
        optics.wavelength_nm * abs(optics.df_nm)
    )
    return int(np.ceil(spread_nm / px_nm + 4 * optics.psf_px + 6))


def noise_sigma(image: np.ndarray, block: int = 4) -> float:
    """Noise of an image as an object of a few pixels sees it, per pixel (grey levels).

    The smooth background is removed (Gaussian of ``1.5 block`` px), then the spread of
    ``block x block`` means, times ``block``: for white noise this is the pixel noise; for
    noise correlated over a pixel or two (a camera's point-spread) it is the white noise of
    the same power at the scale of the objects, which the pixel-to-pixel spread
    underestimates. Robust spread (median absolute deviation), so that dislocation lines
    and dots do not count as noise.
    """
    a = np.asarray(image, np.float32)
    m, n = a.shape[0] // block, a.shape[1] // block
    if m == 0 or n == 0:
        raise ValueError(f"Image of shape {a.shape} is smaller than one {block} px block")
    means = _block_means(a[: m * block, : n * block], block)
    hp = means - _blur(means, 1.5)  # background: a Gaussian of 1.5 blocks (1.5 block px)
    mad = np.median(np.abs(hp - np.median(hp)))
    return float(1.4826 * mad * block)


def _block_means(a: np.ndarray, block: int) -> np.ndarray:
    """Means of the ``block x block`` squares of ``a`` (its sides multiples of ``block``)."""
    try:
        import cv2

        return cv2.resize(
            a, (a.shape[1] // block, a.shape[0] // block), interpolation=cv2.INTER_AREA
        )
    except ImportError:  # pragma: no cover
        m, n = a.shape[0] // block, a.shape[1] // block
        return a.reshape(m, block, n, block).mean(axis=(1, 3))


def visibility_snr(signal: np.ndarray, box, sigma: float, fringe_px: int = 3) -> float:
    """Signal-to-noise ratio of one object in an image: ``sqrt(sum S^2) / sigma``.

    ``signal`` ``(M, N)`` is what the object changes in the image (image with it minus
    image without it), summed over its box ``[x1, y1, x2, y2]`` widened by ``fringe_px``
    (the Fresnel fringe lies outside the cavity); ``sigma`` the pixel noise
    (:func:`noise_sigma`). This is the matched-filter (ideal observer) SNR; for a uniform
    disc of contrast ``C`` over ``A`` pixels it is Rose's ``C sqrt(A) / sigma``, and Rose's
    criterion sees the object when it reaches about 5.
    """
    M, N = signal.shape
    x1, y1, x2, y2 = box
    r0, r1 = max(int(np.floor(y1)) - fringe_px, 0), min(int(np.ceil(y2)) + fringe_px, M)
    c0, c1 = max(int(np.floor(x1)) - fringe_px, 0), min(int(np.ceil(x2)) + fringe_px, N)
    sub = signal[r0:r1, c0:c1].astype(np.float64)
    return float(np.sqrt((sub * sub).sum()) / max(sigma, 1e-6))


def cavity_intensity(
    cavities: list[Cavity],
    shape: tuple[int, int],
    px_nm: float,
    optics: Optics,
    oversample: int = 2,
    return_masks: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Intensity change ``dI`` ``(M, N)`` of cavities in a uniform foil, and instance masks.

    The image of a foil with these cavities is ``1 + dI`` (1 = foil without cavities).
    Where cavities do not overlap in projection the exit wave is exactly
    ``1 + sum_k (T_k - 1)``, and propagation is linear: each cavity's wave difference is
    propagated in a small patch (size + spread of the propagator) and summed on the frame,
    then ``dI = |1 + D|^2 - 1`` is blurred by the camera PSF. Cavities overlapping in
    projection are propagated together, with the product of their transmissions.

    Parameters
    ----------
    cavities
        Cavities with centres in px of the ``(M, N)`` frame (they may lie partly outside).
    shape
        ``(M, N)`` frame.
    px_nm
        Pixel size, nm.
    optics
        Imaging settings.
    oversample
        Sub-pixels per pixel side for the transmission (edges anti-aliased by averaging
        the wave over each pixel before propagation).
    return_masks
        Also return an instance label image (uint16; cavity ``k`` of the list is ``k + 1``).

    Returns
    -------
    dI, masks
        ``(M, N)`` float32 and ``(M, N)`` uint16 (or None).
    """
    M, N = shape
    masks = np.zeros(shape, np.uint16) if return_masks else None
    if not cavities:
        return np.zeros(shape, np.float32), masks
    margin = _patch_margin_px(optics, px_nm)
    geo = [c.geometry() for c in cavities]
    own = np.array(
        [
            [
                c.row + (g["y0"] - g["hy"]) / px_nm,
                c.col + (g["x0"] - g["hx"]) / px_nm,
                c.row + (g["y0"] + g["hy"]) / px_nm,
                c.col + (g["x0"] + g["hx"]) / px_nm,
            ]
            for c, g in zip(cavities, geo, strict=True)
        ]
    )
    # frame with a border so that cavities cut by the edge propagate correctly
    pad = margin
    D = np.zeros((M + 2 * pad, N + 2 * pad), np.complex64)
    s = max(1, int(oversample))
    for grp in _group_overlapping(own):
        r0 = int(np.floor(own[grp, 0].min())) - margin
        c0 = int(np.floor(own[grp, 1].min())) - margin
        h = _fast_len(int(np.ceil(own[grp, 2].max())) + margin - r0)
        w = _fast_len(int(np.ceil(own[grp, 3].max())) + margin - c0)
        t = np.zeros((h * s, w * s), np.float32)
        owner = np.zeros((h * s, w * s), np.int32) if return_masks else None
        ys = (r0 + (np.arange(h * s) + 0.5) / s)[:, None]  # sub-pixel centres, px
        xs = (c0 + (np.arange(w * s) + 0.5) / s)[None, :]
        for k in grp:
            c = cavities[k]
            a0 = max(0, int((own[k, 0] - r0) * s) - 1)
            a1 = min(h * s, int(np.ceil((own[k, 2] - r0) * s)) + 2)
            b0 = max(0, int((own[k, 1] - c0) * s) - 1)
            b1 = min(w * s, int(np.ceil((own[k, 3] - c0) * s)) + 2)
            # offsets from the centre (nm): a column and a row, broadcast by the chord
            yy = ((ys[a0:a1] - c.row) * px_nm).astype(np.float32)
            xx = ((xs[:, b0:b1] - c.col) * px_nm).astype(np.float32)
            tk = c.chord(yy, xx)
            if return_masks:
                owner[a0:a1, b0:b1][tk > 0] = k + 1
            t[a0:a1, b0:b1] += tk
        wave = np.zeros(t.shape, np.complex64)
        inside = t > 0
        ti = t[inside]
        # T - 1 = exp(t / 2L) exp(-i sigma V0 t) - 1 from real float32 parts (8x faster than
        # numpy's complex64 exp)
        amp = np.exp(ti * np.float32(1 / (2 * optics.absorption_nm)))
        phase = ti * np.float32(optics.sigma * optics.v0)
        wave.real[inside] = amp * np.cos(phase) - 1
        wave.imag[inside] = -amp * np.sin(phase)
        if s > 1:  # mean over s x s sub-pixels (strided sums beat a reduce over two axes)
            acc = np.zeros((h, w), np.complex64)
            for i in range(s):
                for j in range(s):
                    acc += wave[i::s, j::s]
            wave = acc * np.float32(1 / s**2)
        H = _cached_tf(
            (h, w),
            px_nm,
            optics.df_nm,
            optics.cs_mm,
            optics.alpha_mrad,
            optics.focal_spread_nm,
            optics.aperture_inv_nm,
            optics.wavelength_nm,
        )
        f = sfft.fft2(wave, overwrite_x=True)
        f *= H
        d = sfft.ifft2(f, overwrite_x=True)
        # paste into the padded frame (clipped)
        pr0, pc0 = r0 + pad, c0 + pad
        fr0, fc0 = max(pr0, 0), max(pc0, 0)
        fr1, fc1 = min(pr0 + h, D.shape[0]), min(pc0 + w, D.shape[1])
        if fr1 <= fr0 or fc1 <= fc0:
            continue
        D[fr0:fr1, fc0:fc1] += d[fr0 - pr0 : fr1 - pr0, fc0 - pc0 : fc1 - pc0]
        if return_masks:
            # a pixel belongs to the cavity covering its centre
            sub = owner[s // 2 :: s, s // 2 :: s] if s > 1 else owner
            mr0, mc0 = max(r0, 0), max(c0, 0)
            mr1, mc1 = min(r0 + h, M), min(c0 + w, N)
            if mr1 > mr0 and mc1 > mc0:
                sub = sub[mr0 - r0 : mr1 - r0, mc0 - c0 : mc1 - c0]
                view = masks[mr0:mr1, mc0:mc1]
                view[sub > 0] = sub[sub > 0]
    D = D[pad : pad + M, pad : pad + N]
    dr, di = D.real, D.imag
    dI = dr * (2 + dr) + di * di
    if optics.psf_px > 0:
        dI = _blur(dI, optics.psf_px)
    return dI.astype(np.float32), masks


@functools.lru_cache(maxsize=64)
def _cached_tf(
    shape, px_nm, df_nm, cs_mm, alpha_mrad, focal_spread_nm, aperture_inv_nm, wavelength_nm
):
    return transfer_function(
        shape, px_nm, df_nm, cs_mm, alpha_mrad, focal_spread_nm, aperture_inv_nm, wavelength_nm
    )


def _group_overlapping(boxes: np.ndarray) -> list[list[int]]:
    """Connected groups of boxes ``(K, 4)`` [r0, c0, r1, c1] that overlap (union-find)."""
    n = len(boxes)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    ov = (
        (boxes[:, None, 0] < boxes[None, :, 2])
        & (boxes[None, :, 0] < boxes[:, None, 2])
        & (boxes[:, None, 1] < boxes[None, :, 3])
        & (boxes[None, :, 1] < boxes[:, None, 3])
    )
    for i, j in zip(*np.nonzero(np.triu(ov, 1)), strict=True):
        a, b = find(i), find(j)
        if a != b:
            parent[a] = b
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def line_profile(
    radius_nm: float,
    df_nm: float,
    px_nm: float = 0.1,
    half_width_nm: float | None = None,
    optics: Optics | None = None,
    faceted: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Intensity along a line through the centre of one cavity in a uniform foil.

    Returns
    -------
    x_nm, intensity
        ``(L,)`` positions from the centre (nm) and intensities (1 = foil).
    """
    optics = dataclasses.replace(optics or Optics(psf_px=0.0), df_nm=df_nm)
    half = half_width_nm or (radius_nm + 6 * np.sqrt(WAVELENGTH_NM * abs(df_nm)) + 5)
    n = int(np.ceil(2 * half / px_nm))
    n += n % 2
    cav = Cavity(n / 2, n / 2, radius_nm, faceted=faceted, rotation=np.eye(3))
    dI, _ = cavity_intensity([cav], (n + 1, n), px_nm, optics, oversample=1, return_masks=False)
    row = 1 + dI[n // 2]
    x = (np.arange(n) + 0.5 - n / 2) * px_nm
    return x, row


def fringe_position(
    x_nm: np.ndarray, profile: np.ndarray, radius_nm: float, df_nm: float
) -> tuple[float, float]:
    """Distance (nm) from the cavity edge to its first Fresnel fringe, and the fringe contrast.

    The fringe is the darkest (under-focus, ``df < 0``) or brightest (over-focus) point of
    a :func:`line_profile` between ``0.5 sqrt(lambda |df|)`` inside the edge and
    ``3 sqrt(lambda |df|)`` outside it (right-hand side of the profile).

    Returns
    -------
    distance_nm, contrast
        Signed distance from the edge (positive = outside the cavity) and ``I - 1``.
    """
    scale = np.sqrt(WAVELENGTH_NM * abs(df_nm))
    zone = (x_nm > radius_nm - 0.5 * scale) & (x_nm < radius_nm + 3 * scale)
    if not zone.any():
        raise ValueError(
            f"Profile does not reach {radius_nm + 3 * scale:.1f} nm; expected a wider profile"
        )
    p = profile[zone]
    i = int(np.argmin(p) if df_nm < 0 else np.argmax(p))
    return float(x_nm[zone][i] - radius_nm), float(p[i] - 1)


def fringe_width(x_nm: np.ndarray, profile: np.ndarray, radius_nm: float, df_nm: float) -> float:
    """Full width at half depth (nm) of the first Fresnel fringe of a :func:`line_profile`.

    Around the fringe found by :func:`fringe_position`, the width of the region where
    ``|I - 1|`` stays above half the fringe's contrast. Scales like ``sqrt(lambda |df|)``.
    """
    dist, c = fringe_position(x_nm, profile, radius_nm, df_nm)
    i = int(np.argmin(np.abs(x_nm - (radius_nm + dist))))
    dev = (profile - 1) * np.sign(c)
    lo = i
    while lo > 0 and dev[lo - 1] > abs(c) / 2:
        lo -= 1
    hi = i
    while hi < len(dev) - 1 and dev[hi + 1] > abs(c) / 2:
        hi += 1
    step = float(x_nm[1] - x_nm[0])
    return float(x_nm[hi] - x_nm[lo]) + step


# --------------------------------------------------------------------------- backgrounds


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a float32 image to ``(M, N)`` (OpenCV cubic when present, else scipy)."""
    try:
        import cv2

        return cv2.resize(a.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    except ImportError:  # pragma: no cover - opencv comes with the yolo extra
        from scipy.ndimage import zoom

        return zoom(a, (shape[0] / a.shape[0], shape[1] / a.shape[1]), order=1).astype(np.float32)


def _lowres_field(rng, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field ``(m, n)`` with correlation length ``scale_px``."""
    m, n = shape
    w = rng.standard_normal((m, n)).astype(np.float32)
    qy = sfft.fftfreq(m)[:, None]
    qx = sfft.rfftfreq(n)[None, :]
    g = sfft.irfft2(
        sfft.rfft2(w) * np.exp(-2 * (np.pi * scale_px) ** 2 * (qy**2 + qx**2)), s=(m, n)
    )
    return ((g - g.mean()) / (g.std() + 1e-12)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _noise_bank(n: int = 2048) -> np.ndarray:
    """A fixed ``(n, n)`` field of standard normal float32 noise (built once per process)."""
    return np.random.default_rng(0x5EED).standard_normal((n, n), dtype=np.float32)


def _white_noise(rng, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal noise ``(M, N)``: a random crop of the noise bank, randomly flipped.

    Drawing a million normals costs more than the rest of the background; a crop at a
    random offset (about 4 million of them in a 2048 px bank) with flips is as good for a
    camera-noise texture. Frames larger than the bank get fresh noise.
    """
    bank = _noise_bank()
    M, N = shape
    if M > bank.shape[0] or N > bank.shape[1]:
        return rng.standard_normal(shape, dtype=np.float32)
    r0 = int(rng.integers(0, bank.shape[0] - M + 1))
    c0 = int(rng.integers(0, bank.shape[1] - N + 1))
    a = bank[r0 : r0 + M, c0 : c0 + N]
    if rng.random() < 0.5:
        a = a[::-1]
    if rng.random() < 0.5:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def synthetic_background(
    shape: tuple[int, int], rng=None, noise: float | None = None
) -> np.ndarray:
    """An embedded BF-TEM-like foil background ``(M, N)`` float32 around 1.

    Thickness gradient, bend contours (broad dark bands), mottled diffraction contrast on
    several scales, dislocation lines, small dark dots (radiation damage, distractors) and
    correlated shot-like noise. Every ingredient's strength is drawn from ``rng``. Smooth
    parts are built on a 4x coarser grid and resized once (fast).
    """
    rng = np.random.default_rng(rng)
    M, N = shape
    m, n = max(16, M // 4), max(16, N // 4)
    yy = np.linspace(-0.5, 0.5, m, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, n, dtype=np.float32)[None, :]
    th = rng.uniform(0, 2 * np.pi)
    b = 1 + rng.uniform(-0.3, 0.3) * (np.cos(th) * xx + np.sin(th) * yy)
    for _ in range(int(rng.integers(0, 3))):  # bend contours
        f = _lowres_field(rng, (m, n), rng.uniform(0.15, 0.4) * max(m, n))
        lev, wid = rng.uniform(-1.5, 1.5), rng.uniform(0.1, 0.35)
        b = b - rng.uniform(0.15, 0.45) * np.exp(-(((f - lev) / wid) ** 2))
    b = b + rng.uniform(0.04, 0.14) * _lowres_field(
        rng, (m, n), rng.uniform(6, 30)
    )  # coarse mottle
    for _ in range(int(rng.integers(0, 3)) // 2 + int(rng.random() < 0.3)):  # dislocation lines
        f = _lowres_field(rng, (m, n), rng.uniform(15, 60))
        b = b - rng.uniform(0.08, 0.3) * np.exp(-((f / rng.uniform(0.03, 0.08)) ** 2))
    b = _resize(b, shape)
    half = (max(8, M // 2), max(8, N // 2))  # fine mottle, built at half resolution
    fine = _blur(rng.standard_normal(half, dtype=np.float32), rng.uniform(0.8, 2.0))
    b = b + rng.uniform(0.02, 0.08) * _resize(fine / (fine.std() + 1e-9), shape)
    n_dots = int(rng.integers(0, 80) * M * N / 1024**2)
    if n_dots:  # black dots: Gaussian stamps (cheaper than blurring a whole frame of deltas)
        rows, cols = rng.integers(0, M, n_dots), rng.integers(0, N, n_dots)
        depth = rng.uniform(0.5, 1.0, n_dots)
        size = rng.uniform(1.0, 3.0)
        depth = depth * rng.uniform(0.1, 0.35)
        rad = int(np.ceil(3 * size))
        k = np.arange(-rad, rad + 1, dtype=np.float32) ** 2
        stamp = np.exp(-(k[:, None] + k[None, :]) / np.float32(2 * size**2))
        b = np.array(b, np.float32)
        for r, c, v in zip(rows, cols, depth, strict=True):
            r0, r1, c0, c1 = (
                max(r - rad, 0),
                min(r + rad + 1, M),
                max(c - rad, 0),
                min(c + rad + 1, N),
            )
            b[r0:r1, c0:c1] -= (
                np.float32(v) * stamp[r0 - r + rad : r1 - r + rad, c0 - c + rad : c1 - c + rad]
            )
    b = np.clip(b, 0.2, None)
    level = noise if noise is not None else rng.uniform(0.03, 0.12)
    # camera noise from white (sigma < 0.3 px: no blur) to correlated over ~1 px, as real
    # BF-TEM images show (their lag-1 noise correlation: median 0.09, 90th percentile 0.44)
    nz = _white_noise(rng, shape)
    corr = rng.uniform(0.0, 0.75)
    if corr >= 0.3:
        nz = _blur(nz, corr)
    nz *= level / (nz.std() + 1e-9)
    return (b * (1 + nz)).astype(np.float32)


def local_level(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Local mean level of ``image`` (Gaussian of ``sigma_px``, computed on a coarse grid)."""
    f = max(1, int(sigma_px // 4))
    a = np.asarray(image, np.float32)
    if f == 1:
        return _blur(a, sigma_px)
    try:
        import cv2

        small = cv2.resize(
            a, (max(1, a.shape[1] // f), max(1, a.shape[0] // f)), interpolation=cv2.INTER_AREA
        )
    except ImportError:  # pragma: no cover
        small = a[::f, ::f]
    return _resize(_blur(small, sigma_px / f), a.shape)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    try:
        import cv2

        return cv2.GaussianBlur(a.astype(np.float32), (0, 0), sigma)
    except ImportError:  # pragma: no cover
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(a.astype(np.float32), sigma)


# --------------------------------------------------------------------------- generator


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Parameters of the synthetic cavity images (ranges are drawn uniformly per image).

    Defocus: with ``fringe_px`` set, ``|df| = (f px)^2 / lambda`` for a fringe width ``f``
    drawn from ``fringe_px`` (pixels), as a microscopist picks the defocus for the
    magnification, clipped to ``df_nm`` (|df| bounds); otherwise ``|df|`` is drawn from
    ``df_nm``. A fraction ``overfocus_fraction`` of images is over-focus.

    Visibility (Rose's criterion): a cavity is labelled when its signal-to-noise ratio in
    the final 8-bit image (:func:`visibility_snr`: what it changes in the image, fringe
    included and clipping applied, over the image's noise) reaches ``min_snr`` and its
    peak contrast ``|dI|`` reaches ``min_contrast``; fainter ones are drawn but not
    labelled (invisible to a person too). ``min_snr = 0`` and ``min_contrast = 0`` label
    every cavity.

    Sizes: cavity diameters are log-normal with median ``d_median_nm`` (itself drawn
    from ``d_median_nm_range`` per image) and log-std ``d_sigma``; values outside
    ``d_range_nm``, above the image's foil thickness or below ``min_d_px`` pixels are
    redrawn.

    Density: the number of cavities is drawn from ``count``; taken in a random order,
    a cavity is left out when it would raise the void swelling of the foil under the
    image (thickness drawn from ``thickness_nm``) above ``max_swelling`` (%). Count,
    sizes and field are otherwise independent, and a small field full of large cavities
    reached hundreds of % (a 256 px training image 717 %, of 150 drawn); measured void
    swelling of steels stays below ~30 % even after fast-reactor doses, and that of
    ion-irradiated TEM foils mostly below 10 %.

    Noise: the relative noise of the embedded background is drawn log-uniformly from
    ``noise``; the default range gives final images whose pixel noise / mean level spans
    that of the real BF-TEM images of ``../shared/data`` (10th-90th percentile ~0.045-0.28).

    Sharpness: the cavities' image is blurred by a Gaussian of ``psf_px`` (camera, drift,
    compression). The default reaches 2.5 px because real high-magnification images show
    soft-edged cavities (e.g. ``cavity1`` of ``../shared/data``, 0.112 nm/px): a detector
    trained on 0.3-1.0 px found 70 % of cavities blurred by 1.5-2.5 px (60 images) where
    one trained on 0.3-2.5 px finds 81 %, and the same on sharp ones.
    """

    size: int = 1024
    nm_per_px: tuple[float, float] = (0.3, 1.0)
    df_nm: tuple[float, float] = (-3000.0, -250.0)
    fringe_px: tuple[float, float] | None = (1.0, 3.0)
    overfocus_fraction: float = 0.15
    thickness_nm: tuple[float, float] = (60.0, 150.0)
    v0: tuple[float, float] = (20.0, 28.0)
    absorption_nm: tuple[float, float] = (30.0, 200.0)
    alpha_mrad: tuple[float, float] = (0.05, 0.3)
    psf_px: tuple[float, float] = (0.3, 2.5)
    noise: tuple[float, float] = (0.03, 0.22)
    min_contrast: float = 0.03
    min_snr: float = 5.0
    d_median_nm_range: tuple[float, float] = (8.0, 40.0)
    d_sigma: float = 0.35
    d_range_nm: tuple[float, float] = (2.0, 80.0)
    min_d_px: float = 6.0
    count: tuple[int, int] = (5, 40)
    max_swelling: float = 30.0
    faceted_fraction: float = 0.5
    truncation: tuple[float, float] = (1.05, 1.6)
    max_overlap: float = 0.25
    edge_fraction: float = 0.1
    oversample: int = 2

    def __post_init__(self):
        for name in (
            "nm_per_px",
            "df_nm",
            "thickness_nm",
            "v0",
            "absorption_nm",
            "d_median_nm_range",
            "count",
            "noise",
        ):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(
                    f"Range {name}={getattr(self, name)!r} is reversed; expected (low, high)"
                )
        for name in ("overfocus_fraction", "faceted_fraction", "edge_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} {v!r} is out of range; expected 0 <= value <= 1")
        if not self.max_swelling > 0:
            raise ValueError(
                f"max_swelling {self.max_swelling!r} is not positive; expected a void swelling "
                "cap in % (e.g. 30)"
            )
        if self.size < 32:
            raise ValueError(f"Image size {self.size!r} is too small; expected at least 32 px")
        if self.noise[0] <= 0:
            raise ValueError(
                f"Noise range {self.noise!r} starts at zero or below; expected positive "
                "relative noise levels (drawn log-uniformly)"
            )


def _draw_diameters(rng, n: int, median: float, cfg: GeneratorConfig, px_nm: float) -> np.ndarray:
    lo = max(cfg.d_range_nm[0], cfg.min_d_px * px_nm)
    hi = cfg.d_range_nm[1]
    if lo >= hi:
        return np.full(n, lo)
    out = np.empty(0)
    for _ in range(50):
        d = median * np.exp(cfg.d_sigma * rng.standard_normal(n * 2 + 4))
        out = np.concatenate([out, d[(d >= lo) & (d <= hi)]])
        if len(out) >= n:
            break
    if len(out) < n:
        out = np.concatenate([out, rng.uniform(lo, hi, n - len(out))])
    return out[:n]


def place_cavities(
    rng,
    n: int,
    shape: tuple[int, int],
    px_nm: float,
    cfg: GeneratorConfig,
    avoid: np.ndarray | None = None,
    max_volume_nm3: float = np.inf,
) -> list[Cavity]:
    """Draw ``n`` cavities (sizes, shapes, positions) in a frame, limiting overlaps.

    ``avoid`` ``(K, 4)`` boxes ``[x1, y1, x2, y2]`` (px) of real cavities the simulated
    ones must not overlap. Two simulated cavities may overlap in projection by up to
    ``cfg.max_overlap`` of the smaller diameter; a fraction ``cfg.edge_fraction`` is
    placed across the frame edge. Taken in a random order, a cavity is kept while the
    spheres kept hold at most ``max_volume_nm3`` (the swelling cap), else left out.
    """
    M, N = shape
    median = rng.uniform(*cfg.d_median_nm_range)
    diam = _draw_diameters(rng, n, median, cfg, px_nm)
    vol = np.pi / 6 * diam**3
    if vol.sum() > max_volume_nm3:
        # in a random order, each cavity that still fits is kept
        keep, total = np.zeros(len(diam), bool), 0.0
        for i in rng.permutation(len(diam)):
            if total + vol[i] <= max_volume_nm3:
                keep[i], total = True, total + vol[i]
        diam = diam[keep]
    diam = np.sort(diam)[::-1]
    placed: list[Cavity] = []
    circ = []  # (row, col, r_px)
    if avoid is not None and len(avoid):
        for x1, y1, x2, y2 in np.asarray(avoid, float)[:, -4:]:
            circ.append(((y1 + y2) / 2, (x1 + x2) / 2, max(x2 - x1, y2 - y1) / 2 + 3))
    n_fixed = len(circ)
    for d in diam:
        r_px = d / 2 / px_nm
        faceted = rng.random() < cfg.faceted_fraction
        for _ in range(30):
            if rng.random() < cfg.edge_fraction:
                side = rng.integers(4)
                t = rng.uniform(0, 1)
                off = rng.uniform(-0.6, 0.4) * r_px
                row, col = [(off, t * N), (M - off, t * N), (t * M, off), (t * M, N - off)][side]
            else:
                # centres keep the cavity inside (a cavity wider than the frame: centred)
                hr, hc = min(r_px, M / 2), min(r_px, N / 2)
                row, col = rng.uniform(hr, M - hr), rng.uniform(hc, N - hc)
            ok = True
            for i, (r2, c2, rr) in enumerate(circ):
                dist = np.hypot(row - r2, col - c2)
                allowed = rr + r_px - (cfg.max_overlap * 2 * min(rr, r_px) if i >= n_fixed else -2)
                if dist < allowed:
                    ok = False
                    break
            if ok:
                break
        else:
            continue
        if faceted:
            trunc = rng.uniform(*cfg.truncation)
            # scale the face distance so the equivalent diameter is close to d
            cav = Cavity(row, col, d / 2, True, trunc, _rotation(rng))
            cav = cav.scaled(d / cav.geometry()["d_eq"])
        else:
            cav = Cavity(row, col, d / 2)
        placed.append(cav)
        circ.append((row, col, r_px))
    return placed


def _labels(
    cavities: list[Cavity],
    shape,
    px_nm: float,
    masks: np.ndarray,
    dI: np.ndarray | None = None,
    min_contrast: float = 0.0,
    signal: np.ndarray | None = None,
    sigma: float | None = None,
    min_snr: float = 0.0,
) -> tuple[np.ndarray, list[dict]]:
    """YOLO label rows ``(K, 5)`` and table rows of the visible cavities.

    A cavity is labelled when at least 30 % of its box lies in the frame, its peak
    contrast ``max |dI|`` inside its box reaches ``min_contrast`` and, given the image
    ``signal`` of the cavities and the image noise ``sigma``, its :func:`visibility_snr`
    reaches ``min_snr``.
    """
    M, N = shape
    rows, boxes = [], []
    areas = np.bincount(masks.ravel(), minlength=len(cavities) + 1) if masks is not None else None
    for k, c in enumerate(cavities):
        g = c.geometry()
        cx, cy = c.col + g["x0"] / px_nm, c.row + g["y0"] / px_nm
        hx, hy = g["hx"] / px_nm, g["hy"] / px_nm
        full = [cx - hx, cy - hy, cx + hx, cy + hy]
        x1, y1 = max(full[0], 0.0), max(full[1], 0.0)
        x2, y2 = min(full[2], float(N)), min(full[3], float(M))
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        vis = (x2 - x1) * (y2 - y1) / ((full[2] - full[0]) * (full[3] - full[1]))
        if vis < 0.3 or (areas is not None and areas[k + 1] == 0):
            continue
        contrast = (
            float(np.abs(dI[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]).max())
            if dI is not None
            else 1.0
        )
        if contrast < min_contrast:
            continue
        snr = (
            visibility_snr(signal, (x1, y1, x2, y2), sigma)
            if signal is not None and sigma is not None
            else float("nan")
        )
        if snr < min_snr:  # NaN (no signal given) passes
            continue
        boxes.append([0, x1, y1, x2, y2])
        d_px = hx + hy  # mean of box width and height
        rows.append(
            dict(
                instance=k + 1,
                cx_px=cx,
                cy_px=cy,
                x1=x1,
                y1=y1,
                x2=x2,
                y2=y2,
                diameter_px=d_px,
                diameter_nm=d_px * px_nm,
                d_eq_nm=g["d_eq"],
                volume_nm3=g["volume"],
                shape="faceted" if c.faceted else "sphere",
                edge_cut=bool(vis < 0.999),
                contrast=contrast,
                snr=snr,
                source="simulated",
                polygon=np.round(np.clip(c.outline_px(px_nm), 0, [N, M]), 2).ravel().tolist(),
            )
        )
    return np.array(boxes, float).reshape(-1, 5), rows


def swelling_percent(diameters_nm, area_nm2: float, thickness_nm: float, volumes_nm3=None) -> float:
    """Void swelling in % from cavity diameters: ``100 V / (A t - V)``, ``V = sum(pi d^3 / 6)``.

    A cavity holds no more than the foil column under it: a "sphere" wider than 1.5 ``t``
    (a false or merged detection: real cavities fit in the foil) counts as that column,
    ``pi d^2 t / 4``, not as ``pi d^3 / 6``, which would exceed the foil's volume and turn
    the swelling negative. ``inf`` when the cavities' volume reaches the foil's, ``A t``.

    Parameters
    ----------
    diameters_nm
        ``(K,)`` cavity diameters, nm (spheres assumed).
    area_nm2
        Imaged area, nm^2.
    thickness_nm
        Foil thickness, nm.
    volumes_nm3
        ``(K,)`` true volumes to use instead of spheres (faceted shapes), nm^3.
    """
    if not area_nm2 > 0 or not thickness_nm > 0:
        raise ValueError(
            f"Area {area_nm2!r} nm^2 and thickness {thickness_nm!r} nm must be positive"
        )
    if volumes_nm3 is None:
        d = np.asarray(diameters_nm, float)
        v = float(np.sum(np.pi / 6 * d**2 * np.minimum(d, 1.5 * thickness_nm)))
    else:
        v = float(np.sum(volumes_nm3))
    foil = area_nm2 * thickness_nm
    return 100.0 * v / (foil - v) if v < foil else float("inf")


def _u(rng, lohi):
    return float(rng.uniform(lohi[0], lohi[1])) if lohi[1] > lohi[0] else float(lohi[0])


def draw_optics(rng, cfg: GeneratorConfig, px_nm: float) -> Optics:
    """Imaging settings of one image drawn from the config's ranges."""
    lo, hi = sorted(abs(v) for v in cfg.df_nm)
    if cfg.fringe_px:
        df = -float(np.clip((_u(rng, cfg.fringe_px) * px_nm) ** 2 / WAVELENGTH_NM, lo, hi))
    else:
        df = -_u(rng, (lo, hi))
    if rng.random() < cfg.overfocus_fraction:
        df = -df
    return Optics(
        df_nm=df,
        v0=_u(rng, cfg.v0),
        absorption_nm=_u(rng, cfg.absorption_nm),
        alpha_mrad=_u(rng, cfg.alpha_mrad),
        psf_px=_u(rng, cfg.psf_px),
    )


def generate_image(
    rng=None,
    cfg: GeneratorConfig | None = None,
    background: np.ndarray | None = None,
    real_boxes: np.ndarray | None = None,
    n_cavities: int | None = None,
    nm_per_px: float | None = None,
    optics: Optics | None = None,
) -> dict:
    """One labelled synthetic BF-TEM cavity image.

    Parameters
    ----------
    rng
        Seed or generator.
    cfg
        Generator parameters (default :class:`GeneratorConfig`).
    background
        ``(M, N)`` grey background (any scale; real BF-TEM image); default: embedded
        synthetic background of ``cfg.size``.
    real_boxes
        ``(K, 5)`` labels ``[class, x1, y1, x2, y2]`` of real cavities already in the
        background; kept as labels (``source = real``) and avoided by simulated ones.
    n_cavities
        Number of simulated cavities (default: drawn from ``cfg.count``).
    nm_per_px, optics
        Fix the calibration or imaging settings instead of drawing them.

    Returns
    -------
    dict
        ``image`` ``(M, N)`` uint8, ``boxes`` ``(K, 5)`` labels, ``masks`` ``(M, N)``
        uint16 instance labels (labelled simulated cavities; 0 elsewhere), ``cavities`` (list of
        table rows), ``meta`` (nm/px, defocus, thickness, optics, swelling).
    """
    rng = np.random.default_rng(rng)
    cfg = cfg or GeneratorConfig()
    px = float(nm_per_px) if nm_per_px else _u(rng, cfg.nm_per_px)
    opt = optics or draw_optics(rng, cfg, px)
    if background is None:
        noise = float(np.exp(_u(rng, np.log(cfg.noise))))
        bg = synthetic_background((cfg.size, cfg.size), rng, noise=noise)
        level, span = rng.uniform(90, 170), rng.uniform(0.7, 1.3)
        bg_real = False
    else:
        bg = np.asarray(background, np.float32)
        if bg.ndim != 2:
            raise ValueError(f"Background of shape {bg.shape} is not grey; expected (M, N)")
        level, span = None, None
        bg_real = True
    shape = bg.shape
    n = (
        int(n_cavities)
        if n_cavities is not None
        else int(rng.integers(cfg.count[0], cfg.count[1] + 1))
    )
    real = np.zeros((0, 5)) if real_boxes is None else np.asarray(real_boxes, float).reshape(-1, 5)
    t_foil = _u(rng, cfg.thickness_nm)
    # a cavity is no larger than the foil that holds it
    sized = dataclasses.replace(cfg, d_range_nm=(cfg.d_range_nm[0], min(cfg.d_range_nm[1], t_foil)))
    # the cavities' volume in the foil under the image, for at most cfg.max_swelling %
    foil = shape[0] * shape[1] * px**2 * t_foil
    v_max = foil * cfg.max_swelling / (100.0 + cfg.max_swelling)
    if len(real):
        w, h = real[:, 3] - real[:, 1], real[:, 4] - real[:, 2]
        v_max -= float(np.sum(np.pi / 6 * ((w + h) / 2 * px) ** 3))
    cavs = place_cavities(
        rng,
        n,
        shape,
        px,
        sized,
        avoid=real[:, 1:] if len(real) else None,
        max_volume_nm3=max(v_max, 0.0),
    )
    dI, masks = cavity_intensity(cavs, shape, px, opt, oversample=cfg.oversample)
    # local level: a broad blur of the background, so cavities sit on their own surroundings
    local = local_level(bg, max(4.0, 0.02 * max(shape)))
    img = bg + local * dI
    if bg_real:
        final, final_bg = np.clip(img, 0, 255), np.clip(bg, 0, 255)
    else:  # the same grey-level mapping with and without the cavities
        gain = np.float32(span * 38 / (img.std() + 1e-6))
        offset = np.float32(level) - gain * np.float32(img.mean())
        final = np.clip(offset + gain * img, 0, 255)
        final_bg = np.clip(offset + gain * bg, 0, 255)
    out = np.rint(final).astype(np.uint8)
    boxes, rows = _labels(
        cavs,
        shape,
        px,
        masks,
        dI,
        cfg.min_contrast,
        signal=final - final_bg,
        sigma=noise_sigma(final_bg),
        min_snr=cfg.min_snr,
    )
    # masks hold the labelled cavities only (value = instance of their row)
    if len(rows) < len(cavs):
        keep = np.zeros(len(cavs) + 1, np.uint16)
        labelled = [r["instance"] for r in rows]
        keep[labelled] = labelled
        masks = keep[masks]
    for r in rows:
        r["defocus_nm"] = opt.df_nm
    for x1, y1, x2, y2 in real[:, 1:]:
        d = (x2 - x1 + y2 - y1) / 2
        rows.append(
            dict(
                instance=0,
                cx_px=(x1 + x2) / 2,
                cy_px=(y1 + y2) / 2,
                x1=x1,
                y1=y1,
                x2=x2,
                y2=y2,
                diameter_px=d,
                diameter_nm=d * px,
                d_eq_nm=d * px,
                volume_nm3=np.pi * (d * px) ** 3 / 6,
                shape="real",
                edge_cut=bool(x1 <= 0 or y1 <= 0 or x2 >= shape[1] or y2 >= shape[0]),
                contrast=float("nan"),
                snr=float("nan"),
                source="real",
                defocus_nm=float("nan"),
            )
        )
    if len(real):
        boxes = np.vstack([boxes, np.c_[np.zeros(len(real)), real[:, 1:]]])
    area = shape[0] * shape[1] * px**2
    d_all = np.array([r["diameter_nm"] for r in rows])
    v_all = np.array([r["volume_nm3"] for r in rows])
    meta = dict(
        height_px=shape[0],
        width_px=shape[1],
        nm_per_px=px,
        defocus_nm=opt.df_nm,
        thickness_nm=t_foil,
        n_simulated=sum(r["source"] == "simulated" for r in rows),
        n_real=len(real),
        swelling_percent=swelling_percent(d_all, area, t_foil),
        swelling_true_volume_percent=swelling_percent(d_all, area, t_foil, volumes_nm3=v_all),
        background="real" if bg_real else "synthetic",
        v0=opt.v0,
        absorption_nm=opt.absorption_nm,
        alpha_mrad=opt.alpha_mrad,
        psf_px=opt.psf_px,
    )
    return dict(image=out, boxes=boxes, masks=masks, cavities=rows, meta=meta)


# --------------------------------------------------------------------------- backgrounds on disk


def read_backgrounds(folder: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Read a folder of BF-TEM images with optional YOLO labels of their real cavities.

    Labels are ``<stem>.txt`` next to the image or in ``<folder>/labels/``. An image
    without a label file is taken as free of cavities (label them, or a detector trained
    on it learns to ignore real cavities).

    Returns
    -------
    list of (name, image (M, N) uint8, labels (K, 5) [class, x1, y1, x2, y2] px)
    """

    out = []
    for f in list_images(folder):
        img = read_image(f)
        lab = np.zeros((0, 5))
        for cand in (f.with_suffix(".txt"), f.parent / "labels" / f"{f.stem}.txt"):
            if cand.is_file():
                b = read_yolo_txt(cand, img.shape)
                lab = b[:, [5, 0, 1, 2, 3]]
                break
        out.append((f.name, img, lab))
    return out


def crop_background(
    rng, image: np.ndarray, labels: np.ndarray, size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (and resize to ``size`` when smaller), flips and 90-degree turns, labels following."""
    img = np.asarray(image, np.float32)
    lab = np.asarray(labels, float).reshape(-1, 5).copy()
    M, N = img.shape
    if size is not None:
        c = min(size, M, N)
        r0 = int(rng.integers(0, M - c + 1))
        c0 = int(rng.integers(0, N - c + 1))
        img = img[r0 : r0 + c, c0 : c0 + c]
        lab[:, [1, 3]] -= c0
        lab[:, [2, 4]] -= r0
        if c != size:
            img = _resize(img, (size, size))
            lab[:, 1:] *= size / c
        M = N = size
        x1, y1 = np.clip(lab[:, 1], 0, N), np.clip(lab[:, 2], 0, M)
        x2, y2 = np.clip(lab[:, 3], 0, N), np.clip(lab[:, 4], 0, M)
        full = (lab[:, 3] - lab[:, 1]) * (lab[:, 4] - lab[:, 2])
        keep = ((x2 - x1) >= 2) & ((y2 - y1) >= 2) & ((x2 - x1) * (y2 - y1) >= 0.3 * full)
        lab = np.c_[lab[:, 0], x1, y1, x2, y2][keep]
    if rng.random() < 0.5:
        img = img[:, ::-1]
        lab[:, [1, 3]] = img.shape[1] - lab[:, [3, 1]]
    if rng.random() < 0.5:
        img = img[::-1]
        lab[:, [2, 4]] = img.shape[0] - lab[:, [4, 2]]
    if rng.random() < 0.5:  # transpose
        img = img.T
        lab = lab[:, [0, 2, 1, 4, 3]]
    return np.ascontiguousarray(img), lab


# --------------------------------------------------------------------------- dataset


def _one(args) -> tuple[str, dict, list[dict]]:
    """Generate image ``i`` and write its PNG, YOLO txt and mask (runs in a worker)."""
    i, seed, cfg, bg, fraction, tmp, width = args
    rng = np.random.default_rng(seed)
    if bg is not None:
        name, img, lab = bg
        img, lab = crop_background(rng, img, lab, cfg.size)
        n = None
        if len(lab) and fraction is not None:  # simulated / (simulated + real) = fraction
            n = int(round(fraction / max(1e-9, 1 - fraction) * len(lab)))
        res = generate_image(rng, cfg, background=img, real_boxes=lab, n_cavities=n)
        res["meta"]["background_file"] = name
    else:
        res = generate_image(rng, cfg)
    stem = f"cav_{i:0{width}d}"
    tmp = Path(tmp)
    _write_png(tmp / "images" / f"{stem}.png", res["image"], "huffman")
    write_yolo_txt(
        tmp / "labels" / f"{stem}.txt", res["boxes"], res["image"].shape, with_conf=False
    )
    _write_png(tmp / "masks" / f"{stem}.png", res["masks"], "rle")
    return stem, res["meta"], res["cavities"]


def _write_png(path: Path, image: np.ndarray, strategy: str) -> None:
    """Write an 8- or 16-bit grey PNG fast (lossless; zlib level 1, one cheap row filter).

    ``"huffman"`` suits noisy images (Huffman coding only, rows filtered by the average of
    their neighbours: as small as libpng's adaptive filter choice, 2.2x faster at 1024 px),
    ``"rle"`` label masks that are mostly zero (run-length coding of rows filtered by the
    row above: 3x faster than the adaptive choice, 7 % larger).
    """
    try:
        import cv2

        strategy_flag, row_filter = {
            "huffman": (cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY, "IMWRITE_PNG_FILTER_AVG"),
            "rle": (cv2.IMWRITE_PNG_STRATEGY_RLE, "IMWRITE_PNG_FILTER_UP"),
        }[strategy]
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, strategy_flag]
        if hasattr(cv2, row_filter):  # where this OpenCV build exposes the row filter
            params += [cv2.IMWRITE_PNG_FILTER, getattr(cv2, row_filter)]
        ok, buf = cv2.imencode(".png", image, params)
        if not ok:
            raise OSError(f"Cannot encode {path.name} as PNG")
        path.write_bytes(buf.tobytes())
    except ImportError:  # pragma: no cover - opencv comes with the yolo extra
        from PIL import Image

        Image.fromarray(image).save(path, compress_level=1)


def generate_dataset(
    n: int,
    out_dir: str | Path,
    cfg: GeneratorConfig | None = None,
    backgrounds: str | Path | list | None = None,
    fraction: float | None = 0.3,
    rng=None,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Generate ``n`` labelled images into ``out_dir`` (replaced atomically) and return it.

    Layout: ``images/*.png`` (8-bit grey), ``labels/*.txt`` (YOLO, class 0 = cavity),
    ``masks/*.png`` (16-bit instance labels of the labelled simulated cavities; value = ``instance``
    of ``cavities.csv``), ``coco.json`` (boxes; polygons of the projected outlines),
    ``cavities.csv`` (one row per cavity: image, centre, box, diameter px/nm, equivalent
    diameter, volume, shape, defocus, simulated or real), ``images.csv`` (nm/px, defocus,
    foil thickness, counts, swelling %), ``generator.json`` (the config and seed).

    Parameters
    ----------
    n
        Number of images.
    cfg
        Generator parameters.
    backgrounds
        Folder of real BF-TEM images (see :func:`read_backgrounds`), or a list of
        ``(name, image, labels)``; ``None``: the embedded synthetic background.
    fraction
        Fraction of simulated cavities among all cavities of a background that has real,
        labelled ones (0.3 = 30 % simulated). Backgrounds without labels get
        ``cfg.count`` simulated cavities.
    rng
        Seed (int) for reproducibility; image ``i`` uses the ``i``-th child seed, so
        results do not depend on ``workers``.
    workers
        Processes (2 on a 2-core machine).
    progress
        Show a progress bar.
    """
    import csv

    from tqdm.auto import tqdm

    cfg = cfg or GeneratorConfig()
    if n < 1:
        raise ValueError(f"Number of images {n!r} must be at least 1")
    if fraction is not None and not 0 <= fraction < 1:
        raise ValueError(
            f"Fraction of simulated cavities {fraction!r} is out of range; expected 0 <= f < 1"
        )
    if isinstance(rng, np.random.Generator):
        seed = int(rng.integers(2**63))
    else:
        seed = rng
    ss = np.random.SeedSequence(seed)
    children = ss.spawn(n)
    bgs = None
    if backgrounds is not None:
        bgs = (
            read_backgrounds(backgrounds)
            if isinstance(backgrounds, str | Path)
            else list(backgrounds)
        )
    pick = np.random.default_rng(ss.spawn(1)[0]).integers(0, len(bgs), n) if bgs else None
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    width = max(5, len(str(n - 1)))
    cav_rows, img_rows, coco_imgs, coco_anns = [], [], [], []
    try:
        for sub in ("images", "labels", "masks"):
            (tmp / sub).mkdir()
        jobs = [
            (i, children[i], cfg, bgs[pick[i]] if bgs else None, fraction, str(tmp), width)
            for i in range(n)
        ]
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            ex = ProcessPoolExecutor(max_workers=workers)
            it = ex.map(_one, jobs, chunksize=2)
        else:
            ex = None
            it = map(_one, jobs)
        try:
            for i, (stem, m, cavs) in enumerate(
                tqdm(it, total=n, desc="cavity images", disable=not progress)
            ):
                img_rows.append(dict(image=f"{stem}.png", **m))
                coco_imgs.append(
                    dict(
                        id=i + 1,
                        file_name=f"images/{stem}.png",
                        height=m["height_px"],
                        width=m["width_px"],
                    )
                )
                for r in cavs:
                    poly = r.pop("polygon", None)
                    cav_rows.append(
                        dict(
                            image=f"{stem}.png",
                            **{
                                k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in r.items()
                            },
                        )
                    )
                    ann = dict(
                        id=len(coco_anns) + 1,
                        image_id=i + 1,
                        category_id=1,
                        bbox=[
                            round(r["x1"], 2),
                            round(r["y1"], 2),
                            round(r["x2"] - r["x1"], 2),
                            round(r["y2"] - r["y1"], 2),
                        ],
                        area=float((r["x2"] - r["x1"]) * (r["y2"] - r["y1"])),
                        iscrowd=0,
                        attributes=dict(
                            source=r["source"],
                            diameter_nm=round(r["diameter_nm"], 3),
                            instance=r["instance"],
                        ),
                    )
                    if poly:
                        ann["segmentation"] = [poly]
                    coco_anns.append(ann)
        finally:
            if ex is not None:
                ex.shutdown()
        coco = dict(
            info=dict(description="temlib synthetic BF-TEM cavities", seed=str(seed)),
            images=coco_imgs,
            annotations=coco_anns,
            categories=[dict(id=1, name="cavity")],
        )
        (tmp / "coco.json").write_text(json.dumps(coco))
        for name, rows in (("cavities.csv", cav_rows), ("images.csv", img_rows)):
            with open(tmp / name, "w", newline="") as fh:
                cols = list(rows[0]) if rows else ["image"]
                for r in rows:
                    cols += [k for k in r if k not in cols]
                wr = csv.DictWriter(fh, fieldnames=cols)
                wr.writeheader()
                wr.writerows(rows)
        (tmp / "generator.json").write_text(
            json.dumps(
                dict(
                    config=dataclasses.asdict(cfg),
                    seed=str(seed),
                    n=n,
                    fraction=fraction,
                    backgrounds=str(backgrounds) if isinstance(backgrounds, str | Path) else None,
                ),
                indent=2,
            )
        )
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d cavity images to %s", n, out_dir)
    return out_dir


def load_dataset(folder) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    """Read generated datasets: images ``(M, N)`` uint8, labels ``(K, 5)`` px, metadata rows.

    ``folder`` is one output folder of :func:`generate_dataset` or a list of them (joined).
    """
    import csv

    if isinstance(folder, list | tuple):
        parts = [load_dataset(f) for f in folder]
        return tuple([x for p in parts for x in p[k]] for k in range(3))
    folder = Path(folder)
    if not (folder / "images.csv").is_file():
        raise FileNotFoundError(
            f"No generated cavity dataset in {folder}; expected images.csv from generate_dataset"
        )
    with open(folder / "images.csv") as fh:
        meta = list(csv.DictReader(fh))
    imgs, labs = [], []
    for m in meta:
        for k, v in list(m.items()):
            try:
                m[k] = float(v)
            except (TypeError, ValueError):
                pass
        img = read_image(folder / "images" / m["image"])
        b = read_yolo_txt(folder / "labels" / (Path(m["image"]).stem + ".txt"), img.shape)
        imgs.append(img)
        labs.append(b[:, [5, 0, 1, 2, 3]])
    return imgs, labs, meta


def recall_by(
    predictions: list[np.ndarray],
    folder,
    column: str = "snr",
    bins=(5, 8, 12, 20, 40, np.inf),
    iou_threshold: float = 0.5,
):
    """Share of the simulated cavities of a generated dataset found, by one of their properties.

    It says where a detector's limit lies. ``column`` is a column of ``cavities.csv``:
    ``snr`` (default; the cavity's signal-to-noise ratio in its image,
    :func:`visibility_snr`: the generator labels cavities from ``min_snr``, 5 by default,
    Rose's criterion for an ideal observer), ``contrast`` (peak ``max |dI|`` inside the
    box, relative to the local background level) or ``diameter_px``, ``diameter_nm``...

    Parameters
    ----------
    predictions
        ``(K, 4+)`` boxes ``[x1, y1, x2, y2, ...]`` per image, in the order of
        :func:`load_dataset` (``images.csv``).
    folder
        The dataset folder (:func:`generate_dataset`).
    column
        The property binned.
    bins
        Edges of the bins (lower edge included); cavities outside them are not counted.
    iou_threshold
        A cavity is found when a prediction matches it one-to-one at this IoU.

    Returns
    -------
    pd.DataFrame
        One row per bin: ``column`` (the bin), ``cavities``, ``found``, ``recall``.
    """
    import pandas as pd

    from .detect import match

    folder = Path(folder)
    images = pd.read_csv(folder / "images.csv")
    if len(predictions) != len(images):
        raise ValueError(
            f"Got {len(predictions)} prediction arrays for the {len(images)} images of {folder}; "
            "expected one per image, in the order of images.csv"
        )
    table = pd.read_csv(folder / "cavities.csv")
    if column not in table.columns:
        raise ValueError(
            f"{folder / 'cavities.csv'} has no column {column!r}; expected one of "
            f"{', '.join(table.columns)}"
        )
    parts = []
    for name, pred in zip(images.image, predictions, strict=True):
        t = table[(table.image == name) & (table.source == "simulated")]
        truth = np.c_[np.zeros(len(t)), t[["x1", "y1", "x2", "y2"]].to_numpy(float)]
        found = np.zeros(len(t), bool)
        found[match(np.asarray(pred, float), truth, iou_threshold)["matches"][:, 1]] = True
        parts.append(pd.DataFrame({column: t[column].to_numpy(float), "found": found}))
    df = pd.concat(parts, ignore_index=True)
    df["bin"] = pd.cut(df[column], np.asarray(bins, float), right=False)
    out = df.groupby("bin", observed=False).found.agg(cavities="size", found="sum")
    out["recall"] = out.found / out.cavities.where(out.cavities > 0)
    return out.reset_index().rename(columns={"bin": column})


def swelling_error_by(swelling_true, swelling_pred, bins=(0, 1, 5, 10, 30, np.inf)):
    """Swelling error of a detector by the images' true swelling.

    An absolute error in % means little without the swelling it was made at: a detector
    that finds cavity volumes to 10 % errs by 0.1 % at 1 % swelling and by 2 % at 20 %.

    Parameters
    ----------
    swelling_true, swelling_pred
        ``(K,)`` per-image swelling %, true and detected (:func:`temlib.detect.evaluate`'s
        ``swelling_true`` and ``swelling_pred``).
    bins
        Edges of the true-swelling bins (%, lower edge included).

    Returns
    -------
    pd.DataFrame
        One row per bin: ``swelling (%)``, ``images``, ``mean true (%)``, ``mean abs error
        (%)``, ``median abs error (%)``, ``mean relative error`` (``|pred - true| / true``).
    """
    import pandas as pd

    t, p = np.asarray(swelling_true, float), np.asarray(swelling_pred, float)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(
            f"Got true swellings of shape {t.shape} and detected ones of shape {p.shape}; "
            "expected two (K,) arrays, one value per image"
        )
    df = pd.DataFrame({"true": t, "err": np.abs(p - t)})
    df["rel"] = df.err / df.true.where(df.true > 0)
    df["bin"] = pd.cut(df.true, np.asarray(bins, float), right=False)
    g = df.groupby("bin", observed=False)
    out = pd.DataFrame(
        {
            "images": g.size(),
            "mean true (%)": g.true.mean(),
            "mean abs error (%)": g.err.mean(),
            "median abs error (%)": g.err.median(),
            "mean relative error": g.rel.mean(),
        }
    )
    return out.reset_index().rename(columns={"bin": "swelling (%)"})


# --------------------------------------------------------------------------- realism checks


def radial_power_spectrum(image: np.ndarray, n_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthally averaged power spectrum of a mean-normalised image.

    Returns
    -------
    q, power
        ``(n_bins,)`` spatial frequency in cycles/px (0 to 0.5) and mean power.
    """
    a = np.asarray(image, np.float64)
    a = a / (a.mean() + 1e-12) - 1
    win = np.hanning(a.shape[0])[:, None] * np.hanning(a.shape[1])[None, :]
    p = np.abs(sfft.fft2(a * win)) ** 2 / a.size
    qy = sfft.fftfreq(a.shape[0])[:, None]
    qx = sfft.fftfreq(a.shape[1])[None, :]
    q = np.sqrt(qy**2 + qx**2).ravel()
    edges = np.linspace(0, 0.5, n_bins + 1)
    idx = np.digitize(q, edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    power = np.bincount(idx[ok], weights=p.ravel()[ok], minlength=n_bins) / np.maximum(
        np.bincount(idx[ok], minlength=n_bins), 1
    )
    return 0.5 * (edges[1:] + edges[:-1]), power


def radial_profile(
    image: np.ndarray, row: float, col: float, r_max: float, n_bins: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity vs distance (px) from ``(row, col)`` out to ``r_max`` px."""
    a = np.asarray(image, np.float64)
    r0, r1 = int(max(0, row - r_max)), int(min(a.shape[0], row + r_max + 1))
    c0, c1 = int(max(0, col - r_max)), int(min(a.shape[1], col + r_max + 1))
    sub = a[r0:r1, c0:c1]
    yy, xx = np.mgrid[r0:r1, c0:c1]
    r = np.hypot(yy + 0.5 - row, xx + 0.5 - col).ravel()
    edges = np.linspace(0, r_max, n_bins + 1)
    idx = np.digitize(r, edges) - 1
    ok = (idx >= 0) & (idx < n_bins)
    prof = np.bincount(idx[ok], weights=sub.ravel()[ok], minlength=n_bins) / np.maximum(
        np.bincount(idx[ok], minlength=n_bins), 1
    )
    return 0.5 * (edges[1:] + edges[:-1]), prof


# --------------------------------------------------------------------------- command line


def _cli_cavity(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    g = sub.add_parser("generate", help="generate labelled synthetic BF-TEM cavity images")
    g.add_argument("--n", type=int, required=True, help="number of images")
    g.add_argument("--out", required=True, help="output folder (replaced)")
    g.add_argument(
        "--backgrounds",
        default=None,
        help="folder of BF-TEM images (+ YOLO labels of real cavities)",
    )
    g.add_argument(
        "--fraction",
        type=float,
        default=0.3,
        help="fraction of simulated cavities on labelled backgrounds",
    )
    g.add_argument(
        "--size", type=int, default=1024, help="image size in px (square; backgrounds are cropped)"
    )
    g.add_argument(
        "--nm-per-px",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="calibration range",
    )
    g.add_argument(
        "--defocus-nm",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="|defocus| range, nm",
    )
    g.add_argument(
        "--overfocus-fraction", type=float, default=None, help="fraction of over-focus images"
    )
    g.add_argument(
        "--count",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="simulated cavities per image",
    )
    g.add_argument(
        "--max-swelling",
        type=float,
        default=None,
        help="void swelling cap per image, %% (default 30: cavities left out above it)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--workers", type=int, default=2, help="processes (default 2)")

    def run(args) -> int:
        kw = dict(size=args.size)
        if args.nm_per_px:
            kw["nm_per_px"] = tuple(args.nm_per_px)
        if args.defocus_nm:
            lo, hi = sorted(abs(v) for v in args.defocus_nm)
            kw["df_nm"] = (-hi, -lo)
        if args.overfocus_fraction is not None:
            kw["overfocus_fraction"] = args.overfocus_fraction
        if args.count:
            kw["count"] = tuple(args.count)
        if args.max_swelling is not None:
            kw["max_swelling"] = args.max_swelling
        cfg = GeneratorConfig(**kw)
        out = generate_dataset(
            args.n,
            args.out,
            cfg,
            backgrounds=args.backgrounds,
            fraction=args.fraction,
            rng=args.seed,
            workers=args.workers,
        )
        print(
            f"wrote {args.n} labelled images to {out} (images/, labels/, masks/, coco.json, cavities.csv, images.csv)"
        )
        return 0

    return run


# --------------------------------------------------------------------------- notebook helpers


def fringe_widths(
    radii_nm, defoci_nm, px_nm: float = 0.1, optics: Optics | None = None
) -> np.ndarray:
    """Fringe widths (nm, :func:`fringe_width`) for every radius x defocus, ``(R, D)``."""
    opt = optics or Optics(psf_px=0.0)
    out = np.zeros((len(radii_nm), len(defoci_nm)))
    for i, r in enumerate(radii_nm):
        for j, df in enumerate(defoci_nm):
            x, p = line_profile(r, df, px_nm=px_nm, optics=opt)
            out[i, j] = fringe_width(x, p, r, df)
    return out


def mean_cavity_profile(
    images, boxes, n_bins: int = 30, r_max: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mean radial profile around cavities vs ``r / R`` (R = half the box's mean side).

    Each cavity's profile is divided by its local level (the mean from ``1.5 R`` to
    ``r_max R``), so profiles of different images compare; cavities with ``R < 3`` px or
    too close to an edge are skipped.

    Parameters
    ----------
    images
        Images ``(M, N)`` (a list, or one image with one box array).
    boxes
        Per image, boxes in any format of :mod:`temlib.detect`.

    Returns
    -------
    r_over_R, profile
        ``(n_bins,)`` each; ``profile`` is NaN when no cavity qualified.
    """

    if isinstance(images, np.ndarray) and images.ndim == 2:
        images, boxes = [images], [boxes]
    acc, n = np.zeros(n_bins), 0
    for img, b in zip(images, boxes, strict=True):
        a = np.asarray(img, np.float64)
        for x1, y1, x2, y2 in _xyxy(b):
            R = (x2 - x1 + y2 - y1) / 4
            cy, cx = (y1 + y2) / 2, (x1 + x2) / 2
            if (
                R < 3
                or cy - r_max * R < 0
                or cx - r_max * R < 0
                or cy + r_max * R > a.shape[0]
                or cx + r_max * R > a.shape[1]
            ):
                continue
            r, p = radial_profile(a, cy, cx, r_max * R, n_bins)
            ring = r > 1.5 * R
            acc += p / (p[ring].mean() + 1e-9)
            n += 1
    edges = np.linspace(0, r_max, n_bins + 1)
    return 0.5 * (edges[1:] + edges[:-1]), acc / n if n else np.full(n_bins, np.nan)


def shared_backgrounds(max_images: int = 40, rng=None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Real cavity-free BF-TEM backgrounds from ``../shared/data`` (in-situ frames), or ``[]``.

    The in-situ frames of 316L (512 px, ~0.39 nm/px) and FeCrAl (~0.37 nm/px) show
    dislocation loops and bend contours but no cavities: real texture to blend simulated
    cavities into (loops act as distractors). Returns ``(name, image, no labels)``.
    """
    from . import paths

    root = paths.shared_data()
    if root is None:
        return []
    files = sorted((root / "insitu" / "creme_316L" / "fov200nm" / "imgs").glob("*.png"))
    files += sorted((root / "insitu" / "fecral_video_frames").glob("*.jpg"))[::10]
    if not files:
        return []
    rng = np.random.default_rng(rng)
    pick = rng.permutation(len(files))[:max_images]
    return [(files[i].name, read_image(files[i]), np.zeros((0, 5))) for i in sorted(pick)]


def real_negative_images(max_images: int = 12) -> list[tuple[str, np.ndarray]]:
    """Real irradiated-foil images without cavities from ``../shared/data``, or ``[]``.

    The labelled FeCrAl defect images (BF-TEM, BF-STEM and HAADF, 1024-2048 px) hold
    dislocation loops and black dots, no cavities, and are not among the training
    backgrounds of :func:`shared_backgrounds`: every box a cavity detector draws on
    them is false. At most ``max_images``, spread over the set. Returns ``(name, image)``.
    """
    from . import insitu, paths

    root = paths.shared_data()
    if max_images < 1 or root is None:
        return []
    if not (root / "defects" / "fecral_multitype_valset").is_dir():
        return []
    images, _, names = insitu.read_fecral_labelled()
    idx = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).round())
    return [(names[i], images[i]) for i in idx.astype(int)]


def real_cavity_images(
    max_images: int = 6, max_size: int = 1024
) -> list[tuple[str, np.ndarray, float | None]]:
    """Real BF-TEM cavity images from ``../shared/data/cavities`` (no labels), or ``[]``.

    Larger images are centre-cropped to ``max_size``. Returns ``(name, image, nm/px or
    None)`` (nm/px from the dataset's conversion table where the name is listed).
    """
    import csv

    from . import paths

    root = paths.shared_data()
    folder = root / "cavities" / "bf_tem_cavities" if root else None
    if folder is None or not folder.is_dir():
        return []
    scale = {}
    table = folder / "image_nm_pixel_conversions.csv"
    if table.is_file():
        with open(table, encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                try:
                    scale[Path(row["Image"]).stem] = float(row["Conversion (nm/pixel)"])
                except (KeyError, ValueError):
                    pass
    files = sorted(folder.glob("*.png"))
    idx = np.linspace(0, len(files) - 1, min(max_images, len(files))).round().astype(int)
    out = []
    for i in idx:
        img = read_image(files[i])
        M, N = img.shape
        if max(M, N) > max_size:
            r0, c0 = max(0, (M - max_size) // 2), max(0, (N - max_size) // 2)
            img = img[r0 : r0 + max_size, c0 : c0 + max_size]
        out.append((files[i].name, img, scale.get(files[i].stem)))
    return out


# --------------------------------------------------------------------------- detector


def train_detector(
    out_dir: str | Path,
    data_dir: str | Path,
    n_images: int = 600,
    size: int = 256,
    count: tuple[int, int] = (4, 16),
    real_background_share: float = 0.3,
    imgsz: int = 256,
    epochs: int = 15,
    train_minutes: float = 0.0,
    batch: int = 8,
    model_cfg: str = "yolo11n.yaml",
    export_format: str | None = "openvino",
    seed: int = 0,
    config: GeneratorConfig | None = None,
    **train_kwargs,
) -> Path:
    """Generate cavity images, train a YOLO cavity detector from scratch on them, export it.

    ``n_images`` images of ``size`` px are generated into ``data_dir`` (``train/``, and
    ``train_real_bg/`` for the share on real cavity-free in-situ frames of
    ``../shared/data``, :func:`shared_backgrounds`; all on the embedded synthetic
    background when that folder is absent), written as a YOLO dataset (``yolo/``, 15 %
    validation) and trained with :func:`temlib.detect.train` into ``out_dir``. Cavities
    keep their pixel size: larger frames are detected with tiles of ``imgsz``, so the
    model's metadata stores the tiling defaults (tiles sharing half their size, plus a
    whole-frame pass for cavities larger than that).

    Parameters
    ----------
    out_dir
        Model folder (``best.pt``, ``metadata.json``, ``run/``, export), e.g.
        ``data/models/cavity``.
    data_dir
        Folder of the generated training data (its ``train/``, ``train_real_bg/`` and
        ``yolo/`` are replaced).
    n_images, size, count
        Generated training images, their size (px) and simulated cavities per image
        (``[min, max]``); ``config`` (a :class:`GeneratorConfig`) sets every other
        generator parameter, its ``size`` and ``count`` replaced by these.
    real_background_share
        Share of the images on real in-situ frames, ``0 <= share <= 1``.
    imgsz, epochs, batch, model_cfg
        Passed to :func:`temlib.detect.train`.
    train_minutes
        Wall-time budget of the training (ultralytics ``time``; the cosine learning-rate
        schedule is fitted to it); 0: run ``epochs``.
    export_format
        ``"openvino"``, ``"onnx"`` or None (no export).
    seed
        Seed of the generated images, the validation split and the training.
    train_kwargs
        Other ultralytics train arguments; they override the CPU defaults used here (one
        optimizer step per batch, no warm-up, validation once at the end, images in RAM).

    Returns
    -------
    Path
        ``<out_dir>/best.pt``.
    """
    from . import detect

    if n_images < 2:
        raise ValueError(f"n_images {n_images!r} is too few; expected at least 2 training images")
    if not 0 <= real_background_share <= 1:
        raise ValueError(
            f"real_background_share {real_background_share!r} is out of range; expected 0 <= share <= 1"
        )
    if train_minutes < 0:
        raise ValueError(
            f"train_minutes {train_minutes!r} is negative; expected >= 0 (0: run all epochs)"
        )
    cfg = dataclasses.replace(config or GeneratorConfig(), size=int(size), count=tuple(count))
    data_dir = Path(data_dir)
    n_real = int(round(real_background_share * n_images))
    backgrounds = shared_backgrounds(rng=seed) if n_real else []
    if not backgrounds:
        n_real = 0
    parts = []
    if n_images > n_real:
        parts.append(
            generate_dataset(
                n_images - n_real, data_dir / "train", cfg, rng=seed, workers=2, progress=False
            )
        )
    if n_real:
        parts.append(
            generate_dataset(
                n_real,
                data_dir / "train_real_bg",
                cfg,
                backgrounds=backgrounds,
                rng=seed + 1,
                workers=2,
                progress=False,
            )
        )
    images, labels, _ = load_dataset(parts)
    yaml_path = detect.write_yolo_dataset(
        images, labels, data_dir / "yolo", val_fraction=0.15, rng=seed
    )
    kw = dict(
        time=train_minutes / 60 or None,  # hours
        cos_lr=True,
        val=False,  # validate once at the end: every CPU second goes to training
        cache="ram",
        nbs=batch,  # one optimizer step per batch (no accumulation to 64): more steps per CPU second
        warmup_epochs=0,  # ultralytics warms up >= 100 steps, most of a short CPU budget
    )
    kw.update(train_kwargs)
    lo, hi = cfg.nm_per_px
    weights = detect.train(
        yaml_path,
        out_dir,
        imgsz=imgsz,
        epochs=epochs,
        batch=batch,
        model_cfg=model_cfg,
        seed=seed,
        metadata={"tile_overlap": 0.5, "tile_whole_frame": True},
        description=f"{len(images)} temlib.cavity images of {size} px ({n_real} on real in-situ "
        f"frames), {lo:g}-{hi:g} nm/px, {sum(map(len, labels))} labelled cavities",
        **kw,
    )
    if export_format:
        detect.export(weights, fmt=export_format, imgsz=imgsz)
    return weights


def fit_confidence(
    model_dir: str | Path,
    data_dir: str | Path,
    n_images: int = 60,
    size: int = 512,
    count: tuple[int, int] = (10, 50),
    real_negatives: int = 12,
    seed: int = 2000,
    config: GeneratorConfig | None = None,
):
    """Fit the confidence threshold of the cavity detector in ``model_dir`` and store it there.

    ``n_images`` validation images (``size`` px, ``count`` cavities, seed ``seed``: never
    the test images; ``config`` sets the other generator parameters) are generated into
    ``<data_dir>/val``; up to ``real_negatives`` real cavity-free FeCrAl images
    (:func:`real_negative_images`, none without ``../shared/data``) join them with no
    labels, so every box drawn on them is false and the threshold also answers for real
    foil textures. The detector of ``model_dir`` (its export when present) detects them
    with tiles; the threshold of best F1 at IoU 0.5 (:func:`temlib.detect.choose_confidence`)
    is written to the folder's ``metadata.json``, which :func:`temlib.detect.load_detector`
    and ``temlib detect`` read.

    Large boxes get their own threshold, ``conf_large``, for boxes longer than half the
    model's input (``large_px``, px of the image): a false large box (a dark patch of the
    background, a bend contour) weighs d^3 in the swelling, far more than a missed small
    cavity. It is the threshold (from ``conf`` up) of least mean swelling error on the
    generated validation images; ties go to the lowest.

    Returns
    -------
    conf
        The threshold.
    table
        pandas DataFrame per threshold: precision, recall, F1, false boxes per real
        cavity-free image (NaN without them).
    large_table
        pandas DataFrame per threshold of large boxes: mean and median swelling error (%
        absolute), F1 at IoU 0.5, on the generated validation images.
    """
    import pandas as pd

    from . import detect

    detector = detect.load_detector(model_dir)
    detector.metadata.pop("conf_large", None)  # fitted anew, below
    cfg = dataclasses.replace(config or GeneratorConfig(), size=int(size), count=tuple(count))
    val_dir = generate_dataset(
        n_images, Path(data_dir) / "val", cfg, rng=seed, workers=2, progress=False
    )
    images, labels, meta = load_dataset(val_dir)
    negatives = [img for _, img in real_negative_images(real_negatives)]
    # detected once, at the lowest threshold tried; each threshold keeps its boxes of it
    found = detector.predict(images + negatives, conf=min(detect.CONF_GRID), tile="auto")
    conf, table = detect.choose_confidence(
        detector,
        images + negatives,
        labels + [np.zeros((0, 5))] * len(negatives),
        predictions=found,
    )
    large_px = detector.imgsz / 2
    preds = [p[p[:, 4] >= conf] for p in found[: len(images)]]
    calib = dict(
        nm_per_px=[m["nm_per_px"] for m in meta],
        thickness_nm=[m["thickness_nm"] for m in meta],
        image_shapes=[i.shape for i in images],
    )
    rows = []
    for c in sorted({*[g for g in detect.CONF_GRID if g >= conf], conf, 0.85, 0.9}):
        kept = [detect.drop_weak_large(p, c, large_px) for p in preds]
        ev = detect.evaluate(kept, labels, iou_thresholds=(0.5,), **calib)
        rows.append(
            {
                "conf_large": c,
                "swelling error (%)": ev["swelling_error"],
                "median swelling error (%)": ev["swelling_error_median"],
                "f1": ev["f1@0.5"],
            }
        )
    large_table = pd.DataFrame(rows)
    conf_large = float(large_table.conf_large[large_table["swelling error (%)"].idxmin()])
    detect.update_metadata(model_dir, conf=conf, conf_large=conf_large, large_px=large_px)
    return conf, table, large_table


def plot_boxes(ax, boxes, color: str = "yellow", lw: float = 0.8, label: str | None = None) -> None:
    """Draw boxes (any :mod:`temlib.detect` format) as rectangles on a matplotlib axis."""
    from matplotlib.patches import Rectangle

    for k, (x1, y1, x2, y2) in enumerate(_xyxy(boxes)):
        ax.add_patch(
            Rectangle(
                (x1 - 0.5, y1 - 0.5),
                x2 - x1,
                y2 - y1,
                fill=False,
                ec=color,
                lw=lw,
                label=label if k == 0 else None,
            )
        )


def panel_png(
    df_nm: float = -1000.0,
    d_median_nm: float = 12.0,
    nm_per_px: float = 0.5,
    absorption_nm: float = 120.0,
    faceted_fraction: float = 0.5,
    count: int = 12,
    seed: int = 0,
    size: int = 384,
) -> bytes:
    """PNG bytes of one generated image (plain and with its label boxes) for these settings.

    Drawn on a bare matplotlib ``Figure`` (no pyplot state), so it is safe in widget
    callbacks and in headless runs.
    """
    import io

    from matplotlib.figure import Figure

    cfg = GeneratorConfig(
        size=size,
        count=(int(count), int(count)),
        d_median_nm_range=(d_median_nm, d_median_nm),
        faceted_fraction=faceted_fraction,
        min_contrast=0.0,
        min_snr=0.0,
    )
    opt = Optics(df_nm=df_nm, absorption_nm=absorption_nm)
    res = generate_image(int(seed), cfg, nm_per_px=nm_per_px, optics=opt)
    fig = Figure(figsize=(10, 5.2))
    ax = fig.subplots(1, 2)
    for a in ax:
        a.imshow(res["image"], cmap="gray", vmin=0, vmax=255)
        a.axis("off")
    plot_boxes(ax[1], res["boxes"])
    fig.suptitle(
        f"df = {df_nm:.0f} nm, fringe ~ {np.sqrt(WAVELENGTH_NM * abs(df_nm)):.2f} nm; "
        f"{len(res['boxes'])} labelled"
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def widget_panel(size: int = 384, show_static: bool = True):
    """An ipywidgets panel: sliders for defocus, size, calibration, absorption, shape, seed.

    The picture is an ``ipywidgets.Image`` whose PNG is replaced when a slider is released
    (:func:`panel_png`). No ``interact``/``Output`` widget is used: those capture output
    through front-end comms and hang headless runs (papermill/nbclient, seen here after
    OpenVINO inference; nteract/papermill#723). Without a live front-end the sliders
    simply never fire.

    Parameters
    ----------
    size
        Generated image size, px.
    show_static
        Also display the first setting as a plain PNG, so static reports show it.

    Returns
    -------
    ipywidgets.VBox
        Sliders and the picture (display it as a cell's last expression).
    """
    import ipywidgets as w

    sliders = dict(
        df_nm=w.FloatSlider(value=-1000, min=-3000, max=3000, step=100, description="defocus nm"),
        d_median_nm=w.FloatSlider(value=12, min=3, max=40, step=1, description="median d nm"),
        nm_per_px=w.FloatSlider(value=0.5, min=0.2, max=1.5, step=0.05, description="nm/px"),
        absorption_nm=w.FloatSlider(
            value=120, min=30, max=1000, step=10, description="absorption nm"
        ),
        faceted_fraction=w.FloatSlider(value=0.5, min=0, max=1, step=0.1, description="faceted"),
        count=w.IntSlider(value=12, min=0, max=60, description="cavities"),
        seed=w.IntSlider(value=0, min=0, max=100, description="seed"),
    )
    for s in sliders.values():
        s.continuous_update = False
    first = panel_png(**{k: s.value for k, s in sliders.items()}, size=size)
    picture = w.Image(value=first, format="png")

    def update(_change=None):
        picture.value = panel_png(**{k: s.value for k, s in sliders.items()}, size=size)

    for s in sliders.values():
        s.observe(update, names="value")
    if show_static:
        from IPython.display import Image, display

        display(Image(data=first))
    return w.VBox([w.HBox(list(sliders.values())[:4]), w.HBox(list(sliders.values())[4:]), picture])
