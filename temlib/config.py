"""Notebook parameters: profile YAML + overrides -> one validated, frozen config.

Each notebook ``NN_name.ipynb`` has a default profile ``params/NN_name.yaml`` that
names every parameter with its default value; the value's type is the parameter's
type. Other profiles (``params/ci/``, ``params/full/``) override a subset of those
keys. Overrides (papermill ``-p key value`` or keyword arguments) come last.
A key not in the default file, or a value of the wrong type, is one clear error.

In a notebook's ``parameters`` cell every parameter but ``profile`` is ``None``,
meaning "take it from the profile"; :func:`from_namespace` reads that cell's
variables after papermill has injected its overrides.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Mapping
from typing import Any

import yaml

from . import paths

PROFILES_DIRS = ("ci", "full")


def _read_yaml(path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"Parameter file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"Parameter file {path} must hold a mapping of key: value, not {type(data).__name__}"
        )
    return data


def profiles() -> list[str]:
    """Profiles that exist: ``default`` plus every folder under ``params/``."""
    found = ["default"]
    pdir = paths.params_dir()
    if pdir.is_dir():
        found += sorted(p.name for p in pdir.iterdir() if p.is_dir())
    return found


def notebooks() -> list[str]:
    """Notebook names that have a default parameter file (``params/<name>.yaml``)."""
    return sorted(p.stem for p in paths.params_dir().glob("*.yaml"))


def defaults(notebook: str) -> dict:
    """The default profile of ``notebook`` (every key it accepts with its default)."""
    path = paths.params_dir() / f"{notebook}.yaml"
    if not path.is_file():
        raise ValueError(f"Unknown notebook {notebook!r}; expected one of {notebooks()}")
    return _read_yaml(path)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check(key: str, value: Any, default: Any, where: str) -> Any:
    """Return ``value`` coerced to the default's type, or raise one clear error."""
    if default is None:  # optional: a path or name the user may give
        if value is None or isinstance(value, str | int | float | list):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list | tuple):
            if default:
                proto = default[0]
                return tuple(_check(f"{key}[{i}]", v, proto, where) for i, v in enumerate(value))
            return tuple(value)
        if isinstance(value, str) and default and isinstance(default[0], str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
    elif isinstance(default, dict):
        if isinstance(value, Mapping):
            return dict(value)
    raise ValueError(
        f"Parameter {key!r} from {where} is {value!r} ({_type_name(value)}); "
        f"expected {_type_name(default)} like the default {default!r}"
    )


@dataclasses.dataclass(frozen=True)
class Params:
    """A frozen, validated parameter set; attribute access, ``as_dict()``."""

    notebook: str
    profile: str
    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "values")
        if name in values:
            return values[name]
        raise AttributeError(
            f"Notebook {self.notebook!r} has no parameter {name!r}; expected one of {sorted(values)}"
        )

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def as_dict(self) -> dict:
        return dict(self.values)

    def __repr__(self) -> str:
        body = "\n".join(f"  {k} = {v!r}" for k, v in self.values.items())
        return f"Params({self.notebook}, profile={self.profile!r})\n{body}"


def load(notebook: str, profile: str = "default", **overrides: Any) -> Params:
    """Resolve the parameters of ``notebook`` for ``profile`` with ``overrides`` on top.

    Parameters
    ----------
    notebook
        Notebook name without extension, e.g. ``"04_regression"``.
    profile
        ``"default"`` (``params/<nb>.yaml``), or a folder of ``params/`` such as ``"ci"``
        or ``"full"`` whose ``<nb>.yaml`` overrides some keys.
    **overrides
        Final values; ``None`` means "keep the profile's value".

    Raises
    ------
    ValueError
        Unknown notebook, profile or key, or a value of the wrong type.
    """
    base = defaults(notebook)
    if profile not in profiles():
        raise ValueError(f"Unknown profile {profile!r}; expected one of {profiles()}")
    merged = dict(base)
    layers: list[tuple[str, Mapping]] = []
    if profile != "default":
        ppath = paths.params_dir() / profile / f"{notebook}.yaml"
        if ppath.is_file():
            layers.append((str(ppath.relative_to(paths.root())), _read_yaml(ppath)))
    layers.append(("the overrides", {k: v for k, v in overrides.items() if v is not None}))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in base:
                raise ValueError(
                    f"Unknown parameter {key!r} in {where} for {notebook}; expected one of {sorted(base)}"
                )
            merged[key] = value
    checked = {k: _check(k, v, base[k], f"profile {profile!r}") for k, v in merged.items()}
    return Params(notebook=notebook, profile=profile, values=checked)


def _injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned in papermill's injected-parameters cell, from IPython's input history."""
    import ast

    history = namespace.get("In")
    if not isinstance(history, list):
        return []
    names: list[str] = []
    for source in history:
        if isinstance(source, str) and source.lstrip().startswith("# Parameters"):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            names = [
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            ]
    return names


def from_namespace(notebook: str, namespace: Mapping[str, Any]) -> Params:
    """Resolve parameters from a notebook's variables (its ``parameters`` cell).

    ``namespace["profile"]`` picks the profile; every other parameter of the notebook
    that is present and not ``None`` overrides it. A name papermill injected that the
    notebook does not know (``-p n_grain 3``) is an error, not a silent no-op.
    """
    keys = defaults(notebook)
    unknown = [n for n in _injected_names(namespace) if n != "profile" and n not in keys]
    if unknown:
        raise ValueError(
            f"Unknown parameter {unknown[0]!r} for {notebook}; expected one of {sorted(keys)}"
        )
    overrides = {k: namespace[k] for k in keys if k in namespace and namespace[k] is not None}
    return load(notebook, namespace.get("profile", "default") or "default", **overrides)


def provenance() -> str:
    """One line naming the temlib version and git commit, for rendered reports."""
    from . import __version__

    try:
        commit = subprocess.run(
            ["git", "-C", str(paths.root()), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(paths.root()), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    commit = (commit or "unknown") + ("+dirty" if dirty else "")
    return f"temlib {__version__}, commit {commit}"


def show(params: Params) -> Params:
    """Print the resolved parameters with provenance (the notebooks' second cell)."""
    print(provenance())
    print(params)
    return params
