"""Gemma 4 text with its mixture-of-experts block (``enable_moe_block``): fastlm vs transformers'
per-expert loop + PEFT.

The tiny model (tiny_models.GEMMA4_TEXT_MOE) is the dense Gemma 4 one (sliding and full layers
with their own head_dim, k = v on the full layers, two KV-sharing layers, per-layer inputs, a
final-logit soft-cap) with a MoE block in each of its five layers, beside the dense MLP: a
router reading the residual stream (scale and per-expert scale drawn off 1) that sends each token
to 2 of 5 GeGLU experts of width 27, one of which no token reaches (gemma4_moe_extras). The
reference is unpatched transformers with its eager experts (``experts_implementation="eager"``)
and PEFT's LoRA: on attention and the dense MLP (Linear layers) and on the experts
(``target_parameters``, a ParamWrapper per parameter). fastlm patches the layer's experts call
alone (grouped GEMMs); the layer, its router and the rest stay transformers'. Tolerance: 1e-4
relative on the loss and on every gradient, fp32 on CPU, on a padded batch; plain, checkpointed
and offloaded (use_gradient_checkpointing="unsloth").
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.gemma4", reason="transformers without Gemma 4")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_architectures import (  # noqa: E402
    _assert_same_loss_curve,
    assert_bf16_as_close_to_fp32_as_hf,
)
from tiny_models import (  # noqa: E402
    GEMMA4_TEXT_MOE,
    relative_error,
    save_tiny_model,
    tiny_batch,
    tiny_config,
    train_step,
)
from transformers import AutoModelForCausalLM  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.models import fused_report, spec_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
LAYERS = 5  # every layer has a MoE block
EXPERTS, TOP_K = 5, 2
STARVED = 4  # the expert no token reaches (gemma4_moe_extras)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What fastlm's get_peft_model adds for the MLP names on Gemma 4's experts (no "mlp." in the
# path: the layer owns them), and what the reference is given.
EXPERT_PARAMETERS = ["experts.down_proj", "experts.gate_up_proj"]
ROUTER = ("router.proj.weight", "router.scale", "router.per_expert_scale")


def _reference(path, dtype=torch.float32, device="cpu"):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager", device_map=device
    )


def _pair(tmp_path, checkpointing, device="cpu", dtype=torch.float32):
    """(transformers + PEFT with eager experts, fastlm), same weights and LoRA (B != 0). fastlm
    is given the seven names alone and adapts the experts from them, as Unsloth scripts expect;
    the reference is given PEFT's target_parameters (load_state_dict checks they agree)."""
    path = save_tiny_model(GEMMA4_TEXT_MOE, tmp_path / GEMMA4_TEXT_MOE)
    lora = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = get_peft_model(
        _reference(path, dtype, device), LoraConfig(target_parameters=EXPERT_PARAMETERS, **lora)
    )
    fast, _ = FastModel.from_pretrained(path, dtype=dtype, device_map=device)
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    assert sorted(fast.peft_config["default"].target_parameters) == EXPERT_PARAMETERS
    fast.load_state_dict(reference.state_dict())
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    reference.train()
    fast.train()
    return reference, fast


def _assert_match(reference, fast, batch):
    """One step each: loss, router probabilities and every gradient within RTOL; returns
    fastlm's output and gradients."""
    expected, expected_grads = train_step(reference, batch, output_router_logits=True)
    actual, actual_grads = train_step(fast, batch, output_router_logits=True)
    assert actual.logits is None  # the fused cross-entropy (with the soft-cap) ran
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * expected.loss.item()
    # Gemma 4 has no load-balancing loss: none is added, and the router's probabilities are
    # returned as transformers records them.
    assert getattr(expected, "aux_loss", None) is None and actual.aux_loss is None
    assert len(actual.router_logits) == len(expected.router_logits) == LAYERS
    for got, want in zip(actual.router_logits, expected.router_logits):
        assert relative_error(got, want) <= RTOL
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= RTOL, name
    return actual, actual_grads


def _assert_an_expert_without_tokens(output):
    """Every layer's routing left STARVED without tokens; the others all got some."""
    seen = torch.zeros(EXPERTS, dtype=torch.long)
    for probabilities in output.router_logits:
        counts = torch.bincount(
            torch.topk(probabilities, TOP_K).indices.flatten(), minlength=EXPERTS
        )
        assert counts[STARVED] == 0, counts
        seen += counts
    assert (seen[:STARVED] > 0).all(), seen


@pytest.mark.parametrize(
    "checkpointing", [False, True, "unsloth"], ids=["plain", "checkpointed", "offloaded"]
)
def test_loss_and_lora_gradients_match_hf(tmp_path, checkpointing, grouped_calls):
    reference, fast = _pair(tmp_path, checkpointing)
    report = fused_report(fast)
    assert all(row["fused"] for row in report), report
    grouped = [row["module"] for row in report if "(grouped)" in row["module"]]
    assert grouped == [
        f"base_model.model.model.layers.{layer}.experts.{param} (grouped)"
        for layer in range(LAYERS)
        for param in ("gate_up_proj", "down_proj")
    ]
    assert all(row["lora"] for row in report if "(grouped)" in row["module"])
    actual, grads = _assert_match(reference, fast, tiny_batch())
    _assert_an_expert_without_tokens(actual)
    # The recompute of a checkpointed layer runs its experts again.
    assert len(grouped_calls) == LAYERS * (2 if checkpointing else 1)
    assert sum(".experts." in n for n in grads) == LAYERS * 2 * 2  # (gate_up, down) x (A, B)
    assert sum(".mlp." in n for n in grads) == LAYERS * 3 * 2
    assert sum(".self_attn." in n for n in grads) > 0


def test_a_trainable_router_matches_hf(tmp_path):
    """Router weights that train (its projection, its scale and its per-expert scale): their
    gradients reach them through the routing weights, which the grouped experts multiply by."""
    reference, fast = _pair(tmp_path, checkpointing=False)
    for model in (reference, fast):
        for name, param in model.named_parameters():
            if name.endswith(ROUTER):
                param.requires_grad_(True)
    _, grads = _assert_match(reference, fast, tiny_batch())
    for suffix in ROUTER:
        assert sum(name.endswith(suffix) for name in grads) == LAYERS, suffix


def test_peft_wrapping_after_the_patch_still_runs_grouped(tmp_path, grouped_calls, monkeypatch):
    """PEFT's own get_peft_model on a model that already ran (its experts got the grouped forward
    before LoRA wrapped them): the ParamWrappers now outside them run grouped too, and PEFT never
    adds B·A to a weight stack."""
    path = save_tiny_model(GEMMA4_TEXT_MOE, tmp_path / GEMMA4_TEXT_MOE)
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"])
    config["target_parameters"] = EXPERT_PARAMETERS
    reference = get_peft_model(_reference(path), LoraConfig(**config))
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    with torch.no_grad():
        fast(**tiny_batch())
    assert len(grouped_calls) == LAYERS
    fast = get_peft_model(fast, LoraConfig(**config))
    fast.load_state_dict(reference.state_dict())
    reference.train()
    fast.train()
    expected, expected_grads = train_step(reference, tiny_batch(), output_router_logits=True)
    stacks = []
    monkeypatch.setattr(
        torch.nn.utils.parametrize, "register_parametrization", lambda *a, **k: stacks.append(a)
    )
    actual, actual_grads = train_step(fast, tiny_batch(), output_router_logits=True)
    assert not stacks and len(grouped_calls) == 2 * LAYERS
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * expected.loss.item()
    assert expected_grads.keys() == actual_grads.keys()
    assert sum(".experts." in n for n in actual_grads) == LAYERS * 2 * 2
    for name, grad in expected_grads.items():
        assert relative_error(actual_grads[name], grad) <= RTOL, name


@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "offloaded"])
def test_qlora_matches_hf_on_the_same_4bit_weights(tmp_path, checkpointing, grouped_calls):
    """load_in_4bit: bitsandbytes quantises the linears (the router's projection too, on both
    sides) and fastlm stores the experts NF4 (nf4_experts.py); the reference computes with the
    format's values of the same bytes (its linears and its experts), as test_moe_qlora.py does
    for the other MoE families."""
    pytest.importorskip("bitsandbytes")
    from nf4_format import nf4_dequantize, run_4bit_layers_from_format
    from tiny_models import copy_lora, experts_weights

    from fastlm.models.nf4_experts import is_nf4_expert_weight
    from fastlm.quant import nf4_config

    path = save_tiny_model(GEMMA4_TEXT_MOE, tmp_path / GEMMA4_TEXT_MOE)
    fast, _ = FastModel.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    experts = experts_weights(fast)
    assert len(experts) == 2 * LAYERS and all(map(is_nf4_expert_weight, experts.values()))
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", experts_implementation="eager",
        quantization_config=nf4_config(torch.float32),
    )  # fmt: skip
    run_4bit_layers_from_format(reference)
    assert hasattr(reference.model.layers[0].router.proj.weight, "quant_state")
    with torch.no_grad():
        for name, weight in experts.items():
            module, param = name.rsplit(".", 1)
            dense = nf4_dequantize(weight.packed, weight.nf4_state, torch.float32)
            getattr(reference.get_submodule(module), param).copy_(dense)
    lora = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = get_peft_model(reference, LoraConfig(target_parameters=EXPERT_PARAMETERS, **lora))
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    copy_lora(reference, fast)
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    reference.train()
    fast.train()
    _, grads = _assert_match(reference, fast, tiny_batch())
    assert sum(".experts." in n for n in grads) == LAYERS * 2 * 2
    assert len(grouped_calls) == LAYERS * (2 if checkpointing else 1)


def test_twenty_steps_follow_the_same_loss_curve(tmp_path):
    reference, fast = _pair(tmp_path, "unsloth")
    _assert_same_loss_curve(reference, fast, tiny_batch(seed=1), 20)


def test_eval_logits_generation_and_unpatch(tmp_path, grouped_calls):
    """Eval logits, and greedy generation with the KV cache (each decoded token routed alone);
    unpatch removes every forward fastlm set, the experts' wrappers' included."""
    reference, fast = _pair(tmp_path, checkpointing=False)
    batch = tiny_batch()
    reference.eval()
    fast.eval()
    with torch.no_grad():
        expected, actual = reference(**batch), fast(**batch)
    assert relative_error(actual.logits, expected.logits) <= RTOL
    prompt = batch["input_ids"][:1, :6]
    generated = [
        m.generate(input_ids=prompt, max_new_tokens=8, do_sample=False) for m in (reference, fast)
    ]
    assert torch.equal(generated[0], generated[1])
    assert len(grouped_calls) == LAYERS * (1 + 8)  # the batch, the prompt, 7 decoding steps
    patched = [m for m in fast.modules() if "forward" in m.__dict__]
    assert sum(type(m).__name__ == "ParamWrapper" for m in patched) == LAYERS
    FastModel.unpatch(fast)
    assert not [m for m in fast.modules() if "forward" in m.__dict__]


def test_adapter_round_trip_on_unpatched_transformers(tmp_path):
    """save_pretrained writes a plain PEFT adapter: PeftModel.from_pretrained on unpatched
    transformers (eager experts) gives the fastlm model's eval logits."""
    _, fast = _pair(tmp_path, checkpointing=False)
    fast.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        _reference(tmp_path / GEMMA4_TEXT_MOE), tmp_path / "adapter"
    ).eval()
    lora = {n: v for n, v in loaded.state_dict().items() if "lora_" in n}
    assert lora.keys() == {n for n in fast.state_dict() if "lora_" in n}
    assert sum(n.endswith(".experts") for n in {n.split(".lora_")[0] for n in lora}) == LAYERS
    fast.eval()
    with torch.no_grad():
        expected, actual = fast(**tiny_batch()).logits, loaded(**tiny_batch()).logits
    assert relative_error(actual, expected) < 1e-5


def test_merged_16bit_reloads_in_plain_transformers(tmp_path):
    """merged_16bit: every expert slice gets W_e + s·B_e A_e; the folder loads in plain
    transformers (eager experts) with no missing or unexpected keys and the adapter model's
    logits; without the experts' LoRA the logits would differ."""
    from fastlm.export import save_pretrained_merged

    path = save_tiny_model(GEMMA4_TEXT_MOE, tmp_path / GEMMA4_TEXT_MOE)
    model, tokenizer = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(
        model, r=4, lora_alpha=8, init_lora_weights=False, target_parameters=EXPERT_PARAMETERS,
        target_modules=["q_proj", "o_proj"],
    )  # fmt: skip
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, experts_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        without_experts = _reference(path)
        without_experts.load_state_dict(
            {k: v for k, v in reloaded.state_dict().items() if ".experts." not in k}, strict=False
        )
        assert not torch.allclose(without_experts.eval()(**batch).logits, expected, atol=1e-3)


def test_gguf_and_merged_4bit_are_refused_in_one_line(tmp_path):
    """GGUF: the MoE block is written (tests/export/test_gguf_gemma4_moe.py), but tiny_models'
    layer order has KV-shared layers that read other layers in llama.cpp, as the dense model's;
    merged_4bit: bitsandbytes would leave the experts 16-bit. Both before writing anything."""
    pytest.importorskip("gguf")
    from fastlm.export import save_pretrained_gguf, save_pretrained_merged

    path = save_tiny_model(GEMMA4_TEXT_MOE, tmp_path / GEMMA4_TEXT_MOE)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    with pytest.raises(NotImplementedError, match="llama.cpp's KV-shared full_attention layers"):
        save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, quantization_method="f16")
    assert not (tmp_path / "gguf").exists()
    model = FastModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    with pytest.raises(NotImplementedError, match=r"merged_4bit: model\.layers\.0\.experts "):
        save_pretrained_merged(model, tmp_path / "m4", tokenizer, "merged_4bit")
    assert not (tmp_path / "m4").exists()


def test_the_spec_patches_the_experts_call_alone():
    """One spec for dense and MoE Gemma 4: the MoE config loads; fastlm runs no router of its
    own (the layer's, transformers', runs) and adds no aux loss."""
    spec = spec_for(tiny_config(GEMMA4_TEXT_MOE))
    assert spec.moe.patched == "experts" and spec.moe.aux_loss_coef_attr is None
    assert spec_for(tiny_config("gemma4_text")) is spec


def test_bf16_is_as_close_to_fp32_as_hf(tmp_path, device):
    """bf16 under autocast against the fp32 truth over 16 batches: fastlm's mean error (grouped
    experts, LoRA on them) at most 1.25× that of transformers + PEFT (test_architectures')."""

    def pair(folder, dtype):
        return _pair(folder, True, device=device, dtype=dtype)

    assert_bf16_as_close_to_fp32_as_hf(tmp_path, pair, device, GEMMA4_TEXT_MOE)
