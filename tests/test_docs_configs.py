"""Every YAML block of the how-to guides and tutorials is a run config that loads.

Each fenced block whose language is ``yaml`` in ``docs/how-to/*.md`` and
``docs/tutorials/*.md`` is a config or a fragment of one: it is parsed and validated as
``brokerfl.config.load_config`` validates a file (keys it leaves out take their defaults),
so a renamed or removed key, a wrong type or an unknown strategy option fails here.

A YAML block that is not a run config (a compose file, a Kubernetes manifest) says so in
its first line, which readers see too::

    ```yaml
    # not a run config: docker/compose.yaml
    services: ...
    ```

Blocks included with snippets (``--8<-- "configs/x.yaml"``) are checked with the file's
text, as the site shows them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from brokerfl.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("docs/how-to", "docs/tutorials")
NOT_A_CONFIG = "# not a run config"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
SNIPPET = re.compile(r"^\s*-{1,}8<-{1,}\s+\"(?P<path>[^\"]+)\"\s*$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    text: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def yaml_blocks(page: str, markdown: str) -> list[Block]:
    """The fenced blocks of ``markdown`` whose language is yaml, unindented as their fence."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].strip().lstrip("{").lstrip(".").split(" ")[0].split("}")[0]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence[0] * len(fence)) and lines[end].strip().strip(fence[0]) == ""
        ):
            line = lines[end]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            end += 1
        if language == "yaml":
            blocks.append(Block(page, index + 1, "\n".join(body)))
        index = end + 1
    return blocks


def with_snippets(text: str) -> str:
    """``text`` with each ``--8<-- "path[:start:end]"`` line replaced by what it includes."""
    out: list[str] = []
    for line in text.splitlines():
        match = SNIPPET.match(line)
        if match is None:
            out.append(line)
            continue
        path, *span = match["path"].split(":")
        included = (ROOT / path).read_text().splitlines()
        if span and not span[0].isdigit():  # a named section: --8<-- [start:name] ... [end:name]
            begin = next(i for i, line in enumerate(included) if f"--8<-- [start:{span[0]}]" in line)
            end = next(i for i, line in enumerate(included) if f"--8<-- [end:{span[0]}]" in line)
            included = included[begin + 1 : end]
        elif span:  # lines start:end, 1-based, either may be empty
            start, stop = (int(n) if n else None for n in (span + [""])[:2])
            included = included[(start or 1) - 1 : stop]
        out.extend(included)
    return "\n".join(out)


def is_config(block: Block) -> bool:
    first = next((line.strip() for line in block.text.splitlines() if line.strip()), "")
    return not first.lower().startswith(NOT_A_CONFIG)


def check_config(block: Block) -> None:
    """Parse and validate ``block`` as a run config (a fragment: the rest defaults).
    A ConfigError names the key; an old spelling of a built-in fails too."""
    data = yaml.safe_load(with_snippets(block.text))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        parse_config(data, block.name)


def all_blocks() -> list[Block]:
    blocks: list[Block] = []
    for folder in PAGES:
        for page in sorted((ROOT / folder).glob("*.md")):
            blocks += yaml_blocks(str(page.relative_to(ROOT)), page.read_text())
    return blocks


BLOCKS = all_blocks()
CONFIGS = [block for block in BLOCKS if is_config(block)]


@pytest.mark.parametrize("block", CONFIGS, ids=[block.name for block in CONFIGS])
def test_every_yaml_block_of_the_guides_is_a_config_that_loads(block):
    check_config(block)


def test_the_guides_have_config_blocks_to_check():
    # the how-to guides show configs: none found means the page parsing broke
    assert len([b for b in CONFIGS if b.page.startswith("docs/how-to/")]) >= 10


def test_a_renamed_key_in_a_block_fails():
    page = "```yaml\nstrategy:\n  name: fedadam\n  options:\n    learning_rate: 0.1\n```\n"
    (block,) = yaml_blocks("page.md", page)
    with pytest.raises(ValueError, match="learning_rate"):
        check_config(block)
    (block,) = yaml_blocks("page.md", "```yaml\nrounds: 3\nliveness:\n  heartbeat: 2\n```\n")
    with pytest.raises(ValueError, match="liveness.heartbeat: unknown key"):
        check_config(block)


def test_only_a_block_marked_in_its_first_line_is_skipped():
    page = (
        "text\n\n"
        '```yaml title="docker/compose.yaml"\n# not a run config: a compose file\nservices: {}\n```\n\n'
        "- in a list:\n\n    ```yaml\n    services: {}\n    ```\n\n"
        "```bash\nbrokerfl simulate\n```\n"
    )
    marked, unmarked = yaml_blocks("page.md", page)
    assert not is_config(marked) and is_config(unmarked)
    assert unmarked.text == "services: {}" and unmarked.line == 10
    with pytest.raises(ValueError, match="services: unknown key"):
        check_config(unmarked)


def test_a_snippet_is_checked_with_the_file_it_includes():
    (block,) = yaml_blocks("page.md", '```yaml\n--8<-- "configs/digits_fedbuff.yaml"\n```\n')
    assert "fedbuff" in with_snippets(block.text)
    check_config(block)
    lines = (ROOT / "configs/digits_fedbuff.yaml").read_text().splitlines()
    assert with_snippets('--8<-- "configs/digits_fedbuff.yaml:2:3"') == "\n".join(lines[1:3])
