"""Issue #4: the Switch model on a Hub, round trip on loopback.

Pushes use the real ``huggingface_hub`` client against the push server of ``hub_server.py``; pulls run in a fresh
interpreter where ``switch_hf`` cannot be imported, with ``HF_ENDPOINT`` = olah (a caching proxy of the push server)
and an empty HF cache, exactly as a user meets the model. Fixtures: ``hub_fixtures.py``.

Starting an interpreter that imports torch and transformers costs many seconds on the test machines, so the
published repos are pushed once per module (``published``) and one pulling interpreter does every pull; the tests
then check their part of its report.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import pipeline

import hub_server
from conftest import BLOCK_SWITCH_HF, REPO_ROOT
from hub_fixtures import SUBPROCESS_TIMEOUT_S, last_json_line
from switch_hf import hub as switch_hub
from switch_hf import modeling_switch


def _load_push_script():
    # By path: putting scripts/ on sys.path would let scripts/evaluate.py shadow the `evaluate` library.
    spec = importlib.util.spec_from_file_location("push_to_hub_script", REPO_ROOT / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


push_script = _load_push_script()


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


def test_plain_push_pulls_through_olah_without_switch_hf_with_identical_logits(hub, published):
    report, tensors = published["report"], published["tensors"]

    assert report["endpoint"] == hub.endpoint
    assert report["raw_model_class"].startswith("transformers_modules.")
    assert report["raw_model_class"].endswith(".modeling_switch.SwitchForTokenReconstruction")
    assert torch.equal(tensors["raw_input_ids"], published["reference_input_ids"])
    assert torch.equal(tensors["raw_logits"], published["reference_logits"])


def test_plain_push_serves_fill_mask_from_the_hub(tiny_switch, published):
    model, tokenizer = tiny_switch
    text = f"The quick brown {tokenizer.mask_token} jumps over the lazy dog."

    expected = pipeline("fill-mask", model=model, tokenizer=tokenizer)(text)

    assert published["report"]["raw_fill_mask"] == expected


# --- scripts/push_to_hub.py and the push helper ---------------------------------------------------------------------


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


def test_pushed_model_pulls_through_olah_with_identical_logits(published):
    assert torch.equal(published["tensors"]["card_logits"], published["reference_logits"])


def test_token_reconstruction_pipeline_loads_from_the_hub_without_switch_hf(tiny_switch, published):
    model, tokenizer = tiny_switch
    report = published["report"]

    expected = pipeline("token-reconstruction", model=model, tokenizer=tokenizer)(SENTENCES)

    assert report["reconstruction_pipeline_class"].startswith("transformers_modules.")
    assert report["reconstruction_pipeline_class"].endswith(".pipeline_switch.TokenReconstructionPipeline")
    assert report["reconstructions"] == expected


def test_feature_extraction_pipeline_loads_switch_model_from_the_hub(tiny_switch, published):
    model, tokenizer = tiny_switch
    local = pipeline("feature-extraction", model=model.model, tokenizer=tokenizer)

    assert published["report"]["feature_model_class"].endswith(".modeling_switch.SwitchModel")
    for sentence, pulled in zip(SENTENCES, published["tensors"]["features"]):
        assert torch.equal(pulled, torch.tensor(local(sentence)))


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


def test_every_widget_example_runs_through_the_pipeline_its_card_names(tiny_switch, published):
    model, tokenizer = tiny_switch
    widget = published["report"]["widget"]
    local = pipeline("fill-mask", model=model, tokenizer=tokenizer)

    assert len(widget) == len(switch_hub.WIDGET_TEMPLATES)
    for example in widget:
        assert tokenizer.mask_token in example["text"]
        assert example["output"] == local(example["text"])


def test_pulling_a_repo_without_weights_fails_clearly(published):
    failure = published["report"]["no_weights"]

    assert failure["error"] == "OSError"
    assert published["repos"]["no_weights"] in failure["message"]
    assert "model.safetensors" in failure["message"]


def test_pulling_a_repo_with_only_pickle_weights_fails_clearly(published):
    failure = published["report"]["pickle_only"]

    assert failure["error"] is not None, "a pickle-only repo loaded: pickles must not be unpickled from a Hub repo"
    assert "has no safetensors weights" in failure["message"]


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


def test_push_interrupted_during_the_weights_upload_leaves_no_commit(hub, checkpoint, monkeypatch):
    """Ctrl-C while model.safetensors is on its way: the repo exists, but holds no part of the push."""
    repo_id = f"{hub.org}/{unique_repo_name('interrupted')}"
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
    assert commit_titles(hub, repo_id) == ["initial commit"]
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
