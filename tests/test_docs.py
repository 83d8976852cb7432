"""The documentation holds together: every relative link in README.md, docs/, CONTRIBUTING.md,
CHANGELOG.md and the chart's README reaches an existing file (and heading, for `#anchor` links),
README.md stays an overview of at most 250 lines, and every test docs/reliability.md names as the
proof of a promise exists."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from kubetune.api.reference import anchor

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "charts/kubetune/README.md"]
    + list((ROOT / "docs").glob("*.md"))
)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")  # link text may hold one level of [...]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE.sub("", FENCE.sub("", text))


@cache
def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (repeats get -1, -2, …)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = anchor(match[1].replace("`", ""))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        file, _, fragment = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_check_sees_links_and_anchors() -> None:
    every = [t for doc in DOCS for t in links(doc)]
    assert len(every) > 100 and sum("#" in t for t in every) > 50
    assert "gitops-argo-cd-and-flux" in anchors(ROOT / "docs/operations.md")
    assert "specmethodlora" in anchors(ROOT / "docs/api.md")


def test_readme_is_an_overview() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
    for doc in ("api", "methods", "local", "operations", "openai", "design", "reliability", "testing"):
        assert f"(docs/{doc}.md)" in "\n".join(lines), f"README.md does not link docs/{doc}.md"


def test_reliability_names_tests_that_exist() -> None:
    named = 0
    for line in (ROOT / "docs/reliability.md").read_text().splitlines():
        current = None
        for path, function in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", line):
            current = path or current
            if not (path or function):
                continue
            assert current and (ROOT / current).is_file(), f"{current} does not exist"
            if function:
                assert re.search(rf"^(async )?def {function}\(", (ROOT / current).read_text(), re.M), (
                    f"{current}::{function}"
                )
                named += 1
    assert named > 60
