"""The finite-training guard and the load-time weight check (fastlm/models/finite*.py): NaN/inf
weights named at load (16-bit and 4-bit), a plain loop stopped before its optimizer step, saves
of NaN/inf trained weights refused, the asynchronous CUDA verdict delivered before a save, and
everything removed by ``FastModel.unpatch``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from finite_helpers import BROKEN, inf_gradient, trainable, unchanged
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model, tiny_batch

from fastlm import FastModel
from fastlm.errors import NonFiniteGradientError, NonFiniteWeightsError
from fastlm.models import nonfinite_tensors, patch_state

pytestmark = pytest.mark.usefixtures("one_thread")

ON_GPU = torch.cuda.is_available()


def _nan_checkpoint(tmp_path):
    path = save_tiny_model("llama", tmp_path / "llama")
    weights = load_file(path / "model.safetensors")
    weights[f"model.{BROKEN}.weight"][0, :3] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_from_pretrained_names_nan_weights_unless_told_not_to(tmp_path):
    path = _nan_checkpoint(tmp_path)
    with pytest.raises(NonFiniteWeightsError, match=rf"{BROKEN}\.weight \(3 of [\d,]+ values\)"):
        FastModel.from_pretrained(str(path), device_map="cpu")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu", check_finite_weights=False)
    assert [t.name for t in nonfinite_tensors(model)] == [f"model.{BROKEN}.weight"]


def test_a_finite_sum_that_overflows_is_not_reported():
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(3e38)  # finite; their fp32 sum is inf
        layer.bias[1] = float("nan")
    assert [(t.name, t.count) for t in nonfinite_tensors(layer)] == [("bias", 1)]


def test_4bit_weights_are_checked_through_their_quant_state(tmp_path):
    pytest.importorskip("bitsandbytes")
    path = save_tiny_model("llama", tmp_path / "llama")
    device = "cuda" if ON_GPU else "cpu"
    model, _ = FastModel.from_pretrained(str(path), device_map=device, load_in_4bit=True)
    assert nonfinite_tensors(model) == []
    quant_state = model.model.layers[0].mlp.up_proj.weight.quant_state
    quant_state.state2.absmax[0] = float("nan")  # double quantisation: the absmax of absmax
    names = [t.name for t in nonfinite_tensors(model)]
    assert names == [f"model.{BROKEN}.weight.state2.absmax"]


def test_full_finetune_plain_loop_stops_before_the_optimizer_step(tmp_path):
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu", full_finetuning=True)
    model.train()
    before = trainable(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**tiny_batch()).loss + inf_gradient(model)
    assert math.isfinite(loss.item())
    with pytest.raises(NonFiniteGradientError, match=r"gradient norm is inf at backward pass 1"):
        loss.backward()
        optimizer.step()
    assert unchanged(model, before)
    optimizer.zero_grad()  # the guard is ready for the next step
    model(**tiny_batch()).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_float64_gradients_are_checked_in_float64(tmp_path):
    """A model cast to float64 (a reference run) keeps its guard: the norms are taken in fp64
    (torch refuses to narrow them to the fp32 the guard takes for half gradients)."""
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4).double()
    model.train()
    model(**tiny_batch()).loss.backward()
    loss = model(**tiny_batch()).loss + inf_gradient(model)
    with pytest.raises(NonFiniteGradientError, match=r"gradient norm is inf"):
        loss.backward()


def test_a_parameter_added_after_the_first_step_is_checked_too(tmp_path):
    """The guard lists the parameters once, again only after a module registers a new one."""
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4)
    model.train()
    model(**tiny_batch()).loss.backward()
    guard = patch_state(model).finite_guard
    listed = guard._params
    model(**tiny_batch()).loss.backward()
    assert guard._params is listed  # not listed again each step: that cost ~1 ms of host time
    body = model.base_model.model.model
    body.norm.scale = torch.nn.Parameter(torch.ones(()))  # trainable, after the first check
    loss = model(**tiny_batch()).loss + body.norm.scale * float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"norm\.scale"):
        loss.backward()


def test_saving_nan_trained_weights_is_refused_until_unpatched(tmp_path):
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4)
    lora_b = model.base_model.model.model.layers[1].self_attn.v_proj.lora_B.default.weight
    with torch.no_grad():
        lora_b[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"lora_B\.default\.weight \(1 of"):
        model.save_pretrained(tmp_path / "adapter")
    assert not list((tmp_path / "adapter").glob("*.safetensors"))
    owner = model.get_base_model()
    assert owner._forward_hooks and owner._state_dict_pre_hooks and owner.model._forward_hooks
    FastModel.unpatch(model)  # the guard goes with the patches
    assert not owner._forward_hooks and not owner._state_dict_pre_hooks
    assert not owner.model._forward_hooks
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_the_process_wide_registration_hook_goes_with_the_last_guard(monkeypatch):
    """Guards count parameter registrations through a hook on every module of the process;
    removing the last guard takes it off again (an unpatched process is as it was)."""
    import weakref

    from torch.nn.modules import module as torch_module

    from fastlm.models import finite_guard

    monkeypatch.setattr(finite_guard, "_live_guards", weakref.WeakSet())
    monkeypatch.setattr(finite_guard, "_registration_hooks", [])
    before = dict(torch_module._global_parameter_registration_hooks)
    first = finite_guard.install_finite_guard(torch.nn.Linear(2, 2))
    second = finite_guard.install_finite_guard(torch.nn.Linear(2, 2))
    assert len(torch_module._global_parameter_registration_hooks) == len(before) + 1
    first.remove()
    assert len(torch_module._global_parameter_registration_hooks) == len(before) + 1
    second.remove()
    assert dict(torch_module._global_parameter_registration_hooks) == before


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the asynchronous check runs on CUDA")
def test_cuda_a_pending_inf_gradient_is_raised_before_a_save(tmp_path):
    """CUDA reads the verdict without stalling the GPU: the update is applied, then any save
    (or the next forward) raises, and the save writes nothing."""
    path = save_tiny_model("llama", tmp_path / "llama")
    model, _ = FastModel.from_pretrained(str(path), device_map="cuda")
    model = FastModel.get_peft_model(model, r=4)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    (model(**batch).loss + inf_gradient(model)).backward()  # no host sync: nothing raised yet
    optimizer.step()
    with pytest.raises(NonFiniteGradientError, match="backward pass 1"):
        model.save_pretrained(tmp_path / "adapter")
    assert not list((tmp_path / "adapter").glob("*.safetensors"))
    with pytest.raises(NonFiniteWeightsError, match="lora_"):  # the update it applied
        model.save_pretrained(tmp_path / "adapter")
