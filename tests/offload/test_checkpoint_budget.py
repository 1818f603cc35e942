"""Offloaded checkpointing's bookkeeping: the pinned-memory budget, its fallback, the pending
stack used for prefetching, and (on a GPU) exact gradients with and without the fallback."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from tiny_models import save_tiny_model, tiny_batch

from fastlm import FastModel
from fastlm.offload import BUDGET, PinnedBudget, checkpoint


def test_budget_reserves_until_spent_then_falls_back_and_warns_once(caplog):
    budget = PinnedBudget(limit=100, min_bytes=10)
    assert not budget.reserve(5)  # too small to be worth a copy: not a fallback
    assert budget.fallbacks == 0
    assert budget.reserve(60) and budget.in_use == 60
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        assert not budget.reserve(50)  # 110 > 100
        assert not budget.reserve(41)
    assert budget.fallbacks == 2 and budget.in_use == 60
    warnings = [r for r in caplog.records if "pinned-memory budget" in r.getMessage()]
    assert len(warnings) == 1
    budget.release(60)
    assert budget.reserve(100) and budget.in_use == 100


def test_default_budget_is_half_of_available_ram():
    assert 0 < checkpoint.default_pinned_budget() < 2**50
    assert BUDGET.limit > 0


def test_cpu_saved_input_stays_in_place():
    tensor = torch.randn(3, 4)
    saved = checkpoint._SavedInput(tensor, PinnedBudget(limit=0, min_bytes=0))
    assert saved.host is None  # no GPU: nothing to offload, nothing reserved
    assert saved.take().data_ptr() == tensor.data_ptr()


def _offloaded_model(tmp_path, device):
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map=device, dtype=torch.float32)
    model = FastModel.get_peft_model(
        model, r=4, lora_alpha=8, init_lora_weights=False, use_gradient_checkpointing="fastlm"
    )
    return model.train()  # checkpointing runs in training mode only


def test_pending_stack_empties_after_backward_and_after_a_dropped_graph(tmp_path, device):
    model = _offloaded_model(tmp_path, device)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    loss = model(**batch).loss
    assert len(checkpoint.PENDING.alive()) == model.config.num_hidden_layers
    loss.backward()
    assert checkpoint.PENDING.alive() == []
    loss = model(**batch).loss
    del loss  # graph dropped without a backward: the saved inputs go with it
    gc.collect()
    assert checkpoint.PENDING.last() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_gpu_fallback_gives_the_same_gradients_and_returns_the_budget(tmp_path, monkeypatch):
    model = _offloaded_model(tmp_path, "cuda")
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    grads = []
    for limit, min_bytes in ((2**40, 0), (0, 0)):  # everything offloaded; then nothing
        budget = PinnedBudget(limit=limit, min_bytes=min_bytes)
        monkeypatch.setattr(checkpoint, "BUDGET", budget)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        assert budget.in_use == 0
        assert (budget.fallbacks == 0) == (limit > 0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def test_recompute_replays_lora_dropout(tmp_path, device):
    """With LoRA dropout the recomputed layer must draw the same masks as the forward did."""
    path = save_tiny_model("llama", tmp_path / "llama")
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    grads = []
    for mode in (False, "fastlm"):
        model, _ = FastModel.from_pretrained(str(path), device_map=device, dtype=torch.float32)
        model = FastModel.get_peft_model(
            model, r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False,
            use_gradient_checkpointing=mode, random_state=1,
        )  # fmt: skip
        model.train()
        torch.manual_seed(0)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_look_ahead_works_when_the_backward_runs_on_another_thread(tmp_path, device, monkeypatch):
    """Autograd runs CUDA nodes' backward on its own device thread: the layers the forward left
    pending must be visible there, or no copy is ever started ahead (found on the GPU: a
    per-thread list was always empty in the backward). Here the backward runs on a new thread."""
    import threading

    model = _offloaded_model(tmp_path, device)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    found = []
    last = checkpoint.PENDING.last

    def spied():
        item = last()
        found.append(item is not None)
        return item

    monkeypatch.setattr(checkpoint.PENDING, "last", spied)
    loss = model(**batch).loss
    worker = threading.Thread(target=loss.backward)
    worker.start()
    worker.join()
    layers = model.config.num_hidden_layers
    assert found.count(True) == layers - 1  # every layer but the first saw the one before it
    assert checkpoint.PENDING.alive() == []
