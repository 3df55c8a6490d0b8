"""scripts/evaluate.py's measures: word kinds, whole-word masking, masked perplexity and evaluation files; and
scripts/ngram_overlap.py, which checks that an evaluation set is not in the training text."""

import json
import math
import re
import sys

import pytest
import torch
from transformers import AutoTokenizer

from switch_hf.cli import UsageError

from conftest import REPO_ROOT
from test_training import SENTENCES, tiny_setup  # noqa: F401  (a fixture)
from test_training_reliability import evaluate_argv, evaluate_script, tiny_checkpoint  # noqa: F401  (a fixture)

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import ngram_overlap  # noqa: E402

KIND = {kind: index for index, kind in enumerate(evaluate_script.WORD_KINDS)}


def test_every_token_of_the_vocabulary_has_its_kind(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    kinds = evaluate_script.token_kinds(tokenizer)
    assert kinds.shape == (len(tokenizer),)
    expected = {"the": "function", "of": "function", "would": "function", "paris": "content", "capital": "content",
                ",": "punctuation", "?": "punctuation", "$": "punctuation", "##ing": "word_piece", "##s": "word_piece"}
    for token, kind in expected.items():
        assert kinds[tokenizer.convert_tokens_to_ids(token)] == KIND[kind], token
    # "doesn't" splits into pieces that are all function words or punctuation.
    pieces = tokenizer("doesn't")["input_ids"][1:-1]
    assert [kinds[i].item() for i in pieces] == [KIND["function"], KIND["punctuation"], KIND["function"]]


def test_whole_word_masking_hides_every_piece_of_a_chosen_word(minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    encoded = tokenizer(["the unaffable giraffe slept", "a cat"], padding=True, return_tensors="pt")
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in encoded["input_ids"]]
    kinds = evaluate_script.token_kinds(tokenizer)[encoded["input_ids"]]
    real = encoded["attention_mask"].bool() & (encoded["input_ids"] != tokenizer.cls_token_id)
    real &= encoded["input_ids"] != tokenizer.sep_token_id
    continuation = real & (kinds == KIND["word_piece"])
    word_starts = [i for i, token in enumerate(tokens[0]) if real[0, i] and not token.startswith("##")]
    assert len(word_starts) == 4 and continuation[0].sum() >= 2  # "unaffable" and "giraffe" are split

    chosen = torch.zeros_like(real)
    chosen[0, word_starts[1]] = True  # the first piece of "unaffable"
    chosen[0, word_starts[2] + 1] = True  # a middle piece of "giraffe": not a word's first piece, so no word
    chosen[1, 0] = True  # [CLS] is not a real token
    masked = evaluate_script.whole_word_mask(real, continuation, chosen)
    assert masked[0].tolist() == [word_starts[1] <= i < word_starts[2] for i in range(len(tokens[0]))]
    assert tokenizer.convert_tokens_to_string([t for t, m in zip(tokens[0], masked[0]) if m]) == "unaffable"
    assert not masked[1].any()


def test_masked_scores_count_hits_and_perplexity_per_kind():
    scores = evaluate_script.MaskedScores()
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05],    # target 0: top-1
                                     [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],    # target 3: top-5 only
                                     [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]]))  # target 5: neither (ties break low)
    scores.add(logits, torch.tensor([0, 3, 5]), torch.tensor([KIND["function"], KIND["content"], KIND["content"]]))
    result = scores.result()
    assert result["masked_tokens"] == 3
    assert result["masked_top1_accuracy"] == pytest.approx(1 / 3)
    assert result["masked_top5_accuracy"] == pytest.approx(2 / 3)
    assert result["masked_perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.1) + math.log(0.05)) / 3))
    content = result["masked_by_kind"]["content"]
    assert content["tokens"] == 2 and content["top1_accuracy"] == 0 and content["top5_accuracy"] == pytest.approx(0.5)
    assert content["perplexity"] == pytest.approx(math.exp(-(math.log(0.1) + math.log(0.05)) / 2))
    assert result["masked_by_kind"]["punctuation"] == {"tokens": 0, "top1_accuracy": None, "top5_accuracy": None,
                                                      "perplexity": None}


def test_every_eval_file_is_reported_under_its_name_with_both_maskings(tiny_checkpoint, tiny_setup, tmp_path):
    general = tmp_path / "general_english.txt"
    general.write_text("Paris is the capital of France, and it is lovely in spring.\n\nGiraffes sleep standing up.\n")
    other = tmp_path / "sets" / "fables.txt"
    other.parent.mkdir()
    other.write_text("\n".join(reversed(SENTENCES)) + "\n")
    argv = evaluate_argv(tiny_checkpoint, tiny_setup / "corpus", tmp_path / "both", "--eval-file", str(general),
                         "--eval-file", str(other), "--mask-probability", "0.5")
    evaluate_script.main(argv)
    results = json.loads((tmp_path / "both" / "eval_results.json").read_text())

    assert set(results["eval_files"]) == {"general_english", "fables"}
    assert results["eval_files"]["general_english"]["examples"] == 2  # the blank line is left out
    for figures in (results, *results["eval_files"].values()):
        for masked in (figures, figures["whole_word_masking"]):
            by_kind = masked["masked_by_kind"]
            assert set(by_kind) == set(evaluate_script.WORD_KINDS)
            assert sum(entry["tokens"] for entry in by_kind.values()) == masked["masked_tokens"] > 0
            assert 0 <= masked["masked_top1_accuracy"] <= masked["masked_top5_accuracy"] <= 1
            assert masked["masked_perplexity"] >= 1
        assert 0 < figures["whole_word_masking"]["masked_words"] <= figures["whole_word_masking"]["masked_tokens"]

    # Token masking gives the same figures whether or not whole-word masking runs beside it.
    evaluate_script.main(evaluate_argv(tiny_checkpoint, tiny_setup / "corpus", tmp_path / "token",
                                       "--eval-file", str(general), "--mask-probability", "0.5", "--masking", "token"))
    token_only = json.loads((tmp_path / "token" / "eval_results.json").read_text())
    assert "whole_word_masking" not in token_only
    for key in ("masked_top1_accuracy", "masked_perplexity", "masked_tokens", "masked_by_kind"):
        assert token_only[key] == results[key]
        assert token_only["eval_files"]["general_english"][key] == results["eval_files"]["general_english"][key]


@pytest.mark.parametrize(
    "files, expected",
    [
        (["missing.txt"], "--eval-file {tmp}/missing.txt: no such file"),
        (["a/set.txt", "b/set.txt"], "--eval-file {tmp}/b/set.txt and {tmp}/a/set.txt have the same name"),
    ],
)
def test_bad_eval_file_options_exit_2(tiny_checkpoint, tiny_setup, tmp_path, capsys, files, expected):
    for name in ("a/set.txt", "b/set.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("some text\n")
    extra = [option for name in files for option in ("--eval-file", str(tmp_path / name))]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.parse_args(evaluate_argv(tiny_checkpoint, tiny_setup / "corpus", tmp_path / "eval", *extra))
    assert exit_info.value.code == 2
    assert expected.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, expected",
    [(b"caf\xe9 au lait\n", "line 1 is not UTF-8 (byte 0xe9)"), (b"\n\n", "holds no text (its 2 lines are all blank)")],
    ids=["latin-1", "blank"],
)
def test_an_eval_file_that_is_not_text_is_named(tiny_checkpoint, tiny_setup, tmp_path, content, expected):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(f"{bad} {expected}")):
        evaluate_script.main(evaluate_argv(tiny_checkpoint, tiny_setup / "corpus", tmp_path / "eval",
                                           "--eval-file", str(bad)))
    assert not (tmp_path / "eval").exists()


# --- scripts/ngram_overlap.py -------------------------------------------------------------------------------------


def test_ngram_overlap_counts_shared_windows_ignoring_case_and_punctuation(tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text("It was a bright cold day in April, and the clocks were striking thirteen.\nShort line.\n")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("A BRIGHT cold day -- in April and the clocks were quiet.\n"
                        "Nothing here is in the training text at all.\n")
    report = ngram_overlap.overlap([train], [held_out], n=8)[str(held_out)]
    # Three of the first line's four 8-grams are in the training text ("a bright cold day in april and the", ...), the
    # last ("day in april and the clocks were quiet") is not; nor is either of the second line's two.
    assert report == {"examples": 2, "ngrams": 4 + 2, "overlapping_ngrams": 3, "overlap_fraction": pytest.approx(3 / 6),
                      "examples_with_overlap": 1}
    # A window never spans two lines of the training text.
    assert ngram_overlap.overlap([train], [train], n=4)[str(train)]["overlap_fraction"] == 1.0
    assert ngram_overlap.line_ngrams("Short line.", 8) == set()

    ngram_overlap.main(["--train", str(train), "--eval", str(held_out), "--output", str(tmp_path / "overlap.json")])
    printed = capsys.readouterr().out
    assert f"{held_out}: 3 of 6 8-grams in the training text (50.000%), 1 of 2 examples hold one" in printed
    assert json.loads((tmp_path / "overlap.json").read_text())["eval"][str(held_out)]["overlapping_ngrams"] == 3


def test_ngram_overlap_names_a_missing_file(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("text\n")
    with pytest.raises(SystemExit) as exit_info:
        ngram_overlap.parse_args(["--train", str(tmp_path / "train.txt"), "--eval", str(tmp_path / "nope.txt")])
    assert exit_info.value.code == 2
    assert f"--eval {tmp_path / 'nope.txt'}: no such file" in capsys.readouterr().err


# --- scripts/make_general_english_eval.py -------------------------------------------------------------------------


def test_general_english_verses_lose_their_markup_and_only_clean_unseen_sentences_are_kept(tmp_path):
    import make_general_english_eval as make_eval

    line = ('A Psalm by David.  Psalms 3:4: <w>I</w> cry <w>to</w> <w>Yahweh</w><w>with</w> <w>my</w> voice, '
            '<w>and</w> <w>he</w> answers <w>me</w><note type="x">Or, answered.</note> out <w>of</w> <w>his</w> '
            '\u201choly\u201d hill. <milestone type="line"/>')
    match = make_eval.VERSE_LINE.search(line)
    expected = 'I cry to Yahweh with my voice, and he answers me out of his "holy" hill.'
    assert make_eval.verse_text(match["osis"]) == expected

    train = tmp_path / "train.txt"
    train.write_text("Fortune: and the cry of the city went up to heaven, as the proverb says.\n")
    seen = "The men who didn't die were struck, and the cry of the city went up to heaven."
    verses = [
        "The king of Egypt removed him from office at Jerusalem.",
        "The king of Egypt removed him from office at Jerusalem.",   # a duplicate
        seen,                                                       # shares an 8-gram with the training text
        "Selah.",                                                   # too short
        "and he went on his way, and came to the city of the north",  # not a whole sentence
        'He said, "Go back, my daughters.',                         # an unbalanced quote
        "Peter and John were going up into the temple at the hour of prayer, the ninth hour.",
    ]
    kept = make_eval.select(verses, [train], examples=10, seed=0)
    assert sorted(kept) == sorted([verses[0], verses[-1]])
    assert make_eval.select(verses, [train], examples=1, seed=0)[0] in kept


def test_the_general_english_set_is_600_distinct_plain_sentences():
    import make_general_english_eval as make_eval

    lines = (REPO_ROOT / "data" / "eval" / "general_english.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len({line.casefold() for line in lines}) == 600
    assert all(make_eval.is_plain_sentence(line) for line in lines)
    assert not any(quote in line for line in lines for quote in "\u2018\u2019\u201c\u201d")
