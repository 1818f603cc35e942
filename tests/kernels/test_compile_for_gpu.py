"""Every Triton kernel compiles for an H100 (sm_90) at the launch shapes a GPU run picks.

The interpreter tests check what the kernels compute; they never lower the code for a GPU, so a
kernel that does not compile there (or whose tiles overflow shared memory) would pass them. This
compiles each launch ahead of time with Triton's own compiler (ptxas included), no GPU needed.
On a CUDA machine the real tests compile and run the kernels, so this one is skipped there.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
# Largest shared memory one block may opt into on sm_90 (227 KiB).
H100_SHARED_BYTES = 227 * 1024

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU compiles and runs the kernels in the other tests"
)


def _declared_kernels() -> set[str]:
    """``<module>.<function>`` of every ``@triton.jit`` kernel (names ending in ``_kernel``)."""
    found = set()
    for path in (ROOT / "fastlm" / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            decorated = isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d).startswith("triton.jit") for d in node.decorator_list
            )
            if decorated and node.name.endswith("_kernel"):
                found.add(f"{path.stem}.{node.name}")
    return found


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def test_every_kernel_compiles_for_sm90(compiled):
    missing = _declared_kernels() - {record["kernel"] for record in compiled}
    assert not missing, f"kernels never compiled (add them to compile_for_gpu.py): {missing}"
    assert all(record["cubin_bytes"] > 0 for record in compiled)


def test_launch_shapes_fit_h100_shared_memory(compiled):
    too_big = [r for r in compiled if r["shared_bytes"] > H100_SHARED_BYTES]
    assert not too_big, json.dumps(too_big, indent=1)


def test_gpu_launch_shapes_were_compiled_not_the_interpreters(compiled):
    attention = [r for r in compiled if r["kernel"].startswith("flash_attention.")]
    assert attention and all(int(r["constants"]["BLOCK_N"]) >= 32 for r in attention)
    assert {r["constants"]["WINDOW"] for r in attention} == {"True", "False"}
    assert {r["constants"]["SOFTCAP"] for r in attention} == {"True", "False"}
    assert {r["constants"]["VARLEN"] for r in attention} == {"True", "False"}  # packed too
    forward = [r for r in attention if r["kernel"] == "flash_attention._fwd_kernel"]
    sinks = {(r["constants"]["SINKS"], r["constants"]["VARLEN"]) for r in forward}
    assert sinks == {("True", "True"), ("True", "False"), ("False", "True"), ("False", "False")}
    loss = [r for r in compiled if r["kernel"].startswith("fused_linear_cross_entropy.")]
    assert loss and all(r["constants"]["BLOCK_V"] == "4096" for r in loss)
