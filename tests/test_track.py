"""Tracking: planted videos are recovered with their identities, events, densities, CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from temlib import cli, detect, insitu, track


def _detections_from_truth(video, rng, jitter_px=0.5, miss=0.0):
    """Truth boxes as a detector would report them: jittered, some missed, ids removed."""
    t = track.truth_as_tracks(video)
    det = t.rename(columns={"track_id": "true_id"})
    det[["x1", "x2"]] += rng.normal(0, jitter_px, (len(det), 1))
    det[["y1", "y2"]] += rng.normal(0, jitter_px, (len(det), 1))
    keep = rng.random(len(det)) >= miss
    return t, det[keep].reset_index(drop=True), t[keep].reset_index(drop=True)


@pytest.fixture(scope="module")
def drifting_video():
    return insitu.simulate_video(
        40,
        (256, 256),
        nucleation_per_nm2_dpa=0.1,
        dose_rate=5e-3,
        drift_px=1.0,
        rng=11,
        with_masks=False,
    )


@pytest.mark.parametrize("method", ["linker", "bytetrack"])
def test_tracks_recovered_with_known_identities(drifting_video, method):
    rng = np.random.default_rng(0)
    truth, det, kept = _detections_from_truth(drifting_video, rng, jitter_px=0.3, miss=0.02)
    assert np.abs(np.diff(drifting_video.drift, axis=0)).max() > 0.5  # the field really drifts
    tracks = track.link(det, method=method)
    m = track.tracking_metrics(truth, tracks)
    assert m["idf1"] >= 0.9 and m["mota"] >= 0.85, m
    if method == "linker":
        # every long true track is found as exactly one track over its whole life
        assert m["id_switches"] <= 2
        long_true = truth.groupby("track_id").size()
        long_true = long_true[long_true >= 10].index
        pairs = tracks[tracks.true_id.isin(long_true)].groupby("true_id").track_id.nunique()
        assert len(pairs) >= 10
        assert (pairs == 1).mean() >= 0.95


def test_drift_estimator_recovers_planted_shift_and_video_drift(drifting_video):
    from scipy import ndimage

    frame = drifting_video.frames[10].astype(float)
    g = track.DriftEstimator()
    np.testing.assert_array_equal(g.apply(frame), np.eye(2, 3))  # first frame: identity
    warp = g.apply(ndimage.shift(frame, (3.5, -6.25), mode="reflect"))  # (row, col)
    np.testing.assert_allclose(warp[:, :2], np.eye(2))
    np.testing.assert_allclose(warp[:, 2], (-6.25, 3.5), atol=0.5)  # (x, y)
    # the generator's drift, frame by frame (bend contours and defects move on their own)
    g.reset_params()
    est = np.array([g.apply(f)[:, 2] for f in drifting_video.frames])[1:, ::-1]
    true = np.diff(drifting_video.drift, axis=0)
    assert np.abs(true).sum(0).min() > 15  # it drifts by > 15 px in x and y
    assert np.sqrt(((est - true) ** 2).sum(1).mean()) < 0.6
    np.testing.assert_allclose(est.sum(0), true.sum(0), atol=2.0)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"downscale must be a whole number >= 1, got {bad}"):
            track.DriftEstimator(bad)


def test_botsort_follows_a_fast_drift():
    # 4 px per frame: without motion compensation BoT-SORT falls to MOTA / IDF1 0.66 / 0.68
    # on these planted truth boxes, with the drift's sign flipped to 0.06 / 0.10
    video = insitu.simulate_video(
        40, (256, 256), nucleation_per_nm2_dpa=0.1, dose_rate=5e-3, drift_px=4.0, rng=11
    )
    truth = track.truth_as_tracks(video)

    class _TruthDetector(detect.Detector):  # each frame's true boxes, in order
        def __init__(self):
            self.k = 0

        def predict(self, image, conf=None, iou=0.5, tile=None):
            f = truth[truth.frame == self.k]
            self.k += 1
            b = f[["x1", "y1", "x2", "y2"]].to_numpy()
            return [np.c_[b, np.full(len(b), 0.9), f.cls.to_numpy()]]

    tracks = track.track_frames(
        video.frames, _TruthDetector(), "botsort", progress=False, extend_conf=None
    )
    m = track.tracking_metrics(truth, tracks)
    assert m["idf1"] >= 0.9 and m["mota"] >= 0.85, m


def test_coalescence_reported_as_one():
    planted = [
        dict(row=64, col=50, diameter_nm=6.0, growth=0.25, loop_kind="inclined", aspect=1.0),
        dict(row=64, col=80, diameter_nm=4.0, growth=0.25, loop_kind="inclined", aspect=1.0),
        dict(row=20, col=20, diameter_nm=4.0, growth=0.0, loop_kind="inclined", aspect=1.0),
    ]
    v = insitu.simulate_video(
        40, (128, 128), nucleation_per_nm2_dpa=0.0, initial=planted, hop_px=0.0, drift_px=0.0, rng=2
    )
    _, det, _ = _detections_from_truth(v, np.random.default_rng(1), jitter_px=0.3)
    tracks = track._finish_table(track.link(det), v.nm_per_px, 5.0, None)
    ev = track.find_events(tracks, n_frames=40, shape=(128, 128))
    co = ev[ev.event == "coalescence"]
    assert len(co) == 1 and (ev.event == "disappearance").sum() == 0
    true = track.visible_events(v)
    scores = track.event_scores(true, ev).set_index("event")
    assert scores.loc["coalescence", "tp"] == 1
    # the survivor is the larger, left defect, and it grew through the merge
    survivor = tracks[tracks.track_id == co.other_id.iloc[0]]
    assert (
        survivor.col.iloc[0] < 64 and survivor.diameter_px.iloc[-1] > survivor.diameter_px.iloc[0]
    )


def test_density_vs_dose_hand_made():
    # 100 x 200 px at 0.5 nm/px = 50 x 100 nm = 0.005 um^2
    t = pd.DataFrame(
        {
            "frame": [0, 1, 1, 3, 3, 3],
            "track_id": [1, 1, 2, 1, 2, 3],
            "x1": [0, 0, 10, 0, 10, 50],
            "y1": [0, 0, 10, 0, 10, 50],
            "x2": [4, 4, 20, 4, 20, 56],
            "y2": [4, 4, 20, 4, 20, 58],
            "cls": [0, 0, 1, 0, 1, 1],
        }
    )
    dose = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    d = track.density_vs_dose(t, (100, 200), 0.5, n_frames=5, dose=dose, fps=2.0)
    assert d["count"].tolist() == [1, 2, 0, 3, 0]
    np.testing.assert_allclose(d.density_per_um2, [200, 400, 0, 600, 0])
    np.testing.assert_allclose(d.dose, dose)
    np.testing.assert_allclose(d.time_s, [0, 0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(d.mean_diameter_nm.iloc[[0, 1, 3]], [2.0, 3.5, (2 + 5 + 3.5) / 3])
    assert d.count_dot.tolist() == [1, 1, 0, 1, 0] and d.count_loop.tolist() == [0, 1, 0, 2, 0]
    with pytest.raises(ValueError, match="nm_per_px must be positive"):
        track.density_vs_dose(t, (100, 200), 0.0)


def test_spatial_map_and_growth():
    rows = pd.DataFrame({"row": [5, 5, 70], "col": [5, 100, 5]})
    h = track.spatial_map(rows, (128, 128), bin_px=64)
    assert h.tolist() == [[1, 1], [1, 0]]
    hd = track.spatial_map(rows, (128, 128), bin_px=64, nm_per_px=0.5, n_frames=2)
    np.testing.assert_allclose(hd[0, 0], 1 / (32 * 32 * 1e-6) / 2)
    t = pd.DataFrame(
        {"frame": np.arange(10), "track_id": 1, "time_s": np.arange(10) / 2.0, "cls": 1}
    )
    t["diameter_nm"] = 3.0 + 0.4 * t.time_s
    t["diameter_px"] = t.diameter_nm / 0.5
    g = track.growth_rates(t)
    np.testing.assert_allclose(g.rate_per_s, [0.4])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: track.Linker(max_distance_px=0), "max_distance_px must be positive"),
        (lambda: track.Linker(memory=-1), "memory must be >= 0"),
        (
            lambda: track.link(pd.DataFrame({"frame": [0], "x1": [0]}), method="kalman"),
            "Unknown method 'kalman'",
        ),
        (
            lambda: track.link(pd.DataFrame({"frame": [0], "x1": [0]})),
            r"Detections lack columns \['x2', 'y1', 'y2'\]",
        ),
    ],
)
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_empty_inputs():
    empty = pd.DataFrame(columns=["frame", "track_id", "x1", "y1", "x2", "y2"])
    assert track.find_events(empty).empty
    assert track.link(empty.drop(columns="track_id")).empty


# ---------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny in-situ YOLO trained in seconds (it need not detect well: it exercises the I/O)."""

    root = tmp_path_factory.mktemp("model")
    ims, boxes, _ = insitu.simulate_frames(8, (96, 96), nm_per_px=0.6, rng=0)
    ds = detect.write_yolo_dataset(ims, boxes, root / "ds", rng=0, class_names=insitu.CLASS_NAMES)
    detect.train(ds, root / "m", imgsz=96, epochs=1, batch=4, model_cfg="yolo11n.yaml", workers=0)
    return root / "m"


def _frames_dir(path, n=3, shape=(100, 140), rgb=False):
    v = insitu.simulate_video(
        n, shape, nucleation_per_nm2_dpa=0.3, dose_rate=1e-2, rng=5, with_masks=False
    )
    path.mkdir(parents=True, exist_ok=True)
    if rgb:
        from PIL import Image

        for i, f in enumerate(v.frames):
            Image.fromarray(np.repeat(f[..., None], 3, 2)).save(path / f"Frame{i}.jpg")
    else:
        insitu.write_frames(v.frames, path, prefix="Frame")
    return path


def test_cli_track_folder_and_detect(tiny_model, tmp_path, capsys):
    frames = _frames_dir(tmp_path / "frames", rgb=True)
    out = tmp_path / "tracks.csv"
    rc = cli.main(
        [
            "track",
            str(frames),
            "--out",
            str(out),
            "--model",
            str(tiny_model),
            "--conf",
            "0.01",
            "--fps",
            "5",
            "--dose-rate",
            "0.001",
            "--nm-per-px",
            "0.4",
            "--min-length",
            "1",
        ]
    )
    assert rc == 0
    t = pd.read_csv(out)
    assert list(t.columns) == track.TRACK_COLUMNS
    assert "tracks of >= 1 frames" in capsys.readouterr().out
    # temlib detect with the same model: one txt per frame, same stem, class box conf
    pred = tmp_path / "pred"
    assert (
        cli.main(
            [
                "detect",
                str(frames),
                "--model",
                str(tiny_model),
                "--out",
                str(pred),
                "--conf",
                "0.01",
            ]
        )
        == 0
    )
    assert sorted(p.stem for p in pred.glob("*.txt")) == ["Frame0", "Frame1", "Frame2"]


def test_cli_track_watch_follows_new_frames(tiny_model, tmp_path):
    src = _frames_dir(tmp_path / "src", n=4)
    live = tmp_path / "live"
    live.mkdir()
    out = tmp_path / "live.csv"

    def camera():
        for p in sorted(src.iterdir()):
            time.sleep(0.3)
            (live / p.name).write_bytes(p.read_bytes())

    th = threading.Thread(target=camera)
    th.start()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "temlib",
            "track",
            str(live),
            "--out",
            str(out),
            "--watch",
            "--model",
            str(tiny_model),
            "--conf",
            "0.01",
            "--idle-timeout",
            "3",
            "--nm-per-px",
            "0.4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    th.join()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("defects") == 4  # one live line per frame
    assert "frame 3:" in proc.stdout and out.is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fps", "-1"], "--fps -1.0 must be positive"),
        (["--dose-rate", "0.1"], "--dose-rate needs --fps"),
        (["--min-length", "0"], "--min-length 0 must be at least 1 frame"),
    ],
)
def test_cli_track_bad_options(tmp_path, capsys, args, message):
    rc = cli.main(["track", str(tmp_path), "--out", str(tmp_path / "t.csv"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_track_empty_folder(tiny_model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = cli.main(
        [
            "track",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "t.csv"),
            "--model",
            str(tiny_model),
        ]
    )
    assert rc == 2 and "No frames" in capsys.readouterr().err


def test_compare_models_scores_every_file_on_every_set(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_model / "best.pt", folder)
    shutil.copy(tiny_model / "metadata.json", folder)
    detect.export(folder / "best.pt", "onnx", imgsz=96)
    ims, boxes, _ = insitu.simulate_frames(3, (96, 96), nm_per_px=0.6, rng=7)
    sets = {"a": (ims, boxes), "b": (ims[:1], boxes[:1], ["x"])}
    t = track.compare_models(folder, sets)
    assert sorted(set(t.model)) == ["onnx", "pt"] and len(t) == 4
    # each row is evaluate_detection's score of that file on that set
    det = detect.load_detector(folder / "best.onnx")
    _, ref = track.evaluate_detection(det, ims, boxes, iou_thresholds=(0.5,))
    row = t[(t.model == "onnx") & (t.dataset == "a")].iloc[0]
    assert row.f1 == pytest.approx(ref.f1.iloc[0]) and row.ms_per_frame > 0
    with pytest.raises(ValueError, match="at least one of each"):
        track.compare_models(folder, {})


def test_native_scale_model_pads_small_frames(tiny_model):
    """The in-situ model runs at native pixel scale: small frames are padded, not enlarged."""

    det = detect.load_detector(tiny_model)
    det.metadata["native_scale"], det.imgsz = True, 256
    seen = []
    real_predict = det.model.predict

    def spy(chunk, **kw):
        seen.extend(c.shape for c in chunk)
        return real_predict(chunk, **kw)

    det.model.predict = spy
    frame = np.full((100, 140), 120, np.uint8)
    b = det.predict(frame, conf=0.01)[0]
    assert seen == [(256, 256, 1)]
    assert len(b) == 0 or ((b[:, 2] <= 140).all() and (b[:, 3] <= 100).all())


def test_fill_gaps_interpolates_missed_frames():
    t = pd.DataFrame(
        {
            "frame": [0, 3, 0],
            "track_id": [1, 1, 2],
            "x1": [0.0, 3.0, 50],
            "y1": [0.0, 6.0, 50],
            "x2": [4.0, 7.0, 54],
            "y2": [4.0, 10.0, 54],
            "conf": [0.9, 0.8, 0.7],
            "cls": [0, 1, 0],
        }
    )
    f = track.fill_gaps(t)
    one = f[f.track_id == 1].set_index("frame")
    assert one.index.tolist() == [0, 1, 2, 3] and one.conf.tolist() == [0.9, 0.0, 0.0, 0.8]
    np.testing.assert_allclose(one.x1, [0, 1, 2, 3])
    np.testing.assert_allclose(one.y2, [4, 6, 8, 10])
    assert len(f[f.track_id == 2]) == 1


def test_frame_scrubber_is_static_html():
    v = insitu.simulate_video(
        4, (64, 64), nucleation_per_nm2_dpa=0.5, dose_rate=1e-2, rng=1, with_masks=False
    )
    page = track.frame_scrubber(v.frames, track.truth_as_tracks(v), step=2, size=2.0)
    assert "<input" in page.data and page.data.count("data:image/jpeg") == 2
    with pytest.raises(ValueError, match="step must be a positive integer"):
        track.frame_scrubber(v.frames, track.truth_as_tracks(v), step=0)


def test_cli_track_video_file(tiny_model, tmp_path):
    import cv2

    v = insitu.simulate_video(
        3, (96, 128), nucleation_per_nm2_dpa=0.3, dose_rate=1e-2, rng=4, with_masks=False
    )
    path = tmp_path / "movie.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (128, 96))
    for f in v.frames:
        w.write(np.repeat(f[..., None], 3, 2))
    w.release()
    out = tmp_path / "t.csv"
    assert (
        cli.main(
            ["track", str(path), "--out", str(out), "--model", str(tiny_model), "--conf", "0.01"]
        )
        == 0
    )
    assert list(pd.read_csv(out).columns) == track.TRACK_COLUMNS
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="is not a readable video"):
        track.track_frames(tmp_path / "bad.avi", tiny_model, progress=False)


def test_watch_appends_the_rows_batch_tracking_gives(tiny_model, tmp_path):
    frames = _frames_dir(tmp_path / "frames", n=5)
    out = tmp_path / "watch.csv"
    got = track.watch_folder(
        frames,
        out,
        str(tiny_model),
        conf=1e-4,
        nm_per_px=0.4,
        poll_s=0.05,
        idle_timeout_s=0.5,
        method="linker",
    )
    back = pd.read_csv(out)
    ref = track.track_frames(
        frames, str(tiny_model), "linker", conf=1e-4, nm_per_px=0.4, fill=False, progress=False
    )
    assert list(back.columns) == track.TRACK_COLUMNS
    assert len(back) == len(got) == len(ref) > 0
    assert back.frame.is_monotonic_increasing and set(back.frame) <= set(range(5))
    cols = ["frame", "track_id", "cls"]
    np.testing.assert_array_equal(back[cols].to_numpy(), ref[cols].to_numpy())
    xy = ["x1", "y1", "x2", "y2", "diameter_nm"]
    np.testing.assert_allclose(back[xy].to_numpy(), ref[xy].to_numpy(), rtol=1e-3)


class _PlantedDetector(detect.Detector):
    """Returns planted boxes, frame after frame: A in frames 0-4, B in 1-2, C in 2-4."""

    def __init__(self):
        self.metadata, self.calls = {}, 0

    def predict(self, image, conf=None, iou=0.5, tile=None):
        k, self.calls = self.calls, self.calls + 1
        b = [[20, 20, 30, 30, 0.9, 0]]  # A
        if k in (1, 2):
            b.append([60, 60, 70, 70, 0.8, 1])  # B
        if k >= 2:
            b.append([100, 30, 110, 40, 0.7, 0])  # C
        return [np.array(b, float)]


@pytest.mark.parametrize(
    "method, live",
    [
        # live counts: the tracks that reached 3 frames so far (A at frame 2, C at frame 4)
        ("linker", [0, 0, 1, 1, 2]),
        # BoT-SORT confirms C one frame after it appears: live it reaches only 2 frames, and
        # the extension at the end gives it back its first frame
        ("botsort", [0, 0, 1, 1, 1]),
    ],
)
def test_watch_drops_short_tracks_as_batch_tracking_does(tmp_path, method, live):
    frames = _frames_dir(tmp_path / "frames", n=5)
    out = tmp_path / "watch.csv"
    counts = []
    got = track.watch_folder(
        frames,
        out,
        _PlantedDetector(),
        poll_s=0.05,
        idle_timeout_s=0.5,
        min_length=3,
        on_frame=lambda i, n, ntr, dens: counts.append(ntr),
        method=method,
    )
    assert counts == live
    back = pd.read_csv(out)
    assert sorted(back.groupby("track_id").frame.size()) == [3, 5]  # B (2 frames) dropped
    assert set(back.x1[back.cls == 1]) == set()  # B was the only class-1 defect
    ref = track.track_frames(
        frames, _PlantedDetector(), method, min_length=3, fill=False, progress=False
    )
    cols = ["frame", "track_id", "cls"]
    np.testing.assert_array_equal(back[cols].to_numpy(), ref[cols].to_numpy())
    np.testing.assert_array_equal(got[cols].to_numpy(), ref[cols].to_numpy())
    with pytest.raises(ValueError, match="min_length 0 must be a positive whole number"):
        track.watch_folder(frames, out, _PlantedDetector(), min_length=0)
    for bad in (0, 2.5):  # every path, before any frame is read
        with pytest.raises(ValueError, match=f"min_length {bad} must be a positive whole"):
            track.track_frames(frames, _PlantedDetector(), min_length=bad, progress=False)
        with pytest.raises(ValueError, match=f"min_length {bad} must be a positive whole"):
            track.filter_tracks(back, bad)


def test_extend_tracks_follows_a_track_through_fainter_detections():
    # truth: a defect at (40, 40) growing from frame 1 to 11, then gone (frame 12: far away);
    # the tracker saw it in frames 4-9 only; another track sits at (100, 100) throughout
    def box(f):
        r = 3 + f / 2
        return [40 - r, 40 - r, 40 + r, 40 + r]

    other = [95.0, 95.0, 105.0, 105.0]
    dets = []
    for f in range(14):
        d = [[*other, 0.9, 0]]
        if 1 <= f <= 11:
            d.append([*box(f), 0.9 if 4 <= f <= 9 else 0.12, 1])
        if f == 12:
            d.append([60.0, 60.0, 70.0, 70.0, 0.5, 1])  # no overlap with the last box
        if f == 2:
            d.append([95.5, 95.5, 105.5, 105.5, 0.3, 1])  # duplicate of the other track
        dets.append(np.array(d, float))
    rows = [(f, 2, *other, 0.9, 0) for f in range(14)]
    rows += [(f, 1, *box(f), 0.9, 1) for f in range(4, 10)]
    tracks = pd.DataFrame(
        rows, columns=["frame", "track_id", "x1", "y1", "x2", "y2", "conf", "cls"]
    )
    out = track.extend_tracks(tracks, dets)
    one = out[out.track_id == 1].sort_values("frame")
    assert list(one.frame) == list(range(1, 12))
    np.testing.assert_allclose(
        one[["x1", "y1", "x2", "y2"]].to_numpy(), [box(f) for f in range(1, 12)]
    )
    np.testing.assert_allclose(one.conf[one.frame.isin([1, 2, 3, 10, 11])], 0.12)
    assert len(out[out.track_id == 2]) == 14  # the duplicate was not taken by either track
    assert len(out) == 14 + 11
    assert track.extend_tracks(tracks.iloc[:0], dets).empty


class _FaintStartDetector(detect.Detector):
    """A defect faint (conf 0.15) in frames 0-2, clear (0.9) in 3-9; one faint false box."""

    def __init__(self):
        self.metadata, self.calls = {}, 0

    def predict(self, image, conf=None, iou=0.5, tile=None):
        k, self.calls = self.calls, self.calls + 1
        b = [[40, 40, 52, 52, 0.15 if k < 3 else 0.9, 0], [100, 100, 110, 110, 0.9, 1]]
        if k == 5:
            b.append([10, 100, 18, 108, 0.15, 0])  # never part of a track
        b = np.array(b, float)
        return [b[b[:, 4] >= conf]]


def test_track_frames_recovers_the_faint_first_frames_of_a_track():
    frames = np.full((10, 128, 128), 128, np.uint8)
    full = track.track_frames(frames, _FaintStartDetector(), min_length=3, progress=False)
    online = track.track_frames(
        frames, _FaintStartDetector(), min_length=3, extend_conf=None, progress=False
    )
    for t in (full, online):
        assert t.track_id.nunique() == 2 and not (t.x1 == 10).any()
    first = full[full.x1 == 40].frame.min()
    assert first == 0 and full[full.x1 == 40].frame.nunique() == 10
    assert online[online.x1 == 40].frame.min() >= 3
    with pytest.raises(ValueError, match="extend_conf 1.5 is out of range"):
        track.track_frames(frames, _FaintStartDetector(), extend_conf=1.5, progress=False)


def test_filter_tracks_keeps_the_tracks_a_video_ended_on():
    rows = [(f, 1) for f in range(10)]  # long
    rows += [(8, 2), (9, 2)]  # born two frames before the end, seen since
    rows += [(7, 3), (9, 3)]  # a gap: not kept
    rows += [(3, 4), (4, 4)]  # short, ended before the end: not kept
    t = pd.DataFrame(rows, columns=["frame", "track_id"])
    assert set(track.filter_tracks(t, 5).track_id) == {1}
    assert set(track.filter_tracks(t, 5, n_frames=10).track_id) == {1, 2}
    assert set(track.filter_tracks(t, 5, n_frames=12).track_id) == {1}
