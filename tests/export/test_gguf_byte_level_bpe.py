"""GGUF export with byte-level BPE tokenizers (Llama 3, Qwen 2/3): llama.cpp tokenises as HF does.

One vocabulary is trained here with Llama 3's split regex (so it has multi-digit tokens), then
given either Llama 3's or Qwen's pre-tokenizer: the two split digits differently ("123" vs "1",
"2", "3"), so a file labelled with the wrong llama.cpp pre-tokenizer tokenises text wrongly.
llama.cpp (xllamacpp) gets each prompt twice, as text (its own tokeniser) and as the HF token
ids: the prompt lengths and the next-token log-probs must be identical.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import llama_cpp_server, save_tiny_model
from transformers import PreTrainedTokenizerFast

from fastlm import FastModel
from fastlm.export import gguf_writer
from fastlm.export.gguf_writer import BYTE_LEVEL_PRE_TOKENIZERS, save_pretrained_gguf

pytest.importorskip("gguf")
REGEX = {name: regex for regex, name in BYTE_LEVEL_PRE_TOKENIZERS.items()}
CORPUS = [
    "the cat sat on the mat, and the dog's hat was 12 or 123 or 2024 years old.",
    "Order 4521 shipped on 2024-11-23 at 10:45!\nThanks,\n\n  the team",
    "naïve café déjà vu: 3.14159 is pi; 1000000 is a million",
] * 4
PROMPTS = [
    "Order 12345 shipped on 2024-11-23!",
    "the cat's hat\n\nnew  line   x",
    "naïve café at 3.14",
]
SPECIALS = {
    "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _byte_level_tokenizer(pre: str) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    def pre_tokenizer(name):
        split = pre_tokenizers.Split(Regex(REGEX[name]), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level])

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer("llama-bpe")  # learns merges across digit runs
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS[pre],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.pre_tokenizer = pre_tokenizer(pre)
    assert any(token.isdigit() and len(token) > 1 for token in backend.get_vocab())
    if pre == "llama-bpe":  # Llama 3 adds <|begin_of_text|> itself
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _export(tmp_path, model_type: str, tokenizer) -> str:
    path = save_tiny_model(model_type, tmp_path / "hf", vocab_size=len(tokenizer))
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    (out,) = save_pretrained_gguf(model.eval(), tmp_path / "gguf", tokenizer, "f16")
    return out


def _next_token_logprobs(server, prompt, tokenizer) -> tuple[int, list]:
    # The server withholds log-probs when the sampled token is an incomplete UTF-8 sequence:
    # never sample a token that is not plain ASCII.
    banned = [[i, False] for i in range(len(tokenizer)) if not tokenizer.decode([i]).isascii()]
    request = {"prompt": prompt, "n_predict": 1, "temperature": 0, "n_probs": 5}
    response = server.handle_completions({**request, "cache_prompt": False, "logit_bias": banned})
    top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return response["usage"]["prompt_tokens"], [(t["id"], round(t["logprob"], 5)) for t in top]


@pytest.mark.parametrize("pre, model_type", [("llama-bpe", "llama"), ("qwen2", "qwen2")])
def test_llama_cpp_tokenises_like_transformers(tmp_path, pre, model_type):
    import gguf

    tokenizer = _byte_level_tokenizer(pre)
    out = _export(tmp_path, model_type, tokenizer)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == pre
    server = llama_cpp_server(out)
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        as_text = _next_token_logprobs(server, prompt, tokenizer)
        assert as_text == _next_token_logprobs(server, ids, tokenizer), prompt


def test_the_check_notices_a_wrong_pre_tokenizer(tmp_path, monkeypatch):
    """Control: Qwen's tokenizer written as llama-bpe gives llama.cpp other tokens for digits."""
    tokenizer = _byte_level_tokenizer("qwen2")
    monkeypatch.setitem(BYTE_LEVEL_PRE_TOKENIZERS, REGEX["qwen2"], "llama-bpe")
    server = llama_cpp_server(_export(tmp_path, "qwen2", tokenizer))
    ids = tokenizer(PROMPTS[0]).input_ids
    # "12345" -> "123", "45" instead of five digits
    assert _next_token_logprobs(server, PROMPTS[0], tokenizer)[0] < len(ids)


def test_unknown_byte_level_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = _byte_level_tokenizer("qwen2")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ValueError, match="unknown byte-level BPE pre-tokenizer"):
        gguf_writer.tokenizer_vocab(tokenizer)
