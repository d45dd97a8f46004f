"""Report runner: execute notebooks with papermill, render HTML with nbconvert.

``temlib reports`` (``make reports``) runs every notebook of ``notebooks/`` in
numeric order on one profile, writes ``reports/<nb>.ipynb`` and
``reports/<nb>.html`` and an index page ``reports/index.html``. A failing notebook
keeps its executed copy (and its HTML, to read the traceback), the run stops
there and the command exits non-zero.
"""

from __future__ import annotations

import dataclasses
import html
import os
import time
from pathlib import Path

from . import config, paths


@dataclasses.dataclass
class Result:
    notebook: str
    ok: bool
    seconds: float
    html: Path | None
    error: str = ""


def available() -> list[str]:
    """Notebook names in ``notebooks/`` in execution order."""
    return sorted(p.stem for p in paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_html(executed: Path, out: Path) -> Path:
    """Render an executed notebook to a standalone HTML page (input code kept)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    _atomic_write_text(out, body)
    return out


def execute(
    notebook: str,
    profile: str = "default",
    parameters: dict | None = None,
    out_dir: Path | str | None = None,
    html_out: bool = True,
) -> Result:
    """Execute one notebook with papermill into ``out_dir`` (default ``reports/``).

    Parameters are validated against the notebook's profile before the kernel starts,
    so a typo fails in a second rather than after the first cells ran.
    """
    import papermill as pm

    parameters = dict(parameters or {})
    config.load(notebook, profile, **parameters)  # validate early: one clear error
    src = paths.notebooks_dir() / f"{notebook}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"No notebook {src}; expected one of {available()}")
    out_dir = Path(out_dir) if out_dir else paths.reports_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{notebook}.ipynb"
    t0 = time.perf_counter()
    error = ""
    try:
        pm.execute_notebook(
            str(src),
            str(executed),
            parameters={"profile": profile, **parameters},
            cwd=str(paths.notebooks_dir()),
            progress_bar=False,
            kernel_name="python3",
        )
        ok = True
    except pm.PapermillExecutionError as e:
        ok = False
        error = f"{e.ename}: {e.evalue}"
    seconds = time.perf_counter() - t0
    page = (
        render_html(executed, out_dir / f"{notebook}.html")
        if html_out and executed.exists()
        else None
    )
    return Result(notebook, ok, seconds, page, error)


def write_index(results: list[Result], profile: str, out_dir: Path) -> Path:
    """Write ``index.html`` linking every report with its status and run time."""
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(r.html.name) if r.html else '#'}'>{html.escape(r.notebook)}</a></td>"
        f"<td style='color:{'green' if r.ok else 'red'}'>{'ok' if r.ok else 'FAILED'}</td>"
        f"<td>{r.seconds:.1f} s</td><td>{html.escape(r.error)}</td></tr>"
        for r in results
    )
    total = sum(r.seconds for r in results)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>temlib reports</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 12px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>temlib reports</h1>
<p>Profile <b>{html.escape(profile)}</b>; {html.escape(config.provenance())}; generated {time.strftime("%Y-%m-%d %H:%M:%S")}; total {total:.0f} s.</p>
<table><tr><th>notebook</th><th>status</th><th>time</th><th>error</th></tr>
{rows}
</table></body></html>"""
    out = out_dir / "index.html"
    _atomic_write_text(out, page)
    return out


def run(
    notebooks: list[str] | None = None,
    profile: str = "default",
    parameters: dict | None = None,
    out_dir: Path | str | None = None,
) -> list[Result]:
    """Execute ``notebooks`` (default: all) in order; stop at the first failure."""
    names = notebooks or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        raise ValueError(f"Unknown notebook {unknown[0]!r}; expected one of {available()}")
    out = Path(out_dir) if out_dir else paths.reports_dir()
    results: list[Result] = []
    for name in names:
        print(f"[temlib reports] {name} (profile {profile}) ...", flush=True)
        r = execute(name, profile, parameters, out)
        results.append(r)
        print(
            f"[temlib reports] {name}: {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s",
            flush=True,
        )
        if not r.ok:
            break
    write_index(results, profile, out)
    return results


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def _cli_reports(parser):
    parser.add_argument(
        "notebooks", nargs="*", help="notebook names, e.g. 04_regression (default: all)"
    )
    parser.add_argument("--profile", default="default", help="default | ci | full")
    parser.add_argument(
        "-p",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override a parameter",
    )
    parser.add_argument("--out", default=None, help="output folder (default: reports/)")

    def run_cli(args):
        params = {k: _parse_value(v) for k, v in args.p}
        names = [Path(n).stem for n in args.notebooks] or None
        results = run(names, args.profile, params, args.out)
        failed = [r for r in results if not r.ok]
        out = Path(args.out) if args.out else paths.reports_dir()
        print(f"[temlib reports] index: {out / 'index.html'}")
        if failed:
            r = failed[0]
            print(
                f"[temlib reports] FAILED: {r.notebook}: {r.error}\n  executed copy kept: {out / (r.notebook + '.ipynb')}"
            )
            return 1
        return 0

    return run_cli
