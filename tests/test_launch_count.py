"""CPU smoke test of benchmarks/launch_count.py: one step of a tiny model is counted, per kind
and per layer, the CUDA (Triton) path is the one counted, and the JSON is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "launch_count.py"


def _script():
    spec = importlib.util.spec_from_file_location("launch_count", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_one_step_and_writes_json(tmp_path, capsys):
    out = tmp_path / "counts.json"
    assert _script().main(["--family", "llama", "--layers", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["checkpointing"] for r in results] == [True, "unsloth"]
    for result in results:
        assert result["total"] > 0 and result["per_layer"]["total"] > 0
        assert result["triton"] > 0  # the kernels' CUDA path ran, in the interpreter
        for kind in ("norm", "qkv", "attention", "o_proj", "mlp"):
            assert result["per_layer"][kind] > 0, kind
        # checkpointing recomputes the layer's forward in backward
        assert result["per_layer_by_phase"]["qkv"]["recompute"] > 0
        assert "triton:_rms_norm_fwd_kernel" in result["ops"]
    assert "per layer" in capsys.readouterr().out


def test_views_and_allocations_are_not_launches():
    script = _script()
    assert {"view", "transpose", "t", "expand", "detach", "_unsafe_view"} <= script.VIEW_OPS
    assert "empty" in script.ALLOC_OPS and "mm" not in script.VIEW_OPS | script.ALLOC_OPS
