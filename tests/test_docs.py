"""The README is a short front door and docs/ is behind it: the two commands come first, every docs/ page is linked
from the README, every relative link (and every docs/ page a config comment names) lands on a file and heading of
the repository, and nothing points to a file outside it."""

import re
from collections import Counter

from conftest import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Files outside the repository the README once cited as contracts; docs/data.md holds the specification now.
OUTSIDE = ("SHAPES.md", "../shared", "/work/shared", "DESIGN.md")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is not a heading, a `[x](y)` in Python not
    a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(page) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to hyphens, a repeated
    heading numbered -1, -2, ..."""
    seen, anchors = Counter(), set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def _broken(source, target: str) -> str | None:
    """Why the relative link ``target`` in ``source`` does not land, or None when it does."""
    path, _, anchor = target.partition("#")
    file = (source.parent / path).resolve() if path else source
    if not file.is_relative_to(ROOT):
        return f"{target} points outside the repository"
    if not file.is_file():
        return f"{target}: no file {file.relative_to(ROOT)}"
    if anchor and file.suffix == ".md" and anchor not in _anchors(file):
        return f"{target}: {file.relative_to(ROOT)} has no heading with anchor #{anchor}"
    return None


def test_the_readme_is_a_short_front_door_with_the_two_commands_first():
    text = README.read_text()
    lines = text.count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines, over {MAX_README_LINES}: move reference material or measurements into a "
        "docs/ page (measured numbers: docs/results.md) and link it")
    first_block = re.search(r"^```.*?\n(.*?)^```", text, re.S | re.M)
    assert first_block is not None, "README.md has no code block: its first one must show `make demo` and `make test`"
    commands = re.findall(r"^make ([\w-]+)\b", first_block[1], re.M)
    assert "demo" in commands and "test" in commands, (
        f"README.md's first code block must hold `make demo` and `make test`, it holds:\n{first_block[1]}")
    assert text.index(first_block[0]) < text.index("\n## "), "README.md's two commands must come before any section"


def test_every_docs_page_is_linked_from_the_readme():
    assert PAGES, "docs/ holds no page"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(_prose(README.read_text()))}
    unlinked = [page.name for page in PAGES if page.resolve() not in linked]
    assert not unlinked, f"docs/ pages the README does not link: {unlinked}; add them to its Documentation table"


def test_every_relative_link_lands_on_a_file_and_heading_of_the_repository():
    broken = []
    for source in [README, *PAGES]:
        for target in LINK.findall(_prose(source.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not a file of ours
                continue
            why = _broken(source, target)
            if why:
                broken.append(f"{source.relative_to(ROOT)}: {why}")
    assert not broken, "links that do not land:\n" + "\n".join(broken)


def test_config_comments_name_docs_pages_that_exist():
    """conf/ comments link measurements to docs/results.md (and the data set to docs/data.md): those must land."""
    broken = []
    for config in sorted((ROOT / "conf").rglob("*.yaml")):
        for target in re.findall(r"\bdocs/[\w./-]+\.md(?:#[\w-]+)?", config.read_text()):
            why = _broken(ROOT / "README.md", target)
            if why:
                broken.append(f"{config.relative_to(ROOT)}: {why}")
    assert not broken, "config comments naming docs that do not exist:\n" + "\n".join(broken)


def test_no_readme_docs_or_config_text_names_a_file_outside_the_repository():
    found = [f"{file.relative_to(ROOT)}: {name}"
             for file in [README, *PAGES, *sorted((ROOT / "conf").rglob("*.yaml"))]
             for name in OUTSIDE if name in file.read_text()]
    assert not found, ("text naming files outside the repository (the shapes specification is docs/data.md; "
                       "write what else is needed into docs/):\n" + "\n".join(found))
