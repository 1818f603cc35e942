"""Weight streaming (fastlm.offload.streamer): NF4 decoder layers in CPU RAM, streamed to slots.

On the CPU the copy engine is ``SyncCopyEngine`` (copies at once, logs every operation), so these
tests check the streaming logic itself: the residency policy (which layer is where, prefetch
order in forward and backward), exactness of a streamed tiny QLoRA model against the resident
one (loss and every LoRA gradient bit-identical, with and without checkpointing, fused and
through bitsandbytes' own MatMul4Bit), that every dequantisation of a streamed weight reads a
slot and never the host copy, the loader (bytes identical to transformers' 4-bit loading), the
memory plan's numbers, the host-memory budget and its fallbacks, and the errors. The GPU tests
at the end run the same comparison with the CUDA engine.
"""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
from nf4_format import run_4bit_layers_from_format
from tiny_models import copy_lora, save_tiny_model, tiny_batch, tiny_config
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.loading.checkpointing import enable_checkpointing as _enable_checkpointing
from fastlm.offload import PinnedBudget, checkpoint
from fastlm.offload import memory_plan as plan_module
from fastlm.offload.copy_engine import CudaCopyEngine, SyncCopyEngine
from fastlm.offload.memory_plan import HostBudget, HostMemoryError, host_placement, plan_memory
from fastlm.offload.residency import Copy, ResidencyPolicy, Wait
from fastlm.offload.streamed_loading import build_random_nf4_model, load_streamed_model
from fastlm.offload.streamer import (
    ALIGN,
    WeightStreamer,
    WeightStreamingError,
    get_weight_streamer,
    layer_nbytes,
    place_trainable,
    stream_weights,
    unstream_weights,
)
from fastlm.quant import nf4_config

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 5  # more layers than slots, so slots are reused within a step
RANK = 4
CHECKPOINTING = pytest.mark.parametrize(
    "checkpointing", [False, True, "fastlm"], ids=["plain", "ckpt", "offloaded"]
)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "llama5"
    return save_tiny_model("llama", folder, num_hidden_layers=LAYERS)


def _resident(path, device="cpu"):
    model, _ = FastModel.from_pretrained(str(path), load_in_4bit=True, device_map=device)
    return model


def _peft(model, checkpointing=True):
    model = FastModel.get_peft_model(
        model, r=RANK, lora_alpha=8, init_lora_weights=False, use_gradient_checkpointing=False
    )
    _set_checkpointing(model, checkpointing)
    return model


def _set_checkpointing(model, mode) -> None:
    if mode:
        _enable_checkpointing(model, mode)
    else:
        model.gradient_checkpointing_disable()
    model.train()


def _step(model, batch=None):
    model.zero_grad(set_to_none=True)
    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = batch or tiny_batch()
    output = model(**{k: v.to(device) for k, v in batch.items()})
    output.loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
    return output.loss.detach().cpu(), grads


def _assert_identical(expected, actual) -> None:
    (loss_e, grads_e), (loss_a, grads_a) = expected, actual
    assert torch.equal(loss_e, loss_a), (loss_e, loss_a)
    assert grads_e.keys() == grads_a.keys() and len(grads_e) == 2 * 7 * LAYERS
    for name, grad in grads_e.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grad, grads_a[name]), name


@pytest.fixture
def reads_checked(monkeypatch):
    """Fails if any 4-bit weight or absmax is dequantised from a streamer's host buffer (a layer
    computed without being made resident): on the CPU the host copy holds the right bytes too,
    so exactness alone would not notice."""
    import bitsandbytes.functional as bnb_functional

    from fastlm.autograd import lora_weights
    from fastlm.kernels import nf4_dequant

    streamers, reads = [], []

    def watch(streamer):
        streamers.append(streamer)
        return streamer

    def check(*tensors):
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            ptr = tensor.data_ptr()
            for streamer in streamers:
                for layer in streamer._layers.values():
                    start = layer.host.data_ptr()
                    if start <= ptr < start + layer.nbytes:
                        raise AssertionError(f"layer {layer.index} read from its host copy")
            reads.append(ptr)

    def wrap(owner, name, pick):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            check(*pick(*args, **kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def state_tensors(weight, state):
        state = state if state is not None else getattr(weight, "quant_state", None)
        return weight, getattr(state, "absmax", None)

    # lora_weights binds the function at import, so both names are watched.
    for owner in (nf4_dequant, lora_weights):
        wrap(owner, "dequantize_nf4", lambda w, qs=None, *a, **k: state_tensors(w, qs))
    wrap(bnb_functional, "dequantize_4bit", lambda w, qs=None, *a, **k: state_tensors(w, qs))
    wrap(bnb, "matmul_4bit", lambda x, w, quant_state=None, **k: state_tensors(w, quant_state))
    watch.reads = reads
    return watch


# --------------------------------------------------------------------------- the policy


def test_policy_training_steps_copy_each_streamed_layer_twice_but_reuse_the_turnarounds():
    policy = ResidencyPolicy(5, list(range(5)), slots=2)

    def step():
        actions = [a for i in range(5) for a in policy.access(i, backward=False, grad=True)]
        return actions + [a for i in range(4, -1, -1) for a in policy.access(i, True, True)]

    first = step()
    assert first[:4] == [Copy(0, 0, None), Wait(0, 0), Copy(1, 1, None), Wait(1, 1)]
    second = step()
    C, Wt = Copy, Wait
    # forward: 0 and 1 are still resident from the backward; each entry prefetches the next
    # layer into the slot of the one before the current one.
    forward = [C(2, 0, 0), Wt(2, 0), C(3, 1, 1), Wt(3, 1), C(4, 0, 2), Wt(4, 0)]
    # backward: 4 and 3 are still resident from the forward; then reverse order.
    backward = [C(2, 0, 4), Wt(2, 0), C(1, 1, 3), Wt(1, 1), C(0, 0, 2), Wt(0, 0)]
    assert second == forward + backward
    assert {layer: policy.state[layer] for layer in range(5)} == {
        0: "resident",
        1: "resident",
        2: "host",
        3: "host",
        4: "host",
    }


def test_policy_prefetch_depth_resident_layers_and_inference_wraparound():
    policy = ResidencyPolicy(6, [1, 2, 3, 4, 5], slots=3)  # layer 0 stays on the GPU
    # entering the resident layer 0 prefetches the first two streamed layers
    assert policy.access(0, backward=False, grad=True) == [Copy(1, 0, None), Copy(2, 1, None)]
    assert policy.access(1, False, True) == [Wait(1, 0), Copy(3, 2, None)]
    assert policy.upcoming(4, backward=True, grad=True) == [3, 2]
    # inference: after the last layer come layers 0 (resident, skipped), 1, 2 of the next token
    assert ResidencyPolicy(7, [1, 2, 3, 4, 5, 6], 3).upcoming(6, False, False) == [1, 2]
    # ... but not a layer whose home slot is the current layer's (5 and 2 share slot 1)
    assert policy.upcoming(5, backward=False, grad=False) == [1]
    # training: nothing after the last layer (the backward starts with the resident ones)
    assert policy.upcoming(5, backward=False, grad=True) == []


def test_policy_never_evicts_the_current_layer_and_always_leaves_it_resident():
    rng = random.Random(0)
    for trial in range(300):
        n, slots = rng.randint(1, 9), rng.randint(1, 4)
        resident = rng.randint(0, n)
        policy = ResidencyPolicy(n, list(range(resident, n)), slots)
        for _ in range(40):
            layer = rng.randrange(n)
            backward, grad = rng.random() < 0.5, rng.random() < 0.5
            actions = policy.access(layer, backward, grad)
            assert all(a.evict != layer for a in actions if isinstance(a, Copy)), trial
            if layer >= resident:
                assert policy.state[layer] == "resident"
                assert policy.owner[policy.home(layer)] == layer
            owners = [o for o in policy.owner if o is not None]
            assert len(owners) == len(set(owners))  # a layer in one slot at most


# --------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def fused_pair(llama_path):
    """A resident QLoRA model and the same checkpoint loaded through offload_weights=True."""
    reference = _peft(_resident(llama_path))
    streamed, _ = FastModel.from_pretrained(
        str(llama_path), load_in_4bit=True, device_map="cpu", offload_weights=True
    )
    streamed = _peft(streamed)
    copy_lora(reference, streamed)
    return reference, streamed


@CHECKPOINTING
def test_streamed_qlora_step_is_bit_identical_to_resident(fused_pair, checkpointing, reads_checked):
    reference, streamed = fused_pair
    streamer = reads_checked(get_weight_streamer(streamed))
    assert all(row["fused"] for row in FastModel.fused_report(streamed))
    for model in fused_pair:
        _set_checkpointing(model, checkpointing)
    for seed in (0, 1):  # the second step starts from the first step's residency
        batch = tiny_batch(seed=seed)
        _assert_identical(_step(reference, batch), _step(streamed, batch))
    assert reads_checked.reads and streamer.stats.copies > 0


# Families whose layers differ from Llama's where streaming sizes or walks them: Gemma 4 (head
# sizes per layer type, KV-shared layers), Qwen3.5 (Gated DeltaNet's four input projections and
# conv), Gemma 3 (sandwich norms).
OTHER_DENSE = ["gemma4_text", "qwen3_5_text", "gemma3_text"]


@pytest.mark.parametrize("checkpointing", [False, "fastlm"], ids=["plain", "offloaded"])
@pytest.mark.parametrize("family", OTHER_DENSE)
def test_other_dense_families_stream_bit_identically(
    tmp_path, family, checkpointing, reads_checked
):
    """offload_weights=True loads the family and a streamed QLoRA step equals the resident one
    bit for bit: loss and every LoRA gradient that the step reaches."""
    try:
        tiny_config(family)
    except ValueError:
        pytest.skip(f"transformers without {family}")
    path = save_tiny_model(family, tmp_path / family)
    reference = _peft(_resident(path), checkpointing)
    streamed, _ = FastModel.from_pretrained(
        str(path), load_in_4bit=True, device_map="cpu", offload_weights=True
    )
    streamed = _peft(streamed, checkpointing)
    copy_lora(reference, streamed)
    streamer = reads_checked(get_weight_streamer(streamed))
    assert len(streamer.streamed) > 2  # more streamed layers than slots
    for seed in (0, 1):
        batch = tiny_batch(seed=seed)
        (loss_r, grads_r), (loss_s, grads_s) = _reached(reference, batch), _reached(streamed, batch)
        assert torch.equal(loss_r, loss_s), (loss_r, loss_s)
        assert grads_r.keys() == grads_s.keys() and len(grads_r) >= 2 * 4 * len(streamer.streamed)
        for name, grad in grads_r.items():
            assert torch.equal(grad, grads_s[name]), name
    assert reads_checked.reads and streamer.stats.copies > 0


def _reached(model, batch):
    """(loss, the LoRA gradients a step reaches): Gemma 4's KV-shared layers leave their own
    k/v adapters without a gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    return loss.detach(), grads


def test_accelerate_and_the_trainer_leave_a_streamed_model_in_place(fused_pair, monkeypatch):
    """Accelerate's prepare_model (the HF Trainer's and TRL's) calls model.to(device) unless
    hf_device_map names several devices: on a GPU that would pull the streamed weights off the
    host. The streamer publishes where its layers live, so nothing is moved."""
    from accelerate import Accelerator

    _, streamed = fused_pair
    device_map = streamed.hf_device_map
    assert [device_map[f"model.layers.{i}"] for i in range(LAYERS)] == ["cpu"] * LAYERS
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(device_map)
    moves = []
    monkeypatch.setattr(streamed, "to", lambda *a, **k: moves.append(a) or streamed)
    monkeypatch.setitem(streamed.__dict__, "_is_accelerate_prepared", False)  # undone after
    Accelerator(cpu=True).prepare_model(streamed)
    assert moves == []
    inner = streamed.base_model.model  # control: without the map accelerate does move it
    monkeypatch.delitem(inner.__dict__, "hf_device_map")
    streamed.__dict__["_is_accelerate_prepared"] = False
    Accelerator(cpu=True).prepare_model(streamed)
    assert len(moves) == 1


@pytest.mark.parametrize("checkpointing", [True, "fastlm"], ids=["ckpt", "offloaded"])
def test_exact_when_checkpointing_wraps_call_as_in_transformers_5_17(
    fused_pair, checkpointing, reads_checked, monkeypatch
):
    """transformers 5.17 checkpoints ``__call__`` (module hooks run inside the checkpoint and
    again in the recompute, under no_grad for reentrant/offloaded); 5.23 checkpoints forward."""
    import functools

    from torch import nn

    reference, streamed = fused_pair
    layer_cls = type(streamed.base_model.model.model.layers[0])

    def call(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            run = functools.partial(nn.Module.__call__, self, **kwargs)
            return self._gradient_checkpointing_func(run, *args)
        return nn.Module.__call__(self, *args, **kwargs)

    if hasattr(layer_cls.forward, "__wrapped__"):  # a newer transformers: emulate 5.17
        monkeypatch.setattr(layer_cls, "forward", layer_cls.forward.__wrapped__)
        monkeypatch.setattr(layer_cls, "__call__", call)
    streamer = reads_checked(get_weight_streamer(streamed))
    for model in fused_pair:
        _set_checkpointing(model, checkpointing)
    _step(streamed)
    streamer.engine.ops.clear()
    streamer.stats.reset()
    _assert_identical(_step(reference), _step(streamed))
    copies = [op[1:] for op in streamer.engine.ops if op[0] == "copy"]
    assert copies == [(2, 0), (3, 1), (4, 0), (2, 0), (1, 1), (0, 0)]  # no extra copies
    # non-reentrant: forward pre-hooks + gradient hooks + the recompute's pre-hooks; offloaded:
    # pre-hooks inside the checkpoint (no_grad) + the recompute's (no output needs a grad hook)
    assert streamer.stats.entries == (3 if checkpointing is True else 2) * LAYERS
    # a checkpointed training layer entered under no_grad still prefetches for the backward
    layer, grads = streamed.base_model.model.model.layers[0], []
    monkeypatch.setattr(streamer, "enter", lambda i, backward=False, grad=None: grads.append(grad))
    with torch.no_grad():
        streamer._pre_hook(0, layer, ())
        layer.eval()
        streamer._pre_hook(0, layer, ())
        layer.train()
    assert grads == [True, False]


def test_recorded_copies_and_waits_of_a_training_step(fused_pair):
    _, streamed = fused_pair
    _set_checkpointing(streamed, True)
    streamer = get_weight_streamer(streamed)
    engine = streamer.engine
    _step(streamed)
    engine.ops.clear()
    _step(streamed)
    copies = [op[1:] for op in engine.ops if op[0] == "copy"]
    waits = [op[1:] for op in engine.ops if op[0] == "wait"]
    assert copies == [(2, 0), (3, 1), (4, 0), (2, 0), (1, 1), (0, 0)]
    assert waits == copies  # each copied layer is waited for when entered
    # every copy into a used slot waits on an event recorded just before it (last use)
    for i, op in enumerate(engine.ops):
        if op[0] == "copy":
            assert engine.ops[i - 1] == ("record",)
    assert [streamer.location(i) for i in range(LAYERS)] == [
        "slot:0",
        "slot:1",
        "host",
        "host",
        "host",
    ]
    plan = plan_memory(streamed)
    assert plan.copies_per_step == len(copies)


@pytest.fixture(scope="module")
def bnb_pair(llama_path):
    """Resident vs stream_weights() models running transformers' + bitsandbytes' own code
    (MatMul4Bit keeps a *view* of the packed weight from the forward for its backward)."""
    reference = _peft(_resident(llama_path))
    streamed = _resident(llama_path)
    stream_weights(streamed, engine=SyncCopyEngine())
    streamed = _peft(streamed)
    copy_lora(reference, streamed)
    for model in (reference, streamed):
        FastModel.unpatch(model)
    return reference, streamed


@CHECKPOINTING
def test_bitsandbytes_matmul_path_is_exact_too(bnb_pair, checkpointing, reads_checked):
    reference, streamed = bnb_pair
    reads_checked(get_weight_streamer(streamed))
    for model in bnb_pair:
        _set_checkpointing(model, checkpointing)
    _assert_identical(_step(reference), _step(streamed))


def test_inference_and_generate_match(fused_pair):
    reference, streamed = fused_pair
    prompt = tiny_batch(batch=1, seq=6)["input_ids"]
    outputs = []
    for model in fused_pair:
        FastModel.for_inference(model)
        with torch.no_grad():
            logits = model(input_ids=prompt).logits
            tokens = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
        outputs.append((logits, tokens))
        FastModel.for_training(model)
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_merges_of_a_streamed_model_are_identical(fused_pair, tmp_path):
    import safetensors.torch

    files = []
    for tag, model in zip(("resident", "streamed"), fused_pair):
        model.save_pretrained_merged(tmp_path / tag, None, save_method="merged_16bit")
        files.append(safetensors.torch.load_file(tmp_path / tag / "model.safetensors"))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])


# --------------------------------------------------------------------------- loading


def _assert_same_logits(resident, streamed) -> None:
    """Bit-identical logits of two models whose 4-bit layers compute with the NF4 format's values
    of the bytes they hold at call time (the streamed model's: its slot). Not bitsandbytes' own
    CPU forward: in eval mode it repacks the weight for an AVX512-BF16 kernel that needs
    out_features % 32 == 0 (k_proj has 24), elsewhere its CPU dequantisation is wrong for some
    row lengths; neither is what these tests are about."""
    for model in (resident, streamed):
        run_4bit_layers_from_format(model)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(resident(**batch).logits, streamed(**batch).logits)


def test_loader_gives_transformers_bytes_and_model_attributes(tmp_path):
    path = save_tiny_model("gemma3_text", tmp_path / "gemma3")  # tied head, sliding window
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", quantization_config=nf4_config(torch.float32)
    )
    streamed = load_streamed_model(str(path), dtype=torch.float32, device="cpu", slots=1)
    expected, actual = reference.state_dict(), streamed.state_dict()
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), key
    for (name, buffer), (_, other) in zip(reference.named_buffers(), streamed.named_buffers()):
        assert torch.equal(buffer, other), name
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    for attr in ("is_quantized", "is_loaded_in_4bit", "quantization_method"):
        assert getattr(streamed, attr) == getattr(reference, attr), attr
    assert streamed.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert not streamed.training
    _assert_same_logits(reference, streamed)


def test_prequantized_checkpoint_streams_without_requantising(tmp_path, llama_path):
    resident = AutoModelForCausalLM.from_pretrained(
        llama_path, dtype=torch.float32, device_map="cpu",
        quantization_config=nf4_config(torch.float32),
    )  # fmt: skip
    resident.save_pretrained(tmp_path / "nf4")
    streamed = load_streamed_model(str(tmp_path / "nf4"), dtype=torch.float32, device="cpu")
    expected, actual = resident.state_dict(), streamed.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), key
    _assert_same_logits(resident, streamed)


def test_random_model_is_the_same_streamed_or_not():
    from tiny_models import tiny_config

    config = tiny_config("qwen2", num_hidden_layers=3, layer_types=["full_attention"] * 3)
    kwargs = {"dtype": torch.float32, "device": "cpu", "seed": 3, "attn_implementation": None}
    streamed = build_random_nf4_model(config, **kwargs)
    resident = build_random_nf4_model(config, stream=False, **kwargs)
    assert get_weight_streamer(streamed) is not None
    assert get_weight_streamer(resident) is None
    expected, actual = resident.state_dict(), streamed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert expected["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert expected["model.norm.weight"].eq(1).all()
    _assert_same_logits(resident, streamed)


# --------------------------------------------------------------------------- plan and budget


def _layer_bytes(hidden=72, inter=100, q=72, kv=24) -> int:
    """One streamed layer: each projection's packed nibbles and absmax bytes, 256-aligned."""

    def aligned(n: int) -> int:
        return -(-n // ALIGN) * ALIGN

    total = 0
    for out_f, in_f in [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q),
                        (inter, hidden), (inter, hidden), (hidden, inter)]:  # fmt: skip
        numel = out_f * in_f
        total += aligned(numel // 2) + aligned(math.ceil(numel / 64))
    return total


def test_memory_plan_numbers(fused_pair):
    _, streamed = fused_pair
    streamer = get_weight_streamer(streamed)
    layer = _layer_bytes()
    assert {i: streamer._layers[i].nbytes for i in range(LAYERS)} == dict.fromkeys(
        range(LAYERS), layer
    )
    plan = plan_memory(streamed, batch_size=2, seq_len=16, checkpointing=True)
    assert plan.slot_bytes == layer and plan.slots == 2
    assert plan.gpu["streaming slots (2)"] == 2 * layer
    assert plan.host == {"streamed weights (pinned)": LAYERS * layer}
    assert (plan.copies_per_step, plan.transfer_per_step) == (6, 6 * layer)
    lora = plan_module.lora_parameter_count(streamed.config, RANK)
    assert lora == LAYERS * RANK * (2 * (72 + 72) + 2 * (72 + 24) + 3 * (72 + 100))
    assert plan.gpu["LoRA / trainable weights"] == 4 * lora
    assert plan.gpu["optimizer state (AdamW est.)"] == 8 * lora
    assert plan.gpu["activations: saved layer activations (est.)"] == LAYERS * 2 * 16 * 72 * 4
    assert plan.gpu_total == sum(plan.gpu.values())
    text = plan.format()
    assert "5 streamed" in text and "copies per training step: 6 layers" in text
    # inference: what the plan counts is what the streamer does
    FastModel.for_inference(streamed)
    prompt = tiny_batch(batch=1, seq=5)["input_ids"]
    with torch.no_grad():
        streamed(input_ids=prompt)
        streamer.stats.reset()
        streamed(input_ids=prompt)
    FastModel.for_training(streamed)
    assert streamer.stats.copies == plan.copies_per_inference_forward


def test_host_placement_degrades_then_spills_then_refuses(tmp_path):
    gib = 2**30
    budget = HostBudget(pinned=25 * gib, ram=45 * gib)
    assert host_placement([10 * gib] * 4, budget) == ["pinned", "pinned", "pageable", "pageable"]
    budget.folder = str(tmp_path)
    assert host_placement([10 * gib] * 5, budget)[-1] == "disk"
    budget.folder = None
    with pytest.raises(HostMemoryError, match=r"need 50\.00 GiB of CPU RAM.*offload_folder"):
        host_placement([10 * gib] * 5, budget)


def test_pinning_refused_falls_back_to_pageable_once_logged_and_exact(llama_path, caplog):
    reference, streamed = _resident(llama_path), _resident(llama_path)
    engine = SyncCopyEngine(pin_limit=2 * _layer_bytes())  # the OS pins two layers only
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        streamer = stream_weights(streamed, engine=engine)
    assert list(streamer.host_kinds().values()) == ["pinned"] * 2 + ["pageable"] * 3
    assert sum("pinning host memory failed" in r.getMessage() for r in caplog.records) == 1
    assert "not in pinned RAM" in caplog.text
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(reference(**batch).logits, streamed(**batch).logits)


def test_ram_short_spills_to_the_folder_or_fails_before_touching_the_model(
    llama_path, tmp_path, monkeypatch
):
    layer = _layer_bytes()
    reference, streamed = _resident(llama_path), _resident(llama_path)
    before = {n: p.data_ptr() for n, p in streamed.named_parameters()}
    monkeypatch.setattr(plan_module, "host_memory_available", lambda: 3 * layer + 2**30)
    with pytest.raises(HostMemoryError, match="offload_folder"):
        stream_weights(streamed)
    assert before == {n: p.data_ptr() for n, p in streamed.named_parameters()}
    streamer = stream_weights(streamed, budget=HostBudget(pinned=layer, folder=str(tmp_path)))
    assert list(streamer.host_kinds().values()) == [
        "pinned",
        "pageable",
        "pageable",
        "disk",
        "disk",
    ]  # noqa: E501
    assert not list(tmp_path.iterdir())  # the spill files are unlinked once mapped
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(reference(**batch).logits, streamed(**batch).logits)


def test_unstream_restores_a_plain_model(llama_path):
    reference, streamed = _resident(llama_path), _resident(llama_path)
    device_map = streamed.__dict__.get("hf_device_map", "none")
    stream_weights(streamed, engine=SyncCopyEngine())
    assert streamed.hf_device_map != device_map
    unstream_weights(streamed)
    assert get_weight_streamer(streamed) is None
    assert streamed.__dict__.get("hf_device_map", "none") == device_map
    layer = streamed.model.layers[3]
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    expected, actual = reference.state_dict(), streamed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_the_streamer_lowers_the_pinned_budget_it_is_given_and_no_other(llama_path):
    streamed = _resident(llama_path)
    given, default = PinnedBudget(limit=2**60), checkpoint.BUDGET.limit
    streamer = WeightStreamer(streamed, "cpu", engine=SyncCopyEngine(), activation_budget=given)
    streamer.plan_host({i: layer_nbytes(streamer.layers[i]) for i in streamer.streamed})
    for index in streamer.streamed:
        streamer.adopt(index)
    streamer.finish()
    assert get_weight_streamer(streamed) is streamer
    assert given.limit < 2**60  # lowered to half of the RAM the pinned weights left
    assert checkpoint.BUDGET.limit == default


# --------------------------------------------------------------------------- requests, errors


def test_from_pretrained_keywords_and_automatic_choice(llama_path, monkeypatch):
    from transformers import AutoConfig

    from fastlm.loading.streaming import streaming_request

    config = AutoConfig.from_pretrained(llama_path)
    common = {"config": config, "device": "cuda", "device_map": "auto", "dtype": torch.bfloat16}

    def request(load_in_4bit=True, **kwargs):
        return streaming_request(kwargs, load_in_4bit=load_in_4bit, max_seq_length=64, **common)

    monkeypatch.setattr(plan_module, "gpu_memory_available", lambda device=None: 80 * 2**30)
    assert request() is None  # fits: loaded normally
    for keywords in ({"offload_weights": True}, {"offload_enabled": True}):
        chosen = request(**keywords)
        assert chosen.resident_layers == 0 and chosen.folder is None
    assert request(offload_folder="/tmp/x", offload_slots=3).folder == "/tmp/x"
    monkeypatch.setattr(plan_module, "gpu_memory_available", lambda device=None: 2**20)
    automatic = request()
    assert automatic is not None and automatic.resident_layers == "auto"
    assert "offload_weights=False" in automatic.reason
    assert request(offload_weights=False) is None
    assert request(load_in_4bit=False) is None  # 16-bit: never automatic
    with pytest.raises(NotImplementedError, match="load_in_4bit=True"):
        request(load_in_4bit=False, offload_weights=True)
    with pytest.raises(ValueError, match="conflicting"):
        request(offload_weights=False, offload_folder="/tmp/x")
    with pytest.raises(ValueError, match="device_map"):
        streaming_request(
            {"offload_weights": True}, config, load_in_4bit=True, device="cuda",
            device_map={"model.layers.0": 0}, dtype=torch.bfloat16,
        )  # fmt: skip
    kwargs = {"offload_weights": True, "offload_slots": 2, "revision": None}
    assert streaming_request(kwargs, load_in_4bit=True, **common) is not None
    assert kwargs == {"revision": None}  # the offload keywords are consumed, others kept


def test_clear_errors(llama_path):
    plain, _ = FastModel.from_pretrained(str(llama_path), device_map="cpu")
    with pytest.raises(WeightStreamingError, match="load_in_4bit=True"):
        stream_weights(plain)
    streamed = _resident(llama_path)
    stream_weights(streamed, engine=SyncCopyEngine())
    with pytest.raises(WeightStreamingError, match="already"):
        stream_weights(streamed)
    weight = streamed.model.layers[2].mlp.down_proj.weight
    weight.data = weight.data.clone()  # e.g. what model.to() or PiSSA initialisation does
    with pytest.raises(WeightStreamingError, match="decoder layer 2 .* re-pointed"):
        streamed(**tiny_batch())
    with pytest.raises(TypeError, match="gguf|does not take"):
        FastModel.from_pretrained(
            str(llama_path), load_in_4bit=True, device_map="cpu", offload_weights=True,
            output_loading_info=True,
        )  # fmt: skip


def test_sft_trainer_trains_a_streamed_model_and_memory_callback_logs(llama_path, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fastlm import MemoryCallback

    on_gpu = torch.cuda.is_available()
    model, tokenizer = FastModel.from_pretrained(
        str(llama_path), max_seq_length=64, load_in_4bit=True, offload_weights=True,
        device_map="auto" if on_gpu else "cpu",
    )  # fmt: skip
    model = FastModel.get_peft_model(model, r=RANK, lora_alpha=8)
    rows = [{"text": f"{i} plus {i} is {2 * i}."} for i in range(8)]
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
        learning_rate=1e-2, logging_steps=1, max_length=64, bf16=on_gpu, use_cpu=not on_gpu,
        report_to=[], save_strategy="no",
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[MemoryCallback()],
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and all(math.isfinite(log["loss"]) for log in logs)
    assert any(key.startswith("mem_") for key in logs[-1])
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach().cpu(), b.cpu()) for n, b in before.items())
    assert get_weight_streamer(model).stats.copies >= 3 * 6


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side stream, pinning)")
@CHECKPOINTING
def test_gpu_streamed_step_is_bit_identical(llama_path, checkpointing, reads_checked):
    reference = _peft(_resident(llama_path, "cuda"), checkpointing)
    streamed, _ = FastModel.from_pretrained(
        str(llama_path), load_in_4bit=True, device_map="auto", offload_weights=True
    )
    streamed = _peft(streamed, checkpointing)
    copy_lora(reference, streamed)
    streamer = reads_checked(get_weight_streamer(streamed))
    assert isinstance(streamer.engine, CudaCopyEngine)
    assert set(streamer.host_kinds().values()) == {"pinned"}
    place_trainable(streamed)  # PEFT made the adapters of streamed layers on the host
    assert all(p.is_cuda for n, p in streamed.named_parameters() if "lora_" in n)
    for autocast in (False, True):
        for seed in (0, 1):
            batch = tiny_batch(seed=seed)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                expected, repeat = _step(reference, batch), _step(reference, batch)
                actual = _step(streamed, batch)
            if _identical(expected, repeat):  # deterministic kernels: bits must match
                _assert_identical(expected, actual)
            else:  # otherwise no further from the reference than it is from itself
                assert _distance(expected, actual) <= 2 * _distance(expected, repeat)
    torch.cuda.synchronize()
    assert streamer.stats.copies > 0


def _identical(first, second) -> bool:
    return torch.equal(first[0], second[0]) and all(
        torch.equal(g, second[1][n]) for n, g in first[1].items()
    )


def _distance(first, second) -> float:
    loss = abs(first[0].item() - second[0].item()) / abs(first[0].item())
    grads = max(((g - second[1][n]).norm() / g.norm()).item() for n, g in first[1].items())
    return max(loss, grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_loading_never_holds_the_model_on_the_gpu():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000,
    )  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_random_nf4_model(config, dtype=torch.bfloat16, device="cuda")
    streamer = get_weight_streamer(model)
    layer = max(streamer._layers[i].nbytes for i in streamer.streamed)
    dense_layer = 2 * (4 * 1024 * 1024 // 2 + 3 * 1024 * 4096)  # bf16 bytes of one layer
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 6 * layer + dense_layer  # about one layer in 16 bits, not twelve packed
    assert torch.cuda.memory_allocated() - base < 3 * layer + 2**20 * 16
    assert set(streamer.host_kinds().values()) == {"pinned"}
    assert streamer.bandwidth and streamer.bandwidth > 1e9


def test_benchmark_script_parses_refuses_without_cuda_and_tabulates(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "offload_capacity.py"
    spec = importlib.util.spec_from_file_location("offload_capacity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exited:
        script.parse_args(["--help"])
    assert exited.value.code == 0 and "capacity" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert script.main(["--out", "/nonexistent/never-written"]) == 2
        assert "CUDA" in capsys.readouterr().err
    same = {"bit_identical": True, "max_rel_diff": 0.0, "tensors": 448}
    records = [
        {"part": "exactness", "status": "ok", "passed": True, "shape": "llama-3.1-8b",
         "loss_streamed": 12.5, "loss_resident": 12.5, "streamed_vs_resident": same,
         "resident_vs_resident": same, "step_s_streamed": 0.9, "step_s_resident": 0.5,
         "peak_gib_streamed": 4.0, "peak_gib_resident": 7.0, "pinned_gib": 3.6,
         "transfer_gib_per_step": 6.9, "bandwidth_gbs": 24.0},
        {"part": "capacity", "status": "oom", "optimizer": "adamw", "error": "CUDA out of memory",
         "peak_gib_allocated": 7.9},
        {"part": "capacity", "status": "ok", "shape": "qwen2.5-32b", "optimizer": "adamw8bit",
         "losses": [12.0, 11.9], "tokens_per_s": 900.0, "step_s": 2.2, "cap_gib": 8.0,
         "peak_gib_allocated": 6.5, "peak_gib_reserved": 7.1, "host_rss_gib": 21.0,
         "pinned_gib": 15.0, "transfer_gib_per_step": 29.0, "bandwidth_gbs": 25.0,
         "effective_h2d_gbs": 14.0},
    ]  # fmt: skip
    text = script.table(records)
    assert "PASS" in text and "bit-identical" in text and "adamw8bit: loss 12.0000" in text
    assert "adamw: CUDA out of memory" in text and len(text.splitlines()) == 5


def test_a_mixture_of_experts_model_is_sized_with_its_experts(monkeypatch):
    """Qwen3-30B-A3B's shape: the dense formula sees ~2.5 GiB of 4-bit weights; counted on the
    meta-device model, the 4-bit weights are ~15.5 GiB and loading it whole peaks at ~56 GiB
    (the experts arrive 16-bit and are quantised after). On 80 GiB it loads whole; on 40 GiB it
    fits to train but not to load, so the streamed loader (layer by layer) is chosen; on 16 GiB
    it does not fit and streams."""
    from transformers import Qwen3MoeConfig

    from fastlm.loading.streaming import streaming_request

    config = Qwen3MoeConfig(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936,
    )  # fmt: skip
    weights, load_peak = plan_module.experts_weights(config, torch.bfloat16)
    assert 15 * 2**30 < weights < 16 * 2**30 and 55 * 2**30 < load_peak < 57 * 2**30

    def request(gib):
        monkeypatch.setattr(plan_module, "gpu_memory_available", lambda device=None: gib * 2**30)
        return streaming_request({}, config, load_in_4bit=True, device="cuda", device_map="auto",
                                 dtype=torch.bfloat16, max_seq_length=2048)  # fmt: skip

    assert request(80) is None
    layer_by_layer = request(40)
    assert layer_by_layer.resident_layers == "auto" and "16-bit load" in layer_by_layer.reason
    assert "to train" in request(16).reason
    from transformers import LlamaConfig

    assert plan_module.experts_weights(LlamaConfig(), torch.bfloat16) is None  # dense
