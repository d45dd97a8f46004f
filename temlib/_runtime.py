"""Offline safety and thread settings, applied once when temlib is imported.

Nothing in temlib may touch the network. The third-party packages that would
(ultralytics checks DNS, downloads Arial.ttf for plots and writes settings to
``~``; Keras picks a backend from the environment) are configured here, before
any of them is imported:

- ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR`` inside the project (``.cache/ultralytics``),
  with matplotlib's DejaVuSans.ttf copied there as ``Arial.ttf`` and
  ``Arial.Unicode.ttf`` so ultralytics never downloads a font;
- ``KERAS_BACKEND=tensorflow``;
- ``HF_HUB_OFFLINE=1`` for anything that would reach a model hub;
- explicit thread counts (``OMP_NUM_THREADS``, TensorFlow intra/inter-op, torch),
  ``TEMLIB_THREADS`` overriding the default of all cores.

Existing environment values are respected (``setdefault``), so a user can still
choose otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import weakref
from pathlib import Path

from . import paths


def n_threads() -> int:
    """Threads temlib gives numerical libraries (``$TEMLIB_THREADS`` or all cores)."""
    env = os.environ.get("TEMLIB_THREADS")
    if env:
        return max(1, int(env))
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


# vector extensions that decide CPU inference speed, best first (INT8 YOLO at 1024 px, notebook 07:
# 27-49 ms per frame on an EPYC with AVX-512 VNNI in sessions 22-27, 137 ms on one with AVX2 only
# in session 29)
_ISA = ("amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")


def cpu_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's vector extensions that matter for inference speed, e.g. ``"avx512_vnni avx512f avx2"``.

    Read from ``cpuinfo`` (Linux); ``"unknown"`` where it cannot be read. Benchmarks print it: an INT8
    model runs several times faster with VNNI / AMX than with AVX2 alone.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    found = [f for f in _ISA if f in flags]
    return " ".join(found) if found else "no avx2"


def _ultralytics_dir() -> Path:
    d = paths.cache_dir() / "ultralytics"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only checkout: fall back to a private temp folder
        import tempfile

        d = Path(tempfile.gettempdir()) / "temlib-ultralytics"
        d.mkdir(parents=True, exist_ok=True)
    return d


def _install_fonts(folder: Path) -> None:
    """Put a local TTF where ultralytics looks, so it never downloads Arial."""
    try:
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except Exception:  # matplotlib missing: ultralytics would be missing too
        return
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        dst = folder / name
        if not dst.exists() and src.exists():
            shutil.copyfile(src, dst)


def apply() -> None:
    """Set the offline and threading environment (idempotent)."""
    threads = str(n_threads())
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", threads)
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = str(_ultralytics_dir())
    _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]))


def ultralytics():
    """Import ultralytics configured for offline, in-project use and return the module.

    Settings (runs, weights, datasets folders) point inside the project, sync is
    off, and torch gets ``n_threads()`` threads. Ultralytics would take cores - 1: its
    ``select_device`` (called by every trainer and predictor) resets torch to
    ``NUM_THREADS``, which left training on one core of a 2-core machine (1.7x slower
    per epoch); that constant is set to ``n_threads()`` too.
    """
    apply()
    import torch
    import ultralytics as ul
    import ultralytics.utils.torch_utils as ul_torch

    ul_torch.NUM_THREADS = n_threads()

    ul.settings.update(
        {
            "sync": False,
            "datasets_dir": str(paths.data_dir("external")),
            "weights_dir": str(paths.data_dir("models")),
            "runs_dir": str(paths.cache_dir() / "runs"),
        }
    )
    torch.set_num_threads(n_threads())
    return ul


def _triton_before_tensorflow() -> None:
    """Load triton's LLVM before TensorFlow's, so both can live in one process.

    TensorFlow and triton (torch's compiler, imported when ultralytics trains) each bundle
    LLVM; when TensorFlow loads first, importing triton aborts the process ("Option
    'bitcode-mdindex-threshold' registered more than once"). The other order works.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        import triton._C.libtriton  # noqa: F401
    except Exception:  # no triton (CPU-only torch): nothing to clash with
        pass


def keras():
    """Import keras on the TensorFlow backend with temlib's thread settings."""
    apply()
    _triton_before_tensorflow()
    import keras as k

    return k


_INFERENCE = weakref.WeakKeyDictionary()  # model -> its traced inference function


def inference(model):
    """``model(x, training=False)`` as a traced TensorFlow graph, made once per model.

    A Keras model called eagerly runs op by op; traced, the same network runs ~1.5x faster
    on CPU (phase classifier, 2,000 patterns: 696 -> 468 ms) with identical outputs
    (classifier and regressor, 300 inputs: max difference 0). Input shapes may vary (the last batch) without retracing.
    """
    f = _INFERENCE.get(model)
    if f is None:
        import tensorflow as tf

        ref = weakref.ref(model)  # the cache must not keep the model alive
        f = tf.function(lambda x: ref()(x, training=False), reduce_retracing=True)
        _INFERENCE[model] = f
    return f


_BF16 = weakref.WeakKeyDictionary()  # model -> its OpenVINO bfloat16 network (or None)


def bfloat16_inference(model):
    """``model(x, training=False)`` compiled by OpenVINO in bfloat16, or None where it cannot be.

    On a CPU with native bfloat16 (AVX512-BF16 or AMX) the phase classifier runs 1.75x
    faster than the traced TensorFlow graph (2,000 test-map patterns: 344 -> 196 ms);
    its probabilities move by up to 5e-3 and 1 of 6,000 phase decisions changed (phase
    accuracy 0.9097 vs 0.9095 in float32). None (use :func:`inference`) when OpenVINO is
    not installed (the ``yolo`` extra brings it), the CPU has no bfloat16, or the network
    does not convert. The returned callable takes one (N, ...) float32 array.
    """
    if model in _BF16:
        return _BF16[model]
    f = None
    try:
        import openvino as ov
        import tensorflow as tf

        core = ov.Core()
        if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
            traced = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
            compiled = core.compile_model(
                ov.convert_model(traced),
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": "bf16",
                    "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_NUM_THREADS": n_threads(),
                },
            )

            def f(x):
                return compiled(x)[0]
    except Exception as e:  # no OpenVINO, or a layer it cannot convert: float32 TensorFlow
        import logging

        logging.getLogger(__name__).info("bfloat16 network unavailable (%s); using float32", e)
        f = None
    _BF16[model] = f
    return f


def autokeras():
    """Import AutoKeras (after Keras, with temlib's settings)."""
    keras()
    import autokeras as ak

    return ak


def hp_choice(hp, name: str, values):
    """``hp.Choice(name, values)`` with the first value as default; a single value is used
    as it is (no hyperparameter registered)."""
    values = list(values)
    if len(values) == 1:
        return values[0]
    return hp.Choice(name, values, default=values[0])


def auto_model(**kwargs):
    """``autokeras.AutoModel(**kwargs)`` that leaves NumPy's global generator as it was.

    AutoKeras seeds ``np.random`` globally when a model is built with a seed; temlib
    draws from its own generators, but the caller's global state is restored.
    """
    import numpy as np

    ak = autokeras()
    state = np.random.get_state()  # noqa: NPY002
    try:
        return ak.AutoModel(**kwargs)
    finally:
        np.random.set_state(state)  # noqa: NPY002


_in_part = threading.local()


def in_part() -> bool:
    """Whether this thread is running a part of :func:`split_apply` (no further splitting)."""
    return bool(getattr(_in_part, "active", False))


_controller: list = [None, -1]  # threadpoolctl controller, number of modules when made


def _blas_controller():
    """A threadpoolctl controller of the loaded BLAS libraries, made again after new imports.

    Making one scans every loaded shared library (4 ms with TensorFlow and OpenVINO
    loaded); :func:`split_apply` runs per chunk, so the scan is repeated only when modules
    were imported since (a new BLAS may have come with them).
    """
    from threadpoolctl import ThreadpoolController

    n = len(sys.modules)
    if _controller[0] is None or _controller[1] != n:
        _controller[:] = [ThreadpoolController(), n]
    return _controller[0]


def split_apply(f, *arrays, workers: int | None = None, min_part: int = 256):
    """``f(*parts)`` on contiguous parts of ``arrays`` (split along axis 0) in parallel threads.

    NumPy, SciPy and TensorFlow release the GIL in their heavy loops, so threads use
    every core on the per-pattern steps that are not one large BLAS call. BLAS is held
    at one thread inside (the parts are the parallelism; two levels of threads on two
    cores only wait on each other). ``f`` returns an array or a tuple of arrays over the
    part's patterns; the parts' results are concatenated in order. With one worker, or
    fewer than ``2 min_part`` patterns, or when called from inside a part (nested), ``f``
    runs once on everything.
    """
    import numpy as np

    n = len(arrays[0])
    workers = n_threads() if workers is None else max(1, int(workers))
    k = min(workers, n // max(min_part, 1))
    if k <= 1 or in_part():
        return f(*arrays)
    from concurrent.futures import ThreadPoolExecutor

    edges = np.linspace(0, n, k + 1).astype(int)
    parts = [tuple(a[s:e] for a in arrays) for s, e in zip(edges[:-1], edges[1:], strict=True)]

    def run(p):
        _in_part.active = True
        try:
            return f(*p)
        finally:
            _in_part.active = False

    with _blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(k) as pool:
        outs = list(pool.map(run, parts))
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(x) for x in zip(*outs, strict=True))
    return np.concatenate(outs)
