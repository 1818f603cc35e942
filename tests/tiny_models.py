"""Tiny, odd-sized models and a character tokenizer, built locally (no hub)."""

from __future__ import annotations

import string

import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 131  # odd on purpose
# Odd sizes shared by the Llama-shaped families (GQA 6/2, hidden 72, intermediate 100).
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=72,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_config(model_type: str, **overrides):
    """A 2–3 layer config with odd sizes (GQA, non-power-of-two dims)."""
    if model_type == "llama":
        config = LlamaConfig(
            **_LLAMA_LIKE,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    elif model_type == "gemma3_text":
        config = Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=72,
            intermediate_size=90,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=24,
            query_pre_attn_scalar=24,
            max_position_embeddings=256,
            sliding_window=4,  # shorter than the test sequences, so the window matters
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=None,
            tie_word_embeddings=True,
        )
    elif model_type == "mistral":
        config = MistralConfig(
            **_LLAMA_LIKE,
            sliding_window=4,  # shorter than the test sequences, so the window matters
            tie_word_embeddings=False,
        )
    elif model_type == "qwen2":
        config = Qwen2Config(
            **_LLAMA_LIKE,
            tie_word_embeddings=True,
        )
    elif model_type == "qwen3":
        config = Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=72,
            intermediate_size=100,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # explicit: heads·head_dim (96) ≠ hidden (72)
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    elif model_type == "gemma":
        config = GemmaConfig(
            vocab_size=VOCAB,
            hidden_size=72,
            intermediate_size=90,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=24,
            hidden_act="gelu_pytorch_tanh",
            max_position_embeddings=256,
        )
    elif model_type == "gemma2":
        config = Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=72,
            intermediate_size=90,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=24,
            query_pre_attn_scalar=24,
            max_position_embeddings=256,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            attn_logit_softcapping=2.0,  # small, so that capping changes the scores
            final_logit_softcapping=3.0,
        )
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_batch(vocab: int = VOCAB, batch: int = 3, seq: int = 11, seed: int = 0):
    """Right-padded batch: rows of different lengths, mask and -100 labels on the padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row, length in enumerate([seq, seq - 3, seq - 6][:batch]):
        attention_mask[row, length:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (fits VOCAB) with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + string.punctuation + " \n"
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def save_tiny_model(model_type: str, path, seed: int = 0, **overrides):
    """Build a random tiny model in fp32, save it (with the tokenizer) and return the path."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random (not unit) norm weights so the (1+w) vs w offset matters in the comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
