"""The model behind transformers' pipelines: fill-mask, feature-extraction and the shipped token-reconstruction one.

A tiny random Switch model with the real MiniLM tokenizer: its predictions are noise, so every test compares a
pipeline's answer with what the model's own outputs say, never with fixed text.
"""

from __future__ import annotations

import ast
import copy
import logging

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from conftest import REPO_ROOT
from switch_hf import TokenReconstructionPipeline

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def reconstruct(tiny_switch):
    model, tokenizer = tiny_switch
    return pipeline("token-reconstruction", model=model, tokenizer=tokenizer)


def model_probabilities(model, tokenizer, text: str) -> tuple[dict, torch.Tensor]:
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return inputs, model(**inputs).logits[0].softmax(-1)  # (seq, vocab)


def test_fill_mask_pipeline_ranks_the_candidates_by_the_models_logits(tiny_switch):
    model, tokenizer = tiny_switch
    text = f"The quick brown {tokenizer.mask_token} jumps over the lazy dog."
    inputs, probabilities = model_probabilities(model, tokenizer, text)
    mask_position = inputs["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    expected_scores, expected_ids = probabilities[mask_position].topk(5)

    predictions = pipeline("fill-mask", model=model, tokenizer=tokenizer)(text)

    assert [p["token"] for p in predictions] == expected_ids.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(expected_scores.tolist(), rel=1e-5)
    assert predictions[0]["sequence"] == tokenizer.decode(
        [expected_ids[0].item() if i == mask_position else t for i, t in enumerate(inputs["input_ids"][0].tolist())],
        skip_special_tokens=True,
    )


def test_feature_extraction_pipeline_returns_the_switch_models_hidden_states(tiny_switch):
    model, tokenizer = tiny_switch
    inputs = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        expected = model.model(**inputs).last_hidden_state

    features = pipeline("feature-extraction", model=model.model, tokenizer=tokenizer)(TEXT)

    assert torch.allclose(torch.tensor(features), expected, atol=1e-6)


def test_token_reconstruction_pipeline_reports_the_models_predictions(tiny_switch, reconstruct):
    model, tokenizer = tiny_switch
    inputs, probabilities = model_probabilities(model, tokenizer, TEXT)
    input_ids = inputs["input_ids"][0].tolist()
    text_positions = list(range(1, len(input_ids) - 1))  # all but [CLS] and [SEP]

    result = reconstruct(TEXT, top_k=4)

    assert isinstance(reconstruct, TokenReconstructionPipeline)
    assert set(result) == {"reconstructed_text", "tokens", "changes"}
    assert [token["index"] for token in result["tokens"]] == text_positions
    for token in result["tokens"]:
        position = token["index"]
        scores, ids = probabilities[position].topk(4)
        assert token["input_token_id"] == input_ids[position]
        assert token["input_token"] == tokenizer.convert_ids_to_tokens(input_ids[position])
        assert TEXT[token["start"] : token["end"]].lower() == token["input_token"].removeprefix("##")
        input_probability = probabilities[position, input_ids[position]].item()
        assert token["input_token_score"] == pytest.approx(input_probability, rel=1e-5)
        assert [c["token_id"] for c in token["candidates"]] == ids.tolist()
        assert [c["score"] for c in token["candidates"]] == pytest.approx(scores.tolist(), rel=1e-5)
        assert [c["token"] for c in token["candidates"]] == tokenizer.convert_ids_to_tokens(ids.tolist())
        assert (token["predicted_token_id"], token["score"]) == (ids[0].item(), token["candidates"][0]["score"])
        assert token["changed"] == (ids[0].item() != input_ids[position])
    assert result["changes"] == [token for token in result["tokens"] if token["changed"]]
    predicted = probabilities.argmax(-1).tolist()
    assert result["reconstructed_text"] == tokenizer.decode(
        [predicted[position] for position in text_positions], skip_special_tokens=True
    )


def test_token_reconstruction_keeps_a_mask_written_in_the_text(tiny_switch, reconstruct):
    model, tokenizer = tiny_switch
    text = f"The quick brown {tokenizer.mask_token} jumps."
    _, probabilities = model_probabilities(model, tokenizer, text)

    result = reconstruct(text)

    masked = [token for token in result["tokens"] if token["input_token"] == tokenizer.mask_token]
    assert len(masked) == 1
    assert masked[0]["predicted_token_id"] == probabilities[masked[0]["index"]].argmax().item()
    assert text[masked[0]["start"] : masked[0]["end"]] == tokenizer.mask_token


def test_token_reconstruction_of_a_list_matches_one_call_per_text_batched_or_not(reconstruct):
    texts = [TEXT, "Hello world!", "Mixture of experts."]

    one_by_one = [reconstruct(text) for text in texts]
    listed = reconstruct(texts)
    batched = reconstruct(texts, batch_size=3)  # padded to the longest text

    assert listed == one_by_one
    assert len(batched) == len(texts)
    for batched_result, single_result in zip(batched, one_by_one):
        assert batched_result["reconstructed_text"] == single_result["reconstructed_text"]
        assert [t["predicted_token_id"] for t in batched_result["tokens"]] == [
            t["predicted_token_id"] for t in single_result["tokens"]
        ]
        assert [t["score"] for t in batched_result["tokens"]] == pytest.approx(
            [t["score"] for t in single_result["tokens"]], rel=1e-4
        )


# Two texts of different lengths, so that a batch of them is padded; one [MASK] each.
MASKED_TEXTS = ["The quick brown [MASK] jumps over the lazy dog.", "Hello [MASK]!"]

# transformers' fill-mask and feature-extraction pipelines unbatch the model's whole output, slicing every tensor in it
# along dim 0: an inference output must hold only per-example tensors, not the batch-wide routing statistics.


def test_fill_mask_pipeline_batched_matches_one_text_at_a_time(tiny_switch):
    model, tokenizer = tiny_switch
    fill_mask = pipeline("fill-mask", model=model, tokenizer=tokenizer)

    one_by_one = [fill_mask(text) for text in MASKED_TEXTS]
    batched = fill_mask(MASKED_TEXTS, batch_size=2)

    assert len(batched) == len(MASKED_TEXTS)
    for batched_result, single_result in zip(batched, one_by_one):
        assert [p["token"] for p in batched_result] == [p["token"] for p in single_result]
        assert [p["score"] for p in batched_result] == pytest.approx([p["score"] for p in single_result], rel=1e-4)


def test_feature_extraction_pipeline_batched_matches_one_text_at_a_time(tiny_switch):
    model, tokenizer = tiny_switch
    extract = pipeline("feature-extraction", model=model.model, tokenizer=tokenizer)

    one_by_one = [torch.tensor(extract(text)) for text in MASKED_TEXTS]  # (1, seq, hidden)
    batched = [torch.tensor(features) for features in extract(MASKED_TEXTS, batch_size=2)]

    assert len(batched) == len(MASKED_TEXTS)
    for batched_features, single_features in zip(batched, one_by_one):
        length = single_features.shape[1]  # a batched text comes padded to the batch's longest
        assert torch.allclose(batched_features[:, :length], single_features, atol=1e-5)


def test_token_reconstruction_batched_matches_one_text_at_a_time_with_masks(reconstruct):
    one_by_one = [reconstruct(text) for text in MASKED_TEXTS]
    batched = reconstruct(MASKED_TEXTS, batch_size=2)

    assert len(batched) == len(MASKED_TEXTS)
    for batched_result, single_result in zip(batched, one_by_one):
        assert [t["predicted_token_id"] for t in batched_result["tokens"]] == [
            t["predicted_token_id"] for t in single_result["tokens"]
        ]
        assert [t["score"] for t in batched_result["tokens"]] == pytest.approx(
            [t["score"] for t in single_result["tokens"]], rel=1e-4
        )


def test_token_reconstruction_of_empty_text_has_no_tokens(reconstruct):
    assert reconstruct("") == {"reconstructed_text": "", "tokens": [], "changes": []}


def test_token_reconstruction_truncates_long_text_with_a_warning(tiny_switch, reconstruct, caplog):
    model, _ = tiny_switch
    text = " ".join(["word"] * 100)

    with caplog.at_level(logging.WARNING):
        result = reconstruct(text)

    assert len(result["tokens"]) == model.config.max_position_embeddings - 2  # room for [CLS] and [SEP]
    assert "the model reads at most 64" in caplog.text


def test_token_reconstruction_warns_once_past_the_tokenizers_limit(minilm_path, tiny_switch, monkeypatch, caplog):
    model, _ = tiny_switch
    # A tokenizer of its own: it warns about a long text only once in its life.
    reconstruct = pipeline("token-reconstruction", model=model, tokenizer=AutoTokenizer.from_pretrained(minilm_path))
    # The tokenizer warns through transformers' logger, which does not propagate to caplog's handler.
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)

    with caplog.at_level(logging.WARNING):
        reconstruct("word " * 600)  # past the model's 64 tokens and the tokenizer's 512

    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warnings == [
        "The text is 602 tokens long; the model reads at most 64, so only its first 64 tokens are reconstructed."
    ]


def test_token_reconstruction_fills_every_position_with_text(tiny_switch):
    model, tokenizer = tiny_switch
    # A model whose best guess everywhere is [UNK]: the text must show its best word at each position instead.
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_output_embeddings().bias[tokenizer.unk_token_id] = 30.0
    text = f"{tokenizer.mask_token} is the capital of France, {tokenizer.unk_token} of Germany."
    _, probabilities = model_probabilities(model, tokenizer, text)

    result = pipeline("token-reconstruction", model=model, tokenizer=tokenizer)(text)

    assert {token["predicted_token"] for token in result["tokens"]} == {tokenizer.unk_token}
    positions = [token["index"] for token in result["tokens"]]
    best_words = probabilities[positions].topk(2).indices[:, 1].tolist()  # [UNK] first, then the best word
    assert not set(best_words) & set(tokenizer.all_special_ids)
    assert result["reconstructed_text"] == tokenizer.decode(best_words)


@pytest.mark.parametrize(
    ("inputs", "arguments", "error", "message"),
    [
        (TEXT, {"top_k": 0}, ValueError, "top_k must be an integer >= 1"),
        (TEXT, {"temperature": 2.0}, TypeError, "unexpected arguments: \\['temperature'\\]"),
        (42, {}, ValueError, "takes text"),
    ],
)
def test_token_reconstruction_rejects_bad_arguments_clearly(reconstruct, inputs, arguments, error, message):
    with pytest.raises(error, match=message):
        reconstruct(inputs, **arguments)


def test_token_reconstruction_by_checkpoint_name_runs_the_checkpoints_own_pipeline_code():
    """transformers builds a checkpoint's `custom_pipelines` entry only from the code saved with it, so naming the
    task with a directory needs `trust_remote_code=True` even with switch_hf imported (the README says so)."""
    import switch_hf
    from transformers import AutoModelForMaskedLM

    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("token-reconstruction", model=switch_hf.RELEASED_CHECKPOINT)
    by_name = pipeline("token-reconstruction", model=switch_hf.RELEASED_CHECKPOINT, trust_remote_code=True)
    assert type(by_name).__name__ == "TokenReconstructionPipeline"
    model = AutoModelForMaskedLM.from_pretrained(switch_hf.RELEASED_CHECKPOINT)
    tokenizer = AutoTokenizer.from_pretrained(switch_hf.RELEASED_CHECKPOINT)
    by_object = pipeline("token-reconstruction", model=model, tokenizer=tokenizer)
    text = "Paris is the [MASK] of France."
    assert by_name(text) == by_object(text)


def test_pipeline_module_imports_only_torch_and_transformers():
    """pipeline_switch.py ships with checkpoints and runs where switch_hf is not installed."""
    import sys

    tree = ast.parse((REPO_ROOT / "switch_hf" / "pipeline_switch.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would need switch_hf's other files next to the pipeline"
            imported.add(node.module.split(".")[0])

    assert imported - sys.stdlib_module_names <= {"torch", "transformers"}
