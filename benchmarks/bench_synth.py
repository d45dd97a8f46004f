"""Synthetic map generation speed: temlib's batched renderer vs diffsims pattern by pattern.

Prints patterns/s of
- temlib ``generate_map`` end to end (microstructure, rendering, zarr writing, ground truth), 2 dask threads;
- temlib rendering alone, per core (CPU time);
- the peer: diffsims ``calculate_diffraction2d`` + ``Simulation2D.get_diffraction_pattern`` per pattern
  (the straightforward way to draw a map with the library), on the same machine in the same run.
Median of repeats; the ratio is temlib / diffsims. Run: ``python benchmarks/bench_synth.py [--size 64]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from temlib import crystal, synth


def bench_generate(size: int, repeats: int) -> tuple[float, float]:
    """Median wall-clock patterns/s and patterns per CPU-second (all threads) of generate_map."""
    rates, cpu_rates = [], []
    for k in range(repeats):
        out = Path(tempfile.mkdtemp()) / "m"
        t0, c0 = time.perf_counter(), time.process_time()
        synth.generate_map(
            out, shape=(size, size), n_grains=max(4, size // 4), seed=k, show_progressbar=False
        )
        rates.append(size * size / (time.perf_counter() - t0))
        cpu_rates.append(size * size / (time.process_time() - c0))
        shutil.rmtree(out.parent)
    return float(np.median(rates)), float(np.median(cpu_rates))


def bench_render(repeats: int) -> float:
    rng = np.random.default_rng(0)
    micro = synth.microstructure((64, 64), 20, rng=rng)
    synth.assign_orientations(micro, rng)
    cam = synth.random_camera(rng)
    plan = synth._Plan(micro, cam, synth._center_field((64, 64), cam, rng), 5)
    plan.block(0, 16, 0, 16)  # warm up tables
    ts = []
    for k in range(repeats):
        r, c = 16 * (k % 4), 16 * ((k // 4) % 4)
        t0 = time.process_time()
        plan.block(r, r + 16, c, c + 16)
        ts.append(time.process_time() - t0)
    return 256 / float(np.median(ts))


def bench_diffsims(n: int) -> float:
    from diffsims.generators.simulation_generator import SimulationGenerator
    from orix.quaternion import Rotation

    phase = crystal.get_phase("ferrite")
    gen = SimulationGenerator(200, precession_angle=0.5, minimum_intensity=1e-4)
    q = np.random.default_rng(1).standard_normal((n, 4))
    rot = Rotation(q / np.linalg.norm(q, axis=1, keepdims=True))
    t0 = time.perf_counter()
    for i in range(n):
        sim = gen.calculate_diffraction2d(
            phase,
            rotation=rot[i],
            reciprocal_radius=2.0,
            max_excitation_error=0.03,
            with_direct_beam=True,
        )
        sim.get_diffraction_pattern(shape=(144, 144), sigma=1.2, calibration=0.02)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="scan side of the generated maps")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    synth.generate_map(
        Path(tempfile.mkdtemp()) / "warm", shape=(8, 8), n_grains=2, show_progressbar=False
    )
    gen, gen_cpu = bench_generate(args.size, args.repeats)
    render = bench_render(8)
    peer = bench_diffsims(100)
    load = os.getloadavg()[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nSynthetic 144x144 patterns, {args.size}x{args.size} maps, median of {args.repeats}")
    print(f"{'method':58s} {'patterns/s':>12s} {'vs diffsims':>12s}")
    print(
        f"{'temlib generate_map (render + zarr + truth, 2 threads)':58s} {gen:12.0f} {gen / peer:11.1f}x"
    )
    print(
        f"{'temlib generate_map per CPU-second (all threads)':58s} {gen_cpu:12.0f} {gen_cpu / peer:11.1f}x"
    )
    print(
        f"{'temlib rendering alone, per core (CPU time)':58s} {render:12.0f} {render / peer:11.1f}x"
    )
    print(
        f"{'diffsims calculate_diffraction2d + get_diffraction_pattern':58s} {peer:12.0f} {1:11.1f}x"
    )
    print(
        f"{os.cpu_count()} cores, load average {load:.1f} during the run (wall-clock rates drop when other work shares the cores)"
    )
    print(
        f"peak RSS {rss:.0f} MB (a map is written block by block: memory does not grow with the scan)"
    )


if __name__ == "__main__":
    main()
