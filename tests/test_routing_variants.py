"""Routing beyond the Switch paper: expert choice (Zhou et al., 2022) and auxiliary-loss-free load balancing by a
routing bias (Wang et al., 2024), each checked against a slow reference written from its paper."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from switch_hf import RELEASED_CHECKPOINT, RouterBiasUpdateCallback, SwitchConfig, SwitchForTokenReconstruction
from switch_hf.modeling_switch import SwitchAttentionExperts, SwitchSparseBlock

from conftest import REPO_ROOT, TINY_VOCAB, tiny_config


def random_ids(batch, seq):
    return torch.randint(1, TINY_VOCAB, (batch, seq))


def initialised(module, router_std=1.0):
    """A bare module's parameters are torch.empty: give every one a value, the router a confident one."""
    for name, parameter in module.named_parameters():
        torch.nn.init.normal_(parameter, std=router_std if name.endswith("router.weight") else 0.1)
    return module


def padded_mask(batch, seq):
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[0, seq // 2 :] = False
    mask[-1, 1:] = False
    return mask


# --- expert choice ------------------------------------------------------------------------------------------------


def experts_choose_reference(probs, mask, capacity_factor, top_k=1):
    """Zhou et al. (2022), one expert at a time: expert j takes the `capacity` real tokens with the highest probability
    for it. Returns the (t, e) bool of the tokens each expert took."""
    num_tokens, num_experts = probs.shape
    real = [token for token in range(num_tokens) if mask[token]]
    capacity = min(len(real), math.ceil(capacity_factor * top_k * len(real) / num_experts))
    chosen = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for expert in range(num_experts):
        best_first = sorted(real, key=lambda token: -probs[token, expert].item())
        chosen[best_first[:capacity], expert] = True
    return chosen


def feed_forward_reference(experts, token_states, chosen, probs):
    """Each token's output: the sum over the experts that took it of gate * expert(token)."""
    output = torch.zeros_like(token_states)
    for token, expert in chosen.nonzero().tolist():
        inner = F.gelu(F.linear(token_states[token], experts.up_proj[expert], experts.up_proj_bias[expert]))
        expert_output = F.linear(inner, experts.down_proj[expert], experts.down_proj_bias[expert])
        output[token] += probs[token, expert] * expert_output
    return output


@pytest.mark.parametrize(
    "num_experts, top_k, capacity_factor, batch, seq",
    [(4, 1, 1.0, 3, 10), (4, 1, 1.25, 2, 7), (8, 2, 0.5, 3, 9), (4, 1, 4.0, 2, 6), (8, 1, 1.0, 1, 3)],
)
def test_expert_choice_block_matches_the_per_expert_reference(num_experts, top_k, capacity_factor, batch, seq):
    config = tiny_config(router_type="expert_choice", num_experts=num_experts, top_k=top_k,
                         capacity_factor_eval=capacity_factor)
    block = initialised(SwitchSparseBlock(config)).eval()
    hidden = torch.randn(batch, seq, config.hidden_size)
    mask = padded_mask(batch, seq)
    output, routing = block(hidden, mask)

    tokens, flat_mask = hidden.view(-1, config.hidden_size), mask.view(-1)
    probs = routing.router_logits.softmax(-1)
    chosen = experts_choose_reference(probs, flat_mask, capacity_factor, top_k)
    expected_index = [[expert for expert in range(num_experts) if row[expert]] for row in chosen.tolist()]
    assert [[e for e in row if e >= 0] for row in routing.expert_index.tolist()] == expected_index
    assert routing.expert_index.shape == (batch * seq, num_experts)
    assert torch.equal(routing.tokens_per_expert, chosen.sum(0).float())
    assert routing.tokens_per_expert.unique().numel() == 1  # no expert over or under its capacity
    unserved = (~chosen.any(-1) & flat_mask).sum().item() / flat_mask.sum().item()
    assert routing.dropped_fraction.item() == pytest.approx(unserved)
    assert routing.load_balancing_loss == 0
    expected = feed_forward_reference(block.experts, tokens, chosen, probs)
    torch.testing.assert_close(output.view(-1, config.hidden_size), expected, rtol=1e-5, atol=1e-6)


def test_expert_choice_gives_tokens_zero_one_or_several_experts_and_never_padding():
    config = tiny_config(router_type="expert_choice", num_experts=4, capacity_factor_eval=1.0)
    block = initialised(SwitchSparseBlock(config), router_std=3.0).eval()
    hidden = torch.randn(4, 12, config.hidden_size)
    mask = padded_mask(4, 12)
    output, routing = block(hidden, mask)
    experts_per_token = (routing.expert_index >= 0).sum(-1)[mask.view(-1)]
    assert {0, 1, 2} <= set(experts_per_token.tolist())  # a confident router: some tokens unserved, some shared
    assert torch.all(routing.expert_index[~mask.view(-1)] == -1)
    assert torch.all(output[~mask] == 0)
    # Padding as many as all real tokens: each expert takes every real token and still no padding.
    config = tiny_config(router_type="expert_choice", num_experts=4, capacity_factor_eval=4.0)
    _, routing = initialised(SwitchSparseBlock(config)).eval()(hidden, mask)
    assert torch.all((routing.expert_index >= 0).sum(-1) == mask.view(-1) * 4)
    assert routing.dropped_fraction == 0


def attention_experts_reference(module, hidden, mask, chosen, probs):
    """Every expert's multi-head attention over all tokens (its query and output projections, the shared keys and
    values), each token summing gate * output over the experts that took it."""
    batch, seq, hidden_size = hidden.shape
    heads, head_dim = module.num_heads, module.head_dim

    def split(states):
        return states.view(batch, seq, heads, head_dim).transpose(1, 2)

    keys, values = split(module.k_proj(hidden)), split(module.v_proj(hidden))
    output = torch.zeros(batch * seq, hidden_size)
    for expert in range(module.num_experts):
        queries = split(F.linear(hidden, module.q_proj[expert], module.q_proj_bias[expert]))
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask[:, None, None, :])
        expert_output = F.linear(attended.transpose(1, 2).reshape(batch * seq, hidden_size), module.o_proj[expert],
                                 module.o_proj_bias[expert])
        output += (chosen[:, expert] * probs[:, expert]).unsqueeze(-1) * expert_output
    return output.view(batch, seq, hidden_size)


def test_expert_choice_attention_experts_match_the_per_expert_reference():
    config = tiny_config(router_type="expert_choice", num_experts=4, capacity_factor_eval=1.5, attention_dropout=0.0)
    module = initialised(SwitchAttentionExperts(config)).eval()
    hidden = torch.randn(3, 8, config.hidden_size)
    mask = padded_mask(3, 8)
    output, weights, routing = module(hidden, mask[:, None, None, :], mask, output_attentions=True)
    probs = routing.router_logits.softmax(-1)
    chosen = experts_choose_reference(probs, mask.view(-1), 1.5)
    assert (chosen.sum(-1) > 1).any()  # several queries for some tokens
    expected = attention_experts_reference(module, hidden, mask, chosen, probs)
    torch.testing.assert_close(output[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert torch.all(output[~mask] == 0)
    assert weights.shape == (3, config.num_attention_heads, int(chosen.sum(-1).max()) * 8, 8)


@pytest.mark.parametrize("implementation", ["sorted_mm", "by_device", "grouped_mm", "batched_mm"])
def test_expert_choice_runs_alike_on_every_experts_implementation(implementation):
    config = tiny_config(router_type="expert_choice", num_experts=8, top_k=2, capacity_factor_train=0.8,
                         router_jitter_noise=0.0, expert_kinds="fb")
    model = SwitchForTokenReconstruction(config).train()
    ids, mask = random_ids(3, 11), padded_mask(3, 11).long()

    def logits_and_gradients(name):
        model.set_experts_implementation(name)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in every run
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_logits, eager_gradients = logits_and_gradients("eager")
    logits, gradients = logits_and_gradients(implementation)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert gradients.keys() == eager_gradients.keys()
    for name in gradients:
        torch.testing.assert_close(gradients[name], eager_gradients[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("expert_kinds", ["ff", "ab"])
def test_expert_choice_gradients_reach_routers_and_experts(expert_kinds):
    config = tiny_config(router_type="expert_choice", expert_kinds=expert_kinds)
    model = SwitchForTokenReconstruction(config).train()
    ids = random_ids(2, 9)
    out = model(input_ids=ids, attention_mask=padded_mask(2, 9).long(), labels=ids)
    out.loss.backward()
    routed = [name for name, _ in model.named_parameters() if "router" in name or "experts" in name or "_proj" in name]
    assert any("router" in name for name in routed)
    for name, parameter in model.named_parameters():
        if name in routed:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # The aux loss is the z-loss alone: nothing to balance.
    assert out.load_balancing_loss == 0
    torch.testing.assert_close(out.aux_loss, config.router_z_loss_coef * out.router_z_loss)
    assert all(index.shape == (2, 9, config.num_experts) for index in out.expert_indices)


# --- auxiliary-loss-free balancing ----------------------------------------------------------------------------------


def biased_choice_reference(probs, bias, mask):
    """Wang et al. (2024), one token at a time: the expert of the highest probability + bias, its gate the
    probability alone; -1 for padding."""
    experts, gates = [], []
    for token in range(probs.shape[0]):
        if not mask[token]:
            experts.append(-1)
            gates.append(0.0)
            continue
        expert = max(range(probs.shape[1]), key=lambda e: (probs[token, e] + bias[e]).item())
        experts.append(expert)
        gates.append(probs[token, expert].item())
    return torch.tensor(experts), torch.tensor(gates)


def test_biased_token_choice_matches_the_per_token_reference():
    config = tiny_config(router_bias_update_rate=0.01, capacity_factor_eval=None)
    block = initialised(SwitchSparseBlock(config)).eval()
    block.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    hidden = torch.randn(3, 10, config.hidden_size)
    mask = padded_mask(3, 10)
    output, routing = block(hidden, mask)

    probs = routing.router_logits.softmax(-1)
    experts, gates = biased_choice_reference(probs, block.router.expert_bias, mask.view(-1))
    assert torch.equal(routing.expert_index.squeeze(-1), experts)
    assert not torch.equal(experts[mask.view(-1)], probs.argmax(-1)[mask.view(-1)])  # the bias changed choices
    chosen = torch.zeros_like(probs, dtype=torch.bool)
    chosen[mask.view(-1), experts[mask.view(-1)]] = True
    expected = feed_forward_reference(block.experts, hidden.view(-1, config.hidden_size), chosen, probs)
    torch.testing.assert_close(output.view(-1, config.hidden_size), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(gates[experts >= 0], probs[chosen])  # gates without the bias


def bias_model(**overrides):
    fields = dict(router_bias_update_rate=0.01, capacity_factor_train=None, router_aux_loss_coef=0.0)
    return SwitchForTokenReconstruction(tiny_config(**{**fields, **overrides}))


def routers(model):
    return [module for module in model.modules() if hasattr(module, "expert_bias")]


def train_pass(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("expert_kinds", ["ff", "ab"])
def test_bias_moves_toward_even_load_in_training_and_stays_in_eval(expert_kinds):
    model = bias_model(expert_kinds=expert_kinds).train()
    ids, mask = random_ids(3, 12), padded_mask(3, 12).long()
    # Two micro-batches of gradient accumulation count as one step's load.
    loads = [train_pass(model, ids, mask).tokens_per_expert + train_pass(model, ids[:2], mask[:2]).tokens_per_expert]
    load = loads[0]  # (routers, e): dropless, so the load is every real token's choice
    assert load.sum(-1).tolist() == [float(mask.sum() + mask[:2].sum())] * len(routers(model))
    model.update_router_biases()
    for router, router_load in zip(routers(model), load):
        expected = 0.01 * torch.sign(router_load.mean() - router_load)
        assert torch.equal(router.expert_bias, expected)
        assert (expected != 0).any()
    moved = [router.expert_bias.clone() for router in routers(model)]

    model.eval()
    train_pass(model, ids, mask)  # a backward in eval mode (e.g. attribution) counts nothing
    model.update_router_biases()
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # nor a training-mode forward without gradients
    model.update_router_biases()
    assert all(torch.equal(router.expert_bias, before) for router, before in zip(routers(model), moved))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_counts_the_load_once(use_reentrant):
    ids, mask = random_ids(2, 10), padded_mask(2, 10).long()

    def pending_after_one_pass(checkpointing):
        torch.manual_seed(0)
        model = bias_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(1)  # the same jitter in both
        out = train_pass(model, ids, mask)
        return [router.pending_load.clone() for router in routers(model)], out.tokens_per_expert

    plain, plain_load = pending_after_one_pass(checkpointing=False)
    checkpointed, checkpointed_load = pending_after_one_pass(checkpointing=True)
    assert all(torch.equal(pending, load) for pending, load in zip(plain, plain_load))
    assert all(torch.equal(a, b) for a, b in zip(checkpointed, plain))


def test_trainer_callback_updates_the_biases_after_each_step():
    model = bias_model().train()
    train_pass(model, random_ids(2, 8), torch.ones(2, 8, dtype=torch.long))
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP hands it over
    RouterBiasUpdateCallback().on_step_end(None, None, None, model=wrapper)
    assert all(router.expert_bias.abs().sum() > 0 and router.pending_load.sum() == 0 for router in routers(model))


def test_bias_and_router_type_survive_save_and_load(tmp_path):
    model = bias_model().train()
    train_pass(model, random_ids(2, 8), torch.ones(2, 8, dtype=torch.long))
    model.update_router_biases()
    model.save_pretrained(tmp_path / "bias")
    reloaded = SwitchForTokenReconstruction.from_pretrained(tmp_path / "bias")
    assert reloaded.config.router_bias_update_rate == 0.01
    for saved, loaded in zip(routers(model), routers(reloaded)):
        assert saved.expert_bias.abs().sum() > 0 and torch.equal(loaded.expert_bias, saved.expert_bias)

    choice = SwitchForTokenReconstruction(tiny_config(router_type="expert_choice")).eval()
    choice.save_pretrained(tmp_path / "choice")
    reloaded = SwitchForTokenReconstruction.from_pretrained(tmp_path / "choice").eval()
    assert reloaded.config.router_type == "expert_choice"
    ids = random_ids(2, 8)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, choice(input_ids=ids).logits)


def test_the_released_checkpoint_loads_as_token_choice_without_a_bias():
    config = SwitchConfig.from_pretrained(RELEASED_CHECKPOINT)
    assert config.router_type == "token_choice" and config.router_bias_update_rate == 0.0
    assert not routers(SwitchForTokenReconstruction(config))


# --- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router_type="switch"), r"router_type must be one of \['token_choice', 'expert_choice'\], got 'switch'"),
        (dict(router_type="expert_choice", capacity_factor_eval=None), "capacity_factor_eval must be a number > 0"),
        (dict(router_type="expert_choice", router_bias_update_rate=0.01), "router_bias_update_rate must be 0.0"),
        (dict(router_bias_update_rate=-0.1), "router_bias_update_rate must be a finite number >= 0"),
        (dict(router_bias_update_rate=float("nan")), "router_bias_update_rate must be a finite number >= 0"),
    ],
)
def test_bad_routing_settings_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


# --- compiled training ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides", [dict(router_type="expert_choice", capacity_factor_train=0.75), dict(router_bias_update_rate=0.01)]
)
def test_compiled_training_matches_eager_and_counts_the_load_once(overrides):
    """One layer of each kind in one graph without breaks: expert choice's pairs travel at a fixed size, and the
    bias's load is counted by the backward of the compiled graph as by the eager one's."""
    config = tiny_config(expert_kinds="fab", num_switch_layers=3, router_jitter_noise=0.0, hidden_dropout_prob=0.0,
                         **overrides)
    config.backbone_config.num_hidden_layers = 1
    config.backbone_config.hidden_dropout_prob = config.backbone_config.attention_probs_dropout_prob = 0.0
    model = SwitchForTokenReconstruction(config).train()
    ids, mask = random_ids(2, 8), padded_mask(2, 8).long()

    def run(forward):
        model.zero_grad(set_to_none=True)
        out = forward()
        out.loss.backward()
        pending = [router.pending_load.clone() for router in routers(model)]
        for router in routers(model):
            router.pending_load.zero_()
        return out, pending, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    eager, eager_pending, eager_gradients = run(lambda: model(input_ids=ids, attention_mask=mask, labels=ids))
    torch._dynamo.reset()
    compiled_forward = torch.compile(lambda: model(input_ids=ids, attention_mask=mask, labels=ids), fullgraph=True,
                                     backend="aot_eager")
    compiled, pending, gradients = run(compiled_forward)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.dropped_fraction, eager.dropped_fraction)
    assert compiled.dropped_fraction.max() > 0
    assert len(pending) == (4 if "router_bias_update_rate" in overrides else 0)
    assert all(torch.equal(a, b) and a.sum() > 0 for a, b in zip(pending, eager_pending))
    assert gradients.keys() == eager_gradients.keys()
    for name in gradients:
        torch.testing.assert_close(gradients[name], eager_gradients[name], rtol=1e-4, atol=1e-6, msg=name)


# --- expert parallelism ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)
def test_expert_parallel_ranks_route_as_one_process_and_share_one_bias(tmp_path):
    """Two processes, each with half the experts and its own batch: expert choice gives each rank the logits and loss
    one process gives its batch, and the bias moves by the load of both batches, alike on both ranks."""
    deterministic = dict(hidden_dropout_prob=0.0, router_jitter_noise=0.0, capacity_factor_eval=1.0)
    configs = {
        "choice": tiny_config(router_type="expert_choice", capacity_factor_train=1.0, **deterministic),
        "bias": tiny_config(router_bias_update_rate=0.01, capacity_factor_train=None, **deterministic),
    }
    input_ids = [random_ids(2, 9) for _ in range(2)]
    labels = [ids.masked_fill(torch.rand(ids.shape) < 0.3, -100) for ids in input_ids]
    torch.save({"input_ids": input_ids, "labels": labels}, tmp_path / "inputs.pt")
    for name, config in configs.items():
        config.backbone_config.hidden_dropout_prob = config.backbone_config.attention_probs_dropout_prob = 0.0
        torch.manual_seed(0)
        model = SwitchForTokenReconstruction(config)
        for router in routers(model) or [layer.moe.router for layer in model.model.layers]:
            torch.nn.init.normal_(router.weight, std=1.0)  # a confident router: the ranks' experts differ in load
        model.save_pretrained(tmp_path / name)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO_ROOT / "tests" / "routing_ep_worker.py"), "--checkpoints",
               *(str(tmp_path / name) for name in configs), "--inputs", str(tmp_path / "inputs.pt"),
               "--output", str(tmp_path / "result.pt")]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    found = torch.load(tmp_path / "result.pt")

    for name in configs:
        model = SwitchForTokenReconstruction.from_pretrained(tmp_path / name)
        ranks = found[str(tmp_path / name)]
        for rank, (ids, rank_labels) in enumerate(zip(input_ids, labels)):
            with torch.no_grad():
                torch.testing.assert_close(ranks[rank]["logits"], model.eval()(input_ids=ids).logits,
                                           rtol=1e-5, atol=1e-5)
            loss = model.train()(input_ids=ids, labels=rank_labels).loss
            loss.backward()
            torch.testing.assert_close(ranks[rank]["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        model.update_router_biases()  # the load of both batches, as the ranks summed it
        expected = [router.expert_bias for router in routers(model)]
        assert len(expected) == (2 if name == "bias" else 0)
        assert any(bias.abs().sum() > 0 for bias in expected) or name == "choice"
        for rank in ranks:
            assert len(rank["biases"]) == len(expected)
            for bias, reference in zip(rank["biases"], expected):
                assert torch.equal(bias, reference)
