"""Kinematic diffraction: diffsims template libraries and a fast batched spot calculator.

Two entry points share diffsims' physics (structure factors with Lobato scattering
factors, Ewald-sphere excitation error, Lorentzian relrod / precession shape factors):

- :func:`template_library` runs ``diffsims.SimulationGenerator.calculate_diffraction2d``
  over an orix sampling of the phase's fundamental zone (``"reduced"``: beam
  directions in the stereographic triangle, for template matching with an in-plane
  rotation; ``"full"``: every orientation, for regression training) and caches the
  spot lists on disk keyed by every parameter.
- :func:`kinematic_spots` computes the same spots for thousands of orientations at
  once with numpy (the reflections and their structure factors come from diffsims,
  once per phase). The synthetic map generator uses it; ``tests/test_simulate.py``
  checks it against diffsims spot by spot.

Conventions (as diffsims and orix): a rotation ``R`` maps sample to crystal
(``v_crystal = R v_sample``), so a crystal vector ``g`` appears in the laboratory
frame as ``R^-1 g``; the beam runs along z; spot coordinates ``(x, y)`` are in 1/Å and
a pattern pixel is ``col = cx + x / calibration``, ``row = cy + y / calibration``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from orix.crystal_map import Phase
from orix.quaternion import Rotation
from tqdm.auto import tqdm

from . import crystal, paths

log = logging.getLogger(__name__)

PLANCK = 6.62607015e-34
M_E = 9.1093837015e-31
Q_E = 1.602176634e-19
C_LIGHT = 299792458.0


def wavelength(kv: float) -> float:
    """Relativistic electron wavelength (Å) at accelerating voltage ``kv`` (kV)."""
    if not kv > 0:
        raise ValueError(f"Beam energy {kv!r} kV is not positive; expected e.g. 200")
    e = kv * 1e3 * Q_E
    return PLANCK / np.sqrt(2 * M_E * e * (1 + e / (2 * M_E * C_LIGHT**2))) * 1e10


# --------------------------------------------------------------------------------------
# Fast batched kinematics
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reflections:
    """Every reciprocal lattice vector of a phase within ``g_max`` and its |F|^2.

    Attributes
    ----------
    phase_name
        Name of the phase.
    hkl
        (G, 3) Miller indices.
    g
        (G, 3) Cartesian reciprocal vectors in the crystal frame (1/Å).
    intensity
        (G,) kinematic |F_g|^2 (diffsims, Lobato scattering factors), zeros removed.
    """

    phase_name: str
    hkl: np.ndarray
    g: np.ndarray
    intensity: np.ndarray

    @property
    def size(self) -> int:
        return len(self.intensity)


def reflections(
    phase: Phase | str, g_max: float = 1.5, min_relative_intensity: float = 1e-6
) -> Reflections:
    """Reflections of ``phase`` up to ``g_max`` (1/Å) with non-zero structure factor.

    Parameters
    ----------
    phase
        orix ``Phase`` with structure, or a name known to :mod:`temlib.crystal`.
    g_max
        Largest reciprocal-vector length (1/Å).
    min_relative_intensity
        Systematic absences (|F|^2 below this fraction of the largest) are dropped.
    """
    from diffsims.crystallography._diffracting_vector import DiffractingVector
    from diffsims.utils.sim_utils import get_kinematical_intensities

    if isinstance(phase, str):
        phase = crystal.get_phase(phase)
    if not g_max > 0:
        raise ValueError(
            f"g_max {g_max!r} is not positive; expected a reciprocal radius in 1/Å such as 1.5"
        )
    vec = DiffractingVector.from_min_dspacing(
        phase, min_dspacing=1 / g_max, include_zero_vector=False
    )
    inten = get_kinematical_intensities(phase.structure, vec.hkl, vec.gspacing, prefactor=1.0)
    keep = inten > inten.max() * min_relative_intensity
    return Reflections(
        phase_name=phase.name,
        hkl=np.round(np.asarray(vec.hkl)[keep]).astype(np.int32),
        g=np.asarray(vec.data)[keep].astype(np.float64),
        intensity=np.asarray(inten)[keep].astype(np.float64),
    )


def excitation_error(xyz: np.ndarray, wavelength_a: float) -> np.ndarray:
    """Excitation error (1/Å) of laboratory-frame vectors ``xyz`` (..., 3), as diffsims."""
    r = 1.0 / wavelength_a
    rxy2 = xyz[..., 0] ** 2 + xyz[..., 1] ** 2
    return (r - np.sqrt(np.maximum(r * r - rxy2, 0.0))) - xyz[..., 2]


def shape_factor(
    s: np.ndarray, width: float | np.ndarray, r_spot: np.ndarray, precession_deg: float
) -> np.ndarray:
    """Relrod shape factor: diffsims' Lorentzian, or its precession-integrated form."""
    from diffsims.utils.shape_factor_models import lorentzian, lorentzian_precession

    if precession_deg > 0:
        return lorentzian_precession(s, width, r_spot, np.deg2rad(precession_deg))
    return lorentzian(s, width)


def kinematic_spots(
    refl: Reflections,
    rotations: Rotation | np.ndarray,
    kv: float = 200.0,
    max_excitation_error: float | np.ndarray = 0.05,
    precession_deg: float = 0.0,
    min_intensity: float = 1e-4,
    max_spots: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spots of ``refl`` for N orientations at once.

    Parameters
    ----------
    refl
        Reflections of one phase (:func:`reflections`).
    rotations
        N orix rotations (sample -> crystal) or their (N, 3, 3) matrices.
    kv
        Beam energy (kV).
    max_excitation_error
        Relrod half-width (1/Å), scalar or (N,) (it scales as 1 / thickness).
    precession_deg
        Precession angle (degrees), 0 for none.
    min_intensity
        Spots weaker than this fraction of the pattern's strongest are dropped.
    max_spots
        Keep at most this many spots per pattern (the strongest); default all.

    Returns
    -------
    xy
        (N, S, 2) spot positions (1/Å), padded with 0.
    intensity
        (N, S) |F|^2 x shape factor, 0 for padding.
    index
        (N, S) index into ``refl`` (-1 for padding), e.g. to perturb each reflection.
    """
    mats = rotations.to_matrix() if isinstance(rotations, Rotation) else np.asarray(rotations)
    mats = mats.reshape(-1, 3, 3).astype(np.float32)
    n = len(mats)
    lab = np.matmul(refl.g.astype(np.float32), mats)  # (N, G, 3): (g M)_i = (M^T g)_i = (R^-1 g)_i
    s = excitation_error(lab, wavelength(kv))
    r_spot = np.hypot(lab[..., 0], lab[..., 1])
    width = np.broadcast_to(
        np.asarray(max_excitation_error, dtype=np.float32).reshape(-1, 1), (n, 1)
    )
    reach = width + (
        r_spot * np.float32(np.deg2rad(precession_deg) * 1.05) if precession_deg > 0 else 0
    )
    pat, ref = np.nonzero(np.abs(s) < reach)  # only reflections near the Ewald sphere
    inten = (
        shape_factor(
            s[pat, ref].astype(np.float64),
            width[pat, 0].astype(np.float64),
            r_spot[pat, ref],
            precession_deg,
        )
        * refl.intensity[ref]
    )
    strongest = np.zeros(n)
    np.maximum.at(strongest, pat, inten)
    ok = inten >= strongest[pat] * min_intensity
    pat, ref, inten = pat[ok], ref[ok], inten[ok]
    order = np.lexsort((-inten, pat))  # by pattern, strongest first
    pat, ref, inten = pat[order], ref[order], inten[order]
    counts = np.bincount(pat, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(pat)) - starts[pat]
    n_keep = max(int(counts.max()) if n else 1, 1)
    if max_spots is not None:
        n_keep = min(n_keep, max_spots)
    sel = rank < n_keep
    pat, ref, inten, rank = pat[sel], ref[sel], inten[sel], rank[sel]
    xy = np.zeros((n, n_keep, 2), np.float64)
    inten_k = np.zeros((n, n_keep), np.float64)
    index = np.full((n, n_keep), -1, np.int64)
    xy[pat, rank] = lab[pat, ref, :2]
    inten_k[pat, rank] = inten
    index[pat, rank] = ref
    return xy, inten_k, index


# --------------------------------------------------------------------------------------
# diffsims template libraries
# --------------------------------------------------------------------------------------

LIBRARY_KINDS = ("reduced", "full")


@dataclasses.dataclass
class TemplateLibrary:
    """Simulated spot lists of one phase over a sampling of its fundamental zone.

    Attributes
    ----------
    phase
        The orix phase.
    rotations
        (T,) orix rotations of the templates (sample -> crystal).
    xy
        (T, S, 2) spot positions in 1/Å, zero-padded.
    intensity
        (T, S) spot intensities, 0 for padding, strongest first.
    hkl
        (T, S, 3) Miller indices of the spots.
    params
        The parameters that made the library (the cache key).
    seconds
        Time the diffsims simulation took (0 when read from the cache).
    """

    phase: Phase
    rotations: Rotation
    xy: np.ndarray
    intensity: np.ndarray
    hkl: np.ndarray
    params: dict
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return self.rotations.size

    @property
    def n_spots(self) -> np.ndarray:
        """(T,) number of spots per template."""
        return (self.intensity > 0).sum(axis=1)

    def to_simulation(self):
        """Recompute the library as a diffsims ``Simulation2D`` (for pyxem's matcher)."""
        return _generator(self.params).calculate_diffraction2d(
            self.phase,
            rotation=self.rotations,
            reciprocal_radius=self.params["reciprocal_radius"],
            max_excitation_error=self.params["max_excitation_error"],
            with_direct_beam=False,
        )


def _sampling(phase: Phase, kind: str, resolution: float) -> Rotation:
    from orix.sampling import get_sample_fundamental, get_sample_reduced_fundamental

    if kind == "reduced":
        return get_sample_reduced_fundamental(resolution=resolution, point_group=phase.point_group)
    return get_sample_fundamental(resolution=resolution, point_group=phase.point_group)


def _generator(params: dict):
    from diffsims.generators.simulation_generator import SimulationGenerator

    return SimulationGenerator(
        params["kv"],
        precession_angle=params["precession_deg"],
        minimum_intensity=params["minimum_intensity"],
    )


def _cache_key(params: dict) -> str:
    blob = json.dumps(params, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def template_library(
    phase: Phase | str,
    kind: str = "reduced",
    resolution: float = 1.0,
    reciprocal_radius: float = 1.5,
    max_excitation_error: float = 0.05,
    precession_deg: float = 0.0,
    minimum_intensity: float = 1e-4,
    kv: float = 200.0,
    cache: bool | str | Path = True,
    show_progressbar: bool = False,
    batch: int = 2000,
) -> TemplateLibrary:
    """Simulate (or read from the cache) a template library of ``phase``.

    The spots are those of diffsims' ``calculate_diffraction2d`` (diffsims reflections,
    structure factors and shape factors), computed by :func:`kinematic_spots` for
    ``batch`` orientations at a time: identical without precession (see
    ``compare_with_diffsims``), tens of times faster, which matters for full-zone
    libraries of tens of thousands of templates. With precession the set of spots
    near the edge of the precession cone can differ slightly from diffsims'.

    Parameters
    ----------
    phase
        orix ``Phase`` with structure, or a name (``"ferrite"``, ``"NbC"``, ``"cementite"``, ``"MgO"``).
    kind
        ``"reduced"`` (beam directions in the fundamental sector, in-plane angle 0: for
        template matching, which scans the in-plane angle itself) or ``"full"`` (the whole
        fundamental zone: for regression training).
    resolution
        Angular step of the orix sampling (degrees).
    reciprocal_radius
        Largest scattering vector simulated (1/Å).
    max_excitation_error
        Relrod half-width (1/Å); about 1 / thickness.
    precession_deg, minimum_intensity, kv
        Passed to ``diffsims.SimulationGenerator``.
    cache
        True: ``data/cache/templates``; a folder; or False for no cache.
    show_progressbar
        tqdm bar over the batches.
    batch
        Orientations per batch (bounds memory: about batch x reflections x 12 bytes).
    """
    if isinstance(phase, str):
        phase = crystal.get_phase(phase)
    if kind not in LIBRARY_KINDS:
        raise ValueError(f"Unknown library kind {kind!r}; expected one of {LIBRARY_KINDS}")
    if not 0 < resolution <= 30:
        raise ValueError(
            f"Resolution {resolution!r} deg is out of range; expected 0 < resolution <= 30"
        )
    params = {
        "phase": phase.name,
        "kind": kind,
        "resolution": float(resolution),
        "reciprocal_radius": float(reciprocal_radius),
        "max_excitation_error": float(max_excitation_error),
        "precession_deg": float(precession_deg),
        "minimum_intensity": float(minimum_intensity),
        "kv": float(kv),
        "version": 1,
    }
    path = None
    if cache:
        folder = paths.data_dir("cache") / "templates" if cache is True else Path(cache)
        path = folder / f"{phase.name}_{kind}_{_cache_key(params)}.npz"
        if path.is_file():
            with np.load(path) as f:
                return TemplateLibrary(
                    phase=phase,
                    rotations=Rotation(f["quaternions"]),
                    xy=f["xy"],
                    intensity=f["intensity"],
                    hkl=f["hkl"],
                    params=params,
                )
    rotations = _sampling(phase, kind, resolution)
    t0 = time.perf_counter()
    refl = reflections(phase, g_max=reciprocal_radius)
    parts = []
    for start in tqdm(
        range(0, rotations.size, batch), desc=f"{phase.name} {kind}", disable=not show_progressbar
    ):
        parts.append(
            kinematic_spots(
                refl,
                rotations[start : start + batch],
                kv=kv,
                max_excitation_error=max_excitation_error,
                precession_deg=precession_deg,
                min_intensity=minimum_intensity,
            )
        )
    seconds = time.perf_counter() - t0
    n_max = max(max(p[1].shape[1] for p in parts), 1)
    xy = np.zeros((rotations.size, n_max, 2), np.float32)
    inten = np.zeros((rotations.size, n_max), np.float32)
    hkl = np.zeros((rotations.size, n_max, 3), np.int16)
    start = 0
    for p_xy, p_int, p_idx in parts:
        n, k = p_int.shape
        xy[start : start + n, :k] = p_xy
        inten[start : start + n, :k] = p_int
        hkl[start : start + n, :k] = np.where(
            p_idx[..., None] >= 0, refl.hkl[np.maximum(p_idx, 0)], 0
        )
        start += n
    lib = TemplateLibrary(phase, rotations, xy, inten, hkl, params, seconds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, quaternions=rotations.data, xy=xy, intensity=inten, hkl=hkl)
        os.replace(tmp, path)
    log.info("simulated %d %s templates of %s in %.1f s", rotations.size, kind, phase.name, seconds)
    return lib


def render_templates(
    lib: TemplateLibrary,
    size: int = 144,
    calibration: float = 0.02,
    sigma: float = 1.5,
    max_spots: int | None = None,
    indices=None,
) -> np.ndarray:
    """Draw templates as (T, size, size) float32 images of Gaussian spots (for galleries)."""
    idx = np.arange(lib.size) if indices is None else np.asarray(indices)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size // 2
    out = np.zeros((len(idx), size, size), np.float32)
    for k, i in enumerate(idx):
        n = lib.n_spots[i] if max_spots is None else min(max_spots, lib.n_spots[i])
        for (x, y), w in zip(lib.xy[i, :n], lib.intensity[i, :n], strict=True):
            col, row = c + x / calibration, c + y / calibration
            if -3 * sigma < col < size + 3 * sigma and -3 * sigma < row < size + 3 * sigma:
                out[k] += w * np.exp(-((xx - col) ** 2 + (yy - row) ** 2) / (2 * sigma**2))
    return out


def beam_directions(lib: TemplateLibrary) -> np.ndarray:
    """(T, 3) unit beam direction (sample z) of each template in crystal Cartesian coordinates."""
    return lib.rotations.to_matrix() @ np.array([0.0, 0.0, 1.0])


def zone_axis_label(phase: Phase, direction: np.ndarray, max_index: int = 6) -> str:
    """The simplest [uvw] within 1 deg of a crystal Cartesian ``direction``, or '~[u v w]'."""
    from orix.vector import Miller

    d = np.asarray(direction, float) / np.linalg.norm(direction)
    best, best_ang = None, 180.0
    for u in range(-max_index, max_index + 1):
        for v in range(-max_index, max_index + 1):
            for w in range(-max_index, max_index + 1):
                if (u, v, w) == (0, 0, 0) or np.gcd.reduce([u, v, w]) != 1:
                    continue
                m = Miller(uvw=[u, v, w], phase=phase).unit.data[0]
                ang = np.degrees(np.arccos(np.clip(m @ d, -1, 1)))
                if ang < best_ang - 1e-9:
                    best, best_ang = (u, v, w), ang
    tag = "" if best_ang < 1.0 else "~"
    return f"{tag}[{best[0]} {best[1]} {best[2]}]"


def spread_templates(lib: TemplateLibrary, n: int = 8) -> np.ndarray:
    """Indices of ``n`` templates whose beam directions spread over the sector (farthest-point)."""
    d = beam_directions(lib)
    chosen = [int(np.argmax(d[:, 2]))]  # start near [001]
    dist = np.full(len(d), np.inf)
    for _ in range(min(n, len(d)) - 1):
        dist = np.minimum(dist, np.arccos(np.clip(d @ d[chosen[-1]], -1, 1)))
        chosen.append(int(np.argmax(dist)))
    return np.asarray(chosen)


def library_summary(libs: dict) -> list[dict]:
    """One row per library: phase, kind, templates, resolution, spots per template, time."""
    rows = []
    for (name, kind), lib in libs.items():
        ns = lib.n_spots
        rows.append(
            {
                "phase": name,
                "kind": kind,
                "resolution (deg)": lib.params["resolution"],
                "templates": lib.size,
                "spots median": float(np.median(ns)),
                "spots p5-p95": f"{np.percentile(ns, 5):.0f}-{np.percentile(ns, 95):.0f}",
                "simulation time (s)": round(lib.seconds, 2) if lib.seconds else "cached",
                "templates/s": round(lib.size / lib.seconds) if lib.seconds else "-",
            }
        )
    return rows


def beam_direction_vectors(lib: TemplateLibrary):
    """Beam directions of the templates as an orix ``Vector3d`` (for IPF scatter plots)."""
    from orix.vector import Vector3d

    return Vector3d(beam_directions(lib))


def compare_with_diffsims(
    phases=crystal.STEEL_PHASES,
    n: int = 20,
    reciprocal_radius: float = 1.5,
    max_excitation_error: float = 0.05,
    kv: float = 200.0,
    rng=None,
) -> list[dict]:
    """Check :func:`kinematic_spots` against diffsims for ``n`` random orientations per phase.

    Returns one row per phase: spot counts, the largest position (1/Å) and relative
    intensity differences, and the time per pattern of both.
    """
    from diffsims.generators.simulation_generator import SimulationGenerator

    rng = np.random.default_rng(rng)
    rows = []
    for name in phases:
        phase = crystal.get_phase(name)
        q = rng.standard_normal((n, 4))
        rot = Rotation(q / np.linalg.norm(q, axis=1, keepdims=True))
        gen = SimulationGenerator(kv, minimum_intensity=1e-4)
        t0 = time.perf_counter()
        ref = [
            gen.calculate_diffraction2d(
                phase,
                rotation=rot[i],
                reciprocal_radius=reciprocal_radius,
                max_excitation_error=max_excitation_error,
                with_direct_beam=False,
            ).coordinates
            for i in range(n)
        ]
        t_ref = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        refl = reflections(phase, g_max=reciprocal_radius)
        xy, inten, _ = kinematic_spots(
            refl, rot, kv=kv, max_excitation_error=max_excitation_error, min_intensity=1e-4
        )
        t_ours = (time.perf_counter() - t0) / n
        d_pos, d_int, same = 0.0, 0.0, 0
        for i, c in enumerate(ref):
            k = int((inten[i] > 0).sum())
            same += int(k == c.size)
            if c.size and k == c.size:
                o = np.argsort(-c.intensity)
                d_pos = max(d_pos, float(np.abs(c.data[o, :2] - xy[i, :k]).max()))
                d_int = max(
                    d_int, float(np.abs(c.intensity[o] - inten[i, :k]).max() / c.intensity.max())
                )
        rows.append(
            {
                "phase": name,
                "orientations": n,
                "same spot count": f"{same}/{n}",
                "max position difference (1/Å)": d_pos,
                "max relative intensity difference": d_int,
                "diffsims ms/pattern": round(1e3 * t_ref, 2),
                "batched ms/pattern": round(1e3 * t_ours, 3),
                "speed-up": round(t_ref / t_ours, 1),
            }
        )
    return rows
