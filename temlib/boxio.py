"""Grey TEM images and YOLO boxes: reading, converting, listing, box formats, YOLO txt files.

Shared by :mod:`temlib.cavity` (which writes labelled images) and :mod:`temlib.detect`
(which trains on and predicts them); :mod:`temlib.detect` re-exports every name.

Box formats (pixels, x = column, y = row, origin at the top-left corner of the image):

- *labels*: ``(K, 5)`` rows ``[class, x1, y1, x2, y2]`` (what datasets are written from);
- *predictions*: ``(K, 6)`` rows ``[x1, y1, x2, y2, conf, class]`` (ultralytics' order).

Image conversion (documented, applied by :func:`to_gray8` everywhere): RGB(A) becomes grey
with ITU-R 601 luma weights; 8-bit stays as is; 16-bit, other integer and float images are
stretched linearly from their 0.1st to 99.9th percentile onto 0..255.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --------------------------------------------------------------------------- images


def to_gray8(image: np.ndarray) -> np.ndarray:
    """Convert a grey or RGB(A) image of any dtype to grey uint8 ``(M, N)``.

    Parameters
    ----------
    image
        ``(M, N)``, ``(M, N, 1)``, ``(M, N, 3)`` or ``(M, N, 4)``; uint8, uint16, other
        integer or float.

    Returns
    -------
    np.ndarray
        ``(M, N)`` uint8. RGB is weighted 0.299 R + 0.587 G + 0.114 B (alpha dropped);
        non-uint8 data is stretched linearly from its 0.1 to 99.9 percentile to 0..255.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        dtype = a.dtype
        a = a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        if dtype == np.uint8:
            return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim != 2:
        raise ValueError(
            f"Image of shape {a.shape} is not an image; expected (M, N) grey or (M, N, 3|4) RGB(A)"
        )
    if min(a.shape) < 8:
        raise ValueError(f"Image of shape {a.shape} is too small; expected at least 8 x 8 pixels")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = a.astype(np.float32)
    if not np.isfinite(f).all():
        raise ValueError("Image holds NaN or infinite values; expected finite intensities")
    lo, hi = np.percentile(f, [0.1, 99.9])
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((f - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as grey uint8 ``(M, N)`` (see :func:`to_gray8` for conversions).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No image file {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im)
            elif im.mode in ("L", "RGB", "RGBA"):
                a = np.asarray(im)
            else:
                a = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ImportError, ValueError) as e:
        # ImportError: ultralytics patches PIL.Image.open to try pi_heif on unknown files
        raise ValueError(
            f"Cannot read image {path.name!r} ({e}); expected a PNG/JPEG/TIFF image"
        ) from None
    return to_gray8(a)


def list_images(folder: str | Path) -> list[Path]:
    """Image files (``.png .jpg .jpeg .tif .tiff .bmp``) of ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"No folder {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; expected a folder of images")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise ValueError(
            f"Folder {folder} holds no images; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return files


# --------------------------------------------------------------------------- boxes


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    """Corner coordinates ``(K, 4)`` from labels ``(K, 5)``, predictions ``(K, 6)`` or ``(K, 4)``."""
    b = np.asarray(boxes, dtype=float)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] not in (4, 5, 6):
        raise ValueError(
            f"Boxes of shape {b.shape} are not boxes; expected (K, 4) [x1, y1, x2, y2], "
            "(K, 5) [class, x1, y1, x2, y2] or (K, 6) [x1, y1, x2, y2, conf, class]"
        )
    return b[:, 1:5] if b.shape[1] == 5 else b[:, :4]


def write_yolo_txt(
    path: str | Path, boxes: np.ndarray, image_shape: tuple[int, int], with_conf: bool = True
) -> Path:
    """Write boxes as a YOLO txt file (``class cx cy w h [conf]``, normalised), atomically.

    Parameters
    ----------
    path
        Output file.
    boxes
        Labels ``(K, 5)`` ``[class, x1, y1, x2, y2]`` or predictions ``(K, 6)``
        ``[x1, y1, x2, y2, conf, class]``, pixels.
    image_shape
        ``(M, N)`` rows, columns of the image the boxes belong to.
    with_conf
        Append the confidence column (predictions only).
    """
    b = np.asarray(boxes, dtype=float).reshape(-1, np.shape(boxes)[-1] if np.size(boxes) else 5)
    xy = _xyxy(b)
    h, w = int(image_shape[0]), int(image_shape[1])
    if b.shape[1] == 6:
        cls, conf = b[:, 5], b[:, 4]
    elif b.shape[1] == 5:
        cls, conf = b[:, 0], None
    else:
        cls, conf = np.zeros(len(b)), None
    xy = np.clip(xy, 0, [w, h, w, h])
    cx, cy = (xy[:, 0] + xy[:, 2]) / 2 / w, (xy[:, 1] + xy[:, 3]) / 2 / h
    bw, bh = (xy[:, 2] - xy[:, 0]) / w, (xy[:, 3] - xy[:, 1]) / h
    lines = []
    for i in range(len(b)):
        line = f"{int(cls[i])} {cx[i]:.6f} {cy[i]:.6f} {bw[i]:.6f} {bh[i]:.6f}"
        if with_conf and conf is not None:
            line += f" {conf[i]:.4f}"
        lines.append(line)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, path)
    return path


def read_yolo_txt(path: str | Path, image_shape: tuple[int, int]) -> np.ndarray:
    """Read a YOLO txt file into predictions ``(K, 6)`` ``[x1, y1, x2, y2, conf, class]`` in pixels.

    A file without a confidence column (labels) gets ``conf = 1``; take the class and
    corners as labels with ``b[:, [5, 0, 1, 2, 3]]``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No label file {path}")
    rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not rows:
        return np.zeros((0, 6))
    if any(len(r) not in (5, 6) for r in rows):
        raise ValueError(
            f"Label file {path.name!r} has a row of the wrong length; expected 'class cx cy w h [conf]'"
        )
    h, w = image_shape[:2]
    out = np.ones((len(rows), 6))
    for i, r in enumerate(rows):
        c, cx, cy, bw, bh = (float(v) for v in r[:5])
        out[i, :4] = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        out[i, 4] = float(r[5]) if len(r) == 6 else 1.0
        out[i, 5] = c
    return out
