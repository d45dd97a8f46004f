"""Reading and writing 4D scanned-diffraction maps, lazily, with their calibration.

Readers go through HyperSpy / RosettaSciIO: ``.hspy`` (HDF5), ``.zspy`` (zarr), ``.blo``
(ASTAR / NanoMegas block files), ``.mib`` (Merlin), plus ``.npy`` with a calibration
given by the caller. A map comes back as a lazy pyxem ``ElectronDiffraction2D`` of shape
(rows, cols | ky, kx) whose signal axes carry the reciprocal calibration (1/Å per px)
and whose metadata carries the beam energy (kV).

Reference indexing results (orix ``.ang`` / ``.h5``, ASTAR or HKL ``.ctf``) attach as
labels with :func:`load_labels`, since real users train from an indexed map.

Every reader validates before anything is written: a missing or truncated file, data
that is not 4D, an unsupported dtype, non-finite values or a missing calibration
without an override give one clear error.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

READABLE = (".hspy", ".hdf5", ".h5", ".zspy", ".blo", ".mib", ".npy")
LABEL_FORMATS = (".ang", ".h5", ".ctf")
SUPPORTED_DTYPES = (
    "uint8",
    "uint16",
    "uint32",
    "int8",
    "int16",
    "int32",
    "int64",
    "float32",
    "float64",
)
DEFAULT_KV = 200.0


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No map file at {path}; expected one of {', '.join(READABLE)}")
    if path.is_dir() and (path / "patterns.zspy").is_dir():  # a synthetic map folder
        path = path / "patterns.zspy"
    suffix = path.suffix.lower()
    if suffix not in READABLE:
        raise ValueError(
            f"Cannot read {path.name}: unknown format {suffix or '(none)'}; expected one of {', '.join(READABLE)}"
        )
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"Cannot read {path}: the file is empty (0 bytes)")
    return path


def _hs_load(path: Path, lazy: bool):
    import hyperspy.api as hs

    try:
        s = hs.load(path, lazy=lazy)
    except Exception as e:  # rosettasciio raises many kinds on corrupt data
        raise ValueError(
            f"Cannot read {path}: it looks truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    if isinstance(s, list):
        s = max(s, key=lambda x: x.data.ndim)
    return s


def _validate(data, path: Path) -> None:
    if data.ndim != 4:
        raise ValueError(
            f"Map {path.name} has {data.ndim} dimensions (shape {tuple(data.shape)}); "
            "expected a 4D scan (rows, cols, ky, kx)"
        )
    if str(data.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(
            f"Map {path.name} has dtype {data.dtype}; expected one of {', '.join(SUPPORTED_DTYPES)}"
        )
    if min(data.shape) < 1:
        raise ValueError(f"Map {path.name} is empty (shape {tuple(data.shape)})")


def check_finite(chunk: np.ndarray, where: str = "map") -> None:
    """Raise if ``chunk`` holds NaN or infinity (one clear error)."""
    if np.issubdtype(chunk.dtype, np.floating) and not np.isfinite(chunk).all():
        bad = int((~np.isfinite(chunk)).sum())
        raise ValueError(
            f"The {where} holds {bad} NaN or infinite values; expected finite intensities (mask or fill them first)"
        )


def check_stack(patterns, calibration: float) -> np.ndarray:
    """Validate a (N, ky, kx) pattern stack and its calibration (1/Å per px); return it as an array."""
    p = np.asarray(patterns)
    if p.ndim != 3:
        raise ValueError(f"Patterns of shape {p.shape} are not a stack; expected (N, ky, kx)")
    if not calibration > 0:
        raise ValueError(
            f"Calibration {calibration!r} is not positive; expected 1/Å per px, e.g. 0.02"
        )
    return p


def check_output_path(out: str | Path) -> Path:
    """Validate the path of an indexing result: a ``.h5`` file in an existing folder."""
    out = Path(out)
    if out.suffix.lower() != ".h5":
        raise ValueError(
            f"Output {out.name} must end in .h5 (an orix CrystalMap; the .ang is written beside it)"
        )
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"Output folder {out.parent} does not exist")
    return out


def _to_pyxem(s):
    import pyxem  # noqa: F401  (registers the signal classes)

    s.set_signal_type("electron_diffraction")
    return s


def load_map(
    path: str | Path,
    lazy: bool = True,
    calibration: float | None = None,
    kv: float | None = None,
    step_nm: float | None = None,
):
    """Read a 4D map lazily with its reciprocal calibration and beam energy.

    Parameters
    ----------
    path
        ``.hspy``, ``.zspy``, ``.blo``, ``.mib``, ``.npy``, or a synthetic map folder.
    lazy
        Keep the data on disk (dask); False loads it into memory.
    calibration
        Reciprocal calibration (1/Å per px), overriding the file's. Required for ``.npy``
        and for files without a calibrated signal axis.
    kv
        Beam energy (kV), overriding the file's (default 200 when the file has none).
    step_nm
        Scan step (nm), overriding the file's.

    Returns
    -------
    pyxem ``ElectronDiffraction2D`` (lazy when ``lazy``) of shape (rows, cols | ky, kx).
    """
    import hyperspy.api as hs

    path = _check_path(path)
    if calibration is not None and not calibration > 0:
        raise ValueError(
            f"Calibration {calibration!r} is not positive; expected 1/Å per pixel, e.g. 0.02"
        )
    if path.suffix.lower() == ".npy":
        if calibration is None:
            raise ValueError(
                f"{path.name} carries no calibration; pass calibration= (1/Å per px) for .npy maps"
            )
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:
            raise ValueError(
                f"Cannot read {path}: it looks truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
        _validate(arr, path)
        if lazy:
            import dask.array as da

            s = hs.signals.Signal2D(da.from_array(arr, chunks=(16, 16, *arr.shape[2:]))).as_lazy()
        else:
            s = hs.signals.Signal2D(np.asarray(arr))
    else:
        s = _hs_load(path, lazy)
        _validate(s.data, path)
    s = _to_pyxem(s)
    kx, ky = s.axes_manager.signal_axes
    if calibration is None:
        units = str(kx.units)
        if (
            not units
            or units == "<undefined>"
            or (kx.scale == 1.0 and "1/" not in units and "Å" not in units)
        ):
            raise ValueError(
                f"{path.name} has no reciprocal calibration (signal axis scale {kx.scale}, units {units!r}); "
                "pass calibration= (1/Å per px)"
            )
        calibration = _to_inverse_angstrom(kx.scale, units, path)
    for ax in (kx, ky):
        ax.scale = calibration
        ax.units = "1/Å"
        ax.offset = -calibration * (ax.size // 2)
    s.axes_manager.signal_axes[0].name, s.axes_manager.signal_axes[1].name = "kx", "ky"
    beam = kv
    if beam is None:
        beam = s.metadata.get_item("Acquisition_instrument.TEM.beam_energy", None)
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(beam or DEFAULT_KV))
    if step_nm is not None:
        for ax in s.axes_manager.navigation_axes:
            ax.scale, ax.units = step_nm, "nm"
    s.metadata.set_item("General.original_filename", str(path))
    if not lazy:
        check_finite(np.asarray(s.data), f"map {path.name}")
    return s


def _to_inverse_angstrom(scale: float, units: str, path: Path) -> float:
    u = units.replace(" ", "").replace("$", "").replace("{", "").replace("}", "").lower()
    if u in ("1/å", "å^-1", "1/a", "a^-1", "1/angstrom", "angstrom^-1"):
        return float(scale)
    if u in ("1/nm", "nm^-1"):
        return float(scale) / 10.0
    raise ValueError(
        f"{path.name} has signal axis units {units!r}; expected 1/Å or 1/nm (or pass calibration=)"
    )


def calibration_of(signal) -> float:
    """Reciprocal calibration (1/Å per px) of a signal read by :func:`load_map`."""
    return float(signal.axes_manager.signal_axes[0].scale)


def beam_energy(signal) -> float:
    """Beam energy (kV) of a signal read by :func:`load_map`."""
    return float(signal.metadata.get_item("Acquisition_instrument.TEM.beam_energy", DEFAULT_KV))


def iter_chunks(
    signal, chunk: int = 32, show_progressbar: bool = True, desc: str = "patterns"
) -> Iterator[tuple[tuple[slice, slice], np.ndarray]]:
    """Yield ``((row_slice, col_slice), patterns)`` blocks of a (lazy) map, in scan order.

    ``patterns`` is a (r, c, ky, kx) numpy array; non-finite values raise. Only one
    block is in memory at a time.
    """
    from tqdm.auto import tqdm

    data = signal.data
    h, w = data.shape[:2]
    blocks = [
        (slice(r, min(r + chunk, h)), slice(c, min(c + chunk, w)))
        for r in range(0, h, chunk)
        for c in range(0, w, chunk)
    ]
    for rs, cs in tqdm(blocks, desc=desc, unit="block", disable=not show_progressbar):
        yield (rs, cs), read_block(signal, rs, cs)


def read_block(signal, rows: slice, cols: slice) -> np.ndarray:
    """The (r, c, ky, kx) patterns of a block of a (lazy) map as a numpy array; non-finite values raise."""
    block = signal.data[rows, cols]
    block = np.asarray(block.compute() if hasattr(block, "compute") else block)
    h, w = signal.data.shape[:2]
    r0, r1, _ = rows.indices(h)
    c0, c1, _ = cols.indices(w)
    check_finite(block, f"map block rows {r0}-{r1}, cols {c0}-{c1}")
    return block


def spread_sample(
    signal, chunk: int = 32, n_blocks: int = 4, per_block: int = 64, rng=0
) -> np.ndarray:
    """(n, ky, kx) patterns from ``n_blocks`` blocks of ``chunk x chunk`` scan pixels spread
    evenly through the map's blocks (scan order), ``per_block`` at random from each: a sample
    of the whole map that reads only a few blocks of a lazy, chunked file."""
    rng = np.random.default_rng(rng)
    h, w = signal.data.shape[:2]
    starts = [(r, c) for r in range(0, h, chunk) for c in range(0, w, chunk)]
    parts = []
    for r, c in starts[:: max(1, len(starts) // n_blocks)][:n_blocks]:
        block = read_block(signal, slice(r, r + chunk), slice(c, c + chunk))
        block = block.reshape(-1, *block.shape[2:])
        parts.append(block[np.sort(rng.permutation(len(block))[:per_block])])
    return np.concatenate(parts)


def sample_patterns(signal, n: int = 6, rng=None) -> tuple[np.ndarray, list[str]]:
    """``n`` patterns of a (lazy) map at random scan positions, with "(row, col)" titles."""
    rng = np.random.default_rng(rng)
    h, w = signal.data.shape[:2]
    flat = rng.choice(h * w, size=min(n, h * w), replace=False)
    rr, cc = np.unravel_index(np.sort(flat), (h, w))
    pats = np.stack([np.asarray(signal.data[r, c]) for r, c in zip(rr, cc, strict=True)]).astype(
        np.float32
    )
    check_finite(pats, "map")
    return pats, [f"({r}, {c})" for r, c in zip(rr, cc, strict=True)]


# --------------------------------------------------------------------------------------
# Direct beam and working calibration
# --------------------------------------------------------------------------------------


def find_direct_beam(
    patterns: np.ndarray, radius: float | None = None, window: int = 5
) -> np.ndarray:
    """Direct-beam centre (row, col) in px of each pattern, sub-pixel.

    The direct beam is the strongest feature near the middle of a spot pattern: often
    saturated, and wider than Bragg spots that may saturate too, with a halo. We blur
    with a Gaussian of 3 px (so that integrated intensity, not peak height, counts),
    take the maximum within ``radius`` of the middle, and refine with the intensity
    centroid of the pixels above half its height in a ``2 window + 1`` box (half height
    above the background, the median of a strided subsample of the pattern). Vectorised
    over the stack: only the search box (plus the blur's reach) is blurred.

    Parameters
    ----------
    patterns
        (..., ky, kx) patterns.
    radius
        Search radius around the pattern middle (px); default a quarter of the side.
    window
        Half side (px) of the centroid box.
    """
    from . import _kernels

    p = np.asarray(patterns)
    lead = p.shape[:-2]
    ky, kx = p.shape[-2:]
    p = p.reshape(-1, ky, kx)
    n = len(p)
    radius = min(ky, kx) / 4 if radius is None else radius
    r_lo, r_hi = max(int(ky / 2 - radius), 0), min(int(np.ceil(ky / 2 + radius)) + 1, ky)
    c_lo, c_hi = max(int(kx / 2 - radius), 0), min(int(np.ceil(kx / 2 + radius)) + 1, kx)
    m = 9  # the blur's reach (3 sigma): the blur inside the search box is exact
    o_r, o_c = max(r_lo - m, 0), max(c_lo - m, 0)
    rr, cc = np.mgrid[o_r : min(r_hi + m, ky), o_c : min(c_hi + m, kx)]
    mask = (rr - ky / 2) ** 2 + (cc - kx / 2) ** 2 <= radius**2
    # blur (3 px, mode 'reflect', on the box) + argmax in the mask, compiled; only the box
    # is converted to float
    flat = _kernels.box_peaks(p, (o_r, o_c), mask, 3.0)
    r0, c0 = np.unravel_index(flat, mask.shape)
    r0, c0 = r0 + o_r, c0 + o_c
    d = np.arange(-window, window + 1)
    gr = np.clip(r0[:, None] + d[None], 0, ky - 1)
    gc = np.clip(c0[:, None] + d[None], 0, kx - 1)
    win = p[np.arange(n)[:, None, None], gr[:, :, None], gc[:, None, :]].astype(np.float32)
    lo = median_last(p[:, ::4, ::4].reshape(n, -1).astype(np.float32))[:, 0]
    thr = lo + 0.5 * (win.reshape(n, -1).max(axis=1) - lo)
    wt = np.clip(win - thr[:, None, None], 0, None)
    tot = wt.sum(axis=(1, 2))
    ok = tot > 0
    tot = np.where(ok, tot, 1)
    row = np.where(ok, (wt.sum(axis=2) * gr).sum(axis=1) / tot, r0)
    col = np.where(ok, (wt.sum(axis=1) * gc).sum(axis=1) / tot, c0)
    return np.stack([row, col], axis=1).reshape(*lead, 2)


SAMPLE_CHUNK = (
    8  # patterns sampled at once: their frames stay in cache (5x faster than 2,000 at once)
)


def median_last(x: np.ndarray) -> np.ndarray:
    """Median along the last axis (keepdims): ``np.median``'s numbers by one partition, ~5x faster."""
    x = np.asarray(x)
    m = x.shape[-1]
    h = m // 2
    part = np.partition(x, h, axis=-1)
    if m % 2:
        return part[..., h : h + 1]
    # the lower middle value is the largest of the lower part (two kth in one partition is slow)
    return (part[..., :h].max(axis=-1, keepdims=True) + part[..., h : h + 1]) / 2


def sample_about(
    patterns: np.ndarray,
    centers: np.ndarray,
    dy: np.ndarray,
    dx: np.ndarray,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Bilinear samples of patterns at offsets from their centres (e.g. a polar grid).

    Parameters
    ----------
    patterns
        (N, ky, kx) patterns.
    centers
        (N, 2) centres (row, col) px, e.g. the direct beam.
    dy, dx
        (M,) row and column offsets shared by all patterns (px, or other units with ``scale``).
    scale
        (N,) factor per pattern on the offsets (e.g. px per 1/Å of each pattern); default 1.

    Returns
    -------
    (N, M) float32; samples off the frame read 0. Vectorised over chunks of
    ``SAMPLE_CHUNK`` patterns, whose frames stay in cache.
    """
    p = np.asarray(patterns, np.float32)
    n, ky, kx = p.shape
    c = np.asarray(centers, np.float32).reshape(n, 2)
    dy = np.asarray(dy, np.float32).ravel()[None]
    dx = np.asarray(dx, np.float32).ravel()[None]
    s = np.ones(n, np.float32) if scale is None else np.asarray(scale, np.float32).reshape(n)
    out = np.empty((n, dy.shape[1]), np.float32)
    wp = kx + 3
    pad = np.zeros(
        (SAMPLE_CHUNK, ky + 3, wp), np.float32
    )  # 1 px zero border: off-frame samples land on it
    for a in range(0, n, SAMPLE_CHUNK):
        b = slice(a, min(a + SAMPLE_CHUNK, n))
        m = b.stop - a
        pad[:m, 1 : ky + 1, 1 : kx + 1] = p[b]
        rows = np.clip(c[b, 0:1] + s[b, None] * dy + 1, 0, ky + 1)
        cols = np.clip(c[b, 1:2] + s[b, None] * dx + 1, 0, kx + 1)
        r0 = rows.astype(np.int32)
        c0 = cols.astype(np.int32)
        fr = rows - r0
        fc = cols - c0
        idx = r0 * wp + c0 + (np.arange(m, dtype=np.int32) * ((ky + 3) * wp))[:, None]
        flat = pad.ravel()
        top = np.take(flat, idx) * (1 - fc) + np.take(flat, idx + 1) * fc
        bot = np.take(flat, idx + wp) * (1 - fc) + np.take(flat, idx + wp + 1) * fc
        out[b] = top * (1 - fr) + bot * fr
    return out


def resample(
    patterns: np.ndarray,
    centers: np.ndarray,
    calibration,
    working_calibration: float,
    size: int = 144,
) -> np.ndarray:
    """Resample patterns to a working calibration, centred on their direct beam (bilinear).

    Parameters
    ----------
    patterns
        (N, ky, kx) patterns.
    centers
        (N, 2) direct-beam centres (row, col) in px (:func:`find_direct_beam`).
    calibration
        Calibration of the input (1/Å per px): one number, or (N,) one per pattern.
    working_calibration
        Calibration of the output (1/Å per px).
    size
        Output side (px); the direct beam lands on (size / 2, size / 2).

    Returns
    -------
    (N, size, size) float32 patterns; zero where the output reaches beyond the frame.
    """
    p = np.asarray(patterns, dtype=np.float32)
    n = len(p)
    g = (np.arange(size) - size / 2) * working_calibration  # 1/Å
    dy = np.repeat(g, size)
    dx = np.tile(g, size)
    scale = 1 / np.broadcast_to(np.asarray(calibration, float), (n,))
    return sample_about(p, centers, dy, dx, scale=scale).reshape(n, size, size)


# --------------------------------------------------------------------------------------
# Labels (reference indexing) and writing
# --------------------------------------------------------------------------------------


def load_labels(path: str | Path, nav_shape: tuple[int, int] | None = None):
    """Read a reference indexing result (orix ``.ang`` / ``.h5``, ``.ctf``) as a ``CrystalMap``.

    Parameters
    ----------
    path
        The indexing result.
    nav_shape
        (rows, cols) of the map it labels; a mismatch is an error.
    """
    from orix import io as oio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No label file at {path}; expected one of {', '.join(LABEL_FORMATS)}"
        )
    if path.suffix.lower() not in LABEL_FORMATS:
        raise ValueError(
            f"Cannot read labels from {path.name}; expected one of {', '.join(LABEL_FORMATS)}"
        )
    try:
        xmap = oio.load(path)
    except Exception as e:
        raise ValueError(f"Cannot read labels {path}: {type(e).__name__}: {e}") from None
    if nav_shape is not None and tuple(xmap.shape) != tuple(nav_shape):
        raise ValueError(
            f"Labels {path.name} cover a {xmap.shape} scan; the map is {tuple(nav_shape)}"
        )
    return xmap


def save_map(
    path: str | Path,
    data,
    calibration: float,
    kv: float = DEFAULT_KV,
    step_nm: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write a 4D array (numpy or dask, written block by block) as a calibrated ``.zspy`` / ``.hspy``.

    The file is written under a temporary name and renamed, so a failure leaves nothing.
    """
    import dask.array as da
    import hyperspy.api as hs

    path = Path(path)
    if path.suffix.lower() not in (".zspy", ".hspy"):
        raise ValueError(f"Cannot write {path.name}; expected a .zspy or .hspy file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True")
    if not calibration > 0:
        raise ValueError(f"Calibration {calibration!r} is not positive; expected 1/Å per pixel")
    if data.ndim != 4:
        raise ValueError(
            f"Data of shape {tuple(data.shape)} is not a 4D scan; expected (rows, cols, ky, kx)"
        )
    lazy = isinstance(data, da.Array)
    s = hs.signals.Signal2D(data)
    if lazy:
        s = s.as_lazy()
    for ax, name in zip(s.axes_manager.navigation_axes, ("x", "y"), strict=True):
        ax.name, ax.scale, ax.units = name, step_nm, "nm"
    for ax, name in zip(s.axes_manager.signal_axes, ("kx", "ky"), strict=True):
        ax.name, ax.scale, ax.units, ax.offset = (
            name,
            calibration,
            "1/Å",
            -calibration * (ax.size // 2),
        )
    s.metadata.set_item("Acquisition_instrument.TEM.beam_energy", float(kv))
    s.set_signal_type("electron_diffraction")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        s.save(tmp, overwrite=True, show_progressbar=False)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        raise
    return path


def info(path: str | Path, calibration: float | None = None) -> dict:
    """Shape, calibration, beam energy, scan step and labels of a map (nothing is loaded)."""
    s = load_map(path, lazy=True, calibration=calibration)
    nav = s.axes_manager.navigation_axes
    out = {
        "path": str(path),
        "scan_shape": tuple(int(x) for x in s.data.shape[:2]),
        "pattern_shape": tuple(int(x) for x in s.data.shape[2:]),
        "dtype": str(s.data.dtype),
        "calibration_inv_A_per_px": calibration_of(s),
        "k_max_inv_A": calibration_of(s) * min(s.data.shape[2:]) / 2,
        "beam_energy_kV": beam_energy(s),
        "scan_step": f"{nav[0].scale:g} {nav[0].units}" if nav else "",
        "size_GB": float(np.prod(s.data.shape) * s.data.dtype.itemsize / 1e9),
        "phases": None,
    }
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    truth = folder / "truth.h5"
    if truth.is_file():
        xmap = load_labels(truth)
        fr = {ph.name: float((xmap.phase_id == pid).mean()) for pid, ph in xmap.phases}
        out["phases"] = {k: round(v, 4) for k, v in fr.items()}
    return out


def _cli_info(parser):
    parser.add_argument(
        "map", help="a 4D map (.hspy, .zspy, .blo, .mib, .npy) or a synthetic map folder"
    )
    parser.add_argument(
        "--calibration", type=float, default=None, help="1/Å per px (required for .npy)"
    )

    def run(args):
        d = info(args.map, args.calibration)
        width = max(len(k) for k in d)
        for k, v in d.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            print(f"{k:<{width}}  {v}")
        return 0

    return run
