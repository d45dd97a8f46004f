"""Speed of the cavity generator: labelled 1024x1024 images per second (target >= 20 on 2 cores).

Prints a table (median over repeats) of:

- ``generate_image`` in one process (image + labels in memory), patch propagation;
- the same imaging by full-frame FFT propagation (the peer: what the patch method avoids);
- ``generate_dataset`` writing PNG + YOLO txt + mask + tables, 1 and 2 worker processes.

Wall-clock rates depend on what else runs on the machine; the table also gives the CPU
time per image (this process and its workers) and the rate that CPU time allows on 2
idle cores (``2 / cpu_s``), with the load average at the start.

Usage: ``python benchmarks/bench_cavity.py [--n 40] [--repeats 3]``
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
import scipy.fft as sfft

from temlib import cavity as cv


def full_frame_intensity(cavities, shape, px_nm, optics):
    """Peer: the whole frame's wave propagated by one 2D FFT (no patches)."""
    M, N = shape
    yy, xx = np.mgrid[0:M, 0:N].astype(np.float64) + 0.5
    t = np.zeros(shape)
    for c in cavities:
        t += c.chord((yy - c.row) * px_nm, (xx - c.col) * px_nm)
    wave = np.exp(t / (2 * optics.absorption_nm) - 1j * optics.sigma * optics.v0 * t)
    H = cv.transfer_function(
        shape, px_nm, optics.df_nm, optics.cs_mm, optics.alpha_mrad, optics.focal_spread_nm
    )
    return np.abs(sfft.ifft2(sfft.fft2(wave, workers=2) * H, workers=2)) ** 2 - 1


def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def median_time(fn, repeats, cpu_out=None):
    """Median wall seconds of ``fn()``; the median CPU seconds go to ``cpu_out`` (a list)."""
    times, cpus = [], []
    for _ in range(repeats):
        c0, t0 = _cpu(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
    if cpu_out is not None:
        cpu_out.append(float(np.median(cpus)))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="images per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = cv.GeneratorConfig(size=1024)
    cv.generate_image(0, cfg)  # warm caches

    load = os.getloadavg()[0]
    rows = []  # (what, images/s wall, CPU s per image or None)
    cpu = []
    t = median_time(lambda: [cv.generate_image(i, cfg) for i in range(args.n)], args.repeats, cpu)
    rows.append(("generate_image, 1 process (in memory)", args.n / t, cpu[-1] / args.n))

    rng = np.random.default_rng(0)
    px = 0.6
    cavs = cv.place_cavities(rng, 25, (1024, 1024), px, cfg)
    opt = cv.Optics(df_nm=-1000)
    k = max(2, args.n // 8)
    t_patch = (
        median_time(
            lambda: [cv.cavity_intensity(cavs, (1024, 1024), px, opt) for _ in range(k)],
            args.repeats,
            cpu,
        )
        / k
    )
    rows.append(("cavity imaging, 25 cavities, patches", 1 / t_patch, cpu[-1] / k))
    t_full = (
        median_time(
            lambda: [full_frame_intensity(cavs, (1024, 1024), px, opt) for _ in range(k)],
            args.repeats,
            cpu,
        )
        / k
    )
    rows.append(("cavity imaging, 25 cavities, full-frame FFT (peer)", 1 / t_full, cpu[-1] / k))

    for workers in (1, 2):
        tmp = Path(tempfile.mkdtemp())

        def run(workers=workers, tmp=tmp):
            cv.generate_dataset(args.n, tmp / "out", cfg, rng=1, workers=workers, progress=False)

        t = median_time(run, args.repeats, cpu)
        shutil.rmtree(tmp, ignore_errors=True)
        rows.append(
            (f"generate_dataset to disk, {workers} worker(s)", args.n / t, cpu[-1] / args.n)
        )

    width = max(len(r[0]) for r in rows)
    print(f"load average at start: {load:.1f} (2 cores)")
    print(f"{'what (1024 x 1024 px)':<{width}}  images/s  CPU ms/image  2 idle cores /s")
    for name, rate, c in rows:
        print(f"{name:<{width}}  {rate:8.1f}  {1e3 * c:12.0f}  {2 / c:15.1f}")
    print(f"patch / full-frame speed-up of the imaging step: {t_full / t_patch:.1f}x")
    print("target: >= 20 labelled images/s with 2 workers on 2 cores")


if __name__ == "__main__":
    main()
