"""README and docs/ point at things that exist: links and their anchors, configs, scripts, reports.

The commands README shows are run verbatim by the tests that own them (test_workflows, test_recommend,
test_onboarding, .ci/run); this file keeps the pages' references from rotting as files move."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOP_FOLDERS = "configs|benchmarks|datamodules|lightning_modules|callbacks|tests"
OUTPUTS = Path("benchmarks/results")
REPO_PATH = re.compile(rf"(?<![\w/.-])((?:{TOP_FOLDERS})/[\w./*{{}},<>…-]+)")


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", LINK.sub(r"\1", h).replace("`", "").lower()).replace(" ", "-") for h in headings}


def test_slug_rule_matches_github():
    page = ROOT / "docs" / "workflows.md"
    assert {"wb-logging", "multi-gpu--multi-node-ddp", "one-gpu-mixed-precision"} <= anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_repository_files_exist(page):
    """Every configs/…, benchmarks/…, module path a page names (placeholders and globs aside) is in the tree."""
    missing = set()
    for path in REPO_PATH.findall(page.read_text()):
        path = path.rstrip(".")
        if any(mark in path for mark in "<*{…") or path.endswith("/"):
            continue
        if path.split("/")[:2] == list(OUTPUTS.parts):  # where the documented commands write (git-ignored)
            continue
        if not (ROOT / path).exists():
            missing.add(path)
    assert not missing, f"{page_id(page)} names files that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=page_id)
def test_every_results_table_names_its_report(page):
    """A docs page with a table of measured figures cites the report file under benchmarks/reports/ they come from."""
    text = page.read_text()
    figures = re.findall(r"^\|.*\b0\.\d{3,4}\b.*\|$", text, flags=re.M)
    if figures:
        assert "benchmarks/reports/" in text, f"{page_id(page)} shows figures without naming their report"


def test_readme_links_a_page_for_every_method_row():
    methods = ROOT.joinpath("README.md").read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in methods.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows, "README lost its Methods table"
    for row in rows:
        pages = re.findall(r"\]\((docs/[\w-]+\.md)\)", row)
        assert pages and all((ROOT / p).is_file() for p in pages), row
