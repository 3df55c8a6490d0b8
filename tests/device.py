"""The device of the device-independent tests: `SWITCH_HF_TEST_DEVICE`, "cpu" when unset.

A test whose result must not depend on the device takes it from `test_device()` and puts its model and tensors there;
`scripts/gpu_check.py` runs every test module that imports it with `SWITCH_HF_TEST_DEVICE=cuda`:

    from device import test_device

    def test_one_expert_equals_the_dense_ffn():
        device = test_device()
        model = SwitchForTokenReconstruction(tiny_config(num_experts=1)).to(device)
        ...

    SWITCH_HF_TEST_DEVICE=cuda python -m pytest tests/test_that_module.py
"""

import os

import torch

ENVIRONMENT_VARIABLE = "SWITCH_HF_TEST_DEVICE"


def test_device() -> torch.device:
    """The device named by `SWITCH_HF_TEST_DEVICE` (any `torch.device` string: "cpu", "cuda", "cuda:1"), else cpu.

    A CUDA device that torch cannot see raises instead of falling back to the CPU: a run that asked for CUDA must not
    pass on the CPU.
    """
    name = os.environ.get(ENVIRONMENT_VARIABLE, "cpu")
    device = torch.device(name)  # an unknown device type raises here, naming the valid ones
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{ENVIRONMENT_VARIABLE}={name!r} but torch sees no CUDA device")
    return device


# Its name starts with `test_`, but it is no test: pytest must not collect it in the modules that import it.
test_device.__test__ = False
