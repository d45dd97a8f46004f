"""Detection and tracking of defects in in-situ irradiation videos; events, densities, maps.

Pipeline: a YOLO detector (:mod:`temlib.detect`, model ``"insitu"``) finds black dots and
loops in each frame; a linker joins detections into tracks; tracks give events
(nucleation, growth, disappearance, coalescence), areal density and size distribution
versus dose or time, and spatial maps.

Linkers (``method``):

- ``"botsort"`` (default) / ``"bytetrack"``: ultralytics' trackers (Kalman + IoU; BoT-SORT
  adds global motion compensation, here the frame's drift by phase correlation,
  :class:`DriftEstimator`) fed with the detections;
- ``"linker"``: trackpy-style nearest-neighbour linking solved as an assignment
  (Hungarian) on centre distance, with global drift compensation (median displacement of
  confident pairs) and a ``memory`` of a few frames for missed detections.

On a finished video (and when a watch of a folder ends), tracks are then followed back to
where the defect was still faint and on to where it faded, through detections below the
tracker's confidence (:func:`extend_tracks`).

Tracks are a tidy table, one row per defect per frame: ``frame, time_s, dose, track_id,
x1, y1, x2, y2`` (px, x = column), ``row, col`` (centre, px), ``cls``, ``conf``,
``diameter_px`` (mean of box width and height) and ``diameter_nm``.

Default models: ``data/models/insitu/`` (trained by the default profile of notebook
``07_yolo_tracking``); the ci profile trains into ``data/models/ci/insitu/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from . import _runtime, detect, insitu

logger = logging.getLogger(__name__)

TRACK_COLUMNS = [
    "frame",
    "time_s",
    "dose",
    "track_id",
    "x1",
    "y1",
    "x2",
    "y2",
    "row",
    "col",
    "cls",
    "conf",
    "diameter_px",
    "diameter_nm",
]
METHODS = ("linker", "bytetrack", "botsort")
EXTEND_CONF = 0.1  # detections tracks are extended through (validation videos of notebook 07)


# --------------------------------------------------------------------------------------
# Training


def train_detector(
    out_dir,
    n_images: int = 400,
    shape: tuple[int, int] = (320, 320),
    epochs: int = 8,
    batch: int = 16,
    train_imgsz: int = 320,
    infer_imgsz: int = 1024,
    model_cfg: str = "yolo11n.yaml",
    export_format: str | None = "openvino",
    int8: bool = True,
    extra_images: list[np.ndarray] | None = None,
    extra_boxes: list[np.ndarray] | None = None,
    extra_repeat: int = 2,
    rng=None,
    **train_kwargs,
) -> Path:
    """Train the in-situ defect detector on synthetic frames and export it.

    The detector is trained on small synthetic frames (:func:`temlib.insitu.simulate_frames`)
    at their native pixel scale and run on whole frames at ``infer_imgsz`` (YOLO is fully
    convolutional): defects keep the size in pixels they had in training.

    Parameters
    ----------
    out_dir
        Model folder (e.g. ``data/models/insitu``): ``best.pt``, ``metadata.json``, export.
    n_images, shape
        Number and shape (M, N) of synthetic training frames.
    epochs, batch, train_imgsz, model_cfg
        Passed to :func:`temlib.detect.train`.
    infer_imgsz
        Input size of the exported model and of inference (written to the metadata).
    export_format
        ``"openvino"``, ``"onnx"`` or None (no export).
    int8
        With OpenVINO, also write an INT8 export (``best_int8_openvino_model``, what
        :func:`temlib.detect.load_detector` then prefers), its activation ranges calibrated
        on 16 synthetic frames of ``infer_imgsz`` px and up to 16 of ``extra_images``. When
        quantisation fails the floating-point export stays the one used (logged).
    extra_images, extra_boxes
        Optional real labelled frames ``(M, N)`` with ``(K, 5)`` boxes, cut into tiles of
        the training size and added ``extra_repeat`` times to the training set.
    rng
        Seed or generator.

    Returns
    -------
    Path
        ``out_dir``.
    """
    rng = np.random.default_rng(rng)
    out_dir = Path(out_dir)
    images, boxes, _ = insitu.simulate_frames(n_images, shape, rng=rng)
    if extra_images:
        tiles, tboxes = insitu.crop_tiles(extra_images, extra_boxes, size=max(shape))
        images, boxes = images + tiles * extra_repeat, boxes + tboxes * extra_repeat
    ds = detect.write_yolo_dataset(
        images,
        boxes,
        out_dir.parent / f".{out_dir.name}_dataset",
        val_fraction=0.1,
        rng=rng,
        class_names=insitu.CLASS_NAMES,
    )
    seed = int(rng.integers(0, 2**31 - 1))
    # few iterations on a CPU: step the optimiser every batch (no accumulation), short warm-up,
    # validate only after the last epoch, images cached in memory
    kw = dict(nbs=batch, warmup_epochs=1.0, optimizer="AdamW", lr0=0.002, val=False, cache="ram")
    kw.update(train_kwargs)
    best = detect.train(
        ds,
        out_dir,
        imgsz=train_imgsz,
        epochs=epochs,
        batch=batch,
        model_cfg=model_cfg,
        seed=seed,
        nm_per_px=None,
        description=f"{n_images} synthetic in-situ frames {shape} (temlib.insitu.simulate_frames)"
        + (f" + tiles of {len(extra_images)} real frames x{extra_repeat}" if extra_images else ""),
        **kw,
    )
    meta_path = out_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    # trained at native pixel scale: detect pads smaller frames instead of enlarging them
    meta.update({"train_imgsz": int(train_imgsz), "imgsz": int(infer_imgsz), "native_scale": True})
    tmp = meta_path.with_name(".metadata.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=float))
    os.replace(tmp, meta_path)
    if export_format:
        detect.export(best, export_format, imgsz=infer_imgsz)
    if export_format == "openvino" and int8:
        cal, _, _ = insitu.simulate_frames(16, (infer_imgsz, infer_imgsz), rng=seed)
        cal += list(extra_images or [])[:16]
        try:
            detect.export(best, "openvino", imgsz=infer_imgsz, calibration=cal)
        except Exception as e:  # noqa: BLE001  (quantisation is an optional speed-up)
            logger.warning("INT8 export failed (%s); the floating-point export is used", e)
    return out_dir


# --------------------------------------------------------------------------------------
# Linking


def _centres(boxes: np.ndarray) -> np.ndarray:
    """(K, 2) centres (row, col) of (K, >=4) ``[x1, y1, x2, y2, ...]`` boxes."""
    return np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], axis=1)


class Linker:
    """Frame-by-frame linker (state: the open tracks); use :func:`link` for a whole table.

    Parameters
    ----------
    max_distance_px
        Largest centre displacement (after drift compensation) between two frames, px;
        a pair may also move up to half the larger box size.
    memory
        Frames a track may be missing and still be continued.
    drift
        Estimate the global drift of each frame (median displacement of unambiguous
        pairs) and compensate it before linking.
    """

    def __init__(self, max_distance_px: float = 8.0, memory: int = 3, drift: bool = True):
        if max_distance_px <= 0:
            raise ValueError(f"max_distance_px must be positive, got {max_distance_px!r}")
        if memory < 0:
            raise ValueError(f"memory must be >= 0 frames, got {memory!r}")
        self.max_distance_px = float(max_distance_px)
        self.memory = int(memory)
        self.drift = bool(drift)
        self.next_id = 1
        self.ids = np.zeros(0, int)
        self.pos = np.zeros((0, 2))
        self.size = np.zeros(0)
        self.last = np.zeros(0, int)
        self.shift = np.zeros(2)  # accumulated drift (row, col)

    def _estimate_drift(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        if len(prev) < 3 or len(cur) < 3:
            return np.zeros(2)
        d = np.hypot(prev[:, None, 0] - cur[None, :, 0], prev[:, None, 1] - cur[None, :, 1])
        radius = 3 * self.max_distance_px
        # mutual nearest neighbours within a generous radius
        j = d.argmin(1)
        i_back = d.argmin(0)
        ok = (i_back[j] == np.arange(len(prev))) & (d[np.arange(len(prev)), j] < radius)
        if ok.sum() < 3:
            return np.zeros(2)
        return np.median(cur[j[ok]] - prev[ok], axis=0)

    def update(self, frame: int, boxes: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """Link the detections ``boxes`` (K, >=4) of ``frame``; return their (K,) track ids.

        ``image`` is not used (the trackers of ultralytics take it, for motion compensation).
        """
        boxes = np.asarray(boxes, float).reshape(-1, boxes.shape[-1] if np.ndim(boxes) == 2 else 6)
        cur = _centres(boxes) if len(boxes) else np.zeros((0, 2))
        size = (
            ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2
            if len(boxes)
            else np.zeros(0)
        )
        # drop tracks gone for longer than the memory
        alive = frame - self.last <= self.memory + 1
        self.ids, self.pos, self.size, self.last = (
            self.ids[alive],
            self.pos[alive],
            self.size[alive],
            self.last[alive],
        )
        out = np.zeros(len(cur), int)
        if len(self.ids) and len(cur):
            recent = self.last == self.last.max()
            shift = self._estimate_drift(self.pos[recent], cur) if self.drift else np.zeros(2)
            pred = self.pos + shift
            d = np.hypot(pred[:, None, 0] - cur[None, :, 0], pred[:, None, 1] - cur[None, :, 1])
            gate = np.maximum(
                self.max_distance_px, 0.5 * np.maximum(self.size[:, None], size[None, :])
            )
            big = 1e6
            cost = np.where(d <= gate, d, big)
            r, c = linear_sum_assignment(cost)
            good = cost[r, c] < big
            r, c = r[good], c[good]
            out[c] = self.ids[r]
            self.pos[r] = cur[c]
            self.size[r] = size[c]
            self.last[r] = frame
            # unmatched old tracks move with the drift
            moved = np.ones(len(self.ids), bool)
            moved[r] = False
            self.pos[moved] += shift
            self.shift += shift
        new = np.flatnonzero(out == 0)
        if len(new):
            nid = np.arange(self.next_id, self.next_id + len(new))
            self.next_id += len(new)
            out[new] = nid
            self.ids = np.concatenate([self.ids, nid])
            self.pos = np.concatenate([self.pos, cur[new]])
            self.size = np.concatenate([self.size, size[new]])
            self.last = np.concatenate([self.last, np.full(len(new), frame)])
        return out


class _Dets:
    """Detections in the shape ultralytics' trackers expect (``conf, cls, xywh``, indexing)."""

    def __init__(self, boxes: np.ndarray):
        b = np.asarray(boxes, float).reshape(-1, 6)
        self.data = b
        self.conf = b[:, 4]
        self.cls = b[:, 5]
        self.xyxy = b[:, :4]
        self.xywh = np.stack(
            [
                (b[:, 0] + b[:, 2]) / 2,
                (b[:, 1] + b[:, 3]) / 2,
                b[:, 2] - b[:, 0],
                b[:, 3] - b[:, 1],
            ],
            axis=1,
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx):
        return _Dets(self.data[idx])


class DriftEstimator:
    """Drift of each frame against the one before, by phase correlation (a translation).

    BoT-SORT's global motion compensation: in-situ TEM frames move by stage and specimen
    drift, a translation, so the shift is found by phase correlation of the frames shrunk
    ``downscale`` times (area average, Hann window; never below 128 px) instead of
    ultralytics' sparse optical flow and affine fit: 0.27 vs 3.1 ms per 512 px frame, the
    same tracking scores on synthetic videos of known drift. Has the interface of
    ``ultralytics.trackers.utils.gmc.GMC``: ``apply`` returns the 2 x 3 warp from the
    previous frame's pixel coordinates to this frame's (identity for the first frame).
    """

    method = "phase_correlation"  # any name but None: ultralytics then calls apply()

    def __init__(self, downscale: int = 4):
        if isinstance(downscale, bool) or int(downscale) != downscale or downscale < 1:
            raise ValueError(f"downscale must be a whole number >= 1, got {downscale!r}")
        self.downscale = int(downscale)
        self.reset_params()

    def reset_params(self) -> None:
        self.prev: np.ndarray | None = None
        self.window: np.ndarray | None = None

    def apply(self, raw_frame: np.ndarray, detections=None) -> np.ndarray:
        import cv2

        f = np.asarray(raw_frame)
        if f.ndim == 3:
            f = f[..., 0] if f.shape[2] == 1 else cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        h, w = f.shape
        d = max(1, min(self.downscale, min(h, w) // 128))  # keep >= 128 px
        small = f.astype(np.float32)
        if d > 1:
            small = cv2.resize(small, (w // d, h // d), interpolation=cv2.INTER_AREA)
        warp = np.eye(2, 3)
        if self.prev is not None and self.prev.shape == small.shape:
            (dx, dy), _ = cv2.phaseCorrelate(self.prev, small, self.window)
            warp[0, 2], warp[1, 2] = dx * d, dy * d
        if self.window is None or self.window.shape != small.shape:
            self.window = cv2.createHanningWindow(small.shape[::-1], cv2.CV_32F)
        self.prev = small
        return warp


class _UltralyticsTracker:
    """ByteTrack / BoT-SORT from ultralytics, frame by frame, returning ids per detection."""

    def __init__(self, method: str, **overrides):
        _runtime.ultralytics()
        import yaml
        from ultralytics.trackers.bot_sort import BOTSORT
        from ultralytics.trackers.byte_tracker import BYTETracker
        from ultralytics.utils import ROOT, IterableSimpleNamespace

        cfg = yaml.safe_load((ROOT / "cfg" / "trackers" / f"{method}.yaml").read_text())
        # small defects drift by a good part of their size between frames: associate down to
        # IoU 0.1 (match_thresh = 1 - IoU; 0.9 vs ultralytics' 0.8, validation videos of
        # notebook 07: BoT-SORT MOTA 0.800 -> 0.817, IDF1 0.877 -> 0.901)
        cfg.update(
            {
                "track_high_thresh": 0.2,
                "new_track_thresh": 0.25,
                "track_buffer": 10,
                "match_thresh": 0.9,
            }
        )
        if method == "botsort":
            cfg.update({"with_reid": False})
        cfg.update(overrides)
        args = IterableSimpleNamespace(**cfg)
        self.tracker = (BOTSORT if method == "botsort" else BYTETracker)(args)
        if method == "botsort":
            # drift by phase correlation on frames shrunk 4x; ultralytics' sparse optical flow
            # (also at 4x) on six synthetic videos of notebook 07: mean MOTA / IDF1 0.820 / 0.897
            # vs 0.823 / 0.899, at 5x their drift (3 px per frame, four videos) 0.837 / 0.902 vs
            # 0.838 / 0.903 (without compensation 0.660 / 0.624)
            self.tracker.gmc = DriftEstimator(downscale=4)
        self.method = method

    def update(self, frame: int, boxes: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        dets = _Dets(boxes)
        # the frame serves BoT-SORT's motion compensation only (DriftEstimator: grey or colour)
        img = image if self.method == "botsort" else None
        out = self.tracker.update(dets, img)
        ids = np.zeros(len(dets), int)
        if len(out):
            ids[out[:, -1].astype(int)] = out[:, 4].astype(int)
        return ids  # 0 = not (yet) confirmed


def _make_tracker(method: str, max_distance_px: float, memory: int, drift: bool = True):
    """The tracker of ``method``: :class:`Linker` or ultralytics' ByteTrack / BoT-SORT."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}")
    if method == "linker":
        return Linker(max_distance_px, memory, drift)
    return _UltralyticsTracker(method)


def link(
    detections: pd.DataFrame,
    method: str = "linker",
    max_distance_px: float = 8.0,
    memory: int = 3,
    drift: bool = True,
    min_length: int = 1,
) -> pd.DataFrame:
    """Link per-frame detections into tracks.

    Parameters
    ----------
    detections
        Table with ``frame, x1, y1, x2, y2`` (px) and optionally ``conf, cls``.
    method
        ``"linker"``, ``"bytetrack"`` or ``"botsort"`` (see the module docstring; BoT-SORT's
        motion compensation needs images and is used by :func:`track_frames`).
    max_distance_px, memory, drift
        Options of :class:`Linker`.
    min_length
        Drop tracks seen in fewer frames (suppresses one-frame false detections).

    Returns
    -------
    pd.DataFrame
        ``detections`` with a ``track_id`` column (rows without a track dropped).
    """
    tracker = _make_tracker(method, max_distance_px, memory, drift)
    _check_min_length(min_length)
    missing = {"frame", "x1", "y1", "x2", "y2"} - set(detections.columns)
    if missing:
        raise ValueError(
            f"Detections lack columns {sorted(missing)}; expected frame, x1, y1, x2, y2"
        )
    det = detections.copy()
    if "conf" not in det:
        det["conf"] = 1.0
    if "cls" not in det:
        det["cls"] = 0
    det = det.sort_values("frame", kind="stable").reset_index(drop=True)
    ids = np.zeros(len(det), int)
    cols = ["x1", "y1", "x2", "y2", "conf", "cls"]
    for f, idx in det.groupby("frame").indices.items():
        ids[idx] = tracker.update(int(f), det.loc[idx, cols].to_numpy(float))
    det["track_id"] = ids
    det = det[det.track_id > 0]
    return filter_tracks(det, min_length)


def extend_tracks(
    tracks: pd.DataFrame,
    detections: list[np.ndarray],
    min_iou: float = 0.3,
    taken_iou: float = 0.7,
) -> pd.DataFrame:
    """Follow each finished track back before its first frame and on after its last one.

    An online tracker starts a track only from a confident detection and confirms it a
    frame later, so the first frames of a nucleating defect (small and faint) are lost,
    and so are the last frames of one that fades. On a finished video each track is
    followed frame by frame backwards from its first box and forwards from its last,
    taking the detection (of any confidence in ``detections``) that overlaps the current
    box most, while that overlap is at least ``min_iou``.

    Parameters
    ----------
    tracks
        Table with ``frame, track_id, x1, y1, x2, y2, conf, cls``.
    detections
        ``(K, 6)`` ``[x1, y1, x2, y2, conf, cls]`` detections of every frame (list index =
        frame), typically at a lower confidence than the tracker was given.
    min_iou
        Smallest IoU between consecutive boxes of an extension.
    taken_iou
        A detection overlapping a box already in that frame's tracks at this IoU or more
        belongs to that box (a duplicate of it) and is not taken.

    Returns
    -------
    pd.DataFrame
        ``tracks`` with the added rows (their detection's ``conf`` and ``cls``), sorted by
        frame and track id.
    """
    if tracks.empty:
        return tracks
    n = len(detections)
    cols = ["x1", "y1", "x2", "y2"]
    dets = [np.asarray(d, float).reshape(-1, 6) for d in detections]
    free = [np.ones(len(d), bool) for d in dets]

    def take(f: int, box: np.ndarray) -> None:  # box now used in frame f: it and its duplicates
        if len(dets[f]):
            free[f] &= detect.box_iou(box[None], dets[f][:, :4])[0] < taken_iou

    for f, g in tracks.groupby("frame"):
        if 0 <= f < n and len(dets[f]):
            iou = detect.box_iou(g[cols].to_numpy(float), dets[f][:, :4])
            free[int(f)] &= iou.max(axis=0) < taken_iou
    rows = []
    for tid, g in tracks.sort_values("frame").groupby("track_id"):
        ends = ((-1, g.iloc[0]), (1, g.iloc[-1]))
        for step, end in ends:
            f, box = int(end.frame), end[cols].to_numpy(float)
            while 0 <= f + step < n:
                f += step
                cand = np.flatnonzero(free[f])
                if not len(cand):
                    break
                iou = detect.box_iou(box[None], dets[f][cand, :4])[0]
                k = int(np.argmax(iou))
                if iou[k] < min_iou:
                    break
                d = dets[f][cand[k]]
                box = d[:4].copy()
                take(f, box)
                rows.append((f, tid, *box, d[4], int(d[5])))
    if not rows:
        return tracks.sort_values(["frame", "track_id"]).reset_index(drop=True)
    add = pd.DataFrame(rows, columns=["frame", "track_id", *cols, "conf", "cls"])
    out = pd.concat([tracks, add.astype({c: tracks[c].dtype for c in add if c in tracks})])
    return out.sort_values(["frame", "track_id"], kind="stable").reset_index(drop=True)


def fill_gaps(tracks: pd.DataFrame) -> pd.DataFrame:
    """Add the frames a track was missed in (within its memory) by linear interpolation.

    Interpolated rows get ``conf = 0``; other columns are interpolated (``cls`` copied).
    """
    if tracks.empty:
        return tracks
    parts = [tracks]
    num = [c for c in ("x1", "y1", "x2", "y2") if c in tracks]
    for tid, d in tracks.groupby("track_id"):
        f = d.frame.to_numpy(int)
        if len(f) < 2 or np.all(np.diff(f) == 1):
            continue
        missing = np.setdiff1d(np.arange(f.min(), f.max() + 1), f)
        order = np.argsort(f)
        rows = {"frame": missing, "track_id": tid, "conf": 0.0}
        for c in num:
            rows[c] = np.interp(missing, f[order], d[c].to_numpy(float)[order])
        if "cls" in d:
            rows["cls"] = d.cls.to_numpy()[order][np.searchsorted(f[order], missing) - 1]
        parts.append(pd.DataFrame(rows))
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["frame", "track_id"]).reset_index(drop=True)


def _check_min_length(min_length) -> None:
    if isinstance(min_length, bool) or int(min_length) != min_length or min_length < 1:
        raise ValueError(f"min_length {min_length!r} must be a positive whole number of frames")


def filter_tracks(
    tracks: pd.DataFrame, min_length: int = 1, n_frames: int | None = None
) -> pd.DataFrame:
    """Tracks seen in at least ``min_length`` frames.

    With ``n_frames`` (frames of the video), a track the video ended on is kept too when it
    was seen in every frame since it began: it had no chance to reach ``min_length``
    (without this, the density of the last frames drops: their new defects are dropped).
    """
    _check_min_length(min_length)
    if min_length == 1 or tracks.empty:
        return tracks.reset_index(drop=True)
    g = tracks.groupby("track_id").frame
    n = g.transform("size")
    keep = n >= min_length
    if n_frames is not None:
        keep |= (g.transform("max") == n_frames - 1) & (n == n_frames - g.transform("min"))
    return tracks[keep].reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Detection + tracking of frames


def _finish_table(tracks, nm_per_px, fps, dose_rate, dose=None) -> pd.DataFrame:
    t = tracks.copy()
    if t.empty:
        return pd.DataFrame(columns=TRACK_COLUMNS)
    t["row"] = (t.y1 + t.y2) / 2
    t["col"] = (t.x1 + t.x2) / 2
    t["diameter_px"] = ((t.x2 - t.x1) + (t.y2 - t.y1)) / 2
    t["diameter_nm"] = t.diameter_px * nm_per_px if nm_per_px else np.nan
    t["time_s"] = t.frame / fps if fps else np.nan
    if dose is not None:
        t["dose"] = np.asarray(dose)[t.frame.to_numpy(int)]
    else:
        t["dose"] = t.time_s * dose_rate if dose_rate else np.nan
    t["cls"] = t.cls.astype(int)
    t["track_id"] = t.track_id.astype(int)
    return t[TRACK_COLUMNS].sort_values(["frame", "track_id"]).reset_index(drop=True)


def _frames_iter(source):
    """(index, name, grey frame) from a folder, a video file, a list of paths or (T, M, N)."""
    if isinstance(source, str | Path):
        p = Path(source)
        if p.is_dir():
            files = insitu.list_frames(p)
            if not files:
                raise FileNotFoundError(f"No frames (png, jpg, tif) in {p}")
            for i, f in enumerate(files):
                yield i, f.name, detect.read_image(f)
            return
        if p.is_file():
            import cv2

            cap = cv2.VideoCapture(str(p))
            if not cap.isOpened():
                raise ValueError(f"{p} is not a readable video or folder of frames")
            i = 0
            try:
                while True:
                    ok, img = cap.read()
                    if not ok:
                        break
                    yield i, f"{p.stem}_{i:05d}", detect.to_gray8(img[..., ::-1])
                    i += 1
            finally:
                cap.release()
            if i == 0:
                raise ValueError(f"{p} is not a readable video or folder of frames")
            return
        raise FileNotFoundError(f"No such folder or video file: {p}")
    for i, f in enumerate(source):
        if isinstance(f, str | Path):
            yield i, Path(f).name, detect.read_image(f)
        else:
            yield i, f"frame{i:05d}", detect.to_gray8(np.asarray(f))


class _FrameTracker:
    """Detect and link one frame at a time; extend and filter the tracks at the end.

    What :func:`track_frames` and :func:`watch_folder` share. ``step`` returns the frame's
    linked rows (``frame, track_id, x1, y1, x2, y2, conf, cls``) and the number of
    detections given to the tracker; ``finish`` the tracks of every frame so far, extended
    (``extend_conf``) and without the tracks shorter than ``min_length``.
    """

    def __init__(
        self,
        model,
        method: str,
        conf: float,
        iou: float,
        tile,
        max_distance_px: float,
        memory: int,
        min_length: int,
        extend_conf: float | None,
    ):
        _check_min_length(min_length)
        if extend_conf is not None and not 0 < extend_conf < 1:
            raise ValueError(
                f"extend_conf {extend_conf!r} is out of range; expected 0 < c < 1 or None"
            )
        self.extend = extend_conf is not None and extend_conf < conf
        self.tracker = _make_tracker(method, max_distance_px, memory)
        self.det = model if isinstance(model, detect.Detector) else detect.load_detector(model)
        self.conf, self.iou, self.tile = conf, iou, tile
        self.extend_conf, self.min_length = extend_conf, min_length
        self.parts: list[pd.DataFrame] = []
        self.every: list[np.ndarray] = []  # each frame's detections down to extend_conf
        self.seconds = 0.0  # detection + linking of the last frame

    def step(self, i: int, img: np.ndarray) -> tuple[pd.DataFrame, int]:
        t0 = time.perf_counter()
        c = self.extend_conf if self.extend else self.conf
        b = self.det.predict(img, conf=c, iou=self.iou, tile=self.tile)[0]
        if self.extend:
            self.every.append(b)
            b = b[b[:, 4] >= self.conf]
        ids = self.tracker.update(i, b, img)
        self.seconds = time.perf_counter() - t0
        keep = ids > 0  # 0: not (yet) confirmed by the tracker
        rows = pd.DataFrame(
            {
                "frame": i,
                "track_id": ids[keep],
                "x1": b[keep, 0],
                "y1": b[keep, 1],
                "x2": b[keep, 2],
                "y2": b[keep, 3],
                "conf": b[keep, 4],
                "cls": b[keep, 5].astype(int),
            }
        )
        self.parts.append(rows)
        return rows, len(b)

    def finish(self) -> pd.DataFrame:
        tracks = pd.concat(self.parts, ignore_index=True) if self.parts else pd.DataFrame()
        if tracks.empty:
            return tracks
        if self.extend:
            tracks = extend_tracks(tracks, self.every)
        return filter_tracks(tracks, self.min_length, n_frames=len(self.parts))


def track_frames(
    source,
    model="insitu",
    method: str = "botsort",
    conf: float = 0.25,
    iou: float = 0.5,
    tile: int | None = None,
    nm_per_px: float | None = None,
    fps: float | None = None,
    dose_rate: float | None = None,
    dose: np.ndarray | None = None,
    max_distance_px: float = 8.0,
    memory: int = 3,
    min_length: int = 1,
    extend_conf: float | None = EXTEND_CONF,
    fill: bool = True,
    progress: bool = True,
    timings: list | None = None,
) -> pd.DataFrame:
    """Detect and track defects through a sequence of frames.

    Parameters
    ----------
    source
        Folder of frames (natural order), a video file, a list of paths, or (T, M, N) frames.
    model
        A model name (``"insitu"``), path, or a loaded :class:`temlib.detect.Detector`.
    method
        ``"botsort"`` (default), ``"bytetrack"`` or ``"linker"``.
    conf, iou, tile
        Detection options (:meth:`temlib.detect.Detector.predict`); the tracker is given
        the detections of at least ``conf``.
    nm_per_px, fps, dose_rate, dose
        Calibration (nm/px), frame rate (frames/s), dose rate (dpa/s) or the (T,) dose of
        each frame: fill ``diameter_nm``, ``time_s`` and ``dose`` (NaN when not given).
    max_distance_px, memory, min_length
        Linking options (:func:`link`).
    extend_conf
        When below ``conf``: frames are detected down to this confidence and, once the
        video is tracked, every track is followed back before its first frame and on after
        its last through those detections (:func:`extend_tracks`), before ``min_length``
        is applied. None: no extension.
    fill
        Fill the frames a track was missed in (:func:`fill_gaps`, ``conf = 0``).
    progress
        Show a tqdm bar.
    timings
        If a list, per-frame wall times (s) of detection + linking are appended to it (with
        the track extension's time spread evenly over the frames).

    Returns
    -------
    pd.DataFrame
        The tracks table (columns :data:`TRACK_COLUMNS`).
    """
    from tqdm.auto import tqdm

    ft = _FrameTracker(
        model, method, conf, iou, tile, max_distance_px, memory, min_length, extend_conf
    )
    n = len(source) if isinstance(source, list | tuple | np.ndarray) else None
    for i, _name, img in tqdm(_frames_iter(source), total=n, desc="track", disable=not progress):
        ft.step(i, img)
        if timings is not None:
            timings.append(ft.seconds)
    t0 = time.perf_counter()
    tracks = ft.finish()
    if timings is not None and ft.parts:  # the end step (extension, filter), spread over frames
        share = (time.perf_counter() - t0) / len(ft.parts)
        timings[-len(ft.parts) :] = [t + share for t in timings[-len(ft.parts) :]]
    if tracks.empty:
        return pd.DataFrame(columns=TRACK_COLUMNS)
    if fill:
        tracks = fill_gaps(tracks)
    return _finish_table(tracks, nm_per_px, fps, dose_rate, dose)


def truth_as_tracks(video: insitu.InsituVideo) -> pd.DataFrame:
    """The ground truth of a synthetic video as a tracks table (conf = 1)."""
    t = video.truth.copy()
    t["conf"] = 1.0
    fps = 1.0 / (video.time_s[1] - video.time_s[0]) if len(video.time_s) > 1 else 1.0
    return _finish_table(t, video.nm_per_px, fps, None, video.dose)


# --------------------------------------------------------------------------------------
# Events, growth, density


def find_events(
    tracks: pd.DataFrame,
    n_frames: int | None = None,
    shape: tuple[int, int] | None = None,
    border_px: float = 4.0,
    margin_px: float = 3.0,
    gap: int = 3,
    growth: float = 1.04,
) -> pd.DataFrame:
    """Nucleation, disappearance and coalescence events from a tracks table.

    - nucleation: the first frame of a track that does not start at frame 0 (nor at the
      image border, where defects drift in, when ``shape`` is given);
    - coalescence: a track ends at frame ``f`` (last seen ``f - 1``) while another track
      that was present before is, within ``gap`` frames, at most its half size +
      ``margin_px`` from the ended track's last centre and whose size (median over ``gap``
      frames) grew by at least ``growth`` across the end: ``track_id`` merged into ``other_id``;
    - disappearance: any other end before the last frame (and away from the border).

    Parameters
    ----------
    tracks
        Tracks table (``frame, track_id, x1, y1, x2, y2``).
    n_frames
        Number of frames of the video (default: last frame + 1).
    shape
        Frame shape (M, N), to ignore tracks entering or leaving across the border.
    border_px, margin_px, gap
        Tolerances (px, px, frames).
    growth
        Smallest size ratio after / before of the surviving track for a coalescence.

    Returns
    -------
    pd.DataFrame
        ``frame, event, track_id, other_id, row, col`` (``frame`` = first frame of a new
        track, or first frame without an ended one).
    """
    cols = ["frame", "event", "track_id", "other_id", "row", "col"]
    if tracks.empty:
        return pd.DataFrame(columns=cols)
    t = tracks.copy()
    t["row"] = (t.y1 + t.y2) / 2
    t["col"] = (t.x1 + t.x2) / 2
    t["size"] = ((t.x2 - t.x1) + (t.y2 - t.y1)) / 2
    last_frame = (n_frames - 1) if n_frames else int(t.frame.max())
    g = t.sort_values("frame").groupby("track_id")
    first, last = g.head(1).set_index("track_id"), g.tail(1).set_index("track_id")

    def at_border(r):
        if shape is None:
            return False
        return (
            r.x1 <= border_px
            or r.y1 <= border_px
            or r.x2 >= shape[1] - border_px
            or r.y2 >= shape[0] - border_px
        )

    events = []
    for tid, r in first.iterrows():
        if r.frame > 0 and not at_border(r):
            events.append((int(r.frame), "nucleation", int(tid), 0, r.row, r.col))
    by_frame = {f: d for f, d in t.groupby("frame")}
    by_track = {k: d.set_index("frame")["size"] for k, d in t.groupby("track_id")}

    def grew(k, end):
        s = by_track[k]
        before = s[(s.index < end) & (s.index >= end - gap)]
        after = s[(s.index >= end) & (s.index < end + gap)]
        return len(before) and len(after) and after.median() >= growth * before.median()

    for tid, r in last.iterrows():
        if r.frame >= last_frame or at_border(r):
            continue
        end = int(r.frame) + 1
        best = None
        for f in range(end, min(end + gap, last_frame + 1)):
            d = by_frame.get(f)
            if d is None:
                continue
            d = d[(d.track_id != tid) & (d.track_id.map(first.frame) < end)]
            if d.empty:
                continue
            dist = np.hypot(d.row - r.row, d.col - r.col)
            ok = dist <= d["size"] / 2 + margin_px + r["size"] / 2 * 0.5
            ok &= np.array([bool(grew(k, end)) for k in d.track_id])
            if ok.any():
                best = int(d.track_id[ok].iloc[int(np.argmin(dist[ok].to_numpy()))])
                break
        if best is not None:
            events.append((end, "coalescence", int(tid), best, r.row, r.col))
        else:
            events.append((end, "disappearance", int(tid), 0, r.row, r.col))
    ev = pd.DataFrame(events, columns=cols)
    return ev.sort_values(["frame", "event", "track_id"]).reset_index(drop=True)


def growth_rates(tracks: pd.DataFrame, min_frames: int = 5) -> pd.DataFrame:
    """Per-track growth: slope of ``diameter_nm`` (or ``diameter_px``) versus time.

    Returns
    -------
    pd.DataFrame
        ``track_id, first_frame, last_frame, n_frames, diameter_start, diameter_end,
        rate_per_s`` (nm/s, or px/s without a calibration; per frame without ``time_s``),
        ``cls`` (the most frequent class).
    """
    rows = []
    use = "diameter_nm" if tracks["diameter_nm"].notna().any() else "diameter_px"
    for tid, d in tracks.groupby("track_id"):
        if len(d) < min_frames:
            continue
        x = d.time_s.to_numpy(float) if d.time_s.notna().all() else d.frame.to_numpy(float)
        y = d[use].to_numpy(float)
        slope = np.polyfit(x, y, 1)[0] if np.ptp(x) > 0 else np.nan
        rows.append(
            {
                "track_id": int(tid),
                "first_frame": int(d.frame.min()),
                "last_frame": int(d.frame.max()),
                "n_frames": len(d),
                "diameter_start": float(np.median(y[:3])),
                "diameter_end": float(np.median(y[-3:])),
                "rate_per_s": float(slope),
                "cls": int(d.cls.mode().iloc[0]),
            }
        )
    types = {
        "track_id": int,
        "first_frame": int,
        "last_frame": int,
        "n_frames": int,
        "diameter_start": float,
        "diameter_end": float,
        "rate_per_s": float,
        "cls": int,
    }
    return pd.DataFrame(rows, columns=list(types)).astype(types)


def density_vs_dose(
    tracks: pd.DataFrame,
    shape: tuple[int, int],
    nm_per_px: float,
    n_frames: int | None = None,
    dose: np.ndarray | None = None,
    fps: float | None = None,
) -> pd.DataFrame:
    """Areal defect density and sizes per frame.

    Parameters
    ----------
    tracks
        Tracks (or detections) table with ``frame`` and ``diameter_px``/box columns.
    shape
        Frame shape (M, N) px.
    nm_per_px
        Pixel size (nm).
    n_frames
        Number of frames (frames without defects count as zero); default last frame + 1.
    dose
        (T,) dose per frame (dpa); default the table's ``dose`` column where present.
    fps
        Frames per second for ``time_s``; default the table's ``time_s``.

    Returns
    -------
    pd.DataFrame
        ``frame, time_s, dose, count, density_per_um2, mean_diameter_nm,
        median_diameter_nm, count_dot, count_loop``.
    """
    if nm_per_px is None or not nm_per_px > 0:
        raise ValueError(f"nm_per_px must be positive, got {nm_per_px!r}")
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"shape must be (M, N) px, got {shape!r}")
    n = int(n_frames) if n_frames else (int(tracks.frame.max()) + 1 if len(tracks) else 0)
    area_um2 = shape[0] * shape[1] * nm_per_px**2 * 1e-6
    t = tracks.copy()
    if "diameter_px" not in t:
        t["diameter_px"] = ((t.x2 - t.x1) + (t.y2 - t.y1)) / 2
    t["d_nm"] = t.diameter_px * nm_per_px
    g = t.groupby("frame")
    out = pd.DataFrame({"frame": np.arange(n)})
    out["count"] = out.frame.map(g.size()).fillna(0).astype(int)
    out["density_per_um2"] = out["count"] / area_um2
    out["mean_diameter_nm"] = out.frame.map(g.d_nm.mean())
    out["median_diameter_nm"] = out.frame.map(g.d_nm.median())
    if "cls" in t:
        for c, name in ((0, "count_dot"), (1, "count_loop")):
            out[name] = out.frame.map(t[t.cls == c].groupby("frame").size()).fillna(0).astype(int)
    if dose is not None:
        out["dose"] = np.asarray(dose, float)[:n]
    elif "dose" in t and t.dose.notna().any():
        out["dose"] = out.frame.map(g.dose.first())
    else:
        out["dose"] = np.nan
    if fps:
        out["time_s"] = out.frame / fps
    elif "time_s" in t:
        out["time_s"] = out.frame.map(g.time_s.first())
    else:
        out["time_s"] = np.nan
    cols = [
        "frame",
        "time_s",
        "dose",
        "count",
        "density_per_um2",
        "mean_diameter_nm",
        "median_diameter_nm",
    ]
    return out[cols + [c for c in ("count_dot", "count_loop") if c in out]]


def spatial_map(
    rows: pd.DataFrame,
    shape: tuple[int, int],
    bin_px: int = 64,
    nm_per_px: float | None = None,
    n_frames: int = 1,
) -> np.ndarray:
    """2D histogram (rows, cols) of positions: nucleation sites or defect density.

    Parameters
    ----------
    rows
        Table with ``row, col`` (px) or boxes; e.g. the nucleation events, or tracks.
    shape
        Frame shape (M, N) px.
    bin_px
        Bin size (px).
    nm_per_px
        If given, the map is a density per um^2 (divided by ``n_frames`` as well: the
        mean density per frame when ``rows`` holds every frame of the tracks).
    n_frames
        Number of frames ``rows`` covers.

    Returns
    -------
    np.ndarray
        (ceil(M / bin_px), ceil(N / bin_px)) counts or densities.
    """
    if bin_px < 1:
        raise ValueError(f"bin_px must be a positive integer, got {bin_px!r}")
    r = rows["row"] if "row" in rows else (rows.y1 + rows.y2) / 2
    c = rows["col"] if "col" in rows else (rows.x1 + rows.x2) / 2
    nb = (int(np.ceil(shape[0] / bin_px)), int(np.ceil(shape[1] / bin_px)))
    h, _, _ = np.histogram2d(r, c, bins=nb, range=[[0, nb[0] * bin_px], [0, nb[1] * bin_px]])
    if nm_per_px:
        h = h / ((bin_px * nm_per_px) ** 2 * 1e-6) / max(n_frames, 1)
    return h


# --------------------------------------------------------------------------------------
# Evaluation


def evaluate_detection(
    detector,
    images: list[np.ndarray],
    boxes: list[np.ndarray],
    iou_thresholds=(0.5, 0.3, 0.1),
    conf: float = 0.25,
    tile: int | str | None = "auto",
    names: list[str] | None = None,
    classes: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Precision, recall and F1 of a detector on labelled images (class-agnostic).

    Parameters
    ----------
    detector
        A :class:`temlib.detect.Detector` or anything :func:`temlib.detect.load_detector` takes.
    images, boxes
        Images (M, N) and their (K, 5) ``[cls, x1, y1, x2, y2]`` truths.
    iou_thresholds
        IoU thresholds to score at.
    conf, tile
        Detection options (``tile="auto"``: frames larger than the model's input are tiled,
        see :meth:`temlib.detect.Detector.predict`).
    names
        Image names for the per-image table.
    classes
        Also score each class separately (a prediction must have the truth's class).

    Returns
    -------
    per_image, totals
        ``per_image``: ``image, n_true, n_pred, f1@<t>`` per image; ``totals``: one row
        per IoU threshold (and class when ``classes``): ``iou, cls, tp, fp, fn, precision,
        recall, f1`` summed over images (``cls`` = ``"all"`` for class-agnostic).
    """
    det = detector if isinstance(detector, detect.Detector) else detect.load_detector(detector)
    if len(images) != len(boxes):
        raise ValueError(
            f"Got {len(images)} images and {len(boxes)} box arrays; expected one per image"
        )
    preds = [det.predict(im, conf=conf, tile=tile)[0] for im in images]
    per_image, acc = [], {}
    cls_sets = [("all", None)] + (
        [(n, i) for i, n in enumerate(insitu.CLASS_NAMES)] if classes else []
    )
    for i, (p, b) in enumerate(zip(preds, boxes, strict=True)):
        b = np.asarray(b, float).reshape(-1, 5)
        row = {"image": names[i] if names else i, "n_true": len(b), "n_pred": len(p)}
        for th in iou_thresholds:
            for cname, ci in cls_sets:
                pp = p if ci is None else p[p[:, 5] == ci]
                bb = b if ci is None else b[b[:, 0] == ci]
                m = detect.match(pp, bb, th)
                a = acc.setdefault((th, cname), [0, 0, 0])
                a[0] += m["tp"]
                a[1] += m["fp"]
                a[2] += m["fn"]
                if ci is None:
                    row[f"f1@{th}"] = m["f1"]
        per_image.append(row)
    tot = []
    for (th, cname), (tp, fp, fn) in acc.items():
        pr = tp / (tp + fp) if tp + fp else 1.0
        rc = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * pr * rc / (pr + rc) if pr + rc else 0.0
        tot.append(
            {
                "iou": th,
                "cls": cname,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "precision": pr,
                "recall": rc,
                "f1": f1,
            }
        )
    return pd.DataFrame(per_image), pd.DataFrame(tot)


def compare_models(model_dir, sets: dict, conf: float = 0.25, iou: float = 0.5) -> pd.DataFrame:
    """Every model file of a folder (INT8, OpenVINO, ONNX exports, PyTorch) on the same frames.

    A quantised or exported model is worth its speed only if it keeps the scores: this
    scores each file with :func:`evaluate_detection` (all classes) and times it.

    Parameters
    ----------
    model_dir
        Model folder (:func:`temlib.detect.model_files`).
    sets
        ``{name: (images, boxes)}`` or ``{name: (images, boxes, image_names)}`` labelled
        frame sets.
    conf, iou
        Confidence threshold; IoU threshold of a match.

    Returns
    -------
    pandas.DataFrame
        One row per model file and set: ``model, file, dataset, precision, recall, f1,
        ms_per_frame`` (prediction and scoring, mean over the set's frames).
    """
    files = detect.model_files(Path(model_dir))
    if not files or not sets:
        raise ValueError(
            f"Got {len(files)} model files in {model_dir} and {len(sets)} frame sets; "
            "expected at least one of each"
        )
    rows = []
    for kind, path in files.items():
        det = detect.load_detector(path)
        for name, (images, boxes, *names) in sets.items():
            t0 = time.perf_counter()
            _, tot = evaluate_detection(
                det,
                images,
                boxes,
                conf=conf,
                iou_thresholds=(iou,),
                names=names[0] if names else None,
            )
            ms = 1000 * (time.perf_counter() - t0) / max(len(images), 1)
            r = tot.iloc[0]
            rows.append(
                {
                    "model": kind,
                    "file": path.name,
                    "dataset": name,
                    "precision": r.precision,
                    "recall": r.recall,
                    "f1": r.f1,
                    "ms_per_frame": ms,
                }
            )
    return pd.DataFrame(rows)


def _box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return detect.box_iou(a, b)


def tracking_metrics(truth: pd.DataFrame, tracks: pd.DataFrame, iou_threshold: float = 0.5) -> dict:
    """MOTA, IDF1, HOTA, identity switches of ``tracks`` against ``truth`` (TrackEval).

    Both tables hold ``frame, track_id, x1, y1, x2, y2``. Similarity is box IoU; a pair
    matches at IoU >= ``iou_threshold`` for CLEAR (MOTA) and Identity (IDF1); HOTA
    averages over its own thresholds 0.05..0.95.

    Returns
    -------
    dict
        ``mota, motp, idf1, hota, deta, assa, id_switches, fp, fn, n_true_tracks,
        n_tracks, mostly_tracked``.
    """
    from trackeval.metrics import CLEAR, HOTA, Identity

    frames = sorted(set(truth.frame.astype(int)) | set(tracks.frame.astype(int)))
    gt_ids = {v: i for i, v in enumerate(sorted(truth.track_id.unique()))}
    tr_ids = {v: i for i, v in enumerate(sorted(tracks.track_id.unique()))}
    tg, tt = truth.groupby("frame"), tracks.groupby("frame")
    gtf, trf = set(tg.groups), set(tt.groups)
    data = {"gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    cols = ["x1", "y1", "x2", "y2"]
    for f in frames:
        g = tg.get_group(f) if f in gtf else truth.iloc[:0]
        t = tt.get_group(f) if f in trf else tracks.iloc[:0]
        data["gt_ids"].append(np.array([gt_ids[v] for v in g.track_id], int))
        data["tracker_ids"].append(np.array([tr_ids[v] for v in t.track_id], int))
        data["similarity_scores"].append(
            _box_iou_xyxy(g[cols].to_numpy(float), t[cols].to_numpy(float)).reshape(len(g), len(t))
        )
    data.update(
        num_timesteps=len(frames),
        num_gt_ids=len(gt_ids),
        num_tracker_ids=len(tr_ids),
        num_gt_dets=int(len(truth)),
        num_tracker_dets=int(len(tracks)),
    )
    clear = CLEAR({"THRESHOLD": iou_threshold, "PRINT_CONFIG": False}).eval_sequence(data)
    ident = Identity({"THRESHOLD": iou_threshold, "PRINT_CONFIG": False}).eval_sequence(data)
    hota = HOTA().eval_sequence(data)
    return {
        "mota": float(clear["MOTA"]),
        "motp": float(clear["MOTP"]),
        "idf1": float(ident["IDF1"]),
        "hota": float(np.mean(hota["HOTA"])),
        "deta": float(np.mean(hota["DetA"])),
        "assa": float(np.mean(hota["AssA"])),
        "id_switches": int(clear["IDSW"]),
        "fp": int(clear["CLR_FP"]),
        "fn": int(clear["CLR_FN"]),
        "n_true_tracks": len(gt_ids),
        "n_tracks": len(tr_ids),
        "mostly_tracked": int(clear["MT"]),
    }


def event_scores(
    true_events: pd.DataFrame,
    found_events: pd.DataFrame,
    frame_tolerance: int = 3,
    distance_px: float = 10.0,
) -> pd.DataFrame:
    """Precision / recall of detected events against true ones, per event type.

    A found event matches a true one of the same type within ``frame_tolerance`` frames and
    ``distance_px`` px (one-to-one, Hungarian on distance).

    Returns
    -------
    pd.DataFrame
        ``event, n_true, n_found, tp, precision, recall, f1``.
    """
    rows = []
    for ev in ("nucleation", "coalescence", "disappearance"):
        a = true_events[true_events.event == ev]
        b = found_events[found_events.event == ev]
        tp = 0
        if len(a) and len(b):
            d = np.hypot(
                a.row.to_numpy()[:, None] - b.row.to_numpy()[None],
                a.col.to_numpy()[:, None] - b.col.to_numpy()[None],
            )
            df = np.abs(a.frame.to_numpy()[:, None] - b.frame.to_numpy()[None])
            ok = (d <= distance_px) & (df <= frame_tolerance)
            cost = np.where(ok, d + df, 1e6)
            r, c = linear_sum_assignment(cost)
            tp = int((cost[r, c] < 1e6).sum())
        pr = tp / len(b) if len(b) else (1.0 if not len(a) else 0.0)
        rc = tp / len(a) if len(a) else 1.0
        f1 = 2 * pr * rc / (pr + rc) if pr + rc else 0.0
        rows.append(
            {
                "event": ev,
                "n_true": len(a),
                "n_found": len(b),
                "tp": tp,
                "precision": pr,
                "recall": rc,
                "f1": f1,
            }
        )
    return pd.DataFrame(rows)


def visible_events(video: insitu.InsituVideo, border_px: float = 4.0) -> pd.DataFrame:
    """The generator's events as they can be seen: at frames with the defect in view.

    Nucleations count at the first frame a track is visible; ends (coalescence,
    disappearance) at the frame after its last visible one; events of tracks that are
    never visible, or that touch the border, are dropped (as :func:`find_events` does).
    """
    t = truth_as_tracks(video)
    shape = video.frames.shape[1:]
    ev = video.events
    g = t.sort_values("frame").groupby("track_id")
    first, last = g.head(1).set_index("track_id"), g.tail(1).set_index("track_id")

    def border(r):
        return (
            r.x1 <= border_px
            or r.y1 <= border_px
            or r.x2 >= shape[1] - border_px
            or r.y2 >= shape[0] - border_px
        )

    rows = []
    for _, e in ev.iterrows():
        tid = e.track_id
        if tid not in first.index:
            continue
        if e.event == "nucleation":
            r = first.loc[tid]
            if r.frame > 0 and not border(r):
                rows.append((int(r.frame), e.event, tid, 0, r.row, r.col))
        else:
            r = last.loc[tid]
            if r.frame + 1 < len(video.frames) and not border(r):
                rows.append((int(r.frame) + 1, e.event, tid, int(e.other_id), r.row, r.col))
    return pd.DataFrame(rows, columns=["frame", "event", "track_id", "other_id", "row", "col"])


# --------------------------------------------------------------------------------------
# Plots


def plot_tracks(image: np.ndarray, tracks: pd.DataFrame, frame: int, ax=None, tail: int = 20):
    """Show ``image`` with the boxes of ``frame`` and each track's path over ``tail`` frames."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.imshow(image, cmap="gray")
    now = tracks[tracks.frame == frame]
    past = tracks[(tracks.frame <= frame) & (tracks.frame > frame - tail)]
    cmap = plt.get_cmap("tab20")
    for tid, d in past.groupby("track_id"):
        if tid in set(now.track_id):
            ax.plot(d.col, d.row, "-", color=cmap(tid % 20), lw=1)
    for _, r in now.iterrows():
        ax.add_patch(
            plt.Rectangle(
                (r.x1, r.y1),
                r.x2 - r.x1,
                r.y2 - r.y1,
                fill=False,
                lw=1,
                color=cmap(int(r.track_id) % 20),
            )
        )
    ax.set_title(f"frame {frame}: {len(now)} defects")
    ax.set_axis_off()
    return ax


# --------------------------------------------------------------------------------------
# Command line


CSV_FLOAT_FORMAT = "%.6g"  # of every tracks table written, whole or frame by frame
# (6 digits: 0.01 px up to 9999 px; "%.4g" wrote x = 1234.56 as 1235)
MIN_LENGTH = 5  # frames: the shortest track `temlib track` keeps (params/07: 5 vs 3 validated)


def _write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False, float_format=CSV_FLOAT_FORMAT)
    os.replace(tmp, path)


def watch_folder(
    folder,
    out_csv,
    model="insitu",
    conf: float = 0.25,
    tile: int | None = None,
    nm_per_px: float | None = None,
    fps: float | None = None,
    dose_rate: float | None = None,
    max_distance_px: float = 8.0,
    memory: int = 3,
    poll_s: float = 0.2,
    idle_timeout_s: float | None = None,
    max_frames: int | None = None,
    on_frame=None,
    min_length: int = 1,
    method: str = "botsort",
    extend_conf: float | None = EXTEND_CONF,
) -> pd.DataFrame:
    """Follow a folder as the camera writes frames; detect, link and report live counts.

    A frame is read once its size stopped changing between two polls. Each frame's rows
    are appended to ``out_csv`` as soon as they are linked (a row never changes once
    linked), so the cost per frame stays flat over a long acquisition. When the watch
    ends (idle timeout, ``max_frames`` or Ctrl-C), the file is rewritten with what
    :func:`track_frames` gives for the same frames (without ``fill``): the tracks extended
    through fainter detections (``extend_conf``), those seen in fewer than ``min_length``
    frames dropped.

    Parameters
    ----------
    folder
        Folder the camera writes frames into (natural order of names = time order).
    out_csv
        Tracks table (replaced at the start), one frame's rows appended after every frame.
    idle_timeout_s
        Stop after this many seconds without a new frame (None: until interrupted).
    max_frames
        Stop after this many frames.
    on_frame
        Called as ``on_frame(frame, n_defects, n_tracks, density_per_um2)`` after each frame;
        ``n_tracks`` counts the tracks seen in at least ``min_length`` frames so far.
    min_length
        Shortest track kept (frames); 1 keeps every track.

    Other parameters are as in :func:`track_frames`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder to watch")
    ft = _FrameTracker(
        model, method, conf, 0.5, tile, max_distance_px, memory, min_length, extend_conf
    )
    seen: set[str] = set()
    sizes: dict[str, int] = {}
    seen_in = np.zeros(64, int)  # frames each track id was seen in, by id
    confirmed = 0  # tracks seen in at least min_length frames
    i = 0
    idle_since = time.monotonic()
    _write_csv_atomic(pd.DataFrame(columns=TRACK_COLUMNS), out_csv)  # the header
    try:
        while max_frames is None or i < max_frames:
            ready = []
            for p in insitu.list_frames(folder):
                if p.name in seen or p.name.startswith("."):
                    continue
                s = p.stat().st_size
                if s > 0 and sizes.get(p.name) == s:
                    ready.append(p)
                sizes[p.name] = s
            if not ready:
                if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                    break
                time.sleep(poll_s)
                continue
            idle_since = time.monotonic()
            for p in ready:
                if max_frames is not None and i >= max_frames:
                    break
                seen.add(p.name)
                img = detect.read_image(p)
                raw, n_det = ft.step(i, img)
                rows = _finish_table(raw, nm_per_px, fps, dose_rate)
                if len(rows):
                    with open(out_csv, "a") as fh:  # one write per frame: whole lines
                        fh.write(
                            rows.to_csv(header=False, index=False, float_format=CSV_FLOAT_FORMAT)
                        )
                dens = np.nan
                if nm_per_px:
                    dens = n_det / (img.shape[0] * img.shape[1] * nm_per_px**2 * 1e-6)
                tid = raw.track_id.to_numpy(int)
                if len(tid):  # the ids of one frame are distinct, all >= 1
                    if tid.max() >= len(seen_in):
                        seen_in = np.pad(seen_in, (0, max(tid.max() + 1, 2 * len(seen_in))))
                    seen_in[tid] += 1
                    confirmed += int((seen_in[tid] == min_length).sum())
                if on_frame is not None:
                    on_frame(i, n_det, confirmed, dens)
                i += 1
    except KeyboardInterrupt:
        logger.info("watch interrupted after %d frames", i)
    tracks = ft.finish()
    if tracks.empty:
        return pd.DataFrame(columns=TRACK_COLUMNS)
    tracks = _finish_table(tracks, nm_per_px, fps, dose_rate)
    if ft.extend or min_length > 1:
        _write_csv_atomic(tracks, out_csv)
    return tracks


def _cli_track(parser):
    parser.add_argument(
        "source", help="folder of frames (png, jpg, tif; grey or RGB) or a video file"
    )
    parser.add_argument(
        "--out", required=True, help="tracks table (csv): one row per defect per frame"
    )
    parser.add_argument(
        "--model",
        default="insitu",
        help="'insitu' (data/models/insitu/, trained by notebook 07) or a weights path",
    )
    parser.add_argument(
        "--method",
        default="botsort",
        choices=METHODS,
        help="tracker (default botsort)",
    )
    parser.add_argument(
        "--watch", action="store_true", help="follow the folder as frames arrive, with live counts"
    )
    parser.add_argument("--fps", type=float, default=None, help="frames per second (for time_s)")
    parser.add_argument(
        "--dose-rate", type=float, default=None, help="dose rate in dpa/s (for dose; needs --fps)"
    )
    parser.add_argument(
        "--nm-per-px", type=float, default=None, help="calibration (for diameter_nm, density)"
    )
    parser.add_argument(
        "--conf", type=float, default=0.25, help="detection confidence threshold (default 0.25)"
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        help="tile size in px for large frames (default: whole frame)",
    )
    parser.add_argument(
        "--max-distance", type=float, default=8.0, help="largest displacement between frames, px"
    )
    parser.add_argument(
        "--min-length",
        type=int,
        default=MIN_LENGTH,
        help=f"shortest track kept, frames (default {MIN_LENGTH}; 1 keeps one-frame detections)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="with --watch: stop after this many idle seconds",
    )

    def run(args) -> int:
        for name in ("fps", "dose_rate", "nm_per_px"):
            v = getattr(args, name)
            if v is not None and not v > 0:
                raise ValueError(f"--{name.replace('_', '-')} {v!r} must be positive")
        if args.dose_rate is not None and args.fps is None:
            raise ValueError("--dose-rate needs --fps to turn frames into dose")
        if args.min_length < 1:
            raise ValueError(f"--min-length {args.min_length!r} must be at least 1 frame")
        if args.watch:
            print(f"watching {args.source} (Ctrl-C to stop) ...", flush=True)

            def show(i, n, ntr, dens):
                extra = f", {dens:.0f} /um^2" if np.isfinite(dens) else ""
                print(
                    f"frame {i}: {n} defects{extra}, {ntr} tracks of >= {args.min_length} frames",
                    flush=True,
                )

            t = watch_folder(
                args.source,
                args.out,
                args.model,
                args.conf,
                args.tile,
                args.nm_per_px,
                args.fps,
                args.dose_rate,
                args.max_distance,
                idle_timeout_s=args.idle_timeout,
                on_frame=show,
                min_length=args.min_length,
                method=args.method,
            )
        else:
            t = track_frames(
                args.source,
                args.model,
                args.method,
                args.conf,
                tile=args.tile,
                nm_per_px=args.nm_per_px,
                fps=args.fps,
                dose_rate=args.dose_rate,
                max_distance_px=args.max_distance,
                min_length=args.min_length,
            )
            _write_csv_atomic(t, args.out)
        n_frames = int(t.frame.max()) + 1 if len(t) else 0
        print(
            f"{t.track_id.nunique() if len(t) else 0} tracks of >= {args.min_length} frames, "
            f"{len(t)} detections in {n_frames} frames; wrote {args.out}"
        )
        return 0

    return run


def plot_boxes(image: np.ndarray, truth=None, pred=None, ax=None, title: str = ""):
    """Show ``image`` with truth boxes (K, 5) in green and predictions (K, 6) in red."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.imshow(image, cmap="gray")
    for boxes, color, first in ((truth, "lime", 1), (pred, "red", 0)):
        if boxes is None:
            continue
        b = np.asarray(boxes, float)
        xy = b[:, first : first + 4] if len(b) else np.zeros((0, 4))
        for x1, y1, x2, y2 in xy:
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=0.8, color=color))
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def frame_scrubber(frames, tracks: pd.DataFrame, step: int = 1, tail: int = 20, size: float = 6.0):
    """A frame scrubber (slider + player) over ``frames`` with their tracks, as HTML.

    Made with matplotlib's ``to_jshtml`` so it also works in a static HTML report (no
    running kernel, no widget comms).

    Parameters
    ----------
    frames
        (T, M, N) frames or a list of frame paths.
    tracks
        Tracks table.
    step
        Show every ``step``-th frame (keeps the page small).
    tail, size
        Track tail length (frames) and figure width (inches).
    """
    import matplotlib.pyplot as plt
    from IPython.display import HTML
    from matplotlib import animation

    if step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    idx = list(range(0, len(frames), step))

    def image(k):
        f = frames[k]
        return detect.read_image(f) if isinstance(f, str | Path) else np.asarray(f)

    first = image(idx[0])
    fig, ax = plt.subplots(figsize=(size, size * first.shape[0] / first.shape[1]), dpi=72)

    def draw(n):
        ax.clear()
        plot_tracks(image(idx[n]), tracks, idx[n], ax=ax, tail=tail)

    anim = animation.FuncAnimation(fig, draw, frames=len(idx), interval=200)
    with plt.rc_context({"animation.frame_format": "jpeg"}):  # noisy frames: JPEG is 5x smaller
        page = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return HTML(page)
