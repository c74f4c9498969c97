"""The `maisi2` console command: parse, load config, call one library function.

Each command group lives in its own module under maisi2.cli with two functions:
``register(subparsers)`` adds its sub-parser(s) and sets ``func`` on them; heavy imports
(torch, monai) happen inside the command functions so ``maisi2 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from contextlib import contextmanager

from maisi2.errors import Maisi2Error

# Explicit list, in the order `maisi2 --help` shows them.
COMMAND_MODULES = [
    "maisi2.cli.phantom_cmd",
    "maisi2.cli.labels_cmd",
    "maisi2.cli.config_cmd",
    "maisi2.cli.vae_cmd",
    "maisi2.cli.train_flow_cmd",
    "maisi2.cli.controlnet_cmd",
    "maisi2.cli.maskgen_cmd",
    "maisi2.cli.generate_cmd",
    "maisi2.cli.masks_cmd",
    "maisi2.cli.export_cmd",
    "maisi2.cli.evaluate_cmd",
    "maisi2.cli.serve_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maisi2",
        description="MAISI-v2: synthetic 3D CT from segmentation masks (rectified flow + ControlNet).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from maisi2 import __version__

    return f"maisi2 {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _sigterm_stops_cleanly():
            return int(args.func(args) or 0)
    except (Maisi2Error, OSError) as err:
        # What the user can fix: our own errors, and the system's I/O errors (a full disk, a
        # folder without write permission). One clear line, no traceback (MAISI2_DEBUG=1 shows
        # it). Any other exception - a ValueError, KeyError or RuntimeError from inside - is a
        # bug and keeps its traceback.
        if isinstance(err, OSError) and not isinstance(err, Maisi2Error) and err.errno is None:
            raise
        if os.environ.get("MAISI2_DEBUG"):
            raise
        print(f"maisi2 {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """The message of an expected error; an OSError from the system gets its file and what to do."""
    import errno

    if isinstance(err, OSError) and not isinstance(err, Maisi2Error) and err.errno is not None and err.strerror:
        hint = {errno.ENOSPC: "free some space or choose another folder",
                errno.EDQUOT: "free some space or choose another folder",
                errno.EACCES: "check the permissions of the file and its folder",
                errno.EPERM: "check the permissions of the file and its folder",
                errno.EROFS: "choose a folder on a writable file system"}.get(err.errno, "")
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror.lower()}{where}" + (f"; {hint}" if hint else "")
    return str(err)


@contextmanager
def _sigterm_stops_cleanly():
    """Inside, SIGTERM ends the command like Ctrl-C: cleanup runs (no staged files are left), exit 143."""
    import signal

    def stop(number, frame):
        raise SystemExit(128 + number)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (e.g. called from a server): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
