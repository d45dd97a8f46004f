"""`temlib index`: a small synthetic map end to end, resume after an interruption, ml branch, CLI errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from temlib import cli, match, pipeline, synth
from temlib import descriptors as D

ST = D.DescriptorSettings(
    r_min=0.2, r_max=1.25, n_r=32, n_theta=90, excitation_error=0.03, sigma=0.03
)
PHASES = ("ferrite", "NbC")


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps") / "m"
    return synth.generate_map(
        folder, shape=(8, 8), n_grains=3, nbc_particles=20.0, seed=4, show_progressbar=False
    )


@pytest.fixture(scope="module")
def library():
    lib = match.build_library(PHASES, resolution=1.0, kv=200, settings=ST)
    lib.phase_calibration = None
    return lib


def test_index_map_writes_crystal_map(small_map, library, tmp_path):
    out = tmp_path / "res.h5"
    xmap = pipeline.index_map(
        small_map.folder, phases=PHASES, out=out, chunk=4, library=library, show_progressbar=False
    )
    assert xmap.shape == (8, 8)
    assert out.is_file() and out.with_suffix(".ang").is_file()
    assert not out.with_name(out.name + ".parts").exists()
    for k in ("correlation", "reliability", "phase_reliability", "inplane"):
        assert k in xmap.prop
    from orix import io as oio

    back = oio.load(out)
    np.testing.assert_allclose(back.prop["correlation"], xmap.prop["correlation"])
    # ground truth: single-crystal pixels of the main phase are mostly indexed right (modulo the flip)
    truth = small_map.truth()
    e = match.orientation_errors(xmap, truth, mask=truth.prop["weight"] >= 0.999)
    ferrite = e["truth"] == "ferrite"
    assert e["phase_ok"][ferrite & e["scored"]].mean() > 0.8
    assert np.nanmedian(e["modulo_flip"][ferrite]) < 5


def test_refinement_fits_the_relrod_once_and_can_be_switched_off(small_map, library):
    kw = dict(phases=PHASES, chunk=4, library=library, show_progressbar=False)
    plain = pipeline.index_map(small_map.folder, refine=False, **kw)
    refined = pipeline.index_map(small_map.folder, **kw)
    assert plain.indexing_info["excitation_error"] == {}
    plain = match.best_only(plain)
    fit = refined.indexing_info["excitation_error"]
    assert min(match.EXCITATION_ERRORS) <= fit["ferrite"] <= max(match.EXCITATION_ERRORS)
    # same phases; refined orientations move by fractions of the library step, not elsewhere
    refined = match.best_only(refined)
    same = (plain.phase_id == refined.phase_id) & (plain.phase_id == 0)
    moved = match.misorientation_deg(
        plain.rotations.data[same],
        refined.rotations.data[same],
        library.phases[0].symmetry,
        modulo_flip=True,
    )
    assert same.sum() >= 32 and np.median(moved) < 1.5 and (moved > 1e-3).mean() > 0.5


def test_resume_skips_finished_blocks(small_map, library, tmp_path, monkeypatch):
    out = tmp_path / "res.h5"
    calls = []
    real = pipeline.index_patterns

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "index_patterns", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.index_map(
            small_map.folder,
            phases=PHASES,
            out=out,
            chunk=4,
            library=library,
            show_progressbar=False,
        )
    parts = out.with_name(out.name + ".parts")
    assert len(list(parts.glob("block_*.npz"))) == 2 and not out.exists()

    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "index_patterns", counting)
    xmap = pipeline.index_map(
        small_map.folder, phases=PHASES, out=out, chunk=4, library=library, show_progressbar=False
    )
    assert len(counted) == 2  # 4 blocks, 2 already done
    assert out.is_file() and xmap.size == 64
    ref = pipeline.index_map(
        small_map.folder, phases=PHASES, chunk=4, library=library, show_progressbar=False
    )
    np.testing.assert_allclose(ref.prop["correlation"], xmap.prop["correlation"], rtol=1e-5)


def test_ml_uses_the_classifier_phase(small_map, library):
    class FakeClassifier:
        phases = ["ferrite", "NbC"]

        def predict_proba(self, patterns, calibration):
            p = np.zeros((len(patterns), 2))
            p[:, 1] = 0.9  # everything NbC
            p[:, 0] = 0.1
            return p

    xmap = pipeline.index_map(
        small_map.folder,
        method="ml",
        models=FakeClassifier(),
        chunk=8,
        library=library,
        show_progressbar=False,
    )
    names = {i: ph.name for i, ph in xmap.phases if i >= 0}
    assert {names[i] for i in np.unique(xmap.phase_id)} == {"NbC"}
    np.testing.assert_allclose(xmap.prop["phase_reliability"], 100 * (1 - 0.1 / 0.9))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "svm"], "Unknown method 'svm'; expected one of 'tm', 'ml', 'hybrid'"),
        (["--method", "hybrid"], "needs the trained orientation regression models"),
        (["--phases", "ferrite,austenite"], "Unknown phase 'austenite'"),
        (["--resolution", "0"], "Resolution 0.0 deg is out of range"),
    ],
)
def test_cli_bad_arguments(small_map, tmp_path, capsys, monkeypatch, args, message):
    from temlib import regress

    monkeypatch.setattr(
        regress, "has_regressors", lambda *a, **k: False
    )  # hybrid: no trained regressors
    rc = cli.main(["index", str(small_map.folder), "--out", str(tmp_path / "r.h5"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_bad_files(tmp_path, capsys, small_map):
    assert cli.main(["index", str(tmp_path / "missing.zspy"), "--out", str(tmp_path / "r.h5")]) == 2
    assert "No map file" in capsys.readouterr().err
    empty = tmp_path / "empty.hspy"
    empty.write_bytes(b"")
    assert cli.main(["index", str(empty), "--out", str(tmp_path / "r.h5")]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli.main(["index", str(small_map.folder), "--out", str(tmp_path / "r.txt")]) == 2
    assert "must end in .h5" in capsys.readouterr().err


def test_cli_index_runs(small_map, tmp_path, capsys, monkeypatch, library):
    monkeypatch.setattr(match, "build_library", lambda *a, **k: library)
    rc = cli.main(
        [
            "index",
            str(small_map.folder),
            "--out",
            str(tmp_path / "r.h5"),
            "--phases",
            "ferrite,NbC",
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "indexed 64 patterns" in out and (tmp_path / "r.ang").is_file()
    assert "relrod half-widths fitted on the map: ferrite 0.0" in out
    rc = cli.main(
        ["index", str(small_map.folder), "--out", str(tmp_path / "p.h5"), "--phases", "ferrite,NbC"]
        + ["--quiet", "--no-refine"]
    )
    assert rc == 0 and "relrod" not in capsys.readouterr().out


def test_split_apply_runs_parts_in_threads_and_keeps_order():
    import threading

    from temlib import _runtime

    x = np.arange(1000, dtype=float)
    seen = set()
    both = threading.Barrier(2, timeout=10)  # passes only if the two parts run at the same time

    def f(a, b):
        seen.add(threading.get_ident())
        both.wait()
        return a * 2, (a + b)[:, None]

    two, s = _runtime.split_apply(f, x, -x, workers=2, min_part=100)
    np.testing.assert_array_equal(two, 2 * x)
    assert s.shape == (1000, 1) and not s.any()
    assert len(seen) == 2  # two parts, two threads
    # too few patterns for two parts: one call
    np.testing.assert_array_equal(
        _runtime.split_apply(lambda a: a + 1, x[:150], workers=2, min_part=100), x[:150] + 1
    )


def test_split_apply_holds_blas_at_one_thread_in_parts():
    from threadpoolctl import threadpool_info

    from temlib import _runtime

    def blas_threads(a):
        n = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        return np.full(len(a), max(n, default=1))

    x = np.zeros(1000)
    for _ in range(2):  # the controller is reused on the second call
        assert (_runtime.split_apply(blas_threads, x, workers=2, min_part=100) == 1).all()


def test_split_apply_nested_runs_serially():
    import threading

    from temlib import _runtime

    x = np.arange(1000, dtype=float)
    outer = set()

    def inner(a):
        outer.add(threading.get_ident())
        return a

    def f(a):
        return _runtime.split_apply(inner, a, workers=2, min_part=10)  # nested: no new threads

    np.testing.assert_array_equal(_runtime.split_apply(f, x, workers=2, min_part=100), x)
    assert len(outer) <= 2


def test_keras_then_torch_compiler_in_one_process():
    """TensorFlow loaded through temlib, then triton (ultralytics' training imports it via
    torch._inductor): both LLVM copies load, the process does not abort."""
    pytest.importorskip("triton")
    code = (
        "from temlib import _runtime\n"
        "keras = _runtime.keras()\n"
        "keras.ops.ones(2)\n"
        "import torch\n"
        "torch.use_deterministic_algorithms(True)\n"  # imports torch._inductor, hence triton
        "print('both loaded')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "both loaded" in r.stdout
