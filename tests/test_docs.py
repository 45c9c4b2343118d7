"""The README and docs/ against the tree: result paths exist, every result is cited, links resolve,
the README stays short, and its install and test commands are the ones CI runs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
README_MAX_LINES = 250

pytestmark = pytest.mark.quick


def _pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
_RESULTS_PATH = re.compile(r"benchmarks/results(?:/[A-Za-z0-9_.{},*-]+)*/?")


def _expand(path: str) -> list[str]:
    """``a_{0,1}.jsonl`` -> ``a_0.jsonl``, ``a_1.jsonl`` (shell brace expansion, one level per group)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    fixed, choices = parts[0::2], [p.split(",") for p in parts[1::2]]
    return ["".join(itertools.chain.from_iterable(zip(fixed, c + ("",)))) for c in itertools.product(*choices)]


def _links(page: Path) -> list[tuple[str, Path]]:
    """(target as written, resolved path) of every relative link of ``page`` (anchors dropped)."""
    out = []
    for target in _LINK.findall(_text(page)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # http(s):, mailto:, or an anchor in the same page
        out.append((target, (page.parent / target.split("#")[0]).resolve()))
    return out


def _result_refs(page: Path) -> list[tuple[str, Path]]:
    """(reference as written, resolved path) of every path under benchmarks/results that ``page``
    names: relative links into it, and paths written out from the repository root."""
    refs = [(t, p) for t, p in _links(page) if p == RESULTS or RESULTS in p.parents]
    text = _LINK.sub(" ", _text(page))  # link targets are resolved above, relative to the page
    for written in _RESULTS_PATH.findall(text):
        for path in _expand(written.rstrip(".,")):
            if "*" not in path:
                refs.append((written, (ROOT / path).resolve()))
    return refs


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_result_paths_exist(page):
    missing = sorted({written for written, path in _result_refs(page) if not path.exists()})
    assert not missing, f"{page.name} names results that do not exist: {missing}"


def test_every_result_is_cited():
    cited = {path for page in _pages() for _, path in _result_refs(page)}
    uncited = []
    for path in sorted(RESULTS.rglob("*")):
        if path == RESULTS / "README.md" or path.is_dir():
            continue
        chain = [path, *path.relative_to(RESULTS).parents]  # the file, then its folders up to results/
        folders = [RESULTS / p for p in chain[1:] if str(p) != "."]
        if path not in cited and not any(f in cited for f in folders):
            uncited.append(str(path.relative_to(RESULTS)))
    assert not uncited, (
        "files under benchmarks/results/ that neither README.md nor docs/*.md cite (cite the file or "
        f"its run's folder, or remove it): {uncited}"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    heading = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(page), flags=re.S)  # no headings inside code blocks
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    bad = []
    for target, path in _links(page):
        if not path.exists():
            bad.append(target)
        elif "#" in target and path.suffix == ".md" and target.split("#", 1)[1] not in _anchors(path):
            bad.append(target)
    for anchor in re.findall(r"\]\(#([^)\s]+)\)", _text(page)):
        if anchor not in _anchors(page):
            bad.append("#" + anchor)
    assert not bad, f"{page.name} has links that do not resolve: {bad}"


def test_readme_is_short():
    n = len(_text(README).splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it to {README_MAX_LINES} (details go to docs/)"


def test_readme_commands_are_the_ones_ci_runs():
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*README:\s*(\w+)", line)
        if m:
            nxt = next(l.strip() for l in lines[i + 1:] if l.strip() and not l.strip().startswith("#"))
            commands[m.group(1)] = nxt
    assert {"install", "test"} <= commands.keys(), f".ci/run lost its '# README: install/test' markers: {commands}"
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", _text(README), flags=re.S)
    block_lines = {l.strip() for b in blocks for l in b.splitlines()}
    for what, cmd in commands.items():
        assert cmd in block_lines, f"README.md's code blocks lack the {what} command that .ci/run runs: {cmd!r}"
