"""The README's examples run as written: every ```python block, and every `switch-hf fill-mask` / `switch-hf
reconstruct` line of its shell blocks, each in a fresh process from the repository root, offline.

A block that cannot run here (it needs a GPU or the Hub) carries `<!-- readme-test: skip (why) -->` on the line
right before its opening fence.
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import REPO_ROOT


README = REPO_ROOT / "README.md"
MARKER = "readme-test"
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
FENCE = re.compile(r"^```(?P<language>[\w+-]*)")
# The example lines worth running; the install lines chain the same command after `pip install` and are left out.
COMMAND_LINE_EXAMPLE = re.compile(r"^switch-hf (fill-mask|reconstruct) ")


@dataclass
class CodeBlock:
    language: str
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced blocks of a Markdown text, each with the skip reason its preceding line gives, if any."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md line {index + 1}: code block never closed")
        marker = SKIP_MARKER.search(lines[index - 1]) if index > 0 else None
        reason = marker["reason"].strip() if marker else None
        blocks.append(CodeBlock(opening["language"], index + 1, "\n".join(lines[index + 1 : end]) + "\n", reason))
        index = end + 1
    return blocks


BLOCKS = code_blocks(README.read_text())
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python" and block.skip_reason is None]
COMMAND_LINES = [
    (block.line + offset, line.strip())
    for block in BLOCKS
    if block.language in ("bash", "sh", "shell") and block.skip_reason is None
    for offset, line in enumerate(block.code.splitlines(), start=1)
    if COMMAND_LINE_EXAMPLE.match(line.strip())
]


def run(argv: list[str], what: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"


def test_the_readme_has_python_and_command_line_examples_to_run():
    assert len(PYTHON_BLOCKS) >= 3
    commands = {line.split()[1] for _, line in COMMAND_LINES}
    assert commands == {"fill-mask", "reconstruct"}


def test_every_skip_marker_gives_a_reason_and_sits_right_before_a_code_block():
    lines = README.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if MARKER not in line:
            continue
        marker = SKIP_MARKER.search(line)
        assert marker is not None, f"README.md line {number}: write it as <!-- readme-test: skip (reason) -->"
        assert marker["reason"].strip(), f"README.md line {number}: the skip marker names no reason"
        following = lines[number] if number < len(lines) else ""
        assert FENCE.match(following), f"README.md line {number}: the skip marker must be right before a code block"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line-{block.line}" for block in PYTHON_BLOCKS])
def test_python_block_runs(block):
    run([sys.executable, "-c", block.code], f"README.md's python block at line {block.line}")


@pytest.mark.parametrize("line", [line for _, line in COMMAND_LINES], ids=[f"line-{n}" for n, _ in COMMAND_LINES])
def test_command_line_example_runs(line):
    program, *arguments = shlex.split(line, comments=True)
    assert program == "switch-hf"
    run([sys.executable, "-m", "switch_hf.cli", *arguments], f"`{line}`")
