"""`keep_freed_memory`: a freed large block is reused without faulting its pages in again."""

import json
import subprocess
import sys
import textwrap

import pytest


# Allocates and frees a 256 MiB tensor ten times, then counts the page faults of allocating and filling it once more.
# (With the setting, glibc first places a new block past the freed one, whose chunk falls just short of an aligned
# request, and reuses the freed memory once they have merged: the steady state of a training loop. How many rounds
# that takes depends on what the process allocated and freed before; over repeated runs here, with and without
# switch_hf's expert kernel loaded at import, 5 rounds were sometimes too few and 10 always enough.)
REALLOCATE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from switch_hf.memory import keep_freed_memory

    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    size = 64 * 2**20  # floats: 256 MiB
    for _ in range(10):
        torch.ones(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"applied": applied, "faults": faults, "pages": size * 4 // resource.getpagesize()}))
    """
)


def reallocation_faults(mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_keep_freed_memory_reuses_a_freed_block_without_faulting_it_in_again():
    default = reallocation_faults("default")
    kept = reallocation_faults("keep")
    assert kept["applied"] is True
    # glibc's default unmaps the freed block, so the new one faults in (nearly) every page, zero-filled by the kernel.
    assert default["faults"] > default["pages"] // 2, default
    assert kept["faults"] < kept["pages"] // 100, kept
