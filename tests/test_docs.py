"""The documentation agrees with the code's tables, and its links lead somewhere.

Each config key, route and event is described in one place of docs/; these
tests fail when a key, route or event is added to (or removed from) the
tables in gafferd.py without the matching line in the docs, when README.md
grows past what a new user reads, or when a relative link or #anchor in
README.md, HACKING.md, SECURITY.md, bench/ and soak/ READMEs or docs/*.md points at
nothing.  Pure: no daemon is started.
"""
from __future__ import annotations

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gafferd  # noqa: E402

DOCS = ROOT / "docs"
README_LIMIT = 25600
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")


# -- markdown helpers ---------------------------------------------------------------------------

def prose_lines(text):
    """The lines of a markdown text outside fenced code blocks."""
    fence = None
    for line in text.split("\n"):
        marker = re.match(r"^\s*(`{3,}|~{3,})", line)
        if marker:
            if fence is None:
                fence = marker.group(1)[0]
            elif marker.group(1)[0] == fence:
                fence = None
            continue
        if fence is None:
            yield line


def github_slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and
    '_' dropped, each space a '-' (inline markup such as backticks is not text)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # [text](url) -> text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every #anchor of a markdown file, numbered for repeats as GitHub does."""
    seen, out = {}, set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else "%s-%d" % (slug, count))
    return out


def links(path):
    """(target, line) of every markdown link in a file's prose, code spans left out."""
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            yield target, line


def tables(text):
    """Every table of a markdown text as (header cells, [row cells])."""
    found, current = [], None
    for line in prose_lines(text):
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = (cells, [])
                found.append(current)
            elif not all(re.match(r"^:?-+:?$", c) for c in cells):
                current[1].append(cells)
        else:
            current = None
    return found


def code_spans(cell):
    return re.findall(r"`([^`]+)`", cell)


def table_after(path, heading):
    """The first table below the heading whose text is ``heading``."""
    text = path.read_text(encoding="utf-8")
    lines = list(prose_lines(text))
    for index, line in enumerate(lines):
        if re.match(r"^#{1,6}\s+", line) and line.lstrip("#").strip() == heading:
            return tables("\n".join(lines[index + 1:]))[0]
    raise AssertionError("%s has no heading %r" % (path.name, heading))


def markdown_files():
    return ([ROOT / "README.md", ROOT / "HACKING.md", ROOT / "SECURITY.md",
             ROOT / "bench" / "README.md", ROOT / "soak" / "README.md"]
            + sorted(DOCS.glob("*.md")))


# -- README --------------------------------------------------------------------------------------

def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, "README.md is %d bytes; move reference text to docs/" % size


def test_readme_keeps_the_test_command_of_ci():
    command = ("python3 -m pip install -q pytest && "
               "python3 -m pytest -q -p no:cacheprovider tests")
    assert command in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_lists_every_page_of_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        assert "docs/" + page.name in readme, "README.md does not link docs/%s" % page.name


def ini_examples():
    """(file, line number, line) of each line of the INI examples of the
    docs: fenced blocks with a section header, and the example files."""
    pages = [ROOT / "README.md", ROOT / "HACKING.md"] + sorted(DOCS.glob("*.md")) + \
        sorted((ROOT / "examples").rglob("*.md"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for block in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S):
            if re.search(r"^\[[a-z]+(:[^\]]+)?\]", block.group(1), re.M):
                first = text.count("\n", 0, block.start(1)) + 1
                for n, line in enumerate(block.group(1).split("\n")):
                    yield page.name, first + n, line
    for ini in sorted((ROOT / "examples").rglob("*.ini")):
        for n, line in enumerate(ini.read_text(encoding="utf-8").split("\n"), 1):
            yield ini.name, n, line


def test_ini_examples_have_no_inline_comments():
    # configparser reads "key = value ; note" as the value "value ; note":
    # a copied example would then fail, or worse, mean something else
    # (a log: pattern that never matches)
    bad = ["%s:%d: %s" % (name, n, line.strip()) for name, n, line in ini_examples()
           if "=" in line and not line.lstrip().startswith((";", "#"))
           and re.search(r"\s[;#]\s", line.split("=", 1)[1])]
    assert not bad, "comments on their own line:\n" + "\n".join(bad)


# -- links ---------------------------------------------------------------------------------------

def test_github_slug_rules():
    assert github_slug("`[process:NAME]`") == "processname"
    assert github_slug("Console output: `-v`, `-vv`") == "console-output--v--vv"
    assert github_slug("Recent output: `_log`") == "recent-output-_log"
    assert github_slug("Differences from gaffer 0.4.4") == "differences-from-gaffer-044"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(path):
    broken = []
    for target, line in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append("%s: no file %s" % (target, dest))
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append("%s: %s has no heading #%s" % (target, dest.name, anchor))
    assert not broken, "%s:\n  %s" % (path.name, "\n  ".join(broken))


# -- configuration keys ----------------------------------------------------------------------

def documented_keys(heading):
    _, rows = table_after(DOCS / "configuration.md", heading)
    return {span for row in rows for span in code_spans(row[0])}


def test_every_process_key_is_documented():
    documented = documented_keys("`[process:NAME]`")
    assert set(gafferd.PROCESS_KEYS) - documented == set()
    assert {k for k in documented if re.match(r"^[a-z_]+$", k)} - set(gafferd.PROCESS_KEYS) == set()


def test_every_endpoint_key_is_documented():
    documented = documented_keys("`[endpoint:NAME]`")
    assert set(gafferd.ENDPOINT_KEYS) - documented == set()
    known = set(gafferd.ENDPOINT_KEYS)
    assert {k for k in documented if re.match(r"^[a-z_]+$", k)} - known == set()


def test_every_gaffer_key_is_documented():
    documented = documented_keys("`[gaffer]`")
    assert set(gafferd.GAFFER_KEYS) - documented == set()
    known = set(gafferd.GAFFER_KEYS) | set(gafferd.ENDPOINT_KEYS)
    assert {k for k in documented if re.match(r"^[a-z_]+$", k)} - known == set()


# -- routes --------------------------------------------------------------------------------------

PLACEHOLDERS = {"NAME": "web", "GROUP": "web", "ID": "2", "LABEL": "stdout", "DIR": "console",
                "ARG": "1", "SIG": "HUP", "P1": "proc", "P2": "web", "P3": "exit",
                "_ACTION": "_start", "...": "x"}


def example_paths(pattern):
    """Concrete paths for a documented path: optional parts with and without, NAME -> web."""
    pattern = re.sub(r"\[?\?.*$", "", pattern)                  # no query string
    forms = {pattern.replace("[", "").replace("]", "")}
    shortest, previous = pattern, None
    while shortest != previous:                              # innermost [...] first
        shortest, previous = re.sub(r"\[[^\[\]]*\]", "", shortest), shortest
    forms.add(shortest)
    out = set()
    for form in forms:
        for word, value in PLACEHOLDERS.items():
            form = re.sub(r"(?<![A-Za-z0-9])%s(?![A-Za-z0-9])" % re.escape(word), value, form)
        out.add(form)
    return out


def documented_routes():
    """(concrete path, methods) from the route table of docs/http-api.md."""
    for header, rows in tables((DOCS / "http-api.md").read_text(encoding="utf-8")):
        if header[:2] == ["Route", "Methods"]:
            for row in rows:
                methods = set(re.findall(r"\b(%s)\b" % "|".join(HTTP_METHODS), row[1]))
                if "any" in row[1]:
                    methods.add("*")
                for span in code_spans(row[0]):
                    if span.startswith("/"):
                        for path in example_paths(span):
                            yield path, methods
            return
    raise AssertionError("docs/http-api.md has no | Route | Methods | table")


def test_every_route_is_documented():
    documented = list(documented_routes())
    missing = []
    for regex, handlers in gafferd.ROUTES:
        for method in handlers:
            wanted = {method, "GET"} if method == "HEAD" else {method}  # HEAD follows GET
            if not any(re.fullmatch(regex, path) and methods & wanted
                       for path, methods in documented):
                missing.append("%s %s" % (method, regex))
    assert not missing, "routes missing from docs/http-api.md: %s" % missing


def test_every_documented_route_exists():
    unknown = [path for path, _ in documented_routes()
               if not any(re.fullmatch(regex, path) for regex, _ in gafferd.ROUTES)]
    assert not unknown


# -- events --------------------------------------------------------------------------------------

def test_every_event_is_documented():
    header, rows = table_after(DOCS / "streams-and-events.md", "`/watch`: the event feed")
    assert header[:2] == ["Event", "Also sent as"]
    names = {span for row in rows for span in code_spans(row[0])}
    also = {span for row in rows for span in code_spans(row[1])}
    assert set(gafferd.MANAGER_EVENTS) - names == set()
    assert names - set(gafferd.MANAGER_EVENTS) == set()
    assert {"proc.NAME." + e for e in gafferd.PROCESS_EVENTS} - also == set()
    assert also - {"proc.NAME." + e for e in gafferd.PROCESS_EVENTS} == set()


# -- comments state rules, not references ---------------------------------------------------------

def test_no_file_cites_documents_outside_the_repository():
    """Comments and docstrings say the rule itself, not a section number of a
    behaviour document or a tracker number that a reader cannot open."""
    # Built from pieces so that this file does not match itself.
    cite = re.compile(r"\b" + "SP" + r"EC\b|\b[Ii]ss" + r"ues? #?[0-9]")
    paths = [ROOT / "gafferd.py"]
    for top in ("gafferd_plugins", "tests", "soak", "bench", "examples"):
        paths += sorted(p for p in (ROOT / top).rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    found = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue                                    # not text
        for number, line in enumerate(text.split("\n"), 1):
            if cite.search(line):
                found.append("%s:%d: %s" % (path.relative_to(ROOT), number, line.strip()))
    assert not found, "state the rule instead:\n" + "\n".join(found)
