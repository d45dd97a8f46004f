"""The ``temlib`` command line (also ``python -m temlib``).

Each subcommand lives in the module of its pipeline step and is imported only
when it runs, so ``temlib info`` does not pay for TensorFlow or torch. A module
offers a command ``foo-bar`` through a function ``_cli_foo_bar(parser)`` that adds
the command's arguments to ``parser`` and returns the function that runs it.

A user mistake (bad path, bad value, unreadable file) prints one line and exits
with status 2; set ``TEMLIB_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line help). Add a line here to add a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth-map": (
        "temlib.synth",
        "generate a synthetic steel scanned-diffraction map with its ground truth",
    ),
    "info": ("temlib.io", "describe a 4D map: shape, calibration, beam energy, phases if labelled"),
    "index": (
        "temlib.pipeline",
        "index a 4D map (phase + orientation per pattern) -> orix .h5/.ang; resumable",
    ),
    "classify": (
        "temlib.classify",
        "phase of every pattern of a 4D map with the trained classifier (streamed)",
    ),
    "cavity": (
        "temlib.cavity",
        "physics-based synthetic BF-TEM cavity images with labels: cavity generate --n N --out DIR",
    ),
    "detect": (
        "temlib.detect",
        "detect defects (cavities, loops) in a folder of images with a trained YOLO model",
    ),
    "track": (
        "temlib.track",
        "detect and track defects in an in-situ video or folder of frames (--watch: live)",
    ),
    "reports": ("temlib.reports", "execute notebooks with papermill and render HTML reports"),
}

USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: temlib COMMAND [options]   (temlib COMMAND -h for a command's options)",
        "",
        "commands:",
    ]
    lines += [f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"temlib {__version__}")
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        print(
            f"temlib: error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module_name, help_text = COMMANDS[cmd]
    parser = argparse.ArgumentParser(prog=f"temlib {cmd}", description=help_text)
    module = importlib.import_module(module_name)
    runner = getattr(module, "_cli_" + cmd.replace("-", "_"))(parser)
    args = parser.parse_args(argv[1:])
    try:
        result = runner(args)
    except USER_ERRORS as e:
        if os.environ.get("TEMLIB_DEBUG"):
            raise
        msg = (
            str(e)
            if not isinstance(e, OSError) or not e.filename
            else f"{e.strerror}: {e.filename}"
        )
        print(f"temlib {cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"temlib {cmd}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
