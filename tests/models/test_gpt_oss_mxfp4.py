"""gpt-oss checkpoints stored MXFP4, as OpenAI ships them: fastlm loads the experts dequantised
(it has no MXFP4 kernels) and says so, they run fastlm's grouped experts, and training matches
transformers + PEFT loading the same checkpoint. With ``load_in_4bit`` fastlm decodes the
experts itself (``fastlm/loading/mxfp4.py``) and stores them NF4: bit for bit what
``load_in_4bit`` of a 16-bit copy gives, so training matches that copy's to 1e-6.

The checkpoint is ``tiny_models.save_tiny_mxfp4_gpt_oss``: the tiny gpt-oss with random
MXFP4-exact experts written as ``*_blocks`` / ``*_scales`` by an encoder that follows the OCP MX
spec (``tiny_models.mxfp4_encode``), not transformers' code. So transformers' decoding is
checked against the format's definition, bit for bit.
"""

from __future__ import annotations

import contextlib

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
    mxfp4_representable,
    relative_error,
    save_tiny_mxfp4_gpt_oss,
    tiny_batch,
    train_step,
)
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.errors import UnsupportedKeywordError
from fastlm.loading.mxfp4 import E2M1_VALUES, dequantize_mxfp4
from fastlm.models import fused_report

pytest.importorskip("transformers.integrations.mxfp4")
pytestmark = pytest.mark.usefixtures("one_thread")

DEQUANTISED = "MXFP4 experts dequantised to torch.float32 (fastlm has no MXFP4 kernels)"
NF4 = "MXFP4 experts decoded and stored NF4 (QLoRA)"


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


def test_dequantize_mxfp4_follows_the_mx_spec():
    """fastlm's decoder on the block worked by hand above (scale byte 124 = 2^-3; bytes 0x92,
    0x07 = codes 2, 9 then 7, 0: 1, -0.5, 6, 0), a NaN scale (255), and on every experts weight
    of the tiny checkpoint: decode(encode(w)) is w exactly, in gpt-oss's transposed layout."""
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, :2] = torch.tensor([0x92, 0x07])
    decoded = dequantize_mxfp4(blocks, torch.tensor([124], dtype=torch.uint8))
    assert decoded.shape == (32,) and decoded.dtype == torch.float32
    assert decoded[:3].tolist() == [0.125, -0.0625, 0.75] and not decoded[3:].any()
    assert dequantize_mxfp4(blocks, torch.tensor([255], dtype=torch.uint8)).isnan().all()
    assert list(E2M1_VALUES) == [e2m1_value(code) for code in range(16)]
    generator = torch.Generator().manual_seed(0)
    for shape, exponents in [((5, 96, 128), (-4, -2)), ((5, 64, 96), (-8, -6))]:
        weight = mxfp4_representable(shape, exponents, generator)  # (E, in, out)
        rows = dequantize_mxfp4(*mxfp4_encode(weight))  # (E, out, in)
        assert torch.equal(rows.transpose(1, 2), weight)
        assert torch.equal(dequantize_mxfp4(*mxfp4_encode(weight), torch.bfloat16), rows.bfloat16())


def _qlora_from_mxfp4_and_from_its_16bit_copy(tmp_path, caplog=None):
    """(from the MXFP4 file with load_in_4bit, from the 16-bit copy with load_in_4bit): the copy
    written the documented way (loaded dequantised, save_pretrained_merged merged_16bit)."""
    pytest.importorskip("bitsandbytes")
    path, expected = save_tiny_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4")
    model, tokenizer = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    copy = model.save_pretrained_merged(tmp_path / "fp", tokenizer, save_method="merged_16bit")
    plain = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    assert all(torch.equal(w, expected[n]) for n, w in experts_weights(plain).items())
    del model, plain
    options = dict(dtype=torch.float32, device_map="cpu", load_in_4bit=True)
    with contextlib.ExitStack() as stack:
        if caplog is not None:
            stack.enter_context(caplog.at_level("INFO"))
            caplog.clear()
        from_mxfp4, _ = FastModel.from_pretrained(path, **options)
    from_copy, _ = FastModel.from_pretrained(copy, **options)
    return from_mxfp4, from_copy


def _nf4_state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of a bitsandbytes QuantState: absmax, code, and the nested state's."""
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset.reshape(1), state.state2.absmax, state.state2.code]
    return tensors


def _assert_same_nf4(a, b, name: str) -> None:
    assert a.quant_type == b.quant_type == "nf4" and a.blocksize == b.blocksize, name
    assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and a.nested == b.nested, name
    for x, y in zip(_nf4_state_tensors(a), _nf4_state_tensors(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_load_in_4bit_on_an_mxfp4_checkpoint_is_its_16bit_copy_in_nf4_bit_for_bit(tmp_path, caplog):
    """load_in_4bit=True on the MXFP4 file: every NF4 expert stack and every NF4 linear holds
    the bytes and quant state that load_in_4bit=True of its 16-bit copy gives; every other
    weight is equal too. One fastlm line says which path ran; transformers' load report (the
    experts' _blocks/_scales unexpected, their parameters missing) is not shown."""
    from fastlm.models.nf4_experts import is_nf4_expert_weight
    from fastlm.quant import packed_weights

    from_mxfp4, from_copy = _qlora_from_mxfp4_and_from_its_16bit_copy(tmp_path, caplog)
    lines = [r.getMessage() for r in caplog.records if "MXFP4" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"fastlm: {NF4}"), lines
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    experts = experts_weights(from_mxfp4)
    assert experts.keys() == experts_weights(from_copy).keys() and len(experts) == 6
    for name, weight in experts.items():
        other = experts_weights(from_copy)[name]
        assert is_nf4_expert_weight(weight) and is_nf4_expert_weight(other), name
        assert torch.equal(weight.packed, other.packed), name
        _assert_same_nf4(weight.nf4_state, other.nf4_state, name)
    linears = {name: w for name, _, w in packed_weights(from_mxfp4)}
    copies = {name: w for name, _, w in packed_weights(from_copy)}
    assert linears.keys() == copies.keys() and len(linears) == 12  # q k v o, 3 layers
    for name, weight in linears.items():
        assert weight.dtype == torch.uint8 and torch.equal(weight, copies[name]), name
        _assert_same_nf4(weight.quant_state, copies[name].quant_state, name)
    dense = {n: p for n, p in from_mxfp4.named_parameters() if p.dtype.is_floating_point}
    dense_copy = {n: p for n, p in from_copy.named_parameters() if p.dtype.is_floating_point}
    assert dense.keys() == dense_copy.keys()
    assert all(torch.equal(p, dense_copy[n]) for n, p in dense.items() if n not in experts)
    assert from_mxfp4.config.quantization_config.quant_method == "bitsandbytes"


def test_qlora_on_an_mxfp4_checkpoint_trains_as_on_its_16bit_copy(tmp_path):
    """Same NF4 weights, so the same numbers: LoRA on attention and on every experts weight,
    copied across; the loss and every LoRA gradient within 1e-6 relative."""
    from_mxfp4, from_copy = _qlora_from_mxfp4_and_from_its_16bit_copy(tmp_path)
    lora = dict(r=4, lora_alpha=8, target_modules=None, init_lora_weights=False)
    reference = FastModel.get_peft_model(from_copy, use_gradient_checkpointing=False, **lora)
    fast = FastModel.get_peft_model(from_mxfp4, use_gradient_checkpointing=False, **lora)
    copy_lora(reference, fast)
    batch = tiny_batch()
    expected, expected_grads = train_step(reference.train(), batch)
    actual, actual_grads = train_step(fast.train(), batch)
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-6 * expected.loss.item()
    assert actual_grads.keys() == expected_grads.keys() and len(expected_grads) == 36
    for name, grad in expected_grads.items():
        assert "lora" in name and relative_error(actual_grads[name], grad) <= 1e-6, name


def test_streaming_an_mxfp4_checkpoint_in_4bit_is_refused_saying_what_to_do(tmp_path):
    """Weight streaming reads 16-bit safetensors, so it cannot take the MXFP4 experts."""
    pytest.importorskip("bitsandbytes")
    path, _ = save_tiny_mxfp4_gpt_oss(tmp_path / "gpt_oss_mxfp4")
    with pytest.raises(UnsupportedKeywordError, match="MXFP4 checkpoint") as refused:
        FastModel.from_pretrained(
            path, dtype=torch.float32, device_map="cpu", load_in_4bit=True, offload_weights=True
        )
    assert "save_method='merged_16bit'" in str(refused.value)
