import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertModel

from switch_hf import SwitchConfig, SwitchForTokenReconstruction, SwitchModel, modeling_switch
from switch_hf.modeling_switch import LayerRouting, SwitchLayer, SwitchSparseBlock

from conftest import BLOCK_SWITCH_HF, TINY_VOCAB, tiny_config


def random_ids(batch, seq):
    return torch.randint(1, TINY_VOCAB, (batch, seq))


# --- shapes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, seq, num_experts, top_k",
    [(1, 12, 4, 1), (3, 7, 4, 2), (2, 1, 1, 1), (4, 16, 8, 1), (2, 5, 8, 4)],
)
def test_output_shapes(batch, seq, num_experts, top_k):
    config = tiny_config(num_experts=num_experts, top_k=top_k)
    model = SwitchForTokenReconstruction(config)
    out = model(input_ids=random_ids(batch, seq), output_router_logits=True, output_hidden_states=True)
    assert out.logits.shape == (batch, seq, TINY_VOCAB)
    assert len(out.router_logits) == config.num_switch_layers
    assert all(logits.shape == (batch, seq, num_experts) for logits in out.router_logits)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    assert all(index.shape == (batch, seq, top_k) for index in out.expert_indices)
    assert len(out.hidden_states) == config.num_switch_layers + 1
    assert out.tokens_per_expert.shape == (config.num_switch_layers, num_experts)
    assert out.dropped_fraction.shape == (config.num_switch_layers,)


# --- routing invariants -------------------------------------------------------------------------------------------


def block_and_input(num_experts=4, top_k=1, capacity_factor=1.0, batch=3, seq=10):
    config = tiny_config(num_experts=num_experts, top_k=top_k, capacity_factor_eval=capacity_factor)
    block = SwitchSparseBlock(config).eval()
    torch.nn.init.normal_(block.router.weight, std=1.0)  # a confident, unbalanced router: drops happen
    # A bare block's parameters are torch.empty: initialise every one, biases included, or garbage leaks in.
    for name in ("up_proj", "down_proj", "up_proj_bias", "down_proj_bias"):
        torch.nn.init.normal_(getattr(block.experts, name), std=0.1)
    hidden = torch.randn(batch, seq, config.hidden_size)
    return config, block, hidden


@pytest.mark.parametrize("num_experts, top_k, capacity_factor", [(4, 1, 0.5), (4, 2, 0.75), (8, 1, 0.5), (4, 3, 1.0)])
def test_each_token_reaches_at_most_top_k_distinct_experts_within_capacity(num_experts, top_k, capacity_factor):
    config, block, hidden = block_and_input(num_experts, top_k, capacity_factor)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    mask[0, 6:] = False
    _, routing = block(hidden, mask)

    index = routing.expert_index  # (t, k)
    for row in index.tolist():
        chosen = [e for e in row if e >= 0]
        assert len(chosen) == len(set(chosen)) <= top_k

    capacity = math.ceil(capacity_factor * top_k * int(mask.sum()) / num_experts)
    counts = torch.bincount(index[index >= 0], minlength=num_experts)
    assert counts.max() <= capacity
    assert torch.equal(routing.tokens_per_expert, counts.float())
    assert routing.dropped_fraction > 0  # the router is unbalanced enough for these capacities to drop
    assert routing.dropped_fraction == pytest.approx(1 - counts.sum().item() / (int(mask.sum()) * top_k))


def test_first_choices_are_served_before_second_choices():
    config, block, hidden = block_and_input(num_experts=4, top_k=2, capacity_factor=0.5)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    _, routing = block(hidden, mask)
    probs = routing.router_logits.softmax(-1)
    first_choice = probs.argmax(-1)
    capacity = math.ceil(0.5 * 2 * mask.sum().item() / 4)
    for expert in range(4):
        wants_first = (first_choice == expert).sum().item()
        took_first = (routing.expert_index[:, 0] == expert).sum().item()
        took_second = (routing.expert_index[:, 1] == expert).sum().item()
        assert took_first == min(wants_first, capacity)
        if took_second:  # second choices only fill what first choices left
            assert took_first + took_second <= capacity and took_first == wants_first


def test_dropped_tokens_leave_the_block_unchanged():
    config, block, hidden = block_and_input(capacity_factor=0.5)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    output, routing = block(hidden, mask)
    dropped = (routing.expert_index == -1).all(-1).view(mask.shape)
    assert dropped.any()
    assert torch.all(output[dropped] == 0)
    assert torch.all(output[~dropped].abs().sum(-1) > 0)

    layer = SwitchLayer(config, layer_index=0).eval()
    layer.moe = block
    attention_mask = mask[:, None, None, :]
    after_attention = hidden + layer.attention(layer.attention_norm(hidden), attention_mask)[0]
    layer_output, *routing_fields = layer(hidden, attention_mask, mask)
    (layer_routing,) = LayerRouting.regroup(routing_fields)
    dropped = (layer_routing.expert_index == -1).all(-1).view(mask.shape)
    assert dropped.any()
    torch.testing.assert_close(layer_output[dropped], after_attention[dropped], rtol=0, atol=0)


def test_padding_is_never_routed():
    model = SwitchForTokenReconstruction(tiny_config(capacity_factor_eval=None)).eval()
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    out = model(input_ids=ids, attention_mask=mask, output_routing=True)
    for index in out.expert_indices:
        assert torch.all(index[mask == 0] == -1)
        assert torch.all(index[mask == 1] >= 0)  # dropless: every real token is routed
    assert torch.equal(out.tokens_per_expert.sum(-1), torch.full((2,), float(mask.sum())))


def test_one_expert_equals_the_dense_ffn_in_outputs_and_gradients():
    config = tiny_config(num_experts=1, capacity_factor_train=None, router_jitter_noise=0.0, expert_dropout=0.0)
    block = SwitchSparseBlock(config).train()
    torch.nn.init.normal_(block.router.weight)  # torch.empty otherwise: a NaN logit would poison the gate
    for name in ("up_proj", "down_proj", "up_proj_bias", "down_proj_bias"):
        torch.nn.init.normal_(getattr(block.experts, name), std=0.1)
    up = block.experts.up_proj[0].detach().clone().requires_grad_()
    down = block.experts.down_proj[0].detach().clone().requires_grad_()
    hidden = torch.randn(2, 6, config.hidden_size, requires_grad=True)
    dense_hidden = hidden.detach().clone().requires_grad_()

    moe_out, _ = block(hidden, torch.ones(2, 6, dtype=torch.bool))
    dense_out = F.linear(
        F.gelu(F.linear(dense_hidden, up, block.experts.up_proj_bias[0].detach())),
        down,
        block.experts.down_proj_bias[0].detach(),
    )
    torch.testing.assert_close(moe_out, dense_out)
    moe_out.square().sum().backward()
    dense_out.square().sum().backward()
    torch.testing.assert_close(hidden.grad, dense_hidden.grad)
    torch.testing.assert_close(block.experts.up_proj.grad[0], up.grad)
    torch.testing.assert_close(block.experts.down_proj.grad[0], down.grad)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_experts_implementations_match_eager(implementation):
    config = tiny_config(num_experts=8, top_k=2, capacity_factor_train=0.8, router_jitter_noise=0.0)
    reference = SwitchForTokenReconstruction(config).train()
    for layer in reference.model.layers:
        torch.nn.init.normal_(layer.moe.router.weight, std=1.0)
    ids = random_ids(3, 11)

    def loss_and_grads(implementation_name):
        reference.set_experts_implementation(implementation_name)
        reference.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs
        out = reference(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    eager_logits, eager_grads = loss_and_grads("eager")
    logits, grads = loss_and_grads(implementation)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_unknown_experts_implementation_lists_the_valid_ones():
    with pytest.raises(ValueError, match='experts_implementation="eager"'):
        SwitchForTokenReconstruction(tiny_config()).set_experts_implementation("magic")


# --- auxiliary losses ---------------------------------------------------------------------------------------------


def test_uniform_router_gives_load_balancing_loss_one():
    config, block, hidden = block_and_input(num_experts=4)
    torch.nn.init.zeros_(block.router.weight)
    _, routing = block(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool))
    assert routing.load_balancing_loss.item() == pytest.approx(1.0)
    assert routing.z_loss.item() == pytest.approx(math.log(4) ** 2)


def test_aux_losses_on_a_hand_computed_case():
    config, block, hidden = block_and_input(num_experts=2)
    log3 = math.log(3.0)
    logits = torch.tensor([[log3, 0.0], [log3, 0.0], [0.0, log3], [5.0, -5.0]])
    mask = torch.tensor([True, True, True, False])  # the last token is padding and must not count
    probs = logits.softmax(-1)
    gate, choice = probs.topk(1, dim=-1)
    kept = block.router._within_capacity(choice, mask, None)
    routing = block.router._routing_summary(logits, logits.logsumexp(-1, keepdim=True), probs, choice, kept, mask)
    # f = (2/3, 1/3); P = ((.75 + .75 + .25) / 3, (.25 + .25 + .75) / 3); loss = 2 * (f . P)
    expected = 2 * (2 / 3 * 1.75 / 3 + 1 / 3 * 1.25 / 3)
    assert routing.load_balancing_loss.item() == pytest.approx(expected)
    assert routing.z_loss.item() == pytest.approx(math.log(4.0) ** 2)
    assert routing.tokens_per_expert.tolist() == [2.0, 1.0]
    assert routing.dropped_fraction.item() == pytest.approx(0.0)


def test_aux_loss_is_part_of_the_loss_when_every_layer_is_sparse():
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    model = SwitchForTokenReconstruction(config)
    ids = random_ids(2, 8)
    out = model(input_ids=ids, labels=ids)
    assert out.load_balancing_loss > 0 and out.router_z_loss > 0 and out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, 0.5 * out.load_balancing_loss + 0.25 * out.router_z_loss)
    torch.testing.assert_close(out.loss, out.reconstruction_loss + out.aux_loss)
    torch.testing.assert_close(
        out.reconstruction_loss, F.cross_entropy(out.logits.reshape(-1, TINY_VOCAB), ids.reshape(-1))
    )


def test_masked_padding_leaves_aux_losses_unchanged_and_removing_the_mask_changes_them():
    model = SwitchForTokenReconstruction(tiny_config(capacity_factor_eval=None)).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.moe.router.weight, std=1.0)
    ids = random_ids(1, 6)
    padded = torch.cat([ids, random_ids(1, 5)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], dim=1).long()
    alone = model(input_ids=ids, output_routing=True)
    masked = model(input_ids=padded, attention_mask=mask, output_routing=True)
    unmasked = model(input_ids=padded, output_routing=True)
    for name in ("load_balancing_loss", "router_z_loss"):
        torch.testing.assert_close(getattr(masked, name), getattr(alone, name))
        assert not torch.allclose(getattr(unmasked, name), getattr(alone, name))


def test_labels_ignore_minus_100():
    model = SwitchForTokenReconstruction(tiny_config())
    ids = random_ids(2, 6)
    labels = ids.clone()
    labels[:, ::2] = -100
    out = model(input_ids=ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, 1::2].reshape(-1, TINY_VOCAB), ids[:, 1::2].reshape(-1))
    torch.testing.assert_close(out.reconstruction_loss, expected)


# --- inputs -------------------------------------------------------------------------------------------------------


def test_input_ids_and_backbone_hidden_states_give_the_same_logits():
    model = SwitchForTokenReconstruction(tiny_config()).eval()
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask).logits
        states = model.model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        from_states = model(backbone_hidden_states=states, attention_mask=mask).logits
    torch.testing.assert_close(from_ids, from_states, rtol=0, atol=0)


def test_non_finite_padding_does_not_reach_the_real_tokens_or_the_losses():
    model = SwitchForTokenReconstruction(tiny_config()).eval()
    states = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    labels = random_ids(2, 6).masked_fill(mask == 0, -100)
    clean = model(backbone_hidden_states=states, attention_mask=mask, labels=labels)
    poisoned_states = states.clone()
    poisoned_states[1, 3:] = float("nan")
    poisoned_states[1, 4] = float("inf")
    poisoned = model(backbone_hidden_states=poisoned_states, attention_mask=mask, labels=labels)
    torch.testing.assert_close(poisoned.logits, clean.logits)
    torch.testing.assert_close(poisoned.loss, clean.loss)


def test_float64_hidden_states_run_in_the_models_precision():
    model = SwitchForTokenReconstruction(tiny_config()).eval()
    states = torch.randn(2, 6, 32)
    logits = model(backbone_hidden_states=states).logits
    from_float64 = model(backbone_hidden_states=states.double()).logits
    assert from_float64.dtype == torch.float32
    torch.testing.assert_close(from_float64, logits)


def test_inference_outputs_hold_only_per_example_tensors_unless_routing_is_asked_for():
    model = SwitchForTokenReconstruction(tiny_config()).eval()
    ids = random_ids(2, 6)
    routing = ("expert_indices", "tokens_per_expert", "dropped_fraction", "load_balancing_loss", "router_z_loss")
    plain = model(input_ids=ids)
    assert all(getattr(plain, name) is None for name in routing + ("aux_loss",))
    assert all(value.shape[0] == 2 for value in plain.values())
    for asked in (model(input_ids=ids, output_routing=True), model(input_ids=ids, output_router_logits=True),
                  model(input_ids=ids, labels=ids), model.train()(input_ids=ids)):
        assert all(getattr(asked, name) is not None for name in routing + ("aux_loss",))
    model.eval()
    with_labels_only_loss = model(input_ids=ids, labels=ids, output_routing=False)
    torch.testing.assert_close(with_labels_only_loss.loss, model(input_ids=ids, labels=ids).loss)
    assert with_labels_only_loss.aux_loss is None
    base = model.model(input_ids=ids)
    assert list(base.keys()) == ["last_hidden_state"]


def test_padding_other_sequences_does_not_change_a_sequence_in_eval_with_dropless_routing():
    model = SwitchForTokenReconstruction(tiny_config(capacity_factor_eval=None)).eval()
    short = random_ids(1, 5)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 7, dtype=torch.long)], 1), random_ids(1, 12)])
    mask = torch.ones_like(batch)
    mask[0, 5:] = 0
    with torch.no_grad():
        alone = model(input_ids=short).logits
        batched = model(input_ids=batch, attention_mask=mask).logits
    torch.testing.assert_close(batched[0, :5], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 2, TINY_VOCAB]])), r"`input_ids` must be in \[0, 119\]"),
        (dict(input_ids=torch.tensor([[1, -1]])), r"`input_ids` must be in \[0, 119\]"),
        (dict(input_ids=torch.ones(1, 65, dtype=torch.long)), "max_position_embeddings=64"),
        (dict(input_ids=torch.ones(5, dtype=torch.long)), r"`input_ids` must be \(batch_size, sequence_length\)"),
        (dict(backbone_hidden_states=torch.randn(1, 4, 31)), "hidden_size=32"),
        (dict(backbone_hidden_states=torch.randn(4, 32)), "hidden_size=32"),
        (dict(input_ids=torch.ones(1, 4, dtype=torch.long), backbone_hidden_states=torch.randn(1, 4, 32)), "exactly one"),
        (dict(), "exactly one"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)), "`attention_mask` must"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), labels=torch.ones(2, 3, dtype=torch.long)), "`labels`"),
        (dict(input_ids=torch.ones(0, 4, dtype=torch.long)), "the input is empty"),
        (dict(input_ids=torch.ones(2, 0, dtype=torch.long)), "the input is empty"),
        (dict(backbone_hidden_states=torch.randn(2, 0, 32)), "the input is empty"),
        (dict(backbone_hidden_states=torch.ones(1, 4, 32, dtype=torch.long)), "must be floating point"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), token_type_ids=torch.full((2, 4), 2)), "type_vocab_size=2"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), token_type_ids=torch.full((2, 4), -1)), "type_vocab_size=2"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), token_type_ids=torch.zeros(2, 3, dtype=torch.long)),
         r"`token_type_ids` must have shape \(batch_size, sequence_length\)=\(2, 4\)"),
        (dict(input_ids=torch.ones(2, 4, dtype=torch.long), token_type_ids=torch.zeros(2, 4)), "integer segment ids"),
        (dict(backbone_hidden_states=torch.full((1, 4, 32), float("nan"))), "NaN or infinite"),
        (dict(backbone_hidden_states=torch.full((1, 4, 32), float("inf"))), "NaN or infinite"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    model = SwitchForTokenReconstruction(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


# --- training -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_gradients_reach_router_experts_and_unfrozen_backbone(freeze_backbone):
    model = SwitchForTokenReconstruction(tiny_config(freeze_backbone=freeze_backbone)).train()
    ids = random_ids(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        assert layer.moe.router.weight.grad.abs().sum() > 0
        assert layer.moe.experts.up_proj.grad.abs().sum() > 0
        assert layer.moe.experts.down_proj.grad.abs().sum() > 0
    backbone_layer = model.model.backbone.encoder.layer[0].attention.self.query.weight
    if freeze_backbone:
        assert backbone_layer.grad is None
        assert not model.model.backbone.training  # frozen backbone stays in eval mode
    else:
        assert backbone_layer.grad.abs().sum() > 0


# --- saving and loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_kinds", [None, "ab"])
def test_save_load_round_trip_keeps_every_weight_bit_for_bit(tmp_path, expert_kinds):
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds=expert_kinds)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "modeling_switch.py").exists() and (tmp_path / "configuration_switch.py").exists()
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SwitchForTokenReconstruction
    assert loaded.head.decoder.weight is loaded.model.backbone.embeddings.word_embeddings.weight
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, reloaded[name]), name
    ids = random_ids(2, 7)
    with torch.no_grad():
        # Not bit for bit: transformers (>= 5.25) keeps the loaded weights as views of the memory-mapped file, at
        # offsets that are not 64-byte aligned, and MKL's small products round differently on unaligned operands.
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert type(AutoModel.from_pretrained(tmp_path)) is SwitchModel


def test_missing_weights_are_named_and_strict_loading_fails(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    SwitchForTokenReconstruction(tiny_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = "model.layers.1.moe.router.weight"
    del weights[missing]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    # A trained checkpoint lacking a weight is not usable by accident: the default fails, naming the weight.
    with pytest.raises(ValueError, match=rf"missing: {missing} \(pass strict=False"):
        SwitchForTokenReconstruction.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"missing: {missing}"):
        SwitchForTokenReconstruction.from_pretrained(tmp_path, strict=True)
    _, info = SwitchForTokenReconstruction.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {missing}


def test_the_base_model_loads_a_full_checkpoint_quietly_and_a_head_starts_from_a_base_one(tmp_path, caplog):
    SwitchForTokenReconstruction(tiny_config()).save_pretrained(tmp_path / "full")
    with caplog.at_level(logging.WARNING):
        _, info = SwitchModel.from_pretrained(tmp_path / "full", strict=True, output_loading_info=True)
    assert info["unexpected_keys"] == set() and "head." not in caplog.text

    SwitchModel(tiny_config()).save_pretrained(tmp_path / "base")
    _, info = SwitchForTokenReconstruction.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith("head.") for key in info["missing_keys"])
    with pytest.raises(ValueError, match=r"missing: head\.decoder\.bias, head\.dense\.bias"):
        SwitchForTokenReconstruction.from_pretrained(tmp_path / "base", strict=True)


def test_non_finite_weights_are_named_in_a_warning(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    SwitchForTokenReconstruction(tiny_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.moe.experts.up_proj"][0, 0, 0] = float("nan")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        SwitchForTokenReconstruction.from_pretrained(tmp_path)
    assert "NaN or infinite" in caplog.text and "model.layers.0.moe.experts.up_proj" in caplog.text


def test_trust_remote_code_loads_where_the_package_cannot_be_imported(tmp_path, monkeypatch, warm_python):
    """Both layer layouts (feed-forward experts only; attention and both kinds) load and run from the checkpoint's own
    code, in one process without switch_hf."""
    import textwrap

    # Compared bit for bit with a process without switch_hf, hence without its expert kernel, and with the
    # package's model loaded from the same file, so that both read their weights at the same memory alignment.
    monkeypatch.setattr(modeling_switch, "use_expert_kernel", False)
    checkpoints = {}
    for expert_kinds in (None, "ab"):
        checkpoint = tmp_path / f"ckpt-{expert_kinds or 'default'}"
        SwitchForTokenReconstruction(tiny_config(expert_kinds=expert_kinds)).save_pretrained(checkpoint)
        model = AutoModelForMaskedLM.from_pretrained(checkpoint).eval()
        assert type(model) is SwitchForTokenReconstruction
        ids = random_ids(2, 7)
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits.detach()}, checkpoint.with_suffix(".pt"))
        checkpoints[str(checkpoint)] = str(checkpoint.with_suffix(".pt"))
    script = BLOCK_SWITCH_HF + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForMaskedLM
        for checkpoint, expected_path in {checkpoints!r}.items():
            model = AutoModelForMaskedLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
            expected = torch.load(expected_path)
            assert type(model).__name__ == "SwitchForTokenReconstruction", (checkpoint, type(model))
            assert not type(model).__module__.startswith("switch_hf"), (checkpoint, type(model).__module__)
            assert torch.equal(model(input_ids=expected["ids"]).logits, expected["logits"]), checkpoint
            print("REMOTE-CODE-OK", type(model).__module__)
        """
    )
    result = warm_python.run(script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("REMOTE-CODE-OK transformers_modules") == len(checkpoints), result.stdout


# --- the real backbone --------------------------------------------------------------------------------------------


def test_from_backbone_loads_minilm_and_reconstructs_a_sentence(minilm_path, tmp_path):
    from conftest import REPO_ROOT

    config = SwitchConfig.from_json_file(REPO_ROOT / "configs" / "switch-minilm-l6-e8.json")
    model = SwitchForTokenReconstruction.from_backbone(minilm_path, config=config).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    bert = BertModel.from_pretrained(minilm_path, add_pooling_layer=False)
    for name, weight in bert.state_dict().items():
        assert torch.equal(model.model.backbone.state_dict()[name], weight), name
    assert config.backbone_config is not model.config.backbone_config  # the caller's config is left alone

    inputs = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, 12, 30522)
    text = tokenizer.decode(out.logits.argmax(-1)[0])
    assert isinstance(text, str) and text

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, out.logits)


def test_from_backbone_and_saving_say_nothing_about_the_unused_pooler_or_the_tied_head(minilm_path, tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    from conftest import REPO_ROOT

    config = SwitchConfig.from_json_file(REPO_ROOT / "configs" / "switch-minilm-l6-e8.json")
    with CaptureLogger(transformers_logging.get_logger("transformers")) as captured:
        SwitchForTokenReconstruction.from_backbone(minilm_path, config=config).save_pretrained(tmp_path)
    assert captured.out == ""


def test_from_backbone_rejects_a_config_of_another_width(minilm_path):
    with pytest.raises(ValueError, match=r"backbone_config.hidden_size is 768 .* hidden_size=384"):
        SwitchForTokenReconstruction.from_backbone(minilm_path, config=SwitchConfig())


def test_only_labeled_logits_gives_the_same_loss_with_fewer_logits():
    model = SwitchForTokenReconstruction(tiny_config(hidden_dropout_prob=0.0)).eval()
    ids = random_ids(2, 9)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 7] = ids[0, 2], ids[1, 5], ids[1, 7]
    full = model(input_ids=ids, labels=labels)
    sparse = model(input_ids=ids, labels=labels, only_labeled_logits=True)
    assert sparse.logits.shape == (3, TINY_VOCAB)
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100])
    torch.testing.assert_close(sparse.loss, full.loss)
    with pytest.raises(ValueError, match="needs `labels`"):
        model(input_ids=ids, only_labeled_logits=True)


def test_upcycled_experts_copy_the_backbones_last_feed_forward_block():
    from transformers import BertModel as Bert

    config = tiny_config(expert_intermediate_size=64)  # the tiny backbone's intermediate_size
    bert = Bert(config.backbone_config, add_pooling_layer=False)
    model = SwitchForTokenReconstruction(config)
    model.model.backbone.load_state_dict(bert.state_dict())
    model.model.upcycle_experts_from_backbone()
    dense = bert.encoder.layer[-1]
    for layer in model.model.layers:
        for expert in range(config.num_experts):
            assert torch.equal(layer.moe.experts.up_proj[expert], dense.intermediate.dense.weight)
            assert torch.equal(layer.moe.experts.down_proj_bias[expert], dense.output.dense.bias)
    with pytest.raises(ValueError, match="expert_intermediate_size"):
        SwitchForTokenReconstruction(tiny_config()).model.upcycle_experts_from_backbone()


@pytest.mark.parametrize("expert_kinds", [None, "ab"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(expert_kinds):
    config = tiny_config(expert_kinds=expert_kinds, router_jitter_noise=0.0, hidden_dropout_prob=0.0)
    config.backbone_config.hidden_dropout_prob = config.backbone_config.attention_probs_dropout_prob = 0.0
    model = SwitchForTokenReconstruction(config).train()
    ids = random_ids(2, 9)
    layer_runs = []
    model.model.layers[0].attention.register_forward_hook(lambda *_: layer_runs.append(1))

    def loss_and_gradients():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()
    assert len(layer_runs) == 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    assert len(layer_runs) == 3  # the checkpointed layer ran again during the backward
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert checkpointed_gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, msg=name)
