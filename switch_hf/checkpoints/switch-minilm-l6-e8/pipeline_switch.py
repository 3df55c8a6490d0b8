"""The "token-reconstruction" pipeline: text in, the text the model reconstructs out, with per-token predictions,
their scores, and the tokens the model would change.

    >>> from transformers import pipeline
    >>> reconstruct = pipeline("token-reconstruction", model="org/switch-bert", trust_remote_code=True)
    >>> reconstruct("The quick brown fox jumps over the lazy dog.")
    {'reconstructed_text': 'the quick brown fox jumps over the lazy dog.',
     'tokens': [{'index': 1, 'start': 0, 'end': 3, 'input_token': 'the', 'input_token_id': 1996,
                 'input_token_score': 0.98, 'predicted_token': 'the', 'predicted_token_id': 1996, 'score': 0.98,
                 'changed': False, 'candidates': [{'token': 'the', 'token_id': 1996, 'score': 0.98}, ...]},
                ...],
     'changes': []}

Importing `switch_hf` registers the pipeline with transformers' `PIPELINE_REGISTRY`, so
`pipeline("token-reconstruction", model=...)` works with the package installed. `switch_hf.hub.save_for_hub` and
`switch_hf.hub.push_to_hub` save it with a checkpoint (`Pipeline.save_pretrained` copies this file and writes
`custom_pipelines` into config.json), so that `pipeline("token-reconstruction", model=<repo>, trust_remote_code=True)`
works where the package is not installed. That is why this file imports only torch and transformers.
"""

import torch

from transformers import Pipeline
from transformers.utils import logging


logger = logging.get_logger(__name__)

TOKEN_RECONSTRUCTION_TASK = "token-reconstruction"


class TokenReconstructionPipeline(Pipeline):
    """Reconstructs text token by token with a masked-LM style model (e.g. `SwitchForTokenReconstruction`).

    Call it with a string or a list of strings. Each string gives a dict:

    - `reconstructed_text` (`str`): the model's most likely token at every position of the text, decoded. Where
      that token is one of the tokenizer's special tokens (say `[UNK]` at an `[UNK]`), the text takes the most likely
      other one, so every `[MASK]` and `[UNK]` of the input is filled and no position vanishes; `tokens` keeps the
      model's own ranking.
    - `tokens` (`list[dict]`): one entry per token of the text (the tokenizer's added tokens such as `[CLS]`, `[SEP]`
      and padding are left out; a `[MASK]` written in the text is kept, so the pipeline also fills masks):
        - `index`: the token's position in the model input (`[CLS]` is position 0);
        - `start`, `end`: its character span in the input text (`None` with a tokenizer that gives no offsets);
        - `input_token`, `input_token_id`: the token as read;
        - `input_token_score`: the probability the model gives to the token it read;
        - `predicted_token`, `predicted_token_id`, `score`: the most likely token and its probability;
        - `changed`: whether the prediction differs from the input token;
        - `candidates`: the `top_k` most likely tokens, as `{"token", "token_id", "score"}`, best first.
    - `changes` (`list[dict]`): the entries of `tokens` whose `changed` is true: what the model would rewrite.

    Args (at construction or per call):
        top_k (`int`, *optional*, defaults to 3): candidates listed per token.
        tokenizer_kwargs (`dict`, *optional*): passed to the tokenizer. Texts longer than the model reads are
            truncated (with a warning) unless these say otherwise.
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    default_top_k = 3

    def _sanitize_parameters(self, top_k=None, tokenizer_kwargs=None, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {sorted(kwargs)}")
        preprocess_params, postprocess_params = {}, {}
        if tokenizer_kwargs is not None:
            preprocess_params["tokenizer_kwargs"] = tokenizer_kwargs
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
            postprocess_params["top_k"] = top_k
        return preprocess_params, {}, postprocess_params

    def __call__(self, inputs, **kwargs):
        """Reconstruct `inputs` (a string or a list of strings); see the class docstring for what comes back."""
        return super().__call__(inputs, **kwargs)

    def _max_length(self) -> int:
        """The longest input the model reads: its position embeddings, or the tokenizer's limit if lower."""
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        return min(limit for limit in limits if isinstance(limit, int) and limit > 0)

    def preprocess(self, inputs, tokenizer_kwargs=None):
        if not isinstance(inputs, str):
            raise ValueError(
                f"{type(self).__name__} takes text (a string or a list of strings), got {type(inputs).__name__}"
            )
        tokenizer_kwargs = dict(tokenizer_kwargs or {})
        # Character spans let callers mark the changed tokens in the original text; only fast tokenizers have them.
        with_offsets = bool(getattr(self.tokenizer, "is_fast", False))
        if "truncation" not in tokenizer_kwargs and "max_length" not in tokenizer_kwargs:
            max_length = self._max_length()
            # verbose=False: the tokenizer's own too-long warning would repeat the one below.
            length = len(self.tokenizer(inputs, verbose=False, **tokenizer_kwargs)["input_ids"])
            if length > max_length:
                logger.warning(
                    f"The text is {length} tokens long; the model reads at most {max_length}, so only its first "
                    f"{max_length} tokens are reconstructed."
                )
            tokenizer_kwargs.update(truncation=True, max_length=max_length)
        return self.tokenizer(inputs, return_tensors="pt", return_offsets_mapping=with_offsets, **tokenizer_kwargs)

    def _forward(self, model_inputs):
        # Offsets are for postprocess only; the model must not see them.
        offset_mapping = model_inputs.pop("offset_mapping", None)
        logits = self.model(**model_inputs).logits  # (batch, seq, vocab)
        # Per-row tensors only: with `batch_size`, the pipeline unbatches by slicing each output along dim 0, which the
        # model's batch-wide statistics (its losses, `tokens_per_expert`, `dropped_fraction`) do not have.
        outputs = {
            "logits": logits,
            "input_ids": model_inputs["input_ids"],
            "attention_mask": model_inputs.get("attention_mask", torch.ones_like(model_inputs["input_ids"])),
        }
        if offset_mapping is not None:
            outputs["offset_mapping"] = offset_mapping
        return outputs

    def postprocess(self, model_outputs, top_k=None):
        top_k = min(top_k or self.default_top_k, model_outputs["logits"].shape[-1])
        input_ids = model_outputs["input_ids"][0]  # (seq,)
        probabilities = model_outputs["logits"][0].float().softmax(dim=-1)  # (seq, vocab)
        offsets = model_outputs.get("offset_mapping")
        offsets = offsets[0].tolist() if offsets is not None else None

        # Positions of the text itself: not padding and not the tokens the tokenizer adds around it. A [MASK] or
        # [UNK] comes from the text, so it is kept.
        added_ids = set(self.tokenizer.all_special_ids) - {self.tokenizer.mask_token_id, self.tokenizer.unk_token_id}
        is_text = model_outputs["attention_mask"][0].bool() & ~torch.isin(
            input_ids, torch.tensor(sorted(added_ids), dtype=input_ids.dtype, device=input_ids.device)
        )
        positions = is_text.nonzero().flatten().tolist()

        top_scores, top_ids = probabilities.topk(top_k, dim=-1)  # (seq, k)
        input_scores = probabilities.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)  # (seq,)

        tokens = []
        for position in positions:
            input_id = int(input_ids[position])
            candidate_ids = top_ids[position].tolist()
            candidate_scores = top_scores[position].tolist()
            candidate_tokens = self.tokenizer.convert_ids_to_tokens(candidate_ids)
            start, end = offsets[position] if offsets is not None else (None, None)
            tokens.append(
                {
                    "index": position,
                    "start": start,
                    "end": end,
                    "input_token": self.tokenizer.convert_ids_to_tokens(input_id),
                    "input_token_id": input_id,
                    "input_token_score": float(input_scores[position]),
                    "predicted_token": candidate_tokens[0],
                    "predicted_token_id": candidate_ids[0],
                    "score": candidate_scores[0],
                    "changed": candidate_ids[0] != input_id,
                    "candidates": [
                        {"token": token, "token_id": token_id, "score": score}
                        for token, token_id, score in zip(candidate_tokens, candidate_ids, candidate_scores)
                    ],
                }
            )
        # A special token is no text: where the model predicts one, the text takes its best other token, not nothing.
        special_ids = torch.tensor(self.tokenizer.all_special_ids, device=probabilities.device)
        word_ids = probabilities[positions].index_fill(-1, special_ids, -1.0).argmax(dim=-1)
        return {
            "reconstructed_text": self.tokenizer.decode(word_ids.tolist()),
            "tokens": tokens,
            "changes": [token for token in tokens if token["changed"]],
        }


__all__ = ["TOKEN_RECONSTRUCTION_TASK", "TokenReconstructionPipeline"]
