"""Evaluate a Switch checkpoint on the held-out validation split.

    python scripts/evaluate.py --model runs/minilm-e8/final --output-dir runs/minilm-e8/eval

Measures, over the validation split's real (non-special) tokens:
- identity reconstruction: the input is left as it is; how often the argmax token is the input token;
- masked top-1 / top-5: a seeded `--mask-probability` share of tokens is replaced by [MASK] (all of them, no random
  or kept tokens: this is what fill-mask sees); how often the original token is the first, or among the first five;
- per router, the fraction of tokens each expert receives and the fraction dropped for lack of capacity.
Writes OUTPUT_DIR/eval_results.json and OUTPUT_DIR/expert_load.png.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_corpus import load_tokenized_corpus  # noqa: E402

from switch_hf.cli import RELEASED_CHECKPOINT, UsageError, load_config_and_tokenizer, load_model  # noqa: E402
from switch_hf.data import check_corpus, check_max_length, drop_examples_without_text  # noqa: E402

logger = logging.getLogger("evaluate")
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(RELEASED_CHECKPOINT), help="checkpoint directory or Hub id")
    parser.add_argument("--corpus-dir", default=str(REPO_ROOT / "data" / "corpus"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--mask-probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 < args.mask_probability < 1.0:
        parser.error(f"--mask-probability must be in (0, 1), got {args.mask_probability}")
    for name in ("batch_size", "max_length", "max_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed accepts
        parser.error(f"--seed must be an integer in [0, 2**64), got {args.seed}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file, not a directory")
    return args


@torch.no_grad()
def evaluate(model, tokenizer, examples, batch_size: int, mask_probability: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    totals = dict(identity_correct=0, identity_tokens=0, masked_top1=0, masked_top5=0, masked_tokens=0)
    tokens_per_expert = dropped = None
    routed_batches = 0
    for start in tqdm(range(0, len(examples), batch_size), desc="evaluate"):
        rows = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        features = [{key: row[key] for key in ("input_ids", "token_type_ids", "attention_mask")} for row in rows]
        batch = tokenizer.pad(features, return_tensors="pt")
        special = torch.tensor(
            [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in batch["input_ids"].tolist()],
            dtype=torch.bool,
        )
        real = batch["attention_mask"].bool() & ~special

        # The vocabulary head runs only where a token is scored: real tokens here, masked ones below.
        identity = model(**batch, labels=batch["input_ids"].masked_fill(~real, -100), only_labeled_logits=True)
        predicted = identity.logits.argmax(-1)  # (real tokens,)
        totals["identity_correct"] += (predicted == batch["input_ids"][real]).sum().item()
        totals["identity_tokens"] += real.sum().item()
        router_load = identity.tokens_per_expert  # (routers, experts)
        tokens_per_expert = router_load if tokens_per_expert is None else tokens_per_expert + router_load
        dropped = identity.dropped_fraction if dropped is None else dropped + identity.dropped_fraction
        routed_batches += 1

        masked = real & (torch.rand(real.shape, generator=generator) < mask_probability)
        if masked.any():
            corrupted = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
            labels = batch["input_ids"].masked_fill(~masked, -100)
            output = model(
                input_ids=corrupted,
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
                labels=labels,
                only_labeled_logits=True,
            )
            top5 = output.logits.topk(5, dim=-1).indices  # (masked tokens, 5)
            targets = labels[masked].unsqueeze(-1)
            totals["masked_top1"] += (top5[:, :1] == targets).sum().item()
            totals["masked_top5"] += (top5 == targets).any(-1).sum().item()
            totals["masked_tokens"] += masked.sum().item()

    if not totals["masked_tokens"]:
        raise UsageError(
            f"--mask-probability {mask_probability} masked none of the {totals['identity_tokens']} tokens evaluated: "
            f"evaluate on more text, or raise --mask-probability"
        )
    load_fraction = tokens_per_expert / tokens_per_expert.sum(-1, keepdim=True)
    return {
        "examples": len(examples),
        "identity_accuracy": totals["identity_correct"] / totals["identity_tokens"],
        "identity_tokens": totals["identity_tokens"],
        "masked_top1_accuracy": totals["masked_top1"] / totals["masked_tokens"],
        "masked_top5_accuracy": totals["masked_top5"] / totals["masked_tokens"],
        "masked_tokens": totals["masked_tokens"],
        "mask_probability": mask_probability,
        "expert_load": load_fraction.tolist(),
        "dropped_fraction": (dropped / routed_batches).tolist(),
    }


def plot_expert_load(expert_load: list[list[float]], router_names: list[str], path: Path, title: str) -> None:
    """One bar chart per router (one per Switch layer, two in a layer that routes attention and feed-forward)."""
    routers, experts = len(expert_load), len(expert_load[0])
    figure, axes = plt.subplots(1, routers, figsize=(3.2 * routers, 3), sharey=True, squeeze=False)
    for router, axis in enumerate(axes[0]):
        axis.bar(range(experts), expert_load[router])
        axis.axhline(1 / experts, color="grey", linestyle="--", linewidth=1, label="uniform")
        axis.set_title(router_names[router])
        axis.set_xlabel("expert")
        axis.set_xticks(range(experts))
    axes[0][0].set_ylabel("fraction of tokens")
    axes[0][0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_corpus(args.corpus_dir)
    config, tokenizer = load_config_and_tokenizer(args.model)
    if config.model_type != "switch":
        raise UsageError(f"--model {args.model} is a {config.model_type} model, not a Switch checkpoint")
    check_max_length(args.max_length, tokenizer, config.backbone_config.max_position_embeddings)
    model = load_model(args.model, config).float()
    validation_file = Path(args.corpus_dir) / "validation.txt"
    validation = load_tokenized_corpus(args.corpus_dir, tokenizer, args.max_length)["validation"]
    validation = drop_examples_without_text(validation, tokenizer, validation_file)
    if args.max_examples is not None:
        validation = validation.select(range(min(args.max_examples, len(validation))))

    results = {"model": args.model, "routers": model.config.router_names, **evaluate(model, tokenizer, validation, args.batch_size, args.mask_probability, args.seed)}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    plot_expert_load(results["expert_load"], results["routers"], output_dir / "expert_load.png", f"Expert load: {Path(args.model).name}")
    logger.info(
        "identity %.4f | masked top-1 %.4f | masked top-5 %.4f | dropped %s",
        results["identity_accuracy"],
        results["masked_top1_accuracy"],
        results["masked_top5_accuracy"],
        [round(x, 4) for x in results["dropped_fraction"]],
    )
    logger.info("wrote %s and %s", output_dir / "eval_results.json", output_dir / "expert_load.png")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
