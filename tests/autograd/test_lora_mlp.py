"""lora_mlp: the fused Function vs plain autograd of the unfused computation in float64."""

import pytest
import torch
import torch.nn.functional as F
from lora_reference import assert_grads_close, grad_leaves, linear, lora_proj, rel, to64

from fastlm.autograd import LoRAWeights, lora_mlp

HIDDEN, INTER = 24, 40
X_SHAPE = (2, 7, HIDDEN)
N = X_SHAPE[0] * X_SHAPE[1]


def _make(device, seed=0, adapters=(True, True, True), **kw):
    gen = torch.Generator().manual_seed(seed)
    gate = lora_proj(INTER, HIDDEN, gen, device, adapter=adapters[0], **kw)
    up = lora_proj(INTER, HIDDEN, gen, device, adapter=adapters[1], **kw)
    down = lora_proj(HIDDEN, INTER, gen, device, adapter=adapters[2], **kw)
    x = torch.randn(*X_SHAPE, generator=gen).to(device)
    d_out = torch.randn(*X_SHAPE, generator=gen).to(device)
    return x, (gate, up, down), d_out


def _unfused(x, gate, up, down, activation):
    act = F.silu if activation == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
    return linear(act(linear(x, gate)) * linear(x, up), down)


def _check_against_unfused(x, projs, d_out, activation):
    out = lora_mlp(x, *projs, activation=activation)
    x64, projs64 = to64(x, projs)
    out64 = _unfused(x64, *projs64, activation)
    assert out.shape == out64.shape and out.dtype == x.dtype
    assert rel(out, out64) <= 1e-5
    leaves, leaves64 = grad_leaves(x, projs), grad_leaves(x64, projs64)
    assert len(leaves) == len(leaves64) > 0
    grads = torch.autograd.grad(out, leaves, d_out)
    grads64 = torch.autograd.grad(out64, leaves64, d_out.double())
    assert_grads_close(grads, grads64, leaves, 1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_lora_on_all_projections(activation, device):
    x, projs, d_out = _make(device)
    x.requires_grad_()
    _check_against_unfused(x, projs, d_out, activation)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_projection_without_adapter(activation, device):
    x, projs, d_out = _make(device, seed=1, adapters=(True, False, True))
    x.requires_grad_()
    _check_against_unfused(x, projs, d_out, activation)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_full_finetuning_weights_and_bias_get_grads(activation, device):
    x, projs, d_out = _make(
        device, seed=2, train_base=True, bias=True, adapters=(True, False, False)
    )
    x.requires_grad_()
    _check_against_unfused(x, projs, d_out, activation)


def test_input_without_grad(device):
    # x not requiring grad (e.g. frozen embeddings): adapters still get exact grads
    x, projs, d_out = _make(device, seed=3)
    _check_against_unfused(x, projs, d_out, "swiglu")


def test_only_down_adapter_trains(device):
    # nothing upstream of h needs a grad: the backward must still recompute h for down's grads
    x, projs, d_out = _make(device, seed=4, adapters=(False, False, True))
    _check_against_unfused(x, projs, d_out, "geglu")


def test_no_grads_for_frozen_tensors(device):
    x, (gate, up, down), d_out = _make(device, seed=5)
    gate.lora_A.requires_grad_(False)
    out = lora_mlp(x, gate, up, down)
    out.backward(d_out)
    assert gate.weight.grad is None and gate.lora_A.grad is None and x.grad is None
    assert gate.lora_B.grad is not None and down.lora_A.grad is not None


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_h_is_not_saved(activation, device):
    x, projs, _ = _make(device, seed=6)
    x.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t.detach().clone())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora_mlp(x, *projs, activation=activation)
    x64, projs64 = to64(x, projs)
    with torch.no_grad():
        gate, up, _ = projs64
        act = F.silu if activation == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        h = (act(linear(x64, gate)) * linear(x64, up)).reshape(N, INTER)
    inter_sized = [t for t in packed if t.numel() == N * INTER]
    assert len(inter_sized) == 2, [tuple(t.shape) for t in packed]  # e and g only
    for t in inter_sized:
        assert not torch.allclose(t.double().reshape(N, INTER), h, atol=1e-4)
    assert out.grad_fn is not None


def test_second_backward_through_retained_graph_is_refused(device):
    # the backward overwrites the saved e, g in place; reusing the graph must fail loudly
    x, projs, d_out = _make(device, seed=7)
    x.requires_grad_()
    out = lora_mlp(x, *projs)
    out.backward(d_out, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(d_out)


def test_autocast_bf16_with_fp32_adapters(device):
    # PEFT layout: bf16 base, fp32 adapters, autocast bf16. Grads come back in each param's dtype.
    x, projs, d_out = _make(device, seed=8)
    projs = [
        LoRAWeights(p.weight.detach().bfloat16(), None, p.lora_A, p.lora_B, p.scaling)
        for p in projs
    ]
    x.requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = lora_mlp(x, *projs)
    assert out.dtype == torch.bfloat16
    leaves = grad_leaves(x, projs)
    grads = torch.autograd.grad(out, leaves, d_out.bfloat16())
    x64, projs64 = to64(x, projs)
    out64 = _unfused(x64, *projs64, "swiglu")
    grads64 = torch.autograd.grad(out64, grad_leaves(x64, projs64), d_out.double())
    assert rel(out, out64) <= 3e-2
    for g, g64, leaf in zip(grads, grads64, leaves):
        assert g.dtype == leaf.dtype == torch.float32
        assert rel(g, g64) <= 3e-2


def test_bad_activation_raises(device):
    x, projs, _ = _make(device)
    with pytest.raises(ValueError):
        lora_mlp(x, *projs, activation="relu")


@pytest.fixture
def force_triton(monkeypatch):
    """Route the MLP's activation through the Triton kernels (the interpreter on CPU)."""
    import fastlm.kernels.geglu as geglu_mod
    import fastlm.kernels.swiglu as swiglu_mod

    if not torch.cuda.is_available():
        from fastlm.kernels._dispatch import triton_can_run

        if not triton_can_run(torch.empty(0)):
            pytest.skip("no GPU and no Triton interpreter")
    monkeypatch.setattr(swiglu_mod, "use_triton", lambda t: True)
    monkeypatch.setattr(geglu_mod, "use_triton", lambda t: True)


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_triton_activation_path_in_place(activation, device, force_triton):
    # the in-place Triton backward inside the Function, and its retained-graph refusal
    x, projs, d_out = _make(device, seed=9)
    x.requires_grad_()
    _check_against_unfused(x, projs, d_out, activation)
    out = lora_mlp(x, *projs, activation=activation)
    out.backward(d_out, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(d_out)


def test_a_4bit_mlp_holds_one_group_of_dense_weights_at_a_time(monkeypatch):
    """Dequantised copies of 4-bit weights (the MLP's largest temporaries after e, g, h) are
    made per group and dropped after it: gate's and up's are gone before h and down's copy are
    made in forward, and in backward's dx each projection's copy is gone before the next one's. The
    weights here are dense, marked 4-bit, with a dequantisation that copies them."""
    import weakref

    import fastlm.autograd.lora_weights as lw

    live: list[tuple[str, weakref.ref]] = []
    names: dict[int, str] = {}

    def alive() -> list[str]:
        return [name for name, ref in live if ref() is not None]

    def copy(weight, dtype):
        made = weight.detach().to(dtype).clone()
        live.append((names[id(weight)], weakref.ref(made)))
        return made

    made_when: list[tuple[str, list[str]]] = []

    def dequantize_nf4(weight, quant_state, dtype):
        made_when.append((names[id(weight)], alive()))
        return copy(weight, dtype)

    def dequantize_nf4_many(weights, quant_states, dtype):
        return [dequantize_nf4(weight, None, dtype) for weight in weights]

    import importlib

    lm = importlib.import_module("fastlm.autograd.lora_mlp")  # the package exports a lora_mlp

    act_fwd, act_bwd = lm._ACTIVATIONS["swiglu"]
    alive_at_h: list[list[str]] = []

    def recording_act(e, g):
        alive_at_h.append(alive())
        return act_fwd(e, g)

    monkeypatch.setitem(lm._ACTIVATIONS, "swiglu", (recording_act, act_bwd))
    monkeypatch.setattr(lw, "dequantize_nf4", dequantize_nf4)
    monkeypatch.setattr(lw, "dequantize_nf4_many", dequantize_nf4_many)
    x, projs, d_out = _make("cpu", seed=9)
    x.requires_grad_()
    for name, proj in zip(("gate", "up", "down"), projs):
        proj.weight.quant_state = "4-bit"  # read by quant_state_of
        names[id(proj.weight)] = name
    out = lora_mlp(x, *projs)
    forward = list(made_when)
    assert [name for name, _ in forward] == ["gate", "up", "down"]
    assert forward[2][1] == [], forward  # down's copy: gate's and up's already freed
    assert alive_at_h == [[]], alive_at_h  # and h is made without them (e, g, h, W_down at most)
    made_when.clear()
    out.backward(d_out)
    held = {name: before for name, before in made_when}
    assert set(held) == {"gate", "up", "down"} and all(not b for b in held.values()), made_when
