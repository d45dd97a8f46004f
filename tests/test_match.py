"""Template matching: planted orientations recovered, sub-step in-plane angle, reliability, metrics."""

from __future__ import annotations

import numpy as np
import pytest
from orix.quaternion import Orientation, Rotation

from temlib import crystal, simulate
from temlib import descriptors as D
from temlib import match as M

ST = D.DescriptorSettings(r_min=0.15, r_max=1.3, n_r=40, n_theta=90, excitation_error=0.05)


@pytest.fixture(scope="module")
def library():
    lib = M.build_library(("ferrite", "NbC"), resolution=1.0, kv=200, settings=ST)
    lib.phase_calibration = None  # plain z-scores: independent of any saved calibration
    return lib


def _render(q, phase, rng, err=0.05, noise=True):
    refl = simulate.reflections(phase, 1.5)
    xy, inten, _ = simulate.kinematic_spots(refl, Rotation(q), kv=200, max_excitation_error=err)
    pats = D.render_spots(xy, inten, calibration=0.02, gamma=0.5) * 60 + 4
    if noise:
        pats = rng.poisson(pats).astype(np.float32)
    return pats, xy, inten


def _rich_orientations(phase, n, rng, min_spots=12):
    """Random orientations whose patterns have at least ``min_spots`` spots in the descriptor's range.

    Sparse kinematic patterns (a handful of spots) are genuinely ambiguous: several
    orientations fit them equally well, so a recovery test plants informative ones.
    """
    from temlib.synth import random_quaternions

    refl = simulate.reflections(phase, 1.5)
    out = []
    while len(out) < n:
        q = random_quaternions(64, rng)
        xy, inten, _ = simulate.kinematic_spots(
            refl, Rotation(q), kv=200, max_excitation_error=0.05
        )
        r = np.hypot(xy[..., 0], xy[..., 1])
        ok = ((inten > 0) & (r > ST.r_min) & (r < ST.r_max)).sum(axis=1) >= min_spots
        out.extend(q[ok])
    return np.array(out[:n])


@pytest.mark.parametrize("phase", ["ferrite", "NbC"])
def test_planted_orientations_are_recovered(library, phase, rng):
    q = _rich_orientations(phase, 12, rng)
    pats, _, _ = _render(q, phase, rng)
    res = M.match_patterns(pats, 0.02, library, centers=np.full((len(q), 2), 72.0))
    assert (np.array(library.names)[res.phase_index] == phase).all()
    pid = library.names.index(phase)
    err = M.misorientation_deg(
        res.quaternions[:, 0], q, library.phases[pid].symmetry, modulo_flip=True
    )
    # kinematic spot patterns leave a few degrees of out-of-plane ambiguity on some orientations
    assert np.median(err) < 2.0, err
    assert (err < 3).mean() >= 0.6 and (err < 10).all(), err


def test_inplane_angle_sub_step(library, rng):
    """A template turned by an angle between two azimuth steps is found at that angle."""
    pt = library.phases[0]
    t = 200
    same = 0
    for phi in (37.3, 101.7, 12.9, 150.5):
        q = M._qmul(pt.quaternions[t], M._rz(np.radians(-phi)))[None]
        pats, _, _ = _render(q, "ferrite", rng, noise=False)
        res = M.match_patterns(pats, 0.02, library, centers=np.full((1, 2), 72.0))
        err = M.misorientation_deg(res.quaternions[:, 0], q, pt.symmetry, modulo_flip=True)[0]
        assert err < 1.5
        if (
            res.template[0, 0] == t
        ):  # the same template: the angle is recovered below the 2-deg step
            same += 1
            assert abs(((res.inplane[0, 0] - phi) + 90) % 180 - 90) < 0.5, (phi, res.inplane[0, 0])
    assert same >= 3


def test_reliability_low_for_mixed_pattern(library, rng):
    """A pattern mixed 50/50 from two grains has a competing solution: its reliability drops."""
    n = 24
    qa = _rich_orientations("ferrite", n, rng, min_spots=6)
    qb = _rich_orientations("ferrite", n, rng, min_spots=6)
    pa, _, _ = _render(qa, "ferrite", rng, noise=False)
    pb, _, _ = _render(qb, "ferrite", rng, noise=False)
    c = np.full((n, 2), 72.0)
    single = M.match_patterns(rng.poisson(pa).astype(np.float32), 0.02, library, centers=c)
    mixed = M.match_patterns(
        rng.poisson(0.5 * pa + 0.5 * pb).astype(np.float32), 0.02, library, centers=c
    )
    assert np.median(mixed.reliability) < 0.7 * np.median(single.reliability)
    assert (mixed.reliability < single.reliability).mean() >= 0.6
    assert ((single.reliability >= 0) & (single.reliability <= 100)).all()


@pytest.mark.parametrize("name", ["ferrite", "NbC", "cementite"])
def test_proper_symmetry_is_orix_laue_proper_subgroup(name):
    ph = crystal.get_phase(name)
    ref = ph.point_group.laue_proper_subgroup.data
    s = M.proper_symmetry(ph)  # remembered per group: a copy each time
    s[:] = 0
    np.testing.assert_array_equal(M.proper_symmetry(ph), ref)


def test_misorientation_matches_orix(rng):
    from temlib.synth import random_quaternions

    pg = crystal.get_phase("cementite").point_group
    a, b = random_quaternions(20, rng), random_quaternions(20, rng)
    ours = M.misorientation_deg(a, b, M.proper_symmetry(crystal.get_phase("cementite")))
    ref = Orientation(a, symmetry=pg).angle_with(Orientation(b, symmetry=pg), degrees=True)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    flip = M.misorientation_deg(
        a, M.beam_flip(a), M.proper_symmetry(crystal.get_phase("cementite")), modulo_flip=True
    )
    np.testing.assert_allclose(flip, 0, atol=1e-5)


def _xmap(q, phase_id, names=("ferrite", "NbC")):
    from orix.crystal_map import CrystalMap, PhaseList

    n = len(q)
    return CrystalMap(
        rotations=Rotation(q),
        phase_id=np.asarray(phase_id),
        x=np.arange(n, dtype=float),
        y=np.zeros(n),
        phase_list=PhaseList(phases=crystal.get_phases(names), ids=[0, 1]),
    )


def test_error_metrics_planted(rng):
    from temlib.synth import random_quaternions

    q = random_quaternions(10, rng)
    truth = _xmap(q, [0] * 8 + [1] * 2)
    off = M._qmul(q, Rotation.from_axes_angles([1, 0, 0], np.radians(3.0)).data[0])
    pred_q = off.copy()
    pred_q[:4] = M.beam_flip(off[:4])  # the 180-deg beam flip: strictly wrong, modulo flip right
    result = _xmap(pred_q, [0] * 7 + [1] * 3)  # one ferrite pixel called NbC
    e = M.orientation_errors(result, truth)
    assert e["phase_ok"].sum() == 9
    np.testing.assert_allclose(e["modulo_flip"][e["phase_ok"]], 3.0, atol=0.05)
    assert (e["strict"][:4] > 20).all() and np.allclose(e["strict"][4:7], 3.0, atol=0.05)
    table = M.error_table(e)
    assert table.loc["ferrite", "phase_acc"] == pytest.approx(7 / 8)
    assert table.loc["all", "flip <5"] == 1.0 and table.loc["all", "strict <5"] == pytest.approx(
        5 / 9
    )
    cm = M.confusion_matrix(e, ["ferrite", "NbC"])
    assert cm.loc["ferrite", "NbC"] == 1 and cm.loc["NbC", "NbC"] == 2
    curve = M.reliability_curve(e, np.linspace(0, 100, 10), n_bins=3)
    assert curve["n"].sum() == 10


def test_crystal_map_round_trip(library, rng, tmp_path):
    q = _rich_orientations("ferrite", 6, rng)
    pats, _, _ = _render(q, "ferrite", rng)
    res = M.match_patterns(pats, 0.02, library, centers=np.full((6, 2), 72.0), n_best=3)
    xmap = M.to_crystal_map(res, library, (2, 3))
    assert xmap.rotations_per_point == 3
    for k in ("correlation", "reliability", "phase_reliability", "inplane", "correlation_nbest"):
        assert k in xmap.prop
    h5, ang = M.save_crystal_map(xmap, tmp_path / "r.h5")
    from orix import io as oio

    back = oio.load(h5)
    np.testing.assert_allclose(back.prop["reliability"], xmap.prop["reliability"])
    assert ang.is_file() and ang.stat().st_size > 0
    with pytest.raises(ValueError, match="do not fill"):
        M.to_crystal_map(res, library, (4, 4))


def test_bad_inputs(library):
    with pytest.raises(ValueError, match="expected \\(N, 40, 90\\)"):
        M.match_descriptors(np.zeros((2, 10, 90)), library)
    with pytest.raises(ValueError, match="Unknown normalization 'max'"):
        M.match_descriptors(np.zeros((2, 40, 90)), library, normalization="max")
    with pytest.raises(ValueError, match="needs a phase calibration"):
        M.match_descriptors(np.zeros((2, 40, 90)), library, normalization="calibrated")
    with pytest.raises(ValueError, match="Unknown phase 'austenite'"):
        M.build_library(("austenite",), settings=ST)


def test_phase_calibration_fit(library, rng, tmp_path):
    qa = _rich_orientations("ferrite", 10, rng, min_spots=6)
    qb = _rich_orientations("NbC", 10, rng, min_spots=6)
    pa, _, _ = _render(qa, "ferrite", rng)
    pb, _, _ = _render(qb, "NbC", rng)
    res = M.match_patterns(np.concatenate([pa, pb]), 0.02, library, centers=np.full((20, 2), 72.0))
    cal = M.fit_phase_calibration(res, np.r_[np.zeros(10), np.ones(10)], library)
    assert cal["phases"] == ["ferrite", "NbC"] and cal["train_accuracy"] >= 0.8
    path = M.save_phase_calibration(cal, tmp_path / "c.json")
    assert M.load_phase_calibration(library, path)["coef"] == cal["coef"]
    library.phase_calibration = cal
    try:
        res2 = M.match_patterns(
            pa, 0.02, library, centers=np.full((10, 2), 72.0), normalization="calibrated"
        )
        assert (res2.phase_index == 0).mean() >= 0.8
    finally:
        library.phase_calibration = None


def test_truth_margin_separates_resolvable_patterns(library, rng):
    q = _rich_orientations("ferrite", 8, rng)
    refl = simulate.reflections("ferrite", 1.5)
    xy, inten, _ = simulate.kinematic_spots(refl, Rotation(q), kv=200, max_excitation_error=0.05)
    desc = D.template_descriptors(xy, inten, ST)
    # a pattern's own orientation fits it best: positive margin
    assert (M.truth_margin(desc, q, library, "ferrite") > 0).all()
    # told a wrong "truth" 30 deg away, the margin is negative: the real one is in the library
    from orix.quaternion import Rotation as R

    axis = rng.standard_normal((8, 3))
    wrong = M._qmul(q, R.from_axes_angles(axis, np.radians(30.0)).data)
    assert (M.truth_margin(desc, wrong, library, "ferrite") < 0).mean() >= 0.75
    with pytest.raises(ValueError, match="not in the library"):
        M.truth_margin(desc, q, library, "cementite")


def test_ipf_colours_best_solution_and_key():
    from orix.crystal_map import CrystalMap, PhaseList

    from temlib import plots

    q = Rotation.random((12, 3)).data
    q[0, 0] = [1.0, 0.0, 0.0, 0.0]  # identity first: beam along [001]

    def xmap(rot):
        return CrystalMap(
            rotations=Rotation(rot),
            phase_id=np.zeros(12, int),
            x=np.tile(np.arange(4), 3),
            y=np.repeat(np.arange(3), 4),
            phase_list=PhaseList(phases=[crystal.get_phase("ferrite")], ids=[0]),
        )

    several = plots.ipf_rgb(xmap(q))
    best = plots.ipf_rgb(xmap(q[:, 0]))
    assert several.shape == (3, 4, 3)
    np.testing.assert_allclose(several, best)
    np.testing.assert_allclose(best[0, 0], [1, 0, 0], atol=1e-6)  # cubic key: [001] is red


def test_agreement_table_planted(rng):
    """Identical and beam-flipped answers agree (0 deg); random answers do not; bins by reliability."""
    from temlib.synth import random_quaternions

    ferrite = crystal.get_phase("ferrite")
    q = random_quaternions(60, rng)
    flipped = M.beam_flip(Rotation(q)).data
    other = random_quaternions(60, rng)
    q_b = np.concatenate([flipped[:30], other[30:]])
    rel = np.r_[np.full(30, 30.0), np.full(30, 2.0)]  # agreeing half reliable, the rest not
    t = M.agreement_table(q, q_b, ferrite, rel)
    assert t.loc["25-100", "n"] == 30 and t.loc["25-100", "agree_median"] < 1e-3
    assert t.loc["25-100", "agree_<2"] == 1.0
    assert t.loc["0-5", "n"] == 30 and t.loc["0-5", "agree_<5"] < 0.2
    assert t.loc["all", "n"] == 60
    with pytest.raises(ValueError, match="expected one each"):
        M.agreement_table(q, q_b[:10], ferrite, rel)


def test_spot_overlay_draws_the_planted_spots(rng):
    """The overlay puts its markers on the spots of a pattern simulated at the same orientation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from temlib import plots

    q = _rich_orientations("ferrite", 1, rng)
    pats, xy, _ = _render(q, crystal.get_phase("ferrite"), rng, noise=False)
    fig, ax = plt.subplots()
    plots.spot_overlay(
        ax,
        pats[0],
        0.02,
        crystal.get_phase("ferrite"),
        {"truth": q[0]},
        kv=200,
        max_excitation_error=0.05,
    )
    offsets = ax.collections[0].get_offsets()
    plt.close(fig)
    assert len(offsets) >= 10
    r = np.clip(np.round(offsets[:, 1]).astype(int), 0, pats.shape[1] - 1)
    c = np.clip(np.round(offsets[:, 0]).astype(int), 0, pats.shape[2] - 1)
    on_spots = pats[0][r, c]
    inside = (
        (offsets[:, 0] > 2) & (offsets[:, 0] < 141) & (offsets[:, 1] > 2) & (offsets[:, 1] < 141)
    )
    background = np.median(pats[0])
    assert np.mean(on_spots[inside] > background + 5) > 0.9


@pytest.mark.parametrize("phase", ["ferrite", "NbC"])
def test_beam_flip_decided_from_the_curved_ewald_sphere(library, phase, rng):
    """Planted orientations come back strictly (not only modulo the 180-deg turn about the beam).

    The folded descriptor cannot tell R from R * Rz(180); the unfolded one can, because the
    curved Ewald sphere excites g and -g unequally off a zone axis. Flipping the planted
    orientations flips the answers with them.
    """
    q = _rich_orientations(phase, 16, rng)
    pid = library.names.index(phase)
    sym = library.phases[pid].symmetry
    centers = np.full((len(q), 2), 72.0)
    for planted in (q, M.beam_flip(Rotation(q)).data):
        pats, _, _ = _render(planted, phase, rng)
        res = M.match_patterns(pats, 0.02, library, centers=centers)
        flip_mod = M.misorientation_deg(res.quaternions[:, 0], planted, sym, modulo_flip=True)
        strict = M.misorientation_deg(res.quaternions[:, 0], planted, sym)
        ok = flip_mod < 3  # orientation found: now is it the right one of the pair?
        assert ok.sum() >= 10
        assert np.mean(strict[ok] < 3) >= 0.9, (strict, flip_mod)
        assert res.flip_confidence.shape == (len(q),) and (res.flip_confidence >= 0).all()
        assert (res.inplane[:, 0] >= 0).all() and (res.inplane[:, 0] < 360).all()
    # the folded matcher alone leaves the pair undecided: about half come back turned
    desc = D.pattern_descriptors(pats, 0.02, centers, library.settings)
    folded = M.match_descriptors(desc, library)
    strict_folded = M.misorientation_deg(folded.quaternions[:, 0], planted, sym)
    mod_folded = M.misorientation_deg(folded.quaternions[:, 0], planted, sym, modulo_flip=True)
    found = mod_folded < 3
    assert np.mean(strict_folded[found] > 10) > 0.15


def test_resolve_beam_flip_bad_shapes(library):
    pt = library.phases[0]
    with pytest.raises(ValueError, match="do not pair up"):
        M.resolve_beam_flip(
            np.zeros((3, 40, 90)), np.tile([1.0, 0, 0, 0], (3, 1)), pt.phase, library.settings
        )


def test_error_cdf_counts_a_wrong_phase_as_never_within():
    import matplotlib

    from temlib import plots

    matplotlib.use("Agg")
    fig = plots.error_cdf({"a": [0.1, 1.0, 3.0, np.nan], "b": [5.0, 25.0]}, max_deg=20)
    a, b = fig.axes[0].get_lines()[:2]
    x, y = a.get_data()
    assert y[np.searchsorted(x, 2.0)] == 0.5 and y[-1] == 0.75  # NaN never within
    x, y = b.get_data()
    assert y[np.searchsorted(x, 4.9)] == 0.0 and y[-1] == 0.5
    assert a.get_label() == "a (n=4)"
    with pytest.raises(ValueError, match="No errors to plot"):
        plots.error_cdf({})


def _tilted(q, deg, rng):
    """``q`` turned by ``deg`` about a random axis in the sample's x-y plane (the beam direction moves)."""
    phi = rng.uniform(0, 2 * np.pi, len(q))
    h = np.radians(deg) / 2
    t = np.stack(
        [np.full(len(q), np.cos(h)), np.sin(h) * np.cos(phi), np.sin(h) * np.sin(phi), 0 * phi], -1
    )
    return M._qmul(q, t)


def test_refinement_recovers_planted_orientations_below_the_library_step(library, rng):
    q = _rich_orientations("ferrite", 16, rng)
    pats, _, _ = _render(q, "ferrite", rng)
    desc = D.pattern_descriptors(pats, 0.02, np.full((len(q), 2), 72.0), ST)
    start = _tilted(q, 1.0, rng)  # a start one library step (1 deg) off
    sym = library.phases[0].symmetry
    q1, corr = M.refine_orientations(desc, start, "ferrite", ST, kv=200, excitation_error=0.05)
    before = M.misorientation_deg(start, q, sym, modulo_flip=True)
    after = M.misorientation_deg(q1, q, sym, modulo_flip=True)
    assert np.allclose(before, 1.0, atol=1e-6)
    assert np.median(after) < 0.25 and (after < 0.75).mean() >= 0.8, after
    _, c0 = M.refine_orientations(
        desc, start, "ferrite", ST, kv=200, excitation_error=0.05, steps=()
    )
    assert (corr >= c0 - 1e-6).all()  # the search only ever moves uphill


@pytest.mark.parametrize("relrod", [0.025, 0.06])
def test_fitted_excitation_error_is_the_planted_relrod(relrod, rng):
    q = _rich_orientations("ferrite", 40, rng)
    pats, _, _ = _render(q, "ferrite", rng, err=relrod)
    desc = D.pattern_descriptors(pats, 0.02, np.full((len(q), 2), 72.0), ST)
    start = _tilted(q, 0.5, rng)
    value, curve = M.fit_excitation_error(desc, start, "ferrite", ST, kv=200)
    assert abs(value - relrod) <= 0.006, (value, curve)
    assert len(curve["mean_correlation"]) == len(M.EXCITATION_ERRORS)


def test_refinement_bad_inputs(library):
    d = np.zeros((2, ST.n_r, ST.n_theta), np.float32)
    with pytest.raises(ValueError, match="do not pair up"):
        M.refine_orientations(d, np.tile([1.0, 0, 0, 0], (3, 1)), "ferrite", ST)
    with pytest.raises(ValueError, match="must be > 0"):
        M.refine_orientations(d, np.tile([1.0, 0, 0, 0], (2, 1)), "ferrite", ST, excitation_error=0)
    with pytest.raises(ValueError, match="increasing"):
        M.fit_excitation_error(
            d, np.tile([1.0, 0, 0, 0], (2, 1)), "ferrite", ST, values=(0.03, 0.02, 0.04)
        )
    with pytest.raises(ValueError, match="No patterns"):
        M.fit_excitation_error(d[:0], np.zeros((0, 4)), "ferrite", ST)
