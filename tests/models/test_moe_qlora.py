"""QLoRA on mixture-of-experts models: ``load_in_4bit`` stores the experts' 3-D weights NF4 too
(``fastlm/models/nf4_experts.py``), and training matches transformers + PEFT on the same 4-bit
model.

The reference loads the same checkpoint with the same NF4 config (its linear layers computing
with the format's values of their bytes, ``tests/nf4_format.py``), and its experts are set to
the format's values of fastlm's packed expert bytes. So both sides hold the same weights, and
the loss, the aux loss and every LoRA gradient must agree within 1e-4 relative, as for 16-bit
LoRA (``test_moe.py``)."""

from __future__ import annotations

import pytest
import torch
from nf4_format import nf4_dequantize, run_4bit_layers_from_format
from peft import LoraConfig, get_peft_model
from test_moe import FAMILIES, FAMILY_PARAMS, RTOL
from tiny_models import (
    copy_lora,
    experts_weights,
    relative_error,
    save_tiny_model,
    tiny_batch,
    train_step,
)
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.models.nf4_experts import NF4ExpertWeight, is_nf4_expert_weight
from fastlm.quant import nf4_config

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


def _experts_weights(model, family: str) -> dict[str, torch.Tensor]:
    """Every experts module's two 3-D weights, by name (PEFT wrappers looked through)."""
    found = experts_weights(model)
    assert len(found) == 2 * FAMILIES[family].moe_layers
    return found


def _qlora_pair(tmp_path, family: str, checkpointing):
    spec = FAMILIES[family]
    path = save_tiny_model(family, tmp_path / family)
    lora = dict(r=4, lora_alpha=8, target_modules=spec.target_modules, init_lora_weights=False)
    if spec.target_parameters:
        lora["target_parameters"] = spec.target_parameters
    fast, _ = FastModel.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    packed = {name: w for name, w in _experts_weights(fast, family).items()}
    reference = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        device_map="cpu",
        experts_implementation="eager",
        quantization_config=nf4_config(torch.float32),
    )
    run_4bit_layers_from_format(reference)
    with torch.no_grad():  # the experts the format defines from fastlm's bytes
        for name, weight in packed.items():
            module_name, param = name.rsplit(".", 1)
            dense = nf4_dequantize(weight.packed, weight.nf4_state, torch.float32)
            getattr(reference.get_submodule(module_name), param).copy_(dense)
    torch.manual_seed(0)
    reference = get_peft_model(reference, LoraConfig(**lora))
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    copy_lora(reference, fast)
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    reference.train()
    fast.train()
    return reference, fast


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "unsloth"])
def test_qlora_experts_are_nf4_and_training_matches_hf(tmp_path, family, checkpointing):
    reference, fast = _qlora_pair(tmp_path, family, checkpointing)
    experts = _experts_weights(fast, family)
    assert all(is_nf4_expert_weight(w) and not w.requires_grad for w in experts.values())
    for weight in experts.values():  # 4.5 bits a weight (absmax double-quantised), not 32
        assert weight.nbytes_stored() < weight.numel() * 0.6
    expected, expected_grads = train_step(reference, tiny_batch())
    actual, actual_grads = train_step(fast, tiny_batch())
    assert actual.logits is None  # the fused cross-entropy ran
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * expected.loss.item()
    assert abs(actual.aux_loss.item() - expected.aux_loss.item()) <= RTOL * expected.aux_loss
    assert expected_grads.keys() == actual_grads.keys()
    assert sum(".experts." in n for n in expected_grads) == 4 * FAMILIES[family].moe_layers
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= RTOL, name


def test_an_nf4_expert_weight_reads_back_as_the_format_defines(tmp_path):
    """Every operation sees the format's values; writes in place are refused; a whole copy_
    re-quantises (a state dict loading)."""
    torch.manual_seed(0)
    dense = torch.randn(5, 48, 40)
    weight = NF4ExpertWeight.quantize(dense)
    expected = nf4_dequantize(weight.packed, weight.nf4_state, torch.float32)
    assert weight.shape == dense.shape and weight.dtype == dense.dtype
    assert torch.equal(weight.dequantize(), expected)
    assert torch.equal(weight.transpose(1, 2), expected.transpose(1, 2))
    assert torch.equal(weight[3], expected[3])
    assert 0 < (expected - dense).abs().max() <= dense.abs().max() / 7  # 4-bit, not a copy
    parameter = torch.nn.Parameter(weight, requires_grad=False)
    assert is_nf4_expert_weight(parameter) and is_nf4_expert_weight(parameter.detach())
    copied = parameter.detach().to(torch.float32, copy=True)  # what a merge starts from
    assert type(copied) is torch.Tensor and torch.equal(copied, expected)
    with pytest.raises(NotImplementedError, match="frozen"):
        parameter.add_(1.0)
    parameter.copy_(2 * expected)  # re-quantised: the same codes, absmax within its 8-bit step
    assert relative_error(parameter.dequantize(), 2 * expected) <= 1e-2


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_load_in_4bit_quantises_linears_and_experts_and_says_so(tmp_path, family, caplog):
    path = save_tiny_model(family, tmp_path / family)
    with caplog.at_level("INFO", logger="fastlm"):
        model, _ = FastModel.from_pretrained(
            path, dtype=torch.float32, device_map="cpu", load_in_4bit=True
        )
    quantised = [n for n, p in model.named_parameters() if hasattr(p, "quant_state")]
    assert any(".self_attn." in n or ".linear_attn." in n for n in quantised)  # bitsandbytes'
    experts = _experts_weights(model, family)
    assert all(is_nf4_expert_weight(w) for w in experts.values())
    lines = [r.getMessage() for r in caplog.records if "stored NF4" in r.getMessage()]
    assert len(lines) == 1 and f"{len(experts)} experts weights" in lines[0], lines


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_merged_16bit_of_a_qlora_moe_model_is_the_dequantised_experts_plus_lora(tmp_path, family):
    reference, fast = _qlora_pair(tmp_path, family, False)
    out = tmp_path / "merged"
    fast.save_pretrained_merged(str(out), save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = reference.merge_and_unload()
    merged_weights = dict(merged.named_parameters())
    for name, weight in expected.named_parameters():
        if ".experts." in name:
            assert relative_error(merged_weights[name], weight) <= 1e-6, name
