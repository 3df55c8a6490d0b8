"""Pytest fixtures: a loopback Hugging Face Hub to push to, and an olah mirror to pull from.

    push_to_hub / HfApi ----> push server   (tests/hub_server.py, a thread of the test process)
                                   ^
                                   | upstream: hf-netloc / hf-lfs-netloc
                                   |
    from_pretrained --------> olah 0.5.4     (a subprocess; caches what it proxies)

Both listen on 127.0.0.1 only, on free ports, for the whole test session.

olah configuration, and why
    olah runs online (``offline = false``) as a caching proxy whose upstream is
    the push server, with an empty ``mirrors-path``.  Everything a client asks
    for is answered from the push server's replies, so a path or revision the
    repo lacks gets the push server's Hub-style 404 (``EntryNotFound`` /
    ``RevisionNotFound``) relayed to the client.  That matters because
    transformers probes optional files (``additional_chat_templates/``,
    ``vocab.txt``, ``added_tokens.json``, ...) and only treats a Hub-style 404
    as "not there".
    Not chosen: ``offline = true`` (olah answers 401 instead of 404 for a path
    it has not cached, so a standard tokenizer fails to load) and
    ``mirrors-path`` pointing at the push server's repo root.  The repo layout
    does suit olah's git mirror reader, but olah 0.5.4 then answers a file
    request for a missing revision with 401 ``RepoNotFound``, so users would be
    told the repo does not exist instead of the revision.
    ``metadata-cache-ttl = 0`` makes olah re-resolve branches on every request,
    so a pull right after a push sees the new commit.

Using the fixtures
    ``hub_servers`` (session) starts both servers; ``hub`` (per test) also gives
    the test a fresh, empty ``HF_HOME`` and points this process's
    huggingface_hub/transformers at the push server with Xet disabled, so
    ``model.push_to_hub("org/name", token=hub.token)`` just works.  Pull in a
    fresh interpreter with ``hub.run_python(code)``: it gets
    ``HF_ENDPOINT`` = olah and another empty ``HF_HOME``.
"""

from __future__ import annotations

import http.client
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from hub_server import LOOPBACK, HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_USER = "test-user"
TEST_TOKEN = "hf_loopback_test_token"
TEST_ORG = "org"  # the test user may write here
FOREIGN_ORG = "closed-org"  # exists, but the test user is not a member
OLAH_START_TIMEOUT_S = 60
SUBPROCESS_TIMEOUT_S = 300


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _olah_config(port: int, upstream_netloc: str, cache_dir: Path) -> str:
    return f"""\
[basic]
host = "{LOOPBACK}"
port = {port}
repos-path = "{cache_dir}"
# The upstream "Hub" is the push server; olah speaks plain HTTP to it.
hf-scheme = "http"
hf-netloc = "{upstream_netloc}"
hf-lfs-netloc = "{upstream_netloc}"
mirror-scheme = "http"
mirror-netloc = "{LOOPBACK}:{port}"
mirror-lfs-netloc = "{LOOPBACK}:{port}"
# Pure proxy: answers (including 404s) come from the upstream, see hub_fixtures.py.
mirrors-path = []
# Re-resolve branch -> commit on every request, so pulls see the latest push.
metadata-cache-ttl = 0

[accessibility]
offline = false

[[accessibility.proxy]]
repo = "*"
allow = true

[[accessibility.proxy]]
repo = "*/*"
allow = true

[[accessibility.cache]]
repo = "*/*"
allow = true
"""


# If the test process is killed outright (no fixture teardown), olah must not linger on its port:
# on Linux ask the kernel to SIGTERM it when its parent dies.
_RUN_OLAH_TIED_TO_PARENT = """
import signal, sys
if sys.platform.startswith("linux"):
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
from olah.server import cli
cli()
"""


class OlahPortTaken(RuntimeError):
    pass


class OlahProcess:
    """olah in a subprocess, configured by ``_olah_config``."""

    def __init__(self, workdir: Path, upstream_url: str):
        self.workdir = workdir
        self.port = free_loopback_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.cache_dir = workdir / "cache"
        self.log_path = workdir / "olah.log"
        self.config_path = workdir / "olah.toml"
        upstream_netloc = upstream_url.split("://", 1)[1]
        self.config_path.write_text(_olah_config(self.port, upstream_netloc, self.cache_dir))
        self._process: subprocess.Popen | None = None

    def start(self) -> "OlahProcess":
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _RUN_OLAH_TIED_TO_PARENT,
                 "--config", str(self.config_path), "--log-path", str(self.workdir / "logs")],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + OLAH_START_TIMEOUT_S
        while not self._answers_http():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                output = self.log_tail()
                if "address already in use" in output.lower():
                    raise OlahPortTaken(self.port)
                raise RuntimeError(f"olah did not start on {self.url}; its output:\n{output}")
            time.sleep(0.2)
        return self

    def _answers_http(self) -> bool:
        # Any HTTP answer means uvicorn is serving (olah's index page itself answers 500 here).
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            connection.request("HEAD", "/")
            connection.getresponse()
            return True
        except OSError:
            return False
        finally:
            connection.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


@dataclass
class LoopbackHub:
    """What a test needs to push to and pull from the loopback Hub."""

    endpoint: str  # HF_ENDPOINT for pulls: olah
    push_endpoint: str  # HF_ENDPOINT for pushes: the push server
    token: str  # write token of `user`
    user: str
    org: str  # an organization `user` can write to
    foreign_org: str  # an existing organization `user` cannot write to
    repo_root: Path  # <repo_root>/models/<namespace>/<name> are the git repos
    olah_cache: Path  # olah's repos-path
    push_server: HubServer = field(repr=False)
    scratch_dir: Path | None = None  # per test, set by the `hub` fixture
    hf_home: Path | None = None  # per test: this process's HF_HOME

    def branch_head(self, repo_id: str, branch: str = "main") -> str | None:
        """The commit ``branch`` points to on the push server, straight from git (None if absent)."""
        return self.push_server.branch_head(repo_id, branch)

    def new_hf_home(self) -> Path:
        """A new, empty HF_HOME below this test's tmp_path."""
        if self.scratch_dir is None:
            raise RuntimeError("new_hf_home() needs the per-test `hub` fixture")
        index = sum(1 for _ in self.scratch_dir.glob("hf_home_*"))
        path = self.scratch_dir / f"hf_home_{index}"
        path.mkdir()
        return path

    def pull_environment(self, hf_home: Path) -> dict[str, str]:
        """Environment for a fresh interpreter that pulls through olah without credentials."""
        inherited = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE")
        env = {key: value for key, value in os.environ.items() if not key.startswith(inherited)}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        return env

    def run_python(self, code: str, *args: str, hf_home: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``code`` in a fresh interpreter pulling through olah (default: a new empty HF_HOME)."""
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=self.pull_environment(hf_home or self.new_hf_home()),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )

    def point_client_at_push_server(self, monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
        """Point this process's huggingface_hub and transformers at the push server, until ``monkeypatch`` undoes it.

        huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_DISABLE_XET once, at import,
        into module constants, and transformers keeps one HfApi bound to that endpoint;
        so besides the environment (for child processes) those are patched too.
        """
        from huggingface_hub import constants

        hf_home.mkdir(parents=True, exist_ok=True)
        for variable in [key for key in os.environ if key.startswith(("HF_", "HUGGINGFACE_"))]:
            monkeypatch.delenv(variable)  # no stray token, cache path or offline switch from the caller
        for variable in ("TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", self.push_endpoint)
        monkeypatch.setenv("HF_HOME", str(hf_home))
        # huggingface_hub 2.4 uploads through Xet whenever hf_xet is installed; the server only offers LFS.
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        patched = {
            "ENDPOINT": self.push_endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.push_endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
            "HF_ASSETS_CACHE": str(hf_home / "assets"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
            "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        }
        for name, value in patched.items():
            if hasattr(constants, name):
                monkeypatch.setattr(constants, name, value)
        try:
            import transformers.utils.hub as transformers_hub
        except ImportError:
            transformers_hub = None
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt on first use, with the new endpoint


@pytest.fixture(scope="session")
def hub_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackHub]:
    """The push server and olah, started once per session and stopped at its end."""
    if shutil.which("git") is None:
        raise RuntimeError("The loopback Hub stores repos with git; install git (apt-get install git).")
    workdir = tmp_path_factory.mktemp("loopback_hub")
    push_server = HubServer(
        workdir / "repos",
        tokens={TEST_TOKEN: TEST_USER},
        organizations={TEST_ORG: [TEST_USER], FOREIGN_ORG: []},
    ).start()
    olah = None
    try:
        for attempt in range(3):
            # The free port is chosen before olah binds it; if something else took it meanwhile, retry.
            olah_dir = workdir / f"olah-{attempt}"
            olah_dir.mkdir()
            try:
                olah = OlahProcess(olah_dir, push_server.url).start()
                break
            except OlahPortTaken:
                continue
        else:
            raise RuntimeError("olah could not bind a free loopback port in 3 attempts")
        yield LoopbackHub(
            endpoint=olah.url,
            push_endpoint=push_server.url,
            token=TEST_TOKEN,
            user=TEST_USER,
            org=TEST_ORG,
            foreign_org=FOREIGN_ORG,
            repo_root=push_server.store.root,
            olah_cache=olah.cache_dir,
            push_server=push_server,
        )
    finally:
        if olah is not None:
            olah.stop()
        push_server.stop()


@pytest.fixture
def hub(hub_servers: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LoopbackHub:
    """Per test: a fresh empty HF_HOME, and this process pushing to the push server."""
    hf_home = tmp_path / "hf_home"
    view = dataclasses.replace(hub_servers, scratch_dir=tmp_path, hf_home=hf_home)
    view.point_client_at_push_server(monkeypatch, hf_home)
    return view


def last_json_line(output: str) -> dict:
    """The last line of ``output`` that parses as a JSON object (how pull scripts report back)."""
    for line in reversed(output.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise AssertionError(f"no JSON result in the output:\n{output}")
