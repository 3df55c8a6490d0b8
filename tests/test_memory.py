"""`keep_freed_memory`: a freed large block is reused without faulting its pages in again."""

import json
import sys
import textwrap

import pytest


# Allocates and frees a 256 MiB tensor ten times, then counts the page faults of allocating and filling it once more.
# (With the setting, glibc first places a new block past the freed one, whose chunk falls just short of an aligned
# request, and reuses the freed memory once they have merged: the steady state of a training loop. How many rounds
# that takes depends on what the process allocated and freed before; over repeated runs here, with and without
# switch_hf's expert kernel loaded at import, 5 rounds were sometimes too few and 10 always enough.)
# Each mode is counted in a child forked right after the imports, so that both start from the same heap, and one
# process (a child of conftest's `warm_python`: starting an interpreter costs many seconds) serves both.
REALLOCATE = textwrap.dedent(
    """
    import json, os, resource
    import torch
    from switch_hf.memory import keep_freed_memory


    def reallocation_faults(keep):
        applied = keep_freed_memory() if keep else False
        size = 64 * 2**20  # floats: 256 MiB
        for _ in range(10):
            torch.ones(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        return {"applied": applied, "faults": faults, "pages": size * 4 // resource.getpagesize()}


    counts = {}
    for mode in ("default", "keep"):
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(write_end, json.dumps(reallocation_faults(mode == "keep")).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as reply:
            counts[mode] = json.loads(reply.read())
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0, mode
    print(json.dumps(counts))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_keep_freed_memory_reuses_a_freed_block_without_faulting_it_in_again(warm_python):
    result = warm_python.run(REALLOCATE)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    default, kept = counts["default"], counts["keep"]
    assert kept["applied"] is True
    # glibc's default unmaps the freed block, so the new one faults in (nearly) every page, zero-filled by the kernel.
    assert default["faults"] > default["pages"] // 2, default
    assert kept["faults"] < kept["pages"] // 100, kept
