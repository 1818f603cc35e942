"""Merging a QLoRA model whose 4-bit rows are not whole blocks, on the CPU: the merged weights
are the NF4 format's values of the packed bytes plus the LoRA delta.

Qwen3 with hidden 80 and heads·head_dim 96: every projection has rows of 80, 96 or 100, none a
multiple of the 64-element block, so blocks span rows; rows of 80 and 96 are where bitsandbytes
0.50.2's CPU dequantisation was seen wrong (off by up to ~1.4 on N(0, 1) weights), so a merge
that used it would fail here. The expected weights come from tests/nf4_format.py, in fp64.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from nf4_format import nf4_dequantize
from tiny_models import save_tiny_model, tiny_batch
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.export import save_pretrained_merged

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 64  # transformers' NF4 block size (fastlm.quant.nf4_config)


def _expected_merged(layer) -> torch.Tensor:
    """W = NF4 values of the packed base weight + s·B·A, in fp64."""
    base = layer.base_layer.weight
    weight = nf4_dequantize(base, base.quant_state, torch.float32).double()
    (adapter,) = layer.active_adapters
    lora_b = layer.lora_B[adapter].weight.detach().double()
    lora_a = layer.lora_A[adapter].weight.detach().double()
    return weight + layer.scaling[adapter] * (lora_b @ lora_a)


def test_odd_shaped_qlora_merge_is_the_format_values_plus_the_lora_delta(tmp_path):
    path = save_tiny_model("qwen3", tmp_path / "src", hidden_size=80)
    model, tokenizer = FastModel.from_pretrained(
        str(path), dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    layers = {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in model.named_modules()
        if hasattr(module, "base_layer") and hasattr(module.base_layer.weight, "quant_state")
    }
    rows = {tuple(m.base_layer.weight.quant_state.shape)[-1] for m in layers.values()}
    assert rows == {80, 96, 100} and not any(row % BLOCK == 0 for row in rows)
    with torch.no_grad():
        expected_logits = model.eval()(**tiny_batch()).logits

    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    merged = safetensors.torch.load_file(out / "model.safetensors")
    assert len(layers) == 7 * model.config.num_hidden_layers
    for key, layer in layers.items():
        expected = _expected_merged(layer)
        assert merged[key].dtype == torch.float32 and merged[key].shape == expected.shape, key
        # fp32 merge (W + s·B·A) vs the same in fp64: fp32 rounding only (3e-8 at most, measured);
        # with bitsandbytes' CPU dequantisation in place of fastlm's the error is 3e-2.
        error = (merged[key].double() - expected).abs().max().item()
        assert error <= 2e-7, (key, error)

    # And the folder is the QLoRA model: only matmul order differs.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(**tiny_batch()).logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
