"""The model trains the same under every setup people train with: mixed precision, gradient accumulation, gradient
checkpointing, frozen parts, resized embeddings; and reports what transformers' `output_*` flags ask for."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from switch_hf import SwitchForTokenReconstruction
from switch_hf.modeling_switch import SwitchRouter

from conftest import TINY_VOCAB, tiny_config
from device import test_device

# scripts/gpu_check.py runs this module on CUDA as well.
DEVICE = test_device()

EXPERTS_IMPLEMENTATIONS = ["eager", "sorted_mm", "batched_mm", "grouped_mm"]
EXPERT_KINDS = ["ff", "aa", "bb"]


def deterministic_config(**overrides):
    """No dropout, no jitter, dropless: a step's gradients depend only on the weights and the batch."""
    fields = dict(
        hidden_dropout_prob=0.0,
        router_jitter_noise=0.0,
        capacity_factor_train=None,
        capacity_factor_eval=None,
        router_z_loss_coef=0.1,
        router_aux_loss_coef=0.1,
    )
    fields.update(overrides)
    config = tiny_config(**fields)
    config.backbone_config.hidden_dropout_prob = 0.0
    config.backbone_config.attention_probs_dropout_prob = 0.0
    return config


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("implementation", EXPERTS_IMPLEMENTATIONS)
@pytest.mark.parametrize("kinds", EXPERT_KINDS)
def test_every_expert_kind_trains_and_evaluates_under_bfloat16_autocast(kinds, implementation):
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds=kinds, top_k=2)).to(DEVICE)
    model.set_experts_implementation(implementation)
    ids = torch.randint(0, TINY_VOCAB, (2, 7), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    trainable = [param for param in model.parameters() if param.requires_grad]
    assert all(param.grad is not None and torch.isfinite(param.grad).all() for param in trainable)
    # Every parameter keeps its float32 master copy and gets a float32 gradient.
    assert all(param.grad.dtype == torch.float32 for param in trainable)

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_the_router_computes_in_float32_inside_autocast():
    config = tiny_config()
    router = SwitchRouter(config).to(DEVICE).eval()  # no jitter noise
    torch.nn.init.normal_(router.weight, std=1.0)
    hidden = torch.randn(3, 5, config.hidden_size, device=DEVICE)
    mask = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    expected, *_ = router(hidden, mask)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits, _, routing = router(hidden, mask)
    assert logits.dtype == torch.float32
    # Bitwise: a bfloat16 product would be off by up to 1e-2 here.
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_routers_stay_float32_when_the_model_is_loaded_in_half_precision(tmp_path, dtype):
    SwitchForTokenReconstruction(tiny_config(expert_kinds="fb")).save_pretrained(tmp_path)
    model = SwitchForTokenReconstruction.from_pretrained(tmp_path, dtype=dtype).to(DEVICE)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    routers = [name for name in dtypes if ".router." in name]
    assert len(routers) == 3  # layer 0's feed-forward router, layer 1's attention and feed-forward routers
    assert all(dtypes[name] == torch.float32 for name in routers)
    assert dtypes["model.layers.0.moe.experts.up_proj"] == dtype
    ids = torch.randint(0, TINY_VOCAB, (2, 5), device=DEVICE)
    out = model(input_ids=ids, output_router_logits=True)
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)


def train_one_step(model, examples, output_dir, batch_size, accumulation_steps) -> dict[str, torch.Tensor]:
    """One optimizer step of `Trainer` with plain SGD (lr 1, no clipping): returns every parameter's change."""
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation_steps,
        max_steps=1,
        learning_rate=1.0,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=DEVICE.type == "cpu",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=examples).train()
    return {name: param.detach() - before[name] for name, param in model.named_parameters()}


def test_gradient_accumulation_trains_as_one_full_batch(tmp_path):
    """Trainer does not divide the loss of a model that takes `num_items_in_batch`: the cross-entropy is normalised by
    the whole batch's token count, and the router losses must be weighted by each micro-batch's share of it. With
    identical sequences every micro-batch routes exactly like the full batch, so the two steps must agree."""
    sequence = torch.randint(0, TINY_VOCAB, (9,))
    examples = [{"input_ids": sequence, "labels": sequence} for _ in range(4)]
    torch.manual_seed(0)
    model = SwitchForTokenReconstruction(deterministic_config()).to(DEVICE)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    full_batch = train_one_step(model, examples, tmp_path / "full", batch_size=4, accumulation_steps=1)
    model.load_state_dict(state)
    accumulated = train_one_step(model, examples, tmp_path / "accumulated", batch_size=2, accumulation_steps=2)

    router = "model.layers.0.moe.router.weight"
    assert full_batch[router].abs().max() > 0
    for name in full_batch:
        torch.testing.assert_close(accumulated[name], full_batch[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("freeze_backbone", [False, True])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, freeze_backbone):
    config = deterministic_config(expert_kinds="fb", freeze_backbone=freeze_backbone)
    model = SwitchForTokenReconstruction(config).to(DEVICE).train()
    ids = torch.randint(0, TINY_VOCAB, (3, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert checkpointed.aux_loss.grad_fn is not None  # the router losses still reach the routers
    checkpointed.loss.backward()
    actual = gradients(model)

    torch.testing.assert_close(checkpointed.loss, out.loss)
    assert actual.keys() == expected.keys()
    assert any(name.startswith("model.layers.0.") for name in actual)  # the first Switch layer learns
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("implementation", EXPERTS_IMPLEMENTATIONS)
def test_training_only_the_routers_gives_them_the_task_gradient(implementation):
    """Frozen backbone and experts: the routers learn through the gates alone, as with every part trainable."""
    config = deterministic_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    model = SwitchForTokenReconstruction(config).to(DEVICE)
    model.set_experts_implementation(implementation)
    ids = torch.randint(0, TINY_VOCAB, (2, 8), device=DEVICE)
    model(input_ids=ids, labels=ids).loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    for name, param in model.named_parameters():
        param.requires_grad_(".router." in name)
    model(input_ids=ids, labels=ids).loss.backward()
    actual = gradients(model)
    assert sorted(actual) == ["model.layers.0.moe.router.weight", "model.layers.1.moe.router.weight"]
    for name, gradient in actual.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(gradient, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("new_size", [TINY_VOCAB + 13, TINY_VOCAB - 20])
def test_resize_token_embeddings_resizes_backbone_head_and_config(tmp_path, new_size):
    model = SwitchForTokenReconstruction(tiny_config()).to(DEVICE).eval()
    model.resize_token_embeddings(new_size, mean_resizing=False)
    assert model.config.vocab_size == model.config.backbone_config.vocab_size == new_size
    assert model.head.decoder.weight is model.model.backbone.embeddings.word_embeddings.weight
    assert model.head.decoder.bias.shape == (new_size,)
    ids = torch.randint(0, new_size, (2, 6), device=DEVICE)
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 6, new_size)

    model.save_pretrained(tmp_path)
    reloaded = SwitchForTokenReconstruction.from_pretrained(tmp_path, strict=True).to(DEVICE)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)


@pytest.mark.parametrize("kinds", EXPERT_KINDS)
def test_output_flags_record_router_logits_hidden_states_and_attentions(kinds):
    config = tiny_config(expert_kinds=kinds, top_k=2, capacity_factor_eval=None)
    model = SwitchForTokenReconstruction(config).to(DEVICE).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 6), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    plain = model(input_ids=ids, attention_mask=mask)
    out = model(
        input_ids=ids, attention_mask=mask, output_router_logits=True, output_hidden_states=True,
        output_attentions=True,
    )  # fmt: skip
    # Returning the attention probabilities computes them explicitly: the results must not change.
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)

    routers = len(config.router_names)
    assert len(out.router_logits) == len(out.expert_indices) == routers
    for logits, experts in zip(out.router_logits, out.expert_indices):
        assert logits.shape == (2, 6, config.num_experts) and logits.dtype == torch.float32
        real = experts[mask.bool()]
        torch.testing.assert_close(real, logits[mask.bool()].topk(2, dim=-1).indices)

    assert len(out.hidden_states) == config.num_switch_layers + 1
    backbone = model.model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    # Padding positions enter the Switch layers as zeros.
    torch.testing.assert_close(out.hidden_states[0], backbone * mask[..., None])

    assert len(out.attentions) == config.num_switch_layers
    for kind, weights in zip(config.expert_kinds, out.attentions):
        queries = 2 * 6 if kind in ("attention", "both") else 6
        assert weights.shape == (2, config.num_attention_heads, queries, 6)
        routed = weights.sum(-1) > 0  # attention experts give dropped and padding queries no attention at all
        torch.testing.assert_close(weights.sum(-1)[routed], torch.ones_like(weights.sum(-1)[routed]))
        assert torch.all(weights[1, :, :, 4:] == 0)  # padding is never attended to

    selected = model(input_ids=ids, attention_mask=mask, output_hidden_states=[0, -1])
    assert selected.hidden_states[1] is None
    torch.testing.assert_close(selected.hidden_states[0], out.hidden_states[0])
    last = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(selected.hidden_states[-1], last)

    as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False)
    torch.testing.assert_close(as_tuple[0], plain.logits)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices to split the layers over")
def test_a_model_split_over_two_devices_runs_and_trains():
    model = SwitchForTokenReconstruction(tiny_config(expert_kinds="fb"))
    device_map = {"model.backbone": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "head": 1}
    model = model.to("cuda:0")
    for name, device in device_map.items():
        model.get_submodule(name).to(f"cuda:{device}")
    ids = torch.randint(0, TINY_VOCAB, (2, 6), device="cuda:0")
    out = model(input_ids=ids, labels=ids.to("cuda:1"))
    out.loss.backward()
    assert out.tokens_per_expert.device == out.logits.device
    assert all(param.grad is not None for param in model.parameters() if param.requires_grad)


def compile_config(kinds: str, **overrides):
    """A model for the compiler tests: one Switch layer per letter of `kinds` on a one-layer backbone (dynamo traces
    every layer anew, and more of BERT's identical layers would test nothing more)."""
    config = deterministic_config(expert_kinds=kinds, num_switch_layers=len(kinds), **overrides)
    config.backbone_config.num_hidden_layers = 1
    return config


# "fab" holds a layer of each kind (feed-forward experts, attention experts, both), all traced into the one graph.
# Inductor's code generation costs tens of seconds per model on a small CPU: it compiles "bb", whose layers hold both
# kinds of experts.
@pytest.mark.slow
@pytest.mark.parametrize("kinds, backend", [("fab", "aot_eager"), ("bb", "inductor")])
def test_dropless_inference_compiles_into_one_graph_that_matches_eager(kinds, backend):
    model = SwitchForTokenReconstruction(compile_config(kinds)).to(DEVICE).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        actual = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_with_capacity_compiles_without_graph_breaks_and_matches_eager():
    """Capacity dropping stays exact when compiled: dropped pairs travel with a zero gate instead of being removed.
    One layer of each kind, so every router drops in the one graph."""
    model = SwitchForTokenReconstruction(compile_config("fab", capacity_factor_train=0.5)).to(DEVICE).train()
    ids = torch.randint(0, TINY_VOCAB, (2, 8), device=DEVICE)

    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.dropped_fraction.shape == (4,) and out.dropped_fraction.min() > 0
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    # fullgraph: a graph break anywhere in the forward fails here; AOT autograd traces the backward from it.
    compiled = torch.compile(lambda: model(input_ids=ids, labels=ids), fullgraph=True, backend="aot_eager")()
    compiled.loss.backward()
    torch.testing.assert_close(compiled.dropped_fraction, out.dropped_fraction)
    torch.testing.assert_close(compiled.loss, out.loss, rtol=1e-5, atol=1e-6)
    actual = gradients(model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropless_inference_exports():
    model = SwitchForTokenReconstruction(compile_config("bb")).to(DEVICE).eval()
    ids = torch.randint(0, TINY_VOCAB, (2, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    exported = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        actual = exported.module()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
