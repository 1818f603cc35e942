"""GGUF export of Mistral 4 (llama.cpp's mistral4) in llama.cpp (xllamacpp), LoRA merged into the
latent attention, the dense MLP, the shared experts and the routed experts.

The tiny model is tiny_models' mistral4 (3 layers: a dense MLP, then MoE blocks of 9 experts in 3
groups, the 2 best groups giving each token its 3 experts, weights renormalised and ×2.5, 2
shared experts; an expert starved) with every row a multiple of 32, so that q8_0 quantises every
matrix (``ROWS_OF_32``: hidden 64, q and kv latents of 32, per head 32 + 16 q·k dims and 16 v
dims, experts of width 32), and YaRN ×32 with the query temperature at β = 5 (Mistral Small 4's
0.1 moves this model's log-probs by 1.4e-3, within the f16 bound; 5 moves them by 0.12). Weights
sharpened (``_tiny_mistral4``) so that the next-token distributions are far from uniform and the
RoPE part of q·k weighs.

llama.cpp's next-token log-probs over test_gguf_moe's prompts are compared with transformers' on
PEFT's merged weights, rounded as the file stores them (``_as_stored``), and so are its greedy
decoding steps (from its cache of latents). Also run: transformers' half-split RoPE
(rope_interleave off) and q_proj in place of the q latent. The file's tensors and metadata are
read back; what llama.cpp would run otherwise is refused with nothing written (two refusals are
shown to be needed: bypassed, llama.cpp does not load the file, or misses by far); layout and
metadata mistakes are shown to be caught.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import llama_cpp_server, save_tiny_model, tiny_config

from fastlm import FastModel
from fastlm.export import gguf_writer
from fastlm.export.gguf_writer import gguf_tensors, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers.models.mistral4", reason="transformers without Mistral 4")

from test_gguf import spm_tokenizer  # noqa: E402
from test_gguf_moe import (  # noqa: E402
    BANNED,
    PROMPTS,
    TOL,
    VOCAB,
    _complete,
    _errors,
    _next_logprobs,
    _peft_merged,
    merged_like_peft,
    q8_0_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = "mistral4"
HEADS, NOPE, ROPE, V, LATENT = 4, 32, 16, 16, 32  # per head q·k = NOPE + ROPE dims
EXPERTS, TOP_K, GROUPS, KEPT, EXPERT_WIDTH = 9, 3, 3, 2, 32  # tiny_models' routing
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 32.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 5.0,
    "partial_rotary_factor": ROPE / (NOPE + ROPE),  # the RoPE slice of each head
}
# tiny_models' mistral4 with rows of 32. tiny_config sets these on the built config, so the
# sizes it derives (head_dim, qk_head_dim, the RoPE fraction) are given too.
ROWS_OF_32 = dict(
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=EXPERT_WIDTH,
    q_lora_rank=LATENT,
    kv_lora_rank=LATENT,
    qk_nope_head_dim=NOPE,
    qk_rope_head_dim=ROPE,
    v_head_dim=V,
    head_dim=NOPE + ROPE,
    qk_head_dim=NOPE + ROPE,
    rope_parameters=YARN,
    max_position_embeddings=64,  # llama.cpp's server generates no further (tiny_models': 32)
)
EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# max |Δ log-prob| over PROMPTS of llama.cpp's top-10 next tokens against transformers on the
# weights the file holds, and on the fp32 merged weights, within test_gguf_moe's TOL (tight,
# loose) per file type. Measured (stored / fp32): f16 1.7e-3 / 2.2e-3, bf16 9.2e-3 / 1.4e-2,
# q8_0 5.4e-2 / 7.7e-2 (llama.cpp also rounds each product's activations to the weights' type);
# f16 with rope_interleave off 1.5e-3 / 2.4e-3, with q_proj instead of the q latent 9.0e-4 /
# 1.8e-3. Over 12 greedy decoding steps (stored weights): f16 1.3e-3, bf16 1.2e-2, q8_0 3.8e-2.
# Layout and metadata mistakes move them by 0.12-1.3 (test_a_layout_mistake_is_caught).
# Routing near ties: with 9 experts, 3 per token and group scores, a token's routing is often
# within llama.cpp's roundings of a tie (a log-prob gap of 3e-4 between the 3rd and 4th expert
# flipped in bf16 and q8_0 and moved that prompt's log-prob by 1.6): the sharpening below keeps
# the last tokens of PROMPTS at least this far from a tie in every MoE layer, for the group and
# the expert choice, on the weights of every file type (measured: 5.3e-3 and more).
MIN_TIE_GAP = 2e-3


def _tiny_mistral4(tmp_path, **overrides):
    """tiny_models' mistral4 with ROWS_OF_32 (+ ``overrides``), LoRA with B ≠ 0 on the latent
    attention, the MLPs and the experts, sharpened: matrices ×2, the routers ×6 (that and the
    LoRA seed keep PROMPTS' routing off ties), the LM head ×6, norms ×3, and the RoPE rows of q
    and of the shared k part ×3 more (so that the RoPE part of q·k weighs: a wrong row order
    then moves the log-probs by 0.6); byte tokens' LM-head rows zeroed (the comparisons are
    about the prompts' word tokens, whose top log-prob is then -1.8 to -2.3 against -3.7 for
    uniform)."""
    kwargs = ROWS_OF_32 | {"vocab_size": VOCAB} | overrides
    path = save_tiny_model(FAMILY, tmp_path / "hf", **copy.deepcopy(kwargs))
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    assert sorted(model.peft_config["default"].target_parameters) == sorted(EXPERT_PARAMS)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_" not in name and "norm" in name:
                param.mul_(3.0)
            elif "lora_" not in name and param.ndim >= 2:
                param.mul_(6.0 if "lm_head" in name or "mlp.gate." in name else 2.0)
        base = model.get_base_model()
        base.lm_head.weight[4:260] = 0
        for layer in base.model.layers:
            attention = layer.self_attn
            q = (attention.q_b_proj or attention.q_proj).base_layer.weight
            q.view(HEADS, NOPE + ROPE, -1)[:, NOPE:] *= 3.0
            attention.kv_a_proj_with_mqa.base_layer.weight[LATENT:] *= 3.0
    return model.eval()


def _transformers_model(config, state: dict[str, torch.Tensor]):
    """Plain transformers' Mistral4ForCausalLM (eager experts) holding ``state``."""
    from transformers import Mistral4ForCausalLM

    config = copy.deepcopy(config)
    config._experts_implementation = "eager"
    reference = Mistral4ForCausalLM(config)
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return reference.eval()


def _as_stored(name: str, tensor: torch.Tensor, method: str) -> torch.Tensor:
    """``tensor`` rounded as the file stores it: F32 (vectors, the routers), else f16 / bf16, or
    q8_0 along each row of llama.cpp's (out, in) matrix: kv_b_proj's key rows as attn_k_b holds
    them, (C, N) per head, blocks along N."""
    if tensor.ndim < 2 or name.endswith("mlp.gate.weight"):
        return tensor
    if method == "bf16":
        return tensor.to(torch.bfloat16).float()
    if method == "f16":
        return tensor.to(torch.float16).float()
    if name.endswith("kv_b_proj.weight"):
        per_head = tensor.reshape(HEADS, NOPE + V, LATENT)
        k = q8_0_rows(per_head[:, :NOPE].transpose(1, 2).contiguous()).transpose(1, 2)
        return torch.cat([k, q8_0_rows(per_head[:, NOPE:].contiguous())], dim=1).reshape(
            tensor.shape
        )
    return q8_0_rows(tensor)


def _exported(tmp_path, model, method: str):
    """(GGUF path, transformers on the stored weights, transformers on the fp32 merged ones)."""
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), method, name="t")
    merged = _peft_merged(model)
    stored = {k: _as_stored(k, v, method) for k, v in merged.items()}
    config = model.get_base_model().config
    return out, _transformers_model(config, stored), _transformers_model(config, merged)


def _tie_gap(model, ids: list[int]) -> float:
    """How near the last token's routing is to a tie: the smallest log-prob gap, over the MoE
    layers, between the KEPT-th and next group scores and between the TOP_K-th and next expert
    of the kept groups."""
    logits = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, out: logits.append(out[0][-1]))
        for layer in model.model.layers[model.config.first_k_dense_replace :]
    ]
    _next_logprobs(model, ids)
    for hook in hooks:
        hook.remove()
    gaps = []
    for z in logits:
        p = z.double().softmax(-1).view(GROUPS, -1)
        groups = p.topk(2, dim=-1).values.sum(-1).sort(descending=True)
        experts = p[groups.indices[:KEPT]].flatten().sort(descending=True).values
        gaps += [groups.values[KEPT - 1 : KEPT + 1], experts[TOP_K - 1 : TOP_K + 1]]
    return min(float(pair.log().diff().neg()) for pair in gaps)


def _worst_error(server, tokenizer, reference) -> float:
    """max over PROMPTS of |Δ log-prob| of llama.cpp's top-10 next tokens against
    ``reference``."""
    errors = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        (step,) = _complete(server, ids, 1, n_probs=10)
        want = _next_logprobs(reference, ids)
        errors.append(max(abs(e["logprob"] - float(want[e["id"]])) for e in step["top_logprobs"]))
    return max(errors)


def _check_in_llama_cpp(tmp_path, model, method: str, label: str):
    """llama.cpp's next-token log-probs within TOL of transformers' over PROMPTS, with every
    last token's routing off ties. Returns (llama.cpp server, transformers on the stored
    weights)."""
    tokenizer = spm_tokenizer()
    out, stored_model, fp32_model = _exported(tmp_path, model, method)
    tight, loose = TOL[method]
    server = llama_cpp_server(out)
    errors, errors_fp32 = _errors(server, tokenizer, stored_model, fp32_model, tight)
    gap = min(_tie_gap(stored_model, tokenizer(prompt).input_ids) for prompt in PROMPTS)
    print(f"mistral4 {label} {method}: max |Δ log-prob| {max(errors):.2e} (stored weights), "
          f"{max(errors_fp32):.2e} (fp32); routing gap {gap:.1e}")  # fmt: skip
    assert gap > MIN_TIE_GAP, gap
    assert max(errors) < tight, errors
    assert max(errors_fp32) < loose, errors_fp32
    return server, stored_model


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0"])
def test_tiny_mistral4_in_llama_cpp(tmp_path, method):
    """llama.cpp's next-token log-probs within TOL of transformers' over PROMPTS; and over 12
    greedy steps after PROMPTS[0] (decoding from its cache of latents), each step's log-prob
    within the tight bound of transformers' on the same tokens, its token transformers' best
    up to that bound (this model's continuations meet near-tied tokens, 1.3e-3 apart at step 5
    in f16: where the two pick differently, comparing on llama.cpp's tokens goes on)."""
    pytest.importorskip("xllamacpp")
    model = _tiny_mistral4(tmp_path)
    server, stored_model = _check_in_llama_cpp(tmp_path, model, method, "ROWS_OF_32")

    tight = TOL[method][0]
    ids = spm_tokenizer()(PROMPTS[0]).input_ids
    content = _complete(server, ids, 12, n_probs=1)
    steps = []
    for i, step in enumerate(content):
        want = _next_logprobs(stored_model, ids + [s["id"] for s in content[:i]])
        best = float(want.index_fill(0, torch.tensor(BANNED), -torch.inf).max())
        assert float(want[step["id"]]) > best - tight, (i, step, best)
        steps.append(abs(step["logprob"] - float(want[step["id"]])))
    print(f"mistral4 {method}: 12 decode steps, max |Δ log-prob| {max(steps):.2e}")
    assert max(steps) < tight, steps


@pytest.mark.parametrize(
    "overrides",
    [{"rope_interleave": False}, {"q_lora_rank": None}],
    ids=["rope_halves", "q_proj"],
)
def test_other_attention_layouts_in_llama_cpp(tmp_path, overrides):
    """transformers' half-split RoPE (rope_interleave off: the RoPE rows are permuted to
    llama.cpp's pairs), and q_proj instead of the q latent (q_lora_rank None: attn_q, and
    q_lora_rank 0 in the file)."""
    pytest.importorskip("xllamacpp")
    model = _tiny_mistral4(tmp_path, **overrides)
    label = ", ".join(f"{key}={value}" for key, value in overrides.items())
    _check_in_llama_cpp(tmp_path, model, "f16", label)


def test_tensors_and_metadata(tmp_path):
    """What the file holds, from the merged transformers parameters: kv_b_proj split per head
    into attn_k_b (H, C, N) and attn_v_b (H, V, C), the latent projections and norms as they
    are, the experts' (E, out, in) stacks, the shared experts, the F32 router; the mistral4
    metadata."""
    model = _tiny_mistral4(tmp_path)
    config = model.get_base_model().config
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "q8_0", name="t")
    merged = merged_like_peft(model)

    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.MISTRAL4))
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(tensors) == set(expected)
    attention, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    kv_b = merged[attention + "kv_b_proj.weight"].reshape(HEADS, NOPE + V, LATENT)
    gate_up = merged[mlp + "experts.gate_up_proj"]
    want = {
        "blk.1.attn_k_b.weight": kv_b[:, :NOPE].transpose(1, 2),  # (H, C, N)
        "blk.1.attn_v_b.weight": kv_b[:, NOPE:],  # (H, V, C)
        "blk.1.attn_q_a.weight": merged[attention + "q_a_proj.weight"],
        "blk.1.attn_q_b.weight": merged[attention + "q_b_proj.weight"],  # RoPE rows as they are
        "blk.1.attn_kv_a_mqa.weight": merged[attention + "kv_a_proj_with_mqa.weight"],
        "blk.1.attn_output.weight": merged[attention + "o_proj.weight"],
        "blk.1.ffn_gate_exps.weight": gate_up[:, :EXPERT_WIDTH],
        "blk.1.ffn_up_exps.weight": gate_up[:, EXPERT_WIDTH:],
        "blk.1.ffn_down_exps.weight": merged[mlp + "experts.down_proj"],
        "blk.1.ffn_gate_shexp.weight": merged[mlp + "shared_experts.gate_proj.weight"],
        "blk.1.ffn_down_shexp.weight": merged[mlp + "shared_experts.down_proj.weight"],
        "blk.0.ffn_up.weight": merged["model.layers.0.mlp.up_proj.weight"],
    }
    for gguf_name, tensor in want.items():
        torch.testing.assert_close(expected[gguf_name], tensor)
        assert tensors[gguf_name].tensor_type == gguf.GGMLQuantizationType.Q8_0, gguf_name
        assert list(tensors[gguf_name].shape) == list(reversed(tensor.shape))  # ne: in first
    assert list(tensors["blk.1.ffn_down_shexp.weight"].shape) == [2 * EXPERT_WIDTH, 64]
    assert "blk.1.attn_kv_b.weight" not in tensors  # split, as llama.cpp's converter does
    assert "blk.0.ffn_gate_inp.weight" not in tensors  # layer 0 is dense
    f32 = {
        "blk.1.ffn_gate_inp.weight": merged[mlp + "gate.weight"],
        "blk.1.attn_q_a_norm.weight": merged[attention + "q_a_layernorm.weight"],
        "blk.1.attn_kv_a_norm.weight": merged[attention + "kv_a_layernorm.weight"],
    }
    for gguf_name, tensor in f32.items():
        stored = tensors[gguf_name]
        assert stored.tensor_type == gguf.GGMLQuantizationType.F32, gguf_name
        np.testing.assert_array_equal(np.array(stored.data).reshape(tensor.shape), tensor.numpy())

    fields = gguf.GGUFReader(out).fields
    want_fields = {
        "context_length": config.max_position_embeddings,
        "feed_forward_length": 64,
        "attention.head_count": HEADS,
        "attention.head_count_kv": 1,
        "attention.key_length": LATENT + ROPE,
        "attention.value_length": LATENT,
        "attention.key_length_mla": NOPE + ROPE,
        "attention.value_length_mla": V,
        "attention.q_lora_rank": LATENT,
        "attention.kv_lora_rank": LATENT,
        "attention.temperature_scale": 5.0,
        "attention.temperature_length": 8,
        "leading_dense_block_count": 1,
        "expert_count": EXPERTS,
        "expert_used_count": TOP_K,
        "expert_feed_forward_length": EXPERT_WIDTH,
        "expert_shared_count": 2,
        "expert_group_count": GROUPS,
        "expert_group_used_count": KEPT,
        "expert_weights_scale": 2.5,
        "expert_weights_norm": True,
        "expert_gating_func": gguf.ExpertGatingFuncType.SOFTMAX,
        "rope.dimension_count": ROPE,
        "rope.freq_base": 10000.0,
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": 32.0,
        "rope.scaling.original_context_length": 8,
        "rope.scaling.yarn_log_multiplier": 0.1,  # 0.1·mscale_all_dim: llama.cpp divides by 0.1
    }
    for key, value in want_fields.items():
        assert fields[f"mistral4.{key}"].contents() == pytest.approx(value), key


def test_k_quants_are_refused(tmp_path):
    """llama-quantize's k-quant types for expert stacks are not reproduced: refused, with
    nothing written."""
    model = _tiny_mistral4(tmp_path)
    with pytest.raises(NotImplementedError, match="Write f16 and run llama-quantize"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), ["f16", "q4_k_m"])
    assert not (tmp_path / "gguf").exists()


def _refusal(config) -> None:
    from fastlm.models import SPECS

    for check in SPECS[FAMILY].gguf_checks:
        check(config)


def _yarn(**changes) -> dict:
    return {"rope_parameters": dict(YARN, **changes)}


REFUSED = [
    (_yarn(mscale_all_dim=0.707, mscale=0.707), "'mscale_all_dim': 0.707"),
    (_yarn(attention_factor=1.2), "attention_factor=1.2"),
    (_yarn(truncate=False), "truncate=False"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "RoPE type 'default'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ({"num_hidden_layers": 27}, "27 layers and q_lora_rank=32"),
    ({"num_hidden_layers": 48, "vocab_size": 128256}, "48 layers and q_lora_rank=32"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok=7 > the 6 experts"),
]


@pytest.mark.parametrize(("overrides", "match"), REFUSED)
def test_what_llama_cpp_runs_otherwise_is_refused(overrides, match):
    """Refused before any tensor is written, each naming what llama.cpp does instead."""
    with pytest.raises(NotImplementedError, match=match):
        _refusal(tiny_config(FAMILY, **(ROWS_OF_32 | overrides)))


def test_the_tested_configs_are_not_refused():
    """Nor a DeepSeek-V2-Lite-sized model without a q latent (llama.cpp reads its q_proj)."""
    _refusal(tiny_config(FAMILY, **ROWS_OF_32))
    _refusal(tiny_config(FAMILY))  # tiny_models' own
    _refusal(tiny_config(FAMILY, **(ROWS_OF_32 | {"num_hidden_layers": 27, "q_lora_rank": None})))


def _without_checks(monkeypatch) -> None:
    from fastlm.models import SPECS

    monkeypatch.setitem(SPECS, FAMILY, dataclasses.replace(SPECS[FAMILY], gguf_checks=()))


def test_the_lite_refusal_is_needed(tmp_path, monkeypatch):
    """With the checks bypassed, a 26-layer Mistral 4 with its q latent is written, and llama.cpp
    does not load it (it expects a DeepSeek-V2-Lite's attn_q)."""
    pytest.importorskip("xllamacpp")
    _without_checks(monkeypatch)
    model = _tiny_mistral4(tmp_path, num_hidden_layers=26)
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "f16", name="t")
    with pytest.raises(RuntimeError):
        llama_cpp_server(out)


def test_the_yarn_refusal_is_needed(tmp_path, monkeypatch):
    """With the checks bypassed, DeepSeek-V2's YaRN (mscale = mscale_all_dim = 0.707) is
    written, and llama.cpp, which takes both as 1, misses transformers by far (measured 0.62)."""
    pytest.importorskip("xllamacpp")
    _without_checks(monkeypatch)
    model = _tiny_mistral4(tmp_path, **_yarn(mscale=0.707, mscale_all_dim=0.707))
    out, stored_model, _ = _exported(tmp_path, model, "f16")
    worst = _worst_error(llama_cpp_server(out), spm_tokenizer(), stored_model)
    print(f"mistral4 f16 with mscale = mscale_all_dim = 0.707: max |Δ log-prob| {worst:.2e}")
    assert worst > 10 * TOL["f16"][0], worst


def _k_b_untransposed(monkeypatch) -> None:
    """attn_k_b as kv_b_proj's (N, C) rows per head, not transposed (N = C: the same shape)."""
    layout = gguf_writer.LAYOUTS["MISTRAL4"]

    def split(config, hf_name, tensor):
        pieces = layout.split(config, hf_name, tensor)
        return [(n, t.transpose(1, 2) if n.endswith("k_b_proj.weight") else t) for n, t in pieces]

    monkeypatch.setitem(gguf_writer.LAYOUTS, "MISTRAL4", dataclasses.replace(layout, split=split))


def _llama_rope_rows(monkeypatch) -> None:
    """The RoPE rows permuted from halves to pairs as if transformers rotated halves (it rotates
    pairs already: rope_interleave)."""
    layout = gguf_writer.LAYOUTS["MISTRAL4"]

    def tensor(config, norm_offset, hf_name, value):
        halves = copy.copy(config)
        halves.rope_interleave = False
        return layout.tensor(halves, norm_offset, hf_name, value)

    monkeypatch.setitem(gguf_writer.LAYOUTS, "MISTRAL4", dataclasses.replace(layout, tensor=tensor))


def _no_groups(monkeypatch) -> None:
    """expert_group_count / _used_count left out: llama.cpp takes the top k of all experts."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_group_count", lambda self, count: None)


def _no_temperature(monkeypatch) -> None:
    """attention.temperature_scale left out: llama.cpp scales no query."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_attn_temperature_scale", lambda self, value: None)


MISTAKES = {
    "k_b untransposed": _k_b_untransposed,
    "RoPE rows permuted": _llama_rope_rows,
    "no expert groups": _no_groups,
    "no query temperature": _no_temperature,
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_layout_mistake_is_caught(tmp_path, monkeypatch, mistake):
    """The f16 bound has the power to see a mistake in the layout or the metadata: each of these
    files loads in llama.cpp and its log-probs miss transformers' by far more than the bound."""
    pytest.importorskip("xllamacpp")
    MISTAKES[mistake](monkeypatch)
    model = _tiny_mistral4(tmp_path)
    out, stored_model, _ = _exported(tmp_path, model, "f16")
    worst = _worst_error(llama_cpp_server(out), spm_tokenizer(), stored_model)
    print(f"mistral4 f16, {mistake}: max |Δ log-prob| {worst:.2e}")
    assert worst > 10 * TOL["f16"][0], worst
