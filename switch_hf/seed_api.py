"""A compact constructor: `SwitchTransformer(num_experts, hidden_size=..., num_heads=...)` and
`model(embeddings) -> token logits`, on top of [`SwitchForTokenReconstruction`].

New code should use `SwitchForTokenReconstruction` (or `AutoModelForMaskedLM`) directly: it takes `input_ids` as
well, returns a `ModelOutput` with the losses and routing statistics, and loads pretrained backbones.
"""

import torch
from transformers import BertConfig

from .configuration_switch import SwitchConfig
from .modeling_switch import SwitchForTokenReconstruction


class SwitchTransformer(SwitchForTokenReconstruction):
    """Switch layers over BERT embeddings, built from three numbers.

    Args:
        num_experts: experts per Switch layer.
        hidden_size: width of the BERT embeddings fed in (768 for bert-base-uncased, 384 for all-MiniLM-L6-v2).
        num_heads: attention heads of the Switch layers.
        config_kwargs: any other [`SwitchConfig`] field, e.g. `num_switch_layers`.

    The backbone has bert-base-uncased's vocabulary (30,522 tokens) and the given hidden size; it is random, since
    this model is fed precomputed embeddings. `SwitchTransformer(config)` also works, for `from_pretrained`.
    """

    def __init__(self, num_experts: int | SwitchConfig, hidden_size: int = 768, num_heads: int = 8, **config_kwargs):
        if isinstance(num_experts, SwitchConfig):
            config = num_experts
        else:
            backbone = BertConfig(hidden_size=hidden_size, num_attention_heads=_backbone_heads(hidden_size))
            config = SwitchConfig(
                backbone_config=backbone, num_experts=num_experts, num_attention_heads=num_heads, **config_kwargs
            )
        super().__init__(config)

    def forward(self, embeddings: torch.FloatTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeddings: (batch, seq, hidden) BERT hidden states -> token logits (batch, seq, vocab_size)."""
        return super().forward(backbone_hidden_states=embeddings, attention_mask=attention_mask).logits


def _backbone_heads(hidden_size: int) -> int:
    """BERT's 64-wide heads where the size allows (12 for 768, 6 for 384), else a single head."""
    return hidden_size // 64 if hidden_size % 64 == 0 else 1
