"""Batches for token reconstruction: BERT-style corruption, and labels where the model must restore a token."""

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class ReconstructionCollator:
    """Pads tokenized examples and corrupts them for training (Devlin et al., 2019, masked LM).

    Of the real, non-special tokens, `mask_probability` are selected; of those 80% become `[MASK]`, 10% a random
    token and 10% stay as they are. Every selected token is labelled with its original id, and so is a further
    `identity_probability` share of the untouched tokens, so the model also learns to copy what it sees: the
    reconstruction of uncorrupted text. Other positions are -100 (no loss).

    Call it with a `torch.Generator` for a corruption that depends only on that generator's seed (resumable
    training); without one it draws from torch's global RNG (as `Trainer` calls it).
    """

    tokenizer: PreTrainedTokenizerBase
    mask_probability: float = 0.15
    identity_probability: float = 0.15
    pad_to_multiple_of: int | None = 8

    def __post_init__(self):
        for name in ("mask_probability", "identity_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ReconstructionCollator.{name} must be in [0, 1], got {value!r}")
        if self.tokenizer.mask_token_id is None:
            raise ValueError("ReconstructionCollator needs a tokenizer with a mask token")

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
