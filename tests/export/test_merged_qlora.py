"""Merging a QLoRA model (4-bit NF4 base): merged_16bit into the dequantised weights or into the
original 16-bit checkpoint, and merged_4bit (re-quantised NF4) for QLoRA and 16-bit LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from nf4_format import run_4bit_layers_from_format
from peft import PeftModel
from test_merged import _logits, _trained
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.export import save_pretrained_merged
from fastlm.kernels.nf4_dequant import dequantize_nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _has(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _qlora(tmp_path, model_type="llama"):
    path = save_tiny_model(model_type, tmp_path / f"src-{model_type}")
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu", load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    return model, tokenizer, path


# This year's families where transformers has them (5.23: both).
NEW_FAMILIES = [
    pytest.param(t, marks=pytest.mark.skipif(not _has(t), reason=f"transformers without {t}"))
    for t in ("gemma4_text", "qwen3_5_text")
]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", *NEW_FAMILIES])
def test_qlora_merged_16bit_equals_the_qlora_model(tmp_path, model_type):
    model, tokenizer, _ = _qlora(tmp_path, model_type)
    expected = _logits(model)  # the 4-bit model with its adapter, as trained
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    # W_merged = dequant(W4) + s·B·A in fp32: only summation order differs.
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-4, rtol=1e-4)


def test_qlora_merged_into_the_original_checkpoint(tmp_path):
    model, tokenizer, source = _qlora(tmp_path)
    out = save_pretrained_merged(
        model, tmp_path / "merged", tokenizer, "merged_16bit", base_checkpoint=source
    )
    adapter = save_pretrained_merged(model, tmp_path / "adapter", tokenizer, "lora")
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    expected = _logits(PeftModel.from_pretrained(original, adapter))  # 16-bit base + adapter
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, _logits(model), atol=1e-3)  # the base choice matters


def test_base_checkpoint_must_match(tmp_path):
    model, tokenizer, _ = _qlora(tmp_path)
    other = save_tiny_model("llama", tmp_path / "src-other", hidden_size=48)
    with pytest.raises(ValueError, match="shape"):
        save_pretrained_merged(
            model, tmp_path / "m", tokenizer, "merged_16bit", base_checkpoint=other
        )
    with pytest.raises(FileNotFoundError, match="base_checkpoint"):
        save_pretrained_merged(
            model, tmp_path / "m", tokenizer, "merged_16bit", base_checkpoint=tmp_path
        )
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("source", ["qlora", "lora"])
def test_merged_4bit_reloads_as_nf4_with_the_merged_weights(tmp_path, source):
    if source == "qlora":
        model, tokenizer, _ = _qlora(tmp_path)
    else:
        model, tokenizer, _ = _trained(tmp_path)
    merged16 = save_pretrained_merged(model, tmp_path / "m16", tokenizer, "merged_16bit")
    out = save_pretrained_merged(model, tmp_path / "m4", tokenizer, "merged_4bit")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    dense = AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.float32)
    q_proj = reloaded.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert type(reloaded.lm_head).__name__ == "Linear"  # the head stays unquantised
    # Every 4-bit weight is exactly NF4(merged 16-bit weight).
    dense_weights = dict(dense.named_parameters())
    quantised = [(n, p) for n, p in reloaded.named_parameters() if hasattr(p, "quant_state")]
    assert len(quantised) == 7 * reloaded.config.num_hidden_layers
    for name, packed in quantised:
        # Quantised where the export quantised (the model is on the CPU): the nested absmax
        # offset is a mean, whose last bit depends on the device's reduction order.
        dense_weight = dense_weights[name].float()
        expected, state = bnb_functional.quantize_4bit(
            dense_weight, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(packed.data.cpu(), expected), name
        assert torch.equal(
            dequantize_nf4(packed, packed.quant_state, torch.float32).cpu(),
            dequantize_nf4(expected, state, torch.float32),
        ), name


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_merged_4bit_of_this_years_families_reloads_with_the_same_logits(tmp_path, model_type):
    """merged_4bit of a QLoRA Gemma 4 / Qwen3.5: plain transformers reloads it as NF4, with the
    logits of the merged 16-bit export quantised by transformers' own NF4 loading."""
    from fastlm.quant import nf4_config

    model, tokenizer, _ = _qlora(tmp_path, model_type)
    merged16 = save_pretrained_merged(model, tmp_path / "m16", tokenizer, "merged_16bit")
    out = save_pretrained_merged(model, tmp_path / "m4", tokenizer, "merged_4bit")
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    requantised = AutoModelForCausalLM.from_pretrained(
        merged16, dtype=torch.float32, quantization_config=nf4_config(torch.float32)
    )
    packed = {n: p for n, p in reloaded.named_parameters() if hasattr(p, "quant_state")}
    expected = {n: p for n, p in requantised.named_parameters() if hasattr(p, "quant_state")}
    assert packed and packed.keys() == expected.keys()
    for name, weight in packed.items():
        assert torch.equal(weight.data, expected[name].data), name
    # The same bytes through the format's values (bitsandbytes' CPU matmul refuses odd sizes).
    for loaded in (reloaded, requantised):
        run_4bit_layers_from_format(loaded)
    torch.testing.assert_close(_logits(reloaded), _logits(requantised), atol=0, rtol=0)
    assert not torch.allclose(_logits(reloaded), _logits(model), atol=0, rtol=0)  # re-quantised


def test_qlora_gguf_export_uses_the_dequantised_merged_weights(tmp_path):
    import gguf
    from test_gguf import spm_tokenizer

    from fastlm.export import save_pretrained_gguf
    from fastlm.export.gguf_writer import gguf_tensors, merged_state

    model, tokenizer, _ = _qlora(tmp_path)
    merged16 = save_pretrained_merged(model, tmp_path / "m16", tokenizer, "merged_16bit")
    dense = AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.float32).state_dict()
    state = dict(merged_state(model))
    assert state.keys() == {k for k in dense if "rotary" not in k}
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, dense[name], rtol=0, atol=0)
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "f16", name="q")
    reader = gguf.GGUFReader(out)
    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.LLAMA))
    assert {t.name for t in reader.tensors} == set(expected)
