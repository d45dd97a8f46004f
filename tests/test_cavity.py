"""Tests of temlib.cavity: planted cavities give the physics' contrast, labels match drawings."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from temlib import cavity as cv
from temlib import cli, detect


@pytest.mark.parametrize("radius", [4.0, 10.0])
def test_underfocus_bright_centre_dark_fringe(radius):
    df = -1000.0
    x, p = cv.line_profile(radius, df, px_nm=0.25, optics=cv.Optics(psf_px=0.0, alpha_mrad=0.1))
    inside = np.abs(x) < 0.5 * radius
    assert p[inside].mean() > 1.02  # bright interior
    dist, contrast = cv.fringe_position(x, p, radius, df)
    assert contrast < -0.1  # a dark fringe ...
    assert (
        -0.3 < dist < np.sqrt(cv.WAVELENGTH_NM * abs(df))
    )  # ... at the edge, within sqrt(lambda |df|)
    assert np.allclose(
        p[np.abs(x) > radius + 8 * np.sqrt(cv.WAVELENGTH_NM * abs(df))], 1, atol=0.02
    )


def test_overfocus_reverses_the_fringe():
    radius, df = 6.0, 1000.0
    x, p = cv.line_profile(radius, df, px_nm=0.25, optics=cv.Optics(psf_px=0.0, absorption_nm=1e9))
    dist, contrast = cv.fringe_position(x, p, radius, df)
    assert contrast > 0.1 and -0.3 < dist < np.sqrt(cv.WAVELENGTH_NM * df)
    xu, pu = cv.line_profile(
        radius, -df, px_nm=0.25, optics=cv.Optics(psf_px=0.0, absorption_nm=1e9)
    )
    centre = np.abs(x) < 0.3 * radius
    assert p[centre].mean() < pu[centre].mean()  # darker centre over focus than under focus


def test_fringe_width_scales_with_sqrt_lambda_df():
    radius = 8.0
    w = {}
    for df in (-300.0, -3000.0):
        x, p = cv.line_profile(radius, df, px_nm=0.1, optics=cv.Optics(psf_px=0.0))
        w[df] = cv.fringe_width(x, p, radius, df)
        assert 0.2 < w[df] / np.sqrt(cv.WAVELENGTH_NM * abs(df)) < 2.0
    assert w[-3000.0] > 1.5 * w[-300.0]  # sqrt(10) = 3.2 expected, broadened by coherence


def test_in_focus_pure_phase_object_is_nearly_invisible():
    opt = cv.Optics(psf_px=0.0, absorption_nm=1e9)
    _, p0 = cv.line_profile(5.0, 1e-3, px_nm=0.25, optics=opt)
    _, p1 = cv.line_profile(5.0, -1000.0, px_nm=0.25, optics=opt)
    assert np.abs(p0 - 1).max() < 0.2 * np.abs(p1 - 1).max()


def test_polyhedron_geometry():
    n, d = cv.faceted_planes(1.0, np.sqrt(3), np.eye(3))  # plain octahedron, vertices at sqrt(3)
    v = cv.polyhedron_vertices(n, d)
    assert len(v) == 6 and np.allclose(np.abs(v).max(), np.sqrt(3))
    assert cv.polyhedron_volume(v) == pytest.approx(4 / 3 * np.sqrt(3) ** 3, rel=1e-6)
    # chord through the centre along z of the octahedron = 2 sqrt(3)
    t = cv.chord_polyhedron(np.zeros((1, 1)), np.zeros((1, 1)), n, d)
    assert t[0, 0] == pytest.approx(2 * np.sqrt(3))


def test_labels_match_what_was_drawn(rng):
    cfg = cv.GeneratorConfig(
        size=256,
        count=(8, 8),
        edge_fraction=0.0,
        faceted_fraction=0.5,
        min_contrast=0.0,
        min_snr=0.0,
    )
    res = cv.generate_image(rng, cfg, nm_per_px=0.5, optics=cv.Optics(df_nm=-800))
    boxes, masks = res["boxes"], res["masks"]
    assert len(boxes) == 8 and res["image"].dtype == np.uint8 and res["image"].shape == (256, 256)
    for row in res["cavities"]:
        ys, xs = np.nonzero(masks == row["instance"])
        # the box is the cavity's own outline (not its fringe): the mask fills it to a pixel
        assert xs.min() >= np.floor(row["x1"]) - 1 and xs.max() <= np.ceil(row["x2"])
        assert ys.min() >= np.floor(row["y1"]) - 1 and ys.max() <= np.ceil(row["y2"])
        assert xs.max() - xs.min() + 1 == pytest.approx(row["x2"] - row["x1"], abs=2)
        assert row["diameter_nm"] == pytest.approx(row["diameter_px"] * 0.5)
    m = res["meta"]
    d = np.array([r["diameter_nm"] for r in res["cavities"]])
    v = np.pi * d**3 / 6
    expect = 100 * v.sum() / (256 * 256 * 0.25 * m["thickness_nm"] - v.sum())
    assert m["swelling_percent"] == pytest.approx(expect)


def test_generate_is_deterministic_and_edge_cut(rng):
    cfg = cv.GeneratorConfig(size=128, count=(6, 6), edge_fraction=1.0)
    a, b = cv.generate_image(3, cfg, nm_per_px=1.0), cv.generate_image(3, cfg, nm_per_px=1.0)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])
    assert any(r["edge_cut"] for r in a["cavities"])
    assert np.all(a["boxes"][:, 1:] >= 0) and np.all(a["boxes"][:, [1, 3]] <= 128)


def test_cavities_fit_in_the_foil():
    # large spheres asked for in thin foils: none is larger than its foil is thick
    cfg = cv.GeneratorConfig(
        size=256,
        count=(12, 12),
        d_median_nm_range=(60, 70),
        thickness_nm=(40, 50),
        min_contrast=0,
        min_snr=0,
        faceted_fraction=0.0,
    )
    for seed in range(3):
        res = cv.generate_image(seed, cfg, nm_per_px=1.0)
        d = np.array([r["diameter_nm"] for r in res["cavities"]])
        assert len(d) and d.max() <= res["meta"]["thickness_nm"] + 1e-9


def test_swelling_stays_below_the_cap():
    # 30 spheres of ~30 nm in a 128 x 128 nm field of a 60 nm foil: ~40 % swelling asked for
    kw = dict(
        size=128,
        count=(30, 30),
        d_median_nm_range=(30, 30),
        d_sigma=0.05,
        thickness_nm=(60, 60),
        min_contrast=0,
        min_snr=0,
        faceted_fraction=0.0,
        edge_fraction=0.0,
        max_overlap=1.0,
    )
    free = cv.generate_image(1, cv.GeneratorConfig(max_swelling=1e6, **kw), nm_per_px=1.0)
    capped = cv.generate_image(1, cv.GeneratorConfig(max_swelling=5.0, **kw), nm_per_px=1.0)
    assert free["meta"]["swelling_true_volume_percent"] > 20
    assert 2 < capped["meta"]["swelling_true_volume_percent"] <= 5.0
    assert 0 < len(capped["cavities"]) < len(free["cavities"])
    d = [r["diameter_nm"] for r in capped["cavities"]]
    assert np.median(d) == pytest.approx(30, rel=0.1)  # the kept ones keep the drawn sizes


def test_swelling_error_by_bins_planted_errors():
    true = np.array([0.5, 0.8, 3.0, 4.0, 20.0])
    pred = np.array([0.6, 0.8, 2.7, 4.4, 16.0])  # 0.1, 0, 0.3, 0.4, 4 % off
    t = cv.swelling_error_by(true, pred, bins=(0, 1, 5, 30))
    assert list(t["images"]) == [2, 2, 1]
    assert t["mean abs error (%)"].to_numpy() == pytest.approx([0.05, 0.35, 4.0])
    assert t["mean relative error"].to_numpy() == pytest.approx([0.1, 0.1, 0.2])
    with pytest.raises(ValueError, match="one value per image"):
        cv.swelling_error_by(true, pred[:3])


def test_swelling_formula():
    assert cv.swelling_percent([10.0], 100.0 * 100.0, 100.0) == pytest.approx(
        100 * (np.pi * 1000 / 6) / (1e6 - np.pi * 1000 / 6)
    )
    with pytest.raises(ValueError, match="must be positive"):
        cv.swelling_percent([1.0], 0.0, 10.0)
    # a box far wider than the foil is thick (a false detection) holds at most the foil column
    # under it, not a sphere larger than the foil: finite and positive
    col = np.pi / 4 * 300.0**2 * 50.0
    assert cv.swelling_percent([300.0], 1000.0 * 1000.0, 50.0) == pytest.approx(
        100 * col / (5e7 - col)
    )
    assert cv.swelling_percent([75.0], 1e6, 50.0) == pytest.approx(  # continuous at 1.5 t
        100 * (np.pi / 6 * 75.0**3) / (5e7 - np.pi / 6 * 75.0**3)
    )
    assert cv.swelling_percent([1000.0, 1000.0], 1000.0 * 1000.0, 50.0) == np.inf  # all void


def test_generate_dataset_and_backgrounds(tmp_path, rng):
    # a "real" background with one labelled real cavity; fraction 0.5 -> one simulated cavity
    from PIL import Image

    bgdir = tmp_path / "bg"
    bgdir.mkdir()
    Image.fromarray(rng.integers(90, 110, (160, 160), dtype=np.uint8)).save(bgdir / "a.png")
    detect.write_yolo_txt(
        bgdir / "a.txt", np.array([[0, 40, 40, 60, 60]]), (160, 160), with_conf=False
    )
    cfg = cv.GeneratorConfig(
        size=128,
        d_median_nm_range=(12, 12),
        nm_per_px=(0.5, 0.5),
        min_contrast=0.0,
        min_snr=0.0,
    )
    out = cv.generate_dataset(
        3, tmp_path / "gen", cfg, backgrounds=bgdir, fraction=0.5, rng=7, progress=False
    )
    imgs, labs, meta = cv.load_dataset(out)
    assert len(imgs) == 3 and imgs[0].shape == (128, 128)
    assert all(m["n_real"] <= 1 and m["background"] == "real" for m in meta)
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["annotations"]) == sum(len(b) for b in labs)
    again = cv.generate_dataset(
        3, tmp_path / "gen2", cfg, backgrounds=bgdir, fraction=0.5, rng=7, progress=False, workers=2
    )
    assert [p.read_bytes() for p in sorted((out / "images").glob("*.png"))] == [
        p.read_bytes() for p in sorted((again / "images").glob("*.png"))
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nm_per_px=(1.0, 0.5)), "reversed"),
        (dict(faceted_fraction=1.5), "faceted_fraction 1.5"),
        (dict(size=8), "too small"),
        (dict(noise=(0.0, 0.1)), "starts at zero"),
        (dict(max_swelling=0), "max_swelling 0 is not positive"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cv.GeneratorConfig(**kwargs)


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "g"
    assert (
        cli.main(
            ["cavity", "generate", "--n", "2", "--out", str(out), "--size", "96", "--workers", "1"]
        )
        == 0
    )
    assert len(list((out / "labels").glob("*.txt"))) == 2 and (out / "cavities.csv").is_file()
    capped = tmp_path / "capped"
    args = ["cavity", "generate", "--n", "3", "--out", str(capped), "--size", "128"]
    assert cli.main([*args, "--count", "40", "40", "--max-swelling", "1", "--workers", "1"]) == 0
    swelling = pd.read_csv(capped / "images.csv").swelling_true_volume_percent
    assert swelling.max() <= 1.0
    assert cli.main(["cavity", "generate", "--n", "0", "--out", str(out)]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "cavity",
                "generate",
                "--n",
                "1",
                "--out",
                str(out),
                "--backgrounds",
                str(tmp_path / "none"),
            ]
        )
        == 2
    )
    assert "No folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A tiny YOLO trained for a few epochs on large, high-contrast synthetic cavities."""
    root = tmp_path_factory.mktemp("tinydet")
    cfg = cv.GeneratorConfig(
        size=128,
        count=(2, 3),
        nm_per_px=(1.0, 1.0),
        d_median_nm_range=(30, 30),
        d_sigma=0.1,
        d_range_nm=(24, 40),
        df_nm=(-2500, -2000),
        fringe_px=None,
        overfocus_fraction=0.0,
        absorption_nm=(40, 40),
        noise=(0.02, 0.02),
        edge_fraction=0.0,
        max_overlap=0.0,
    )
    w = cv.train_detector(
        root / "model",
        root / "data",
        n_images=64,
        size=128,
        count=(2, 3),
        real_background_share=0.0,
        imgsz=128,
        epochs=12,
        batch=4,
        export_format=None,
        seed=1,
        config=cfg,
        warmup_epochs=1,  # >= 100 warm-up steps: the high bias LR finds the objectness fast
        mosaic=0.0,
        workers=0,
    )
    return w, cfg, root


def _copy_model(weights, folder):
    """A copy of the tiny detector's folder (weights and metadata) that a test may change."""
    folder.mkdir()
    for name in ("best.pt", "metadata.json"):
        (folder / name).write_bytes((weights.parent / name).read_bytes())
    return folder


def test_detector_finds_large_cavities(tiny_detector, tmp_path):
    w, cfg, root = tiny_detector
    test = [cv.generate_image(100 + i, cfg) for i in range(6)]
    det = detect.load_detector(w)
    preds = det.predict([t["image"] for t in test], conf=0.05)
    ev = detect.evaluate(preds, [t["boxes"] for t in test], iou_thresholds=(0.3,))
    # about 160 optimizer steps from scratch: most large cavities found, few false alarms
    assert ev["recall@0.3"] >= 0.5 and ev["precision@0.3"] >= 0.5, ev
    # trained in bfloat16 mixed precision where the CPU has it natively
    assert det.metadata["precision"] == ("bf16" if detect.cpu_bf16_supported() else "fp32")


def test_fit_confidence_stores_the_threshold_of_best_f1(tiny_detector, tmp_path):
    w, cfg, root = tiny_detector
    folder = _copy_model(w, tmp_path / "model")
    conf, table, large = cv.fit_confidence(
        folder,
        tmp_path / "data",
        n_images=6,
        size=128,
        count=(2, 3),
        real_negatives=0,
        seed=7,
        config=cfg,
    )
    f1 = table.set_index("conf")["f1"]
    assert f1.max() >= 0.5, table  # new images of the training kind: the cavities are found
    assert f1[conf] >= f1.max() - 0.01 and conf == min(
        c for c in f1.index if f1[c] >= f1.max() - 0.01
    )
    det = detect.load_detector(folder)
    assert det.default_conf == conf  # stored with the model
    assert len(cv.load_dataset(tmp_path / "data" / "val")[0]) == 6
    # large boxes: the threshold of least validation swelling error, from conf up
    best = large.loc[large["swelling error (%)"].idxmin(), "conf_large"]
    assert det.metadata["conf_large"] == best >= conf and large.conf_large.min() == conf
    assert det.metadata["large_px"] == det.imgsz / 2


def test_large_boxes_need_their_own_confidence(tiny_detector):
    w, cfg, root = tiny_detector
    images = [cv.generate_image(100 + i, cfg)["image"] for i in range(4)]
    det = detect.load_detector(w)
    for tile in (None, 64):
        det.metadata.pop("conf_large", None)
        free = det.predict(images, conf=0.05, tile=tile)
        det.metadata.update(conf_large=0.6, large_px=12.0)
        kept = det.predict(images, conf=0.05, tile=tile)
        n_big_weak = 0
        for f, k in zip(free, kept, strict=True):
            side = np.maximum(f[:, 2] - f[:, 0], f[:, 3] - f[:, 1])
            ok = (side <= 12.0) | (f[:, 4] >= 0.6)
            n_big_weak += int((~ok).sum())
            assert np.allclose(k, f[ok])
        assert n_big_weak > 0  # the rule removed something


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_images": 1}, "too few"),
        ({"real_background_share": 1.5}, "out of range"),
        ({"train_minutes": -1}, "negative"),
    ],
)
def test_train_detector_bad_input(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cv.train_detector(tmp_path / "model", tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()  # nothing generated


def test_int8_export_keeps_the_detections(tiny_detector, tmp_path):
    pytest.importorskip("nncf")
    w, cfg, root = tiny_detector
    folder = _copy_model(w, tmp_path / "model")
    with pytest.raises(ValueError, match="at least one frame"):
        detect.export(folder / "best.pt", "openvino", imgsz=128, calibration=[])
    with pytest.raises(ValueError, match="needs fmt 'openvino'"):
        detect.export(folder / "best.pt", "onnx", imgsz=128, calibration=[np.zeros((128, 128))])
    cal = [cv.generate_image(300 + i, cfg)["image"] for i in range(8)]
    out = detect.export(folder / "best.pt", "openvino", imgsz=128, calibration=cal)
    assert out.name == "best_int8_openvino_model" and any(out.glob("*.xml"))
    assert not (folder / ".int8_calibration").exists()  # the temporary dataset is gone
    det = detect.load_detector(folder)  # the INT8 export is preferred
    assert det.path == out
    test = [cv.generate_image(100 + i, cfg) for i in range(6)]
    truth = [t["boxes"] for t in test]
    ev_pt = detect.evaluate(
        detect.load_detector(folder / "best.pt").predict([t["image"] for t in test], conf=0.05),
        truth,
        iou_thresholds=(0.3,),
    )
    ev = detect.evaluate(
        det.predict([t["image"] for t in test], conf=0.05), truth, iou_thresholds=(0.3,)
    )
    # quantised weights and activations find the same large cavities as the float model
    assert ev["recall@0.3"] >= 0.5 and ev["precision@0.3"] >= 0.5, ev
    assert abs(ev["f1@0.3"] - ev_pt["f1@0.3"]) <= 0.15, (ev, ev_pt)


def test_cli_detect_writes_tables(tiny_detector, tmp_path):
    from PIL import Image

    w, cfg, root = tiny_detector
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    res = cv.generate_image(200, cfg)
    Image.fromarray(res["image"]).save(imgs / "one.png")
    Image.fromarray(res["image"].astype(np.uint16) * 250).save(imgs / "two16.png")  # 16 bit
    Image.fromarray(np.dstack([res["image"]] * 3)).save(imgs / "three_rgb.png")
    out = tmp_path / "pred"
    args = [
        "detect",
        str(imgs),
        "--model",
        str(w),
        "--out",
        str(out),
        "--nm-per-px",
        "1.0",
        "--thickness-nm",
        "100",
    ]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.glob("*.txt")) == ["one.txt", "three_rgb.txt", "two16.txt"]
    rows = (out / "images.csv").read_text().splitlines()
    assert rows[0].startswith("image,") and len(rows) == 4 and "swelling_percent" in rows[0]
    lines = (out / "one.txt").read_text().splitlines()
    assert all(len(ln.split()) == 6 for ln in lines)
    (imgs / "broken.png").write_bytes(b"not a png")
    assert cli.main(args) == 2


def test_widget_panel_updates_without_output_capture():
    """The panel uses an Image widget (no interact/Output: those hang headless runs)."""
    w = pytest.importorskip("ipywidgets")
    panel = cv.widget_panel(size=64, show_static=False)
    picture = panel.children[-1]
    assert isinstance(picture, w.Image) and picture.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(
        isinstance(c, w.Output) for box in panel.children for c in getattr(box, "children", [])
    )
    before = picture.value
    panel.children[0].children[0].value = 2000.0  # defocus slider: over-focus
    assert picture.value != before


def test_scaled_faceted_cavity_matches_recomputed_geometry(rng):
    c = cv.Cavity(10.0, 20.0, 5.0, True, 1.3, cv._rotation(rng))
    s, r = c.scaled(1.7), cv.Cavity(10.0, 20.0, 8.5, True, 1.3, c.rotation)
    for k in ("hx", "hy", "x0", "y0", "volume", "d_eq"):
        assert s.geometry()[k] == pytest.approx(r.geometry()[k], rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(
        np.sort(s.outline_px(0.5), axis=0), np.sort(r.outline_px(0.5), axis=0), atol=1e-9
    )


def test_cavity_wider_than_the_frame_is_placed(rng):
    cfg = cv.GeneratorConfig(size=32, d_median_nm_range=(60, 60), d_sigma=0.0, edge_fraction=0.0)
    cavs = cv.place_cavities(rng, 1, (32, 32), 1.0, cfg)
    assert len(cavs) == 1 and cavs[0].row == pytest.approx(16) and cavs[0].col == pytest.approx(16)


def _noise_stats(image: np.ndarray) -> tuple[float, float]:
    """Pixel noise / mean level and lag-1 correlation of the noise (fine residual)."""
    f = image.astype(float)
    r = f - ndi.gaussian_filter(f, 2.0)
    rho = ((r[:, :-1] * r[:, 1:]).mean() + (r[:-1] * r[1:]).mean()) / 2 / (r * r).mean()
    return float(r.std() / f.mean()), float(rho)


def test_embedded_background_noise_spans_white_to_correlated():
    # the planted noise level comes back, and both white and correlated noise are drawn
    rng = np.random.default_rng(3)
    got = [cv.synthetic_background((256, 256), rng, noise=0.1) for _ in range(12)]
    stats = np.array([_noise_stats(g) for g in got])
    assert stats[:, 1].min() < 0.15 and stats[:, 1].max() > 0.4
    quiet = _noise_stats(cv.synthetic_background((256, 256), 4, noise=0.02))[0]
    loud = _noise_stats(cv.synthetic_background((256, 256), 4, noise=0.2))[0]
    assert loud > 4 * quiet


@pytest.mark.parametrize("strategy, dtype", [("huffman", np.uint8), ("rle", np.uint16)])
def test_fast_png_is_lossless(tmp_path, rng, strategy, dtype):
    a = rng.integers(0, 256 if dtype == np.uint8 else 65536, (97, 130)).astype(dtype)
    a[40:60] = 0  # a run of zeros, as in a mask
    cv._write_png(tmp_path / "a.png", a, strategy)
    from PIL import Image

    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert back.dtype == dtype and np.array_equal(back, a)


def test_recall_by_counts_what_a_planted_detector_found(tmp_path):
    # the "detector" returns exactly the cavities of SNR >= 30: recall 0 below, 1 above
    import pandas as pd

    cfg = cv.GeneratorConfig(size=128, count=(6, 10), min_contrast=0.0, min_snr=0.0)
    out = cv.generate_dataset(4, tmp_path / "gen", cfg, rng=3, progress=False)
    table = pd.read_csv(out / "cavities.csv")
    names = pd.read_csv(out / "images.csv").image
    preds = [
        table[(table.image == n) & (table.snr >= 30)][["x1", "y1", "x2", "y2"]].to_numpy()
        for n in names
    ]
    got = cv.recall_by(preds, out, bins=(0.0, 30, np.inf))
    assert got.cavities.sum() == (table.source == "simulated").sum() > 0
    assert got.cavities.min() > 0, "plant cavities on both sides of SNR 30"
    np.testing.assert_allclose(got.recall, [0.0, 1.0])
    assert got.found.iloc[1] == got.cavities.iloc[1]
    by_contrast = cv.recall_by(preds, out, column="contrast", bins=(0.0, np.inf))
    assert by_contrast.found.sum() == got.found.sum()
    with pytest.raises(ValueError, match="Got 3 prediction arrays for the 4 images"):
        cv.recall_by(preds[:3], out)
    with pytest.raises(ValueError, match="has no column 'brightness'"):
        cv.recall_by(preds, out, column="brightness")


def test_noise_sigma_sees_white_and_correlated_noise():
    # a planted sigma of 5 grey levels on a smooth ramp: found for white noise, and mostly
    # for the same noise blurred as the generator's most correlated camera (0.75 px), where
    # the pixel-to-pixel spread falls below 40 %
    from scipy.ndimage import gaussian_filter

    g = np.random.default_rng(1)
    ramp = np.linspace(80, 160, 512, dtype=np.float32)[None, :] * np.ones((512, 1), np.float32)
    white = g.normal(0, 5, (512, 512)).astype(np.float32)
    assert cv.noise_sigma(ramp + white) == pytest.approx(5, rel=0.1)
    blurred = gaussian_filter(white, 0.75)
    assert blurred.std() < 0.4 * 5
    assert cv.noise_sigma(ramp + blurred) == pytest.approx(5, rel=0.3)
    with pytest.raises(ValueError, match="smaller than one 4 px block"):
        cv.noise_sigma(np.zeros((2, 9)))


def test_visibility_snr_is_rose_for_a_uniform_disc():
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 8**2
    signal = np.where(disc, 3.0, 0.0)
    box = (24, 24, 41, 41)
    assert cv.visibility_snr(signal, box, sigma=2.0) == pytest.approx(1.5 * np.sqrt(disc.sum()))


def test_faint_cavities_are_drawn_but_not_labelled():
    # one cavity: its SNR is in the table; above the image's SNR it is not labelled
    cfg = cv.GeneratorConfig(
        size=128, count=(1, 1), edge_fraction=0.0, min_contrast=0.0, min_snr=0.0
    )
    optics = cv.Optics(df_nm=-800)
    seen = cv.generate_image(5, cfg, nm_per_px=0.5, optics=optics)
    (row,) = seen["cavities"]
    assert 5 < row["snr"] < np.inf
    hidden = cv.generate_image(
        5, dataclasses.replace(cfg, min_snr=row["snr"] * 1.01), nm_per_px=0.5, optics=optics
    )
    assert len(hidden["boxes"]) == 0 and not hidden["cavities"]
    assert seen["masks"].max() == 1 and hidden["masks"].max() == 0  # masks: labelled ones only
    assert np.array_equal(hidden["image"], seen["image"])  # drawn all the same
