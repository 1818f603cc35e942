"""Llama 4 text (``llama4_text``): fastlm vs unpatched transformers + PEFT.

The tiny model (tiny_models' llama4_text) has four layers: three RoPE layers (interleaved pairs,
Llama 3 scaling, the L2 q/k norm after RoPE, chunked attention with chunks of 4 tokens, shorter
than the test sequences) and one NoPE layer (the attention temperature, floor_scale 3 so that it
changes along the sequence); MoE blocks in layers 1 and 3 (2 of 5 experts of width 27 per token,
the sigmoid of the top-2 logits scaling each expert's input, a shared expert of width 27), dense
MLPs of width 100 in layers 0 and 2; an expert that no token reaches (starve_expert), router
weights spread so that the sigmoid weights range over 0.2 .. 0.99 (llama4_extras). The
reference is transformers' Llama4ForCausalLM (its experts: one bmm over every expert for every
token, the unchosen ones fed zeros) with PEFT's LoRA: on attention, the dense MLPs and the shared
experts (Linear layers) and on the experts (``target_parameters``, a ParamWrapper per
parameter). fastlm runs attention, the MLPs and the MoE blocks (router, grouped experts, shared
expert) itself. Tolerance: 1e-4 relative on the loss and on every gradient, fp32 on CPU, on a
padded batch; plain, checkpointed and offloaded (use_gradient_checkpointing="unsloth").
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers.models.llama4", reason="transformers without Llama 4")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_architectures import (  # noqa: E402
    _assert_same_loss_curve,
    assert_bf16_as_close_to_fp32_as_hf,
)
from tiny_models import (  # noqa: E402
    on_device,
    relative_error,
    save_tiny_model,
    tiny_batch,
    tiny_config,
    train_step,
)
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.llama4 import modeling_llama4  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.errors import UnsupportedArchitectureError  # noqa: E402
from fastlm.models import attention, fused_report, moe, patch, spec_for  # noqa: E402
from fastlm.models.llama4 import LLAMA4_TEXT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = "llama4_text"
RTOL = 1e-4
LAYERS, MOE_LAYERS, DENSE_LAYERS = 4, (1, 3), (0, 2)
EXPERTS, TOP_K = 5, 2
STARVED = 4  # the expert no token reaches (starve_expert)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What fastlm's get_peft_model adds for the MLP names (the experts sit in feed_forward), and what
# the reference is given.
EXPERT_PARAMETERS = ["feed_forward.experts.down_proj", "feed_forward.experts.gate_up_proj"]


def _pair(tmp_path, checkpointing, attn_implementation=None, device="cpu", dtype=torch.float32):
    """(transformers + PEFT, fastlm), same weights and LoRA (B != 0). fastlm is given the seven
    names alone and adapts the experts from them; the reference is given PEFT's
    target_parameters (load_state_dict checks they agree)."""
    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lora = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, **extra)
    reference = get_peft_model(reference, LoraConfig(target_parameters=EXPERT_PARAMETERS, **lora))
    fast, _ = FastModel.from_pretrained(path, dtype=dtype, device_map=device, **extra)
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    assert sorted(fast.peft_config["default"].target_parameters) == EXPERT_PARAMETERS
    fast.load_state_dict(reference.state_dict())
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    return reference.train(), fast.train()


def _assert_match(reference, fast, batch, rtol=RTOL):
    """One step each: loss, router logits and every gradient within rtol; returns fastlm's
    output and gradients."""
    expected, expected_grads = train_step(reference, batch, output_router_logits=True)
    actual, actual_grads = train_step(fast, batch, output_router_logits=True)
    assert actual.logits is None  # the fused cross-entropy ran
    assert abs(actual.loss.item() - expected.loss.item()) <= rtol * expected.loss.item()
    # Llama 4 has no load-balancing loss: none is added, and the router logits are returned as
    # transformers records them (its recorder reads the router's second output).
    assert getattr(expected, "aux_loss", None) is None and actual.aux_loss is None
    assert len(actual.router_logits) == len(expected.router_logits) == len(MOE_LAYERS)
    real = batch["attention_mask"].reshape(-1).bool()  # a pad query's output is no one's input
    for got, want in zip(actual.router_logits, expected.router_logits):
        assert got.shape == want.shape == (batch["input_ids"].numel(), EXPERTS)
        assert relative_error(got[real], want[real]) <= rtol
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= rtol, name
    return actual, actual_grads


def _assert_an_expert_without_tokens(output):
    """Every MoE layer left STARVED without tokens; every other expert got some in one of them."""
    seen = torch.zeros(EXPERTS, dtype=torch.long)
    for logits in output.router_logits:
        counts = torch.bincount(torch.topk(logits, TOP_K).indices.flatten(), minlength=EXPERTS)
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
        f"base_model.model.model.layers.{layer}.feed_forward.experts.{param} (grouped)"
        for layer in MOE_LAYERS
        for param in ("gate_up_proj", "down_proj")
    ]
    assert all(row["lora"] for row in report if row["module"] != "lm_head (cross-entropy)")
    chunked = [row for row in report.attention if "chunked attention" in row["reason"]]
    assert [row["module"].split(".")[-2] for row in chunked] == ["0", "1", "3"]  # RoPE layers
    actual, grads = _assert_match(reference, fast, tiny_batch())
    _assert_an_expert_without_tokens(actual)
    # The recompute of a checkpointed layer runs its experts again.
    assert len(grouped_calls) == len(MOE_LAYERS) * (2 if checkpointing else 1)
    # per MoE layer: (gate_up, down) x (A, B) on the experts, 3 x (A, B) on the shared expert
    assert sum(".experts." in n for n in grads) == len(MOE_LAYERS) * 2 * 2
    assert sum(".shared_expert." in n for n in grads) == len(MOE_LAYERS) * 3 * 2
    dense = sum(n.split(".feed_forward.")[-1].startswith(("gate", "up", "down")) for n in grads)
    assert dense == len(DENSE_LAYERS) * 3 * 2
    assert sum(".self_attn." in n for n in grads) == LAYERS * 4 * 2


def test_a_trainable_router_matches_hf(tmp_path):
    """The router's weight trains: its gradient reaches it through the sigmoid weights, which
    scale each expert's input (so it passes through the whole expert)."""
    reference, fast = _pair(tmp_path, checkpointing=False)
    for model in (reference, fast):
        for name, param in model.named_parameters():
            if name.endswith("feed_forward.router.weight"):
                param.requires_grad_(True)
    _, grads = _assert_match(reference, fast, tiny_batch())
    assert sum(n.endswith("feed_forward.router.weight") for n in grads) == len(MOE_LAYERS)


@pytest.mark.parametrize(
    "wrong",
    [
        {"moe": {"routing_weight_on": "output"}},  # w · expert(x) for expert(w · x)
        {"moe": {"scoring": "topk_softmax"}},  # softmax over the top 2 for each one's sigmoid
        {"qk_norm_after_rope_attr": None},  # no L2 norm of q and k
        {"attention_temperature": None},  # no temperature on the NoPE layer
    ],
    ids=["weight-on-output", "softmax", "no-qk-norm", "no-temperature"],
)
def test_the_comparison_sees_a_wrong_fact(tmp_path, monkeypatch, wrong):
    """Each fact of the spec matters on the tiny model: fastlm loaded with one of them wrong
    moves the logits far past the tolerance, so the comparisons above can fail."""
    from fastlm import models

    moe_fields = wrong.pop("moe", {})
    spec = dataclasses.replace(LLAMA4_TEXT, **wrong)
    spec = dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, **moe_fields))
    monkeypatch.setitem(models.SPECS, FAMILY, spec)
    reference, fast = _pair(tmp_path, checkpointing=False)
    batch = tiny_batch()
    with torch.no_grad():
        expected, actual = reference.eval()(**batch).logits, fast.eval()(**batch).logits
    assert relative_error(actual, expected) > 10 * RTOL, relative_error(actual, expected)


@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "offloaded"])
def test_qlora_matches_hf_on_the_same_4bit_weights(tmp_path, checkpointing, grouped_calls):
    """load_in_4bit: bitsandbytes quantises the linears (the router, an nn.Linear subclass with
    its own forward, stays as loaded on both sides) and fastlm stores the experts NF4
    (nf4_experts.py); the reference computes with the format's values of the same bytes, as
    test_moe_qlora.py does for the other MoE families."""
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
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", quantization_config=nf4_config(torch.float32)
    )
    run_4bit_layers_from_format(reference)
    assert type(reference.model.layers[1].feed_forward.router).__name__ == "Llama4Router"
    assert hasattr(reference.model.layers[1].self_attn.q_proj.weight, "quant_state")
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
    _, grads = _assert_match(reference.train(), fast.train(), tiny_batch())
    assert sum(".experts." in n for n in grads) == len(MOE_LAYERS) * 2 * 2
    assert len(grouped_calls) == len(MOE_LAYERS) * (2 if checkpointing else 1)


def test_all_linear_leaves_the_routers_to_their_own_forward(tmp_path, caplog):
    """target_modules="all-linear": PEFT alone wraps Llama 4's routers (nn.Linear subclasses)
    and its LoRA forward then fails on their (scores, logits) output, with transformers' forward
    too; fastlm leaves them out (logged), adapts every other linear and the experts, and matches
    transformers + PEFT given the same exclusion."""
    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    unexcluded = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoraConfig(**lora)
    )
    with pytest.raises(AttributeError, match="'tuple' object has no attribute"):
        unexcluded(**tiny_batch())
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        LoraConfig(exclude_modules=["router"], target_parameters=EXPERT_PARAMETERS, **lora),
    )
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    with caplog.at_level("INFO", logger="fastlm"):
        fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=False, **lora)
    assert any("leaves out the Llama4Router routers" in r.getMessage() for r in caplog.records)
    fast.load_state_dict(reference.state_dict())
    routers = [m for n, m in fast.named_modules() if n.endswith("feed_forward.router")]
    assert len(routers) == len(MOE_LAYERS)
    assert all(type(m).__name__ == "Llama4Router" for m in routers)
    _, grads = _assert_match(reference.train(), fast.train(), tiny_batch())
    assert sum(".experts." in n for n in grads) == len(MOE_LAYERS) * 2 * 2


def test_twenty_steps_follow_the_same_loss_curve(tmp_path):
    reference, fast = _pair(tmp_path, "unsloth")
    _assert_same_loss_curve(reference, fast, tiny_batch(seed=1), 20)


def test_eval_logits_generation_and_unpatch(tmp_path, grouped_calls):
    """Eval logits, and greedy generation with the KV cache (each decoded token routed alone;
    the chunked layers' cache keeps one chunk, the NoPE layer's temperature counts the cached
    tokens) past two chunk boundaries; unpatch removes every forward fastlm set."""
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
    transformers gives the fastlm model's eval logits."""
    _, fast = _pair(tmp_path, checkpointing=False)
    fast.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / FAMILY, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not [m for m in loaded.modules() if "forward" in m.__dict__]  # unpatched
    lora = {n: v for n, v in loaded.state_dict().items() if "lora_" in n}
    assert lora.keys() == {n for n in fast.state_dict() if "lora_" in n}
    adapted = {n.split(".lora_")[0] for n in lora}
    assert sum(n.endswith(".feed_forward.experts") for n in adapted) == len(MOE_LAYERS)
    fast.eval()
    with torch.no_grad():
        expected, actual = fast(**tiny_batch()).logits, loaded(**tiny_batch()).logits
    assert relative_error(actual, expected) < 1e-5


def test_merged_16bit_reloads_in_plain_transformers(tmp_path):
    """merged_16bit: every expert slice gets PEFT's delta (on Llama 4's (E, in, out) stacks PEFT
    reads the slice as (out, in), and the merge adds what its forward adds); the folder loads in
    plain transformers with no missing or unexpected keys and the adapter model's logits, and
    every expert weight equals PEFT's own merge; without the experts' LoRA the logits differ."""
    from fastlm.export import save_pretrained_merged

    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
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
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
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


def test_gguf_and_merged_4bit_are_refused_in_one_line(tmp_path):
    """GGUF: this tiny config's NoPE layer is not where llama.cpp's llama4 puts it (GGUF of the
    layouts llama.cpp runs: tests/export/test_gguf_llama4.py); merged_4bit: bitsandbytes would
    leave the experts 16-bit. Both before writing anything."""
    pytest.importorskip("gguf")
    from fastlm.export import save_pretrained_gguf, save_pretrained_merged

    path = save_tiny_model(FAMILY, tmp_path / FAMILY)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    with pytest.raises(NotImplementedError, match=r"^Llama 4 with no_rope_layers=.* every 4th"):
        save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, quantization_method="f16")
    assert not (tmp_path / "gguf").exists()
    model = FastModel.get_peft_model(model, r=4, target_modules=["q_proj"])
    match = r"merged_4bit: model\.layers\.1\.feed_forward\.experts "
    with pytest.raises(NotImplementedError, match=match):
        save_pretrained_merged(model, tmp_path / "m4", tokenizer, "merged_4bit")
    assert not (tmp_path / "m4").exists()


def test_multimodal_llama4_is_refused_with_the_text_model_named():
    from transformers import Llama4Config

    with pytest.raises(UnsupportedArchitectureError, match="load the text-only Llama4ForCausalLM"):
        spec_for(Llama4Config())
    assert spec_for(tiny_config(FAMILY)) is LLAMA4_TEXT


@pytest.fixture
def kernels_on_cpu(kernel_on_cpu, monkeypatch) -> list:
    """``kernel_on_cpu`` with fastlm's RoPE and RMSNorm kernels as well, as on a GPU; returns the
    list each flash launch appends to."""
    from fastlm.kernels import rms_norm, rope

    for module in (rope, rms_norm):
        monkeypatch.setattr(module, "use_triton", lambda t: True)
    return kernel_on_cpu


@pytest.mark.parametrize("seq", [11, 4], ids=["past-a-chunk", "one-chunk"])
def test_the_kernels_run_where_the_mask_allows_and_the_report_names_the_chunks(
    tmp_path, kernels_on_cpu, seq, device
):
    """Eager attention with the kernels allowed (on CPU here, as on a GPU): the RoPE kernel on
    the reordered heads, the weightless norm through fastlm's RMSNorm kernel; the NoPE layer's
    padded batch through the flash kernel's padded launch. The chunked layers past one chunk
    (11 tokens: chunks of 4, 4 and 3, padded rows) run the same launch with each row cut at the
    chunk bounds, and fused_report says so; within one chunk (4 tokens) their mask is the causal
    one. The loss and every gradient are HF eager's either way."""
    from fastlm.models import attention

    reference, fast = _pair(tmp_path, False, attn_implementation="eager", device=device)
    batch = {k: v[:, :seq].clone() for k, v in tiny_batch().items()}
    if seq == 4:  # rows of 4, 3 and 2 tokens: padding in every row but the first
        for row, length in ((1, 3), (2, 2)):
            batch["attention_mask"][row, length:] = 0
            batch["input_ids"][row, length:] = 0
            batch["labels"][row, length:] = -100
    _assert_match(reference, fast, on_device(batch, device))
    rows = {row["module"].split(".")[-2]: row for row in fused_report(fast).attention}
    assert rows["2"]["attention"] == attention.FLASH_VARLEN  # padding on the causal pattern
    if seq == 4:
        assert kernels_on_cpu == ["varlen"] * LAYERS
        assert all(row["attention"] == attention.FLASH_VARLEN for row in rows.values())
        return
    assert kernels_on_cpu == ["varlen"] * LAYERS
    for layer in ("0", "1", "3"):
        assert rows[layer]["attention"] == attention.FLASH_VARLEN and rows[layer]["called"]
        assert rows[layer]["reason"] == attention.CHUNKED, rows[layer]


def test_left_padded_rows_are_chunked_from_their_first_token(tmp_path, kernels_on_cpu, device):
    """Left padding shifts transformers' chunks to each row's first real token; the chunked
    layers' packed launch cuts the rows there too: the loss and every gradient are HF eager's."""
    from fastlm.models import attention

    reference, fast = _pair(tmp_path, False, attn_implementation="eager", device=device)
    batch = tiny_batch()
    for key in ("input_ids", "attention_mask"):  # right padding moved to the left
        batch[key] = torch.stack([row.roll(int((row_mask == 0).sum())) for row, row_mask in
                                  zip(batch[key], batch["attention_mask"])])  # fmt: skip
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # A row's first real token would be predicted from a pad position (an artefact in eager,
    # whose pad query sees no key): collators leave that label out.
    first = batch["attention_mask"].argmax(-1)
    labels[torch.arange(len(first)), first] = -100
    batch["labels"] = labels
    _assert_match(reference, fast, on_device(batch, device))
    rows = {row["module"].split(".")[-2]: row for row in fused_report(fast).attention}
    assert all(rows[layer]["reason"] == attention.CHUNKED for layer in ("0", "1", "3"))


# --------------------------------------------------------------------------- pieces


def test_the_router_is_transformers_own_and_puts_the_logits_where_its_recorder_reads():
    """fastlm's router forward (topk_sigmoid) against Llama4Router on the same weights: the
    chosen experts, their weights (the non-zero entries of transformers' scattered (N, E) scores)
    and the weight gradient; the logits at the index transformers' OutputRecorder reads."""
    recorder = modeling_llama4.Llama4TextModel._can_record_outputs["router_logits"]
    assert recorder.index == LLAMA4_TEXT.moe.router_logits_index == 1
    config = tiny_config(FAMILY)
    torch.manual_seed(0)
    router = modeling_llama4.Llama4Router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(13, config.hidden_size)
    scores, logits = router(x)
    weights, fast_logits, experts = moe.router_forward(router, x, moe=LLAMA4_TEXT.moe)
    assert torch.equal(fast_logits, logits)
    assert torch.equal(scores.gather(1, experts), weights)
    assert torch.equal((scores > 0).sum(-1), torch.full((13,), TOP_K))
    probe = torch.arange(1.0, 1.0 + scores.numel()).view_as(scores)  # a distinct weight each
    grads = [
        torch.autograd.grad((s * probe).sum(), router.weight)
        for s in (scores, torch.zeros_like(scores).scatter(1, experts, weights))
    ]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)


def test_the_moe_block_matches_llama4s_own():
    """The patched block against Llama4TextMoe (every expert on every token, the input scaled):
    the same output and the same gradients of the input, the experts, the router and the shared
    expert, with the experts' sizes odd (the grouped GEMM's reference path)."""
    config = tiny_config(FAMILY)
    torch.manual_seed(0)
    block = modeling_llama4.Llama4TextMoe(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    x = torch.randn(2, 7, config.hidden_size, requires_grad=True)
    expected_out, expected_logits = block(x)
    names = [n for n, _ in block.named_parameters()]
    expected = torch.autograd.grad(expected_out.square().sum(), [x, *block.parameters()])
    aux = moe.AuxLossGradient()
    router = block.router
    router.forward = lambda h: moe.router_forward(router, h, moe=LLAMA4_TEXT.moe)
    out, logits = moe.moe_block_forward(block, x, moe=LLAMA4_TEXT.moe, activation="swiglu", aux=aux)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    torch.testing.assert_close(out.reshape(expected_out.shape), expected_out, rtol=1e-6, atol=1e-6)
    actual = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    for name, got, want in zip(["x", *names], actual, expected):
        assert relative_error(got, want) <= 1e-6, name


def test_rope_on_the_interleaved_pairs_is_the_kernels_on_even_then_odd_dims(device):
    """Llama 4's complex RoPE on (2i, 2i + 1) equals fastlm's RoPE kernel (Triton, interpreter)
    on each head reordered even-then-odd with cos, sin = Re, Im of freqs_cis, reordered the same
    way; hence the attention scores q·k are the same, and so are the gradients of q and k."""
    from fastlm.kernels.rope import apply_rope_triton

    config = tiny_config(FAMILY)
    rotary = modeling_llama4.Llama4TextRotaryEmbedding(config)
    torch.manual_seed(0)
    rotary.to(device)
    q = torch.randn(2, 9, 4, 24).to(device).requires_grad_()  # (B, S, H, D)
    k = torch.randn(2, 9, 2, 24).to(device).requires_grad_()
    # (B, S, D/2) complex, Llama 3 scaled
    freqs = rotary(q, torch.arange(3, 12, device=device).expand(2, -1))
    expected_q, expected_k = modeling_llama4.apply_rotary_emb(q, k, freqs)
    cos, sin = patch._rope_tables(freqs, LLAMA4_TEXT)
    reordered = patch._even_then_odd(q), patch._even_then_odd(k)
    actual_q, actual_k = apply_rope_triton(*reordered, cos, sin)
    torch.testing.assert_close(actual_q, patch._even_then_odd(expected_q), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual_k, patch._even_then_odd(expected_k), rtol=1e-6, atol=1e-6)

    def scores(q, k):  # (B, Hk, S, S): query heads 0 and 2 on kv heads 0 and 1
        return q[:, :, ::2].transpose(1, 2) @ k.permute(0, 2, 3, 1)

    expected, actual = scores(expected_q, expected_k), scores(actual_q, actual_k)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(expected)
    want = torch.autograd.grad((expected * weight).sum(), (q, k))
    got = torch.autograd.grad((actual * weight).sum(), (q, k))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_decoder_body_is_found_where_the_prefix_names_none():
    """Llama4ForCausalLM's base_model_prefix names the multimodal model's attribute; every
    caller (fused loss, reranker, FSDP gathers) reads the body through models.decoder_body."""
    from fastlm.models import decoder_body

    model = AutoModelForCausalLM.from_config(tiny_config("llama4_text"))
    assert getattr(model, model.base_model_prefix, None) is None
    assert decoder_body(model) is model.model
    llama = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert decoder_body(llama) is getattr(llama, llama.base_model_prefix)


def test_bf16_is_as_close_to_fp32_as_hf(tmp_path, device):
    """bf16 under autocast against the fp32 truth over 16 batches: fastlm's mean error (grouped
    experts, LoRA on them) at most 1.25× that of transformers + PEFT (test_architectures')."""

    def pair(folder, dtype):
        return _pair(folder, True, device=device, dtype=dtype)

    assert_bf16_as_close_to_fp32_as_hf(tmp_path, pair, device, FAMILY)


# --- packed (padding-free) batches ------------------------------------------------------------
# The tiny model's chunks are 4 tokens and its temperature floor 2 or so: sequences of 6 and 9
# tokens cross their chunk bounds and the floor, so where the chunks or the positions were
# counted along the row instead of within each sequence, the results would differ.
PACKED_LENGTHS = (6, 1, 9)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
@pytest.mark.parametrize("signal", ["position_ids", "cu_seq_lens", "cu_seq_lens_only"])
def test_packed_batches_match_each_sequence_alone(tmp_path, request, signal, kernel, device):
    """Each packed sequence attends within its own chunks and its NoPE layer scales its queries
    by its own positions: the loss and every LoRA gradient equal each sequence run alone through
    transformers + PEFT (transformers' own packed run differs: it counts both along the row).
    position_ids, which Llama 4's decoder layer does not hand to attention, reach it as
    cu_seq_lens. Seen failing with the chunks counted along the row (a sequence then saw the one
    before it), with the row's positions in the temperature, and without position_ids' bounds
    as keywords."""
    from test_packing import _packed_batch, _packed_run, _per_sequence_reference, _sequences

    if kernel:
        request.getfixturevalue("kernel_on_cpu")
    reference, fast = _pair(tmp_path, False, device=device if kernel else "cpu")
    fast.set_attn_implementation("eager")
    sequences = _sequences(PACKED_LENGTHS)
    no_aux = {"output_router_logits": False}  # over the batch, not a sum over the sequences
    want_loss, want = _per_sequence_reference(reference, sequences, **no_aux)
    got_loss, got = _packed_run(fast, _packed_batch(sequences, signal), **no_aux)
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert relative_error(got[name], grad) <= RTOL, name
    paths = {row["attention"] for row in fused_report(fast).attention}
    assert paths == ({attention.FLASH_VARLEN} if kernel else {"eager"}), paths


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("signal", ["position_ids", "cu_seq_lens", "cu_seq_lens_only"])
def test_a_packed_sequence_never_sees_another(tmp_path, signal, device):
    """Redraw the middle sequence: no other token's logits change, whichever signal says where
    the sequences are (transformers' eager run fails this with cu_seq_lens: its chunked mask
    spans the row)."""
    from test_packing import _packed_batch, _per_token, _sequences

    _, fast = _pair(tmp_path, False, device=device)
    fast.set_attn_implementation("eager")
    sequences = _sequences(PACKED_LENGTHS)
    changed = [sequences[0], _sequences(PACKED_LENGTHS, seed=1)[1], sequences[2]]
    before = _per_token(fast, _packed_batch(sequences, signal))[0]
    after = _per_token(fast, _packed_batch(changed, signal))[0]
    others = torch.ones(sum(PACKED_LENGTHS), dtype=torch.bool)
    others[PACKED_LENGTHS[0] - 1 : PACKED_LENGTHS[0] + PACKED_LENGTHS[1]] = False
    assert torch.equal(before[0, others], after[0, others])
    assert not torch.equal(before[0, ~others], after[0, ~others])
