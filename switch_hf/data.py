"""Batches for token reconstruction: BERT-style corruption, and labels where the model must restore a token; and the
checks that a plain-text corpus can be trained and evaluated on."""

import codecs
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .cli import UsageError

logger = logging.getLogger(__name__)

CORPUS_FILES = ("train.txt", "validation.txt")
CORPUS_LAYOUT = (
    "a corpus directory holds train.txt and validation.txt, UTF-8 text with one example per line; build the default "
    "one with `bash scripts/install_corpus_sources.sh && python scripts/prepare_corpus.py` (see docs/corpus.md)"
)


def word_start_positions(continuation: torch.Tensor) -> torch.Tensor:
    """continuation: (b, s) bool, True on the "##" pieces that continue the word before them -> (b, s) long, the
    position of the first piece of each token's word (a token not continuing a word starts its own)."""
    positions = torch.arange(continuation.shape[1]).expand_as(continuation)
    return torch.where(continuation, 0, positions).cummax(-1).values


@dataclass
class ReconstructionCollator:
    """Pads tokenized examples and corrupts them for training (Devlin et al., 2019, masked LM).

    Of the real, non-special tokens, `mask_probability` are selected; of those 80% become `[MASK]`, 10% a random
    token and 10% stay as they are. Every selected token is labelled with its original id, and so is a further
    `identity_probability` share of the untouched tokens, so the model also learns to copy what it sees: the
    reconstruction of uncorrupted text. Other positions are -100 (no loss).

    With `whole_word_masking`, a word is selected, and masked, kept or randomized, with all its "##" continuation
    pieces (Devlin et al.'s whole-word masking), so the model cannot read a hidden piece off the rest of its word.
    Words are selected with `mask_probability`, which is then also each token's chance of being selected: the
    masking rate counts tokens as without it.

    Call it with a `torch.Generator` for a corruption that depends only on that generator's seed (resumable
    training); without one it draws from torch's global RNG (as `Trainer` calls it).
    """

    tokenizer: PreTrainedTokenizerBase
    mask_probability: float = 0.15
    identity_probability: float = 0.15
    pad_to_multiple_of: int | None = 8
    whole_word_masking: bool = False

    def __post_init__(self):
        for name in ("mask_probability", "identity_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ReconstructionCollator.{name} must be in [0, 1], got {value!r}")
        if self.tokenizer.mask_token_id is None:
            raise ValueError("ReconstructionCollator needs a tokenizer with a mask token")
        if not self.whole_word_masking:
            return
        # (vocabulary,) True for the "##" pieces that continue a word (WordPiece)
        self.continuation = torch.zeros(len(self.tokenizer), dtype=torch.bool)
        for token, index in self.tokenizer.get_vocab().items():
            self.continuation[index] = token.startswith("##")
        if not self.continuation.any():
            raise ValueError(
                f"whole_word_masking needs a WordPiece tokenizer, whose '##' pieces continue a word; "
                f"{type(self.tokenizer).__name__} has none"
            )

    def __call__(self, examples: list[dict], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        features = [{key: example[key] for key in ("input_ids", "token_type_ids", "attention_mask")} for example in examples]
        batch = self.tokenizer.pad(features, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
        original = batch["input_ids"]  # (b, s)
        special = torch.tensor(
            [self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in original.tolist()],
            dtype=torch.bool,
        )
        candidates = batch["attention_mask"].bool() & ~special

        def draw(probability):
            return (torch.rand(original.shape, generator=generator) < probability) & candidates

        selected = draw(self.mask_probability)
        # One uniform draw splits the selected tokens 80 / 10 / 10.
        split = torch.rand(original.shape, generator=generator)
        if self.whole_word_masking:
            # Every piece takes the draws of its word's first piece. A "##" piece right after a special token has
            # lost its word's start; it counts as a word of its own.
            follows_text = torch.nn.functional.pad(candidates[:, :-1], (1, 0))  # (b, s)
            first_piece = word_start_positions(self.continuation[original] & candidates & follows_text)  # (b, s)
            selected = selected.gather(1, first_piece) & candidates
            split = split.gather(1, first_piece)
        to_mask = selected & (split < 0.8)
        to_random = selected & (split >= 0.8) & (split < 0.9)
        random_tokens = torch.randint(len(self.tokenizer), original.shape, generator=generator)

        corrupted = original.clone()
        corrupted[to_mask] = self.tokenizer.mask_token_id
        corrupted[to_random] = random_tokens[to_random]

        labelled = selected | (draw(self.identity_probability) & ~selected)
        batch["input_ids"] = corrupted
        batch["labels"] = original.masked_fill(~labelled, -100)
        return dict(batch)


def check_corpus(corpus_dir: str | Path) -> None:
    """Raise `UsageError`, naming the file and the fix, unless `corpus_dir` holds train.txt and validation.txt as UTF-8
    text with at least one line of text each (`datasets` fails on anything else with errors that name neither)."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise UsageError(f"--corpus-dir {corpus_dir}: no such directory; {CORPUS_LAYOUT}")
    for name in CORPUS_FILES:
        path = corpus_dir / name
        if not path.is_file():
            raise UsageError(f"--corpus-dir {corpus_dir} has no {name}; {CORPUS_LAYOUT}")
        check_text_file(path)


def check_text_file(path: Path) -> None:
    """Raise `UsageError` unless `path` is UTF-8 text with at least one line that is not blank."""
    lines_with_text = 0
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if number == 1 and line.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise UsageError(
                    f"{path} is UTF-16 text; the corpus must be UTF-8: convert it with "
                    f"`iconv -f UTF-16 -t UTF-8 {path} > {path}.utf8` and put the result in its place"
                )
            if b"\0" in line:
                raise UsageError(
                    f"{path} line {number} holds a NUL byte: the file is binary (or UTF-16 without a byte-order mark), "
                    f"not UTF-8 text with one example per line"
                )
            try:
                lines_with_text += bool(line.decode("utf-8").strip())
            except UnicodeDecodeError as error:
                raise UsageError(
                    f"{path} line {number} is not UTF-8 (byte {line[error.start]:#04x}); the corpus must be UTF-8: "
                    f"convert it, e.g. from Latin-1 with `iconv -f LATIN1 -t UTF-8 {path} > {path}.utf8`"
                ) from None
    if not lines_with_text:
        what = f"its {number} lines are all blank" if path.stat().st_size else "it is empty"
        raise UsageError(f"{path} holds no text ({what}); put one example per line in it")


def drop_examples_without_text(dataset, tokenizer: PreTrainedTokenizerBase, path: str | Path):
    """The examples of a tokenized `dataset` (read from `path`) that hold a token besides the special ones: blank
    lines, or lines of characters the tokenizer drops, give nothing to reconstruct."""
    specials = tokenizer.num_special_tokens_to_add()
    keep = [index for index, ids in enumerate(dataset["input_ids"]) if len(ids) > specials]
    if not keep:
        raise UsageError(f"{path}: no line holds a token the tokenizer keeps; put one example of text per line in it")
    if len(keep) == len(dataset):
        return dataset
    left_out = len(dataset) - len(keep)
    logger.warning("%s: %d of %d lines hold no text; they are left out", path, left_out, len(dataset))
    return dataset.select(keep)


def check_max_length(max_length: int, tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int) -> None:
    """Raise `UsageError` unless examples truncated to `max_length` tokens keep some text and fit the model."""
    specials = tokenizer.num_special_tokens_to_add()
    if max_length <= specials:
        raise UsageError(
            f"--max-length {max_length} leaves no room for text: the tokenizer adds {specials} special tokens to every "
            f"example"
        )
    if max_length > max_position_embeddings:
        raise UsageError(
            f"--max-length {max_length} exceeds the model's {max_position_embeddings} positions "
            f"(max_position_embeddings); pass at most {max_position_embeddings}"
        )
