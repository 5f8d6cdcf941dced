"""The documentation in docs/ cannot silently go stale.

* every public name (the ``__all__`` of ``lightning_geomarkers``, ``.functional``, ``.metrics`` and
  ``.testing``) has an entry in docs/api.md, every parameter of a public callable is mentioned in it, and
  the defaults its signature blocks show are the real ones;
* every relative link (and ``#anchor``) in docs/*.md points to an existing file (and heading);
* the ``>>>`` examples in docs/*.md run and print what the docs say;
* every warning class is explained in docs/troubleshooting.md and every marker in docs/markers.md.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import re
import warnings
from pathlib import Path

import pytest

import lightning_geomarkers
import lightning_geomarkers.errors
import lightning_geomarkers.functional
import lightning_geomarkers.metrics
import lightning_geomarkers.testing

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
MODULES = (
    lightning_geomarkers,
    lightning_geomarkers.functional,
    lightning_geomarkers.metrics,
    lightning_geomarkers.testing,
)
PUBLIC = [(mod.__name__, name) for mod in MODULES for name in mod.__all__]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (code may contain '#' comments and '[x](y)' look-alikes)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(_text(path)):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = _slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchors.add(base if count == 0 else f"{base}-{count}")
    return anchors


def _api_section(text: str, name: str) -> str:
    """The text of the api.md section whose heading is `name` (up to the next heading of its level)."""
    lines = text.splitlines()
    fenced = False
    start = level = None
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        match = re.match(r"^(#{2,6})\s+(.*)$", line)
        if not match:
            continue
        if start is None and re.search(rf"`{re.escape(name)}`", match.group(2)):
            start, level = i, len(match.group(1))
        elif start is not None and len(match.group(1)) <= level:
            return "\n".join(lines[start:i])
    return "\n".join(lines[start:]) if start is not None else ""


def test_docs_exist():
    for name in ("markers.md", "callback.md", "api.md", "troubleshooting.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_documented_in_api(module, name):
    text = _text(DOCS / "api.md")
    assert f"`{name}`" in text, f"{module}.{name} is public (in __all__) but not documented in docs/api.md"


def _callables():
    for module, name in PUBLIC:
        obj = getattr(__import__(module, fromlist=[name]), name)
        if inspect.isfunction(obj) or (inspect.isclass(obj) and not issubclass(obj, Warning)):
            yield module, name, obj


CALLABLES = list(_callables())


@pytest.mark.parametrize(("module", "name", "obj"), CALLABLES, ids=[f"{m}.{n}" for m, n, _ in CALLABLES])
def test_parameters_documented_in_api(module, name, obj):
    """Every parameter of a public function/class appears in that name's section of docs/api.md."""
    section = _api_section(_text(DOCS / "api.md"), name)
    assert section, f"docs/api.md has no heading for {module}.{name}"
    params = [
        p.name
        for p in inspect.signature(obj).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
    ]
    missing = [p for p in params if not re.search(rf"\b{re.escape(p)}\b", section)]
    assert not missing, f"parameters {missing} of {module}.{name} are not documented in docs/api.md"


@pytest.mark.parametrize(("module", "name", "obj"), CALLABLES, ids=[f"{m}.{n}" for m, n, _ in CALLABLES])
def test_documented_defaults_match(module, name, obj):
    """Where the signature block of a docs/api.md section writes ``param=<literal>``, it is the default."""
    section = _api_section(_text(DOCS / "api.md"), name)
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    signature = "\n".join(b for b in blocks if ">>>" not in b and re.search(r"^\s*(def|class) ", b, re.M))
    wrong = []
    for p in inspect.signature(obj).parameters.values():
        if p.default is inspect.Parameter.empty:
            continue
        for literal in re.findall(rf"(?<![\w.]){re.escape(p.name)}=([^,\n)]+)", signature):
            try:
                value = ast.literal_eval(literal.strip())
            except (ValueError, SyntaxError):
                continue  # an expression in an example, not a documented default
            if value != p.default and not (isinstance(p.default, tuple) and value == list(p.default)):
                wrong.append(f"{p.name}={literal.strip()} (actual default {p.default!r})")
    assert not wrong, f"docs/api.md shows wrong defaults for {module}.{name}: {wrong}"


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_relative_links_resolve(path):
    broken = []
    for line in _prose_lines(_text(path)):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{target} (no file {dest})")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"broken links in docs/{path.name}: {broken}"


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_examples_run(path):
    """The `>>>` examples of each page, run as one doctest (ELLIPSIS and NORMALIZE_WHITESPACE on), with the
    package's warnings as errors."""
    test = doctest.DocTestParser().get_doctest(_text(path), {}, path.name, str(path), 0)
    if not test.examples:
        pytest.skip(f"no examples in {path.name}")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    with warnings.catch_warnings():
        # An example must not warn unless it shows a warning on purpose (it then captures it itself):
        # a copied example that prints a degenerate-probe warning teaches the wrong settings.
        warnings.simplefilter("error", lightning_geomarkers.errors.GeomarkersWarning)
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_every_warning_class_in_troubleshooting():
    text = _text(DOCS / "troubleshooting.md")
    for name in lightning_geomarkers.errors.__all__:
        assert f"`{name}`" in text, f"{name} is not explained in docs/troubleshooting.md"


def test_every_marker_in_markers_doc():
    text = _text(DOCS / "markers.md")
    for name in lightning_geomarkers.functional.MARKERS:
        assert f"`{name}`" in text, f"marker {name} is not described in docs/markers.md"


def test_tensorboard_screenshot_is_a_png():
    image = DOCS / "images" / "tensorboard.png"
    assert image.is_file(), "docs/images/tensorboard.png is missing (docs/scripts/screenshot_tensorboard.py)"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
