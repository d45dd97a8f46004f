"""Synthetic in-situ irradiation videos and real in-situ / defect datasets.

A bright-field TEM foil under ion irradiation, frame by frame: black-dot clusters and
dislocation loops nucleate at a rate that follows the dose, grow (some shrink and
vanish), coalesce when they meet, and move slightly; the whole field drifts, bend
contours sweep through, the illumination changes slowly and the camera adds shot and
read noise. Every frame comes with its ground truth: one row per visible defect with
its track identity, class, box and size, an instance mask, and the dose.

Coordinates: boxes are ``x1, y1, x2, y2`` in pixels with ``x`` the column and ``y`` the
row (the ultralytics convention); ``row``/``col`` name image coordinates elsewhere.

Classes (default): 0 = black dot (diameter below ``dot_max_nm``), 1 = loop.
A defect that grows past ``dot_max_nm`` becomes a loop within the same track.

Real data readers (:func:`read_creme_316l`, :func:`read_fecral_labelled`,
:func:`fecral_video_frames`) read ``../shared/data`` (see :func:`temlib.paths.shared_data`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

CLASS_NAMES = ("black dot", "loop")
TRUTH_COLUMNS = [
    "frame",
    "track_id",
    "cls",
    "x1",
    "y1",
    "x2",
    "y2",
    "row",
    "col",
    "diameter_nm",
    "kind",
]
KINDS = ("dot", "inclined", "edge-on")


@dataclasses.dataclass
class InsituVideo:
    """A synthetic in-situ video with its ground truth.

    Attributes
    ----------
    frames
        (T, M, N) uint8 bright-field frames.
    truth
        One row per visible defect per frame: ``frame, track_id, cls, x1, y1, x2, y2``
        (px, x = column), ``row, col`` (centre, px), ``diameter_nm``, ``kind``.
    events
        ``frame, event, track_id, other_id, row, col``; ``event`` is ``nucleation``,
        ``coalescence`` (``track_id`` absorbed into ``other_id`` at ``frame``, the first
        frame without it) or ``disappearance``.
    dose
        (T,) cumulative dose at each frame (dpa).
    time_s
        (T,) acquisition time of each frame (s).
    masks
        (T, M, N) uint16 instance masks (value = track id, 0 = background), or None.
    drift
        (T, 2) field drift (row, col) in px.
    nm_per_px
        Pixel size (nm).
    """

    frames: np.ndarray
    truth: pd.DataFrame
    events: pd.DataFrame
    dose: np.ndarray
    time_s: np.ndarray
    masks: np.ndarray | None
    drift: np.ndarray
    nm_per_px: float

    def boxes(self, frame: int) -> np.ndarray:
        """(K, 5) ``[cls, x1, y1, x2, y2]`` boxes of ``frame`` (the detect.py label format)."""
        t = self.truth[self.truth.frame == frame]
        return t[["cls", "x1", "y1", "x2", "y2"]].to_numpy(float)


# --------------------------------------------------------------------------------------
# Background: mottled foil, bend contours, illumination


def _smooth_noise(shape, sigma, rng) -> np.ndarray:
    f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


@dataclasses.dataclass
class _Style:
    """Random look of one video or frame (all intensities relative to 1 = vacuum-free foil)."""

    mottle_fine: float
    mottle_coarse: float
    mottle_sigma: float
    bend_strength: float
    bend_width: float
    bend_speed: float
    contrast: float
    electrons: float
    read_noise: float
    blur: float
    detector_blur: float
    out_mean: float
    out_std: float
    gradient: tuple[float, float]


def _random_style(rng, randomize: bool) -> _Style:
    if not randomize:
        return _Style(
            0.05,
            0.06,
            5.0,
            0.25,
            0.06,
            0.004,
            0.7,
            150.0,
            0.02,
            0.9,
            0.8,
            140.0,
            26.0,
            (0.05, -0.04),
        )
    return _Style(
        mottle_fine=rng.uniform(0.02, 0.09),
        mottle_coarse=rng.uniform(0.02, 0.10),
        mottle_sigma=rng.uniform(2.5, 9.0),
        bend_strength=rng.uniform(0.0, 0.45) * (rng.random() < 0.8),
        bend_width=rng.uniform(0.03, 0.12),
        bend_speed=rng.uniform(0.0, 0.01),
        contrast=rng.uniform(0.5, 0.9),
        electrons=float(np.exp(rng.uniform(np.log(30), np.log(3000)))),
        read_noise=rng.uniform(0.0, 0.05),
        blur=rng.uniform(0.5, 2.5),
        # phosphor / scintillator and camera optics spread each electron's signal after the
        # shot noise, which makes the noise of real frames correlated (FeCrAl video: lag-1
        # correlation 0.67); below 0.3 px: none
        detector_blur=rng.uniform(0.0, 1.5),
        out_mean=rng.uniform(90, 170),
        out_std=rng.uniform(14, 40),
        gradient=(rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)),
    )


@dataclasses.dataclass
class _Background:
    fine: np.ndarray
    coarse: np.ndarray
    bend_field: np.ndarray
    style: _Style
    margin: int


def _make_background(shape, margin, style: _Style, rng) -> _Background:
    canvas = (shape[0] + 2 * margin, shape[1] + 2 * margin)
    fine = _smooth_noise(canvas, 1.0, rng)
    coarse = _smooth_noise(canvas, style.mottle_sigma, rng)
    # level sets of a smooth field: curved bend contours; the field is normalised to [0, 1]
    bend = ndi.gaussian_filter(rng.standard_normal(canvas), max(canvas) / 6, mode="wrap")
    bend = (bend - bend.min()) / (np.ptp(bend) + 1e-12)
    return _Background(fine, coarse, bend, style, margin)


def _render_background(bg: _Background, t: int, offset, shape) -> np.ndarray:
    """Foil intensity (M, N) at frame ``t`` with the field shifted by ``offset`` (row, col) px."""
    s = bg.style
    r0 = int(np.clip(round(bg.margin + offset[0]), 0, 2 * bg.margin))
    c0 = int(np.clip(round(bg.margin + offset[1]), 0, 2 * bg.margin))
    sl = (slice(r0, r0 + shape[0]), slice(c0, c0 + shape[1]))
    img = 1.0 + s.mottle_fine * bg.fine[sl] + s.mottle_coarse * bg.coarse[sl]
    if s.bend_strength > 0:
        # two bands per field, sliding as the foil bends under the beam
        phase = (bg.bend_field[sl] - s.bend_speed * t) % 0.5
        d = np.minimum(phase, 0.5 - phase)
        img = img - s.bend_strength * np.exp(-0.5 * (d / s.bend_width) ** 2)
    return img


# --------------------------------------------------------------------------------------
# Dislocation lines (network dislocations: part of the foil, never labelled)


def _dislocation_lines(shape, length_px: float, nm_per_px: float, rng) -> np.ndarray:
    """Darkening (M, N) in [0, 1] of curved dislocation lines, ``length_px`` long in all (mean).

    Each line starts at a random point and direction and bends with a constant curvature
    (radius 50-400 nm, at most 2 rad over the line) plus a small wander, over 40-300 nm; in
    bright field it shows as a dark band 1-4 nm wide whose contrast oscillates along its
    length where it is inclined in the foil (period 4-15 nm). Real frames hold many such
    lines (FeCrAl, 316L); a detector that never saw them may take their pieces for loops.
    """
    from ._kernels import bilinear_corners

    M, N = shape
    n_lines = rng.poisson(length_px * nm_per_px / 170.0)  # 170 nm: mean line length
    if n_lines == 0:
        return np.zeros(shape)
    idx, wts = [], []  # splatted points, on a frame with one px of border on each side
    step = 0.5  # px between splatted points
    for _ in range(n_lines):
        length_nm = rng.uniform(40, 300)
        n = int(length_nm / nm_per_px / step) + 2
        # bent by at most 2 rad over its length: a line never closes into a loop-like ring
        radius_nm = max(rng.uniform(50, 400), length_nm / 2)
        curv = rng.choice([-1, 1]) * nm_per_px / radius_nm  # rad per px
        theta = rng.uniform(0, 2 * np.pi) + np.cumsum(
            step * curv + 0.03 * step**0.5 * rng.standard_normal(n)
        )
        r = rng.uniform(0, M) + np.cumsum(step * np.sin(theta))
        c = rng.uniform(0, N) + np.cumsum(step * np.cos(theta))
        s = np.arange(n) * step * nm_per_px
        amp = 1.0 + rng.uniform(0, 0.7) * np.sin(2 * np.pi * s / rng.uniform(4, 15))
        amp *= rng.uniform(0.4, 1.0) * step
        ok = (r > -1) & (r < M) & (c > -1) & (c < N)
        for rr, cc, w in bilinear_corners(r[ok] + 1, c[ok] + 1):
            idx.append(np.minimum(rr, M + 1) * (N + 2) + np.minimum(cc, N + 1))
            wts.append(amp[ok] * w)
    acc = np.bincount(
        np.concatenate(idx), weights=np.concatenate(wts), minlength=(M + 2) * (N + 2)
    ).reshape(M + 2, N + 2)
    sigma = max(rng.uniform(1.0, 4.0) / nm_per_px / 2.355, 0.6)  # FWHM 1-4 nm
    # a straight line of unit weight per px peaks at 1 / (sqrt(2 pi) sigma) once blurred
    field = ndi.gaussian_filter(acc, sigma)[1:-1, 1:-1] * np.sqrt(2 * np.pi) * sigma
    return np.clip(field, 0, 1)


# --------------------------------------------------------------------------------------
# Defects


def _defect_profile(
    kind, radius_px, aspect, angle, strain_angle, width_px, frac_r, frac_c, fill=0.25
):
    """Darkening (h, w) in [0, 1] of one defect, its filled mask and its box half-extent.

    ``radius_px`` is the loop radius; ``aspect`` the minor/major ratio (inclination);
    ``frac_r``/``frac_c`` the sub-pixel centre.
    """
    a = max(radius_px, 0.5)
    b = max(a * aspect, 0.5)
    half = int(np.ceil(a + 3 * width_px + 2))
    rr, cc = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    rr -= frac_r
    cc -= frac_c
    ca, sa = np.cos(angle), np.sin(angle)
    u = cc * ca + rr * sa  # along the major axis
    v = -cc * sa + rr * ca
    theta = np.arctan2(rr, cc)
    strain = 1.0 + 0.35 * np.cos(theta - strain_angle)  # asymmetric strain contrast
    if kind == "dot":
        # a solid dark disc with soft edges (super-Gaussian)
        q = (u / a) ** 2 + (v / max(a * max(aspect, 0.6), 0.6)) ** 2
        prof = np.exp(-0.7 * q**1.5) * strain
        mask = q <= 1.0
    else:
        # distance to the ellipse outline, in px (approximate: radial scaling)
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        scale = np.sqrt(u**2 + v**2) / np.maximum(rho, 1e-6)
        dist = (rho - 1.0) * scale
        ring = np.exp(-0.5 * (dist / width_px) ** 2)
        inside = rho < 1.0
        fill = fill if kind == "inclined" else 0.9
        prof = np.maximum(
            ring, fill * inside * np.exp(-0.5 * (np.minimum(dist, 0) / (2 * width_px)) ** 2)
        )
        prof = prof * strain
        mask = (rho <= 1.0) | (np.abs(dist) <= width_px)
    prof = np.clip(prof / max(prof.max(), 1e-6), 0, 1)
    # box half extents (x along columns, y along rows) of the visible dark region
    ys, xs = np.nonzero(prof > 0.3)
    if len(xs) == 0:
        ys, xs = np.array([half]), np.array([half])
    ext = (xs.min() - half, ys.min() - half, xs.max() - half, ys.max() - half)
    return prof, mask, ext, half


def _kind_for(diameter_nm, dot_max_nm, loop_kind):
    return "dot" if diameter_nm < dot_max_nm else loop_kind


# Rose (1948): an object of contrast C over A pixels of N electrons each is seen when
# C sqrt(A N) >= 5; the camera's read noise adds its variance
ROSE_SNR = 5.0


def rose_snr(darkening, area_px, level, electrons, read_noise) -> float:
    """Signal-to-noise ratio of a defect by Rose's criterion (visible when >= ``ROSE_SNR``).

    ``darkening`` is the defect's mean fractional darkening over its ``area_px`` pixels
    after the optics blur, ``level`` the local image level (foil = ~1), ``electrons`` the
    electrons per pixel at level 1, ``read_noise`` the read noise in level units.
    """
    sigma = np.sqrt(1.0 / (max(level, 1e-6) * electrons) + (read_noise / max(level, 1e-6)) ** 2)
    return float(darkening * np.sqrt(area_px) / sigma)


def _render_defects(img, defects, nm_per_px, contrast, dot_max_nm, width_nm, masks, style):
    """Darken ``img`` (M, N) in place with ``defects``; return boxes rows (list of dicts).

    Defects below Rose's criterion (:func:`rose_snr` < ``ROSE_SNR``) for the camera of
    ``style`` (blur, electrons, read noise) are drawn but not labelled nor masked: a
    person would not see them either. ``masks`` (M, N) instance labels or None.
    """
    M, N = img.shape
    rows = []
    for d in defects:
        diam = d["diameter_nm"]
        kind = _kind_for(diam, dot_max_nm, d["loop_kind"])
        radius_px = diam / 2 / nm_per_px
        aspect = d["aspect"] if kind != "edge-on" else 0.12
        width_px = max(width_nm / nm_per_px, 0.8)
        r, c = d["row"], d["col"]
        ri, ci = int(np.floor(r)), int(np.floor(c))
        prof, mask, ext, half = _defect_profile(
            kind,
            radius_px,
            aspect,
            d["angle"],
            d["strain_angle"],
            width_px,
            r - ri,
            c - ci,
            d["fill"],
        )
        r0, c0 = ri - half, ci - half
        rs, cs = (
            slice(max(r0, 0), min(r0 + prof.shape[0], M)),
            slice(max(c0, 0), min(c0 + prof.shape[1], N)),
        )
        if rs.start >= rs.stop or cs.start >= cs.stop:
            continue
        ps = (slice(rs.start - r0, rs.stop - r0), slice(cs.start - c0, cs.stop - c0))
        strength = contrast * d["contrast"]
        level = float(img[rs, cs][mask[ps]].mean()) if mask[ps].any() else 1.0  # before darkening
        img[rs, cs] *= 1.0 - strength * prof[ps]
        x1, y1 = ci + ext[0] - 0.5, ri + ext[1] - 0.5
        x2, y2 = ci + ext[2] + 1.5, ri + ext[3] + 1.5
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(N)), min(y2, float(M))
        if (x2 - x1) < 2 or (y2 - y1) < 2:
            continue
        # a defect cut by the border counts when at least 40 % of its box is inside
        full = (ext[2] - ext[0] + 2) * (ext[3] - ext[1] + 2)
        if (x2 - x1) * (y2 - y1) < 0.4 * full:
            continue
        seen = strength * prof
        if style.blur > 0:
            seen = ndi.gaussian_filter(seen, style.blur)
        snr = rose_snr(
            float(seen[mask].mean()), int(mask.sum()), level, style.electrons, style.read_noise
        )
        if snr < ROSE_SNR:
            continue
        if masks is not None:
            masks[rs, cs][mask[ps]] = d["track_id"]
        rows.append(
            {
                "track_id": d["track_id"],
                "cls": 0 if kind == "dot" else 1,
                "x1": x1,
                "y1": y1,
                "x2": x2,
                "y2": y2,
                "row": r,
                "col": c,
                "diameter_nm": diam,
                "kind": kind,
            }
        )
    return rows


def _finish(img, style: _Style, rng) -> np.ndarray:
    """Camera: optics blur, shot noise, detector blur, read noise, 8-bit output (M, N) uint8."""
    img = np.clip(img, 0.02, None)
    if style.blur > 0:
        img = ndi.gaussian_filter(img, style.blur)
    counts = rng.poisson(img * style.electrons) / style.electrons
    if style.detector_blur >= 0.3:
        counts = ndi.gaussian_filter(counts, style.detector_blur)
    counts = counts + style.read_noise * rng.standard_normal(img.shape)
    z = (counts - counts.mean()) / (counts.std() + 1e-9)
    return np.clip(style.out_mean + style.out_std * z, 0, 255).astype(np.uint8)


def _new_defect(track_id, row, col, diameter_nm, rng, growth_nm_per_frame, loop_fraction_edge):
    return {
        "track_id": track_id,
        "row": float(row),
        "col": float(col),
        "diameter_nm": float(diameter_nm),
        "growth": float(growth_nm_per_frame),
        "aspect": float(rng.uniform(0.35, 1.0)),
        "angle": float(rng.uniform(0, np.pi)),
        "strain_angle": float(rng.uniform(0, 2 * np.pi)),
        "contrast": float(rng.uniform(0.7, 1.0)),
        "fill": float(rng.uniform(0.1, 0.9)),
        "loop_kind": "edge-on" if rng.random() < loop_fraction_edge else "inclined",
    }


# --------------------------------------------------------------------------------------
# Public generators


def simulate_video(
    n_frames: int = 120,
    shape: tuple[int, int] = (512, 512),
    nm_per_px: float = 0.4,
    fps: float = 5.0,
    dose_rate: float | np.ndarray = 1e-3,
    nucleation_per_nm2_dpa: float = 0.02,
    initial: list[dict] | None = None,
    growth_nm_per_frame: float = 0.06,
    shrink_fraction: float = 0.15,
    dot_max_nm: float = 5.0,
    max_diameter_nm: float = 30.0,
    edge_on_fraction: float = 0.3,
    hop_px: float = 0.15,
    drift_px: float = 0.6,
    coalescence: bool = True,
    randomize_style: bool = False,
    with_masks: bool = True,
    rng=None,
    show_progressbar: bool = False,
) -> InsituVideo:
    """Simulate a bright-field in-situ irradiation video with per-frame ground truth.

    Parameters
    ----------
    n_frames
        Number of frames T.
    shape
        Frame shape (M, N) px.
    nm_per_px
        Pixel size (nm).
    fps
        Frames per second (sets ``time_s``).
    dose_rate
        Dose rate (dpa/s), a scalar or (T,) per frame (0 where the beam is blanked).
    nucleation_per_nm2_dpa
        Expected nucleations per nm^2 of foil per dpa; new defects per frame are Poisson
        with mean ``rate * area * dose_rate / fps``, reduced as the field fills up.
    initial
        Defects present from frame 0 (or planted later): dicts with ``row``, ``col`` (px),
        ``diameter_nm`` and optional ``growth`` (nm/frame), ``frame`` (first frame),
        ``aspect``, ``angle``, ``loop_kind``. Use with ``nucleation_per_nm2_dpa=0`` for a
        fully planted video.
    growth_nm_per_frame
        Mean diameter growth (nm per frame) of a new defect (exponential distribution).
    shrink_fraction
        Fraction of new defects that shrink instead and vanish below 1 nm.
    dot_max_nm
        Diameter (nm) below which a defect is a black dot (class 0), else a loop (class 1).
    max_diameter_nm
        Growth stops at this diameter.
    edge_on_fraction
        Fraction of loops seen edge-on (dark lines) rather than inclined (ellipses).
    hop_px
        Standard deviation (px per frame) of each defect's own random motion.
    drift_px
        Scale (px per frame) of the smooth field drift.
    coalescence
        Merge two defects whose outlines touch: the larger keeps its track and takes the
        summed loop area; the other track ends (an event ``coalescence``).
    randomize_style
        Draw a random look (noise, contrast, texture, bend contours) instead of the default.
    with_masks
        Also return (T, M, N) instance masks.
    rng
        Seed or generator.
    show_progressbar
        Show a tqdm bar over frames.

    Returns
    -------
    InsituVideo
    """
    rng = np.random.default_rng(rng)
    if n_frames < 1:
        raise ValueError(f"n_frames must be a positive integer, got {n_frames!r}")
    if len(shape) != 2 or min(shape) < 32:
        raise ValueError(f"shape must be (M, N) with both at least 32 px, got {shape!r}")
    if nm_per_px <= 0 or fps <= 0:
        raise ValueError(f"nm_per_px and fps must be positive, got {nm_per_px!r} and {fps!r}")
    rate = np.broadcast_to(np.asarray(dose_rate, float), (n_frames,)).copy()
    if np.any(rate < 0) or not np.all(np.isfinite(rate)):
        raise ValueError("dose_rate must be finite and non-negative (dpa/s)")
    M, N = shape
    style = _random_style(rng, randomize_style)
    margin = int(max(8, np.ceil(drift_px * n_frames * 0.6))) if drift_px > 0 else 0
    margin = min(margin, 256)
    bg = _make_background(shape, margin, style, rng)

    # smooth drift: a damped random walk of the velocity, kept inside the margin
    drift = np.zeros((n_frames, 2))
    vel = np.zeros(2)
    for t in range(1, n_frames):
        vel = 0.9 * vel + 0.1 * drift_px * rng.standard_normal(2) * 3
        drift[t] = np.clip(drift[t - 1] + vel, -margin, margin)

    dose_per_frame = rate / fps
    dose = np.cumsum(dose_per_frame) - dose_per_frame[0]
    time_s = np.arange(n_frames) / fps
    area_nm2 = M * N * nm_per_px**2
    planted = sorted(initial or [], key=lambda d: d.get("frame", 0))
    alive: list[dict] = []
    next_id = 1
    rows: list[dict] = []
    events: list[dict] = []
    frames = np.empty((n_frames, M, N), np.uint8)
    masks = np.zeros((n_frames, M, N), np.uint16) if with_masks else None

    from tqdm.auto import tqdm

    for t in tqdm(range(n_frames), disable=not show_progressbar, desc="simulate video"):
        # planted defects (sample coordinates = frame-0 pixel coordinates)
        while planted and planted[0].get("frame", 0) <= t:
            p = planted.pop(0)
            d = _new_defect(
                next_id,
                p["row"],
                p["col"],
                p["diameter_nm"],
                rng,
                p.get("growth", 0.0),
                edge_on_fraction,
            )
            for k in ("aspect", "angle", "loop_kind", "contrast", "strain_angle"):
                if k in p:
                    d[k] = p[k]
            alive.append(d)
            events.append(
                {
                    "frame": t,
                    "event": "nucleation",
                    "track_id": next_id,
                    "other_id": 0,
                    "row": d["row"],
                    "col": d["col"],
                }
            )
            next_id += 1
        # nucleation, following the dose, slowing as the field fills
        occupied = sum(np.pi * (d["diameter_nm"] / 2) ** 2 for d in alive) / area_nm2
        lam = nucleation_per_nm2_dpa * area_nm2 * dose_per_frame[t] * max(0.0, 1.0 - 4 * occupied)
        for _ in range(rng.poisson(lam) if lam > 0 else 0):
            row = rng.uniform(0, M) - drift[t, 0]
            col = rng.uniform(0, N) - drift[t, 1]
            g = rng.exponential(growth_nm_per_frame)
            if rng.random() < shrink_fraction:
                g = -abs(rng.exponential(growth_nm_per_frame)) * 0.5
            d = _new_defect(next_id, row, col, rng.uniform(2.5, 3.5), rng, g, edge_on_fraction)
            alive.append(d)
            events.append(
                {
                    "frame": t,
                    "event": "nucleation",
                    "track_id": next_id,
                    "other_id": 0,
                    "row": row + drift[t, 0],
                    "col": col + drift[t, 1],
                }
            )
            next_id += 1
        # growth / shrinkage / motion
        survivors = []
        for d in alive:
            if t > 0:
                d["diameter_nm"] = min(d["diameter_nm"] + d["growth"], max_diameter_nm)
                d["row"] += hop_px * rng.standard_normal()
                d["col"] += hop_px * rng.standard_normal()
            if d["diameter_nm"] < 1.0:
                events.append(
                    {
                        "frame": t,
                        "event": "disappearance",
                        "track_id": d["track_id"],
                        "other_id": 0,
                        "row": d["row"] + drift[t, 0],
                        "col": d["col"] + drift[t, 1],
                    }
                )
                continue
            survivors.append(d)
        alive = survivors
        # coalescence: outlines touching -> the larger absorbs the smaller
        if coalescence and len(alive) > 1:
            merged = True
            while merged:
                merged = False
                pos = np.array([[d["row"], d["col"]] for d in alive])
                rad = np.array([d["diameter_nm"] / 2 / nm_per_px for d in alive])
                dist = np.hypot(
                    pos[:, None, 0] - pos[None, :, 0], pos[:, None, 1] - pos[None, :, 1]
                )
                touch = dist < 0.85 * (rad[:, None] + rad[None, :])
                np.fill_diagonal(touch, False)
                if touch.any():
                    i, j = np.argwhere(touch)[0]
                    big, small = (i, j) if rad[i] >= rad[j] else (j, i)
                    db, ds = alive[big], alive[small]
                    w = rad[big] ** 2 / (rad[big] ** 2 + rad[small] ** 2)
                    db["row"] = w * db["row"] + (1 - w) * ds["row"]
                    db["col"] = w * db["col"] + (1 - w) * ds["col"]
                    db["diameter_nm"] = min(
                        np.hypot(db["diameter_nm"], ds["diameter_nm"]), max_diameter_nm
                    )
                    db["growth"] = max(db["growth"], ds["growth"], 0.0)
                    events.append(
                        {
                            "frame": t,
                            "event": "coalescence",
                            "track_id": ds["track_id"],
                            "other_id": db["track_id"],
                            "row": ds["row"] + drift[t, 0],
                            "col": ds["col"] + drift[t, 1],
                        }
                    )
                    alive.pop(small)
                    merged = True
        # render
        img = _render_background(bg, t, -drift[t], shape)
        illum = 1.0 + 0.04 * np.sin(2 * np.pi * t / max(n_frames, 2))
        gr, gc = style.gradient
        ramp = 1.0 + gr * (np.arange(M)[:, None] / M - 0.5) + gc * (np.arange(N)[None, :] / N - 0.5)
        img = img * ramp * illum
        shown = [dict(d, row=d["row"] + drift[t, 0], col=d["col"] + drift[t, 1]) for d in alive]
        got = _render_defects(
            img,
            shown,
            nm_per_px,
            style.contrast,
            dot_max_nm,
            1.2,
            masks[t] if masks is not None else None,
            style,
        )
        for g in got:
            g["frame"] = t
        rows.extend(got)
        frames[t] = _finish(img, style, rng)

    truth = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    ev = pd.DataFrame(events, columns=["frame", "event", "track_id", "other_id", "row", "col"])
    return InsituVideo(frames, truth, ev, dose, time_s, masks, drift, float(nm_per_px))


def simulate_frames(
    n: int,
    shape: tuple[int, int] = (384, 384),
    nm_per_px: float | tuple[float, float] = (0.25, 0.9),
    density_per_um2: tuple[float, float] = (100.0, 5000.0),
    diameter_nm: tuple[float, float] = (3.0, 12.0),
    dot_max_nm: float = 5.0,
    dislocation_density_m2: tuple[float, float] | None = (1e13, 5e14),
    rng=None,
    show_progressbar: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Independent training frames with a random look each (domain randomisation).

    Defects range from faint (20 % of the frame's full defect contrast) to strong; the
    ones below Rose's criterion (:func:`rose_snr`) are drawn but not labelled. Network
    dislocations cross the foil as curved dark lines, never labelled.

    Parameters
    ----------
    n
        Number of frames.
    shape
        Frame shape (M, N) px.
    nm_per_px
        Pixel size (nm), or a (low, high) range drawn log-uniformly per frame.
    density_per_um2
        (low, high) range of the areal defect density per frame (1/um^2), log-uniform.
    diameter_nm
        (median low, median high): each frame draws a median diameter in this range and
        log-normal diameters around it.
    dot_max_nm
        Diameter (nm) below which a defect is a black dot (class 0).
    dislocation_density_m2
        (low, high) range of the network dislocation density (m^-2), log-uniform per frame;
        a foil 50-150 nm thick projects ``density x thickness`` of line length per area
        (5e14 m^-2: ~7 lines of 170 nm across a 150 nm field). None: no lines. The lines
        are drawn from their own random stream: the rest of each frame is that of ``None``.
    rng
        Seed or generator.
    show_progressbar
        Show a tqdm bar.

    Returns
    -------
    images, boxes, masks
        ``images[i]`` (M, N) uint8; ``boxes[i]`` (K, 5) ``[cls, x1, y1, x2, y2]`` px;
        ``masks[i]`` (M, N) uint16 instance masks.
    """
    rng = np.random.default_rng(rng)
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if dislocation_density_m2 is not None and not (
        len(dislocation_density_m2) == 2
        and 0 < dislocation_density_m2[0] <= dislocation_density_m2[1]
    ):
        raise ValueError(
            f"dislocation_density_m2 must be None or (low, high) with 0 < low <= high (m^-2), "
            f"got {dislocation_density_m2!r}"
        )
    from tqdm.auto import tqdm

    images, boxes, masks = [], [], []
    M, N = shape
    for _ in tqdm(range(n), disable=not show_progressbar, desc="simulate frames"):
        # each frame from its own streams: the lines' draws leave the rest of the frame as it is
        frng, line_rng = rng.spawn(2)
        px = (
            nm_per_px if np.isscalar(nm_per_px) else float(np.exp(frng.uniform(*np.log(nm_per_px))))
        )
        style = _random_style(frng, True)
        bg = _make_background(shape, 0, style, frng)
        img = _render_background(bg, int(frng.integers(0, 100)), (0, 0), shape)
        gr, gc = style.gradient
        img = img * (
            1.0 + gr * (np.arange(M)[:, None] / M - 0.5) + gc * (np.arange(N)[None, :] / N - 0.5)
        )
        if dislocation_density_m2 is not None:
            rho = float(np.exp(line_rng.uniform(*np.log(dislocation_density_m2))))
            length_nm = rho * 1e-18 * line_rng.uniform(50, 150) * M * N * px**2
            img *= 1.0 - style.contrast * _dislocation_lines(shape, length_nm / px, px, line_rng)
        area_um2 = M * N * px**2 * 1e-6
        dens = float(np.exp(frng.uniform(*np.log(density_per_um2))))
        k = frng.poisson(dens * area_um2)
        med = frng.uniform(*diameter_nm)
        edge = frng.uniform(0.0, 0.5)
        defects, placed = [], []
        for i in range(k):
            diam = float(np.clip(med * np.exp(0.45 * frng.standard_normal()), 1.6, 40))
            rad = diam / 2 / px
            for _try in range(10):  # avoid heavy overlaps (real labels rarely overlap)
                r, c = frng.uniform(-rad / 2, M + rad / 2), frng.uniform(-rad / 2, N + rad / 2)
                if all(np.hypot(r - pr, c - pc) > 1.1 * (rad + pr_) for pr, pc, pr_ in placed):
                    break
            else:
                continue
            placed.append((r, c, rad))
            d = _new_defect(i + 1, r, c, diam, frng, 0.0, edge)
            # faint defects too (real frames hold many, e.g. 316L): Rose's criterion decides
            # which of them get a label
            d["contrast"] = float(frng.uniform(0.2, 1.0))
            defects.append(d)
        mask = np.zeros(shape, np.uint16)
        got = _render_defects(
            img, defects, px, style.contrast, dot_max_nm, frng.uniform(0.8, 2.2), mask, style
        )
        images.append(_finish(img, style, frng))
        boxes.append(
            np.array([[g["cls"], g["x1"], g["y1"], g["x2"], g["y2"]] for g in got], float).reshape(
                -1, 5
            )
        )
        masks.append(mask)
    return images, boxes, masks


def dose_per_frame(n_frames: int, dose_rate: float, fps: float) -> np.ndarray:
    """(T,) cumulative dose (dpa) at each frame for a constant ``dose_rate`` (dpa/s)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return np.arange(n_frames) * float(dose_rate) / float(fps)


# --------------------------------------------------------------------------------------
# Real data


def _natural_key(p: Path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


def read_frame(path) -> np.ndarray:
    """Read one frame (PNG/JPG/TIF, grey or RGB) as (M, N) uint8 grey."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No frame file {path}")
    with Image.open(path) as im:
        im = im.convert("L") if im.mode not in ("L", "I;16", "I", "F") else im
        a = np.asarray(im)
    if a.dtype != np.uint8:
        a = a.astype(float)
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip((a - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    return a


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_frames(folder) -> list[Path]:
    """Image files of ``folder`` in natural order (Frame2 before Frame10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of frames")
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key
    )


def read_creme_316l(root=None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The labelled 316L in-situ frames (ai-atoms/creme, MIT) with boxes from their masks.

    Parameters
    ----------
    root
        ``insitu/creme_316L`` folder; default: under :func:`temlib.paths.shared_data`.

    Returns
    -------
    images, boxes, names
        (M, N) uint8 frames in dose order (1..16, then the 1024 px test frame), (K, 5)
        ``[0, x1, y1, x2, y2]`` boxes of the connected components of each mask.
    """
    from . import paths

    if root is None:
        sd = paths.shared_data()
        if sd is None:
            raise FileNotFoundError("../shared/data is absent; pass root= to the creme_316L folder")
        root = sd / "insitu" / "creme_316L"
    root = Path(root)
    pairs = [
        (p, root / "fov200nm" / "masks1" / p.name) for p in list_frames(root / "fov200nm" / "imgs")
    ]
    pairs += [(p, root / "test" / "masks1" / p.name) for p in list_frames(root / "test" / "imgs")]
    images, boxes, names = [], [], []
    for ip, mp in pairs:
        img = read_frame(ip)
        lab, _ = ndi.label(read_frame(mp) > 127)
        bb = [
            [0, s[1].start, s[0].start, s[1].stop, s[0].stop]
            for s in ndi.find_objects(lab)
            if s is not None
        ]
        images.append(img)
        boxes.append(np.array(bb, float).reshape(-1, 5))
        names.append(f"{ip.parent.parent.name}/{ip.name}")
    return images, boxes, names


# FeCrAl multitype labels: 0 = <111> loop, 1 = black dot, 2 = <100> loop -> temlib classes
FECRAL_TO_TEMLIB = {0: 1, 1: 0, 2: 1}


def read_fecral_labelled(root=None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The labelled FeCrAl defect images (uw-cmg/Multitype-Defect-Detection, MIT).

    Returns
    -------
    images, boxes, names
        (M, N) uint8 images; (K, 5) ``[cls, x1, y1, x2, y2]`` with cls mapped to temlib's
        classes (black dot 0, loop 1) from the CSV's ImageJ boxes ``BX, BY, Width, Height``.
    """
    from . import paths

    if root is None:
        sd = paths.shared_data()
        if sd is None:
            raise FileNotFoundError(
                "../shared/data is absent; pass root= to the fecral_multitype_valset folder"
            )
        root = sd / "defects" / "fecral_multitype_valset"
    root = Path(root)
    images, boxes, names = [], [], []
    for ip in list_frames(root / "valIMG"):
        csv = root / "csv_with_class" / f"{ip.stem}_results.csv"
        if not csv.is_file():
            continue
        t = pd.read_csv(csv)
        cls = t["class"].astype(int).map(FECRAL_TO_TEMLIB).to_numpy(float)
        x1, y1 = t["BX"].to_numpy(float), t["BY"].to_numpy(float)
        b = np.stack([cls, x1, y1, x1 + t["Width"], y1 + t["Height"]], 1)
        images.append(read_frame(ip))
        boxes.append(b)
        names.append(ip.name)
    return images, boxes, names


def fecral_video_frames(root=None) -> list[Path]:
    """Paths of the real FeCrAl in-situ video frames (uw-cmg/DefectSTEMVideoAnalysis), in order.

    0.37 nm/px, 6.877 frames/s (Shen et al. 2021); no labels.
    """
    from . import paths

    if root is None:
        sd = paths.shared_data()
        if sd is None:
            raise FileNotFoundError(
                "../shared/data is absent; pass root= to the fecral_video_frames folder"
            )
        root = sd / "insitu" / "fecral_video_frames"
    return list_frames(root)


FECRAL_VIDEO = {"nm_per_px": 0.37, "fps": 6.877}


def write_frames(frames: np.ndarray, out_dir, prefix: str = "frame", fmt: str = "png") -> Path:
    """Write (T, M, N) frames as ``prefix00000.png``... into ``out_dir`` (atomic per file)."""
    from PIL import Image

    if fmt not in ("png", "jpg", "tif"):
        raise ValueError(f"Unknown frame format {fmt!r}; expected one of 'png', 'jpg', 'tif'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        dst = out / f"{prefix}{i:05d}.{fmt}"
        tmp = dst.with_name("." + dst.name + ".tmp")
        Image.fromarray(np.asarray(f, np.uint8)).save(
            tmp, format={"png": "PNG", "jpg": "JPEG", "tif": "TIFF"}[fmt]
        )
        os.replace(tmp, dst)
    return out


def crop_tiles(
    images: list[np.ndarray], boxes: list[np.ndarray], size: int = 256, min_visible: float = 0.5
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut labelled images into ``size`` px tiles (grid, the last tile flush with the edge).

    A box is kept in a tile, clipped, when at least ``min_visible`` of its area lies inside.

    Returns
    -------
    tiles, tile_boxes
        (size, size) tiles (smaller where the image is) and their (K, 5) boxes.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size!r}")
    tiles, out = [], []
    for img, b in zip(images, boxes, strict=True):
        b = np.asarray(b, float).reshape(-1, 5)
        h, w = img.shape[:2]
        ys = sorted({*range(0, max(h - size, 0) + 1, size), max(h - size, 0)})
        xs = sorted({*range(0, max(w - size, 0) + 1, size), max(w - size, 0)})
        area = np.prod(np.clip(b[:, 3:5] - b[:, 1:3], 1e-9, None), axis=1)
        for y0 in ys:
            for x0 in xs:
                c = b.copy()
                c[:, [1, 3]] = np.clip(c[:, [1, 3]] - x0, 0, min(size, w - x0))
                c[:, [2, 4]] = np.clip(c[:, [2, 4]] - y0, 0, min(size, h - y0))
                inside = np.prod(np.clip(c[:, 3:5] - c[:, 1:3], 0, None), axis=1)
                tiles.append(img[y0 : y0 + size, x0 : x0 + size])
                out.append(c[inside >= min_visible * area])
    return tiles, out


def real_labelled_split(root=None) -> dict:
    """Fixed train / held-out split of the real labelled frames, for fine-tuning and scoring.

    316L (creme): odd-numbered frames of 1..16 and the left half of the 1024 px test frame
    train, the even-numbered frames and the right half are held out. FeCrAl: images in name
    order alternate train / held out.

    Returns
    -------
    dict
        ``{"train": (images, boxes), "316L": (images, boxes, names),
        "FeCrAl": (images, boxes, names)}``; the last two are the held-out sets.
    """
    ci, cb, cn = read_creme_316l(None if root is None else Path(root) / "insitu" / "creme_316L")
    fi, fb, fn = read_fecral_labelled(
        None if root is None else Path(root) / "defects" / "fecral_multitype_valset"
    )
    train_i, train_b, ev_i, ev_b, ev_n = [], [], [], [], []
    for k, (im, b, n) in enumerate(zip(ci[:-1], cb[:-1], cn[:-1], strict=True)):
        (train_i if k % 2 == 0 else ev_i).append(im)
        (train_b if k % 2 == 0 else ev_b).append(b)
        if k % 2:
            ev_n.append(n)
    big, bb = ci[-1], cb[-1]
    half = big.shape[1] // 2
    cx = (bb[:, 1] + bb[:, 3]) / 2
    lb, rb = bb[cx < half].copy(), bb[cx >= half].copy()
    lb[:, 3] = np.minimum(lb[:, 3], half)
    rb[:, [1, 3]] = np.maximum(rb[:, [1, 3]] - half, 0)
    left, right = big[:, :half], big[:, half:]
    train_i.append(left)
    train_b.append(lb)
    ev_i.append(right)
    ev_b.append(rb)
    ev_n.append(cn[-1] + " (right half)")
    f_tr = [k for k in range(len(fi)) if k % 2 == 0]
    f_ev = [k for k in range(len(fi)) if k % 2 == 1]
    return {
        "train": (train_i + [fi[k] for k in f_tr], train_b + [fb[k] for k in f_tr]),
        "316L": (ev_i, ev_b, ev_n),
        "FeCrAl": ([fi[k] for k in f_ev], [fb[k] for k in f_ev], [fn[k] for k in f_ev]),
    }
