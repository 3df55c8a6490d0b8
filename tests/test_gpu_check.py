"""scripts/gpu_check.py runs every section on the CPU at tiny sizes (`--quick`) and reports each in its JSON; and
tests/device.py, which gives the device-independent tests the device gpu_check runs them on."""

import json

import pytest
import torch

from conftest import REPO_ROOT
from device import ENVIRONMENT_VARIABLE
from device import test_device as device_from_environment

# A device-independent test as gpu_check's first section runs it, with SWITCH_HF_TEST_DEVICE set to --device.
DEVICE_TEST = """
import os

from device import test_device


def test_runs_on_the_device_gpu_check_names():
    assert str(test_device()) == os.environ["SWITCH_HF_TEST_DEVICE"] == "cpu"
"""


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path, warm_python):
    device_test = tmp_path / "test_on_device.py"
    device_test.write_text(DEVICE_TEST)
    output = tmp_path / "out"
    arguments = ["--device", "cpu", "--quick", "--output-dir", output, "--device-tests", device_test]
    result = warm_python.run(script=REPO_ROOT / "scripts" / "gpu_check.py", arguments=arguments, timeout=600)

    report = json.loads((output / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["device_tests", "implementations", "bf16_training", "benchmark", "train_script"]
    for name, section in sections.items():  # "error": the section itself raised, a bug of the script
        assert section["status"] in ("passed", "failed"), (name, section.get("error"), section.get("note"))
        assert section["checks"], name
    failed = [f"{name}: {c['name']}" for name, s in sections.items() for c in s["checks"] if not c["passed"]]
    assert report["failed_checks"] == failed
    assert report["status"] == ("failed" if failed else "passed")
    assert result.returncode == (1 if failed else 0), result.stderr[-3000:]
    assert "overall:" in (output / "gpu_check_summary.txt").read_text()
    assert (output / "gpu_check.log").stat().st_size > 0

    # What runs on the CPU today passes: these sections hold nothing the rest of the suite does not pass.
    for name in ("device_tests", "implementations", "benchmark", "train_script"):
        assert sections[name]["status"] == "passed", [c for c in sections[name]["checks"] if not c["passed"]]
    assert sections["device_tests"]["outcomes"]["passed"] == 1
    implementations = sections["implementations"]["implementations"]
    default = report["environment"]["default_experts_implementation"]
    assert {"eager", "sorted_mm", "grouped_mm", "batched_mm", default} == set(implementations)
    names = [c["name"] for c in sections["implementations"]["checks"]]
    for case in ("ff top-1 capacity", "aa top-2 dropless", "bb top-2 capacity"):
        assert {f"{case}: {i} vs eager" for i in implementations[1:]} <= set(names)
    bf16 = sections["bf16_training"]["checks"]
    assert {c["name"].split(":")[0] for c in bf16} == {
        f"{kind} {mode} {default}" for kind in ("ff", "aa", "bb") for mode in ("autocast", "bf16_weights")
    }
    assert all(c["passed"] for c in bf16 if "bf16_weights" in c["name"]), [c for c in bf16 if not c["passed"]]
    for result in sections["benchmark"]["results"]:
        assert set(result["contenders"]) == {"dense", *(f"switch/{i}" for i in implementations)}
        assert all(row["forward_backward"]["median_ms"] > 0 for row in result["contenders"].values())
    assert {r["dtype"] for r in sections["benchmark"]["results"]} == {"torch.float32", "torch.bfloat16"}


def test_device_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert device_from_environment() == torch.device("cpu")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "cpu")
    assert device_from_environment() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, "cuda")
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            device_from_environment()
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "no-such-device")
    with pytest.raises(RuntimeError):
        device_from_environment()
