"""Orientation regression, the symmetric loss, the hybrid refinement and streaming (plant and recover)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from orix.quaternion import Rotation

from temlib import _runtime, descriptors, io, regress, simulate, synth

PHASES = ("ferrite", "NbC", "cementite")
CLEAN = regress.Randomization(
    excitation=(0.04, 0.05),
    intensity_gamma=(0.8, 1.0),
    intensity_noise=0.1,
    spot_dropout=0.0,
    sigma=(0.02, 0.025),
    n_spots=(30, 40),
    template_gamma=(0.5, 0.5),
    noise=0.0,
    precession_deg=(0.0, 0.0),
)


def _random_rotation(n, deg, rng):
    axis = rng.standard_normal((n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return Rotation.from_axes_angles(axis, np.radians(deg)).data


def _template_desc(phase, q, settings, excitation=None):
    """Descriptors of clean simulated patterns (the library's relrod width unless given)."""
    exc = getattr(settings, "excitation_error", 0.05) if excitation is None else excitation
    refl = simulate.reflections(phase, g_max=1.5)
    xy, inten, _ = simulate.kinematic_spots(refl, Rotation(q), kv=200, max_excitation_error=exc)
    return descriptors.template_descriptors(xy, inten, settings)


def test_6d_round_trip(rng):
    q = synth.random_quaternions(50, rng)
    back = regress.matrices_to_quaternions(regress.from_6d(regress.to_6d(q)))
    assert np.allclose(np.abs((q * back).sum(1)), 1, atol=1e-6)


@pytest.mark.parametrize("phase", PHASES)
def test_symmetric_loss_zero_for_equivalents(phase, rng):
    keras = _runtime.keras()
    loss = regress.symmetric_loss(phase, eps=0.0)
    q = synth.random_quaternions(20, rng)
    sym = regress.proper_symmetry(phase)
    s = sym[rng.integers(0, len(sym), 20)]
    equiv = regress.qmul(s, q)  # the same orientation, another symmetry copy
    flipped = regress.qmul(equiv, regress.RZ180)  # and turned 180 deg about the beam
    other = regress.qmul(
        q, _random_rotation(20, 15.0, rng)
    )  # genuinely 15 deg away (small: no symmetry copy)

    def f(a, b):
        t = keras.ops.convert_to_tensor
        return np.asarray(loss.call(t(regress.to_6d(a)), t(regress.to_6d(b))))

    assert f(q, equiv).max() < 1e-3
    assert f(q, flipped).max() < 1e-3
    assert f(q, other).min() > 0.2  # 2 sqrt(2) sin(7.5 deg) = 0.37
    # serialisable (AutoKeras stores the loss with the trials)
    again = type(loss).from_config(loss.get_config())
    assert np.allclose(
        np.asarray(again.call(regress.to_6d(q), regress.to_6d(flipped))), 0, atol=1e-3
    )


@pytest.mark.parametrize("phase", ["ferrite", "NbC", "cementite"])
def test_fundamental_zone_is_orix_reduce(phase, rng):
    from orix.quaternion import Orientation

    from temlib import crystal

    q = Rotation.random(3000).data
    got = regress.reduce_to_fundamental_zone(q, phase)
    ref = Orientation(q, symmetry=crystal.get_phase(phase).point_group).reduce()
    np.testing.assert_allclose(got.data, ref.data, atol=1e-12)
    assert got.symmetry == ref.symmetry


def test_shift_augment_is_an_inplane_rotation(rng):
    st = descriptors.DescriptorSettings()
    q = synth.random_quaternions(6, rng)
    d = _template_desc("ferrite", q, st)
    shifted, q_shift = regress.shift_augment(d, q, n_shifts=1, rng=rng)
    direct = _template_desc("ferrite", q_shift, st)
    cos = (shifted * direct).sum(axis=(1, 2))
    assert cos.min() > 0.98


def test_canonicalize_removes_inplane_turns(rng):
    st = descriptors.DescriptorSettings()
    q = synth.random_quaternions(8, rng)
    d = _template_desc("NbC", q, st)
    d2, q2 = regress.shift_augment(d, q, n_shifts=1, rng=rng)
    c1, phi1 = regress.canonicalize(d)
    c2, phi2 = regress.canonicalize(d2)
    assert np.abs(c1 - c2).max() < 0.02 * np.abs(c1).max()
    # the canonical orientations R Rz(phi) agree (up to symmetry and the beam flip)
    e = regress.disorientation_deg(
        regress.qmul(q, regress.rz(phi1)),
        regress.qmul(q2, regress.rz(phi2)),
        "NbC",
        modulo_flip=True,
    )
    assert e.max() < 0.5


def test_every_architecture_of_the_space_fits_the_size_limit():
    # the search must never draw a network AutoKeras refuses as oversized
    import itertools

    from keras_tuner import HyperParameters

    keras = _runtime.keras()
    sp = regress.SearchSpace()
    block_cls = regress._descriptor_block()
    sizes = []
    for conv, filters, k, layers_, units in itertools.product(
        sp.conv_blocks, sp.filters, sp.kernel, sp.dense_layers, sp.dense_units
    ):
        block = block_cls()
        hp = HyperParameters()  # AutoKeras scopes a block's choices by the block's name
        for name, v in dict(
            conv_blocks=conv, filters=filters, kernel=k, dense_layers=layers_, dense_units=units
        ).items():
            hp.Fixed(f"{block.name}/{name}", v)
        inp = keras.Input((40, 90))
        out = keras.layers.Dense(6)(block.build(hp, inp))
        sizes.append(keras.Model(inp, out).count_params())
    print("sizes", sorted(set(sizes)))
    assert len(set(sizes)) > 4  # the choices took effect
    assert max(sizes) < 3_000_000


def test_search_starts_from_the_space_defaults(tmp_path):
    # the first trial is every choice's first value (not a random draw), and the time
    # limit ends a trial after the epoch that passes it
    st = descriptors.DescriptorSettings()
    x, q = regress.synthetic_set("ferrite", 600, st, randomization=CLEAN, n_shifts=2, rng=0)
    space = regress.SearchSpace(
        conv_blocks=(0, 1), dense_layers=(1, 2), dense_units=(32, 64), dropout=(0.0, 0.1)
    )
    reg = regress.search(
        x, q, "ferrite", st, max_trials=1, epochs=500, batch_size=64, space=space,
        directory=tmp_path, trial_seconds=1.0,
    )  # fmt: skip
    (trial,) = reg.metadata["search"]["trials"]
    hp = {k.split("/")[-1]: v for k, v in trial["hp"].items()}
    assert hp["conv_blocks"] == 0 and hp["dense_layers"] == 1 and hp["dense_units"] == 32
    assert hp["dropout"] == 0.0 and hp["learning_rate"] == space.learning_rate[0]
    assert 1 <= trial["epochs"] < 500  # stopped by the time limit (or early stopping)
    with pytest.raises(ValueError, match="time >= 0"):
        regress.search(x, q, "ferrite", st, trial_seconds=-1.0, directory=tmp_path)


def test_time_limit_stops_training():
    keras = _runtime.keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.zeros((8, 4), np.float32)
    hist = model.fit(x, x[:, :1], epochs=10_000, verbose=0, callbacks=[regress._time_limit(0.2)])
    assert 1 <= len(hist.history["loss"]) < 10_000


@pytest.fixture(scope="module")
def tiny_regressor(tmp_path_factory):
    st = descriptors.DescriptorSettings()
    x, q = regress.synthetic_set("ferrite", 6000, st, randomization=CLEAN, n_shifts=2, rng=0)
    folder = tmp_path_factory.mktemp("trials")
    space = regress.SearchSpace(  # one fixed small MLP: the test checks learning, not the search
        conv_blocks=(0,),
        dense_layers=(1,),
        dense_units=(256,),
        dropout=(0.0,),
        learning_rate=(1e-3,),
    )
    reg = regress.search(
        x, q, "ferrite", st, max_trials=1, epochs=4, batch_size=128, space=space, directory=folder
    )
    return reg, st


def test_regressor_beats_chance(tiny_regressor, rng):
    reg, st = tiny_regressor
    x, q = regress.synthetic_set("ferrite", 300, st, randomization=CLEAN, n_shifts=1, rng=99)
    err = regress.disorientation_deg(reg.predict(x), q, "ferrite", modulo_flip=True)
    chance = regress.disorientation_deg(
        synth.random_quaternions(300, rng), q, "ferrite", modulo_flip=True
    )
    print("median error", np.median(err), "chance", np.median(chance))
    assert np.median(err) < 0.5 * np.median(chance), (np.median(err), np.median(chance))
    # predictions are orientations in the fundamental zone with Bunge Euler angles
    o = reg.predict_orientation(x[:5])
    assert o.to_euler().shape == (5, 3)


def test_save_load_round_trip(tiny_regressor, tmp_path):
    reg, st = tiny_regressor
    x, _ = regress.synthetic_set("ferrite", 20, st, randomization=CLEAN, rng=1)
    path = regress.save_regressor(reg, tmp_path / "regressor_ferrite")
    back = regress.load_regressor(path)
    assert back.phase == "ferrite" and back.settings == st and back.canonical
    e = regress.disorientation_deg(reg.predict(x), back.predict(x), "ferrite")
    assert e.max() < 1e-3


def test_fine_tuning_is_kept_only_if_it_helps_on_the_other_map(tiny_regressor, monkeypatch):
    reg, st = tiny_regressor
    # two "maps" of the same four grains: fine-tuning on one must help on the other
    q = synth.random_quaternions(4, np.random.default_rng(5))
    x = _template_desc("ferrite", np.repeat(q, 30, axis=0), st)
    xa, qa = regress.shift_augment(x, np.repeat(q, 30, axis=0), 1, np.random.default_rng(6))
    first, second = (xa[::2], qa[::2]), (xa[1::2], qa[1::2])
    ft, check = regress.fine_tune_checked(reg, first, second, epochs=8, rng=0)
    assert check["checked"] and check["kept"] and ft is not reg
    print(check)
    assert check["held_out_median_after"] < check["held_out_median_before"], check
    # a fine-tuning that makes the other map worse is not kept: the regressor comes back
    worse = dataclasses.replace(reg)  # the same network, its predictions replaced below
    monkeypatch.setattr(worse, "predict", lambda d: synth.random_quaternions(len(d), 0))
    monkeypatch.setattr(regress, "fine_tune", lambda *a, **k: worse)
    back, check = regress.fine_tune_checked(reg, first, second, epochs=1, rng=0)
    assert back is reg and check["checked"] and not check["kept"]
    assert check["held_out_median_after"] > check["held_out_median_before"]
    # one map empty: nothing to check against, fine-tuned on what there is
    empty = (first[0][:0], first[1][:0])
    ft, check = regress.fine_tune_checked(reg, first, empty, epochs=1, rng=0)
    assert not check["checked"] and check["kept"] and ft is worse


def test_hybrid_refines_perturbed_seed(rng):
    from temlib import match

    # a fixed descriptor (the pre-tuning defaults), so the test does not move with the tuning
    st = descriptors.DescriptorSettings(r_min=0.3, n_spots=20, radial_weight=0.0)
    lib = match.build_library(["ferrite"], resolution=1.0, settings=st)
    local = regress.LocalTemplates.from_library(lib, "ferrite")
    # true orientations: library beam directions at random in-plane angles (recoverable exactly)
    pick = rng.choice(len(local.templates.quaternions), size=30, replace=False)
    q_true = regress.qmul(local.templates.quaternions[pick], regress.rz(-rng.uniform(0, 360, 30)))
    desc = _template_desc("ferrite", q_true, st)
    seeds = regress.qmul(q_true, _random_rotation(30, 3.0, rng))
    out = regress.hybrid_refine(desc, seeds, local, library=None, n_candidates=32)
    err = regress.disorientation_deg(out.quaternions, q_true, "ferrite", modulo_flip=True)
    tm = match.match_descriptors(desc, lib, n_best=1, normalization="none", n_keep=None)
    tm_err = regress.disorientation_deg(tm.quaternions[:, 0], q_true, "ferrite", modulo_flip=True)
    assert np.median(err) < 0.5, np.round(err, 2)
    ok = tm_err < 1  # where exhaustive template matching finds the truth, so does the hybrid
    assert (err[ok] < 1).mean() >= 0.9, (np.round(err, 2), np.round(tm_err, 2))
    # a hopeless seed is caught by the fallback rule and the full search takes over
    bad = regress.qmul(q_true[:6], _random_rotation(6, 25.0, rng))
    fb = regress.hybrid_refine(
        desc[:6], bad, local, library=lib, min_correlation=0.999, rim_fraction=0.8
    )
    assert fb.fallback.sum() >= 5
    full = match.match_descriptors(desc[:6], lib, n_best=1, normalization="none")
    same = regress.disorientation_deg(fb.quaternions, full.quaternions[:, 0], "ferrite")
    assert same[fb.fallback].max() < 0.01  # the fallbacks carry the full search's answer


def test_neighbourhood_restricts_the_search(rng):
    from temlib import match

    st = descriptors.DescriptorSettings(r_min=0.3, n_spots=20, radial_weight=0.0)
    lib = match.build_library(["ferrite"], resolution=1.0, settings=st)
    pt = lib.phases[0]
    pick = rng.choice(pt.size, size=12, replace=False)
    q_true = regress.qmul(pt.quaternions[pick], regress.rz(-rng.uniform(0, 360, 12)))
    # each template is its own nearest beam direction; more neighbours reach farther
    own, r1 = pt.nearest(q_true, 1)
    assert (
        own[np.arange(12), pick].all() and own.sum(axis=1).max() == 1 and r1.max() < 0.05
    )  # float32 arccos near 1
    mask, r64 = pt.nearest(q_true, 64)
    assert (mask.sum(axis=1) == 64).all() and 3 < np.median(r64) < 12
    desc = _template_desc("ferrite", q_true, st)
    near = match.match_descriptors(desc, lib, n_best=1, normalization="none", near=(q_true, 16))
    e_near = regress.disorientation_deg(near.quaternions[:, 0], q_true, "ferrite", modulo_flip=True)
    assert np.median(e_near) < 0.5
    # seeds 30 deg away with a small neighbourhood: the truth is not searched, the answer
    # stays near the seed (within the neighbourhood's radius)
    far = regress.qmul(q_true, _random_rotation(12, 30.0, rng))
    out = match.match_descriptors(desc, lib, n_best=1, normalization="none", near=(far, 16))
    d_seed = match.beam_direction_angle(far, out.quaternions[:, 0], pt.symmetry)
    assert (d_seed <= pt.nearest(far, 16)[1] + 1e-6).all()
    e_far = regress.disorientation_deg(out.quaternions[:, 0], q_true, "ferrite", modulo_flip=True)
    assert np.median(e_far) > 5


class _Seeds:
    """A stand-in regressor: predicts given orientations (to plant seeds of known quality)."""

    def __init__(self, phase, q):
        self.phase, self.q = phase, q

    def predict(self, desc):
        return self.q[: len(desc)]


def test_calibrated_hybrid_follows_seed_quality(rng):
    """Good seeds: a small neighbourhood and few fallbacks; random seeds: the full search's cost."""
    from temlib import match

    st = descriptors.DescriptorSettings(r_min=0.3, n_spots=20, radial_weight=0.0)
    lib = match.build_library(["ferrite"], resolution=1.0, settings=st)
    local = regress.LocalTemplates.from_library(lib, "ferrite")
    pick = rng.choice(local.size, size=40, replace=False)
    q_true = regress.qmul(local.templates.quaternions[pick], regress.rz(-rng.uniform(0, 360, 40)))
    desc = _template_desc("ferrite", q_true, st)
    good = _Seeds("ferrite", regress.qmul(q_true, _random_rotation(40, 1.0, rng)))
    poor = _Seeds("ferrite", synth.random_quaternions(40, rng))
    cal_good = regress.calibrate_hybrid(good, desc, q_true, local)
    cal_poor = regress.calibrate_hybrid(poor, desc, q_true, local)
    assert cal_good["n_candidates"] <= 32 and cal_good["fallback"] <= 0.1
    assert cal_good["cost"] < 0.1
    assert cal_poor["cost"] > 0.5  # a big neighbourhood or most patterns sent to the full search
    # the fallback threshold and the neighbourhood it returns reproduce its accuracy
    h = regress.hybrid_refine(
        desc,
        poor.predict(desc),
        local,
        lib,
        n_candidates=cal_poor["n_candidates"],
        min_correlation=cal_poor["min_correlation"],
    )
    assert abs(h.fallback.mean() - cal_poor["fallback"]) < 1e-9


def test_index_stream_iterator_folder_and_growing_file(tiny_regressor, tmp_path):
    reg, st = tiny_regressor
    m = synth.steel_maps("ci", show_progressbar=False)["test"]
    sig = m.load()
    cal = io.calibration_of(sig)
    pats = np.asarray(sig.data.reshape(-1, *sig.data.shape[2:])[:48].compute())
    models = regress.Models(["ferrite"], {"ferrite": reg}, None, None, {"ferrite": "ml"}, st)
    calls = []
    xmap, info = regress.index_stream(
        iter(np.split(pats, 4)),
        (6, 8),
        cal,
        models,
        callback=lambda x, n, i: calls.append(n),
        refresh_s=0,
    )
    assert xmap.shape == (6, 8) and calls == [12, 24, 36, 48]
    # callbacks at most every refresh_s, and always after the last chunk (a stream that
    # ends before the scan is full too)
    calls.clear()
    regress.index_stream(
        iter(np.split(pats, 4)[:3]),
        (6, 8),
        cal,
        models,
        callback=lambda x, n, i: calls.append(n),
        refresh_s=1e6,
    )
    assert calls == [12, 36]
    assert (xmap.phase_id == 0).all() and (xmap.prop["branch"] == 0).all()
    # folder of chunk files
    folder = tmp_path / "chunks"
    folder.mkdir()
    for k, part in enumerate(np.split(pats, 3)):
        np.save(folder / f"chunk_{k:03d}.npy", part)
    xmap2, _ = regress.index_stream(folder, (6, 8), cal, models, timeout=5)
    assert np.allclose(xmap2.rotations.data, xmap.rotations.data, atol=1e-5)
    # raw frame file (as a detector appends it)
    raw = tmp_path / "frames.raw"
    raw.write_bytes(pats.astype(np.uint8).tobytes())
    xmap3, _ = regress.index_stream(raw, (6, 8), cal, models, frame_shape=pats.shape[1:], timeout=5)
    assert np.allclose(xmap3.rotations.data, xmap.rotations.data, atol=1e-5)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="Unknown phase 'steel'"):
        regress.parse_phases("steel")
    assert regress.parse_phases("all") == list(PHASES)
    with pytest.raises(FileNotFoundError, match="No regressor in"):
        regress.load_regressor(tmp_path)
    with pytest.raises(ValueError, match="Unknown tuner"):
        regress.search(
            np.zeros((20, 40, 90)), np.tile([1.0, 0, 0, 0], (20, 1)), "ferrite", tuner="best"
        )
    with pytest.raises(ValueError, match="do not pair up"):
        regress.hybrid_refine(np.zeros((3, 40, 90)), np.zeros((2, 4)), None)
    with pytest.raises(ValueError, match="needs frame_shape"):
        regress.index_stream(tmp_path / "growing.raw", (2, 2), 0.02, None)
    with pytest.raises(ValueError, match="Unknown method 'fast'"):
        regress.load_models("fast")
    with pytest.raises(NotADirectoryError, match="No chunk folder"):
        next(regress.iter_folder(tmp_path / "missing", 4))
    with pytest.raises(ValueError, match="not a stack"):
        regress.index_patterns(np.zeros((8, 8)), 0.02, None)


def test_goals_table_reads_the_comparison():
    import pandas as pd

    comp = pd.DataFrame(
        [
            {
                "method": "hybrid",
                "phase": "all",
                "flip median": 0.4,
                "flip <2": 0.9,
                "resolvable": 0.8,
            },
            {"method": "ml", "phase": "all", "flip median": 1.5, "flip <2": 0.6},
            {"method": "tm", "phase": "all", "flip median": 0.3, "flip <2": 0.97},
            {"method": "ml", "phase": "ferrite", "flip median": 9.0, "flip <2": 0.1},
        ]
    )
    g = regress.goals_table(comp).set_index("goal")
    assert g.loc["hybrid median (deg)", "met"] and not g.loc["hybrid fraction < 2 deg", "met"]
    assert g.loc["ML median (deg)", "measured"] == 1.5 and g.loc["ML median (deg)", "met"]
    assert g.loc["resolvable pixels (ceiling), for reference", "measured"] == 0.8


def test_index_patterns_fits_the_relrod_and_refines_below_the_library_step(rng):
    """Patterns drawn with relrods longer than the library's: the hybrid's answers, refined
    with the relrod fitted on the first chunk, land closer to the planted orientations."""
    from temlib import match

    st = descriptors.DescriptorSettings(r_min=0.15, excitation_error=0.03)
    lib = match.build_library(["ferrite"], resolution=1.0, settings=st)
    refl = simulate.reflections("ferrite", 1.5)
    q = synth.random_quaternions(4000, rng)
    xy, inten, _ = simulate.kinematic_spots(refl, Rotation(q), kv=200, max_excitation_error=0.055)
    r = np.hypot(xy[..., 0], xy[..., 1])
    rich = ((inten > 0) & (r > st.r_min) & (r < st.r_max)).sum(axis=1) >= 12  # unambiguous ones
    q_true, xy, inten = q[rich][:48], xy[rich][:48], inten[rich][:48]
    pats = rng.poisson(descriptors.render_spots(xy, inten, calibration=0.02, gamma=0.5) * 60 + 4)
    centers = np.full((len(q_true), 2), 72.0)
    seeds = _Seeds("ferrite", regress.qmul(q_true, _random_rotation(len(q_true), 3.0, rng)))
    err = {}
    for refine in (False, True):
        models = regress.Models(
            ["ferrite"], {"ferrite": seeds}, None, lib, {"ferrite": "hybrid"}, st, refine=refine
        )
        regress.index_patterns(pats[:8], 0.02, models, np.zeros(8, int), centers[:8])
        assert models.excitation_error == {}  # too few patterns to fit on
        out = regress.index_patterns(pats, 0.02, models, np.zeros(len(pats), int), centers)
        err[refine] = regress.disorientation_deg(out.quaternions, q_true, "ferrite")
    assert abs(models.excitation_error["ferrite"] - 0.055) < 0.01, models.excitation_error
    assert np.median(err[True]) < 0.6 * np.median(err[False]), (
        np.median(err[True]),
        np.median(err[False]),
    )
    assert np.median(err[True]) < 0.4
