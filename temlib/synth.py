"""Synthetic scanned-diffraction maps of a ferrite / cementite / NbC steel with ground truth.

Real maps of this steel are not public, so the embedded default data is simulated, with
every effect we know a camera filming a phosphor screen adds, each randomised per map
within a range (domain randomisation) so that models trained on it do not learn one look:

Microstructure
    Voronoi ferrite grains; pearlite-like colonies of cementite lamellae (one orientation
    per colony) and cementite particles on grain boundaries; small NbC particles. Every
    region has its own orientation (uniform over SO(3)), a small intragranular spread,
    and a thickness (nm). Pixels on a boundary see two regions (the probe overlaps):
    their pattern is a weighted sum.
Patterns
    Kinematic spots (:func:`temlib.simulate.kinematic_spots`, checked against diffsims)
    at 200 kV with relrod width ~ 1 / thickness and optional precession; dynamical-like
    perturbation (intensities compressed as I**gamma and a log-normal factor per
    reflection and region); spots drawn with a Gaussian core plus long PSF tails; a
    saturated direct beam; diffuse background falling with |k|; beam-centre drift and
    jitter; gain, shot and read noise; 8-bit output.
Test maps
    A test map draws orientations at least ``min_misorientation`` degrees (disorientation
    under the phase's point group, also against each training orientation turned 180 deg
    about the beam, which gives the same kinematic pattern) away from every training
    orientation of the same phase.

Maps are written chunk by chunk to HyperSpy ``.zspy`` (zarr) through dask, so a
500x500x144x144 map never sits in memory. A map is a folder::

    <name>/patterns.zspy   the 4D signal, calibrated (1/Å per px, beam energy)
    <name>/truth.h5        ground truth as an orix CrystalMap (also truth.ang)
    <name>/truth.npz       phase id, region, mixing weight, thickness, beam centre per pixel
    <name>/spec.json       generation parameters, camera draw, orientation rule
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from orix.quaternion import Orientation, Rotation

from . import crystal, paths, simulate

log = logging.getLogger(__name__)

PHASES = crystal.STEEL_PHASES  # phase ids 0, 1, 2 in every map
GENERATOR_VERSION = 3  # part of the cache key of steel_maps: bump when the look of patterns changes
PHASE_ID = {name: i for i, name in enumerate(PHASES)}
MAX_SPOTS = {"ferrite": 60, "NbC": 80, "cementite": 160}


# --------------------------------------------------------------------------------------
# Camera (the look of a map), randomised per map
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Camera:
    """How patterns look on one map: geometry, optics, detector. Units in comments."""

    size: int = 144  # px, square patterns
    calibration: float = 0.02  # 1/Å per px
    kv: float = 200.0
    precession_deg: float = 0.5  # 0: none
    spot_sigma: float = 1.2  # px, Gaussian core of a spot (probe + phosphor)
    tail_sigmas: tuple = (4.0, 14.0)  # px, long PSF tails as Gaussians
    tail_weights: tuple = (0.05, 0.04)  # fraction of each spot's counts in each tail
    relrod: float = 0.025  # 1/Å, relrod half-width at 60 nm (scales as 1/sqrt(thickness))
    exposure: float = 800.0  # counts of the strongest reflection on the Ewald sphere
    direct_beam: float = 15.0  # direct beam counts / exposure (saturates)
    background: float = 25.0  # diffuse counts at the centre
    background_k: float = 0.35  # 1/Å, half-width of the diffuse halo
    background_floor: float = 3.0  # counts, flat
    gamma: float = 0.6  # dynamical compression: counts ~ (|F|^2 s(s))**gamma
    perturbation: float = 0.35  # log-normal sigma per reflection and region
    gain: float = 1.0  # ADU per count
    read_noise: float = 1.5  # ADU
    offset: float = 2.0  # ADU
    center_drift: float = 2.0  # px, beam-centre drift amplitude across the scan
    center_jitter: float = 0.3  # px, per pattern
    spread_deg: float = 0.3  # intragranular orientation spread (deg)

    @property
    def center(self) -> float:
        return self.size / 2


def random_camera(
    rng=None, size: int = 144, calibration: float = 0.02, kv: float = 200.0, randomize: bool = True
) -> Camera:
    """Draw a camera look from ranges that cover cameras filming a phosphor screen."""
    rng = np.random.default_rng(rng)
    if not randomize:
        return Camera(size=size, calibration=calibration, kv=kv)
    u = rng.uniform
    return Camera(
        size=size,
        calibration=calibration * u(0.95, 1.05),
        kv=kv,
        precession_deg=float(rng.choice([0.0, u(0.3, 1.0)], p=[0.3, 0.7])),
        spot_sigma=u(0.8, 1.8),
        tail_sigmas=(u(3.0, 6.0), u(10.0, 24.0)),
        tail_weights=(u(0.02, 0.10), u(0.02, 0.08)),
        relrod=u(0.012, 0.04),
        exposure=u(300, 2000),
        direct_beam=u(5, 30),
        background=u(5, 50),
        background_k=u(0.2, 0.6),
        background_floor=u(0.5, 8),
        gamma=u(0.45, 0.9),
        perturbation=u(0.15, 0.6),
        gain=u(0.7, 1.5),
        read_noise=u(0.5, 3.0),
        offset=u(0, 6),
        center_drift=u(0, 3.0),
        center_jitter=u(0.1, 0.5),
        spread_deg=u(0.1, 0.5),
    )


# --------------------------------------------------------------------------------------
# Microstructure
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Microstructure:
    """Regions of a map and what each region is.

    Attributes
    ----------
    labels
        (H, W) region index of every scan pixel.
    phase
        (R,) phase id of each region (0 ferrite, 1 NbC, 2 cementite).
    rotations
        (R, 4) quaternions (sample -> crystal) of each region.
    thickness
        (R,) foil thickness (nm).
    second
        (H, W) second region seen by a boundary pixel (-1 for none).
    weight
        (H, W) weight of ``labels`` in the pattern (1 inside a region, 0.5-0.85 on boundaries).
    """

    labels: np.ndarray
    phase: np.ndarray
    rotations: np.ndarray
    thickness: np.ndarray
    second: np.ndarray
    weight: np.ndarray


def _voronoi(shape, n, rng):
    from scipy.spatial import cKDTree

    h, w = shape
    seeds = rng.uniform((0, 0), (h, w), size=(n, 2))
    rr, cc = np.mgrid[0:h, 0:w]
    _, lab = cKDTree(seeds).query(np.c_[rr.ravel(), cc.ravel()])
    return lab.reshape(shape)


def microstructure(
    shape: tuple[int, int],
    n_grains: int = 40,
    colony_fraction: float = 0.15,
    cementite_particles: float = 1.0,
    nbc_particles: float = 1.5,
    thickness_nm: tuple[float, float] = (30.0, 120.0),
    rng=None,
) -> Microstructure:
    """Draw a ferrite-pearlite-NbC microstructure (orientations left uniform random).

    Parameters
    ----------
    shape
        (rows, cols) of the scan.
    n_grains
        Number of ferrite (Voronoi) grains.
    colony_fraction
        Fraction of grains turned into cementite-lamella colonies.
    cementite_particles, nbc_particles
        Particles per 1,000 scan pixels (cementite on grain boundaries, NbC anywhere).
    thickness_nm
        Range of region thickness (nm).
    """
    rng = np.random.default_rng(rng)
    h, w = shape
    if h < 2 or w < 2:
        raise ValueError(f"Map shape {shape!r} is too small; expected at least (2, 2) scan pixels")
    if n_grains < 1:
        raise ValueError(f"n_grains {n_grains!r} must be at least 1")
    labels = _voronoi(shape, n_grains, rng)
    phase = [PHASE_ID["ferrite"]] * n_grains
    rr, cc = np.mgrid[0:h, 0:w]
    # pearlite colonies: alternating cementite lamellae inside some grains, one orientation each
    n_col = int(round(colony_fraction * n_grains))
    for g in rng.choice(n_grains, size=n_col, replace=False) if n_col else []:
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 8)
        stripe = ((rr * np.cos(theta) + cc * np.sin(theta)) % period) < 0.35 * period
        m = (labels == g) & stripe
        if m.any():
            labels[m] = len(phase)
            phase.append(PHASE_ID["cementite"])
    # boundary pixels of the ferrite grains
    boundary = np.zeros(shape, bool)
    boundary[:-1] |= labels[:-1] != labels[1:]
    boundary[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    area = h * w / 1000.0
    bpix = np.flatnonzero(boundary)
    for _ in range(rng.poisson(cementite_particles * area) if bpix.size else 0):
        r0, c0 = np.unravel_index(rng.choice(bpix), shape)
        a, b, t = rng.uniform(1.0, 3.0), rng.uniform(0.8, 1.8), rng.uniform(0, np.pi)
        dr, dc = rr - r0, cc - c0
        u, v = dr * np.cos(t) + dc * np.sin(t), -dr * np.sin(t) + dc * np.cos(t)
        m = (u / a) ** 2 + (v / b) ** 2 <= 1
        labels[m] = len(phase)
        phase.append(PHASE_ID["cementite"])
    for _ in range(rng.poisson(nbc_particles * area)):
        r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
        m = (rr - r0) ** 2 + (cc - c0) ** 2 <= rng.uniform(0.8, 2.5) ** 2
        if m.any():
            labels[m] = len(phase)
            phase.append(PHASE_ID["NbC"])
    # keep only regions that still own pixels, renumbered
    used, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(shape)
    phase = np.asarray(phase)[used]
    n = len(phase)
    thickness = rng.uniform(*thickness_nm, size=n)
    # boundary mixing: a pixel next to another region also sees it
    second = np.full(shape, -1)
    for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        nb = np.roll(labels, (dr, dc), axis=(0, 1))
        valid = np.ones(shape, bool)
        if dr == 1:
            valid[0] = False
        if dr == -1:
            valid[-1] = False
        if dc == 1:
            valid[:, 0] = False
        if dc == -1:
            valid[:, -1] = False
        take = valid & (nb != labels) & (second < 0)
        second[take] = nb[take]
    weight = np.where(second >= 0, rng.uniform(0.5, 0.85, size=shape), 1.0)
    return Microstructure(labels, phase, np.zeros((n, 4)), thickness, second, weight)


def random_quaternions(n: int, rng=None) -> np.ndarray:
    """(n, 4) rotations drawn uniformly over SO(3) (normalised Gaussian 4-vectors)."""
    rng = np.random.default_rng(rng)
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q * np.where(q[:, :1] < 0, -1, 1)


def _beam_flip(q: np.ndarray) -> np.ndarray:
    """Orientation turned 180 deg about the beam (sample z): R * Rz(180) (same pattern)."""
    rz = Rotation.from_axes_angles([0, 0, 1], np.pi)
    return (Rotation(q) * rz).data


def min_disorientation(q: np.ndarray, reference: np.ndarray, phase_name: str) -> np.ndarray:
    """Smallest disorientation (deg) of each of ``q`` (N, 4) to any of ``reference`` (M, 4).

    Both the reference orientations and the same turned 180 deg about the beam count.
    """
    if len(reference) == 0:
        return np.full(len(q), 180.0)
    pg = crystal.get_phase(phase_name).point_group
    ref = np.concatenate([reference, _beam_flip(reference)])
    a = Orientation(q, symmetry=pg)
    b = Orientation(ref, symmetry=pg)
    ang = a.angle_with_outer(b, degrees=True)
    return np.atleast_2d(ang).min(axis=1)


def assign_orientations(
    micro: Microstructure,
    rng=None,
    avoid: dict[str, np.ndarray] | None = None,
    min_misorientation: float = 10.0,
    max_tries: int = 200,
) -> dict[str, float]:
    """Give every region a random orientation, away from ``avoid`` for test maps.

    Returns the smallest disorientation (deg) achieved to ``avoid`` per phase.
    """
    rng = np.random.default_rng(rng)
    achieved = {}
    for name, pid in PHASE_ID.items():
        idx = np.flatnonzero(micro.phase == pid)
        if idx.size == 0:
            continue
        q = random_quaternions(idx.size, rng)
        ref = None if avoid is None else avoid.get(name)
        if ref is not None and len(ref):
            todo = np.arange(idx.size)
            for _ in range(max_tries):
                d = min_disorientation(q[todo], ref, name)
                todo = todo[d < min_misorientation]
                if todo.size == 0:
                    break
                q[todo] = random_quaternions(todo.size, rng)
            if todo.size:
                raise ValueError(
                    f"Could not place {todo.size} {name} orientations {min_misorientation} deg away from the "
                    f"training orientations in {max_tries} tries; expected a smaller min_misorientation"
                )
            achieved[name] = float(min_disorientation(q, ref, name).min())
        micro.rotations[idx] = q
    return achieved


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PhaseTables:
    refl: simulate.Reflections
    i_ref: float  # |F|^2 of the strongest reflection (intensity scale)
    perturb: np.ndarray  # (K, G) standard normals, row = region % K


def _phase_tables(camera: Camera, seed: int, phases=PHASES) -> dict[int, _PhaseTables]:
    g_max = camera.size / 2 * np.sqrt(2) * camera.calibration * 1.02
    out = {}
    for name in phases:
        pid = PHASE_ID[name]
        refl = simulate.reflections(name, g_max=g_max)
        rng = np.random.default_rng([seed, pid])
        out[pid] = _PhaseTables(
            refl,
            float(refl.intensity.max()),
            rng.standard_normal((512, refl.size)).astype(np.float32),
        )
    return out


def _spread(n: int, deg: float, rng) -> np.ndarray:
    """(n, 3, 3) small random rotations (angle ~ |N(0, deg)| about a random axis)."""
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    ang = np.deg2rad(np.abs(rng.normal(0, deg, n)))
    return Rotation.from_axes_angles(axis, ang).to_matrix()


def _gaussian_matrix(size: int, sigma: float, sources: np.ndarray) -> np.ndarray:
    """(size, len(sources)) matrix of unit-area 1D Gaussians centred on ``sources`` (px)."""
    d = np.arange(size, dtype=np.float32)[:, None] - sources[None, :].astype(np.float32)
    return (np.exp(-0.5 * (d / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)).astype(np.float32)


def _splat(
    n: int, size: int, pat: np.ndarray, rows: np.ndarray, cols: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Bilinear splat of spot counts into a (size, n, size) float32 stack (row, pattern, col).

    The stack is kept row-major across patterns so that blurring along both axes is one
    large GEMM each, with no transposes (see :func:`_separable`). Off-frame spots drop.
    """
    from ._kernels import bilinear_corners

    grid = np.zeros(size * n * size, np.float32)
    for r, c, w in bilinear_corners(rows, cols, np.float32):
        ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        np.add.at(grid, (r[ok] * n + pat[ok]) * size + c[ok], counts[ok] * w[ok])
    return grid.reshape(size, n, size)


def _separable(stack: np.ndarray, rows_m: np.ndarray, cols_m: np.ndarray) -> np.ndarray:
    """``rows_m @ image @ cols_m.T`` for every image of a (h, n, w) stack, as two GEMMs."""
    h, n, w = stack.shape
    t = stack.reshape(h * n, w) @ cols_m.T  # along columns: (h n, w')
    return (rows_m @ t.reshape(h, -1)).reshape(rows_m.shape[0], n, cols_m.shape[0])  # along rows


def noise_bank(size: int, rng=None) -> np.ndarray:
    """(size,) standard normal float32 values that blocks read at random offsets.

    Drawing 5 million normals costs more than rendering the spots, so a map draws one
    bank (32 MB) and each block reads its noise from random offsets into it.
    """
    return np.random.default_rng(rng).standard_normal(size, dtype=np.float32)


def render_patterns(
    camera: Camera,
    tables: dict,
    rot: np.ndarray,
    phase: np.ndarray,
    region: np.ndarray,
    thickness: np.ndarray,
    weight: np.ndarray,
    center: np.ndarray,
    rng,
    bank: np.ndarray | None = None,
) -> np.ndarray:
    """Render N patterns, each a weighted sum of up to two crystals, as uint8.

    Parameters
    ----------
    camera
        The look (:class:`Camera`).
    tables
        Per-phase reflections and perturbation tables (:func:`_phase_tables`).
    rot
        (N, C, 3, 3) rotation matrices (sample -> crystal) of the C contributions.
    phase, region
        (N, C) phase id and region index of each contribution (region -1: absent).
    thickness
        (N, C) thickness (nm) of each contribution.
    weight
        (N, C) weight of each contribution.
    center
        (N, 2) beam centre (row, col) in px.
    rng
        numpy Generator for the noise.
    bank
        Standard normals to read the noise from (:func:`noise_bank`); default drawn here.

    Returns
    -------
    (N, size, size) uint8 patterns.
    """
    n, n_contrib = phase.shape
    size = camera.size
    pats, rows, cols, cnts = (
        [np.arange(n)],
        [center[:, 0]],
        [center[:, 1]],
        [np.full(n, camera.direct_beam * camera.exposure)],
    )
    for (pid, tab), c in ((pt, c) for pt in tables.items() for c in range(n_contrib)):
        sel_n = np.flatnonzero((phase[:, c] == pid) & (region[:, c] >= 0))
        if sel_n.size == 0:
            continue
        t = thickness[sel_n, c]
        xy, inten, idx = simulate.kinematic_spots(
            tab.refl,
            rot[sel_n, c],
            kv=camera.kv,
            max_excitation_error=camera.relrod * np.sqrt(60.0 / t),  # thinner foil: longer relrods
            precession_deg=camera.precession_deg,
            min_intensity=2e-3,
            max_spots=MAX_SPOTS[PHASES[pid]],
        )
        z = tab.perturb[region[sel_n, c] % len(tab.perturb)]
        pert = np.exp(camera.perturbation * np.take_along_axis(z, np.maximum(idx, 0), axis=1))
        scale = camera.exposure * weight[sel_n, c] * (0.5 + t / 100.0)
        counts = scale[:, None] * (inten / tab.i_ref) ** camera.gamma * pert
        keep = idx >= 0
        pats.append(np.broadcast_to(sel_n[:, None], idx.shape)[keep])
        rows.append((center[sel_n, 0:1] + xy[..., 1] / camera.calibration)[keep])
        cols.append((center[sel_n, 1:2] + xy[..., 0] / camera.calibration)[keep])
        cnts.append(counts[keep])
    pat, r, c, a = (np.concatenate(v) for v in (pats, rows, cols, cnts))
    splat = _splat(n, size, pat, r, c, a)  # (row, pattern, col) layout throughout
    px = np.arange(size, dtype=np.float32)
    core = _gaussian_matrix(size, camera.spot_sigma, px)
    image = _separable(splat, core, core)
    # long PSF tails, smooth: from the splat pooled 4x4, drawn back at full size
    f = 4 if size % 4 == 0 else 1
    pooled = splat.reshape(size // f, f, n, size // f, f).sum(axis=(1, 4))
    cells = np.arange(size // f, dtype=np.float32) * f + (f - 1) / 2
    for s_t, w_t in zip(camera.tail_sigmas, camera.tail_weights, strict=True):
        m = _gaussian_matrix(size, s_t, cells) * np.float32(np.sqrt(w_t))
        image += _separable(pooled, m, m)
    # diffuse background falling with |k| (more in thicker foil): two broad Gaussians about the
    # direct beam, drawn like the tails from a pooled grid holding only the beam position
    t_mean = (np.where(region >= 0, thickness, 0) * weight).sum(axis=1)
    sig0 = camera.background_k / camera.calibration  # px
    beam = _splat(
        n,
        size // f,
        np.arange(n),
        (center[:, 0] - (f - 1) / 2) / f,
        (center[:, 1] - (f - 1) / 2) / f,
        camera.background * t_mean / 75.0,
    )
    for s_b, w_b in ((sig0, 0.7), (3.0 * sig0, 0.3)):
        m = _gaussian_matrix(size, s_b, cells) * np.float32(np.sqrt(w_b * 2 * np.pi) * s_b)
        image += _separable(beam, m, m)
    image += np.float32(camera.background_floor)
    # shot noise (Gaussian approximation, variance = counts) read from a noise bank, then the camera
    flat = image.reshape(size, n * size)
    npx = flat.size
    if bank is None or bank.size < npx + 4096:
        bank = noise_bank(2 * npx + 4096, rng)
    o1, o2 = rng.integers(0, bank.size - npx, size=2)
    adu = flat + np.sqrt(flat) * bank[o1 : o1 + npx].reshape(flat.shape)
    adu *= np.float32(camera.gain)
    adu += np.float32(camera.read_noise) * bank[o2 : o2 + npx][::-1].reshape(
        flat.shape
    ) + np.float32(camera.offset)
    out = np.clip(adu, 0, 255, out=adu).astype(np.uint8).reshape(size, n, size)
    return np.ascontiguousarray(out.transpose(1, 0, 2))


def simulate_patterns(
    phase: str,
    rotations: Rotation,
    camera: Camera | None = None,
    thickness_nm: float = 60.0,
    centers: np.ndarray | None = None,
    rng=None,
) -> np.ndarray:
    """Camera-like patterns of one phase at known orientations (for tests and demos).

    Parameters
    ----------
    phase
        ``"ferrite"``, ``"NbC"`` or ``"cementite"``.
    rotations
        N orix rotations (sample -> crystal).
    camera
        The look; default :class:`Camera` (fixed, moderate noise).
    thickness_nm
        Foil thickness.
    centers
        (N, 2) beam centres (row, col) px; default the pattern middle.

    Returns
    -------
    (N, size, size) uint8 patterns.
    """
    if phase not in PHASE_ID:
        raise ValueError(f"Unknown phase {phase!r}; expected one of {PHASES}")
    camera = camera or Camera()
    rng = np.random.default_rng(rng)
    mats = rotations.to_matrix().reshape(-1, 3, 3)
    n = len(mats)
    tables = _phase_tables(camera, int(rng.integers(2**31)), phases=(phase,))
    centers = (
        np.full((n, 2), camera.center)
        if centers is None
        else np.asarray(centers, float).reshape(n, 2)
    )
    return render_patterns(
        camera,
        tables,
        np.stack([mats, mats], axis=1),
        np.tile([[PHASE_ID[phase], -1]], (n, 1)),
        np.tile([[0, -1]], (n, 1)),
        np.full((n, 2), float(thickness_nm)),
        np.tile([[1.0, 0.0]], (n, 1)),
        centers,
        rng,
    )


# --------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SynthMap:
    """A synthetic map on disk: the 4D patterns and the ground truth."""

    folder: Path

    @property
    def patterns_path(self) -> Path:
        return self.folder / "patterns.zspy"

    @property
    def spec(self) -> dict:
        return json.loads((self.folder / "spec.json").read_text())

    def truth(self):
        """Ground truth as an orix ``CrystalMap`` (phase, rotation, thickness, weight)."""
        from orix import io as oio

        return oio.load(self.folder / "truth.h5")

    def truth_arrays(self) -> dict:
        with np.load(self.folder / "truth.npz") as f:
            return {k: f[k] for k in f.files}

    def load(self, lazy: bool = True):
        """The patterns as a (lazy) HyperSpy/pyxem signal with calibration."""
        from . import io

        return io.load_map(self.patterns_path, lazy=lazy)


def _center_field(shape, camera: Camera, rng) -> np.ndarray:
    h, w = shape
    rr, cc = np.mgrid[0:h, 0:w] / np.array([max(h - 1, 1), max(w - 1, 1)])[:, None, None]
    a = camera.center_drift * rng.uniform(-1, 1, size=(2, 3))
    field = np.stack(
        [
            a[i, 0] * (rr - 0.5)
            + a[i, 1] * (cc - 0.5)
            + 0.5 * a[i, 2] * np.sin(2 * np.pi * (rr + cc + rng.uniform()))
            for i in range(2)
        ],
        axis=-1,
    )
    return camera.center + field + rng.normal(0, camera.center_jitter, size=(h, w, 2))


class _Plan:
    """Everything needed to render any block of the map (picklable, small)."""

    def __init__(self, micro: Microstructure, camera: Camera, centers: np.ndarray, seed: int):
        self.micro, self.camera, self.centers, self.seed = micro, camera, centers, seed
        self._tables = None
        self._bank = None
        self.progress = None  # a tqdm bar updated after every block

    @property
    def tables(self):
        if self._tables is None:
            self._tables = _phase_tables(self.camera, self.seed)
        return self._tables

    @property
    def bank(self):
        if self._bank is None:
            self._bank = noise_bank(8 * 2**20, [self.seed, 11])
        return self._bank

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # dask runs one block per core: no nested BLAS threads
            out = self._block(r0, r1, c0, c1)
        if self.progress is not None:
            self.progress.update((r1 - r0) * (c1 - c0))
        return out

    def _block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        m = self.micro
        rng = np.random.default_rng([self.seed, r0, c0, 7])
        lab = m.labels[r0:r1, c0:c1].ravel()
        sec = m.second[r0:r1, c0:c1].ravel()
        w = m.weight[r0:r1, c0:c1].ravel()
        n = lab.size
        region = np.stack([lab, sec], axis=1)
        phase = np.where(region >= 0, m.phase[np.maximum(region, 0)], -1)
        base = (
            Rotation(m.rotations[np.maximum(region, 0)].reshape(-1, 4))
            .to_matrix()
            .reshape(n, 2, 3, 3)
        )
        spread = _spread(2 * n, self.camera.spread_deg, rng).reshape(n, 2, 3, 3)
        rot = spread @ base  # small crystal-frame misorientation around the region's orientation
        thick = m.thickness[np.maximum(region, 0)]
        weight = np.stack([w, 1 - w], axis=1)
        center = self.centers[r0:r1, c0:c1].reshape(n, 2)
        out = render_patterns(
            self.camera, self.tables, rot, phase, region, thick, weight, center, rng, self.bank
        )
        return out.reshape(r1 - r0, c1 - c0, self.camera.size, self.camera.size)


def _dask_map(plan: _Plan, chunk: int):
    import dask.array as da

    h, w = plan.micro.labels.shape
    s = plan.camera.size
    chunks = (
        tuple(min(chunk, h - i) for i in range(0, h, chunk)),
        tuple(min(chunk, w - j) for j in range(0, w, chunk)),
        (s,),
        (s,),
    )

    def make(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"][:2]
        return plan.block(r0, r1, c0, c1)

    return da.map_blocks(make, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0, 0), np.uint8))


def _truth_crystal_map(micro: Microstructure, step_nm: float):
    from orix.crystal_map import CrystalMap, PhaseList

    h, w = micro.labels.shape
    rr, cc = np.mgrid[0:h, 0:w]
    main = micro.labels.ravel()
    plist = PhaseList(phases=crystal.get_phases(PHASES), ids=list(range(len(PHASES))))
    return CrystalMap(
        rotations=Rotation(micro.rotations[main]),
        phase_id=micro.phase[main],
        x=cc.ravel() * step_nm,
        y=rr.ravel() * step_nm,
        phase_list=plist,
        prop={
            "thickness": micro.thickness[main],
            "weight": micro.weight.ravel(),
            "region": main.astype(float),
        },
        scan_unit="nm",
    )


def write_truth(micro: Microstructure, folder: Path, step_nm: float, centers: np.ndarray) -> None:
    """Write truth.h5, truth.ang (orix) and truth.npz into ``folder``."""
    from orix import io as oio

    xmap = _truth_crystal_map(micro, step_nm)
    oio.save(folder / "truth.h5", xmap)
    oio.save(folder / "truth.ang", xmap)
    np.savez_compressed(
        folder / "truth.npz",
        phase_id=micro.phase[micro.labels],
        region=micro.labels,
        second=micro.second,
        weight=micro.weight,
        thickness=micro.thickness[micro.labels],
        quaternions=micro.rotations[micro.labels],
        region_phase=micro.phase,
        region_quaternions=micro.rotations,
        region_thickness=micro.thickness,
        beam_center=centers,
    )


def generate_map(
    folder: str | Path,
    shape: tuple[int, int] = (64, 64),
    n_grains: int = 30,
    colony_fraction: float = 0.15,
    cementite_particles: float = 1.0,
    nbc_particles: float = 1.5,
    pattern_size: int = 144,
    calibration: float = 0.02,
    kv: float = 200.0,
    step_nm: float = 5.0,
    randomize_camera: bool = True,
    avoid: dict[str, np.ndarray] | None = None,
    min_misorientation: float = 10.0,
    chunk: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    show_progressbar: bool = True,
) -> SynthMap:
    """Generate one synthetic map and its ground truth into ``folder`` (atomically).

    Parameters
    ----------
    folder
        Output folder (created; must not exist unless ``overwrite``).
    shape
        Scan shape (rows, cols).
    n_grains, colony_fraction, cementite_particles, nbc_particles
        Microstructure (:func:`microstructure`).
    pattern_size
        Pattern side (px).
    calibration
        Nominal reciprocal calibration (1/Å per px); the camera draw varies it by +-5 %.
    kv
        Beam energy (kV).
    step_nm
        Scan step (nm).
    randomize_camera
        Draw the camera look at random (:func:`random_camera`).
    avoid
        Orientations (quaternions per phase name) the map must stay away from (test maps).
    min_misorientation
        Smallest disorientation (deg) to ``avoid``.
    chunk
        Scan pixels per block side written at once.
    seed
        Seeds everything: the same seed gives the same map.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"Map folder {folder} already exists; pass overwrite=True or choose another folder"
        )
    if pattern_size < 16:
        raise ValueError(
            f"pattern_size {pattern_size!r} is too small; expected at least 16 px (144 for the default)"
        )
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    micro = microstructure(
        tuple(shape), n_grains, colony_fraction, cementite_particles, nbc_particles, rng=rng
    )
    achieved = assign_orientations(micro, rng, avoid, min_misorientation)
    camera = random_camera(rng, pattern_size, calibration, kv, randomize_camera)
    centers = _center_field(tuple(shape), camera, rng)
    plan = _Plan(micro, camera, centers, int(rng.integers(2**31)))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        from tqdm.auto import tqdm

        from . import io

        data = _dask_map(plan, chunk)
        n = int(np.prod(shape))
        with tqdm(
            total=n, desc=f"patterns {folder.name}", unit="pattern", disable=not show_progressbar
        ) as bar:
            plan.progress = bar
            io.save_map(
                tmp / "patterns.zspy", data, calibration=camera.calibration, kv=kv, step_nm=step_nm
            )
            plan.progress = None
        write_truth(micro, tmp, step_nm, centers)
        seconds = time.perf_counter() - t0
        spec = {
            "shape": list(shape),
            "n_grains": n_grains,
            "colony_fraction": colony_fraction,
            "cementite_particles": cementite_particles,
            "nbc_particles": nbc_particles,
            "pattern_size": pattern_size,
            "kv": kv,
            "step_nm": step_nm,
            "seed": seed,
            "camera": dataclasses.asdict(camera),
            "phases": list(PHASES),
            "phase_fractions": {
                p: float((micro.phase[micro.labels] == i).mean()) for i, p in enumerate(PHASES)
            },
            "n_regions": int(len(micro.phase)),
            "test_rule": None
            if avoid is None
            else {
                "rule": "every region orientation is at least min_misorientation (disorientation under the phase's "
                "point group, also against the training orientations turned 180 deg about the beam) from every "
                "training region orientation of the same phase",
                "min_misorientation_deg": min_misorientation,
                "achieved_min_deg": achieved,
            },
            "seconds": seconds,
            "patterns_per_second": float(np.prod(shape) / seconds),
        }
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d patterns) in %.1f s", folder, int(np.prod(shape)), seconds)
    return SynthMap(folder)


def region_orientations(maps: list[SynthMap]) -> dict[str, np.ndarray]:
    """Quaternions of every region, per phase name, over ``maps`` (to keep a test map away)."""
    out: dict[str, list] = {p: [] for p in PHASES}
    for m in maps:
        t = m.truth_arrays()
        for p, i in PHASE_ID.items():
            out[p].append(t["region_quaternions"][t["region_phase"] == i])
    return {p: np.concatenate(v) if v else np.zeros((0, 4)) for p, v in out.items()}


MAP_KEYS = (
    "map_shape",
    "n_grains",
    "colony_fraction",
    "cementite_particles",
    "nbc_particles",
    "pattern_size",
    "calibration",
    "kv",
    "randomize_camera",
    "min_misorientation",
    "seed",
)


def steel_maps(params=None, show_progressbar: bool = True) -> dict[str, SynthMap]:
    """The three synthetic maps (``train1``, ``train2``, ``test``) of a profile, generated once.

    Parameters
    ----------
    params
        A profile name (``"default"``, ``"ci"``, ``"full"``), or resolved 00_ingest
        parameters (:func:`temlib.config.load`) whose map keys may be overridden.

    Maps live in ``data/synthetic/<profile>/`` (or ``<profile>-<hash>/`` when the map
    parameters differ from the profile's) and are regenerated only when they change.
    """
    from . import config

    if params is None or isinstance(params, str):
        params = config.load("00_ingest", params or "default")
    profile_spec = {k: config.load("00_ingest", params.profile)[k] for k in MAP_KEYS}
    spec = {k: params[k] for k in MAP_KEYS}
    key = hashlib.sha1(
        json.dumps([spec, GENERATOR_VERSION], sort_keys=True, default=list).encode()
    ).hexdigest()[:10]
    name = params.profile if spec == profile_spec else f"{params.profile}-{key}"
    root = paths.data_dir("synthetic") / name
    stamp = root / "maps.json"
    names = ("train1", "train2", "test")
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()).get("key") == key
        and all((root / n / "spec.json").is_file() for n in names)
    ):
        return {n: SynthMap(root / n) for n in names}
    root.mkdir(parents=True, exist_ok=True)
    common = dict(
        shape=tuple(spec["map_shape"]),
        n_grains=spec["n_grains"],
        colony_fraction=spec["colony_fraction"],
        cementite_particles=spec["cementite_particles"],
        nbc_particles=spec["nbc_particles"],
        pattern_size=spec["pattern_size"],
        calibration=spec["calibration"],
        kv=spec["kv"],
        randomize_camera=spec["randomize_camera"],
        overwrite=True,
        show_progressbar=show_progressbar,
    )
    maps = {}
    for i, n in enumerate(names[:2]):
        maps[n] = generate_map(root / n, seed=spec["seed"] * 100 + i, **common)
    maps["test"] = generate_map(
        root / "test",
        seed=spec["seed"] * 100 + 2,
        avoid=region_orientations([maps["train1"], maps["train2"]]),
        min_misorientation=spec["min_misorientation"],
        **common,
    )
    stamp.write_text(json.dumps({"key": key, "spec": spec}, indent=2, default=list))
    return maps


def second_test_map(
    maps: dict[str, SynthMap], shape: tuple[int, int] = (150, 150), seed: int = 12345
) -> SynthMap:
    """Another test map beside a profile's three: new seed, camera and orientations.

    More cementite colonies and particles and more NbC than the profile's maps (so the
    minority phases have more grain pixels to score), orientations at least 10 deg from
    every region of ``maps["train1"]`` and ``maps["train2"]``. Written next to them as
    ``test_second/`` (regenerated each call; deterministic for a seed).
    """
    folder = maps["test"].folder.parent / "test_second"
    return generate_map(
        folder,
        shape=tuple(shape),
        n_grains=50,
        colony_fraction=0.3,
        cementite_particles=3.0,
        nbc_particles=4.0,
        avoid=region_orientations([maps["train1"], maps["train2"]]),
        seed=seed,
        overwrite=True,
        show_progressbar=False,
    )


def summary(maps: dict[str, SynthMap]) -> list[dict]:
    """One row per map: shape, calibration, phase fractions, camera draw, generation speed."""
    rows = []
    for name, m in maps.items():
        sp = m.spec
        cam = sp["camera"]
        rule = sp.get("test_rule") or {}
        rows.append(
            {
                "map": name,
                "scan": "x".join(map(str, sp["shape"])),
                "calibration (1/Å/px)": round(cam["calibration"], 5),
                **{f"{p} %": round(100 * f, 1) for p, f in sp["phase_fractions"].items()},
                "regions": sp["n_regions"],
                "precession (deg)": round(cam["precession_deg"], 2),
                "spot sigma (px)": round(cam["spot_sigma"], 2),
                "gamma": round(cam["gamma"], 2),
                "beam drift (px)": round(cam["center_drift"], 2),
                "min misorientation to training (deg)": (
                    ", ".join(f"{k} {v:.1f}" for k, v in rule.get("achieved_min_deg", {}).items())
                    if rule
                    else "-"
                ),
                "patterns/s": round(sp["patterns_per_second"]),
            }
        )
    return rows


def sample_patterns(
    m: SynthMap, per_phase: int = 6, rng=None, pure: bool = True
) -> tuple[np.ndarray, list[str]]:
    """A few patterns of each phase from map ``m`` with titles (phase, scan position, weight).

    ``pure`` picks pixels inside a region (weight 1); otherwise boundary pixels too.
    """
    rng = np.random.default_rng(rng)
    t = m.truth_arrays()
    data = m.load().data
    pats, titles = [], []
    for pid, name in enumerate(PHASES):
        ok = (t["phase_id"] == pid) & ((t["weight"] >= 1.0) if pure else True)
        rr, cc = np.nonzero(ok)
        if rr.size == 0:
            continue
        for j in rng.choice(rr.size, size=min(per_phase, rr.size), replace=False):
            pats.append(np.asarray(data[rr[j], cc[j]]))
            titles.append(f"{name} ({rr[j]}, {cc[j]})")
    return np.stack(pats), titles


def training_vs_test_disorientation(maps: dict[str, SynthMap]) -> dict[str, np.ndarray]:
    """Per phase: each test region's smallest disorientation (deg) to any training region."""
    train = region_orientations([maps["train1"], maps["train2"]])
    test = region_orientations([maps["test"]])
    return {p: min_disorientation(test[p], train[p], p) for p in PHASES if len(test[p])}


def _cli_synth_map(parser):
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (patterns.zspy + truth.h5/.ang/.npz + spec.json)",
    )
    parser.add_argument("--shape", nargs=2, type=int, default=[64, 64], metavar=("ROWS", "COLS"))
    parser.add_argument("--grains", type=int, default=30, help="ferrite grains")
    parser.add_argument("--pattern-size", type=int, default=144)
    parser.add_argument("--calibration", type=float, default=0.02, help="1/Å per px")
    parser.add_argument("--kv", type=float, default=200.0)
    parser.add_argument(
        "--avoid", nargs="*", default=[], help="training map folders whose orientations to avoid"
    )
    parser.add_argument("--min-misorientation", type=float, default=10.0, help="deg, with --avoid")
    parser.add_argument(
        "--fixed-camera", action="store_true", help="do not randomise the camera look"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")

    def run(args):
        avoid = None
        if args.avoid:
            for a in args.avoid:
                if not (Path(a) / "truth.npz").is_file():
                    raise FileNotFoundError(
                        f"--avoid {a} is not a synthetic map folder (no truth.npz)"
                    )
            avoid = region_orientations([SynthMap(Path(a)) for a in args.avoid])
        m = generate_map(
            args.out,
            shape=tuple(args.shape),
            n_grains=args.grains,
            pattern_size=args.pattern_size,
            calibration=args.calibration,
            kv=args.kv,
            randomize_camera=not args.fixed_camera,
            avoid=avoid,
            min_misorientation=args.min_misorientation,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        spec = m.spec
        print(
            f"wrote {m.folder}: {spec['shape'][0]}x{spec['shape'][1]} patterns of {args.pattern_size} px, "
            f"{spec['patterns_per_second']:.0f} patterns/s; phases {spec['phase_fractions']}"
        )
        return 0

    return run
