"""Orientation refinement below the library step: accuracy with and without, over camera looks.

Each synthetic map draws its own camera (relrod width, precession, intensity perturbation,
PSF...: :func:`temlib.synth.random_camera`), and the refinement's templates take the relrod
width fitted on the map (:func:`temlib.match.fit_result_excitation_error`), so whether it
helps depends on the map. This prints, for ``--maps`` maps with different seeds, the median
disorientation (deg, modulo the beam flip, single-crystal pixels of the right phase) of
``temlib index --method tm`` without and with refinement, their ratio, the fitted widths and
the time of both runs, then the median ratio over the maps.

    python benchmarks/bench_refine.py                  # 8 maps of 40 x 40, 30 grains
    python benchmarks/bench_refine.py --maps 4 --shape 24 24 --grains 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=8, help="maps (camera looks), seeds seed..")
    ap.add_argument("--shape", type=int, nargs=2, default=[40, 40], help="scan rows cols")
    ap.add_argument("--grains", type=int, default=30, help="ferrite grains per map")
    ap.add_argument("--seed", type=int, default=30, help="first map seed")
    args = ap.parse_args(argv)

    import pandas as pd

    from temlib import match, pipeline, synth

    names = ("ferrite", "NbC", "cementite")
    lib = match.build_library(names, resolution=1.0, kv=200)
    rows, pooled = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seed, args.seed + args.maps):
            m = synth.generate_map(
                Path(tmp) / f"m{seed}", shape=tuple(args.shape), n_grains=args.grains,
                nbc_particles=10.0, seed=seed, show_progressbar=False,
            )  # fmt: skip
            truth, cam = m.truth(), m.spec["camera"]
            row = {
                "seed": seed,
                "relrod": round(cam["relrod"], 3),
                "precession": round(cam["precession_deg"], 2),
                "perturbation": round(cam["perturbation"], 2),
            }
            for refine in (False, True):
                t0 = time.perf_counter()
                x = pipeline.index_map(
                    m.folder, phases=names, chunk=20, library=lib, show_progressbar=False,
                    refine=refine,
                )  # fmt: skip
                row[f"s {'refined' if refine else 'library'}"] = round(time.perf_counter() - t0, 1)
                e = match.orientation_errors(x, truth, mask=truth.prop["weight"] >= 0.999)
                for ph in ("ferrite", "NbC"):
                    ok = (e["truth"] == ph) & e["phase_ok"]
                    med = np.nanmedian(e["modulo_flip"][ok]) if ok.sum() >= 10 else np.nan
                    pooled.setdefault((ph, refine), []).append(e["modulo_flip"][ok])
                    row[f"{ph} {'refined' if refine else 'library'}"] = med
                if refine:
                    fit = x.indexing_info["excitation_error"]
                    row["fitted (1/Å)"] = ", ".join(f"{k} {v:.4f}" for k, v in fit.items())
            for ph in ("ferrite", "NbC"):
                row[f"{ph} ratio"] = row[f"{ph} refined"] / row[f"{ph} library"]
            rows.append(row)
            print(f"map {seed} done", flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(3).to_string(index=False))
    for ph in ("ferrite", "NbC"):
        r = table[f"{ph} ratio"].dropna()
        print(
            f"{ph}: median error refined / library over {len(r)} maps: {r.median():.2f} "
            f"(better on {(r < 1).sum()}, worse on {(r > 1).sum()})"
        )
        for refine in (False, True):
            e = np.concatenate(pooled.get((ph, refine), [np.zeros(0)]))
            print(
                f"  all maps pooled, {'refined' if refine else 'library'}: {e.size} pixels, median "
                f"{np.median(e):.2f} deg, < 0.5 deg {np.mean(e < 0.5):.2f}, < 1 deg "
                f"{np.mean(e < 1):.2f}, < 2 deg {np.mean(e < 2):.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
