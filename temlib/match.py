"""Fast template matching of spot patterns against per-phase template libraries.

Formulation (bound by arithmetic, not Python loops): a pattern descriptor ``E(r, theta)``
and a template descriptor ``T(r, theta)`` (:mod:`temlib.descriptors`, folded over
[0, 180) deg) correlate at in-plane angle ``phi`` as

    C(phi) = sum_r sum_theta E(r, theta) T(r, theta - phi)
           = IFFT_k [ sum_r E^(r, k) conj(T^(r, k)) ](phi)

so every template and every in-plane angle of a batch of patterns costs one batched
complex matrix product per azimuthal frequency ``k`` ((N, R) x (R, T)), then one inverse
real FFT per (pattern, template). The best angle is refined below the azimuth step by
a parabola through the three samples around the maximum.

Scores and decisions
    ``correlation`` is the cosine similarity (both descriptors have unit norm) at the best
    in-plane angle. Plain correlation prefers phases whose templates spread over many
    bins (cementite), so the phase is decided on a per-phase normalised score
    (``normalization="zscore"``: the best correlation of a phase minus the mean over that
    phase's templates, divided by their standard deviation, per pattern).
Reliability (ASTAR-style)
    ``reliability = 100 (1 - Q2 / Q1)``: Q1 the best score, Q2 the best one of the
    same phase whose orientation is at least ``min_angle`` degrees (disorientation,
    modulo the beam flip below) away. Scores are correlations above the pattern's
    baseline ``B`` (its in-plane-averaged correlation, averaged over the phase's
    templates): descriptors are non-negative, so every template correlates a little with
    every pattern, and without the baseline Q2 / Q1 stays near 1. ``phase_reliability`` uses the normalised scores,
    Q2 from the best other phase.
Mirrored templates
    The template libraries sample beam directions in the fundamental sector of the Laue
    group; proper rotations reach only half of what that sector's mirror images need. The
    mirror image (y -> -y) of template ``R_t``'s pattern is exactly the pattern of
    ``R_t * C2y`` (inversion is in every Laue group), and mirroring a descriptor conjugates
    its azimuthal spectrum, so every pattern is also matched mirrored, at no memory cost;
    template indices ``>= T`` in the results are those mirrored templates.
The 180-degree ambiguity
    Orientation ``R`` and ``R * Rz(180)`` (turned half a turn about the beam) give the
    same spot positions, and on a flat Ewald sphere the same pattern. The descriptors are
    folded, so :func:`match_descriptors` reports the in-plane angle in [0, 180) and the
    orientation ``R_template * Rz(-angle)``; the other candidate is :func:`beam_flip` of
    it. The curved Ewald sphere excites ``g`` and ``-g`` unequally off a zone axis, so
    from raw patterns (:func:`match_patterns`, ``temlib index``) the best solution's flip
    is then decided on the unfolded descriptor (:func:`resolve_beam_flip`) and its
    ``flip_confidence`` reported (near 0: the pattern cannot tell; take both).
    :func:`orientation_errors` reports errors strictly and modulo the flip.

Refinement below the library step
    The best template is up to half a library step away, plus what the map's look moves
    it. :func:`refine_orientations` simulates templates at small tilts around a solution
    and climbs the correlation (continuous orientations), with the relrod half-width
    fitted on the map (:func:`fit_excitation_error`: it depends on the foil's thickness
    and on precession, which a map does not record). ``temlib index`` refines by default
    (:func:`refine_result`); :func:`match_patterns` with ``refine=``.

Orientations follow orix: a rotation maps sample to crystal; a template's pattern turned
by ``phi`` about the beam (counter-clockwise in the (x, y) = (col, row) frame of
:mod:`temlib.simulate`) is the pattern of ``R_template * Rz(-phi)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import numpy as np
from orix.crystal_map import Phase
from orix.quaternion import Rotation

from . import _runtime, crystal, descriptors

log = logging.getLogger(__name__)

NORMALIZATIONS = ("auto", "calibrated", "ratio", "zscore", "none")
CALIBRATION_FILE = "template_matching.json"


# --------------------------------------------------------------------------------------
# Quaternion helpers (numpy, batched)
# --------------------------------------------------------------------------------------


def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (..., 4) quaternions (w, x, y, z), broadcasting."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def _rz(angle_rad: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions of rotations by ``angle_rad`` about z."""
    a = np.asarray(angle_rad, float) / 2
    z = np.zeros_like(a)
    return np.stack([np.cos(a), z, z, np.sin(a)], axis=-1)


RZ180 = np.array([0.0, 0.0, 0.0, 1.0])
C2Y = np.array([0.0, 0.0, 1.0, 0.0])  # 180 deg about the sample y axis


_LAUE_PROPER: dict[bytes, np.ndarray] = {}


def proper_symmetry(phase: Phase) -> np.ndarray:
    """(S, 4) quaternions of the proper rotations of the phase's Laue group."""
    pg = phase.point_group
    key = np.asarray(pg.data).tobytes()  # the group's elements (a name may have several settings)
    q = _LAUE_PROPER.get(key)
    if q is None:  # orix derives the subgroup from the elements each time (3.5 ms)
        q = _LAUE_PROPER[key] = np.asarray(pg.laue_proper_subgroup.data, float)
    return q.copy()


def misorientation_deg(
    q1: np.ndarray, q2: np.ndarray, symmetry: np.ndarray, modulo_flip: bool = False
) -> np.ndarray:
    """Disorientation angle (deg) between orientations (sample -> crystal), elementwise.

    Parameters
    ----------
    q1, q2
        (..., 4) quaternions, broadcast against each other.
    symmetry
        (S, 4) proper symmetry rotations of the crystal (:func:`proper_symmetry`).
    modulo_flip
        Also count ``q2 * Rz(180)`` (the same kinematic pattern) as the same orientation.
    """
    q1 = np.asarray(q1, float)
    q2 = np.asarray(q2, float)
    cands = [q2, _qmul(q2, RZ180)] if modulo_flip else [q2]
    best = None
    for c in cands:
        sq = _qmul(symmetry.reshape((-1,) + (1,) * (c.ndim - 1) + (4,)), c[None])  # (S, ..., 4)
        d = np.abs((q1[None] * sq).sum(-1)).max(axis=0)
        best = d if best is None else np.maximum(best, d)
    return np.degrees(2 * np.arccos(np.clip(best, 0, 1)))


def beam_direction_angle(q1: np.ndarray, q2: np.ndarray, symmetry: np.ndarray) -> np.ndarray:
    """Angle (deg) between the beam directions (crystal frame) of orientations, modulo the Laue group.

    Both signs of a direction count as the same (Friedel's law), so patterns from
    beam-reversed, mirror-related orientations compare as equal.
    """
    from orix.quaternion import Rotation as _R

    def beam(q):
        q = np.asarray(q, float)
        return _R(q.reshape(-1, 4)).to_matrix()[:, :, 2].reshape(*q.shape[:-1], 3)  # R z

    v1, v2 = beam(q1), beam(q2)
    mats = _R(symmetry).to_matrix()  # (S, 3, 3)
    sv2 = np.einsum("sij,...j->s...i", mats, v2)
    cos = np.abs((v1[None] * sv2).sum(-1)).max(axis=0)
    return np.degrees(np.arccos(np.clip(cos, 0, 1)))


def beam_flip(rotations):
    """Orientations turned 180 deg about the beam: ``R * Rz(180)`` (the same kinematic pattern).

    Accepts an orix ``Rotation``/``Orientation``, (..., 4) quaternions, or a ``CrystalMap``
    (returns a copy with every rotation flipped).
    """
    from orix.crystal_map import CrystalMap

    if isinstance(rotations, CrystalMap):
        out = rotations.deepcopy()
        q = _qmul(out._rotations.data, RZ180)
        out._rotations = Rotation(q)
        return out
    if isinstance(rotations, Rotation):
        return rotations.__class__(
            _qmul(rotations.data, RZ180),
            **({"symmetry": rotations.symmetry} if hasattr(rotations, "symmetry") else {}),
        )
    return _qmul(np.asarray(rotations, float), RZ180)


# --------------------------------------------------------------------------------------
# Library
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class PhaseTemplates:
    """One phase's templates ready for matching.

    Attributes
    ----------
    phase
        orix ``Phase``.
    quaternions
        (T, 4) template orientations (sample -> crystal), in-plane angle 0.
    spectra
        (T, K, R) complex64 conjugate azimuthal spectra of the template descriptors.
    coarse
        (K1, 2R, 2T) float32: the ``K1`` lowest frequencies as real blocks for the screening GEMM.
    symmetry
        (S, 4) proper symmetry rotations.
    """

    phase: Phase
    quaternions: np.ndarray
    spectra: np.ndarray
    coarse: np.ndarray
    symmetry: np.ndarray

    @property
    def size(self) -> int:
        return len(self.quaternions)

    @property
    def quaternions_ext(self) -> np.ndarray:
        """(2T, 4): the templates, then their mirror images ``R_t * C2y`` (pattern mirrored y -> -y)."""
        return np.concatenate([self.quaternions, _qmul(self.quaternions, C2Y)])

    def spectra_krt(self) -> np.ndarray:
        """(K, R, T) layout of :attr:`spectra` (for the exhaustive search)."""
        return np.ascontiguousarray(self.spectra.transpose(1, 2, 0))

    @functools.cached_property
    def directions(self) -> np.ndarray:
        """(S, T, 3) float32: every symmetry-equivalent beam direction ``R z`` of every template."""
        beam = Rotation(self.quaternions).to_matrix()[:, :, 2]  # (T, 3), crystal frame
        sym = Rotation(self.symmetry).to_matrix()  # (S, 3, 3)
        return np.einsum("sij,tj->sti", sym, beam).astype(np.float32)

    def nearest(self, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` templates whose beam directions lie nearest to those of orientations ``q``.

        Distances are taken under the crystal symmetry and the Friedel pair (either sign).
        Returns an (N, T) bool mask and (N,) the angle (deg) of the farthest one kept.
        """
        s, t, _ = self.directions.shape
        u = Rotation(np.asarray(q, float).reshape(-1, 4)).to_matrix()[:, :, 2].astype(np.float32)
        out = np.zeros((len(u), t), bool)
        radius = np.full(len(u), 180.0)
        dirs = self.directions.reshape(-1, 3).T
        for a in range(0, len(u), 1024):
            cos = np.abs(u[a : a + 1024] @ dirs).reshape(-1, s, t).max(axis=1)
            if n >= t:
                out[a : a + 1024] = True
                far = cos.min(axis=1)
            else:
                top = np.argpartition(-cos, n - 1, axis=1)[:, :n]
                np.put_along_axis(out[a : a + 1024], top, True, axis=1)
                far = np.take_along_axis(cos, top, axis=1).min(axis=1)
            radius[a : a + 1024] = np.degrees(np.arccos(np.clip(far, -1, 1)))
        return out, radius


@dataclasses.dataclass
class Library:
    """Per-phase template libraries in descriptor space (:func:`build_library`)."""

    phases: list[PhaseTemplates]
    settings: descriptors.DescriptorSettings
    params: dict
    phase_calibration: dict | None = None

    @property
    def names(self) -> list[str]:
        return [p.phase.name for p in self.phases]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.phases)

    def restrict(self, names) -> Library:
        """The same library with only the phases ``names``."""
        keep = [p for p in self.phases if p.phase.name in set(names)]
        return Library(keep, self.settings, self.params, None)


def template_spectra(desc: np.ndarray, n_freq: int | None = None) -> np.ndarray:
    """(T, K, R) complex64 conjugate azimuthal spectra of (T, R, n_theta) template descriptors."""
    from scipy import fft

    f = np.conj(fft.rfft(desc, axis=-1))
    if n_freq:
        f = f[..., :n_freq]
    return np.ascontiguousarray(f.transpose(0, 2, 1)).astype(np.complex64)


def build_library(
    phases=crystal.STEEL_PHASES,
    resolution: float = 1.0,
    kv: float = 200.0,
    settings: descriptors.DescriptorSettings | None = None,
    max_excitation_error: float | None = None,
    n_freq: int | None = None,
    coarse_freq: int = 8,
    coarse_pool: int = 1,
    show_progressbar: bool = False,
) -> Library:
    """Simulate (or read cached) template libraries and turn them into matching spectra.

    Parameters
    ----------
    phases
        Phase names (or orix phases) to match against, e.g. ``("ferrite", "NbC", "cementite")``.
    resolution
        Template sampling step (deg) of the reduced fundamental zone.
    kv
        Beam energy (kV) the templates are simulated at (the map's).
    settings
        Descriptor settings; default :func:`temlib.descriptors.load_settings` (the tuned ones).
    max_excitation_error
        Relrod half-width of the simulation (1/Å); default ``settings.excitation_error``.
    n_freq
        Azimuthal frequencies kept (default all, ``n_theta // 2 + 1``); fewer is faster
        and smooths the correlation.
    coarse_freq
        Frequencies of the coarse screen (:func:`match_descriptors` ``n_keep``).
    coarse_pool
        Radial bins summed together in the coarse screen.
    """
    from . import simulate

    settings = descriptors.load_settings() if settings is None else settings
    if isinstance(phases, str):
        phases = [p.strip() for p in phases.split(",") if p.strip()]
    if not len(phases):
        raise ValueError(
            "No phases given; expected one or more of " + ", ".join(crystal.phase_names())
        )
    g_max = _g_max(settings)
    if max_excitation_error is None:
        max_excitation_error = settings.excitation_error
    out = []
    for ph in phases:
        lib = simulate.template_library(
            ph,
            kind="reduced",
            resolution=resolution,
            reciprocal_radius=g_max,
            max_excitation_error=max_excitation_error,
            kv=kv,
            show_progressbar=show_progressbar,
        )
        desc = descriptors.library_descriptors(lib, settings)
        spec = template_spectra(desc, n_freq)
        out.append(
            PhaseTemplates(
                phase=lib.phase,
                quaternions=np.asarray(lib.rotations.data, float),
                spectra=spec,
                coarse=_stack_coarse(spec, coarse_freq, coarse_pool),
                symmetry=proper_symmetry(lib.phase),
            )
        )
    params = {
        "resolution": resolution,
        "kv": kv,
        "max_excitation_error": max_excitation_error,
        "n_freq": n_freq,
        "coarse_freq": coarse_freq,
        "coarse_pool": coarse_pool,
    }
    lib = Library(out, settings, params)
    lib.phase_calibration = load_phase_calibration(lib)
    return lib


def _g_max(settings: descriptors.DescriptorSettings) -> float:
    """Largest reciprocal radius (1/Å) simulated for templates of these settings."""
    return max(1.5, float(np.ceil((settings.r_max + 3 * settings.sigma) * 10) / 10))


def truth_margin(
    desc: np.ndarray,
    q_true: np.ndarray,
    library: Library,
    phase: str,
    min_angle: float = 5.0,
    n_best: int = 80,
) -> np.ndarray:
    """How well each pattern's descriptor singles out its true orientation: a ceiling.

    The correlation of the pattern with the template simulated at its true orientation
    (the library's relrod width and descriptor settings, best in-plane angle) minus the
    best correlation of any library template at least ``min_angle`` deg away (modulo the
    beam flip). Where it is negative, a wrong orientation fits the descriptor better than
    the truth: no template matching on this descriptor, and no regressor trained on its
    templates, can be expected to find the truth there (few-spot patterns, intensities the
    kinematic model does not reproduce).

    Parameters
    ----------
    desc
        (N, n_r, n_theta) pattern descriptors of the phase.
    q_true
        (N, 4) true orientations.
    library, phase
        A :func:`build_library` library and the phase of the patterns.
    """
    from scipy import fft

    from . import simulate

    if phase not in library.names:
        raise ValueError(f"Phase {phase!r} is not in the library; expected one of {library.names}")
    desc = np.asarray(desc, np.float32)
    q_true = np.asarray(q_true, float).reshape(-1, 4)
    if len(desc) != len(q_true):
        raise ValueError(
            f"{len(desc)} descriptors for {len(q_true)} orientations; expected one each"
        )
    pt = library.phases[library.names.index(phase)]
    refl = simulate.reflections(pt.phase, g_max=_g_max(library.settings))
    xy, inten, _ = simulate.kinematic_spots(
        refl,
        Rotation(q_true),
        kv=library.params["kv"],
        max_excitation_error=library.params["max_excitation_error"],
    )
    own_desc = descriptors.template_descriptors(xy, inten, library.settings)
    n_theta = desc.shape[-1]
    spec = (fft.rfft(desc, axis=-1) * np.conj(fft.rfft(own_desc, axis=-1))).sum(axis=1)
    own = fft.irfft(spec, n=n_theta, axis=-1).max(axis=-1)
    r = match_descriptors(
        desc, library.restrict([phase]), n_best=n_best, normalization="none", n_candidates=n_best
    )
    mis = misorientation_deg(r.quaternions, q_true[:, None], pt.symmetry, modulo_flip=True)
    far = np.where(mis >= min_angle, r.correlation, -np.inf).max(axis=1)
    return own - np.maximum(far, -1.0)


def calibration_path():
    """Where the phase-score calibration lives: ``data/models/template_matching.json``."""
    from . import paths

    return paths.data_dir("models") / CALIBRATION_FILE


def _features(phase_corr: np.ndarray, phase_z: np.ndarray, phase_mean: np.ndarray) -> np.ndarray:
    return np.concatenate([phase_corr, phase_z, phase_corr / np.maximum(phase_mean, 1e-3)], axis=1)


def fit_phase_calibration(result: MatchResult, truth_phase: np.ndarray, library: Library) -> dict:
    """Learn the per-phase score normalisation from indexed training patterns.

    A multinomial logistic regression (scikit-learn, balanced classes) maps every
    phase's best correlation and z-score to phase probabilities.

    Parameters
    ----------
    result
        :func:`match_descriptors` of training patterns against every phase of ``library``.
    truth_phase
        (N,) true phase index (into ``library.phases``) of each pattern.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(truth_phase).ravel()
    if len(y) != len(result):
        raise ValueError(
            f"{len(y)} truth phases for {len(result)} results; expected one per pattern"
        )
    present = np.unique(y)
    if present.size < 2:
        raise ValueError(
            f"Training patterns hold only phase(s) {present.tolist()}; expected at least two phases"
        )
    x = _features(result.phase_corr, result.phase_z, result.phase_mean)
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(x, y)
    coef = np.zeros((len(library.phases), x.shape[1]))
    icpt = np.full(len(library.phases), -1e3)  # phases absent from training are never chosen
    cls = clf.classes_.astype(int)
    if len(cls) == 2:  # binary: sklearn stores one row
        coef[cls[1]], icpt[cls[1]], icpt[cls[0]] = clf.coef_[0], clf.intercept_[0], 0.0
    else:
        coef[cls], icpt[cls] = clf.coef_, clf.intercept_
    return {
        "phases": library.names,
        "coef": coef.tolist(),
        "intercept": icpt.tolist(),
        "settings": library.settings.as_dict(),
        "library": {k: library.params[k] for k in ("resolution", "max_excitation_error")},
        "train_accuracy": float(clf.score(x, y)),
        "n_train": int(len(y)),
    }


def calibrate_on_sample(sample, library: Library, show_progressbar: bool = False) -> dict:
    """Index the training patterns of a :class:`temlib.descriptors.TuningSample` and fit the phase calibration.

    The sample's phases must be the library's (by name).
    """
    names = list(sample.phases)
    if any(n not in library.names for n in names):
        raise ValueError(f"Sample phases {names} are not all in the library {library.names}")
    desc = np.zeros((len(sample), *library.settings.shape), np.float32)
    for cal in np.unique(sample.calibration):  # one camera per map
        sel = np.flatnonzero(sample.calibration == cal)
        desc[sel] = descriptors.pattern_descriptors(
            sample.patterns[sel], float(cal), sample.centers[sel], library.settings
        )
    res = match_descriptors(desc, library, normalization="none", show_progressbar=show_progressbar)
    truth = np.array([library.names.index(names[i]) for i in sample.phase_id])
    return fit_phase_calibration(res, truth, library)


def save_phase_calibration(calibration: dict, path=None):
    """Write a :func:`fit_phase_calibration` result as JSON atomically (default :func:`calibration_path`)."""
    import json
    import os
    from pathlib import Path

    p = calibration_path() if path is None else Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(calibration, indent=2))
    os.replace(tmp, p)
    return p


def load_phase_calibration(library: Library, path=None) -> dict | None:
    """The saved calibration if it was fitted for the library's phases and descriptor settings, else None."""
    import json
    from pathlib import Path

    p = calibration_path() if path is None else Path(path)
    if not p.is_file():
        return None
    try:
        cal = json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("ignoring unreadable phase calibration %s", p)
        return None
    if cal.get("phases") != library.names or cal.get("settings") != library.settings.as_dict():
        log.info("phase calibration %s was fitted for other phases or settings; using z-scores", p)
        return None
    return cal


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class MatchResult:
    """Indexing of N patterns (arrays over patterns; ``n_best`` solutions of the chosen phase).

    Attributes
    ----------
    phase_index
        (N,) index into ``library.phases`` of the chosen phase.
    quaternions
        (N, n_best, 4) orientations (sample -> crystal), best first; in-plane angle in [0, 180)
        (the best one's in [0, 360) once its beam flip is decided, :func:`flip_result`).
    correlation
        (N, n_best) cosine correlation of the solutions.
    inplane
        (N, n_best) in-plane angle (deg), sub-step refined.
    template
        (N, n_best) template index within the phase (``T + t``: template ``t`` mirrored).
    reliability
        (N,) ASTAR-style orientation reliability (0-100).
    phase_reliability
        (N,) phase reliability (0-100) from the normalised scores.
    phase_scores
        (N, P) normalised score of every phase (the phase decision takes the largest).
    phase_corr
        (N, P) best correlation of every phase.
    phase_z
        (N, P) that correlation as a z-score over the phase's templates (coarse screen).
    phase_mean
        (N, P) mean correlation over the phase's templates (coarse screen).
    flip_confidence
        (N,) how much better the best solution fits the unfolded pattern than its 180-deg
        turn about the beam (:func:`resolve_beam_flip`); None when the flip was not decided
        (the best solution's in-plane angle then lies in [0, 180)).
    """

    phase_index: np.ndarray
    quaternions: np.ndarray
    correlation: np.ndarray
    inplane: np.ndarray
    template: np.ndarray
    reliability: np.ndarray
    phase_reliability: np.ndarray
    phase_scores: np.ndarray
    phase_corr: np.ndarray
    phase_z: np.ndarray
    phase_mean: np.ndarray
    flip_confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.phase_index)

    @staticmethod
    def concatenate(parts: list[MatchResult]) -> MatchResult:
        fields = [f.name for f in dataclasses.fields(MatchResult)]
        return MatchResult(
            **{
                k: None
                if any(getattr(p, k) is None for p in parts)
                else np.concatenate([getattr(p, k) for p in parts])
                for k in fields
            }
        )

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _refine(c: np.ndarray, n_theta: int):
    """Best in-plane angle of (..., n_theta) correlations, refined below the step; (value, angle deg).

    A Gaussian (a parabola through the logarithms) through the maximum and its two
    neighbours where all three are positive (correlation peaks of Gaussian spots are
    Gaussian), else a parabola.
    """
    i0 = c.argmax(axis=-1)
    y1 = np.take_along_axis(c, i0[..., None], axis=-1)[..., 0]
    y0 = np.take_along_axis(c, ((i0 - 1) % n_theta)[..., None], axis=-1)[..., 0]
    y2 = np.take_along_axis(c, ((i0 + 1) % n_theta)[..., None], axis=-1)[..., 0]
    pos = (y0 > 0) & (y1 > 0) & (y2 > 0)
    l0, l1, l2 = (np.log(np.where(pos, v, 1.0)) for v in (y0, y1, y2))
    a0, a1, a2 = np.where(pos, l0, y0), np.where(pos, l1, y1), np.where(pos, l2, y2)
    den = a0 - 2 * a1 + a2
    delta = np.where(den < 0, 0.5 * (a0 - a2) / np.where(den < 0, den, -1), 0.0)
    delta = np.clip(delta, -0.5, 0.5)
    peak = a1 - 0.25 * (a0 - a2) * delta
    value = np.where(pos, np.exp(peak), peak)
    return np.minimum(value, 1.0), np.mod((i0 + delta) * (180.0 / n_theta), 180.0)


def _coarse_idft(k1: int) -> np.ndarray:
    """(2 k1, 2 k1) real matrix: [Re g_k, Im g_k] (k < k1) -> correlation at 2 k1 in-plane angles (= irfft)."""
    m = 2 * k1
    j = np.arange(m)[:, None]
    k = np.arange(k1)[None, :]
    c = np.where(k == 0, 1.0, 2.0) / m
    ang = 2 * np.pi * j * k / m
    return np.concatenate([c * np.cos(ang), -c * np.sin(ang)], axis=1).astype(np.float32)


def _pool(x: np.ndarray, pool: int) -> np.ndarray:
    """Sum groups of ``pool`` adjacent radial bins (last axis)."""
    if pool <= 1:
        return x
    r = x.shape[-1] // pool * pool
    return x[..., :r].reshape(*x.shape[:-1], r // pool, pool).sum(axis=-1)


def _stack_coarse(spec: np.ndarray, k1: int, pool: int = 1) -> np.ndarray:
    """(k1, 2R', 2T) float32 [[Re S, Im S], [-Im S, Re S]] of (T, K, R) spectra (radial bins pooled by
    ``pool``): a complex GEMM as a real one."""
    s = _pool(spec[:, :k1], pool).transpose(1, 2, 0)  # (k1, R', T)
    top = np.concatenate([s.real, s.imag], axis=2)
    bottom = np.concatenate([-s.imag, s.real], axis=2)
    return np.ascontiguousarray(np.concatenate([top, bottom], axis=1)).astype(np.float32)


def _phase_candidates(
    ef: np.ndarray,
    pt: PhaseTemplates,
    n_theta: int,
    k: int,
    n_keep: int | None,
    allowed: np.ndarray | None = None,
):
    """Correlate a batch with one phase; return the top-k templates and per-phase statistics.

    Two stages: a coarse screen with the ``coarse_freq`` lowest azimuthal frequencies
    for every template (one batched GEMM + a short inverse FFT), then the exact
    correlation with every frequency for the ``n_keep`` best templates of each pattern.
    ``n_keep=None`` correlates every template exactly (exhaustive search). ``allowed``
    (n, T) bool restricts each pattern to some templates (their mirror images included);
    the others score -1.
    """
    from scipy import fft

    n = ef.shape[1]
    n_t = pt.size
    ef = np.concatenate([ef, np.conj(ef)], axis=1)  # patterns, then mirrored patterns
    if n_keep is None or n_keep >= n_t:  # exhaustive
        n = ef.shape[1]
        g = np.matmul(ef[: pt.spectra.shape[1]], pt.spectra_krt())
        base = g[0].real.mean(axis=1) / n_theta
        c = fft.irfft(g, n=n_theta, axis=0)
        best = c.max(axis=0)
        keep = np.tile(np.arange(n_t), (n, 1))
        coarse = best
    else:
        k1 = pt.coarse.shape[0]
        t2 = pt.coarse.shape[2] // 2
        rr = pt.coarse.shape[1] // 2
        pool = ef.shape[2] // rr
        e1 = _pool(ef[:k1, :n], pool)
        # [Re E, Im E] @ [[A], [B]] = Re E @ A + Im E @ B; the mirrored pattern (conjugate spectrum)
        # is Re E @ A - Im E @ B: both from the same two half-size GEMMs
        p1 = np.matmul(np.ascontiguousarray(e1.real), pt.coarse[:, :rr])  # (k1, n, 2T)
        p2 = np.matmul(np.ascontiguousarray(e1.imag), pt.coarse[:, rr:])
        g = np.concatenate([p1 + p2, p1 - p2], axis=1)  # (k1, 2n, 2T): patterns, then mirrored
        n = 2 * n
        base = (
            g[0, :, :t2].mean(axis=1) / n_theta
        )  # in-plane-averaged correlation, mean over templates
        x = g.reshape(k1, n, 2, t2).transpose(2, 0, 1, 3).reshape(2 * k1, n * t2)
        coarse = (
            (_coarse_idft(k1) @ x).reshape(2 * k1, n, t2).max(axis=0)
        )  # correlation at 2 k1 angles
        keep = None
    mean = coarse.mean(axis=1)
    std = coarse.std(axis=1)
    z = (coarse.max(axis=1) - mean) / np.where(std > 0, std, 1)
    z = np.stack([z, mean, base], axis=1)
    if allowed is not None:
        allowed = np.concatenate([allowed, allowed])  # patterns, then mirrored patterns
        coarse = np.where(allowed, coarse, -np.inf)
    if keep is None:
        keep = np.argpartition(-coarse, n_keep - 1, axis=1)[:, :n_keep]
    # exact correlation of the kept templates
    e = ef.transpose(1, 0, 2)  # (n, K, R)
    kk = pt.spectra.shape[1]
    out_v = np.empty(keep.shape)
    out_a = np.empty(keep.shape)
    step = max(1, 4096 // max(keep.shape[1], 1))
    for i in range(0, n, step):
        sel = pt.spectra[keep[i : i + step]]  # (s, M, K, R)
        cm = np.einsum("skr,smkr->smk", e[i : i + step, :kk], sel, optimize=False)
        corr = fft.irfft(cm, n=n_theta, axis=-1)
        out_v[i : i + step], out_a[i : i + step] = _refine(corr, n_theta)
    if allowed is not None:
        out_v = np.where(np.take_along_axis(allowed, keep, axis=1), out_v, -1.0)
    k = min(k, keep.shape[1])
    order = np.argsort(-out_v, axis=1)[:, :k]
    return (
        np.take_along_axis(keep, order, axis=1),
        np.take_along_axis(out_v, order, axis=1),
        np.take_along_axis(out_a, order, axis=1),
        z,
    )


def _phase_scores(
    p_corr: np.ndarray, p_z: np.ndarray, p_mean: np.ndarray, mode: str, calibration: dict | None
) -> np.ndarray:
    if mode == "none":
        return p_corr
    if mode == "zscore":
        return p_z
    if mode == "ratio":
        return p_corr / np.where(p_mean > 0, p_mean, np.nan)
    x = _features(
        np.nan_to_num(p_corr, nan=0.0),
        np.nan_to_num(p_z, nan=-10.0),
        np.nan_to_num(p_mean, nan=1.0),
    )
    logits = x @ np.asarray(calibration["coef"]).T + np.asarray(calibration["intercept"])
    logits = np.where(np.isnan(p_corr), -np.inf, logits)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def match_descriptors(
    desc: np.ndarray,
    library: Library,
    n_best: int = 5,
    normalization: str = "auto",
    min_angle: float = 10.0,
    distinct_beam: bool = True,
    n_candidates: int = 80,
    n_keep: int | None = 40,
    batch: int = 64,
    phase_of=None,
    near: tuple[np.ndarray, int] | None = None,
    show_progressbar: bool = False,
) -> MatchResult:
    """Index pattern descriptors against a :class:`Library`.

    Parameters
    ----------
    desc
        (N, n_r, n_theta) pattern descriptors (same settings as the library).
    library
        :func:`build_library`.
    n_best
        Solutions kept per pattern (of the chosen phase, best first).
    normalization
        Per-phase score normalisation for the phase decision: ``"calibrated"`` (phase
        probabilities from a logistic regression on every phase's correlation and z-score,
        fitted on the training maps: :func:`fit_phase_calibration`), ``"ratio"`` (best
        correlation of a phase over its mean correlation across that phase's templates),
        ``"zscore"``, ``"none"`` (plain correlation), or ``"auto"`` (calibrated when the
        library has a calibration for its phases and settings, else none).
    min_angle
        Q2 of the reliability is the best solution at least this far (deg) from the best.
    distinct_beam
        Q2 must also have a beam direction at least ``min_angle`` away (Laue group, either
        sign): solutions that differ only by the beam reversal of a mirror-symmetric
        pattern, or by a rotation about the same beam direction, give near-identical
        kinematic patterns and are not counted as competing solutions.
    n_candidates
        Templates per phase considered for the n best and the reliability.
    n_keep
        Templates per phase and pattern kept by the coarse screen for the exact
        correlation; None: exact correlation of every template (exhaustive, slow).
    batch
        Patterns correlated at once (memory: ``n_theta * batch * T * 4`` bytes per phase).
    phase_of
        Optional (N,) phase index per pattern (into ``library.phases``) chosen elsewhere
        (a classifier); only that phase is matched. ``phase_reliability`` is then NaN.
    near
        ``(seeds, n)``: search only the ``n`` templates (and their mirror images) whose
        beam directions lie nearest to those of the (N, 4) seed orientations, e.g. a
        regressor's predictions (:func:`temlib.regress.hybrid_refine`).
    show_progressbar
        tqdm bar over batches.
    """
    from scipy import fft
    from tqdm.auto import tqdm

    desc = np.asarray(desc, np.float32)
    st = library.settings
    if desc.ndim != 3 or desc.shape[1:] != st.shape:
        raise ValueError(
            f"Descriptors of shape {desc.shape} do not fit the library; expected (N, {st.n_r}, {st.n_theta})"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}"
        )
    if n_best < 1:
        raise ValueError(f"n_best {n_best!r} must be at least 1")
    n_cand = max(n_candidates, n_best)
    n_ph = len(library.phases)
    mode = normalization
    if mode == "auto":
        mode = "calibrated" if library.phase_calibration is not None else "none"
    if mode == "calibrated" and library.phase_calibration is None:
        raise ValueError(
            "normalization='calibrated' needs a phase calibration; fit one with fit_phase_calibration or use 'zscore'"
        )

    def serial(desc, phase_of, near) -> MatchResult:
        parts = []
        for a in tqdm(
            range(0, len(desc), batch), desc="matching", unit="batch", disable=not show_progressbar
        ):
            d = desc[a : a + batch]
            n = len(d)
            ef = np.ascontiguousarray(fft.rfft(d, axis=-1).transpose(2, 0, 1)).astype(
                np.complex64
            )  # (K, n, R)
            cands = []
            p_corr = np.full((n, n_ph), np.nan)
            p_z = np.full((n, n_ph), np.nan)
            p_mean = np.full((n, n_ph), np.nan)
            p_base = np.full((n, n_ph), np.nan)
            for p, pt in enumerate(library.phases):
                rows = (
                    np.arange(n)
                    if phase_of is None
                    else np.flatnonzero(np.asarray(phase_of)[a : a + batch] == p)
                )
                if rows.size == 0:
                    cands.append(None)
                    continue
                m = rows.size
                allowed = (
                    None if near is None else pt.nearest(np.asarray(near[0])[a + rows], near[1])[0]
                )
                top, val, ang, z = _phase_candidates(
                    ef[:, rows], pt, st.n_theta, n_cand, n_keep, allowed
                )
                # mirrored descriptor matched template t at angle a <=> mirrored template t (index
                # t + T, orientation R_t * C2y) at angle -a matches the pattern itself
                top = np.concatenate([top[:m], top[m:] + pt.size], axis=1)
                ang = np.concatenate([ang[:m], np.mod(-ang[m:], 180.0)], axis=1)
                val = np.concatenate([val[:m], val[m:]], axis=1)
                z = np.stack(
                    [np.maximum(z[:m, 0], z[m:, 0]), 0.5 * (z[:m, 1] + z[m:, 1]), z[:m, 2]], axis=1
                )
                order = np.argsort(-val, axis=1)[:, :n_cand]
                top, val, ang = (np.take_along_axis(x, order, axis=1) for x in (top, val, ang))
                full = [np.zeros((n, top.shape[1]), t) for t in (np.int64, np.float64, np.float64)]
                for f_, v_ in zip(full, (top, val, ang), strict=True):
                    f_[rows] = v_
                cands.append(full)
                p_corr[rows, p] = val[:, 0]
                p_z[rows, p] = z[:, 0]
                p_mean[rows, p] = z[:, 1]
                p_base[rows, p] = z[:, 2]
            scores = _phase_scores(p_corr, p_z, p_mean, mode, library.phase_calibration)
            choice = (
                np.nan_to_num(scores, nan=-np.inf).argmax(axis=1)
                if phase_of is None
                else np.asarray(phase_of)[a : a + batch]
            )
            srt = np.sort(np.nan_to_num(scores, nan=-np.inf), axis=1)
            s1 = srt[:, -1]
            s2 = srt[:, -2] if n_ph > 1 else np.full(n, -np.inf)
            if phase_of is None and n_ph > 1:
                phase_rel = 100 * (1 - np.clip(s2, 0, None) / np.where(s1 > 0, s1, np.inf))
            else:
                phase_rel = np.full(n, np.nan)
            k = cands[next(i for i, c in enumerate(cands) if c is not None)][0].shape[1]
            tmpl = np.zeros((n, k), np.int64)
            val = np.zeros((n, k))
            ang = np.zeros((n, k))
            quat = np.zeros((n, k, 4))
            rel = np.zeros(n)
            for p, pt in enumerate(library.phases):
                rows = np.flatnonzero(choice == p)
                if rows.size == 0:
                    continue
                t_, v_, a_ = (x[rows][:, :k] for x in cands[p])
                tmpl[rows], val[rows], ang[rows] = t_, v_, a_
                q = _qmul(pt.quaternions_ext[t_], _rz(-np.radians(a_)))
                quat[rows] = q
                mis = misorientation_deg(q[:, :1], q, pt.symmetry, modulo_flip=True)  # (rows, k)
                far = mis >= min_angle
                if distinct_beam:  # also a different beam direction (Laue group, either sign)
                    far &= beam_direction_angle(q[:, :1], q, pt.symmetry) >= min_angle
                q2 = np.where(far, v_, -np.inf).max(axis=1)
                q2 = np.where(
                    np.isfinite(q2), q2, v_[:, -1]
                )  # none that far: the k-th is an upper bound
                b = p_base[rows, p]
                q1b = v_[:, 0] - b
                rel[rows] = 100 * np.clip(1 - (q2 - b) / np.where(q1b > 0, q1b, np.inf), 0, 1)
            parts.append(
                MatchResult(
                    phase_index=choice.astype(np.int64),
                    quaternions=quat[:, :n_best],
                    correlation=val[:, :n_best],
                    inplane=ang[:, :n_best],
                    template=tmpl[:, :n_best],
                    reliability=rel,
                    phase_reliability=phase_rel,
                    phase_scores=scores,
                    phase_corr=p_corr,
                    phase_z=p_z,
                    phase_mean=p_mean,
                )
            )
        if not parts:
            raise ValueError("No descriptors to match; expected at least one pattern")
        return MatchResult.concatenate(parts)

    if show_progressbar:  # one bar over the batches
        return serial(desc, phase_of, near)

    def part(d, i):  # patterns are matched independently: parts of the stack on every core
        r = serial(
            d,
            None if phase_of is None else np.asarray(phase_of)[i],
            None if near is None else (np.asarray(near[0])[i], near[1]),
        )
        return tuple(getattr(r, f.name) for f in dataclasses.fields(MatchResult)[:-1])

    return MatchResult(*_runtime.split_apply(part, desc, np.arange(len(desc)), min_part=batch))


def solution_descriptor(library: Library, result: MatchResult, i: int, rank: int = 0) -> np.ndarray:
    """(n_r, n_theta) descriptor of pattern ``i``'s solution ``rank``, turned by its in-plane angle (for display)."""
    from scipy import fft

    pt = library.phases[int(result.phase_index[i])]
    t = int(result.template[i, rank])
    spec = np.conj(pt.spectra[t % pt.size]).T  # (R, K)
    if t >= pt.size:  # mirrored template: E(r, -theta) has the conjugate spectrum
        spec = np.conj(spec)
    desc = fft.irfft(spec, n=library.settings.n_theta, axis=-1)
    shift = (
        int(round(result.inplane[i, rank] / library.settings.step_deg)) % library.settings.n_theta
    )
    return np.roll(desc, shift, axis=1)


def match_patterns(
    patterns: np.ndarray,
    calibration: float,
    library: Library,
    centers: np.ndarray | None = None,
    refine: bool | dict = False,
    **kwargs,
) -> MatchResult:
    """Index (N, ky, kx) raw patterns: descriptors (:mod:`temlib.descriptors`), :func:`match_descriptors`, then the beam flip of the best solution (:func:`flip_result`).

    ``refine``: also refine the best solution below the library step (:func:`refine_result`),
    with the relrod half-widths of a ``{phase: 1/Å}`` dict or, for True, fitted on these
    patterns (:func:`fit_result_excitation_error`; phases with fewer than
    :data:`MIN_FIT_PATTERNS` patterns keep the library's).
    """
    desc, unfolded = descriptors.pattern_descriptors(
        patterns, calibration, centers, library.settings, unfolded=True
    )
    return finish_result(
        match_descriptors(desc, library, **kwargs), desc, unfolded, library, refine
    )


def resolve_beam_flip(
    unfolded: np.ndarray,
    quaternions: np.ndarray,
    phase: Phase,
    settings: descriptors.DescriptorSettings,
    kv: float = 200.0,
    max_excitation_error: float = 0.03,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose between each orientation and the same one turned 180 deg about the beam.

    The two give the same spot *positions*, and on a flat Ewald sphere the same
    intensities, which is why the folded descriptor cannot tell them apart. Off a zone
    axis the curved sphere excites a reflection ``g`` and its Friedel mate ``-g``
    unequally (the excitation error differs by ~ lambda |g|^2 / 2 in sign-dependent
    ways: 0.02 1/Å at 1.3 1/Å and 200 kV, as large as a relrod), so one side of the
    pattern is brighter. The template of the first is drawn on the unfolded polar grid
    (the second's is the same turned by 180 deg in azimuth: the flip keeps every
    excitation error) and the one that correlates better with the pattern's unfolded
    descriptor wins.

    Parameters
    ----------
    unfolded
        (N, n_r, 2 n_theta) unfolded pattern descriptors
        (:func:`temlib.descriptors.pattern_descriptors` with ``unfolded=True``).
    quaternions
        (N, 4) orientations of one phase (sample -> crystal), e.g. the matcher's best.
    phase
        Their orix phase (with structure).
    settings, kv, max_excitation_error
        Descriptor settings, beam energy (kV) and relrod half-width (1/Å) of the templates.

    Returns
    -------
    quaternions
        (N, 4): the input or its flip, whichever fits better.
    confidence
        (N,) correlation of the chosen candidate minus that of the other (>= 0; near 0 on
        a zone axis or for a pattern without outer spots, where the pattern cannot tell).
    """
    from . import simulate

    u = np.asarray(unfolded, np.float32)
    q = np.asarray(quaternions, float).reshape(-1, 4)
    if u.ndim != 3 or len(u) != len(q) or u.shape[1:] != (settings.n_r, 2 * settings.n_theta):
        raise ValueError(
            f"Unfolded descriptors {u.shape} and orientations {q.shape} do not pair up; expected "
            f"(N, {settings.n_r}, {2 * settings.n_theta}) and (N, 4)"
        )
    if len(q) == 0:
        return q.copy(), np.zeros(0)
    refl = simulate.reflections(phase, g_max=_g_max(settings))

    def part(u_, q_):
        xy, inten, _ = simulate.kinematic_spots(
            refl, Rotation(q_), kv=kv, max_excitation_error=max_excitation_error
        )
        t = descriptors.template_descriptors(xy, inten, settings, unfolded=True)
        # the flip turns every g by 180 deg about the beam, keeping its excitation error:
        # its template is this one turned by half the azimuth bins (one simulation, not two)
        s0 = (t * u_).sum(axis=(1, 2))
        s1 = (t * np.roll(u_, settings.n_theta, axis=-1)).sum(axis=(1, 2))
        flip = s1 > s0
        return np.where(flip[:, None], _qmul(q_, RZ180), q_), np.abs(s1 - s0)

    return _runtime.split_apply(part, u, q)  # parts of the stack on every core


# --------------------------------------------------------------------------------------
# Orientation refinement below the library step
# --------------------------------------------------------------------------------------

#: Tilt steps (deg) of :func:`refine_orientations`, coarse to fine.
REFINE_STEPS = (0.5, 0.25, 0.125)
#: Relrod half-widths (1/Å) tried by :func:`fit_excitation_error`.
EXCITATION_ERRORS = (0.015, 0.0225, 0.03, 0.0375, 0.045, 0.0525, 0.06, 0.0675, 0.075)
#: Patterns of one phase needed to fit its relrod half-width on a map.
MIN_FIT_PATTERNS = 32


def _tilts(step: float) -> np.ndarray:
    """(8, 4): rotations about the sample x axis, then y, by -step, 0 or +step deg (not both 0)."""
    a, b = np.meshgrid([-step, 0.0, step], [-step, 0.0, step], indexing="ij")
    keep = (a != 0) | (b != 0)
    ha, hb = np.radians(a[keep]) / 2, np.radians(b[keep]) / 2
    zero = np.zeros_like(ha)
    qx = np.stack([np.cos(ha), np.sin(ha), zero, zero], -1)
    qy = np.stack([np.cos(hb), zero, np.sin(hb), zero], -1)
    return _qmul(qx, qy)


def _pair_correlation(spec, q, refl, settings, kv, excitation_error):
    """Correlation of each pattern with the templates of its own candidate orientations.

    ``spec`` (N, R, K) azimuthal spectra of the patterns' descriptors, ``q`` (N, M, 4)
    candidates; returns (N, M) correlations and best in-plane angles (deg), both refined
    below the azimuth step (:func:`_refine`).
    """
    from scipy import fft

    from . import simulate

    n, m, _ = q.shape
    xy, inten, _ = simulate.kinematic_spots(
        refl, Rotation(q.reshape(-1, 4)), kv=kv, max_excitation_error=excitation_error
    )
    t = descriptors.template_descriptors(xy, inten, settings).reshape(
        n, m, settings.n_r, settings.n_theta
    )
    c = np.einsum("nrk,nmrk->nmk", spec, np.conj(fft.rfft(t, axis=-1)))
    return _refine(fft.irfft(c, n=settings.n_theta, axis=-1), settings.n_theta)


def refine_orientations(
    desc: np.ndarray,
    quaternions: np.ndarray,
    phase: Phase | str,
    settings: descriptors.DescriptorSettings,
    kv: float = 200.0,
    excitation_error: float = 0.03,
    steps=REFINE_STEPS,
    moves: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Refine orientations below the library's step by simulating templates around each one.

    The library samples beam directions every ``resolution`` deg, so a matched orientation
    is off by up to half a step plus what the pattern's look moves the best template. From
    each start, templates are simulated (:func:`temlib.simulate.kinematic_spots`) at the
    eight tilts of ``step`` about the sample x and y axes (the beam direction moves, the
    in-plane angle is re-found by the FFT correlation each time) and the orientation moves
    to the best while the correlation rises (at most ``moves`` times per step), then the
    step halves: a pattern search on the correlation the matcher maximises, with
    continuous orientations.

    Parameters
    ----------
    desc
        (N, n_r, n_theta) pattern descriptors of one phase.
    quaternions
        (N, 4) start orientations (sample -> crystal), e.g. the matcher's best.
    phase
        orix phase with structure, or its name.
    settings, kv
        Descriptor settings and beam energy (kV) of the templates.
    excitation_error
        Relrod half-width (1/Å) of the templates; the map's effective value
        (:func:`fit_excitation_error`) fits best and refines best.
    steps, moves
        Tilt steps (deg, coarse to fine) and moves per step.

    Returns
    -------
    quaternions
        (N, 4) refined orientations. The folded descriptor cannot tell an orientation from
        its 180 deg turn about the beam, so the flip is whichever the in-plane search met
        first: decide it again (:func:`resolve_beam_flip`, as :func:`refine_result` does).
    correlation
        (N,) their correlation.
    """
    from scipy import fft

    from . import simulate

    desc = np.asarray(desc, np.float32)
    q = np.asarray(quaternions, float).reshape(-1, 4)
    if desc.ndim != 3 or len(desc) != len(q) or desc.shape[1:] != settings.shape:
        raise ValueError(
            f"Descriptors {desc.shape} and orientations {q.shape} do not pair up; expected "
            f"(N, {settings.n_r}, {settings.n_theta}) and (N, 4)"
        )
    if not excitation_error > 0:
        raise ValueError(f"excitation_error {excitation_error!r} must be > 0 (1/Å)")
    if len(q) == 0:
        return q.copy(), np.zeros(0)
    phase = crystal.get_phase(phase) if isinstance(phase, str) else phase
    refl = simulate.reflections(phase, g_max=_g_max(settings))

    def part(d_, q_):
        spec = np.ascontiguousarray(fft.rfft(d_, axis=-1))  # (n, R, K)
        q_ = q_.copy()
        c, a = _pair_correlation(spec, q_[:, None], refl, settings, kv, excitation_error)
        best = c[:, 0]
        q_ = _qmul(q_, _rz(-np.radians(a[:, 0])))
        for step in steps:
            tilt = _tilts(step)
            active = np.arange(len(q_))
            for _ in range(moves):
                cand = _qmul(q_[active, None], tilt[None])
                c, a = _pair_correlation(spec[active], cand, refl, settings, kv, excitation_error)
                k = c.argmax(axis=1)
                ck = c[np.arange(len(active)), k]
                up = ck > best[active] + 1e-7
                moved = active[up]
                q_[moved] = _qmul(cand[up, k[up]], _rz(-np.radians(a[up, k[up]])))
                best[moved] = ck[up]
                active = moved
                if active.size == 0:
                    break
        return q_, best

    return _runtime.split_apply(part, desc, q, min_part=32)


def fit_excitation_error(
    desc: np.ndarray,
    quaternions: np.ndarray,
    phase: Phase | str,
    settings: descriptors.DescriptorSettings,
    kv: float = 200.0,
    values=EXCITATION_ERRORS,
    max_patterns: int = 128,
    rng=0,
) -> tuple[float, dict]:
    """The relrod half-width (1/Å) whose templates fit a map's patterns best.

    How far a reflection off the Ewald sphere still shows depends on the foil's thickness
    (relrods ~ 1 / t) and on precession, which a map does not record; a template drawn
    with the wrong width moves the best fit away from the true orientation (too narrow:
    spots at the pattern's rim are missing from the template and the fit tilts to bring
    them in). Each value is tried on up to ``max_patterns`` of the patterns: their
    orientations refined (:func:`refine_orientations`) with it, scored by the mean
    correlation; the best value, refined by a parabola through its neighbours, is returned
    with the curve ``{"values", "mean_correlation"}``.

    Parameters
    ----------
    desc, quaternions
        (N, n_r, n_theta) descriptors of one phase's patterns and (N, 4) start orientations.
    phase, settings, kv
        As in :func:`refine_orientations`.
    values
        Relrod half-widths tried (1/Å, increasing).
    max_patterns
        Patterns drawn (at random with ``rng``) for the fit.
    """
    desc = np.asarray(desc, np.float32)
    q = np.asarray(quaternions, float).reshape(-1, 4)
    values = np.asarray(values, float)
    if len(values) < 3 or np.any(np.diff(values) <= 0) or values[0] <= 0:
        raise ValueError(
            f"Relrod widths {values.tolist()} cannot be fitted; expected three or more positive, increasing values"
        )
    if len(desc) == 0:
        raise ValueError("No patterns to fit the relrod width on; expected at least one")
    rng = np.random.default_rng(rng)
    pick = np.sort(rng.choice(len(desc), min(max_patterns, len(desc)), replace=False))
    score = np.array(
        [
            refine_orientations(
                desc[pick], q[pick], phase, settings, kv, v, steps=REFINE_STEPS[:2]
            )[1].mean()
            for v in values
        ]
    )
    i = int(score.argmax())
    best = float(values[i])
    even = np.allclose(np.diff(values), values[1] - values[0])
    if even and 0 < i < len(values) - 1:  # parabola through the maximum and its neighbours
        y0, y1, y2 = score[i - 1 : i + 2]
        den = y0 - 2 * y1 + y2
        if den < 0:
            h = 0.5 * (values[i + 1] - values[i - 1])
            best = float(values[i] + np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5) * h)
    return best, {"values": values, "mean_correlation": score}


def fit_result_excitation_error(
    result: MatchResult, desc: np.ndarray, library: Library, min_patterns: int = MIN_FIT_PATTERNS
) -> dict:
    """``{phase: relrod half-width (1/Å)}`` fitted (:func:`fit_excitation_error`) on the best
    solutions of every phase with at least ``min_patterns`` patterns in ``result``."""
    out = {}
    for k, pt in enumerate(library.phases):
        sel = np.flatnonzero(result.phase_index == k)
        if sel.size >= min_patterns:
            out[pt.phase.name], _ = fit_excitation_error(
                desc[sel], result.quaternions[sel, 0], pt.phase, library.settings,
                kv=library.params["kv"],
            )  # fmt: skip
    return out


def refine_result(
    result: MatchResult,
    desc: np.ndarray,
    unfolded: np.ndarray,
    library: Library,
    excitation_error: dict | None = None,
) -> MatchResult:
    """Refine every pattern's best solution below the library step, in place, then its beam flip.

    :func:`refine_orientations` with the phase's relrod half-width from
    ``excitation_error`` (``{phase: 1/Å}``, e.g. :func:`fit_result_excitation_error`; the
    library's where missing); ``quaternions[:, 0]`` and ``correlation[:, 0]`` are
    replaced (``template`` and ``inplane`` still name the library match it started from),
    then :func:`flip_result` decides the flip with the same relrod.
    """
    excitation_error = excitation_error or {}
    for k, pt in enumerate(library.phases):
        sel = np.flatnonzero(result.phase_index == k)
        if sel.size:
            result.quaternions[sel, 0], result.correlation[sel, 0] = refine_orientations(
                desc[sel], result.quaternions[sel, 0], pt.phase, library.settings,
                kv=library.params["kv"],
                excitation_error=excitation_error.get(
                    pt.phase.name, library.params["max_excitation_error"]
                ),
            )  # fmt: skip
    return flip_result(result, unfolded, library, excitation_error)


def finish_result(
    result: MatchResult,
    desc: np.ndarray,
    unfolded: np.ndarray,
    library: Library,
    refine: bool | dict = False,
) -> MatchResult:
    """The beam flip of every best solution (:func:`flip_result`), after refining it below the
    library step when ``refine`` is a ``{phase: relrod half-width}`` dict or True (widths
    fitted on these patterns: :func:`fit_result_excitation_error`; :func:`refine_result`)."""
    if refine is False:
        return flip_result(result, unfolded, library)
    relrod = fit_result_excitation_error(result, desc, library) if refine is True else refine
    return refine_result(result, desc, unfolded, library, relrod)


def flip_result(
    result: MatchResult,
    unfolded: np.ndarray,
    library: Library,
    excitation_error: dict | None = None,
) -> MatchResult:
    """Decide the beam flip of every pattern's best solution in place (:func:`resolve_beam_flip`).

    The best solution's quaternion and in-plane angle (then in [0, 360)) are replaced by
    the better of the pair, ``flip_confidence`` is set; the other n-best solutions keep
    their angle in [0, 180) (their flip is :func:`beam_flip`). The templates of the
    decision have the phase's relrod half-width from ``excitation_error`` (``{phase:
    1/Å}``), the library's where missing.
    """
    excitation_error = excitation_error or {}
    conf = np.zeros(len(result))
    for k, pt in enumerate(library.phases):
        sel = np.flatnonzero(result.phase_index == k)
        if sel.size == 0:
            continue
        q0 = result.quaternions[sel, 0]
        q1, conf[sel] = resolve_beam_flip(
            unfolded[sel],
            q0,
            pt.phase,
            library.settings,
            kv=library.params["kv"],
            max_excitation_error=excitation_error.get(
                pt.phase.name, library.params["max_excitation_error"]
            ),
        )
        flipped = np.abs((q1 * q0).sum(-1)) < 0.5  # turned by 180 deg: orthogonal quaternions
        result.quaternions[sel, 0] = q1
        result.inplane[sel, 0] = np.mod(result.inplane[sel, 0] + 180.0 * flipped, 360.0)
    result.flip_confidence = conf
    return result


# --------------------------------------------------------------------------------------
# Results as orix CrystalMap
# --------------------------------------------------------------------------------------


def to_crystal_map(
    result: MatchResult,
    library: Library,
    shape: tuple[int, int],
    step: float = 1.0,
    scan_unit: str = "px",
    phase_ids: dict[str, int] | None = None,
):
    """An orix ``CrystalMap`` of a :class:`MatchResult` over a (rows, cols) scan.

    Rotations hold the ``n_best`` solutions per point (best first). Properties:
    ``correlation``, ``reliability``, ``phase_reliability``, ``inplane`` (deg), ``template``
    (best template index) and ``correlation_nbest`` / ``inplane_nbest`` (N, n_best).

    Parameters
    ----------
    phase_ids
        Phase name -> id in the map (default: the steel ids 0, 1, 2 where the names are
        steel phases, else the library order).
    """
    from orix.crystal_map import CrystalMap, PhaseList

    h, w = shape
    if len(result) != h * w:
        raise ValueError(f"{len(result)} results do not fill a {h}x{w} scan; expected {h * w}")
    names = library.names
    if phase_ids is None:
        steel = {n: i for i, n in enumerate(crystal.STEEL_PHASES)}
        phase_ids = (
            {n: steel[n] for n in names}
            if all(n in steel for n in names)
            else {n: i for i, n in enumerate(names)}
        )
    ids = np.array([phase_ids[n] for n in names])
    plist = PhaseList(
        phases=[
            crystal.get_phase(n) if n in crystal.phase_names() else p.phase
            for n, p in zip(names, library.phases, strict=True)
        ],
        ids=list(ids),
    )
    rr, cc = np.mgrid[0:h, 0:w]
    q = result.quaternions if result.quaternions.shape[1] > 1 else result.quaternions[:, 0]
    return CrystalMap(
        rotations=Rotation(q),
        phase_id=ids[result.phase_index],
        x=cc.ravel() * step,
        y=rr.ravel() * step,
        phase_list=plist,
        prop={
            "correlation": result.correlation[:, 0].astype(float),
            "reliability": result.reliability.astype(float),
            "phase_reliability": np.nan_to_num(result.phase_reliability.astype(float), nan=-1.0),
            "inplane": result.inplane[:, 0].astype(float),
            "flip_confidence": (
                np.full(len(result), -1.0)
                if result.flip_confidence is None
                else result.flip_confidence.astype(float)
            ),
            "template": result.template[:, 0].astype(float),
            "correlation_nbest": result.correlation.astype(float),
            "inplane_nbest": result.inplane.astype(float),
        },
        scan_unit=scan_unit,
    )


def subset(xmap, index: np.ndarray, shape: tuple[int, int] | None = None):
    """A ``CrystalMap`` of the points ``index`` (flat scan indices) of ``xmap``, props included.

    For scoring a subset of a map (e.g. the window pyxem indexed) against the truth. The
    result is a (1, n) row, or a ``shape`` (rows, cols) grid when the points form a window
    (given in scan order).
    """
    from orix.crystal_map import CrystalMap

    index = np.asarray(index).ravel()
    n = len(index)
    if shape is not None and int(np.prod(shape)) != n:
        raise ValueError(f"{n} points do not fill a {shape} grid; expected {int(np.prod(shape))}")
    rr, cc = (
        np.unravel_index(np.arange(n), shape) if shape is not None else (np.zeros(n), np.arange(n))
    )
    rot = xmap.rotations.data.reshape(xmap.size, -1, 4)[index]
    return CrystalMap(
        rotations=Rotation(rot if rot.shape[1] > 1 else rot[:, 0]),
        phase_id=np.asarray(xmap.phase_id)[index],
        x=np.asarray(cc, dtype=float),
        y=np.asarray(rr, dtype=float),
        phase_list=xmap.phases,
        prop={k: np.asarray(v)[index] for k, v in xmap.prop.items()},
    )


def best_only(xmap):
    """A copy of ``xmap`` with only the best solution per point (for plots that take one rotation)."""
    from orix.crystal_map import CrystalMap

    rot = xmap.rotations.data.reshape(xmap.size, -1, 4)[:, 0]
    return CrystalMap(
        rotations=Rotation(rot),
        phase_id=np.asarray(xmap.phase_id),
        x=np.asarray(xmap.x),
        y=np.asarray(xmap.y),
        phase_list=xmap.phases,
        prop={k: np.asarray(v) for k, v in xmap.prop.items()},
        scan_unit=xmap.scan_unit,
    )


def save_crystal_map(xmap, path) -> list:
    """Write ``xmap`` as orix ``.h5`` and ``.ang`` (same stem), each atomically; returns the paths."""
    import os
    from pathlib import Path

    from orix import io as oio

    path = Path(path)
    if path.suffix.lower() not in (".h5", ".ang"):
        raise ValueError(f"Cannot write {path.name}; expected a .h5 (orix) file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix in (".h5", ".ang"):
        p = path.with_suffix(suffix)
        tmp = p.with_name(f".{p.stem}.tmp{os.getpid()}{suffix}")
        try:
            if suffix == ".h5":
                oio.save(tmp, xmap, overwrite=True)
            else:
                oio.save(
                    tmp, xmap, image_quality_prop="correlation", confidence_index_prop="reliability"
                )
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        out.append(p)
    return out


# --------------------------------------------------------------------------------------
# Metrics (shared with the regression notebooks)
# --------------------------------------------------------------------------------------


def _names(xmap) -> dict[int, str]:
    return {int(i): ph.name for i, ph in xmap.phases if i >= 0}


def orientation_errors(result_xmap, truth_xmap, mask: np.ndarray | None = None) -> dict:
    """Per-pixel phase and orientation errors of an indexing against the ground truth.

    Disorientations are computed with orix (``Orientation.angle_with``) under the true
    phase's point group, strictly and modulo the 180 deg beam flip (the smaller of the
    angles to ``R`` and to ``R * Rz(180)``). Only the best solution is scored.

    Parameters
    ----------
    result_xmap, truth_xmap
        orix ``CrystalMap`` of the same size; phases are matched by name.
    mask
        (N,) booleans of the pixels to score (default all).

    Returns
    -------
    dict of (N,) arrays: ``truth`` / ``pred`` (phase names), ``phase_ok``, ``strict`` and
    ``modulo_flip`` (deg; NaN where the phase is wrong or unscored), ``weight`` (truth's
    mixing weight if present, else 1), and ``scored``.
    """
    from orix.quaternion import Orientation

    n = truth_xmap.size
    if result_xmap.size != n:
        raise ValueError(
            f"Result has {result_xmap.size} points and the truth {n}; expected the same scan"
        )
    tn, rn = _names(truth_xmap), _names(result_xmap)
    truth_name = np.array([tn.get(int(i), "none") for i in truth_xmap.phase_id])
    pred_name = np.array([rn.get(int(i), "none") for i in result_xmap.phase_id])
    scored = np.ones(n, bool) if mask is None else np.asarray(mask, bool).ravel()
    ok = (truth_name == pred_name) & scored
    strict = np.full(n, np.nan)
    flip = np.full(n, np.nan)
    rq = result_xmap.rotations.data.reshape(n, -1, 4)[:, 0]
    tq = truth_xmap.rotations.data.reshape(n, -1, 4)[:, 0]
    for name in np.unique(truth_name[ok]):
        sel = np.flatnonzero(ok & (truth_name == name))
        pg = crystal.get_phase(name).point_group if name in crystal.phase_names() else None
        a = Orientation(rq[sel], symmetry=pg)
        b = Orientation(tq[sel], symmetry=pg)
        bf = Orientation(_qmul(tq[sel], RZ180), symmetry=pg)
        strict[sel] = a.angle_with(b, degrees=True)
        flip[sel] = np.minimum(strict[sel], a.angle_with(bf, degrees=True))
    weight = (
        np.asarray(truth_xmap.prop["weight"], float) if "weight" in truth_xmap.prop else np.ones(n)
    )
    return {
        "truth": truth_name,
        "pred": pred_name,
        "phase_ok": ok,
        "strict": strict,
        "modulo_flip": flip,
        "weight": weight,
        "scored": scored,
    }


def _stats(angles: np.ndarray, prefix: str) -> dict:
    a = angles[np.isfinite(angles)]
    if a.size == 0:
        return {f"{prefix}{k}": np.nan for k in ("median", "p90", "p95", "<1", "<2", "<5", ">10")}
    return {
        f"{prefix}median": float(np.median(a)),
        f"{prefix}p90": float(np.percentile(a, 90)),
        f"{prefix}p95": float(np.percentile(a, 95)),
        f"{prefix}<1": float((a < 1).mean()),
        f"{prefix}<2": float((a < 2).mean()),
        f"{prefix}<5": float((a < 5).mean()),
        f"{prefix}>10": float((a > 10).mean()),
    }


def error_table(errors: dict, interior_only: bool = False, method: str | None = None):
    """Per-phase table of phase accuracy and disorientation statistics (strict and modulo the flip).

    Parameters
    ----------
    errors
        :func:`orientation_errors`.
    interior_only
        Score only single-crystal pixels (``weight == 1``).
    method
        Optional label added as the first column (to stack tables of several methods).

    Returns
    -------
    pandas DataFrame indexed by phase (plus ``all``): ``n``, ``phase_acc``, then ``median``,
    ``p90``, ``p95``, ``<1``, ``<2``, ``<5``, ``>10`` (fractions; angles in deg) for ``strict ``
    and ``flip `` (modulo the 180 deg beam flip), over correctly phased pixels.
    """
    import pandas as pd

    sel = errors["scored"] & ((errors["weight"] >= 0.999) if interior_only else True)
    rows = {}
    for name in [*sorted(set(errors["truth"][sel])), "all"]:
        m = sel & ((errors["truth"] == name) if name != "all" else True)
        if not m.any():
            continue
        row = {"n": int(m.sum()), "phase_acc": float(errors["phase_ok"][m].mean())}
        row.update(_stats(errors["strict"][m], "strict "))
        row.update(_stats(errors["modulo_flip"][m], "flip "))
        rows[name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    if method is not None:
        df.insert(0, "method", method)
    return df


def confusion_matrix(errors: dict, phases=None, normalize: bool = False):
    """Phase confusion matrix (rows: truth, columns: prediction) from :func:`orientation_errors`."""
    import pandas as pd

    sel = errors["scored"]
    names = (
        list(phases)
        if phases is not None
        else sorted(set(errors["truth"][sel]) | set(errors["pred"][sel]))
    )
    m = pd.crosstab(
        pd.Categorical(errors["truth"][sel], categories=names),
        pd.Categorical(errors["pred"][sel], categories=names),
        rownames=["truth"],
        colnames=["predicted"],
        dropna=False,
    )
    if normalize:
        m = m.div(m.sum(axis=1).replace(0, 1), axis=0)
    return m


def grains(
    xmap, max_angle: float = 5.0, min_size: int = 5, mask: np.ndarray | None = None
) -> np.ndarray:
    """Label grains: 4-connected pixels of one phase whose neighbours differ by < ``max_angle`` deg.

    Misorientations are taken modulo the 180 deg beam flip. Returns (rows, cols) int labels,
    -1 for pixels outside ``mask`` or in grains smaller than ``min_size``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    h, w = xmap.shape
    q = xmap.rotations.data.reshape(xmap.size, -1, 4)[:, 0].reshape(h, w, 4)
    pid = np.asarray(xmap.phase_id).reshape(h, w)
    ok = np.ones((h, w), bool) if mask is None else np.asarray(mask, bool).reshape(h, w)
    sym = {i: proper_symmetry(ph) for i, ph in xmap.phases if i >= 0}
    src, dst = [], []
    flat = np.arange(h * w).reshape(h, w)
    for a, b in (
        ((slice(None), slice(0, -1)), (slice(None), slice(1, None))),
        ((slice(0, -1), slice(None)), (slice(1, None), slice(None))),
    ):
        same = (pid[a] == pid[b]) & ok[a] & ok[b]
        for i, s_ in sym.items():
            m = same & (pid[a] == i)
            if m.any():
                d = misorientation_deg(q[a][m], q[b][m], s_, modulo_flip=True)
                src.append(flat[a][m][d < max_angle])
                dst.append(flat[b][m][d < max_angle])
    src = np.concatenate(src) if src else np.zeros(0, int)
    dst = np.concatenate(dst) if dst else np.zeros(0, int)
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(h * w, h * w))
    _, lab = connected_components(graph, directed=False)
    lab = np.where(ok.ravel(), lab, -1)
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    small = np.isin(lab, ids[counts < min_size])
    lab = np.where(small, -1, lab)
    _, inv = np.unique(lab, return_inverse=True)
    out = inv - (1 if (lab < 0).any() else 0)
    return out.reshape(h, w)


def grain_spread(xmap, labels: np.ndarray, other=None):
    """Per-grain orientation spread (and agreement with another indexing of the same map).

    Parameters
    ----------
    xmap
        An indexing (orix ``CrystalMap``).
    labels
        (rows, cols) grain labels (:func:`grains`), -1 ignored.
    other
        Optional second indexing of the same scan (e.g. pyxem's) to compare with.

    Returns
    -------
    pandas DataFrame per grain: ``phase``, ``n``, ``spread_median`` / ``spread_p90`` (deg,
    disorientation of each pixel to the grain's most reliable pixel, modulo the flip) and,
    with ``other``, ``agree_median`` (deg) and ``agree_<5`` (fraction within 5 deg).
    """
    import pandas as pd

    q = xmap.rotations.data.reshape(xmap.size, -1, 4)[:, 0]
    pid = np.asarray(xmap.phase_id)
    rel = np.asarray(xmap.prop.get("reliability", np.ones(xmap.size)))
    lab = np.asarray(labels).ravel()
    names = _names(xmap)
    if other is not None:
        q2 = other.rotations.data.reshape(other.size, -1, 4)[:, 0]
    rows = []
    for g in np.unique(lab[lab >= 0]):
        sel = np.flatnonzero(lab == g)
        p = int(pid[sel[0]])
        ph = xmap.phases[p]
        sym = proper_symmetry(ph)
        ref = q[sel[np.argmax(rel[sel])]]
        d = misorientation_deg(ref[None], q[sel], sym, modulo_flip=True)
        row = {
            "grain": int(g),
            "phase": names[p],
            "n": int(len(sel)),
            "spread_median": float(np.median(d)),
            "spread_p90": float(np.percentile(d, 90)),
        }
        if other is not None:
            a = misorientation_deg(q[sel], q2[sel], sym, modulo_flip=True)
            row["agree_median"] = float(np.median(a))
            row["agree_<5"] = float((a < 5).mean())
        rows.append(row)
    cols = ["grain", "phase", "n", "spread_median", "spread_p90"] + (
        ["agree_median", "agree_<5"] if other is not None else []
    )
    return pd.DataFrame(rows, columns=cols).set_index("grain")


def reliability_curve(
    errors: dict, reliability: np.ndarray, n_bins: int = 8, column: str = "modulo_flip"
):
    """Error against reliability: per reliability quantile bin, the median error and the fraction > 5 deg.

    Pixels with a wrong phase count as errors of 180 deg.
    """
    import pandas as pd

    rel = np.asarray(reliability, float)
    sel = errors["scored"] & np.isfinite(rel)
    err = np.where(errors["phase_ok"], errors[column], 180.0)[sel]
    rel = rel[sel]
    edges = np.unique(np.quantile(rel, np.linspace(0, 1, n_bins + 1)))
    b = np.clip(np.searchsorted(edges, rel, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for i in range(len(edges) - 1):
        m = b == i
        if m.any():
            rows.append(
                {
                    "reliability_lo": edges[i],
                    "reliability_hi": edges[i + 1],
                    "n": int(m.sum()),
                    "median_error": float(np.median(err[m])),
                    "frac_gt5": float((err[m] > 5).mean()),
                }
            )
    return pd.DataFrame(rows)


def agreement_table(
    q_a: np.ndarray,
    q_b: np.ndarray,
    phase: Phase,
    reliability: np.ndarray,
    edges=(0, 5, 10, 15, 20, 25, 100),
):
    """How two indexings of the same patterns agree, by the reliability of the first.

    Without ground truth (a real map), agreement between two independent matchers on the
    patterns one of them finds unambiguous is the check that is left; on ambiguous patterns
    (vacuum, a single systematic row, overlapping crystals) disagreement is expected.

    Parameters
    ----------
    q_a, q_b
        (N, 4) best orientations of each method (sample -> crystal).
    phase
        The orix phase both indexed (its Laue group decides the disorientation).
    reliability
        (N,) reliability (0-100) of method a, which the rows bin.
    edges
        Reliability bin edges.

    Returns
    -------
    pandas DataFrame per reliability bin: ``n``, ``agree_median`` (deg, modulo the beam
    flip), ``agree_<2``, ``agree_<5`` (fractions), plus an ``all`` row.
    """
    import pandas as pd

    q_a = np.asarray(q_a, float).reshape(-1, 4)
    q_b = np.asarray(q_b, float).reshape(-1, 4)
    rel = np.asarray(reliability, float).ravel()
    if not (len(q_a) == len(q_b) == len(rel)):
        raise ValueError(
            f"{len(q_a)} and {len(q_b)} orientations for {len(rel)} reliabilities; expected one each"
        )
    d = misorientation_deg(q_a, q_b, proper_symmetry(phase), modulo_flip=True)
    rows = []
    bins = list(zip(edges[:-1], edges[1:], strict=True)) + [(-np.inf, np.inf)]
    for lo, hi in bins:
        m = (rel >= lo) & (rel < hi)
        label = "all" if np.isinf(lo) else f"{lo:g}-{hi:g}"
        rows.append(
            {
                "reliability": label,
                "n": int(m.sum()),
                "agree_median": float(np.median(d[m])) if m.any() else np.nan,
                "agree_<2": float((d[m] < 2).mean()) if m.any() else np.nan,
                "agree_<5": float((d[m] < 5).mean()) if m.any() else np.nan,
            }
        )
    return pd.DataFrame(rows).set_index("reliability")


# --------------------------------------------------------------------------------------
# The peer: pyxem 0.21 get_orientation on the same library and data
# --------------------------------------------------------------------------------------


def pyxem_index(
    patterns: np.ndarray,
    calibration: float,
    library: Library,
    centers: np.ndarray | None = None,
    gamma: float = 0.5,
    npt: int | None = None,
    npt_azim: int = 360,
    n_best: int = 2,
    frac_keep: float = 1.0,
) -> tuple[MatchResult, dict]:
    """Index patterns with pyxem 0.21 ``get_orientation`` on the same template library.

    The patterns are first centred on their direct beam (:func:`temlib.io.resample` at
    their own calibration; this step is not timed), then pyxem's documented sequence runs:
    ``get_azimuthal_integral2d(npt, npt_azim, mean=True)`` up to the library's ``r_max``,
    ``polar ** gamma``, ``get_orientation(simulation, n_best, frac_keep)`` with one
    diffsims ``Simulation2D`` holding every phase of the library.

    Returns
    -------
    result
        A :class:`MatchResult` (phase, orientations, correlations; reliabilities from
        pyxem's two best correlations of the chosen phase).
    info
        ``seconds`` (integration + matching, wall clock), ``cpu_seconds`` (process CPU time),
        ``patterns_per_s``.
    """
    import hyperspy.api as hs  # noqa: F401
    import pyxem as pxm
    from diffsims.generators.simulation_generator import SimulationGenerator

    from . import io, simulate

    p = np.asarray(patterns, np.float32)
    n, ky, kx = p.shape
    if centers is None:
        centers = io.find_direct_beam(p)
    size = min(ky, kx)
    centred = io.resample(p, centers, calibration, calibration, size=size)
    st = library.settings
    libs = [
        simulate.template_library(
            pt.phase.name,
            resolution=library.params["resolution"],
            kv=library.params["kv"],
            max_excitation_error=library.params["max_excitation_error"],
            reciprocal_radius=max(1.5, float(np.ceil((st.r_max + 3 * st.sigma) * 10) / 10)),
        )
        for pt in library.phases
    ]
    gen = SimulationGenerator(library.params["kv"], minimum_intensity=1e-4)
    sim = gen.calculate_diffraction2d(
        [lb.phase for lb in libs],
        rotation=[lb.rotations for lb in libs],
        reciprocal_radius=libs[0].params["reciprocal_radius"],
        max_excitation_error=library.params["max_excitation_error"],
        with_direct_beam=False,
    )
    sig = pxm.signals.ElectronDiffraction2D(centred.reshape(1, n, size, size))
    for ax in sig.axes_manager.signal_axes:
        ax.scale, ax.units, ax.offset = calibration, "1/Å", -calibration * (size / 2)
    npt = npt or int(round(st.r_max / calibration))
    t0, c0 = time.perf_counter(), time.process_time()
    polar = sig.get_azimuthal_integral2d(
        npt=npt, npt_azim=npt_azim, mean=True, radial_range=(0.0, st.r_max), show_progressbar=False
    )
    polar = polar**gamma
    om = polar.get_orientation(
        sim, n_best=max(n_best, 2), frac_keep=frac_keep, show_progressbar=False
    )
    om.compute() if getattr(om, "_lazy", False) else None
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    data = np.asarray(om.data).reshape(
        n, -1, 4
    )  # (template index, correlation, in-plane deg, mirror)
    index = data[:, :n_best, 0].astype(np.int64)
    starts = np.cumsum([0] + [lb.size for lb in libs])
    phase_idx = np.searchsorted(starts, index, side="right") - 1  # (n, n_best) into library.phases
    local = index - starts[phase_idx]
    q_all = np.concatenate([lb.rotations.data for lb in libs])
    # pyxem's in-plane angle alpha: the orientation is R_template * Rz(+alpha) (checked on planted
    # patterns in tests/test_match.py; pyxem's own to_crystal_map() disagrees for mirrored matches)
    quat = _qmul(q_all[index], _rz(np.radians(data[:, :n_best, 2])))
    corr = data[:, :, 1]
    rel = 100 * (1 - np.clip(corr[:, 1], 0, None) / np.where(corr[:, 0] > 0, corr[:, 0], np.inf))
    result = MatchResult(
        phase_index=phase_idx[:, 0],
        quaternions=quat,
        correlation=corr[:, :n_best],
        inplane=np.mod(data[:, :n_best, 2], 360.0),
        template=local,
        reliability=rel,
        phase_reliability=np.full(n, np.nan),
        phase_scores=np.full((n, len(library.phases)), np.nan),
        phase_corr=np.full((n, len(library.phases)), np.nan),
        phase_z=np.full((n, len(library.phases)), np.nan),
        phase_mean=np.full((n, len(library.phases)), np.nan),
    )
    return result, {"seconds": seconds, "cpu_seconds": cpu_seconds, "patterns_per_s": n / seconds}
