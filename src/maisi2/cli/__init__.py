"""The `maisi2` console command: parse, load config, call one library function.

Each command group lives in its own module under maisi2.cli with two functions:
``register(subparsers)`` adds its sub-parser(s) and sets ``func`` on them; heavy imports
(torch, monai) happen inside the command functions so ``maisi2 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        # Expected user errors: one clear line, no traceback. Set MAISI2_DEBUG=1 for the trace.
        import os

        if os.environ.get("MAISI2_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"maisi2 {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
