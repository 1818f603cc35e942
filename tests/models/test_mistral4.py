"""Mistral 4 (``mistral4``): fastlm vs unpatched transformers + PEFT.

The tiny model (tiny_models' mistral4) has three layers: a dense MLP in layer 0, MoE blocks in
layers 1 and 2 (9 experts of width 27 in 3 groups of 3; each token's 2 best groups give its 3
experts -- on the test batch the group limit changes the choice of most tokens --, weights
renormalised (+1e-20) and ×2.5; shared experts of width 54), an expert that no token reaches
(starve_expert, made firmer by mistral4_extras), multi-head latent attention (q and kv latents,
RoPE on 8 of each head's 20 q·k dims, interleaved, YaRN with the Llama 4 query scaling inside the
test sequences). The reference is transformers' Mistral4ForCausalLM with its eager experts
(``experts_implementation="eager"``) and PEFT's LoRA: on the latent attention's linears, the
dense MLP and the shared experts (Linear layers) and on the experts (``target_parameters``).
fastlm runs the norms, the MLPs and the MoE blocks (router, grouped experts, shared experts);
the attention modules run transformers' forward with PEFT's LoRA, and fused_report says so.
Tolerance: 1e-4 relative on the loss and on every gradient, fp32 on CPU, on a padded batch;
plain, checkpointed and offloaded (use_gradient_checkpointing="unsloth").
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers.models.mistral4", reason="transformers without Mistral 4")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_architectures import (  # noqa: E402
    _assert_same_loss_curve,
    assert_bf16_as_close_to_fp32_as_hf,
)
from tiny_models import relative_error, save_tiny_model, tiny_batch, tiny_config, train_step  # noqa: E402
from transformers import Mistral4ForCausalLM  # noqa: E402
from transformers.models.mistral4 import modeling_mistral4  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.models import fused_report, moe, spec_for  # noqa: E402
from fastlm.models.mistral4 import MISTRAL4  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = "mistral4"
RTOL = 1e-4
LAYERS, MOE_LAYERS = 3, (1, 2)
EXPERTS, TOP_K = 9, 3
STARVED = 8  # the expert no token reaches (starve_expert)
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def _reference(path, dtype=torch.float32, **kwargs):
    return Mistral4ForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager", **kwargs
    )


def _pair(tmp_path, checkpointing, device="cpu", dtype=torch.float32):
    """(transformers + PEFT with eager experts, fastlm), same weights and LoRA (B != 0). fastlm
    is given no targets and adapts its defaults (the latent attention's linears, the MLPs, the
    experts); the reference is given them by name (load_state_dict checks they agree)."""
    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False)
    config = LoraConfig(target_modules=MLA + MLP, target_parameters=EXPERT_PARAMETERS, **lora)
    reference = get_peft_model(_reference(path, dtype, device_map=device), config)
    fast, _ = FastModel.from_pretrained(path, dtype=dtype, device_map=device)
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    assert sorted(fast.peft_config["default"].target_parameters) == EXPERT_PARAMETERS
    fast.load_state_dict(reference.state_dict())
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return reference.train(), fast.train()


def _assert_match(reference, fast, batch):
    """One step each: loss, router logits and every gradient within RTOL; returns fastlm's
    output and gradients."""
    expected, expected_grads = train_step(reference, batch, output_router_logits=True)
    actual, actual_grads = train_step(fast, batch, output_router_logits=True)
    assert actual.logits is None  # the fused cross-entropy ran
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * expected.loss.item()
    # Mistral 4 has no load-balancing loss: none is added, and the router logits are returned as
    # transformers records them.
    assert getattr(expected, "aux_loss", None) is None and actual.aux_loss is None
    assert len(actual.router_logits) == len(expected.router_logits) == len(MOE_LAYERS)
    for got, want in zip(actual.router_logits, expected.router_logits):
        assert relative_error(got, want) <= RTOL
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= RTOL, name
    return actual, actual_grads


def _routed(logits: torch.Tensor) -> torch.Tensor:
    """The experts (N, k) transformers' router picks from these logits."""
    router = modeling_mistral4.Mistral4TopkRouter(tiny_config(FAMILY))
    router.weight = torch.nn.Parameter(torch.eye(EXPERTS))  # z = x: the logits themselves
    router.hidden_dim = EXPERTS
    with torch.no_grad():
        return router(logits)[2]


@pytest.mark.parametrize(
    "checkpointing", [False, True, "unsloth"], ids=["plain", "checkpointed", "offloaded"]
)
def test_loss_and_lora_gradients_match_hf(tmp_path, checkpointing, grouped_calls, monkeypatch):
    from fastlm.models import patch

    fused_linears = []  # each MLA linear's call inside transformers' attention forward

    def counted(x, w):
        fused_linears.append(tuple(w.weight.shape))
        return lora_linear(x, w)

    lora_linear = patch.lora_linear
    monkeypatch.setattr(patch, "lora_linear", counted)
    reference, fast = _pair(tmp_path, checkpointing)
    report = fused_report(fast)
    latent = [row for row in report if ".self_attn." in row["module"]]
    assert [row["module"].split(".")[-1] for row in latent] == MLA * LAYERS
    assert all(row["fused"] and row["lora"] for row in latent), latent  # in transformers' forward
    assert all(row["fused"] for row in report), report
    assert len(report.attention) == LAYERS
    for row in report.attention:
        assert row["reason"].startswith("transformers' Mistral4Attention forward on every call")
    grouped = [row["module"] for row in report if "(grouped)" in row["module"]]
    assert len(grouped) == 2 * len(MOE_LAYERS)
    actual, grads = _assert_match(reference, fast, tiny_batch())
    seen = torch.zeros(EXPERTS, dtype=torch.long)
    for logits in actual.router_logits:
        counts = torch.bincount(_routed(logits).flatten(), minlength=EXPERTS)
        assert counts[STARVED] == 0, counts
        seen += counts
    # LoRA's B != 0 concentrates this tiny model's routing (an expert may take every token of a
    # layer): one more expert may go without tokens, here expert 7 (no LoRA draw tried gave all)
    assert (seen[:STARVED] > 0).sum() >= STARVED - 1, seen
    assert len(grouped_calls) == len(MOE_LAYERS) * (2 if checkpointing else 1)
    assert sum(".experts." in n for n in grads) == len(MOE_LAYERS) * 2 * 2
    assert sum(".shared_experts." in n for n in grads) == len(MOE_LAYERS) * 3 * 2
    assert sum(".self_attn." in n for n in grads) == LAYERS * len(MLA) * 2
    assert sum(".layers.0.mlp." in n for n in grads) == 3 * 2  # the dense layer
    # every MLA linear ran fused, in the forward and in each recompute
    calls = LAYERS * len(MLA) * (2 if checkpointing else 1)
    assert len(fused_linears) == calls, fused_linears


def test_the_default_targets_adapt_the_latent_attention(tmp_path):
    """FastModel.get_peft_model with no target_modules: the spec's names (MLA's linears, the
    MLPs) and, from the MLP names, the experts' parameters; every linear of the attention gets
    LoRA, the router none."""
    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, r=4)
    adapted = {n.split(".lora_A")[0] for n, _ in fast.named_parameters() if ".lora_A." in n}
    for layer in range(LAYERS):
        for name in MLA:
            assert f"base_model.model.model.layers.{layer}.self_attn.{name}" in adapted
    assert sum(n.endswith(".mlp.experts") for n in adapted) == len(MOE_LAYERS)
    assert not any(".gate" in n and "gate_proj" not in n for n in adapted)


def test_a_trainable_router_matches_hf(tmp_path):
    """The router's weight trains: its gradient comes through the chosen experts' softmax
    scores (renormalised, scaled), not through the group selection."""
    reference, fast = _pair(tmp_path, checkpointing=False)
    for model in (reference, fast):
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(True)
    _, grads = _assert_match(reference, fast, tiny_batch())
    assert sum(n.endswith("mlp.gate.weight") for n in grads) == len(MOE_LAYERS)


@pytest.mark.parametrize(
    "wrong",
    [
        {"expert_groups": None},  # the top k over all experts: no group limit
        {"routed_scaling_attr": None},  # no × routed_scaling_factor
        {"normalize_top_k": False},  # the k weights not renormalised
    ],
    ids=["no-group-limit", "no-scaling", "no-renormalisation"],
)
def test_the_comparison_sees_a_wrong_fact(tmp_path, monkeypatch, wrong):
    """Each router fact matters on the tiny model: fastlm loaded with one of them wrong moves the
    logits far past the tolerance, so the comparisons above can fail."""
    from fastlm import models

    spec = dataclasses.replace(MISTRAL4, moe=dataclasses.replace(MISTRAL4.moe, **wrong))
    monkeypatch.setitem(models.SPECS, FAMILY, spec)
    reference, fast = _pair(tmp_path, checkpointing=False)
    batch = tiny_batch()
    with torch.no_grad():
        expected, actual = reference.eval()(**batch).logits, fast.eval()(**batch).logits
    assert relative_error(actual, expected) > 10 * RTOL, relative_error(actual, expected)


@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "offloaded"])
def test_qlora_matches_hf_on_the_same_4bit_weights(tmp_path, checkpointing, grouped_calls):
    """load_in_4bit: bitsandbytes quantises the linears (the latent attention's too; the router
    is no Linear) and fastlm stores the experts NF4 (nf4_experts.py); the reference computes with
    the format's values of the same bytes, as test_moe_qlora.py does for the other families."""
    pytest.importorskip("bitsandbytes")
    from nf4_format import nf4_dequantize, run_4bit_layers_from_format
    from tiny_models import copy_lora, experts_weights

    from fastlm.models.nf4_experts import is_nf4_expert_weight
    from fastlm.quant import nf4_config

    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    fast, _ = FastModel.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    experts = experts_weights(fast)
    assert len(experts) == 2 * len(MOE_LAYERS) and all(map(is_nf4_expert_weight, experts.values()))
    reference = _reference(path, device_map="cpu", quantization_config=nf4_config(torch.float32))
    run_4bit_layers_from_format(reference)
    assert hasattr(reference.model.layers[1].self_attn.kv_b_proj.weight, "quant_state")
    with torch.no_grad():
        for name, weight in experts.items():
            module, param = name.rsplit(".", 1)
            dense = nf4_dequantize(weight.packed, weight.nf4_state, torch.float32)
            getattr(reference.get_submodule(module), param).copy_(dense)
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False)
    config = LoraConfig(target_modules=MLA + MLP, target_parameters=EXPERT_PARAMETERS, **lora)
    reference = get_peft_model(reference, config)
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    copy_lora(reference, fast)
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    _, grads = _assert_match(reference.train(), fast.train(), tiny_batch())
    assert sum(".experts." in n for n in grads) == len(MOE_LAYERS) * 2 * 2
    assert len(grouped_calls) == len(MOE_LAYERS) * (2 if checkpointing else 1)


def test_twenty_steps_follow_the_same_loss_curve(tmp_path):
    reference, fast = _pair(tmp_path, "unsloth")
    _assert_same_loss_curve(reference, fast, tiny_batch(seed=1), 20)


def test_eval_logits_generation_and_unpatch(tmp_path, grouped_calls):
    """Eval logits, and greedy generation with the KV cache (the latents cached by transformers'
    attention; each decoded token routed alone) past the query scaling's first step (position
    8); unpatch removes every forward fastlm set."""
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
    assert len(grouped_calls) == len(MOE_LAYERS) * (1 + 8)  # the batch, the prompt, 7 steps
    FastModel.unpatch(fast)
    assert not [m for m in fast.modules() if "forward" in m.__dict__]


def test_adapter_round_trip_on_unpatched_transformers(tmp_path):
    """save_pretrained writes a plain PEFT adapter: PeftModel.from_pretrained on unpatched
    transformers (eager experts) gives the fastlm model's eval logits."""
    _, fast = _pair(tmp_path, checkpointing=False)
    fast.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_reference(tmp_path / FAMILY), tmp_path / "adapter").eval()
    lora = {n: v for n, v in loaded.state_dict().items() if "lora_" in n}
    assert lora.keys() == {n for n in fast.state_dict() if "lora_" in n}
    adapted = {n.split(".lora_")[0] for n in lora}
    assert sum(n.endswith(".mlp.experts") for n in adapted) == len(MOE_LAYERS)
    assert sum(".self_attn." in n for n in adapted) == LAYERS * len(MLA)
    fast.eval()
    with torch.no_grad():
        expected, actual = fast(**tiny_batch()).logits, loaded(**tiny_batch()).logits
    assert relative_error(actual, expected) < 1e-5


def test_merged_16bit_reloads_in_plain_transformers(tmp_path):
    """merged_16bit: every expert slice gets W_e + s·B_e A_e, the latent attention's linears
    their LoRA; the folder loads in plain transformers (Mistral4ForCausalLM: AutoModelForCausalLM
    has no mistral4 entry) with no missing or unexpected keys and the adapter model's logits, and
    every expert weight equals PEFT's own merge; without the experts' LoRA the logits differ."""
    from fastlm.export import save_pretrained_merged

    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    model, tokenizer = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(
        model, r=4, lora_alpha=8, init_lora_weights=False, target_parameters=EXPERT_PARAMETERS,
        target_modules=["q_b_proj", "kv_b_proj"],
    )  # fmt: skip
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    reloaded, info = _reference(out, output_loading_info=True)
    assert not any(info.values()), info
    base = _reference(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base.eval()(**batch).logits, expected, atol=1e-3)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, model.peft_config["default"])
    peft_model.load_state_dict(model.state_dict())
    merged_by_peft = peft_model.merge_and_unload().state_dict()
    written = reloaded.state_dict()
    stacks = [k for k in written if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacks) == 2 * len(MOE_LAYERS)
    for key in stacks:
        torch.testing.assert_close(written[key], merged_by_peft[key], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(written[key], original[key], atol=1e-4), key


def test_merged_4bit_is_refused_in_one_line(tmp_path):
    """merged_4bit: bitsandbytes would leave the experts 16-bit; refused before writing
    anything. (GGUF is written: tests/export/test_gguf_mistral4.py.)"""
    from fastlm.export import save_pretrained_merged

    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, target_modules=["o_proj"])
    with pytest.raises(NotImplementedError, match=r"merged_4bit: model\.layers\.1\.mlp\.experts "):
        save_pretrained_merged(model, tmp_path / "m4", tokenizer, "merged_4bit")
    assert not (tmp_path / "m4").exists()


def test_the_spec_loads_what_automodel_cannot():
    """transformers 5.23 maps mistral4 to no causal-LM class; the spec names the one fastlm
    loads with, and it is the class whose router and experts the spec describes."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(FAMILY)
    assert spec_for(config) is MISTRAL4
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_config(config)
    assert MISTRAL4.causal_lm_class == Mistral4ForCausalLM.__name__
    recorder = modeling_mistral4.Mistral4PreTrainedModel._can_record_outputs["router_logits"]
    assert recorder.index == MISTRAL4.moe.router_logits_index == 0


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_router_is_transformers_own(dtype):
    """fastlm's router forward (softmax in the logits' dtype, group-limited top-k, renormalised
    + 1e-20, scaled) against Mistral4TopkRouter on the same weights, fp32 and bf16: the same
    experts (as sets), the same weights, the same weight gradient; on these logits the group
    limit changes the choice of many tokens."""
    config = tiny_config(FAMILY)
    torch.manual_seed(0)
    router = modeling_mistral4.Mistral4TopkRouter(config).to(dtype)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, config.hidden_size, dtype=dtype)
    logits, weights, experts = router(x)
    fast_logits, fast_weights, fast_experts = moe.router_forward(router, x, moe=MISTRAL4.moe)
    assert torch.equal(fast_logits, logits)
    order, fast_order = experts.argsort(-1), fast_experts.argsort(-1)
    assert torch.equal(experts.gather(1, order), fast_experts.gather(1, fast_order))
    assert torch.equal(weights.gather(1, order), fast_weights.gather(1, fast_order))
    assert fast_weights.dtype == dtype
    unlimited = torch.topk(logits.float().softmax(-1), TOP_K).indices.sort(-1).values
    assert (unlimited != experts.sort(-1).values).any(-1).sum() > 10
    probe = torch.arange(1.0, 1.0 + EXPERTS).to(dtype)  # a distinct weight per expert

    def grad(w, e):
        return torch.autograd.grad((w * probe[e]).sum(), router.weight)[0]

    torch.testing.assert_close(grad(fast_weights, fast_experts), grad(weights, experts))


def test_the_moe_block_matches_mistral4s_own():
    """The patched block against Mistral4MoE with eager experts: the same output and the same
    gradients of the input, the experts, the router and the shared experts."""
    config = tiny_config(FAMILY)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = modeling_mistral4.Mistral4MoE(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    x = torch.randn(2, 7, config.hidden_size, requires_grad=True)
    expected_out = block(x)
    names = [n for n, _ in block.named_parameters()]
    expected = torch.autograd.grad(expected_out.square().sum(), [x, *block.parameters()])
    gate = block.gate
    gate.forward = lambda h: moe.router_forward(gate, h, moe=MISTRAL4.moe)
    out = moe.moe_block_forward(
        block, x, moe=MISTRAL4.moe, activation="swiglu", aux=moe.AuxLossGradient()
    )
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    actual = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    for name, got, want in zip(["x", *names], actual, expected):
        assert relative_error(got, want) <= 1e-6, name


def test_bf16_is_as_close_to_fp32_as_hf(tmp_path, device):
    """bf16 under autocast against the fp32 truth over 16 batches: fastlm's mean error (grouped
    experts, LoRA on them) at most 1.25× that of transformers + PEFT (test_architectures')."""

    def pair(folder, dtype):
        return _pair(folder, True, device=device, dtype=dtype)

    assert_bf16_as_close_to_fp32_as_hf(tmp_path, pair, device, FAMILY)
