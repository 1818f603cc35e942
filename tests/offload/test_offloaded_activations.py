"""use_gradient_checkpointing="activations": each layer runs once; the large tensors its graph
saves wait on the host and come back for the backward, a layer ahead.

On the CPU the copies are forced onto CPU tensors (``_offloadable``), so the packing, the
prefetch order, the budget and its fallback are exercised as on a GPU; on a GPU the real pinned
copies on the side stream run. Every check ends in the same loss and LoRA gradients as the
unpatched HF model + PEFT (fp32, 1e-4 relative, as for the other modes).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_batch
from transformers.modeling_layers import GradientCheckpointingLayer

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the families' HF/fastlm pairs
from test_architectures import _assert_loss_and_lora_grads_match, _pair  # noqa: E402

from fastlm.offload import activations, checkpoint
from fastlm.offload.checkpoint import PinnedBudget


@pytest.fixture
def stash_log(monkeypatch, device):
    """Offload CPU tensors too, with a budget that takes everything; records every stash."""
    if device == "cpu":
        monkeypatch.setattr(activations, "_offloadable", lambda tensor: True)
    budget = PinnedBudget(limit=2**40, min_bytes=0)
    monkeypatch.setattr(checkpoint, "BUDGET", budget)
    stashes = []
    original = activations._LayerStash.__init__

    def recorded(self, budget):
        original(self, budget)
        stashes.append(self)

    monkeypatch.setattr(activations._LayerStash, "__init__", recorded)
    monkeypatch.setattr(activations._LOCAL, "last_nbytes", 0, raising=False)
    return budget, stashes


def _layers(model) -> list:
    """The decoder layers (transformers' checkpointable layers; the body carries the flag too)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _count_layer_runs(model) -> list[int]:
    """A counter per decoder layer of how often its body runs (a recompute adds one). Counted at
    the layer's first norm: the recompute calls the layer's forward, not the layer."""
    counts = []
    for layer in _layers(model):
        counts.append(0)
        index = len(counts) - 1

        def hook(module, args, index=index):
            counts[index] += 1

        layer.input_layernorm.register_forward_pre_hook(hook)
    return counts


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_layers_run_once_and_match_hf(tmp_path, model_type, device, stash_log):
    budget, stashes = stash_log
    reference, fast = _pair(tmp_path, model_type, "activations", device=device)
    layers = _layers(fast)
    assert layers and all(
        m._gradient_checkpointing_func is activations.offloaded_activations for m in layers
    )
    runs = _count_layer_runs(fast)
    _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    assert runs == [1] * len(layers)  # no recompute
    assert len(stashes) == len(layers)
    assert all(stash.started for stash in stashes)  # every layer's tensors came back
    assert sum(stash.nbytes for stash in stashes) > 0
    assert budget.in_use == 0 and budget.fallbacks == 0
    assert checkpoint.PENDING.last() is None


def test_layers_past_the_budget_are_checkpointed_instead(tmp_path, device, stash_log):
    budget, stashes = stash_log
    reference, fast = _pair(tmp_path, "llama", "activations", device=device)
    fast(**{k: v.to(device) for k, v in tiny_batch().items()}).loss.backward()  # measure a layer
    one_layer = activations._estimate()
    assert one_layer > 0 and budget.in_use == 0
    budget.limit = one_layer  # room for one layer's activations, not two
    stashes.clear()
    runs = _count_layer_runs(fast)
    _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    assert len(stashes) == 1 and budget.fallbacks == fast.config.num_hidden_layers - 1
    assert runs == [1] + [2] * (len(runs) - 1)  # the others were recomputed
    assert budget.in_use == 0


def test_a_dropped_graph_returns_the_budget(tmp_path, device, stash_log):
    budget, stashes = stash_log
    _, fast = _pair(tmp_path, "llama", "activations", device=device)
    loss = fast(**{k: v.to(device) for k, v in tiny_batch().items()}).loss
    assert budget.in_use > 0
    stashes.clear()  # the log's references, not the graph's
    del loss
    gc.collect()
    assert budget.in_use == 0 and checkpoint.PENDING.last() is None


def test_what_is_dense():
    base = torch.empty(2, 3, 4)
    assert activations._is_dense(base) and activations._is_dense(base.transpose(0, 2))
    assert activations._is_dense(base.permute(1, 0, 2)) and activations._is_dense(base[1])
    assert not activations._is_dense(base[:, :2]) and not activations._is_dense(base[..., ::2])
    assert activations._is_dense(torch.empty(5, 1).expand(5, 1))
