"""The multi-GPU benchmark and example parse their arguments and plan the torchrun runs (they
need GPUs to run for real; ``--cpu`` / a tiny shape run them on the CPU by hand, see
docs/multi_gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_bench_help_and_plan():
    help_text = _run("benchmarks/multi_gpu_bench.py", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--gpus" in help_text.stdout and "--parallel" in help_text.stdout
    plan = _run("benchmarks/multi_gpu_bench.py", "--dry-run", "--shape", "llama-3.1-8b")
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.strip().splitlines()
    # hf and fastlm, each on one GPU and on two, through torchrun
    assert [line.split()[2] for line in lines] == ["--nproc_per_node=1", "--nproc_per_node=2"] * 2
    specs = [json.loads(line.split("--child ", 1)[1].strip("'")) for line in lines]
    assert [s["system"] for s in specs] == ["hf", "hf", "fastlm", "fastlm"]
    assert {s["exact_micro_batches"] for s in specs} == {4}  # one global batch for 1 and 2 GPUs


def test_bench_refuses_bad_arguments():
    assert _run("benchmarks/multi_gpu_bench.py", "--gpus", "1").returncode != 0
    assert _run("benchmarks/multi_gpu_bench.py", "--systems", "hf,other").returncode != 0


def test_example_help():
    result = _run("examples/multi_gpu_sft.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "torchrun --nproc_per_node 2" in result.stdout and "--model" in result.stdout


def test_exactness_verdict_uses_hf_floor_for_fastlm_only():
    """The 2 x H200 LoRA DDP run (2026-11-23): HF's own 2-vs-1 error 1.19e-2 is the bf16 floor;
    fastlm's 1.33e-2 is within 1.5x of it, 2e-2 is not, and HF itself is judged by rtol alone."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from multi_gpu_bench import judge_exactness

    def case(fastlm_err: float) -> dict:
        exactness = {
            "hf-2gpu-vs-1gpu": {"grad_rel_err_max": 1.19e-2},
            "fastlm-2gpu-vs-1gpu": {"grad_rel_err_max": fastlm_err},
            "fastlm-1gpu-vs-hf-1gpu": {"grad_rel_err_max": 1.77e-1},
        }
        judge_exactness(exactness, rtol=1e-3, gpus=2)
        return exactness

    ok = case(1.33e-2)
    assert ok["fastlm-2gpu-vs-1gpu"]["pass"] and ok["fastlm-2gpu-vs-1gpu"]["hf_floor"] == 1.19e-2
    assert not ok["hf-2gpu-vs-1gpu"]["pass"] and not ok["fastlm-1gpu-vs-hf-1gpu"]["pass"]
    assert not case(2e-2)["fastlm-2gpu-vs-1gpu"]["pass"]
    alone = {"fastlm-2gpu-vs-1gpu": {"grad_rel_err_max": 5e-4}}  # no HF run: rtol only
    judge_exactness(alone, rtol=1e-3, gpus=2)
    assert alone["fastlm-2gpu-vs-1gpu"]["pass"] and "hf_floor" not in alone["fastlm-2gpu-vs-1gpu"]
