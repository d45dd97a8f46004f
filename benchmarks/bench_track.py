"""Speed of detection + tracking on 1024 x 1024 in-situ frames (target >= 25 frames/s on 2 cores).

Times ``temlib.track.track_frames`` (grey conversion, YOLO detection, tracking) frame by frame
on a synthetic 1024 px video, median over frames after a warm-up, for each model file of the
in-situ model folder: the exported models (OpenVINO INT8, OpenVINO in the CPU's default
precision, ONNX) against PyTorch ``best.pt`` (the peer, measured in the same run), and for
each tracker of ``--methods`` (default: BoT-SORT, ``temlib track``'s default, and the linker,
the fastest) with the fastest export. A frame's time includes its share of the track
extension run after the last frame (``track_frames``' default ``extend_conf``).
Threads: ``TEMLIB_THREADS`` (default: all cores).
On a shared machine wall times depend on the load, so the process CPU time per frame is
printed too, with the rate it allows when the threads have the cores to themselves.

Usage: python benchmarks/bench_track.py [MODEL_DIR] [--frames N] [--methods botsort linker]
(default MODEL_DIR: data/models/insitu, trained by notebook 07's default profile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from temlib import _runtime, detect, insitu, track


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=str(detect.default_model_dir("insitu")))
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["botsort", "linker"], choices=track.METHODS)
    args = ap.parse_args(argv)
    from pathlib import Path

    folder = Path(args.model_dir)
    files = detect.model_files(folder)
    if not files:
        print(f"no model in {folder}: run notebook 07 (default profile) first", file=sys.stderr)
        return 1
    video = insitu.simulate_video(
        args.frames + args.warmup,
        (1024, 1024),
        nucleation_per_nm2_dpa=0.01,
        with_masks=False,
        rng=0,
    )
    n_true = video.truth.groupby("frame").size().median()
    imgsz = {}

    def measure(kind: str, method: str):
        det = detect.load_detector(files[kind])  # with the folder's metadata (input size...)
        imgsz[kind] = det.imgsz
        timings: list[float] = []
        track.track_frames(
            video.frames[: args.warmup], det, method=method, conf=0.25, progress=False
        )
        cpu0 = time.process_time()
        track.track_frames(
            video.frames[args.warmup :],
            det,
            method=method,
            conf=0.25,
            timings=timings,
            progress=False,
        )
        cpu = (time.process_time() - cpu0) / args.frames
        t = np.array(timings)
        return (
            method,
            kind,
            files[kind].name,
            np.median(t) * 1e3,
            np.percentile(t, 90) * 1e3,
            cpu * 1e3,
        )

    kinds = [k for k in ("openvino_int8", "openvino", "onnx", "pt") if k in files]
    rows = [measure(kind, args.methods[0]) for kind in kinds]
    fastest = min(rows, key=lambda r: r[3])[1]
    rows += [measure(fastest, method) for method in args.methods[1:]]
    nt = _runtime.n_threads()
    print(
        f"detection + tracking, {args.frames} frames 1024x1024 (median {n_true:.0f} defects/frame), "
        f"{nt} threads, imgsz {imgsz[rows[0][1]]}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores (wall times are clean only near load {nt}); CPU: {_runtime.cpu_isa()}"
    )
    peer = next((r for r in rows if r[1] == "pt"), None)
    print(
        f"{'tracker':<10} {'model':<14} {'file':<26} {'median ms':>10} {'p90 ms':>8} {'frames/s':>9} "
        f"{'CPU ms/frame':>13} {'CPU-bound f/s':>14} {'vs pt':>6}"
    )
    for method, kind, name, med, p90, cpu in rows:
        ratio = f"{peer[3] / med:5.1f}x" if peer else "  n/a"
        print(
            f"{method:<10} {kind:<14} {name:<26} {med:10.1f} {p90:8.1f} {1e3 / med:9.1f} "
            f"{cpu:13.1f} {1e3 * nt / cpu:14.1f} {ratio:>6}"
        )
    for method in args.methods:
        mine = [r for r in rows if r[0] == method]
        best, best_cpu = min(r[3] for r in mine), min(r[5] for r in mine)
        print(
            f"{method}: target >= 25 frames/s: wall {'met' if 1e3 / best >= 25 else 'NOT met'} "
            f"({1e3 / best:.1f}); CPU-bound estimate {1e3 * nt / best_cpu:.1f} frames/s "
            f"({nt} threads with the cores to themselves)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
