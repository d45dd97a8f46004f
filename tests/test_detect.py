"""Tests of temlib.detect: box formats, matching, datasets, conversions, bad inputs, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from temlib import cli, detect


def test_match_counts_planted_boxes():
    true = np.array([[0, 10, 10, 30, 30], [0, 50, 50, 70, 80], [0, 100, 0, 120, 20]], float)
    pred = np.array(
        [
            [11, 10, 31, 30, 0.9, 0],  # good match of box 0
            [50, 52, 70, 80, 0.8, 0],  # good match of box 1
            [200, 200, 220, 220, 0.7, 0],  # false positive
        ]
    )
    m = detect.match(pred, true, 0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert sorted(map(tuple, m["matches"])) == [(0, 0), (1, 1)]
    # shifted by half a box: IoU 1/3 -> a hit at 0.1, a miss at 0.5
    half = np.array([[20, 10, 40, 30, 0.9, 0]])
    assert detect.match(half, true[:1], 0.5)["tp"] == 0
    assert detect.match(half, true[:1], 0.1)["tp"] == 1


def test_match_empty_and_bad():
    m = detect.match(np.zeros((0, 6)), np.zeros((0, 5)))
    assert m["f1"] == 1.0 and m["tp"] == 0
    with pytest.raises(ValueError, match="IoU threshold 0"):
        detect.match(np.zeros((0, 6)), np.zeros((0, 5)), 0)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) are not boxes"):
        detect.match(np.zeros((2, 3)), np.zeros((0, 5)))


def test_yolo_txt_roundtrip(tmp_path):
    pred = np.array([[10.0, 20.0, 50.0, 40.0, 0.75, 0], [0.0, 0.0, 8.0, 8.0, 0.5, 1]])
    p = detect.write_yolo_txt(tmp_path / "a.txt", pred, (100, 200))
    first = p.read_text().splitlines()[0].split()
    assert (
        first[0] == "0" and float(first[1]) == pytest.approx(30 / 200) and float(first[5]) == 0.75
    )
    back = detect.read_yolo_txt(p, (100, 200))
    np.testing.assert_allclose(back, pred, atol=1e-3)
    lab = np.array([[0, 10, 20, 50, 40]])
    detect.write_yolo_txt(tmp_path / "b.txt", lab, (100, 200))
    assert len((tmp_path / "b.txt").read_text().split()) == 5
    np.testing.assert_allclose(
        detect.read_yolo_txt(tmp_path / "b.txt", (100, 200))[0, :4], lab[0, 1:], atol=1e-3
    )
    (tmp_path / "bad.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(ValueError, match="wrong length"):
        detect.read_yolo_txt(tmp_path / "bad.txt", (10, 10))


def test_write_yolo_dataset(tmp_path, rng):
    images = [rng.integers(0, 255, (64, 80), dtype=np.uint8) for _ in range(10)]
    boxes = [np.array([[0, 5, 6, 20, 30]]) for _ in range(9)] + [np.zeros((0, 5))]
    masks = [np.zeros((64, 80), np.uint16) for _ in range(10)]
    y = detect.write_yolo_dataset(
        images, boxes, tmp_path / "ds", val_fraction=0.2, rng=1, masks=masks
    )
    data = yaml.safe_load(y.read_text())
    assert data["channels"] == 1 and data["names"] == {0: "cavity"}
    assert len(list((tmp_path / "ds/images/val").glob("*.png"))) == 2
    assert len(list((tmp_path / "ds/labels/train").glob("*.txt"))) == 8
    assert len(list((tmp_path / "ds/masks/train").glob("*.png"))) == 8
    png = next((tmp_path / "ds/images/train").glob("*.png"))
    assert Image.open(png).mode == "L"
    # a bad class leaves nothing half-written
    with pytest.raises(ValueError, match="class 3"):
        detect.write_yolo_dataset(images[:2], [np.array([[3, 0, 0, 5, 5]])] * 2, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.parametrize(
    "image",
    [
        np.full((20, 30), 7, np.uint8),
        np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16),
        np.linspace(-1, 1, 600).reshape(20, 30).astype(np.float32),
        np.dstack([np.full((20, 30), 100, np.uint8)] * 3),
        np.dstack([np.full((20, 30), 100, np.uint8)] * 4),
    ],
    ids=["u8", "u16", "float", "rgb", "rgba"],
)
def test_to_gray8(image):
    g = detect.to_gray8(image)
    assert g.shape == (20, 30) and g.dtype == np.uint8
    if image.dtype == np.uint16:
        assert g.min() == 0 and g.max() == 255 and np.all(np.diff(g.ravel().astype(int)) >= 0)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4)), "too small"),
        (np.zeros((10, 10, 2)), "not an image"),
        (np.full((10, 10), np.nan), "NaN"),
    ],
)
def test_to_gray8_bad(image, message):
    with pytest.raises(ValueError, match=message):
        detect.to_gray8(image)


def test_tiles_cover():
    assert detect.tile_origins(100, 128, 32) == [0]
    o = detect.tile_origins(1000, 256, 64)
    assert (
        o[0] == 0
        and o[-1] == 1000 - 256
        and all(b - a <= 256 - 64 for a, b in zip(o, o[1:], strict=False))
    )


def test_nms_keeps_best():
    b = np.array([[0, 0, 10, 10, 0.9, 0], [1, 0, 11, 10, 0.8, 0], [50, 50, 60, 60, 0.7, 0]], float)
    assert list(detect._nms(b, 0.5)) == [0, 2]


def test_fragments_inside_a_more_confident_box_are_dropped():
    b = np.array(
        [
            [0, 0, 100, 100, 0.9, 0],  # a large cavity
            [0, 0, 30, 100, 0.5, 0],  # its left third, seen by a tile (IoU 0.3: NMS keeps it)
            [95, 0, 140, 40, 0.4, 0],  # a neighbour touching it: kept
            [200, 200, 220, 220, 0.8, 1],  # a small confident box ...
            [195, 195, 260, 240, 0.3, 0],  # ... inside a less confident one: that one goes
        ],
        float,
    )
    assert list(detect._nms(b, 0.5)) == [0, 3, 1, 2, 4]
    assert sorted(detect._suppress_fragments(b)) == [0, 2, 3]
    assert len(detect._suppress_fragments(np.zeros((0, 6)))) == 0


def test_tiled_predict_drops_fragments():
    img = np.zeros((128, 128), np.uint8)
    img[20:50, 20:50] = 255
    det = _bright_box_detector(64)
    inner = det._run

    def run(frames, conf, iou, batch):  # each box also comes with its top third, less sure
        out = []
        for b in inner(frames, conf, iou, batch):
            part = b.copy()
            part[:, 3] = b[:, 1] + (b[:, 3] - b[:, 1]) / 3
            part[:, 4] = 0.5
            out.append(np.concatenate([b, part]))
        return out

    det._run = run
    got = det.predict(img, tile=64, overlap=0.5)[0]
    np.testing.assert_allclose(got[:, :4], [[20, 20, 50, 50]])


def test_cli_bad_inputs(tmp_path, capsys):
    assert cli.main(["detect", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "No folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["detect", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="Cannot read image 'broken.png'"):
        detect.read_image(tmp_path / "imgs" / "broken.png")
    assert (
        cli.main(
            [
                "detect",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "o"),
                "--model",
                str(tmp_path / "x.pt"),
            ]
        )
        == 2
    )
    assert "No model" in capsys.readouterr().err
    args = ["detect", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--thickness-nm", "100"]
    assert cli.main(args) == 2
    assert "needs --nm-per-px" in capsys.readouterr().err


def test_read_image_16bit_and_rgb(tmp_path):
    a16 = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a16.png")
    Image.fromarray(np.dstack([np.full((64, 64), 200, np.uint8)] * 3)).save(tmp_path / "rgb.png")
    g16 = detect.read_image(tmp_path / "a16.png")
    assert g16.dtype == np.uint8 and g16.max() == 255 and g16.min() == 0
    assert detect.read_image(tmp_path / "rgb.png")[0, 0] == 200


def _bright_box_detector(imgsz: int) -> detect.Detector:
    """A Detector whose model 'finds' the bounding box of bright pixels in each frame or tile."""
    det = detect.Detector.__new__(detect.Detector)
    det.metadata, det.imgsz, det.classes = {}, imgsz, ["cavity"]

    def run(frames, conf, iou, batch):
        out = []
        for f in frames:
            r, c = np.nonzero(f > 128)
            box = [[c.min(), r.min(), c.max() + 1, r.max() + 1, 0.9, 0]] if len(r) else []
            out.append(np.array(box, float).reshape(-1, 6))
        return out

    det._run = run
    return det


def test_whole_frame_pass_keeps_objects_larger_than_the_tile_overlap():
    img = np.zeros((128, 128), np.uint8)
    img[40:100, 40:100] = 255  # 60 px: whole in no 64 px tile overlapping by 16 px
    det = _bright_box_detector(64)
    assert len(det.predict(img, tile=64, overlap=0.25)[0]) == 0
    got = det.predict(img, tile=64, overlap=0.25, whole_frame=True)[0]
    np.testing.assert_allclose(got[:, :4], [[40, 40, 100, 100]])
    img[:] = 0
    img[5:15, 70:80] = 255  # small: found by the tiles, not duplicated by the whole frame
    got = det.predict(img, tile=64, overlap=0.25, whole_frame=True)[0]
    np.testing.assert_allclose(got[:, :4], [[70, 5, 80, 15]])


def test_tiling_defaults_come_from_the_model_metadata():
    img = np.zeros((128, 128), np.uint8)
    img[40:100, 40:100] = 255
    det = _bright_box_detector(64)
    det.metadata = {"tile_whole_frame": True, "tile_overlap": 0.25}
    assert len(det.predict(img, tile=64)[0]) == 1
    det.metadata = {"tile_overlap": 0.95}
    with pytest.raises(ValueError, match="overlap 0.95 is out of range"):
        det.predict(img, tile=64)


def _planted_detector(boxes_per_frame):
    """A Detector returning planted (K, 6) boxes per frame, filtered by the threshold it gets."""
    det = detect.Detector.__new__(detect.Detector)
    det.metadata, det.imgsz, det.classes = {}, 640, ["cavity"]
    it = {}

    def run(frames, conf, iou, batch):
        out = []
        for f in frames:
            b = boxes_per_frame[int(f[0, 0])]  # frame i carries its index in pixel (0, 0)
            out.append(b[b[:, 4] >= conf])
        it["conf"] = conf
        return out

    det._run = run
    return det, it


def test_choose_confidence_plants_the_best_threshold_and_predict_uses_it(tmp_path):
    truth = [np.array([[0, 10, 10, 30, 30], [0, 50, 50, 70, 80]], float) for _ in range(3)]
    # every true box found with confidence 0.6, and one false box per frame at 0.3
    found = [
        np.array([[10, 10, 30, 30, 0.6, 0], [50, 50, 70, 80, 0.6, 0], [90, 90, 99, 99, 0.3, 0]])
        for _ in range(3)
    ]
    frames = [np.full((100, 100), i, np.uint8) for i in range(3)]
    det, seen = _planted_detector(found)
    conf, table = detect.choose_confidence(det, frames, truth)
    assert conf == 0.35 and table["f1"].max() == 1.0  # the lowest threshold with the best F1
    assert table.set_index("conf").loc[0.3, "f1"] < 1.0  # the false boxes still count at 0.3
    # the chosen threshold goes into the model's metadata, and predict(conf=None) uses it
    (tmp_path / "metadata.json").write_text('{"imgsz": 640}')
    det.metadata = detect.update_metadata(tmp_path, conf=conf)
    assert det.default_conf == conf and len(det.predict(frames[0])[0]) == 2
    assert seen["conf"] == conf
    with pytest.raises(FileNotFoundError, match="No metadata.json"):
        detect.update_metadata(tmp_path / "nothing", conf=0.5)


def test_real_negatives_raise_the_threshold_above_their_false_boxes():
    # four labelled frames: three true boxes found at 0.9 and a faint one at 0.3 each; two
    # frames without cavities (real foil texture) draw false boxes at 0.3 to 0.45
    xy = [[10, 10, 30, 30], [50, 10, 70, 30], [10, 50, 30, 70], [50, 50, 70, 80]]
    truth = [np.array([[0, *b] for b in xy], float)] * 4
    found = [
        np.array([[*b, c, 0] for b, c in zip(xy, (0.9, 0.9, 0.9, 0.3), strict=True)], float)
    ] * 4
    fake = [[5, 5, 15, 15], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]
    found += [
        np.array([[*b, c, 0] for b, c in zip(fake, (0.3, 0.35, 0.4, 0.45), strict=True)], float)
    ] * 2
    frames = [np.full((100, 100), i, np.uint8) for i in range(6)]
    det, _ = _planted_detector(found)
    alone, _ = detect.choose_confidence(det, frames[:4], truth)
    assert alone == 0.1  # every box is true: the lowest threshold keeps the faint ones
    both, table = detect.choose_confidence(det, frames, truth + [np.zeros((0, 5))] * 2)
    assert both == 0.5  # above every false box: F1 12/14 there, 0.8 at 0.1
    assert table.set_index("conf").loc[0.5, "f1"] == pytest.approx(12 / 14)
    # the false boxes per empty frame, from the same detections: 4 at 0.3, 1 at 0.45, 0 above
    per_empty = table.set_index("conf")["false per empty image"]
    assert per_empty[0.3] == 4 and per_empty[0.45] == 1 and per_empty[0.5] == 0
    # detections the caller already has: the same choice, and no detection run again
    det_none, _ = _planted_detector([])
    given, table2 = detect.choose_confidence(
        det_none, frames, truth + [np.zeros((0, 5))] * 2, predictions=found
    )
    assert given == both and table2.equals(table)
    with pytest.raises(ValueError, match="expected one per image"):
        detect.choose_confidence(det_none, frames, truth, predictions=found[:2])


@pytest.mark.parametrize("threads", [2, 5])
def test_ultralytics_device_selection_keeps_temlib_threads(monkeypatch, threads):
    # ultralytics' select_device (every trainer and predictor) resets torch to cores - 1
    # threads: one core of two for training. temlib's thread count must survive it.
    import torch

    from temlib import _runtime

    before = torch.get_num_threads()
    monkeypatch.setenv("TEMLIB_THREADS", str(threads))
    try:
        _runtime.ultralytics()
        from ultralytics.utils.torch_utils import select_device

        select_device("cpu", verbose=False)
        assert torch.get_num_threads() == threads
    finally:
        monkeypatch.delenv("TEMLIB_THREADS")
        _runtime.ultralytics()
        torch.set_num_threads(before)


def test_bf16_autocast_on_cpu_only_inside_training():
    # ultralytics' trainer autocasts to bfloat16 on CUDA only; temlib lets it on the CPU
    # while detect.train runs, and puts ultralytics' function back afterwards
    import torch

    from temlib import _runtime

    _runtime.ultralytics()
    import ultralytics.engine.trainer as trainer

    original = trainer.autocast
    with pytest.raises(RuntimeError, match="bfloat16"):
        original(torch.bfloat16, device="cpu")
    a = torch.ones(4, 4)
    with detect._cpu_bf16_autocast():
        with trainer.autocast(torch.bfloat16, device="cpu"):
            assert (a @ a).dtype == torch.bfloat16
        with trainer.autocast(False, device="cpu"):  # the rest still goes to ultralytics
            assert (a @ a).dtype == torch.float32
    assert trainer.autocast is original
    assert isinstance(detect.cpu_bf16_supported(), bool)


def test_evaluate_swelling_error_mean_and_median():
    # three 100 x 100 px images at 1 nm/px, foil 50 nm; the second misses one of its two
    # cavities: its swelling error is that cavity's volume share, the others' are 0
    truth = [np.array([[0, 10, 10, 30, 30]], float)] * 3
    truth[1] = np.array([[0, 10, 10, 30, 30], [0, 50, 50, 70, 70]], float)
    preds = [np.c_[t[:, 1:], np.ones(len(t)), np.zeros(len(t))] for t in truth]
    preds[1] = preds[1][:1]
    ev = detect.evaluate(preds, truth, [1.0] * 3, [50.0] * 3, [(100, 100)] * 3)
    v = np.pi * 20.0**3 / 6
    s1, s2 = 100 * v / (1e4 * 50 - v), 100 * 2 * v / (1e4 * 50 - 2 * v)
    np.testing.assert_allclose(ev["swelling_true"], [s1, s2, s1])
    np.testing.assert_allclose(ev["swelling_error"], (s2 - s1) / 3)
    assert ev["swelling_error_median"] == 0.0


def test_cpu_isa_reads_the_flags_that_decide_inference_speed(tmp_path):
    from temlib import _runtime

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\n"
    )
    assert _runtime.cpu_isa(info) == "avx512_vnni avx512f avx2"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert _runtime.cpu_isa(info) == "avx2"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2\n")
    assert _runtime.cpu_isa(info) == "no avx2"
    assert _runtime.cpu_isa(tmp_path / "absent") == "unknown"
