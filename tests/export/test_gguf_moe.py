"""GGUF export of the mixture-of-experts families in llama.cpp (xllamacpp): Qwen3-MoE (qwen3moe),
Qwen3.5-MoE text (qwen35moe) and gpt-oss (gpt-oss), LoRA merged into attention and the experts.

Each tiny model is tiny_models' family with every row a multiple of 32 (hidden 64, head_dim 16,
expert width 32), so that q8_0 quantises every matrix: LoRA (B ≠ 0) on attention (and Qwen3.5's
linear attention and shared expert) and on both expert parameters (PEFT's target_parameters),
base weights sharpened so that the next-token distributions are far from uniform. llama.cpp's
next-token log-probs over several prompts are compared with transformers' on PEFT's merged
weights, rounded as the file stores them (``_as_stored``: f16 / bf16 elementwise, q8_0 in
32-weight blocks along each row, routers and biases F32), and its greedy tokens with
transformers'. What the file holds (names, split and transposed expert
stacks, F32 routers, metadata) is read back with gguf's reader; what llama.cpp would run
otherwise, and the k-quants, are refused with nothing written.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
from tiny_models import llama_cpp_server, save_tiny_model, tiny_config

from fastlm import FastModel
from fastlm.export.gguf_writer import gguf_tensors, merged_state, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers.models.qwen3_moe")

from test_gguf import spm_tokenizer  # noqa: E402

VOCAB = 300  # spm_tokenizer's
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Qwen3.5's linear attention, and (as target_modules) the shared expert's projections.
QWEN35_EXTRA = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
QWEN35_EXTRA += ["gate_proj", "up_proj", "down_proj"]
PROMPTS = ["the cat in a hat sat on the mat the", "a quick brown fox", "in the", "zebra"]
PROMPTS += ["hello there then", "the the the", "quiz jam", "abc", "xyz mnop"]
ROWS_OF_32 = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
YARN_TRUNCATED = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": True,  # llama.cpp rounds the correction range to whole dims, as this does
    "original_max_position_embeddings": 64,
}
# model_type: (gguf arch, overrides of tiny_models' config, extra LoRA targets, (weights' and
# the LM head's extra sharpening factors))
FAMILIES = {
    "qwen3_moe": (
        "QWEN3MOE",
        dict(ROWS_OF_32, moe_intermediate_size=32, mlp_only_layers=[]),  # every layer MoE
        [],
        (4.0, 2.0),
    ),
    "qwen3_5_moe_text": (
        "QWEN35MOE",
        dict(
            ROWS_OF_32,
            linear_key_head_dim=16,
            linear_value_head_dim=16,  # = key: llama.cpp's qwen35moe needs it
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        QWEN35_EXTRA,
        (3.0, 2.0),
    ),
    "gpt_oss": (
        "GPT_OSS",
        dict(ROWS_OF_32, intermediate_size=32, swiglu_limit=7.0, rope_parameters=YARN_TRUNCATED),
        [],
        (2.0, 3.0),
    ),
}
SKIPS = {
    "qwen3_5_moe_text": importlib.util.find_spec("transformers.models.qwen3_5_moe") is None,
    "gpt_oss": importlib.util.find_spec("transformers.models.gpt_oss") is None,
}
FAMILY_PARAMS = [
    pytest.param(
        t, marks=pytest.mark.skipif(SKIPS.get(t, False), reason=f"transformers without {t}")
    )
    for t in FAMILIES
]
# max |Δ log-prob| of llama.cpp's top-10 next tokens against transformers on the weights the file
# holds (first bound) and on the fp32 merged weights (second), over PROMPTS. Measured (stored /
# fp32; Qwen3-MoE, Qwen3.5-MoE, gpt-oss): f16 2.3e-3 / 2.5e-3, 3.0e-3 / 2.5e-3, 2.2e-3 / 6.6e-3
# (the f16 bound is test_gguf's tiny families'); bf16 7.2e-3 / 1.4e-2, 1.5e-2 / 1.9e-2,
# 1.8e-2 / 2.5e-2; q8_0 3.9e-2 / 5.3e-2, 8.2e-2 / 0.14, 6.6e-2 / 0.13. bf16 and q8_0 stay
# further from the stored weights' model because llama.cpp also rounds each matrix product's
# activations to the weights' type (bf16: 8-bit mantissas; q8_0: int8 in 32-value blocks).
# Sharper models (gpt-oss's matrices ×3 instead of ×2) put some routing within those roundings
# of a tie: a token then takes another expert in one of the two and that prompt's log-probs
# move by 0.02-0.4 (measured), in f16 too. A layout mistake moves them by more: see
# test_a_layout_mistake_is_caught.
TOL = {"f16": (5e-3, 0.02), "bf16": (0.03, 0.05), "q8_0": (0.12, 0.2)}
# Greedy steps that must follow transformers' (on the stored weights) out of 12.
GREEDY_STEPS = {"f16": 8, "bf16": 6, "q8_0": 6}
# spm_tokenizer's specials (0-3) and byte tokens (4-259) are kept off every greedy choice, in
# llama.cpp (a logit bias; its reported log-probs stay the raw distribution's) and here: the
# server reports a step only once its text is complete UTF-8, which a lone byte token may not
# be, and ignore_eos bans the end-of-generation token, which transformers would pick.
BANNED = range(260)


def _tiny_moe(tmp_path, model_type: str, **overrides):
    """tiny_models' family with FAMILIES' overrides (+ ``overrides``), LoRA with B ≠ 0 on
    attention and the experts, sharpened, byte tokens out of reach.

    Sharpened: matrices (experts and routers included) ×weights, norms ×3, the LM head ×head
    more. At init scale the next-token distributions are near uniform (top log-prob about -5.3
    against -5.7 for uniform), where a layout mistake hardly moves them; sharpened, the top
    word token's is -1.2 to -2.7 among the 40 word tokens (-3.7 uniform) on PROMPTS.
    spm_tokenizer's byte tokens get zero logits (their LM-head rows zeroed): the comparisons
    and greedy runs are about the word tokens the prompts are made of."""
    _, family_overrides, extra_targets, (weights, head) = FAMILIES[model_type]
    kwargs = dict(family_overrides, vocab_size=VOCAB) | overrides
    path = save_tiny_model(model_type, tmp_path / "hf", **kwargs)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        target_modules=ATTENTION + extra_targets,
        target_parameters=EXPERTS,
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_" not in name and "norm" in name:
                param.mul_(3.0)
            elif "lora_" not in name and param.ndim >= 2:  # not biases, sinks, A_log
                param.mul_(weights * (head if "lm_head" in name else 1.0))
        model.get_base_model().lm_head.weight[4:260] = 0
    return model.eval()


def _peft_merged(model) -> dict[str, torch.Tensor]:
    """The merged weights the straightforward way: PEFT's merge_and_unload on a deep copy."""
    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().float().clone() for k, v in merged.state_dict().items()}


def merged_like_peft(model) -> dict[str, torch.Tensor]:
    """PEFT's merged state dict, after checking that fastlm's merge (the GGUF writer's
    ``merged_state``) equals it, experts included."""
    merged = _peft_merged(model)
    ours = dict(merged_state(model))
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)
    return merged


def _transformers_model(config, state: dict[str, torch.Tensor]):
    """A plain transformers model (eager experts) holding ``state``: no fastlm patching."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), dtype=torch.float32, experts_implementation="eager"
    )
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return reference.eval()


def _as_stored(name: str, tensor: torch.Tensor, method: str, in_out_experts: bool):
    """``tensor`` rounded as the GGUF file stores it: F32 (1-D, routers, biases, the conv
    kernel), else f16 / bf16, or q8_0 in 32-weight blocks along each row of the (out, in)
    matrix (f16 where the row is not a multiple of 32)."""
    f32 = ("mlp.gate.weight", "mlp.router.weight", "shared_expert_gate.weight", "conv1d.weight")
    if tensor.ndim < 2 or name.endswith(f32) or "bias" in name:
        return tensor
    if method == "bf16":
        return tensor.to(torch.bfloat16).float()
    if method == "f16":
        return tensor.to(torch.float16).float()
    transposed = in_out_experts and name.endswith(tuple(EXPERTS))  # (E, in, out) in transformers
    rows = tensor.transpose(1, 2) if transposed else tensor
    decoded = q8_0_rows(rows)
    return decoded.transpose(1, 2) if transposed else decoded


def q8_0_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` through q8_0 in 32-weight blocks along the last dim, as gguf's writer packs a
    row of llama.cpp's (out, in) matrix (f16 where it is not a multiple of 32)."""
    if rows.shape[-1] % 32:
        return rows.to(torch.float16).float()
    q8 = gguf.GGMLQuantizationType.Q8_0
    decoded = gguf.quants.dequantize(gguf.quants.quantize(rows.contiguous().numpy(), q8), q8)
    return torch.from_numpy(np.array(decoded)).reshape(rows.shape)


def _complete(server, ids: list[int], steps: int, n_probs: int) -> list[dict]:
    """llama.cpp's greedy steps after ``ids``: per step its id, log-prob and top log-probs."""
    request = {"prompt": ids, "n_predict": steps, "temperature": 0, "n_probs": n_probs}
    request |= {"ignore_eos": True, "cache_prompt": False}
    request["logit_bias"] = [[token, False] for token in BANNED]
    response = server.handle_completions(request)
    assert response["usage"]["prompt_tokens"] == len(ids), response
    content = response["choices"][0]["logprobs"]["content"]
    assert len(content) == steps, content
    for step in content:  # non-finite logits come back null
        assert all(e["logprob"] is not None for e in step["top_logprobs"]), step
    return content


def _next_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)


def _greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers' greedy ids (BANNED left out, as in llama.cpp) and their log-probs."""
    tokens, logprobs = [], []
    for _ in range(steps):
        logp = _next_logprobs(model, ids + tokens)
        best = int(logp.index_fill(0, torch.tensor(BANNED), -torch.inf).argmax())
        tokens.append(best)
        logprobs.append(float(logp[best]))
    return tokens, logprobs


def _errors(server, tokenizer, stored, fp32, tol: float) -> tuple[list[float], list[float]]:
    """Per prompt: max |Δ log-prob| of llama.cpp's top-10 next tokens against the stored-weights
    model and the fp32 one; llama.cpp's best token must be (within ``tol`` of) the stored
    model's."""
    errors, errors_fp32 = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        (step,) = _complete(server, ids, 1, n_probs=10)
        cpp = {e["id"]: e["logprob"] for e in step["top_logprobs"]}
        want, ref = _next_logprobs(stored, ids), _next_logprobs(fp32, ids)
        errors.append(max(abs(v - float(want[i])) for i, v in cpp.items()))
        errors_fp32.append(max(abs(v - float(ref[i])) for i, v in cpp.items()))
        allowed = want.index_fill(0, torch.tensor(BANNED), -torch.inf)
        assert float(want[step["id"]]) > float(allowed.max()) - tol, (prompt, step)
        # far from uniform over the word tokens (else a wrong layout could hide in it)
        words = want[len(BANNED) :] - want[len(BANNED) :].logsumexp(0)
        assert float(words.max()) > np.log(1 / words.numel()) + 0.75, prompt
    return errors, errors_fp32


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_tiny_moe_in_llama_cpp(tmp_path, model_type, method):
    """llama.cpp's next-token log-probs within TOL of transformers' over PROMPTS, and its greedy
    run follows transformers' for GREEDY_STEPS of 12 steps."""
    pytest.importorskip("xllamacpp")
    model = _tiny_moe(tmp_path, model_type)
    config = model.get_base_model().config
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, method, name="tiny")
    merged = _peft_merged(model)
    in_out = model_type == "gpt_oss"
    stored = {k: _as_stored(k, v, method, in_out) for k, v in merged.items()}
    stored_model = _transformers_model(config, stored)
    fp32_model = _transformers_model(config, merged)
    server = llama_cpp_server(out)

    assert_like_transformers(server, tokenizer, stored_model, fp32_model, method, model_type)


def assert_like_transformers(server, tokenizer, stored_model, fp32_model, method, label) -> None:
    """llama.cpp's next-token log-probs within TOL[method] of transformers' on the stored and on
    the fp32 weights over PROMPTS, and its greedy run on PROMPTS[0] equal to transformers' for
    at least GREEDY_STEPS[method] of 12 steps, each step's log-prob within the tight bound."""
    tight, loose = TOL[method]
    errors, errors_fp32 = _errors(server, tokenizer, stored_model, fp32_model, tight)
    print(f"{label} {method}: max |Δ log-prob| {max(errors):.2e} (stored weights), "
          f"{max(errors_fp32):.2e} (fp32)")  # fmt: skip
    assert max(errors) < tight, errors
    assert max(errors_fp32) < loose, errors_fp32

    ids = tokenizer(PROMPTS[0]).input_ids
    hf_ids, hf_logp = _greedy(stored_model, ids, 12)
    content = _complete(server, ids, 12, n_probs=1)
    cpp_ids = [step["id"] for step in content]
    same = next((i for i, (a, b) in enumerate(zip(cpp_ids, hf_ids)) if a != b), len(hf_ids))
    print(f"{label} {method}: greedy steps equal to transformers': {same} of 12")
    assert same >= GREEDY_STEPS[method], (cpp_ids, hf_ids)
    for step, want in zip(content[:same], hf_logp):
        assert abs(step["logprob"] - want) < tight, (step, want)


@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_expert_stacks_and_metadata(tmp_path, model_type):
    """The experts as llama.cpp reads them, from the merged transformers parameters: per
    expert (out, in) gate / up / down stacks, F32 routers and biases; the MoE metadata."""
    arch_name = FAMILIES[model_type][0]
    model = _tiny_moe(tmp_path, model_type)
    config = model.get_base_model().config
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "q8_0", name="t")
    merged = merged_like_peft(model)
    base = {n: p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    layer0 = "model.layers.0.mlp.experts."
    assert not torch.allclose(  # the experts' LoRA is in the file's weights
        merged[layer0 + "down_proj"], base[layer0 + "base_layer.base_layer.down_proj"]
    )

    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH[arch_name]))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    gate_up, down = merged[layer0 + "gate_up_proj"], merged[layer0 + "down_proj"]
    width = down.shape[2] if model_type != "gpt_oss" else down.shape[1]
    if model_type == "gpt_oss":  # (E, in, out), gate/up interleaved along the outputs
        gate, up = gate_up[:, :, 0::2].transpose(1, 2), gate_up[:, :, 1::2].transpose(1, 2)
        down = down.transpose(1, 2)
    else:  # (E, out, in), rows [gate | up]
        gate, up = gate_up[:, :width], gate_up[:, width:]
    for gguf_name, want in [("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", down)]:
        torch.testing.assert_close(expected[f"blk.0.{gguf_name}.weight"], want)
        tensor = tensors[f"blk.0.{gguf_name}.weight"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, gguf_name
        assert list(tensor.shape) == list(reversed(want.shape))  # ne = [in, out, E]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        np.testing.assert_allclose(got, want.numpy(), atol=0.01 * float(want.abs().max()))
    router = "router" if model_type == "gpt_oss" else "gate"
    f32 = {"blk.0.ffn_gate_inp.weight": merged[f"model.layers.0.mlp.{router}.weight"]}
    if model_type == "gpt_oss":
        bias = merged[layer0 + "gate_up_proj_bias"]
        f32 |= {
            "blk.0.ffn_gate_exps.bias": bias[:, 0::2],
            "blk.0.ffn_up_exps.bias": bias[:, 1::2],
            "blk.0.ffn_down_exps.bias": merged[layer0 + "down_proj_bias"],
            "blk.0.ffn_gate_inp.bias": merged["model.layers.0.mlp.router.bias"],
            "blk.0.attn_sinks.weight": merged["model.layers.0.self_attn.sinks"],
        }
    if model_type == "qwen3_5_moe_text":
        gate_inp = merged["model.layers.0.mlp.shared_expert_gate.weight"]
        f32["blk.0.ffn_gate_inp_shexp.weight"] = gate_inp.reshape(-1)  # (1, H) -> (H,)
        assert "blk.0.ffn_gate_shexp.weight" in tensors
    for gguf_name, want in f32.items():  # routers, biases, sinks: F32 in every file type
        tensor = tensors[gguf_name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, gguf_name
        np.testing.assert_array_equal(np.array(tensor.data).reshape(want.shape), want.numpy())

    prefix = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]]
    fields = reader.fields
    n_experts = config.num_local_experts if model_type == "gpt_oss" else config.num_experts
    want_fields = {
        "expert_count": n_experts,
        "expert_used_count": config.num_experts_per_tok,
        "expert_feed_forward_length": width,
        "attention.key_length": 16,
    }
    if model_type == "qwen3_5_moe_text":
        want_fields["expert_shared_feed_forward_length"] = 32
    if model_type == "gpt_oss":
        want_fields |= {
            "attention.sliding_window": config.sliding_window,
            "rope.dimension_count": 16,
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 4.0,
            "rope.scaling.original_context_length": 64,
            "rope.scaling.yarn_beta_fast": 32.0,
        }
    for key, value in want_fields.items():
        assert fields[f"{prefix}.{key}"].contents() == pytest.approx(value), key


@pytest.mark.parametrize("method", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quants_are_refused(tmp_path, method):
    """llama-quantize's k-quant types for expert stacks are not reproduced: refused, with
    nothing written."""
    model = _tiny_moe(tmp_path, "qwen3_moe")
    with pytest.raises(NotImplementedError, match="Write f16 and run llama-quantize"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), ["f16", method])
    assert not (tmp_path / "gguf").exists()


def _refusal(config) -> None:
    from fastlm.models import SPECS

    for check in SPECS[config.model_type].gguf_checks:
        check(config)


REFUSED = [
    ("qwen3_moe", {}, r"mlp_only_layers=\[1\]"),  # tiny_models' dense middle layer
    ("qwen3_moe", {"mlp_only_layers": [], "decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen3_moe", {"mlp_only_layers": [], "norm_topk_prob": False}, "norm_topk_prob=False"),
    ("qwen3_5_moe_text", {}, "linear_key_head_dim == linear_value_head_dim"),
    ("gpt_oss", {"rope_parameters": YARN_TRUNCATED}, r"\(1\.702, 1\.0\)"),  # swiglu_limit 1
    (
        "gpt_oss",
        {"swiglu_limit": 7.0, "rope_parameters": dict(YARN_TRUNCATED, attention_factor=1.3)},
        "attention_factor",
    ),
    (
        "gpt_oss",
        dict(swiglu_limit=7.0, rope_parameters=YARN_TRUNCATED, layer_types=["full_attention"] * 3),
        "the only pattern",
    ),
    (
        "gpt_oss",
        dict(swiglu_limit=7.0, rope_parameters=YARN_TRUNCATED, tie_word_embeddings=True),
        "tied embeddings",
    ),
]


@pytest.mark.parametrize(("model_type", "overrides", "match"), REFUSED)
def test_what_llama_cpp_runs_otherwise_is_refused(model_type, overrides, match):
    """Refused before any tensor is written, each naming what llama.cpp does instead."""
    if SKIPS.get(model_type, False):
        pytest.skip(f"transformers without {model_type}")
    with pytest.raises(NotImplementedError, match=match):
        _refusal(tiny_config(model_type, **overrides))


@pytest.mark.skipif(SKIPS["gpt_oss"], reason="transformers without gpt_oss")
def test_openai_s_yarn_is_written_with_a_warning_and_runs_within_the_f16_bound(tmp_path, caplog):
    """YaRN's truncate=False (OpenAI's gpt-oss configs): llama.cpp rounds the correction range
    to whole dims, as in every llama.cpp gpt-oss file; the tiny model's log-probs stay within
    the f16 bound (measured 2.7e-3, against 2.2e-3 with truncate=True)."""
    pytest.importorskip("xllamacpp")
    yarn = dict(YARN_TRUNCATED, truncate=False)
    model = _tiny_moe(tmp_path, "gpt_oss", rope_parameters=yarn)
    tokenizer = spm_tokenizer()
    with caplog.at_level("WARNING", logger="fastlm"):
        (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, "f16", name="tiny")
    assert any("truncate=False" in r.getMessage() for r in caplog.records)
    merged = _peft_merged(model)
    stored = {k: _as_stored(k, v, "f16", True) for k, v in merged.items()}
    config = model.get_base_model().config
    stored_model = _transformers_model(config, stored)
    fp32_model = _transformers_model(config, merged)
    tight, loose = TOL["f16"]
    errors, errors_fp32 = _errors(llama_cpp_server(out), tokenizer, stored_model, fp32_model, tight)
    print(f"gpt_oss truncate=False f16: max |Δ log-prob| {max(errors):.2e}")
    assert max(errors) < tight and max(errors_fp32) < loose, (errors, errors_fp32)


@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_the_tested_configs_are_not_refused(model_type):
    _refusal(tiny_config(model_type, **FAMILIES[model_type][1]))


@pytest.mark.parametrize("model_type", FAMILY_PARAMS)
def test_a_layout_mistake_is_caught(tmp_path, monkeypatch, model_type):
    """The f16 bound has the power to see a layout mistake: with gate and up swapped in the
    experts' split (same shapes, so llama.cpp loads the file) the log-probs miss it by far."""
    pytest.importorskip("xllamacpp")
    from fastlm.export import gguf_moe

    split = gguf_moe._gate_and_up
    monkeypatch.setattr(
        gguf_moe, "_gate_and_up", lambda t, interleaved: split(t, interleaved)[::-1]
    )
    model = _tiny_moe(tmp_path, model_type)
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, "f16", name="tiny")
    merged = _peft_merged(model)
    stored = {k: _as_stored(k, v, "f16", model_type == "gpt_oss") for k, v in merged.items()}
    config = model.get_base_model().config
    stored_model = _transformers_model(config, stored)
    errors = []
    server = llama_cpp_server(out)
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        (step,) = _complete(server, ids, 1, n_probs=10)
        want = _next_logprobs(stored_model, ids)
        errors.append(max(abs(e["logprob"] - float(want[e["id"]])) for e in step["top_logprobs"]))
    print(f"{model_type} f16, gate and up swapped: max |Δ log-prob| {max(errors):.2e}")
    assert max(errors) > 10 * TOL["f16"][0], errors


def test_a_qlora_moe_model_exports_its_dequantised_merged_weights(tmp_path):
    """load_in_4bit keeps the experts NF4 (fastlm/models/nf4_experts.py): the GGUF's tensors are
    merged_16bit's, i.e. the dequantised experts plus their LoRA."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from fastlm.export import save_pretrained_merged

    kwargs = dict(FAMILIES["qwen3_moe"][1], vocab_size=VOCAB)
    path = save_tiny_model("qwen3_moe", tmp_path / "hf", **kwargs)
    model, tokenizer = FastModel.from_pretrained(
        str(path), dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_parameters=EXPERTS)
    model = FastModel.get_peft_model(model, target_modules=ATTENTION, **lora)
    folder = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    written = {}
    for shard in sorted(folder.glob("*.safetensors")):
        written |= load_file(shard)
    ours = dict(merged_state(model))
    assert set(written) <= set(ours) and "model.layers.0.mlp.experts.gate_up_proj" in written
    for name, tensor in written.items():
        torch.testing.assert_close(ours[name], tensor.float(), rtol=1e-6, atol=1e-6)
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "f16", name="q")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    gate = ours["model.layers.0.mlp.experts.gate_up_proj"][:, :32]
    stored = tensors["blk.0.ffn_gate_exps.weight"]
    got = np.array(stored.data, dtype=np.float32).reshape(gate.shape)
    np.testing.assert_allclose(got, gate.numpy(), rtol=1e-3, atol=1e-3)
