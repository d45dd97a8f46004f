"""Template matching: ours vs pyxem 0.21 get_orientation on the same data and library.

Prints one table (patterns/s, phase accuracy, disorientation statistics modulo the 180 deg
beam flip and strictly) for a fixed random subset of the synthetic test map, the speed
ratio, and the peak memory of streaming a large lazy map through ``temlib index``.
Rates are given per wall-clock second and per CPU-second of the process (all its
threads): on a machine shared with other jobs the second is the fairer comparison.

    python benchmarks/bench_match.py                 # default profile, 200 patterns
    python benchmarks/bench_match.py --n 500 --repeats 3 --large 32x320
    python benchmarks/bench_match.py --only-large --large 64x500     # memory only, fresh process

Both run on the same patterns in the same process (same cores, same load). pyxem gets
patterns already centred on their direct beam (untimed), ours is timed from the raw
patterns (beam finding and descriptors included). The first pyxem call (numba
compilation) and our first call are warm-ups and are not timed.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--profile",
        default="default",
        help="synthetic maps profile (params/<profile>/00_ingest.yaml)",
    )
    ap.add_argument(
        "--n", type=int, default=200, help="patterns in the random subset of the test map"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of ours (median)")
    ap.add_argument(
        "--pyxem-frac-keep",
        type=float,
        nargs="+",
        default=[1.0, 0.1],
        help="pyxem frac_keep values",
    )
    ap.add_argument(
        "--large",
        default="32x320",
        help="ROWSxCOLS of a 500x500 lazy map to stream for memory ('' to skip)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only-large",
        action="store_true",
        help="only the memory run (in a fresh process: clean peak RSS)",
    )
    args = ap.parse_args(argv)

    import pandas as pd

    from temlib import _runtime, io, match, synth

    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    maps = synth.steel_maps(args.profile, show_progressbar=False)
    test = maps["test"]
    sig = test.load(lazy=True)
    cal = io.calibration_of(sig)
    h, w = sig.data.shape[:2]
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(h * w, size=min(args.n, h * w), replace=False))
    rr, cc = np.unravel_index(idx, (h, w))
    pats = np.asarray(sig.data.vindex[rr, cc].compute())
    truth = match.subset(test.truth(), idx)
    lib = match.build_library(kv=io.beam_energy(sig))
    print(
        f"{len(idx)} patterns of {test.folder} ({cal:.5f} 1/Å/px), {lib.size} templates "
        f"({', '.join(f'{p.phase.name} {p.size}' for p in lib.phases)}), threads {_runtime.n_threads()}, "
        f"phase decision {'calibrated' if lib.phase_calibration else 'plain correlation'}"
    )
    rows = []
    if args.only_large:
        args.repeats, args.pyxem_frac_keep = 0, []

    def score(name, res, rate, cpu_rate):
        xm = match.to_crystal_map(res, lib, (1, len(idx)))
        e = match.orientation_errors(xm, truth)
        t = match.error_table(e).loc["all"]
        rows.append(
            {
                "method": name,
                "patterns/s": rate,
                "patterns/CPU-s": cpu_rate,
                "phase acc": t["phase_acc"],
                "flip median": t["flip median"],
                "flip p90": t["flip p90"],
                "flip <2": t["flip <2"],
                "flip <5": t["flip <5"],
                "flip >10": t["flip >10"],
                "strict median": t["strict median"],
            }
        )

    if args.repeats:
        match.match_patterns(pats[:16], cal, lib)  # warm-up
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            res = match.match_patterns(pats, cal, lib)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        ours_rate = len(idx) / float(np.median(times))
        ours_cpu = len(idx) / float(np.median(cpu))
        score("temlib (ours)", res, ours_rate, ours_cpu)
    centers = io.find_direct_beam(pats)
    if args.pyxem_frac_keep:
        match.pyxem_index(pats[:4], cal, lib, centers=centers[:4], frac_keep=1.0)  # warm-up (numba)
    for fk in args.pyxem_frac_keep:
        pres, info = match.pyxem_index(pats, cal, lib, centers=centers, frac_keep=fk)
        score(
            f"pyxem get_orientation frac_keep={fk:g}",
            pres,
            info["patterns_per_s"],
            len(idx) / info["cpu_seconds"],
        )
    if rows:
        table = pd.DataFrame(rows).set_index("method")
        print(table.to_string(float_format=lambda v: f"{v:.3g}"))
        for name, row in table.iloc[1:].iterrows():
            print(
                f"speed ratio ours / {name}: {ours_rate / row['patterns/s']:.1f}x wall-clock, "
                f"{ours_cpu / row['patterns/CPU-s']:.1f}x per CPU-second"
            )

    if args.large:
        import dask.array as da

        from temlib import pipeline

        r, c = (int(v) for v in args.large.lower().split("x"))
        # a 500x500 lazy map (5.2 GB as uint8) tiled from the test map; only a strip is indexed
        big = da.tile(sig.data, (int(np.ceil(500 / h)), int(np.ceil(500 / w)), 1, 1))[:500, :500]
        s_big = io.load_map(test.folder, lazy=True)
        s_big = s_big._deepcopy_with_new_data(big)
        strip = s_big.inav[0:c, 0:r]
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        pipeline.index_map(strip, library=lib, chunk=32, show_progressbar=False)
        dt = time.perf_counter() - t0
        print(
            f"large map: 500x500x144x144 uint8 = {big.nbytes / 1e9:.1f} GB lazily; indexed a {r}x{c} strip "
            f"({r * c} patterns) in {dt:.0f} s ({r * c / dt:.0f} patterns/s); peak RSS {rss0:.0f} MB before, "
            f"{_rss_mb():.0f} MB after (one 32x32 block of patterns = {32 * 32 * 144 * 144 / 1e6:.0f} MB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
