import json

import pytest
from transformers import AutoConfig, BertConfig

from switch_hf import SwitchConfig

from conftest import REPO_ROOT, tiny_config


def test_defaults_follow_the_papers():
    config = SwitchConfig()
    assert config.top_k == 1
    assert config.router_dtype == "float32"
    assert config.capacity_factor_train == 1.25 and config.capacity_factor_eval == 2.0
    assert config.hidden_size == 768 and config.vocab_size == 30522  # bert-base-uncased's shape
    assert config.expert_intermediate_size == config.backbone_config.intermediate_size


@pytest.mark.parametrize(
    "name", ["switch-minilm-l6-e8.json", "switch-bert-base-e4.json", "switch-minilm-l6-attn-e4.json"]
)
def test_shipped_configs_load(name):
    config = SwitchConfig.from_json_file(REPO_ROOT / "configs" / name)
    raw = json.loads((REPO_ROOT / "configs" / name).read_text())
    assert config.num_experts == raw["num_experts"]
    assert config.expert_kinds == raw.get("expert_kinds", ["feed_forward"] * config.num_switch_layers)
    assert config.hidden_size == raw["backbone_config"]["hidden_size"]
    assert isinstance(config.backbone_config, BertConfig)


def test_round_trip_through_auto_config(tmp_path):
    config = tiny_config(num_experts=6, top_k=2, capacity_factor_eval=None)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SwitchConfig)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}
    assert without_path(loaded) == without_path(config)
    assert loaded.capacity_factor_eval is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_experts", 0),
        ("num_experts", -3),
        ("num_experts", 2.5),
        ("top_k", 0),
        ("top_k", 5),  # more than the 4 experts
        ("num_attention_heads", 5),  # does not divide hidden 32
        ("num_switch_layers", 0),
        ("expert_intermediate_size", 0),
        ("capacity_factor_train", 0.0),
        ("capacity_factor_eval", -1.0),
        ("expert_hidden_act", "swishy"),
        ("router_dtype", "float64"),
        ("router_jitter_noise", 1.5),
        ("expert_dropout", -0.1),
        ("hidden_dropout_prob", 1.0),
        ("router_aux_loss_coef", -0.01),
        ("router_z_loss_coef", -1.0),
        ("layer_norm_eps", 0.0),
        ("freeze_backbone", "yes"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SwitchConfig\.{field} must be .*got {value!r}"):
        tiny_config(**{field: value})


def test_backbone_must_be_bert():
    with pytest.raises(ValueError, match="backbone_config must describe a BERT model"):
        SwitchConfig(backbone_config={"model_type": "gpt2"})


@pytest.mark.parametrize(
    "pattern, kinds, routers",
    [
        ("dfdf", ["dense", "feed_forward", "dense", "feed_forward"], ["layer 1 feed_forward", "layer 3 feed_forward"]),
        ("dd", ["dense", "dense"], []),
        ("bd", ["both", "dense"], ["layer 0 attention", "layer 0 feed_forward"]),
        (["dense", "attention"], ["dense", "attention"], ["layer 1 attention"]),
    ],
)
def test_dense_layers_expand_from_letters_and_have_no_router(pattern, kinds, routers):
    config = tiny_config(num_switch_layers=len(kinds), expert_kinds=pattern)
    assert config.expert_kinds == kinds
    assert config.router_names == routers


@pytest.mark.parametrize("pattern", ["dx", "dF", "d "])
def test_unknown_expert_kind_letters_still_fail(pattern):
    with pytest.raises(ValueError, match="unknown letters"):
        tiny_config(expert_kinds=pattern)


def test_dense_kind_round_trips(tmp_path):
    config = tiny_config(num_switch_layers=4, expert_kinds="dfdf")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.expert_kinds == ["dense", "feed_forward", "dense", "feed_forward"]
    assert loaded.router_names == config.router_names


def test_an_embeddings_only_backbone_is_allowed():
    config = tiny_config(backbone_config=BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=0, num_attention_heads=4))
    assert config.backbone_config.num_hidden_layers == 0
