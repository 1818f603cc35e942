"""Every read site of the patched forwards gathers the FSDP2 units it reads.

fastlm's attention / MLP forwards read their projections' base and LoRA A/B weights without
calling those modules' forwards, so FSDP2's gathering hook never runs for a LoRA linear that is a
unit of its own (PEFT's FSDP wrap policy applied per module): the read site must gather it
(``fastlm.models.fsdp.gather_linear``). That is why ``check_fsdp2`` refuses no such wrapping.

One process (gloo, world size 1: a sharded parameter is a DTensor that holds the whole tensor),
every LoRA A and B its own unit, then the decoder layers and the root. The fused Functions must
receive plain tensors and give the unsharded model's loss and LoRA gradients; with a read site
that does not gather, made on purpose, they receive DTensors and the step fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_batch, tiny_config
from torch import nn
from transformers import AutoModelForCausalLM

from fastlm.distributed import fully_shard_model
from fastlm.models import patch, patch_model, spec_for
from fastlm.models.spec import PROJECTIONS

pytestmark = pytest.mark.usefixtures("one_thread")
DTensor = pytest.importorskip("torch.distributed.tensor").DTensor
_FUSED = ("lora_qkv", "lora_mlp", "lora_linear")


@pytest.fixture(scope="module")
def process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model() -> nn.Module:
    """A patched tiny Llama with LoRA (A and B random, so every gradient is non-zero)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    patch_model(model, spec_for(model.config), max_seq_length=64)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(PROJECTIONS), init_lora_weights=False
    )
    return get_peft_model(model, config).train()


def _shard_lora_units(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for module in list(model.modules()):
        if type(module) is nn.Linear and module.weight.requires_grad:  # LoRA A and B
            fully_shard(module, mesh=mesh)
    return fully_shard_model(model, mesh=mesh)


def _watch_fused_calls(monkeypatch) -> list[tuple[str, bool]]:
    """(Function, whether any weight handed to it was still a DTensor) per fused call."""
    calls = []
    for name in _FUSED:
        original = getattr(patch, name)

        def watched(x, *weights, _original=original, _name=name, **kwargs):
            tensors = [t for w in weights if isinstance(w, tuple) for t in w]
            calls.append((_name, any(isinstance(t, DTensor) for t in tensors)))
            return _original(x, *weights, **kwargs)

        monkeypatch.setattr(patch, name, watched)
    return calls


def _loss_and_lora_grads(model: nn.Module):
    output = model(**tiny_batch())
    output.loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            grad = param.grad
            grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return output.loss.detach(), grads


def test_read_sites_gather_lora_units(process_group, monkeypatch):
    want_loss, want_grads = _loss_and_lora_grads(_model())
    model = _shard_lora_units(_model())
    calls = _watch_fused_calls(monkeypatch)
    loss, grads = _loss_and_lora_grads(model)
    assert {name for name, _ in calls} == set(_FUSED)  # fused, not PEFT's own forward
    assert not any(sharded for _, sharded in calls), calls
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert want.norm() > 0, name
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_a_read_site_that_does_not_gather_is_caught(process_group, monkeypatch):
    # The bad case the test above exists for: patch.py's read sites without their gather.
    monkeypatch.setattr(patch, "gather_linear", lambda module: None)
    model = _shard_lora_units(_model())
    calls = _watch_fused_calls(monkeypatch)
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        _loss_and_lora_grads(model)
    assert calls and calls[0][1]  # the first fused call already got a sharded LoRA weight
