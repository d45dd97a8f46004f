"""Synthetic in-situ videos: planted defects, dose-driven nucleation, coalescence, real readers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from temlib import insitu


@pytest.fixture(scope="module")
def video():
    return insitu.simulate_video(30, (160, 192), nucleation_per_nm2_dpa=0.2, dose_rate=5e-3, rng=7)


def test_video_shapes_and_truth_consistent(video):
    T, M, N = video.frames.shape
    assert (T, M, N) == (30, 160, 192) and video.frames.dtype == np.uint8
    assert video.masks.shape == (T, M, N)
    t = video.truth
    assert len(t) > 50 and set(t.cls) <= {0, 1}
    assert (t.x1 >= 0).all() and (t.x2 <= N).all() and (t.y1 >= 0).all() and (t.y2 <= M).all()
    assert (t.x2 > t.x1).all() and (t.y2 > t.y1).all()
    # every listed defect appears in its frame's instance mask, at its box
    for f in (5, 29):
        ids = set(np.unique(video.masks[f])) - {0}
        assert set(t[t.frame == f].track_id) <= ids | set()
    # class follows size: black dots are small, loops large
    assert t[t.cls == 0].diameter_nm.max() < 5.0 <= t[t.cls == 1].diameter_nm.min()
    # defects are darker than the foil around them
    r = t[(t.frame == 29) & (t.diameter_nm > 4)].iloc[0]
    patch = video.frames[29, int(r.y1) : int(r.y2), int(r.x1) : int(r.x2)]
    assert patch.min() < np.median(video.frames[29]) - 20


def test_rose_snr_known_value():
    # 10 % darkening over 100 px of 100 electrons each: sigma 0.1 per px, SNR 0.1 * 10 / 0.1
    assert insitu.rose_snr(0.1, 100, 1.0, 100.0, 0.0) == pytest.approx(10.0)
    # read noise adds its variance: sigma sqrt(0.01 + 0.01)
    assert insitu.rose_snr(0.1, 100, 1.0, 100.0, 0.1) == pytest.approx(10 / np.sqrt(2))


def test_invisible_dot_is_drawn_but_not_labelled():
    # a 1.2 nm dot at 1 nm/px (under one pixel wide, blurred by the optics, in shot noise)
    # fails Rose's criterion; a 4 nm dot at the same place passes it
    kw = dict(nucleation_per_nm2_dpa=0.0, hop_px=0.0, drift_px=0.0, nm_per_px=1.0, rng=0)
    tiny = insitu.simulate_video(2, (64, 64), initial=[dict(row=32, col=32, diameter_nm=1.2)], **kw)
    seen = insitu.simulate_video(2, (64, 64), initial=[dict(row=32, col=32, diameter_nm=4.0)], **kw)
    assert len(tiny.truth) == 0 and not tiny.masks.any()
    assert len(seen.truth) == 2 and (seen.masks[:, 32, 32] == 1).all()


def test_nucleation_follows_dose():
    rate = np.r_[np.zeros(20), np.full(20, 1e-2)]  # beam blanked, then on
    v = insitu.simulate_video(
        40, (128, 128), dose_rate=rate, nucleation_per_nm2_dpa=0.1, rng=1, with_masks=False
    )
    nuc = v.events[v.events.event == "nucleation"]
    assert (nuc.frame >= 20).all() and len(nuc) > 5
    np.testing.assert_allclose(np.diff(v.dose)[19:], 1e-2 / 5.0)
    assert v.dose[0] == 0 and np.all(np.diff(v.dose)[:19] == 0)


def test_planted_coalescence_is_one_event():
    planted = [
        dict(row=64, col=50, diameter_nm=6.0, growth=0.25, loop_kind="inclined", aspect=1.0),
        dict(row=64, col=80, diameter_nm=4.0, growth=0.25, loop_kind="inclined", aspect=1.0),
    ]
    v = insitu.simulate_video(
        40, (128, 128), nucleation_per_nm2_dpa=0.0, initial=planted, hop_px=0.0, drift_px=0.0, rng=2
    )
    ev = v.events
    co = ev[ev.event == "coalescence"]
    assert len(co) == 1
    assert int(co.track_id.iloc[0]) == 2 and int(co.other_id.iloc[0]) == 1  # smaller into larger
    f = int(co.frame.iloc[0])
    assert 0 < f < 40
    assert v.truth[v.truth.track_id == 2].frame.max() == f - 1
    assert v.truth[v.truth.frame == f].track_id.tolist() == [1]


def test_training_frames_have_boxes_and_masks():
    ims, boxes, masks = insitu.simulate_frames(
        4, (96, 128), nm_per_px=0.8, density_per_um2=(800, 1000), rng=3
    )
    assert len(ims) == len(boxes) == len(masks) == 4
    for im, b, m in zip(ims, boxes, masks, strict=True):
        assert im.shape == m.shape == (96, 128) and im.dtype == np.uint8
        assert b.shape[1] == 5 and len(b) > 0
        assert set(np.unique(b[:, 0])) <= {0.0, 1.0}
        assert (b[:, 3] <= 128).all() and (b[:, 4] <= 96).all()  # x2 <= N, y2 <= M


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_frames=0), "n_frames must be a positive integer"),
        (dict(shape=(16, 64)), "shape must be (M, N)"),
        (dict(dose_rate=-1.0), "dose_rate must be finite"),
        (dict(nm_per_px=0.0), "must be positive"),
    ],
)
def test_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        insitu.simulate_video(**kwargs)


def test_list_frames_natural_order(tmp_path):
    frames = np.zeros((3, 40, 40), np.uint8)
    insitu.write_frames(frames, tmp_path, prefix="f")
    for src, dst in (
        ("f00000.png", "Frame2.png"),
        ("f00001.png", "Frame10.png"),
        ("f00002.png", "Frame1.png"),
    ):
        (tmp_path / src).rename(tmp_path / dst)
    assert [p.name for p in insitu.list_frames(tmp_path)] == [
        "Frame1.png",
        "Frame2.png",
        "Frame10.png",
    ]
    with pytest.raises(NotADirectoryError, match="is not a folder of frames"):
        insitu.list_frames(tmp_path / "missing")


@pytest.mark.realdata
def test_real_readers(shared_data):
    ims, boxes, names = insitu.read_creme_316l()
    assert len(ims) == 17 and ims[0].shape == (512, 512) and ims[-1].shape == (1024, 1024)
    n = sum(len(b) for b in boxes[:16])
    assert 150 <= n <= 220  # 186 polygons in the COCO file; touching masks may merge
    ims, boxes, names = insitu.read_fecral_labelled()
    assert len(ims) == 12 and sum(len(b) for b in boxes) == 1175
    assert set(np.unique(np.concatenate(boxes)[:, 0])) == {0.0, 1.0}
    assert len(insitu.fecral_video_frames()) == 150


def test_camera_detector_blur_correlates_the_shot_noise():
    # a flat foil through the camera: white shot noise without detector blur, correlated
    # noise (lag-1 correlation exp(-1 / (4 sigma^2)) ~ 0.6 at 1 px) with it
    import dataclasses

    flat = np.ones((256, 256))
    style = insitu._random_style(np.random.default_rng(0), randomize=False)
    rho = {}
    for blur in (0.0, 1.0):
        s = dataclasses.replace(style, detector_blur=blur, blur=0.0, read_noise=0.0)
        f = insitu._finish(flat, s, np.random.default_rng(1)).astype(float)
        r = f - f.mean()
        rho[blur] = ((r[:, :-1] * r[:, 1:]).mean() + (r[:-1] * r[1:]).mean()) / 2 / r.var()
    assert abs(rho[0.0]) < 0.05
    assert 0.45 < rho[1.0] < 0.85


def test_dislocation_lines_are_long_thin_and_unlabelled():
    rng = np.random.default_rng(0)
    assert not insitu._dislocation_lines((128, 128), 0.0, 0.5, rng).any()
    field = insitu._dislocation_lines((256, 256), 2000.0, 0.5, rng)  # ~6 lines
    assert field.shape == (256, 256) and 0 <= field.min() and field.max() <= 1
    dark = field > 0.2
    assert 0.005 < dark.mean() < 0.2  # thin: a few px wide
    lab, n = ndi.label(dark)
    extent = max(max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndi.find_objects(lab))
    assert extent >= 40  # lines of 40-300 nm at 0.5 nm/px, not dots
    # lines are drawn from their own stream: same defects, lines only darken the frame
    kw = dict(n=3, shape=(128, 128), nm_per_px=0.5, density_per_um2=(2000, 2000), rng=4)
    a_img, a_box, _ = insitu.simulate_frames(**kw, dislocation_density_m2=None)
    b_img, b_box, _ = insitu.simulate_frames(**kw, dislocation_density_m2=(1e15, 1e15))
    assert any((a != b).any() for a, b in zip(a_img, b_img, strict=True))
    for a, b in zip(a_box, b_box, strict=True):
        assert {tuple(r) for r in b} <= {tuple(r) for r in a}  # no label from a line
        assert len(b) >= 0.7 * len(a)


@pytest.mark.parametrize("bad", [(0.0, 1e14), (1e14, 1e13), (1e14,)])
def test_training_frames_bad_dislocation_density(bad):
    with pytest.raises(ValueError, match="dislocation_density_m2 must be None or"):
        insitu.simulate_frames(1, (64, 64), dislocation_density_m2=bad)
