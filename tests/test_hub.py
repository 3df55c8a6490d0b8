"""The Switch model on a Hub, round trip on loopback, and what a push or a release must never do.

Pushes use the real ``huggingface_hub`` client against the push server of ``hub_server.py``; pulls run in a fresh
interpreter where ``switch_hf`` cannot be imported, with ``HF_ENDPOINT`` = olah (a caching proxy of the push server)
and an empty HF cache, exactly as a user meets the model. Fixtures: ``hub_fixtures.py``.

Starting an interpreter that imports torch and transformers costs many seconds on the test machines, so the
published repos are pushed once per module (``published``) and one pulling interpreter does every pull; the tests
then check their part of its report.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import pipeline

import hub_server
from conftest import BLOCK_SWITCH_HF, REPO_ROOT
from hub_fixtures import SUBPROCESS_TIMEOUT_S, free_loopback_port, last_json_line
from switch_hf import hub as switch_hub
from switch_hf import modeling_switch
from switch_hf.cli import RELEASED_CHECKPOINT


def _load_script(name: str):
    # By path: putting scripts/ on sys.path would let scripts/evaluate.py shadow the `evaluate` library.
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


push_script = _load_script("push_to_hub")
release_script = _load_script("release")


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Switch transformers route every token to one expert."]
EVAL_RESULTS = {
    "model": "/local/path/that/must/not/reach/the/card",
    "examples": 3371,
    "identity_accuracy": 0.9123,
    "masked_top1_accuracy": 0.4567,
    "masked_top5_accuracy": 0.6789,
    "masked_tokens": 16000,
    "mask_probability": 0.15,
}
TRAINING_DATA = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "sources": {
        "wordnet": {"package": "wordnet-base", "version": "1:3.0-37", "licence": "WordNet-3.0", "examples": 110061,
                    "bytes": 11235995},
    },
    "splits": {"train": {"examples": 165016, "tokens": 5384595, "tokenizer": "/local/tokenizer/path"}},
    "procedure": {"max_steps": 2000, "batch_size": 32, "output_dir": "/local/run/dir"},
}

# Runs with switch_hf blocked and pulls everything through olah. It starts while the repos are being pushed (importing
# torch and transformers takes a while), reads their ids from stdin, and reports one JSON line (tensors in a file).
PULL_EVERYTHING = BLOCK_SWITCH_HF + r"""
import json, sys

import torch
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

request = json.loads(sys.stdin.read())
repos, sentences = request["repos"], request["sentences"]
report, tensors = {"endpoint": constants.ENDPOINT}, {}

def class_name(obj):
    return f"{type(obj).__module__}.{type(obj).__name__}"

def logits(model, tokenizer):
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return encoded["input_ids"], model.eval()(**encoded).logits

# 1. What `model.push_to_hub` + `tokenizer.push_to_hub` published, loaded the plain way.
# trust_remote_code for the tokenizer too: AutoTokenizer reads the config, whose model type only remote code knows.
tokenizer = AutoTokenizer.from_pretrained(repos["raw"], trust_remote_code=True)
model = AutoModelForMaskedLM.from_pretrained(repos["raw"], trust_remote_code=True)
report["raw_model_class"] = class_name(model)
tensors["raw_input_ids"], tensors["raw_logits"] = logits(model, tokenizer)
fill_mask = pipeline("fill-mask", model=model, tokenizer=tokenizer)
report["raw_fill_mask"] = fill_mask(f"The quick brown {tokenizer.mask_token} jumps over the lazy dog.")

# 2. What the push helper published: the card, its widget as the Hub runs it, and the three pipelines by repo id.
card = ModelCard.load(repos["card"])
report["card_metadata"] = card.data.to_dict()
widget_pipeline = pipeline(card.data.pipeline_tag, model=repos["card"], trust_remote_code=True)
report["widget"] = [
    {"text": example["text"], "output": widget_pipeline(example["text"])} for example in card.data.widget
]
_, tensors["card_logits"] = logits(widget_pipeline.model, widget_pipeline.tokenizer)
reconstruct = pipeline("token-reconstruction", model=repos["card"], trust_remote_code=True)
report["reconstruction_pipeline_class"] = class_name(reconstruct)
report["reconstructions"] = reconstruct(sentences)
features = pipeline("feature-extraction", model=repos["card"], trust_remote_code=True)
report["feature_model_class"] = class_name(features.model)
tensors["features"] = [torch.tensor(features(sentence)) for sentence in sentences]

# 3. Pulls that must fail clearly.
def failure(load):
    try:
        load()
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None}

for case, repo in (("no_weights", repos["no_weights"]), ("pickle_only", repos["pickle"])):
    report[case] = failure(lambda: AutoModelForMaskedLM.from_pretrained(repo, trust_remote_code=True))
report["missing_revision"] = failure(
    lambda: pipeline("token-reconstruction", model=repos["card"], revision="no-such-branch", trust_remote_code=True)
)
torch.save(tensors, request["tensors_path"])
print("\n" + json.dumps(report))
"""


def unique_repo_name(prefix: str) -> str:
    # One push server serves the whole session: every test gets its own repos.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def directory_snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file below `directory` with its sha256 and modification time: to prove a push only read it."""
    return {
        str(path.relative_to(directory)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def experts_on_torch_products():
    """Here, outputs are compared bit for bit with checkpoints pulled and run without switch_hf, hence without its
    expert kernel: this process runs the experts on torch's products too. The kernel's agreement with them is tested
    on its own (test_expert_kernel.py)."""
    modeling_switch.use_expert_kernel = False
    yield
    modeling_switch.use_expert_kernel = True


@pytest.fixture(scope="module")
def checkpoint(tiny_switch, tmp_path_factory) -> Path:
    """A checkpoint directory as training and evaluation leave it, with the card's two optional files."""
    model, tokenizer = tiny_switch
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    (directory / "training_data.json").write_text(json.dumps(TRAINING_DATA))
    return directory


def run_push_script(*args: str) -> int:
    """scripts/push_to_hub.py in this process (its exit status); the Hub is the one this process points at."""
    return push_script.main(list(args))


@pytest.fixture(scope="module")
def published(hub_servers, tiny_switch, checkpoint, tmp_path_factory) -> dict:
    """Repos published once for the module, and the report of one interpreter that pulled them all through olah.

    raw:        `model.push_to_hub` + `tokenizer.push_to_hub`, nothing else
    card:       scripts/push_to_hub.py on `checkpoint` (the push helper: card, pipeline, AutoModel mapping)
    no_weights: what the helper publishes, minus the weights
    pickle:     the same with the weights as a pickle (pytorch_model.bin) instead of safetensors
    """
    model, tokenizer = tiny_switch
    repos = {
        name: f"{hub_servers.org}/{unique_repo_name(f'switch-{name}')}" for name in ("raw", "card", "no_weights", "pickle")
    }
    scratch = tmp_path_factory.mktemp("published")
    (scratch / "pull_hf_home").mkdir()
    puller = subprocess.Popen(
        [sys.executable, "-c", PULL_EVERYTHING],
        cwd=REPO_ROOT,
        env=hub_servers.pull_environment(scratch / "pull_hf_home"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        checkpoint_before = directory_snapshot(checkpoint)
        with pytest.MonkeyPatch.context() as monkeypatch:
            hub_servers.point_client_at_push_server(monkeypatch, scratch / "push_hf_home")
            model.push_to_hub(repos["raw"], token=hub_servers.token)
            tokenizer.push_to_hub(repos["raw"], token=hub_servers.token)

            monkeypatch.setenv("HF_TOKEN", hub_servers.token)
            script_exit_code = run_push_script(str(checkpoint), repos["card"])

            api = HfApi(token=hub_servers.token)
            for name, pickle_name in (("no_weights", None), ("pickle", "pytorch_model.bin")):
                staging = scratch / name
                switch_hub.save_for_hub(model, tokenizer, staging, repos[name])
                (staging / "model.safetensors").unlink()
                if pickle_name:
                    torch.save(model.state_dict(), staging / pickle_name)
                api.create_repo(repos[name])
                api.upload_folder(repo_id=repos[name], folder_path=staging)

        tensors_path = scratch / "pulled.pt"
        request = {"repos": repos, "sentences": SENTENCES, "tensors_path": str(tensors_path)}
        stdout, stderr = puller.communicate(json.dumps(request), timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.wait()
    assert puller.returncode == 0, stderr[-5000:]

    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference_logits = model(**encoded).logits
    return {
        "repos": repos,
        "script_exit_code": script_exit_code,
        "checkpoint_unchanged": directory_snapshot(checkpoint) == checkpoint_before,
        "reference_input_ids": encoded["input_ids"],
        "reference_logits": reference_logits,
        "report": last_json_line(stdout),
        "tensors": torch.load(tensors_path),
    }


def repo_files(hub, repo_id: str, revision: str | None = None) -> dict[str, object]:
    api = HfApi(endpoint=hub.push_endpoint)
    return {f.rfilename: f for f in api.model_info(repo_id, revision=revision, files_metadata=True).siblings}


def commit_titles(hub, repo_id: str, branch: str = "main") -> list[str]:
    """The titles of the commits on `branch`, newest first, read from the push server's git repo."""
    repo_dir = hub.repo_root / "models" / repo_id
    return hub_server.run_git("-C", str(repo_dir), "log", "--format=%s", branch).decode().splitlines()


def read_repo_json(hub, repo_id: str, filename: str, revision: str = "main") -> dict:
    import httpx

    response = httpx.get(f"{hub.push_endpoint}/{repo_id}/resolve/{revision}/{filename}")
    response.raise_for_status()
    return response.json()


# --- model.push_to_hub + tokenizer.push_to_hub ----------------------------------------------------------------------


@pytest.mark.slow
def test_plain_push_holds_config_weights_tokenizer_code_and_card(hub, published):
    repo_id = published["repos"]["raw"]

    files = repo_files(hub, repo_id)

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "configuration_switch.py", "modeling_switch.py"} <= set(files)
    assert files["model.safetensors"].lfs is not None  # weights travel through LFS, as on the Hub
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = read_repo_json(hub, repo_id, "config.json")
    assert config["auto_map"] == {
        "AutoConfig": "configuration_switch.SwitchConfig",
        "AutoModelForMaskedLM": "modeling_switch.SwitchForTokenReconstruction",
    }


@pytest.mark.slow
def test_plain_push_pulls_through_olah_without_switch_hf_with_identical_logits(hub, published):
    report, tensors = published["report"], published["tensors"]

    assert report["endpoint"] == hub.endpoint
    assert report["raw_model_class"].startswith("transformers_modules.")
    assert report["raw_model_class"].endswith(".modeling_switch.SwitchForTokenReconstruction")
    assert torch.equal(tensors["raw_input_ids"], published["reference_input_ids"])
    assert torch.equal(tensors["raw_logits"], published["reference_logits"])


@pytest.mark.slow
def test_plain_push_serves_fill_mask_from_the_hub(tiny_switch, published):
    model, tokenizer = tiny_switch
    text = f"The quick brown {tokenizer.mask_token} jumps over the lazy dog."

    expected = pipeline("fill-mask", model=model, tokenizer=tokenizer)(text)

    assert published["report"]["raw_fill_mask"] == expected


# --- scripts/push_to_hub.py and the push helper ---------------------------------------------------------------------


@pytest.mark.slow
def test_push_script_publishes_everything_in_one_commit_and_only_reads_the_checkpoint(hub, published):
    repo_id = published["repos"]["card"]

    files = repo_files(hub, repo_id)
    commits = commit_titles(hub, repo_id)

    assert published["script_exit_code"] == 0
    assert published["checkpoint_unchanged"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "configuration_switch.py", "modeling_switch.py", "pipeline_switch.py"} <= set(files)
    assert len(commits) == 2, commits  # the repo's initial commit, then everything at once
    config = read_repo_json(hub, repo_id, "config.json")
    assert config["auto_map"] == {
        "AutoConfig": "configuration_switch.SwitchConfig",
        "AutoModel": "modeling_switch.SwitchModel",
        "AutoModelForMaskedLM": "modeling_switch.SwitchForTokenReconstruction",
    }
    assert config["custom_pipelines"] == {
        "token-reconstruction": {
            "impl": "pipeline_switch.TokenReconstructionPipeline", "pt": ["AutoModelForMaskedLM"], "type": "text"
        }
    }


@pytest.mark.slow
def test_pushed_model_pulls_through_olah_with_identical_logits(published):
    assert torch.equal(published["tensors"]["card_logits"], published["reference_logits"])


@pytest.mark.slow
def test_token_reconstruction_pipeline_loads_from_the_hub_without_switch_hf(tiny_switch, published):
    model, tokenizer = tiny_switch
    report = published["report"]

    expected = pipeline("token-reconstruction", model=model, tokenizer=tokenizer)(SENTENCES)

    assert report["reconstruction_pipeline_class"].startswith("transformers_modules.")
    assert report["reconstruction_pipeline_class"].endswith(".pipeline_switch.TokenReconstructionPipeline")
    assert report["reconstructions"] == expected


@pytest.mark.slow
def test_feature_extraction_pipeline_loads_switch_model_from_the_hub(tiny_switch, published):
    model, tokenizer = tiny_switch
    local = pipeline("feature-extraction", model=model.model, tokenizer=tokenizer)

    assert published["report"]["feature_model_class"].endswith(".modeling_switch.SwitchModel")
    for sentence, pulled in zip(SENTENCES, published["tensors"]["features"]):
        assert torch.equal(pulled, torch.tensor(local(sentence)))


@pytest.mark.slow
def test_card_metadata_parses_and_describes_the_model(published):
    metadata = published["report"]["card_metadata"]  # parsed by huggingface_hub.ModelCard in the pulling process

    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "fill-mask"
    assert metadata["license"] == "apache-2.0"
    assert {"switch-transformer", "mixture-of-experts", "bert"} <= set(metadata["tags"])
    assert metadata["base_model"] == TRAINING_DATA["base_model"]
    results = metadata["model-index"][0]["results"]
    reported = {metric["type"]: metric["value"] for result in results for metric in result["metrics"]}
    assert reported == {key: EVAL_RESULTS[key] for key in switch_hub.EVAL_METRICS}


@pytest.mark.slow
def test_every_widget_example_runs_through_the_pipeline_its_card_names(tiny_switch, published):
    model, tokenizer = tiny_switch
    widget = published["report"]["widget"]
    local = pipeline("fill-mask", model=model, tokenizer=tokenizer)

    assert len(widget) == len(switch_hub.WIDGET_TEMPLATES)
    for example in widget:
        assert tokenizer.mask_token in example["text"]
        assert example["output"] == local(example["text"])


@pytest.mark.slow
def test_pulling_a_repo_without_weights_fails_clearly(published):
    failure = published["report"]["no_weights"]

    assert failure["error"] == "OSError"
    assert published["repos"]["no_weights"] in failure["message"]
    assert "model.safetensors" in failure["message"]


@pytest.mark.slow
def test_pulling_a_repo_with_only_pickle_weights_fails_clearly(published):
    failure = published["report"]["pickle_only"]

    assert failure["error"] is not None, "a pickle-only repo loaded: pickles must not be unpickled from a Hub repo"
    assert "has no safetensors weights" in failure["message"]


@pytest.mark.slow
def test_pulling_a_missing_revision_says_the_revision_does_not_exist(published):
    failure = published["report"]["missing_revision"]

    assert failure["error"] is not None
    assert "no-such-branch" in failure["message"]
    assert "not a valid git identifier" in failure["message"] or "Invalid rev id" in failure["message"]


# --- pushes the server refuses, and interrupted pushes ---------------------------------------------------------------


VALID_TOKEN = "<the test user's token>"


@pytest.mark.parametrize(
    ("token", "namespace", "expected_message"),
    [
        (None, "org", "HTTP 401): Authentication required"),
        ("hf_not_a_valid_token", "org", "HTTP 401): Invalid credentials in Authorization header"),
        (VALID_TOKEN, "nobody-knows-this-org", "HTTP 404): Namespace 'nobody-knows-this-org' does not exist"),
        (VALID_TOKEN, "closed-org", "HTTP 403): You don't have the rights to create a model under the namespace"),
    ],
    ids=["no-token", "bad-token", "unknown-namespace", "foreign-namespace"],
)
def test_refused_push_fails_with_the_servers_message_and_leaves_the_checkpoint_alone(
    hub, checkpoint, capsys, monkeypatch, token, namespace, expected_message
):
    if token == VALID_TOKEN:
        token = hub.token
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    repo_id = f"{namespace}/{unique_repo_name('refused')}"
    before = directory_snapshot(checkpoint)

    exit_code = run_push_script(str(checkpoint), repo_id)

    assert exit_code == 1
    assert expected_message in capsys.readouterr().err
    assert hub.branch_head(repo_id) is None
    assert directory_snapshot(checkpoint) == before


def test_server_error_on_commit_fails_with_its_message_and_commits_nothing(hub, checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('server-error')}"
    HfApi().create_repo(repo_id)
    head_before = hub.branch_head(repo_id)

    def storage_down(handler, namespace, name, revision):
        raise hub_server.HubError(500, "Commit storage is temporarily unavailable")

    monkeypatch.setattr(hub_server.HubRequestHandler, "commit", storage_down)
    exit_code = run_push_script(str(checkpoint), repo_id)

    assert exit_code == 1
    assert "HTTP 500): Commit storage is temporarily unavailable" in capsys.readouterr().err
    assert hub.branch_head(repo_id) == head_before
    assert [entry.path for entry in HfApi().list_repo_tree(repo_id)] == [".gitattributes"]


@pytest.mark.slow
def test_push_interrupted_during_the_weights_upload_leaves_no_commit(hub, checkpoint, monkeypatch, tmp_path):
    """Ctrl-C while model.safetensors is on its way: nothing is committed, the repo the push created is deleted, and
    its staging copy is removed."""
    repo_id = f"{hub.org}/{unique_repo_name('interrupted')}"
    temporary_dir = tmp_path / "tmp"
    temporary_dir.mkdir()
    store = hub.push_server.store
    upload_started, let_upload_continue = threading.Event(), threading.Event()
    store_upload = store.store_upload

    def stalled_upload(ticket, body):
        upload_started.set()
        let_upload_continue.wait(timeout=120)
        return store_upload(ticket, body)  # reads what is left of the interrupted body: rejected as short

    monkeypatch.setattr(store, "store_upload", stalled_upload)
    environment = {
        **hub.pull_environment(hub.new_hf_home()),
        "HF_ENDPOINT": hub.push_endpoint,
        "HF_TOKEN": hub.token,
        "TMPDIR": str(temporary_dir),
    }
    before = directory_snapshot(checkpoint)
    push = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "push_to_hub.py"), str(checkpoint), repo_id],
        env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A user's Ctrl-C reaches a push whose SIGINT is live; a test run started in the background by a
        # non-interactive shell would otherwise pass SIGINT on as ignored, and Python would never see it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert upload_started.wait(timeout=240), "the push never started uploading the weights"
        push.send_signal(signal.SIGINT)
        _, stderr = push.communicate(timeout=120)
    finally:
        let_upload_continue.set()
        if push.poll() is None:
            push.kill()
            push.wait()

    assert push.returncode == 130, stderr[-3000:]
    assert "interrupted; no partial commit was made" in stderr
    assert f"deleted the repo {repo_id} that it had created" in stderr
    assert hub.branch_head(repo_id) is None
    assert list(temporary_dir.iterdir()) == []
    assert directory_snapshot(checkpoint) == before


def test_push_to_a_revision_leaves_main_alone(hub, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('revision')}"

    assert run_push_script(str(checkpoint), repo_id, "--revision", "experiment", "--private") == 0

    api = HfApi()
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    published_files = set(api.list_repo_files(repo_id, revision="experiment"))
    assert {"model.safetensors", "pipeline_switch.py", "README.md"} <= published_files


def test_a_second_push_replaces_stale_weight_files(hub, tiny_switch, monkeypatch, tmp_path):
    model, tokenizer = tiny_switch
    repo_id = f"{hub.org}/{unique_repo_name('repush')}"
    api = HfApi(token=hub.token)
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"old pickle", path_in_repo="pytorch_model.bin", repo_id=repo_id)

    switch_hub.push_to_hub(model, tokenizer, repo_id, token=hub.token)

    files = set(api.list_repo_files(repo_id))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files


# --- failures after the repo was created: nothing left behind --------------------------------------------------------


@pytest.fixture
def temporary_dir(tmp_path, monkeypatch) -> Path:
    """This process's temporary directory for the test, to see what a push leaves there."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_push_cut_off_after_creating_the_repo_deletes_the_repo_and_its_staging_copy(
    hub, checkpoint, capsys, caplog, monkeypatch, temporary_dir
):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('cut-off')}"

    def connection_cut(handler, namespace, name, revision):
        raise ConnectionResetError("the connection was cut")  # the server closes it without an answer

    monkeypatch.setattr(hub_server.HubRequestHandler, "commit", connection_cut)
    exit_code = run_push_script(str(checkpoint), repo_id)

    assert exit_code == 1
    stderr = capsys.readouterr().err
    assert f"cannot reach the Hub at {hub.push_endpoint}: Server disconnected without sending a response." in stderr
    assert f"deleted the repo {repo_id} that it had created" in caplog.text
    assert hub.branch_head(repo_id) is None
    assert list(temporary_dir.iterdir()) == []


def test_refused_weights_upload_is_reported_and_deletes_the_repo_the_push_created(hub, checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('upload-refused')}"

    def storage_full(ticket, body):
        raise hub_server.HubError(507, "LFS storage is full")

    monkeypatch.setattr(hub.push_server.store, "store_upload", storage_full)
    exit_code = run_push_script(str(checkpoint), repo_id)

    assert exit_code == 1
    stderr = capsys.readouterr().err
    assert (
        "push_to_hub: error: Error while uploading 'model.safetensors' to the Hub: "
        "the Hub refused the push (HTTP 507): LFS storage is full"
    ) in stderr
    assert "Traceback" not in stderr
    assert hub.branch_head(repo_id) is None


def test_sigterm_stops_a_push_like_ctrl_c_and_removes_its_staging_copy(
    hub, checkpoint, capsys, caplog, monkeypatch, temporary_dir
):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('terminated')}"
    preupload = hub_server.HubRequestHandler.preupload
    main_thread = threading.main_thread().ident

    def terminate_the_push(handler, *args):
        signal.pthread_kill(main_thread, signal.SIGTERM)  # the pushing thread, blocked waiting for this answer
        return preupload(handler, *args)

    monkeypatch.setattr(hub_server.HubRequestHandler, "preupload", terminate_the_push)
    signals_seen_by_the_test = []
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: signals_seen_by_the_test.append(signum))
    try:
        exit_code = run_push_script(str(checkpoint), repo_id)
        handler_after_the_push = signal.getsignal(signal.SIGTERM)
    finally:
        test_handler = signal.signal(signal.SIGTERM, previous_handler)

    assert exit_code == 130
    assert signals_seen_by_the_test == []
    assert handler_after_the_push is test_handler  # the script put the handler it found back
    stderr = capsys.readouterr().err
    assert "interrupted; no partial commit was made" in stderr
    assert f"deleted the repo {repo_id} that it had created" in caplog.text
    assert hub.branch_head(repo_id) is None
    assert list(temporary_dir.iterdir()) == []


# --- credentials ----------------------------------------------------------------------------------------------------


ENDPOINT_PASSWORD = "s3cret-Passw0rd"


@pytest.mark.parametrize("server", ["unreachable", "loopback-hub"])
def test_credentials_never_appear_in_messages_or_logs(hub, checkpoint, capfd, caplog, monkeypatch, server):
    from huggingface_hub import constants

    # Nothing listens on a free port once its probe socket is closed.
    host = f"127.0.0.1:{free_loopback_port()}" if server == "unreachable" else hub.push_endpoint.split("://")[1]
    endpoint = f"http://pusher:{ENDPOINT_PASSWORD}@{host}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    caplog.set_level(logging.DEBUG)

    exit_code = run_push_script(str(checkpoint), f"{hub.org}/{unique_repo_name('credentials')}")

    assert exit_code == 1
    output = capfd.readouterr()
    everything = output.out + output.err + caplog.text
    assert f"http://***@{host}" in everything  # the endpoint is named, without its userinfo
    for secret in (ENDPOINT_PASSWORD, hub.token, "pusher:"):
        assert secret not in everything


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("POST https://user:pa@ss@hub.example/api/repos/create", "POST https://***@hub.example/api/repos/create"),
        ("Authorization: Bearer abc.def", "Authorization: Bearer ***"),
        ("token hf_" + "A1" * 17 + " refused", "token *** refused"),
        ("echo of my-token-value and my%2Dpw", "echo of *** and ***"),
    ],
    ids=["userinfo", "bearer", "hf-token", "known-secrets"],
)
def test_redact_credentials(text, redacted):
    assert switch_hub.redact_credentials(text, ["my-token-value", "my%2Dpw"]) == redacted


def _files_of_pushed_repo(hub, repo_id: str) -> dict[str, bytes]:
    repo = hub.push_server.store.get_repo(*repo_id.split("/"))
    return {
        entry.path: b"".join(repo.open_content(entry)(0, entry.size))
        for entry in repo.all_files(hub.branch_head(repo_id))
    }


def test_token_is_never_logged_nor_written_to_a_file(hub, checkpoint, capfd, caplog, monkeypatch, temporary_dir):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('token')}"
    caplog.set_level(logging.DEBUG)

    assert run_push_script(str(checkpoint), repo_id) == 0

    output = capfd.readouterr()
    assert hub.token not in output.out + output.err + caplog.text
    written = [path for directory in (hub.hf_home, temporary_dir, checkpoint) for path in directory.rglob("*")]
    assert not [path for path in written if path.is_file() and hub.token.encode() in path.read_bytes()]
    pushed = _files_of_pushed_repo(hub, repo_id)
    assert "model.safetensors" in pushed
    assert not [path for path, content in pushed.items() if hub.token.encode() in content]


# --- what a push publishes: dtypes, and only the package's code -------------------------------------------------------


def safetensors_dtypes(content: bytes) -> dict[str, str]:
    """The dtype of every tensor of a safetensors file's bytes, from its header."""
    (header_size,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8 : 8 + header_size])
    return {name: info["dtype"] for name, info in header.items() if name != "__metadata__"}


@pytest.mark.parametrize("declared_dtype", ["float16", "float32"], ids=["float16", "float16-computed-in-float32"])
def test_float16_checkpoint_pushes_float16_tensors(hub, tiny_switch, tmp_path, monkeypatch, declared_dtype):
    """A checkpoint's weights keep their stored dtype on the Hub, and its config keeps the dtype it declares (the
    release stores float16 weights and declares float32)."""
    model, tokenizer = tiny_switch
    checkpoint = tmp_path / "checkpoint"
    copy.deepcopy(model).to(torch.float16).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["dtype"] = declared_dtype
    (checkpoint / "config.json").write_text(json.dumps(config))
    stored = safetensors_dtypes((checkpoint / "model.safetensors").read_bytes())
    assert set(stored.values()) == {"F16"}
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo_id = f"{hub.org}/{unique_repo_name('float16')}"

    assert run_push_script(str(checkpoint), repo_id) == 0

    pushed = _files_of_pushed_repo(hub, repo_id)
    assert safetensors_dtypes(pushed["model.safetensors"]) == stored
    assert json.loads(pushed["config.json"])["dtype"] == declared_dtype


def test_checkpoint_code_never_runs_and_only_the_packages_code_is_published(checkpoint, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    marker = tmp_path / "checkpoint-code-ran"
    for module in ("configuration_switch.py", "modeling_switch.py"):
        (tampered / module).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text({module!r})\n")
    staged = tmp_path / "staged"

    assert run_push_script(str(tampered), "org/switch-bert", "--save-to", str(staged)) == 0

    assert not marker.exists()
    for module in ("configuration_switch.py", "modeling_switch.py", "pipeline_switch.py"):
        assert (staged / module).read_bytes() == (REPO_ROOT / "switch_hf" / module).read_bytes()


def test_tokenizer_with_custom_code_is_refused_and_its_code_never_runs(checkpoint, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    marker = tmp_path / "checkpoint-code-ran"
    (tampered / "custom_tokenizer.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    tokenizer_config = json.loads((tampered / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    (tampered / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    exit_code = run_push_script(str(tampered), "org/switch-bert", "--save-to", str(tmp_path / "staged"))

    assert exit_code == 2
    assert "the tokenizer maps to custom code" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "staged").exists()


def test_pickle_only_checkpoint_is_refused_without_unpickling_it(checkpoint, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    exit_code = run_push_script(str(pickled), "org/switch-bert", "--save-to", str(tmp_path / "staged"))

    assert exit_code == 2
    assert "has no safetensors weights" in capsys.readouterr().err


# --- staging and the card, without a server ---------------------------------------------------------------------------


def test_save_to_stages_the_repo_without_pushing(checkpoint, tmp_path):
    staged = tmp_path / "staged"

    assert run_push_script(str(checkpoint), "org/switch-bert", "--save-to", str(staged)) == 0

    assert sorted(path.name for path in staged.iterdir()) == [
        "README.md", "config.json", "configuration_switch.py", "model.safetensors", "modeling_switch.py",
        "pipeline_switch.py", "tokenizer.json", "tokenizer_config.json",
    ]
    card = ModelCard.load(staged / "README.md")
    assert card.data.model_name == "switch-bert"
    assert 'from_pretrained("org/switch-bert", trust_remote_code=True)' in card.text
    for local_path in (EVAL_RESULTS["model"], TRAINING_DATA["splits"]["train"]["tokenizer"], "/local/run/dir"):
        assert local_path not in card.content


@pytest.mark.parametrize("where", ["the-checkpoint", "inside-the-checkpoint"])
def test_save_to_the_checkpoint_directory_is_refused(checkpoint, capsys, where):
    save_to = checkpoint if where == "the-checkpoint" else checkpoint / "preview"
    before = directory_snapshot(checkpoint)

    with pytest.raises(SystemExit) as exit_info:
        run_push_script(str(checkpoint), "org/switch-bert", "--save-to", str(save_to))

    assert exit_info.value.code == 2
    assert f"--save-to {save_to} is in the checkpoint directory" in capsys.readouterr().err
    assert directory_snapshot(checkpoint) == before
    assert not (checkpoint / "preview").exists()


@pytest.mark.parametrize(
    ("leftover", "message"),
    [("pytorch_model.bin", "is not empty (1 entries, e.g. pytorch_model.bin)"), (None, "is not a directory")],
    ids=["stale-weights", "a-file"],
)
def test_save_to_a_non_empty_directory_or_a_file_is_refused(checkpoint, tmp_path, capsys, leftover, message):
    save_to = tmp_path / "staged"
    if leftover is None:
        save_to.write_text("not a directory")
    else:
        save_to.mkdir()
        (save_to / leftover).write_bytes(b"weights of an older push")
    before = directory_snapshot(tmp_path)

    exit_code = run_push_script(str(checkpoint), "org/switch-bert", "--save-to", str(save_to))

    assert exit_code == 2
    assert f"push_to_hub: error: --save-to: {save_to} {message}" in capsys.readouterr().err
    assert directory_snapshot(tmp_path) == before


def test_card_says_what_was_not_recorded(tiny_switch):
    model, tokenizer = tiny_switch

    card = switch_hub.render_model_card(model, tokenizer, "org/switch-bert")

    assert "The training data of this checkpoint was not recorded." in card.text
    assert "The hyper-parameters of this checkpoint were not recorded." in card.text
    assert "No evaluation results were recorded for this checkpoint." in card.text
    assert "model-index" not in card.data.to_dict()
    assert card.data.widget == [
        {"text": template.format(mask=tokenizer.mask_token)} for template in switch_hub.WIDGET_TEMPLATES
    ]


def test_card_reports_recorded_results_training_data_and_procedure(tiny_switch):
    model, tokenizer = tiny_switch

    card = switch_hub.render_model_card(
        model, tokenizer, "org/switch-bert", eval_results=EVAL_RESULTS, training_data=TRAINING_DATA
    )

    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == {
        key: EVAL_RESULTS[key] for key in switch_hub.EVAL_METRICS
    }
    assert "| Masked-token top-1 accuracy | 0.4567 |" in card.text
    assert "| wordnet | `wordnet-base` | 1:3.0-37 | WordNet-3.0 | 110,061 | 11.24 |" in card.text
    assert "| optimizer steps (`max_steps`) | 2000 |" in card.text
    assert "{{" not in card.content and "{%" not in card.content


def test_card_reports_each_training_stage(tiny_switch):
    model, tokenizer = tiny_switch
    stages = [{"max_steps": 2200, "mask_probability": 0.25}, {"max_steps": 300, "init_from": "/local/run/final"}]

    card = switch_hub.render_model_card(
        model, tokenizer, "org/switch-bert", eval_results=EVAL_RESULTS, training_data={**TRAINING_DATA, "procedure": stages}
    )

    assert "Training ran in 2 stages" in card.text
    assert "| hyper-parameter | stage 1 | stage 2 |" in card.text
    assert "| optimizer steps (`max_steps`) | 2200 | 300 |" in card.text
    assert "| share of tokens corrupted (80% [MASK], 10% random, 10% kept) (`mask_probability`) | 0.25 |  |" in card.text
    assert "/local/run" not in card.content


@pytest.mark.parametrize(
    ("eval_results", "message"),
    [
        ({"masked_top1_accuracy": 45.6}, "masked_top1_accuracy must be a fraction in \\[0, 1\\], got 45.6"),
        ({"examples": 10}, "has none of the metrics"),
    ],
    ids=["percent-not-fraction", "no-metric"],
)
def test_bad_eval_results_fail_before_anything_is_pushed(tiny_switch, eval_results, message):
    model, tokenizer = tiny_switch

    with pytest.raises(ValueError, match=message):
        switch_hub.render_model_card(model, tokenizer, "org/switch-bert", eval_results=eval_results)


# --- nothing of this machine in a published file ----------------------------------------------------------------------


def machine_paths(*more: Path) -> list[str]:
    """Absolute paths of this machine: the repository, the Python environment, the home directory, ..."""
    paths = {REPO_ROOT, Path(sys.prefix), Path.home(), *more}
    return sorted(str(path) for path in paths if path != Path(path.anchor))


def files_naming(directory: Path, paths: list[str]) -> dict[str, list[str]]:
    """The files below `directory` that contain any of `paths` (a safetensors file: in its header, the rest is
    numbers), with the paths found."""
    found = {}
    for file in sorted(directory.rglob("*")):
        if not file.is_file():
            continue
        content = file.read_bytes()
        if file.suffix == ".safetensors":
            (header_size,) = struct.unpack("<Q", content[:8])
            content = content[8 : 8 + header_size]
        named = [path for path in paths if path.encode() in content]
        if named:
            found[str(file.relative_to(directory))] = named
    return found


def test_released_checkpoint_names_no_path_of_this_machine(minilm_path):
    assert files_naming(RELEASED_CHECKPOINT, machine_paths(Path(minilm_path))) == {}


@pytest.mark.parametrize("backbone_source", ["bundled-backbone", "local-directory"])
def test_save_for_hub_names_the_backbone_by_its_hub_id_not_its_directory(
    tiny_switch, minilm_path, tmp_path, monkeypatch, backbone_source
):
    model, tokenizer = tiny_switch
    backbone_dir = Path(minilm_path) if backbone_source == "bundled-backbone" else tmp_path / "my-backbone"
    backbone_dir.mkdir(exist_ok=True)
    # What `SwitchForTokenReconstruction.from_backbone(directory)` records.
    monkeypatch.setattr(model.config.backbone_config, "_name_or_path", str(backbone_dir))
    staged = tmp_path / "staged"

    switch_hub.save_for_hub(model, tokenizer, staged, "org/switch-bert")

    assert files_naming(staged, machine_paths(tmp_path, backbone_dir)) == {}
    backbone_config = json.loads((staged / "config.json").read_text())["backbone_config"]
    expected = {"bundled-backbone": "sentence-transformers/all-MiniLM-L6-v2", "local-directory": None}[backbone_source]
    assert backbone_config.get("_name_or_path") == expected


def test_release_script_writes_a_release_without_paths_of_this_machine(tiny_switch, minilm_path, tmp_path, monkeypatch):
    model, tokenizer = tiny_switch
    run_dir = tmp_path / "runs" / "release"
    trained = run_dir / "final"
    monkeypatch.setattr(model.config.backbone_config, "_name_or_path", minilm_path)
    model.save_pretrained(trained)
    tokenizer.save_pretrained(trained)
    arguments = {"config": str(REPO_ROOT / "configs" / "switch.json"), "corpus_dir": str(REPO_ROOT / "data" / "corpus"),
                 "output_dir": str(run_dir), "max_steps": 10}
    (run_dir / "args.json").write_text(json.dumps(arguments))
    eval_path = tmp_path / "eval_results.json"
    eval_path.write_text(json.dumps({**EVAL_RESULTS, "model": str(trained)}))
    manifest_path = tmp_path / "sources.json"
    manifest_path.write_text(json.dumps({"splits": {"train": {"examples": 5, "tokenizer": minilm_path}}}))
    release = tmp_path / "release"

    release_script.main([
        "--trained", str(trained), "--eval", str(eval_path), "--corpus-manifest", str(manifest_path),
        "--output-dir", str(release), "--max-megabytes", "1000",
    ])

    assert files_naming(release, machine_paths(tmp_path, Path(minilm_path))) == {}
    training_data = json.loads((release / "training_data.json").read_text())
    assert training_data["splits"]["train"]["tokenizer"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert training_data["procedure"] == [
        {"config": "configs/switch.json", "corpus_dir": "data/corpus", "output_dir": None, "max_steps": 10}
    ]
    config = json.loads((release / "config.json").read_text())
    assert config["backbone_config"]["_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["dtype"] == "float32"
    assert set(safetensors_dtypes((release / "model.safetensors").read_bytes()).values()) == {"F16"}
