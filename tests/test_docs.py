"""The documentation stays true to the code: docs/configuration.md is what the config schema
generates, and every relative link in README.md, BENCHMARKS.md and docs/*.md reaches a file (and,
for a Markdown file, a heading) that exists."""

import dataclasses
import re
from pathlib import Path

import pytest

from sora_dist.config import SECTIONS, config_markdown

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
REGENERATE = "python -m sora_dist.config --markdown > docs/configuration.md (or make docs)"


def test_configuration_md_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_markdown(), f"docs/configuration.md is out of date with the config schema: regenerate it with {REGENERATE}"


def test_configuration_md_lists_every_key():
    text = config_markdown()
    for name, cls in SECTIONS.items():
        assert f"## `{name}`" in text
        for field in dataclasses.fields(cls):
            assert f"| `{name}.{field.name}` |" in text, f"{name}.{field.name} is missing from the generated table"


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"(?ms)^(```|~~~).*?^\1[^\n]*$", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^(```|~~~).*?^\1[^\n]*$", "", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code(page.read_text(encoding="utf-8")))


def test_slug_matches_github():
    assert slug("3. The scale of λ") == "3-the-scale-of-λ"
    assert slug("6.2 E2 and E3 (`--quick`)") == "62-e2-and-e3---quick"
    assert slug("The demo, measured") == "the-demo-measured"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_existing_files(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_docs_pages_are_linked_from_the_readme():
    readme_links = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in readme_links]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
