"""Package a trained checkpoint as the released default model, in Hub layout, small enough to ship in the package.

    python scripts/release.py --trained runs/release/final --eval runs/release/eval/eval_results.json

Writes switch_hf/checkpoints/switch-minilm-l6-e8/ (replacing what was there): config with `auto_map`, weights as
float16 safetensors (half the size; the config asks for float32 compute, so loading upcasts them), tokenizer, the
model and pipeline code, `eval_results.json`, `training_data.json` (the corpus manifest plus the training
arguments) and the rendered model card as README.md.

Nothing of the machine that builds the release goes into it: a path in these files becomes relative to the repository
root (configs/..., data/corpus), a bundled backbone's directory becomes the backbone's Hub id, and any other absolute
path is dropped, with a warning naming the field.
"""

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from switch_hf import SwitchForTokenReconstruction
from switch_hf.cli import RELEASED_CHECKPOINT
from switch_hf.hub import EVAL_RESULTS_FILE, TRAINING_DATA_FILE, hub_id_of, save_for_hub

logger = logging.getLogger("release")
REPO_ROOT = Path(__file__).resolve().parent.parent


def training_stages(trained: Path) -> list[dict]:
    """The train.py arguments (RUN/args.json) of every run that led to `trained` (RUN/final), first run first:
    a run started with --init-from continues the run whose final checkpoint it names."""
    stages = []
    run_dir = trained.parent
    while (run_dir / "args.json").is_file():
        arguments = json.loads((run_dir / "args.json").read_text())
        stages.insert(0, arguments)
        if not arguments.get("init_from"):
            break
        run_dir = Path(arguments["init_from"]).parent
    return stages


def portable(value, field: str):
    """`value` with every absolute path in it made machine-independent (see the module docstring); `field` names
    where it comes from, for the warning about a dropped path."""
    if isinstance(value, dict):
        return {key: portable(item, f"{field}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, f"{field}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str) or not Path(value).is_absolute():
        return value
    # The Hub id first: a bundled backbone may live in a virtual environment inside the repository.
    hub_id = hub_id_of(value)
    if hub_id is not None:
        return hub_id
    if Path(value).is_relative_to(REPO_ROOT):
        return str(Path(value).relative_to(REPO_ROOT))
    logger.warning("dropped %s from the release: %s is a path of this machine only", field, value)
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", required=True, help="the trained checkpoint (train.py's OUTPUT_DIR/final)")
    parser.add_argument("--eval", required=True, help="its eval_results.json from scripts/evaluate.py")
    parser.add_argument("--corpus-manifest", default=str(REPO_ROOT / "data" / "corpus" / "sources.json"))
    parser.add_argument("--repo-id", default="switch-hf/switch-minilm-l6-e8", help="the Hub id the card names")
    parser.add_argument("--output-dir", default=str(RELEASED_CHECKPOINT))
    parser.add_argument("--max-megabytes", type=float, default=95.0, help="refuse a release larger than this")
    args = parser.parse_args(argv)
    for name in ("trained", "eval", "corpus_manifest"):
        if not Path(getattr(args, name)).exists():
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: no such file or directory")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    trained = Path(args.trained)
    model = SwitchForTokenReconstruction.from_pretrained(trained, strict=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    eval_results = json.loads(Path(args.eval).read_text())
    eval_results.pop("model", None)  # a local path, meaningless in a release
    eval_results = portable(eval_results, EVAL_RESULTS_FILE)
    training_data = json.loads(Path(args.corpus_manifest).read_text())
    training_data["base_model"] = "sentence-transformers/all-MiniLM-L6-v2"
    stages = training_stages(trained)
    if stages:
        training_data["procedure"] = stages
    training_data = portable(training_data, TRAINING_DATA_FILE)

    output_dir = Path(args.output_dir)
    with tempfile.TemporaryDirectory(dir=output_dir.parent if output_dir.parent.exists() else None) as staging:
        staging = Path(staging) / output_dir.name
        # Stored in half precision, computed in full precision on CPU.
        save_for_hub(
            model.to(torch.float16), tokenizer, staging, args.repo_id,
            eval_results=eval_results, training_data=training_data, config_dtype=torch.float32,
        )
        (staging / EVAL_RESULTS_FILE).write_text(json.dumps(eval_results, indent=2) + "\n")
        (staging / TRAINING_DATA_FILE).write_text(json.dumps(training_data, indent=2) + "\n")

        megabytes = sum(path.stat().st_size for path in staging.rglob("*") if path.is_file()) / 1e6
        if megabytes > args.max_megabytes:
            raise SystemExit(f"the release is {megabytes:.1f} MB, over --max-megabytes {args.max_megabytes}")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), output_dir)
    logger.info("released %s (%.1f MB)", output_dir, megabytes)


if __name__ == "__main__":
    main()
