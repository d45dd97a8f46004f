"""Inference throughput of the phase classifier (patterns/s), batched, on TEMLIB_THREADS cores.

Usage: python benchmarks/bench_classify.py [--threads 2] [--n 2048] [--repeats 3] [--model DIR]

Measures, on raw patterns of the synthetic test map (default profile, else ci), the
median over repeats of:
  preprocessing only (beam finding, resampling, background, polar / Cartesian input),
  the network only (already preprocessed inputs) at batch 1, 32 and 256,
  predict_proba end to end (batch 256), and classify_map streaming the lazy map in blocks
  (reading included).
Ratios are against the network at batch 1 (one pattern at a time) in the same run.
The model is data/models/classifier (trained by notebook 03, default profile); without it an
untrained network of the same size is timed, which says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048, help="patterns timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--model", default=None, help="classifier folder (default data/models/classifier)"
    )
    args = ap.parse_args()
    os.environ["TEMLIB_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import numpy as np

    from temlib import _runtime, classify, synth

    try:
        clf = classify.load_classifier(args.model)
        source = str(classify.default_model_dir() if args.model is None else args.model)
    except FileNotFoundError as e:
        print(
            f"note: {e}\n      timing an untrained network of the search's first architecture instead"
        )
        keras = _runtime.keras()
        prep = classify.Preprocessing()
        inp = keras.Input((prep.size, prep.size, prep.channels))
        h = inp
        for _ in range(3):
            h = keras.layers.Conv2D(16, 3, activation="relu")(h)
            h = keras.layers.MaxPooling2D(2, padding="same")(h)
        out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(h))
        clf = classify.PhaseClassifier(keras.Model(inp, out), ("ferrite", "NbC", "cementite"), prep)
        source = "untrained network"

    profile = (
        "default"
        if (classify.paths.data_dir("synthetic") / "default" / "maps.json").is_file()
        else "ci"
    )
    test = synth.steel_maps(profile, show_progressbar=False)["test"]
    signal = test.load()
    h, w = signal.data.shape[:2]
    rows = min(h, max(1, args.n // w))
    raw = np.asarray(signal.data[:rows].compute()).reshape(-1, *signal.data.shape[2:])[: args.n]
    cal = float(signal.axes_manager.signal_axes[0].scale)
    n = len(raw)
    x = classify.preprocess(raw[:64], cal, clf.preprocessing)  # warm-up
    clf.predict_inputs(x[:32], 32)

    def timed(fn, count):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return count / statistics.median(times)

    x = classify.preprocess(raw, cal, clf.preprocessing)
    one = min(n, 128)
    rows_out = [
        ("preprocessing only", timed(lambda: classify.preprocess(raw, cal, clf.preprocessing), n)),
        (
            "network only, batch 1",
            timed(lambda: [clf.predict_inputs(x[i : i + 1], 1) for i in range(one)], one),
        ),
        ("network only, batch 32", timed(lambda: clf.predict_inputs(x, 32), n)),
        ("network only, batch 256", timed(lambda: clf.predict_inputs(x, 256), n)),
        ("predict_proba end to end, batch 256", timed(lambda: clf.predict_proba(raw, cal, 256), n)),
    ]
    sub = signal.inav[:, :rows]  # the same scan rows, streamed lazily from disk
    rows_out.append(
        (
            "classify_map streaming (chunk 32, reading included)",
            timed(
                lambda: classify.classify_map(sub, clf, chunk=32, show_progressbar=False), rows * w
            ),
        )
    )
    base = rows_out[1][1]
    print(
        f"\nPhase classifier throughput: {source}; {clf.preprocessing.geometry} input "
        f"{clf.preprocessing.size}x{clf.preprocessing.size}x{clf.preprocessing.channels}, "
        f"{clf.model.count_params():,} parameters"
    )
    print(f"{n} raw {raw.shape[1]}x{raw.shape[2]} patterns of data/synthetic/{profile}/test; {args.threads} threads; "
          f"median of {args.repeats}; load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'step':<52} {'patterns/s':>11} {'vs batch 1':>11}")
    for name, rate in rows_out:
        print(f"{name:<52} {rate:>11.0f} {rate / base:>10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
