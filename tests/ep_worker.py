"""One rank of the expert-parallel test (`tests/test_expert_parallel.py`), run under `torch.distributed.run` with
two CPU processes (gloo).

Each rank loads the checkpoint through transformers' distributed engine,
`from_pretrained(..., distributed_config=DistributedConfig(ep_size=2, fsdp_size=2))`, which shards the stacked expert
weights across the two ranks (`base_model_ep_plan`) and wraps the rest with FSDP2. Rank r then holds batch r: it
computes its logits in eval mode, and one training step's loss and gradients in train mode. Rank 0 writes what every
rank found to `--output`, for the test to compare against a single process.

Before that, it checks that a configuration the model cannot honour (more ranks than experts divide into) fails
before any weight is loaded.
"""

import argparse
import os
import traceback

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

from switch_hf import SwitchForTokenReconstruction


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank, whether it is sharded (DTensor) or not."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_objects(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--indivisible-checkpoint", required=True, help="a checkpoint whose experts ep_size=2 cannot split")
    parser.add_argument("--inputs", required=True, help="torch file with per-rank input_ids and labels")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    distributed_config = DistributedConfig(ep_size=2, fsdp_size=2)
    report = {"world_size": dist.get_world_size()}

    # A config the model cannot honour fails while the plans are applied, before the weights are read.
    try:
        SwitchForTokenReconstruction.from_pretrained(args.indivisible_checkpoint, distributed_config=distributed_config)
        report["indivisible_error"] = None
    except ValueError as error:
        report["indivisible_error"] = str(error)
        report["indivisible_traceback"] = traceback.format_exc()

    model = SwitchForTokenReconstruction.from_pretrained(args.checkpoint, distributed_config=distributed_config)
    experts = model.model.layers[0].moe.experts
    report["experts_implementation"] = model.config._experts_implementation
    report["local_num_experts"] = experts.num_experts
    report["up_proj_is_dtensor"] = isinstance(experts.up_proj, DTensor)
    report["up_proj_local_shape"] = list(
        (experts.up_proj.to_local() if isinstance(experts.up_proj, DTensor) else experts.up_proj).shape
    )

    inputs = torch.load(args.inputs)
    input_ids, labels = inputs["input_ids"][rank], inputs["labels"][rank]

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.train()
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    # FSDP2 averaged the gradients over the two ranks' batches; gathering them is a collective, on every rank.
    grads = {name: full(p.grad).clone() for name, p in model.named_parameters() if p.grad is not None}

    per_rank = gather_objects({"rank": rank, "logits": logits, "loss": loss.detach(), **report})
    if rank == 0:
        torch.save({"ranks": per_rank, "grads": grads}, args.output)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
