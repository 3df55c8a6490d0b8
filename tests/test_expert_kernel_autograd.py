"""switch_hf's kernel ops under autograd and tracing: no path of `sorted_mm` drops a gradient (the routers' among them),
each op's registered autograd formula against autograd through torch's products, and `torch.library.opcheck`.

These run everywhere: on the real kernel where it is built (AVX-512 CPUs), elsewhere on its pure-torch twin
(`expert_kernel_reference.py`), registered under the same schemas with the same formulas and fake kernels.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import expert_kernel_reference as reference
from switch_hf import SwitchForTokenReconstruction, expert_kernel, modeling_switch
from switch_hf.modeling_switch import SwitchExperts, _expert_kernel_runs

from conftest import TINY_VOCAB, tiny_config


@pytest.fixture
def kernel_ops():
    """`torch.ops.switch_hf`: the built kernel's ops where they are registered, else the pure-torch twin's, removed
    again after the test."""
    if expert_kernel.is_registered():
        yield torch.ops.switch_hf
        return
    with reference.reference_ops() as ops:
        yield ops


def kernel_calls(run, op: str) -> int:
    """How many times `run()` calls `torch.ops.switch_hf.<op>`."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    return sum(event.count for event in profiler.key_averages() if event.key == f"switch_hf::{op}")


def assert_gradients_close(actual, expected, names, **tolerance):
    for name, gradient, expected_gradient in zip(names, actual, expected):
        assert (gradient is None) == (expected_gradient is None), name
        if expected_gradient is not None:
            torch.testing.assert_close(gradient, expected_gradient, msg=name, **tolerance)


# --- no path drops a gradient ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [1.0, None], ids=["dropping", "dropless"])
def test_routers_alone_learn_on_the_kernel_as_in_eager(kernel_ops, top_k, capacity_factor):
    """Frozen backbone and experts, a given input: only the routers train. Without aux losses, their gradient from
    the loss comes through the gates alone, which the fused top-1 combine must not swallow."""
    torch.manual_seed(0)
    config = tiny_config(
        top_k=top_k, capacity_factor_train=capacity_factor, router_jitter_noise=0.0, hidden_dropout_prob=0.0,
        router_aux_loss_coef=0.0, router_z_loss_coef=0.0,
    )  # fmt: skip
    model = SwitchForTokenReconstruction(config).train()
    model.requires_grad_(False)
    routers = [layer.moe.router.weight for layer in model.model.layers]
    for router in routers:
        torch.nn.init.normal_(router, std=1.0)  # confident: some experts get many tokens, some none
        router.requires_grad_(True)
    hidden_states = torch.randn(3, 11, config.hidden_size)
    labels = torch.randint(1, TINY_VOCAB, (3, 11))

    def router_gradients(implementation):
        model.set_experts_implementation(implementation)
        for router in routers:
            router.grad = None
        model(backbone_hidden_states=hidden_states, labels=labels).loss.backward()
        return [router.grad for router in routers]

    experts = model.model.layers[0].moe.experts
    assert _expert_kernel_runs(experts, hidden_states.view(-1, config.hidden_size))
    assert kernel_calls(lambda: router_gradients("sorted_mm"), "expert_feed_forward") >= 1
    on_kernel = router_gradients("sorted_mm")
    expected = router_gradients("eager")
    for index, (gradient, expected_gradient) in enumerate(zip(on_kernel, expected)):
        assert gradient is not None and gradient.abs().sum() > 0, f"router {index} got no gradient"
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-6, msg=f"router {index}")


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(
    "trained",
    [("gates",), ("rows",), ("weights",), ("rows", "gates"), ("rows", "weights", "gates")],
    ids=lambda trained: "+".join(trained),
)
def test_every_kernel_path_of_sorted_mm_gives_eagers_gradients(kernel_ops, top_k, trained):
    config = tiny_config(num_experts=4)
    experts = SwitchExperts(config).eval()
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
        parameter.requires_grad_("weights" in trained)
    rows = torch.randn(12, config.hidden_size, requires_grad="rows" in trained)
    index = torch.stack([torch.randperm(4)[:top_k] for _ in range(12)])  # (12, k) distinct experts per row
    index[3] = 7  # another rank's expert: skipped
    gates = torch.rand(12, top_k, requires_grad="gates" in trained)
    assert _expert_kernel_runs(experts, rows)

    def output_and_gradients(implementation):
        config._experts_implementation = implementation
        tensors = [rows, gates, *experts.parameters()]
        output = experts(rows, index, gates)
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
        needed = [tensor for tensor in tensors if tensor.requires_grad]
        gradients = iter(torch.autograd.grad(output, needed, grad_output))
        return output.detach(), [next(gradients) if tensor.requires_grad else None for tensor in tensors]

    output, gradients = output_and_gradients("sorted_mm")
    expected_output, expected_gradients = output_and_gradients("eager")
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-5)
    names = ["rows", "gates", *(name for name, _ in experts.named_parameters())]
    assert_gradients_close(gradients, expected_gradients, names, rtol=1e-5, atol=1e-5)


# --- each op's formula against autograd through torch's products ---------------------------------------------------

ROWS_PER_EXPERT = [3, 0, 5, 1, 7]  # an expert without rows among them
HIDDEN, INTERMEDIATE = 16, 24
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32: the kernel sums in its own order


def feed_forward_arguments(activation, with_bias, gated, generator):
    """The arguments of `expert_feed_forward` (with `gate` last), every float tensor a leaf that requires grad."""
    num_experts, num_rows = len(ROWS_PER_EXPERT), sum(ROWS_PER_EXPERT)

    def leaf(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).requires_grad_()

    input = leaf(20, HIDDEN)
    # Top-1 with a gate: each input row at most once, some never. Otherwise rows may repeat (top-k).
    if gated:
        row_index = torch.randperm(20, generator=generator)[:num_rows]
    else:
        row_index = torch.randint(0, 20, (num_rows,), generator=generator)
    up, down = leaf(num_experts, INTERMEDIATE, HIDDEN, std=HIDDEN**-0.5), leaf(num_experts, HIDDEN, INTERMEDIATE)
    up_bias = leaf(num_experts, INTERMEDIATE, std=0.1) if with_bias else None
    down_bias = leaf(num_experts, HIDDEN, std=0.1) if with_bias else None
    gate = torch.rand(num_rows, generator=generator).requires_grad_() if gated else None
    return [input, row_index, ROWS_PER_EXPERT, up, up_bias, down, down_bias, activation, gate]


def run_with_gradients(function, arguments):
    """`function(*arguments)`'s (first) output, and the gradient of each argument that requires grad for a fixed
    random gradient of that output (None for the other arguments)."""
    output = function(*arguments)
    output = output[0] if isinstance(output, tuple) else output
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    positions = [
        position
        for position, argument in enumerate(arguments)
        if isinstance(argument, torch.Tensor) and argument.requires_grad
    ]
    gradients = dict(zip(positions, torch.autograd.grad(output, [arguments[i] for i in positions], grad_output)))
    return output.detach(), [gradients.get(i) for i in range(len(arguments))]


FEED_FORWARD_NAMES = [
    "input", "row_index", "rows_per_expert", "up", "up_bias", "down", "down_bias", "activation", "gate"
]  # fmt: skip


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated-top-1"])
def test_expert_feed_forward_gradients_match_torchs(kernel_ops, activation, with_bias, gated):
    """The inference op's formula runs the forward again; with a gate it also gives the gate its gradient."""
    arguments = feed_forward_arguments(activation, with_bias, gated, torch.Generator().manual_seed(0))
    output, gradients = run_with_gradients(kernel_ops.expert_feed_forward, arguments)
    expected_output, expected_gradients = run_with_gradients(reference.expert_feed_forward, arguments)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    assert_gradients_close(gradients, expected_gradients, FEED_FORWARD_NAMES, **TOLERANCE)


@pytest.mark.parametrize("trained", ["gate", "input", "up_bias"])
def test_expert_feed_forward_gives_a_gradient_to_whichever_input_alone_needs_it(kernel_ops, trained):
    """Training the router alone: only the gate requires grad, as in a frozen model."""
    arguments = feed_forward_arguments("gelu", True, True, torch.Generator().manual_seed(0))
    arguments = [
        argument.detach().requires_grad_(name == trained) if isinstance(argument, torch.Tensor) else argument
        for name, argument in zip(FEED_FORWARD_NAMES, arguments)
    ]
    output, gradients = run_with_gradients(kernel_ops.expert_feed_forward, arguments)
    _, expected_gradients = run_with_gradients(reference.expert_feed_forward, arguments)
    assert gradients[FEED_FORWARD_NAMES.index(trained)].abs().sum() > 0
    assert_gradients_close(gradients, expected_gradients, FEED_FORWARD_NAMES, **TOLERANCE)


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_expert_feed_forward_with_inner_gradients_match_torchs(kernel_ops, activation, with_bias):
    """The forward of training: its backward reads the inner values it returned, which are not differentiable."""
    arguments = feed_forward_arguments(activation, with_bias, False, torch.Generator().manual_seed(0))[:-1]
    output, gradients = run_with_gradients(kernel_ops.expert_feed_forward_with_inner, arguments)
    expected_output, expected_gradients = run_with_gradients(reference.expert_feed_forward_with_inner, arguments)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    assert_gradients_close(gradients, expected_gradients, FEED_FORWARD_NAMES, **TOLERANCE)

    _, activated, activation_derivative = kernel_ops.expert_feed_forward_with_inner(*arguments)
    assert not activated.requires_grad and not activation_derivative.requires_grad
    _, expected_activated, expected_derivative = reference.expert_feed_forward_with_inner(*arguments)
    torch.testing.assert_close(activated, expected_activated.detach(), **TOLERANCE)
    torch.testing.assert_close(activation_derivative, expected_derivative, **TOLERANCE)


def matmul_arguments(with_scale, stored, generator):
    num_experts, num_rows = len(ROWS_PER_EXPERT), sum(ROWS_PER_EXPERT)
    input = torch.randn(num_rows, 12, generator=generator).requires_grad_()
    if stored == "e-in-out":
        weight = torch.randn(num_experts, 12, 10, generator=generator).requires_grad_()
    else:  # as the backward passes weights stored (e, out, in): a transposed view
        weight = torch.randn(num_experts, 10, 12, generator=generator).requires_grad_().transpose(1, 2)
    scale = torch.rand(num_rows, 10, generator=generator).requires_grad_() if with_scale else None
    return [input, weight, ROWS_PER_EXPERT, scale]


@pytest.mark.parametrize("with_scale", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("stored", ["e-in-out", "e-out-in-transposed-view"])
def test_expert_matmul_gradients_match_torchs(kernel_ops, with_scale, stored):
    arguments = matmul_arguments(with_scale, stored, torch.Generator().manual_seed(0))
    output, gradients = run_with_gradients(kernel_ops.expert_matmul, arguments)
    expected_output, expected_gradients = run_with_gradients(reference.expert_matmul, arguments)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    assert_gradients_close(gradients, expected_gradients, ["input", "weight", "rows_per_expert", "scale"], **TOLERANCE)


def outer_products_arguments(right_stored, generator):
    num_rows = sum(ROWS_PER_EXPERT)
    left = torch.randn(num_rows, 9, generator=generator).requires_grad_()
    if right_stored == "rows":
        right = torch.randn(num_rows, 14, generator=generator).requires_grad_()
    else:
        right = torch.randn(14, num_rows, generator=generator).requires_grad_().t()
    return [left, right, ROWS_PER_EXPERT]


@pytest.mark.parametrize("right_stored", ["rows", "transposed-view"])
def test_expert_outer_products_gradients_match_torchs(kernel_ops, right_stored):
    arguments = outer_products_arguments(right_stored, torch.Generator().manual_seed(0))
    output, gradients = run_with_gradients(kernel_ops.expert_outer_products, arguments)
    expected_output, expected_gradients = run_with_gradients(reference.expert_outer_products, arguments)
    torch.testing.assert_close(output, expected_output, **TOLERANCE)
    assert_gradients_close(gradients, expected_gradients, ["left", "right", "rows_per_expert"], **TOLERANCE)


@pytest.mark.parametrize("op", ["expert_matmul", "expert_outer_products"])
def test_the_backwards_products_differentiate_twice_as_torchs(kernel_ops, op):
    """The products the backward runs on have formulas made of themselves, hence second derivatives."""
    generator = torch.Generator().manual_seed(0)
    if op == "expert_matmul":
        arguments = matmul_arguments(True, "e-in-out", generator)
    else:
        arguments = outer_products_arguments("rows", generator)
    leaves = [argument for argument in arguments if isinstance(argument, torch.Tensor)]

    def second_order_gradients(function):
        output = function(*arguments)
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
        first = torch.autograd.grad(output, leaves, grad_output, create_graph=True)
        return torch.autograd.grad(sum(gradient.square().sum() for gradient in first), leaves)

    gradients = second_order_gradients(getattr(kernel_ops, op))
    expected_gradients = second_order_gradients(getattr(reference, op))
    assert_gradients_close(gradients, expected_gradients, [f"argument {i}" for i in range(len(leaves))], **TOLERANCE)


@pytest.mark.parametrize("op", ["expert_feed_forward", "expert_feed_forward_with_inner"])
def test_the_feed_forward_ops_refuse_a_second_derivative_rather_than_give_a_wrong_one(kernel_ops, op):
    arguments = feed_forward_arguments("gelu", True, op == "expert_feed_forward", torch.Generator().manual_seed(0))
    arguments = arguments if op == "expert_feed_forward" else arguments[:-1]
    output = getattr(kernel_ops, op)(*arguments)
    output = output[0] if isinstance(output, tuple) else output
    with pytest.raises(RuntimeError, match=f"switch_hf::{op} has no second derivative.*use_expert_kernel = False"):
        torch.autograd.grad(output.square().sum(), arguments[0], create_graph=True)
    (gradient,) = torch.autograd.grad(output.square().sum(), arguments[0])  # a first derivative still works
    assert gradient.abs().sum() > 0


# --- registration ---------------------------------------------------------------------------------------------------


def opcheck_cases():
    generator = torch.Generator().manual_seed(0)
    gated = feed_forward_arguments("gelu", True, True, generator)
    ungated = feed_forward_arguments("relu", False, False, generator)
    return {
        "expert_feed_forward-gated": ("expert_feed_forward", gated),
        "expert_feed_forward-ungated": ("expert_feed_forward", ungated[:-1]),
        "expert_feed_forward_with_inner": ("expert_feed_forward_with_inner", ungated[:-1]),
        "expert_matmul-scaled": ("expert_matmul", matmul_arguments(True, "e-in-out", generator)),
        "expert_matmul-transposed-weight": ("expert_matmul", matmul_arguments(False, "transposed-view", generator)),
        "expert_outer_products": ("expert_outer_products", outer_products_arguments("transposed-view", generator)),
    }


@pytest.mark.parametrize("case", list(opcheck_cases()))
def test_each_op_passes_torchs_opcheck(kernel_ops, case):
    """Schema (no mutation, no aliasing), an autograd registration, a fake kernel that agrees with the op on shapes,
    strides and dtypes, and tracing by AOTAutograd with dynamic shapes, its gradients included."""
    name, arguments = opcheck_cases()[case]
    torch.library.opcheck(getattr(kernel_ops, name).default, tuple(arguments))


def test_the_ops_have_the_schemas_of_the_cpp_file(kernel_ops):
    for schema in reference.kernel_schemas():
        name = schema.split("(")[0]
        assert str(getattr(kernel_ops, name).default._schema) == f"switch_hf::{schema}"


@pytest.mark.skipif(expert_kernel.is_registered(), reason="the twin is registered only where the kernel is not built")
def test_the_twin_leaves_no_op_behind():
    experts = SwitchExperts(tiny_config())
    rows = torch.randn(4, experts.up_proj.shape[2])
    for _ in range(2):  # registers again after removal
        with reference.reference_ops():
            assert expert_kernel.is_registered() and _expert_kernel_runs(experts, rows)
        assert not expert_kernel.is_registered() and not _expert_kernel_runs(experts, rows)
    assert modeling_switch.use_expert_kernel
