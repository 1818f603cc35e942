"""Gated DeltaNet linear-attention layers (Qwen3.5): the patched forward and which kernels run.

Per layer, with x (B, S, H) and padded positions zeroed first (as transformers does)::

    qkv, z, b, a = x·[W_qkv; W_z; W_b; W_a]ᵀ (+ LoRA)     one fused LoRA group (lora_group)
    qkv = silu(causal depthwise conv1d(qkv))              kernel linear_conv_kernel_dim
    q, k, v = split(qkv)                                  q, k (B, S, Hk, Dk); v (B, S, Hv, Dv)
    β = sigmoid(b),   g = −exp(A_log)·softplus(a + dt_bias)      (B, S, Hv), fp32
    o = gated delta rule(l2norm(q), l2norm(k), v, g, β)   chunked; recurrent for one cached token
    y = out_proj(RMSNorm(o)·silu(z))                      out_proj through lora_linear

Which ops mix the tokens (conv, delta rule, gated norm), decided per call (``LinearPath``):
- CPU tensors: transformers' own PyTorch functions, unwrapped from its kernel-hub decorators
  (the exact reference, whatever is installed);
- CUDA, flash-linear-attention installed, no earlier state in the cache (training, a prefill), no
  packing keywords left (see below): fla's Triton kernels (``causal_conv1d``,
  ``chunk_gated_delta_rule``, ``rms_norm_gated``), forward and backward; the cache, if any, still
  gets its states;
- fla refusing only its gated dqkwg backward (0.5.2 on Hopper with Triton 3.4 to 3.7.0, where
  that one kernel is miscompiled): the same fla kernels, the delta rule through
  ``chunk_gated_delta_rule_hopper`` (fastlm's dqkwg backward in place of fla's), said in
  ``fused_report``; decoding then takes transformers' PyTorch functions;
- fla installed but refusing this GPU otherwise (``fla_refusal``: it knows some GPU and Triton
  pairs to be wrong), or fastlm's Hopper delta rule failing its probe too: transformers' PyTorch
  functions, as on the CPU, and the reason in ``fused_report``;
- otherwise (no fla, decoding): the functions transformers picked for the model (its torch
  fallback, or fla / causal_conv1d where it found them).

Packed sequences in one row (training: no earlier state) restart the conv's left context and the
delta rule's state with each sequence, as when it runs alone. On fla's kernels that is one call
with the sequences' bounds (``cu_seqlens``, which fla's conv and chunked rule take, and the
Hopper rule passes on: ``PACKED_IN_ONE_CALL``); through transformers' functions, which have no
such argument, it is one call per sequence (``ONE_AT_A_TIME``); ``fused_report`` says which.
The bounds come from
the caller's cu_seq_lens keywords (position_ids become those: transformers' decoder layer hands
these layers no position_ids).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from fastlm.autograd import lora_group, lora_linear
from fastlm.kernels._dispatch import use_triton
from fastlm.kernels.gated_delta_rule import chunk_gated_delta_rule_hopper
from fastlm.models.fsdp import gather_linear
from fastlm.models.lora_layers import linear_weights
from fastlm.models.packing import Packing, packed_sequences
from fastlm.models.spec import LinearAttention
from fastlm.models.tensor_memo import remembered

FLA = "fla"  # LinearPath.implementation of flash-linear-attention's Triton kernels
REFERENCE = "torch-reference"  # transformers' PyTorch functions, unwrapped
TRANSFORMERS = "transformers"  # the functions transformers picked
NO_FLA = "flash-linear-attention is not installed (pip install 'fastlm[linear-attention]')"
HOPPER_NOTE = "fastlm's dqkwg backward (fla's is wrong on Hopper with Triton < 3.7.1)"
# The one fla kernel that chunk_gated_delta_rule_hopper replaces: a refusal naming it is curable.
_REPLACED_KERNEL = "chunk_bwd_dqkwg"


class LinearPath(NamedTuple):
    """What a linear-attention call ran: ``implementation`` and ``reason`` (why not fla, or how
    fla runs: ``HOPPER_NOTE``)."""

    implementation: str
    reason: str = ""


def has_fla() -> bool:
    """True when flash-linear-attention (the ``fla`` package) can be imported."""
    return importlib.util.find_spec("fla") is not None


_REFUSALS: dict[torch.device, str] = {}
_HOPPER_REFUSALS: dict[torch.device, str] = {}


def fla_refusal(device: torch.device) -> str:
    """Why fla's delta rule cannot train on ``device`` ("" when it can), found once per device
    by a tiny forward and backward. fla refuses some GPU and Triton pairs itself (0.5.2: Hopper
    with Triton 3.4 to 3.7.0, whose gated backward it knows to be wrong). The probe runs on a
    thread of its own: autograd's saved-tensor hooks (checkpointing's) and autocast are per
    thread, so the model's step never sees it.
    """
    return _probe_once(_REFUSALS, _probe_fla, device, "fla")


def hopper_rule_refusal(device: torch.device) -> str:
    """Why fastlm's ``chunk_gated_delta_rule_hopper`` cannot train on ``device`` ("" when it
    can), found once per device by the same probe as ``fla_refusal``'s."""
    return _probe_once(_HOPPER_REFUSALS, _probe_hopper_rule, device, "Hopper delta rule")


def _probe_once(results: dict, probe, device: torch.device, name: str) -> str:
    if device not in results:
        outcome: list[str] = []
        thread = threading.Thread(target=probe, args=(device, outcome))
        thread.start()
        thread.join()
        results[device] = outcome[0] if outcome else f"the {name} probe did not finish"
    return results[device]


def _probe_fla(device: torch.device, outcome: list) -> None:
    def rule():
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # lazy: optional (CUDA)

        return chunk_gated_delta_rule

    _probe(rule, device, outcome, "fla's delta rule")


def _probe_hopper_rule(device: torch.device, outcome: list) -> None:
    _probe(lambda: chunk_gated_delta_rule_hopper, device, outcome, "fastlm's Hopper delta rule")


def _probe(rule, device: torch.device, outcome: list, name: str) -> None:
    """A forward and backward of ``rule()`` on one tiny chunk: "" in ``outcome``, or the error."""
    try:
        chunk_gated_delta_rule = rule()
        torch.cuda.set_device(device)
        generator = torch.Generator(device).manual_seed(0)
        q, k, v = (
            torch.randn(1, 64, 1, 16, device=device, generator=generator, requires_grad=True)
            for _ in range(3)
        )
        g = -torch.rand(1, 64, 1, device=device, generator=generator)
        beta = torch.rand(1, 64, 1, device=device, generator=generator)
        out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        out.sum().backward()
        torch.cuda.synchronize(device)
        outcome.append("")
    except Exception as error:  # whatever fla raises: the reason, in its own words
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        outcome.append(f"{name} cannot train here: {message}")


def _uncured(refusal: str, device: torch.device) -> str:
    """fla's ``refusal`` of ``device``, "" where there is none or where it names only the kernel
    that fastlm's Hopper delta rule replaces and that rule trains here."""
    if _REPLACED_KERNEL not in refusal:
        return refusal
    failure = hopper_rule_refusal(device)
    return f"{refusal}; {failure}" if failure else ""


def expected_linear_path(module: nn.Module) -> LinearPath:
    """The path a linear-attention module will take as far as is known before a call.

    Usage: ``expected_linear_path(model.model.layers[0].linear_attn).implementation``.
    """
    return _choose(module.in_proj_z.weight, None, module.layer_idx, {})


def gated_deltanet_forward(
    self,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: torch.Tensor | None = None,
    *,
    linear: LinearAttention,
    paths: dict,
    **kwargs,
) -> torch.Tensor:
    """The patched forward of a Gated DeltaNet module (see the module docstring)."""
    modeling = sys.modules[type(self).__module__]
    x = modeling.apply_mask_to_padding_states(hidden_states, attention_mask)
    batch, seq, _ = x.shape
    mixed, z, b, a = _project_inputs(self, x, linear.input_projections)
    beta = b.sigmoid()  # (B, S, Hv)
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # fp32: A can overflow
    packing = _packing(kwargs, batch, seq, cache_params, self.layer_idx)
    if packing is not None:  # the mixing ops take the bounds their own way, below
        kwargs = {k: v for k, v in kwargs.items() if k not in _BOUND_KEYWORDS}
    path = _choose(x, None if packing else cache_params, self.layer_idx, kwargs)
    if packing is not None:
        packed = PACKED_IN_ONE_CALL if path.implementation == FLA else ONE_AT_A_TIME
        path = path._replace(reason="; ".join(filter(None, (path.reason, packed))))
    paths[self] = path
    mix = _fla_mix if path.implementation == FLA else _transformers_mix
    functions = _reference_functions(modeling) if path.implementation == REFERENCE else modeling
    if packing is None:
        core = mix(self, functions, mixed, z, g, beta, cache_params, kwargs)  # (B, S, Hv·Dv)
    elif path.implementation == FLA:  # fla's conv and rule restart at each sequence's start
        bounds = _long_bounds(packing.cu_seqlens)
        core = _fla_mix(self, functions, mixed, z, g, beta, None, kwargs, bounds)
    else:  # the conv's left context and the delta rule's state restart with each sequence
        bounds = list(packing.offsets) or packing.cu_seqlens.tolist()
        pieces = (slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a)
        core = torch.cat(
            [mix(self, functions, mixed[:, p], z[:, p], g[:, p], beta[:, p], None, dict(kwargs))
             for p in pieces], dim=1,
        )  # fmt: skip
    return _project(getattr(self, linear.output_projection), core.reshape(batch, seq, -1))


# Packed sequences: their bounds, as the caller's keywords give them (position_ids reach these
# layers as cu_seq_lens: patch._bounds_as_keywords).
_BOUND_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
ONE_AT_A_TIME = "packed sequences, one at a time (the cache, if any, gets no state)"
PACKED_IN_ONE_CALL = "packed sequences, in one call by their bounds (the cache gets no state)"


def _packing(kwargs: dict, batch: int, seq: int, cache, layer_idx: int) -> Packing | None:
    """The sequences packed in a one-row batch with no earlier state (a training step, even one
    that made a cache: the cache then gets no state from this layer, as several sequences leave
    no one state to continue), else None (then a packed batch keeps transformers' functions,
    which take its keywords)."""
    if batch != 1 or _earlier_state(cache, layer_idx):
        return None
    packing = packed_sequences(kwargs, batch, seq)
    return None if packing is None or packing.problem else packing


def _long_bounds(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The bounds as fla takes them (int64), one tensor for every layer of a forward: fla keeps
    what it derives from them (its chunk indices) for the same tensor object only."""
    if cu_seqlens.dtype == torch.long:  # itself: a table entry would keep its own key alive
        return cu_seqlens
    return remembered(_LONG_BOUNDS, cu_seqlens, (), lambda: cu_seqlens.to(torch.long))


_LONG_BOUNDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # cu_seqlens -> (version, (), int64)


# --------------------------------------------------------------------------- helpers


def _choose(tensor: torch.Tensor, cache, layer_idx: int, kwargs: dict) -> LinearPath:
    if not use_triton(tensor):
        return LinearPath(REFERENCE, f"{tensor.device.type} tensors (fla's kernels run on CUDA)")
    if not has_fla():
        return LinearPath(TRANSFORMERS, NO_FLA)
    cured = fla_refusal(tensor.device)  # "", or below, the one fastlm's Hopper delta rule cures
    uncured = _uncured(cured, tensor.device)
    if uncured:  # transformers would pick the same fla functions: its PyTorch ones instead
        return LinearPath(REFERENCE, uncured)
    other = _not_for_fla(cache, layer_idx, kwargs)
    if other and cured:  # transformers would pick fla's refusing functions, as above
        return LinearPath(REFERENCE, f"{other}; {cured}")
    if other:
        return LinearPath(TRANSFORMERS, other)
    return LinearPath(FLA, HOPPER_NOTE if cured else "")


def _not_for_fla(cache, layer_idx: int, kwargs: dict) -> str:
    """Why a call cannot take fastlm's fla path ("" when it can): fla's chunked rule here takes
    neither packed sequences nor an earlier state."""
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("seq_idx") is not None:
        return "packed sequences"
    if _earlier_state(cache, layer_idx):
        return "decoding with a cached state"
    return ""


def _earlier_state(cache, layer_idx: int) -> bool:
    """Whether the cache holds a state this call continues (decoding), not a fresh one."""
    return cache is not None and (
        cache.get_recurrent_state(layer_idx) is not None or cache.is_recording_past(layer_idx)
    )


def _project_inputs(self, x: torch.Tensor, names: tuple[str, ...]):
    """The input projections in one fused Function, else each through its own forward."""
    linears = [getattr(self, name) for name in names]
    for linear in linears:
        gather_linear(linear)  # FSDP2: read directly, so gathered first
    weights = [linear_weights(linear)[0] for linear in linears]
    if all(w is not None for w in weights):
        return lora_group(x, *weights)
    return tuple(linear(x) for linear in linears)


def _project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gather_linear(linear)
    weights = linear_weights(linear)[0]
    return lora_linear(x, weights) if weights is not None else linear(x)


class _Functions(NamedTuple):
    causal_conv1d_fn: object
    causal_conv1d_update: object
    torch_chunk_gated_delta_rule: object
    torch_recurrent_gated_delta_rule: object


@functools.cache
def _reference_functions(modeling) -> _Functions:
    """transformers' PyTorch functions of this modeling file, without the decorators that may
    swap in hub or fla kernels (which would not run on the CPU)."""
    return _Functions(*(inspect.unwrap(getattr(modeling, name)) for name in _Functions._fields))


def _split_heads(self, mixed: torch.Tensor, batch: int, seq: int):
    """(B, S, 2·key_dim + value_dim) -> q, k (B, S, Hk, Dk), v (B, S, Hv, Dv)."""
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    return (
        query.reshape(batch, seq, -1, self.head_k_dim),
        key.reshape(batch, seq, -1, self.head_k_dim),
        value.reshape(batch, seq, -1, self.head_v_dim),
    )


def _transformers_mix(self, functions, mixed, z, g, beta, cache, kwargs):
    """Conv, delta rule and gated norm through transformers' functions, with its cache calls."""
    batch, seq, _ = mixed.shape
    conv_state = recurrent_state = None
    if cache is not None:
        conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
        recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)
    mixed = mixed.transpose(1, 2)  # (B, D, S)
    weight = self.conv1d.weight.squeeze(1)  # (D, W)
    if conv_state is not None and seq == 1 and not cache.is_recording_past(self.layer_idx):
        mixed = functions.causal_conv1d_update(
            mixed, conv_state, weight, self.conv1d.bias, self.activation
        )
    else:
        if cache is not None:  # prepends the cached left context
            mixed = cache.update_conv_state(
                mixed, self.layer_idx, conv_kernel_size=self.conv_kernel_size
            )
        mixed = functions.causal_conv1d_fn(
            mixed, weight, self.conv1d.bias, activation=self.activation, **kwargs
        )
        if cache is not None:
            mixed = mixed[:, :, -seq:]
    query, key, value = _split_heads(self, mixed.transpose(1, 2), batch, seq)
    rule = functions.torch_chunk_gated_delta_rule
    if recurrent_state is not None and seq == 1:
        rule = functions.torch_recurrent_gated_delta_rule
    core, state = rule(
        query,
        key,
        value,
        g=g,
        beta=beta,
        initial_state=recurrent_state,
        output_final_state=cache is not None,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=kwargs.pop("cu_seq_lens_q", None),
        **kwargs,
    )
    if cache is not None:
        cache.update_recurrent_state(state, self.layer_idx)
    core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return core.reshape(batch, seq, -1)


def _fla_mix(self, functions, mixed, z, g, beta, cache, kwargs, cu_seqlens=None):
    """Conv, chunked delta rule and gated norm through flash-linear-attention's Triton kernels
    (no earlier state: training or a prefill); the cache, if any, gets its states. With
    ``cu_seqlens`` (a batch of one, no cache): the packed sequences' bounds, where the conv's
    left context and the rule's state restart."""
    from fla.modules.conv import causal_conv1d  # lazy: optional dependency (CUDA only)
    from fla.modules.fused_norm_gate import rms_norm_gated  # lazy: as above

    batch, seq, _ = mixed.shape
    if cache is not None:  # the conv's left context for the next call
        cache.update_conv_state(
            mixed.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_kernel_size
        )
    weight = self.conv1d.weight.squeeze(1)  # (D, W); fla takes x as (B, S, D)
    mixed, _ = causal_conv1d(
        mixed, weight, self.conv1d.bias, activation=self.activation, cu_seqlens=cu_seqlens
    )
    query, key, value = _split_heads(self, mixed, batch, seq)
    core, state = _fla_delta_rule(mixed.device)(
        query,
        key,
        value,
        g=g,
        beta=beta,
        output_final_state=cache is not None,
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu_seqlens,
    )
    if cache is not None:
        cache.update_recurrent_state(state, self.layer_idx)
    norm = self.norm
    core = rms_norm_gated(
        core, z.reshape_as(core), norm.weight, None, activation=norm.activation,
        eps=norm.variance_epsilon,
    )  # fmt: skip
    return core.reshape(batch, seq, -1)


def _fla_delta_rule(device: torch.device):
    """fla's chunked delta rule, or fastlm's Hopper one where fla refuses to train (``_choose``
    runs fla only where that refusal names just the kernel the Hopper one replaces)."""
    if fla_refusal(device):
        return chunk_gated_delta_rule_hopper
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # lazy: optional (CUDA only)

    return chunk_gated_delta_rule
