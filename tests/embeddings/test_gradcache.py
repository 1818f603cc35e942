"""GradCache InfoNCE: the same loss and parameter gradients as plain InfoNCE on the same batch.

fp32; loss within 1e-5 relative, each trainable gradient within relative error 1e-4 (the mini-
batches pad differently from the full batch, which moves RoPE positions by whole tokens: equal
up to rounding).
"""

from __future__ import annotations

import pytest
import torch
from embedding_helpers import CPU, TEXTS, save_tiny_embedding_model
from tiny_models import relative_error

from fastlm.embeddings import (
    EmbeddingCollator,
    GradCacheInfoNCELoss,
    InfoNCELoss,
    load_embedding_model,
)

ROWS = [
    {"query": "cat?", "response": TEXTS[0], "rejected_response": [TEXTS[1], TEXTS[4]]},
    {"query": "which fox", "response": TEXTS[1], "rejected_response": [TEXTS[0]]},
    {"query": "hi", "response": TEXTS[2], "rejected_response": []},
    {"query": "retrieval padding", "response": TEXTS[3], "rejected_response": [TEXTS[2]]},
    {"query": "a short one", "response": TEXTS[4], "rejected_response": [TEXTS[3], TEXTS[1]]},
]


def _grads(model, loss_fn, batch, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn.batch_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _model(tmp_path, kind, **kwargs):
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    model, _ = load_embedding_model(str(path), max_seq_length=120, **CPU, **kwargs)
    return model


@pytest.mark.parametrize("kind,full", [("qwen3", False), ("gemma3", True)], ids=["lora", "full"])
def test_gradcache_gradients_equal_plain_infonce(tmp_path, kind, full):
    model = _model(tmp_path, kind, full_finetuning=full, use_gradient_checkpointing=False)
    if not full:
        model.get_peft_model(r=4, lora_alpha=8, init_lora_weights=False)
    model.train()
    batch = EmbeddingCollator(model, prompts={})(ROWS)
    options = dict(temperature=0.05, false_negative_margin=0.2)
    expected_loss, expected = _grads(model, InfoNCELoss(**options), batch)
    actual_loss, actual = _grads(model, GradCacheInfoNCELoss(mini_batch_size=2, **options), batch)
    assert abs(actual_loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert expected.keys() == actual.keys() and len(expected) > 0
    nonzero = 0
    for name, grad in expected.items():
        nonzero += bool(grad.abs().sum() > 0)
        assert relative_error(actual[name], grad) <= 1e-4, name
    assert nonzero >= len(expected) // 2


def test_gradcache_replays_dropout_masks(tmp_path):
    """BERT with dropout 0.1 in training mode: the re-embedding restores each mini-batch's RNG
    state, so with one mini-batch per column (8 ≥ every column) the gradients equal plain
    InfoNCE's under the same seed (and differ under another seed: the masks matter)."""
    model = _model(tmp_path, "bert", lora_r=4, use_gradient_checkpointing=False)
    model.train()
    batch = EmbeddingCollator(model, prompts={})(ROWS)
    _, expected = _grads(model, InfoNCELoss(), batch, seed=3)
    _, actual = _grads(model, GradCacheInfoNCELoss(mini_batch_size=8), batch, seed=3)
    _, other_seed = _grads(model, InfoNCELoss(), batch, seed=4)
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) <= 1e-5, name
    assert max(relative_error(other_seed[n], g) for n, g in expected.items()) > 1e-3


def test_gradcache_without_grad_returns_the_loss(tmp_path):
    model = _model(tmp_path, "qwen3", lora_r=4)
    batch = EmbeddingCollator(model, prompts={})(ROWS)
    with torch.no_grad():
        plain = InfoNCELoss().batch_loss(model, batch)
        cached = GradCacheInfoNCELoss(mini_batch_size=3).batch_loss(model, batch)
    assert torch.allclose(plain, cached, rtol=1e-5, atol=0)
