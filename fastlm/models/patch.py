"""The shared decoder path: patches one loaded model *instance* according to its spec.

Every patched module gets an instance-level ``forward`` (the class and every other model in the
process are untouched), the set of patched modules is recorded on the model, and
``unpatch_model`` removes them again. Parameters and state-dict keys never change, so adapters
save and load in plain PEFT.

What runs where:
- RMSNorm modules  → ``fastlm.kernels.rms_norm`` (fp32 inside, Llama or Gemma offset).
- attention        → fused LoRA QKV (q alone on a layer that reuses another layer's K/V,
                     ``kv_sharing.py``; q and k on a k = v layer; q also yields the output gate
                     where ``attention_output_gate``), q/k/v norm, the RoPE kernel (on the
                     rotary part of each head where the rotary tables are narrower, partial
                     RoPE; on heads reordered even-then-odd for Llama 4's interleaved pairs;
                     none on a NoPE layer, which may scale q by the attention temperature
                     instead; a weightless q/k norm after it where the spec says), then
                     ``attention.attend``: where the model runs eager attention,
                     fastlm's flash-attention kernel (Llama 4's chunked layers past one
                     chunk through its packed launch over the chunks; eager again for custom
                     masks, dropout, decoding...),
                     else the model's own SDPA / flash / flex
                     function; the sinks, where the spec names them, go along as ``s_aux``; ×
                     sigmoid of the gate, if any; then fused LoRA O. The latest call's choice is
                     recorded. A spec with ``transformers_attention`` (Mistral 4's MLA) leaves
                     its attention modules to transformers' forward, their linear layers
                     run as fused LoRA Functions during it (reported).
- linear attention → (``spec.linear_attention``, Gated DeltaNet) ``linear_attention.py``: the input
                     projections as one fused LoRA group, conv + gated delta rule + gated norm
                     through fla's kernels on CUDA or transformers' functions, fused LoRA out_proj.
- MLP              → one fused LoRA gate/up/down autograd Function with the gated activation.
- MoE block        → (``spec.moe``) ``moe.py``: fastlm's router forward from the spec's facts, the
                     experts (LoRA through PEFT's target_parameters) as grouped GEMMs over the
                     tokens sorted by expert; the load-balancing loss added to the fused loss.
                     A layer that calls its experts itself (Gemma 4's, ``moe.patched``
                     "experts") keeps its own forward and router; its experts call runs grouped.
- causal-LM head   → in training with labels: the fused linear cross-entropy (no full logits);
                     otherwise the model's own forward (generation and evaluation see logits).
- a 4-bit Linear4bit that runs unfused (LoRA dropout, DoRA, ...) → on the CPU, fastlm's NF4
                     dequantisation and matmul (``nf4_linear.py``); on CUDA bitsandbytes' forward.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from fastlm.autograd import lora_linear, lora_mlp, lora_qkv
from fastlm.errors import SequenceTooLongError
from fastlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastlm.kernels.geglu import geglu
from fastlm.kernels.rms_norm import rms_norm
from fastlm.kernels.rope import apply_rope
from fastlm.kernels.swiglu import swiglu
from fastlm.models.attention import (
    CHUNK_KWARG,
    CUSTOM_MASK,
    AttentionPath,
    attend,
    expected_path,
)
from fastlm.models.finite_guard import FiniteGuard, FiniteLossMonitor, install_finite_guard
from fastlm.models.fsdp import gather_linear, is_plain_linear, unshard_for_direct_read
from fastlm.models.kv_sharing import reuse_kv, store_kv
from fastlm.models.linear_attention import expected_linear_path, gated_deltanet_forward
from fastlm.models.lora_layers import linear_weights
from fastlm.models.moe import (
    AuxLossGradient,
    aux_loss_settings,
    experts_forward,
    load_balancing_loss,
    moe_block_forward,
    moe_report_rows,
    record_loss_scale,
    router_forward,
)
from fastlm.models.nf4_linear import is_bnb_linear4bit, nf4_linear_forward
from fastlm.models.packing import (
    as_keywords,
    caller_signals,
    packed_sequences,
    positions_in_sequences,
)
from fastlm.models.spec import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, ArchitectureSpec

_GATED_ACTIVATIONS = {"swiglu": swiglu, "geglu": geglu}
_STATE_ATTR = "_fastlm_patch_state"


@dataclass
class PatchState:
    """What fastlm changed on a model, so that it can be reported and undone."""

    spec: ArchitectureSpec
    max_seq_length: int
    check_finite_loss: bool = True
    patched: list[nn.Module] = field(default_factory=list)
    loss_monitor: FiniteLossMonitor = field(default_factory=lambda: FiniteLossMonitor())
    finite_guard: FiniteGuard | None = None  # NaN/inf loss, gradient and save checks
    # attention module -> what its latest call ran (fused_report lists it)
    attention_paths: dict[nn.Module, AttentionPath] = field(default_factory=dict)
    # MoE: the load-balancing loss's gradient, filled per fused-loss step (moe.py)
    moe_aux: AuxLossGradient = field(default_factory=AuxLossGradient)
    # MoE blocks that call their experts themselves: the modules whose forward is the grouped
    # experts call (``_experts_call_forward``)
    grouped_experts_calls: weakref.WeakSet = field(default_factory=weakref.WeakSet)


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or the model inside a PEFT wrapper) carries fastlm patches."""
    return _find_state(model) is not None


def patch_model(
    model: nn.Module, spec: ArchitectureSpec, max_seq_length: int, check_finite_loss: bool = True
) -> nn.Module:
    """Patch a loaded ``*ForCausalLM`` (or base ``*Model``, e.g. for embeddings) in place.

    Usage: ``patch_model(model, spec_for(model.config), max_seq_length=2048)``.
    """
    if is_patched(model):
        return model
    state = PatchState(spec, max_seq_length, check_finite_loss)
    for module in model.modules():
        name = type(module).__name__
        if name == spec.norm_class:
            _set_forward(state, module, _norm_forward, offset=spec.norm_offset)
        elif name == spec.attention_class:
            if spec.transformers_attention:  # e.g. Mistral 4's MLA: its own forward...
                original = type(module).forward  # ... with its linear layers run fused
                linears = tuple(child for child, _ in _linear_children(module))
                _set_forward(
                    state, module, _own_attention_forward, original=original, linears=linears
                )
                continue
            _set_forward(state, module, _attention_forward, spec=spec, paths=state.attention_paths)
        elif name == spec.mlp_class:
            _set_forward(state, module, _mlp_forward, activation=spec.activation)
        elif spec.linear_attention and name == spec.linear_attention.module_class:
            _set_forward(
                state,
                module,
                gated_deltanet_forward,
                linear=spec.linear_attention,
                paths=state.attention_paths,
            )
        elif spec.moe and name == spec.moe.block_class:
            if getattr(module, spec.moe.experts_attr, None) is None:
                continue  # not a MoE block (Gemma 4's layers without enable_moe_block)
            if spec.moe.patched == "experts":
                _set_forward(state, module, _experts_call_forward, patch=state)
                continue
            _set_forward(
                state,
                module,
                moe_block_forward,
                moe=spec.moe,
                activation=spec.activation,
                aux=state.moe_aux,
            )
        elif spec.moe and spec.moe.patched == "block" and name == spec.moe.router_class:
            _set_forward(state, module, router_forward, moe=spec.moe)
        elif is_bnb_linear4bit(module):  # runs only when not fused: see nf4_linear.py
            _set_forward(state, module, nf4_linear_forward)
    _set_causal_lm_forward(state, model)
    if check_finite_loss:  # on the model, not in the loss: TRL's SFTTrainer computes its own
        state.finite_guard = install_finite_guard(model, state.loss_monitor)
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: every module gets its class forward back."""
    target = _find_owner(model)
    if target is None:
        return model
    state = target.__dict__.pop(_STATE_ATTR)
    for module in state.patched:
        module.__dict__.pop("forward", None)
    if state.finite_guard is not None:
        state.finite_guard.remove()
    return model


def patch_state(model: nn.Module) -> PatchState | None:
    """The PatchState of a patched model (PEFT-wrapped or not), else None."""
    return _find_state(model)


class FusedReport(list):
    """``fused_report``'s answer. As a list, one row per projection and the LM head: ``module``,
    ``fused``, ``lora``, ``reason`` (why not fused); a projection the layer does not have (no v_proj
    on a k = v layer, no k/v_proj on a KV-sharing one) has no row; the linears a spec leaves to
    transformers (``transformers_linears``) have unfused rows. ``attention``: one row per
    attention module: ``module``, ``attention`` (what runs: "fastlm-flash", "eager", "sdpa"...;
    for a linear-attention module "fla", "torch-reference" or "transformers"), ``reason`` (why
    not fastlm's flash kernel, or fla's), ``called`` (False: no call yet, the row is what is
    expected), ``kv`` (where its K and V come from)."""

    def __init__(self, rows: list[dict], attention: list[dict]):
        super().__init__(rows)
        self.attention = attention

    def __repr__(self) -> str:
        return f"FusedReport({list.__repr__(self)}, attention={self.attention!r})"


def fused_report(model: nn.Module) -> FusedReport:
    """Which projections / head run fused and, per attention module, which attention its latest
    call ran, each with the reason when not fastlm's fast path.

    Usage: ``report = fused_report(model); for row in [*report, *report.attention]: print(row)``.
    """
    state = _find_state(model)
    if state is None:
        return FusedReport([], [])
    rows, attention = [], []
    linear = state.spec.linear_attention
    unpatched = dict(state.spec.transformers_linears)
    for name, module in model.named_modules():
        cls = type(module).__name__
        latest = state.attention_paths.get(module)
        if name.rsplit(".", 1)[-1] in unpatched:  # a linear the spec leaves to transformers
            reason = unpatched[name.rsplit(".", 1)[-1]]
            rows.append(
                {"module": name, "fused": False, "lora": _has_lora(module), "reason": reason}
            )
            continue
        if cls == state.spec.attention_class and state.spec.transformers_attention:
            rows.extend(_transformers_attention_rows(name, module, state.spec))
            attention.append(_transformers_attention_row(name, module, state.spec))
            continue
        if cls == state.spec.attention_class:
            projections = ATTENTION_PROJECTIONS
            sinks = state.spec.attention_sinks_attr is not None
            expected = expected_path(module, sinks=sinks)
            chunk = _chunk_size(module, state.spec)
            if chunk is not None:
                note = (
                    f"{_chunk_label(state.spec, chunk)}: past one chunk, the flash kernel's "
                    "packed launch over the chunks where the kernel runs"
                )
                expected = expected._replace(
                    reason="; ".join(filter(None, [expected.reason, note]))
                )
            row = _attention_row(name, latest, expected)
            attention.append({**row, "kv": _kv_source(module, state.spec)})
        elif linear is not None and cls == linear.module_class:
            projections = (*linear.input_projections, linear.output_projection)
            row = _attention_row(name, latest, expected_linear_path(module))
            kv = "none: linear attention (causal conv + gated delta rule state)"
            attention.append({**row, "kv": kv})
        elif cls == state.spec.mlp_class:
            projections = MLP_PROJECTIONS
        elif state.spec.moe is not None and cls == state.spec.moe.block_class:
            if getattr(module, state.spec.moe.experts_attr, None) is not None:  # a MoE block
                rows.extend(moe_report_rows(name, module, state.spec.moe))
            continue
        else:
            continue
        for projection in projections:
            if getattr(module, projection, None) is None:  # k = v or KV-sharing layer: none
                continue
            weights, reason = linear_weights(getattr(module, projection))
            rows.append(
                {
                    "module": f"{name}.{projection}",
                    "fused": weights is not None,
                    "lora": weights is not None and weights.lora_A is not None,
                    "reason": reason,
                }
            )
    owner = _find_owner(model)
    head = owner.get_output_embeddings()
    if head is not None:  # None: a base model (no LM head), e.g. an embedding model's body
        head_ok = is_plain_linear(head)
        rows.append(
            {
                "module": "lm_head (cross-entropy)",
                "fused": head_ok,
                "lora": False,
                "reason": "" if head_ok else f"{type(head).__name__} is not a plain nn.Linear",
            }
        )
    return FusedReport(rows, attention)


def _transformers_attention_rows(name: str, module: nn.Module, spec: ArchitectureSpec) -> list:
    """Rows for the linears of an attention module that runs transformers' forward
    (``spec.transformers_attention``): fused where ``linear_weights`` allows, as elsewhere."""
    rows = []
    for child_name, child in _linear_children(module):
        weights, reason = linear_weights(child)
        rows.append(
            {
                "module": f"{name}.{child_name}",
                "fused": weights is not None,
                "lora": weights is not None and weights.lora_A is not None,
                "reason": reason,
            }
        )
    return rows


def _transformers_attention_row(name: str, module: nn.Module, spec: ArchitectureSpec) -> dict:
    """The ``FusedReport.attention`` row of such a module: its own forward on every call, with
    the model's attn_implementation inside it."""
    implementation = module.config._attn_implementation or "eager"
    reason = (
        f"transformers' {type(module).__name__} forward on every call "
        f'(attn_implementation="{implementation}"): {spec.transformers_attention}'
    )
    kv = "transformers' forward (its own projections and cache)"
    return {"module": name, "attention": implementation, "reason": reason, "called": False,
            "kv": kv}  # fmt: skip


def _has_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer with an adapter (its ``lora_A`` holds one module per adapter)."""
    return len(getattr(module, "lora_A", ())) > 0


def _attention_row(name: str, latest, expected) -> dict:
    """A ``FusedReport.attention`` row: the latest call's path, else the expected one."""
    if latest is not None:
        path, reason, called = latest, latest.reason, True
    else:
        path, called = expected, False
        reason = "not called yet" + (f"; {path.reason}" if path.reason else "")
    return {"module": name, "attention": path.implementation, "reason": reason, "called": called}


def _kv_source(module: nn.Module, spec: ArchitectureSpec) -> str:
    """Where an attention module's K and V come from (``FusedReport.attention``'s ``kv``)."""
    sharing = spec.kv_sharing
    if sharing is not None and getattr(module, sharing.reuse_attr, False):
        slot = getattr(module, sharing.key_attr)
        return f"reused: the {slot} K/V an earlier layer stored (no k_proj, v_proj)"
    if spec.key_is_value_attr and getattr(module, spec.key_is_value_attr, False):
        return "k_proj; v is k_proj's output (no v_proj)"
    return "k_proj, v_proj"


# --------------------------------------------------------------------------- helpers


def _find_owner(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if _STATE_ATTR in module.__dict__:  # not hasattr: PEFT wrappers forward attributes
            return module
    return None


def _find_state(model: nn.Module) -> PatchState | None:
    owner = _find_owner(model)
    return None if owner is None else getattr(owner, _STATE_ATTR)


def _set_forward(state: PatchState, module: nn.Module, function, **options) -> None:
    bound = functools.partial(function, **options) if options else function
    module.forward = types.MethodType(bound, module)
    state.patched.append(module)


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return norm.eps if eps is None else eps


# --------------------------------------------------------------------------- forwards


def _norm_forward(self, hidden_states: torch.Tensor, *, offset: float) -> torch.Tensor:
    weight = getattr(self, "weight", None)
    if weight is None:  # a norm without a scale (Gemma 4's v norm): y = x̂ = x̂·(0 + 1)
        weight, offset = hidden_states.new_ones(hidden_states.shape[-1]), 0.0
    return rms_norm(hidden_states, weight, _eps(self), offset)


def _fused_weights(linear: nn.Module):
    """``linear_weights`` for the fused path. Under FSDP2 a projection that is a unit of its own
    is gathered first: fastlm reads its weights without calling its forward (FSDP's hook)."""
    gather_linear(linear)
    return linear_weights(linear)[0]


def _project_qkv(self, x: torch.Tensor):
    q = _fused_weights(self.q_proj)
    k = _fused_weights(self.k_proj)
    v = _fused_weights(self.v_proj)
    if q is not None and k is not None and v is not None:
        return lora_qkv(x, q, k, v)
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weights = _fused_weights(linear)
    return lora_linear(x, weights) if weights is not None else linear(x)


def _linear_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A module's linear layers (plain, 4-bit or PEFT LoRA): its children with a 2-D weight."""
    return [
        (name, child)
        for name, child in module.named_children()
        if getattr(getattr(child, "weight", None), "ndim", 0) == 2
    ]


def _own_attention_forward(self, *args, original, linears: tuple[str, ...], **kwargs):
    """An attention module's own (transformers') forward -- ``spec.transformers_attention``, e.g.
    Mistral 4's latent attention -- with each of its linear layers (``linears``: their names,
    which PEFT keeps when it wraps them) that fastlm can fuse run as one LoRA Function
    (``lora_linear``: a 4-bit weight dequantised inside it) for this call: the layer's forward
    is set on the instance while the call runs, then taken off again."""
    swapped = []
    try:
        for name in linears:
            child = getattr(self, name)
            weights = _fused_weights(child)
            if weights is not None:
                swapped.append((child, child.__dict__.get("forward")))
                child.forward = functools.partial(lora_linear, w=weights)
        return original(self, *args, **kwargs)
    finally:
        for child, before in swapped:
            if before is None:
                del child.forward
            else:
                child.forward = before


def _project_attention(self, x: torch.Tensor, spec: ArchitectureSpec, reuses_kv: bool):
    """(q, k, v): the three in one Function; q alone (k, v None) on a layer that reuses stored
    K/V; q and k on a k = v layer, whose v is k's output (its gradient adds to k's)."""
    if reuses_kv:
        return _project(self.q_proj, x), None, None
    if spec.key_is_value_attr and getattr(self, spec.key_is_value_attr):
        key = _project(self.k_proj, x)
        return _project(self.q_proj, x), key, key
    return _project_qkv(self, x)


def _rope(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on q, k (B, S, H, D). Where cos/sin cover fewer dims than a head (partial rotary,
    Qwen3.5: a quarter), the first cos.shape[-1] dims of each head rotate and the rest pass
    through, as transformers' apply_rotary_pos_emb does."""
    rotary = cos.shape[-1]
    if rotary == query.shape[-1]:
        return apply_rope(query, key, cos, sin)
    q_rot, k_rot = apply_rope(query[..., :rotary], key[..., :rotary], cos, sin)
    return torch.cat([q_rot, query[..., rotary:]], -1), torch.cat([k_rot, key[..., rotary:]], -1)


def _rope_tables(position_embeddings, spec: ArchitectureSpec):
    """(cos, sin) (B, S, D) in the rotate_half layout from what the model passes: (cos, sin);
    D/2-wide ones (gpt-oss); or Llama 4's complex freqs_cis (B, S, D/2), whose real and
    imaginary parts are cos and sin (× its RoPE's attention scaling, as the products need)."""
    if spec.rope_interleaved:
        cos, sin = position_embeddings.real, position_embeddings.imag  # (B, S, D/2)
    else:
        cos, sin = position_embeddings
    if spec.rope_half_tables or spec.rope_interleaved:  # one entry per pair: to D wide
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return cos, sin


def _even_then_odd(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) with each head's dims reordered 0, 2, 4, ..., 1, 3, 5, ...: the interleaved
    RoPE pairs (2i, 2i + 1) become the rotate_half pairs (i, i + D/2)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _positional(self, query, key, cos, sin, spec: ArchitectureSpec, past_key_values, kwargs):
    """q, k (B, S, H, D) after what encodes positions on this layer: RoPE (the interleaved pairs
    through ``_even_then_odd``, which q·k does not see) and a weightless norm after it, or, on a
    layer without RoPE, the attention temperature (``spec.attention_temperature``)."""
    if spec.rope_layer_attr is None or getattr(self, spec.rope_layer_attr):
        if spec.rope_interleaved:
            query, key = _even_then_odd(query), _even_then_odd(key)
        query, key = _rope(query, key, cos, sin)
        attr = spec.qk_norm_after_rope_attr
        norm = getattr(self, attr, None) if attr else None
        if norm is not None:  # the norm is over the whole head: the order of its dims is moot
            ones = query.new_ones(query.shape[-1])
            query, key = rms_norm(query, ones, _eps(norm)), rms_norm(key, ones, _eps(norm))
    elif spec.attention_temperature is not None:
        query = _temperature(self, query, spec.attention_temperature, past_key_values, kwargs)
    return query, key


def _temperature(self, query: torch.Tensor, temperature, past_key_values, kwargs) -> torch.Tensor:
    """q (B, S, H, D) × 1 + attn_scale · log1p(floor((t + 1) / floor_scale)) per position t
    (``AttentionTemperature``), in transformers' order of operations, so fp32 is bit-equal.
    In a packed batch t counts from each sequence's first token, as when it runs alone
    (transformers counts along the row)."""
    if not getattr(self, temperature.enabled_attr):
        return query
    batch, seq = query.shape[:2]
    seen = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
    positions = (torch.arange(seq, device=query.device) + seen).expand(batch, seq)  # (B, S)
    packing = packed_sequences(kwargs, batch, seq) if seen == 0 else None
    if packing is not None and not packing.problem:
        positions = positions_in_sequences(packing, batch * seq).view(batch, seq)
    floor_scale = getattr(self, temperature.floor_scale_attr)
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale))
    scales = scales * getattr(self, temperature.scale_attr) + 1.0
    return (query * scales.view(batch, seq, 1, 1)).to(query.dtype)


def _rope_query(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on q alone (its K comes rotated from another layer). The op rotates q and k together:
    k is q's first head here and its rotation is dropped (so its gradient is zero)."""
    return _rope(query, query[:, :, :1], cos, sin)[0]


def _attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    *,
    spec: ArchitectureSpec,
    paths: dict[nn.Module, AttentionPath],
    **kwargs,
):
    batch, seq = hidden_states.shape[:-1]
    # KV sharing (spec.kv_sharing): the model's dict of stored K/V, and this layer's role in it.
    sharing = spec.kv_sharing
    stored = kwargs.pop(sharing.states_kwarg, None) if sharing else None
    reuses_kv = sharing is not None and getattr(self, sharing.reuse_attr)
    query, key, value = _project_attention(self, hidden_states, spec, reuses_kv)
    gate = None
    if spec.attention_output_gate:  # per head [query | gate]: (B, S, Hq, 2D)
        query, gate = query.view(batch, seq, -1, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(batch, seq, -1)  # (B, S, Hq·D)
    query = query.reshape(batch, seq, -1, self.head_dim)  # (B, S, Hq, D)
    if spec.qk_norm:
        query = self.q_norm(query)
    cos, sin = _rope_tables(position_embeddings, spec)
    if reuses_kv:  # K, V (B, Hk, S, D) as the storing layer left them: rotated, cache-updated
        query = _rope_query(query, cos, sin).transpose(1, 2)
        key, value = reuse_kv(stored, getattr(self, sharing.key_attr))
    else:
        key = key.view(batch, seq, -1, self.head_dim)  # (B, S, Hk, D)
        value = value.view(batch, seq, -1, self.head_dim)
        if spec.qk_norm:
            key = self.k_norm(key)
        if spec.v_norm:
            value = self.v_norm(value)
        query, key = _positional(self, query, key, cos, sin, spec, past_key_values, kwargs)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, S, D)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
    if sharing is not None and getattr(self, sharing.store_attr):
        key, value = store_kv(stored, getattr(self, sharing.key_attr), key, value)
    # The mask already carries any sliding window; the kwarg is for kernels that take it
    # directly. Per-layer modules (Qwen, Gemma) hold it; Mistral reads it from the config.
    extra = {}
    if hasattr(self, "sliding_window"):
        extra["sliding_window"] = self.sliding_window
    elif getattr(self.config, "sliding_window", None) is not None:
        extra["sliding_window"] = self.config.sliding_window
    softcap = (
        getattr(self, spec.attention_softcap_attr, None) if spec.attention_softcap_attr else None
    )
    if softcap is not None:
        extra["softcap"] = softcap
    if spec.attention_sinks_attr:  # transformers' keyword for them: its functions read it
        extra["s_aux"] = getattr(self, spec.attention_sinks_attr)
    chunk = _chunk_size(self, spec)
    if chunk is not None:  # the kernel cuts the rows at the chunk bounds the mask keeps
        extra[CHUNK_KWARG] = chunk
    output, weights, path = attend(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    if path.reason == CUSTOM_MASK and chunk is not None:
        path = path._replace(
            reason=f"{_chunk_label(spec, chunk)} with a mask that is not padding on that pattern"
        )
    paths[self] = path
    output = output.reshape(batch, seq, -1)
    if gate is not None:
        output = output * torch.sigmoid(gate)
    return _project(self.o_proj, output), weights


def _chunk_size(module: nn.Module, spec: ArchitectureSpec) -> int | None:
    """The chunk size of a "chunked_attention" layer (``spec.attention_chunk_attr``: queries see
    their chunk only), None for any other layer."""
    if spec.attention_chunk_attr is None:
        return None
    types = getattr(module.config, "layer_types", None) or ()
    index = getattr(module, "layer_idx", None)
    if index is None or index >= len(types) or types[index] != "chunked_attention":
        return None
    return getattr(module.config, spec.attention_chunk_attr)


def _chunk_label(spec: ArchitectureSpec, chunk: int) -> str:
    return (
        f"chunked attention ({spec.attention_chunk_attr}={chunk}: each query sees its own chunk "
        "of the sequence)"
    )


def _mlp_forward(self, x: torch.Tensor, *, activation: str) -> torch.Tensor:
    gate = _fused_weights(self.gate_proj)
    up = _fused_weights(self.up_proj)
    down = _fused_weights(self.down_proj)
    if gate is not None and up is not None and down is not None:
        return lora_mlp(x, gate, up, down, activation)
    return self.down_proj(_GATED_ACTIVATIONS[activation](self.gate_proj(x), self.up_proj(x)))


def _experts_call_forward(self, *args, patch: PatchState, **kwargs):
    """A MoE block that calls its experts itself (``MixtureOfExperts.patched == "experts"``,
    Gemma 4's decoder layer): its class forward runs, transformers' code line for line, with
    the module now at its experts attribute running grouped (``moe.experts_forward``).

    Why the experts call is patched from here, at the call, and not once at load: LoRA on the
    experts (PEFT's ``target_parameters``) replaces the layer's ``experts`` with a ParamWrapper
    around the experts module, and that wrapper's forward adds s·B_e A_e to the whole weight
    stack before calling the module inside. So the grouped forward must sit on the *outermost*
    module, which is only known at the call: PEFT wraps after fastlm patched (through fastlm's
    or PEFT's own get_peft_model, TRL's trainer, PeftModel.from_pretrained), and merging or
    unloading unwraps again. A module once given the forward keeps it (and is listed for
    ``unpatch_model``); the check is one set lookup per layer call."""
    moe = patch.spec.moe
    experts = getattr(self, moe.experts_attr)
    if experts not in patch.grouped_experts_calls:
        _set_forward(patch, experts, experts_forward, moe=moe, activation=patch.spec.activation)
        patch.grouped_experts_calls.add(experts)
    return type(self).forward(self, *args, **kwargs)


def _set_causal_lm_forward(state: PatchState, model: nn.Module) -> None:
    original = type(model).forward
    names = list(inspect.signature(original).parameters)[1:]

    @functools.wraps(original)  # keep the signature: generate() and Trainer inspect it
    def forward(self, *args, **kwargs):
        kwargs.update(zip(names, args))
        _check_length(kwargs, state.max_seq_length)
        labels = kwargs.get("labels")
        head = self.get_output_embeddings()
        signals = any(kwargs.get(k) is not None for k in ("position_ids", "cu_seq_lens_q"))
        with caller_signals(signals):  # no packing signals: attention reads no position_ids
            if signals and state.spec.layers_need_bounds:
                _bounds_as_keywords(kwargs)
            if labels is None or not self.training or not is_plain_linear(head):
                state.moe_aux.stop()  # transformers' forward takes the aux loss's gradient
                return original(self, **kwargs)
            return _fused_loss_forward(self, head, state, kwargs)

    model.forward = types.MethodType(forward, model)
    state.patched.append(model)


def _bounds_as_keywords(kwargs: dict) -> None:
    """Sequences packed in one row by restarting position_ids, also as the cu_seq_lens keywords
    (``packing.as_keywords``): the keywords reach every layer, position_ids only some
    (``ArchitectureSpec.layers_need_bounds``)."""
    position_ids = kwargs.get("position_ids")
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("past_key_values") is not None:
        return
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[0] != 1:
        return  # packing is one row
    seq_len = position_ids.shape[-1]
    packing = packed_sequences({"position_ids": position_ids}, 1, seq_len)
    if packing is not None and not packing.problem:
        kwargs.update(as_keywords(packing, seq_len))


def _check_length(kwargs: dict, max_seq_length: int) -> None:
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None or tokens.dim() < 2 or tokens.shape[1] <= max_seq_length:
        return
    # A padding-free row holds several sequences; the attention reads the same cached answer.
    packing = packed_sequences(kwargs, tokens.shape[0], tokens.shape[1])
    length = tokens.shape[1] if packing is None or packing.problem else packing.max_seqlen
    if length <= max_seq_length:
        return
    raise SequenceTooLongError(
        f"batch has sequences of {length} tokens but the model was loaded with "
        f"max_seq_length={max_seq_length}. Truncate the data (e.g. SFTConfig(max_length="
        f"{max_seq_length})) or load with a larger max_seq_length."
    )


def _fused_loss_forward(self, head: nn.Linear, state: PatchState, kwargs: dict):
    unshard_for_direct_read(head)  # an FSDP2 unit of its own: its forward (FSDP's hook) is skipped
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    moe = state.spec.moe
    balances = moe is not None and moe.aux_loss_coef_attr is not None  # a load-balancing loss
    if balances:  # router logits for the load-balancing loss, as transformers' forward
        if kwargs.get("output_router_logits") is None:
            kwargs["output_router_logits"] = getattr(self.config, "output_router_logits", False)
        if kwargs["output_router_logits"]:
            state.moe_aux.start(kwargs.get("attention_mask"))
        else:
            state.moe_aux.stop()
    outputs = decoder_body(self)(**kwargs)
    hidden = outputs.last_hidden_state  # (B, S, H)
    if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    attr = state.spec.final_logit_softcap_attr
    softcap = getattr(self.config, attr, None) if attr else None
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        shift_labels.reshape(-1).to(hidden.device),
        bias=head.bias,
        num_items_in_batch=num_items_in_batch,
        softcap=softcap,
    )
    if balances:
        return _with_aux_loss(self, state, loss, outputs, kwargs)
    if state.check_finite_loss:
        state.loss_monitor.watch(loss, self)
    if getattr(outputs, "router_logits", None) is not None:  # asked for, with no aux loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def decoder_body(model: nn.Module) -> nn.Module:
    """The causal LM's decoder stack (its ``*Model``): at ``base_model_prefix``, else at
    ``model`` (Llama4ForCausalLM's prefix is the multimodal model's "language_model", an
    attribute the text-only class does not have; its body is ``model``).

    Usage: ``hidden = decoder_body(causal_lm)(input_ids=ids).last_hidden_state``."""
    body = getattr(model, model.base_model_prefix, None)
    return body if body is not None else model.model


def _with_aux_loss(self, state: PatchState, loss, outputs, kwargs: dict):
    """A MoE model's output: with router logits, loss + coefficient × load-balancing loss
    (``moe.load_balancing_loss``), as transformers' causal-LM forward adds it. The aux term's
    gradient comes from the blocks' backward (``moe.AuxLossGradient``), so it is added detached
    and the loss records the scale its backward starts with."""
    aux_loss = None
    if kwargs["output_router_logits"]:
        experts, top_k, coefficient = aux_loss_settings(self.config, state.spec.moe)
        aux_loss = load_balancing_loss(
            outputs.router_logits, experts, top_k, kwargs.get("attention_mask")
        )
        state.moe_aux.finish(outputs.router_logits, experts, top_k, coefficient)
        loss = record_loss_scale(
            loss + coefficient * aux_loss.detach().to(loss.device), state.moe_aux
        )
    if state.check_finite_loss:
        state.loss_monitor.watch(loss, self)
    return MoeCausalLMOutputWithPast(
        loss=loss,
        aux_loss=aux_loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        router_logits=outputs.router_logits if kwargs["output_router_logits"] else None,
    )
