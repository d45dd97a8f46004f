import numpy as np
import pytest
from orix.quaternion import Rotation
from skimage.feature import peak_local_max

from temlib import synth


def test_rendered_zone_axis_shows_expected_spots():
    """Ferrite with the beam along [001]: {110} and {200} spots land where the geometry says."""
    cam = synth.Camera(precession_deg=0.0, perturbation=0.0, center_jitter=0.0)
    centre = np.array([[70.3, 73.6]])
    p = synth.simulate_patterns("ferrite", Rotation.identity(), cam, centers=centre, rng=1)[
        0
    ].astype(float)
    a = 2.8665
    expected = []
    for h, k in [(1, 1), (1, -1), (-1, 1), (-1, -1), (2, 0), (-2, 0), (0, 2), (0, -2)]:
        expected.append(
            centre[0] + np.array([k, h]) / a / cam.calibration
        )  # (row, col) = centre + (y, x)/cal
    expected = np.array(expected)
    peaks = peak_local_max(
        p, min_distance=4, threshold_abs=p.mean() + 6 * p.std() / 4, exclude_border=False
    )
    for e in expected:
        d = np.min(np.hypot(*(peaks - e).T))
        assert d <= 1.0, f"no spot within 1 px of {e}"
    # no spot at the extinct (100) position
    r, c = np.round(centre[0] + np.array([0, 1 / a / cam.calibration])).astype(int)
    assert p[r, c] < np.percentile(p, 99)


def test_beam_centre_and_saturated_direct_beam():
    from temlib import io

    cam = synth.Camera()
    centres = np.array([[69.4, 74.2], [72.0, 71.5], [75.3, 68.8]])
    pats = synth.simulate_patterns(
        "NbC",
        Rotation.from_axes_angles([[1, 0, 0]] * 3, [0.1, 0.5, 1.0]),
        cam,
        centers=centres,
        rng=2,
    )
    assert pats.dtype == np.uint8 and pats.max() == 255  # 8-bit, saturated direct beam
    np.testing.assert_allclose(io.find_direct_beam(pats), centres, atol=0.35)


def test_generate_map_deterministic_and_truth(tmp_path):
    a = synth.generate_map(
        tmp_path / "a", shape=(10, 12), n_grains=4, seed=7, show_progressbar=False
    )
    b = synth.generate_map(
        tmp_path / "b", shape=(10, 12), n_grains=4, seed=7, show_progressbar=False
    )
    da, db = a.load().data.compute(), b.load().data.compute()
    assert da.shape == (10, 12, 144, 144) and da.dtype == np.uint8
    np.testing.assert_array_equal(da, db)
    t = a.truth_arrays()
    xmap = a.truth()
    assert xmap.shape == (10, 12)
    np.testing.assert_array_equal(xmap.phase_id.reshape(10, 12), t["phase_id"])
    np.testing.assert_allclose(
        np.abs(xmap.rotations.data), np.abs(t["quaternions"].reshape(-1, 4)), atol=1e-6
    )
    assert set(np.unique(t["phase_id"])) <= {0, 1, 2}
    assert (t["weight"][t["second"] >= 0] < 1).all() and (t["weight"][t["second"] < 0] == 1).all()
    assert (a.folder / "truth.ang").is_file()
    assert not list(tmp_path.glob("*.tmp*")), "temporary folders left behind"


def test_test_map_orientations_are_new(tmp_path):
    train = synth.generate_map(
        tmp_path / "train", shape=(12, 12), n_grains=6, seed=1, show_progressbar=False
    )
    avoid = synth.region_orientations([train])
    test = synth.generate_map(
        tmp_path / "test",
        shape=(12, 12),
        n_grains=6,
        seed=2,
        avoid=avoid,
        min_misorientation=12.0,
        show_progressbar=False,
    )
    got = synth.region_orientations([test])
    for phase, q in got.items():
        if len(q) and len(avoid[phase]):
            assert synth.min_disorientation(q, avoid[phase], phase).min() >= 12.0
    assert test.spec["test_rule"]["min_misorientation_deg"] == 12.0


def test_second_test_map_keeps_away_from_training(tmp_path):
    maps = {
        n: synth.generate_map(
            tmp_path / n, shape=(10, 10), n_grains=4, seed=i, show_progressbar=False
        )
        for i, n in enumerate(("train1", "train2", "test"))
    }
    second = synth.second_test_map(maps, (12, 12), seed=5)
    assert second.folder == tmp_path / "test_second"
    assert second.truth_arrays()["phase_id"].shape == (12, 12)
    avoid, got = (
        synth.region_orientations([maps["train1"], maps["train2"]]),
        synth.region_orientations([second]),
    )
    for phase, q in got.items():
        if len(q) and len(avoid[phase]):
            assert synth.min_disorientation(q, avoid[phase], phase).min() >= 10.0


def test_min_disorientation_sees_symmetry_and_beam_flip():
    q = Rotation.from_axes_angles([0, 0, 1], np.deg2rad(3)).data
    ref = Rotation.from_axes_angles(
        [0, 0, 1], np.deg2rad(93 + 180)
    ).data  # cubic 90 deg + beam flip away
    assert synth.min_disorientation(q, ref, "ferrite")[0] == pytest.approx(0.0, abs=1e-4)
    q2 = Rotation.from_axes_angles([1, 0, 0], np.deg2rad(20)).data
    assert synth.min_disorientation(q2, Rotation.identity().data, "ferrite")[0] == pytest.approx(
        20.0, abs=1e-3
    )


def test_bad_inputs_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        synth.generate_map(tmp_path / "m", shape=(1, 5))
    with pytest.raises(ValueError, match="pattern_size 8 is too small"):
        synth.generate_map(tmp_path / "m", pattern_size=8)
    assert not any(tmp_path.iterdir())
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        synth.generate_map(tmp_path / "exists")
