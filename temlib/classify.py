"""Phase of a raw diffraction pattern by a network found with neural architecture search.

A pattern read from any map (any calibration, any beam centre, any camera) goes through
one fixed preprocessing (:func:`preprocess`): direct beam found and put in the middle,
resampled to the model's working calibration (1/Å per px) and size, background removed,
log intensity, direct beam and corners masked. A small convolutional network found by
AutoKeras (:func:`search`) gives the probability of each phase.

The search space fits a CPU and needs no download: a vanilla ConvBlock (kernel size,
blocks, layers, filters, dropout tuned), the head's reduction and dropout; never the
ImageNet blocks of ``ak.ImageClassifier``. Training sees

- random rotations about the beam (and a mirror) inside the model, on every epoch
  (``augment=True``): a pattern turned about the beam is the pattern of another
  orientation, so the network cannot learn the few orientations of the training maps;
- camera effects drawn per pattern (:func:`camera_jitter`): intensity gamma, blur,
  diffuse background, noise, calibration error and beam-centre error;
- balanced sampling: at most ``max_per_class`` patterns per phase (NbC and cementite are
  minorities), optionally balanced class weights on top (off by default: measured on the
  default maps they push ferrite into the minority phases and cost accuracy and F1).

The best model is saved as ``model.keras`` next to ``classifier.json`` (phases,
preprocessing with working calibration and size, training-data hash, search summary)
by :func:`save_classifier`; :func:`load_classifier` gives a :class:`PhaseClassifier`
whose ``predict_proba(patterns, calibration)`` is what ``temlib index --method ml``
calls. The default model is in ``data/models/classifier/``, trained by the default
profile of notebook ``03_classification``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import _runtime, crystal, io, paths

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "classifier.json"
INTENSITIES = ("log", "gamma")
BACKGROUNDS = ("radial", "flat")
GEOMETRIES = ("polar", "cartesian")


def default_model_dir(profile: str = "default") -> Path:
    """Where notebook 03 saves its classifier: ``data/models/classifier`` (default profile),
    ``data/models/<profile>/classifier`` otherwise."""
    models = paths.data_dir("models")
    return models / "classifier" if profile == "default" else models / profile / "classifier"


def search_dir(profile: str = "default") -> Path:
    """Where the search trials of a profile go (resumable): ``data/cache/classify/<profile>``."""
    return paths.data_dir("cache") / "classify" / profile


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a raw pattern becomes the network input; stored with the model.

    Attributes
    ----------
    size
        Side of the network input (px).
    k_max
        Reciprocal radius at the edge of the input (1/Å); the working calibration is
        ``k_max / (size / 2)`` 1/Å per px. Everything beyond ``k_max`` is masked.
    oversample
        Samples averaged per input pixel, so spots are not aliased away: per azimuth bin
        (polar), or per side of each pixel (Cartesian: resampled finer and block-averaged).
    intensity
        ``"log"``: ``log1p(a x) / log1p(a)`` with ``a = log_scale``; ``"gamma"``: ``x ** gamma``
        (``x`` is the background-free pattern divided by its brightest spot).
    log_scale, gamma
        Parameters of the intensity mapping.
    beam_radius
        Radius (1/Å) of the disc masked on the direct beam, whose saturation differs
        between cameras.
    beam_search
        The direct beam is looked for within this fraction of the pattern side from the
        pattern middle (:func:`temlib.io.find_direct_beam` ``radius``).
    background
        ``"radial"``: subtract the median of each ring about the beam (the diffuse halo,
        whose strength and width differ between cameras); ``"flat"``: one median.
    noise_floor
        Also subtract this many robust standard deviations (1.4826 median absolute
        deviation) of the ring (or of the pattern), so that what is left is spots, not noise.
    radius_channel
        Give the network a second channel holding |k| / k_max, so that convolutions see
        how far from the beam a spot is (the d-spacing) wherever the pattern is turned.
    geometry
        ``"polar"``: rows are |k| from the beam (``size`` bins of ``k_max / size``), columns
        the azimuth over 180 deg (``size`` bins; a spot pattern is centrosymmetric, so the two
        halves are averaged); a turn about the beam is a cyclic shift of the columns.
        ``"cartesian"``: the centred pattern, ``size`` x ``size`` px of ``2 k_max / size``.
    """

    size: int = 64
    k_max: float = 1.3
    oversample: int = 2
    intensity: str = "log"
    log_scale: float = 50.0
    gamma: float = 0.5
    beam_radius: float = 0.2
    beam_search: float = 0.125
    background: str = "radial"
    noise_floor: float = 3.0
    radius_channel: bool = True
    geometry: str = "polar"

    def __post_init__(self):
        if not (isinstance(self.size, int | np.integer) and self.size >= 8):
            raise ValueError(f"Input size {self.size!r} is invalid; expected an integer >= 8 px")
        if not self.k_max > 0:
            raise ValueError(f"k_max {self.k_max!r} is not positive; expected 1/Å, e.g. 1.3")
        if self.intensity not in INTENSITIES:
            raise ValueError(
                f"Unknown intensity mapping {self.intensity!r}; expected one of {INTENSITIES}"
            )
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"Unknown geometry {self.geometry!r}; expected one of {GEOMETRIES}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"Unknown background removal {self.background!r}; expected one of {BACKGROUNDS}"
            )
        if not (isinstance(self.oversample, int | np.integer) and self.oversample >= 1):
            raise ValueError(f"oversample {self.oversample!r} is invalid; expected an integer >= 1")

    @property
    def channels(self) -> int:
        return 2 if self.radius_channel else 1

    @property
    def cartesian_size(self) -> int:
        """Side (px) of the centred Cartesian pattern (the network input, or the polar source)."""
        return 2 * self.size if self.geometry == "polar" else self.size

    @property
    def working_calibration(self) -> float:
        """Calibration (1/Å per px) of the centred pattern (polar: also the |k| bin width)."""
        return self.k_max / (self.cartesian_size / 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"working_calibration": self.working_calibration}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@functools.lru_cache(maxsize=16)
def _masks(size: int, k_max: float, beam_radius: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """(size, size) float32 mask (1 for beam_radius < k <= k_max) and the flat indices of
    2-px-wide rings about the middle (for the radial background)."""
    wc = k_max / (size / 2)
    g = (np.arange(size) - size / 2) * wc
    k = np.hypot(g[:, None], g[None, :])
    mask = ((k > beam_radius) & (k <= k_max)).astype(np.float32)
    ring = np.floor(k / (2 * wc)).astype(int).ravel()
    inside = mask.ravel() > 0
    rings = [np.flatnonzero((ring == i) & inside) for i in range(ring.max() + 1)]
    return mask, [r for r in rings if len(r)]


def _as_stack(patterns) -> np.ndarray:
    p = np.asarray(patterns)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or min(p.shape) < 1:
        raise ValueError(
            f"Patterns of shape {p.shape} are invalid; expected (N, ky, kx) or (ky, kx)"
        )
    if not (np.issubdtype(p.dtype, np.number) and not np.issubdtype(p.dtype, np.complexfloating)):
        raise ValueError(f"Patterns of dtype {p.dtype} are invalid; expected real numbers")
    io.check_finite(p, "pattern stack")
    return p


def _check_calibration(calibration) -> float:
    try:
        c = float(calibration)
    except (TypeError, ValueError):
        raise ValueError(
            f"Calibration {calibration!r} is not a number; expected 1/Å per px, e.g. 0.02"
        ) from None
    if not (np.isfinite(c) and c > 0):
        raise ValueError(
            f"Calibration {calibration!r} is not positive; expected 1/Å per px, e.g. 0.02"
        )
    return c


def preprocess(
    patterns: np.ndarray,
    calibration: float,
    prep: Preprocessing | None = None,
    centers: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Raw patterns -> network inputs at the working calibration, centred on the direct beam.

    Parameters
    ----------
    patterns
        (N, ky, kx) or (ky, kx) raw patterns, any dtype, as read from a map.
    calibration
        Their calibration (1/Å per px).
    prep
        The preprocessing (default :class:`Preprocessing`).
    centers
        (N, 2) direct-beam centres (row, col) in px; found with :func:`temlib.io.find_direct_beam`
        when None.
    scale
        (N,) factors on the calibration (augmentation: a calibration error), default 1.
    shift
        (N, 2) px added to the centres (augmentation: a beam-centre error), default 0.

    Returns
    -------
    (N, size, size) float32 in [0, 1].
    """
    prep = prep or Preprocessing()
    p = _as_stack(patterns).astype(np.float32, copy=False)
    calibration = _check_calibration(calibration)
    n = len(p)
    if centers is None:
        centers = io.find_direct_beam(p, radius=prep.beam_search * min(p.shape[1:]))
    centers = np.asarray(centers, dtype=float).reshape(n, 2)
    if shift is not None:
        centers = centers + np.asarray(shift, dtype=float).reshape(n, 2)
    scale = np.ones(n) if scale is None else np.asarray(scale, dtype=float).reshape(n)
    if prep.geometry == "polar":
        x = _to_polar(p, centers, calibration * scale, prep)  # rows are the rings about the beam
        r = (np.arange(prep.size) + 0.5) * prep.working_calibration
        mask = np.repeat(((r > prep.beam_radius) & (r <= prep.k_max))[:, None], prep.size, axis=1)
        if prep.background == "radial":
            _subtract_floor(x, n_sigma=prep.noise_floor)
        else:
            _subtract_floor(x.reshape(n, 1, -1), n_sigma=prep.noise_floor, where=mask.ravel())
    else:
        o, side = int(prep.oversample), prep.cartesian_size
        fine_size, fine_cal = side * o, prep.working_calibration / o
        fine = io.resample(p, centers, calibration * scale, fine_cal, fine_size)
        x = fine.reshape(n, side, o, side, o).mean(axis=(2, 4))
        mask, rings = _masks(side, prep.k_max, prep.beam_radius)
        flat = x.reshape(n, -1)
        groups = rings if prep.background == "radial" else [np.flatnonzero(mask.ravel() > 0)]
        for idx in groups:
            v = flat[:, idx][:, None, :]
            _subtract_floor(v, n_sigma=prep.noise_floor)
            flat[:, idx] = v[:, 0]
    np.clip(x, 0, None, out=x)
    x *= mask
    peak = x.reshape(n, -1).max(axis=1)
    x /= np.where(peak > 0, peak, 1.0)[:, None, None]
    if prep.intensity == "log":
        x = np.log1p(prep.log_scale * x) / np.log1p(prep.log_scale)
    else:
        x = x**prep.gamma
    return x.astype(np.float32, copy=False)


def _subtract_floor(x: np.ndarray, n_sigma: float, where: np.ndarray | None = None) -> None:
    """In place: subtract median + n_sigma robust standard deviations along the last axis
    (the diffuse background, offset and noise of each ring)."""
    v = x if where is None else x[..., where]
    med = io.median_last(v)
    floor = med + n_sigma * 1.4826 * io.median_last(np.abs(v - med))
    x -= floor


def _to_polar(
    p: np.ndarray, centers: np.ndarray, calibration: np.ndarray, prep: Preprocessing
) -> np.ndarray:
    """(N, ky, kx) raw patterns -> (N, size, size) |k| x azimuth (0-180 deg), in one step.

    Bin ``i`` of |k| is sampled at ``(i + 0.5) k_max / size``; each azimuth bin at
    ``oversample`` points, on both halves of the centrosymmetric pattern (averaged).
    Bilinear, after a Gaussian of half an input bin, in one compiled pass per pattern
    (:func:`temlib._kernels.binned_samples`); samples off the frame read 0.

    Parameters
    ----------
    p
        Raw patterns (float32).
    centers
        (N, 2) direct beam (row, col) px.
    calibration
        (N,) 1/Å per px of each pattern (a calibration error drawn for augmentation included).
    """
    from . import _kernels

    n = len(p)
    size, o = prep.size, max(int(prep.oversample), 1)
    k = (np.arange(size) + 0.5) * prep.working_calibration  # 1/Å
    t = (np.arange(2 * size * o) + 0.5) / (size * o) * np.pi  # 0..2 pi
    dy = (k[:, None] * np.sin(t)[None, :]).ravel()  # 1/Å
    dx = (k[:, None] * np.cos(t)[None, :]).ravel()
    # sample (i, half, j, o) of the grid goes to input pixel (i, j)
    i, j = np.divmod(np.arange(dy.size) // o, 2 * size)
    # anti-aliasing: a Gaussian of half an input bin, so a sharp spot is not missed between samples
    sigma = 0.5 * prep.working_calibration / float(np.median(calibration))
    out = _kernels.binned_samples(
        p,
        centers,
        dy,
        dx,
        i * size + j % size,
        size * size,
        sigma,
        1 / np.asarray(calibration, float),
    )
    return out.reshape(n, size, size)


def network_input(x: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(N, size, size) preprocessed patterns -> (N, size, size, channels) network input."""
    x = np.asarray(x, np.float32)
    if not prep.radius_channel:
        return x[..., None]
    return np.stack([x, np.broadcast_to(_radius_map(prep), x.shape)], axis=-1)


def _radius_map(prep: Preprocessing) -> np.ndarray:
    """(size, size) |k| / k_max of each input pixel (0 outside k_max)."""
    if prep.geometry == "polar":
        r = ((np.arange(prep.size) + 0.5) / prep.size).astype(np.float32)
        return np.repeat(r[:, None], prep.size, axis=1)
    mask, _ = _masks(prep.size, prep.k_max, 0.0)
    g = (np.arange(prep.size) - prep.size / 2) / (prep.size / 2)
    return (np.hypot(g[:, None], g[None, :]) * mask).astype(np.float32)


def camera_jitter(
    patterns: np.ndarray, rng=None, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random camera effects on raw patterns, for training (one fresh draw per pattern).

    The effects are the ones that vary between maps and cameras: intensity response
    (gamma on counts), point-spread blur, diffuse background around the direct beam,
    shot-like noise, calibration error (returned as ``scale``, +-1.5 %: a calibrated
    instrument; more would blur ferrite {110} (0.49 1/Å) into NbC {200} (0.45 1/Å)) and
    beam-centre error (returned as ``shift``), to pass to :func:`preprocess`.

    Parameters
    ----------
    patterns
        (N, ky, kx) raw patterns.
    rng
        Seed or generator.
    strength
        0 leaves the patterns as they are; 1 is the default range.

    Returns
    -------
    patterns (N, ky, kx) float32, scale (N,), shift (N, 2) px.
    """
    from scipy import ndimage

    rng = np.random.default_rng(rng)
    p = _as_stack(patterns).astype(np.float32)
    n, ky, kx = p.shape
    s = float(strength)
    out = np.empty_like(p)
    rr, cc = np.mgrid[0:ky, 0:kx]
    r = np.hypot(rr - ky / 2, cc - kx / 2)
    for i in range(n):
        x = p[i] - p[i].min()
        top = float(np.percentile(x, 99.9)) or 1.0
        x = top * (x / top) ** rng.uniform(1 - 0.3 * s, 1 + 0.3 * s)
        sigma = rng.uniform(0, 1.0 * s)
        if sigma > 0.05:
            x = ndimage.gaussian_filter(x, sigma)
        halo = rng.uniform(0, 0.15 * s) * top * np.exp(-r / rng.uniform(8, 30))
        x = x + halo
        x = x + rng.normal(0, 1, x.shape).astype(np.float32) * np.sqrt(
            np.maximum(x, 0) * rng.uniform(0, 0.2 * s) + 1e-6
        )
        out[i] = x
    scale = 1 + rng.uniform(-0.015 * s, 0.015 * s, n)
    shift = rng.normal(0, 0.7 * s, (n, 2))
    return out, scale, shift


def rotate_patterns(
    patterns: np.ndarray, angle_deg: float, centers: np.ndarray | None = None
) -> np.ndarray:
    """Turn raw patterns by ``angle_deg`` about their direct beam (a rotation about the beam).

    Parameters
    ----------
    patterns
        (N, ky, kx) raw patterns.
    angle_deg
        Angle (degrees, counter-clockwise in (row, col) display).
    centers
        (N, 2) direct-beam centres (row, col); found when None.

    Returns
    -------
    (N, ky, kx) float32 patterns, zero where the turned pattern has no data.
    """
    from scipy import ndimage

    p = _as_stack(patterns).astype(np.float32)
    n, ky, kx = p.shape
    centers = (
        io.find_direct_beam(p) if centers is None else np.asarray(centers, float).reshape(n, 2)
    )
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    rr, cc = np.mgrid[0:ky, 0:kx].astype(float)
    out = np.empty_like(p)
    for i in range(n):
        d = np.stack([rr - centers[i, 0], cc - centers[i, 1]]).reshape(2, -1)
        src = rot @ d + centers[i][:, None]
        out[i] = ndimage.map_coordinates(p[i], src, order=1, mode="constant", cval=0.0).reshape(
            ky, kx
        )
    return out


# --------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """Preprocessed patterns with labels.

    Attributes
    ----------
    x
        (N, size, size) float32 network inputs.
    y
        (N,) phase index into ``phases``.
    weight
        (N,) fraction of the pattern that comes from the labelled crystal (1 inside a grain,
        < 1 on boundaries where the probe sees two crystals).
    source, rows, cols
        (N,) which map (index into the list given) and scan position each pattern came from.
    phases
        Phase names.
    """

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    source: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    phases: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index) -> Dataset:
        return Dataset(
            self.x[index],
            self.y[index],
            self.weight[index],
            self.source[index],
            self.rows[index],
            self.cols[index],
            self.phases,
        )

    def counts(self) -> dict[str, int]:
        return {p: int((self.y == i).sum()) for i, p in enumerate(self.phases)}

    def digest(self) -> str:
        """SHA-256 (first 16 hex digits) of the inputs and labels."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.y).tobytes())
        h.update(np.ascontiguousarray(self.x).tobytes())
        return h.hexdigest()[:16]


def labels_from(
    source, phases: Sequence[str] = crystal.STEEL_PHASES, nav_shape=None
) -> tuple[np.ndarray, np.ndarray]:
    """Phase labels (H, W) (index into ``phases``, -1 unknown) and weights (H, W) of a labelled map.

    Parameters
    ----------
    source
        A :class:`temlib.synth.SynthMap` (its ground truth), an orix ``CrystalMap`` (an indexed
        reference map: a template-matching result or an imported ``.ang`` / ``.ctf``), a path
        to such a file, or an (H, W) integer array already holding indices into ``phases``.
    phases
        Phase names of the classifier; labelled phases not in it get -1.
    nav_shape
        (H, W) the labels must have.
    """
    from orix.crystal_map import CrystalMap

    phases = tuple(phases)
    if hasattr(source, "truth_arrays"):
        t = source.truth_arrays()
        names = tuple(source.spec.get("phases", crystal.STEEL_PHASES))
        lut = np.array([phases.index(n) if n in phases else -1 for n in names])
        pid, weight = lut[t["phase_id"]], t["weight"].astype(np.float32)
    else:
        if isinstance(source, str | os.PathLike):
            source = io.load_labels(source, nav_shape)
        if isinstance(source, CrystalMap):
            ids = np.full(source.size, -1)
            for i, ph in source.phases:
                if i >= 0 and ph.name in phases:
                    ids[source.phase_id == i] = phases.index(ph.name)
            pid = ids.reshape(source.shape)
            weight = np.ones(pid.shape, np.float32)
        else:
            pid = np.asarray(source)
            if pid.ndim != 2 or not np.issubdtype(pid.dtype, np.integer):
                raise ValueError(
                    f"Labels of shape {pid.shape} and dtype {pid.dtype} are invalid; expected an (H, W) integer "
                    "array, a CrystalMap, a label file or a SynthMap"
                )
            weight = np.ones(pid.shape, np.float32)
    if nav_shape is not None and tuple(pid.shape) != tuple(nav_shape):
        raise ValueError(f"Labels cover a {tuple(pid.shape)} scan; the map is {tuple(nav_shape)}")
    return pid.astype(int), weight


def _signal_of(source, calibration: float | None = None):
    if hasattr(source, "load") and hasattr(source, "truth_arrays"):
        return source.load()
    if isinstance(source, str | os.PathLike):
        return io.load_map(source, calibration=calibration)
    if hasattr(source, "axes_manager"):
        return source
    raise ValueError(
        f"Cannot read a map from {type(source).__name__}; expected a signal, a path or a SynthMap"
    )


def dataset(
    sources: Sequence,
    labels: Sequence | None = None,
    phases: Sequence[str] = crystal.STEEL_PHASES,
    prep: Preprocessing | None = None,
    min_weight: float = 0.0,
    max_per_class: int | None = None,
    jitter: float = 0.0,
    rng=None,
    chunk: int = 32,
    show_progressbar: bool = True,
) -> Dataset:
    """Preprocessed, labelled patterns from labelled maps, streamed chunk by chunk.

    Parameters
    ----------
    sources
        Maps: :class:`temlib.synth.SynthMap` (labelled by their ground truth), signals or paths.
    labels
        One label source per map (see :func:`labels_from`); None uses each SynthMap's truth.
    phases
        Phase names; the label of a pattern is its index here.
    prep
        Preprocessing of the network input.
    min_weight
        Keep patterns whose labelled crystal makes at least this fraction of the pattern
        (grain-boundary pixels mix two crystals).
    max_per_class
        Keep at most this many patterns per phase (drawn at random), to balance and bound
        the training set; None keeps all.
    jitter
        Strength of :func:`camera_jitter` applied to every pattern (0: none, for evaluation).
    rng
        Seed or generator (subsampling and jitter).
    chunk
        Scan block side for :func:`temlib.io.iter_chunks`.
    """
    rng = np.random.default_rng(rng)
    prep = prep or Preprocessing()
    phases = tuple(phases)
    if not sources:
        raise ValueError("No maps given; expected at least one labelled map")
    if labels is not None and len(labels) != len(sources):
        raise ValueError(
            f"{len(labels)} label sources for {len(sources)} maps; expected one per map"
        )
    signals, pids, weights = [], [], []
    for i, src in enumerate(sources):
        s = _signal_of(src)
        lab = labels[i] if labels is not None else src
        pid, w = labels_from(lab, phases, nav_shape=s.data.shape[:2])
        signals.append(s)
        pids.append(pid)
        weights.append(w)
    # choose the pixels first, so only those are read and preprocessed
    keep = [(pid >= 0) & (w >= min_weight) for pid, w in zip(pids, weights, strict=True)]
    if max_per_class is not None:
        for k in range(len(phases)):
            where = [np.flatnonzero(m & (pid == k)) for m, pid in zip(keep, pids, strict=True)]
            total = sum(len(v) for v in where)
            if total > max_per_class:
                flat = np.concatenate(
                    [np.stack([np.full(len(v), j), v], 1) for j, v in enumerate(where)]
                )
                drop = flat[rng.permutation(total)[max_per_class:]]
                for j, v in drop:
                    keep[j].flat[v] = False
    xs, ys, ws, srcs, rws, cls = [], [], [], [], [], []
    for j, s in enumerate(signals):
        cal = io.calibration_of(s)
        if not keep[j].any():
            continue
        for (rs, cs), block in io.iter_chunks(
            s, chunk, show_progressbar, desc=f"map {j + 1}/{len(signals)}"
        ):
            m = keep[j][rs, cs]
            if not m.any():
                continue
            pats = block[m]
            if jitter > 0:
                pats, scale, shift = camera_jitter(pats, rng, jitter)
                xs.append(preprocess(pats, cal, prep, scale=scale, shift=shift))
            else:
                xs.append(preprocess(pats, cal, prep))
            r, c = np.nonzero(m)
            ys.append(pids[j][rs, cs][m])
            ws.append(weights[j][rs, cs][m])
            srcs.append(np.full(len(r), j))
            rws.append(r + rs.start)
            cls.append(c + cs.start)
    if not xs:
        raise ValueError("No labelled pattern left; check the labels, phases and min_weight")
    return Dataset(
        np.concatenate(xs),
        np.concatenate(ys).astype(np.int64),
        np.concatenate(ws).astype(np.float32),
        np.concatenate(srcs),
        np.concatenate(rws),
        np.concatenate(cls),
        phases,
    )


def split(data: Dataset, fraction: float = 0.2, rng=None) -> tuple[Dataset, Dataset]:
    """Random split (stratified by phase) into training and validation sets."""
    if not 0 < fraction < 1:
        raise ValueError(
            f"Validation fraction {fraction!r} is invalid; expected a number between 0 and 1"
        )
    rng = np.random.default_rng(rng)
    val = np.zeros(len(data), bool)
    for k in range(len(data.phases)):
        idx = np.flatnonzero(data.y == k)
        if len(idx) > 1:
            val[rng.choice(idx, max(1, round(fraction * len(idx))), replace=False)] = True
    return data.subset(~val), data.subset(val)


def emphasize_boundaries(data: Dataset, repeat: int = 3, below: float = 0.95) -> Dataset:
    """Repeat the boundary patterns (two crystals in the probe) ``repeat`` times in all.

    On a boundary the label is the crystal that makes most of the pattern; the minority
    crystal's spots are there too, and with only their share of the training set the
    network learns to name whichever phase has spots. Repeating them (each repeat gets its
    own random turn in training) weights them like a sample weight would. Apply to the
    training part only, after :func:`split`.

    Parameters
    ----------
    data
        Training set.
    repeat
        How many times each pattern with ``weight < below`` appears (1: unchanged).
    below
        Patterns whose labelled crystal makes less than this fraction count as boundary.
    """
    if not (isinstance(repeat, int | np.integer) and repeat >= 1):
        raise ValueError(f"Boundary repeat {repeat!r} is invalid; expected an integer >= 1")
    mixed = np.flatnonzero(data.weight < below)
    index = np.concatenate([np.arange(len(data)), np.repeat(mixed, repeat - 1)])
    return data.subset(np.sort(index, kind="stable"))


def accuracy_by_weight(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    weight: np.ndarray,
    edges: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0001),
):
    """Accuracy per bin of the labelled crystal's share of the pattern (a pandas DataFrame).

    ``weight`` 1 is the inside of a grain; below, the probe also sees a second crystal and
    the label is the one that makes most of the pattern.
    """
    import pandas as pd

    y_true, y_pred, weight = (np.asarray(a).ravel() for a in (y_true, y_pred, weight))
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (weight >= lo) & (weight < hi)
        rows.append(
            {
                "share of the labelled crystal": f"{lo:.2f}-{min(hi, 1.0):.2f}",
                "patterns": int(m.sum()),
                "accuracy": float((y_true[m] == y_pred[m]).mean()) if m.any() else float("nan"),
            }
        )
    return pd.DataFrame(rows).set_index("share of the labelled crystal")


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (k * n_c)`` (absent classes get 0)."""
    counts = np.bincount(np.asarray(y), minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return {i: float(v) for i, v in enumerate(w)}


# --------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------


class PhaseClassifier:
    """A trained Keras network with the preprocessing it expects.

    Attributes
    ----------
    model
        The Keras model, input (N, size, size, 1), output (N, n_phases) probabilities.
    phases
        Phase names, in the order of the output columns.
    preprocessing
        The :class:`Preprocessing` of the input.
    metadata
        Everything stored in ``classifier.json``.
    bfloat16
        Run the network in bfloat16 where the CPU has it natively (OpenVINO,
        :func:`temlib._runtime.bfloat16_inference`; float32 TensorFlow otherwise). The online
        indexer (:func:`temlib.regress.load_models`) turns it on for speed; off by default, so
        that evaluations and saved probabilities are float32.
    """

    def __init__(
        self,
        model,
        phases: Sequence[str],
        preprocessing: Preprocessing,
        metadata: dict | None = None,
        bfloat16: bool = False,
    ):
        self.model = model
        self.bfloat16 = bool(bfloat16)
        self.phases = list(phases)
        self.preprocessing = preprocessing
        self.metadata = dict(metadata or {})
        self.metadata.update(phases=self.phases, preprocessing=preprocessing.to_dict())

    def __repr__(self) -> str:
        p = self.preprocessing
        return (
            f"PhaseClassifier(phases={self.phases}, input {p.size}x{p.size} px at {p.working_calibration:.4g} 1/Å/px, "
            f"{self.model.count_params():,} parameters)"
        )

    def predict_inputs(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities (N, n_phases) of already preprocessed inputs (N, size, size)."""
        x = np.asarray(x, np.float32)
        out = np.empty((len(x), len(self.phases)), np.float32)
        net = (self.bfloat16 and _runtime.bfloat16_inference(self.model)) or _runtime.inference(
            self.model
        )
        for i in range(0, len(x), batch_size):
            batch = network_input(x[i : i + batch_size], self.preprocessing)
            with warnings.catch_warnings():  # Keras: a tensor given for a one-input list
                warnings.filterwarnings("ignore", message="The structure of `inputs`")
                p = np.asarray(net(batch))
            out[i : i + batch_size] = np.concatenate([1 - p, p], axis=1) if p.shape[1] == 1 else p
        return out

    def predict_proba(
        self,
        patterns: np.ndarray,
        calibration: float,
        batch_size: int = 256,
        centers: np.ndarray | None = None,
    ) -> np.ndarray:
        """Phase probabilities of raw patterns.

        Parameters
        ----------
        patterns
            (N, ky, kx) (or one (ky, kx)) raw patterns as read from any map.
        calibration
            Their calibration (1/Å per px); the patterns are resampled to the model's.
        batch_size
            Patterns preprocessed and run through the network at once.
        centers
            (N, 2) direct-beam centres (row, col) px; found when None.

        Returns
        -------
        (N, n_phases) float32 probabilities (columns in the order of ``phases``).
        """
        p = _as_stack(patterns)
        calibration = _check_calibration(calibration)
        if centers is not None:
            centers = np.asarray(centers, float).reshape(len(p), 2)
        if centers is None:
            centers = _runtime.split_apply(
                lambda a: io.find_direct_beam(
                    a, radius=self.preprocessing.beam_search * min(a.shape[1:])
                ),
                p,
            )
        out = np.empty((len(p), len(self.phases)), np.float32)
        block = max(batch_size, 4096)  # preprocessed at once (16 KB each), on every core
        for i in range(0, len(p), block):
            x = _runtime.split_apply(
                lambda a, c: preprocess(a, calibration, self.preprocessing, centers=c),
                p[i : i + block],
                centers[i : i + block],
            )
            out[i : i + block] = self.predict_inputs(x, batch_size)
        return out

    def predict(
        self, patterns: np.ndarray, calibration: float, batch_size: int = 256
    ) -> np.ndarray:
        """Phase index (N,) of raw patterns (argmax of :meth:`predict_proba`)."""
        return self.predict_proba(patterns, calibration, batch_size).argmax(axis=1)


def save_classifier(clf: PhaseClassifier, path: str | Path | None = None) -> Path:
    """Write ``model.keras`` + ``classifier.json`` into the folder ``path`` (atomically).

    Default folder: :func:`default_model_dir` (``data/models/classifier``).
    """
    path = Path(path) if path is not None else default_model_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        clf.model.save(tmp / MODEL_FILE)
        meta = dict(clf.metadata, saved=time.strftime("%Y-%m-%d %H:%M:%S"), keras_file=MODEL_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved classifier to %s", path)
    return path


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_classifier(path: str | Path | None = None) -> PhaseClassifier:
    """Load a classifier saved by :func:`save_classifier` (default ``data/models/classifier``).

    Raises
    ------
    FileNotFoundError
        No model there (with how to train the default one).
    """
    path = Path(path) if path is not None else default_model_dir()
    if path.is_file() and path.name in (MODEL_FILE, METADATA_FILE):
        path = path.parent
    if not (path / MODEL_FILE).is_file() or not (path / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"No phase classifier in {path} (expected {MODEL_FILE} and {METADATA_FILE}); train the default one "
            "with `make report NB=03_classification` (or `temlib reports 03_classification`)"
        )
    meta = json.loads((path / METADATA_FILE).read_text())
    keras = _runtime.keras()
    custom = _layers()  # registers temlib's layers
    cast = custom["CastToFloat32"]  # AutoKeras' only layer in the exported networks
    try:
        model = keras.models.load_model(
            path / MODEL_FILE,
            compile=False,
            custom_objects={"CastToFloat32": cast, "Custom>CastToFloat32": cast},
        )
    except Exception as e:
        raise ValueError(f"Cannot load the classifier in {path}: {type(e).__name__}: {e}") from None
    return PhaseClassifier(
        model, meta["phases"], Preprocessing.from_dict(meta["preprocessing"]), meta
    )


# --------------------------------------------------------------------------------------
# Architecture search
# --------------------------------------------------------------------------------------


@functools.cache
def _layers():
    """Keras layers of temlib (registered for saving and loading; built lazily)."""
    keras = _runtime.keras()
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="temlib")
    class RandomAzimuth(keras.layers.Layer):
        """Turn polar patterns about the beam by a random angle (a cyclic shift of the azimuth
        axis, axis 2) and mirror half of them; per sample, in training only."""

        def __init__(self, mirror: bool = True, seed: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.mirror = mirror
            self.seed = seed
            self._gen = keras.random.SeedGenerator(seed)

        def call(self, x, training=None):
            if not training:
                return x
            shape = ops.shape(x)
            b, w = shape[0], shape[2]
            shift = ops.cast(
                keras.random.uniform((b,), 0, 1, seed=self._gen) * ops.cast(w, "float32"), "int32"
            )
            sign = ops.ones((b,), "int32")
            if self.mirror:
                flip = keras.random.uniform((b,), 0, 1, seed=self._gen) < 0.5
                sign = ops.where(flip, -sign, sign)
            idx = ops.mod(shift[:, None] + sign[:, None] * ops.arange(w, dtype="int32")[None, :], w)
            idx = ops.broadcast_to(idx[:, None, :, None], shape)
            return ops.take_along_axis(x, idx, axis=2)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return super().get_config() | {"mirror": self.mirror, "seed": self.seed}

    class CastToFloat32(keras.layers.Layer):
        """Stand-in for AutoKeras' input cast, so a saved model loads without importing AutoKeras."""

        def call(self, x):
            return ops.cast(x, "float32")

        def compute_output_shape(self, input_shape):
            return input_shape

    return {"RandomAzimuth": RandomAzimuth, "CastToFloat32": CastToFloat32}


@functools.cache
def _augment_block():
    """The AutoKeras block of rotation augmentation (class built lazily)."""
    ak = _runtime.autokeras()
    keras = _runtime.keras()
    import tree

    layers = _layers()

    @keras.saving.register_keras_serializable(package="temlib")
    class PatternAugmentation(ak.Block):
        """Random turns about the beam (and a mirror); active in training only.

        Polar inputs: a random cyclic shift of the azimuth axis. Cartesian inputs: a
        random rotation of the image, plus a small zoom and shift (calibration and
        centring errors).
        """

        def __init__(
            self, rotation: bool = True, geometry: str = "polar", seed: int | None = None, **kwargs
        ):
            super().__init__(**kwargs)
            self.rotation = rotation
            self.geometry = geometry
            self.seed = seed

        def get_config(self):
            return super().get_config() | {
                "rotation": self.rotation,
                "geometry": self.geometry,
                "seed": self.seed,
            }

        def build(self, hp, inputs=None):
            x = tree.flatten(inputs)[0]
            kl = keras.layers
            if self.geometry == "polar":
                if self.rotation:
                    x = layers["RandomAzimuth"](mirror=True, seed=self.seed)(x)
                return x
            if self.rotation:
                x = kl.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=self.seed)(x)
                x = kl.RandomFlip("horizontal", seed=self.seed)(x)
            x = kl.RandomZoom(0.03, fill_mode="constant", seed=self.seed)(x)
            return kl.RandomTranslation(0.015, 0.015, fill_mode="constant", seed=self.seed)(x)

    return PatternAugmentation


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The choices the architecture search may make (a CPU-sized vanilla ConvNet)."""

    # the first value of each is the first trial's; kernel 3 only: AutoKeras pools (kernel - 1) wide
    kernel_size: tuple = (3,)
    num_blocks: tuple = (3, 2)
    num_layers: tuple = (1, 2)
    filters: tuple = (32, 16, 64)
    dropout: tuple = (0.0, 0.25)
    separable: bool = False
    reduction: tuple = ("flatten",)  # one of, or all of, flatten / global_max / global_avg


@dataclasses.dataclass
class SearchResult:
    """What :func:`search` found."""

    classifier: PhaseClassifier
    trials: list[dict]
    seconds: float
    directory: Path
    history: dict | None = None

    def trials_table(self):
        """The trials as a pandas DataFrame (score = best validation accuracy), best first."""
        import pandas as pd

        rows = [
            dict(
                trial=t["trial_id"],
                val_accuracy=t["score"],
                parameters=t.get("n_params"),
                **t["hp"],
            )
            for t in self.trials
        ]
        return (
            pd.DataFrame(rows)
            .sort_values("val_accuracy", ascending=False, na_position="last")
            .reset_index(drop=True)
        )


def search(
    train: Dataset,
    val: Dataset,
    augment: bool = True,
    max_trials: int = 3,
    epochs: int = 5,
    batch_size: int = 64,
    patience: int = 3,
    space: SearchSpace | None = None,
    tuner: str = "greedy",
    directory: str | Path | None = None,
    project_name: str | None = None,
    overwrite: bool = False,
    balance: bool = False,
    max_model_size: int = 2_000_000,
    learning_rate: float | None = 2e-3,
    seed: int = 0,
    verbose: int = 0,
    prep: Preprocessing | None = None,
) -> SearchResult:
    """Search a CNN for the phase with AutoKeras; resumable; returns the best as a classifier.

    Parameters
    ----------
    train, val
        Preprocessed training and validation sets (:func:`dataset`, :func:`split`).
    augment
        Random rotation about the beam (+ mirror) during training. Zoom and shift
        augmentation (calibration and centring errors) are always on.
    max_trials, epochs, batch_size
        Search budget: architectures tried, epochs per trial, batch.
    patience
        Early stopping on validation loss within a trial.
    space
        The choices (:class:`SearchSpace`).
    tuner
        AutoKeras tuner: ``"greedy"``, ``"bayesian"``, ``"random"`` or ``"hyperband"``.
    directory, project_name
        Where the trials go (default ``data/cache/classify/``, a name derived from the data
        and settings). With ``overwrite=False`` an interrupted search resumes there.
    balance
        Balanced class weights (minority phases count as much as ferrite); the sampling
        (:func:`dataset` ``max_per_class``) already evens the classes out in part.
    max_model_size
        Largest number of parameters a trial may have.
    learning_rate
        Adam's learning rate, fixed; None lets the search tune optimizer and rate too.
    seed
        Seed of the tuner (AutoKeras also seeds NumPy's global generator: restored here).
    prep
        The preprocessing used to build the inputs (stored with the model).
    """
    valid_tuners = ("greedy", "bayesian", "random", "hyperband")
    if tuner not in valid_tuners:
        raise ValueError(f"Unknown tuner {tuner!r}; expected one of {valid_tuners}")
    if max_trials < 1 or epochs < 1:
        raise ValueError(
            f"Search budget max_trials={max_trials!r}, epochs={epochs!r} is invalid; expected integers >= 1"
        )
    if len(train) == 0 or len(val) == 0:
        raise ValueError("Empty training or validation set; expected labelled patterns in both")
    if train.phases != val.phases or train.x.shape[1:] != val.x.shape[1:]:
        raise ValueError(
            "Training and validation sets differ in phases or input size; expected the same preprocessing"
        )
    space = space or SearchSpace()
    prep = prep or Preprocessing(size=train.x.shape[1])
    if prep.size != train.x.shape[1]:
        raise ValueError(
            f"Preprocessing size {prep.size} differs from the inputs ({train.x.shape[1]} px); expected the same"
        )
    ak = _runtime.autokeras()
    from keras_tuner.engine import hyperparameters as khp

    keras = _runtime.keras()
    n_classes = len(train.phases)
    settings = dict(
        preprocessing=prep.to_dict(),
        augment=augment,
        max_trials=max_trials,
        epochs=epochs,
        batch_size=batch_size,
        patience=patience,
        space=dataclasses.asdict(space),
        tuner=tuner,
        balance=balance,
        seed=seed,
        max_model_size=max_model_size,
        learning_rate=learning_rate,
    )
    data_hash = train.digest()
    key = hashlib.sha1(
        json.dumps([settings, data_hash, val.digest()], sort_keys=True).encode()
    ).hexdigest()[:10]
    directory = Path(directory) if directory is not None else paths.data_dir("cache") / "classify"
    project_name = project_name or f"search-{'aug' if augment else 'noaug'}-{key}"
    directory.mkdir(parents=True, exist_ok=True)

    inp = ak.ImageInput()
    x = _augment_block()(rotation=augment, geometry=prep.geometry, seed=seed)(inp)
    x = ak.ConvBlock(
        kernel_size=_runtime.hp_choice(khp, "kernel_size", space.kernel_size),
        num_blocks=_runtime.hp_choice(khp, "num_blocks", space.num_blocks),
        num_layers=_runtime.hp_choice(khp, "num_layers", space.num_layers),
        filters=_runtime.hp_choice(khp, "filters", space.filters),
        dropout=_runtime.hp_choice(khp, "dropout", space.dropout),
        max_pooling=True,
        separable=space.separable,
    )(x)
    x = ak.SpatialReduction(
        reduction_type=space.reduction[0] if len(space.reduction) == 1 else None
    )(x)
    out = ak.ClassificationHead(num_classes=n_classes)(x)
    import keras_tuner

    fixed = keras_tuner.HyperParameters()
    if learning_rate is not None:
        fixed.Fixed("optimizer", "adam")
        fixed.Fixed("learning_rate", float(learning_rate))
    am = _runtime.auto_model(
        inputs=inp,
        outputs=out,
        max_trials=max_trials,
        tuner=tuner,
        directory=str(directory),
        project_name=project_name,
        overwrite=overwrite,
        objective="val_accuracy",
        seed=seed,
        max_model_size=max_model_size,
        hyperparameters=fixed,
        tune_new_entries=True,
    )
    eye = np.eye(n_classes, dtype=np.float32)
    if n_classes == 2:  # AutoKeras: two classes are one sigmoid column
        eye = np.array([[0.0], [1.0]], np.float32)
    fit_kwargs = {}
    if balance:
        fit_kwargs["class_weight"] = class_weights(train.y, n_classes)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, min_delta=1e-4)
    t0 = time.perf_counter()
    history = am.fit(
        network_input(train.x, prep),
        eye[train.y],
        validation_data=(network_input(val.x, prep), eye[val.y]),
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[stop],
        verbose=verbose,
        **fit_kwargs,
    )
    seconds = time.perf_counter() - t0
    model = am.export_model()
    trials = []
    for t in am.tuner.oracle.get_best_trials(max_trials):
        trials.append(dict(trial_id=t.trial_id, score=t.score, hp=dict(t.hyperparameters.values)))
    if trials:
        trials[0]["n_params"] = int(model.count_params())
    meta = dict(
        training_data_hash=data_hash,
        n_train=len(train),
        n_val=len(val),
        train_counts=train.counts(),
        search=settings
        | dict(
            seconds=seconds,
            directory=str(directory / project_name),
            best=trials[0] if trials else None,
        ),
        val_accuracy=trials[0]["score"] if trials else None,
    )
    clf = PhaseClassifier(model, train.phases, prep, meta)
    hist = getattr(history, "history", None)
    return SearchResult(clf, trials, seconds, directory / project_name, hist)


# --------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------


def classify_map(
    signal_or_path,
    model: PhaseClassifier | str | Path | None = None,
    chunk: int = 32,
    calibration: float | None = None,
    batch_size: int = 256,
    show_progressbar: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Phase of every pattern of a (lazy) map, streamed block by block.

    Parameters
    ----------
    signal_or_path
        A signal read by :func:`temlib.io.load_map`, a path it reads, or a SynthMap.
    model
        A :class:`PhaseClassifier`, a folder holding one, or None for the default
        (``data/models/classifier``).
    chunk
        Scan block side (:func:`temlib.io.iter_chunks`); one block is in memory at a time.
    calibration
        1/Å per px, for files without one (``.npy``).
    batch_size
        Patterns per network call.

    Returns
    -------
    phase_id (H, W) int (index into ``model.phases``) and probabilities (H, W, n_phases) float32.
    """
    clf = model if isinstance(model, PhaseClassifier) else load_classifier(model)
    if hasattr(signal_or_path, "load") and hasattr(signal_or_path, "truth_arrays"):
        signal = signal_or_path.load()
    elif isinstance(signal_or_path, str | os.PathLike):
        signal = io.load_map(signal_or_path, calibration=calibration)
    else:
        signal = signal_or_path
    if not hasattr(signal, "axes_manager") or signal.data.ndim != 4:
        raise ValueError(
            f"Cannot classify {type(signal_or_path).__name__}; expected a 4D map (signal, path or SynthMap)"
        )
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(
            f"Chunk {chunk!r} is invalid; expected a positive integer (scan pixels per block side)"
        )
    cal = io.calibration_of(signal) if calibration is None else _check_calibration(calibration)
    h, w = signal.data.shape[:2]
    proba = np.zeros((h, w, len(clf.phases)), np.float32)
    for (rs, cs), block in io.iter_chunks(signal, chunk, show_progressbar, desc="phase"):
        r, c = block.shape[:2]
        proba[rs, cs] = clf.predict_proba(
            block.reshape(r * c, *block.shape[2:]), cal, batch_size
        ).reshape(r, c, -1)
    return proba.argmax(axis=-1), proba


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def to_map(
    values: np.ndarray, data: Dataset, shape: tuple[int, int], fill=-1, source: int = 0
) -> np.ndarray:
    """Place per-pattern ``values`` (N, ...) of ``data`` back on the scan grid (H, W, ...) of map ``source``."""
    values = np.asarray(values)
    if len(values) != len(data):
        raise ValueError(f"{len(values)} values for {len(data)} patterns; expected one per pattern")
    out = np.full(
        (*shape, *values.shape[1:]),
        fill,
        dtype=np.result_type(values.dtype, np.asarray(fill).dtype),
    )
    m = data.source == source
    out[data.rows[m], data.cols[m]] = values[m]
    return out


def read_patterns(signal, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Raw patterns (N, ky, kx) at scan positions (rows, cols) of a (lazy) map."""
    rows, cols = np.asarray(rows, int).ravel(), np.asarray(cols, int).ravel()
    if rows.shape != cols.shape:
        raise ValueError(
            f"{len(rows)} rows and {len(cols)} columns given; expected as many of each"
        )
    data = signal.data
    out = [np.asarray(data[r, c]) for r, c in zip(rows, cols, strict=True)]
    out = [o.compute() if hasattr(o, "compute") else o for o in out]
    return np.stack(out) if out else np.zeros((0, *data.shape[2:]), data.dtype)


def examples(data: Dataset, per_phase: int = 4, rng=None, min_weight: float = 0.0) -> np.ndarray:
    """Indices of up to ``per_phase`` random patterns of each phase of ``data``, phase by phase."""
    rng = np.random.default_rng(rng)
    out = []
    for k in range(len(data.phases)):
        idx = np.flatnonzero((data.y == k) & (data.weight >= min_weight))
        out.append(rng.choice(idx, min(per_phase, len(idx)), replace=False) if len(idx) else idx)
    return np.concatenate(out).astype(int)


def rotation_consistency(
    classifiers: dict,
    patterns: np.ndarray,
    calibration: float,
    angles=(0, 15, 30, 45, 60, 90, 135, 180),
    labels=None,
):
    """Phase predictions of patterns turned about the beam, per classifier and angle.

    Parameters
    ----------
    classifiers
        ``{name: PhaseClassifier}``.
    patterns
        (N, ky, kx) raw patterns.
    calibration
        1/Å per px.
    angles
        Turns (degrees).
    labels
        (N,) true phase indices; when given the table also holds the accuracy.

    Returns
    -------
    pandas DataFrame: per classifier and angle, the fraction of patterns whose phase is the
    one predicted unturned (``same phase``) and the accuracy.
    """
    import pandas as pd

    p = _as_stack(patterns)
    centers = io.find_direct_beam(p)
    turned = {a: rotate_patterns(p, a, centers) for a in angles}
    rows = []
    for name, clf in classifiers.items():
        ref = clf.predict(p, calibration)
        for a in angles:
            pred = clf.predict(turned[a], calibration)
            row = {"classifier": name, "angle (deg)": a, "same phase": float((pred == ref).mean())}
            if labels is not None:
                row["accuracy"] = float((pred == np.asarray(labels)).mean())
            rows.append(row)
    return pd.DataFrame(rows)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n) counts: row = true phase, column = predicted phase."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    ok = (y_true >= 0) & (y_true < n_classes)
    return np.bincount(y_true[ok] * n_classes + y_pred[ok], minlength=n_classes**2).reshape(
        n_classes, n_classes
    )


def scores(y_true: np.ndarray, y_pred: np.ndarray, phases: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-phase precision / recall / F1 / support and the confusion matrix."""
    cm = confusion(y_true, y_pred, len(phases))
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return dict(
        accuracy=float(tp.sum() / max(cm.sum(), 1)),
        macro_f1=float(np.mean(f1[present])) if present.any() else float("nan"),
        per_phase={
            p: dict(
                precision=float(precision[i]),
                recall=float(recall[i]),
                f1=float(f1[i]),
                support=int(support[i]),
            )
            for i, p in enumerate(phases)
        },
        confusion=cm,
        n=int(cm.sum()),
    )


def per_phase_table(result: dict):
    """:func:`scores` per phase as a pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame(result["per_phase"]).T


def reliability(proba: np.ndarray) -> np.ndarray:
    """Phase reliability (..., ) in [0, 1]: best minus second-best probability."""
    p = np.sort(np.asarray(proba), axis=-1)
    return p[..., -1] - p[..., -2] if p.shape[-1] > 1 else p[..., -1]


def error_flagging(rel: np.ndarray, correct: np.ndarray, n_points: int = 50) -> dict:
    """How well a low reliability flags wrong phases.

    Returns
    -------
    dict with ``auc`` (probability that a wrong pixel has a lower reliability than a right
    one), and the curve ``coverage`` (fraction of pixels kept above a threshold) vs
    ``accuracy`` (of those kept), with the ``thresholds``.
    """
    from scipy.stats import rankdata

    rel, correct = np.asarray(rel, float).ravel(), np.asarray(correct, bool).ravel()
    n_ok, n_bad = int(correct.sum()), int((~correct).sum())
    if n_ok and n_bad:
        ranks = rankdata(rel)
        auc = float((ranks[correct].sum() - n_ok * (n_ok + 1) / 2) / (n_ok * n_bad))
    else:
        auc = float("nan")
    thresholds = np.quantile(rel, np.linspace(0, 0.99, n_points))
    coverage = np.array([(rel >= t).mean() for t in thresholds])
    accuracy = np.array(
        [correct[rel >= t].mean() if (rel >= t).any() else np.nan for t in thresholds]
    )
    return dict(
        auc=auc,
        thresholds=thresholds,
        coverage=coverage,
        accuracy=accuracy,
        n_wrong=n_bad,
        n=len(rel),
    )


def augmentation_experiment(
    train: Dataset,
    val: Dataset,
    test: Dataset,
    clean_weight: float = 0.7,
    prep: Preprocessing | None = None,
    **search_kwargs,
):
    """Search once without and once with rotation augmentation; score both on the test map.

    Parameters
    ----------
    train, val
        Random split of the training maps (same orientations in both).
    test
        The test map (orientations the training maps never show).
    clean_weight
        Test pixels whose labelled crystal makes at least this fraction of the pattern are
        scored in the main columns; the others (grain boundaries) in ``boundary accuracy``.
    **search_kwargs
        Passed to :func:`search` (budgets, directory, seed...).

    Returns
    -------
    (table, results): a pandas DataFrame with one row per setting, and
    ``{augment: (SearchResult, test probabilities (N, n_phases))}``.
    """
    import pandas as pd

    rows, results = [], {}
    clean = test.weight >= clean_weight
    for augment in (False, True):
        res = search(train, val, augment=augment, prep=prep, **search_kwargs)
        proba = res.classifier.predict_inputs(test.x)
        pred = proba.argmax(axis=1)
        s = scores(test.y[clean], pred[clean], test.phases)
        rows.append(
            {
                "rotation augmentation": augment,
                "val accuracy (random split)": res.trials[0]["score"]
                if res.trials
                else float("nan"),
                "test accuracy": s["accuracy"],
                "test macro-F1": s["macro_f1"],
                **{f"test recall {p}": v["recall"] for p, v in s["per_phase"].items()},
                "boundary accuracy": float((pred[~clean] == test.y[~clean]).mean())
                if (~clean).any()
                else float("nan"),
                "search s": res.seconds,
                "trials": len(res.trials),
            }
        )
        results[augment] = (res, proba)
    return pd.DataFrame(rows), results


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _cli_classify(parser):
    parser.add_argument(
        "map", help="a 4D map (.hspy, .zspy, .blo, .mib, .npy) or a synthetic map folder"
    )
    parser.add_argument(
        "--model", default=None, help="classifier folder (default: data/models/classifier)"
    )
    parser.add_argument(
        "--calibration", type=float, default=None, help="1/Å per px (required for .npy)"
    )
    parser.add_argument("--chunk", type=int, default=32, help="scan block side streamed at a time")
    parser.add_argument(
        "--out",
        default=None,
        help="write phase_id, probabilities, reliability and phases to this .npz",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        clf = load_classifier(args.model)
        pid, proba = classify_map(
            args.map,
            clf,
            chunk=args.chunk,
            calibration=args.calibration,
            show_progressbar=not args.quiet,
        )
        rel = reliability(proba)
        for i, p in enumerate(clf.phases):
            print(f"{p:<12} {float((pid == i).mean()):7.2%}")
        print(
            f"{'reliability':<12} median {float(np.median(rel)):.3f}, {float((rel < 0.5).mean()):.1%} below 0.5"
        )
        if args.out:
            out = Path(args.out)
            if out.suffix != ".npz":
                raise ValueError(
                    f"Output {out.name} is not a .npz file name; expected e.g. phases.npz"
                )
            tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.npz")
            np.savez_compressed(
                tmp, phase_id=pid, probabilities=proba, reliability=rel, phases=np.array(clf.phases)
            )
            os.replace(tmp, out)
            print(f"wrote {out}")
        return 0

    return run
