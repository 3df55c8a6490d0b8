"""Expert parallelism through transformers' distributed engine, on two CPU processes.

The test launches `tests/ep_worker.py` under `torch.distributed.run --nproc-per-node 2` (gloo), which loads the
checkpoint with `DistributedConfig(ep_size=2, fsdp_size=2)`: each rank holds half the experts and its own batch.
Every figure is compared with one ordinary process running the same two batches.
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig

from switch_hf import SwitchConfig, SwitchForTokenReconstruction

from conftest import REPO_ROOT, TINY_VOCAB, tiny_config

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.slow,
]

def deterministic_config(num_experts: int) -> SwitchConfig:
    """A tiny model without any randomness in training mode (no dropout, no jitter), whose capacity still drops."""
    backbone = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tiny_config(
        backbone_config=backbone,
        num_experts=num_experts,
        top_k=2,
        capacity_factor_train=1.0,
        capacity_factor_eval=None,
        hidden_dropout_prob=0.0,
        router_jitter_noise=0.0,
    )


def single_process_reference(checkpoint, input_ids, labels):
    """Each rank's logits and loss, and the gradients averaged over the ranks' batches, as FSDP averages them."""
    model = SwitchForTokenReconstruction.from_pretrained(checkpoint)
    model.eval()
    with torch.no_grad():
        logits = [model(input_ids=ids).logits for ids in input_ids]
    model.train()
    losses = []
    for ids, rank_labels in zip(input_ids, labels):
        loss = model(input_ids=ids, labels=rank_labels).loss
        (loss / len(input_ids)).backward()
        losses.append(loss.detach())
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return logits, losses, grads


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("expert_parallel")
    torch.manual_seed(0)
    model = SwitchForTokenReconstruction(deterministic_config(num_experts=4))
    for layer in model.model.layers:  # a confident router, so that capacity drops tokens and routes differ
        torch.nn.init.normal_(layer.moe.router.weight, std=1.0)
    model.save_pretrained(tmp_path / "checkpoint")
    SwitchForTokenReconstruction(deterministic_config(num_experts=3)).save_pretrained(tmp_path / "indivisible")

    input_ids = [torch.randint(1, TINY_VOCAB, (2, 9)) for _ in range(2)]
    labels = [ids.masked_fill(torch.rand(ids.shape) < 0.3, -100) for ids in input_ids]
    torch.save({"input_ids": input_ids, "labels": labels}, tmp_path / "inputs.pt")

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two processes on a small machine: do not oversubscribe its cores
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port for the rendezvous: parallel test runs do not collide
        "--nproc-per-node",
        "2",
        str(REPO_ROOT / "tests" / "ep_worker.py"),
        "--checkpoint",
        str(tmp_path / "checkpoint"),
        "--indivisible-checkpoint",
        str(tmp_path / "indivisible"),
        "--inputs",
        str(tmp_path / "inputs.pt"),
        "--output",
        str(tmp_path / "result.pt"),
    ]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    distributed = torch.load(tmp_path / "result.pt")
    reference = single_process_reference(tmp_path / "checkpoint", input_ids, labels)
    return distributed, reference


def test_experts_are_sharded_across_the_two_ranks(two_process_run):
    distributed, _ = two_process_run
    ranks = distributed["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for r in ranks:
        assert r["up_proj_is_dtensor"]
        assert r["local_num_experts"] == 2  # 4 experts over ep_size=2
        assert r["up_proj_local_shape"] == [2, 48, 32]


def test_logits_match_one_process(two_process_run):
    distributed, (logits, _, _) = two_process_run
    for r in distributed["ranks"]:
        torch.testing.assert_close(r["logits"], logits[r["rank"]], rtol=1e-5, atol=1e-5)


def test_training_step_loss_and_gradients_match_one_process(two_process_run):
    distributed, (_, losses, grads) = two_process_run
    for r in distributed["ranks"]:
        torch.testing.assert_close(r["loss"], losses[r["rank"]], rtol=1e-5, atol=1e-5)
    assert distributed["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert grads["model.layers.0.moe.experts.up_proj"].abs().sum() > 0


def test_expert_count_not_divisible_by_ep_size_fails_before_loading_weights(two_process_run):
    distributed, _ = two_process_run
    for r in distributed["ranks"]:
        assert r["indivisible_error"] is not None, "loading 3 experts with ep_size=2 should fail"
        assert "Cannot evenly shard 3 experts across 2 expert-parallel ranks" in r["indivisible_error"]
        # Raised while the plans are applied to the empty model: no weight was read yet.
        assert "maybe_distribute_model" in r["indivisible_traceback"]
        assert "_load_pretrained_model" not in r["indivisible_traceback"]
