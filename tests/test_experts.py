"""The experts implementations: same outputs and gradients as the eager reference, the `sorted_mm` kernel itself,
how the default implementation is chosen, and bad choices."""

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from switch_hf import SwitchForTokenReconstruction, modeling_switch
from switch_hf.modeling_switch import SwitchExperts, SwitchSparseBlock, _SortedExpertsLinear

from conftest import REPO_ROOT, TINY_VOCAB, tiny_config

IMPLEMENTATIONS = ["by_device", "sorted_mm", "grouped_mm", "batched_mm"]


def random_ids(batch, seq):
    return torch.randint(1, TINY_VOCAB, (batch, seq))


def confident_model(**overrides):
    """A tiny model whose router is confident and unbalanced: some experts get many tokens, some none."""
    model = SwitchForTokenReconstruction(tiny_config(router_jitter_noise=0.0, **overrides))
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.moe.router.weight, std=1.0)
        for name in ("up_proj_bias", "down_proj_bias"):  # non-zero biases, so that their gradients are checked
            torch.nn.init.normal_(getattr(layer.moe.experts, name), std=0.1)
    return model


def logits_loss_and_grads(model, implementation, input_ids, attention_mask):
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in every run
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


# --- every implementation computes the same function --------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=8, top_k=1, capacity_factor_train=0.5),  # Switch: top-1, tokens dropped
        dict(num_experts=8, top_k=2, capacity_factor_train=0.75),  # top-2, second choices dropped first
        dict(num_experts=4, top_k=3, capacity_factor_train=None),  # dropless
        dict(num_experts=16, top_k=1, capacity_factor_train=2.0),  # more experts than some batches use
    ],
    ids=["top1-dropping", "top2-dropping", "top3-dropless", "16-experts"],
)
def test_implementation_matches_eager_in_outputs_loss_and_gradients(implementation, overrides):
    model = confident_model(**overrides).train()
    input_ids = random_ids(3, 11)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # padding is never routed, whichever implementation runs

    logits, loss, grads = logits_loss_and_grads(model, "eager", input_ids, attention_mask)
    other_logits, other_loss, other_grads = logits_loss_and_grads(model, implementation, input_ids, attention_mask)

    torch.testing.assert_close(other_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-5)
    assert other_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(other_grads[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_experts_without_tokens_get_exactly_zero_gradient():
    config = tiny_config(num_experts=8, capacity_factor_train=None, router_jitter_noise=0.0)
    config._experts_implementation = "sorted_mm"
    block = SwitchSparseBlock(config).train()
    # A bare block's parameters are torch.empty: initialise every one, biases included, or garbage (inf, NaN) leaks in.
    for name in ("up_proj", "down_proj", "up_proj_bias", "down_proj_bias"):
        torch.nn.init.normal_(getattr(block.experts, name), std=0.1)
    with torch.no_grad():  # on positive inputs, experts 5, 6 and 7 can never win the router
        block.router.weight.normal_()
        block.router.weight[5:] = -100.0
    hidden = torch.randn(2, 6, config.hidden_size).abs()
    output, routing = block(hidden, torch.ones(2, 6, dtype=torch.bool))
    output.square().sum().backward()
    used = routing.tokens_per_expert > 0
    assert not used[5:].any() and used.any()
    for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
        grad = getattr(block.experts, name).grad
        assert torch.all(grad[~used] == 0), name
        assert grad[used].abs().sum() > 0, name


@pytest.mark.parametrize("with_autograd", [True, False], ids=["autograd", "inference"])
def test_out_of_range_expert_ids_are_skipped_like_other_ranks_experts(with_autograd):
    """Expert parallelism marks the pairs routed to other ranks' experts with ids >= num_experts: no output."""
    config = tiny_config(num_experts=4)
    block = SwitchSparseBlock(config)
    experts = block.experts
    for name in ("up_proj", "down_proj", "up_proj_bias", "down_proj_bias"):
        torch.nn.init.normal_(getattr(experts, name), std=0.1)
    hidden = torch.randn(6, config.hidden_size)
    index = torch.tensor([[0, 4], [4, 4], [1, 2], [3, -1], [4, 0], [2, 3]])
    weights = torch.rand(6, 2)
    valid = (index >= 0) & (index < 4)

    outputs = {}
    with torch.set_grad_enabled(with_autograd):
        for implementation in ("eager", "sorted_mm"):
            config._experts_implementation = implementation
            outputs[implementation] = experts(hidden, index, weights)
        config._experts_implementation = "eager"
        expected = experts(hidden, index.masked_fill(~valid, 0), weights.masked_fill(~valid, 0.0))
    torch.testing.assert_close(outputs["sorted_mm"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs["eager"], expected, rtol=1e-6, atol=1e-6)
    assert torch.all(outputs["sorted_mm"][1] == 0)


# --- the sorted_mm kernel -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_transposed", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sorted_experts_linear_gradients_are_exact(is_transposed, with_bias):
    """`gradcheck` in float64 on a layout with an expert that has no rows."""
    rows_per_expert = [3, 0, 1, 4]
    num_experts, in_features, out_features = len(rows_per_expert), 5, 6
    shape = (num_experts, in_features, out_features) if is_transposed else (num_experts, out_features, in_features)
    input = torch.randn(sum(rows_per_expert), in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(num_experts, out_features, dtype=torch.float64, requires_grad=True) if with_bias else None

    def reference(input, weight, bias):
        outputs, start = [], 0
        for expert, rows in enumerate(rows_per_expert):
            matrix = weight[expert] if is_transposed else weight[expert].t()
            out = input[start : start + rows] @ matrix
            outputs.append(out + bias[expert] if bias is not None else out)
            start += rows
        return torch.cat(outputs)

    output = _SortedExpertsLinear.apply(input, weight, bias, rows_per_expert, is_transposed)
    torch.testing.assert_close(output, reference(input, weight, bias))
    assert torch.autograd.gradcheck(
        lambda i, w, *b: _SortedExpertsLinear.apply(i, w, b[0] if b else None, rows_per_expert, is_transposed),
        (input, weight) + ((bias,) if with_bias else ()),
    )


def test_sorted_mm_backward_allocates_each_weight_gradient_once():
    """The backward writes every expert's gradient into one (e, ...) tensor. Differentiating `weight[i]` for each
    expert (the eager path) instead allocates a full-size gradient per expert: O(e^2) memory traffic."""
    num_experts = 16
    config = tiny_config(num_experts=num_experts, capacity_factor_train=None, router_jitter_noise=0.0)
    block = SwitchSparseBlock(config).train()
    for parameter in block.parameters():  # torch.empty otherwise
        torch.nn.init.normal_(parameter, std=0.02)
    hidden = torch.randn(4, 16, config.hidden_size)
    mask = torch.ones(4, 16, dtype=torch.bool)
    full_gradient_bytes = block.experts.up_proj.numel() * block.experts.up_proj.element_size()

    def full_size_allocations(implementation):
        config._experts_implementation = implementation
        block.zero_grad(set_to_none=True)
        output, routing = block(hidden, mask)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            output.sum().backward()
        assert (routing.tokens_per_expert > 0).sum() >= num_experts // 2
        return sum(1 for event in prof.events() if event.self_cpu_memory_usage == full_gradient_bytes)

    # up_proj and down_proj have the same size: one gradient each.
    assert full_size_allocations("sorted_mm") == 2
    assert full_size_allocations("eager") > num_experts


def test_sorted_mm_keeps_expert_dropout():
    """Expert dropout lives in `act_fn`, which every implementation calls between the two projections."""
    model = confident_model(num_experts=4, expert_dropout=0.5, hidden_dropout_prob=0.0).train()
    model.set_experts_implementation("sorted_mm")
    input_ids = random_ids(2, 9)
    torch.manual_seed(1)
    first = model(input_ids=input_ids).logits
    torch.manual_seed(2)
    second = model(input_ids=input_ids).logits
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        eval_sorted = model(input_ids=input_ids).logits
        model.set_experts_implementation("eager")
        torch.testing.assert_close(model(input_ids=input_ids).logits, eval_sorted, rtol=1e-5, atol=1e-5)


def other_moe_model(name):
    """Tiny transformers MoE models whose experts differ from Switch's: Mixtral's are gated without bias, GPT-OSS's
    are stored transposed (e, in, out), with biases and their own gate function."""
    torch.manual_seed(0)
    shared = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if name == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**shared)).eval()
    model = GptOssForCausalLM(GptOssConfig(**shared, head_dim=8, layer_types=["full_attention"])).eval()
    for parameter in model.parameters():  # its biases start at zero: make them count
        torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.mark.parametrize("model_name", ["mixtral", "gpt-oss"])
@pytest.mark.parametrize("with_autograd", [True, False], ids=["autograd", "inference"])
def test_sorted_mm_serves_other_models_through_the_interface(model_name, with_autograd):
    """Registered with transformers' experts interface, it runs any `@use_experts_implementation` experts, with and
    without autograd."""
    model = other_moe_model(model_name)
    input_ids = torch.randint(0, 64, (2, 7))
    outputs = {}
    for implementation in ("eager", "sorted_mm"):
        model.set_experts_implementation(implementation)
        with torch.set_grad_enabled(with_autograd):
            outputs[implementation] = model(input_ids).logits
    assert outputs["sorted_mm"].requires_grad == with_autograd
    torch.testing.assert_close(outputs["sorted_mm"], outputs["eager"], rtol=1e-5, atol=1e-5)


# --- choosing the implementation ----------------------------------------------------------------------------------


def test_default_is_by_device_and_an_explicit_choice_is_kept(tmp_path):
    assert SwitchForTokenReconstruction(tiny_config()).config._experts_implementation == "by_device"
    config = tiny_config()
    config._experts_implementation = "grouped_mm"
    assert SwitchForTokenReconstruction(config).config._experts_implementation == "grouped_mm"

    SwitchForTokenReconstruction(tiny_config()).save_pretrained(tmp_path)
    assert "experts_implementation" not in (tmp_path / "config.json").read_text()  # a runtime choice, not saved
    assert SwitchForTokenReconstruction.from_pretrained(tmp_path).config._experts_implementation == "by_device"
    loaded = SwitchForTokenReconstruction.from_pretrained(tmp_path, experts_implementation="eager")
    assert loaded.config._experts_implementation == "eager"
    loaded.set_experts_implementation("batched_mm")
    assert loaded.config._experts_implementation == "batched_mm"


@pytest.mark.parametrize("implementation", ["eager", *IMPLEMENTATIONS])
def test_every_implementation_can_be_chosen_at_load_time(tmp_path, implementation):
    """The choice reaches the Switch layers only: the BERT backbone has no experts (and BertModel alone would reject
    "grouped_mm")."""
    model = SwitchForTokenReconstruction(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = SwitchForTokenReconstruction.from_pretrained(tmp_path, experts_implementation=implementation).eval()
    assert loaded.config._experts_implementation == implementation
    input_ids = random_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


VALID_NAMES = ("eager", "by_device", "sorted_mm", "grouped_mm", "batched_mm")


def test_unknown_implementation_fails_listing_the_valid_names_with_set_experts_implementation():
    model = SwitchForTokenReconstruction(tiny_config())
    with pytest.raises(ValueError) as error:
        model.set_experts_implementation("nope")
    for name in VALID_NAMES:
        assert f'experts_implementation="{name}"' in str(error.value)
    assert model.config._experts_implementation == "by_device"  # unchanged


def test_unknown_implementation_fails_listing_the_valid_names_at_load_time(tmp_path):
    SwitchForTokenReconstruction(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        SwitchForTokenReconstruction.from_pretrained(tmp_path, experts_implementation="nope")
    assert '"nope"' in str(error.value)
    for name in VALID_NAMES:
        assert f'experts_implementation="{name}"' in str(error.value)


# --- the default follows the tensors' device --------------------------------------------------------------------------


def test_the_default_runs_sorted_mm_on_cpu_tensors_on_a_machine_with_cuda(monkeypatch):
    """The implementation is chosen where the experts run, not when the model is built: a model kept on the CPU of a
    CUDA machine runs `sorted_mm` (and switch_hf's fused kernel where it applies), not `grouped_mm`'s CPU path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = confident_model().eval()
    sorted_mm, calls = modeling_switch.sorted_mm_experts_forward, []

    def counting_sorted_mm(*arguments):
        calls.append(arguments[1].device)
        return sorted_mm(*arguments)

    monkeypatch.setattr(modeling_switch, "sorted_mm_experts_forward", counting_sorted_mm)
    input_ids = random_ids(2, 9)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        assert calls == [torch.device("cpu")] * model.config.num_switch_layers
        assert model.config._experts_implementation == "by_device"
        model.set_experts_implementation("eager")
        torch.testing.assert_close(logits, model(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5)


def test_the_default_runs_grouped_mm_on_other_devices(monkeypatch):
    """Off the CPU, `by_device` runs whatever transformers' interface holds as `grouped_mm` (here a stand-in, on
    meta tensors: no accelerator needed)."""
    calls = []
    monkeypatch.setitem(
        ALL_EXPERTS_FUNCTIONS._global_mapping, "grouped_mm", lambda self, rows, *_: calls.append(rows.device) or rows
    )
    config = tiny_config()
    config._experts_implementation = "by_device"
    with torch.device("meta"):
        experts = SwitchExperts(config)
        rows, index, gates = torch.empty(5, config.hidden_size), torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1)
    experts(rows, index, gates)
    assert calls == [torch.device("meta")]


def test_every_implementation_the_design_doc_names_runs():
    design = (REPO_ROOT / "docs" / "design.md").read_text()
    section = design[design.index("## Experts implementations") :]
    paragraph = section[: section.index("\n\n", section.index("experts_implementation="))]
    names = set(re.findall(r"`([a-z_]+)`", paragraph))
    assert {"by_device", "sorted_mm", "grouped_mm", "eager"} <= names
    model = SwitchForTokenReconstruction(tiny_config()).eval()
    input_ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        for name in sorted(names):
            model.set_experts_implementation(name)
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5, msg=name)
