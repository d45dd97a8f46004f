import numpy as np
import pytest

from temlib import cli, io


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(3, 4, 32, 32), dtype=np.uint8)
    path = tmp_path_factory.mktemp("maps") / "m.zspy"
    io.save_map(path, data, calibration=0.0234, kv=300.0, step_nm=2.5)
    return path, data


def test_written_map_reads_back_identical(small_map):
    path, data = small_map
    s = io.load_map(path)
    np.testing.assert_array_equal(s.data.compute(), data)
    assert io.calibration_of(s) == pytest.approx(0.0234)
    assert io.beam_energy(s) == 300.0
    assert s.axes_manager.navigation_axes[0].scale == 2.5


@pytest.mark.parametrize("suffix", [".hspy", ".zspy"])
def test_roundtrip_formats(tmp_path, suffix):
    data = np.arange(2 * 2 * 16 * 16, dtype=np.uint16).reshape(2, 2, 16, 16)
    path = io.save_map(tmp_path / f"m{suffix}", data, calibration=0.05)
    s = io.load_map(path, lazy=False)
    np.testing.assert_array_equal(np.asarray(s.data), data)
    assert io.calibration_of(s) == pytest.approx(0.05)
    assert list(tmp_path.iterdir()) == [path], "temporary files left behind"


def test_npy_needs_calibration(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.zeros((2, 2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="carries no calibration; pass calibration="):
        io.load_map(path)
    s = io.load_map(path, calibration=0.02, kv=120)
    assert io.calibration_of(s) == 0.02 and io.beam_energy(s) == 120


@pytest.mark.parametrize(
    "array, message",
    [
        (
            np.zeros((4, 16, 16), np.uint8),
            r"has 3 dimensions \(shape \(4, 16, 16\)\); expected a 4D scan",
        ),
        (np.zeros((2, 2, 8, 8), np.complex64), "has dtype complex64; expected one of"),
        (np.zeros((2, 2, 8, 8), bool), "has dtype bool"),
    ],
)
def test_bad_arrays(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message):
        io.load_map(path, calibration=0.02)


def test_nans_are_one_clear_error(tmp_path):
    a = np.ones((2, 2, 8, 8), np.float32)
    a[1, 1, 3, 3] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, a)
    with pytest.raises(ValueError, match="holds 1 NaN or infinite values"):
        io.load_map(path, calibration=0.02, lazy=False)
    s = io.load_map(path, calibration=0.02)  # lazy: found while streaming
    with pytest.raises(ValueError, match="NaN or infinite"):
        list(io.iter_chunks(s, chunk=1, show_progressbar=False))


def test_missing_truncated_and_unknown(tmp_path, small_map):
    with pytest.raises(FileNotFoundError, match="No map file at"):
        io.load_map(tmp_path / "nope.hspy")
    with pytest.raises(ValueError, match=r"unknown format \.tif"):
        (tmp_path / "x.tif").write_bytes(b"1234")
        io.load_map(tmp_path / "x.tif")
    good = io.save_map(tmp_path / "t.hspy", np.zeros((2, 2, 16, 16), np.uint8), calibration=0.02)
    blob = good.read_bytes()
    (tmp_path / "trunc.hspy").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match="looks truncated or corrupt"):
        io.load_map(tmp_path / "trunc.hspy")
    (tmp_path / "empty.hspy").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        io.load_map(tmp_path / "empty.hspy")


def test_uncalibrated_file_needs_override(tmp_path):
    import hyperspy.api as hs

    path = tmp_path / "raw.hspy"
    hs.signals.Signal2D(np.zeros((2, 2, 16, 16), np.uint8)).save(path)
    with pytest.raises(ValueError, match="has no reciprocal calibration"):
        io.load_map(path)
    assert io.calibration_of(io.load_map(path, calibration=0.03)) == 0.03


def test_iter_chunks_covers_map(small_map):
    path, data = small_map
    s = io.load_map(path)
    out = np.zeros_like(data)
    for (rs, cs), block in io.iter_chunks(s, chunk=2, show_progressbar=False):
        out[rs, cs] = block
    np.testing.assert_array_equal(out, data)


def test_spread_sample_draws_from_blocks_across_the_map():
    import hyperspy.api as hs

    h, w = 10, 12
    data = np.arange(h * w, dtype=np.float32).reshape(h, w, 1, 1) * np.ones(
        (1, 1, 3, 3), np.float32
    )
    sig = hs.signals.Signal2D(data)
    out = io.spread_sample(sig, chunk=4, n_blocks=4, per_block=5, rng=1)
    assert out.shape == (20, 3, 3)
    pos = out[:, 0, 0].astype(int)
    blocks = {(p // w // 4, p % w // 4) for p in pos}
    # 3 x 3 blocks of 4 x 4 pixels, every second one in scan order: (0,0) (0,2) (1,1) (2,0)
    assert blocks == {(0, 0), (0, 2), (1, 1), (2, 0)}
    assert len(set(pos)) == 20  # no pixel twice


def test_resample_puts_beam_in_middle():
    p = np.zeros((1, 64, 64), np.float32)
    p[0, 30, 35] = 100.0  # direct beam
    p[0, 30, 45] = 50.0  # a spot 10 px away at calibration 0.01
    out = io.resample(p, np.array([[30.0, 35.0]]), 0.01, 0.02, size=32)
    assert np.unravel_index(out[0].argmax(), out[0].shape) == (16, 16)
    assert out[0, 16, 21] == pytest.approx(50.0)  # 10 px * 0.01 / 0.02 = 5 px


def test_labels(tmp_path):
    from temlib import synth

    m = synth.generate_map(tmp_path / "m", shape=(4, 5), n_grains=2, seed=0, show_progressbar=False)
    xmap = io.load_labels(m.folder / "truth.ang", (4, 5))
    assert xmap.shape == (4, 5)
    with pytest.raises(ValueError, match=r"cover a \(4, 5\) scan; the map is \(3, 3\)"):
        io.load_labels(m.folder / "truth.h5", (3, 3))
    info = io.info(m.folder)
    assert info["scan_shape"] == (4, 5) and info["phases"] is not None


def test_cli_info_and_errors(small_map, capsys, tmp_path):
    path, _ = small_map
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0.0234" in out and "300" in out and "(3, 4)" in out
    assert cli.main(["info", str(tmp_path / "missing.zspy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("temlib info: error: No map file at")


def test_cli_synth_map(tmp_path, capsys):
    out = tmp_path / "cli_map"
    assert (
        cli.main(
            ["synth-map", "--out", str(out), "--shape", "4", "4", "--grains", "2", "--seed", "3"]
        )
        == 0
    )
    assert (out / "patterns.zspy").is_dir() and (out / "truth.h5").is_file()
    assert cli.main(["synth-map", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_real_mgo_map(shared_data):
    s = io.load_map(shared_data / "acom" / "mgo_nanoparticles.zspy")
    assert s.data.shape == (105, 105, 144, 144)
    assert io.calibration_of(s) == pytest.approx(0.03246)
    assert io.beam_energy(s) == 300.0
    centres = io.find_direct_beam(np.asarray(s.data[50, 50:53]))
    assert np.all(np.abs(centres - 72) < 3)


def test_find_direct_beam_recovers_planted_centres(rng):
    # broad saturated beam at known sub-pixel centres; a sharper, brighter Bragg spot
    # outside the search radius must not win; leading dimensions are kept
    rr, cc = np.mgrid[0:96, 0:96].astype(float)
    truth = 48 + rng.uniform(-8, 8, size=(2, 3, 2))
    pats = np.empty((2, 3, 96, 96), np.float32)
    for i in range(2):
        for j in range(3):
            r, c = truth[i, j]
            beam = 200 * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / (2 * 2.5**2))
            spot = 400 * np.exp(-((rr - 10) ** 2 + (cc - 85) ** 2) / (2 * 1.0**2))
            pats[i, j] = np.minimum(beam + spot + rng.normal(5, 1, (96, 96)), 255)
    found = io.find_direct_beam(pats)
    assert found.shape == (2, 3, 2)
    np.testing.assert_allclose(found, truth, atol=0.1)


@pytest.mark.parametrize("m", [1, 2, 7, 180, 181])
def test_median_last_is_numpys_median(rng, m):
    x = rng.random((6, 5, m)).astype(np.float32)
    x[0, 0] = 3.0  # ties
    np.testing.assert_array_equal(io.median_last(x), np.median(x, axis=-1, keepdims=True))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_box_peaks_is_scipy_blur_and_argmax(rng, dtype):
    # the compiled blur + masked argmax of the beam finder equals SciPy's gaussian_filter
    # (mode 'reflect' on the box) + argmax, for boxes off the pattern's corner
    from scipy import ndimage

    from temlib import _kernels

    pats = (rng.random((7, 40, 50)) * 100).astype(dtype)
    pats[:, 18:23, 28:33] = 255  # a bright 5 px square: its blurred centre is the peak
    origin, shape = (5, 8), (27, 33)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    inside = (rr - 13) ** 2 + (cc - 16) ** 2 <= 12**2
    box = pats[:, 5:32, 8:41].astype(np.float32)
    sm = ndimage.gaussian_filter(box, sigma=(0, 3, 3), truncate=3.0)
    want = np.where(inside, sm, -np.inf).reshape(7, -1).argmax(axis=1)
    got = _kernels.box_peaks(pats, origin, inside, 3.0)
    np.testing.assert_array_equal(got, want)
    assert np.all(got == (20 - 5) * shape[1] + (30 - 8))
    with pytest.raises(ValueError, match="does not fit"):
        _kernels.box_peaks(pats, (20, 8), inside, 3.0)
