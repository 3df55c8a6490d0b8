import json
import textwrap

import pytest
from transformers import AutoConfig, BertConfig

from switch_hf import SwitchConfig, SwitchForTokenReconstruction

from conftest import BLOCK_SWITCH_HF, REPO_ROOT, tiny_config


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
        # NaN passes every comparison-free check and infinity every lower bound: both must fail by name.
        ("capacity_factor_train", float("nan")),
        ("capacity_factor_eval", float("nan")),  # would drop every token
        ("capacity_factor_eval", float("inf")),  # None is how to ask for dropless routing
        ("router_aux_loss_coef", float("nan")),
        ("router_aux_loss_coef", float("inf")),
        ("router_z_loss_coef", float("nan")),
        ("layer_norm_eps", float("nan")),
        ("layer_norm_eps", float("inf")),
        ("layer_norm_eps", True),
        ("initializer_range", float("nan")),
        ("initializer_range", float("inf")),
        ("router_jitter_noise", float("nan")),
        ("expert_dropout", float("inf")),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SwitchConfig\.{field} must be .*got {value!r}"):
        tiny_config(**{field: value})


def test_backbone_must_be_bert():
    with pytest.raises(ValueError, match="backbone_config must describe a BERT model"):
        SwitchConfig(backbone_config={"model_type": "gpt2"})


@pytest.mark.parametrize(
    "backbone, found",
    [
        ({"hidden_size": 32, "num_attention_heads": 4}, "a dict without model_type"),
        ({"model_type": "no-such-model"}, "model_type 'no-such-model'"),
        ("bert", "a str"),
    ],
)
def test_a_backbone_config_that_names_no_bert_model_fails_by_name(backbone, found):
    with pytest.raises(ValueError, match=rf"SwitchConfig\.backbone_config must be .*model_type 'bert'.*got {found}"):
        SwitchConfig(backbone_config=backbone)


# Every way transformers builds a config from a saved one and keyword overrides: it sets the overrides on the built
# config, after the constructor's checks, so each path must check them again.
LOADERS = {
    "SwitchConfig.from_pretrained": lambda path, **kw: SwitchConfig.from_pretrained(path, **kw),
    "AutoConfig.from_pretrained": lambda path, **kw: AutoConfig.from_pretrained(path, **kw),
    "SwitchConfig.from_dict with keywords": lambda path, **kw: SwitchConfig.from_dict(
        SwitchConfig.get_config_dict(path)[0], **kw
    ),
    "SwitchConfig.from_dict with the values in the dict": lambda path, **kw: SwitchConfig.from_dict(
        {**SwitchConfig.get_config_dict(path)[0], **kw}
    ),
    # strict=False: an override that adds layers (below) leaves their weights to a random start, as a user must ask.
    "SwitchForTokenReconstruction.from_pretrained": lambda path, **kw: SwitchForTokenReconstruction.from_pretrained(
        path, strict=False, **kw
    ).config,
}


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-switch")
    SwitchForTokenReconstruction(tiny_config()).save_pretrained(path)
    return path


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    "override, message",
    [
        ({"capacity_factor_eval": -1.0}, r"SwitchConfig\.capacity_factor_eval must be a finite number > 0.*got -1\.0"),
        ({"capacity_factor_train": float("nan")}, r"SwitchConfig\.capacity_factor_train must be .*got nan"),
        ({"layer_norm_eps": True}, r"SwitchConfig\.layer_norm_eps must be .*got True"),
        ({"top_k": 5}, r"SwitchConfig\.top_k must be <= num_experts \(4\), got 5"),
        ({"expert_kinds": "fx"}, r"SwitchConfig\.expert_kinds pattern 'fx' has unknown letters"),
        ({"num_switch_layers": 3, "expert_kinds": ["feed_forward"] * 2}, r"expert_kinds has 2 entries"),
    ],
)
def test_overrides_on_loading_are_checked_on_every_path(saved_tiny_model, loader, override, message):
    with pytest.raises(ValueError, match=message):
        LOADERS[loader](saved_tiny_model, **override)


@pytest.mark.parametrize("loader", LOADERS)
def test_overrides_on_loading_are_applied_like_constructor_arguments(saved_tiny_model, loader):
    config = LOADERS[loader](saved_tiny_model, capacity_factor_eval=None, num_switch_layers=3, expert_kinds="fdb")
    assert config.capacity_factor_eval is None
    assert config.expert_kinds == ["feed_forward", "dense", "both"]  # the letter pattern expanded, as at construction
    assert config.router_names == ["layer 0 feed_forward", "layer 2 attention", "layer 2 feed_forward"]


def test_overrides_are_checked_by_the_code_a_checkpoint_ships(saved_tiny_model, tmp_path, warm_python):
    """Where switch_hf is not installed, `trust_remote_code` loads the checkpoint's own configuration_switch.py."""
    script = BLOCK_SWITCH_HF + textwrap.dedent(
        f"""
        from transformers import AutoConfig
        path = {str(saved_tiny_model)!r}
        config = AutoConfig.from_pretrained(path, trust_remote_code=True, capacity_factor_eval=None)
        assert not type(config).__module__.startswith("switch_hf"), type(config).__module__
        assert config.capacity_factor_eval is None
        try:
            AutoConfig.from_pretrained(path, trust_remote_code=True, capacity_factor_eval=-1.0)
        except ValueError as error:
            print("REJECTED", error)
        """
    )
    result = warm_python.run(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REJECTED SwitchConfig.capacity_factor_eval must be a finite number > 0" in result.stdout


def test_loading_still_returns_the_unused_keywords(saved_tiny_model):
    config, unused = SwitchConfig.from_pretrained(
        saved_tiny_model, top_k=2, not_a_field=1, return_unused_kwargs=True
    )
    assert config.top_k == 2
    assert unused == {"not_a_field": 1}


def test_a_config_made_invalid_after_construction_is_not_saved(tmp_path):
    config = tiny_config()
    config.capacity_factor_eval = float("nan")
    with pytest.raises(ValueError, match=r"SwitchConfig\.capacity_factor_eval must be .*got nan"):
        config.validate()
    with pytest.raises(ValueError, match=r"SwitchConfig\.capacity_factor_eval must be .*got nan"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


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
