"""fastlm under DDP and FSDP2: two CPU processes (gloo) against one process on the same batch.

One launch runs every scenario (``_dist_worker.py``); each gives the global loss, the LoRA
gradients after DDP's all-reduce / FSDP2's reduce-scatter, and the loss after one SGD step, for
a global batch of four micro-batches whose target-token counts differ a lot between the ranks
(gradient accumulation 2 per rank). They must equal one process over all four micro-batches:
relative error <= 1e-5 per gradient tensor and 1e-6 on the losses (fp32; only the reduction
order differs). The worker also counts the fused calls, so a fallback to unfused code cannot pass
as "fused and exact".
"""

from __future__ import annotations

import pytest
import torch
from _dist_common import (
    RANK_MICRO_BATCHES,
    build,
    launch,
    micro_batches,
    run_trainer,
    save_models,
    train_step,
)
from tiny_models import relative_error

from fastlm.distributed import (
    UnsupportedDistributedError,
    count_target_tokens,
    fully_shard_model,
    global_num_items_in_batch,
    is_plain_linear,
    world_size,
)
from fastlm.errors import UnsupportedKeywordError

# Tiny matmuls: one thread is faster, and the two worker processes need the other core.
pytestmark = pytest.mark.usefixtures("one_thread")
# Why 1e-5, fp32: two processes vs one sum gradients, tokens and losses in another order and run
# the matmuls on other batch shapes, so the CPU's kernels round differently (which kernels, and so
# the digits, depend on the host). Measured with the trainer test (two SGD steps, lr 0.5, max over
# LoRA tensors): 2 processes vs 1, 5e-8; one process with the global batch of 8 split 4x2, 2x4,
# 1x8 or 8x1 (rows x accumulation), 6e-8. Real bugs: tokens not counted across ranks
# (average_tokens_across_devices=False) 2.3e-4, so a bound of 1e-3 would miss it; gradients off by
# the world-size factor (halved or doubled) 3.5e-2. 1e-5 leaves ~100x for other hosts.
RTOL = 1e-5
ALL_FUSED = {"lora_qkv", "lora_mlp", "lora_linear", "fused_linear_cross_entropy"}


# Scenario -> the fused paths that must have run. Every one must match one process exactly.
EXACT = {
    "ddp-llama-ckpt=False": ALL_FUSED,
    "ddp-llama-ckpt=True": ALL_FUSED,
    "ddp-llama-ckpt=fastlm": ALL_FUSED,
    "ddp-gemma3_text-ckpt=True": ALL_FUSED,
    "fsdp2-layers-llama-ckpt=False": ALL_FUSED,
    "fsdp2-layers-llama-ckpt=True": ALL_FUSED,
    "fsdp2-layers-llama-ckpt=fastlm": ALL_FUSED,
    "fsdp2-layers-gemma3_text-ckpt=True": ALL_FUSED,
    # Under accelerate lm_head is an FSDP unit of its own; under a size-based wrap every linear
    # is: the read sites gather them (fastlm/models/fsdp.py).
    "fsdp2-accelerate_trainer-llama-ckpt=True": ALL_FUSED,
    "fsdp2-accelerate_layers-llama-ckpt=True": ALL_FUSED,
    "fsdp2-accelerate_trainer-gemma3_text-ckpt=fastlm": ALL_FUSED,
    "fsdp2-size_based-llama-ckpt=True": ALL_FUSED,
    "fsdp2-peft_lambda-llama-ckpt=True-fix=hooks": ALL_FUSED,
    "qlora-ddp-llama-ckpt=True": ALL_FUSED,
    "qlora-fsdp2-layers-llama-ckpt=True": ALL_FUSED,
    "qlora-fsdp2-accelerate_trainer-llama-ckpt=True": ALL_FUSED,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_models(root / "models")
    return root


@pytest.fixture(scope="module")
def results(workdir):
    launch([str(workdir / "models"), str(workdir / "out")], workdir / "logs")
    return torch.load(workdir / "out" / "results.pt")


@pytest.fixture(scope="module")
def references(workdir):
    """One process, all four micro-batches: fastlm (16-bit and, if available, QLoRA)."""
    refs = {}
    for model_type in ("llama", "gemma3_text"):
        model = build(workdir / "models" / model_type)
        refs[model_type] = train_step(model, model, micro_batches(), world=1)
    try:
        model = build(workdir / "models" / "llama", load_in_4bit=True)
    except (ImportError, UnsupportedKeywordError):  # no bitsandbytes / no QLoRA in this fastlm
        pass
    else:
        refs["qlora-llama"] = train_step(model, model, micro_batches(), world=1)
    return refs


def _reference_key(scenario: str) -> str:
    model_type = "gemma3_text" if "gemma3_text" in scenario else "llama"
    return f"qlora-{model_type}" if scenario.startswith("qlora") else model_type


def _assert_matches(result: dict, reference: dict) -> None:
    assert "error" not in result, result.get("error")
    torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(result["loss_after"], reference["loss_after"], rtol=1e-6, atol=0)
    assert result["grads"].keys() == reference["grads"].keys()
    for name, expected in reference["grads"].items():
        assert expected.norm() > 0, name  # random A and B: every LoRA gradient is non-zero
        assert relative_error(result["grads"][name], expected) <= RTOL, name


@pytest.mark.parametrize("scenario", sorted(EXACT))
def test_two_processes_match_one(scenario, results, references):
    if scenario not in results:
        pytest.skip(f"{scenario} not run (QLoRA unavailable in this fastlm / bitsandbytes)")
    _assert_matches(results[scenario], references[_reference_key(scenario)])
    ran = {name for name, count in results[scenario]["calls"].items() if count > 0}
    assert ran == EXACT[scenario]


@pytest.mark.parametrize(
    "scenario",
    ["fsdp2-accelerate_trainer-llama-ckpt=True", "fsdp2-size_based-llama-ckpt=True"],
)
def test_fused_paths_run_when_fsdp_makes_linears_units(scenario, results):
    # Fused (each unit gathered at its read site), not the full-logits loss (seq x vocab memory).
    calls = results[scenario]["calls"]
    assert {name for name, count in calls.items() if count > 0} == ALL_FUSED


def test_lora_linears_as_fsdp_units_without_a_fix(results, references):
    # PEFT's wrap policy per module: fastlm reads LoRA A/B weights whose forward never runs, and
    # its read sites gather them (a read site that does not: tests/distributed/test_read_sites.py).
    result = results["fsdp2-peft_lambda-llama-ckpt=True-fix=None"]
    _assert_matches(result, references["llama"])
    assert result["check"]["error"] is None


def test_sharded_4bit_weights_are_refused_clearly(results):
    name = "qlora-fsdp2-shard_4bit-llama"
    if name not in results:
        pytest.skip("QLoRA unavailable in this fastlm / bitsandbytes")
    error = results[name]["check"]["error"]
    assert "4-bit" in error and "DDP" in error and "fully_shard_model" in error


@pytest.mark.parametrize("scenario", sorted(s for s in EXACT if "fsdp2" in s))
def test_check_fsdp2_passes_and_warns_about_unfused_units(scenario, results):
    if scenario not in results:
        pytest.skip(f"{scenario} not run (QLoRA unavailable in this fastlm / bitsandbytes)")
    check = results[scenario]["check"]
    assert check["error"] is None
    unfused = EXACT[scenario] != ALL_FUSED
    assert bool(check["warnings"]) == unfused, check["warnings"]


def test_uneven_tokens_make_the_global_normalisation_matter(workdir, references):
    """Per-rank means (no num_items_in_batch) give other gradients on this data, so the exact
    matches above do check the global token normalisation."""
    model = build(workdir / "models" / "llama")
    batches = micro_batches()
    for indices in RANK_MICRO_BATCHES.values():
        mine = [batches[i] for i in indices]
        for batch in mine:  # what a rank computes normalising by its own tokens only
            out = model(
                **batch, num_items_in_batch=count_target_tokens([b["labels"] for b in mine])
            )
            (out.loss / len(RANK_MICRO_BATCHES)).backward()
    reference = references["llama"]["grads"]
    errors = [
        relative_error(p.grad, reference[n])
        for n, p in model.named_parameters()
        if p.grad is not None
    ]
    assert min(errors) > 1e-2


def test_fastlm_reference_matches_hf_peft(workdir, references):
    """The single-process reference itself is exact against transformers + PEFT."""
    model = build(workdir / "models" / "llama", patched=False)
    hf = train_step(model, model, micro_batches(), world=1)
    _assert_matches(hf, references["llama"])


@pytest.mark.parametrize("kind", ["hf", "sft"])
def test_trainer_two_processes_match_one(kind, results, workdir):
    """HF Trainer (fastlm's fused loss, num_items_in_batch gathered over ranks) and TRL's
    SFTTrainer, unchanged, under DDP: the same LoRA weights after two steps as one process."""
    result = results[f"trainer-{kind}-llama"]
    assert "error" not in result, result.get("error")
    single = run_trainer(workdir / "models" / "llama", kind, workdir / f"single-{kind}", world=1)
    assert result["precision"] == single["precision"] == "no"  # fp32: what RTOL is for
    assert result["weights"].keys() == single["weights"].keys()
    for name, expected in single["weights"].items():
        assert relative_error(result["weights"][name], expected) <= RTOL, name
    if kind == "hf":
        assert result["calls"].get("fused_linear_cross_entropy", 0) > 0


def test_token_count_helpers_single_process():
    labels = [torch.tensor([[-100, 5, 6, -100], [7, 8, -100, -100]]), torch.tensor([[1, 2, 3]])]
    # Shifted, as the causal-LM loss and HF Trainer count: position 0 predicts nothing.
    assert count_target_tokens(labels).item() == 2 + 1 + 2
    assert global_num_items_in_batch(labels).item() == 5 and world_size() == 1


def test_plain_linear_and_layer_detection():
    from torch.distributed.fsdp import FSDPModule

    class FSDPLinear(FSDPModule, torch.nn.Linear):  # what fully_shard swaps a unit's class to
        pass

    assert is_plain_linear(torch.nn.Linear(2, 3))
    unit = torch.nn.Linear(2, 3)
    unit.__class__ = FSDPLinear
    assert is_plain_linear(unit)  # patch.py gathers it and reads it fused
    assert not is_plain_linear(torch.nn.Embedding(2, 3))
    with pytest.raises(UnsupportedDistributedError, match="no decoder layers"):
        fully_shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
