"""The README is a guide and docs/ holds the rest (issue 13, item 8): the README stays short, every
relative link and image in README.md and docs/*.md resolves (file, and heading anchor within a
Markdown file), every docs page is reachable from the README, and the README's Python examples
at least compile."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 400

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks (links and headings inside code are not Markdown)."""
    out, in_code = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            in_code = not in_code
            continue
        if not in_code:
            out.append(line)
    return out


def _code_blocks(text: str, language: str) -> list[tuple[int, str]]:
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            if stripped[3:].strip() == language:
                current, start = [], number + 1
            else:
                current, start = False, number     # another language: skip to its closing fence
        elif current is not None and stripped == "```":
            if current is not False:
                blocks.append((start, "\n".join(current)))
            current = None
        elif current:
            current.append(line)
        elif current == []:
            current.append(line)
    return blocks


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            anchors.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return anchors


def _links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(path.read_text(encoding="utf-8")) for m in _LINK.finditer(line)]


def test_readme_is_a_short_guide():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_docs_folder_has_the_pages_the_readme_promises():
    names = {p.name for p in DOCS}
    assert {"architecture.md", "options.md", "algorithm.md", "qk_clip.md", "deepspeed.md", "fsdp.md",
            "launchers.md", "train.md", "kernels.md", "profiling.md", "results.md", "compat.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    """Pins links broken by moving text between README.md and docs/ (a link relative to the
    repository root stops resolving one folder down)."""
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in _links(README)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_readme_python_examples_compile():
    blocks = _code_blocks(README.read_text(encoding="utf-8"), "python")
    assert len(blocks) >= 5     # the first example, then DDP, optimizer-owned, FSDP2, DeepSpeed
    for start, source in blocks:
        compile(source, f"README.md:{start}", "exec")


def test_the_checks_themselves_find_what_they_look_for(tmp_path):
    """The checker's own oracle: a page with one good and two bad links, and a code block whose
    link and heading do not count."""
    (tmp_path / "a.md").write_text("# Title: One (x)\n\n## Sub `code`\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#title-one-x) [ok2](a.md#sub-code) ![img](missing.png) [bad](a.md#nope)\n"
                    "```python\n[not a link](nowhere.md)\n# not a heading\n```\n", encoding="utf-8")
    assert _links(page) == ["a.md#title-one-x", "a.md#sub-code", "missing.png", "a.md#nope"]
    assert _anchors(tmp_path / "a.md") == {"title-one-x", "sub-code"}
    assert _code_blocks(page.read_text(), "python") == [(3, "[not a link](nowhere.md)\n# not a heading")]
