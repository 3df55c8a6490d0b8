"""The README's examples run as written: every ```python block, and every `switch-hf fill-mask` / `switch-hf
reconstruct` line of its shell blocks, each in a process of its own from the repository root, offline (a child of
conftest's `warm_python`, which has torch and transformers imported but not switch_hf).

A block that cannot run here (it needs a GPU or the Hub) carries `<!-- readme-test: skip (why) -->` on the line
right before its opening fence.
"""

import re
import shlex
import subprocess
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


def check(result, what: str) -> None:
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


def test_each_example_runs_in_a_process_of_its_own(warm_python, tmp_path):
    """What one program imports, defines or changes stays in its process; its status and output are its own."""
    first = """
import os, sys, tabnanny
os.environ["LEFT_BEHIND"] = "1"
defined = 1
print(sys.argv, os.getcwd())
sys.exit(3)
"""
    second = """
import os, sys
print("tabnanny" in sys.modules, "switch_hf" in sys.modules, "LEFT_BEHIND" in os.environ, "defined" in globals())
raise ValueError("broken")
"""

    first, second = warm_python.run(first, arguments=["x"], cwd=tmp_path), warm_python.run(second)

    assert (first.returncode, first.stdout) == (3, f"['-c', 'x'] {tmp_path}\n")
    assert (second.returncode, second.stdout) == (1, "False False False False\n")
    assert second.stderr.rstrip().endswith("ValueError: broken")


def test_a_program_past_its_timeout_is_killed_and_the_next_one_runs(warm_python):
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        warm_python.run("import time\nprint('started', flush=True)\ntime.sleep(300)", timeout=2)

    assert timed_out.value.output == "started\n"
    assert warm_python.run("print('next')").stdout == "next\n"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line-{block.line}" for block in PYTHON_BLOCKS])
def test_python_block_runs(warm_python, block):
    check(warm_python.run(block.code), f"README.md's python block at line {block.line}")


@pytest.mark.parametrize("line", [line for _, line in COMMAND_LINES], ids=[f"line-{n}" for n, _ in COMMAND_LINES])
def test_command_line_example_runs(warm_python, line):
    program, *arguments = shlex.split(line, comments=True)
    assert program == "switch-hf"
    check(warm_python.run(module="switch_hf.cli", arguments=arguments), f"`{line}`")
