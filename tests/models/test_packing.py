"""Packed (padding-free) batches through the patched attention: several sequences in one row,
as ``DataCollatorWithFlattening`` builds them, give the loss and every LoRA gradient of each
sequence run on its own through unpatched transformers + PEFT (the per-sequence losses summed
over the packed batch's token count), and no sequence sees another.

The packed kernel runs on the GPU where there is one, else in the interpreter on CPU tensors
(``kernel_on_cpu``); without it, the CPU's eager fallback must keep the sequences apart too.
"""

from __future__ import annotations

import pytest
import torch
from test_architectures import RTOL, TF32_RTOL, _assert_loss_and_lora_grads_match, _pair
from tiny_models import VOCAB, on_device, relative_error, tiny_batch
from transformers import DataCollatorWithFlattening
from transformers.masking_utils import find_packed_sequence_indices

from fastlm.models import attention, fused_report, spec_for
from fastlm.models.linear_attention import FLA, ONE_AT_A_TIME, PACKED_IN_ONE_CALL
from fastlm.models.packing import Packing, chunks_of, packed_sequences, positions_in_sequences

pytestmark = pytest.mark.usefixtures("one_thread")

# gemma2: soft-cap and window 4; gemma3_text: local and global layers; gemma4_text: KV sharing and
# k = v layers; qwen3_5_text: linear-attention layers, whose conv and state restart with each
# sequence (one sequence at a time; the bounds reach them as cu_seq_lens even where the caller
# gave position_ids).
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma4_text",
            "qwen3_5_text"]  # fmt: skip
LENGTHS = (6, 1, 9)  # one token alone; two longer than the windows
# How the collator says where sequences start, and whether a KV cache exists in training (then
# transformers' mask spans the whole row and only the packing signals keep sequences apart).
SIGNALS = {
    "position_ids": (dict(), False),
    "cu_seq_lens": (dict(return_flash_attn_kwargs=True), True),
    "cu_seq_lens_only": (dict(return_flash_attn_kwargs=True, return_position_ids=False), False),
}


def _sequences(lengths=LENGTHS, seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _packed_batch(sequences, signal: str) -> dict:
    options, use_cache = SIGNALS[signal]
    collator = DataCollatorWithFlattening(**options)
    batch = collator([{"input_ids": ids} for ids in sequences])
    return {**batch, "use_cache": use_cache}


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if "lora_" in n}


def _on(model, batch: dict) -> dict:
    """``batch`` with its tensors where ``model`` is."""
    return on_device(batch, next(model.parameters()).device)


def _rtol(model_type: str, device: str) -> float:
    """RTOL, or TF32_RTOL where Qwen3.5's linear attention runs fla's kernels (fp32 in TF32)."""
    return TF32_RTOL if device == "cuda" and model_type.startswith("qwen3_5") else RTOL


def _per_sequence_reference(model, sequences, **options):
    """Each sequence alone; losses summed over the whole batch's predicted tokens, which is how
    the packed batch's mean is taken (its first label per sequence is -100)."""
    model.zero_grad(set_to_none=True)
    n_items = sum(len(ids) - 1 for ids in sequences)
    total = 0.0
    for ids in sequences:
        ids = torch.tensor([ids], device=next(model.parameters()).device)
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=n_items, **options).loss
        loss.backward()
        total += loss.item()
    return total, _lora_grads(model)


def _attention_rows(model) -> list[dict]:
    """fused_report's attention rows of the attention layers (not linear-attention layers, which
    take packed sequences by their own rule)."""
    linear = (ONE_AT_A_TIME, PACKED_IN_ONE_CALL)
    return [r for r in fused_report(model).attention if not any(m in r["reason"] for m in linear)]


def _source(model, signal: str) -> str:
    """Where the attention reads the sequences from: position_ids reach the layers of some
    families as cu_seq_lens (ArchitectureSpec.layers_need_bounds)."""
    bounds = spec_for(model.config).layers_need_bounds
    return "position_ids" if signal == "position_ids" and not bounds else "cu_seq_lens"


def _packed_run(model, batch, **options):
    model.zero_grad(set_to_none=True)
    loss = model(**_on(model, batch), **options).loss
    loss.backward()
    return loss.item(), _lora_grads(model)


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("signal", list(SIGNALS))
@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_loss_and_lora_grads_match_each_sequence_alone(tmp_path, model_type, signal, device):
    reference, fast = _pair(tmp_path, model_type, checkpointing=False, device=device)
    fast.set_attn_implementation("eager")  # where fastlm's kernels replace transformers'
    sequences = _sequences()
    want_loss, want = _per_sequence_reference(reference, sequences)
    got_loss, got = _packed_run(fast, _packed_batch(sequences, signal))
    rtol = _rtol(model_type, device)
    assert abs(got_loss - want_loss) <= rtol * abs(want_loss)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert relative_error(got[name], grad) <= rtol, name
    ran = {(row["attention"], row["reason"]) for row in _attention_rows(fast)}
    assert ran == {(attention.FLASH_VARLEN, f"packed sequences from {_source(fast, signal)}")}


# Mixture-of-experts families whose attention fastlm runs (not qwen3_5_moe_text: linear
# attention, as above). Routing is per token, so packing changes only attention; the
# load-balancing loss is over the batch's tokens, not a sum over sequences, so it is left out
# (output_router_logits=False, the configs' default) and compared in test_moe.py.
MOE_FAMILIES = ["qwen3_moe", "gpt_oss"]


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("signal", list(SIGNALS))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_packed_moe_batches_match_each_sequence_alone(tmp_path, family, signal, device):
    from test_moe import _pair as moe_pair  # lazy: test_moe skips without Qwen3-MoE

    reference, fast = moe_pair(tmp_path, False, family, device=device)
    fast.set_attn_implementation("eager")  # where fastlm's kernels replace transformers'
    sequences = _sequences()
    without_aux = {"output_router_logits": False}
    want_loss, want = _per_sequence_reference(reference, sequences, **without_aux)
    got_loss, got = _packed_run(fast, _packed_batch(sequences, signal), **without_aux)
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss)
    assert got.keys() == want.keys() and any(".experts." in name for name in want)
    for name, grad in want.items():
        assert relative_error(got[name], grad) <= RTOL, name
    source = "position_ids" if signal == "position_ids" else "cu_seq_lens"
    ran = {(row["attention"], row["reason"]) for row in fused_report(fast).attention}
    assert ran == {(attention.FLASH_VARLEN, f"packed sequences from {source}")}


@pytest.mark.usefixtures("kernel_on_cpu")
def test_qwen3_5_full_attention_runs_packed(tmp_path, device):
    """Its full-attention layer takes the packed kernel; its linear-attention layers take the
    sequences in one call by their bounds on fla's kernels (CUDA), else one at a time, and
    fused_report says so."""
    _, fast = _pair(tmp_path, "qwen3_5_text", checkpointing=False, device=device)
    fast.set_attn_implementation("eager")
    fast(**_on(fast, _packed_batch(_sequences(), "position_ids")))
    rows = fused_report(fast).attention
    full = [row["attention"] for row in rows if row["kv"] == "k_proj, v_proj"]
    assert full == [attention.FLASH_VARLEN]
    linear = [row for row in rows if row["kv"] != "k_proj, v_proj"]
    packed = {row["attention"]: PACKED_IN_ONE_CALL if row["attention"] == FLA else ONE_AT_A_TIME
              for row in linear}  # fmt: skip
    assert linear and all(packed[row["attention"]] in row["reason"] for row in linear), linear


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
@pytest.mark.parametrize("signal", ["position_ids", "cu_seq_lens"])
def test_cpu_eager_fallback_keeps_sequences_apart(tmp_path, signal):
    reference, fast = _pair(tmp_path, "gemma2", checkpointing=False)
    fast.set_attn_implementation("eager")
    sequences = _sequences()
    want_loss, want = _per_sequence_reference(reference, sequences)
    got_loss, got = _packed_run(fast, _packed_batch(sequences, signal))
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss)
    for name, grad in want.items():
        assert relative_error(got[name], grad) <= RTOL, name
    reason = "cpu tensors (the kernel runs on CUDA)"
    assert {(r["attention"], r["reason"]) for r in fused_report(fast).attention} == {
        ("eager", reason)
    }


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("signal", list(SIGNALS))
def test_sdpa_model_keeps_packed_sequences_apart(tmp_path, request, signal, kernel, device):
    """An SDPA model (transformers' default) runs the packed kernel too; on the CPU's SDPA
    fallback, a mask over the whole row (a KV cache, or cu_seq_lens alone: transformers then
    gives SDPA none) is replaced by the per-sequence one. Seen failing with SDPA given no mask."""
    if kernel:
        request.getfixturevalue("kernel_on_cpu")
    elif torch.cuda.is_available():
        pytest.skip("the CPU fallback")
    reference, fast = _pair(tmp_path, "llama", checkpointing=False, device=device)
    assert fast.config._attn_implementation == "sdpa"
    sequences = _sequences()
    want_loss, want = _per_sequence_reference(reference, sequences)
    got_loss, got = _packed_run(fast, _packed_batch(sequences, signal))
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss)
    for name, grad in want.items():
        assert relative_error(got[name], grad) <= RTOL, name
    source = "position_ids" if signal == "position_ids" else "cu_seq_lens"
    path = (attention.FLASH_VARLEN, f"packed sequences from {source}, in place of sdpa")
    if not kernel:
        cpu = "cpu tensors (the kernel runs on CUDA)"
        path = ("sdpa", f"packed sequences from {source}, but {cpu}")
    assert {(r["attention"], r["reason"]) for r in fused_report(fast).attention} == {path}


def _per_token(model, batch):
    """Per-token logits of the packed row (1, T, V) and its per-token losses (T,)."""
    inputs = {k: v for k, v in _on(model, batch).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.float().cpu()
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[0, 1:]
    losses = torch.nn.functional.cross_entropy(logits[0], labels, reduction="none")
    return logits, losses


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("signal", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3_5_text"])
def test_a_sequence_never_sees_another(tmp_path, model_type, signal, device):
    """Redraw the middle sequence: every token of the others keeps every bit of its logits and
    its loss. Seen failing with the kernel given one sequence over the whole row."""
    _, fast = _pair(tmp_path, model_type, checkpointing=False, device=device)
    fast.set_attn_implementation("eager")
    lengths = (5, 4, 7)
    sequences = _sequences(lengths)
    changed = [sequences[0], _sequences(lengths, seed=1)[1], sequences[2]]
    before = _per_token(fast, _packed_batch(sequences, signal))
    after = _per_token(fast, _packed_batch(changed, signal))
    ran = {row["attention"] for row in _attention_rows(fast)}
    assert ran == {attention.FLASH_VARLEN}
    others = torch.ones(sum(lengths), dtype=torch.bool)
    others[lengths[0] - 1 : lengths[0] + lengths[1]] = False  # the middle (and who predicts it)
    assert torch.equal(before[0][0, others], after[0][0, others])
    assert torch.equal(before[1][others], after[1][others])
    assert not torch.equal(before[0][0, ~others], after[0][0, ~others])  # it did change


# --- finding the sequences ---------------------------------------------------------------------


def test_position_ids_split_as_transformers_splits_them():
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6, 0]])
    packing = packed_sequences({"position_ids": position_ids}, 1, 9)
    ids = find_packed_sequence_indices(position_ids)[0]
    starts = [0] + [i for i in range(1, 9) if ids[i] != ids[i - 1]] + [9]
    assert packing.cu_seqlens.tolist() == starts and packing.max_seqlen == 3
    assert packing.offsets == tuple(starts)  # read once: the linear-attention split reuses them
    assert packing.source == "position_ids" and not packing.problem
    assert packed_sequences({"position_ids": torch.arange(9)[None]}, 1, 9) is None
    rows = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 3]])  # two rows: one packs two sequences
    assert packed_sequences({"position_ids": rows}, 2, 4).cu_seqlens.tolist() == [0, 3, 4, 8]


def test_cu_seq_lens_come_first_and_are_checked():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=3, max_length_k=3)
    kwargs["position_ids"] = torch.arange(5)[None]  # disagrees: the kwargs win, as in transformers
    packing = packed_sequences(kwargs, 1, 5)
    assert packing.cu_seqlens.tolist() == [0, 2, 5] and packing.source == "cu_seq_lens"
    other = torch.tensor([0, 1, 5], dtype=torch.int32)
    assert "differ" in packed_sequences({**kwargs, "cu_seq_lens_k": other}, 1, 5).problem
    assert "0 to the row's 6" in packed_sequences(kwargs, 1, 6).problem
    assert "rows" in packed_sequences(kwargs, 2, 5).problem
    one = torch.tensor([0, 5], dtype=torch.int32)
    assert packed_sequences({**kwargs, "cu_seq_lens_q": one, "cu_seq_lens_k": one}, 1, 5) is None


def test_an_ordinary_step_reads_no_position_ids(tmp_path, monkeypatch):
    """A training step whose caller passes no position_ids (the model makes its own 0..S-1):
    the attention calls never read them (on a GPU that read is a host synchronisation per
    forward), and the step is HF's. Passing position_ids reads them, once per forward."""
    from fastlm.models import packing

    reads = []
    original = packing._from_position_ids

    def counted(*args):
        reads.append(1)
        return original(*args)

    monkeypatch.setattr(packing, "_from_position_ids", counted)
    reference, fast = _pair(tmp_path, "llama", checkpointing=True)
    batch = tiny_batch()
    _assert_loss_and_lora_grads_match(reference, fast, batch)
    assert reads == []
    length = batch["input_ids"].shape[1]
    fast(**batch, position_ids=torch.arange(length).expand(batch["input_ids"].shape[0], -1))
    assert reads == [1]


def test_inference_mode_generation_reads_positions(tmp_path):
    """Under torch.inference_mode (generation, the demo's evaluation) the position tensors keep no
    version counter: they are read and remembered all the same (it used to raise)."""
    _, fast = _pair(tmp_path, "llama", checkpointing=False)
    fast.eval()
    prompt = tiny_batch()["input_ids"][:1, :5]
    with torch.inference_mode():
        out = fast.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        packed = torch.arange(4).repeat(2)[None]  # two sequences of 4 in one row
        fast(input_ids=prompt.new_ones(1, 8), position_ids=packed)
    assert out.shape == (1, 8)
    assert "packed sequences from position_ids" in fused_report(fast).attention[0]["reason"]


def test_chunks_are_cut_from_each_sequence_s_own_start():
    """Sequences of 6, 1 and 9 tokens in chunks of 4: three pieces each (empty ones kept, so
    the count needs no host read), cut 4 tokens after each sequence's first; offsets rewritten
    in place (a CUDA graph's static copy) are cut anew."""
    cu = torch.tensor([0, 6, 7, 16], dtype=torch.int32)
    packing = Packing(cu, 9, "cu_seq_lens")
    cut = chunks_of(packing, 4)
    assert cut.cu_seqlens.tolist() == [0, 4, 6, 6, 7, 7, 7, 11, 15, 16]
    assert cut.max_seqlen == 4 and cut.cu_seqlens.dtype == torch.int32
    assert positions_in_sequences(packing, 16).tolist() == [*range(6), 0, *range(9)]
    cu.copy_(torch.tensor([0, 2, 9, 16]))
    assert chunks_of(packing, 4).cu_seqlens.tolist() == [0, 2, 2, 2, 6, 9, 9, 13, 16, 16]
