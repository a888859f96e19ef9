"""The README and docs/ link to each other: every relative link and #anchor must resolve.

A link is `[text](target)` outside code. Links to http(s) and mailto are not checked, nor are
pure `#anchor` links. For the rest the file part must exist relative to the linking file, and an
`#anchor` into a markdown file must match one of its headings, slugged the way GitHub does.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKDOWN = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]*)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(?P<title>.*?)\s*#*\s*$")


def outside_fences(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a markdown file, fenced code blocks left out."""
    lines, fence = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            lines.append((number, line))
    return lines


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (but - and _), spaces to -."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link keeps its text
    title = re.sub(r"[^\w\- ]", "", title.lower())
    return title.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in outside_fences(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group("title"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code, fenced or inline."""
    found = []
    for number, line in outside_fences(path):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group("target")))
    return found


def relative_links() -> list[pytest.param]:
    params = []
    for path in MARKDOWN:
        for number, target in links(path):
            if re.match(r"(?i)(https?|mailto):", target) or target.startswith("#") or not target:
                continue
            name = f"{path.relative_to(ROOT)}:{number}:{target}"
            params.append(pytest.param(path, target, id=name))
    return params


def own_anchor_links() -> list[pytest.param]:
    params = []
    for path in MARKDOWN:
        for number, target in links(path):
            if target.startswith("#") and len(target) > 1:
                name = f"{path.relative_to(ROOT)}:{number}:{target}"
                params.append(pytest.param(path, target, id=name))
    return params


@pytest.mark.parametrize(("source", "target"), relative_links())
def test_a_relative_link_resolves(source: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    resolved = (source.parent / unquote(file_part)).resolve()
    assert resolved.exists(), f"{source.relative_to(ROOT)} links to {target}: no such file"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), (
            f"{source.relative_to(ROOT)} links to {target}: no heading "
            f"#{anchor} in {resolved.relative_to(ROOT)}"
        )


@pytest.mark.parametrize(("source", "target"), own_anchor_links())
def test_an_anchor_in_the_same_file_resolves(source: Path, target: str) -> None:
    assert target[1:] in anchors(source), (
        f"{source.relative_to(ROOT)} links to {target}: no such heading in the file"
    )


def test_the_readme_stays_short() -> None:
    count = len(README.read_text().splitlines())
    assert count < 350, f"README.md has {count} lines; move details into docs/"


def test_the_readme_has_a_contents_list_into_docs() -> None:
    targets = {target.partition("#")[0] for _, target in links(README)}
    docs = {t for t in targets if t.startswith("docs/") and t.endswith(".md")}
    assert len(docs) >= 6, f"README.md links to only {len(docs)} docs files: {sorted(docs)}"
    assert any(
        HEADING.match(line) and "contents" in line.lower() for _, line in outside_fences(README)
    ), "README.md has no Contents heading"


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_docs_file_is_in_the_contents(path: Path) -> None:
    targets = {target.partition("#")[0] for _, target in links(README)}
    assert f"docs/{path.name}" in targets, f"README.md's contents do not list docs/{path.name}"


def test_the_slugs_follow_github() -> None:
    assert slug("Fault matrix") == "fault-matrix"
    assert slug("Against the ownership issue's goals") == "against-the-ownership-issues-goals"
    assert slug("Fleet rollout: `python -m bench.fleet`") == "fleet-rollout-python--m-benchfleet"
    assert slug("API, tokens and records") == "api-tokens-and-records"
