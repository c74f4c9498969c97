"""`maisi2 config show PRESET [--set a.b=c ...]`: print a resolved config as JSON."""

from __future__ import annotations


def add_config_args(parser) -> None:
    """The --preset/--set pair every command that builds networks accepts."""
    parser.add_argument("--preset", default=None, help="config preset: tiny, small or maisi-v2")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted config override, e.g. --set unet.num_res_blocks=1 (repeatable; value parsed as JSON)",
    )


def register(sub) -> None:
    p = sub.add_parser("config", help="show a preset's resolved configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config as JSON")
    show.add_argument("preset", help="tiny, small or maisi-v2")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=_show)


def _show(args) -> int:
    from maisi2.config import get_config

    print(get_config(args.preset, args.overrides).to_json())
    return 0
