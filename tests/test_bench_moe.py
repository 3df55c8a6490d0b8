"""scripts/bench_moe.py runs end to end at tiny shapes and reports every contender and target (no timing asserted)."""

import json

import pytest

from conftest import REPO_ROOT

from switch_hf import expert_kernel


@pytest.mark.slow
def test_benchmark_reports_every_contender_and_target(tmp_path, warm_python):
    output = tmp_path / "bench.json"
    arguments = [
        "--threads", "1", "--tokens", "64", "--seq-len", "32", "--hidden", "32", "--ffn", "64", "--heads", "4",
        "--experts", "4", "8", "--attention-experts", "4", "--repeats", "1", "--warmup", "0",
        "--e2e-batch", "1", "--e2e-seq-len", "8", "--e2e-repeats", "1", "--output", output,
    ]  # fmt: skip
    result = warm_python.run(script=REPO_ROOT / "scripts" / "bench_moe.py", arguments=arguments, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(output.read_text())
    assert [r["num_experts"] for r in report["experts"]] == [4, 8]
    assert report["expert_kernel"] == expert_kernel.is_registered()
    expected = {
        "dense", "switch-hf/sorted_mm", "switch-hf/grouped_mm", "SwitchTransformersSparseMLP",
        "reference: expert networks",
    }  # fmt: skip
    if expert_kernel.is_registered():  # sorted_mm's inference path, side by side with and without the fused kernel
        expected.add("switch-hf/sorted_mm, torch products")
    for result in report["experts"]:
        assert set(result["contenders"]) == expected
        assert result["tokens_per_expert"]["mean"] == 64 / result["num_experts"]  # top-1, dropless
        for row in result["contenders"].values():
            assert row["forward"]["median_ms"] > 0 and row["forward_backward"]["median_ms"] > 0
            assert row["memory"]["peak_bytes"] > 0
    attention = report["attention_experts"][0]
    assert set(attention["contenders"]) == {"dense attention", "switch-hf attention experts"}
    assert attention["contenders"]["dense attention"]["forward"]["to_dense"] == 1.0
    assert set(report["end_to_end"]) >= {"inference", "training_step"}
    checked = [check["target"] for check in report["targets"]]
    assert "4 attention experts: forward to_dense" in checked
    assert any(target.startswith("end to end inference") for target in checked)
    assert all(isinstance(check["met"], bool) for check in report["targets"])
    assert report["keep_freed_memory"] is True  # as scripts/train.py
