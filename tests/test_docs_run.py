"""The docs' shell blocks run as written, and print what the docs show: README.md, docs/quickstart.md.

How the docs are written for this test (keep to it when you add a block):

- A ```bash block is run command by command with bash, from the repository root; ``#`` comments
  and blank lines are skipped, a line ending in ``\\`` goes on on the next.
- Every ``orchestrator launch`` trains ``DOCS_STEPS`` steps (``--set train.steps=N`` appended):
  the only change made to a command.
- A command that must fail ends in ``# exits N``; every other one must exit 0.
- An unlabelled ``` block after a bash block (before the next one) is that block's output: each of
  its lines but ``...`` must be printed by the block, in that order. A number, a run id or a path
  (``/path/...``) in it stands for any value; the words between must be exact. Illustrations that
  are not output are ```text blocks.
- ``<!-- docs-test: skip REASON -->`` before a block: it is not run. ``<!-- docs-test: skip-line
  PREFIX: REASON -->``: its commands that start with PREFIX are not run. ``<!-- docs-test: needs
  PROGRAM -->``: skipped where PROGRAM is not installed.

What a block creates under ``runs/`` is removed after it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.processes, pytest.mark.timeout(900)]

DOCS = ["README.md", "docs/quickstart.md"]
DOCS_STEPS = 6
_MARKER = re.compile(r"<!-- docs-test: (skip-line|skip|needs) (.*?) -->")
_EXITS = re.compile(r"#\s*exits (\d+)")
_COMMENT = re.compile(r"\s+#[^'\"]*$")
# A token of shown output that stands for any value: it holds a digit (counts, times, ids, losses) or a path.
_VARYING = re.compile(r".*\d.*|/path/\S*")


@dataclass
class Block:
    """One bash block of a doc: where, its commands, what its markers say, the output shown after it."""

    doc: str
    line: int
    commands: list[str]
    skip: str | None = None
    skip_lines: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """The bash blocks of ``doc``, with their markers and shown output."""
    found: list[Block] = []
    markers: list[tuple[str, str]] = []
    lines = (REPO / doc).read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if marker := _MARKER.search(line):
            markers.append((marker.group(1), marker.group(2)))
        elif line.startswith("```"):
            end = lines.index("```", i + 1)
            body = lines[i + 1:end]
            if line == "```bash":
                block = Block(doc=doc, line=i + 1, commands=_commands(body))
                for kind, text in markers:
                    if kind == "skip":
                        block.skip = text
                    elif kind == "skip-line":
                        block.skip_lines.append(text.partition(":")[0])
                    else:
                        block.needs.append(text)
                found.append(block)
            elif line == "```" and found and not found[-1].shown:
                found[-1].shown = body
            markers = []
            i = end
        i += 1
    return found


def _commands(body: list[str]) -> list[str]:
    commands, pending = [], ""
    for line in body:
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line)
    return commands


def _as_run(command: str) -> tuple[str, int]:
    """The command the test runs (comment off, steps shortened) and the exit code it must give."""
    exits = _EXITS.search(command)
    command = _COMMENT.sub("", command)
    if "orchestrator launch " in command:
        command += f" --set train.steps={DOCS_STEPS}"
    return command, int(exits.group(1)) if exits else 0


def _pattern(shown: str) -> re.Pattern[str]:
    tokens = [r"\S+" if _VARYING.fullmatch(token) else re.escape(token) for token in shown.split()]
    return re.compile(r"\s+".join(tokens))


def missing_lines(shown: list[str], printed: str) -> list[str]:
    """The shown lines (``...`` aside) that ``printed`` lacks, in order: each must come after the last found."""
    out = printed.splitlines()
    at, missing = 0, []
    for line in shown:
        if line.strip() in ("", "..."):
            continue
        pattern = _pattern(line)
        hit = next((j for j in range(at, len(out)) if pattern.fullmatch(out[j].strip())), None)
        if hit is None:
            missing.append(line)
        else:
            at = hit + 1
    return missing


ALL = [block for doc in DOCS for block in blocks(doc)]


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_a_documented_block_runs_and_prints_what_the_docs_show(block: Block) -> None:
    if block.skip:
        pytest.skip(f"marked in the doc: {block.skip}")
    for program in block.needs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")
    runs = REPO / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    printed = ""
    try:
        for command in block.commands:
            if any(command.startswith(prefix) for prefix in block.skip_lines):
                continue
            to_run, expected = _as_run(command)
            result = subprocess.run(["bash", "-c", to_run], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, timeout=600)
            printed += result.stdout
            assert result.returncode == expected, (
                f"{block.id}: `{command}` exited {result.returncode}, the doc says {expected}:\n{printed[-3000:]}")
        missing = missing_lines(block.shown, printed)
        assert not missing, f"{block.id}: the doc shows lines this run did not print: {missing}\n{printed[-3000:]}"
    finally:
        for made in (set(runs.iterdir()) if runs.exists() else set()) - before:
            shutil.rmtree(made, ignore_errors=True)


def test_the_shown_output_is_checked_line_by_line() -> None:
    """The matcher the test relies on: varying values match anything, words must be exact, order matters."""
    shown = ["run 3f1c2a9e0b7d: 2 ranks (1 node(s) x 2), cpu, 200 steps -> /path/runs/x", "...", "checkpoint global_step200 committed"]
    printed = "run 0a1b2c3d4e5f: 2 ranks (1 node(s) x 2), cpu, 6 steps -> /tmp/r\nstep 1/6\ncheckpoint global_step6 committed\n"
    assert missing_lines(shown, printed) == []
    assert missing_lines(shown, printed.replace("cpu", "gpu")) == [shown[0]]
    assert missing_lines(list(reversed(shown)), printed) == [shown[0]], "in the order shown"
    assert _as_run("orchestrator validate x --set a=b   # exits 2") == ("orchestrator validate x --set a=b", 2)
    assert _as_run(".venv/bin/orchestrator launch c.yaml   # train") == (
        f".venv/bin/orchestrator launch c.yaml --set train.steps={DOCS_STEPS}", 0)
