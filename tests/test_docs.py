"""The documentation: docs/ builds with MkDocs in strict mode (any warning, a broken link or anchor included, fails),
README.md and docs/ link only inside the repository (or to the few external homepages listed here), every relative
link of README.md resolves to a file or a heading, the messages that point into the README name a heading it has,
and the Python examples in docs/ run as written."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
EXTERNAL = ("https://github.com/KevinMusgrave/pytorch-metric-learning",)  # well-known projects' homepages only
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def _links(path: pathlib.Path):
    return LINK.findall(FENCE.sub("", path.read_text()))


def _slug(heading: str) -> str:
    """The anchor GitHub (and MkDocs' toc) gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path):
    anchors, seen = set(), {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _require_mkdocs():
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is not installed: it is in requirements-dev.txt, which scripts/env.sh installs")


def test_mkdocs_builds_strict_without_warnings(tmp_path):
    _require_mkdocs()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "WARNING" not in output, output
    for page in PAGES:
        built = tmp_path / "site" / page.relative_to(DOCS).with_suffix("") / "index.html"
        if page.name == "index.md":
            built = tmp_path / "site" / page.relative_to(DOCS).parent / "index.html"
        assert built.exists(), f"{page} was not built (is it in mkdocs.yml's nav?)"


def test_mkdocs_fails_on_a_broken_link(tmp_path):
    """Strict link checking is on: a copy of docs/ with one broken link and one broken anchor fails to build."""
    _require_mkdocs()
    import shutil
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as handle:
        handle.write("\n[gone](no-such-page.md) and [nowhere](backends.md#no-such-heading)\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "no-such-page.md" in output and "no-such-heading" in output, output


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "bench" / "README.md", *PAGES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(path):
    text = path.read_text()
    assert "../shared" not in text and "shared/SPEC.md" not in text, f"{path} points outside the repository"
    for target in _links(path):
        if re.match(r"[a-z]+:", target):
            assert target.startswith(EXTERNAL), f"{path}: external link {target}"
            continue
        file = target.split("#")[0]
        assert not file.startswith("/"), f"{path}: absolute link {target}"
        resolved = (path.parent / file).resolve()
        assert resolved == ROOT or ROOT in resolved.parents, f"{path}: {target} leaves the repository"


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "bench" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_the_readmes_resolves(path):
    links = [t for t in _links(path) if not re.match(r"[a-z]+:", t)]
    for target in links:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md", f"{path.name}: {target}: an anchor into a file that is not markdown"
            assert anchor in _anchors(resolved), f"{path.name}: {target}: no heading with that anchor"


def test_the_readme_links_the_docs():
    targets = {t.split("#")[0] for t in _links(ROOT / "README.md")}
    for page in PAGES:
        assert str(page.relative_to(ROOT)) in targets, f"README.md does not link {page.relative_to(ROOT)}"


def test_messages_that_point_into_the_readme_name_a_heading_it_has():
    headings = {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("#")}
    pointers = []
    for source in (ROOT / "metric_kernels").rglob("*.py"):
        text = source.read_text()
        assert "README's native build section" not in text
        pointers += re.findall(r"see '([^']+)' in README\.md", text)
    assert pointers, "the cuda backend's message points to the README's build section"
    assert all(pointer in headings for pointer in pointers), (pointers, sorted(headings))


DOC_EXAMPLES = [(page, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(),
                                                                         flags=re.S)
                if "import" in code]


@pytest.mark.parametrize("page, code", DOC_EXAMPLES,
                         ids=[f"{p.relative_to(DOCS)}-{i}" for i, (p, _) in enumerate(DOC_EXAMPLES)])
def test_docs_examples_run(page, code):
    exec(compile(code, str(page), "exec"), {})
