"""Tiny embedding-model directories (random weights, character tokenizer), built locally.

- ``qwen3``: a Qwen3Model body, left-padding tokenizer (as Qwen3-Embedding), last-token pooling.
- ``gemma3``: a bidirectional Gemma3TextModel body (as EmbeddingGemma, sliding window 3 < the
  test lengths), mean pooling, then Dense 72→96→72 (no bias, identity) and Normalize, with the
  EmbeddingGemma prompts: a Sentence-Transformers directory.
- ``gemma3_full``: the ``gemma3`` body with full-attention layers only (no window), mean pooling,
  no Dense: a bidirectional body the padding-free layout takes.
- ``embedding_gemma2``: an EmbeddingGemma2TextModel body (tests/tiny_models.py: sliding and full
  layers, per-layer inputs, projection to 50), mean pooling and Normalize, with query/document
  prompts: a Sentence-Transformers directory.
- ``bert``: a BertModel body (dropout on), CLS pooling, Normalize: a Sentence-Transformers
  directory.
"""

from __future__ import annotations

import torch
from tiny_models import VOCAB, random_norms, tiny_config, tiny_tokenizer
from transformers import AutoModel, BertConfig, Gemma3TextConfig

from fastlm.embeddings.model import PROMPT_STYLES
from fastlm.embeddings.pooling import Dense
from fastlm.embeddings.st_format import write_layout

# Tests that compare numbers at fp32 tolerances run on the CPU in fp32 on any machine (the
# device-aware comparison against transformers is tests/embeddings/test_patched_body.py).
CPU = {"device_map": "cpu", "dtype": torch.float32}
TEXTS = [
    "the cat sat on the mat",
    "a quick brown fox",
    "hi",
    "embeddings for retrieval, with padding!",
    "short one",
]


def gemma3_bidirectional_config() -> Gemma3TextConfig:
    """The tiny Gemma 3 config with bidirectional attention (window 4 → |i − j| < 3)."""
    base = tiny_config("gemma3_text").to_dict()
    base["use_bidirectional_attention"] = True
    return Gemma3TextConfig(**base)


def gemma3_full_attention_config() -> Gemma3TextConfig:
    """The bidirectional tiny Gemma 3 config with every layer full attention."""
    base = gemma3_bidirectional_config().to_dict()
    base["layer_types"] = ["full_attention"] * base["num_hidden_layers"]
    return Gemma3TextConfig(**base)


def save_tiny_embedding_model(kind: str, path, seed: int = 0):
    """Write a tiny embedding-model directory of ``kind`` (see module doc); returns ``path``."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    if kind == "qwen3":
        model = AutoModel.from_config(tiny_config("qwen3"))
        tokenizer.padding_side = "left"
    elif kind == "gemma3":
        model = AutoModel.from_config(gemma3_bidirectional_config())
    elif kind == "gemma3_full":
        model = AutoModel.from_config(gemma3_full_attention_config())
    elif kind == "embedding_gemma2":
        model = AutoModel.from_config(tiny_config("embedding_gemma2_text"))
    elif kind == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=70,
            max_position_embeddings=128,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            pad_token_id=0,
        )
        model = AutoModel.from_config(config)
    else:
        raise ValueError(kind)
    random_norms(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    hidden = model.config.hidden_size
    if kind == "gemma3":
        dense = [
            Dense(hidden, 96, bias=False, activation="torch.nn.modules.linear.Identity"),
            Dense(96, hidden, bias=False, activation="torch.nn.modules.linear.Identity"),
        ]
        style = PROMPT_STYLES["gemma3_text"]
        prompts = {"query": style.query_prompt(), "document": style.document_prompt}
        _write_layout(path, hidden, "mean", dense, 120, prompts)
    elif kind == "gemma3_full":
        _write_layout(path, hidden, "mean", [], 120, {})
    elif kind == "embedding_gemma2":  # pooling sees the projected states
        prompts = {"query": "query: ", "document": "document: "}
        _write_layout(path, model.config.embedding_dim, "mean", [], 120, prompts)
    elif kind == "bert":
        _write_layout(path, hidden, "cls", [], 100, {})
    return path


def _write_layout(path, hidden: int, pooling: str, dense: list, max_seq_length: int, prompts):
    # The Sentence-Transformers files: pooling, Dense layers, then Normalize.
    write_layout(
        str(path),
        pooling=pooling,
        hidden_size=hidden,
        dense=dense,
        normalize=True,
        max_seq_length=max_seq_length,
        do_lower_case=False,
        prompts=prompts,
        default_prompt_name=None,
    )


def cpu_training_args(tmp_path, learning_rate: float, max_steps: int, **overrides):
    """TrainingArguments for a short CPU run: batch 4, a log line per step, no saving."""
    from transformers import TrainingArguments

    options = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)
