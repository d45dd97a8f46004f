"""Polar descriptors: planted spots, in-plane rotation as a circular shift, templates, tuning score."""

from __future__ import annotations

import numpy as np
import pytest

from temlib import descriptors as D
from temlib import simulate

ST = D.DescriptorSettings(r_min=0.15, r_max=1.3, n_r=40, n_theta=90)


def _spots_at(q, phase="ferrite", err=0.05):
    from orix.quaternion import Rotation

    refl = simulate.reflections(phase, 1.5)
    xy, inten, _ = simulate.kinematic_spots(refl, Rotation(q), kv=200, max_excitation_error=err)
    return xy, inten


def _rot_xy(xy, deg):
    a = np.radians(deg)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return xy @ m.T


def test_polar_transform_matches_scipy(rng):
    from scipy import ndimage

    pats = rng.random((3, 144, 144)).astype(np.float32) * 100
    centers = np.array([[72.0, 72.0], [70.3, 73.6], [74.9, 69.2]])
    cal = 0.021
    out = D.polar_transform(pats, cal, centers, ST)
    assert out.shape == (3, ST.n_r, 2 * ST.n_theta)
    edges = np.linspace(ST.r_min, ST.r_max, ST.n_r * ST.oversample + 1)
    r = 0.5 * (edges[1:] + edges[:-1]) / cal
    th = np.arange(2 * ST.n_theta) * np.pi / ST.n_theta
    for i in range(3):
        rr = centers[i, 0] + r[:, None] * np.sin(th)
        cc = centers[i, 1] + r[:, None] * np.cos(th)
        ref = (
            ndimage.map_coordinates(pats[i], [rr, cc], order=1)
            .reshape(ST.n_r, ST.oversample, -1)
            .mean(1)
        )
        np.testing.assert_allclose(out[i], ref, atol=1e-2)


@pytest.mark.parametrize("deg", [0.0, 30.0, 64.0, 122.0])
def test_inplane_rotation_is_a_circular_shift(deg):
    xy, inten = _spots_at(
        np.array([[0.9, 0.2, -0.3, 0.25]]) / np.linalg.norm([0.9, 0.2, -0.3, 0.25])
    )
    pats = (
        D.render_spots(
            np.concatenate([xy, _rot_xy(xy, deg)]), np.concatenate([inten, inten]), calibration=0.02
        )
        * 50
    )
    d = D.pattern_descriptors(pats, 0.02, np.full((2, 2), 72.0), ST)
    best, shift = D.inplane_correlation(d[1:], d[:1])
    assert best[0, 0] > 0.9
    expected = (deg % 180) / ST.step_deg
    assert min(abs(shift[0, 0] - expected), ST.n_theta - abs(shift[0, 0] - expected)) <= 1


def test_pattern_matches_its_own_template_best():
    q = np.array([[1.0, 0, 0, 0], [0.92, 0.3, 0.1, 0.22]])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    xy, inten = _spots_at(q)
    pats = D.render_spots(xy, inten, calibration=0.02, gamma=0.5) * 80 + 3
    d = D.pattern_descriptors(pats, 0.02, np.full((2, 2), 72.0), ST)
    t = D.template_descriptors(xy, inten, ST)
    np.testing.assert_allclose(np.linalg.norm(t.reshape(2, -1), axis=1), 1, rtol=1e-5)
    best, _ = D.inplane_correlation(d, t)
    assert best[0, 0] > best[0, 1] and best[1, 1] > best[1, 0]
    assert best[0, 0] > 0.6


def test_spot_count_threshold_keeps_the_strongest():
    xy, inten = _spots_at(np.array([[1.0, 0, 0, 0]]), err=0.1)
    assert (inten > 0).sum() > 8
    five = D.template_descriptors(xy, inten, ST.replace(n_spots=5))
    order = np.argsort(-inten[0])[:5]
    ref = D.template_descriptors(xy[:, order], inten[:, order], ST.replace(n_spots=0))
    np.testing.assert_allclose(five, ref, atol=1e-6)


def test_settings_round_trip(tmp_path):
    s = ST.replace(gamma=0.3, background="opening", n_spots=12)
    p = D.save_settings(s, tmp_path / "d.json", score=0.9)
    assert D.load_settings(p) == s
    with pytest.raises(FileNotFoundError, match="No descriptor settings"):
        D.load_settings(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"background": "rolling"}, "Unknown background 'rolling'"),
        ({"r_min": 1.5, "r_max": 1.0}, "Radial range"),
        ({"gamma": 0.0}, "must be positive"),
        ({"n_spots": -1}, "n_spots"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.DescriptorSettings(**kwargs)


def test_bad_patterns():
    with pytest.raises(ValueError, match="expected \\(N, ky, kx\\)"):
        D.pattern_descriptors(np.zeros((144, 144)), 0.02, settings=ST)
    with pytest.raises(ValueError, match="Calibration"):
        D.pattern_descriptors(np.zeros((1, 144, 144)), -1.0, settings=ST)
    bad = np.zeros((1, 144, 144), np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        D.pattern_descriptors(bad, 0.02, settings=ST)
    with pytest.raises(ValueError, match="do not match"):
        D.template_descriptors(np.zeros((2, 3, 2)), np.zeros((2, 4)), ST)


def test_ranking_score_prefers_matching_settings(rng):
    """Planted sample: each pattern picks its own template; with the truths shuffled it cannot."""
    from temlib.synth import random_quaternions

    q = random_quaternions(24, rng)
    xy, inten = _spots_at(q, err=0.08)
    pats = (
        D.render_spots(xy, inten, calibration=0.02, gamma=0.5) * 60 + rng.poisson(3, (24, 144, 144))
    ).astype(np.float32)
    sample = D.TuningSample(
        patterns=pats,
        calibration=np.full(24, 0.02),
        centers=np.full((24, 2), 72.0),
        phase_id=np.zeros(24, int),
        quaternions=q,
        region=np.arange(24),
        phases=("ferrite",),
    )
    good = D.ranking_score(sample, ST.replace(excitation_error=0.08))
    assert good["top1"] >= 0.9 and good["margin"] > 0
    sample.quaternions = np.roll(q, 1, axis=0)
    sample.spot_cache.clear()
    bad = D.ranking_score(sample, ST.replace(excitation_error=0.08))
    assert bad["top1"] <= 0.2 and bad["margin"] < 0


def test_map_descriptors_shape():
    import dask.array as da
    import hyperspy.api as hs

    xy, inten = _spots_at(np.array([[1.0, 0, 0, 0]]))
    pat = (D.render_spots(xy, inten, calibration=0.02) * 50 + 2).astype(np.float32)[0]
    data = da.from_array(np.broadcast_to(pat, (3, 5, 144, 144)).copy(), chunks=(2, 2, 144, 144))
    s = hs.signals.Signal2D(data).as_lazy()
    for ax in s.axes_manager.signal_axes:
        ax.scale = 0.02
    out = D.map_descriptors(s, ST, chunk=2, show_progressbar=False)
    assert out.shape == (3, 5, ST.n_r, ST.n_theta)
    np.testing.assert_allclose(out[0, 0], out[2, 4], atol=1e-4)


def test_stack_descriptors_equal_one_by_one(rng):
    # the polar sampling works on chunks of patterns: chunk edges must not show
    pats = rng.poisson(20, size=(19, 64, 64)).astype(np.uint8)
    centers = 32 + rng.uniform(-3, 3, size=(19, 2))
    st = D.DescriptorSettings(r_min=0.1, r_max=0.6, n_r=12, n_theta=30)
    stack = D.pattern_descriptors(pats, 0.02, centers, st)
    one = np.stack(
        [D.pattern_descriptor(p, 0.02, c, st) for p, c in zip(pats, centers, strict=True)]
    )
    np.testing.assert_allclose(stack, one, atol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"background": "opening", "opening_deg": 9.0},
        {
            "background": "none",
            "noise_k": 0.0,
            "gamma": 0.3,
            "zero_mean": True,
            "radial_weight": 0.0,
        },
        {"smooth": 0.0, "oversample": 1, "gamma": 1.0},
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_compiled_front_end_equals_numpy_steps(rng, changes, dtype):
    # the one-pass kernel against prefilter -> polar_transform -> descriptors_from_polar,
    # on spot patterns with a halo, one of them off-centre so that samples leave the frame
    st = ST.replace(**({"noise_k": 1.0, "radial_weight": 1.5} | changes))
    yy, xx = np.mgrid[:96, :96]
    pats = np.empty((5, 96, 96))
    centers = np.array([[48.0, 48.0], [47.3, 49.6], [50.9, 45.2], [30.5, 62.1], [48.2, 47.7]])
    for i, (cy, cx) in enumerate(centers):
        img = 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 200.0)
        for _ in range(12):
            a, r = rng.uniform(0, 2 * np.pi), rng.uniform(8, 40)
            img += 150 * np.exp(
                -((yy - cy - r * np.sin(a)) ** 2 + (xx - cx - r * np.cos(a)) ** 2) / 3.0
            )
        pats[i] = rng.poisson(img + 5)
    pats = np.clip(pats, 0, 255).astype(dtype)
    cal = 0.015
    folded, unfolded = D.front_end(pats, cal, centers, st)
    ref_f, ref_u = D.descriptors_from_polar(
        D.polar_transform(D.prefilter(pats, cal, st), cal, centers, st), st, unfolded=True
    )
    assert np.ptp(ref_f, axis=(1, 2)).min() > 0.01  # descriptors with spots in them, not flat
    np.testing.assert_allclose(folded, ref_f, atol=2e-5)
    np.testing.assert_allclose(unfolded, ref_u, atol=2e-5)


@pytest.mark.parametrize("n", [1, 2, 7, 180, 181])
def test_compiled_median_is_numpys(rng, n):
    from temlib import _kernels

    keys = np.empty(n, np.int32)
    for x in (
        rng.normal(size=n),
        np.round(rng.normal(size=n) * 2) / 2,  # ties
        np.r_[np.zeros(n - n // 3), -rng.random(n // 3)],  # many zeros and negatives
    ):
        x = x.astype(np.float32)
        assert _kernels._median(x, keys) == np.float32(np.median(x))


def test_front_end_rejects_bad_centres():
    pats = np.zeros((2, 32, 32), np.uint8)
    with pytest.raises(ValueError, match="finite"):
        D.front_end(pats, 0.02, np.array([[16.0, 16.0], [np.nan, 16.0]]), ST)
    with pytest.raises(ValueError, match="not a stack"):
        D.front_end(pats[0], 0.02, np.array([[16.0, 16.0]]), ST)


def _dense_templates(xy, inten, st, unfolded):
    # every spot drawn on every bin in NumPy: the formula the compiled drawing keeps
    order = np.argsort(-inten, axis=1, kind="stable")[:, : st.n_spots]
    xy = np.take_along_axis(xy, order[..., None], axis=1).astype(np.float32)
    inten = np.take_along_axis(inten, order, axis=1).astype(np.float32)
    period = 2 * np.pi if unfolded else np.pi
    th = (np.arange(st.n_theta * (2 if unfolded else 1)) * np.pi / st.n_theta).astype(np.float32)
    rb = D.radii(st).astype(np.float32)
    r = np.hypot(xy[..., 0], xy[..., 1])
    t = np.mod(np.arctan2(xy[..., 1], xy[..., 0]), period)
    w = (inten / inten.max(axis=1, keepdims=True)) ** st.template_gamma
    w = np.where((r > st.r_min - 3 * st.sigma) & (r < st.r_max + 3 * st.sigma) & (inten > 0), w, 0)
    radial = np.exp(-((rb - r[..., None]) ** 2) / (2 * st.sigma**2))
    d = np.mod(th - t[..., None] + period / 2, period) - period / 2
    arc = np.exp(-((r[..., None] * d) ** 2) / (2 * st.sigma**2))
    out = np.einsum("tsr,tsa->tra", radial * w[..., None], arc)
    out = out * ((rb / st.r_max) ** st.radial_weight)[:, None]
    if st.zero_mean:
        out = out - out.mean(axis=(1, 2), keepdims=True)
    return out / np.linalg.norm(out, axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("unfolded", [False, True])
@pytest.mark.parametrize(
    "changes", [{}, {"zero_mean": True, "radial_weight": 0.0, "sigma": 0.06, "n_spots": 8}]
)
def test_compiled_template_drawing_equals_dense_formula(rng, unfolded, changes):
    st = ST.replace(**changes)
    q = rng.normal(size=(300, 4))
    xy, inten = _spots_at(q / np.linalg.norm(q, axis=1, keepdims=True))
    xy[0, 0] = [0.0, 0.2]  # a spot near the centre: its arc spans the whole circle
    got = D.template_descriptors(xy, inten, st, unfolded=unfolded)
    ref = _dense_templates(xy, inten, st, unfolded)
    assert got.shape == ref.shape == (300, st.n_r, st.n_theta * (2 if unfolded else 1))
    np.testing.assert_allclose(got, ref, atol=3e-5)
    assert np.abs(got).max() > 0.1  # spots drawn, not an empty grid
