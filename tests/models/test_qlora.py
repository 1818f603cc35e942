"""QLoRA: fastlm on a bitsandbytes NF4 model vs the unpatched HF model + PEFT on the same model.

Both sides load the same tiny checkpoint with the same NF4 config (double-quantised absmax, fp32
compute on the CPU), so their 4-bit weights are identical (checked). fastlm dequantises in its
own fused LoRA Functions; transformers goes through bitsandbytes' Linear4bit. The dequantised
weights are bit-identical, so only matmul order differs: relative error ≤ 1e-4 on the loss and
every LoRA gradient (‖g_fast − g_hf‖ / ‖g_hf‖), as for 16-bit LoRA.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_architectures import _loss_and_lora_grads, _relative_error
from tiny_models import save_tiny_model, tiny_batch
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.api import nf4_config
from fastlm.errors import UnsupportedKeywordError
from fastlm.models import fused_report

pytest.importorskip("bitsandbytes")

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 1e-4


def _qlora_pair(tmp_path, model_type, checkpointing, device="cpu", dtype=torch.float32):
    path = save_tiny_model(model_type, tmp_path / model_type)
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device, quantization_config=nf4_config(dtype)
    )
    reference = get_peft_model(
        reference,
        LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False),
    )
    fast, _ = FastModel.from_pretrained(path, dtype=dtype, device_map=device, load_in_4bit=True)
    fast = FastModel.get_peft_model(
        fast, r=4, lora_alpha=8, init_lora_weights=False, use_gradient_checkpointing=checkpointing
    )
    reference_lora = {n: p for n, p in reference.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in fast.named_parameters():
            if "lora_" in name:
                param.copy_(reference_lora[name])
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    reference.train()
    fast.train()
    return reference, fast


def _packed_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if getattr(p, "quant_state", None)}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_qlora_loss_and_lora_gradients_match_hf(tmp_path, model_type, checkpointing):
    reference, fast = _qlora_pair(tmp_path, model_type, checkpointing)
    expected_packed, actual_packed = _packed_weights(reference), _packed_weights(fast)
    assert len(actual_packed) == len(PROJECTIONS) * fast.config.num_hidden_layers
    for name, packed in expected_packed.items():
        assert torch.equal(actual_packed[name], packed), name  # same 4-bit model on both sides
    assert all(row["fused"] for row in fused_report(fast)), fused_report(fast)

    batch = tiny_batch()
    expected, expected_grads = _loss_and_lora_grads(reference, batch)
    actual, actual_grads = _loss_and_lora_grads(fast, batch)

    assert actual.logits is None  # the fused cross-entropy ran
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * abs(expected.loss.item())
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert _relative_error(actual_grads[name], grad) <= RTOL, name


def test_qlora_saves_no_dense_copy_of_a_4bit_weight(tmp_path):
    """Between forward and backward only packed 4-bit weights are kept, never a dequantised one."""
    _, fast = _qlora_pair(tmp_path, "llama", checkpointing=False)
    dense_shapes = {tuple(p.quant_state.shape) for p in _packed_weights(fast).values()}
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fast(**tiny_batch()).loss
    assert any(t.dtype == torch.uint8 for t in saved)  # the packed weights are what is saved
    dense = [tuple(t.shape) for t in saved if t.is_floating_point()]
    assert not dense_shapes.intersection(dense), dense_shapes.intersection(dense)
    loss.backward()


def test_qlora_trains_and_unpatched_model_matches(tmp_path):
    reference, fast = _qlora_pair(tmp_path, "qwen2", checkpointing=True)  # biased q/k/v
    batch = tiny_batch(seed=1)
    curves = []
    for model in (reference, fast):
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(10):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    expected, actual = map(torch.tensor, curves)
    assert expected[-1] < expected[0]
    assert torch.allclose(actual, expected, rtol=1e-3, atol=0), (actual - expected).abs().max()


def test_qlora_refuses_full_finetuning_and_other_quant_types(tmp_path):
    from transformers import BitsAndBytesConfig

    path = save_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="full_finetuning"):
        FastModel.from_pretrained(path, load_in_4bit=True, full_finetuning=True)
    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    with pytest.raises(UnsupportedKeywordError, match="NF4"):
        FastModel.from_pretrained(path, load_in_4bit=True, quantization_config=fp4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real Triton kernels)")
@pytest.mark.parametrize("checkpointing", [True, "fastlm"], ids=["checkpointed", "offloaded"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_gpu_qlora_fp32_matches_hf(tmp_path, model_type, checkpointing):
    """On the GPU: the Triton dequant kernel and bitsandbytes' CUDA path, fp32 compute, 1e-4."""
    reference, fast = _qlora_pair(tmp_path, model_type, checkpointing, device="cuda")
    expected, expected_grads = _loss_and_lora_grads(reference, tiny_batch())
    actual, actual_grads = _loss_and_lora_grads(fast, tiny_batch())
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * abs(expected.loss.item())
    for name, grad in expected_grads.items():
        assert _relative_error(actual_grads[name], grad) <= RTOL, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 QLoRA numerics on the GPU")
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_gpu_qlora_bf16_is_as_close_to_fp32_as_hf(tmp_path, model_type):
    """bf16 QLoRA (NF4 base, bf16 compute, fp32 adapters, autocast) vs the fp32-compute NF4
    model over 16 batches: fastlm's mean error (loss; all LoRA gradients together) is at most
    1.25× that of HF + PEFT + bitsandbytes in bf16 (+1e-3), as for 16-bit LoRA."""
    truth_model, _ = _qlora_pair(tmp_path / "fp32", model_type, True, device="cuda")
    hf16, fast16 = _qlora_pair(
        tmp_path / "bf16", model_type, True, device="cuda", dtype=torch.bfloat16
    )
    truth_lora = {n: p for n, p in truth_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for model in (hf16, fast16):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(truth_lora[name])
    errors = {"hf": [], "ours": [], "hf_loss": [], "ours_loss": []}
    for seed in range(16):
        batch = tiny_batch(seed=seed)
        truth, truth_grads = _loss_and_lora_grads(truth_model, batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hf, hf_grads = _loss_and_lora_grads(hf16, batch)
            ours, our_grads = _loss_and_lora_grads(fast16, batch)

        def flat(grads, names=tuple(truth_grads)):
            return torch.cat([grads[n].flatten() for n in names])

        errors["hf"].append(_relative_error(flat(hf_grads), flat(truth_grads)))
        errors["ours"].append(_relative_error(flat(our_grads), flat(truth_grads)))
        errors["hf_loss"].append(abs(hf.loss.item() - truth.loss.item()) / truth.loss.item())
        errors["ours_loss"].append(abs(ours.loss.item() - truth.loss.item()) / truth.loss.item())
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    print(f"{model_type} QLoRA bf16 mean errors vs fp32 compute: {mean}")
    assert mean["ours"] <= 1.25 * mean["hf"] + 1e-3
    assert mean["ours_loss"] <= 1.25 * mean["hf_loss"] + 1e-3
