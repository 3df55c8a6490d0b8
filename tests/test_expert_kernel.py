"""switch_hf's fused expert kernel (`switch_hf/expert_kernel.cpp`): the same function as torch's products on every
tiling edge, where `sorted_mm` runs on it and where it must not, its errors on bad input, and the fallback without
it."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from switch_hf import SwitchForTokenReconstruction, expert_kernel, modeling_switch
from switch_hf.modeling_switch import SwitchExperts, _expert_kernel_runs, _needs_gradients

from conftest import REPO_ROOT, TINY_VOCAB, tiny_config

pytestmark = pytest.mark.skipif(
    not expert_kernel.is_registered(),
    reason=f"the expert kernel is not built here: {expert_kernel.unavailable_reason()}",
)

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "identity": lambda inner: inner}
# Rows per expert around every edge of the kernel's tiling: empty experts, one row, a register tile (16 rows) and
# its vectors (up to 64 rows), a work item (128 rows, or up to 159 when a short rest joins it) and beyond, and the
# tail of a work item run as rows (m % 16 up to 10: tiles of 1 to 4 rows) or in a partly empty vector (11 and more).
ROWS_PER_EXPERT = [0, 1, 5, 10, 11, 15, 16, 17, 23, 26, 27, 63, 64, 65, 128, 129, 138, 139, 159, 160, 161, 300]


def expert_weights(num_experts, hidden, intermediate, with_bias, generator):
    def normal(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    up, down = normal(num_experts, intermediate, hidden, std=hidden**-0.5), normal(
        num_experts, hidden, intermediate, std=intermediate**-0.5
    )
    up_bias = normal(num_experts, intermediate, std=0.1) if with_bias else None
    down_bias = normal(num_experts, hidden, std=0.1) if with_bias else None
    return up, up_bias, down, down_bias


def torch_feed_forward(input, rows, rows_per_expert, up, up_bias, down, down_bias, activation):
    """The kernel's function, one expert at a time on torch's products."""
    outputs = []
    for expert, expert_rows in enumerate(rows.split(rows_per_expert)):
        inner = F.linear(input[expert_rows], up[expert], None if up_bias is None else up_bias[expert])
        inner = ACTIVATIONS[activation](inner)
        outputs.append(F.linear(inner, down[expert], None if down_bias is None else down_bias[expert]))
    return torch.cat(outputs)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("hidden, intermediate", [(384, 1536), (40, 70)], ids=["issue-shapes", "odd-shapes"])
def test_kernel_matches_torch_products(threads, activation, with_bias, hidden, intermediate):
    generator = torch.Generator().manual_seed(0)
    up, up_bias, down, down_bias = expert_weights(len(ROWS_PER_EXPERT), hidden, intermediate, with_bias, generator)
    input = torch.randn(700, hidden, generator=generator)
    # Rows in any order, some read twice (top-k routing reads a token once per chosen expert).
    rows = torch.randint(0, input.shape[0], (sum(ROWS_PER_EXPERT),), generator=generator)

    output = torch.ops.switch_hf.expert_feed_forward(
        input, rows, ROWS_PER_EXPERT, up, up_bias, down, down_bias, activation
    )
    expected = torch_feed_forward(input, rows, ROWS_PER_EXPERT, up, up_bias, down, down_bias, activation)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routed", [700, 650], ids=["every-row", "some-rows-dropped"])
def test_kernel_gates_and_writes_back_in_row_order_for_top_1(threads, routed):
    generator = torch.Generator().manual_seed(0)
    hidden, intermediate = 40, 70
    up, up_bias, down, down_bias = expert_weights(len(ROWS_PER_EXPERT), hidden, intermediate, True, generator)
    input = torch.randn(700, hidden, generator=generator)
    rows_per_expert = [rows * routed // sum(ROWS_PER_EXPERT) for rows in ROWS_PER_EXPERT]
    rows_per_expert[-1] += routed - sum(rows_per_expert)
    rows = torch.randperm(input.shape[0], generator=generator)[:routed]  # top-1: each row at most once
    gate = torch.rand(routed, generator=generator)

    output = torch.ops.switch_hf.expert_feed_forward(
        input, rows, rows_per_expert, up, up_bias, down, down_bias, "gelu", gate
    )
    expected = torch.zeros_like(input)  # rows never routed (dropped) stay zero
    expected[rows] = gate[:, None] * torch_feed_forward(
        input, rows, rows_per_expert, up, up_bias, down, down_bias, "gelu"
    )
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_kernel_gelu_is_the_exact_gelu_over_a_wide_range():
    """With identity weights the network is the activation alone, so its accuracy is checked directly.

    Absolute, not relative, agreement: torch's float32 GELU forms 1 + erf(x / sqrt 2), which for negative x cancels
    to about 1e-7 absolute, so deep in the negative tail neither value is accurate relative to its tiny size.
    """
    width = 16
    eye = torch.eye(width).unsqueeze(0)
    input = torch.linspace(-12, 12, 4096 * width).reshape(-1, width)
    output = torch.ops.switch_hf.expert_feed_forward(
        input, torch.arange(input.shape[0]), [input.shape[0]], eye, None, eye, None, "gelu"
    )
    torch.testing.assert_close(output, F.gelu(input), rtol=0, atol=2e-6)


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
def test_kernel_activation_derivative_is_autograds_over_a_wide_range(activation):
    width = 16
    eye = torch.eye(width).unsqueeze(0)
    input = torch.linspace(-12, 12, 4096 * width).reshape(-1, width)  # 0 among them
    _, activated, activation_derivative = torch.ops.switch_hf.expert_feed_forward_with_inner(
        input, torch.arange(input.shape[0]), [input.shape[0]], eye, None, eye, None, activation
    )
    inner = input.clone().requires_grad_()
    ACTIVATIONS[activation](inner).backward(torch.ones_like(inner))
    torch.testing.assert_close(activated, ACTIVATIONS[activation](input), rtol=0, atol=2e-6)
    torch.testing.assert_close(activation_derivative, inner.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("hidden, intermediate", [(384, 1536), (40, 70)], ids=["issue-shapes", "odd-shapes"])
def test_kernel_with_inner_also_returns_the_inner_values(threads, activation, hidden, intermediate):
    generator = torch.Generator().manual_seed(0)
    up, up_bias, down, down_bias = expert_weights(len(ROWS_PER_EXPERT), hidden, intermediate, True, generator)
    input = torch.randn(700, hidden, generator=generator)
    rows = torch.randint(0, input.shape[0], (sum(ROWS_PER_EXPERT),), generator=generator)

    output, activated, activation_derivative = torch.ops.switch_hf.expert_feed_forward_with_inner(
        input, rows, ROWS_PER_EXPERT, up, up_bias, down, down_bias, activation
    )
    pre_activation = torch.cat(
        [
            F.linear(input[expert_rows], up[expert], up_bias[expert])
            for expert, expert_rows in enumerate(rows.split(ROWS_PER_EXPERT))
        ]
    ).requires_grad_()
    expected_activated = ACTIVATIONS[activation](pre_activation)
    expected_activated.backward(torch.ones_like(pre_activation))
    torch.testing.assert_close(activated, expected_activated.detach(), rtol=1e-5, atol=1e-5)
    # Away from ReLU's kink at 0, where rounding may put a pre-activation on either side.
    away_from_kink = pre_activation.detach().abs() > 1e-4
    torch.testing.assert_close(
        activation_derivative[away_from_kink], pre_activation.grad[away_from_kink], rtol=1e-5, atol=1e-5
    )
    expected = torch_feed_forward(input, rows, ROWS_PER_EXPERT, up, up_bias, down, down_bias, activation)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


# Experts of up to 512 rows run on the kernel's register tiles where the operands are float32 rows; larger ones (900),
# bfloat16 and strided rows on one BLAS product per expert.
EXPERT_PRODUCT_ROWS = pytest.mark.parametrize(
    "rows_per_expert",
    [ROWS_PER_EXPERT, [0, 3, 900, 2, 0], [512, 513, 1]],
    ids=["experts-split-between-threads", "one-expert-dominates", "either-side-of-the-kernel's-limit"],
)


@EXPERT_PRODUCT_ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 70 columns: a partial block of 64 and masked stores; 128: whole aligned vectors, streamed stores.
@pytest.mark.parametrize("out_features", [70, 128])
@pytest.mark.parametrize("stored", ["e-in-out", "e-out-in-transposed-view"])
def test_expert_matmul_matches_one_product_per_expert(threads, rows_per_expert, dtype, out_features, stored):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(sum(rows_per_expert), 40, generator=generator).to(dtype)
    if stored == "e-in-out":
        weight = torch.randn(len(rows_per_expert), 40, out_features, generator=generator).to(dtype)
    else:  # as `sorted_linear_backward` passes experts stored (e, in, out) for their input gradient
        weight = torch.randn(len(rows_per_expert), out_features, 40, generator=generator).to(dtype).transpose(1, 2)

    output = torch.ops.switch_hf.expert_matmul(input, weight, rows_per_expert)
    expected = torch.cat([rows @ weight[expert] for expert, rows in enumerate(input.split(rows_per_expert))])
    assert output.dtype == dtype
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@EXPERT_PRODUCT_ROWS
@pytest.mark.parametrize("stored", ["e-in-out", "e-out-in-transposed-view"])
def test_expert_matmul_with_scale_scales_each_result(threads, rows_per_expert, stored):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(sum(rows_per_expert), 40, generator=generator)
    if stored == "e-in-out":  # the kernel's tiles, up to 512 rows an expert
        weight = torch.randn(len(rows_per_expert), 40, 70, generator=generator)
    else:  # BLAS
        weight = torch.randn(len(rows_per_expert), 70, 40, generator=generator).transpose(1, 2)
    scale = torch.rand(sum(rows_per_expert), 70, generator=generator)

    output = torch.ops.switch_hf.expert_matmul(input, weight, rows_per_expert, scale)
    expected = torch.cat([rows @ weight[expert] for expert, rows in enumerate(input.split(rows_per_expert))])
    torch.testing.assert_close(output, expected * scale, rtol=1e-5, atol=1e-5)


@EXPERT_PRODUCT_ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Results of 40 x 70 (40 = 6 tiles of 6 rows and 4 rows alone; 70 columns: a partial block), 300 x 24 (whole tiles,
# less than one block) and 45 x 128 (whole aligned vectors, streamed stores).
@pytest.mark.parametrize("left_features, right_features", [(40, 70), (300, 24), (45, 128)])
@pytest.mark.parametrize("right_stored", ["rows", "transposed-view"])
def test_expert_outer_products_match_one_product_per_expert(
    threads, rows_per_expert, dtype, left_features, right_features, right_stored
):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(sum(rows_per_expert), left_features, generator=generator).to(dtype)
    if right_stored == "rows":
        right = torch.randn(sum(rows_per_expert), right_features, generator=generator).to(dtype)
    else:
        right = torch.randn(right_features, sum(rows_per_expert), generator=generator).to(dtype).t()

    output = torch.ops.switch_hf.expert_outer_products(left, right, rows_per_expert)
    expected = torch.stack(
        [a.double().t() @ b.double() for a, b in zip(left.split(rows_per_expert), right.split(rows_per_expert))]
    )  # an expert without rows: a product over no rows, zeros
    assert output.dtype == dtype and output.shape == (len(rows_per_expert), left_features, right_features)
    # Each result sums one expert's rows, up to 513 products of N(0, 1) values: in float32, the rounding of such a
    # sum grows with its length (one BLAS product per expert is off by 3.5e-5 at 513 rows, the kernel's sequential
    # sums by 8e-5).
    tolerance = dict(rtol=1e-5, atol=2e-7 * max(rows_per_expert)) if dtype == torch.float32 else {}
    torch.testing.assert_close(output, expected.to(dtype), **tolerance)


def test_no_rows_gives_an_empty_output():
    up, _, down, _ = expert_weights(3, 32, 48, False, torch.Generator().manual_seed(0))
    output = torch.ops.switch_hf.expert_feed_forward(
        torch.randn(5, 32), torch.empty(0, dtype=torch.long), [0, 0, 0], up, None, down, None, "gelu"
    )
    assert output.shape == (0, 32)


# --- where sorted_mm runs on it -------------------------------------------------------------------------------------


def kernel_calls(run, op: str = "expert_feed_forward") -> int:
    """How many times `run()` calls `torch.ops.switch_hf.<op>`."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    return sum(event.count for event in profiler.key_averages() if event.key == f"switch_hf::{op}")


@pytest.mark.parametrize("top_k", [1, 2])
def test_model_inference_runs_on_the_kernel_with_the_same_logits(top_k):
    model = SwitchForTokenReconstruction(tiny_config(top_k=top_k, capacity_factor_eval=None)).eval()
    input_ids = torch.randint(1, TINY_VOCAB, (3, 40))
    with torch.no_grad():
        assert kernel_calls(lambda: model(input_ids=input_ids)) == model.config.num_switch_layers
        on_kernel = model(input_ids=input_ids).logits
        modeling_switch.use_expert_kernel = False
        try:
            assert kernel_calls(lambda: model(input_ids=input_ids)) == 0
            on_torch = model(input_ids=input_ids).logits
        finally:
            modeling_switch.use_expert_kernel = True
    torch.testing.assert_close(on_kernel, on_torch, rtol=1e-5, atol=1e-5)


def training_step(model, input_ids, labels):
    torch.manual_seed(1)  # the same dropout masks in every step
    model.zero_grad()
    output = model(input_ids=input_ids, labels=labels)
    output.loss.backward()
    return output.loss.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_model_training_runs_its_forward_on_the_kernel_with_the_same_loss_and_gradients(top_k, activation):
    torch.manual_seed(0)
    config = tiny_config(top_k=top_k, expert_hidden_act=activation, capacity_factor=1.0)
    model = SwitchForTokenReconstruction(config).train()
    input_ids = torch.randint(1, TINY_VOCAB, (3, 40))
    labels = torch.where(torch.rand(input_ids.shape) < 0.3, input_ids, -100)

    steps = []

    def run_step():
        steps.append(training_step(model, input_ids, labels))

    assert kernel_calls(run_step, "expert_feed_forward_with_inner") == config.num_switch_layers
    loss, gradients = steps[0]
    modeling_switch.use_expert_kernel = False
    try:
        expected_loss, expected_gradients = training_step(model, input_ids, labels)
    finally:
        modeling_switch.use_expert_kernel = True
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-5, atol=1e-5, msg=name)
    expert_gradient = gradients["model.layers.0.moe.experts.up_proj"]
    assert expert_gradient.abs().sum() > 0


# Experts of few rows, and one over the 512 rows up to which the backward's products run on the kernel's tiles.
@pytest.mark.parametrize("rows_per_expert", [[100, 0, 60, 90], [300, 0, 600, 250]])
def test_training_runs_on_the_kernel_with_torch_products_gradients(rows_per_expert):
    experts = SwitchExperts(tiny_config())
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    rows = torch.randn(sum(rows_per_expert), experts.up_proj.shape[2], requires_grad=True)

    def forward_and_backward():
        for tensor in [rows, *experts.parameters()]:
            tensor.grad = None
        modeling_switch.sorted_experts_feed_forward(experts, rows, rows_per_expert).square().sum().backward()
        return [tensor.grad for tensor in [rows, *experts.parameters()]]

    assert kernel_calls(forward_and_backward, "expert_feed_forward_with_inner") == 1
    on_kernel = forward_and_backward()
    modeling_switch.use_expert_kernel = False
    try:
        assert kernel_calls(forward_and_backward, "expert_feed_forward_with_inner") == 0
        expected = forward_and_backward()
    finally:
        modeling_switch.use_expert_kernel = True
    for gradient, expected_gradient in zip(on_kernel, expected):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-5)


def test_kernel_is_not_used_where_it_cannot_run():
    config = tiny_config(expert_dropout=0.1)
    experts = SwitchExperts(config).eval()
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    rows = torch.randn(10, config.hidden_size)

    assert _expert_kernel_runs(experts, rows)
    assert _needs_gradients(experts, rows)  # then the forward returns what the backward needs
    with torch.no_grad():
        assert not _needs_gradients(experts, rows)
    assert not _expert_kernel_runs(experts, rows.double())  # float32 only
    assert not _expert_kernel_runs(experts.train(), rows)  # expert dropout active
    experts.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _expert_kernel_runs(experts, rows)  # autocast's precision, not the kernel's float32
    experts.up_proj = torch.nn.Parameter(experts.up_proj.transpose(1, 2).contiguous().transpose(1, 2))
    assert not _expert_kernel_runs(experts, rows)  # weights not laid out as the kernel reads them
    assert not _expert_kernel_runs(SwitchExperts(tiny_config(expert_hidden_act="silu")), rows)
    mixtral = MixtralExperts(MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4))
    assert not _expert_kernel_runs(mixtral, rows)  # gated experts


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input=torch.randn(6, 16)), "input must have 32 features"),
        (dict(input=torch.randn(6, 32).double()), "input must be float32"),
        (dict(input=torch.randn(32, 6).t()), "input must be contiguous"),
        (dict(down=torch.randn(3, 32, 40)), r"down must be \(3, 32, 48\)"),
        (dict(up_bias=torch.randn(3, 32)), r"up_bias must be \(3, 48\)"),
        (dict(rows_per_expert=[2, 2]), "rows_per_expert must have 3 entries"),
        (dict(rows_per_expert=[2, 2, 1]), r"row_index must have sum\(rows_per_expert\) = 5 entries"),
        (dict(rows_per_expert=[-1, 4, 3]), "rows_per_expert must not be negative"),
        (dict(row_index=torch.tensor([0, 1, 2, 3, 4, 6])), r"row_index must lie in \[0, 6\)"),
        (dict(row_index=torch.arange(6).int()), "row_index must be a contiguous 1-D int64 tensor"),
        (dict(activation="silu"), "activation must be one of 'gelu', 'relu', 'identity', got 'silu'"),
        (dict(gate=torch.rand(5)), r"gate must have 6 entries \(one per row\)"),
        (dict(gate=torch.rand(6), row_index=torch.tensor([0, 1, 2, 3, 4, 4])), "row_index must not repeat a row"),
    ],
)
def test_kernel_rejects_bad_input_naming_the_argument(change, message):
    up, up_bias, down, down_bias = expert_weights(3, 32, 48, True, torch.Generator().manual_seed(0))
    arguments = dict(
        input=torch.randn(6, 32), row_index=torch.arange(6), rows_per_expert=[2, 2, 2], up=up, up_bias=up_bias,
        down=down, down_bias=down_bias, activation="gelu", gate=None,
    )  # fmt: skip
    arguments.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.switch_hf.expert_feed_forward(*arguments.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(input=torch.randn(6, 5)), r"weight must be \(e, 5, out\)"),
        (dict(input=torch.randn(6, 4).double()), "input and weight must have one dtype"),
        (dict(rows_per_expert=[2, 4]), "rows_per_expert must have 3 entries"),
        (dict(rows_per_expert=[3, 4, -1]), "rows_per_expert must not be negative"),
        (dict(rows_per_expert=[2, 2, 1]), r"input must have sum\(rows_per_expert\) = 5 rows"),
        (dict(scale=torch.randn(6, 4)), r"expert_matmul: scale must be \(6, 5\), got \[6, 4\]"),
        (dict(scale=torch.randn(6, 5).double()), "expert_matmul: scale must be float32"),
        (dict(scale=torch.randn(5, 6).t()), "expert_matmul: scale must be contiguous"),
        (
            dict(input=torch.randn(6, 4).bfloat16(), weight=torch.randn(3, 4, 5).bfloat16(), scale=torch.randn(6, 5)),
            "expert_matmul: scale needs float32 input, got BFloat16",
        ),
    ],
)
def test_expert_matmul_rejects_bad_input_naming_the_argument(change, message):
    arguments = dict(
        input=torch.randn(6, 4), weight=torch.randn(3, 4, 5), rows_per_expert=[2, 2, 2], scale=None
    )
    arguments.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.switch_hf.expert_matmul(*arguments.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(left=torch.randn(6)), "left and right must be 2-D"),
        (dict(left=torch.randn(6, 4).double()), "left and right must have one dtype"),
        (dict(rows_per_expert=[3, 4, -1]), "rows_per_expert must not be negative"),
        (dict(rows_per_expert=[2, 2, 1]), r"left and right must have sum\(rows_per_expert\) = 5 rows"),
    ],
)
def test_expert_outer_products_reject_bad_input_naming_the_argument(change, message):
    arguments = dict(left=torch.randn(6, 4), right=torch.randn(6, 5), rows_per_expert=[2, 2, 2])
    arguments.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.switch_hf.expert_outer_products(*arguments.values())


# --- without it -----------------------------------------------------------------------------------------------------


def test_switched_off_the_kernel_is_not_built_and_models_run_on_torch_products():
    code = """
import logging, torch
logging.basicConfig(level=logging.INFO)
import switch_hf
from conftest import tiny_config
assert not switch_hf.expert_kernel.is_registered()
model = switch_hf.SwitchForTokenReconstruction(tiny_config()).eval()
with torch.no_grad():
    print(tuple(model(input_ids=torch.randint(1, 100, (2, 9))).logits.shape))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT / "tests",
        env={**os.environ, expert_kernel.ENVIRONMENT_SWITCH: "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2, 9, 120)" in result.stdout
    assert "expert kernel is not used (SWITCH_HF_EXPERT_KERNEL=0)" in result.stderr
