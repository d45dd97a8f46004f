"""Throughput of the online indexer: ML, hybrid and full template matching, side by side.

End to end from raw patterns (uint8, in memory, as read from a map chunk) to an orix
CrystalMap (hybrid and tm refined below the library step, and without: "library orientations"), on pixels of the synthetic test map of a profile, with the models saved by
notebook 04 (and the classifier of notebook 03 when saved; otherwise the true phase is
given and the classifier's time is missing from the ML and hybrid rows, which the table
says). Each method runs ``--repeats`` times; the table gives the median wall time and
the median process CPU time per pattern. On a shared machine the wall time depends on
the other jobs; ``2-core estimate`` = 2 / CPU time per pattern assumes the two cores
are ours (the work is CPU bound and uses both threads).

    python benchmarks/bench_pipeline.py [--profile default] [--n 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import temlib  # noqa: F401  (thread settings)
from temlib import classify, crystal, descriptors, io, match, regress, synth


def _timed(f, repeats):
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = f()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, float(np.median(walls)), float(np.median(cpus))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--n", type=int, default=2000, help="test-map pixels indexed per run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    m = synth.steel_maps(args.profile, show_progressbar=False)["test"]
    t = m.truth_arrays()
    sig = m.load()
    cal, kv = io.calibration_of(sig), io.beam_energy(sig)
    h, w = t["phase_id"].shape
    n = min(args.n, h * w)
    idx = np.arange(n)  # a block of scan rows, as a chunk arrives
    rr, cc = np.unravel_index(idx, (h, w))
    pats = np.asarray(sig.data.vindex[rr, cc].compute())
    truth_pid, truth_q = t["phase_id"].ravel()[idx], t["quaternions"].reshape(-1, 4)[idx]
    names = list(crystal.STEEL_PHASES)
    has_clf = (classify.default_model_dir(args.profile) / classify.MODEL_FILE).is_file()
    phase_of = None if has_clf else truth_pid
    shape = (n // w, w) if n % w == 0 else (1, n)

    rows, quats = [], {}
    # front end alone (direct beam + descriptors)
    st = regress.load_regressors(None, names, args.profile)["ferrite"].settings
    _, wall, cpu = _timed(
        lambda: descriptors.pattern_descriptors(pats, cal, io.find_direct_beam(pats), st),
        args.repeats,
    )
    rows.append(("front end (beam + descriptors)", "-", wall, cpu, np.nan, np.nan))
    lib = match.build_library(names, kv=kv, settings=st)
    # the map's relrod widths for the refinement, fitted once (untimed) on blocks spread over
    # the map, as temlib index does
    sample = io.spread_sample(sig)
    desc = descriptors.pattern_descriptors(sample, cal, io.find_direct_beam(sample), st)
    t_fit = time.perf_counter()
    relrod = match.fit_result_excitation_error(
        match.match_descriptors(desc, lib, n_best=1), desc, lib
    )
    t_fit = time.perf_counter() - t_fit
    for method, refine in (("ml", False), ("hybrid", True), ("hybrid", False)):
        mod = regress.load_models(
            method, None, names, classifier=None if has_clf else False, kv=kv, profile=args.profile
        )
        mod.refine, mod.excitation_error = refine, dict(relrod)
        name = method if method == "ml" else f"{method}{'' if refine else ', library orientations'}"
        regress.index_patterns(
            pats[:16], cal, mod, None if phase_of is None else phase_of[:16]
        )  # warm-up
        res, wall, cpu = _timed(
            lambda mod=mod: regress.to_crystal_map(
                regress.index_patterns(pats, cal, mod, phase_of), shape
            ),
            args.repeats,
        )
        quats[name] = (res.phase_id, res.rotations.data)
        rows.append(
            (
                name,
                "classifier" if has_clf else "truth (no classifier saved)",
                wall,
                cpu,
                None,
                None,
            )
        )
    match.match_patterns(pats[:16], cal, lib, n_best=1)  # warm-up
    for name, refine in (
        ("tm (full search, all phases)", relrod),
        ("tm, library orientations", False),
    ):
        r, wall, cpu = _timed(
            lambda refine=refine: match.match_patterns(pats, cal, lib, n_best=1, refine=refine),
            max(1, args.repeats - 1),
        )
        quats[name] = (
            np.array([names.index(lib.names[i]) for i in r.phase_index]),
            r.quaternions[:, 0],
        )
        rows.append((name, "tm scores", wall, cpu, None, None))

    def err(key):
        pid, q = quats[key]
        ok = pid == truth_pid
        e = np.full(n, np.nan)
        for j, ph in enumerate(names):
            s = np.flatnonzero(ok & (truth_pid == j) & (t["weight"].ravel()[idx] >= 0.999))
            if s.size:
                e[s] = regress.disorientation_deg(q[s], truth_q[s], ph, modulo_flip=True)
        return float(np.nanmedian(e)), float(np.mean(ok))

    print(
        f"profile {args.profile}: {n} patterns {pats.shape[1:]} of the test map, {args.repeats} repeats, "
        f"TEMLIB threads {temlib._runtime.n_threads()}"
    )
    print(
        f"{'method':34s} {'phase from':28s} {'wall pat/s':>10s} {'CPU ms/pat':>10s} {'2-core est':>10s} {'median err':>10s} {'phase acc':>9s}"
    )
    for name, src, wall, cpu, _, _ in rows:
        med, acc = err(name) if name in quats else (np.nan, np.nan)
        print(
            f"{name:34s} {src:28s} {n / wall:10.0f} {1e3 * cpu / n:10.3f} {2 * n / cpu:10.0f} {med:10.2f} {acc:9.3f}"
        )
    if has_clf:
        clf = classify.load_classifier(classify.default_model_dir(args.profile))
        bf16 = temlib._runtime.bfloat16_inference(clf.model) is not None
        print(
            "classifier network in ml / hybrid: "
            + ("bfloat16 (OpenVINO)" if bf16 else "float32 (TensorFlow; no bfloat16 here)")
        )
    cpu_of = {r[0]: r[3] for r in rows}
    fitted = ", ".join(f"{k} {v:.4f}" for k, v in relrod.items())
    print(
        f"relrod half-widths fitted once on {len(sample)} patterns spread over the map (untimed above): {fitted} 1/Å in {t_fit:.1f} s"
    )
    for hy, tm in (
        ("hybrid", "tm (full search, all phases)"),
        ("hybrid, library orientations", "tm, library orientations"),
    ):
        print(
            f"{hy} vs {tm}: {cpu_of[tm] / cpu_of[hy]:.1f}x less CPU; median error difference "
            f"{err(hy)[0] - err(tm)[0]:+.2f} deg (flip-tolerant, correctly phased interior pixels)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
