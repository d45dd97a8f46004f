"""Index a whole map: phase and orientation of every pattern, streamed, resumable (``temlib index``).

:func:`index_map` reads any map :func:`temlib.io.load_map` reads (lazily), walks it in
blocks of ``chunk x chunk`` scan pixels, and for each block finds the direct beams,
computes the polar descriptors (:mod:`temlib.descriptors`, tuned settings) and matches
them (:mod:`temlib.match`), then refines each best solution below the library step with
the relrod width fitted once on the map (:func:`temlib.match.refine_result`; ``refine=False``
keeps the library's orientations). Only one block of patterns is in memory at a time.

With ``out`` given, every finished block is written to ``<out>.parts/`` (one small
``.npz`` per block, atomically); a run that is interrupted and started again skips
the blocks already there (``resume=True``), as long as the map and the settings are
the same (a key in ``<out>.parts/meta.json``). At the end the result is written as orix
``.h5`` and ``.ang`` next to ``out`` and the parts are removed.

Methods
    ``tm``: template matching over every phase, phase from the calibrated per-phase
    scores. ``ml``: a phase classifier (:func:`temlib.classify.load_classifier`) picks the
    phase, template matching restricted to that phase gives the orientation; phase
    reliability then comes from the classifier's probabilities. ``hybrid`` comes with
    the orientation regression models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import crystal, descriptors, io, match

log = logging.getLogger(__name__)

METHODS = ("tm", "ml", "hybrid")


def _load_classifier(models):
    """The phase classifier: an object with ``.phases`` and ``.predict_proba``, or a path/None for classify."""
    if models is not None and hasattr(models, "predict_proba") and hasattr(models, "phases"):
        return models
    try:
        from . import classify
    except ImportError:
        raise ValueError(
            "no classifier: --method ml needs temlib.classify (the phase classifier), which is not installed; use --method tm"
        ) from None
    if not hasattr(classify, "load_classifier"):
        raise ValueError("no classifier: temlib.classify has no load_classifier(); use --method tm")
    try:
        return classify.load_classifier(models)
    except FileNotFoundError as e:
        raise ValueError(
            f"no classifier found ({e}); train one (notebook 03) or pass --models PATH"
        ) from None


def _key(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def index_patterns(
    patterns: np.ndarray,
    calibration: float,
    library: match.Library,
    method: str = "tm",
    classifier=None,
    centers: np.ndarray | None = None,
    n_best: int = 5,
    refine: bool | dict = False,
) -> match.MatchResult:
    """Index a stack of (N, ky, kx) raw patterns with ``method`` (``tm`` or ``ml``).

    Parameters
    ----------
    classifier
        For ``ml``: an object with ``.phases`` (names) and
        ``.predict_proba(patterns, calibration) -> (N, n_phases)``.
    refine
        Refine the best solution below the library step (:func:`temlib.match.refine_result`)
        with ``{phase: relrod half-width}``, or with widths fitted on these patterns (True).
    """

    p = np.asarray(patterns)
    if centers is None:
        centers = io.find_direct_beam(p)
    desc, unfolded = descriptors.pattern_descriptors(
        p, calibration, centers, library.settings, unfolded=True
    )
    if method == "tm":
        res = match.match_descriptors(desc, library, n_best=n_best)
        return match.finish_result(res, desc, unfolded, library, refine)
    proba = np.asarray(classifier.predict_proba(p, calibration), float)
    names = list(classifier.phases)
    if proba.shape != (len(p), len(names)):
        raise ValueError(
            f"Classifier returned probabilities of shape {proba.shape}; expected ({len(p)}, {len(names)})"
        )
    pick = proba.argmax(axis=1)
    phase_of = np.array([library.names.index(names[i]) for i in pick])
    res = match.match_descriptors(desc, library, n_best=n_best, phase_of=phase_of)
    res = match.finish_result(res, desc, unfolded, library, refine)
    srt = np.sort(proba, axis=1)
    res.phase_reliability = (
        100 * (1 - srt[:, -2] / np.maximum(srt[:, -1], 1e-12))
        if proba.shape[1] > 1
        else np.full(len(p), 100.0)
    )
    scores = np.full((len(p), len(library.names)), np.nan)
    for j, name in enumerate(names):
        scores[:, library.names.index(name)] = proba[:, j]
    res.phase_scores = scores
    return res


def _fit_relrod(patterns, calibration, library, classifier=None) -> dict:
    """``{phase: relrod half-width}`` fitted on patterns (phases from the classifier when given,
    else from template matching; :func:`temlib.match.fit_result_excitation_error`)."""
    desc = descriptors.pattern_descriptors(
        patterns, calibration, io.find_direct_beam(patterns), library.settings
    )
    phase_of = None
    if classifier is not None:
        pick = np.asarray(classifier.predict_proba(patterns, calibration)).argmax(axis=1)
        phase_of = np.array([library.names.index(classifier.phases[i]) for i in pick])
    res = match.match_descriptors(desc, library, n_best=1, phase_of=phase_of)
    return match.fit_result_excitation_error(res, desc, library)


def index_map(
    map_path_or_signal,
    method: str = "tm",
    phases=None,
    resolution: float = 1.0,
    out: str | Path | None = None,
    models=None,
    chunk: int = 32,
    resume: bool = True,
    show_progressbar: bool = True,
    calibration: float | None = None,
    kv: float | None = None,
    settings: descriptors.DescriptorSettings | None = None,
    n_best: int = 5,
    library: match.Library | None = None,
    refine: bool = True,
):
    """Index every pattern of a map; returns an orix ``CrystalMap`` (and writes it when ``out``).

    Parameters
    ----------
    map_path_or_signal
        A map file or synthetic map folder (:func:`temlib.io.load_map`), or a signal it returned.
    method
        ``"tm"`` (template matching), ``"ml"`` (classifier phase + template-matching
        orientation) or ``"hybrid"`` (not yet: comes with the regression models).
    phases
        Phase names (a tuple or ``"ferrite,NbC,cementite"``); default the steel phases, or
        the phases of ``library`` when one is given; for ``ml`` the classifier's.
    resolution
        Template library step (deg).
    out
        Result file ``RESULT.h5`` (orix HDF5; ``RESULT.ang`` is written beside it).
    models
        For ``ml``: the classifier folder (None: ``data/models/classifier/``) or a classifier object.
    chunk
        Scan pixels per block side (memory: ``chunk**2`` patterns at a time).
    resume
        Reuse blocks finished by an interrupted run with the same settings (needs ``out``).
    calibration, kv
        Override the map's calibration (1/Å per px) and beam energy (kV).
    settings
        Descriptor settings (default: the tuned ones, :func:`temlib.descriptors.load_settings`).
    n_best
        Solutions kept per pattern.
    library
        A prebuilt :class:`temlib.match.Library` (skips building it; must fit the map's kV).
    refine
        Refine every best solution below the library step (:func:`temlib.match.refine_result`)
        with each phase's relrod half-width fitted once on patterns of four blocks spread over
        the map (:func:`temlib.match.fit_result_excitation_error`; stored in ``indexing_info``).
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of 'tm', 'ml', 'hybrid'")
    if phases is None:
        phases = tuple(library.names) if library is not None else crystal.STEEL_PHASES
    if isinstance(phases, str):
        phases = tuple(p.strip() for p in phases.split(",") if p.strip())
    phases = tuple(crystal.get_phase(p).name for p in phases)  # validates names
    if method in ("ml", "hybrid") and library is None and not hasattr(models, "predict_proba"):
        from . import regress  # per-phase orientation regressors (notebook 04), when trained

        if regress.has_regressors(models, phases):
            return regress.index_file(
                map_path_or_signal, method, out=out, models=models, phases=phases,
                resolution=resolution, chunk=chunk, calibration=calibration, kv=kv,
                show_progressbar=show_progressbar, refine=refine,
            )  # fmt: skip
    if method == "hybrid":
        raise ValueError(
            "Method 'hybrid' needs the trained orientation regression models (notebook 04); use 'tm' or 'ml'"
        )
    if not phases:
        raise ValueError("No phases given; expected e.g. 'ferrite,NbC,cementite'")
    if not 0 < resolution <= 10:
        raise ValueError(
            f"Resolution {resolution!r} deg is out of range; expected 0 < resolution <= 10"
        )
    if chunk < 1:
        raise ValueError(f"chunk {chunk!r} must be a positive number of scan pixels")
    if out is not None:
        out = io.check_output_path(out)
    if isinstance(map_path_or_signal, str | Path):
        signal = io.load_map(map_path_or_signal, lazy=True, calibration=calibration, kv=kv)
        source = str(Path(map_path_or_signal).resolve())
    else:
        signal = map_path_or_signal
        source = str(signal.metadata.get_item("General.original_filename", "signal"))
    if signal.data.ndim != 4:
        raise ValueError(
            f"Map of shape {tuple(signal.data.shape)} is not a 4D scan; expected (rows, cols, ky, kx)"
        )
    cal = calibration or io.calibration_of(signal)
    beam_kv = kv or io.beam_energy(signal)
    settings = descriptors.load_settings() if settings is None else settings
    classifier = None
    if method == "ml":
        classifier = _load_classifier(models)
        phases = tuple(crystal.get_phase(p).name for p in classifier.phases)
    if library is None:
        library = match.build_library(phases, resolution=resolution, kv=beam_kv, settings=settings)
    elif library.names != list(phases):
        missing = [p for p in phases if p not in library.names]
        if missing:
            raise ValueError(f"Phases {missing} are not in the given library {library.names}")
        library = library.restrict(phases)
    h, w = signal.data.shape[:2]
    blocks = [(r, c) for r in range(0, h, chunk) for c in range(0, w, chunk)]

    t0 = time.perf_counter()  # the fit below is part of the run's time
    relrod = {}
    if refine:  # the map's relrod widths, from 4 blocks spread over it, 64 patterns of each
        sample = io.spread_sample(signal, chunk)
        relrod = _fit_relrod(sample, cal, library, classifier)
        log.info("relrod half-widths fitted on %d patterns: %s", len(sample), relrod)
    spec = {
        "source": source,
        "shape": list(signal.data.shape),
        "calibration": cal,
        "kv": beam_kv,
        "method": method,
        "phases": list(phases),
        "resolution": resolution,
        "settings": library.settings.as_dict(),
        "calibrated": library.phase_calibration is not None,
        "n_best": n_best,
        "chunk": chunk,
        "beam_flip": "decided on the unfolded descriptor",  # blocks of older runs are redone
        "refine": {k: round(v, 6) for k, v in relrod.items()} if refine else False,
    }
    key = _key(spec)
    parts = None
    if out is not None:
        parts = out.with_name(out.name + ".parts")
        meta = parts / "meta.json"
        if parts.exists() and (
            not resume or not meta.is_file() or json.loads(meta.read_text()).get("key") != key
        ):
            shutil.rmtree(parts)
        parts.mkdir(exist_ok=True)
        meta.write_text(json.dumps({"key": key, "spec": spec}, indent=2, default=str))
    done = {
        b for b in blocks if parts is not None and (parts / f"block_{b[0]}_{b[1]}.npz").is_file()
    }
    if done:
        log.info("resuming: %d of %d blocks already indexed", len(done), len(blocks))
    memory: dict = {}
    n_new = 0
    bar = tqdm(
        total=h * w,
        desc=f"indexing ({method})",
        unit="pattern",
        disable=not show_progressbar,
        initial=0,
    )
    for r0, c0 in blocks:
        rs, cs = slice(r0, min(r0 + chunk, h)), slice(c0, min(c0 + chunk, w))
        n_b = (rs.stop - r0) * (cs.stop - c0)
        if (r0, c0) in done:
            bar.update(n_b)
            continue
        block = io.read_block(signal, rs, cs)
        pats = block.reshape(-1, *block.shape[2:])
        res = index_patterns(
            pats,
            cal,
            library,
            method,
            classifier,
            n_best=n_best,
            refine=relrod if refine else False,
        )
        arrays = res.as_dict()
        if parts is not None:
            _save_npz(parts / f"block_{r0}_{c0}.npz", **arrays)
        else:
            memory[(r0, c0)] = arrays
        n_new += n_b
        bar.update(n_b)
    bar.close()
    seconds = time.perf_counter() - t0
    # assemble in scan order
    full: dict[str, np.ndarray] = {}
    for r0, c0 in blocks:
        if parts is not None:
            with np.load(parts / f"block_{r0}_{c0}.npz") as f:
                arrays = {k: f[k] for k in f.files}
        else:
            arrays = memory[(r0, c0)]
        rr, cc = np.mgrid[r0 : min(r0 + chunk, h), c0 : min(c0 + chunk, w)]
        flat = (rr * w + cc).ravel()
        for k, v in arrays.items():
            if k not in full:
                full[k] = np.zeros((h * w, *v.shape[1:]), v.dtype)
            full[k][flat] = v
    result = match.MatchResult(**full)
    nav = signal.axes_manager.navigation_axes
    step = float(nav[0].scale) if nav else 1.0
    unit = str(nav[0].units) if nav and str(nav[0].units) not in ("", "<undefined>") else "px"
    xmap = match.to_crystal_map(result, library, (h, w), step=step, scan_unit=unit)
    xmap.scan_unit = unit
    if out is not None:
        match.save_crystal_map(xmap, out)
        shutil.rmtree(parts, ignore_errors=True)
    rate = n_new / seconds if n_new and seconds > 0 else float("nan")
    log.info(
        "indexed %d patterns (%d new) in %.1f s (%.0f patterns/s)", h * w, n_new, seconds, rate
    )
    xmap.indexing_info = {
        "seconds": seconds,
        "new_patterns": n_new,
        "patterns_per_s": rate,
        "method": method,
        "excitation_error": relrod,
    }
    return xmap


def _cli_index(parser):
    parser.add_argument(
        "map", help="a 4D map (.hspy, .zspy, .blo, .mib, .npy) or a synthetic map folder"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="result RESULT.h5 (orix CrystalMap; RESULT.ang is written beside it)",
    )
    parser.add_argument(
        "--method",
        default="tm",
        help="tm (template matching), ml (classifier phase + TM orientation), hybrid",
    )
    parser.add_argument(
        "--phases",
        default=",".join(crystal.STEEL_PHASES),
        help="comma-separated phase names, e.g. ferrite,NbC,cementite or MgO",
    )
    parser.add_argument("--resolution", type=float, default=1.0, help="template library step (deg)")
    parser.add_argument(
        "--calibration",
        type=float,
        default=None,
        help="1/Å per px (overrides the file's; required for .npy)",
    )
    parser.add_argument(
        "--kv", type=float, default=None, help="beam energy in kV (overrides the file's)"
    )
    parser.add_argument("--chunk", type=int, default=32, help="scan pixels per block side")
    parser.add_argument("--n-best", type=int, default=5, help="solutions kept per pattern")
    parser.add_argument(
        "--models",
        default=None,
        help="classifier folder for --method ml (default data/models/classifier/)",
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="start again even if finished blocks exist"
    )
    parser.add_argument(
        "--no-refine",
        action="store_true",
        help="keep the library's orientations (no refinement below the library step)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args):
        if args.method not in METHODS:
            raise ValueError(
                f"Unknown method {args.method!r}; expected one of 'tm', 'ml', 'hybrid'"
            )
        xmap = index_map(
            args.map,
            method=args.method,
            phases=args.phases,
            resolution=args.resolution,
            out=args.out,
            models=args.models,
            chunk=args.chunk,
            resume=not args.no_resume,
            show_progressbar=not args.quiet,
            calibration=args.calibration,
            kv=args.kv,
            n_best=args.n_best,
            refine=not args.no_refine,
        )
        info = xmap.indexing_info
        fr = {ph.name: float((xmap.phase_id == i).mean()) for i, ph in xmap.phases if i >= 0}
        fracs = ", ".join(f"{k} {v:.1%}" for k, v in fr.items())
        print(
            f"indexed {xmap.size} patterns ({info['new_patterns']} new) in {info['seconds']:.1f} s "
            f"({info['patterns_per_s']:.0f} patterns/s); phases: {fracs}; "
            f"median reliability {np.median(xmap.prop['reliability']):.1f}; wrote {Path(args.out)} and "
            f"{Path(args.out).with_suffix('.ang')}"
        )
        relrod = info.get("excitation_error") or {}
        if relrod:
            widths = ", ".join(f"{k} {v:.4f}" for k, v in relrod.items())
            print(
                f"refined below the library step with the relrod half-widths fitted on the map: {widths} 1/Å"
            )
        return 0

    return run
