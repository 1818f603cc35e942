"""The attention a patched model runs (fastlm.models.attention): the hook computes Gemma 2's and
gpt-oss's (attention sinks) eager attention, through the flash kernel where that is exact and
through eager where it is not, and ``fused_report`` names what each attention module ran on its
latest call, and why not the kernel.

The Triton kernel runs in the interpreter on CPU tensors here (``kernel_on_cpu``).
"""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
from tiny_models import tiny_batch, tiny_config
from transformers import AutoModelForCausalLM

from fastlm.kernels import flash_attention as fa
from fastlm.models import attention, fused_report, patch_model, spec_for

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel vs eager


def _inputs(shape, device, q_gain=1.5, seed=0):
    b, hq, hkv, s, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64) * q_gain
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64)
    return [t.to(device, torch.float32) for t in (q, k, v, g)]


def _gemma2_attention(layer_idx, device):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention

    config = tiny_config("gemma2")  # 3 q heads / 1 kv head, head_dim 24, window 4, softcap 2
    config._attn_implementation = "eager"
    return Gemma2Attention(config, layer_idx).to(device).train()


def _eager_mask(lengths, seq, window, device, dtype=torch.float32, left=False):
    """transformers' eager mask (B, 1, S, S): 0 kept, dtype-min dropped (causal/window/padding)."""
    keep = fa.keep_pattern(seq, True, window, device)[None, None]
    keep = keep & _real(lengths, seq, device, left)[:, None, None, :]
    zero = torch.zeros(keep.shape, dtype=dtype, device=device)
    return zero.masked_fill(~keep, torch.finfo(dtype).min)


def _real(lengths, seq, device, left=False) -> torch.Tensor:
    """(B, S) bool: the real (not pad) tokens of rows of ``lengths``, padded right or left."""
    real = torch.arange(seq, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return real.flip(-1) if left else real


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "full"])
@pytest.mark.parametrize("padding", [None, "right", "left"], ids=["plain", "right", "left"])
def test_hook_matches_gemma2_eager(layer_idx, padding, device, kernel_on_cpu):
    """Every real query's output and every gradient as eager's. Pad queries: zeros (eager's are
    an artefact no real token reads), and no upstream gradient, as in a model's loss."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = _gemma2_attention(layer_idx, device)
    batch, seq = 2, 19
    q, k, v, g = _inputs((batch, 3, 1, seq, 24), device, q_gain=3.0)
    # (B, S, H, D) storage viewed as (B, H, S, D), as the attention modules produce them.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    lengths = [seq, seq - 5] if padding else [seq, seq]
    mask = _eager_mask(lengths, seq, module.sliding_window, device, left=padding == "left")
    real = _real(lengths, seq, device, left=padding == "left")  # (B, S)
    g = g * real[:, None, :, None]
    kwargs = dict(dropout=0.0, scaling=module.scaling, sliding_window=module.sliding_window,
                  softcap=module.attn_logit_softcapping)  # fmt: skip
    results = []
    for fn in (eager_attention_forward, attention.fastlm_attention_forward):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, weights = fn(module, *leaves, mask, **kwargs)
        assert out.shape == (batch, seq, 3, 24)
        results.append((out, torch.autograd.grad(out, leaves, g.transpose(1, 2))))
    assert kernel_on_cpu == (["varlen"] if padding else [1])  # padding: the padded launch
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got[real], want[real], **TOL)
    assert not got[~real].any()
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL)


def _gpt_oss_attention(layer_idx, device):
    pytest.importorskip("transformers.models.gpt_oss")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    config = tiny_config("gpt_oss")  # 4 q heads / 2 kv heads, head_dim 12, window 4
    config._attn_implementation = "eager"
    module = GptOssAttention(config, layer_idx).to(device).train()
    with torch.no_grad():  # sinks ~N(0, 1.5) (initialised near 0), one large
        module.sinks.copy_(torch.tensor([0.5, -2.0, 1.5, 4.0]))
    return module


def _packed_mask(lengths, seq, window, device, dtype=torch.float32):
    """Eager's (B, 1, S, S) mask for rows packing sequences of ``lengths`` (per row, summing to S):
    causal (+ window) inside each sequence, nothing across; and the position_ids that restart
    at each sequence (the packing signal of several rows)."""
    ids = torch.tensor(
        [i for row in lengths for i, n in enumerate(row) for _ in range(n)], device=device
    ).view(len(lengths), 1, seq)
    keep = fa.keep_pattern(seq, True, window, device) & (ids[..., :, None] == ids[..., None, :])
    zero = torch.zeros(keep.shape, dtype=dtype, device=device)
    positions = [list(range(n)) for row in lengths for n in row]
    position_ids = torch.tensor(list(itertools.chain(*positions)), device=device)
    return zero.masked_fill(~keep, torch.finfo(dtype).min), {
        "position_ids": position_ids.view(len(lengths), seq)
    }


@pytest.mark.parametrize("layer_idx", [0, 1], ids=["sliding", "full"])
@pytest.mark.parametrize("batching", [None, "right", "left", "packed"])
def test_hook_matches_gpt_oss_eager_with_sinks(layer_idx, batching, device, kernel_on_cpu):
    """gpt-oss's attention sinks through the kernel's fixed-length, padded and packed launches:
    every real query's output, dq, dk, dv and the sinks' gradient as gpt-oss's eager attention
    (which reads ``module.sinks``; the hook reads ``s_aux``)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    module = _gpt_oss_attention(layer_idx, device)
    batch, seq, window = 2, 19, module.sliding_window
    q, k, v, g = _inputs((batch, 4, 2, seq, 12), device, q_gain=3.0)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    lengths = [seq, seq - 5] if batching in ("right", "left") else [seq, seq]
    real = _real(lengths, seq, device, left=batching == "left")  # (B, S)
    packed = {}
    if batching == "packed":
        mask, packed = _packed_mask([[7, 12], [5, 1, 13]], seq, window, device)
    else:
        mask = _eager_mask(lengths, seq, window, device, left=batching == "left")
    g = g * real[:, None, :, None]
    kwargs = dict(dropout=0.0, scaling=module.scaling, sliding_window=window, s_aux=module.sinks,
                  **packed)  # fmt: skip
    results = []
    for fn in (eager_attention_forward, attention.fastlm_attention_forward):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = fn(module, *leaves, mask, **kwargs)
        assert out.shape == (batch, seq, 4, 12)
        grads = torch.autograd.grad(out, [*leaves, module.sinks], g.transpose(1, 2))
        results.append((out, grads))
    assert kernel_on_cpu == ([1] if batching is None else ["varlen"])
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got[real], want[real], **TOL)
    assert not got[~real].any()
    assert want_grads[3].abs().min() > 1e-3  # every head's sink gets a gradient
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_report_says_sinks_run_the_kernel(device, kernel_on_cpu):
    """A patched gpt-oss: no reason against the kernel before a call, the padded launch on a
    padded batch."""
    pytest.importorskip("transformers.models.gpt_oss")
    model = _patched("gpt_oss", device, "eager").eval()
    layers = model.config.num_hidden_layers
    assert _attention_rows(model) == [(attention.FLASH, "not called yet", False)] * layers
    with torch.no_grad():
        model(**{k: t.to(device) for k, t in tiny_batch(batch=2, seq=13).items()})
    assert _attention_rows(model) == [(attention.FLASH_VARLEN, attention.PADDED, True)] * layers
    assert kernel_on_cpu == ["varlen"] * layers


def test_mask_check_rejects_non_causal_patterns(device):
    seq, window = 11, 4
    plain = _eager_mask([seq], seq, window, device)
    assert attention._mask_is_plain(plain, seq, True, window)
    assert attention._mask_is_plain(plain.isfinite() & (plain == 0), seq, True, window)  # bool
    assert not attention._mask_is_plain(plain, seq, True, None)  # a window the kernel would skip
    padded = _eager_mask([seq - 1], seq, window, device)
    assert not attention._mask_is_plain(padded, seq, True, window)
    biased = plain.clone()
    biased[0, 0, 5, 3] = -1.0  # a finite bias where eager keeps a key: not a pure mask
    assert not attention._mask_is_plain(biased, seq, True, window)
    plain.add_(0.0)  # in-place change: the cached verdict must be re-checked
    plain[0, 0, 0, 0] = torch.finfo(plain.dtype).min
    assert not attention._mask_is_plain(plain, seq, True, window)


def test_mask_verdicts_belong_to_their_tensor(device):
    # A new mask (often at a freed mask's address) never reads an old mask's verdict, and the
    # verdicts go with their masks.
    seq, window = 9, 3
    for _ in range(20):
        plain = _eager_mask([seq], seq, window, device)
        assert attention._mask_is_plain(plain, seq, True, window)
        del plain
        padded = _eager_mask([seq - 2], seq, window, device)
        assert not attention._mask_is_plain(padded, seq, True, window)
        del padded
    gc.collect()
    assert len(attention._PLAIN_MASKS) == 0


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_tiny_gemma2_model_registered(padded, device, kernel_on_cpu):
    """The whole model through ``register_fastlm_attention``: loss and every gradient as eager's."""
    torch.manual_seed(0)
    config = tiny_config("gemma2")
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).to(device)
    batch = {k: t.to(device) for k, t in tiny_batch(batch=2, seq=13).items()}
    if not padded:
        batch["attention_mask"].fill_(1)
        batch["labels"] = batch["input_ids"]
    results = []
    for impl in ("eager", attention.register_fastlm_attention()):
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    assert kernel_on_cpu == ["varlen" if padded else 1] * config.num_hidden_layers
    (want_loss, want), (got_loss, got) = results
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)


# --- fused_report: what each attention module ran --------------------------------------------


def _patched(model_type, device, implementation, **overrides):
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    config._attn_implementation = implementation
    model = AutoModelForCausalLM.from_config(config).to(device)
    return patch_model(model, spec_for(model.config), max_seq_length=64)


def _attention_rows(model) -> list[tuple[str, str, bool]]:
    report = fused_report(model)
    # The list itself holds the projection / head rows only, as before.
    assert report and all(set(row) == {"module", "fused", "lora", "reason"} for row in report)
    assert len(report.attention) == model.config.num_hidden_layers
    return [(row["attention"], row["reason"], row["called"]) for row in report.attention]


def test_report_names_the_attention_each_call_ran(device, kernel_on_cpu):
    model = _patched("gemma2", device, "eager").eval()
    layers = model.config.num_hidden_layers
    assert _attention_rows(model) == [(attention.FLASH, "not called yet", False)] * layers
    batch = {k: t.to(device) for k, t in tiny_batch(batch=2, seq=13).items()}
    with torch.no_grad():
        model(**batch)
        padded = (attention.FLASH_VARLEN, attention.PADDED, True)
        assert _attention_rows(model) == [padded] * layers
        out = model(input_ids=batch["input_ids"], use_cache=True)
        assert _attention_rows(model) == [(attention.FLASH, "", True)] * layers
        model(input_ids=batch["input_ids"][:, -1:], past_key_values=out.past_key_values)
        assert _attention_rows(model) == [("eager", "decoding with KV cache", True)] * layers


def test_report_names_dropout_and_the_models_own_attention(device, kernel_on_cpu):
    model = _patched("gemma2", device, "eager", attention_dropout=0.1).train()
    dropout = ("eager", "attention dropout in training")
    expected = ("eager", "not called yet; attention dropout in training", False)
    assert {row for row in _attention_rows(model)} == {expected}
    model(**{k: t.to(device) for k, t in tiny_batch(batch=2, seq=13).items()})
    assert {row for row in _attention_rows(model)} == {(*dropout, True)}
    model = _patched("llama", device, "sdpa")
    batch = {k: t.to(device) for k, t in tiny_batch(batch=2, seq=13).items()}
    model(input_ids=batch["input_ids"])  # no padding (a padded batch: tests/models/test_padding.py)
    reason = 'the model\'s attn_implementation="sdpa"'
    assert {row for row in _attention_rows(model)} == {("sdpa", reason, True)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU reason")
def test_report_names_the_cpu():
    model = _patched("gemma2", "cpu", "eager")
    batch = tiny_batch(batch=2, seq=13)
    batch["attention_mask"].fill_(1)
    model(**batch)
    reason = "cpu tensors (the kernel runs on CUDA)"
    assert {row for row in _attention_rows(model)} == {("eager", reason, True)}
