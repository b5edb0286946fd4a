"""The README is short, its two set-up commands come first, and what it shows runs."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from brokerfl.cli.commands import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SET_UP = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e '.[torch,test,flower,llm]'"
    " && brokerfl simulate",
    ". .venv/bin/activate && BROKERFL_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ python -m pytest -q",
]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def test_the_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_the_two_set_up_commands_come_first_exactly():
    assert README.splitlines()[2:6] == ["```bash", *SET_UP, "```"]


def test_the_app_shown_is_the_quickstart_app():
    (shown,) = _blocks("python")
    assert shown == (ROOT / "examples" / "quickstart" / "app.py").read_text()


def test_every_command_shown_parses():
    commands = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("brokerfl ")]
    assert len(commands) >= 4
    parser = build_parser()
    for line in commands:
        words = shlex.split(line, comments=True)
        try:
            parser.parse_args(words[1:])
        except SystemExit as exc:
            pytest.fail(f"the README's command does not parse: {line} ({exc})")


def test_every_link_points_to_a_file_in_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    for link in links:
        assert not link.startswith(("http:", "https:")), link
        assert (ROOT / link).is_file(), f"the README links {link}, which does not exist"


@pytest.mark.timeout(120)
def test_the_quickstart_app_trains(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "brokerfl", "simulate", "examples/quickstart/config.yaml", "--rounds", "2"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "final_model.npz").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 2
