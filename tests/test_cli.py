"""The `switch-hf` command: reconstruct and fill-mask on a checkpoint, their errors, and the released default."""

import io
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import pipeline

import switch_hf
from switch_hf.cli import RELEASED_CHECKPOINT, main

SEED_TEXT = "The quick brown fox jumps over the lazy dog."


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv)'s exit status, stdout and stderr, whether it returns or argparse exits."""
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(tiny_switch, tmp_path_factory):
    model, tokenizer = tiny_switch
    path = tmp_path_factory.mktemp("cli") / "checkpoint"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reconstruct_prints_the_shape_and_the_decoded_text(checkpoint, capsys):
    assert main(["reconstruct", SEED_TEXT, "--model", str(checkpoint)]) == 0
    shape_line, text_line = capsys.readouterr().out.strip().splitlines()
    assert shape_line == "Output shape: (1, 12, 30522)"
    assert text_line.startswith("Decoded output: ")


def test_fill_mask_prints_the_top_candidates_with_scores(checkpoint, capsys):
    assert main(["fill-mask", "The quick brown [MASK] jumps.", "--model", str(checkpoint), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "[MASK] #1:"
    scores = [float(line.split()[0]) for line in lines[1:]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)


@pytest.mark.parametrize("command", ["reconstruct", "fill-mask"])
@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_exits_2_before_the_model_loads(checkpoint, capsys, monkeypatch, command, text):
    def load_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded for an empty text")

    monkeypatch.setattr(transformers.AutoModelForMaskedLM, "from_pretrained", load_weights)
    code, _, err = run_cli([command, text, "--model", str(checkpoint)], capsys)
    assert (code, err) == (2, f"switch-hf {command}: error: the text is empty: give some words to process\n")


def test_text_of_control_characters_only_exits_2(checkpoint, capsys):
    code, _, err = run_cli(["reconstruct", "\x01\x02", "--model", str(checkpoint)], capsys)
    assert code == 2 and "the text has no tokens the tokenizer reads" in err


@pytest.mark.parametrize("command", ["reconstruct", "fill-mask"])
def test_text_that_is_not_utf8_exits_2(checkpoint, capsys, command):
    # How Python hands over argv bytes that are not UTF-8: "caf\xe9 [MASK]" in Latin-1.
    text = b"caf\xe9 [MASK]".decode("utf-8", "surrogateescape")
    code, _, err = run_cli([command, text, "--model", str(checkpoint)], capsys)
    assert (code, err) == (
        2,
        f"switch-hf {command}: error: the text is not valid UTF-8 (at character 4): convert it to UTF-8, e.g. with "
        "iconv\n",
    )


def standard_input(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize("command", ["reconstruct", "fill-mask"])
def test_a_dash_reads_the_text_from_standard_input(checkpoint, capsys, monkeypatch, command):
    text = "The quick brown [MASK] jumps over the lazy dog.\nIt was not amused."
    code, expected, _ = run_cli([command, text, "--model", str(checkpoint)], capsys)
    assert code == 0
    standard_input(monkeypatch, text.encode("utf-8"))
    assert run_cli([command, "-", "--model", str(checkpoint)], capsys)[:2] == (0, expected)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "the text is empty: give some words to process"),
        (b"caf\xe9 [MASK]", "standard input is not valid UTF-8 (at byte 4): convert it to UTF-8, e.g. with iconv"),
    ],
)
def test_unusable_standard_input_exits_2_naming_it(checkpoint, capsys, monkeypatch, data, message):
    standard_input(monkeypatch, data)
    assert run_cli(["reconstruct", "-", "--model", str(checkpoint)], capsys) == (
        2, "", f"switch-hf reconstruct: error: {message}\n"
    )


def test_a_dash_with_standard_input_closed_exits_2(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    code, _, err = run_cli(["fill-mask", "-", "--model", str(checkpoint)], capsys)
    assert code == 2 and "standard input is closed" in err


def test_fill_mask_without_a_mask_exits_2(checkpoint, capsys):
    assert main(["fill-mask", "no mask here", "--model", str(checkpoint)]) == 2
    assert "has no [MASK] token" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("top_k", "message"),
    [
        ("0", "argument --top-k: expected an integer >= 1, got 0"),
        ("-3", "argument --top-k: expected an integer >= 1, got -3"),
        ("30523", "--top-k 30523: the model knows only 30522 tokens; give at most that"),
    ],
)
def test_fill_mask_top_k_out_of_range_exits_2(checkpoint, capsys, top_k, message):
    code, out, err = run_cli(["fill-mask", "a [MASK] b", "--model", str(checkpoint), "--top-k", top_k], capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == f"switch-hf fill-mask: error: {message}"


def test_fill_mask_top_k_of_the_whole_vocabulary_lists_every_token(checkpoint, capsys):
    code, out, _ = run_cli(["fill-mask", "a [MASK] b", "--model", str(checkpoint), "--top-k", "30522"], capsys)
    assert code == 0 and len(out.splitlines()) == 1 + 30522


def test_fill_mask_with_a_mask_past_what_the_model_reads_exits_2(checkpoint, capsys):
    code, out, err = run_cli(["fill-mask", "word " * 100 + "[MASK]", "--model", str(checkpoint)], capsys)
    assert (code, out) == (2, "")
    assert "1 of the text's 1 [MASK] tokens lie past where the model stops reading: shorten the text" in err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    assert main(["reconstruct", SEED_TEXT, "--model", str(tmp_path / "nowhere")]) == 2
    assert f"--model {tmp_path / 'nowhere'}: no such directory; give a checkpoint directory or a Hub id" in (
        capsys.readouterr().err
    )


def truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


# Each breaks a copy of a good checkpoint; the message names what is wrong with it.
BROKEN_CHECKPOINTS = {
    "a file": (lambda path: shutil.rmtree(path) or path.write_text("{}"), "a file; give a checkpoint directory"),
    "an empty directory": (
        lambda path: shutil.rmtree(path) or path.mkdir(),
        "no config.json there; save the model with save_pretrained",
    ),
    "no config.json": (
        lambda path: (path / "config.json").unlink(),
        "no config.json there; save the model with save_pretrained",
    ),
    "no tokenizer": (
        lambda path: [(path / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
        "no tokenizer there; save the model's tokenizer with save_pretrained",
    ),
    "truncated weights": (truncate_weights, "cannot load its weights (Error while deserializing header"),
    "no weights": (lambda path: (path / "model.safetensors").unlink(), "cannot load its weights ("),
    "config.json not JSON": (
        lambda path: (path / "config.json").write_text('{"model_type": "switch",'),
        "cannot load its config.json: It looks like the config file at",
    ),
    "a config field out of range": (
        lambda path: edit_config(path, num_experts=0),
        "cannot load its config.json: SwitchConfig.num_experts must be an integer >= 1, got 0",
    ),
    "weights of another shape": (lambda path: edit_config(path, num_experts=8), "cannot load its weights ("),
}


@pytest.mark.parametrize("broken", BROKEN_CHECKPOINTS)
def test_a_broken_checkpoint_exits_2_with_one_line_naming_it(checkpoint, tmp_path, capsys, broken):
    break_it, message = BROKEN_CHECKPOINTS[broken]
    path = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, path)
    break_it(path)

    code, out, err = run_cli(["reconstruct", SEED_TEXT, "--model", str(path)], capsys)

    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith(f"switch-hf reconstruct: error: --model {path}: {message}")
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["reconstruct", "fill-mask"])
def test_text_longer_than_the_model_is_truncated_with_one_warning(checkpoint, capsys, caplog, monkeypatch, command):
    # The tokenizer reads 512 tokens and warns past that through transformers' logger, which does not propagate.
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    text = "[MASK] " + "word " * 600

    code, out, _ = run_cli([command, text, "--model", str(checkpoint)], capsys)

    assert code == 0
    if command == "reconstruct":  # the tiny model reads 64 tokens
        assert "Output shape: (1, 64, 30522)" in out
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == ["The text is 603 tokens long; the model reads at most 64, so only its first 64 tokens are "
                        "reconstructed."]


def test_reconstruct_fills_masked_and_unknown_tokens_as_the_pipeline_does(checkpoint, capsys):
    text = "[MASK] is the capital of France, [UNK] of Germany."
    model = transformers.AutoModelForMaskedLM.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    expected = pipeline("token-reconstruction", model=model, tokenizer=tokenizer)(text)["reconstructed_text"]

    assert main(["reconstruct", text, "--model", str(checkpoint)]) == 0

    assert capsys.readouterr().out.splitlines()[1] == f"Decoded output: {expected}"


def test_a_device_that_is_not_here_or_not_a_device_exits_2(checkpoint, capsys):
    missing = f"cuda:{torch.cuda.device_count()}"
    code, _, err = run_cli(["reconstruct", SEED_TEXT, "--model", str(checkpoint), "--device", missing], capsys)
    assert code == 2 and f"error: --device {missing}: not available on this machine; use one of cpu" in err

    code, _, err = run_cli(["fill-mask", "a [MASK]", "--model", str(checkpoint), "--device", "gpu"], capsys)
    assert code == 2 and "error: --device gpu: not a device; give one such as cpu, cuda, cuda:1 or mps" in err


@pytest.mark.parametrize("command", ["reconstruct", "fill-mask"])
def test_commands_run_on_the_device_given(checkpoint, capsys, command):
    assert main([command, "a [MASK] b", "--model", str(checkpoint), "--device", "cpu"]) == 0
    assert capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: command"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["reconstruct"], "the following arguments are required: text"),
        (["fill-mask", "a [MASK]", "--top-k", "many"], "argument --top-k: invalid positive_int value: 'many'"),
    ],
)
def test_command_line_mistakes_exit_2_with_the_usage(capsys, argv, message):
    code, out, err = run_cli(argv, capsys)
    assert (code, out) == (2, "")
    assert err.startswith("usage: switch-hf") and message in err.splitlines()[-1]


def test_a_closed_stdout_ends_the_command_quietly(warm_python, checkpoint):
    """`switch-hf ... | head -c 1`: the reader goes away before the output is written."""
    result = warm_python.run(
        module="switch_hf.cli", arguments=["reconstruct", SEED_TEXT, "--model", checkpoint], stdout_mode="broken_pipe"
    )
    assert (result.returncode, result.stderr) == (1, "")


def test_a_stdout_closed_from_the_start_exits_2(warm_python, checkpoint):
    """`switch-hf ... >&-`: Python gives no stdout at all, and print() would drop the answer silently."""
    result = warm_python.run(
        module="switch_hf.cli", arguments=["reconstruct", SEED_TEXT, "--model", checkpoint], stdout_mode="closed"
    )
    assert (result.returncode, result.stderr) == (
        2,
        "switch-hf: error: standard output is closed: redirect it to a file or /dev/null\n",
    )


def test_the_released_model_runs_by_default(capsys):
    assert (RELEASED_CHECKPOINT / "model.safetensors").exists()
    assert main(["reconstruct", SEED_TEXT]) == 0
    shape_line, text_line = capsys.readouterr().out.strip().splitlines()
    assert shape_line == "Output shape: (1, 12, 30522)"
    assert text_line.startswith("Decoded output: the quick brown fox ")


def test_the_released_model_reconstructs_the_seed_sentence(capsys):
    assert main(["reconstruct", SEED_TEXT]) == 0
    shape_line, text_line = capsys.readouterr().out.strip().splitlines()
    assert shape_line == "Output shape: (1, 12, 30522)"
    assert text_line == "Decoded output: the quick brown fox jumps over the lazy dog."


@pytest.mark.parametrize("name", ["configuration_switch.py", "modeling_switch.py", "pipeline_switch.py"])
def test_the_released_model_ships_the_package_code(name):
    """Where the package is not installed, `trust_remote_code` runs the checkpoint's copy: it must be this code."""
    assert (RELEASED_CHECKPOINT / name).read_text() == (Path(switch_hf.__file__).parent / name).read_text()
