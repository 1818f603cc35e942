"""Tiny reranker checkpoints: a random tiny causal LM and a character tokenizer that has "yes",
"no" and Qwen's chat markers as single tokens (as Qwen3-Reranker's tokenizer), built locally."""

from __future__ import annotations

import torch
from tiny_models import random_norms, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def reranker_tokenizer(answers: tuple[str, ...] = ("yes", "no")) -> PreTrainedTokenizerFast:
    """``tiny_tokenizer`` + the answer words (ordinary tokens) + the chat markers (special)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(list(answers))
    tokenizer.add_tokens(CHAT_MARKERS, special_tokens=True)
    return tokenizer


def save_tiny_reranker(
    model_type: str, path, seed: int = 0, answer_scale: float = 1.0, **overrides
):
    """A random tiny causal LM (``tiny_config``, random norms) with ``reranker_tokenizer``.

    ``answer_scale`` multiplies the LM-head rows of "yes" and "no": with the random init's rows
    (std 0.02) the relevance logit z cannot leave about ±0.6 whatever LoRA learns, where a real
    reranker's z spans tens. Returns ``path``.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    random_norms(model)
    tokenizer = reranker_tokenizer()
    answers = tokenizer.convert_tokens_to_ids(["yes", "no"])
    with torch.no_grad():
        model.get_output_embeddings().weight[answers] *= answer_scale
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
