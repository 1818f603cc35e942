"""LoRA on a mixture-of-experts model when the caller names only modules, as Unsloth scripts do:
``get_peft_model(target_modules=[... "gate_proj", "up_proj", "down_proj"])`` adapts the experts
too (``target_parameters`` added by fastlm where PEFT does not map the names itself), and the
model is the one transformers + PEFT make from the explicit spelling."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import relative_error, save_tiny_model, tiny_batch
from transformers import AutoModelForCausalLM

from fastlm import FastModel

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformers.models.qwen3_5_moe") is None,
        reason="transformers without Qwen3.5-MoE",
    ),
]

FAMILY = "qwen3_5_moe_text"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def _adapted_experts(model) -> set[str]:
    """The experts parameters a PEFT ParamWrapper adapts."""
    return {m.parameter_name for m in model.modules() if hasattr(m, "parameter_name")}


def test_mlp_names_adapt_the_experts_as_the_explicit_spelling_does(tmp_path):
    path = save_tiny_model(FAMILY, tmp_path / "m")
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False)
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager"
    )
    reference = get_peft_model(
        reference, LoraConfig(target_modules=ATTENTION + MLP, target_parameters=EXPERTS, **lora)
    )
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(
        fast, target_modules=ATTENTION + MLP, use_gradient_checkpointing=False, **lora
    )
    assert _adapted_experts(fast) == {"gate_up_proj", "down_proj"}
    assert sorted(fast.peft_config["default"].target_parameters) == EXPERTS
    assert fast.state_dict().keys() == reference.state_dict().keys()
    fast.load_state_dict(reference.state_dict())
    batch = tiny_batch()
    losses, grads = [], []
    for model in (reference, fast):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        named = model.named_parameters()
        grads.append({n: p.grad for n, p in named if ".experts." in n and "lora_" in n})
    assert abs(losses[1] - losses[0]) <= 1e-4 * losses[0]
    assert len(grads[0]) == 3 * 2 * 2  # MoE layers x (gate_up, down) x (A, B)
    for name, grad in grads[0].items():
        assert relative_error(grads[1][name], grad) <= 1e-4, name


def test_only_down_proj_adapts_only_the_down_experts(tmp_path):
    path = save_tiny_model(FAMILY, tmp_path / "m")
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, target_modules=["q_proj", "down_proj"])
    assert _adapted_experts(fast) == {"down_proj"}


def test_explicit_target_parameters_are_left_as_given(tmp_path):
    path = save_tiny_model(FAMILY, tmp_path / "m")
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(
        fast, target_modules=ATTENTION + MLP, target_parameters=["mlp.experts.down_proj"]
    )
    assert _adapted_experts(fast) == {"down_proj"}


def test_a_regex_is_peft_s_and_adds_no_experts(tmp_path):
    path = save_tiny_model(FAMILY, tmp_path / "m")
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, target_modules=r".*self_attn\.(q|v)_proj")
    assert _adapted_experts(fast) == set()


def test_qwen3_moe_keeps_peft_s_own_mapping(tmp_path):
    """PEFT 0.21 maps gate/up/down_proj of Qwen3-MoE onto its experts (gate + up fused at twice
    the rank); fastlm adds nothing there, so the adapter equals PEFT's."""
    pytest.importorskip("transformers.models.qwen3_moe")
    path = save_tiny_model("qwen3_moe", tmp_path / "m")
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, target_modules=ATTENTION + MLP, r=4)
    assert _adapted_experts(fast) == {"gate_up_proj", "down_proj"}
    gate_up = [m for m in fast.modules() if getattr(m, "parameter_name", "") == "gate_up_proj"]
    assert gate_up[0].r["default"] == 8  # PEFT's fused rank, not fastlm's
