"""Project paths: every file temlib reads or writes by default is resolved here.

Notebooks and the command line run from any working directory; they find the
project root through :func:`root` (``$TEMLIB_ROOT``, else the checkout that holds
this package, else the current directory).
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def root() -> Path:
    """The project root: ``$TEMLIB_ROOT`` if set, else the checkout holding temlib."""
    env = os.environ.get("TEMLIB_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    checkout = _PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "params").is_dir():
        return checkout
    return Path.cwd().resolve()


def params_dir() -> Path:
    return root() / "params"


def notebooks_dir() -> Path:
    return root() / "notebooks"


def reports_dir() -> Path:
    return root() / "reports"


def data_dir(kind: str = "") -> Path:
    """``data/`` or one of its folders: ``raw``, ``synthetic``, ``models``, ``external``, ``cache``."""
    valid = ("", "raw", "synthetic", "models", "external", "cache")
    if kind not in valid:
        raise ValueError(f"Unknown data folder {kind!r}; expected one of {valid[1:]}")
    return root() / "data" / kind if kind else root() / "data"


def cache_dir() -> Path:
    """Writable cache for tool settings (ultralytics, numba) inside the project."""
    return root() / ".cache"


def shared_data() -> Path | None:
    """The real datasets folder ``../shared/data`` next to the checkout, or None when absent.

    ``$TEMLIB_SHARED_DATA`` overrides the location.
    """
    env = os.environ.get("TEMLIB_SHARED_DATA")
    candidates = [Path(env)] if env else [root().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None
