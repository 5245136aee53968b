"""The documentation's links lead somewhere: every relative link in README.md and docs/ names a file of the
repository and, after '#', a heading of that file (GitHub's anchor rule: lower case, spaces to hyphens,
punctuation other than '-' and '_' dropped)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_anchor_rule() -> None:
    assert anchor("Measuring the kernels (`bench/kernel_report.py`)") == "measuring-the-kernels-benchkernel_reportpy"
    assert anchor("GPU design targets (targets, not measured results)") == \
        "gpu-design-targets-targets-not-measured-results"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO)}: {', '.join(broken)}"
