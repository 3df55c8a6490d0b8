"""The training pipeline: the collator, scripts/train.py (one process, two processes, resume, divergence stop),
scripts/evaluate.py, and a few steps under the HF Trainer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

from switch_hf import SwitchConfig, SwitchForTokenReconstruction
from switch_hf.data import ReconstructionCollator

from conftest import REPO_ROOT, tiny_config

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "all that glitters is not gold",
    "to be or not to be that is the question",
    "the early bird catches the worm but the second mouse gets the cheese",
    "knowledge is power and power corrupts",
    "python is a programming language that lets you work quickly",
    "an apple a day keeps the doctor away",
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, minilm_path):
    """A tiny random BERT with the real uncased tokenizer, a tiny Switch config (feed-forward experts, then a layer
    with attention and feed-forward experts), and a tiny corpus."""
    root = tmp_path_factory.mktemp("training")
    backbone = BertModel(
        BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    )
    backbone.save_pretrained(root / "backbone")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "backbone")
    config = tiny_config(
        backbone_config=backbone.config, num_attention_heads=2, expert_intermediate_size=64, expert_kinds="fb"
    )
    config.to_json_file(root / "config.json")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(SENTENCES * 8) + "\n")
    (corpus / "validation.txt").write_text("\n".join(SENTENCES[:4]) + "\n")
    return root


def train_command(setup, output_dir, *extra, init_from=None):
    """train.py on the tiny setup: a new model from its config and backbone, or `init_from` a trained checkpoint."""
    model = ["--init-from", str(init_from)] if init_from else [
        "--config", str(setup / "config.json"), "--backbone", str(setup / "backbone"),
    ]
    return [
        sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *model,
        "--corpus-dir", str(setup / "corpus"), "--output-dir", str(output_dir),
        "--max-length", "16", "--batch-size", "4", "--log-every", "1", "--warmup-steps", "2", *extra,
    ]


def train(warm_python, setup, output_dir, *extra, init_from=None):
    """`python scripts/train.py ...` on the tiny setup, in a child of the warm interpreter: its status and output."""
    arguments = train_command(setup, output_dir, *extra, init_from=init_from)[2:]
    return warm_python.run(script=REPO_ROOT / "scripts" / "train.py", arguments=arguments, timeout=600)


def run(command, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# --- the collator -------------------------------------------------------------------------------------------------


def test_collator_corrupts_like_bert_and_labels_corrupted_and_identity_tokens(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    examples = [tokenizer(" ".join(["word"] * 200), truncation=True, max_length=256) for _ in range(40)]
    collate = ReconstructionCollator(tokenizer, mask_probability=0.15, identity_probability=0.2, pad_to_multiple_of=None)
    batch = collate(examples, generator=torch.Generator().manual_seed(0))
    original = torch.tensor([example["input_ids"] for example in examples])
    labelled = batch["labels"] != -100
    changed = batch["input_ids"] != original
    real = original != tokenizer.cls_token_id
    real &= original != tokenizer.sep_token_id
    assert not labelled[~real].any()  # [CLS] / [SEP] are never corrupted or scored
    assert not changed[~labelled].any()  # every corrupted token carries a label
    assert torch.equal(batch["labels"][labelled], original[labelled])
    masked = (batch["input_ids"] == tokenizer.mask_token_id) & labelled
    n_real = real.sum().item()
    # 15% selected, 80% of them masked: 12% masked; 10% of them random; identity: 20% of the other 85%
    assert masked.sum().item() / n_real == pytest.approx(0.12, abs=0.01)
    assert (changed & ~masked).sum().item() / n_real == pytest.approx(0.015 * 1.0, abs=0.006)
    assert labelled.sum().item() / n_real == pytest.approx(0.15 + 0.85 * 0.2, abs=0.015)
    again = collate(examples, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])


def test_collator_masks_whole_words_at_the_token_rate(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    text = "the unbelievably antidisestablishmentarianism of tokenization " * 12
    examples = [tokenizer(text, truncation=True, max_length=256) for _ in range(40)]
    collate = ReconstructionCollator(
        tokenizer, mask_probability=0.25, identity_probability=0.0, pad_to_multiple_of=None, whole_word_masking=True
    )
    batch = collate(examples, generator=torch.Generator().manual_seed(0))
    original = torch.tensor([example["input_ids"] for example in examples])
    pieces = [tokenizer.convert_ids_to_tokens(row) for row in original.tolist()]
    masked = (batch["input_ids"] == tokenizer.mask_token_id).tolist()
    labelled = (batch["labels"] != -100).tolist()
    words = 0
    for row_pieces, row_masked, row_labelled in zip(pieces, masked, labelled):
        starts = [i for i, piece in enumerate(row_pieces) if not piece.startswith("##")] + [len(row_pieces)]
        for start, end in zip(starts, starts[1:]):
            if end - start > 1:  # a word of several pieces: selected, and masked, all together or not at all
                words += 1
                assert len(set(row_labelled[start:end])) == 1 and len(set(row_masked[start:end])) == 1
    assert words > 1000
    real = (original != tokenizer.cls_token_id) & (original != tokenizer.sep_token_id)
    assert (batch["labels"] != -100).sum().item() / real.sum().item() == pytest.approx(0.25, abs=0.02)


def test_collator_refuses_whole_word_masking_without_word_pieces():
    class WholeWordTokenizer:  # a vocabulary of whole words: nothing marks where a word goes on
        mask_token_id = 0

        def __len__(self):
            return 2

        def get_vocab(self):
            return {"[MASK]": 0, "word": 1}

    with pytest.raises(ValueError, match="WordPiece"):
        ReconstructionCollator(WholeWordTokenizer(), whole_word_masking=True)


def test_collator_rejects_bad_probabilities(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    with pytest.raises(ValueError, match="mask_probability must be in"):
        ReconstructionCollator(tokenizer, mask_probability=1.5)


# --- scripts/train.py ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_script_trains_saves_and_evaluates(warm_python, tiny_setup, tmp_path):
    result = train(warm_python, tiny_setup, tmp_path / "run", "--max-steps", "30", "--learning-rate", "3e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    logged = metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert sum(m["loss"] for m in logged[-5:]) < sum(m["loss"] for m in logged[:5])
    assert len(logged[-1]["expert_load"]) == 3 and len(logged[-1]["expert_load"][0]) == 4  # one per router
    assert all(0.0 <= d <= 1.0 for d in logged[-1]["dropped_fraction"])
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert SwitchForTokenReconstruction.from_pretrained(final, strict=True)

    evaluation = warm_python.run(
        script=REPO_ROOT / "scripts" / "evaluate.py",
        arguments=["--model", final, "--corpus-dir", tiny_setup / "corpus", "--output-dir", tmp_path / "eval",
                   "--max-length", "16"],
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    for key in ("identity_accuracy", "masked_top1_accuracy", "masked_top5_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["masked_top5_accuracy"] >= results["masked_top1_accuracy"]
    assert results["identity_tokens"] > 0 and results["masked_tokens"] > 0
    assert (tmp_path / "eval" / "expert_load.png").stat().st_size > 0
    assert results["routers"] == ["layer 0 feed_forward", "layer 1 attention", "layer 1 feed_forward"]
    assert len(results["expert_load"]) == len(results["dropped_fraction"]) == 3

    # Training further from the finished model starts where it ended, not from the backbone: one step at the start of
    # the warm-up has learning rate 0, so the weights it saves are exactly the ones it started from.
    more = train(warm_python, tiny_setup, tmp_path / "more", "--max-steps", "1", init_from=final)
    assert more.returncode == 0, more.stderr[-3000:]
    started_from = SwitchForTokenReconstruction.from_pretrained(final).state_dict()
    continued = SwitchForTokenReconstruction.from_pretrained(tmp_path / "more" / "final").state_dict()
    assert continued.keys() == started_from.keys()
    assert all(torch.equal(continued[name], started_from[name]) for name in started_from)
    clash = train(warm_python, tiny_setup, tmp_path / "clash", "--upcycle", init_from=final)
    assert clash.returncode == 2 and "--init-from takes the model" in clash.stderr and "--upcycle" in clash.stderr


@pytest.mark.slow
def test_resume_after_a_kill_continues_with_the_same_losses(warm_python, tiny_setup, tmp_path):
    total_steps = 40
    # All three runs are children of the same warm interpreter, hence with the same threads: losses compared exactly.
    schedule = ("--max-steps", str(total_steps), "--save-every", "5")
    reference = train(warm_python, tiny_setup, tmp_path / "reference", *schedule)
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted_dir = tmp_path / "interrupted"
    arguments = train_command(tiny_setup, interrupted_dir, *schedule)[2:]
    interrupted = warm_python.start(script=REPO_ROOT / "scripts" / "train.py", arguments=arguments)
    step_file = interrupted_dir / "state" / "step.json"
    deadline = time.monotonic() + 300
    while not step_file.exists() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if interrupted.poll() is None:
        os.kill(interrupted.pid, signal.SIGKILL)
    ended = interrupted.wait()
    assert ended.returncode == -signal.SIGKILL, f"it ended ({ended.returncode}) before the kill: {ended.stderr[-3000:]}"
    killed_at = json.loads(step_file.read_text())["step"]
    assert killed_at < total_steps

    resumed = train(warm_python, tiny_setup, interrupted_dir, *schedule, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = {m["step"]: m["loss"] for m in metrics(tmp_path / "reference")}
    continued = {m["step"]: m["loss"] for m in metrics(interrupted_dir) if m["step"] > killed_at}
    assert sorted(continued) == list(range(killed_at + 1, total_steps + 1))
    for step, loss in continued.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_diverging_weights_stop_training_and_keep_the_last_good_state(warm_python, train_script, tiny_setup, tmp_path):
    # The warm-up's first step has learning rate 0; the second one's 5e37 sends the weights far out of range.
    result = train(
        warm_python, tiny_setup, tmp_path / "run", "--max-steps", "20", "--save-every", "1", "--learning-rate", "1e38",
        "--backbone-learning-rate", "1e38",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    state_dir = tmp_path / "run" / "state"
    assert "step 2: the weights have diverged (" in result.stderr
    assert f"The last good state (step 1) is kept in {state_dir}." in result.stderr
    assert json.loads((state_dir / "step.json").read_text())["step"] == 1
    largest = max(weight.abs().max() for weight in load_file(state_dir / "model.safetensors").values())
    assert torch.isfinite(largest) and largest <= train_script.MAX_SANE_WEIGHT
    assert not (tmp_path / "run" / "final").exists()


def test_resume_without_state_names_the_path(warm_python, tiny_setup, tmp_path):
    result = train(warm_python, tiny_setup, tmp_path / "nothing", "--max-steps", "2", "--resume")
    assert result.returncode != 0
    assert f"no saved state at {tmp_path / 'nothing' / 'state'}" in result.stderr


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_unless_resumed_or_overwritten(
    warm_python, tiny_setup, tmp_path
):
    output_dir = tmp_path / "run"
    first = train(warm_python, tiny_setup, output_dir, "--max-steps", "2", "--save-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}

    again = train(warm_python, tiny_setup, output_dir, "--max-steps", "3")
    assert again.returncode == 2
    assert "Traceback" not in again.stderr
    assert f"--output-dir {output_dir} already holds a training run" in again.stderr
    assert "--resume" in again.stderr and "--overwrite-output-dir" in again.stderr
    assert {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()} == before  # untouched

    both = train(warm_python, tiny_setup, output_dir, "--max-steps", "3", "--resume", "--overwrite-output-dir")
    assert both.returncode == 2 and "not both" in both.stderr

    overwritten = train(warm_python, tiny_setup, output_dir, "--max-steps", "1", "--overwrite-output-dir")
    assert overwritten.returncode == 0, overwritten.stderr[-3000:]
    assert [m["step"] for m in metrics(output_dir)] == [1]  # the first run's metrics are gone, not appended to
    assert json.loads((output_dir / "state" / "step.json").read_text())["step"] == 1
    assert json.loads((output_dir / "args.json").read_text())["max_steps"] == 1


@pytest.mark.slow
def test_overwriting_refuses_to_delete_the_checkpoint_it_starts_from(warm_python, tiny_setup, tmp_path):
    output_dir = tmp_path / "run"
    first = train(warm_python, tiny_setup, output_dir, "--max-steps", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    final = output_dir / "final"
    result = train(warm_python, tiny_setup, output_dir, "--max-steps", "1", "--overwrite-output-dir", init_from=final)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--init-from {output_dir / 'final'} lies in" in result.stderr
    assert (output_dir / "final" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def train_script():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import train

    return train


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--learning-rate", "nan", "a finite number > 0"),
        ("--learning-rate", "-1", "a finite number > 0"),
        ("--learning-rate", "0", "a finite number > 0"),
        ("--learning-rate", "inf", "a finite number > 0"),
        ("--backbone-learning-rate", "nan", "a finite number >= 0"),
        ("--backbone-learning-rate", "-1e-5", "a finite number >= 0"),
        ("--weight-decay", "nan", "a finite number >= 0"),
        ("--weight-decay", "-0.1", "a finite number >= 0"),
        ("--max-grad-norm", "-1", "a finite number > 0"),
        ("--max-grad-norm", "0", "a finite number > 0"),
        ("--max-grad-norm", "nan", "a finite number > 0"),
        ("--mask-probability", "nan", "a number in [0, 1]"),
        ("--mask-probability", "1.5", "a number in [0, 1]"),
        ("--identity-probability", "-0.1", "a number in [0, 1]"),
        ("--warmup-steps", "-1", "an integer >= 0"),
        ("--seed", "-1", "an integer in [0, 2**32)"),
        ("--max-steps", "0", "an integer >= 1"),
        ("--batch-size", "0", "an integer >= 1"),
        ("--max-length", "0", "an integer >= 1"),
        ("--save-every", "0", "an integer >= 1"),
        ("--log-every", "-1", "an integer >= 1"),
    ],
)
def test_meaningless_numeric_options_exit_2_naming_the_option(train_script, tiny_setup, tmp_path, capsys, option, value,
                                                               expected):
    # `--option=value`: argparse reads a lone "-1e-5" as an option name, not a value.
    argv = train_command(tiny_setup, tmp_path / "run", f"{option}={value}")[2:]  # the options only, for parse_args
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"{option} must be {expected}, got " in capsys.readouterr().err


def test_missing_corpus_says_what_to_put_there_and_exits_2(warm_python, tiny_setup, tmp_path):
    arguments = train_command(tiny_setup, tmp_path / "run", "--max-steps", "2")[2:]
    arguments[arguments.index("--corpus-dir") + 1] = str(tmp_path / "no-corpus")
    result = warm_python.run(script=REPO_ROOT / "scripts" / "train.py", arguments=arguments)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"train.py: error: --corpus-dir {tmp_path / 'no-corpus'}: no such directory; a corpus directory holds " \
           f"train.txt and validation.txt, UTF-8 text with one example per line" in result.stderr
    assert "python scripts/prepare_corpus.py" in result.stderr


@pytest.mark.slow
def test_two_data_parallel_processes(tiny_setup, tmp_path):
    """Two CPU processes (gloo) of the same script, launched as `torchrun --nproc-per-node 2 scripts/train.py`."""
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(port)]
    command = train_command(tiny_setup, tmp_path / "ddp", "--max-steps", "4")
    result = run(launcher + command[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stderr
    logged = metrics(tmp_path / "ddp")
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    # The second rank's random state is saved too, before the state is marked complete.
    saved_files = json.loads((tmp_path / "ddp" / "state" / "step.json").read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= saved_files.keys()


# --- the HF Trainer -----------------------------------------------------------------------------------------------


def test_a_few_steps_under_the_hf_trainer(tiny_setup, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_setup / "backbone")
    dataset = Dataset.from_dict({"text": SENTENCES * 4}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=16), batched=True, remove_columns=["text"]
    )
    config = SwitchConfig.from_json_file(tiny_setup / "config.json")
    model = SwitchForTokenReconstruction.from_backbone(str(tiny_setup / "backbone"), config=config)
    before = model.model.layers[0].moe.experts.up_proj.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=5, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=ReconstructionCollator(tokenizer))
    result = trainer.train()
    assert result.global_step == 5
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[0].moe.experts.up_proj.detach(), before)
