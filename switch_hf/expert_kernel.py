"""The fused CPU kernel for the experts' feed-forward networks (`expert_kernel.cpp`), built on first import.

`sorted_mm` runs each expert as two BLAS products. Where this kernel is registered, it runs the forward of every
expert's whole network in one call instead: per tile of an expert's rows, gather, both products, bias and activation,
with the tile's activations kept in cache and the weights read as stored (no per-call packing); in training it also
returns the inner values the backward needs, whose per-expert products it runs on register tiles of its own, split
between threads, the weight gradients streamed to memory. docs/benchmarks.md has the measurements.

`load()` compiles it with the machine's C++ compiler through `torch.utils.cpp_extension` (10-20 s, once per machine,
source and torch installation, announced by one line on stderr: the build is cached in torch's extensions directory,
`$TORCH_EXTENSIONS_DIR` or `~/.cache/torch_extensions`), which registers the ops
`torch.ops.switch_hf.expert_feed_forward`, `expert_feed_forward_with_inner`, `expert_matmul` and
`expert_outer_products`. `modeling_switch` looks them up and falls back to torch's products where they are missing,
for instance when a checkpoint is loaded with `trust_remote_code` alone. Set `SWITCH_HF_EXPERT_KERNEL=0` to never
build or use it.

The C++ file defines the ops and their CPU kernels; `register_formulas` gives each op its autograd formula and its fake
kernel through `torch.library`, right after the build: every op is then differentiable in every input it is
differentiable in (no call drops a gradient, whichever op the experts take), and traceable by `torch.compile`.
"""

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("expert_kernel.cpp")
ENVIRONMENT_SWITCH = "SWITCH_HF_EXPERT_KERNEL"
# The AVX-512 subsets torch requires for its own AVX512 kernels, not -march=native: a cached build must run on any
# machine torch reports AVX512 on. -fopenmp compiles at::parallel_for's parallel region, which runs on torch's own
# OpenMP runtime (the same libgomp.so.1, already loaded).
COMPILER_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp"]


def is_registered() -> bool:
    return hasattr(torch.ops.switch_hf, "expert_feed_forward")


def unavailable_reason() -> tuple[str, int] | None:
    """Why the kernel is not built here, with the level to log it at (a choice or this CPU: info; else a warning)."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
        return f"{ENVIRONMENT_SWITCH}=0", logging.INFO
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU lacks AVX-512 (torch reports {capability})", logging.INFO
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++, or $CXX) on PATH", logging.WARNING
    return None


def load() -> bool:
    """Builds (once) and registers the kernel; True if `torch.ops.switch_hf.expert_feed_forward` is then available.

    Never raises: where the kernel cannot be built, it logs why and `sorted_mm` keeps using torch's products.
    """
    if is_registered():
        return True
    reason = unavailable_reason()
    if reason is None:
        try:
            _build(build_name())
            register_formulas()
        except Exception as error:  # a failed build must not stop the model: torch's products still work
            reason = f"building or registering it failed: {error}", logging.WARNING
    if reason is not None:
        message, level = reason
        logger.log(level, "switch_hf's expert kernel is not used (%s); experts run on torch's matrix products", message)
        return False
    return is_registered()


def build_name() -> str:
    """The build's name, by which torch keys its cache directory: one per source, flags and torch installation, so
    that virtual environments sharing the cache keep their own builds instead of rebuilding over each other's."""
    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (*COMPILER_FLAGS, torch.__version__, str(Path(torch.__file__).resolve().parent)):
        key.update(part.encode())
    return f"switch_hf_expert_kernel_{key.hexdigest()[:16]}"


def _build(name: str):
    # Importing the builder warns "No CUDA runtime is found" where a CUDA toolkit is installed without a GPU:
    # irrelevant to a CPU kernel, so it is kept out of every import of switch_hf.
    builder_logger = logging.getLogger("torch.utils.cpp_extension")
    level = builder_logger.level
    builder_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as build
    finally:
        builder_logger.setLevel(level)

    build_directory = Path(_get_build_directory(name, verbose=False))
    if not (build_directory / f"{name}.so").is_file():
        # A compile is a pause of 10-20 s on an import that is otherwise quick: say what it is, once.
        print(f"switch_hf: building the experts' CPU kernel for this installation (once, 10-20 s) in {build_directory}",
              file=sys.stderr, flush=True)

    # torch's builder runs `ninja` from PATH; the `ninja` package installs it next to this Python, which may not be
    # on PATH when the virtual environment is not activated.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        build(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=COMPILER_FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


# --- autograd formulas and fake kernels -----------------------------------------------------------------------------
#
# Index letters: n sorted rows (the (row, expert) pairs that run, grouped by expert), t input rows, e experts,
# h hidden, i intermediate. The formulas call the ops themselves, so that the backward runs on the kernel too.


def register_formulas(lib: torch.library.Library | None = None) -> None:
    """Registers the autograd formula and the fake kernel of each `switch_hf` op (`torch.library`).

    Args:
        lib: the library that holds the registrations, which end when it is destroyed; None: they last as long as the
            process, as the ops loaded from the build do.
    """
    for name, (fake, setup_context, backward) in _FORMULAS.items():
        torch.library.register_fake(f"switch_hf::{name}", fake, lib=lib)
        torch.library.register_autograd(f"switch_hf::{name}", backward, setup_context=setup_context, lib=lib)


def _sum_per_expert(rows: torch.Tensor, rows_per_expert: list[int]) -> torch.Tensor:
    """(n, f) rows sorted by expert -> (e, f) each expert's sum, zero for an expert without rows: a bias gradient."""
    return torch.stack([expert_rows.sum(dim=0) for expert_rows in rows.split(rows_per_expert)])


def _refuse_double_backward(op: str, *tensors: torch.Tensor | None) -> None:
    """A backward that runs with autograd on (`create_graph=True`) and inputs that require gradients would be
    differentiated again, through inner values these formulas read as constants: refuse, rather than return wrong
    second derivatives."""
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors):
        raise RuntimeError(
            f"switch_hf::{op} has no second derivative (its backward reads the inner activations as constants). "
            "Run the experts on torch's products where you differentiate twice: set "
            f"switch_hf.modeling_switch.use_expert_kernel = False, or {ENVIRONMENT_SWITCH}=0 before importing "
            "switch_hf."
        )


def _experts_backward(
    input, row_index, rows_per_expert, up, down, activated, activation_derivative, grad_output, needs_grad
):
    """The gradients of the experts' networks, given the gradient of their ungated outputs (n, h) in sorted order.

    Each product runs on the kernel's per-expert products: `expert_outer_products` for the weight gradients and
    `expert_matmul`, scaled by the activation's derivatives, for the gradient through `down` and the activation.

    Args:
        needs_grad: whether `input`, `up`, its bias, `down` and its bias need their gradients (the feed-forward ops'
            arguments 0 and 3 to 6).
    Returns:
        The gradients of `input` (t, h), `up`, its bias, `down` and its bias; None where not needed.
    """
    needs_input_grad, needs_up_grad, needs_up_bias_grad, needs_down_grad, needs_down_bias_grad = needs_grad
    ops = torch.ops.switch_hf
    grad_output = grad_output.contiguous()  # (n, h)
    grad_down = ops.expert_outer_products(grad_output, activated, rows_per_expert) if needs_down_grad else None
    grad_down_bias = _sum_per_expert(grad_output, rows_per_expert) if needs_down_bias_grad else None
    grad_input = grad_up = grad_up_bias = None
    if needs_input_grad or needs_up_grad or needs_up_bias_grad:
        # The gradient through `down`, then through the activation: the gradient of the activation's input (n, i).
        grad_inner = ops.expert_matmul(grad_output, down, rows_per_expert, activation_derivative)
        if needs_up_grad:
            grad_up = ops.expert_outer_products(grad_inner, input.index_select(0, row_index), rows_per_expert)
        if needs_up_bias_grad:
            grad_up_bias = _sum_per_expert(grad_inner, rows_per_expert)
        if needs_input_grad:  # the sorted rows' gradients, summed into the rows they were read from
            grad_rows = ops.expert_matmul(grad_inner, up, rows_per_expert)  # (n, h)
            grad_input = torch.zeros_like(input).index_add_(0, row_index, grad_rows)
    return grad_input, grad_up, grad_up_bias, grad_down, grad_down_bias


def _check_feed_forward_shapes(input, row_index, rows_per_expert, up, down) -> None:
    """The shape checks of the C++ ops, for the fake kernels: a traced call fails where the real one would."""
    shapes = f"input {tuple(input.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}"
    torch._check(input.dim() == 2 and up.dim() == 3 and down.dim() == 3, lambda: f"expert_feed_forward: {shapes}")
    torch._check(input.shape[1] == up.shape[2], lambda: f"expert_feed_forward: input must have {up.shape[2]} features")
    torch._check(
        len(rows_per_expert) == up.shape[0],
        lambda: f"expert_feed_forward: rows_per_expert must have {up.shape[0]} entries, got {len(rows_per_expert)}",
    )
    torch._check(
        row_index.dim() == 1 and row_index.shape[0] == sum(rows_per_expert),
        lambda: "expert_feed_forward: row_index must have sum(rows_per_expert) entries",
    )


# expert_feed_forward(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation, gate=None)


def _feed_forward_fake(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation, gate=None):
    _check_feed_forward_shapes(input, row_index, rows_per_expert, up, down)
    if gate is not None:  # gated and written back to the input's rows: (t, h)
        return input.new_empty(input.shape)
    return input.new_empty(sum(rows_per_expert), input.shape[1])  # (n, h)


def _feed_forward_setup_context(ctx, inputs, output):
    input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation, gate = inputs
    ctx.rows_per_expert, ctx.activation = rows_per_expert, activation
    ctx.save_for_backward(input, row_index, up, up_bias, down, down_bias, gate)


def _feed_forward_backward(ctx, grad_output):
    """The backward of `expert_feed_forward`, the inference op, which keeps none of the inner values: it runs the
    forward again, on `expert_feed_forward_with_inner` where a weight or the input needs its gradient (then as
    `expert_feed_forward_with_inner`'s backward), else on the op itself for the ungated outputs the gate's gradient
    reads. Training that differentiates the experts runs `expert_feed_forward_with_inner` in its forward instead and
    saves this second pass.

    With `gate`, each output was scaled by its gate and written to its input row: each sorted row's gradient is read
    back from its input row, and the gate's gradient is the dot product of that gradient with the ungated output.
    """
    input, row_index, up, up_bias, down, down_bias, gate = ctx.saved_tensors
    rows_per_expert, activation = ctx.rows_per_expert, ctx.activation
    needs_experts_grads = [ctx.needs_input_grad[index] for index in (0, 3, 4, 5, 6)]
    needs_gate_grad = gate is not None and ctx.needs_input_grad[8]  # a gate left out is not among the inputs
    _refuse_double_backward("expert_feed_forward", grad_output, input, up, up_bias, down, down_bias, gate)
    ops = torch.ops.switch_hf
    if any(needs_experts_grads):
        output, activated, activation_derivative = ops.expert_feed_forward_with_inner(
            input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation
        )  # (n, h), (n, i), (n, i)
    else:
        output = ops.expert_feed_forward(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation)

    grad_gate = None
    grad_sorted = grad_output  # (n, h) the gradient of the ungated outputs
    if gate is not None:
        grad_sorted = grad_output.index_select(0, row_index)  # each sorted row's gradient, read from its input row
        if needs_gate_grad:
            grad_gate = (grad_sorted * output).sum(dim=1)  # (n,)
        grad_sorted = grad_sorted * gate.unsqueeze(1)
    grad_input = grad_up = grad_up_bias = grad_down = grad_down_bias = None
    if any(needs_experts_grads):
        grad_input, grad_up, grad_up_bias, grad_down, grad_down_bias = _experts_backward(
            input, row_index, rows_per_expert, up, down, activated, activation_derivative, grad_sorted,
            needs_experts_grads,
        )  # fmt: skip
    return grad_input, None, None, grad_up, grad_up_bias, grad_down, grad_down_bias, None, grad_gate


# expert_feed_forward_with_inner(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation)
#   -> (output, activated, activation_derivative)


def _feed_forward_with_inner_fake(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation):
    _check_feed_forward_shapes(input, row_index, rows_per_expert, up, down)
    num_rows = sum(rows_per_expert)
    return (
        input.new_empty(num_rows, input.shape[1]),  # (n, h)
        input.new_empty(num_rows, up.shape[1]),  # (n, i)
        input.new_empty(num_rows, up.shape[1]),  # (n, i)
    )


def _feed_forward_with_inner_setup_context(ctx, inputs, output):
    input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation = inputs
    _, activated, activation_derivative = output
    # The inner values are what the backward reads, not results to differentiate.
    ctx.mark_non_differentiable(activated, activation_derivative)
    ctx.rows_per_expert = rows_per_expert
    ctx.save_for_backward(input, row_index, up, up_bias, down, down_bias, activated, activation_derivative)


def _feed_forward_with_inner_backward(ctx, grad_output, _grad_activated, _grad_activation_derivative):
    """The backward of the forward of training, from the inner activations and activation derivatives it returned."""
    input, row_index, up, up_bias, down, down_bias, activated, activation_derivative = ctx.saved_tensors
    _refuse_double_backward("expert_feed_forward_with_inner", grad_output, input, up, up_bias, down, down_bias)
    grad_input, grad_up, grad_up_bias, grad_down, grad_down_bias = _experts_backward(
        input, row_index, ctx.rows_per_expert, up, down, activated, activation_derivative, grad_output,
        [ctx.needs_input_grad[index] for index in (0, 3, 4, 5, 6)],
    )  # fmt: skip
    return grad_input, None, None, grad_up, grad_up_bias, grad_down, grad_down_bias, None


# expert_matmul(input, weight, rows_per_expert, scale=None): output[rows of e] = (input[rows] @ weight[e]) * scale[rows]


def _matmul_fake(input, weight, rows_per_expert, scale=None):
    torch._check(
        input.dim() == 2 and weight.dim() == 3 and input.shape[1] == weight.shape[1],
        lambda: f"expert_matmul: input must be (n, in) and weight (e, in, out), got {tuple(input.shape)} and "
        f"{tuple(weight.shape)}",
    )
    return input.new_empty(input.shape[0], weight.shape[2])  # (n, out)


def _matmul_setup_context(ctx, inputs, output):
    input, weight, rows_per_expert, scale = inputs
    ctx.rows_per_expert = rows_per_expert
    ctx.save_for_backward(input, weight, scale)


def _matmul_backward(ctx, grad_output):
    """Differentiable itself (the ops and torch's own), so a second derivative runs through it too."""
    input, weight, scale = ctx.saved_tensors
    needs_input_grad, needs_weight_grad = ctx.needs_input_grad[:2]
    needs_scale_grad = scale is not None and ctx.needs_input_grad[3]  # a scale left out is not among the inputs
    rows_per_expert, ops = ctx.rows_per_expert, torch.ops.switch_hf
    grad_output = grad_output.contiguous()  # (n, out)
    grad_product = grad_output if scale is None else grad_output * scale  # the gradient of the unscaled products
    grad_input = grad_weight = grad_scale = None
    if needs_input_grad:
        grad_input = ops.expert_matmul(grad_product, weight.transpose(1, 2), rows_per_expert)  # (n, in)
    if needs_weight_grad:
        grad_weight = ops.expert_outer_products(input, grad_product, rows_per_expert)  # (e, in, out)
    if needs_scale_grad:
        grad_scale = grad_output * ops.expert_matmul(input, weight, rows_per_expert)
    return grad_input, grad_weight, None, grad_scale


# expert_outer_products(left, right, rows_per_expert): output[e] = left[rows of e].T @ right[rows of e]


def _outer_products_fake(left, right, rows_per_expert):
    torch._check(
        left.dim() == 2 and right.dim() == 2,
        lambda: f"expert_outer_products: left and right must be 2-D, got {tuple(left.shape)} and {tuple(right.shape)}",
    )
    return left.new_empty(len(rows_per_expert), left.shape[1], right.shape[1])  # (e, p, q)


def _outer_products_setup_context(ctx, inputs, output):
    left, right, rows_per_expert = inputs
    ctx.rows_per_expert = rows_per_expert
    ctx.save_for_backward(left, right)


def _outer_products_backward(ctx, grad_output):
    """Differentiable itself (the ops and torch's own), so a second derivative runs through it too."""
    left, right = ctx.saved_tensors
    needs_left_grad, needs_right_grad, _ = ctx.needs_input_grad
    rows_per_expert, ops = ctx.rows_per_expert, torch.ops.switch_hf
    grad_left = grad_right = None
    if needs_left_grad:  # right[rows of e] @ grad[e].T
        grad_left = ops.expert_matmul(right, grad_output.transpose(1, 2), rows_per_expert)  # (n, p)
    if needs_right_grad:  # left[rows of e] @ grad[e]
        grad_right = ops.expert_matmul(left, grad_output, rows_per_expert)  # (n, q)
    return grad_left, grad_right, None


# op name -> (fake kernel, setup_context, backward)
_FORMULAS = {
    "expert_feed_forward": (_feed_forward_fake, _feed_forward_setup_context, _feed_forward_backward),
    "expert_feed_forward_with_inner": (
        _feed_forward_with_inner_fake,
        _feed_forward_with_inner_setup_context,
        _feed_forward_with_inner_backward,
    ),
    "expert_matmul": (_matmul_fake, _matmul_setup_context, _matmul_backward),
    "expert_outer_products": (_outer_products_fake, _outer_products_setup_context, _outer_products_backward),
}
