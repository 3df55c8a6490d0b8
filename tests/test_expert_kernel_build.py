"""How the fused kernel's build is cached and announced; the compile itself is replaced by a stand-in, so these run on
any CPU."""

from pathlib import Path

import torch
import torch.utils.cpp_extension

from switch_hf import expert_kernel


def test_the_build_name_changes_with_the_torch_installation_and_the_source(monkeypatch, tmp_path):
    name = expert_kernel.build_name()
    assert expert_kernel.build_name() == name

    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert expert_kernel.build_name() != name
    monkeypatch.undo()

    edited = tmp_path / "expert_kernel.cpp"
    edited.write_bytes(expert_kernel.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(expert_kernel, "SOURCE", edited)
    assert expert_kernel.build_name() != name


def test_a_compile_is_announced_once_and_a_cached_build_is_silent(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiles = []

    def compile_stand_in(name, **kwargs):
        compiles.append(name)
        build_directory = tmp_path / name
        build_directory.mkdir(exist_ok=True)
        (build_directory / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_stand_in)
    name = expert_kernel.build_name()

    expert_kernel._build(name)
    first = capsys.readouterr().err
    assert first.count("\n") == 1 and "building the experts' CPU kernel" in first and str(tmp_path / name) in first

    expert_kernel._build(name)
    assert capsys.readouterr().err == ""
    assert compiles == [name, name] and Path(tmp_path / name / f"{name}.so").is_file()
