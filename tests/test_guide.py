"""docs/guide.md stays true to the CLI: linked from the README, and every `maisi2 ...` command in
its code blocks parses with the real argument parser (so a renamed option breaks this test)."""

import re
import shlex
from pathlib import Path

from maisi2.cli import build_parser

DOCS = Path(__file__).resolve().parents[1]


def _guide_commands() -> list[str]:
    text = (DOCS / "docs" / "guide.md").read_text()
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)
    joined = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.strip() for line in joined if line.strip().startswith("maisi2 ")]


def test_guide_is_linked_from_the_readme():
    assert "(docs/guide.md)" in (DOCS / "README.md").read_text()


def test_every_guide_command_parses():
    commands = _guide_commands()
    assert len(commands) >= 4  # import, generate, encode, train-controlnet
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.func), command
