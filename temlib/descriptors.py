"""Polar intensity descriptors of spot patterns and of simulated templates.

A spot pattern is resampled about its direct beam onto a polar grid: radius ``r``
(1/Å, so the grid is the same for every calibration and camera) times azimuth
``theta``. Kinematic patterns are centrosymmetric (Friedel pairs), so the two
half-turns are added together: the descriptor covers azimuth [0, 180) deg. An
in-plane rotation of the crystal about the beam is then a circular shift of the
descriptor along azimuth, which the matcher (:mod:`temlib.match`) scans with FFTs.

Both sides are made to look alike:

- patterns: polar sampling (bilinear, ``oversample`` radii per bin averaged),
  background removal per radius (the azimuthal median, or a grey opening along
  azimuth, takes away the diffuse halo and the direct-beam tails), clipping at 0,
  an intensity transform ``I ** gamma``, folding, optional zero-mean, unit L2 norm;
- templates: the ``n_spots`` strongest simulated spots, each a Gaussian of width
  ``sigma`` (1/Å, radially and along the arc) with weight ``(I / I_max) ** template_gamma``,
  drawn on the same folded grid, unit L2 norm.

The settings are tuned on the training maps by :func:`tune` (a ranking score: how
well each real pattern's descriptor picks out its own ground-truth template against
the templates of every other sampled pattern) and saved to
``data/models/descriptors.json`` (:data:`SETTINGS_FILE`); :func:`load_settings`
returns them (or the built-in defaults when no tuned file exists), and the matcher
and ``temlib index`` use them by default.

Conventions: patterns are (ky, kx) = (row, col); a spot at (x, y) in 1/Å sits at
``col = cx + x / calibration``, ``row = cy + y / calibration`` (as :mod:`temlib.simulate`);
azimuth ``theta = atan2(y, x)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np

from . import _kernels, _runtime, paths

log = logging.getLogger(__name__)

BACKGROUNDS = ("none", "median", "opening")


@dataclasses.dataclass(frozen=True)
class DescriptorSettings:
    """Everything that defines a descriptor (both sides). Units in the comments."""

    r_min: float = 0.1  # 1/Å, inner edge (the radial weight below mutes the direct-beam tails)
    r_max: float = 1.3  # 1/Å, outer edge
    n_r: int = 40  # radial bins
    n_theta: int = 90  # azimuth bins over [0, 180) deg (2 deg each)
    oversample: int = 2  # radial samples averaged per bin
    smooth: float = 0.03  # 1/Å, Gaussian prefilter of the pattern (0: none)
    background: str = "median"  # none | median | opening (per radius, along azimuth)
    noise_k: float = 1.0  # subtract noise_k x robust noise (per radius) before clipping
    opening_deg: float = 12.0  # deg, width of the grey opening (background="opening")
    gamma: float = 0.5  # pattern intensity transform I ** gamma
    zero_mean: bool = False  # subtract the descriptor's mean before normalising
    sigma: float = 0.03  # 1/Å, template spot width
    template_gamma: float = 0.25  # template spot weight (I / I_max) ** template_gamma
    n_spots: int = 30  # strongest template spots kept (0: all)
    excitation_error: float = 0.03  # 1/Å, relrod half-width of the simulated templates
    radial_weight: float = 1.5  # both sides x (r / r_max) ** w (outer spots span fewer bins)

    def __post_init__(self):
        if not 0 <= self.r_min < self.r_max:
            raise ValueError(
                f"Radial range ({self.r_min!r}, {self.r_max!r}) 1/Å is invalid; expected 0 <= r_min < r_max"
            )
        if self.n_r < 2 or self.n_theta < 8:
            raise ValueError(
                f"Grid {self.n_r}x{self.n_theta} is too small; expected n_r >= 2 and n_theta >= 8"
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"Unknown background {self.background!r}; expected one of {BACKGROUNDS}"
            )
        if not self.gamma > 0 or not self.template_gamma > 0:
            raise ValueError(
                f"gamma {self.gamma!r} / template_gamma {self.template_gamma!r} must be positive"
            )
        if not self.sigma > 0:
            raise ValueError(f"sigma {self.sigma!r} 1/Å must be positive")
        if self.n_spots < 0:
            raise ValueError(f"n_spots {self.n_spots!r} must be >= 0 (0 keeps every spot)")

    @property
    def step_deg(self) -> float:
        """Azimuth step (deg)."""
        return 180.0 / self.n_theta

    @property
    def shape(self) -> tuple[int, int]:
        """(n_r, n_theta) of a descriptor."""
        return self.n_r, self.n_theta

    def replace(self, **changes) -> DescriptorSettings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SETTINGS_FILE = "descriptors.json"


def settings_path() -> Path:
    """Where the tuned settings live: ``data/models/descriptors.json``."""
    return paths.data_dir("models") / SETTINGS_FILE


def load_settings(path: str | Path | None = None) -> DescriptorSettings:
    """The tuned settings (``data/models/descriptors.json``), or the defaults when none were saved.

    Parameters
    ----------
    path
        A settings JSON written by :func:`save_settings`; default :func:`settings_path`.
    """
    p = settings_path() if path is None else Path(path)
    if not p.is_file():
        if path is not None:
            raise FileNotFoundError(
                f"No descriptor settings at {p}; expected a JSON written by descriptors.save_settings"
            )
        return DescriptorSettings()
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Descriptor settings {p} are not valid JSON: {e}") from None
    fields = {f.name for f in dataclasses.fields(DescriptorSettings)}
    return DescriptorSettings(**{k: v for k, v in d.get("settings", d).items() if k in fields})


def save_settings(settings: DescriptorSettings, path: str | Path | None = None, **info) -> Path:
    """Write ``settings`` (plus ``info`` such as the tuning score) as JSON, atomically."""
    p = settings_path() if path is None else Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"settings": settings.as_dict(), **info}, indent=2, default=float))
    os.replace(tmp, p)
    return p


def radii(settings: DescriptorSettings) -> np.ndarray:
    """(n_r,) bin-centre radii (1/Å)."""
    edges = np.linspace(settings.r_min, settings.r_max, settings.n_r + 1)
    return 0.5 * (edges[1:] + edges[:-1])


def azimuths(settings: DescriptorSettings) -> np.ndarray:
    """(n_theta,) azimuths (rad) of the folded grid: ``j * step``, j = 0..n_theta-1."""
    return np.arange(settings.n_theta) * np.pi / settings.n_theta


# --------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------


def polar_transform(
    patterns: np.ndarray, calibration: float, centers: np.ndarray, settings: DescriptorSettings
) -> np.ndarray:
    """Resample patterns onto the (unfolded) polar grid about their direct beam.

    Parameters
    ----------
    patterns
        (N, ky, kx) patterns.
    calibration
        1/Å per px.
    centers
        (N, 2) direct-beam centres (row, col) in px.
    settings
        The grid (``r_min``, ``r_max``, ``n_r``, ``n_theta``, ``oversample``).

    Returns
    -------
    (N, n_r, 2 * n_theta) float32 over azimuth [0, 360) deg; samples off the frame are 0.
    """
    from . import io

    p = np.asarray(patterns, dtype=np.float32)
    dy, dx = _polar_offsets(calibration, settings)
    out = io.sample_about(p, centers, dy.ravel(), dx.ravel())
    return out.reshape(len(p), settings.n_r, max(int(settings.oversample), 1), -1).mean(axis=2)


def _polar_offsets(
    calibration: float, settings: DescriptorSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(n_r * oversample, 2 n_theta) row and column offsets (px) of the polar samples."""
    ov = max(int(settings.oversample), 1)
    edges = np.linspace(settings.r_min, settings.r_max, settings.n_r * ov + 1)
    r = 0.5 * (edges[1:] + edges[:-1]) / calibration  # px
    th = np.arange(2 * settings.n_theta) * np.pi / settings.n_theta
    return r[:, None] * np.sin(th)[None, :], r[:, None] * np.cos(th)[None, :]


def prefilter(patterns: np.ndarray, calibration: float, settings: DescriptorSettings) -> np.ndarray:
    """Gaussian smoothing of (N, ky, kx) patterns by ``settings.smooth`` (1/Å), as float32."""
    p = np.asarray(patterns, np.float32)
    s_px = settings.smooth / calibration
    if s_px < _kernels.SMOOTH_MIN_PX:
        return p
    from scipy import ndimage

    return ndimage.gaussian_filter(p, sigma=(0, s_px, s_px), truncate=3.0)


def _opening_width(settings: DescriptorSettings) -> int:
    """Odd width (azimuth bins, >= 3) of the grey opening."""
    return max(3, int(round(settings.opening_deg / (180.0 / settings.n_theta))) | 1)


def _remove_background(polar: np.ndarray, settings: DescriptorSettings) -> np.ndarray:
    from .io import median_last

    med = median_last(polar)
    if settings.background == "median":
        polar = polar - med
    elif settings.background == "opening":
        from scipy import ndimage

        width = _opening_width(settings)
        polar = polar - ndimage.grey_opening(polar, size=(1, 1, width), mode="wrap")
    if settings.noise_k > 0:  # robust noise per radius: 1.4826 x median absolute deviation
        mad = median_last(np.abs(polar - median_last(polar)))
        polar = polar - np.float32(settings.noise_k * 1.4826) * mad
    return np.clip(polar, 0, None)


def _finish(
    desc: np.ndarray, zero_mean: bool, settings: DescriptorSettings | None = None
) -> np.ndarray:
    desc = desc.astype(np.float32, copy=False)
    if settings is not None and settings.radial_weight:
        w = (radii(settings) / settings.r_max) ** settings.radial_weight
        desc = desc * w.astype(np.float32)[:, None]
    if zero_mean:
        desc = desc - desc.mean(axis=(-2, -1), keepdims=True)
    norm = np.sqrt((desc.astype(np.float64) ** 2).sum(axis=(-2, -1), keepdims=True))
    return (desc / np.where(norm > 0, norm, 1)).astype(np.float32)


def descriptors_from_polar(
    polar: np.ndarray, settings: DescriptorSettings, unfolded: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Background removal, intensity transform, folding and normalisation of (N, n_r, 2 n_theta) polar images.

    With ``unfolded``, also the same descriptor before folding, (N, n_r, 2 n_theta) over
    [0, 360) deg: what tells an orientation from its 180-deg turn about the beam
    (:func:`temlib.match.resolve_beam_flip`).
    """
    x = _remove_background(np.asarray(polar, np.float32), settings)
    x = np.sqrt(x) if settings.gamma == 0.5 else x**settings.gamma
    folded = _finish(
        x[..., : settings.n_theta] + x[..., settings.n_theta :], settings.zero_mean, settings
    )
    return (folded, _finish(x, settings.zero_mean, settings)) if unfolded else folded


def pattern_descriptors(
    patterns: np.ndarray,
    calibration: float,
    centers: np.ndarray | None = None,
    settings: DescriptorSettings | None = None,
    unfolded: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Descriptors of a stack of raw patterns.

    Parameters
    ----------
    patterns
        (N, ky, kx) raw patterns (any real dtype).
    calibration
        1/Å per px of the patterns.
    centers
        (N, 2) direct-beam centres (row, col) in px; default :func:`temlib.io.find_direct_beam`.
    settings
        Default :func:`load_settings` (the tuned ones).
    unfolded
        Also return the descriptors before folding (see :func:`descriptors_from_polar`).

    Returns
    -------
    (N, n_r, n_theta) float32, unit L2 norm each (and (N, n_r, 2 n_theta) with ``unfolded``).
    """
    from . import io

    settings = load_settings() if settings is None else settings
    p = io.check_stack(patterns, calibration)
    if np.issubdtype(p.dtype, np.floating) and not np.isfinite(p).all():
        raise ValueError("Patterns hold NaN or infinite values; expected finite intensities")
    if centers is None:
        centers = _runtime.split_apply(io.find_direct_beam, p)
    centers = np.asarray(centers, float).reshape(len(p), 2)

    def part(a, c):
        folded, unf = front_end(a, calibration, c, settings, unfolded)
        return (folded, unf) if unfolded else folded

    return _runtime.split_apply(part, p, centers)  # parts of the stack on every core


def front_end(
    patterns: np.ndarray,
    calibration: float,
    centers: np.ndarray,
    settings: DescriptorSettings,
    unfolded: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Folded and unfolded descriptors of (N, ky, kx) patterns in one compiled pass each.

    The same numbers as ``descriptors_from_polar(polar_transform(prefilter(...)), unfolded=True)``
    (to float32 rounding), without the intermediate stacks: 2.5-3x less CPU time, and no
    GIL, so threads share the work (:func:`temlib._kernels.polar_descriptors`). Without
    ``unfolded`` the second array is empty and not computed.
    """
    dy, dx = _polar_offsets(calibration, settings)
    ov = max(int(settings.oversample), 1)
    n2 = 2 * settings.n_theta
    s = np.arange(dy.size)
    w = np.ones(settings.n_r)
    if settings.radial_weight:
        w = (radii(settings) / settings.r_max) ** settings.radial_weight
    return _kernels.polar_descriptors(
        patterns,
        centers,
        dy,
        dx,
        (s // (ov * n2)) * n2 + s % n2,  # sample (radius bin, oversample, azimuth) -> bin
        settings.n_r,
        settings.n_theta,
        settings.smooth / calibration,
        BACKGROUNDS.index(settings.background),
        _opening_width(settings),
        settings.noise_k,
        settings.gamma,
        w,
        settings.zero_mean,
        unfolded,
    )


def pattern_descriptor(
    pattern: np.ndarray,
    calibration: float,
    center: tuple[float, float] | None = None,
    settings: DescriptorSettings | None = None,
) -> np.ndarray:
    """Descriptor (n_r, n_theta) of one (ky, kx) pattern (see :func:`pattern_descriptors`)."""
    p = np.asarray(pattern)
    if p.ndim != 2:
        raise ValueError(f"Pattern of shape {p.shape} is not an image; expected (ky, kx)")
    c = None if center is None else np.asarray(center, float).reshape(1, 2)
    return pattern_descriptors(p[None], calibration, c, settings)[0]


def map_descriptors(
    signal,
    settings: DescriptorSettings | None = None,
    chunk: int = 32,
    show_progressbar: bool = True,
) -> np.ndarray:
    """Descriptors of every pattern of a (lazy) map, one block at a time.

    Parameters
    ----------
    signal
        A map read by :func:`temlib.io.load_map` (rows, cols | ky, kx).
    chunk
        Scan pixels per block side.

    Returns
    -------
    (rows, cols, n_r, n_theta) float32 (small: 14 kB per pattern at the defaults).
    """
    from . import io

    settings = load_settings() if settings is None else settings
    cal = io.calibration_of(signal)
    h, w = signal.data.shape[:2]
    out = np.zeros((h, w, *settings.shape), np.float32)
    for (rs, cs), block in io.iter_chunks(signal, chunk, show_progressbar, desc="descriptors"):
        r, c = block.shape[:2]
        out[rs, cs] = pattern_descriptors(
            block.reshape(r * c, *block.shape[2:]), cal, None, settings
        ).reshape(r, c, *settings.shape)
    return out


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


def template_descriptors(
    xy: np.ndarray,
    intensity: np.ndarray,
    settings: DescriptorSettings | None = None,
    unfolded: bool = False,
) -> np.ndarray:
    """Descriptors of simulated spot lists, drawn on the folded polar grid.

    Parameters
    ----------
    xy
        (T, S, 2) spot positions (1/Å), zero-padded (:class:`temlib.simulate.TemplateLibrary`).
    intensity
        (T, S) spot intensities, 0 for padding.
    settings
        Default :func:`load_settings`.
    unfolded
        Draw on the unfolded grid over [0, 360) deg instead, (T, n_r, 2 n_theta): a spot
        and its Friedel mate stay apart.

    Returns
    -------
    (T, n_r, n_theta) float32, unit L2 norm each (all zero for a template without spots in range).
    """
    settings = load_settings() if settings is None else settings
    xy = np.asarray(xy, np.float32)
    inten = np.asarray(intensity, np.float32)
    if xy.ndim != 3 or xy.shape[-1] != 2 or inten.shape != xy.shape[:2]:
        raise ValueError(
            f"Spot arrays of shapes {xy.shape} and {inten.shape} do not match; expected (T, S, 2) and (T, S)"
        )
    if settings.n_spots:  # keep the N strongest
        order = np.argsort(-inten, axis=1, kind="stable")[:, : settings.n_spots]
        xy = np.take_along_axis(xy, order[..., None], axis=1)
        inten = np.take_along_axis(inten, order, axis=1)
    period = 2 * np.pi if unfolded else np.pi
    th = np.arange(settings.n_theta * (2 if unfolded else 1)) * np.pi / settings.n_theta
    rb = radii(settings)
    weight = (rb / settings.r_max) ** settings.radial_weight  # _finish's, in the kernel
    r = np.hypot(xy[..., 0], xy[..., 1])
    imax = inten.max(axis=1, keepdims=True) if inten.size else inten[:, :1]
    w = np.where(
        inten > 0, (inten / np.where(imax > 0, imax, 1)) ** settings.template_gamma, 0
    ).astype(np.float32)
    w = np.where(
        (r > settings.r_min - 3 * settings.sigma) & (r < settings.r_max + 3 * settings.sigma), w, 0
    )
    out = _runtime.split_apply(  # the drawing compiled, on every core
        lambda x_, w_: _kernels.draw_spots(
            x_, w_, rb, th, period, settings.sigma, weight, settings.zero_mean
        ),
        xy, w, min_part=64,
    )  # fmt: skip
    return out


def library_descriptors(lib, settings: DescriptorSettings | None = None) -> np.ndarray:
    """(T, n_r, n_theta) descriptors of a :class:`temlib.simulate.TemplateLibrary`."""
    return template_descriptors(lib.xy, lib.intensity, settings)


# --------------------------------------------------------------------------------------
# Ranking score and automatic tuning
# --------------------------------------------------------------------------------------


def inplane_correlation(
    a: np.ndarray, b: np.ndarray, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Best correlation over every in-plane rotation of every pair.

    Parameters
    ----------
    a
        (N, n_r, n_theta) descriptors (patterns).
    b
        (T, n_r, n_theta) descriptors (templates).

    Returns
    -------
    best
        (N, T) largest correlation over the circular shifts.
    shift
        (N, T) the shift (azimuth bins) that gives it: ``a`` matches ``b`` turned by ``shift * step``.
    """
    from scipy import fft

    n_theta = a.shape[-1]
    fa = fft.rfft(a, axis=-1).transpose(2, 0, 1)  # (K, N, R)
    fb = np.conj(fft.rfft(b, axis=-1)).transpose(2, 1, 0)  # (K, R, T)
    best = np.empty((len(a), len(b)), np.float32)
    shift = np.empty((len(a), len(b)), np.int32)
    for i in range(0, len(a), batch):
        c = fft.irfft(np.matmul(fa[:, i : i + batch], fb), n=n_theta, axis=0)  # (n_theta, n, T)
        shift[i : i + batch] = c.argmax(axis=0)
        best[i : i + batch] = c.max(axis=0)
    return best, shift


@dataclasses.dataclass
class TuningSample:
    """Real patterns from the training maps with their ground truth, for :func:`ranking_score`.

    Attributes
    ----------
    polar_cache
        Unfolded polar images per grid key (filled lazily).
    patterns
        (M, ky, kx) raw patterns; ``calibration`` (M,) 1/Å per px; ``centers`` (M, 2) px.
    phase_id
        (M,) phase ids into ``phases``.
    quaternions
        (M, 4) true orientations (sample -> crystal).
    region
        (M,) a region id unique over maps (patterns of one grain are not each other's competitors).
    """

    patterns: np.ndarray
    calibration: np.ndarray
    centers: np.ndarray
    phase_id: np.ndarray
    quaternions: np.ndarray
    region: np.ndarray
    phases: tuple[str, ...]
    kv: float = 200.0
    polar_cache: dict = dataclasses.field(default_factory=dict)
    spot_cache: dict = dataclasses.field(default_factory=dict)
    competitors: dict | None = None
    competitor_near: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.patterns)

    def polar(self, settings: DescriptorSettings) -> np.ndarray:
        key = (
            settings.r_min,
            settings.r_max,
            settings.n_r,
            settings.n_theta,
            settings.oversample,
            settings.smooth,
        )
        if key not in self.polar_cache:
            parts = [
                polar_transform(
                    prefilter(self.patterns[i : i + 1], float(self.calibration[i]), settings),
                    float(self.calibration[i]),
                    self.centers[i : i + 1],
                    settings,
                )
                for i in range(len(self))
            ]
            self.polar_cache[key] = np.concatenate(parts)
        return self.polar_cache[key]

    def truth_spots(
        self, g_max: float = 1.5, max_excitation_error: float = 0.05
    ) -> tuple[np.ndarray, np.ndarray]:
        """(M, S, 2) and (M, S) kinematic spots at the true orientations (as the template libraries)."""
        return self._spots("truth", self.quaternions, self.phase_id, g_max, max_excitation_error)

    def competitor_spots(self, g_max: float = 1.5, max_excitation_error: float = 0.05):
        """Spots of the library competitors (:func:`add_library_competitors`)."""
        c = self.competitors
        return self._spots(
            "competitors", c["quaternions"], c["phase_id"], g_max, max_excitation_error
        )

    def _spots(self, what, quaternions, phase_id, g_max, max_excitation_error):
        key = (what, g_max, max_excitation_error)
        if key not in self.spot_cache:
            from orix.quaternion import Rotation

            from . import simulate

            n_s = 200
            xy = np.zeros((len(quaternions), n_s, 2), np.float32)
            inten = np.zeros((len(quaternions), n_s), np.float32)
            for pid, name in enumerate(self.phases):
                sel = np.flatnonzero(phase_id == pid)
                if sel.size == 0:
                    continue
                refl = simulate.reflections(name, g_max=g_max)
                sxy, si, _ = simulate.kinematic_spots(
                    refl,
                    Rotation(quaternions[sel]),
                    kv=self.kv,
                    max_excitation_error=max_excitation_error,
                    max_spots=n_s,
                )
                xy[sel, : sxy.shape[1]] = sxy
                inten[sel, : si.shape[1]] = si
            self.spot_cache[key] = (xy, inten)
        return self.spot_cache[key]


def training_sample(
    maps, n_per_map: int = 200, rng=None, min_phase_fraction: float = 0.2
) -> TuningSample:
    """Draw interior (single-crystal) patterns with their truth from synthetic maps.

    Parameters
    ----------
    maps
        :class:`temlib.synth.SynthMap` objects (the training maps).
    n_per_map
        Patterns drawn per map.
    rng
        Seed or generator.
    min_phase_fraction
        Each phase gets at least this fraction of the draws where the map has enough of it
        (maps are mostly ferrite; the rare phases would otherwise barely be scored).
    """
    from . import crystal, io

    rng = np.random.default_rng(rng)
    out = {
        k: [] for k in ("patterns", "calibration", "centers", "phase_id", "quaternions", "region")
    }
    for m_i, m in enumerate(maps):
        t = m.truth_arrays()
        sig = m.load(lazy=True)
        cal = io.calibration_of(sig)
        inside = t["weight"] >= 0.999
        picks = []
        n_ph = len(crystal.STEEL_PHASES)
        for pid in range(n_ph):
            cand = np.flatnonzero((inside & (t["phase_id"] == pid)).ravel())
            k = min(
                len(cand),
                int(
                    round(
                        n_per_map
                        * (min_phase_fraction if pid else 1 - min_phase_fraction * (n_ph - 1))
                    )
                ),
            )
            if k:
                picks.append(rng.choice(cand, size=k, replace=False))
        idx = np.sort(np.concatenate(picks)) if picks else np.zeros(0, int)
        rr, cc = np.unravel_index(idx, t["phase_id"].shape)
        data = sig.data
        block = (
            data.vindex[rr, cc].compute() if hasattr(data, "vindex") else np.asarray(data)[rr, cc]
        )
        out["patterns"].append(np.asarray(block))
        out["calibration"].append(np.full(len(idx), cal))
        out["centers"].append(io.find_direct_beam(np.asarray(block)))
        out["phase_id"].append(t["phase_id"][rr, cc])
        out["quaternions"].append(t["quaternions"][rr, cc])
        out["region"].append(t["region"][rr, cc] + 100000 * m_i)
    cat = {k: np.concatenate(v) for k, v in out.items()}
    return TuningSample(**cat, phases=tuple(crystal.STEEL_PHASES))


def _beam_dirs(q: np.ndarray) -> np.ndarray:
    """(N, 3) beam direction (sample z) in the crystal frame of orientations q (sample -> crystal)."""
    from orix.quaternion import Rotation
    from orix.vector import Vector3d

    return (Rotation(q) * Vector3d.zvector()).data.reshape(-1, 3)


def add_library_competitors(
    sample: TuningSample, n_per_phase: int = 400, resolution: float = 2.0, rng=None
) -> None:
    """Add random orientations of each phase's template library as competitors of :func:`ranking_score`.

    Their spots are simulated with the same excitation error as the ground-truth
    templates of the setting being scored. Library orientations whose beam direction
    lies within 5 deg (crystal symmetry, either sign) of a pattern's true beam direction
    are not counted as its competitors.
    """
    from . import crystal, simulate

    rng = np.random.default_rng(rng)
    qs, ph = [], []
    for pid, name in enumerate(sample.phases):
        lib = simulate.template_library(name, resolution=resolution)
        pick = rng.choice(lib.size, size=min(n_per_phase, lib.size), replace=False)
        qs.append(np.asarray(lib.rotations.data)[pick])
        ph.append(np.full(len(pick), pid))
    sample.competitors = {"quaternions": np.concatenate(qs), "phase_id": np.concatenate(ph)}
    sample.competitors["beam"] = _beam_dirs(sample.competitors["quaternions"])
    # exclusion mask: competitor of the same phase with a beam direction near the truth
    own = _beam_dirs(sample.quaternions)
    near = np.zeros((len(sample), len(sample.competitors["phase_id"])), bool)
    for pid, name in enumerate(sample.phases):
        sel = np.flatnonzero(sample.phase_id == pid)
        cs = np.flatnonzero(sample.competitors["phase_id"] == pid)
        if sel.size == 0 or cs.size == 0:
            continue
        sym = crystal.get_phase(name).point_group.laue_proper_subgroup.to_matrix()  # (S, 3, 3)
        eq = np.einsum("sij,cj->sci", sym, sample.competitors["beam"][cs])  # (S, C, 3)
        cosang = np.abs(np.einsum("ni,sci->snc", own[sel], eq)).max(axis=0)
        near[np.ix_(sel, cs)] = cosang > np.cos(np.radians(5.0))
    sample.competitor_near = near


def ranking_score(sample: TuningSample, settings: DescriptorSettings) -> dict:
    """How well each pattern's descriptor picks out its own ground-truth template.

    Every sampled pattern is correlated (best over in-plane rotations) with the
    ground-truth templates of all sampled patterns (every phase; patterns of the same
    grain are not competitors) and, after :func:`add_library_competitors`, with random
    library templates of every phase (those near its true beam direction excluded).

    Returns
    -------
    dict with ``top1`` (fraction whose own template scores highest), ``margin`` (mean of
    ``(own - best other) / max(|own|, |best other|)``, in [-1, 1]), ``median_rank``, ``top1_<phase>`` per phase and
    ``phase_top1`` (fraction whose best competitor of another phase scores below the own template).
    """
    desc = descriptors_from_polar(sample.polar(settings), settings)
    xy, inten = sample.truth_spots(
        g_max=max(1.5, settings.r_max + 3 * settings.sigma),
        max_excitation_error=settings.excitation_error,
    )
    tmpl = template_descriptors(xy, inten, settings)
    best, _ = inplane_correlation(desc, tmpl)
    own = np.diag(best).copy()
    excluded = sample.region[:, None] == sample.region[None, :]
    other_phase = sample.phase_id[:, None] != sample.phase_id[None, :]
    comp = getattr(sample, "competitors", None)
    if comp is not None:
        cxy, cint = sample.competitor_spots(
            g_max=max(1.5, settings.r_max + 3 * settings.sigma),
            max_excitation_error=settings.excitation_error,
        )
        cd = template_descriptors(cxy, cint, settings)
        cb, _ = inplane_correlation(desc, cd)
        best = np.concatenate([best, cb], axis=1)
        excluded = np.concatenate([excluded, sample.competitor_near], axis=1)
        other_phase = np.concatenate(
            [other_phase, sample.phase_id[:, None] != comp["phase_id"][None, :]], axis=1
        )
    masked = np.where(excluded, -np.inf, best)
    other = masked.max(axis=1)
    rank = (masked >= own[:, None]).sum(axis=1)
    ok = own > other
    out = {
        "top1": float(ok.mean()),
        "margin": float(
            np.mean((own - other) / np.maximum(np.maximum(np.abs(own), np.abs(other)), 1e-3))
        ),
        "median_rank": float(np.median(rank)),
        "phase_top1": float(
            (own > np.where(other_phase & ~excluded, best, -np.inf).max(axis=1)).mean()
        ),
    }
    for pid, name in enumerate(sample.phases):
        sel = sample.phase_id == pid
        out[f"top1_{name}"] = float(ok[sel].mean()) if sel.any() else float("nan")
    return out


SEARCH_SPACE: dict[str, tuple] = {
    "background": ("none", "median", "opening"),
    "smooth": (0.0, 0.01, 0.02, 0.03),
    "noise_k": (0.0, 1.0, 2.0, 3.0),
    "gamma": (0.3, 0.5, 0.7, 1.0),
    "template_gamma": (0.25, 0.5, 0.75, 1.0),
    "sigma": (0.015, 0.02, 0.03, 0.04),
    "n_spots": (10, 20, 30, 50, 0),
    "zero_mean": (False, True),
    "radial_weight": (0.0, 0.5, 1.0, 1.5, 2.0),
    "r_min": (0.05, 0.1, 0.2, 0.3),
    "r_max": (1.0, 1.15, 1.3),
    "excitation_error": (0.015, 0.02, 0.03, 0.05),
}


def tune(
    sample: TuningSample,
    start: DescriptorSettings | None = None,
    space: dict[str, tuple] | None = None,
    rounds: int = 2,
    show_progressbar: bool = True,
):
    """Choose descriptor settings by coordinate ascent on :func:`ranking_score`.

    Each round tries every value of every parameter in ``space`` with the others held at
    the current best, keeping a change when it raises the objective
    ``top1 + 0.5 * margin``. Stops early when a round changes nothing.

    Returns
    -------
    best
        The chosen :class:`DescriptorSettings`.
    table
        pandas DataFrame, one row per setting evaluated (the parameter changed, its value,
        the scores, and whether it is the final choice).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    space = SEARCH_SPACE if space is None else space
    for k in space:
        if k not in {f.name for f in dataclasses.fields(DescriptorSettings)}:
            raise ValueError(
                f"Unknown descriptor parameter {k!r} in the search space; expected fields of DescriptorSettings"
            )
    best = DescriptorSettings() if start is None else start
    seen: dict = {}

    def evaluate(s):
        key = tuple(sorted(s.as_dict().items()))
        if key not in seen:
            sc = ranking_score(sample, s)
            sc["objective"] = sc["top1"] + 0.5 * sc["margin"]
            seen[key] = sc
        return seen[key]

    rows = []
    best_score = evaluate(best)
    rows.append({"round": 0, "parameter": "(start)", "value": "", **best.as_dict(), **best_score})
    total = rounds * sum(len(v) for v in space.values())
    bar = tqdm(total=total, desc="tuning descriptors", disable=not show_progressbar)
    for rnd in range(1, rounds + 1):
        changed = False
        for name, values in space.items():
            for v in values:
                bar.update(1)
                cand = best.replace(**{name: v})
                sc = evaluate(cand)
                rows.append(
                    {"round": rnd, "parameter": name, "value": str(v), **cand.as_dict(), **sc}
                )
                if sc["objective"] > best_score["objective"] + 1e-9:
                    best, best_score, changed = cand, sc, True
        if not changed:
            break
    bar.close()
    table = pd.DataFrame(rows)
    table["chosen"] = [
        all(r[k] == v for k, v in best.as_dict().items()) for r in table.to_dict("records")
    ]
    return best, table


def render_spots(
    xy: np.ndarray,
    intensity: np.ndarray,
    size: int = 144,
    calibration: float = 0.02,
    sigma_px: float = 1.2,
    centers: np.ndarray | None = None,
    gamma: float = 1.0,
) -> np.ndarray:
    """Draw spot lists as (N, size, size) float32 patterns of Gaussian spots (no direct beam, no noise).

    Parameters
    ----------
    xy
        (N, S, 2) spot positions (1/Å), zero-padded; ``intensity`` (N, S), 0 for padding.
    centers
        (N, 2) beam centres (row, col) px; default the middle ``(size / 2, size / 2)``.
    gamma
        Intensities drawn as ``I ** gamma``.
    """
    xy = np.asarray(xy, np.float32)
    inten = np.asarray(intensity, np.float32)
    n = len(xy)
    c = (
        np.full((n, 2), size / 2, np.float32)
        if centers is None
        else np.asarray(centers, np.float32).reshape(n, 2)
    )
    px = np.arange(size, dtype=np.float32)
    rows = c[:, 0:1] + xy[..., 1] / calibration  # (N, S)
    cols = c[:, 1:2] + xy[..., 0] / calibration
    gr = np.exp(-((px[None, None, :] - rows[..., None]) ** 2) / (2 * sigma_px**2))  # (N, S, size)
    gc = np.exp(-((px[None, None, :] - cols[..., None]) ** 2) / (2 * sigma_px**2))
    w = np.where(inten > 0, np.clip(inten, 0, None) ** gamma, 0).astype(np.float32)
    return np.matmul((gr * w[..., None]).transpose(0, 2, 1), gc)
