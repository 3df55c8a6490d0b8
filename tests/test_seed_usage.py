"""The seed document's usage section (../shared/seed/SwitchTransformer.md) must keep working.

Its snippets are run as written, with two substitutions only: the tokenizer and BERT come from the local
all-MiniLM-L6-v2 directory instead of the Hub's bert-base-uncased, and `hidden_size` is that model's 384.
"""

import contextlib
import io
import re

import pytest
import torch

from conftest import REPO_ROOT

SEED = REPO_ROOT.parent / "shared" / "seed" / "SwitchTransformer.md"


def usage_snippets() -> str:
    usage = SEED.read_text().split("## Usage", 1)[1].split("## Example Output", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", usage, flags=re.DOTALL))


def test_seed_usage_runs_with_the_local_minilm(minilm_path):
    code = usage_snippets()
    assert 'model_name = "bert-base-uncased"' in code and "hidden_size = 768" in code
    code = code.replace('model_name = "bert-base-uncased"', f"model_name = {minilm_path!r}")
    code = code.replace("hidden_size = 768", "hidden_size = 384")

    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile("from switch_hf import SwitchTransformer\n" + code, str(SEED), "exec"), namespace)

    tokens = namespace["tokens"]["input_ids"]
    assert tokens.shape == (1, 12)  # [CLS] the quick brown fox jumps over the lazy dog . [SEP]
    assert namespace["embeddings"].shape == (1, 12, 384)
    assert namespace["output"].shape == (1, 12, 30522)  # token logits over the uncased vocabulary
    assert namespace["decoded_ids"].shape == (1, 12)
    assert re.fullmatch(r"Decoded output: .*\n", printed.getvalue(), flags=re.DOTALL)


def test_seed_constructor_builds_from_its_three_numbers():
    from switch_hf import SwitchTransformer

    model = SwitchTransformer(4, hidden_size=768, num_heads=8)
    assert model.config.num_experts == 4
    assert model.config.hidden_size == 768
    assert model.config.num_attention_heads == 8
    with torch.no_grad():
        logits = model(torch.randn(2, 5, 768))
    assert logits.shape == (2, 5, 30522)
    with pytest.raises(ValueError, match="hidden_size=768"):
        model(torch.randn(2, 5, 384))
