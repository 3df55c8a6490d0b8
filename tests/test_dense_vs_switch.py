"""Smoke test of scripts/dense_vs_switch.py at a tiny size: both runs finish, the JSON has every field, the plot exists,
and --resume keeps finished runs."""

import json
import math
import sys

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import dense_vs_switch  # noqa: E402

TINY = [
    "--steps", "6", "--eval-every", "3", "--hidden-size", "32", "--heads", "2", "--layers", "2", "--ffn-size", "64",
    "--seq-len", "32", "--batch-size", "4", "--eval-sequences", "8",
]


@pytest.fixture
def tiny_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sentences = [f"the {animal} number {n} sat on the mat near a {thing}." for n in range(60)
                 for animal, thing in [("cat", "tree"), ("dog", "lamp")]]
    (corpus / "train.txt").write_text("\n".join(sentences) + "\n")
    (corpus / "validation.txt").write_text("\n".join(s.replace("mat", "rug") for s in sentences[:20]) + "\n")
    return corpus


def test_the_study_writes_every_field_and_the_plot(tmp_path, tiny_corpus):
    output = tmp_path / "results" / "study.json"
    argv = ["--experts", "0", "4", "--output", str(output), "--corpus-dir", str(tiny_corpus), *TINY]
    dense_vs_switch.main(argv)
    results = json.loads(output.read_text())
    assert {"config", "runs", "speedup_steps", "speedup_time", "cpu", "unigram_eval_loss"} <= set(results)
    assert [run["experts"] for run in results["runs"]] == [0, 4]
    for run in results["runs"]:
        for field in ("eval_steps", "eval_loss", "train_tokens_per_s", "total_params", "active_params_per_token",
                      "dropped_fraction", "max_over_mean_load"):
            assert field in run
        assert run["eval_steps"] == [0, 3, 6] and len(run["eval_loss"]) == 3
    dense, switch = results["runs"]
    assert switch["total_params"] > dense["total_params"]
    # One expert of the dense FFN's size per token, plus the router: equal active computation.
    router = 32 * 4  # one sparse layer of the two ("df"), hidden 32, 4 experts
    assert switch["active_params_per_token"] == dense["active_params_per_token"] + router
    assert switch["dropped_fraction"][-1] is not None and dense["dropped_fraction"][-1] is None
    assert dense["eval_max_over_mean_load_per_router"] == [None, None, None]
    assert all(len(loads) == 1 and loads[0] >= 1.0 for loads in switch["eval_max_over_mean_load_per_router"])
    assert set(results["speedup_steps"]) == set(results["speedup_time"]) == {"4"}
    assert output.with_suffix(".png").stat().st_size > 0
    assert not output.with_name(output.name + ".partial").exists()

    before = json.loads(output.read_text())
    del before["unigram_eval_loss"]  # as a results file of an older version of the script
    output.write_text(json.dumps(before))
    dense_vs_switch.main([*argv, "--resume"])  # both runs finished: nothing to train, the missing field is added
    after = json.loads(output.read_text())
    assert after["runs"] == before["runs"] and after["unigram_eval_loss"] == results["unigram_eval_loss"]
    with pytest.raises(SystemExit, match="other settings"):
        dense_vs_switch.main([*argv, "--resume", "--lr", "0.5"])


def test_the_validation_load_counts_every_tokens_choice_over_the_whole_sample(tiny_corpus):
    """The evaluation's load is each router's max/mean over all validation batches together, before any capacity:
    the experts the router's logits pick, counted by hand here."""
    args = dense_vs_switch.parse_args(["--experts", "4", "--output", "unused.json", "--corpus-dir", str(tiny_corpus),
                                       *TINY, "--capacity-factor", "0.5"])
    tokenizer = dense_vs_switch.AutoTokenizer.from_pretrained(dense_vs_switch.default_tokenizer())
    collator = dense_vs_switch.ReconstructionCollator(
        tokenizer, mask_probability=0.15, identity_probability=0.0, pad_to_multiple_of=None
    )
    blocks = dense_vs_switch.packed_blocks(tiny_corpus / "validation.txt", tokenizer, args.seq_len)
    batches = [
        dense_vs_switch.corrupt(collator, blocks[start : start + 4], seed=start) for start in range(0, len(blocks), 4)
    ]
    model = dense_vs_switch.build_model(args, tokenizer, experts=4, capacity_factor=0.5)
    with torch.no_grad():
        model.model.layers[1].moe.router.weight.normal_()  # an uneven router, so that the load is far from 1

    model.train()
    loss, loads = dense_vs_switch.evaluate(model, batches)
    assert model.training  # evaluation leaves the model as it found it

    counts = torch.zeros(4)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch, output_router_logits=True).router_logits[0]  # (b, s, e)
            chosen = logits.argmax(dim=-1)[batch["attention_mask"].bool()]
            counts += torch.bincount(chosen, minlength=4).float()
    assert loads == [pytest.approx((counts.max() / counts.mean()).item(), abs=1e-4)]
    assert loads[0] > 1.25  # above the training capacity factor: capacity does not cap it


def test_the_unigram_reference_is_the_targets_loss_under_the_training_frequencies():
    class Tokenizer:
        all_special_ids = [0, 1]

        def __len__(self):
            return 8

    train_blocks = torch.tensor([[0, 5, 5, 6, 1]])
    eval_batches = [{"labels": torch.tensor([[-100, 5, -100, 7]])}]
    # Add-one counts of tokens 2..7 (the special 0 and 1 never targets): 1, 1, 1, 3, 2, 1 out of 9.
    expected = -(math.log(3 / 9) + math.log(1 / 9)) / 2
    assert dense_vs_switch.unigram_loss(train_blocks, eval_batches, Tokenizer()) == pytest.approx(expected)


def test_the_speed_up_reads_the_curves_by_linear_interpolation():
    assert dense_vs_switch.steps_to_reach([0, 10, 20], [5.0, 3.0, 2.0], 2.5) == 15.0
    assert dense_vs_switch.steps_to_reach([0, 10], [5.0, 3.0], 2.0) is None
    runs = [
        {"experts": 0, "capacity_factor": None, "eval_steps": [0, 10, 20], "eval_train_seconds": [0, 10, 20],
         "eval_loss": [5.0, 3.0, 2.0]},
        {"experts": 8, "capacity_factor": 1.25, "eval_steps": [0, 10, 20], "eval_train_seconds": [0, 20, 40],
         "eval_loss": [5.0, 2.0, 1.0]},
    ]
    by_steps, by_time = dense_vs_switch.speedups(runs)
    assert by_steps == {"8": 2.0} and by_time == {"8": 1.0}


def interrupt_at_the_last_evaluation(monkeypatch, argv: list[str]):
    """Runs the one-run study `argv` (TINY: evaluations at steps 0, 3 and 6) and stops it at its step-6 evaluation,
    the step-3 checkpoint on disk, as a kill would; evaluation then works again."""
    evaluate, calls = dense_vs_switch.evaluate, []

    def interrupted_evaluate(model, batches):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(model, batches)

    with monkeypatch.context() as patch:
        patch.setattr(dense_vs_switch, "evaluate", interrupted_evaluate)
        with pytest.raises(KeyboardInterrupt):
            dense_vs_switch.main(argv)


def test_an_interrupted_run_resumes_from_its_checkpoint_as_if_it_never_stopped(tmp_path, tiny_corpus, monkeypatch):
    argv = ["--experts", "4", "--corpus-dir", str(tiny_corpus), *TINY]
    reference = tmp_path / "reference.json"
    dense_vs_switch.main([*argv, "--output", str(reference)])

    output = tmp_path / "interrupted.json"
    interrupt_at_the_last_evaluation(monkeypatch, [*argv, "--output", str(output)])
    assert (output.with_name(output.name + ".partial") / "4.pt").is_file() and not output.exists()
    dense_vs_switch.main([*argv, "--output", str(output), "--resume"])
    resumed, expected = json.loads(output.read_text())["runs"][0], json.loads(reference.read_text())["runs"][0]
    assert resumed["eval_loss"] == expected["eval_loss"]
    assert resumed["dropped_fraction"] == expected["dropped_fraction"]


def test_a_checkpoint_saved_before_the_per_router_loads_resumes(tmp_path, tiny_corpus, monkeypatch):
    """A run interrupted under an older version of the script, whose saved run has neither the routing fields nor
    the per-router load series, continues: the windows already past read None in the new series."""
    argv = ["--experts", "4", "--corpus-dir", str(tiny_corpus), *TINY, "--output", str(tmp_path / "study.json")]
    interrupt_at_the_last_evaluation(monkeypatch, argv)
    checkpoint = tmp_path / "study.json.partial" / "4.pt"
    state = torch.load(checkpoint, weights_only=False)
    for field in ("max_over_mean_load_per_router", "router", "balance", "bias_rate"):
        state["run"].pop(field, None)
    torch.save(state, checkpoint)

    dense_vs_switch.main([*argv, "--resume"])

    run = json.loads((tmp_path / "study.json").read_text())["runs"][0]
    per_router = run["max_over_mean_load_per_router"]
    assert len(per_router) == len(run["eval_steps"])
    assert run["eval_steps"] == [0, 3, 6]
    assert per_router[:2] == [None, None] and len(per_router[2]) == 1  # steps 4-6 ran again, the others did not
    assert dense_vs_switch.run_name(run) == "4"


def test_routing_variants_are_runs_of_their_own_beside_the_switch_run(tmp_path, tiny_corpus):
    output = tmp_path / "study.json"
    base = ["--output", str(output), "--corpus-dir", str(tiny_corpus), *TINY]
    dense_vs_switch.main(["--experts", "4", *base])
    dense_vs_switch.main(["--experts", "4", "--router", "expert_choice", "--resume", *base])
    dense_vs_switch.main(["--experts", "4", "--balance", "bias", "--bias-rate", "0.01", "--resume", *base])
    dense_vs_switch.main(["--experts", "4", "--aux-coef", "0.1", "--resume", *base])
    runs = json.loads(output.read_text())["runs"]
    by_name = {dense_vs_switch.run_name(run): run for run in runs}
    assert set(by_name) == {"4", "4 expert-choice", "4 bias@0.01", "4 aux@0.1"}
    assert by_name["4 bias@0.01"]["aux_coef"] == 0.0
    assert by_name["4"]["aux_coef"] == 0.01 and by_name["4 aux@0.1"]["aux_coef"] == 0.1
    assert by_name["4 aux@0.1"]["eval_loss"] != by_name["4"]["eval_loss"]  # the weight reached the model
    written_before_the_setting = {key: value for key, value in by_name["4"].items() if key != "aux_coef"}
    assert dense_vs_switch.run_key(written_before_the_setting) == dense_vs_switch.run_key(by_name["4"])
    for run in runs:
        assert len(run["max_over_mean_load_per_router"][-1]) == 1  # one sparse layer of two ("df")
    assert by_name["4 expert-choice"]["max_over_mean_load"][-1] == 1.0  # experts take equal loads
    dense_vs_switch.main(["--experts", "4", "--router", "expert_choice", "--resume", *base])  # finished: kept
    assert json.loads(output.read_text())["runs"] == runs
    with pytest.raises(SystemExit):
        dense_vs_switch.main(["--experts", "4", "--router", "expert_choice", "--capacity-factor", "none", *base])


def test_processes_adding_runs_to_one_study_at_once_keep_each_others_runs(tmp_path, tiny_corpus, monkeypatch):
    """Another process writes its finished run to the file while this one trains: both runs end up in it."""
    base = ["--output", str(tmp_path / "study.json"), "--corpus-dir", str(tiny_corpus), *TINY, "--resume"]
    evaluate, calls = dense_vs_switch.evaluate, []

    def evaluate_while_another_process_finishes(model, batches):
        calls.append(1)
        if len(calls) == 2:  # the Switch run is under way: the dense run starts and finishes meanwhile
            monkeypatch.setattr(dense_vs_switch, "evaluate", evaluate)
            dense_vs_switch.main(["--experts", "0", *base])
            monkeypatch.setattr(dense_vs_switch, "evaluate", evaluate_while_another_process_finishes)
        return evaluate(model, batches)

    monkeypatch.setattr(dense_vs_switch, "evaluate", evaluate_while_another_process_finishes)
    dense_vs_switch.main(["--experts", "4", *base])

    results = json.loads((tmp_path / "study.json").read_text())
    assert [run["experts"] for run in results["runs"]] == [0, 4]
    assert set(results["speedup_steps"]) == {"4"}
    assert not (tmp_path / "study.json.partial").exists()
