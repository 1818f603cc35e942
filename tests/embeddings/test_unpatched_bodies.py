"""A body fastlm has no patches for runs transformers' code, and the log says so in one line:
a warning for a family fastlm does not know (it must not pass for fastlm's speed), an info line
for the encoder families that are meant to run that way."""

from __future__ import annotations

import logging

import torch
from embedding_helpers import CPU, save_tiny_embedding_model
from tiny_models import VOCAB, tiny_tokenizer
from transformers import AutoModel, GPT2Config

from fastlm.embeddings import load_embedding_model


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unknown_family_is_reported_as_unpatched(tmp_path, caplog):
    path = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    AutoModel.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    with caplog.at_level(logging.INFO, logger="fastlm"):
        model, _ = load_embedding_model(str(path), pooling="mean", **CPU)
    assert model.embed(["a b"]).shape == (1, 32)
    found = [m for m in _warnings(caplog) if "no patches for model_type 'gpt2'" in m]
    assert len(found) == 1, _warnings(caplog)


def test_an_encoder_family_is_not_a_warning(tmp_path, caplog):
    path = save_tiny_embedding_model("bert", tmp_path / "bert")
    with caplog.at_level(logging.INFO, logger="fastlm"):
        load_embedding_model(str(path), **CPU)
    assert not [m for m in _warnings(caplog) if "no patches" in m]
    assert any("bert body: transformers' code" in r.getMessage() for r in caplog.records)
