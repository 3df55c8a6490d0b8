"""Attention experts (`expert_kinds`): the config choice, the mixture-of-attention-heads layer, and the model."""

import pytest
import torch

from switch_hf import SwitchConfig, SwitchForTokenReconstruction, modeling_switch
from switch_hf.modeling_switch import SwitchAttention, SwitchAttentionExperts, SwitchFeedForward, SwitchSparseBlock

from conftest import TINY_VOCAB, tiny_config


def attention_experts(num_experts=4, top_k=1, capacity_factor=None, **overrides):
    """An eval-mode attention-experts layer with every parameter initialised (a bare module's are torch.empty)."""
    config = tiny_config(num_experts=num_experts, top_k=top_k, capacity_factor_eval=capacity_factor, **overrides)
    layer = SwitchAttentionExperts(config).eval()
    torch.nn.init.normal_(layer.router.weight, std=1.0)  # a confident, unbalanced router: drops happen
    for parameter in (layer.q_proj, layer.q_proj_bias, layer.o_proj, layer.o_proj_bias):
        torch.nn.init.normal_(parameter, std=0.2)
    return config, layer


def dense_attention_of_expert(config, layer, expert):
    """A plain multi-head attention layer holding `expert`'s query/output projections and the shared keys/values."""
    dense = SwitchAttention(config).eval()
    with torch.no_grad():
        dense.q_proj.weight.copy_(layer.q_proj[expert])
        dense.q_proj.bias.copy_(layer.q_proj_bias[expert])
        dense.o_proj.weight.copy_(layer.o_proj[expert])
        dense.o_proj.bias.copy_(layer.o_proj_bias[expert])
        dense.k_proj.load_state_dict(layer.k_proj.state_dict())
        dense.v_proj.load_state_dict(layer.v_proj.state_dict())
    return dense


def inputs(config, batch=3, seq=10, padding=(0, 3, 6)):
    """Hidden states and masks; sequence i ends with `padding[i]` padding positions."""
    hidden = torch.randn(batch, seq, config.hidden_size)
    token_mask = torch.ones(batch, seq, dtype=torch.bool)
    for row, pad in enumerate(padding[:batch]):
        if pad:
            token_mask[row, -pad:] = False
    return hidden, token_mask[:, None, None, :], token_mask


# --- configuration ------------------------------------------------------------------------------------------------


def test_expert_kinds_default_to_feed_forward_and_expand_patterns():
    assert tiny_config().expert_kinds == ["feed_forward", "feed_forward"]
    config = tiny_config(num_switch_layers=3, expert_kinds="fab")
    assert config.expert_kinds == ["feed_forward", "attention", "both"]
    assert config.router_names == [
        "layer 0 feed_forward",
        "layer 1 attention",
        "layer 2 attention",
        "layer 2 feed_forward",
    ]
    assert tiny_config(expert_kinds=["attention", "both"]).expert_kinds == ["attention", "both"]
    # Stored as the expanded list, so a saved config reloads to the same layers.
    assert SwitchConfig.from_dict(config.to_dict()).expert_kinds == config.expert_kinds


@pytest.mark.parametrize(
    "expert_kinds, message",
    [
        ("fx", r"expert_kinds pattern 'fx' has unknown letters \['x'\]"),
        (["feed_forward", "convolution"], r"expert_kinds names unknown kinds \['convolution'\]"),
        ("fab", r"expert_kinds has 3 entries .* num_switch_layers is 2"),
        (["attention"], r"expert_kinds has 1 entries .* num_switch_layers is 2"),
        (["attention", 3], r"expert_kinds must be a list of names"),
    ],
)
def test_bad_expert_kinds_raise_value_error_naming_the_field(expert_kinds, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(expert_kinds=expert_kinds)


def test_layers_hold_the_modules_their_kind_names():
    model = SwitchForTokenReconstruction(tiny_config(num_switch_layers=3, expert_kinds="fab"))
    feed_forward, attention, both = model.model.layers
    assert isinstance(feed_forward.attention, SwitchAttention) and isinstance(feed_forward.moe, SwitchSparseBlock)
    assert isinstance(attention.attention, SwitchAttentionExperts) and isinstance(attention.mlp, SwitchFeedForward)
    assert isinstance(both.attention, SwitchAttentionExperts) and isinstance(both.moe, SwitchSparseBlock)


# --- the attention-experts layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_one_attention_expert_is_plain_multi_head_attention(training):
    config, layer = attention_experts(
        num_experts=1, capacity_factor=None, capacity_factor_train=None, router_jitter_noise=0.0
    )
    dense = dense_attention_of_expert(config, layer, expert=0)
    layer.train(training)
    dense.train(training)
    hidden, attention_mask, token_mask = inputs(config)
    output, _, routing = layer(hidden, attention_mask, token_mask)
    expected = dense(hidden, attention_mask)[0] * token_mask.unsqueeze(-1)  # padding is not routed: zero output
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert routing.dropped_fraction.item() == 0.0


@pytest.mark.parametrize("num_experts, top_k, capacity_factor", [(4, 1, None), (4, 1, 0.75), (8, 2, 1.0), (4, 3, None)])
def test_each_token_gets_its_experts_attention_scaled_by_the_gate(num_experts, top_k, capacity_factor):
    """Reference: for every kept (token, expert) pair, that expert's dense attention at the token, times the gate."""
    config, layer = attention_experts(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)
    hidden, attention_mask, token_mask = inputs(config)
    output, _, routing = layer(hidden, attention_mask, token_mask)

    probabilities = routing.router_logits.softmax(-1)  # (t, e)
    dense_outputs = [
        dense_attention_of_expert(config, layer, expert)(hidden, attention_mask)[0].reshape(-1, config.hidden_size)
        for expert in range(num_experts)
    ]
    expected = torch.zeros_like(dense_outputs[0])
    for token, experts in enumerate(routing.expert_index.tolist()):
        for expert in experts:
            if expert >= 0:
                expected[token] += probabilities[token, expert] * dense_outputs[expert][token]
    torch.testing.assert_close(output.reshape(-1, config.hidden_size), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_experts, top_k, capacity_factor", [(4, 1, 0.5), (8, 2, 0.75), (4, 1, 1.25)])
def test_capacity_is_respected_and_dropped_tokens_output_zero(num_experts, top_k, capacity_factor):
    config, layer = attention_experts(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)
    hidden, attention_mask, token_mask = inputs(config, batch=4, seq=12)
    output, _, routing = layer(hidden, attention_mask, token_mask)

    real_tokens = token_mask.sum().item()
    capacity = -(-capacity_factor * top_k * real_tokens // num_experts)
    index = routing.expert_index  # (t, k)
    assert routing.tokens_per_expert.max().item() <= capacity
    for expert in range(num_experts):
        assert (index == expert).sum().item() == routing.tokens_per_expert[expert].item()
    fully_dropped = (index < 0).all(-1)
    assert fully_dropped.any(), "the setup must drop some tokens"
    assert torch.all(output.reshape(-1, config.hidden_size)[fully_dropped] == 0)
    for row in index.tolist():
        kept = [expert for expert in row if expert >= 0]
        assert len(kept) == len(set(kept))  # a token never meets the same expert twice
    expected_dropped = 1.0 - (index >= 0).sum().item() / (real_tokens * top_k)
    assert routing.dropped_fraction.item() == pytest.approx(expected_dropped)


def test_padding_is_never_routed_nor_attended_to():
    config, layer = attention_experts(num_experts=4, top_k=2, capacity_factor=None)
    hidden, attention_mask, token_mask = inputs(config)
    output, _, routing = layer(hidden, attention_mask, token_mask)
    padding = ~token_mask.reshape(-1)
    assert torch.all(routing.expert_index[padding] == -1)
    assert torch.all(output.reshape(-1, config.hidden_size)[padding] == 0)

    scrambled = hidden.clone()
    scrambled[~token_mask] = torch.randn_like(scrambled[~token_mask]) * 100.0
    scrambled_output, _, scrambled_routing = layer(scrambled, attention_mask, token_mask)
    torch.testing.assert_close(scrambled_output, output)
    assert torch.equal(scrambled_routing.expert_index, routing.expert_index)
    assert routing.load_balancing_loss.item() == pytest.approx(scrambled_routing.load_balancing_loss.item())


def test_gradients_reach_the_experts_the_shared_projections_and_the_router():
    config, layer = attention_experts(num_experts=4, top_k=1, capacity_factor=None)
    layer.train()
    hidden, attention_mask, token_mask = inputs(config)
    output, _, routing = layer(hidden, attention_mask, token_mask)
    (output.square().sum() + routing.load_balancing_loss).backward()
    used = routing.tokens_per_expert > 0
    for name in ("q_proj", "o_proj", "q_proj_bias", "o_proj_bias"):
        gradient = getattr(layer, name).grad
        assert torch.all(gradient[used].flatten(1).abs().sum(-1) > 0), name
        assert torch.all(gradient[~used] == 0), name  # an expert without tokens learns nothing
    for module in (layer.k_proj, layer.v_proj):
        assert module.weight.grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "top_k, capacity_factor, padding", [(1, None, (0, 3, 6)), (2, 0.75, (0, 3, 6)), (1, None, (10, 10, 10))],
    ids=["top1-dropless", "top2-dropping", "all-padding"],
)
def test_grouped_products_match_the_per_expert_products_in_outputs_and_gradients(
    monkeypatch, top_k, capacity_factor, padding
):
    """On CUDA the query and output projections run as one grouped product each (`F.grouped_mm`), with no per-expert
    row counts read on the host; torch runs grouped_mm on the CPU too, so both paths are compared here."""
    config, layer = attention_experts(num_experts=4, top_k=top_k, capacity_factor=capacity_factor)
    layer.train()
    hidden, attention_mask, token_mask = inputs(config, padding=padding)
    hidden.requires_grad_()

    def outputs_and_gradients():
        layer.zero_grad(set_to_none=True)
        hidden.grad = None
        torch.manual_seed(1)  # the same router jitter in both runs
        output, _, routing = layer(hidden, attention_mask, token_mask)
        (output.square().sum() + routing.load_balancing_loss).backward()
        gradients = {name: parameter.grad for name, parameter in layer.named_parameters()}
        return output.detach(), hidden.grad, gradients

    assert not modeling_switch._grouped_products_run(hidden, layer.q_proj)  # on the CPU: one product per expert
    expected_output, expected_hidden_gradient, expected_gradients = outputs_and_gradients()
    monkeypatch.setattr(modeling_switch, "_grouped_products_run", lambda input, weight: True)

    def no_host_counts(*arguments):
        raise AssertionError("the grouped path read the per-expert row counts on the host")

    monkeypatch.setattr(modeling_switch, "group_by_expert", no_host_counts)
    output, hidden_gradient, gradients = outputs_and_gradients()
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_gradient, expected_hidden_gradient, rtol=1e-5, atol=1e-6)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        expected_gradient = expected_gradients[name]
        assert (gradient is None) == (expected_gradient is None), name
        if gradient is not None:
            torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-6, msg=name)


# --- in the model -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_kinds", ["aa", "bf", "ab"])
def test_model_outputs_report_every_router(expert_kinds):
    config = tiny_config(expert_kinds=expert_kinds, top_k=2)
    model = SwitchForTokenReconstruction(config)
    ids = torch.randint(1, TINY_VOCAB, (2, 9))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    routers = len(config.router_names)
    assert out.tokens_per_expert.shape == (routers, config.num_experts)
    assert out.dropped_fraction.shape == (routers,)
    assert len(out.router_logits) == len(out.expert_indices) == routers
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_upcycling_copies_the_backbones_last_attention_into_every_attention_expert():
    config = tiny_config(expert_kinds="ab", expert_intermediate_size=64)
    model = SwitchForTokenReconstruction(config)
    model.model.upcycle_experts_from_backbone()
    source = model.model.backbone.encoder.layer[-1].attention
    for layer in model.model.layers:
        attention = layer.attention
        for expert in range(config.num_experts):
            assert torch.equal(attention.q_proj[expert], source.self.query.weight)
            assert torch.equal(attention.o_proj[expert], source.output.dense.weight)
            assert torch.equal(attention.o_proj_bias[expert], source.output.dense.bias)
        assert torch.equal(attention.k_proj.weight, source.self.key.weight)
        assert torch.equal(attention.v_proj.bias, source.self.value.bias)
    assert torch.equal(model.model.layers[1].moe.experts.up_proj[2], model.model.backbone.encoder.layer[-1].intermediate.dense.weight)


def test_upcycling_attention_experts_needs_the_backbones_head_count():
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds="aa", num_attention_heads=2))
    with pytest.raises(ValueError, match=r"num_attention_heads \(2\) equal to the backbone's \(4\)"):
        model.model.upcycle_experts_from_backbone()
