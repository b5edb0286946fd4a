"""What users read says what is so, not where it came from: no issue references, commit
hashes or load averages in README.md, the docs pages (except docs/benchmarks/, whose pages
carry the date, commit and machine of each measurement) and the comments and docstrings of
the Python code. The comments and docstrings are read with ``tokenize``, so string data
(e.g. sha256 values in tests) is not text anyone reads as prose. The text files beside
the code (docker/, configs/, .ci/, pyproject.toml, the examples' configs) are read whole.

A failure names each offending file and line.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIRS = ("brokerfl", "handlers", "examples", "benchmarks", "tests")
TEXT_FILES = ("pyproject.toml", ".ci/run", "docker/*", "configs/*", "examples/*/*.yaml")

# the word issue, task, ticket, PR or pull request and a number (with or without a hash
# sign), or a hash sign and a number alone (not an HTML character reference, not a colour)
ISSUE = re.compile(
    r"\b(?:issues?|tasks?|tickets?|PRs?|pull\s+requests?)\s+#?\d+\b|(?<![\w&#])#\d+(?![\w-])",
    re.IGNORECASE,
)
# a word of 7-40 lowercase hex digits with at least one letter and one digit; a longer run
# (a sha256 value) is not a commit, nor is part of a UUID or of 0x... (the "x" is a word
# character); ed25519 is a key type
HASH = re.compile(r"(?<![\w-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")
NOT_HASHES = {"ed25519"}
# the word load (or load average, loadavg) and a figure or a range of them, about or not;
# not the verb before a count of things
LOAD = re.compile(
    r"\bload(?:\s+averages?|avg)?(?:\s+(?:of|was|around|about|now))?\s*[:=]?\s*[~≈]?\s*\d+(?:\.\d+)?"
    r"(?:\s*(?:-|–|to|->|→)\s*\d+(?:\.\d+)?)?(?![\d.]*\s+(?!was\b|is\b)[a-z]+s\b)",
    re.IGNORECASE,
)


def problems(text: str) -> list[str]:
    """What in one line of prose an issue reference, a commit hash or a load average is."""
    found = [f"issue reference {m.group(0)!r}" for m in ISSUE.finditer(text)]
    found += [
        f"commit hash {m.group(0)!r}"
        for m in HASH.finditer(text)
        if m.group(0) not in NOT_HASHES and "sha256" not in text[max(0, m.start() - 16) : m.start()]
    ]  # a model version's sha256, shortened as commands print it, is no commit
    found += [f"load average {m.group(0)!r}" for m in LOAD.finditer(text)]
    return found


def _logical_lines(tokens: list[tokenize.TokenInfo]) -> Iterator[list[tokenize.TokenInfo]]:
    """The tokens of each statement (logical line), comments and blank lines left out."""
    line: list[tokenize.TokenInfo] = []
    for token in tokens:
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
            continue
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if line:
                yield line
            line = []
            continue
        line.append(token)


def _docstring(tokens: list[tokenize.TokenInfo]) -> bool:
    """Whether these tokens are a statement of string literals alone."""
    return bool(tokens) and all(t.type == tokenize.STRING for t in tokens)


def prose(source: str) -> Iterator[tuple[int, str]]:
    """Each line of the comments and docstrings of a Python source, with its line number.

    A docstring is a statement of string literals that is the first statement of the module
    or of a class or function body (also on the line of its ``def ...:``)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for token in tokens:
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    strings: list[tokenize.TokenInfo] = []
    previous: list[tokenize.TokenInfo] | None = None
    for line in _logical_lines(tokens):
        header = previous is not None and previous[0].string in ("def", "class", "async") and previous[-1].string == ":"
        if previous is None or header:
            if _docstring(line):
                strings += line
            elif line[0].string in ("def", "class", "async"):
                # a body on the header's line: def f(): """doc"""
                depth = 0
                for i, token in enumerate(line):
                    if token.string in "([{" and token.type == tokenize.OP:
                        depth += 1
                    elif token.string in ")]}" and token.type == tokenize.OP:
                        depth -= 1
                    elif token.string == ":" and depth == 0:
                        if _docstring(line[i + 1 : i + 2]):
                            strings.append(line[i + 1])
                        break
        if line[0].string == "@":
            continue  # a decorator: the def that follows is still a header
        previous = line
    for token in strings:
        for offset, text in enumerate(token.string.splitlines()):
            yield token.start[0] + offset, text


def _python_files() -> Iterator[Path]:
    for directory in PYTHON_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def _docs_pages() -> Iterator[Path]:
    for path in sorted((ROOT / "docs").rglob("*.md")):
        if path.relative_to(ROOT / "docs").parts[0] != "benchmarks":
            yield path


def _text_files() -> Iterator[Path]:
    for pattern in TEXT_FILES:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file():
                yield path


def _report(findings: list[str]) -> str:
    return f"{len(findings)} line(s) of prose say where a figure or a change came from:\n" + "\n".join(findings)


def _scan(path: Path, lines: Iterator[tuple[int, str]]) -> list[str]:
    name = path.relative_to(ROOT)
    return [f"{name}:{number}: {problem}" for number, text in lines for problem in problems(text)]


def _whole(path: Path) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return  # not text
    yield from enumerate(text.splitlines(), start=1)


def test_python_comments_and_docstrings():
    findings = [f for path in _python_files() for f in _scan(path, prose(path.read_text(encoding="utf-8")))]
    assert not findings, _report(findings)


def test_text_files_beside_the_code():
    findings = [f for path in _text_files() for f in _scan(path, _whole(path))]
    assert not findings, _report(findings)


def test_readme():
    findings = _scan(ROOT / "README.md", _whole(ROOT / "README.md"))
    assert not findings, _report(findings)


def test_docs_pages_outside_benchmarks():
    pages = list(_docs_pages())
    assert ROOT / "docs" / "index.md" in pages and not any("benchmarks" in p.parts for p in pages)
    findings = [f for path in pages for f in _scan(path, _whole(path))]
    assert not findings, _report(findings)


# ---------------------------------------------------------------- the checks themselves


@pytest.mark.parametrize(
    "text",
    [
        "Goal (issue 10): the 1,000-client round",
        "left to the identity issue (#9)",
        "validated identities (issue #9), not this test",
        "a forged Leave just before a round starts (#9)",
        "as task 7 asked",
        "base commit 6afdc98 then this one",
        "alternating with e63cd1d, same sitting",
        "70-200 s at load 10-22 on 2 shared cores",
        "at load 20 that is over 10 s",
        "alternating runs (load ~4)",
        "load average: 1.5, 2.0, 2.1",
    ],
)
def test_flags(text):
    assert problems(text), text


@pytest.mark.parametrize(
    "text",
    [
        "sha256 of the body: " + "ab12" * 16,
        "an ed25519 key",
        "the id 123e4567-e89b-12d3-a456-426614174000",
        "a mask of 0x7f3a2b1c",
        "numbers alone: 1234567 and 10000000",
        "hex words without a digit: deadbeef, facade",
        "the clients load 3 partitions each",
        "pip install -e '.[torch]'",
        "the 2nd round, in 10 minutes",
        "&#39; is an apostrophe",
        "# Heading",
    ],
)
def test_passes(text):
    assert not problems(text), problems(text)


def test_only_comments_and_docstrings_are_prose():
    source = '''"""Module doc: issue 3."""
DIGEST = "0123456789abcdef0123"  # a comment: e63cd1d


def f(x):  # load 4
    """Function doc: (#12)."""
    y = "not a docstring: issue 5"
    return y


class C:
    def g(self): """one-liner: 2347d01"""


@decorated
def h():
    "at load 9"
    "a second statement, not the docstring: issue 8"
'''
    found = {number: problems(text) for number, text in prose(source) if problems(text)}
    assert sorted(found) == [1, 2, 5, 6, 12, 17], found
