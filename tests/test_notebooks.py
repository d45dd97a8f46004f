"""Smoke tests: every notebook executes headless on params/ci and shows figures."""

from __future__ import annotations

import json

import pytest

from temlib import reports

NOTEBOOKS = reports.available()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_ci_profile(name, tmp_path):
    result = reports.execute(name, profile="ci", out_dir=tmp_path)
    assert result.ok, (
        f"{name} failed: {result.error} (executed copy: {tmp_path / (name + '.ipynb')})"
    )
    nb = json.loads((tmp_path / f"{name}.ipynb").read_text())
    images = sum(
        1
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    )
    assert images >= 1, f"{name} shows no figure"
    assert (tmp_path / f"{name}.html").stat().st_size > 10_000


def test_notebooks_are_committed_clean():
    from temlib import paths

    for p in paths.notebooks_dir().glob("*.ipynb"):
        nb = json.loads(p.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and "parameters" in code[0].get("metadata", {}).get("tags", []), (
            f"{p.name}: first code cell must be tagged 'parameters'"
        )
        assert all(not c.get("outputs") and not c.get("execution_count") for c in code), (
            f"{p.name} has outputs"
        )
