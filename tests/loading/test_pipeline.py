"""The loading pipeline shared by FastModel, embedding models and rerankers: one placement, one
LoRA step, one report."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "embeddings"))
from embedding_helpers import CPU, save_tiny_embedding_model  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.embeddings import load_embedding_model  # noqa: E402
from fastlm.loading.checkpointing import enable_checkpointing  # noqa: E402
from fastlm.loading.device import placement  # noqa: E402


def test_placement_on_a_machine_without_the_asked_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement("auto", None) == ("cpu", torch.float32, None)
    assert placement("cpu", torch.float32) == ("cpu", torch.float32, "cpu")


def test_causal_lm_lora_logs_projections_and_attention_paths(tmp_path, caplog):
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu")
    with caplog.at_level(logging.INFO, logger="fastlm"):
        FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    messages = [record.getMessage() for record in caplog.records]
    layers = model.config.num_hidden_layers
    fused = 7 * layers + 1  # the projections and the LM head (the fused cross-entropy)
    assert f"fastlm: {fused} of {fused} projections run fused" in messages
    attention = [m for m in messages if "attention modules run" in m]
    assert attention and sum(int(m.split()[1]) for m in attention) == layers


@pytest.mark.parametrize("kind", ["qwen3", "bert"])
def test_embedding_lora_goes_through_the_same_step(tmp_path, caplog, kind):
    """Same defaults as FastModel (lora_alpha 16), same report in the log."""
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    model, _ = load_embedding_model(str(path), max_seq_length=32, **CPU)
    with caplog.at_level(logging.INFO, logger="fastlm"):
        model.get_peft_model(r=4, use_gradient_checkpointing=False)
    assert model.backbone.peft_config["default"].lora_alpha == 16
    messages = " ".join(record.getMessage() for record in caplog.records)
    expected = "projections run fused" if kind == "qwen3" else "runs without fastlm's kernels"
    assert expected in messages


def test_checkpointing_modes_are_one_set(tmp_path):
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu")
    with pytest.raises(ValueError, match="'unsloth'"):
        enable_checkpointing(model, "sometimes")
    enable_checkpointing(model, None)  # off: nothing happens
    assert not model.is_gradient_checkpointing
    enable_checkpointing(model, "unsloth")
    assert model.is_gradient_checkpointing and model.config.use_cache is False
