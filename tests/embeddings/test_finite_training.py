"""EmbeddingTrainer and RerankerTrainer stop on a NaN weight met in training, naming it, and write
no checkpoint holding NaN/inf; the embedding loader names NaN/inf weights at load."""

from __future__ import annotations

import pytest
from embedding_helpers import CPU, cpu_training_args, save_tiny_embedding_model
from finite_helpers import BROKEN, break_base_weight, non_finite_files
from reranker_helpers import save_tiny_reranker
from safetensors.torch import load_file, save_file

from fastlm.embeddings import (
    EmbeddingTrainer,
    FastReranker,
    InfoNCELoss,
    RerankerTrainer,
    load_embedding_model,
)
from fastlm.errors import NonFiniteLossError, NonFiniteWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedding_trainer_stops_on_a_nan_body_weight_and_saves_nothing(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=64, lora_r=4, **CPU)
    break_base_weight(model)
    rows = [{"anchor": f"q{i}", "positive": f"answer {i}"} for i in range(8)]
    args = cpu_training_args(tmp_path, 1e-3, 2, save_strategy="steps", save_steps=1)
    trainer = EmbeddingTrainer(model, args, train_dataset=rows, loss=InfoNCELoss())
    with pytest.raises(NonFiniteLossError, match=rf"{BROKEN}\.base_layer\.weight"):
        trainer.train()
    assert non_finite_files(tmp_path / "out") == []


def test_reranker_trainer_stops_on_a_nan_weight_and_saves_nothing(tmp_path):
    path = save_tiny_reranker("qwen3", tmp_path / "qwen3")
    reranker = FastReranker.from_pretrained(str(path), max_seq_length=400, **CPU)
    reranker.get_peft_model(r=4, use_gradient_checkpointing=False)
    break_base_weight(reranker)
    rows = [{"query": "cat", "response": "a cat naps", "rejected_response": ["hot sun"]}] * 4
    args = cpu_training_args(tmp_path, 1e-2, 2, save_strategy="steps", save_steps=1)
    trainer = RerankerTrainer(reranker, args, train_dataset=rows)
    with pytest.raises(NonFiniteLossError, match=rf"{BROKEN}\.base_layer\.weight"):
        trainer.train()
    assert non_finite_files(tmp_path / "out") == []


def test_embedding_loader_names_inf_weights(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    weights = load_file(path / "model.safetensors")
    key = next(k for k in weights if BROKEN in k)
    weights[key][1, 1] = float("-inf")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=rf"{BROKEN}\.weight \(1 of"):
        load_embedding_model(str(path), **CPU)
