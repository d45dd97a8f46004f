"""YOLO defect detection: datasets, training, export and inference (cavities, in-situ defects).

A thin, offline layer over ultralytics for grey TEM images:

- :func:`write_yolo_dataset` writes images + labels + dataset yaml (``channels: 1``);
- :func:`train` trains a YOLO model from scratch (no pretrained weights, nothing downloaded)
  and saves ``best.pt`` with a ``metadata.json`` (classes, image size, nm/px, data);
- :func:`export` exports it for fast CPU inference (OpenVINO, ONNX as fallback);
- :func:`load_detector` returns a :class:`Detector` whose ``predict`` takes grey or RGB,
  8-bit, 16-bit or float frames of any size, optionally tiled, and returns boxes in pixels;
- :func:`match` scores predictions against truth (Hungarian matching on IoU).

Box formats (pixels, x = column, y = row, origin at the top-left corner of the image):

- *labels*: ``(K, 5)`` rows ``[class, x1, y1, x2, y2]`` (what datasets are written from);
- *predictions*: ``(K, 6)`` rows ``[x1, y1, x2, y2, conf, class]`` (ultralytics' order).

Default models live in ``data/models/<name>/`` (``name`` = ``"cavity"``, ``"insitu"``):
``best.pt``, ``metadata.json`` and, when exported, ``best_openvino_model/`` or ``best.onnx``,
which :func:`load_detector` prefers. Models trained by the ci profile of the notebooks go
to ``data/models/ci/<name>/`` so a smoke run never replaces a default model.

Image conversion (documented, applied by :func:`to_gray8` everywhere): RGB(A) becomes grey
with ITU-R 601 luma weights; 8-bit stays as is; 16-bit, other integer and float images are
stretched linearly from their 0.1st to 99.9th percentile onto 0..255.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import _runtime, paths
from .boxio import (  # noqa: F401  re-exported: part of this module's API
    IMAGE_SUFFIXES,
    _xyxy,
    list_images,
    read_image,
    read_yolo_txt,
    to_gray8,
    write_yolo_txt,
)
from .cavity import swelling_percent

log = logging.getLogger(__name__)

MODEL_NAMES = ("cavity", "insitu")


# --------------------------------------------------------------------------- boxes


def _area(b: np.ndarray) -> np.ndarray:
    """Areas ``(K,)`` of ``x1, y1, x2, y2`` boxes ``(K, 4)``."""
    return np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas ``(K, L)`` of ``x1, y1, x2, y2`` boxes ``(K, 4)`` and ``(L, 4)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return np.prod(np.clip(rb - lt, 0, None), axis=2)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(K, L)`` between two box sets in any of the module's formats."""
    a, b = _xyxy(a), _xyxy(b)
    inter = _intersection(a, b)
    area_a, area_b = _area(a), _area(b)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(pred_boxes: np.ndarray, true_boxes: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Match predicted to true boxes one-to-one (Hungarian on IoU) and count hits.

    Parameters
    ----------
    pred_boxes, true_boxes
        Boxes in pixels, ``(K, 4|5|6)`` (see the module docstring for the formats).
    iou_threshold
        A pair counts as a true positive when its IoU is at least this.

    Returns
    -------
    dict
        ``tp, fp, fn`` (int), ``precision, recall, f1`` (float; 1.0 when there is nothing
        to find and nothing found), ``matches`` ``(T, 2)`` int pairs (pred index, true
        index) and ``iou`` ``(T,)`` of the matched pairs.
    """
    from scipy.optimize import linear_sum_assignment

    if not 0 < iou_threshold <= 1:
        raise ValueError(f"IoU threshold {iou_threshold!r} is out of range; expected 0 < t <= 1")
    p, t = _xyxy(pred_boxes), _xyxy(true_boxes)
    pairs = np.zeros((0, 2), int)
    ious = np.zeros(0)
    if len(p) and len(t):
        iou = box_iou(p, t)
        r, c = linear_sum_assignment(-iou)
        keep = iou[r, c] >= iou_threshold
        pairs = np.stack([r[keep], c[keep]], axis=1).astype(int)
        ious = iou[r[keep], c[keep]]
    tp = len(pairs)
    fp, fn = len(p) - tp, len(t) - tp
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(
        tp=tp, fp=fp, fn=fn, precision=precision, recall=recall, f1=f1, matches=pairs, iou=ious
    )


# --------------------------------------------------------------------------- dataset


def _atomic_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def write_yolo_dataset(
    images: list[np.ndarray],
    boxes: list[np.ndarray],
    out_dir: str | Path,
    val_fraction: float = 0.2,
    rng=None,
    class_names: tuple[str, ...] = ("cavity",),
    masks: list[np.ndarray] | None = None,
) -> Path:
    """Write an ultralytics detection dataset (grey PNGs, YOLO txt labels, yaml), atomically.

    Parameters
    ----------
    images
        ``n`` images ``(M, N)`` (any dtype or RGB: converted by :func:`to_gray8`).
    boxes
        ``n`` label arrays ``(K, 5)`` ``[class, x1, y1, x2, y2]`` in pixels (x = column).
    out_dir
        Dataset folder; replaced as a whole when it exists.
    val_fraction
        Fraction of images (at least one when ``n >= 2``) held out as ``val``.
    rng
        Seed or generator for the train/val split.
    class_names
        Names of classes ``0, 1, ...``.
    masks
        Optional ``n`` instance label images ``(M, N)`` (0 = background, k = k-th object),
        saved as 16-bit PNGs under ``masks/<split>/``.

    Returns
    -------
    Path
        The dataset yaml (``<out_dir>/data.yaml``), with ``channels: 1``.
    """
    import yaml

    n = len(images)
    if n == 0:
        raise ValueError("No images given; expected at least one image for a dataset")
    if len(boxes) != n:
        raise ValueError(f"Got {len(boxes)} box arrays for {n} images; expected one per image")
    if masks is not None and len(masks) != n:
        raise ValueError(f"Got {len(masks)} masks for {n} images; expected one per image")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction {val_fraction!r} is out of range; expected 0 <= f < 1")
    rng = np.random.default_rng(rng)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = rng.permutation(n)
    split = np.array(["train"] * n, dtype=object)
    split[order[:n_val]] = "val"
    out_dir = Path(out_dir).resolve()
    tmp = _atomic_dir(out_dir)
    try:
        for s in ("train", "val"):
            (tmp / "images" / s).mkdir(parents=True)
            (tmp / "labels" / s).mkdir(parents=True)
            if masks is not None:
                (tmp / "masks" / s).mkdir(parents=True)
        width = max(5, len(str(n)))
        for i in range(n):
            img = to_gray8(images[i])
            stem = f"{i:0{width}d}"
            b = (
                np.asarray(boxes[i], dtype=float).reshape(-1, 5)
                if np.size(boxes[i])
                else np.zeros((0, 5))
            )
            if len(b) and (b[:, 0].min() < 0 or b[:, 0].max() >= len(class_names)):
                raise ValueError(
                    f"Image {i} has class {int(b[:, 0].max())}; expected classes 0..{len(class_names) - 1}"
                )
            _save_png(tmp / "images" / split[i] / f"{stem}.png", img)
            write_yolo_txt(tmp / "labels" / split[i] / f"{stem}.txt", b, img.shape, with_conf=False)
            if masks is not None:
                _save_png(
                    tmp / "masks" / split[i] / f"{stem}.png", np.asarray(masks[i]).astype(np.uint16)
                )
        data = {
            "path": str(out_dir),
            "train": "images/train",
            "val": "images/val" if n_val else "images/train",
            "channels": 1,
            "nc": len(class_names),
            "names": {i: c for i, c in enumerate(class_names)},
        }
        (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote YOLO dataset %s (%d train, %d val)", out_dir, n - n_val, n_val)
    return out_dir / "data.yaml"


# --------------------------------------------------------------------------- training


def default_model_dir(name: str, ci: bool = False) -> Path:
    """``data/models/<name>/`` (default models) or ``data/models/ci/<name>/`` (ci smoke models)."""
    base = paths.data_dir("models")
    return base / "ci" / name if ci else base / name


def train(
    dataset_yaml: str | Path,
    out_dir: str | Path,
    imgsz: int = 640,
    epochs: int = 30,
    batch: int = 16,
    model_cfg: str = "yolo11n.yaml",
    seed: int = 0,
    nm_per_px: float | None = None,
    description: str = "",
    metadata: dict | None = None,
    **kwargs,
) -> Path:
    """Train a grey YOLO detector from scratch and return ``<out_dir>/best.pt``.

    No pretrained weights are used or downloaded; plots are off; CPU with 2 workers, in
    bfloat16 mixed precision where the CPU does bfloat16 natively (:func:`cpu_bf16_supported`;
    ``amp=False`` trains in float32).
    Augmentation defaults favour generality across microscopes (flips, rotations by 90
    degrees through flips, scale, brightness); any ultralytics train argument in
    ``kwargs`` overrides them.

    Parameters
    ----------
    dataset_yaml
        From :func:`write_yolo_dataset`.
    out_dir
        Folder receiving ``best.pt``, ``metadata.json`` and the ultralytics run (``run/``).
    imgsz, epochs, batch, model_cfg, seed
        As in ultralytics (``model_cfg`` is an architecture yaml such as ``yolo11n.yaml``).
    nm_per_px
        Calibration of the training images, stored in the metadata.
    description
        One line on the training data, stored in the metadata.
    metadata
        More entries for ``metadata.json``, e.g. inference defaults ``tile_overlap`` and
        ``tile_whole_frame`` (see :meth:`Detector.predict`).

    Returns
    -------
    Path
        ``best.pt`` (a copy of the run's best weights).
    """
    import yaml

    dataset_yaml = Path(dataset_yaml)
    if not dataset_yaml.is_file():
        raise FileNotFoundError(f"No dataset yaml {dataset_yaml}")
    if not str(model_cfg).endswith((".yaml", ".yml")):
        raise ValueError(
            f"model_cfg {model_cfg!r} is not an architecture yaml; expected e.g. 'yolo11n.yaml' (no pretrained weights)"
        )
    data = yaml.safe_load(dataset_yaml.read_text())
    ul = _runtime.ultralytics()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args = dict(
        data=str(dataset_yaml),
        imgsz=imgsz,
        epochs=epochs,
        batch=batch,
        seed=seed,
        deterministic=True,
        pretrained=False,
        device="cpu",
        workers=min(2, _runtime.n_threads()),
        plots=False,
        amp=False,
        verbose=False,
        project=str(out_dir),
        name="run",
        exist_ok=True,
        fliplr=0.5,
        flipud=0.5,
        degrees=0.0,
        scale=0.5,
        translate=0.1,
        mosaic=1.0,
        hsv_h=0.0,
        hsv_s=0.0,
        hsv_v=0.4,
        close_mosaic=max(1, epochs // 5),
        patience=max(epochs, 10),
    )
    args.update(kwargs)
    # mixed precision on a CPU with native bfloat16: training steps 1.56x faster here (yolo11n,
    # batch 8, 256 px: 174 vs 274 ms), epochs of the cavity data 1.31x (15.5 vs 20.3 s), so
    # more epochs fit a time budget
    bf16 = args["device"] == "cpu" and "amp" not in kwargs and cpu_bf16_supported()
    if bf16:
        args["amp"] = "bf16"
    model = ul.YOLO(model_cfg, task="detect")
    with _cpu_bf16_autocast() if bf16 else contextlib.nullcontext():
        model.train(**args)
    run = Path(model.trainer.save_dir)
    best = run / "weights" / "best.pt"
    if not best.is_file():
        best = run / "weights" / "last.pt"
    dst = out_dir / "best.pt"
    tmp = out_dir / ".best.pt.tmp"
    shutil.copyfile(best, tmp)
    os.replace(tmp, dst)
    metrics = {}
    try:
        rd = model.trainer.metrics or {}
        metrics = {k: float(v) for k, v in rd.items()}
    except Exception:  # metrics are informative only
        pass
    meta = {
        "classes": [data["names"][k] for k in sorted(data["names"])]
        if isinstance(data["names"], dict)
        else list(data["names"]),
        "imgsz": int(imgsz),
        "channels": 1,
        "nm_per_px": nm_per_px,
        "model_cfg": str(model_cfg),
        "epochs": int(getattr(model.trainer, "epochs", epochs)),  # run (a time budget refits it)
        "precision": "bf16" if bf16 else "fp32",  # of the training steps
        "seed": int(seed),
        "dataset": str(dataset_yaml),
        "description": description,
        "val_metrics": metrics,
        **(metadata or {}),
    }
    _write_json(out_dir / "metadata.json", meta)
    # an older export next to new weights would be stale
    for old in (
        out_dir / "best_openvino_model",
        out_dir / "best_int8_openvino_model",
        out_dir / "best.onnx",
    ):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    log.info("trained %s -> %s", model_cfg, dst)
    return dst


def cpu_bf16_supported() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX), via oneDNN."""
    import torch

    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def _cpu_bf16_autocast():
    """Let ultralytics' trainer autocast to bfloat16 on the CPU (it allows bf16 on CUDA only)."""
    import torch
    import ultralytics.engine.trainer as trainer

    original = trainer.autocast

    def autocast(enabled, device="cuda"):
        if device == "cpu" and enabled is torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return original(enabled, device=device)

    trainer.autocast = autocast
    try:
        yield
    finally:
        trainer.autocast = original


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def export(
    weights: str | Path,
    fmt: str = "openvino",
    imgsz: int = 640,
    calibration: list[np.ndarray] | None = None,
) -> Path:
    """Export trained weights for fast CPU inference and return the exported model's path.

    Parameters
    ----------
    weights
        ``best.pt`` from :func:`train`.
    fmt
        ``"openvino"`` (fastest here) or ``"onnx"``; OpenVINO falls back to ONNX when it fails.
    imgsz
        Fixed input size of the exported model (frames are letterboxed or tiled to it).
    calibration
        Grey frames ``(M, N)`` as the model will see them (same pixel scale, about
        ``imgsz`` px): with OpenVINO, the export is quantised to INT8 (NNCF post-training
        quantisation, activation ranges calibrated on these frames; ultralytics keeps every
        operation of the detection head, box decoding included, in floating point) into
        ``best_int8_openvino_model/`` beside the weights.
        None: no quantisation (the CPU's default precision).
    """
    if fmt not in ("openvino", "onnx"):
        raise ValueError(f"Unknown export format {fmt!r}; expected one of 'openvino', 'onnx'")
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"No weights file {weights}")
    if calibration is not None and (fmt != "openvino" or len(calibration) == 0):
        raise ValueError(
            f"INT8 calibration needs fmt 'openvino' and at least one frame; got {fmt!r} and "
            f"{len(calibration)} frames"
        )
    ul = _runtime.ultralytics()
    model = ul.YOLO(str(weights), task="detect")
    if calibration is not None:
        return _export_int8(model, weights, imgsz, calibration)
    try:
        out = model.export(
            format=fmt, imgsz=imgsz, half=False, int8=False, dynamic=False, verbose=False
        )
    except Exception as e:  # noqa: BLE001  openvino can be missing or fail on a CPU
        if fmt == "onnx":
            raise
        log.warning("OpenVINO export failed (%s); exporting ONNX instead", e)
        out = model.export(format="onnx", imgsz=imgsz, dynamic=False, simplify=False, verbose=False)
    return Path(out)


def _export_int8(model, weights: Path, imgsz: int, frames: list[np.ndarray]) -> Path:
    """OpenVINO INT8 export calibrated on ``frames`` (written as a temporary dataset)."""
    names = getattr(model, "names", None) or {0: "object"}
    cal_dir = weights.parent / ".int8_calibration"
    try:
        ds = write_yolo_dataset(
            list(frames),
            [np.zeros((0, 5))] * len(frames),
            cal_dir,
            val_fraction=0.0,
            class_names=tuple(names[k] for k in sorted(names)),
        )
        out = model.export(
            format="openvino",
            imgsz=imgsz,
            quantize=8,
            data=str(ds),
            batch=1,
            dynamic=False,
            verbose=False,
        )
        if not any(Path(out).glob("*.xml")):
            raise RuntimeError(f"the INT8 export wrote no OpenVINO model in {out}")
    except BaseException:
        # a half-written INT8 folder would be preferred by load_detector: remove it
        shutil.rmtree(weights.parent / f"{weights.stem}_int8_openvino_model", ignore_errors=True)
        raise
    finally:
        shutil.rmtree(cal_dir, ignore_errors=True)
    return Path(out)


# --------------------------------------------------------------------------- inference


def _nms(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression of predictions ``(K, 6)`` (class-aware)."""
    if len(boxes) == 0:
        return np.zeros(0, int)
    keep = []
    for c in np.unique(boxes[:, 5]):
        idx = np.flatnonzero(boxes[:, 5] == c)
        idx = idx[np.argsort(-boxes[idx, 4])]
        while len(idx):
            i = idx[0]
            keep.append(i)
            if len(idx) == 1:
                break
            ov = box_iou(boxes[i : i + 1], boxes[idx[1:]])[0]
            idx = idx[1:][ov < iou]
    keep = np.array(keep, int)
    return keep[np.argsort(-boxes[keep, 4])]


def _suppress_fragments(boxes: np.ndarray, ios: float = 0.7) -> np.ndarray:
    """Indices kept when fragments overlapping a more confident box are dropped.

    Tiled inference leaves fragments that IoU-based NMS keeps: the part of an object
    that a tile saw cut by its edge, or a box on one fringe of a large cavity. Of two
    boxes whose intersection covers at least ``ios`` of the smaller one's area
    (intersection over smaller, as SAHI's merging), the less confident is dropped,
    whatever the class.
    """
    order = np.argsort(-boxes[:, 4], kind="stable")
    b = boxes[order, :4]
    area = _area(b)
    keep = np.ones(len(b), bool)
    for i in range(len(b) - 1):  # greedy, most confident first
        if not keep[i]:
            continue
        inter = _intersection(b[i : i + 1], b[i + 1 :])[0]
        small = np.minimum(area[i], area[i + 1 :])
        keep[i + 1 :] &= ~((small > 0) & (inter >= ios * small))
    return order[keep]


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared px."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def _pad_to(frame: np.ndarray, size: int) -> np.ndarray:
    """Pad a grey frame (M, N) at the bottom/right with its median up to ``size`` px per side."""
    h, w = frame.shape
    if h >= size and w >= size:
        return frame
    out = np.full((max(h, size), max(w, size)), np.median(frame), dtype=frame.dtype)
    out[:h, :w] = frame
    return out


def _clip_boxes(b: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Predictions (K, 6) clipped to a frame of ``shape`` (M, N); boxes outside it dropped."""
    b = b[(b[:, 0] < shape[1]) & (b[:, 1] < shape[0])].copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, shape[1])
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, shape[0])
    return b


class Detector:
    """A loaded YOLO detector (PyTorch, OpenVINO or ONNX) with grey-image handling.

    Use :func:`load_detector` to make one. Attributes: ``path`` (the model loaded),
    ``metadata`` (dict from ``metadata.json``, may be empty), ``imgsz``, ``classes``.
    """

    def __init__(self, path: Path, metadata: dict | None = None):
        ul = _runtime.ultralytics()
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.imgsz = int(self.metadata.get("imgsz", 640))
        self.classes = list(self.metadata.get("classes", ["object"]))
        self.model = ul.YOLO(str(self.path), task="detect")

    def __repr__(self) -> str:
        return (
            f"Detector({str(self.path)!r}, imgsz={self.imgsz}, classes={self.classes}, "
            f"conf={self.default_conf})"
        )

    @property
    def default_conf(self) -> float:
        """Confidence threshold used when none is given: the metadata's ``conf``, else 0.25."""
        return float(self.metadata.get("conf", 0.25))

    def _drop_weak_large(self, results: list[np.ndarray], conf: float) -> list[np.ndarray]:
        # boxes longer than metadata "large_px" need the confidence "conf_large"
        cl = self.metadata.get("conf_large")
        if cl is None or cl <= conf:
            return results
        big = float(self.metadata.get("large_px", self.imgsz / 2))
        return [drop_weak_large(b, cl, big) for b in results]

    def _run(
        self, frames: list[np.ndarray], conf: float, iou: float, batch: int
    ) -> list[np.ndarray]:
        out = []
        # models trained at native pixel scale (metadata "native_scale", the in-situ model):
        # pad frames smaller than imgsz instead of letting ultralytics enlarge them
        native = bool(self.metadata.get("native_scale"))
        for i in range(0, len(frames), batch):
            part = frames[i : i + batch]
            chunk = [(_pad_to(f, self.imgsz) if native else f)[..., None] for f in part]
            res = self.model.predict(
                chunk,
                conf=conf,
                iou=iou,
                imgsz=self.imgsz,
                device="cpu",
                verbose=False,
                max_det=1000,
            )
            got = [r.boxes.data.cpu().numpy().astype(float).reshape(-1, 6) for r in res]
            if native:  # drop boxes in the padding, clip the rest to the frame
                got = [_clip_boxes(b, f.shape) for b, f in zip(got, part, strict=True)]
            out += got
        return out

    def predict(
        self,
        image_or_batch,
        conf: float | None = None,
        iou: float = 0.5,
        tile: int | str | None = None,
        overlap: float | None = None,
        batch: int = 8,
        whole_frame: bool | None = None,
    ) -> list[np.ndarray]:
        """Detect objects in one image or a batch and return boxes per image.

        Parameters
        ----------
        image_or_batch
            One image ``(M, N)`` / ``(M, N, 3|4)``, a stack ``(B, M, N)``, a list of images
            (sizes may differ), or file paths. Any dtype: see :func:`to_gray8`.
        conf, iou
            Confidence threshold (``None``: the model's metadata ``conf``, chosen on held-out
            validation images by :func:`choose_confidence`, else 0.25) and NMS IoU threshold.
            Boxes longer than the metadata's ``large_px`` need its ``conf_large`` when that
            is higher (fitted by :func:`temlib.cavity.fit_confidence`: a false large box
            weighs d^3 in swelling).
        tile
            Tile size in px for tiled inference (``None``: whole frame letterboxed to the
            model's ``imgsz``). Tiles overlap by ``overlap`` of their size; boxes cut by an
            inner tile edge are dropped (they appear whole in a neighbour), the rest
            merged with NMS, and fragments lying mostly inside a more confident box
            dropped. Use it for small defects in frames much larger than ``imgsz``.
            ``"auto"``: tiles of ``imgsz`` when a frame is over 1.5 ``imgsz``, else whole.
        overlap
            Fraction of a tile shared with its neighbour, ``0 <= overlap < 0.9``
            (``None``: the model's metadata ``tile_overlap``, else 0.25).
        batch
            Frames or tiles per forward pass.
        whole_frame
            With tiles, also detect on the whole frame letterboxed to ``imgsz`` and keep
            its boxes larger than the tile overlap: objects that big may lie whole in no
            tile (large cavities). Not for native-scale models (frames would shrink).
            ``None``: the model's metadata ``tile_whole_frame``, else False.

        Returns
        -------
        list of np.ndarray
            One ``(K, 6)`` array ``[x1, y1, x2, y2, conf, class]`` per image, pixels of the
            input image, sorted by decreasing confidence.
        """
        if conf is None:
            conf = self.default_conf
        if not 0 < conf < 1:
            raise ValueError(f"conf {conf!r} is out of range; expected 0 < conf < 1")
        if tile is not None and tile != "auto" and (not isinstance(tile, int) or tile < 32):
            raise ValueError(f"tile {tile!r} is too small; expected at least 32 px or None")
        if overlap is None:
            overlap = float(self.metadata.get("tile_overlap", 0.25))
        if whole_frame is None:
            whole_frame = bool(self.metadata.get("tile_whole_frame", False))
        if not 0 <= overlap < 0.9:
            raise ValueError(f"overlap {overlap!r} is out of range; expected 0 <= overlap < 0.9")
        frames = _as_frames(image_or_batch)
        if tile == "auto":
            # native-scale models (in-situ) tile any frame larger than imgsz: never shrink defects
            limit = 1.0 if self.metadata.get("native_scale") else 1.5
            big = max(max(f.shape) for f in frames) > limit * self.imgsz
            tile = self.imgsz if big else None
        if tile is None:
            return self._drop_weak_large(self._run(frames, conf, iou, batch), conf)
        results = []
        ov = int(round(overlap * tile))
        for f in frames:
            h, w = f.shape
            tiles, offs = [], []
            for y0 in tile_origins(h, tile, ov):
                for x0 in tile_origins(w, tile, ov):
                    tiles.append(f[y0 : y0 + tile, x0 : x0 + tile])
                    offs.append((x0, y0))
            dets = self._run(tiles, conf, iou, batch)
            allb = []
            margin = 2.0
            for (x0, y0), d, t in zip(offs, dets, tiles, strict=True):
                if not len(d):
                    continue
                th, tw = t.shape
                cut = np.zeros(len(d), bool)
                if x0 > 0:
                    cut |= d[:, 0] <= margin
                if y0 > 0:
                    cut |= d[:, 1] <= margin
                if x0 + tw < w:
                    cut |= d[:, 2] >= tw - margin
                if y0 + th < h:
                    cut |= d[:, 3] >= th - margin
                d = d[~cut].copy()
                d[:, [0, 2]] += x0
                d[:, [1, 3]] += y0
                allb.append(d)
            if whole_frame and not self.metadata.get("native_scale"):
                d = self._run([f], conf, iou, batch)[0]
                side = np.maximum(d[:, 2] - d[:, 0], d[:, 3] - d[:, 1])
                allb.append(d[side > ov - margin])
            allb = np.concatenate(allb) if allb else np.zeros((0, 6))
            allb = allb[_nms(allb, iou)]
            results.append(allb[_suppress_fragments(allb)])
        return self._drop_weak_large(results, conf)


def drop_weak_large(boxes: np.ndarray, conf_large: float, large_px: float) -> np.ndarray:
    """Predictions ``(K, 6)`` without the boxes longer than ``large_px`` below ``conf_large``."""
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return boxes[(side <= large_px) | (boxes[:, 4] >= conf_large)]


def _as_frames(x) -> list[np.ndarray]:
    if isinstance(x, str | Path):
        return [read_image(x)]
    if isinstance(x, list | tuple):
        return [read_image(v) if isinstance(v, str | Path) else to_gray8(v) for v in x]
    a = np.asarray(x)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
        return [to_gray8(a)]
    if a.ndim == 3:
        return [to_gray8(f) for f in a]
    raise ValueError(
        f"Input of shape {a.shape} is not an image or batch; expected (M, N), (M, N, 3) or (B, M, N)"
    )


def model_files(folder: Path) -> dict:
    """The model files of a folder: ``{"openvino_int8": .., "openvino": .., "onnx": .., "pt": ..}`` (present ones)."""
    found = {}
    for key, name in (
        ("openvino_int8", "best_int8_openvino_model"),
        ("openvino", "best_openvino_model"),
        ("onnx", "best.onnx"),
        ("pt", "best.pt"),
    ):
        p = folder / name
        if p.exists():
            found[key] = p
    return found


def load_detector(name_or_path: str | Path = "cavity", prefer_exported: bool = True) -> Detector:
    """Load a detector by name (``"cavity"``, ``"insitu"``: ``data/models/<name>/``) or path.

    Parameters
    ----------
    name_or_path
        A model name, a model folder (holding ``best.pt`` and perhaps exports), or a
        weights file / exported model (``.pt``, ``.onnx``, ``*_openvino_model/``).
    prefer_exported
        In a folder, use the OpenVINO or ONNX export when present (faster on CPU).
    """
    p = Path(name_or_path)
    if str(name_or_path) in MODEL_NAMES and not p.exists():
        p = default_model_dir(str(name_or_path))
        if not p.is_dir() or not model_files(p):
            raise FileNotFoundError(
                f"No trained {name_or_path!r} model in {p}; train one with the default profile of its "
                "notebook (06_cavity_generator for 'cavity', 07 for 'insitu') or pass a weights path"
            )
    if not p.exists():
        raise FileNotFoundError(
            f"No model {name_or_path!r}; expected {', '.join(MODEL_NAMES)} or a path to weights"
        )
    meta_dir = p if p.is_dir() and not p.name.endswith("_openvino_model") else p.parent
    meta_path = meta_dir / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if p.is_dir() and not p.name.endswith("_openvino_model"):
        files = model_files(p)
        if not files:
            raise FileNotFoundError(
                f"Model folder {p} holds no best.pt, best.onnx or best_openvino_model"
            )
        order = (
            ("openvino_int8", "openvino", "onnx", "pt")
            if prefer_exported
            else ("pt", "openvino", "onnx", "openvino_int8")
        )
        p = next(files[k] for k in order if k in files)
    log.info("loading detector %s", p)
    return Detector(p, metadata)


def evaluate(
    preds: list[np.ndarray],
    truths: list[np.ndarray],
    nm_per_px: list[float] | None = None,
    thickness_nm: list[float] | None = None,
    image_shapes: list[tuple[int, int]] | None = None,
    iou_thresholds: tuple[float, ...] = (0.5, 0.1),
) -> dict:
    """Score detections of a set of images: F1 per IoU, diameter and swelling errors.

    Parameters
    ----------
    preds
        Per image, predictions ``(K, 6)``.
    truths
        Per image, labels ``(L, 5)`` (or any box format of this module).
    nm_per_px, thickness_nm, image_shapes
        Per image calibration, foil thickness (nm) and ``(M, N)``, for the swelling error.
    iou_thresholds
        Thresholds at which precision, recall and F1 are pooled over all images.

    Returns
    -------
    dict
        ``precision@t``, ``recall@t``, ``f1@t``, ``tp@t``, ``fp@t``, ``fn@t`` per threshold;
        ``diameter_error`` (mean ``|d_pred - d_true| / d_true`` over pairs matched at the
        first threshold; diameter = mean box side) and ``diameter_bias`` (signed mean),
        the matched ``diameters_pred`` and ``diameters_true`` (px);
        with calibrations, ``swelling_error`` (mean absolute difference of swelling %,
        spheres of those diameters by :func:`temlib.cavity.swelling_percent`),
        ``swelling_error_median`` (its median over images: a few dense images weigh less)
        and per-image ``swelling_pred``, ``swelling_true``.
    """
    if len(preds) != len(truths):
        raise ValueError(
            f"Got {len(preds)} prediction sets for {len(truths)} images; expected one per image"
        )
    out: dict = {}
    for t in iou_thresholds:
        tp = fp = fn = 0
        for p, g in zip(preds, truths, strict=True):
            m = match(p, g, t)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / (tp + fn) if tp + fn else 1.0
        out[f"precision@{t}"], out[f"recall@{t}"] = prec, rec
        out[f"f1@{t}"] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[f"tp@{t}"], out[f"fp@{t}"], out[f"fn@{t}"] = tp, fp, fn
    dps, dgs = [np.zeros(0)], [np.zeros(0)]
    for p, g in zip(preds, truths, strict=True):
        m = match(p, g, iou_thresholds[0])
        if len(m["matches"]):
            bp, bg = _xyxy(p)[m["matches"][:, 0]], _xyxy(g)[m["matches"][:, 1]]
            dps.append((bp[:, 2] - bp[:, 0] + bp[:, 3] - bp[:, 1]) / 2)
            dgs.append((bg[:, 2] - bg[:, 0] + bg[:, 3] - bg[:, 1]) / 2)
    out["diameters_pred"], out["diameters_true"] = np.concatenate(dps), np.concatenate(dgs)
    rel = (out["diameters_pred"] - out["diameters_true"]) / np.maximum(out["diameters_true"], 1e-9)
    out["diameter_error"] = float(np.mean(np.abs(rel))) if len(rel) else float("nan")
    out["diameter_bias"] = float(np.mean(rel)) if len(rel) else float("nan")
    if nm_per_px is not None and thickness_nm is not None and image_shapes is not None:
        sp, st = [], []
        for p, g, px, t, shp in zip(
            preds, truths, nm_per_px, thickness_nm, image_shapes, strict=True
        ):
            area = shp[0] * shp[1] * px**2
            for boxes, acc in ((p, sp), (g, st)):
                b = _xyxy(boxes)
                d = (b[:, 2] - b[:, 0] + b[:, 3] - b[:, 1]) / 2 * px
                acc.append(swelling_percent(d, area, t))
        out["swelling_pred"], out["swelling_true"] = np.array(sp), np.array(st)
        err = np.abs(out["swelling_pred"] - out["swelling_true"])
        out["swelling_error"] = float(np.mean(err))
        out["swelling_error_median"] = float(np.median(err))
    return out


CONF_GRID = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


def choose_confidence(
    detector: Detector,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    grid=CONF_GRID,
    iou: float = 0.5,
    tolerance: float = 0.01,
    predictions: list[np.ndarray] | None = None,
    **predict_kwargs,
):
    """A confidence threshold fitted on labelled validation images: F1 (IoU ``iou``) at its best.

    Detect once at the lowest threshold of ``grid``, then score every threshold. Near its
    maximum F1 is flat and the argmax moves with the few images at hand, so the lowest
    threshold whose F1 is within ``tolerance`` of the best is returned: it keeps recall,
    which counts and swelling (a missed large cavity weighs d^3) need most. Use held-out
    images that are not the test set (the threshold is a fitted parameter). Images with
    no labels (e.g. real images known to hold no object) count every box as false.
    ``predictions``: the detector's boxes for ``images`` at the lowest threshold of
    ``grid`` or below, when the caller has them (not detected again).

    Returns
    -------
    conf
        The chosen threshold.
    table
        pandas DataFrame: threshold, precision, recall, F1, and ``false per empty image``
        (boxes per image without labels; NaN when every image has labels).
    """
    import pandas as pd

    grid = sorted(float(c) for c in grid)
    if not grid or not 0 < grid[0] < 1 or grid[-1] >= 1:
        raise ValueError(f"Thresholds {grid} are not valid; expected values in (0, 1)")
    if predictions is None:
        preds = detector.predict(images, conf=grid[0], **predict_kwargs)
    elif len(predictions) != len(images):
        raise ValueError(
            f"Got {len(predictions)} prediction arrays for {len(images)} images; expected one per image"
        )
    else:
        preds = [p[p[:, 4] >= grid[0]] for p in predictions]
    empty = [p[:, 4] for p, lab in zip(preds, labels, strict=True) if len(lab) == 0]
    rows = []
    for c in grid:
        ev = evaluate([p[p[:, 4] >= c] for p in preds], labels, iou_thresholds=(iou,))
        rows.append(
            {
                "conf": c,
                "precision": ev[f"precision@{iou}"],
                "recall": ev[f"recall@{iou}"],
                "f1": ev[f"f1@{iou}"],
                "false per empty image": (
                    sum(int((e >= c).sum()) for e in empty) / len(empty) if empty else np.nan
                ),
            }
        )
    table = pd.DataFrame(rows)
    near_best = table[table["f1"] >= table["f1"].max() - tolerance]
    return float(near_best["conf"].min()), table


def update_metadata(model_dir: str | Path, **entries) -> dict:
    """Add ``entries`` to a model folder's ``metadata.json`` (written atomically); returns it."""
    path = Path(model_dir) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No metadata.json in {model_dir}; expected a folder written by train()"
        )
    meta = json.loads(path.read_text())
    meta.update(entries)
    _write_json(path, meta)
    return meta


# --------------------------------------------------------------------------- command line


def detect_folder(
    images_dir: str | Path,
    out_dir: str | Path,
    model: str | Path = "cavity",
    nm_per_px: float | None = None,
    thickness_nm: float | None = None,
    conf: float | None = None,
    iou: float = 0.5,
    tile: int | str | None = "auto",
    progress: bool = True,
) -> dict:
    """Detect defects in every image of a folder; write YOLO txt files and tables.

    Writes into ``out_dir``: ``<stem>.txt`` per image (``class cx cy w h conf``,
    normalised), ``detections.csv`` (one row per box: image, class, corners, centre, size
    and diameter in px, and in nm when ``nm_per_px`` is given) and ``images.csv`` (one row
    per image: count, mean diameter, swelling % when ``nm_per_px`` and ``thickness_nm``
    are given). The diameter of a box is the mean of its width and height; swelling
    assumes spherical cavities: ``100 sum(pi d^3/6) / (A t - sum(pi d^3/6))``, a box wider
    than 1.5 ``t`` counting as the foil column under it (:func:`temlib.cavity.swelling_percent`).

    Returns
    -------
    dict
        ``n_images``, ``n_detections``, ``detections_csv``, ``images_csv``, ``model``.
    """
    from tqdm.auto import tqdm

    files = list_images(images_dir)
    if nm_per_px is not None and not nm_per_px > 0:
        raise ValueError(f"nm/px {nm_per_px!r} must be positive")
    if thickness_nm is not None and not thickness_nm > 0:
        raise ValueError(f"Thickness {thickness_nm!r} nm must be positive")
    if thickness_nm is not None and nm_per_px is None:
        raise ValueError("A thickness needs --nm-per-px too; expected both to estimate swelling")
    det = load_detector(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    det_rows, img_rows = [], []
    for f in tqdm(files, desc="detect", disable=not progress):
        img = read_image(f)
        b = det.predict(img, conf=conf, iou=iou, tile=tile)[0]
        write_yolo_txt(out_dir / f"{f.stem}.txt", b, img.shape, with_conf=True)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        d_px = (w + h) / 2
        for k in range(len(b)):
            row = dict(
                image=f.name,
                cls=int(b[k, 5]),
                conf=round(float(b[k, 4]), 4),
                x1=round(float(b[k, 0]), 2),
                y1=round(float(b[k, 1]), 2),
                x2=round(float(b[k, 2]), 2),
                y2=round(float(b[k, 3]), 2),
                cx=round(float(b[k, 0] + b[k, 2]) / 2, 2),
                cy=round(float(b[k, 1] + b[k, 3]) / 2, 2),
                width_px=round(float(w[k]), 2),
                height_px=round(float(h[k]), 2),
                diameter_px=round(float(d_px[k]), 2),
                diameter_nm=round(float(d_px[k] * nm_per_px), 3) if nm_per_px else "",
            )
            det_rows.append(row)
        irow = dict(
            image=f.name,
            height_px=img.shape[0],
            width_px=img.shape[1],
            n_detections=len(b),
            mean_diameter_px=round(float(d_px.mean()), 2) if len(b) else "",
            mean_diameter_nm=round(float(d_px.mean() * nm_per_px), 3)
            if len(b) and nm_per_px
            else "",
            swelling_percent="",
        )
        if thickness_nm is not None:
            area = img.shape[0] * img.shape[1] * nm_per_px**2
            irow["swelling_percent"] = round(
                swelling_percent(d_px * nm_per_px, area, thickness_nm), 5
            )
        img_rows.append(irow)
    det_cols = [
        "image",
        "cls",
        "conf",
        "x1",
        "y1",
        "x2",
        "y2",
        "cx",
        "cy",
        "width_px",
        "height_px",
        "diameter_px",
        "diameter_nm",
    ]
    _write_csv(out_dir / "detections.csv", det_rows, det_cols)
    _write_csv(out_dir / "images.csv", img_rows, list(img_rows[0]))
    return dict(
        n_images=len(files),
        n_detections=len(det_rows),
        detections_csv=out_dir / "detections.csv",
        images_csv=out_dir / "images.csv",
        model=det.path,
    )


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=columns)
        wr.writeheader()
        wr.writerows(rows)
    os.replace(tmp, path)


def _cli_detect(parser):
    parser.add_argument(
        "images_dir", help="folder of images (png, jpg, tif; grey or RGB, 8 or 16 bit)"
    )
    parser.add_argument(
        "--model",
        default="cavity",
        help="'cavity' or 'insitu' (data/models/<name>/, trained by notebooks 06 / 07) or a weights path",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: <stem>.txt per image, detections.csv, images.csv",
    )
    parser.add_argument(
        "--nm-per-px", type=float, default=None, help="calibration, for diameters in nm"
    )
    parser.add_argument(
        "--thickness-nm", type=float, default=None, help="foil thickness, for a swelling estimate"
    )
    parser.add_argument(
        "--conf",
        type=float,
        default=None,
        help="confidence threshold (default: the model's, chosen on validation images; else 0.25; "
        "a cavity model also holds a higher one for boxes longer than half its input)",
    )
    parser.add_argument("--iou", type=float, default=0.5, help="NMS IoU threshold (default 0.5)")
    parser.add_argument(
        "--tile",
        default="auto",
        help="tile size in px, 'auto' (model size when a frame is over 1.5x it; default) or 'none'",
    )

    def run(args) -> int:
        tile = args.tile.lower()
        if tile not in ("auto", "none") and not tile.isdigit():
            raise ValueError(
                f"--tile {args.tile!r} is not valid; expected a size in px, 'auto' or 'none'"
            )
        tile = None if tile == "none" else (tile if tile == "auto" else int(tile))
        res = detect_folder(
            args.images_dir,
            args.out,
            model=args.model,
            nm_per_px=args.nm_per_px,
            thickness_nm=args.thickness_nm,
            conf=args.conf,
            iou=args.iou,
            tile=tile,
        )
        print(
            f"{res['n_detections']} detections in {res['n_images']} images (model {res['model']}); "
            f"wrote {args.out}/<image>.txt, {res['detections_csv'].name}, {res['images_csv'].name}"
        )
        return 0

    return run
