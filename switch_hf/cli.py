"""The `switch-hf` command: reconstruct text, fill masks, train and evaluate.

    switch-hf reconstruct "The quick brown fox jumps over the lazy dog."
    switch-hf fill-mask "The quick brown [MASK] jumps over the lazy dog."
    switch-hf reconstruct - < text.txt
    switch-hf train --help
    switch-hf evaluate --help

`--model` takes a checkpoint directory or Hub id; the default is the released checkpoint shipped in the package.
`--device` takes a torch device (cpu, cuda, cuda:1, mps); the default is cuda if available, else cpu.
A mistake in the command line or its input is reported in one line, with exit status 2.
"""

import argparse
import logging
import os
import runpy
import sys
from pathlib import Path

RELEASED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "switch-minilm-l6-e8"
SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"
SCRIPTS = ("train", "evaluate")


class UsageError(Exception):
    """A mistake in the command line or its input: reported in one line, exit code 2."""


def check_text(text: str) -> None:
    # Bytes that are not UTF-8 reach Python's argv as lone surrogates, which no tokenizer accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UsageError(
            f"the text is not valid UTF-8 (at character {error.start + 1}): convert it to UTF-8, e.g. with iconv"
        ) from None
    if not text.strip():
        raise UsageError("the text is empty: give some words to process")


def read_text(argument: str) -> str:
    """The text to process: the argument itself, or, for "-", everything on standard input (e.g. a piped file)."""
    if argument != "-":
        return argument
    if sys.stdin is None:
        raise UsageError("the text is - but standard input is closed: pipe the text in or give it as an argument")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"standard input is not valid UTF-8 (at byte {error.start + 1}): convert it to UTF-8, e.g. with iconv"
        ) from None


def text_token_ids(tokenizer, text: str) -> list[int]:
    """The ids of the text's own tokens; verbose=False leaves warning about a long text to the pipeline."""
    token_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not token_ids:
        raise UsageError("the text has no tokens the tokenizer reads: give some words to process")
    return token_ids


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; give one such as cpu, cuda, cuda:1 or mps") from None
    if device.type == "cpu":
        return device
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    usable = ["cpu"]
    if accelerator is not None:
        usable += [f"{accelerator.type}:{index}" for index in range(torch.accelerator.device_count())]
    if f"{device.type}:{device.index or 0}" not in usable:
        raise UsageError(f"--device {name}: not available on this machine; use one of {', '.join(usable)}")
    return device


def one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_checkpoint_directory(model_name_or_path: str) -> None:
    """A local `--model` must be what `save_pretrained` writes; anything else is a Hub id, checked by loading it."""
    path = Path(model_name_or_path)
    looks_like_a_path = path.is_absolute() or model_name_or_path.startswith(".") or model_name_or_path.count("/") > 1
    if not (path.exists() or looks_like_a_path):
        return  # a Hub id, "name" or "org/name"
    if not path.is_dir():
        what = "a file" if path.exists() else "no such directory"
        raise UsageError(f"--model {model_name_or_path}: {what}; give a checkpoint directory or a Hub id")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {model_name_or_path}: no config.json there; save the model with save_pretrained")
    if not any((path / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise UsageError(
            f"--model {model_name_or_path}: no tokenizer there; save the model's tokenizer with save_pretrained"
        )


def load_config_and_tokenizer(model_name_or_path: str):
    """The checkpoint's config and tokenizer: what the input can be checked against before the weights load."""
    import switch_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoTokenizer

    check_checkpoint_directory(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {model_name_or_path}: cannot load its config.json: {one_line(error)}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {model_name_or_path}: cannot load its tokenizer: {one_line(error)}") from error
    return config, tokenizer


def load_model(model_name_or_path: str, config):
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as transformers_logging

    # A one-shot command's output is its answer: no weight-loading progress bars around it.
    transformers_logging.disable_progress_bar()
    try:
        return AutoModelForMaskedLM.from_pretrained(model_name_or_path, config=config).eval()
    except (OSError, RuntimeError, SafetensorError) as error:
        raise UsageError(
            f"--model {model_name_or_path}: cannot load its weights ({one_line(error)}); save or download them again"
        ) from error


def reconstruction(model, tokenizer, text: str, device, top_k=None):
    """The logits' shape and the token-reconstruction pipeline's answer for `text` (truncated with one warning)."""
    from transformers import pipeline

    reconstructor = pipeline("token-reconstruction", model=model, tokenizer=tokenizer, device=device)
    # The pipeline's steps one by one, to see the logits between them.
    model_outputs = reconstructor.forward(reconstructor.preprocess(text))
    return tuple(model_outputs["logits"].shape), reconstructor.postprocess(model_outputs, top_k=top_k)


def reconstruct(args) -> None:
    args.text = read_text(args.text)
    check_text(args.text)
    device = resolve_device(args.device)
    config, tokenizer = load_config_and_tokenizer(args.model)
    text_token_ids(tokenizer, args.text)
    model = load_model(args.model, config)
    shape, result = reconstruction(model, tokenizer, args.text, device)
    print(f"Output shape: {shape}")
    print(f"Decoded output: {result['reconstructed_text']}")


def fill_mask(args) -> None:
    args.text = read_text(args.text)
    check_text(args.text)
    device = resolve_device(args.device)
    config, tokenizer = load_config_and_tokenizer(args.model)
    if args.top_k > config.vocab_size:
        raise UsageError(f"--top-k {args.top_k}: the model knows only {config.vocab_size} tokens; give at most that")
    mask = tokenizer.mask_token
    if mask is None:
        raise UsageError(f"--model {args.model}: its tokenizer has no mask token; fill-mask needs one")
    masks = text_token_ids(tokenizer, args.text).count(tokenizer.mask_token_id)
    if not masks:
        raise UsageError(f"the text has no {mask} token to fill: write {mask} where a word should be predicted")
    model = load_model(args.model, config)
    _, result = reconstruction(model, tokenizer, args.text, device, top_k=args.top_k)
    filled = [token for token in result["tokens"] if token["input_token_id"] == tokenizer.mask_token_id]
    if len(filled) < masks:
        raise UsageError(
            f"{masks - len(filled)} of the text's {masks} {mask} tokens lie past where the model stops reading: "
            "shorten the text"
        )
    for index, token in enumerate(filled, start=1):
        print(f"{mask} #{index}:")
        for candidate in token["candidates"]:
            print(f"  {candidate['score']:<10.4g}{candidate['token']}")


def run_script(name: str, argv: list[str]) -> None:
    script = SCRIPTS_DIR / f"{name}.py"
    if not script.exists():
        raise UsageError(f"`switch-hf {name}` runs {script}, which needs a source checkout of switch-hf")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def positive_int(value: str) -> int:
    number = int(value)  # argparse reports a ValueError as "invalid positive_int value"
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switch-hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("reconstruct", "print the output shape and the text the model reconstructs"),
        ("fill-mask", "print the top predictions for each [MASK] token"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("text", help="the text, or - to read it from standard input")
        command.add_argument(
            "--model", default=str(RELEASED_CHECKPOINT), help="checkpoint directory or Hub id (default: the release)"
        )
        command.add_argument(
            "--device", help="torch device such as cpu, cuda, cuda:1 or mps (default: cuda if available, else cpu)"
        )
        if name == "fill-mask":
            command.add_argument("--top-k", type=positive_int, default=5, help="predictions per mask (default: 5)")

    for name in SCRIPTS:
        commands.add_parser(name, help=f"scripts/{name}.py (its options follow)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if sys.stdout is None:  # started with stdout closed (`>&-`), where Python writes nothing and says nothing
        print("switch-hf: error: standard output is closed: redirect it to a file or /dev/null", file=sys.stderr)
        return 2
    try:
        if argv and argv[0] in SCRIPTS:
            run_script(argv[0], argv[1:])
        else:
            args = build_parser().parse_args(argv)
            {"reconstruct": reconstruct, "fill-mask": fill_mask}[args.command](args)
        sys.stdout.flush()  # inside the try: a closed stdout shows up at the latest here
    except UsageError as error:
        print(f"switch-hf {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output has gone (`| head`): stop quietly, as Unix tools do, and point stdout at devnull
        # so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
