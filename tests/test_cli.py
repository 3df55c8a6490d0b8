"""The `switch-hf` command: reconstruct and fill-mask on a checkpoint, their errors, and the released default."""

from pathlib import Path

import pytest

import switch_hf
from switch_hf.cli import RELEASED_CHECKPOINT, main

SEED_TEXT = "The quick brown fox jumps over the lazy dog."


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


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_exits_2_with_a_message(checkpoint, capsys, text):
    assert main(["reconstruct", text, "--model", str(checkpoint)]) == 2
    assert "the text is empty" in capsys.readouterr().err


def test_fill_mask_without_a_mask_exits_2(checkpoint, capsys):
    assert main(["fill-mask", "no mask here", "--model", str(checkpoint)]) == 2
    assert "has no [MASK] token" in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    assert main(["reconstruct", SEED_TEXT, "--model", str(tmp_path / "nowhere")]) == 2
    assert f"--model {tmp_path / 'nowhere'}: no such checkpoint directory" in capsys.readouterr().err


def test_text_longer_than_the_model_is_truncated_with_a_warning(checkpoint, capsys, caplog):
    assert main(["reconstruct", "word " * 100, "--model", str(checkpoint)]) == 0  # the tiny model reads 64 tokens
    assert "Output shape: (1, 64, 30522)" in capsys.readouterr().out
    assert "truncated to its first 64 tokens" in caplog.text


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
