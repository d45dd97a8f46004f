"""Per-phase orientation regression from polar descriptors, and the online ML / hybrid indexer.

Regression
    One network per phase (found by AutoKeras architecture search, :func:`search`) maps a
    pattern's polar intensity descriptor (:mod:`temlib.descriptors`, (n_r, n_theta) over
    azimuth [0, 180)) to its orientation. Euler angles are what people read but a bad
    target: crystal symmetry makes 24 (cubic) Euler triplets describe one orientation and
    the angles wrap around. The network instead outputs the continuous 6D representation
    (the first two columns of the rotation matrix, Gram-Schmidt orthonormalised, Zhou et
    al. CVPR 2019) and is trained with :class:`SymmetricRotationLoss`, the chordal distance
    to the *nearest* of the symmetry-equivalent true orientations ``S R`` and their beam
    flips ``S R Rz(180)`` (kinematic patterns of ``R`` and ``R Rz(180)`` are identical).
    Predictions are reported as orix orientations reduced to the fundamental zone (Bunge
    Euler angles through orix). :func:`train_euler_baseline` trains the same architecture
    on raw Euler angles with a mean squared error, to measure what the symmetry-aware
    target buys.
Training data
    :func:`synthetic_set` draws orientations uniformly over SO(3), computes kinematic spots
    with randomised relrod width, intensity compression, per-reflection intensity noise,
    spot drop-out and spot width (domain randomisation, so the regressor does not learn
    one simulator's look), draws the descriptors with :func:`temlib.descriptors.template_descriptors`
    and adds in-plane rotations as circular shifts of the descriptor (label ``R Rz(-phi)``).
    :func:`rendered_set` adds camera-like rendered patterns (:mod:`temlib.synth`, a new
    random camera per batch) pushed through the same front end as real patterns; the mix of
    two generators guards against learning one simulator's look. :func:`real_set` takes descriptors of real patterns from the training maps with labels
    from the ground truth (synthetic maps) or a reference indexing; :func:`fine_tune`
    continues training on them (mixed with synthetic data so the rest of the fundamental
    zone is not forgotten).
Online indexing
    :func:`index_patterns` runs the per-pattern pipeline: phase from the classifier
    (:mod:`temlib.classify`) or given, then the phase's branch: ``"ml"`` (the regressor),
    ``"tm"`` (full template matching, :mod:`temlib.match`) or ``"hybrid"``
    (:func:`hybrid_refine`: template matching restricted to the templates whose beam
    directions lie near the regressor's; patterns whose local match is unreliable fall back
    to the full search; neighbourhood and fallback threshold sized together per phase by
    :func:`calibrate_hybrid`). :func:`index_map` indexes a
    map read by :mod:`temlib.io` into an orix ``CrystalMap``; :func:`index_stream` indexes
    patterns as they arrive (a Python iterator, a folder of chunk files, a growing raw
    frame file) and calls back with the partial map (a live notebook display:
    :func:`live_display`).

The front end is the one of template matching (:func:`temlib.io.find_direct_beam`,
:func:`temlib.descriptors.pattern_descriptors`); its direct-beam centres are shared with
the classifier.

Conventions as :mod:`temlib.match`: a rotation maps sample to crystal; the beam is the
sample z axis; a template turned by ``phi`` about the beam is ``R_template Rz(-phi)``.
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
from pathlib import Path

import numpy as np
from orix.quaternion import Orientation, Rotation

from . import _runtime, crystal, descriptors, io, paths

log = logging.getLogger(__name__)

METHODS = ("ml", "hybrid", "tm")
TARGETS = ("6d", "euler")
MODEL_FILE = "model.keras"
METADATA_FILE = "regressor.json"
RZ180 = np.array([0.0, 0.0, 0.0, 1.0])


# --------------------------------------------------------------------------------------
# Rotation representations (numpy)
# --------------------------------------------------------------------------------------


def quaternions_to_matrices(q: np.ndarray) -> np.ndarray:
    """(N, 4) unit quaternions (w, x, y, z) -> (N, 3, 3) rotation matrices."""
    q = np.asarray(q, float).reshape(-1, 4)
    return Rotation(q).to_matrix().reshape(-1, 3, 3)


def matrices_to_quaternions(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotation matrices -> (N, 4) unit quaternions with w >= 0."""
    q = Rotation.from_matrix(np.asarray(m, float).reshape(-1, 3, 3)).data
    return q * np.where(q[:, :1] < 0, -1, 1)


def to_6d(q: np.ndarray) -> np.ndarray:
    """(N, 4) quaternions -> (N, 6) continuous representation: matrix columns 0 and 1."""
    m = quaternions_to_matrices(q)
    return np.concatenate([m[:, :, 0], m[:, :, 1]], axis=1).astype(np.float32)


def from_6d(x: np.ndarray) -> np.ndarray:
    """(N, 6) -> (N, 3, 3) rotation matrices by Gram-Schmidt (columns b1, b2, b1 x b2)."""
    x = np.asarray(x, float).reshape(-1, 6)
    a1, a2 = x[:, :3], x[:, 3:]
    b1 = a1 / np.maximum(np.linalg.norm(a1, axis=1, keepdims=True), 1e-12)
    b2 = a2 - (b1 * a2).sum(1, keepdims=True) * b1
    b2 /= np.maximum(np.linalg.norm(b2, axis=1, keepdims=True), 1e-12)
    return np.stack([b1, b2, np.cross(b1, b2)], axis=2)


def qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (..., 4) quaternions, broadcasting."""
    from . import match

    return match._qmul(np.asarray(a, float), np.asarray(b, float))


def rz(angle_deg: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions of rotations by ``angle_deg`` (deg) about the beam (z)."""
    a = np.radians(np.asarray(angle_deg, float)) / 2
    z = np.zeros_like(a)
    return np.stack([np.cos(a), z, z, np.sin(a)], axis=-1)


def proper_symmetry(phase) -> np.ndarray:
    """(S, 4) proper rotations of the Laue group of ``phase`` (name or orix Phase)."""
    from . import match

    return match.proper_symmetry(crystal.get_phase(phase) if isinstance(phase, str) else phase)


def equivalent_transforms(phase, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left and right matrices of every orientation equivalent to ``R``: ``L_k R F_k``.

    ``L`` runs over the proper symmetry rotations of the crystal, ``F`` over the identity
    and (``flip``) the half turn about the beam.

    Returns
    -------
    left, right
        (K, 3, 3) each, K = S (x 2 with the flip).
    """
    s = quaternions_to_matrices(proper_symmetry(phase))
    flips = [np.eye(3)] + ([quaternions_to_matrices(RZ180[None])[0]] if flip else [])
    left = np.concatenate([s for _ in flips])
    right = np.concatenate([np.repeat(f[None], len(s), axis=0) for f in flips])
    return left.astype(np.float32), right.astype(np.float32)


def disorientation_deg(
    q1: np.ndarray, q2: np.ndarray, phase, modulo_flip: bool = False
) -> np.ndarray:
    """(N,) disorientation (deg) between (N, 4) orientations under the phase's proper symmetry."""
    from . import match

    return match.misorientation_deg(q1, q2, proper_symmetry(phase), modulo_flip=modulo_flip)


def reduce_to_fundamental_zone(q: np.ndarray, phase) -> Orientation:
    """orix ``Orientation`` of (N, 4) quaternions with the phase's symmetry, in the fundamental zone.

    The fundamental-zone representative is the equivalent ``s q`` (``s`` a proper symmetry
    rotation) with the smallest rotation angle, the largest ``|w|``: orix's
    ``Orientation.reduce()`` numbers (same sign), picked in one vectorised step instead of
    its loop over symmetry elements and region tests (2-3.5x faster).
    """
    ph = crystal.get_phase(phase) if isinstance(phase, str) else phase
    q = np.asarray(q, float).reshape(-1, 4)
    eq = qmul(proper_symmetry(ph)[:, None, :], q[None])  # (S, N, 4)
    best = np.abs(eq[..., 0]).argmax(axis=0)
    return Orientation(eq[best, np.arange(len(q))], symmetry=ph.point_group)


def euler_targets(q: np.ndarray, phase) -> np.ndarray:
    """(N, 3) Bunge Euler angles (rad) of the fundamental-zone representatives (the naive target)."""
    return reduce_to_fundamental_zone(q, phase).to_euler().astype(np.float32)


# --------------------------------------------------------------------------------------
# The symmetry-aware loss (Keras)
# --------------------------------------------------------------------------------------


@functools.cache
def _loss_class():
    keras = _runtime.keras()

    @keras.saving.register_keras_serializable(package="temlib")
    class SymmetricRotationLoss(keras.losses.Loss):
        """Chordal distance from the predicted rotation to the nearest equivalent true one.

        ``y_true`` and ``y_pred`` are (B, 6) (:func:`to_6d`); both are turned into rotation
        matrices by Gram-Schmidt; the loss is ``min_k sqrt(|P - L_k R F_k|_F^2 + eps)``
        (``= 2 sqrt(2) sin(theta_k / 2)``, about ``1.41 theta`` for small angles) over the
        K equivalent transforms (:func:`equivalent_transforms`). It is zero when the
        prediction is any symmetry-equivalent (or beam-flipped) copy of the truth.
        """

        def __init__(
            self, left=None, right=None, eps: float = 1e-6, name="symmetric_rotation_loss", **kwargs
        ):
            super().__init__(name=name, **kwargs)
            self.left_list = np.asarray(
                left if left is not None else np.eye(3)[None], np.float32
            ).tolist()
            self.right_list = np.asarray(
                right if right is not None else np.eye(3)[None], np.float32
            ).tolist()
            self.eps = float(eps)
            self._left = np.asarray(self.left_list, np.float32)
            self._right = np.asarray(self.right_list, np.float32)

        def call(self, y_true, y_pred):
            ops = keras.ops
            p = _gram_schmidt(ops, y_pred)
            r = _gram_schmidt(ops, ops.cast(y_true, y_pred.dtype))
            left = ops.convert_to_tensor(self._left, dtype=y_pred.dtype)
            right = ops.convert_to_tensor(self._right, dtype=y_pred.dtype)
            c = ops.einsum("kil,blm,kmj->bkij", left, r, right)  # (B, K, 3, 3) equivalents
            tr = ops.einsum("bij,bkij->bk", p, c)
            d2 = ops.maximum(6.0 - 2.0 * ops.max(tr, axis=1), 0.0)
            return ops.sqrt(d2 + self.eps)

        def get_config(self):
            return {
                **super().get_config(),
                "left": self.left_list,
                "right": self.right_list,
                "eps": self.eps,
            }

    return SymmetricRotationLoss


def _gram_schmidt(ops, x):
    a1, a2 = x[:, :3], x[:, 3:6]
    b1 = a1 / ops.sqrt(ops.sum(a1 * a1, axis=1, keepdims=True) + 1e-12)
    b2 = a2 - ops.sum(b1 * a2, axis=1, keepdims=True) * b1
    b2 = b2 / ops.sqrt(ops.sum(b2 * b2, axis=1, keepdims=True) + 1e-12)
    b3 = ops.cross(b1, b2)
    return ops.stack([b1, b2, b3], axis=2)


def symmetric_loss(phase, flip: bool = True, eps: float = 1e-6):
    """A :class:`SymmetricRotationLoss` for ``phase`` (name or orix Phase)."""
    left, right = equivalent_transforms(phase, flip)
    return _loss_class()(left=left, right=right, eps=eps)


# --------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Randomization:
    """Ranges of the domain randomisation of :func:`synthetic_set` (drawn per orientation).

    Attributes
    ----------
    excitation
        Relrod half-width range (1/Å), about 1 / thickness.
    intensity_gamma
        Spot intensities become ``I ** gamma`` (dynamical compression), gamma in this range.
    intensity_noise
        Log-normal sigma of a factor per spot.
    spot_dropout
        Fraction of spots removed at random.
    sigma
        Range of the drawn spot width (1/Å) (real spots are widened by the camera's PSF).
    n_spots
        Range of the number of strongest spots drawn.
    template_gamma
        Range of the spot-weight exponent of the drawing.
    noise
        Gaussian noise added to the descriptor (relative to its mean), before normalising.
    precession_deg
        Precession angles drawn uniformly in this range (deg).
    """

    excitation: tuple[float, float] = (0.025, 0.08)
    intensity_gamma: tuple[float, float] = (0.5, 1.0)
    intensity_noise: float = 0.3
    spot_dropout: float = 0.1
    sigma: tuple[float, float] = (0.015, 0.045)
    n_spots: tuple[int, int] = (20, 80)
    template_gamma: tuple[float, float] = (0.3, 0.8)
    noise: float = 0.5
    precession_deg: tuple[float, float] = (0.0, 1.0)


def shift_augment(
    desc: np.ndarray, q: np.ndarray, n_shifts: int = 1, rng=None
) -> tuple[np.ndarray, np.ndarray]:
    """In-plane rotations as circular shifts of the descriptors, with their labels.

    A descriptor shifted by ``k`` azimuth bins is the descriptor of the crystal turned by
    ``phi = k * step`` about the beam, i.e. of orientation ``R Rz(-phi)``.

    Parameters
    ----------
    desc
        (N, n_r, n_theta) descriptors.
    q
        (N, 4) their orientations.
    n_shifts
        Random shifts per descriptor.

    Returns
    -------
    (N n_shifts, n_r, n_theta) descriptors and (N n_shifts, 4) orientations.
    """
    rng = np.random.default_rng(rng)
    desc = np.asarray(desc, np.float32)
    n_theta = desc.shape[-1]
    k = rng.integers(0, n_theta, size=(len(desc), n_shifts))
    idx = (np.arange(n_theta)[None, None, :] - k[:, :, None]) % n_theta  # out[j] = in[j - k]
    out = np.take_along_axis(
        desc[:, None], idx[:, :, None, :].repeat(desc.shape[1], axis=2), axis=3
    )
    labels = qmul(np.asarray(q, float)[:, None], rz(-k * 180.0 / n_theta))
    return out.reshape(-1, *desc.shape[1:]), labels.reshape(-1, 4)


def synthetic_set(
    phase: str,
    n: int,
    settings: descriptors.DescriptorSettings | None = None,
    kv: float = 200.0,
    randomization: Randomization | None = None,
    n_shifts: int = 4,
    batch: int = 512,
    rng=None,
    show_progressbar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of simulated patterns over the whole orientation space, with labels.

    Orientations are uniform over SO(3) (so every part of the fundamental zone is covered
    and the symmetric loss needs no reduction); each orientation's kinematic spots are
    randomised (:class:`Randomization`) and drawn as a descriptor, then ``n_shifts``
    in-plane rotations are added as circular shifts (:func:`shift_augment`).

    Parameters
    ----------
    phase
        Phase name.
    n
        Descriptors returned (``n / n_shifts`` orientations simulated).
    settings
        Descriptor settings (default the tuned ones).

    Returns
    -------
    desc
        (n, n_r, n_theta) float32.
    q
        (n, 4) orientations (sample -> crystal).
    """
    from tqdm.auto import tqdm

    from . import simulate, synth

    if n < 1:
        raise ValueError(f"Training-set size {n!r} must be a positive number of descriptors")
    settings = descriptors.load_settings() if settings is None else settings
    rnd = randomization or Randomization()
    rng = np.random.default_rng(rng)
    n_orient = int(np.ceil(n / n_shifts))
    refl = simulate.reflections(phase, g_max=float(settings.r_max + 3 * rnd.sigma[1]))
    q = synth.random_quaternions(n_orient, rng)
    out = np.empty((n_orient, *settings.shape), np.float32)
    for a in tqdm(
        range(0, n_orient, batch), desc=f"simulating {phase}", disable=not show_progressbar
    ):
        qb = q[a : a + batch]
        m = len(qb)
        exc = rng.uniform(*rnd.excitation, size=m)
        prec = float(rng.uniform(*rnd.precession_deg))
        xy, inten, _ = simulate.kinematic_spots(
            refl,
            Rotation(qb),
            kv=kv,
            max_excitation_error=exc,
            precession_deg=prec,
            max_spots=2 * rnd.n_spots[1],
        )
        g = rng.uniform(*rnd.intensity_gamma, size=(m, 1))
        inten = np.where(inten > 0, inten, 0) ** g * np.exp(
            rng.normal(0, rnd.intensity_noise, size=inten.shape)
        )
        inten = np.where(rng.random(inten.shape) < rnd.spot_dropout, 0, inten) * (inten > 0)
        drawn = settings.replace(
            sigma=float(rng.uniform(*rnd.sigma)),
            n_spots=int(rng.integers(rnd.n_spots[0], rnd.n_spots[1] + 1)),
            template_gamma=float(rng.uniform(*rnd.template_gamma)),
        )
        d = descriptors.template_descriptors(xy, inten, drawn)
        if rnd.noise > 0:
            mean = d.mean(axis=(1, 2), keepdims=True)
            d = np.clip(
                d
                + rng.normal(0, 1, d.shape).astype(np.float32)
                * rnd.noise
                * mean
                * rng.random((m, 1, 1)),
                0,
                None,
            )
            d = descriptors._finish(d, settings.zero_mean)
        out[a : a + m] = d
    desc, labels = shift_augment(out, q, n_shifts, rng)
    return desc[:n], labels[:n]


def rendered_set(
    phase: str,
    n: int,
    settings: descriptors.DescriptorSettings | None = None,
    kv: float = 200.0,
    batch: int = 500,
    n_shifts: int = 1,
    thickness_nm: tuple[float, float] = (30.0, 120.0),
    rng=None,
    show_progressbar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of camera-like rendered patterns at random orientations, with labels.

    Each batch draws a new camera look (:func:`temlib.synth.random_camera`: PSF, noise,
    background, precession, calibration), a thickness and beam-centre offsets, renders the
    patterns (:func:`temlib.synth.simulate_patterns`) and computes their descriptors with
    the same front end as real patterns (:func:`temlib.descriptors.pattern_descriptors`). This closes most of the
    gap between drawn templates and real descriptors; mixing it with :func:`synthetic_set`
    (another generator) keeps the regressor from learning one simulator's look.

    Returns
    -------
    (n * n_shifts, n_r, n_theta) descriptors and their (n * n_shifts, 4) orientations.
    """
    from tqdm.auto import tqdm

    from . import synth

    settings = descriptors.load_settings() if settings is None else settings
    rng = np.random.default_rng(rng)
    q = synth.random_quaternions(n, rng)
    out = np.empty((n, *settings.shape), np.float32)
    for a in tqdm(range(0, n, batch), desc=f"rendering {phase}", disable=not show_progressbar):
        qb = q[a : a + batch]
        cam = synth.random_camera(rng, kv=kv)
        centers = cam.center + rng.uniform(-3, 3, size=(len(qb), 2))
        pats = synth.simulate_patterns(
            phase, Rotation(qb), cam, float(rng.uniform(*thickness_nm)), centers, rng
        )
        out[a : a + len(qb)] = descriptors.pattern_descriptors(
            pats, cam.calibration, None, settings
        )
    if n_shifts > 1:
        return shift_augment(out, q, n_shifts, rng)
    return out, q


def real_set(
    maps,
    phase: str,
    settings: descriptors.DescriptorSettings | None = None,
    max_patterns: int | None = 4000,
    min_weight: float = 0.999,
    labels=None,
    rng=None,
    show_progressbar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors of real patterns of one phase with their orientations, from indexed maps.

    Parameters
    ----------
    maps
        :class:`temlib.synth.SynthMap` objects (labels from their ground truth), or maps
        read by :func:`temlib.io.load_map` together with ``labels``.
    phase
        Phase name; only its pixels are taken.
    max_patterns
        At most this many patterns over all maps (drawn at random), None for all.
    min_weight
        Only pixels whose pattern comes from one crystal (truth ``weight`` >= this).
    labels
        For real data: one orix ``CrystalMap`` per map (a reference indexing, e.g. template
        matching or a commercial ACOM result read by :func:`temlib.io.load_labels`).

    Returns
    -------
    (M, n_r, n_theta) descriptors and (M, 4) orientations.
    """
    from . import io

    settings = descriptors.load_settings() if settings is None else settings
    rng = np.random.default_rng(rng)
    picks = []
    for i, m in enumerate(maps):
        if labels is None:
            t = m.truth_arrays()
            ok = (t["phase_id"] == crystal.STEEL_PHASES.index(phase)) & (t["weight"] >= min_weight)
            q = t["quaternions"].reshape(-1, 4)
            sig = m.load(lazy=True)
        else:
            xm = labels[i]
            names = {pid: ph.name for pid, ph in xm.phases if pid >= 0}
            ok = np.array([names.get(int(p)) == phase for p in xm.phase_id]).reshape(xm.shape)
            q = xm.rotations.data.reshape(xm.size, -1, 4)[:, 0]
            sig = m
        idx = np.flatnonzero(ok.ravel())
        picks.append((sig, idx, q[idx]))
    total = sum(len(p[1]) for p in picks)
    if total == 0:
        return np.zeros((0, *settings.shape), np.float32), np.zeros((0, 4))
    keep = np.ones(total, bool)
    if max_patterns is not None and total > max_patterns:
        keep[:] = False
        keep[rng.choice(total, size=max_patterns, replace=False)] = True
    descs, quats, start = [], [], 0
    for sig, idx, q in picks:
        k = keep[start : start + len(idx)]
        start += len(idx)
        idx, q = idx[k], q[k]
        if len(idx) == 0:
            continue
        h, w = sig.data.shape[:2]
        rr, cc = np.unravel_index(idx, (h, w))
        data = sig.data
        block = (
            data.vindex[rr, cc].compute() if hasattr(data, "vindex") else np.asarray(data)[rr, cc]
        )
        d = descriptors.pattern_descriptors(
            np.asarray(block), io.calibration_of(sig), None, settings
        )
        descs.append(d)
        quats.append(q)
    return np.concatenate(descs), np.concatenate(quats)


def canonicalize(desc: np.ndarray, smooth_bins: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Turn each descriptor about the beam so that its strongest azimuth sits at 0.

    The azimuthal profile (sum over radii, smoothed circularly by ``smooth_bins``) is
    located at its maximum with a parabola through the three bins around it, and the
    descriptor is shifted back by that angle with an FFT phase ramp (sub-bin exact for the
    band-limited descriptor). The regressor then sees in-plane-normalised inputs and
    predicts ``R_c = R Rz(phi)``; the orientation is ``R = R_c Rz(-phi)``. Where two peaks
    are about equally strong the choice may go either way; both are consistent (the
    target turns with the input), which is all the network needs.

    Parameters
    ----------
    desc
        (N, n_r, n_theta) descriptors over azimuth [0, 180).

    Returns
    -------
    canonical
        (N, n_r, n_theta) float32.
    phi
        (N,) the angle (deg) removed.
    """
    from scipy import fft

    d = np.asarray(desc, np.float32)
    n_theta = d.shape[-1]
    step = 180.0 / n_theta
    prof = d.sum(axis=1)
    f = fft.rfft(prof, axis=-1)
    k = np.arange(f.shape[-1])
    if smooth_bins > 0:
        f = f * np.exp(-0.5 * (2 * np.pi * k / n_theta * smooth_bins) ** 2)
    prof = fft.irfft(f, n=n_theta, axis=-1)
    i0 = prof.argmax(axis=1)
    rows = np.arange(len(d))
    y0, y1, y2 = prof[rows, (i0 - 1) % n_theta], prof[rows, i0], prof[rows, (i0 + 1) % n_theta]
    den = y0 - 2 * y1 + y2
    delta = np.clip(np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1), 0.0), -0.5, 0.5)
    shift = i0 + delta  # bins
    fd = fft.rfft(d, axis=-1)  # complex64: the ramp too, or the product and inverse go double
    ramp = np.exp(2j * np.pi * k[None, :] * shift[:, None] / n_theta).astype(np.complex64)
    fd *= ramp[:, None, :]
    canonical = fft.irfft(fd, n=n_theta, axis=-1).astype(np.float32, copy=False)
    return canonical, shift * step


# --------------------------------------------------------------------------------------
# Architecture search (AutoKeras)
# --------------------------------------------------------------------------------------


@functools.cache
def _circular_pad_class():
    keras = _runtime.keras()

    @keras.saving.register_keras_serializable(package="temlib")
    class CircularPad(keras.layers.Layer):
        """Pad (B, n_r, n_theta, C) circularly along azimuth (an in-plane turn wraps) and with zeros along radius."""

        def __init__(self, pad_theta: int = 1, pad_r: int = 1, **kwargs):
            super().__init__(**kwargs)
            self.pad_theta = int(pad_theta)
            self.pad_r = int(pad_r)

        def call(self, x):
            ops = keras.ops
            p = self.pad_theta
            if p:
                x = ops.concatenate([x[:, :, -p:], x, x[:, :, :p]], axis=2)
            if self.pad_r:
                x = ops.pad(x, [[0, 0], [self.pad_r, self.pad_r], [0, 0], [0, 0]])
            return x

        def compute_output_shape(self, s):
            return (
                s[0],
                None if s[1] is None else s[1] + 2 * self.pad_r,
                None if s[2] is None else s[2] + 2 * self.pad_theta,
                s[3],
            )

        def get_config(self):
            return {**super().get_config(), "pad_theta": self.pad_theta, "pad_r": self.pad_r}

    return CircularPad


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The choices of the architecture search (a CPU-sized network on a 40 x 90 descriptor).

    ``conv_blocks = 0`` is a plain multilayer perceptron on the flattened descriptor;
    otherwise each block is a circularly padded convolution (+ batch norm, ReLU) and a
    2x2 max pooling, pooled further to at most ``MAX_TRUNK_FEATURES`` features, then dense
    layers; so every architecture of the default space stays below ``max_model_size``.
    """

    conv_blocks: tuple = (0, 1)
    filters: tuple = (8, 16)
    kernel: tuple = (3,)
    dense_layers: tuple = (1, 2)
    dense_units: tuple = (256, 512)
    dropout: tuple = (0.0, 0.1)
    learning_rate: tuple = (1e-3, 3e-3)


BLOCK_NAME = "descriptor"  # the search's block: its hyperparameters are "descriptor/<name>"


def _time_limit(seconds: float):
    """A Keras callback that stops training after the first epoch ending past ``seconds``."""
    keras = _runtime.keras()

    class TimeLimit(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if time.perf_counter() - self.t0 > seconds:
                self.model.stop_training = True

    return TimeLimit()


MAX_TRUNK_FEATURES = (
    4096  # 4096 x 512 dense weights: the largest network stays below 3 M parameters
)


@functools.cache
def _descriptor_block():
    ak = _runtime.autokeras()
    keras = _runtime.keras()
    import tree

    @keras.saving.register_keras_serializable(package="temlib")
    class DescriptorBlock(ak.Block):
        """A convolutional (circular along azimuth) or dense trunk for polar descriptors."""

        def __init__(self, space: dict | None = None, **kwargs):
            super().__init__(**kwargs)
            self.space = dict(space or dataclasses.asdict(SearchSpace()))

        def get_config(self):
            return {**super().get_config(), "space": self.space}

        def build(self, hp, inputs=None):
            layers = keras.layers
            sp = self.space
            x = tree.flatten(inputs)[0]
            if len(x.shape) == 3:
                x = layers.Reshape((*x.shape[1:], 1))(x)
            n_conv = _runtime.hp_choice(hp, "conv_blocks", sp["conv_blocks"])
            if n_conv:
                filters = _runtime.hp_choice(hp, "filters", sp["filters"])
                k = _runtime.hp_choice(hp, "kernel", sp["kernel"])
                for b in range(n_conv):
                    x = _circular_pad_class()(pad_theta=k // 2, pad_r=k // 2)(x)
                    x = layers.Conv2D(filters * 2**b, k, padding="valid", use_bias=False)(x)
                    x = layers.BatchNormalization()(x)
                    x = layers.ReLU()(x)
                    x = layers.MaxPooling2D(2)(x)
                # every architecture in the space fits max_model_size: pool the trunk's output
                # down to at most MAX_TRUNK_FEATURES before the dense layers
                while int(np.prod(x.shape[1:])) > MAX_TRUNK_FEATURES and min(x.shape[1:3]) >= 2:
                    x = layers.MaxPooling2D(2)(x)
            x = layers.Flatten()(x)
            units = _runtime.hp_choice(hp, "dense_units", sp["dense_units"])
            drop = _runtime.hp_choice(hp, "dropout", sp["dropout"])
            for _ in range(_runtime.hp_choice(hp, "dense_layers", sp["dense_layers"])):
                x = layers.Dense(units, use_bias=False)(x)
                x = layers.BatchNormalization()(x)
                x = layers.ReLU()(x)
                if drop:
                    x = layers.Dropout(drop)(x)
            return x

    return DescriptorBlock


@dataclasses.dataclass
class Regressor:
    """A trained orientation regressor of one phase.

    Attributes
    ----------
    model
        Keras model: (N, n_r, n_theta) descriptors -> (N, 6) (``target="6d"``) or (N, 3)
        Bunge Euler angles in rad (``target="euler"``, the naive baseline).
    phase
        Phase name.
    settings
        Descriptor settings of the inputs.
    target
        ``"6d"`` or ``"euler"``.
    canonical
        Inputs are turned to their strongest azimuth first (:func:`canonicalize`).
    metadata
        Training record (search, data, fine-tuning, timings), saved as JSON.
    """

    model: object
    phase: str
    settings: descriptors.DescriptorSettings
    target: str = "6d"
    canonical: bool = True
    metadata: dict = dataclasses.field(default_factory=dict)

    def predict_raw(self, desc: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Network outputs (N, 6 or 3) of (N, n_r, n_theta) descriptors."""
        desc = np.asarray(desc, np.float32)
        if desc.ndim != 3 or desc.shape[1:] != self.settings.shape:
            raise ValueError(
                f"Descriptors of shape {desc.shape} do not fit the regressor; expected (N, {self.settings.n_r}, {self.settings.n_theta})"
            )
        out = []
        net = _runtime.inference(self.model)
        for a in range(0, len(desc), batch_size):
            out.append(np.asarray(net([desc[a : a + batch_size]])))
        return (
            np.concatenate(out)
            if out
            else np.zeros((0, 6 if self.target == "6d" else 3), np.float32)
        )

    def predict(self, desc: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """(N, 4) orientations (sample -> crystal) of (N, n_r, n_theta) descriptors, in the fundamental zone."""
        desc = np.asarray(desc, np.float32)
        phi = np.zeros(len(desc))
        if self.canonical:
            desc, phi = canonicalize(desc)
        raw = self.predict_raw(desc, batch_size).astype(float)
        if self.target == "euler":
            q = Rotation.from_euler(raw).data
        else:
            q = matrices_to_quaternions(from_6d(raw))
        return reduce_to_fundamental_zone(qmul(q, rz(-phi)), self.phase).data

    def predict_orientation(self, desc: np.ndarray) -> Orientation:
        """The same as an orix ``Orientation`` with the phase's symmetry (``.to_euler()`` for Bunge angles)."""
        return reduce_to_fundamental_zone(self.predict(desc), self.phase)


def search(
    desc: np.ndarray,
    q: np.ndarray,
    phase: str,
    settings: descriptors.DescriptorSettings | None = None,
    val_fraction: float = 0.1,
    max_trials: int = 3,
    epochs: int = 8,
    batch_size: int = 256,
    space: SearchSpace | None = None,
    tuner: str = "greedy",
    directory: str | Path | None = None,
    project_name: str | None = None,
    overwrite: bool = False,
    max_model_size: int = 3_000_000,
    seed: int = 0,
    verbose: int = 0,
    canonical: bool = True,
    trial_seconds: float | None = None,
) -> Regressor:
    """Find and train a regressor for ``phase`` with AutoKeras; resumable.

    The first trial is the space's first choice of everything (by default a multilayer
    perceptron: fast to train on a CPU and good at this), the next ones AutoKeras'
    greedy steps from the best so far: the search starts from a known-good network
    instead of a random draw. (Measured on ferrite, default profile: a randomly drawn
    first trial, a convolutional network, ended 4 epochs in ~40 s at a 34 deg validation
    median; the perceptron trains 25 epochs in 40 s to 4.0 deg.)

    Parameters
    ----------
    desc, q
        (N, n_r, n_theta) training descriptors and (N, 4) orientations (:func:`synthetic_set`).
    phase
        Phase name (its symmetry defines the loss).
    val_fraction
        Held-out fraction for the search objective (``val_loss``).
    max_trials, epochs, batch_size
        Search budget (early stopping ends a trial whose validation loss stalls for 3 epochs).
    trial_seconds
        Wall-time limit of one trial (it stops after the epoch that passes it); 0 or None: none.
    space
        :class:`SearchSpace`.
    tuner
        ``"greedy"``, ``"bayesian"``, ``"random"`` or ``"hyperband"``.
    directory, project_name
        Where the trials go (default ``data/cache/regress/<phase>-<hash of data and settings>``);
        with ``overwrite=False`` an interrupted search resumes from its finished trials.
    """
    valid = ("greedy", "bayesian", "random", "hyperband")
    if tuner not in valid:
        raise ValueError(f"Unknown tuner {tuner!r}; expected one of {valid}")
    if max_trials < 1 or epochs < 1 or not (trial_seconds or 0) >= 0:
        raise ValueError(
            f"Search budget max_trials={max_trials!r}, epochs={epochs!r}, trial_seconds={trial_seconds!r} "
            "is invalid; expected integers >= 1 and a time >= 0 s (0 or None: no limit)"
        )
    desc = np.asarray(desc, np.float32)
    q = np.asarray(q, float)
    if desc.ndim != 3 or len(desc) != len(q) or len(desc) < 10:
        raise ValueError(
            f"Training data of shapes {desc.shape} and {q.shape} is invalid; expected (N, n_r, n_theta) and (N, 4), N >= 10"
        )
    settings = descriptors.load_settings() if settings is None else settings
    space = space or SearchSpace()
    if canonical:
        desc, phi = canonicalize(desc)
        q = qmul(q, rz(phi))
    ak = _runtime.autokeras()
    keras = _runtime.keras()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(desc))
    n_val = max(1, int(round(val_fraction * len(desc))))
    vi, ti = perm[:n_val], perm[n_val:]
    y = to_6d(q)
    run = dict(
        canonical=canonical,
        phase=phase,
        max_trials=max_trials,
        epochs=epochs,
        batch_size=batch_size,
        space=dataclasses.asdict(space),
        tuner=tuner,
        seed=seed,
        trial_seconds=trial_seconds or None,
        first_trial="space defaults",
    )
    digest = hashlib.sha1(
        desc[:: max(1, len(desc) // 500)].tobytes() + q.tobytes()[:65536]
    ).hexdigest()[:8]
    key = hashlib.sha1(
        json.dumps(
            [run, digest, len(desc), settings.as_dict()], sort_keys=True, default=str
        ).encode()
    ).hexdigest()[:10]
    directory = Path(directory) if directory is not None else paths.data_dir("cache") / "regress"
    project_name = project_name or f"{phase}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    inp = ak.Input()
    x = _descriptor_block()(space=dataclasses.asdict(space), name=BLOCK_NAME)(inp)
    out = ak.RegressionHead(output_dim=6, loss=symmetric_loss(phase), metrics=[], dropout=0.0)(x)
    from keras_tuner import HyperParameters

    fixed = HyperParameters()  # AutoKeras' own optimizer choices, restricted to what trains here
    fixed.Fixed("optimizer", "adam")
    fixed.Choice("learning_rate", list(space.learning_rate), default=space.learning_rate[0])
    first = {"optimizer": "adam", "learning_rate": space.learning_rate[0]} | {
        f"{BLOCK_NAME}/{k}": v[0]
        for k, v in dataclasses.asdict(space).items()
        if k != "learning_rate" and len(v) > 1
    }
    am = _runtime.auto_model(
        inputs=inp,
        outputs=out,
        max_trials=max_trials,
        tuner=tuner,
        **({"initial_hps": [first]} if tuner == "greedy" else {}),
        directory=str(directory),
        project_name=project_name,
        overwrite=overwrite,
        objective="val_loss",
        seed=seed,
        max_model_size=max_model_size,
        hyperparameters=fixed,
        tune_new_entries=True,
    )
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, min_delta=1e-4)
    t0 = time.perf_counter()
    am.fit(
        desc[ti],
        y[ti],
        validation_data=(desc[vi], y[vi]),
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[stop] + ([_time_limit(trial_seconds)] if trial_seconds else []),
        verbose=verbose,
    )
    seconds = time.perf_counter() - t0
    model = am.export_model()
    trials = [
        dict(
            trial_id=t.trial_id,
            val_loss=t.score,
            epochs=len(t.metrics.get_history("val_loss")) if t.metrics.exists("val_loss") else None,
            hp=dict(t.hyperparameters.values),
        )
        for t in am.tuner.oracle.get_best_trials(max_trials)
    ]
    reg = Regressor(model, phase, settings, "6d", canonical=False)
    val_err = disorientation_deg(reg.predict(desc[vi]), q[vi], phase, modulo_flip=True)
    reg.canonical = canonical
    reg.metadata = dict(
        phase=phase,
        target="6d",
        n_train=len(ti),
        n_val=len(vi),
        search=run | dict(seconds=seconds, directory=str(directory / project_name), trials=trials),
        parameters=int(model.count_params()),
        val_median_deg=float(np.median(val_err)),
        settings=settings.as_dict(),
        fine_tuned=False,
        canonical=canonical,
    )
    return reg


# --------------------------------------------------------------------------------------
# Hybrid: the regressor seeds a local template-matching refinement
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LocalTemplates:
    """One phase's templates for local searches around seed orientations.

    Attributes
    ----------
    templates
        The phase's :class:`temlib.match.PhaseTemplates` (quaternions, spectra, beam directions).
    library
        A :class:`temlib.match.Library` of that phase alone (the search runs on it).
    resolution
        Template sampling step (deg).
    """

    templates: object
    library: object
    resolution: float

    @property
    def size(self) -> int:
        """Number of templates (beam directions) of the phase."""
        return self.templates.size

    @classmethod
    def from_library(cls, library, phase: str) -> LocalTemplates:
        """Build from a :func:`temlib.match.build_library` library (its ``phase`` entry)."""
        if phase not in library.names:
            raise ValueError(
                f"Phase {phase!r} is not in the library; expected one of {library.names}"
            )
        lib1 = library.restrict([phase])
        return cls(lib1.phases[0], lib1, float(library.params.get("resolution", 1.0)))


@dataclasses.dataclass
class HybridResult:
    """Hybrid indexing of N patterns of one phase.

    Attributes
    ----------
    quaternions
        (N, 4) orientations (sample -> crystal).
    correlation
        (N,) cosine correlation of the chosen template at its in-plane angle.
    reliability
        (N,) ASTAR-style ``100 (1 - Q2 / Q1)`` over the local candidates (full search for fallbacks).
    fallback
        (N,) True where the local match was unreliable and the full search decided.
    seed_distance
        (N,) angle (deg) between the seed's beam direction and the chosen template's.
    """

    quaternions: np.ndarray
    correlation: np.ndarray
    reliability: np.ndarray
    fallback: np.ndarray
    seed_distance: np.ndarray


def hybrid_refine(
    desc: np.ndarray,
    seeds: np.ndarray,
    local: LocalTemplates,
    library=None,
    n_candidates: int = 32,
    min_correlation: float = 0.0,
    rim_fraction: float = 1.0,
    batch: int = 64,
) -> HybridResult:
    """Refine seed orientations by template matching over the templates near each seed.

    For each pattern only the ``n_candidates`` templates whose beam directions are nearest
    to the seed's (under the crystal symmetry and the Friedel pair), and their mirror
    images, take part in the template matching of :func:`temlib.match.match_descriptors`
    (coarse screen, exact correlation of the best at every in-plane angle by FFT, sub-step
    refinement): the seed needs to be right only to within the neighbourhood, the answer
    has template-matching accuracy, and solutions far from the seed (the other half of an
    ambiguous pattern) are not considered. A pattern falls back to the full search over
    the phase's library when its best local correlation is below ``min_correlation`` or
    its best template lies on the rim of the neighbourhood (farther from the seed than
    ``rim_fraction`` of the neighbourhood's radius: the optimum may lie outside).

    Parameters
    ----------
    desc
        (N, n_r, n_theta) descriptors of patterns of the phase.
    seeds
        (N, 4) seed orientations (e.g. :meth:`Regressor.predict`).
    local
        :class:`LocalTemplates` of the phase.
    library
        The :func:`temlib.match.build_library` library for the fallback (None: no fallback).
    n_candidates
        Beam directions per pattern (about ``pi r^2 / resolution^2`` for a neighbourhood of
        radius r); each brings its template and the template's mirror image.
    min_correlation, rim_fraction
        Fallback rules (``rim_fraction >= 1``, the default, disables the rim rule).
    batch
        Patterns matched at once.
    """
    from . import match

    desc = np.asarray(desc, np.float32)
    seeds = np.asarray(seeds, float).reshape(-1, 4)
    if desc.ndim != 3 or len(desc) != len(seeds):
        raise ValueError(
            f"Descriptors {desc.shape} and seeds {seeds.shape} do not pair up; expected (N, n_r, n_theta) and (N, 4)"
        )
    if n_candidates < 2:
        raise ValueError(f"n_candidates {n_candidates!r} must be at least 2")
    n = len(desc)
    if n == 0:
        z = np.zeros(0)
        return HybridResult(np.zeros((0, 4)), z, z, np.zeros(0, bool), z)
    pt = local.templates
    r = match.match_descriptors(
        desc,
        local.library,
        n_best=1,
        normalization="none",
        near=(seeds, n_candidates),
        n_keep=min(40, 2 * n_candidates),
        n_candidates=min(80, 2 * n_candidates),
        batch=batch,
    )
    quats, corr, rel = r.quaternions[:, 0].copy(), r.correlation[:, 0].copy(), r.reliability.copy()
    dist = match.beam_direction_angle(seeds, quats, pt.symmetry)
    fb = corr < min_correlation
    if rim_fraction < 1:  # the neighbourhood's radius, only when the rim rule is on
        fb |= dist > rim_fraction * pt.nearest(seeds, n_candidates)[1]
    if library is not None and fb.any():
        lib1 = library.restrict([pt.phase.name])
        full = match.match_descriptors(desc[fb], lib1, n_best=1, normalization="none")
        quats[fb] = full.quaternions[:, 0]
        corr[fb] = full.correlation[:, 0]
        rel[fb] = full.reliability
    elif library is None:
        fb[:] = False
    return HybridResult(quats, corr, rel, fb, dist)


# --------------------------------------------------------------------------------------
# Fine-tuning, the naive Euler baseline, saving and loading
# --------------------------------------------------------------------------------------


def _compile(model, loss, learning_rate: float):
    keras = _runtime.keras()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss=loss)
    return model


def fine_tune(
    reg: Regressor,
    desc: np.ndarray,
    q: np.ndarray,
    synthetic: tuple[np.ndarray, np.ndarray] | None = None,
    epochs: int = 5,
    learning_rate: float = 3e-4,
    batch_size: int = 128,
    n_shifts: int = 4,
    synthetic_fraction: float = 0.5,
    rng=None,
    verbose: int = 0,
) -> Regressor:
    """Continue training a regressor on descriptors of real patterns (a copy; the input is kept).

    Real maps hold few orientations (a grain gives thousands of near-identical patterns),
    so each real descriptor is also turned about the beam (``n_shifts`` random circular
    shifts with their labels) and mixed with synthetic descriptors (``synthetic_fraction``
    of each epoch) so that the rest of the fundamental zone is not forgotten.

    Parameters
    ----------
    reg
        The regressor (:func:`search` or :func:`load_regressor`).
    desc, q
        (M, n_r, n_theta) real descriptors and (M, 4) orientations (:func:`real_set`).
    synthetic
        (descriptors, orientations) to mix in, e.g. the search's training set.
    """
    if reg.target != "6d":
        raise ValueError(f"Fine-tuning needs a 6d regressor, not target {reg.target!r}")
    desc = np.asarray(desc, np.float32)
    if len(desc) == 0:
        raise ValueError(
            "No real descriptors to fine-tune on; expected at least one pattern of the phase"
        )
    keras = _runtime.keras()
    rng = np.random.default_rng(rng)
    x, y = shift_augment(desc, q, n_shifts, rng)
    x, y = np.concatenate([desc, x]), np.concatenate([np.asarray(q, float), y])
    if synthetic is not None and synthetic_fraction > 0:
        n_syn = int(round(len(x) * synthetic_fraction / (1 - synthetic_fraction)))
        pick = rng.choice(len(synthetic[0]), size=min(n_syn, len(synthetic[0])), replace=False)
        x = np.concatenate([x, synthetic[0][pick]])
        y = np.concatenate([y, synthetic[1][pick]])
    if reg.canonical:
        x, phi = canonicalize(x)
        y = qmul(y, rz(phi))
    model = keras.models.clone_model(reg.model)
    model.set_weights(reg.model.get_weights())
    _compile(model, symmetric_loss(reg.phase), learning_rate)
    perm = rng.permutation(len(x))
    t0 = time.perf_counter()
    hist = model.fit(x[perm], to_6d(y[perm]), epochs=epochs, batch_size=batch_size, verbose=verbose)
    meta = dict(reg.metadata)
    meta.update(
        fine_tuned=True,
        fine_tuning=dict(
            n_real=int(len(desc)),
            n_samples=int(len(x)),
            epochs=epochs,
            learning_rate=learning_rate,
            seconds=time.perf_counter() - t0,
            loss=[float(v) for v in hist.history.get("loss", [])],
        ),
    )
    return Regressor(model, reg.phase, reg.settings, "6d", reg.canonical, meta)


def train_euler_baseline(
    reg: Regressor,
    desc: np.ndarray,
    q: np.ndarray,
    epochs: int = 8,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
    verbose: int = 0,
    trial_seconds: float | None = None,
) -> Regressor:
    """The naive baseline: the architecture of ``reg``, retrained from scratch on Bunge Euler angles.

    Targets are the Euler angles (rad) of the fundamental-zone representatives, the loss a
    mean squared error; inputs are canonicalised as for ``reg``. Same data and budget as
    the search (``epochs``, wall-time limit ``trial_seconds``), so the difference
    measures the target and loss alone.
    """
    keras = _runtime.keras()
    desc = np.asarray(desc, np.float32)
    q = np.asarray(q, float)
    if reg.canonical:
        desc, phi = canonicalize(desc)
        q = qmul(q, rz(phi))
    y = euler_targets(q, reg.phase)
    keras.utils.set_random_seed(seed)
    trunk = keras.models.clone_model(reg.model)
    head_in = trunk.layers[-2].output
    out = keras.layers.Dense(3, name="euler")(head_in)
    model = keras.Model(trunk.inputs, out)
    _compile(model, "mse", learning_rate)
    perm = np.random.default_rng(seed).permutation(len(desc))
    t0 = time.perf_counter()
    hist = model.fit(
        desc[perm],
        y[perm],
        epochs=epochs,
        batch_size=batch_size,
        verbose=verbose,
        callbacks=[_time_limit(trial_seconds)] if trial_seconds else [],
    )
    meta = dict(
        phase=reg.phase,
        target="euler",
        seconds=time.perf_counter() - t0,
        epochs=len(hist.history.get("loss", [])),
        n_train=len(desc),
    )
    return Regressor(model, reg.phase, reg.settings, "euler", reg.canonical, meta)


def default_model_dir(phase: str, profile: str = "default") -> Path:
    """Where notebook 04 saves the regressor of ``phase``: ``data/models/regressor_<phase>``
    (default profile), ``data/models/<profile>/regressor_<phase>`` otherwise."""
    models = paths.data_dir("models")
    name = f"regressor_{phase}"
    return models / name if profile == "default" else models / profile / name


def save_regressor(reg: Regressor, path: str | Path | None = None) -> Path:
    """Write ``model.keras`` + ``regressor.json`` (phase, target, descriptor settings, training record) atomically."""
    path = Path(path) if path is not None else default_model_dir(reg.phase)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        reg.model.save(tmp / MODEL_FILE)
        meta = dict(
            reg.metadata,
            phase=reg.phase,
            target=reg.target,
            canonical=reg.canonical,
            settings=reg.settings.as_dict(),
            saved=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
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
    return path


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_regressor(path: str | Path) -> Regressor:
    """Load a regressor written by :func:`save_regressor` (a folder)."""
    path = Path(path)
    if not (path / MODEL_FILE).is_file() or not (path / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"No regressor in {path} (expected {MODEL_FILE} and {METADATA_FILE}); train the default ones "
            "with `make report NB=04_regression` (or `temlib reports 04_regression`)"
        )
    meta = json.loads((path / METADATA_FILE).read_text())
    _loss_class(), _circular_pad_class(), _descriptor_block()  # register the custom objects
    model = _runtime.keras().models.load_model(path / MODEL_FILE, compile=False)
    fields = {f.name for f in dataclasses.fields(descriptors.DescriptorSettings)}
    settings = descriptors.DescriptorSettings(
        **{k: v for k, v in meta["settings"].items() if k in fields}
    )
    return Regressor(
        model, meta["phase"], settings, meta.get("target", "6d"), meta.get("canonical", True), meta
    )


def load_regressors(
    folder: str | Path | None = None, phases=crystal.STEEL_PHASES, profile: str = "default"
) -> dict[str, Regressor]:
    """The regressors of ``phases``: from ``folder/regressor_<phase>`` or the profile's default location."""
    out = {}
    for ph in phases:
        p = (
            Path(folder) / f"regressor_{ph}"
            if folder is not None
            else default_model_dir(ph, profile)
        )
        out[ph] = load_regressor(p)
    return out


# --------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------


def disorientation_table(errors: dict[str, np.ndarray]):
    """Statistics of named disorientation arrays (deg): median, p90, p95, fractions < 1, 2, 5 and > 10 deg.

    Parameters
    ----------
    errors
        ``{label: (N,) angles}``; NaNs (unscored) are dropped.
    """
    import pandas as pd

    rows = {}
    for name, e in errors.items():
        a = np.asarray(e, float)
        a = a[np.isfinite(a)]
        if a.size == 0:
            continue
        rows[name] = {
            "n": a.size,
            "median": np.median(a),
            "p90": np.percentile(a, 90),
            "p95": np.percentile(a, 95),
            "<1": np.mean(a < 1),
            "<2": np.mean(a < 2),
            "<5": np.mean(a < 5),
            ">10": np.mean(a > 10),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------------------
# The online pipeline: classify, then the phase's branch
# --------------------------------------------------------------------------------------

BRANCH_CODES = {"ml": 0, "hybrid": 1, "tm": 2}


@dataclasses.dataclass
class Models:
    """Everything the online indexer needs (:func:`load_models`).

    Attributes
    ----------
    phases
        Phase names, in the classifier's column order.
    regressors
        ``{phase: Regressor}`` (needed by the ``ml`` and ``hybrid`` branches).
    classifier
        A :mod:`temlib.classify` ``PhaseClassifier``, or None (phases then come from the caller).
    library
        A :func:`temlib.match.build_library` library in the regressors' descriptor settings
        (needed by ``hybrid`` and ``tm``), or None.
    branches
        ``{phase: "ml" | "hybrid" | "tm"}``.
    settings
        Descriptor settings of every branch.
    hybrid
        Keyword arguments of :func:`hybrid_refine` per phase (``n_candidates``, ``min_correlation``...).
    kv
        Beam energy (kV) of the templates (also of the beam-flip decision).
    refine
        Refine the ``hybrid`` and ``tm`` branches' orientations below the library step
        (:func:`temlib.match.refine_orientations`).
    excitation_error
        ``{phase: relrod half-width (1/Å)}`` of the refinement and the beam-flip decision.
        A phase missing here gets it fitted (:func:`temlib.match.fit_excitation_error`) on
        the first call of :func:`index_patterns` with at least :data:`temlib.match.MIN_FIT_PATTERNS`
        patterns of that phase, then kept: one map (or one acquisition) per ``Models``;
        until then the descriptor settings' value is used.
    """

    phases: list[str]
    regressors: dict
    classifier: object
    library: object
    branches: dict
    settings: descriptors.DescriptorSettings
    hybrid: dict = dataclasses.field(default_factory=dict)
    kv: float = 200.0
    refine: bool = True
    excitation_error: dict = dataclasses.field(default_factory=dict)
    _local: dict = dataclasses.field(default_factory=dict, repr=False)

    def local(self, phase: str) -> LocalTemplates:
        if phase not in self._local:
            self._local[phase] = LocalTemplates.from_library(self.library, phase)
        return self._local[phase]


def load_models(
    method: str | dict = "hybrid",
    models: str | Path | None = None,
    phases=crystal.STEEL_PHASES,
    classifier: str | Path | bool | None = None,
    kv: float = 200.0,
    resolution: float = 1.0,
    profile: str = "default",
    hybrid: dict | None = None,
    missing: str = "error",
) -> Models:
    """Load the regressors, the phase classifier and (for ``hybrid``/``tm``) the template library.

    Parameters
    ----------
    method
        ``"ml"``, ``"hybrid"`` or ``"tm"`` for every phase, or ``{phase: method}``.
    models
        Folder holding ``regressor_<phase>/`` (and optionally ``classifier/``); default the
        profile's locations (``data/models/regressor_<phase>``, ``data/models/classifier``).
    classifier
        Path of a classifier folder, None for the default (``models/classifier`` when
        present, else the profile's ``data/models/.../classifier``), ``"auto"`` (the same,
        or none when absent), False for none. Without a classifier the phase is decided
        by full template matching (normalised scores), unless given to :func:`index_patterns`.
    kv, resolution
        Beam energy (kV) and template step (deg) of the library.
    hybrid
        Per-phase overrides of :func:`hybrid_refine` arguments, ``{phase: {...}}``.
    missing
        A phase without a saved regressor: ``"error"`` (FileNotFoundError) or ``"tm"``
        (that phase's branch becomes template matching, with a warning).
    """
    phases = list(phases)
    branches = (
        {p: method for p in phases}
        if isinstance(method, str)
        else {p: method.get(p, "hybrid") for p in phases}
    )
    for p, m in branches.items():
        if m not in METHODS:
            raise ValueError(f"Unknown method {m!r} for {p}; expected one of {METHODS}")
    if missing not in ("error", "tm"):
        raise ValueError(f"Unknown missing-model rule {missing!r}; expected 'error' or 'tm'")
    needs_reg = [p for p in phases if branches[p] in ("ml", "hybrid")]
    regs = {}
    for p in needs_reg:
        folder = (
            Path(models) / f"regressor_{p}" if models is not None else default_model_dir(p, profile)
        )
        if missing == "tm" and not (folder / MODEL_FILE).is_file():
            log.warning(
                "no regressor for %s in %s: that phase goes to template matching", p, folder
            )
            branches[p] = "tm"
            continue
        regs[p] = load_regressor(folder)
    settings = next(iter(regs.values())).settings if regs else descriptors.load_settings()
    clf = None
    if classifier is not False:
        from . import classify

        auto = classifier == "auto"
        if (
            classifier in (None, "auto")
            and models is not None
            and (Path(models) / "classifier").is_dir()
        ):
            classifier = Path(models) / "classifier"
        if classifier in (None, "auto"):
            classifier = classify.default_model_dir(profile)
        if auto and not (Path(classifier) / classify.MODEL_FILE).is_file():
            log.warning(
                "no phase classifier in %s: phases are decided by template matching", classifier
            )
            classifier = False
    if classifier is not False:
        clf = classify.load_classifier(classifier)
        clf.bfloat16 = True  # online indexing: the network in bfloat16 where the CPU has it
        unknown = [p for p in clf.phases if p not in phases]
        if unknown:
            raise ValueError(f"The classifier knows phases {clf.phases}; expected only {phases}")
        phases = list(clf.phases)
    lib = None
    if clf is None or any(branches[p] in ("hybrid", "tm") for p in phases):
        from . import match

        lib = match.build_library(phases, resolution=resolution, kv=kv, settings=settings)
    hyb = {p: dict(regs[p].metadata.get("hybrid", {})) if p in regs else {} for p in phases}
    for p, kw in (hybrid or {}).items():
        hyb.setdefault(p, {}).update(kw)
    return Models(phases, regs, clf, lib, branches, settings, hyb, kv=kv)


@dataclasses.dataclass
class IndexResult:
    """Indexing of N patterns (:func:`index_patterns`).

    Attributes
    ----------
    phase_index
        (N,) index into ``phases``.
    quaternions
        (N, 4) orientations (sample -> crystal).
    reliability
        (N,) 0-100 (``ml``: NaN; ``hybrid``/``tm``: ASTAR-style correlation ratio).
    correlation
        (N,) template correlation (NaN for ``ml``).
    phase_probability
        (N,) classifier probability of the chosen phase (NaN when phases were given).
    branch
        (N,) :data:`BRANCH_CODES`: 0 ml, 1 hybrid (local), 2 full template matching
        (the ``tm`` branch or a hybrid fallback).
    flip_confidence
        (N,) how much better the orientation fits the unfolded pattern than its 180-deg
        turn about the beam (:func:`temlib.match.resolve_beam_flip`; NaN: not decided).
    """

    phase_index: np.ndarray
    quaternions: np.ndarray
    reliability: np.ndarray
    correlation: np.ndarray
    phase_probability: np.ndarray
    branch: np.ndarray
    phases: list
    flip_confidence: np.ndarray | None = None

    def __post_init__(self):
        if self.flip_confidence is None:
            self.flip_confidence = np.full(len(self.phase_index), np.nan)

    def __len__(self) -> int:
        return len(self.phase_index)

    @staticmethod
    def empty(n: int, phases) -> IndexResult:
        return IndexResult(
            np.full(n, -1, np.int64),
            np.tile([1.0, 0, 0, 0], (n, 1)),
            np.full(n, np.nan),
            np.full(n, np.nan),
            np.full(n, np.nan),
            np.full(n, -1, np.int64),
            list(phases),
        )

    def put(self, index, other: IndexResult) -> None:
        for f in (
            "phase_index",
            "quaternions",
            "reliability",
            "correlation",
            "phase_probability",
            "branch",
            "flip_confidence",
        ):
            getattr(self, f)[index] = getattr(other, f)


def index_patterns(
    patterns: np.ndarray,
    calibration: float,
    models: Models,
    phase_of: np.ndarray | None = None,
    centers: np.ndarray | None = None,
) -> IndexResult:
    """Index (N, ky, kx) raw patterns: phase, then each phase's branch.

    Parameters
    ----------
    patterns
        Raw patterns as read from a map.
    calibration
        1/Å per px.
    models
        :func:`load_models`.
    phase_of
        (N,) phase indices into ``models.phases`` to use instead of the classifier.
    centers
        (N, 2) direct-beam centres (row, col) px; found when None (shared by every step).
    """
    from . import match

    p = np.asarray(patterns)
    if p.ndim != 3:
        raise ValueError(f"Patterns of shape {p.shape} are not a stack; expected (N, ky, kx)")
    n = len(p)
    if centers is None:
        centers = _runtime.split_apply(io.find_direct_beam, p)
    centers = np.asarray(centers, float).reshape(n, 2)
    desc, unfolded = descriptors.pattern_descriptors(
        p, calibration, centers, models.settings, unfolded=True
    )
    prob = np.full(n, np.nan)
    if phase_of is None and models.classifier is None and len(models.phases) == 1:
        phase_of = np.zeros(n, np.int64)
    if phase_of is None and models.classifier is None:
        if models.library is None:
            raise ValueError(
                "No phase classifier or template library loaded and no phases given; "
                "expected load_models(classifier=...) or phase_of"
            )
        tm = match.match_descriptors(desc, models.library, n_best=1)
        phase_of = np.array([models.phases.index(models.library.names[i]) for i in tm.phase_index])
    if phase_of is None:
        pr = models.classifier.predict_proba(p, calibration, centers=centers)
        phase_of = pr.argmax(axis=1)
        prob = pr[np.arange(n), phase_of]
    phase_of = np.asarray(phase_of, np.int64).reshape(n)
    res = IndexResult.empty(n, models.phases)
    res.phase_index[:] = phase_of
    res.phase_probability[:] = prob
    for k, ph in enumerate(models.phases):
        sel = np.flatnonzero(phase_of == k)
        if sel.size == 0:
            continue
        branch = models.branches.get(ph, "hybrid")
        if branch == "tm":
            r = match.match_descriptors(
                desc[sel], models.library.restrict([ph]), n_best=1, normalization="none"
            )
            res.quaternions[sel] = r.quaternions[:, 0]
            res.correlation[sel] = r.correlation[:, 0]
            res.reliability[sel] = r.reliability
            res.branch[sel] = BRANCH_CODES["tm"]
            continue
        seeds = models.regressors[ph].predict(desc[sel])
        if branch == "ml":
            res.quaternions[sel] = seeds
            res.branch[sel] = BRANCH_CODES["ml"]
            continue
        h = hybrid_refine(
            desc[sel], seeds, models.local(ph), models.library, **models.hybrid.get(ph, {})
        )
        res.quaternions[sel] = h.quaternions
        res.correlation[sel] = h.correlation
        res.reliability[sel] = h.reliability
        res.branch[sel] = np.where(h.fallback, BRANCH_CODES["tm"], BRANCH_CODES["hybrid"])
    for k, ph in enumerate(models.phases):  # every branch: the beam flip from the unfolded pattern
        sel = np.flatnonzero(phase_of == k)
        if sel.size == 0:
            continue
        refine = models.refine and models.branches.get(ph, "hybrid") != "ml"
        if refine and ph not in models.excitation_error and sel.size >= match.MIN_FIT_PATTERNS:
            models.excitation_error[ph], _ = match.fit_excitation_error(
                desc[sel], res.quaternions[sel], ph, models.settings, kv=models.kv
            )
            log.info("%s: relrod half-width fitted %.4f 1/Å", ph, models.excitation_error[ph])
        relrod = models.excitation_error.get(ph, models.settings.excitation_error)
        if refine:
            res.quaternions[sel], res.correlation[sel] = match.refine_orientations(
                desc[sel], res.quaternions[sel], ph, models.settings, kv=models.kv,
                excitation_error=relrod,
            )  # fmt: skip
        res.quaternions[sel], res.flip_confidence[sel] = match.resolve_beam_flip(
            unfolded[sel],
            res.quaternions[sel],
            crystal.get_phase(ph),
            models.settings,
            kv=models.kv,
            max_excitation_error=relrod,
        )
    return res


def to_crystal_map(
    result: IndexResult,
    shape: tuple[int, int],
    step: float = 1.0,
    scan_unit: str = "px",
    filled=None,
):
    """An orix ``CrystalMap`` of an :class:`IndexResult` over a (rows, cols) scan.

    Phase ids are the steel ids (0 ferrite, 1 NbC, 2 cementite) where the phases are steel
    phases, else their order; pixels not indexed yet (``filled`` False or phase -1) are
    not-indexed (-1). Properties: ``reliability``, ``correlation``, ``phase_probability``,
    ``branch`` (0 ml, 1 hybrid, 2 template matching, -1 none).
    """
    from orix.crystal_map import CrystalMap, PhaseList

    h, w = shape
    if len(result) != h * w:
        raise ValueError(f"{len(result)} results do not fill a {h}x{w} scan; expected {h * w}")
    names = list(result.phases)
    steel = {n: i for i, n in enumerate(crystal.STEEL_PHASES)}
    ids = [steel[n] for n in names] if all(n in steel for n in names) else list(range(len(names)))
    lut = np.array(ids + [-1])
    pid = lut[np.where(result.phase_index >= 0, result.phase_index, len(names))]
    if filled is not None:
        pid = np.where(np.asarray(filled, bool).ravel(), pid, -1)
    phase_objs = [crystal.get_phase(n) for n in names]
    plist = PhaseList(phases=phase_objs, ids=ids)
    if (pid == -1).any():
        plist.add_not_indexed()
    rr, cc = np.mgrid[0:h, 0:w]
    return CrystalMap(
        rotations=Rotation(result.quaternions),
        phase_id=pid,
        x=cc.ravel() * step,
        y=rr.ravel() * step,
        phase_list=plist,
        prop={
            "reliability": np.nan_to_num(result.reliability, nan=-1.0),
            "correlation": np.nan_to_num(result.correlation, nan=-1.0),
            "phase_probability": np.nan_to_num(result.phase_probability, nan=-1.0),
            "branch": result.branch.astype(float),
            "flip_confidence": np.nan_to_num(result.flip_confidence, nan=-1.0),
        },
        scan_unit=scan_unit,
    )


def index_map(
    source,
    models: Models,
    chunk: int = 32,
    phase_of: np.ndarray | None = None,
    show_progressbar: bool = True,
):
    """Index every pattern of a map (a path :func:`temlib.io.load_map` reads, or a loaded signal).

    Parameters
    ----------
    phase_of
        Optional (rows, cols) phase indices into ``models.phases`` (bypasses the classifier).

    With ``models.refine`` (and no ``phase_of``), the relrod widths are fitted first on
    patterns of four blocks spread over the map (:func:`temlib.io.spread_sample`), not on
    whatever grains the first block holds.

    Returns
    -------
    xmap
        orix ``CrystalMap`` (:func:`to_crystal_map`).
    info
        ``seconds`` (wall), ``cpu_seconds`` (process CPU time), ``patterns_per_s``.
    """
    from . import io

    sig = io.load_map(source) if isinstance(source, str | Path) else source
    cal = io.calibration_of(sig)
    h, w = sig.data.shape[:2]
    res = IndexResult.empty(h * w, models.phases)
    t0, c0 = time.perf_counter(), time.process_time()
    if models.refine and phase_of is None:  # the relrod widths from a sample of the whole map
        index_patterns(io.spread_sample(sig, chunk), cal, models)  # (fitted on the first call)
    for (rs, cs), block in io.iter_chunks(sig, chunk, show_progressbar):
        r, c = block.shape[:2]
        idx = (np.arange(h * w).reshape(h, w)[rs, cs]).ravel()
        po = None if phase_of is None else np.asarray(phase_of).reshape(h, w)[rs, cs].ravel()
        res.put(idx, index_patterns(block.reshape(r * c, *block.shape[2:]), cal, models, po))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    step = (
        float(sig.axes_manager.navigation_axes[0].scale)
        if sig.axes_manager.navigation_dimension
        else 1.0
    )
    unit = (
        str(sig.axes_manager.navigation_axes[0].units)
        if sig.axes_manager.navigation_dimension
        else "px"
    )
    xmap = to_crystal_map(
        res, (h, w), step=step, scan_unit=unit if unit and unit != "<undefined>" else "px"
    )
    return xmap, {"seconds": secs, "cpu_seconds": cpu, "patterns_per_s": h * w / max(secs, 1e-9)}


# --------------------------------------------------------------------------------------
# Streaming (indexing during acquisition)
# --------------------------------------------------------------------------------------


def iter_folder(
    folder: str | Path, total: int, poll: float = 0.5, timeout: float = 60.0, pattern: str = "*.npy"
):
    """Yield (n, ky, kx) chunks from ``.npy`` files appearing in ``folder`` (name order) until ``total`` patterns.

    A file is read once it is complete (written to a temporary name and renamed, as an
    acquisition program should). Raises TimeoutError if no new file arrives within ``timeout`` s.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(
            f"No chunk folder {folder}; expected a folder receiving .npy chunks"
        )
    seen, got, last = set(), 0, time.monotonic()
    while got < total:
        new = sorted(
            p for p in folder.glob(pattern) if p.name not in seen and not p.name.startswith(".")
        )
        if not new:
            if time.monotonic() - last > timeout:
                raise TimeoutError(
                    f"No new chunk in {folder} for {timeout:g} s after {got} of {total} patterns"
                )
            time.sleep(poll)
            continue
        for p in new:
            seen.add(p.name)
            a = np.load(p)
            a = a.reshape(-1, *a.shape[-2:])
            got += len(a)
            last = time.monotonic()
            yield a


def iter_growing_file(
    path: str | Path,
    frame_shape: tuple[int, int],
    total: int,
    dtype="uint8",
    header: int = 0,
    batch: int = 256,
    poll: float = 0.2,
    timeout: float = 60.0,
):
    """Yield (n, ky, kx) chunks from a raw frame file that an acquisition is still appending to.

    Frames are ``ky * kx`` values of ``dtype`` after ``header`` bytes, in scan (raster) order;
    complete frames are read as they appear, up to ``total``.
    """
    path = Path(path)
    dt = np.dtype(dtype)
    fbytes = int(np.prod(frame_shape)) * dt.itemsize
    got, last = 0, time.monotonic()
    while got < total:
        size = path.stat().st_size if path.exists() else 0
        avail = min(max((size - header) // fbytes, 0), total)
        if avail - got >= min(batch, total - got):
            take = min(avail - got, batch)
            with open(path, "rb") as f:
                f.seek(header + got * fbytes)
                buf = f.read(take * fbytes)
            got += take
            last = time.monotonic()
            yield np.frombuffer(buf, dt).reshape(take, *frame_shape)
        else:
            if time.monotonic() - last > timeout:
                raise TimeoutError(f"{path} stopped growing at {got} of {total} frames")
            time.sleep(poll)


def index_stream(
    source,
    shape: tuple[int, int],
    calibration: float,
    models: Models,
    callback=None,
    frame_shape: tuple[int, int] | None = None,
    dtype="uint8",
    poll: float = 0.5,
    timeout: float = 60.0,
    refresh_s: float = 0.5,
):
    """Index patterns as they arrive, in scan (raster) order, and return the final map.

    Parameters
    ----------
    source
        A Python iterator of (n, ky, kx) chunks, a folder receiving ``.npy`` chunk files
        (:func:`iter_folder`), or a raw frame file still being written
        (:func:`iter_growing_file`, needs ``frame_shape``).
    shape
        (rows, cols) of the scan.
    calibration
        1/Å per px of the patterns.
    callback
        Called as ``callback(xmap, n_done, info)`` with the partial map (pixels not yet
        acquired are not-indexed), e.g. :func:`live_display`: after a chunk when at least
        ``refresh_s`` seconds passed since the last call, and after the last chunk.
    refresh_s
        Shortest time between two callbacks (0: after every chunk). Building the partial
        map costs ~35 ms for a 500 x 500 scan, a quarter of indexing a 256-pattern chunk.

    Returns
    -------
    xmap, info (``seconds``, ``cpu_seconds``, ``patterns_per_s``, ``chunks``).
    """
    h, w = shape
    total = h * w
    if isinstance(source, str | Path):
        src = Path(source)
        if src.is_dir():
            source = iter_folder(src, total, poll, timeout)
        else:
            if frame_shape is None:
                raise ValueError(
                    f"Reading the growing file {src} needs frame_shape; expected (ky, kx)"
                )
            source = iter_growing_file(src, frame_shape, total, dtype, poll=poll, timeout=timeout)
    res = IndexResult.empty(total, models.phases)
    done, chunks, shown = 0, 0, 0
    busy, cpu0, t0 = 0.0, time.process_time(), time.perf_counter()
    last_call = -np.inf

    def report():
        nonlocal shown, last_call
        filled = np.arange(total) < done
        callback(to_crystal_map(res, shape, filled=filled), done, {"seconds": busy})
        shown, last_call = done, time.perf_counter()

    for block in source:
        b = np.asarray(block)
        b = b.reshape(-1, *b.shape[-2:])[: total - done]
        if len(b) == 0:
            break
        t1 = time.perf_counter()
        res.put(np.arange(done, done + len(b)), index_patterns(b, calibration, models))
        busy += time.perf_counter() - t1
        done += len(b)
        chunks += 1
        if callback is not None and (done >= total or time.perf_counter() - last_call >= refresh_s):
            report()
        if done >= total:
            break
    if callback is not None and shown < done:
        report()
    info = {
        "seconds": busy,
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "patterns_per_s": done / max(busy, 1e-9),
        "chunks": chunks,
        "patterns": done,
    }
    return to_crystal_map(res, shape, filled=np.arange(total) < done), info


def live_display(every: int = 1, title: str = "live indexing"):
    """A callback for :func:`index_stream` that redraws the phase and IPF-z maps in a notebook cell.

    It updates one display (IPython ``display_id``) in place every ``every`` chunks, so a
    notebook shows the maps filling as patterns arrive. Outside IPython it does nothing.
    """
    from . import plots

    state = {"handle": None, "calls": 0}

    def update(xmap, n_done, info):
        state["calls"] += 1
        if state["calls"] % every:
            return
        try:
            from IPython.display import display
        except ImportError:  # pragma: no cover
            return
        import matplotlib.pyplot as plt

        fig = plots.phase_ipf_figure(
            {f"{n_done} patterns, {n_done / max(info['seconds'], 1e-9):.0f}/s": xmap}, title=title
        )
        if state["handle"] is None:
            state["handle"] = display(fig, display_id=True)
        else:
            state["handle"].update(fig)
        plt.close(fig)

    return update


# --------------------------------------------------------------------------------------
# Notebook 04 workflow: train, fine-tune and evaluate one phase; compare the methods
# --------------------------------------------------------------------------------------


def parse_phases(phase: str) -> list[str]:
    """``"all"`` -> the three steel phases; ``"NbC"`` or ``"ferrite,NbC"`` -> those (validated)."""
    if phase in ("all", "", None):
        return list(crystal.STEEL_PHASES)
    names = [p.strip() for p in str(phase).split(",") if p.strip()]
    bad = [p for p in names if p not in crystal.STEEL_PHASES]
    if bad:
        raise ValueError(
            f"Unknown phase {bad[0]!r}; expected 'all' or one of {crystal.STEEL_PHASES}"
        )
    return names


@dataclasses.dataclass
class PhaseRun:
    """What :func:`train_phase` produced for one phase."""

    phase: str
    regressor: Regressor
    fine_tuned: Regressor
    baseline: Regressor | None
    errors: dict
    seconds: dict
    table: object
    path: Path | None


def train_phase(
    phase: str,
    maps: dict,
    n_train: int = 40000,
    n_rendered: int = 8000,
    max_trials: int = 3,
    epochs: int = 8,
    finetune_epochs: int = 5,
    finetune_patterns: int = 4000,
    test_patterns: int = 2000,
    baseline: bool = True,
    settings: descriptors.DescriptorSettings | None = None,
    save_to: str | Path | None = None,
    directory: str | Path | None = None,
    n_candidates: int = 0,
    seed: int = 0,
    trial_seconds: float | None = None,
) -> PhaseRun:
    """Train (architecture search), fine-tune and evaluate the regressor of ``phase``.

    Parameters
    ----------
    maps
        :func:`temlib.synth.steel_maps` (``train1``, ``train2`` for fine-tuning, ``test`` to score).
    n_train
        Descriptors drawn from simulated spot lists (:func:`synthetic_set`) for the search.
    n_rendered
        Rendered camera-like patterns (:func:`rendered_set`, each also turned once about the
        beam) added to them.
    finetune_patterns, test_patterns
        Real patterns of the phase drawn from the training maps (half from each) / the test
        map (interior pixels). Fine-tuning is kept only if fine-tuning on one training map
        lowers the error on the other (:func:`fine_tune_checked`; ``metadata["fine_tuning_check"]``).
    baseline
        Also train the naive Euler-angle baseline.
    save_to
        Folder to save the fine-tuned regressor in (None: not saved).
    directory
        Where the search trials go (resumable), default ``data/cache/regress``.
    trial_seconds
        Wall-time limit of each search trial and of the baseline (:func:`search`).
    n_candidates
        Beam directions the hybrid searches around each seed; 0: chosen with the fallback
        threshold, the cheapest pair that keeps the hybrid within 0.2 deg of template
        matching on freshly rendered patterns at orientations the regressor never saw
        (:func:`calibrate_hybrid`).
    """
    from . import match

    settings = descriptors.load_settings() if settings is None else settings
    rng = np.random.default_rng(seed)
    secs = {}
    t = time.perf_counter()
    x, q = synthetic_set(phase, n_train, settings, rng=rng)
    if n_rendered > 0:
        xr, qr = rendered_set(phase, n_rendered, settings, n_shifts=2, rng=rng)
        x, q = np.concatenate([x, xr]), np.concatenate([q, qr])
    secs["simulate"] = time.perf_counter() - t
    t = time.perf_counter()
    reg = search(
        x, q, phase, settings, max_trials=max_trials, epochs=epochs, directory=directory,
        seed=seed, trial_seconds=trial_seconds,
    )  # fmt: skip
    secs["search"] = time.perf_counter() - t
    base = None
    if baseline:
        t = time.perf_counter()
        base = train_euler_baseline(
            reg, x, q, epochs=epochs, seed=seed, trial_seconds=trial_seconds
        )
        secs["baseline"] = time.perf_counter() - t
    half = finetune_patterns // 2
    x1, q1 = real_set([maps["train1"]], phase, settings, half, rng=rng)
    x2, q2 = real_set([maps["train2"]], phase, settings, finetune_patterns - half, rng=rng)
    n_real = len(x1) + len(x2)
    xe, qe = real_set([maps["test"]], phase, settings, test_patterns, rng=rng)
    t = time.perf_counter()
    ft, check = fine_tune_checked(reg, (x1, q1), (x2, q2), (x, q), finetune_epochs, rng)
    secs["fine_tune"] = time.perf_counter() - t
    rejected = None  # a fine-tuning not kept is still scored on the test map, for the record
    if not check["kept"] and n_real:
        both = np.concatenate([x1, x2]), np.concatenate([q1, q2])
        rejected = fine_tune(reg, *both, synthetic=(x, q), epochs=finetune_epochs, rng=rng)
    lib = match.build_library([phase], settings=settings)
    local = LocalTemplates.from_library(lib, phase)
    # on orientations the regressor never saw (rendered afresh): calibrating on the
    # fine-tuning patterns would trust seeds the network has learnt by heart
    xc, qc = rendered_set(phase, min(max(n_real, 200), 1000), settings, rng=rng)
    hybrid_cal = calibrate_hybrid(
        ft, xc, qc, local, **({"sizes": (n_candidates,)} if n_candidates else {})
    )
    n_candidates, min_corr = hybrid_cal["n_candidates"], hybrid_cal["min_correlation"]
    errors, timing = {}, {}
    preds = {}

    def timed(name, f):
        c0, t0 = time.process_time(), time.perf_counter()
        out = f()
        timing[name] = (time.process_time() - c0, time.perf_counter() - t0)
        preds[name] = out
        return out

    if len(xe):
        if base is not None:
            timed("ML naive Euler", lambda: base.predict(xe))
        timed("ML before fine-tuning", lambda: reg.predict(xe))
        if rejected is not None:
            timed("ML fine-tuned (not kept)", lambda: rejected.predict(xe))
        seeds = timed("ML", lambda: ft.predict(xe))
        c0, t0 = time.process_time(), time.perf_counter()
        h = hybrid_refine(
            xe, seeds, local, lib, n_candidates=n_candidates, min_correlation=min_corr
        )
        timing["hybrid"] = (
            time.process_time() - c0 + timing["ML"][0],
            time.perf_counter() - t0 + timing["ML"][1],
        )
        preds["hybrid"] = h.quaternions
        timed(
            "TM",
            lambda: match.match_descriptors(xe, lib, n_best=1, normalization="none").quaternions[
                :, 0
            ],
        )
        for name, p in preds.items():
            errors[name] = {
                "strict": disorientation_deg(p, qe, phase),
                "flip": disorientation_deg(p, qe, phase, modulo_flip=True),
            }
        errors["hybrid"]["fallback"] = h.fallback
    rows = []
    for name, e in errors.items():
        tab = disorientation_table({"strict": e["strict"], "flip": e["flip"]})
        row = {"phase": phase, "method": name}
        for kind in ("strict", "flip"):
            for col in ("median", "p90", "p95", "<1", "<2", "<5", ">10"):
                row[f"{kind} {col}"] = float(tab.loc[kind, col])
        cpu, wall = timing[name]
        row["n"] = len(xe)
        row["CPU ms/pattern"] = 1e3 * cpu / max(len(xe), 1)
        row["wall ms/pattern"] = 1e3 * wall / max(len(xe), 1)
        if name == "hybrid":
            row["fallback"] = float(np.mean(e["fallback"]))
        rows.append(row)
    import pandas as pd

    table = pd.DataFrame(rows)
    meta_eval = {
        r["method"]: {k: v for k, v in r.items() if k not in ("phase", "method")} for r in rows
    }
    ft.metadata["test_evaluation"] = meta_eval
    ft.metadata["hybrid"] = {"n_candidates": n_candidates, "min_correlation": min_corr}
    ft.metadata["hybrid_calibration"] = hybrid_cal | {"patterns": len(xc)}
    ft.metadata["seconds"] = secs
    ft.metadata["fine_tuning_check"] = check
    path = save_regressor(ft, save_to) if save_to is not None else None
    return PhaseRun(phase, reg, ft, base, errors, secs, table, path)


def fine_tune_checked(
    reg: Regressor,
    first: tuple[np.ndarray, np.ndarray],
    second: tuple[np.ndarray, np.ndarray],
    synthetic: tuple[np.ndarray, np.ndarray] | None = None,
    epochs: int = 5,
    rng=None,
) -> tuple[Regressor, dict]:
    """Fine-tune on two training maps only if it helps on orientations it has not seen.

    A map holds few orientations, and a network fine-tuned on them learns them by heart:
    its error on them drops while that on new orientations may rise (the known trap of
    validating on random splits). So the regressor is first fine-tuned on the ``first``
    map's patterns and scored on the ``second`` map's (other grains): only if its median
    disorientation there (modulo the beam flip) falls is it fine-tuned on both maps;
    otherwise the regressor is kept as it is. With an empty map nothing can be checked
    and the regressor is fine-tuned on what there is (``checked`` False).

    Parameters
    ----------
    reg
        The regressor (it is not changed).
    first, second
        (descriptors, quaternions) of the phase's real patterns in each training map.
    synthetic, epochs, rng
        As in :func:`fine_tune`.

    Returns
    -------
    The regressor to use (a fine-tuned copy or ``reg``) and the check:
    ``{"checked", "held_out_median_before", "held_out_median_after", "kept"}``.
    """
    (x1, q1), (x2, q2) = first, second
    rng = np.random.default_rng(rng)
    check = {"checked": False, "held_out_median_before": None, "held_out_median_after": None}
    if len(x1) and len(x2):
        trial = fine_tune(reg, x1, q1, synthetic=synthetic, epochs=epochs, rng=rng)
        before, after = (
            float(np.median(disorientation_deg(m.predict(x2), q2, reg.phase, modulo_flip=True)))
            for m in (reg, trial)
        )
        check = {"checked": True, "held_out_median_before": before, "held_out_median_after": after}
        if after >= before:
            log.info(
                "%s: fine-tuning on one map raised the median on the other %.2f -> %.2f deg; "
                "the regressor is kept as trained on simulations",
                reg.phase,
                before,
                after,
            )
            return reg, check | {"kept": False}
    if not len(x1) + len(x2):
        return reg, check | {"kept": False}
    both = np.concatenate([x1, x2]), np.concatenate([q1, q2])
    ft = fine_tune(reg, *both, synthetic=synthetic, epochs=epochs, rng=rng)
    return ft, check | {"kept": True}


def calibrate_hybrid(
    reg: Regressor,
    desc: np.ndarray,
    q: np.ndarray,
    local: LocalTemplates,
    tolerance: float = 0.2,
    sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    quantiles: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
) -> dict:
    """The hybrid's neighbourhood and fallback threshold, chosen together: fastest at template-matching accuracy.

    On labelled patterns the regressor was not trained on (orientations it never saw:
    calibrating on its training patterns would trust seeds it has learnt by heart), the
    hybrid is run without fallback for each neighbourhood of ``sizes`` beam directions,
    and template matching over the whole phase once. A fallback threshold ``c`` (a
    quantile of the local correlations) sends the patterns whose local match correlates
    below ``c`` to the full search, so the hybrid's answer for a threshold is known without
    running it again. Of all (size, threshold) pairs whose median disorientation (modulo
    the beam flip) is within ``tolerance`` deg of template matching, with no more patterns
    off by over 10 deg, the one screening the fewest templates per pattern is returned:
    a regressor that seeds well gets a small neighbourhood and few fallbacks, a poor one
    the full search.

    Returns
    -------
    dict with ``n_candidates``, ``min_correlation`` (the :func:`hybrid_refine` arguments),
    ``fallback`` (share of the patterns sent to the full search) and ``cost`` (templates
    screened per pattern relative to the full search: ``(k + fallback * T) / T``).
    """
    from . import match

    full = {"n_candidates": local.size, "min_correlation": 0.0, "fallback": 0.0, "cost": 1.0}
    if len(desc) == 0:
        return full
    tm = match.match_descriptors(desc, local.library, n_best=1, normalization="none")
    e_tm = disorientation_deg(tm.quaternions[:, 0], q, reg.phase, modulo_flip=True)
    med_tm, far_tm = np.median(e_tm), np.mean(e_tm > 10)
    seeds = reg.predict(desc)
    best = full
    for k in sorted(s for s in sizes if s < local.size):
        if k / local.size >= best["cost"]:
            break
        h = hybrid_refine(desc, seeds, local, None, n_candidates=k)
        e_local = disorientation_deg(h.quaternions, q, reg.phase, modulo_flip=True)
        for qu in quantiles:
            c = float(np.quantile(h.correlation, qu)) if qu > 0 else 0.0
            back = h.correlation < c
            e = np.where(back, e_tm, e_local)
            cost = (k + back.mean() * local.size) / local.size
            ok = np.median(e) <= med_tm + tolerance and np.mean(e > 10) <= far_tm
            if ok and cost < best["cost"]:
                best = {
                    "n_candidates": k,
                    "min_correlation": c,
                    "fallback": float(back.mean()),
                    "cost": float(cost),
                }
    return best


def error_histogram_figure(
    runs: list[PhaseRun],
    methods=(
        "ML naive Euler",
        "ML before fine-tuning",
        "ML fine-tuned (not kept)",
        "ML",
        "hybrid",
        "TM",
    ),
    kind: str = "flip",
):
    """Disorientation distributions (deg, log-spaced bins) per phase and method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 3.6), squeeze=False)
    bins = np.logspace(-2, np.log10(180), 40)
    for ax, run in zip(axes[0], runs, strict=True):
        for m in methods:
            if m == "ML" and run.fine_tuned is run.regressor and "ML before fine-tuning" in methods:
                continue  # fine-tuning not kept: the same network as "ML before fine-tuning"
            if m in run.errors:
                e = run.errors[m][kind]
                ax.hist(
                    e[np.isfinite(e)],
                    bins=bins,
                    histtype="step",
                    lw=1.5,
                    label=f"{m} (median {np.nanmedian(e):.2f}°)",
                )
        ax.set_xscale("log")
        ax.set_xlabel(f"disorientation ({kind}), deg")
        ax.set_title(run.phase)
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("patterns")
    fig.tight_layout()
    return fig


def simulate_acquisition(
    signal, folder: str | Path, chunk: int = 64, interval: float = 0.2, rows: int | None = None
):
    """Write a map's patterns as ``.npy`` chunk files into ``folder`` from a background thread.

    Stands in for a detector during acquisition: each chunk of ``chunk`` patterns (scan
    order) is written to a temporary name and renamed every ``interval`` seconds; only the
    first ``rows`` scan rows when given.

    Returns
    -------
    The started ``threading.Thread``.
    """
    import threading

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npy"):
        old.unlink()
    data = signal.data
    h, w = data.shape[:2]
    h = h if rows is None else min(rows, h)
    flat = data[:h].reshape(h * w, *data.shape[2:])

    def run():
        for k, a in enumerate(range(0, h * w, chunk)):
            block = np.asarray(flat[a : a + chunk])
            tmp = folder / f".chunk_{k:06d}.npy"
            np.save(tmp, block)
            os.replace(tmp, folder / f"chunk_{k:06d}.npy")
            time.sleep(interval)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def compare_methods(
    test_map,
    methods=("tm", "ml", "hybrid"),
    models: str | Path | None = None,
    profile: str = "default",
    max_patterns: int = 2000,
    pyxem_patterns: int = 0,
    phase_source: str = "auto",
    min_weight: float = 0.999,
    rng=0,
):
    """Template matching, ML, hybrid (and pyxem) side by side on pixels of a synthetic test map.

    Parameters
    ----------
    test_map
        A :class:`temlib.synth.SynthMap` with ground truth.
    methods
        Any of ``"tm"`` (full template matching over every phase, phase by normalised
        score, best solution refined; :mod:`temlib.match`), ``"ml"``, ``"hybrid"``
        (:func:`index_patterns`).
    models, profile
        Where the regressors (and classifier) are (:func:`load_models`).
    max_patterns
        Pixels drawn at random among single-crystal pixels (``weight >= min_weight``).
    pyxem_patterns
        The first this many of them also go through pyxem's ``get_orientation`` (0: skip).
    phase_source
        ``"classifier"``, ``"truth"`` (orientation accuracy alone), or ``"auto"`` (the
        classifier when one is saved, else the truth).

    Returns
    -------
    table
        pandas DataFrame, one row per method and phase (plus ``all``): phase accuracy,
        disorientation statistics strict and modulo the beam flip, patterns/s (wall) and
        process CPU ms per pattern, phase source, and ``resolvable``: the share of these
        pixels whose descriptor fits the template of their true orientation better than any
        template at least 5 deg away (:func:`temlib.match.truth_margin`), a ceiling for the
        share any template-based method can get right.
    errors
        ``{method: {"phase_ok", "strict", "flip", "truth"}}`` per pattern,
        ``"resolvable"`` (bool per pattern), ``"excitation_error"`` (``{phase: relrod
        half-width}`` fitted on these patterns, used by ``tm`` and ``hybrid`` to refine below
        the library step) and ``"fit_seconds"`` (its time, not in the methods' rates).
    """
    import pandas as pd

    from . import classify, io, match

    valid = ("classifier", "truth", "auto")
    if phase_source not in valid:
        raise ValueError(f"Unknown phase_source {phase_source!r}; expected one of {valid}")
    rng = np.random.default_rng(rng)
    t = test_map.truth_arrays()
    sig = test_map.load(lazy=True)
    cal = io.calibration_of(sig)
    kv = io.beam_energy(sig)
    cand = np.flatnonzero((t["weight"] >= min_weight).ravel() & (t["phase_id"].ravel() >= 0))
    idx = np.sort(rng.choice(cand, size=min(max_patterns, len(cand)), replace=False))
    h, w = t["phase_id"].shape
    rr, cc = np.unravel_index(idx, (h, w))
    pats = np.asarray(
        sig.data.vindex[rr, cc].compute()
        if hasattr(sig.data, "vindex")
        else np.asarray(sig.data)[rr, cc]
    )
    truth_pid = t["phase_id"].ravel()[idx]
    truth_q = t["quaternions"].reshape(-1, 4)[idx]
    names = list(crystal.STEEL_PHASES)
    lib = match.build_library(names, kv=kv)
    desc = descriptors.pattern_descriptors(pats, cal, io.find_direct_beam(pats), lib.settings)
    # the map's relrod widths, fitted once (as temlib index does) on template matching's answers
    # and phases, outside the timed runs: every refining method uses them
    t_fit = time.perf_counter()
    relrod = match.fit_result_excitation_error(
        match.match_descriptors(desc, lib, n_best=1), desc, lib
    )
    t_fit = time.perf_counter() - t_fit
    if phase_source == "auto":
        clf_dir = (
            Path(models) / "classifier"
            if models is not None
            else classify.default_model_dir(profile)
        )
        phase_source = "classifier" if (clf_dir / classify.MODEL_FILE).is_file() else "truth"
    preds, timing = {}, {}
    for m in methods:
        if m not in METHODS + ("pyxem",):
            raise ValueError(f"Unknown method {m!r}; expected one of {METHODS}")
        if m == "tm":
            c0, t0 = time.process_time(), time.perf_counter()
            r = match.match_patterns(pats, cal, lib, n_best=1, refine=relrod)
            timing[m] = (time.process_time() - c0, time.perf_counter() - t0)
            pid = np.array([names.index(lib.names[i]) for i in r.phase_index])
            preds[m] = (pid, r.quaternions[:, 0], "tm scores")
            continue
        mod = load_models(
            m,
            models,
            names,
            classifier=False if phase_source == "truth" else None,
            kv=kv,
            profile=profile,
            missing="tm",
        )
        mod.excitation_error = dict(relrod)
        phase_of = truth_pid if phase_source == "truth" else None
        index_patterns(
            pats[:8], cal, mod, None if phase_of is None else phase_of[:8]
        )  # warm-up (graph tracing)
        c0, t0 = time.process_time(), time.perf_counter()
        r = index_patterns(pats, cal, mod, phase_of)
        timing[m] = (time.process_time() - c0, time.perf_counter() - t0)
        pid = np.array([names.index(mod.phases[i]) for i in r.phase_index])
        preds[m] = (pid, r.quaternions, phase_source)
    if pyxem_patterns > 0:
        k = min(pyxem_patterns, len(pats))
        r, info = match.pyxem_index(pats[:k], cal, lib)
        pid = np.array([names.index(lib.names[i]) for i in r.phase_index])
        preds["pyxem"] = (pid, r.quaternions[:, 0], "pyxem scores")
        timing["pyxem"] = (np.nan, info["seconds"])
    # the ceiling: pixels whose descriptor fits their true orientation's own template better
    # than every template >= 5 deg away (match.truth_margin)
    resolvable = np.zeros(len(pats), bool)
    for j, ph in enumerate(names):
        sel = np.flatnonzero(truth_pid == j)
        if sel.size:
            resolvable[sel] = match.truth_margin(desc[sel], truth_q[sel], lib, ph) > 0
    rows = []
    errors = {"resolvable": resolvable, "excitation_error": relrod, "fit_seconds": t_fit}
    for m, (pid, q, src) in preds.items():
        k = len(pid)
        ok = pid == truth_pid[:k]
        strict = np.full(k, np.nan)
        flip = np.full(k, np.nan)
        for j, ph in enumerate(names):
            sel = np.flatnonzero(ok & (truth_pid[:k] == j))
            if sel.size:
                strict[sel] = disorientation_deg(q[sel], truth_q[sel], ph)
                flip[sel] = disorientation_deg(q[sel], truth_q[sel], ph, modulo_flip=True)
        errors[m] = {"phase_ok": ok, "strict": strict, "flip": flip, "truth": truth_pid[:k]}
        cpu, wall = timing[m]
        for j, ph in [*enumerate(names), (-1, "all")]:
            sel = np.ones(k, bool) if j < 0 else truth_pid[:k] == j
            if not sel.any():
                continue
            st = disorientation_table({"strict": strict[sel], "flip": flip[sel]})
            row = {
                "method": m,
                "phase": ph,
                "n": int(sel.sum()),
                "phase_acc": float(ok[sel].mean()),
                "phase from": src,
            }
            for kind in ("strict", "flip"):
                for col in ("median", "p90", "p95", "<1", "<2", "<5", ">10"):
                    row[f"{kind} {col}"] = float(st.loc[kind, col]) if kind in st.index else np.nan
            row["patterns/s"] = k / wall
            row["CPU ms/pattern"] = 1e3 * cpu / k
            row["resolvable"] = float(resolvable[:k][sel].mean())
            rows.append(row)
    return pd.DataFrame(rows), errors


def index_file(
    map_path_or_signal,
    method: str = "hybrid",
    out: str | Path | None = None,
    models: str | Path | None = None,
    phases=crystal.STEEL_PHASES,
    resolution: float = 1.0,
    chunk: int = 32,
    calibration: float | None = None,
    kv: float | None = None,
    show_progressbar: bool = True,
    refine: bool = True,
):
    """``temlib index MAP --method ml|hybrid``: index a map file with the regressors, write ``out``.

    Parameters
    ----------
    map_path_or_signal
        A map :func:`temlib.io.load_map` reads, or a signal it returned.
    method
        ``"ml"`` (classifier phase + regressor orientation) or ``"hybrid"`` (+ local
        template matching, full search where unreliable).
    out
        ``RESULT.h5`` (orix CrystalMap; ``RESULT.ang`` beside it), written atomically; None: not written.
    models
        A folder with ``regressor_<phase>/`` (and optionally ``classifier/``); default the
        models of the default report run (``data/models/regressor_<phase>/``,
        ``data/models/classifier/``). Without a classifier the phase comes from template matching.
    calibration, kv
        Override the map's calibration (1/Å per px) and beam energy (kV).
    refine
        :attr:`Models.refine` (the hybrid's and template matching's orientations refined
        below the library step, relrod widths fitted on a sample of the map:
        :func:`index_map`).

    Returns
    -------
    orix ``CrystalMap`` with ``indexing_info`` (``seconds``, ``cpu_seconds``,
    ``patterns_per_s``, ``new_patterns``, ``method``, ``excitation_error``).
    """
    from . import io, match

    if method not in ("ml", "hybrid"):
        raise ValueError(f"Unknown method {method!r} for the regressors; expected 'ml' or 'hybrid'")
    if out is not None:
        out = io.check_output_path(out)
    if isinstance(map_path_or_signal, str | Path):
        signal = io.load_map(map_path_or_signal, lazy=True, calibration=calibration, kv=kv)
    else:
        signal = map_path_or_signal
    if signal.data.ndim != 4:
        raise ValueError(
            f"Map of shape {tuple(signal.data.shape)} is not a 4D scan; expected (rows, cols, ky, kx)"
        )
    if isinstance(phases, str):
        phases = parse_phases(phases) if phases != "all" else list(crystal.STEEL_PHASES)
    beam_kv = kv or io.beam_energy(signal)
    mods = load_models(method, models, phases, classifier="auto", kv=beam_kv, resolution=resolution)
    mods.refine = refine
    if calibration is not None:
        signal.axes_manager.signal_axes[0].scale = calibration
        signal.axes_manager.signal_axes[1].scale = calibration
    xmap, info = index_map(signal, mods, chunk=chunk, show_progressbar=show_progressbar)
    if out is not None:
        match.save_crystal_map(xmap, out)
    h, w = signal.data.shape[:2]
    xmap.indexing_info = dict(
        info, new_patterns=h * w, method=method, excitation_error=dict(mods.excitation_error)
    )
    return xmap


def has_regressors(
    models: str | Path | None = None, phases=crystal.STEEL_PHASES, profile: str = "default"
) -> bool:
    """Whether a saved regressor exists for every phase (in ``models`` or the profile's default place)."""
    if isinstance(phases, str):
        phases = [p.strip() for p in phases.split(",") if p.strip()]
    if models is not None and not isinstance(models, str | Path):
        return False
    for ph in phases:
        folder = (
            Path(models) / f"regressor_{ph}"
            if models is not None
            else default_model_dir(ph, profile)
        )
        if not (folder / MODEL_FILE).is_file():
            return False
    return True


def goals_table(comparison):
    """The issue's goals against the measured end-to-end comparison (:func:`compare_methods`).

    Rows: hybrid median disorientation <= 0.5 deg, hybrid >= 95 % within 2 deg, ML median
    <= 2 deg (all phases, modulo the beam flip, correctly phased pixels), with the measured
    value and whether it is met.
    """
    import pandas as pd

    def value(method, col):
        sel = comparison[(comparison["method"] == method) & (comparison["phase"] == "all")]
        return float(sel[col].iloc[0]) if len(sel) and col in sel else np.nan

    rows = [
        ("hybrid median (deg)", "<= 0.5", value("hybrid", "flip median"), lambda v: v <= 0.5),
        ("hybrid fraction < 2 deg", ">= 0.95", value("hybrid", "flip <2"), lambda v: v >= 0.95),
        ("ML median (deg)", "<= 2", value("ml", "flip median"), lambda v: v <= 2),
        ("TM median (deg), for reference", "-", value("tm", "flip median"), lambda v: np.nan),
        (
            "resolvable pixels (ceiling), for reference",
            "-",
            value(comparison["method"].iloc[0], "resolvable") if len(comparison) else np.nan,
            lambda v: np.nan,
        ),
    ]
    return pd.DataFrame(
        [
            {"goal": g, "target": t, "measured": v, "met": (f(v) if np.isfinite(v) else np.nan)}
            for g, t, v, f in rows
        ]
    )
