"""Tests of temlib.classify: preprocessing geometry (planted spots), labels, scores, the
architecture search on the ci profile, save / reload, streaming, rotation invariance, CLI."""

from __future__ import annotations

import numpy as np
import pytest

from temlib import _runtime, classify, cli, config, synth


def planted(
    calibration=0.02, center=(70.3, 75.8), size=144, g=0.5, angle_deg=30.0, extra=(), sigma=1.2
):
    """A spot pattern: saturated direct beam at ``center`` (row, col), a Friedel pair at |k| = g
    (1/Å) and azimuth ``angle_deg``, more pairs in ``extra`` ((g, angle), ...), a halo, noise."""
    rng = np.random.default_rng(0)
    rr, cc = np.mgrid[0:size, 0:size].astype(float)
    img = 3.0 + 20.0 * np.exp(-np.hypot(rr - center[0], cc - center[1]) * calibration / 0.3)
    img += 250.0 * np.exp(-((rr - center[0]) ** 2 + (cc - center[1]) ** 2) / (2 * 2.5**2))
    for gg, a in ((g, angle_deg), *extra):
        for s in (1, -1):
            r = center[0] - s * gg * np.sin(np.deg2rad(a)) / calibration
            c = center[1] + s * gg * np.cos(np.deg2rad(a)) / calibration
            img += 120.0 * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * sigma**2))
    img += rng.normal(0, 1.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def peak_row_col(x):
    return np.unravel_index(np.argmax(x), x.shape)


# --------------------------------------------------------------------------------------
# Preprocessing (no TensorFlow)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "calibration, center, size",
    [(0.02, (70.3, 75.8), 144), (0.0325, (60.0, 66.5), 128), (0.015, (100.2, 95.0), 200)],
)
def test_polar_input_puts_a_spot_at_its_d_spacing_whatever_the_camera(calibration, center, size):
    prep = classify.Preprocessing(size=64, k_max=1.3)
    pat = planted(calibration, center, size, g=0.7, angle_deg=40.0)
    x = classify.preprocess(pat, calibration, prep)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() == pytest.approx(1.0)
    row, col = peak_row_col(x[0])
    assert abs((row + 0.5) * prep.working_calibration - 0.7) <= 1.5 * prep.working_calibration
    # azimuth: image rows point down, so the spot at +40 deg (up and right) is at -40 = 140 deg
    assert abs((col + 0.5) * 180 / 64 - 140.0) <= 180 / 64 * 1.5


def test_polar_sampling_equals_filter_then_bilinear(rng):
    # the compiled one-pass sampler against SciPy's Gaussian + io.sample_about + bin means,
    # with a calibration per pattern (augmentation) and a centre near the edge
    from scipy import ndimage

    from temlib import io

    prep = classify.Preprocessing(size=32, k_max=1.3, oversample=3)
    pats = np.stack(
        [
            planted(0.02, c, 144, g=0.6, angle_deg=a)
            for c, a in [((70.3, 75.8), 20), ((20.5, 30.2), 75)]
        ]
    ).astype(np.float32)
    cal = np.array([0.02, 0.0213])
    centers = np.array([[70.3, 75.8], [20.5, 30.2]])
    got = classify._to_polar(pats, centers, cal, prep)
    size, o = prep.size, prep.oversample
    k = (np.arange(size) + 0.5) * prep.working_calibration
    t = (np.arange(2 * size * o) + 0.5) / (size * o) * np.pi
    sigma = 0.5 * prep.working_calibration / np.median(cal)
    blurred = ndimage.gaussian_filter(pats, sigma=(0, sigma, sigma), truncate=3.0)
    v = io.sample_about(
        blurred, centers, np.outer(k, np.sin(t)).ravel(), np.outer(k, np.cos(t)).ravel(), 1 / cal
    )
    ref = v.reshape(2, size, 2, size, o).mean(axis=(2, 4))
    assert ref.max() > 10  # spots in it
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-5)


def test_cartesian_input_is_centred_on_the_beam():
    prep = classify.Preprocessing(size=64, k_max=1.3, geometry="cartesian")
    a = classify.preprocess(planted(0.02, (70.3, 75.8), 144), 0.02, prep)[0]
    b = classify.preprocess(planted(0.03, (60.0, 66.0), 128), 0.03, prep)[0]
    ra, ca = peak_row_col(a)
    rb, cb = peak_row_col(b)
    assert abs(ra - rb) <= 1 and abs(ca - cb) <= 1
    k = np.hypot(ra - 32, ca - 32) * prep.working_calibration
    assert k == pytest.approx(0.5, abs=1.5 * prep.working_calibration)
    assert a[30:35, 30:35].max() == 0  # the direct beam is masked


def test_a_turn_about_the_beam_is_an_azimuth_shift():
    prep = classify.Preprocessing(size=64)
    pat = planted(extra=((0.9, 100.0), (1.1, 160.0)))
    x0 = classify.preprocess(pat, 0.02, prep)[0]
    x1 = classify.preprocess(classify.rotate_patterns(pat, 45.0), 0.02, prep)[0]
    corr = [float((x0 * np.roll(x1, s, axis=1)).sum()) for s in range(64)]
    shift = int(np.argmax(corr))
    assert min(abs(shift - 16), 64 - abs(shift - 16)) <= 1  # 45 deg of 180 = 16 columns
    assert max(corr) > 0.8 * float((x0 * x0).sum())


def test_camera_jitter_changes_looks_not_geometry():
    pat = np.repeat(planted()[None], 4, axis=0)
    out, scale, shift = classify.camera_jitter(pat, rng=1)
    assert out.shape == pat.shape and scale.shape == (4,) and shift.shape == (4, 2)
    assert np.all(np.abs(scale - 1) <= 0.015) and not np.allclose(out[0], out[1])
    same, s0, _ = classify.camera_jitter(pat, rng=1, strength=0)
    assert np.allclose(s0, 1) and np.allclose(
        same, pat - pat.min(axis=(1, 2), keepdims=True), atol=0.01
    )


@pytest.mark.parametrize(
    "patterns, calibration, message",
    [
        (np.zeros((2, 3, 4, 5)), 0.02, r"shape \(2, 3, 4, 5\) are invalid; expected \(N, ky, kx\)"),
        (np.full((1, 8, 8), np.nan), 0.02, "NaN or infinite"),
        (np.zeros((1, 8, 8)), 0.0, "Calibration 0.0 is not positive"),
        (np.zeros((1, 8, 8)), "x", "Calibration 'x' is not a number"),
        (np.zeros((1, 8, 8), complex), 0.02, "expected real numbers"),
    ],
)
def test_preprocess_bad_inputs(patterns, calibration, message):
    with pytest.raises(ValueError, match=message):
        classify.preprocess(patterns, calibration)


def test_preprocessing_validates_and_round_trips():
    with pytest.raises(ValueError, match="Unknown geometry 'log-polar'"):
        classify.Preprocessing(geometry="log-polar")
    with pytest.raises(ValueError, match="Unknown intensity mapping 'sqrt'"):
        classify.Preprocessing(intensity="sqrt")
    with pytest.raises(ValueError, match="Input size 4 is invalid"):
        classify.Preprocessing(size=4)
    p = classify.Preprocessing(size=48, k_max=1.2, geometry="cartesian")
    d = p.to_dict()
    assert d["working_calibration"] == pytest.approx(0.05)
    assert classify.Preprocessing.from_dict(d) == p


# --------------------------------------------------------------------------------------
# Labels, splits and scores
# --------------------------------------------------------------------------------------


def test_labels_from_crystal_map_and_arrays():
    from orix.crystal_map import CrystalMap, Phase, PhaseList
    from orix.quaternion import Rotation

    ids = np.array([[0, 1, 2], [2, 1, -1]])
    phases = PhaseList(
        names=["ferrite", "cementite", "austenite"], space_groups=[229, 62, 225], ids=[0, 1, 2]
    )
    xmap = CrystalMap(
        Rotation.identity(6), phase_id=ids.ravel(), x=np.tile(np.arange(3.0), 2),
        y=np.repeat(np.arange(2.0), 3), phase_list=phases,
    )  # fmt: skip
    assert isinstance(phases["ferrite"], Phase)
    pid, w = classify.labels_from(xmap, ("ferrite", "NbC", "cementite"))
    # ferrite -> 0, cementite -> 2, austenite (not a class) and not indexed -> -1
    np.testing.assert_array_equal(pid, [[0, 2, -1], [-1, 2, -1]])
    assert w.shape == (2, 3) and np.all(w == 1)
    with pytest.raises(ValueError, match=r"cover a \(2, 3\) scan; the map is \(4, 4\)"):
        classify.labels_from(ids, nav_shape=(4, 4))
    with pytest.raises(ValueError, match="expected an \\(H, W\\) integer array"):
        classify.labels_from(np.zeros(5))


def test_labels_from_synthetic_truth():
    m = synth.steel_maps("ci", show_progressbar=False)["train2"]
    pid, w = classify.labels_from(m)
    t = m.truth_arrays()
    np.testing.assert_array_equal(pid, t["phase_id"])
    # a classifier of two phases: ferrite keeps its index, cementite becomes 1, NbC unknown
    pid2, _ = classify.labels_from(m, ("ferrite", "cementite"))
    np.testing.assert_array_equal(pid2[t["phase_id"] == 2], 1)
    assert np.all(pid2[t["phase_id"] == 1] == -1)
    assert np.all((w > 0) & (w <= 1))


def test_split_is_stratified_and_class_weights_balance():
    y = np.array([0] * 80 + [1] * 15 + [2] * 5)
    d = classify.Dataset(
        np.zeros((100, 4, 4), np.float32), y, np.ones(100), np.zeros(100, int),
        np.arange(100), np.arange(100), ("a", "b", "c"),
    )  # fmt: skip
    tr, va = classify.split(d, 0.2, rng=0)
    assert va.counts() == {"a": 16, "b": 3, "c": 1} and len(tr) == 80
    w = classify.class_weights(y, 4)
    assert w[3] == 0 and w[0] * 80 == pytest.approx(w[2] * 5)
    with pytest.raises(ValueError, match="Validation fraction 1.5 is invalid"):
        classify.split(d, 1.5)


def test_scores_reliability_and_error_flagging():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    s = classify.scores(y, p, ("a", "b", "c"))
    assert s["accuracy"] == pytest.approx(6 / 8)
    np.testing.assert_array_equal(s["confusion"], [[3, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert s["per_phase"]["a"]["recall"] == pytest.approx(0.75)
    assert s["per_phase"]["b"]["precision"] == pytest.approx(2 / 3)
    f1 = [2 * 0.75 * 0.75 / 1.5, 2 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 / 1.5]
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    proba = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(classify.reliability(proba), [0.85, 0.05])
    correct = np.array([True] * 6 + [False] * 2)
    rel = np.array([0.9, 0.8, 0.95, 0.7, 0.85, 0.99, 0.1, 0.2])  # wrong ones least reliable
    f = classify.error_flagging(rel, correct)
    assert f["auc"] == pytest.approx(1.0) and f["accuracy"][-1] == 1.0 and f["coverage"][0] == 1.0
    assert classify.error_flagging(1 - rel, correct)["auc"] == pytest.approx(0.0)


# --------------------------------------------------------------------------------------
# Architecture search, saving, streaming (TensorFlow; ci maps)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci_data():
    cfg = config.load("03_classification", "ci")
    maps = synth.steel_maps("ci", show_progressbar=False)
    prep = classify.Preprocessing(
        size=cfg.image_size, k_max=cfg.k_max, radius_channel=cfg.radius_channel
    )
    train = classify.dataset(
        [maps["train1"], maps["train2"]], None, tuple(cfg.phases), prep,
        min_weight=cfg.train_min_weight, max_per_class=cfg.max_per_class, jitter=cfg.jitter,
        rng=0, show_progressbar=False,
    )  # fmt: skip
    tr, va = classify.split(train, cfg.val_fraction, rng=0)
    return cfg, maps, prep, tr, va


@pytest.fixture(scope="module")
def tiny(ci_data, tmp_path_factory):
    """A search with the ci budget (1 trial, 1 epoch), end to end."""
    cfg, maps, prep, tr, va = ci_data
    assert (cfg.max_trials, cfg.epochs) == (1, 1)
    folder = tmp_path_factory.mktemp("search")
    res = classify.search(
        tr, va, augment=True, max_trials=cfg.max_trials, epochs=cfg.epochs,
        batch_size=cfg.batch_size, patience=cfg.patience, learning_rate=cfg.learning_rate,
        directory=folder, prep=prep, seed=0,
    )  # fmt: skip
    return res


def two_phase_patterns(angles, rng):
    """Planted 'phases': spot pairs at |k| = 0.5 and 0.9 1/Å (phase 0) or 0.7 and 1.1 (phase 1),
    60 deg apart, first pair at each of ``angles``; camera centre and calibration vary."""
    pats, ys = [], []
    for i, a in enumerate(angles):
        y = i % 2
        g1, g2 = (0.5, 0.9) if y == 0 else (0.7, 1.1)
        center = (72 + rng.uniform(-3, 3), 72 + rng.uniform(-3, 3))
        pats.append(planted(0.02, center, 144, g=g1, angle_deg=a, extra=((g2, a + 60),)))
        ys.append(y)
    return np.stack(pats), np.array(ys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A network trained with rotation augmentation on planted patterns seen only at
    azimuths 0-20 deg (few orientations, like the minority phases of the training maps)."""
    import keras
    import tensorflow as tf

    # the same training whatever ran before: Python, NumPy and TF seeds, deterministic ops
    keras.utils.set_random_seed(1)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(5)
    prep = classify.Preprocessing(size=32)
    pats, y = two_phase_patterns(rng.uniform(0, 20, 160), rng)
    # random camera effects, as the real training draws them (a network that never saw a
    # blurred spot calls the interpolated, blurred spots of a turned pattern the other phase)
    pats, scale, shift = classify.camera_jitter(pats, rng, 1.0)
    x = classify.preprocess(pats, 0.02, prep, scale=scale, shift=shift)
    d = classify.Dataset(
        x,
        y,
        np.ones(len(y)),
        np.zeros(len(y), int),
        np.arange(len(y)),
        np.zeros(len(y), int),
        ("a", "b"),
    )
    tr, va = classify.split(d, 0.25, rng=0)
    space = classify.SearchSpace(
        kernel_size=(3,), num_blocks=(2,), num_layers=(1,), filters=(16,), dropout=(0.0,)
    )
    res = classify.search(
        tr, va, augment=True, max_trials=1, epochs=25, batch_size=16, patience=25,
        space=space, directory=tmp_path_factory.mktemp("trained"), prep=prep, seed=1,
    )  # fmt: skip
    return res.classifier


def test_tiny_search_runs_end_to_end(tiny, ci_data):
    cfg, maps, prep, tr, va = ci_data
    clf = tiny.classifier
    assert len(tiny.trials) == 1 and tiny.seconds > 0 and tiny.directory.is_dir()
    assert clf.phases == list(cfg.phases)
    meta = clf.metadata
    assert meta["preprocessing"]["size"] == cfg.image_size
    assert meta["training_data_hash"] == tr.digest() and meta["n_train"] == len(tr)
    raw = classify.read_patterns(maps["test"].load(), [0, 5, 23], [0, 7, 23])
    p = clf.predict_proba(raw, 0.02)
    assert p.shape == (3, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    table = tiny.trials_table()
    assert len(table) == 1 and "val_accuracy" in table and "conv_block_1/num_blocks" in table


def test_saved_model_predicts_the_same(tiny, ci_data, tmp_path):
    cfg, maps, prep, tr, va = ci_data
    folder = classify.save_classifier(tiny.classifier, tmp_path / "clf")
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "model.keras"]
    back = classify.load_classifier(folder)
    assert back.phases == tiny.classifier.phases and back.preprocessing == prep
    signal = maps["test"].load()
    raw = classify.read_patterns(signal, np.arange(10), np.arange(10))
    cal = float(signal.axes_manager.signal_axes[0].scale)
    np.testing.assert_allclose(
        back.predict_proba(raw, cal), tiny.classifier.predict_proba(raw, cal), atol=1e-6
    )
    # batched or not, the same answer
    np.testing.assert_allclose(
        back.predict_proba(raw, cal, batch_size=3), back.predict_proba(raw, cal), atol=1e-6
    )
    # streaming over the lazy map in blocks gives what the patterns give one by one
    pid, proba = classify.classify_map(signal, back, chunk=10, show_progressbar=False)
    assert pid.shape == (24, 24) and proba.shape == (24, 24, 3)
    np.testing.assert_allclose(
        proba[np.arange(10), np.arange(10)], back.predict_proba(raw, cal), atol=1e-5
    )


def test_bfloat16_network_gives_the_float32_phases(tiny, ci_data, monkeypatch):
    cfg, maps, prep, tr, va = ci_data
    signal = maps["test"].load()
    raw = classify.read_patterns(signal, np.arange(24), np.arange(24))
    cal = float(signal.axes_manager.signal_axes[0].scale)
    clf = tiny.classifier
    f32 = clf.predict_proba(raw, cal)
    clf.bfloat16 = True
    try:
        bf = clf.predict_proba(raw, cal)
        # where OpenVINO or the CPU's bfloat16 is missing, the float32 network answers
        monkeypatch.setattr(_runtime, "bfloat16_inference", lambda model: None)
        fallback = clf.predict_proba(raw, cal)
    finally:
        clf.bfloat16 = False
    assert bf.dtype == np.float32 and bf.shape == f32.shape
    np.testing.assert_allclose(bf.sum(axis=1), 1, atol=1e-2)
    np.testing.assert_allclose(bf, f32, atol=2e-2)
    assert (bf.argmax(axis=1) == f32.argmax(axis=1)).mean() >= 0.9
    np.testing.assert_array_equal(fallback, f32)


def test_load_classifier_missing_says_how_to_train(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="train the default one with `make report NB=03_classification`"
    ):
        classify.load_classifier(tmp_path)
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    (tmp_path / "classifier.json").write_text('{"phases": ["a"], "preprocessing": {}}')
    with pytest.raises(ValueError, match="Cannot load the classifier"):
        classify.load_classifier(tmp_path)


def test_search_bad_inputs(ci_data):
    cfg, maps, prep, tr, va = ci_data
    with pytest.raises(ValueError, match="Unknown tuner 'grid'"):
        classify.search(tr, va, tuner="grid")
    with pytest.raises(ValueError, match="max_trials=0"):
        classify.search(tr, va, max_trials=0)
    with pytest.raises(ValueError, match="Preprocessing size 64 differs"):
        classify.search(tr, va, prep=classify.Preprocessing(size=64))


def test_augmentation_layer_turns_polar_patterns():
    layer = classify._layers()["RandomAzimuth"](mirror=True, seed=3)
    x = np.random.default_rng(0).random((6, 8, 16, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    for i in range(6):  # each sample is a cyclic shift of the azimuth axis, maybe mirrored
        options = [np.roll(x[i], s, axis=1) for s in range(16)]
        options += [np.roll(x[i][:, ::-1], s, axis=1) for s in range(16)]
        assert any(np.array_equal(y[i], o) for o in options)


def test_rotated_inputs_give_the_same_phase_with_augmentation(trained):
    rng = np.random.default_rng(11)
    pats, y = two_phase_patterns(rng.uniform(0, 20, 40), rng)
    table = classify.rotation_consistency(
        {"aug": trained}, pats, 0.02, angles=(0, 37, 90, 143), labels=y
    )
    same = table.set_index("angle (deg)")
    assert same.loc[0, "accuracy"] >= 0.95, table
    # turned far outside the training azimuths, the phase holds
    assert same["same phase"].min() >= 0.95, table
    assert same["accuracy"].min() >= 0.9, table


def test_cli_classify(tiny, ci_data, tmp_path, capsys):
    cfg, maps, prep, tr, va = ci_data
    folder = classify.save_classifier(tiny.classifier, tmp_path / "clf")
    out = tmp_path / "phases.npz"
    rc = cli.main(
        ["classify", str(maps["test"].folder), "--model", str(folder), "--out", str(out), "--quiet"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "ferrite" in text and "reliability" in text
    with np.load(out) as f:
        assert f["phase_id"].shape == (24, 24) and f["probabilities"].shape == (24, 24, 3)
        assert list(f["phases"]) == list(cfg.phases)
    rc = cli.main(
        ["classify", str(maps["test"].folder), "--model", str(tmp_path / "none"), "--quiet"]
    )
    assert rc == 2
    assert "No phase classifier in" in capsys.readouterr().err


def test_preprocess_rejects_non_finite_centres():
    with pytest.raises(ValueError, match="finite"):
        classify.preprocess(
            np.zeros((2, 64, 64), np.uint8), 0.02, centers=np.array([[32.0, 32.0], [np.nan, 3.0]])
        )
