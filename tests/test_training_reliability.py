"""scripts/train.py and scripts/evaluate.py under the things that go wrong: a save killed at any point, a damaged
state, a diverging run, a full disk, meaningless options and corpora that are not one text per line in UTF-8.
Most runs are in-process (train.main / evaluate.main) to stay fast; test_training.py runs the scripts as programs."""

import errno
import importlib.util
import json
import re
import shutil
import sys

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from switch_hf import SwitchConfig, SwitchForTokenReconstruction
from switch_hf.cli import UsageError
from switch_hf.data import check_corpus

from conftest import REPO_ROOT
from test_training import SENTENCES, tiny_setup, train_command  # noqa: F401  (tiny_setup is a fixture)

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import train  # noqa: E402


def load_evaluate_script():
    # By path and under another name: scripts/evaluate.py would shadow the `evaluate` library.
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_script = load_evaluate_script()


def train_argv(setup, output_dir, *extra):
    return train_command(setup, output_dir, *extra)[2:]  # the options only, for train.main


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def write_corpus(directory, train_text, validation_text="\n".join(SENTENCES[:4]) + "\n"):
    directory.mkdir(parents=True)
    for name, text in (("train.txt", train_text), ("validation.txt", validation_text)):
        (directory / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return directory


class Killed(Exception):
    """Stands for a SIGKILL: nothing after it runs."""


# --- the training state: every point a save can be killed at ---------------------------------------------------------


def write_state(path, step, complete=True):
    """A state directory as a save leaves it: its files, then (when complete) the marker, as save_state_atomically
    writes them."""
    path.mkdir()
    (path / "model.safetensors").write_text(f"weights of step {step}")
    (path / "random_states_0.pkl").write_text(f"random state of step {step}")
    if complete:
        files = {name: (path / name).stat().st_size for name in ("model.safetensors", "random_states_0.pkl")}
        (path / train.STATE_MARKER).write_text(json.dumps({"step": step, "files": files}))


@pytest.mark.parametrize(
    "layout, expected_step",
    [
        ({"state": 4, "state.saving": None}, 4),  # killed while the new state was being written
        ({"state": 4, "state.saving": 6}, 6),  # killed after the new state was marked complete
        ({"state.previous": 4, "state.saving": 6}, 6),  # killed between the two renames
        ({"state": 6, "state.previous": None}, 6),  # killed while the old state was being deleted
        ({"state": 6, "state.previous": 4}, 6),  # killed before the old state was deleted
        ({"state.saving": 2}, 2),  # the first save, killed after it was marked complete
    ],
    ids=["writing", "marked", "between-renames", "deleting-old", "before-deleting-old", "first-save"],
)
def test_recovery_keeps_the_newest_complete_state_wherever_the_save_was_killed(tmp_path, layout, expected_step):
    state_dir = tmp_path / "state"
    for name, step in layout.items():  # None: a directory the kill left incomplete
        write_state(tmp_path / name, step if step is not None else 99, complete=step is not None)
    assert train.newest_complete_state(state_dir) is not None  # what --resume accepts

    train.recover_interrupted_save(state_dir)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["state"]
    assert train.read_state_marker(state_dir)["step"] == expected_step
    assert (state_dir / "model.safetensors").read_text() == f"weights of step {expected_step}"
    train.check_saved_state(state_dir, num_processes=1)


def test_resume_refuses_when_no_save_completed(tiny_setup, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    write_state(tmp_path / "run" / "state.saving", 2, complete=False)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(train_argv(tiny_setup, tmp_path / "run", "--resume"))
    assert exit_info.value.code == 2
    assert f"--resume: no saved state at {tmp_path / 'run' / 'state'}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_states(tiny_setup, tmp_path_factory):
    """A straight 6-step run's losses, and the states of steps 2 and 4 of the same run killed right after its second
    save."""
    root = tmp_path_factory.mktemp("saved-states")
    train.main(train_argv(tiny_setup, root / "reference", "--max-steps", "6", "--save-every", "2"))
    save = train.save_state_atomically

    def save_and_keep_a_copy(accelerator, state_dir, step):
        save(accelerator, state_dir, step)
        shutil.copytree(state_dir, root / f"step-{step}")
        if step == 4:
            raise Killed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "save_state_atomically", save_and_keep_a_copy)
        with pytest.raises(Killed):
            train.main(train_argv(tiny_setup, root / "killed", "--max-steps", "6", "--save-every", "2"))
    return root


@pytest.mark.parametrize("layout", ["between-renames", "old-state-half-deleted"])
def test_resume_after_a_save_killed_midway_loses_nothing(tiny_setup, saved_states, tmp_path, layout):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copy(saved_states / "killed" / "metrics.jsonl", output_dir)
    if layout == "between-renames":
        shutil.copytree(saved_states / "step-2", output_dir / "state.previous")
        shutil.copytree(saved_states / "step-4", output_dir / "state.saving")
    else:
        shutil.copytree(saved_states / "step-4", output_dir / "state")
        shutil.copytree(saved_states / "step-2", output_dir / "state.previous")
        (output_dir / "state.previous" / train.STATE_MARKER).unlink()
        (output_dir / "state.previous" / "model.safetensors").unlink()

    train.main(train_argv(tiny_setup, output_dir, "--max-steps", "6", "--save-every", "2", "--resume"))

    expected = {m["step"]: m["loss"] for m in metrics(saved_states / "reference")}
    resumed = {m["step"]: m["loss"] for m in metrics(output_dir)}
    assert sorted(resumed) == list(range(1, 7))  # steps 5 and 6 follow step 4: none lost, none repeated
    for step in (5, 6):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    assert sorted(path.name for path in output_dir.iterdir()) == ["final", "metrics.jsonl", "state"]


def test_resume_drops_the_metrics_logged_after_its_state_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 5)) + '{"step": 5, "lo')
    train.keep_metrics_up_to(path, 3)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["random_states_0.pkl", "optimizer.bin", "model.safetensors", "scheduler.bin",
                                    "truncated optimizer.bin"])
def test_resume_refuses_a_state_with_a_missing_or_cut_file(tiny_setup, saved_states, tmp_path, damage):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copytree(saved_states / "step-4", output_dir / "state")
    name = damage.split()[-1]
    if damage.startswith("truncated"):
        (output_dir / "state" / name).write_bytes(b"cut short")
    else:
        (output_dir / "state" / name).unlink()
    with pytest.raises(UsageError, match="--resume: ") as error:
        train.main(train_argv(tiny_setup, output_dir, "--max-steps", "6", "--resume"))
    assert str(output_dir / "state" / name) in str(error.value)
    assert not (output_dir / "metrics.jsonl").exists()  # it stopped before training


def test_resume_refuses_fewer_max_steps_than_the_state_has(tiny_setup, saved_states, tmp_path):
    shutil.copytree(saved_states / "step-4", tmp_path / "run" / "state")
    with pytest.raises(UsageError, match=re.escape("--max-steps 2 is below the step of the saved state (4)")):
        train.main(train_argv(tiny_setup, tmp_path / "run", "--max-steps", "2", "--resume"))


def test_resume_refuses_more_processes_than_saved_random_states(saved_states):
    with pytest.raises(UsageError, match="holds no random_states_1.pkl for process 1"):
        train.check_saved_state(saved_states / "step-4", num_processes=2)


# --- a diverging run ------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_naming_the_step_and_the_last_good_state(tiny_setup, tmp_path, monkeypatch, caplog):
    forward = SwitchForTokenReconstruction.forward
    calls = []

    def nan_from_the_third_step(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls.append(None)
        if len(calls) >= 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(SwitchForTokenReconstruction, "forward", nan_from_the_third_step)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_argv(tiny_setup, tmp_path / "run", "--max-steps", "6", "--save-every", "1"))
    assert exit_info.value.code == 1
    state_dir = tmp_path / "run" / "state"
    assert f"step 3: the loss is nan; stopping. The last good state (step 2) is kept in {state_dir}." in caplog.text
    assert train.read_state_marker(state_dir)["step"] == 2


def test_kept_weights_are_checked_with_the_documented_bound():
    model = torch.nn.Linear(2, 2)
    assert train.diverged_weight(model) is None
    with torch.no_grad():
        model.weight[0, 0] = 2 * train.MAX_SANE_WEIGHT
    assert train.diverged_weight(model) == ("weight", 2 * train.MAX_SANE_WEIGHT)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    name, largest = train.diverged_weight(model)
    assert name == "weight" and largest != largest  # NaN


# --- a full disk ----------------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_save_keeps_the_previous_state_and_says_where(tiny_setup, tmp_path, monkeypatch, caplog):
    save_state = Accelerator.save_state
    calls = []

    def disk_full_at_the_second_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (tmp_path / "run" / "state.saving").mkdir()
            (tmp_path / "run" / "state.saving" / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    output_dir = tmp_path / "run"
    argv = train_argv(tiny_setup, output_dir, "--max-steps", "6", "--save-every", "2")
    monkeypatch.setattr(Accelerator, "save_state", disk_full_at_the_second_save)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    assert (
        f"step 4: saving the training state failed ([Errno 28] No space left on device). The state of step 2 survives "
        f"in {output_dir / 'state'}; free space, then continue with --resume." in caplog.text
    )
    assert sorted(path.name for path in output_dir.iterdir()) == ["args.json", "metrics.jsonl", "state"]

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    train.main(argv + ["--resume"])
    assert [m["step"] for m in metrics(output_dir)] == [1, 2, 3, 4, 5, 6]  # the first lines of steps 3-4 are dropped
    assert (output_dir / "final" / "model.safetensors").exists()


def test_a_full_disk_while_writing_the_final_model_can_be_resumed(tiny_setup, tmp_path, monkeypatch, caplog):
    output_dir, argv = tmp_path / "run", train_argv(tiny_setup, tmp_path / "run", "--max-steps", "2")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SwitchForTokenReconstruction, "save_pretrained", no_space)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    assert f"The training state of step 2 is in {output_dir / 'state'}; free space, then run again with --resume" in (
        caplog.text
    )
    monkeypatch.undo()
    train.main(argv + ["--resume"])
    assert SwitchForTokenReconstruction.from_pretrained(output_dir / "final", strict=True)


# --- options --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--mask-probability=0", "--identity-probability=0"], "both 0: no token would be labelled"),
        (["--expert-kinds=zz"], "--expert-kinds zz: SwitchConfig.expert_kinds pattern 'zz' has unknown letters"),
        (["--backbone=/no/such/backbone"], "--backbone /no/such/backbone: no BERT checkpoint there (no config.json)"),
        (["--backbone=EMPTY"], "no BERT checkpoint there (no config.json)"),
        (["--config=NOT_JSON"], "not-json.json: "),
        (["--config=BAD_FIELD"], "bad-field.json: "),
    ],
)
def test_train_options_that_cannot_work_exit_2_naming_the_option(tiny_setup, tmp_path, capsys, extra, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-json.json").write_text("{not json")
    config = json.loads((tiny_setup / "config.json").read_text())
    (tmp_path / "bad-field.json").write_text(json.dumps({**config, "num_experts": 0}))
    replacements = {"EMPTY": tmp_path / "empty", "NOT_JSON": tmp_path / "not-json.json",
                    "BAD_FIELD": tmp_path / "bad-field.json"}
    for placeholder, path in replacements.items():
        extra = [option.replace(placeholder, str(path)) for option in extra]
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(train_argv(tiny_setup, tmp_path / "run", *extra))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "max_length, expected",
    [("2", "--max-length 2 leaves no room for text"), ("65", "--max-length 65 exceeds the model's 64 positions")],
)
def test_train_max_length_must_fit_the_tokenizer_and_the_model(tiny_setup, tmp_path, max_length, expected):
    argv = train_argv(tiny_setup, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--max-length") + 1] = max_length
    with pytest.raises(UsageError, match=re.escape(expected)):
        train.main(argv)


def test_a_backbone_that_does_not_load_is_named(tiny_setup, tmp_path):
    argv = train_argv(tiny_setup, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--backbone") + 1] = "no-such-org/no-such-model"  # a Hub id, and the Hub is offline
    with pytest.raises(UsageError, match="--backbone no-such-org/no-such-model: "):
        train.main(argv)


# --- corpora --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train_text, expected",
    [
        ("", "train.txt holds no text (it is empty)"),
        ("\n  \n\t\n", "train.txt holds no text (its 3 lines are all blank)"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "train.txt line 1 holds a NUL byte: the file is binary"),
        ("fine line\ncaf\xe9 au lait\n".encode("latin-1"), "train.txt line 2 is not UTF-8 (byte 0xe9)"),
        ("one text per line\n".encode("utf-16"), "train.txt is UTF-16 text; the corpus must be UTF-8: convert it"),
    ],
    ids=["empty", "blank", "binary", "latin-1", "utf-16"],
)
def test_a_corpus_file_that_is_not_utf8_text_is_named_with_the_fix(tmp_path, train_text, expected):
    corpus = write_corpus(tmp_path / "corpus", train_text)
    with pytest.raises(UsageError, match=re.escape(expected)) as error:
        check_corpus(corpus)
    assert str(corpus / "train.txt") in str(error.value)


@pytest.mark.parametrize("missing", ["directory", "train.txt", "validation.txt"])
def test_a_missing_corpus_says_what_a_corpus_is_and_how_to_build_one(tmp_path, missing):
    corpus = tmp_path / "corpus"
    if missing != "directory":
        write_corpus(corpus, "some text\n")
        (corpus / missing).unlink()
    with pytest.raises(UsageError) as error:
        check_corpus(corpus)
    message = str(error.value)
    assert message.startswith(f"--corpus-dir {corpus}")
    assert (missing if missing != "directory" else "no such directory") in message
    assert "train.txt and validation.txt, UTF-8 text with one example per line" in message
    assert "python scripts/prepare_corpus.py" in message


def test_a_corpus_of_characters_the_tokenizer_drops_is_refused(tiny_setup, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", "\u200b\n" * 8)  # zero-width spaces: text to Python, nothing to BERT
    argv = train_argv(tiny_setup, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--corpus-dir") + 1] = str(corpus)
    with pytest.raises(UsageError, match="train.txt: no line holds a token the tokenizer keeps"):
        train.main(argv)


def test_a_corpus_smaller_than_one_batch_is_refused(tiny_setup, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", "\n".join(SENTENCES[:3]) + "\n\n\n")
    argv = train_argv(tiny_setup, tmp_path / "run", "--max-steps", "1")
    argv[argv.index("--corpus-dir") + 1] = str(corpus)
    with pytest.raises(UsageError, match=r"train.txt has 3 examples, fewer than one batch \(--batch-size 4\)"):
        train.main(argv)


def test_blank_lines_are_left_out_and_a_batch_without_labels_logs_no_accuracy(tiny_setup, tmp_path, caplog):
    # One-word lines: 4 of them have no label at all about a quarter of the time.
    corpus = write_corpus(tmp_path / "corpus", "word\n\n" * 40)
    argv = train_argv(tiny_setup, tmp_path / "run", "--max-steps", "6")
    argv[argv.index("--corpus-dir") + 1] = str(corpus)
    train.main(argv)
    assert f"{corpus / 'train.txt'}: 40 of 80 lines hold no text; they are left out" in caplog.text
    accuracies = [m["token_accuracy"] for m in metrics(tmp_path / "run")]
    assert None in accuracies
    assert all(accuracy is None or 0.0 <= accuracy <= 1.0 for accuracy in accuracies)


# --- scripts/evaluate.py --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_setup, tmp_path_factory):
    """An untrained Switch checkpoint on the tiny setup's config and tokenizer (64 positions)."""
    path = tmp_path_factory.mktemp("checkpoint")
    SwitchForTokenReconstruction(SwitchConfig.from_json_file(tiny_setup / "config.json")).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_setup / "backbone").save_pretrained(path)
    return path


def evaluate_argv(model, corpus, output_dir, *extra):
    return ["--model", str(model), "--corpus-dir", str(corpus), "--output-dir", str(output_dir), "--max-length", "16",
            *extra]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch-size=0"], "--batch-size must be an integer >= 1, got 0"),
        (["--batch-size=-4"], "--batch-size must be an integer >= 1, got -4"),
        (["--max-length=0"], "--max-length must be an integer >= 1, got 0"),
        (["--max-examples=0"], "--max-examples must be an integer >= 1, got 0"),
        (["--seed=-1"], "--seed must be an integer in [0, 2**64), got -1"),
        (["--mask-probability=nan"], "--mask-probability must be in (0, 1), got nan"),
    ],
)
def test_evaluate_options_out_of_range_exit_2(tiny_checkpoint, tiny_setup, tmp_path, capsys, extra, expected):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.parse_args(evaluate_argv(tiny_checkpoint, tiny_setup / "corpus", tmp_path / "eval", *extra))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_evaluate_refuses_an_output_dir_that_is_a_file(tiny_checkpoint, tiny_setup, tmp_path, capsys):
    (tmp_path / "eval").write_text("")
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(evaluate_argv(tiny_checkpoint, tiny_setup / "corpus", tmp_path / "eval"))
    assert f"--output-dir {tmp_path / 'eval'} is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "validation_text, expected",
    [
        ("", "validation.txt holds no text (it is empty)"),
        ("\n\n\n", "validation.txt holds no text (its 3 lines are all blank)"),
        ("ok\n", "--mask-probability 0.15 masked none of the 1 tokens evaluated"),
    ],
    ids=["empty", "blank", "nothing-masked"],
)
def test_evaluate_on_a_validation_set_with_nothing_to_score_says_so(tiny_checkpoint, tmp_path, validation_text,
                                                                     expected):
    corpus = write_corpus(tmp_path / "corpus", "\n".join(SENTENCES) + "\n", validation_text)
    with pytest.raises(UsageError, match=re.escape(expected)):
        evaluate_script.main(evaluate_argv(tiny_checkpoint, corpus, tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    "model, extra, expected",
    [
        ("MISSING", [], "no such directory; give a checkpoint directory or a Hub id"),
        ("EMPTY", [], "no config.json there"),
        ("BERT", [], "is a bert model, not a Switch checkpoint"),
        ("CHECKPOINT", ["--max-length=2"], "--max-length 2 leaves no room for text"),
        ("CHECKPOINT", ["--max-length=100"], "--max-length 100 exceeds the model's 64 positions"),
    ],
)
def test_evaluate_refuses_a_model_it_cannot_evaluate_with(tiny_checkpoint, tiny_setup, tmp_path, model, extra,
                                                           expected):
    (tmp_path / "empty").mkdir()
    model = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty", "BERT": tiny_setup / "backbone",
             "CHECKPOINT": tiny_checkpoint}[model]
    with pytest.raises(UsageError, match=re.escape(expected)):
        evaluate_script.main(evaluate_argv(model, tiny_setup / "corpus", tmp_path / "eval", *extra))


def test_evaluate_reports_a_bad_corpus_in_one_line_with_exit_2(warm_python, tiny_checkpoint, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", "fine\n", "caf\xe9\n".encode("latin-1"))
    result = warm_python.run(
        script=REPO_ROOT / "scripts" / "evaluate.py", arguments=evaluate_argv(tiny_checkpoint, corpus, tmp_path / "eval")
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"evaluate.py: error: {corpus / 'validation.txt'} line 1 is not UTF-8 (byte 0xe9)" in result.stderr
