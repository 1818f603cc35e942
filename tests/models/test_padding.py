"""Padded batches through the patched attention (fastlm.models.padding): a tokenizer's 0/1
attention_mask, right or left padding and rows of uneven lengths, runs the packed kernel on the
real tokens alone (unpad -> varlen -> pad) and gives the loss and every LoRA gradient of
unpatched transformers + PEFT; a pad token's content never reaches a real token, nor one row's
another's; masks that are not exactly padding keep eager.

The packed kernel runs on the GPU where there is one, else in the interpreter on CPU tensors
(``kernel_on_cpu``).
"""

from __future__ import annotations

import gc

import pytest
import torch
from test_architectures import RTOL, _pair
from test_attention import _gemma2_attention, _inputs
from test_packing import _on, _rtol
from tiny_models import VOCAB, relative_error

from fastlm.kernels.flash_attention import keep_pattern
from fastlm.models import attention, fused_report, padding

pytestmark = pytest.mark.usefixtures("one_thread")

# gemma2: soft-cap, window 4, sliding and full layers; gemma3_text: local and global layers;
# mistral: a window on every layer; gemma4_text: KV sharing and k = v layers; qwen3_5_text: one
# full-attention layer between linear-attention ones, which mask the padding themselves.
FAMILIES = ["llama", "qwen3", "mistral", "gemma2", "gemma3_text", "gemma4_text", "qwen3_5_text"]
LENGTHS = (11, 6, 1, 9)  # a full row, one token alone, rows longer and shorter than the windows


def _padded_batch(side: str, lengths=LENGTHS, seed: int = 0) -> dict:
    """Rows of ``lengths`` real tokens padded to the longest on ``side``, as a tokenizer pads.
    Labels: only tokens predicted from a real token count. With left padding the first real
    token would be predicted from a pad position, whose output is an artefact in eager (a row
    with every key masked) and zero here; collators leave that label out."""
    seq = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if side == "left":
        mask = mask.flip(-1)
    input_ids = input_ids.masked_fill(mask == 0, 0)
    predicted_from_real = torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 1
    labels = input_ids.masked_fill((mask == 0) | ~predicted_from_real, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _loss_and_lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**_on(model, batch)).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().to("cpu", copy=True) for n, p in
                         model.named_parameters() if "lora_" in n}  # fmt: skip


def _paths(model) -> set[tuple[str, str]]:
    """What the softmax attention modules ran (Qwen3.5's linear-attention layers aside)."""
    rows = fused_report(model).attention
    linear = "none: linear attention"
    return {(row["attention"], row["reason"]) for row in rows if not row["kv"].startswith(linear)}


def _assert_matches_transformers(reference, fast, batch, rtol=RTOL):
    want_loss, want = _loss_and_lora_grads(reference, batch)
    got_loss, got = _loss_and_lora_grads(fast, batch)
    assert abs(got_loss - want_loss) <= rtol * abs(want_loss)
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(got[name], grad) <= rtol, name


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_padded_loss_and_lora_grads_match_transformers(tmp_path, model_type, side, device):
    reference, fast = _pair(tmp_path, model_type, checkpointing=False, device=device)
    fast.set_attn_implementation("eager")  # where fastlm's kernels replace transformers'
    _assert_matches_transformers(reference, fast, _padded_batch(side), _rtol(model_type, device))
    assert _paths(fast) == {(attention.FLASH_VARLEN, attention.PADDED)}


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("side", ["right", "left"])
def test_sdpa_model_runs_the_padded_launch(tmp_path, side, device):
    """transformers' default attention: the padded call runs the kernel in place of SDPA."""
    reference, fast = _pair(tmp_path, "llama", checkpointing=True, device=device)
    assert fast.config._attn_implementation == "sdpa"
    _assert_matches_transformers(reference, fast, _padded_batch(side))
    assert _paths(fast) == {(attention.FLASH_VARLEN, f"{attention.PADDED}, in place of sdpa")}


@pytest.mark.usefixtures("kernel_on_cpu")
def test_left_padding_with_generation_positions(tmp_path, device):
    """Left padding with the position_ids generate() makes (1 on the pads, 0.. on the tokens):
    they restart, so packing finds sequences, but the mask is padding and says what eager
    computes; the padded launch runs."""
    reference, fast = _pair(tmp_path, "gemma2", checkpointing=False, device=device)
    fast.set_attn_implementation("eager")
    batch = _padded_batch("left")
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    _assert_matches_transformers(reference, fast, batch)
    assert _paths(fast) == {(attention.FLASH_VARLEN, attention.PADDED)}


def _real_logits(model, batch) -> torch.Tensor:
    """The logits of the real tokens, (T, V), in row order, on the CPU."""
    inputs = _on(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        logits = model(**inputs).logits.cpu()
    return logits[batch["attention_mask"] == 1]


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_padding_and_other_rows_never_reach_a_real_token(tmp_path, model_type, side, device):
    """Redraw the pad tokens and one row's real tokens: every real token of the other rows keeps
    every bit of its logits. Seen failing with each row's span one token into the next row."""
    _, fast = _pair(tmp_path, model_type, checkpointing=False, device=device)
    fast.set_attn_implementation("eager")
    batch = _padded_batch(side)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    other = torch.randint(3, VOCAB, batch["input_ids"].shape, generator=torch.Generator())
    pads = batch["attention_mask"] == 0
    changed["input_ids"][pads] = other[pads]
    changed["input_ids"][1] = other[1].masked_fill(pads[1], 0)  # row 1: new real tokens
    before, after = _real_logits(fast, batch), _real_logits(fast, changed)
    assert _paths(fast) == {(attention.FLASH_VARLEN, attention.PADDED)}
    rows = torch.arange(len(LENGTHS))[:, None].expand_as(pads)[~pads]  # each real token's row
    assert torch.equal(before[rows != 1], after[rows != 1])
    assert not torch.equal(before[rows == 1], after[rows == 1])  # it did change


@pytest.mark.usefixtures("kernel_on_cpu")
def test_a_forward_reads_each_mask_once(tmp_path, monkeypatch, device):
    """Reading the mask is a host synchronisation: once per mask tensor, not once per layer.
    Gemma 3 text has two masks (sliding, full) over its three layers."""
    reads = []
    original = padding._read
    monkeypatch.setattr(padding, "_read", lambda *a: reads.append(1) or original(*a))
    _, fast = _pair(tmp_path, "gemma3_text", checkpointing=True, device=device)
    fast.set_attn_implementation("eager")
    loss = fast(**_on(fast, _padded_batch("left"))).loss
    assert reads == [1, 1]
    loss.backward()  # the checkpointed layers' recompute finds the answers
    assert reads == [1, 1]


# --- reading the mask ---------------------------------------------------------------------------


def _mask(real_rows, causal=True, window=None, additive=False) -> torch.Tensor:
    """transformers' mask (B, 1, S, S) from 0/1 rows: the pattern and the real keys."""
    real = torch.tensor(real_rows, dtype=torch.bool)
    keep = keep_pattern(real.shape[1], causal, window, "cpu") & real[:, None, None, :]
    if not additive:
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "eager"])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None)])
def test_padding_is_read_from_the_mask(causal, window, additive):
    rows = [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]]
    found = padding.padded_rows(_mask(rows, causal, window, additive), 4, 6, causal, window)
    assert not found.problem and found.max_seqlen == 4
    assert found.cu_seqlens.tolist() == [0, 4, 8, 11, 12]
    assert found.cu_seqlens.dtype == torch.int32
    want = [r * 6 + c for r, row in enumerate(rows) for c, real in enumerate(row) if real]
    assert found.indices.tolist() == want


def test_masks_that_are_not_padding_are_refused():
    rows = [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    read = padding.padded_rows
    assert read(_mask(rows), 2, 6, True, 3) is None  # a window the mask does not have
    assert read(_mask(rows, window=3), 2, 6, True, None) is None  # and the other way
    assert read(_mask(rows, causal=False), 2, 6, True, None) is None
    dropped = _mask(rows)
    dropped[0, 0, 4, 2] = False  # a key dropped inside a row
    assert read(dropped, 2, 6, True, None) is None
    query_side = _mask(rows)
    query_side[0, 0, 5] = False  # a pad query masked too: not how transformers pads
    assert read(query_side, 2, 6, True, None) is None
    biased = _mask(rows, additive=True)
    biased[1, 0, 3, 2] = -1.0  # a finite bias on a kept key
    assert read(biased, 2, 6, True, None) is None
    assert read(_mask(rows)[:, :, :5, :5], 2, 6, True, None) is None  # not (B, 1, S, S)
    hole = read(_mask([[1, 1, 0, 1, 1, 0]]), 1, 6, True, None)
    assert "one span per row" in hole.problem
    assert read(_mask([[0, 0, 0]]), 1, 3, True, None).problem == "every token is padding"


def test_a_custom_mask_runs_eager_with_its_reason(device, request):
    launches = request.getfixturevalue("kernel_on_cpu")
    module = _gemma2_attention(1, device)
    q, k, v, _ = _inputs((2, 3, 1, 7, 24), device)
    mask = _mask([[1] * 7, [0, 1, 1, 1, 1, 1, 1]], additive=True).to(device)
    mask[0, 0, 5, 1] = torch.finfo(mask.dtype).min  # a key dropped inside a row
    kwargs = dict(scaling=module.scaling, softcap=module.attn_logit_softcapping)
    *_, path = attention.attend(module, q, k, v, mask, **kwargs)
    assert path == ("eager", attention.CUSTOM_MASK) and launches == []
    mask[0, 0, 5, 1] = 0.0  # in place: the same tensor, now padding
    *_, path = attention.attend(module, q, k, v, mask, **kwargs)
    assert path == (attention.FLASH_VARLEN, attention.PADDED) and launches == ["varlen"]


def test_answers_belong_to_their_mask():
    rows = [[1, 1, 1, 0], [0, 1, 1, 1]]
    for _ in range(10):
        mask = _mask(rows)
        assert padding.padded_rows(mask, 2, 4, True, None).indices.tolist() == [0, 1, 2, 5, 6, 7]
        del mask
        custom = _mask(rows)
        custom[0, 0, 2, 1] = False
        assert padding.padded_rows(custom, 2, 4, True, None) is None
        del custom
    gc.collect()
    assert len(padding._SEEN) == 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_chunked_masks_cut_each_row_at_the_chunk_bounds(side):
    """Llama 4's chunked layers: transformers' chunked causal mask with padding is read as each
    row's real tokens cut every chunk tokens from its first (as transformers counts the chunks
    under left padding), empty pieces kept so that the count never depends on the data; the
    same mask read without the chunk, or a plain causal mask with it, is not padding."""
    from transformers import Llama4TextConfig
    from transformers.masking_utils import create_chunked_causal_mask

    config = Llama4TextConfig(attention_chunk_size=4, num_hidden_layers=1)
    config._attn_implementation = "eager"
    lengths, seq = (10, 3, 0), 10
    real = torch.zeros(3, seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        real[row, seq - n :] = 1 if side == "left" else 0
        real[row, :n] = 1 if side == "right" else real[row, :n]
    embeds = torch.zeros(3, seq, 8)
    mask = create_chunked_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=real, past_key_values=None,
        position_ids=torch.arange(seq)[None],
    )  # fmt: skip
    found = padding.padded_rows(mask, 3, seq, causal=True, window=None, chunk=4)
    expected = [[4, 4, 2], [3, 0, 0], [0, 0, 0]]  # chunks of each row's real tokens
    cu = torch.tensor([0, *torch.tensor(expected).flatten().cumsum(0).tolist()], dtype=torch.int32)
    assert torch.equal(found.cu_seqlens, cu) and found.max_seqlen == 4 and not found.problem
    assert torch.equal(found.indices, real.flatten().nonzero().flatten())
    assert padding.padded_rows(mask, 3, seq, causal=True, window=None) is None
    plain = mask.clone()
    plain[...] = torch.where(
        keep_pattern(seq, True, None, "cpu") & (real[:, None, None, :] == 1), 0.0, mask.min()
    )
    assert padding.padded_rows(plain, 3, seq, causal=True, window=None, chunk=4) is None
