"""The `switch-hf` command: reconstruct text, fill masks, train and evaluate.

    switch-hf reconstruct "The quick brown fox jumps over the lazy dog."
    switch-hf fill-mask "The quick brown [MASK] jumps over the lazy dog."
    switch-hf train --help
    switch-hf evaluate --help

`--model` takes a checkpoint directory or Hub id; the default is the released checkpoint shipped in the package.
"""

import argparse
import logging
import runpy
import sys
from pathlib import Path

RELEASED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "switch-minilm-l6-e8"
SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"

logger = logging.getLogger("switch_hf")


class UsageError(Exception):
    """A mistake in the command line or its input: reported in one line, exit code 2."""


def load(model_name_or_path: str):
    """The model (eval mode) and its tokenizer from a checkpoint directory or Hub id."""
    import switch_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # A one-shot command's output is its answer: no weight-loading progress bars around it.
    transformers_logging.disable_progress_bar()

    path = Path(model_name_or_path)
    if (path.is_absolute() or model_name_or_path.startswith(".")) and not path.is_dir():
        raise UsageError(f"--model {model_name_or_path}: no such checkpoint directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForMaskedLM.from_pretrained(model_name_or_path).eval()
    except OSError as error:
        raise UsageError(f"--model {model_name_or_path}: cannot load a checkpoint there ({error})") from error
    return model, tokenizer


def tokenize(tokenizer, text: str, max_length: int):
    if not text.strip():
        raise UsageError("the text is empty: give some words to process")
    inputs = tokenizer(text, return_tensors="pt")
    if inputs["input_ids"].shape[1] > max_length:
        logger.warning(
            "The text is %d tokens long; the model reads at most %d, so it is truncated to its first %d tokens.",
            inputs["input_ids"].shape[1],
            max_length,
            max_length,
        )
        inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    return inputs


def reconstruct(args) -> None:
    import torch

    model, tokenizer = load(args.model)
    inputs = tokenize(tokenizer, args.text, model.config.max_position_embeddings)
    with torch.no_grad():
        logits = model(**inputs).logits
    print(f"Output shape: {tuple(logits.shape)}")
    # [CLS] and [SEP] positions carry no text: decode what the model predicts at the text's own tokens.
    input_ids = inputs["input_ids"][0].tolist()
    is_special = tokenizer.get_special_tokens_mask(input_ids, already_has_special_tokens=True)
    predicted = [token for token, special in zip(logits.argmax(-1)[0].tolist(), is_special) if not special]
    decoded = tokenizer.decode(predicted, skip_special_tokens=True)
    print(f"Decoded output: {decoded}")


def fill_mask(args) -> None:
    from transformers import pipeline

    model, tokenizer = load(args.model)
    if tokenizer.mask_token not in args.text:
        raise UsageError(f"the text has no {tokenizer.mask_token} token to fill")
    tokenize(tokenizer, args.text, model.config.max_position_embeddings)  # the same empty/length checks
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=args.top_k)
    predictions = fill(args.text, tokenizer_kwargs={"truncation": True})
    # One mask gives a flat list of candidates, several masks a list per mask.
    per_mask = predictions if isinstance(predictions[0], list) else [predictions]
    for index, candidates in enumerate(per_mask, start=1):
        print(f"{tokenizer.mask_token} #{index}:")
        for candidate in candidates:
            print(f"  {candidate['score']:<10.4g}{candidate['token_str']}")


def run_script(name: str, argv: list[str]) -> None:
    script = SCRIPTS_DIR / f"{name}.py"
    if not script.exists():
        raise UsageError(f"`switch-hf {name}` runs {script}, which needs a source checkout of switch-hf")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("reconstruct", "print the output shape and the text the model reconstructs"),
        ("fill-mask", "print the top predictions for each [MASK] token"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("text")
        command.add_argument(
            "--model", default=str(RELEASED_CHECKPOINT), help="checkpoint directory or Hub id (default: the release)"
        )
        if name == "fill-mask":
            command.add_argument("--top-k", type=int, default=5, help="predictions per mask (default: 5)")

    for name in ("train", "evaluate"):
        commands.add_parser(name, help=f"scripts/{name}.py (its options follow)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = build_parser()
    if argv and argv[0] in ("train", "evaluate"):
        try:
            run_script(argv[0], argv[1:])
        except UsageError as error:
            print(f"switch-hf {argv[0]}: error: {error}", file=sys.stderr)
            return 2
        return 0
    args = parser.parse_args(argv)
    try:
        {"reconstruct": reconstruct, "fill-mask": fill_mask}[args.command](args)
    except UsageError as error:
        print(f"switch-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
