"""FastModel.from_pretrained(..., embedding_mode=True) and FastModel.get_peft_model on it."""

from __future__ import annotations

import torch
from embedding_helpers import CPU, TEXTS, save_tiny_embedding_model

from fastlm import FastModel
from fastlm.embeddings import FastSentenceTransformer


def test_embedding_mode_returns_a_sentence_embedder_with_lora(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    expected = FastSentenceTransformer.from_pretrained(str(path), **CPU).encode(TEXTS)
    model, tokenizer = FastModel.from_pretrained(str(path), embedding_mode=True, **CPU)
    assert isinstance(model, FastSentenceTransformer) and tokenizer is not None
    vectors = model.encode(TEXTS)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    torch.testing.assert_close(vectors, expected)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_get_peft_model_passes_every_lora_option_to_an_embedding_model(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = FastModel.from_pretrained(str(path), embedding_mode=True, **CPU)
    model = FastModel.get_peft_model(
        model, r=4, lora_alpha=8, bias="lora_only", use_rslora=True, use_dora=True,
        init_lora_weights="gaussian", use_gradient_checkpointing=False,
    )  # fmt: skip
    config = model.backbone.peft_config["default"]
    assert (config.r, config.lora_alpha, config.bias) == (4, 8, "lora_only")
    assert config.use_rslora and config.use_dora and config.init_lora_weights == "gaussian"
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
