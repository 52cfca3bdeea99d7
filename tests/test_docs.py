"""The documentation's links, cited tests and rendered docstrings are current.

Pure text: nothing here imports TensorFlow or keras_bn, so these tests take
well under a second. The docstrings that `docs/math.md` renders are read with
`ast`. After editing one of them, rewrite the page's copies with

    python tests/test_docs.py --update
"""

import ast
import configparser
import fnmatch
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MATH_PAGE = DOCS / "math.md"


def markdown_files():
    """README.md, every page in docs/ and examples/README.md (if present)."""
    files = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    examples_readme = ROOT / "examples" / "README.md"
    if examples_readme.exists():
        files.append(examples_readme)
    return files


def _ids(files):
    return [str(f.relative_to(ROOT)) for f in files]


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def lines_outside_fences(text):
    """The lines of `text`, with None for each line of a fenced code block."""
    fence = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            yield line
            continue
        yield None


def prose(text):
    """`text` without fenced code blocks and inline code spans."""
    lines = [line or "" for line in lines_outside_fences(text)]
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", "\n".join(lines))


def without_code_blocks(text):
    """`text` without fenced code blocks (inline code kept)."""
    return "\n".join(line for line in lines_outside_fences(text) if line is not None)


INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*(?:href|src)=\"([^\"]+)\"", re.I)


def links(text):
    """Every link target in the prose of a Markdown text."""
    body = prose(text)
    return [
        m.group(1)
        for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK)
        for m in pattern.finditer(body)
    ]


def github_anchor(heading):
    """The anchor GitHub gives a heading (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of every heading in a Markdown file, de-duplicated as on GitHub."""
    seen = {}
    result = set()
    for line in without_code_blocks(path.read_text()).splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def is_external(target):
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None


@pytest.mark.parametrize("path", markdown_files(), ids=_ids(markdown_files()))
def test_every_relative_link_resolves(path):
    broken = []
    for target in links(path.read_text()):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target}: no such file or directory")
            continue
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


TEST_ID = re.compile(r"(tests/[\w/]+\.py)((?:::[\w*]+)+)(\[[^\]\s]*\])?")


def defined_tests(test_file):
    """`name` and `Class::name` of every test function in a test file."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    names = set()
    for node in ast.parse(test_file.read_text()).body:
        if isinstance(node, functions) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, functions) and item.name.startswith("test")
            )
    return names


@pytest.mark.parametrize("path", markdown_files(), ids=_ids(markdown_files()))
def test_every_cited_test_exists(path):
    text = path.read_text()
    missing = []
    for match in TEST_ID.finditer(text):
        test_file = ROOT / match.group(1)
        name = match.group(2)[2:]
        if not test_file.exists():
            missing.append(f"{match.group(0)}: no file {match.group(1)}")
            continue
        if not fnmatch.filter(defined_tests(test_file), name):
            missing.append(f"{match.group(0)}: no test {name} in {match.group(1)}")
    # A test cited without its file (`::test_x`) cannot be checked: refuse it.
    for match in re.finditer(r"(?<![\w.\]])::test\w*", text):
        missing.append(f"{match.group(0)}: cite tests as tests/test_x.py::test_name")
    assert not missing, f"{path.relative_to(ROOT)}:\n" + "\n".join(missing)


def test_every_docs_page_is_linked_from_the_readme_or_another_page():
    linked = set()
    for path in markdown_files():
        for target in links(path.read_text()):
            if not is_external(target):
                file_part = target.partition("#")[0]
                if file_part:
                    linked.add((path.parent / file_part).resolve())
    orphans = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not orphans, f"docs pages no page links to: {orphans}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 230, f"README.md has {len(lines)} lines; move details to docs/"


# --- docstrings rendered in docs/math.md -----------------------------------

DOCSTRING_BLOCK = re.compile(
    r"<!-- docstring: (?P<source>\S+) -->\n(?P<body>.*?)<!-- /docstring -->\n",
    re.S,
)


def docstring_of(source):
    """A docstring, by `path.py` (the module's) or `path.py::name`.

    A function's or class's docstring is cut before its `Args:` section: the
    page renders the math, the reference stays in the source.
    """
    path, _, name = source.partition("::")
    tree = ast.parse((ROOT / path).read_text())
    if not name:
        doc = ast.get_docstring(tree)
    else:
        nodes = [
            n
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name
        ]
        if not nodes:
            raise LookupError(f"no function or class {name} in {path}")
        doc = ast.get_docstring(nodes[0])
        doc = re.split(r"^(?:Args|Arguments|Returns|Raises):\s*$", doc, flags=re.M)[0]
    if doc is None:
        raise LookupError(f"{source} has no docstring")
    return doc.strip()


def rendered_block(source):
    path, _, name = source.partition("::")
    whose = f"`{name}`" if name else "the module"
    return (
        f"<!-- docstring: {source} -->\n"
        f"From the docstring of {whose} in [`{path}`](../{path}):\n\n"
        f"````text\n{docstring_of(source)}\n````\n"
        "<!-- /docstring -->\n"
    )


def render_math_page(text):
    return DOCSTRING_BLOCK.sub(lambda m: rendered_block(m.group("source")), text)


def test_math_page_renders_the_current_docstrings():
    text = MATH_PAGE.read_text()
    blocks = DOCSTRING_BLOCK.findall(text)
    assert blocks, "docs/math.md renders no docstring"
    stale = [
        m.group("source")
        for m in DOCSTRING_BLOCK.finditer(text)
        if m.group(0) != rendered_block(m.group("source"))
    ]
    assert not stale, (
        f"docs/math.md holds stale copies of {stale}; rewrite them with "
        "`python tests/test_docs.py --update`"
    )


# --- packaging and CI ------------------------------------------------------


def setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def requirement_floor(requirements, package):
    for line in requirements.split("\n"):
        match = re.fullmatch(rf"\s*{package}\s*>=\s*([\d.]+)\s*", line)
        if match:
            return match.group(1)
    raise LookupError(f"no floor for {package} in install_requires")


def test_readme_states_the_tested_floors_that_setup_cfg_declares():
    config = setup_cfg()
    python = re.fullmatch(r">=\s*([\d.]+)", config["options"]["python_requires"])
    requires = config["options"]["install_requires"]
    floors = {
        "Python": python.group(1),
        "TensorFlow": requirement_floor(requires, "tensorflow"),
        "Keras": requirement_floor(requires, "keras"),
    }
    readme = (ROOT / "README.md").read_text()
    tested_on = re.search(r"[Tt]ested on ([^.\n]*(?:\.\d+[^.\n]*)*)", readme)
    assert tested_on, "README.md says nowhere what it is tested on"
    for name, version in floors.items():
        assert f"{name} {version}" in tested_on.group(1), (
            f"README.md's 'tested on' ({tested_on.group(1)!r}) lacks "
            f"{name} {version}, the floor setup.cfg declares"
        )
    classifiers = config["metadata"]["classifiers"]
    assert f"Programming Language :: Python :: {floors['Python']}" in classifiers


def ci_script():
    return (ROOT / ".ci" / "run").read_text()


def ruff_pins():
    pins = {}
    pre_commit = (ROOT / ".pre-commit-config.yaml").read_text()
    match = re.search(
        r"repo: https://github.com/astral-sh/ruff-pre-commit\s+rev: v([\d.]+)",
        pre_commit,
    )
    pins[".pre-commit-config.yaml"] = match and match.group(1)
    extras = setup_cfg()["options.extras_require"]
    for extra in ("dev", "test"):
        match = re.search(r"^ruff==([\d.]+)$", extras[extra], re.M)
        pins[f"setup.cfg [{extra}]"] = match and match.group(1)
    match = re.search(r"\bruff==([\d.]+)", ci_script())
    pins[".ci/run"] = match and match.group(1)
    return pins


def test_ruff_is_pinned_to_one_version_everywhere():
    pins = ruff_pins()
    assert None not in pins.values(), f"ruff is not pinned in: {pins}"
    assert len(set(pins.values())) == 1, f"ruff pins disagree: {pins}"


def test_pytest_ignores_no_whole_warning_category():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    filters = pyproject["tool"]["pytest"]["ini_options"].get("filterwarnings", [])
    broad = [f for f in filters if re.fullmatch(r"ignore::\w+", f)]
    assert not broad, f"filters that ignore a whole category: {broad}"


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs a git checkout",
)
def test_gitignore_ignores_no_tracked_file():
    ignored = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not ignored, f".gitignore matches tracked files: {ignored}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs.py --update")
    MATH_PAGE.write_text(render_math_page(MATH_PAGE.read_text()))
    print(f"rewrote the docstring copies in {MATH_PAGE.relative_to(ROOT)}")


def test_every_test_name_is_unique_across_files():
    """A test ID cited by name alone (`-k`, a report) finds one test."""
    import ast
    import collections

    files = collections.defaultdict(list)
    for path in sorted(pathlib.Path(__file__).parent.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                files[node.name].append(path.name)
    assert {name: f for name, f in files.items() if len(f) > 1} == {}
