"""The two options every command that reads a datalist takes (not a command group itself)."""

from __future__ import annotations

DATALIST_HELP = "datalist: .jsonl, .csv, or decathlon-style .json ({\"training\": [{\"image\", \"label\"}, ...]})"


def add_datalist_options(p) -> None:
    p.add_argument("--datalist-key", default=None, metavar="KEY",
                   help="which list of a decathlon-style .json datalist to read (default: training)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder the datalist's relative paths start from (default: the datalist's folder)")


def datalist_source(path, args):
    """A `maisi2.data.DatalistSource` for `path` with the command's --datalist-key / --data-root."""
    from pathlib import Path

    from maisi2.data import DatalistSource

    return DatalistSource(Path(path).expanduser(), key=args.datalist_key, data_root=args.data_root)
