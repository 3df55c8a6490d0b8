"""A slow pure-torch twin of switch_hf's four kernel ops (`switch_hf/expert_kernel.cpp`), for CPUs that cannot run the
kernel (it needs AVX-512): the same schemas (read from the C++ file), arguments, checks and results, one expert at a
time on torch's products.

`reference_ops()` registers these functions as the ops' CPU kernels under the `switch_hf` namespace, with switch_hf's
own autograd formulas and fake kernels (`expert_kernel.register_formulas`), so that `sorted_mm`'s kernel paths and the
formulas run here as they run on the kernel. Called directly rather than through `torch.ops`, the functions are
differentiable by autograd: the pure-torch gradients the registered formulas are checked against.

Index letters: t input rows, n sorted rows (grouped by expert), e experts, h hidden, i intermediate.
"""

import contextlib
import functools
import math
import re

import torch
import torch.nn.functional as F

from switch_hf import expert_kernel


# F.gelu is the exact GELU, as the kernel's.
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "identity": lambda inner: inner}


def activation_derivative(activation: str, inner: torch.Tensor) -> torch.Tensor:
    """The activation's derivative as the kernel computes it: Phi(x) + x phi(x) for GELU, 1 where x > 0 for ReLU."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(inner * math.sqrt(0.5)))
        density = torch.exp(-0.5 * inner.square()) / math.sqrt(2.0 * math.pi)
        return cdf + inner * density
    if activation == "relu":
        return (inner > 0).to(inner.dtype)
    return torch.ones_like(inner)


def kernel_schemas() -> list[str]:
    """The schemas `expert_kernel.cpp` defines in its TORCH_LIBRARY block, each joined from its string literals."""
    source = expert_kernel.SOURCE.read_text()
    block = source[source.index("TORCH_LIBRARY(switch_hf,") :]
    block = block[: block.index("\n}")]
    calls = re.findall(r"library\.def\((.*?)\);", block, flags=re.DOTALL)
    return ["".join(re.findall(r'"([^"]*)"', call)) for call in calls]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _check_float_cpu_contiguous(tensor, name, dim, op="expert_feed_forward"):
    _check(tensor.dim() == dim, f"{op}: {name} must be {dim}-D, got shape {list(tensor.shape)}")
    _check(tensor.dtype == torch.float32, f"{op}: {name} must be float32, got {tensor.dtype}")
    _check(tensor.device.type == "cpu", f"{op}: {name} must be on the CPU, got {tensor.device}")
    _check(tensor.is_contiguous(), f"{op}: {name} must be contiguous")


def _check_rows_per_expert(rows_per_expert, num_experts, op):
    _check(
        len(rows_per_expert) == num_experts,
        f"{op}: rows_per_expert must have {num_experts} entries, got {len(rows_per_expert)}",
    )
    for rows in rows_per_expert:
        _check(rows >= 0, f"{op}: rows_per_expert must not be negative, got {rows}")


def _check_experts_arguments(input, row_index, rows_per_expert, up, up_bias, down, down_bias):
    _check_float_cpu_contiguous(input, "input", 2)
    _check_float_cpu_contiguous(up, "up", 3)
    _check_float_cpu_contiguous(down, "down", 3)
    num_experts, intermediate, hidden = up.shape
    _check(input.shape[1] == hidden, f"expert_feed_forward: input must have {hidden} features")
    _check(
        tuple(down.shape) == (num_experts, hidden, intermediate),
        f"expert_feed_forward: down must be ({num_experts}, {hidden}, {intermediate}), got {list(down.shape)}",
    )
    for bias, name, size in ((up_bias, "up_bias", intermediate), (down_bias, "down_bias", hidden)):
        if bias is not None:
            _check_float_cpu_contiguous(bias, name, 2)
            _check(
                tuple(bias.shape) == (num_experts, size),
                f"expert_feed_forward: {name} must be ({num_experts}, {size}), got {list(bias.shape)}",
            )
    _check_rows_per_expert(rows_per_expert, num_experts, "expert_feed_forward")
    _check(
        row_index.dim() == 1 and row_index.dtype == torch.int64 and row_index.is_contiguous(),
        "expert_feed_forward: row_index must be a contiguous 1-D int64 tensor",
    )
    _check(
        row_index.shape[0] == sum(rows_per_expert),
        f"expert_feed_forward: row_index must have sum(rows_per_expert) = {sum(rows_per_expert)} entries",
    )
    if row_index.numel():
        _check(
            0 <= row_index.min().item() and row_index.max().item() < input.shape[0],
            f"expert_feed_forward: row_index must lie in [0, {input.shape[0]})",
        )


def _per_expert_linear(rows, weight, bias, rows_per_expert):
    """rows (n, in) sorted by expert, weight (e, out, in), bias (e, out) or None -> (n, out)."""
    outputs = [
        F.linear(expert_rows, weight[expert], None if bias is None else bias[expert])
        for expert, expert_rows in enumerate(rows.split(rows_per_expert))
    ]
    return torch.cat(outputs) if outputs else rows.new_empty(0, weight.shape[1])


def expert_feed_forward_with_inner(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation):
    """(output (n, h), activated (n, i), activation_derivative (n, i)), in sorted order."""
    _check_experts_arguments(input, row_index, rows_per_expert, up, up_bias, down, down_bias)
    _check(
        activation in ACTIVATIONS,
        f"expert_feed_forward: activation must be one of 'gelu', 'relu', 'identity', got '{activation}'",
    )
    inner = _per_expert_linear(input.index_select(0, row_index), up, up_bias, rows_per_expert)  # (n, i)
    activated = ACTIVATIONS[activation](inner)
    output = _per_expert_linear(activated, down, down_bias, rows_per_expert)  # (n, h)
    return output, activated, activation_derivative(activation, inner.detach())


def expert_feed_forward(input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation, gate=None):
    """The sorted rows' outputs (n, h); with `gate` (n,), the (t, h) result in input order: row row_index[i] gets
    gate[i] times its output, rows never routed get zero, and no row may be routed twice."""
    if gate is not None:
        _check_float_cpu_contiguous(gate, "gate", 1)
        _check(
            gate.shape[0] == row_index.shape[0],
            f"expert_feed_forward: gate must have {row_index.shape[0]} entries (one per row), got {gate.shape[0]}",
        )
        _check(
            row_index.unique().numel() == row_index.numel(),
            "expert_feed_forward: with gate, row_index must not repeat a row",
        )
    output, _, _ = expert_feed_forward_with_inner(
        input, row_index, rows_per_expert, up, up_bias, down, down_bias, activation
    )
    if gate is None:
        return output
    return input.new_zeros(input.shape).index_copy(0, row_index, gate.unsqueeze(1) * output)  # (t, h)


def expert_matmul(input, weight, rows_per_expert, scale=None):
    """input (n, in) sorted by expert, weight (e, in, out) -> (n, out) `input[rows of e] @ weight[e]`, times `scale`."""
    _check(
        input.dim() == 2 and weight.dim() == 3,
        f"expert_matmul: input must be 2-D and weight 3-D, got shapes {list(input.shape)} and {list(weight.shape)}",
    )
    _check(input.shape[1] == weight.shape[1], f"expert_matmul: weight must be (e, {input.shape[1]}, out)")
    _check(input.dtype == weight.dtype, "expert_matmul: input and weight must have one dtype")
    _check(input.device.type == weight.device.type == "cpu", "expert_matmul: input and weight must be on the CPU")
    _check_rows_per_expert(rows_per_expert, weight.shape[0], "expert_matmul")
    _check(
        input.shape[0] == sum(rows_per_expert),
        f"expert_matmul: input must have sum(rows_per_expert) = {sum(rows_per_expert)} rows",
    )
    outputs = [rows @ weight[expert] for expert, rows in enumerate(input.split(rows_per_expert))]
    output = torch.cat(outputs) if outputs else input.new_empty(0, weight.shape[2])
    if scale is None:
        return output
    _check_float_cpu_contiguous(scale, "scale", 2, "expert_matmul")
    _check(input.dtype == torch.float32, f"expert_matmul: scale needs float32 input, got {input.dtype}")
    _check(
        tuple(scale.shape) == tuple(output.shape),
        f"expert_matmul: scale must be ({output.shape[0]}, {output.shape[1]}), got {list(scale.shape)}",
    )
    return output * scale


def expert_outer_products(left, right, rows_per_expert):
    """left (n, p), right (n, q) sorted by expert -> (e, p, q) `left[rows of e].T @ right[rows of e]`, zeros for an
    expert without rows."""
    _check(left.dim() == 2 and right.dim() == 2, "expert_outer_products: left and right must be 2-D")
    _check(left.dtype == right.dtype, "expert_outer_products: left and right must have one dtype")
    _check(left.device.type == right.device.type == "cpu", "expert_outer_products: left and right must be on the CPU")
    _check_rows_per_expert(rows_per_expert, len(rows_per_expert), "expert_outer_products")
    _check(
        left.shape[0] == right.shape[0] == sum(rows_per_expert),
        f"expert_outer_products: left and right must have sum(rows_per_expert) = {sum(rows_per_expert)} rows",
    )
    products = [a.t() @ b for a, b in zip(left.split(rows_per_expert), right.split(rows_per_expert))]
    return torch.stack(products) if products else left.new_empty(0, left.shape[1], right.shape[1])


OPS = {
    "expert_feed_forward": expert_feed_forward,
    "expert_feed_forward_with_inner": expert_feed_forward_with_inner,
    "expert_matmul": expert_matmul,
    "expert_outer_products": expert_outer_products,
}


def _values_only(function):
    """`function` as a kernel that reads its inputs' values only, as the C++ ops do: no autograd graph records through
    it, so a gradient reaches the inputs through the registered formulas or not at all, as on the real kernel."""

    @functools.wraps(function)
    def kernel(*arguments):
        with torch.no_grad():
            return function(*arguments)

    return kernel


@contextlib.contextmanager
def reference_ops():
    """`torch.ops.switch_hf` on this module's functions, registered as the ops' CPU kernels under the schemas of
    `expert_kernel.cpp`, with switch_hf's autograd formulas and fake kernels; all of it removed on exit.

    Only where the real kernel is not registered: a second definition of its ops would fail.
    """
    if expert_kernel.is_registered():
        raise RuntimeError("switch_hf's kernel ops are registered already")
    library = torch.library.Library("switch_hf", "FRAGMENT")
    try:
        for schema in kernel_schemas():
            library.define(schema)
        for name, function in OPS.items():
            library.impl(name, _values_only(function), "CPU")
        expert_kernel.register_formulas(library)
        yield torch.ops.switch_hf
    finally:
        library._destroy()
