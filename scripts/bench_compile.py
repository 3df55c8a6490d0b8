"""Eager vs `torch.compile` speed of the Switch model, inference and a training step, side by side in one run.

    python scripts/bench_compile.py --output results/bench_compile.json

Builds the model of `--config` at random (speed does not depend on the weights), then times, for eager and compiled
(inductor) alike: dropless inference under `torch.no_grad()`, and a training step (forward with labels, backward) in
train mode with the config's training capacity. Eager and compiled calls alternate, so a change in the machine's load
hits both; reported: each one's median over `--repeats` runs after `--warmup` runs, the compiled / eager ratio, the
compile time and the CPU model (speed differs between machines: compare ratios only within one run).
"""

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench_moe import cpu_model
from switch_hf import SwitchConfig, SwitchForTokenReconstruction

logger = logging.getLogger("bench_compile")


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved_medians(eager, compiled, warmup: int, repeats: int, label: str) -> tuple[float, float]:
    """Median seconds of each, timed in alternation so that a change in the machine's load hits both alike."""
    for _ in range(warmup):
        eager()
        compiled()
    pairs = [(seconds(eager), seconds(compiled)) for _ in tqdm(range(repeats), desc=label, leave=False)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/switch-minilm-l6-e8.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=Path("results/bench_compile.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    config = SwitchConfig.from_json_file(args.config)
    torch.manual_seed(0)
    model = SwitchForTokenReconstruction(config)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    labels = ids.masked_fill(torch.rand(ids.shape) > 0.15, -100)
    compiled = torch.compile(model)

    def infer(forward):
        model.eval()
        with torch.no_grad():
            forward(input_ids=ids)

    def train_step(forward):
        model.train()
        forward(input_ids=ids, labels=labels, only_labeled_logits=True).loss.backward()
        model.zero_grad(set_to_none=True)

    results = {}
    for mode, run in (("inference", infer), ("training_step", train_step)):
        start = time.perf_counter()
        run(compiled)  # the first call compiles
        compile_seconds = time.perf_counter() - start
        eager, fast = interleaved_medians(lambda: run(model), lambda: run(compiled), args.warmup, args.repeats, mode)
        results[mode] = {
            "eager_ms": round(eager * 1e3, 2),
            "compiled_ms": round(fast * 1e3, 2),
            "compiled_over_eager": round(fast / eager, 3),
            "compile_seconds": round(compile_seconds, 1),
        }
        logger.info("%s: eager %.1f ms, compiled %.1f ms (%.2fx), compile %.0f s", mode, eager * 1e3, fast * 1e3,
                    fast / eager, compile_seconds)  # fmt: skip

    report = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "config": args.config,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "experts_implementation": model.config._experts_implementation,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
