"""Every figure in the docs is made by a command the docs name beside it (issue #26, reproducibility).

Rules, over README.md and docs/*.md:
- every image reference `![...](PATH)` points at a file that exists;
- every file in docs/img is named, by its file name, in README.md or docs/*.md other than the session
  notes (a glob such as `docs/img/exp_*.png` does not count: it would hide a stale file);
- within FOLLOW lines after a figure (or a run of figures on consecutive lines) there is a command:
  an inline `python ...`, `maisi2 ...` or `bash recipes/...` (environment settings such as
  `OMP_NUM_THREADS=1` in front allowed), a fenced code block, or a pointer ("the command above",
  "the second command above") to a fenced block holding a `python`/`maisi2` command earlier in the
  same section.
Plain text only: no imports of the package, so it runs in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMG = REPO / "docs" / "img"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOTES = REPO / "docs" / "notes.md"  # how we got here; what it names does not make a figure current

FOLLOW = 4
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
INLINE_COMMAND = re.compile(r"`(?:[A-Z][A-Z0-9_]*=\S+\s+)*(?:nice\s+)?(?:python3?|maisi2|bash recipes/)\s*\S[^`]*`?")
POINTER = re.compile(r"\bcommands? above\b")
FENCE = re.compile(r"^\s*```")
FENCED_COMMAND = re.compile(r"^\s*(?:[A-Z][A-Z0-9_]*=\S+\s+)*(?:nice\s+)?(?:python3?|maisi2|bash recipes/)\s")
PNG_NAME = re.compile(r"[\w-]+\.png")
# Figures committed before the doc that shows them names them: list them here in the meantime
# (test_the_awaited_names_are_still_missing fails once a doc names one, as a reminder to delete it).
AWAITING_MODEL_CARD: set[str] = set()  # figures a doc is about to name (none now)


def _lines_outside_fences(lines: list[str]) -> list[bool]:
    """For each line, whether it is prose (True) or inside / delimiting a fenced code block."""
    prose, inside = [], False
    for line in lines:
        if FENCE.match(line):
            prose.append(False)
            inside = not inside
        else:
            prose.append(not inside)
    return prose


def figures_without_command(text: str) -> list[str]:
    """The image references of a markdown text that no command follows (rule 3 above)."""
    lines = text.splitlines()
    prose = _lines_outside_fences(lines)
    section_start, offenders, k = 0, [], 0
    while k < len(lines):
        if prose[k] and lines[k].startswith("#"):
            section_start = k
        if not (prose[k] and IMAGE.search(lines[k])):
            k += 1
            continue
        first = k
        while k + 1 < len(lines) and prose[k + 1] and IMAGE.search(lines[k + 1]):
            k += 1
        after = lines[k + 1:k + 1 + FOLLOW]
        commands_above = any(not prose[j] and FENCED_COMMAND.match(lines[j]) for j in range(section_start, first))
        ok = any(FENCE.match(line) or INLINE_COMMAND.search(line) for line in after) or (
            commands_above and any(POINTER.search(line) for line in after))
        if not ok:
            offenders += IMAGE.findall("\n".join(lines[first:k + 1]))
        k += 1
    return offenders


def image_references(doc: Path) -> list[Path]:
    return [(doc.parent / target).resolve() for target in IMAGE.findall(doc.read_text())]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_image_reference_points_at_a_file(doc):
    missing = [str(p.relative_to(REPO)) for p in image_references(doc) if not p.is_file()]
    assert not missing, f"{doc.name} shows images that do not exist: {missing}"


def named_in_docs() -> set[str]:
    return {name for doc in DOCS if doc != NOTES for name in PNG_NAME.findall(doc.read_text())}


def test_every_file_in_docs_img_is_referenced():
    names = named_in_docs() | AWAITING_MODEL_CARD
    unreferenced = [p.name for p in sorted(IMG.iterdir()) if p.name not in names]
    assert not unreferenced, f"docs/img files that no doc names (delete them or show them): {unreferenced}"


def test_the_awaited_names_are_still_missing():
    named = AWAITING_MODEL_CARD & named_in_docs()
    assert not named, f"the docs name these now: remove them from AWAITING_MODEL_CARD: {sorted(named)}"
    assert AWAITING_MODEL_CARD <= {p.name for p in IMG.iterdir()}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_figure_names_the_command_that_made_it(doc):
    offenders = figures_without_command(doc.read_text())
    assert not offenders, (f"{doc.name}: figures with no command within {FOLLOW} lines after them (an inline "
                           f"`python ...`/`maisi2 ...`, a code block, or 'the command above'): {offenders}")


def test_the_rule_tells_a_named_command_from_a_bare_figure():
    block = "## A\n\n```\npython experiments/x.py --report docs/img/a.png\n```\n\n"
    assert figures_without_command(block + "![a](img/a.png)\n*Written by the command above.*\n") == []
    assert figures_without_command("![a](img/a.png)\n(`OMP_NUM_THREADS=1 python experiments/x.py`)\n") == []
    assert figures_without_command("![a](img/a.png)\n![b](img/b.png)\n\nsome prose\n") == ["img/a.png", "img/b.png"]
    # a pointer needs a command above it in the same section, and must come soon after the figure
    assert figures_without_command("## A\n\n![a](img/a.png)\nthe command above\n") == ["img/a.png"]
    assert figures_without_command(block + "## B\n\n![a](img/a.png)\nthe command above\n") == ["img/a.png"]
    assert figures_without_command(block + "![a](img/a.png)\n\n1\n2\n3\nthe command above\n") == ["img/a.png"]
    # an image inside a code block is not a figure
    assert figures_without_command("```\n![a](img/a.png)\n```\n") == []
