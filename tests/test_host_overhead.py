"""CPU smoke test of benchmarks/host_overhead.py: a shape's narrow twin keeps its architecture
and depth with tiny widths, and one fastlm step is timed and profiled in each checkpointing
mode (the numbers mean something on a GPU only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "host_overhead.py"


def _script():
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_narrow_twin_keeps_depth_and_architecture():
    from fastlm.benchmarking.shapes import get_shape

    twin, shape = _script().narrow_twin("qwen3-4b"), get_shape("qwen3-4b")
    assert twin.model_type == shape.model_type and twin.name == "qwen3-4b-narrow"
    assert twin.config["num_hidden_layers"] == shape.config["num_hidden_layers"]
    assert twin.config["hidden_size"] == 128 and (twin.batch, twin.seq) == (1, 64)


@pytest.mark.parametrize("checkpointing", ["fastlm", "activations"])
def test_one_step_is_timed_and_profiled(tmp_path, capsys, checkpointing):
    argv = ["--shape", "llama-3.2-1b", "--mode", "lora", "--steps", "1", "--cprofile", "5"]
    _script().main([*argv, "--checkpointing", checkpointing, "--cache", str(tmp_path)])
    out = capsys.readouterr().out
    assert "== fastlm llama-3.2-1b-narrow (16 layers) lora ==" in out
    assert "host-paced step" in out and "Ordered by: internal time" in out
