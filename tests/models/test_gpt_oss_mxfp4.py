"""gpt-oss checkpoints stored MXFP4, as OpenAI ships them: fastlm loads the experts dequantised
(it has no MXFP4 kernels) and says so, they run fastlm's grouped experts, and training matches
transformers + PEFT loading the same checkpoint; ``load_in_4bit`` is refused with a way out,
which works.

The checkpoint is ``tiny_models.save_tiny_mxfp4_gpt_oss``: the tiny gpt-oss with random
MXFP4-exact experts written as ``*_blocks`` / ``*_scales`` by an encoder that follows the OCP MX
spec (``tiny_models.mxfp4_encode``), not transformers' code. So transformers' decoding is
checked against the format's definition, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from test_gpt_oss import LORA, _assert_match
from tiny_models import (
    copy_lora,
    e2m1_value,
    experts_weights,
    mxfp4_encode,
    save_tiny_mxfp4_gpt_oss,
    tiny_batch,
)
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.errors import UnsupportedKeywordError
from fastlm.models import fused_report

pytest.importorskip("transformers.integrations.mxfp4")
pytestmark = pytest.mark.usefixtures("one_thread")

DEQUANTISED = "MXFP4 experts dequantised to torch.float32 (fastlm has no MXFP4 kernels)"


def test_e2m1_codes_and_the_encoder_follow_the_mx_spec():
    """The encoder on a block worked by hand: max |v| 0.75 gives X = floor(log2 0.75) - 2 = -3
    (scale byte 124), and v / 2^-3 = 1, -0.5, 6, 0, ... are codes 0b0010, 0b1001, 0b0111, 0."""
    assert [e2m1_value(c) for c in range(8)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert [e2m1_value(c) for c in range(8, 16)] == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    block = torch.zeros(32)
    block[:3] = torch.tensor([1.0, -0.5, 6.0]) * 2.0**-3
    weight = block.reshape(1, 32, 1)  # (E, in, out): one expert, one output, one block
    blocks, scales = mxfp4_encode(weight)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert scales.tolist() == [[[124]]]
    assert blocks.shape == (1, 1, 1, 16) and blocks[0, 0, 0, :2].tolist() == [0x92, 0x07]
    assert not blocks[0, 0, 0, 2:].any()
    with pytest.raises(ValueError, match="exactly"):
        mxfp4_encode(weight * 1.1)


def test_an_mxfp4_checkpoint_loads_dequantised_fused_and_says_so(tmp_path, caplog):
    """No floating-point experts in the file; fastlm's model holds the format's values exactly
    (fp32, as fastlm trains on CPU), runs them as its grouped experts, is a plain (trainable)
    model, and one log line says the experts were dequantised and to what."""
    path, expected = save_tiny_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4")
    with safe_open(path / "model.safetensors", "pt") as stored:
        names = set(stored.keys())
        assert stored.get_tensor("model.layers.0.mlp.experts.down_proj_blocks").dtype == torch.uint8
    assert {f"{n}_blocks" for n in expected} | {f"{n}_scales" for n in expected} <= names
    assert not names & expected.keys()
    with caplog.at_level("INFO", logger="fastlm"):
        model, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    loaded = experts_weights(model)
    assert loaded.keys() == expected.keys() and len(loaded) == 6
    for name, weight in expected.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], weight), name
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")  # Trainer would refuse it
    rows = [row for row in fused_report(model) if ".mlp.experts." in row["module"]]
    assert len(rows) == 6 and all(row["fused"] and "(grouped)" in row["module"] for row in rows)
    # transformers' own line says "bf16" whatever the dtype: it dequantises to the model's
    lines = [r.getMessage() for r in caplog.records if r.name == "fastlm" and "MXFP4" in r.msg]
    assert len(lines) == 1 and lines[0].startswith(f"fastlm: {DEQUANTISED}"), lines


def test_training_on_an_mxfp4_checkpoint_matches_transformers_and_peft(tmp_path, grouped_calls):
    """Both sides load the same MXFP4 file (transformers by itself: its eager experts, PEFT's
    LoRA on them), LoRA copied across: the loss and every LoRA gradient within 1e-4 relative,
    with fastlm's grouped experts running."""
    path, expected = save_tiny_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4")
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager"
    )
    assert all(torch.equal(w, expected[n]) for n, w in experts_weights(reference).items())
    reference = get_peft_model(reference, LoraConfig(**LORA))
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=False, **LORA)
    copy_lora(reference, fast)
    _assert_match(reference.train(), fast.train(), tiny_batch())
    assert grouped_calls  # the experts ran fastlm's grouped GEMMs


def test_load_in_4bit_on_an_mxfp4_checkpoint_is_refused_saying_what_to_do(tmp_path):
    path, _ = save_tiny_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4")
    with pytest.raises(UnsupportedKeywordError, match="MXFP4 checkpoint") as refused:
        FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu", load_in_4bit=True)
    assert "save_method='merged_16bit'" in str(refused.value)
    assert "load_in_4bit=True." in str(refused.value)


def test_the_refusals_way_out_gives_nf4_experts(tmp_path):
    """What the refusal says to do: load without load_in_4bit, write a 16-bit copy with
    save_pretrained_merged, load that with load_in_4bit=True. The copy holds the format's
    values exactly; loaded 4-bit, its experts are NF4."""
    pytest.importorskip("bitsandbytes")
    from fastlm.models.nf4_experts import is_nf4_expert_weight

    path, expected = save_tiny_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4")
    model, tokenizer = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    copy = model.save_pretrained_merged(tmp_path / "bf16", tokenizer, save_method="merged_16bit")
    plain = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    assert all(torch.equal(w, expected[n]) for n, w in experts_weights(plain).items())
    qlora, _ = FastModel.from_pretrained(
        copy, dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    assert all(is_nf4_expert_weight(w) for w in experts_weights(qlora).values())
