"""The fused CPU kernel for the experts' feed-forward networks (`expert_kernel.cpp`), built on first import.

`sorted_mm` runs each expert as two BLAS products. Where this kernel is registered, it runs the forward of every
expert's whole network in one call instead: per tile of an expert's rows, gather, both products, bias and activation,
with the tile's activations kept in cache and the weights read as stored (no per-call packing); in training it also
returns the inner values the backward needs, whose per-expert products it runs on register tiles of its own, split
between threads, the weight gradients streamed to memory. docs/benchmarks.md has the measurements.

`load()` compiles it with the machine's C++ compiler through `torch.utils.cpp_extension` (about 10 s, once per
machine and source: the build is cached under `~/.cache/torch_extensions`), which registers the ops
`torch.ops.switch_hf.expert_feed_forward`, `expert_feed_forward_with_inner`, `expert_matmul` and
`expert_outer_products`. `modeling_switch` looks them up and falls back to torch's products where they are missing,
for instance when a checkpoint is loaded with `trust_remote_code` alone. Set `SWITCH_HF_EXPERT_KERNEL=0` to never
build or use it.
"""

import logging
import os
import shutil
import sys
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("expert_kernel.cpp")
ENVIRONMENT_SWITCH = "SWITCH_HF_EXPERT_KERNEL"


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
        logger.info("loading switch_hf's expert kernel (built once per machine, cached in ~/.cache/torch_extensions)")
        try:
            _build()
        except Exception as error:  # a failed build must not stop the model: torch's products still work
            reason = f"the build failed: {error}", logging.WARNING
    if reason is not None:
        message, level = reason
        logger.log(level, "switch_hf's expert kernel is not used (%s); experts run on torch's matrix products", message)
        return False
    return is_registered()


def _build():
    # Importing the builder warns "No CUDA runtime is found" where a CUDA toolkit is installed without a GPU:
    # irrelevant to a CPU kernel, so it is kept out of every import of switch_hf.
    builder_logger = logging.getLogger("torch.utils.cpp_extension")
    level = builder_logger.level
    builder_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as build
    finally:
        builder_logger.setLevel(level)

    # torch's builder runs `ninja` from PATH; the `ninja` package installs it next to this Python, which may not be
    # on PATH when the virtual environment is not activated.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        build(
            name="switch_hf_expert_kernel",
            sources=[str(SOURCE)],
            # The AVX-512 subsets torch requires for its own AVX512 kernels, not -march=native: a cached build must
            # run on any machine torch reports AVX512 on. -fopenmp compiles at::parallel_for's parallel region, which
            # runs on torch's own OpenMP runtime (the same libgomp.so.1, already loaded).
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path
