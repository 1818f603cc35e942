"""GGUF export with byte-level BPE tokenizers (Llama 3, Qwen 2/3, Llama 4): llama.cpp tokenises as
HF does.

One vocabulary is trained here with Llama 3's split regex (so it has multi-digit tokens), then
given either Llama 3's or Qwen's pre-tokenizer: the two split digits differently ("123" vs "1",
"2", "3"), so a file labelled with the wrong llama.cpp pre-tokenizer tokenises text wrongly.
Llama 4's (GPT-4o's o200k split) is trained with its own regex, so that it has merges across a
word and its contraction ("They're" -> "The", "y're"), which Llama 3's split cuts off.
llama.cpp (xllamacpp) gets each prompt twice, as text (its own tokeniser) and as the HF token
ids: the prompt lengths and the next-token log-probs must be identical. The pre-tokenizer is the
vocabulary's, read by llama.cpp whatever the arch, so every tokenizer rides on a tiny Llama or
Qwen 2 (the Llama 4 arch is test_gguf_llama4's). The prompts leave out what llama.cpp's llama4
splits otherwise than transformers (combining marks, a non-ASCII capital after a lower-case
letter: gguf_writer's comment on BYTE_LEVEL_PRE_TOKENIZERS); a trained vocabulary's merges
rebuild each of its tokens, so Llama 4's ignore_merges, which llama.cpp does not honour, would
not act here and is not set.
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
    "They're sure it's fine; DON'T you'd say we've won? I'M here, she'll see.",
    "東京は日本の首都です。北京是中国的首都。😀🎉👍🏽 emoji!",
    "HelloWorld camelCase parseHTTPResponse Ελληνικά Русский Über",
    "path/to/file and/or http://x.y/z?!  \t tabs\t\tand   spaces\n\n\n  end",
] * 4
# digits, contractions, case runs, punctuation and "/", CJK, emoji, whitespace runs
VARIED = (
    "Order 12345 shipped on 2024-11-23! They're sure it's fine, DON'T you'd say? "
    "HelloWorld camelCase ÉCOLE École 東京は日本の首都です。😀🎉👍🏽\n\n\n  a  b   \t\tc/d  "
)
PROMPTS = [
    "Order 12345 shipped on 2024-11-23!",
    "the cat's hat\n\nnew  line   x",
    "naïve café at 3.14",
    VARIED,
]
SPECIALS = {
    "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama4": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|header_start|>",
        "<|header_end|>",
        "<|eot|>",
    ],
}


def _byte_level_tokenizer(pre: str) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def pre_tokenizer(name):
        split = pre_tokenizers.Split(Regex(REGEX[name]), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level])

    backend = Tokenizer(models.BPE())
    # Qwen's learns merges across digit runs with Llama 3's split; Llama 4's has its own
    backend.pre_tokenizer = pre_tokenizer("llama-bpe" if pre == "qwen2" else pre)
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
    if pre == "qwen2":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
    # Llama 3 and 4 add <|begin_of_text|> themselves; Llama 4 (an instruct model's tokenizer)
    # after a ByteLevel step, as its tokenizer.json has it
    bos = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    llama3 = pre == "llama-bpe"
    backend.post_processor = (
        bos if llama3 else processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>" if llama3 else "<|eot|>",
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


@pytest.mark.parametrize(
    "pre, model_type", [("llama-bpe", "llama"), ("qwen2", "qwen2"), ("llama4", "llama")]
)
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


def test_the_check_notices_llama4_written_as_llama3(tmp_path, monkeypatch):
    """Control: Llama 4's tokenizer written as llama-bpe gives llama.cpp more tokens: Llama 3's
    split cuts the contractions off their words ("They're" -> "The", "y", "'re", not "y're")."""
    tokenizer = _byte_level_tokenizer("llama4")
    monkeypatch.setitem(BYTE_LEVEL_PRE_TOKENIZERS, REGEX["llama4"], "llama-bpe")
    server = llama_cpp_server(_export(tmp_path, "llama", tokenizer))
    ids = tokenizer(VARIED).input_ids
    as_text = _next_token_logprobs(server, VARIED, tokenizer)
    assert as_text != _next_token_logprobs(server, ids, tokenizer)
    assert as_text[0] > len(ids)


def test_unknown_byte_level_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = _byte_level_tokenizer("qwen2")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ValueError, match="unknown byte-level BPE pre-tokenizer"):
        gguf_writer.tokenizer_vocab(tokenizer)
