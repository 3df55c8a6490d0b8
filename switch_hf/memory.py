"""Host-memory settings for training on CPU."""

import ctypes
import logging
import sys


logger = logging.getLogger(__name__)

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse instead of handing it back to the operating system.

    By default glibc serves every block over 32 MB with its own mmap and unmaps it when freed, so the next allocation
    of that size faults all its pages in again, zero-filled by the kernel. A training step frees and reallocates its
    gradients (`optimizer.zero_grad()` sets them to None), and a mixture of experts has many: at 128 experts of the
    benchmark's shapes one layer's expert gradients are 600 MB, and faulting them in costs more than the backward's
    matrix products (`docs/benchmarks.md`). With mmap off and trimming off, freed blocks stay in the heap and the next
    step reuses them. The price: the process keeps its peak memory until it exits.

    Affects later allocations of the whole process; call it once at the start of a training or benchmark script.
    Returns whether it was applied: it is a no-op, logged, where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        logger.info("keep_freed_memory: not on Linux, malloc left as it is")
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        logger.info("keep_freed_memory: no glibc mallopt, malloc left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success; -1 as the trim threshold disables trimming altogether (mallopt(3)).
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not applied:
        logger.warning("keep_freed_memory: mallopt refused the settings, malloc left as it is")
    return applied
