"""Dense Switch layers (expert kind "dense"): the twin a sparse layer is measured against, and a from-scratch model."""

import pytest
import torch
from transformers import BertConfig, BertModel

from switch_hf import SwitchForTokenReconstruction
from switch_hf.modeling_switch import SwitchFeedForward

from conftest import TINY_VOCAB, tiny_config

IMPLEMENTATIONS = ["eager", "by_device", "sorted_mm", "grouped_mm", "batched_mm"]


def random_ids(batch, seq):
    return torch.randint(5, TINY_VOCAB, (batch, seq))


def no_dropout(config):
    config.hidden_dropout_prob = 0.0
    config.router_jitter_noise = 0.0
    config.backbone_config.hidden_dropout_prob = config.backbone_config.attention_probs_dropout_prob = 0.0
    return config


def test_a_dense_layer_is_attention_and_one_feed_forward_block_of_an_experts_size():
    config = tiny_config(expert_kinds="df")
    layer = SwitchForTokenReconstruction(config).model.layers[0]
    assert isinstance(layer.mlp, SwitchFeedForward) and not hasattr(layer, "moe")
    assert layer.mlp.up_proj.weight.shape == (config.expert_intermediate_size, config.hidden_size)
    assert not any("router" in name for name, _ in layer.named_parameters())


def test_an_all_dense_model_runs_without_routers():
    model = SwitchForTokenReconstruction(tiny_config(num_experts=4, expert_kinds="dd"))
    ids = random_ids(2, 7)
    output = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(output.loss)
    assert output.load_balancing_loss.item() == 0.0 and output.router_z_loss.item() == 0.0
    assert output.aux_loss.item() == 0.0
    assert output.tokens_per_expert.shape == (0, 4) and output.dropped_fraction.shape == (0,)
    assert output.expert_indices == () and not output.router_logits
    output.loss.backward()


def test_a_mixed_model_reports_only_its_sparse_layers():
    config = tiny_config(num_switch_layers=4, expert_kinds="dfdf", num_experts=4)
    output = SwitchForTokenReconstruction(config)(input_ids=random_ids(2, 7))
    assert output.tokens_per_expert.shape == (2, 4) and output.dropped_fraction.shape == (2,)
    assert len(output.expert_indices) == len(config.router_names) == 2
    assert output.load_balancing_loss > 0


@pytest.mark.parametrize("expert_kinds", ["dd", "df"])
def test_save_and_load_round_trip(tmp_path, expert_kinds):
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds=expert_kinds)).eval()
    ids = random_ids(2, 6)
    model.save_pretrained(tmp_path)
    loaded = SwitchForTokenReconstruction.from_pretrained(tmp_path, strict=True).eval()
    assert loaded.config.expert_kinds == model.config.expert_kinds
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_every_experts_implementation_accepts_an_all_dense_model():
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds="dd")).eval()
    ids = random_ids(2, 6)
    reference = model(input_ids=ids).logits
    for implementation in IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        torch.testing.assert_close(model(input_ids=ids).logits, reference)


def test_a_mixed_model_gives_the_same_output_under_every_experts_implementation():
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds="df", capacity_factor_eval=None)).eval()
    ids = random_ids(2, 6)
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        outputs[implementation] = model(input_ids=ids).logits
    for implementation in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(outputs[implementation], outputs["eager"], rtol=1e-4, atol=1e-5)


def test_upcycling_copies_the_backbones_last_feed_forward_block_into_dense_layers_too(tmp_path):
    config = tiny_config(expert_kinds="df", expert_intermediate_size=64)  # the tiny backbone's intermediate_size
    BertModel(config.backbone_config, add_pooling_layer=False).save_pretrained(tmp_path)
    model = SwitchForTokenReconstruction.from_backbone(tmp_path, config=config, upcycle_experts=True)
    last = model.model.backbone.encoder.layer[-1]
    dense, sparse = model.model.layers
    assert torch.equal(dense.mlp.up_proj.weight, last.intermediate.dense.weight)
    assert torch.equal(dense.mlp.up_proj.bias, last.intermediate.dense.bias)
    assert torch.equal(dense.mlp.down_proj.weight, last.output.dense.weight)
    assert torch.equal(dense.mlp.down_proj.bias, last.output.dense.bias)
    for expert in range(config.num_experts):
        assert torch.equal(sparse.moe.experts.up_proj[expert], last.intermediate.dense.weight)


def test_upcycling_a_dense_layer_checks_the_size_and_needs_a_backbone_layer():
    with pytest.raises(ValueError, match="expert_intermediate_size"):
        SwitchForTokenReconstruction(tiny_config(expert_kinds="dd")).model.upcycle_experts_from_backbone()
    embeddings_only = BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=0, num_attention_heads=4)
    model = SwitchForTokenReconstruction(tiny_config(backbone_config=embeddings_only, expert_kinds="dd"))
    with pytest.raises(ValueError, match="num_hidden_layers=0"):
        model.model.upcycle_experts_from_backbone()


def test_an_all_dense_model_from_scratch_on_embeddings_only_trains():
    embeddings_only = BertConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=0, num_attention_heads=4, max_position_embeddings=16
    )
    config = no_dropout(tiny_config(backbone_config=embeddings_only, expert_kinds="dd"))
    model = SwitchForTokenReconstruction(config).train()
    assert len(model.model.backbone.encoder.layer) == 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = random_ids(4, 12)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
