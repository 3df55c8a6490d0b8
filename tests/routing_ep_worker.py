"""One rank of the routing variants' expert-parallel test (`tests/test_routing_variants.py`), run under
`torch.distributed.run` with two CPU processes (gloo).

For each checkpoint given, rank r loads it with `DistributedConfig(ep_size=2, fsdp_size=2)` (half the experts each),
computes batch r's logits in eval mode, then one training step's loss on batch r, and calls
`update_router_biases()`. Rank 0 writes what every rank found to `--output`.
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers.distributed import DistributedConfig

from switch_hf import SwitchForTokenReconstruction


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--inputs", required=True, help="torch file with per-rank input_ids and labels")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = torch.load(args.inputs)
    input_ids, labels = inputs["input_ids"][rank], inputs["labels"][rank]
    found = {}
    for checkpoint in args.checkpoints:
        model = SwitchForTokenReconstruction.from_pretrained(
            checkpoint, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2)
        )
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        model.train()
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        model.update_router_biases()  # a collective where the routers have a bias
        biases = [buffer.clone() for name, buffer in model.named_buffers() if name.endswith("expert_bias")]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"logits": logits, "loss": loss.detach(), "biases": biases})
        found[checkpoint] = gathered
    if rank == 0:
        torch.save(found, args.output)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
