"""Sparse mixture-of-experts blocks: the router, the experts run grouped, the load-balancing loss.

A block (``spec.moe``, e.g. Qwen3-MoE's) takes x (N tokens, H) and its router picks k experts per
token with weights w (N, k) (``router_forward``, from the spec's facts: softmax then top-k, among
the best expert groups only where the spec says so (Mistral 4); gpt-oss's top-k logits then
softmax over those k; Llama 4's top-k logits, sigmoid of each). A block with a shared expert
(Qwen3.5-MoE's, Llama 4's) adds [sigmoid(x G^T) ·] shared(x) to every token's output, the shared
expert being a dense MLP that runs the fused LoRA MLP (``_shared_expert``). The N·k (token,
expert) pairs are sorted by
expert (a stable sort: within an expert, tokens keep their order), and each projection of every
expert runs as *one* grouped GEMM over the sorted rows (``fastlm.kernels.grouped_gemm``) instead
of transformers' loop of one small GEMM per expert:

    xs   = x[token of each sorted pair]                                   (N·k, H)
    e|g  = xs W_gu[e]^T + s_gu (xs A_gu[e]^T) B_gu[e]^T (+ b_gu[e])      (N·k, 2·I), gate | up
    h    = act(e, g)                          (e.g. SiLU(e) · g)          (N·k, I)
    o    = (h W_d[e]^T + s_d (h A_d[e]^T) B_d[e]^T (+ b_d[e])) · w[pair]  (N·k, H)
    out  = o[back in pair order].view(N, k, H).sum(1)                     (N, H)

(Llama 4 scales the expert's input instead, xs · w[pair], and not o: ``routing_weight_on``.)

with W[e] expert e's (out, in) weight: the parameter's slice e where it is stored (E, out, in)
(Qwen), that slice's transpose where it is stored (E, in, out) (gpt-oss, whose slices are then
the grouped GEMM's operands as they are), and b[e] its per-expert bias, gathered per row
(gpt-oss). gate | up are the two halves of the 2·I outputs, or their even and odd columns where
the spec says they are interleaved (gpt-oss); act is the spec's gated activation (gpt-oss's:
``clamped_swiglu``).

Gemma 4's layer has no MoE block module: it owns the router and the experts and calls
``experts(x, idx, w)`` itself, beside its dense MLP. There the layer's forward and its router stay
transformers', and only that call runs ``grouped_experts`` (``experts_forward``, set on whatever
module sits at the layer's ``experts`` when the layer runs: PEFT's outermost ParamWrapper once
LoRA targets the experts); w carries the router's gradient into the experts' weighted sum.

LoRA on the experts is PEFT's own: ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])`` wraps the experts module in one ``ParamWrapper`` per parameter,
holding per expert A_e (r, in) and B_e (out, r) in two ``nn.Linear`` (``expert_weights`` reads
them as views, so their gradients land in PEFT's parameters). PEFT's forward adds s·B_e A_e to
the whole weight stack on every call (its transpose (s·B_e A_e)^T to a stack stored (E, in, out))
and backpropagates through it; here the A and B products run on the routed rows only (three
grouped GEMMs per projection), and no delta weight the size of the experts is ever made.

Backward is autograd's through those steps; each grouped GEMM is a hand-derived Function
(``GroupedMatmul``: dX_g = dY_g W_g^T, dW_g = X_g^T dY_g). The gather/sort/un-sort are index
ops, and the routing weights w carry the router's gradient. Exactness against transformers + PEFT
(fp32, 1e-4 relative): ``tests/models/test_moe.py``.

Training with labels adds the router's load-balancing loss (``load_balancing_loss``, Switch
Transformer's) × the config's coefficient, as transformers' causal-LM forward does. Its value is
computed from the router logits transformers records; its *gradient* is not taken through those
recorded logits but put into each block's backward (``AuxLossGradient``), because fastlm's
offloaded checkpointing runs a layer's first forward without a graph and backpropagates its
hidden-state output alone: a gradient through recorded logits would be lost there (seen: 2.5%
off on q_proj's LoRA A with use_gradient_checkpointing="unsloth"). With
aux = E · sum_e f_e P_e over all MoE layers (``load_balancing_loss``), f_e the routed-token
share (no gradient), T the unpadded tokens × MoE layers, and c = d(what backward starts from) /
d(loss) (recorded as the backward passes the loss: the Trainer's scaling, for one):
    d(c · coef · aux) / dz_t = c · coef · E / T · mask_t · (p_t ⊙ (f − <p_t, f>))
for token t's router logits z_t, p_t = softmax(z_t): the softmax Jacobian applied to f.
The same holds for gpt-oss's scoring (top-k logits, softmax over those k): transformers records
the full logits z there too (its router's first output, with the router's bias) and its loss
takes softmax(z) over all E experts and the top-k of it, which are the top-k of z (softmax keeps
the order). The scoring changes the routing weights w only, whose gradient autograd carries
through the experts' weighted sum; dz reaches the bias as sum_t dz_t, the weight as dz^T x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.kernels.geglu import geglu
from fastlm.kernels.grouped_gemm import group_ends, group_sizes, grouped_mm
from fastlm.kernels.swiglu import swiglu
from fastlm.models.lora_layers import active_adapter
from fastlm.models.nf4_experts import is_nf4_expert_weight
from fastlm.models.spec import ExpertGroups, MixtureOfExperts

try:  # peft is a dependency, but keep plain-model use importable without it
    from peft.tuners.lora.layer import ParamWrapper
except ImportError:  # pragma: no cover
    ParamWrapper = ()  # type: ignore[assignment,misc]


def clamped_swiglu(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's expert activation, g = min(gate, limit), u = clamp(up, -limit, limit):

        h = (u + 1) · g · sigmoid(alpha · g)

    Plain PyTorch with autograd (each clamp passes the gradient only inside its bounds), in the
    order of transformers' ``GptOssExperts._apply_gate``, so fp32 results are bit-equal. A fused
    kernel would save the few (rows, I) intermediates autograd keeps; not measured to matter yet.

    Usage: ``h = clamped_swiglu(gate_up[:, ::2], gate_up[:, 1::2], alpha=1.702, limit=7.0)``.
    """
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


_ACTIVATIONS = {"swiglu": swiglu, "geglu": geglu, "clamped_swiglu": clamped_swiglu}


class ExpertProjection(NamedTuple):
    """One projection of every expert, as the grouped GEMMs take it: ``weight`` (E, in, out) (a
    view of the parameter); LoRA A (E, r, in), B (E, out, r); ``bias`` (E, out) or None."""

    weight: Tensor
    lora_A: Tensor | None = None
    lora_B: Tensor | None = None
    scaling: float = 1.0
    bias: Tensor | None = None


# --------------------------------------------------------------------------- weights


def expert_weights(
    experts: nn.Module, moe: MixtureOfExperts
) -> tuple[dict[str, ExpertProjection] | None, str]:
    """``({"gate_up": ..., "down": ...}, "")`` when the experts module (PEFT-wrapped or not) can
    run grouped, else ``(None, reason)``. Usage: ``weights, why_not = expert_weights(block.experts,
    spec.moe)``."""
    adapters: dict[str, tuple[Tensor, Tensor, float]] = {}
    module = experts
    while ParamWrapper and isinstance(module, ParamWrapper):
        name = module.parameter_name
        if name not in (moe.gate_up, moe.down):
            return (
                None,
                f"LoRA on experts parameter {name!r} (grouped path: {moe.gate_up}, {moe.down})",
            )
        lora, why_not = _param_wrapper_lora(module, moe)
        if why_not:
            return None, why_not
        if lora is not None:
            adapters[name] = lora
        module = module.base_layer
    if type(module).__name__ != moe.experts_class:
        return None, f"{type(module).__name__} is not {moe.experts_class}"
    why_not = _layout_mismatch(module, moe)
    if why_not:
        return None, why_not
    weights = {}
    for key, name, bias in (
        ("gate_up", moe.gate_up, moe.gate_up_bias),
        ("down", moe.down, moe.down_bias),
    ):
        weight = getattr(module, name)
        if weight.dim() != 3:
            return None, f"experts {name} is {weight.dim()}-D (the grouped path takes 3-D)"
        if is_nf4_expert_weight(weight):
            # Dense once per call: every read of an NF4 weight dequantises all of it, and the
            # grouped GEMM reads one expert slice at a time (E reads of an (E, in, out) operand).
            weight = weight.dequantize()
        if moe.experts_layout == "out_in":  # (E, out, in) -> the (E, in, out) operand
            weight = weight.transpose(1, 2)
        lora = adapters.get(name, (None, None, 1.0))
        weights[key] = ExpertProjection(weight, *lora, getattr(module, bias) if bias else None)
    return weights, ""


def _layout_mismatch(module: nn.Module, moe: MixtureOfExperts) -> str:
    """Why the experts module is not stored as the spec says ("" when it is), read from the
    layout flags transformers' experts modules carry (``is_transposed``, ``has_bias``,
    ``is_concatenated``), so that a changed transformers class is refused, not misread."""
    transposed = moe.experts_layout == "in_out"
    if getattr(module, "is_transposed", transposed) != transposed:
        return f"experts stored {'(E, out, in)' if transposed else '(E, in, out)'}, not as spec"
    biased = bool(moe.gate_up_bias or moe.down_bias)
    if getattr(module, "has_bias", biased) != biased:
        return f"experts {'without' if biased else 'with'} biases, unlike the spec"
    interleaved = moe.gate_up_interleaved
    if getattr(module, "is_concatenated", not interleaved) == interleaved:
        return f"gate/up {'concatenated' if interleaved else 'interleaved'}, unlike the spec"
    return ""


def _base_experts(experts: nn.Module) -> nn.Module:
    """The experts module under any PEFT ParamWrappers."""
    while ParamWrapper and isinstance(experts, ParamWrapper):
        experts = experts.base_layer
    return experts


def _param_wrapper_lora(
    wrapper, moe: MixtureOfExperts
) -> tuple[tuple[Tensor, Tensor, float] | None, str]:
    """(A (E, r, in), B (E, out, r), scaling) of a PEFT ParamWrapper's one active adapter, as
    views of its parameters; None without an active adapter (disabled, merged, none).

    PEFT names in/out from the parameter's dims 1, 2, swapped for a 3-D parameter whose module is
    not ``is_transposed`` (its ``_did_swap_in_out_features``); with its A_p (r, in_p), B_p
    (out_p, r) it adds s·B_p A_p to an (E, out_p, in_p) slice where it swapped, (s·B_p A_p)^T to
    an (E, in_p, out_p) one where not. Where PEFT's reading is the layout's (Qwen's (E, out, in)
    swapped; gpt-oss's (E, in, out), ``is_transposed``, not), in_p and out_p are the projection's
    own, A = A_p, B = B_p and y = x W_e^T + s (x A_e^T) B_e^T. Where it is not (Llama 4's
    (E, in, out) experts carry no ``is_transposed``, so PEFT reads them (E, out, in)), the same
    delta is x ↦ s (x B_p) A_p: A = B_p^T (r, in), B = A_p^T (out, r), views still."""
    name, why_not = active_adapter(wrapper, path="the experts' grouped")
    if name is None:
        return None, why_not
    experts = wrapper.num_experts
    a = wrapper.lora_A[name].weight  # (E·r, in_p): rows e·r .. e·r + r - 1 are expert e's A
    b = wrapper.lora_B[name].weight  # (out_p, r·E): column j·E + e is rank j of expert e's B
    rank = a.shape[0] // experts
    lora_a = a.view(experts, rank, a.shape[1])  # (E, r, in_p)
    lora_b = b.view(b.shape[0], rank, experts).permute(2, 0, 1)  # (E, out_p, r)
    if wrapper._did_swap_in_out_features != (moe.experts_layout == "out_in"):
        lora_a, lora_b = lora_b.transpose(1, 2), lora_a.transpose(1, 2)  # (E, r, in), (E, out, r)
    return (lora_a, lora_b, wrapper.scaling[name]), ""


# --------------------------------------------------------------------------- forwards


def router_forward(self, hidden_states: Tensor, *, moe: MixtureOfExperts):
    """(logits (N, E), top-k weights (N, k), top-k experts (N, k)), as transformers' router:
    z = x R^T (+ b); "softmax" scoring: p = softmax(z) (in fp32 where ``scores_in_fp32``), its
    top k (among the best groups' experts where ``expert_groups``), renormalised where the router
    says so, × the routed scaling where named; "topk_softmax": the top k of z, softmax over
    those k in z's dtype; "topk_sigmoid": the top k of z, sigmoid of each (in fp32). The logits
    sit at ``moe.router_logits_index`` of the tuple (weights and logits swap places at 1).
    Called as a module, so transformers' output recorders still collect the logits."""
    x = hidden_states.reshape(-1, self.weight.shape[1])
    logits = F.linear(x, self.weight, getattr(self, "bias", None))  # (N, E)
    weights, experts = _route(self, logits, moe)
    if moe.router_logits_index == 1:  # where the model's recorder reads them (Llama 4)
        return weights, logits, experts
    return logits, weights, experts


def _route(self, logits: Tensor, moe: MixtureOfExperts) -> tuple[Tensor, Tensor]:
    """(weights (N, k) in the logits' dtype, experts (N, k)) from the logits, per the spec."""
    k = getattr(self, moe.top_k_attr)
    if moe.scoring == "topk_softmax":
        top, experts = torch.topk(logits, k, dim=-1)  # (N, k)
        return torch.softmax(top, dim=-1, dtype=top.dtype), experts
    if moe.scoring == "topk_sigmoid":
        top, experts = torch.topk(logits, k, dim=-1)  # (N, k)
        return torch.sigmoid(top.float()).to(top.dtype), experts
    if moe.scores_in_fp32:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
    else:
        probs = logits.softmax(dim=-1)
    if moe.expert_groups is not None:
        experts = _group_limited_top_k(self, probs, k, moe.expert_groups)
        top = probs.gather(1, experts)  # the weights: the scores themselves, not the masked copy
    else:
        top, experts = torch.topk(probs, k, dim=-1)  # (N, k)
    normalize = moe.normalize_top_k
    if normalize if isinstance(normalize, bool) else getattr(self, normalize):
        denominator = top.sum(dim=-1, keepdim=True)
        if moe.normalize_epsilon:  # Mistral 4's 1e-20: a row of underflowed scores stays finite
            denominator = denominator + moe.normalize_epsilon
        top = top / denominator
    if moe.routed_scaling_attr:
        top = top * getattr(self, moe.routed_scaling_attr)
    return top.to(logits.dtype), experts


def _group_limited_top_k(self, probs: Tensor, k: int, groups: ExpertGroups) -> Tensor:
    """The top k experts (N, k) among those of each token's best groups (``ExpertGroups``):
    group score = sum of its ``group_score_top`` best scores, the ``kept`` best groups kept,
    every other expert's score zeroed before the top k. Selection only: no gradient flows here."""
    tokens, num_experts = probs.shape
    num_groups = getattr(self, groups.num_groups_attr)
    kept = getattr(self, groups.kept_groups_attr)
    grouped = probs.view(tokens, num_groups, num_experts // num_groups)  # (N, G, E/G)
    group_scores = grouped.topk(groups.group_score_top, dim=-1).values.sum(dim=-1)  # (N, G)
    best = torch.topk(group_scores, kept, dim=-1, sorted=False).indices  # (N, kept)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(tokens, num_experts)  # (N, E)
    return torch.topk(probs.masked_fill(~keep, 0.0), k, dim=-1, sorted=False).indices


def moe_block_forward(
    self, hidden_states: Tensor, *, moe: MixtureOfExperts, activation: str, aux: AuxLossGradient
):
    """The MoE block: route, run the experts grouped (transformers' / PEFT's experts forward
    where ``expert_weights`` says they cannot), add the gated shared expert where the block has
    one, return (B, S, H) (and the router scores (N, k) where the spec's block returns them);
    in a fused-loss training step its backward also carries the load-balancing loss's gradient
    (``AuxLossGradient``). ``activation``: the spec's, used where ``moe.activation`` is None."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # (N, H)
    routed = getattr(self, moe.router_attr)(x)  # logits (N, E), weights (N, k), experts (N, k)
    logits = routed[moe.router_logits_index]
    weights, experts = routed[1 - moe.router_logits_index], routed[2]
    module = getattr(self, moe.experts_attr)
    out = _run_experts(module, x, experts, weights, moe, activation, module)
    if moe.shared_expert_attr:
        out = out + _shared_expert(self, x, moe)
    if aux.active and torch.is_grad_enabled():
        out = _AuxLossBackward.apply(out, logits, aux)
    if moe.returns_router_scores:
        return out.reshape(shape), weights
    if moe.returns_router_logits:
        return out.reshape(shape), logits
    return out.reshape(shape)


def experts_forward(
    self,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    *,
    moe: MixtureOfExperts,
    activation: str,
) -> Tensor:
    """An experts call run grouped, for a block that calls its experts itself
    (``moe.patched == "experts"``, Gemma 4's decoder layer): ``self`` is the module at the
    block's experts attribute (the experts module, or PEFT's outermost ParamWrapper around it),
    the routing (N, k) is the model's own router's. (N, H) as transformers' experts forward
    returns it; that forward runs where ``expert_weights`` says the grouped path cannot.

    Usage: ``patch_model`` sets it on the module at ``layer.experts`` (reversibly); the layer's
    own ``out = self.experts(x, top_k_index, top_k_weights)`` then runs it."""
    # The fallback is the class forward: the instance forward is this function.
    fallback = partial(type(self).forward, self)
    return _run_experts(self, hidden_states, top_k_index, top_k_weights, moe, activation, fallback)


def _run_experts(
    module: nn.Module,
    x: Tensor,
    experts: Tensor,
    weights: Tensor,
    moe: MixtureOfExperts,
    activation: str,
    fallback: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Tensor:
    """sum over the k chosen experts of w · expert(x) (N, H): grouped where ``expert_weights``
    reads the experts module (PEFT-wrapped or not), else ``fallback(x, experts, weights)``
    (transformers' / PEFT's experts forward)."""
    projections, _ = expert_weights(module, moe)
    if projections is None:
        return fallback(x, experts, weights)
    base = _base_experts(module)
    options = {name: getattr(base, name) for name in moe.activation_attrs}
    return grouped_experts(
        x, weights, experts, projections, moe.activation or activation,
        interleaved=moe.gate_up_interleaved, activation_options=options,
        weight_input=moe.routing_weight_on == "input",
    )  # fmt: skip


def _shared_expert(self, x: Tensor, moe: MixtureOfExperts) -> Tensor:
    """sigmoid(x G^T) · shared(x) (N, H): the shared expert is the spec's MLP, so its forward is
    the fused LoRA MLP; the (H -> 1) gate runs its own (PEFT's, if a LoRA targets it)."""
    shared = getattr(self, moe.shared_expert_attr)(x)  # (N, H)
    if not moe.shared_expert_gate_attr:
        return shared
    return torch.sigmoid(getattr(self, moe.shared_expert_gate_attr)(x)) * shared  # (N, 1) gate


def grouped_experts(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    projections: dict[str, ExpertProjection],
    activation: str = "swiglu",
    *,
    interleaved: bool = False,
    activation_options: dict[str, Any] | None = None,
    weight_input: bool = False,
) -> Tensor:
    """sum over the k chosen experts of w · expert(x), every expert's projections as grouped
    GEMMs over the (token, expert) pairs sorted by expert. ``interleaved``: gate_up's outputs
    alternate gate, up; ``activation_options``: keywords of the activation (gpt-oss's alpha,
    limit); ``weight_input``: sum of expert(w · x) instead (Llama 4: w scales each pair's input
    row, and its gradient comes back through the whole expert).

    Usage: ``out = grouped_experts(x, w, idx, expert_weights(block.experts, spec.moe)[0])``.
    """
    tokens, k = experts.shape
    gate_up, down = projections["gate_up"], projections["down"]
    pairs = experts.reshape(-1)  # (N·k,): pair t·k + j is token t's j-th expert
    order = torch.argsort(pairs, stable=True)  # pairs sorted by expert
    sizes = group_sizes(pairs, gate_up.weight.shape[0])  # rows per expert, no host read
    ends, host_sizes = group_ends(sizes)
    rows = pairs[order]  # (N·k,): the expert of each sorted row (its bias)
    xs = x[order // k]  # (N·k, H)
    w = weights.reshape(-1)[order].unsqueeze(-1)  # (N·k, 1): each sorted pair's weight
    if weight_input:
        xs = xs * w.to(xs.dtype)
    gu = _grouped_projection(xs, gate_up, ends, host_sizes, rows)  # (N·k, 2·I)
    gate, up = (gu[:, ::2], gu[:, 1::2]) if interleaved else gu.chunk(2, dim=-1)
    h = _ACTIVATIONS[activation](gate, up, **(activation_options or {}))  # (N·k, I)
    out = _grouped_projection(h, down, ends, host_sizes, rows)  # (N·k, H)
    if not weight_input:
        out = out * w.to(out.dtype)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(order.numel(), device=order.device)
    return out[restore].view(tokens, k, -1).sum(dim=1).to(x.dtype)  # (N, H)


def _grouped_projection(
    x: Tensor, p: ExpertProjection, ends: Tensor, sizes: list[int], rows: Tensor
) -> Tensor:
    """Y = X W_e^T + s (X A_e^T) B_e^T + b_e per expert e's rows: three grouped GEMMs with
    LoRA, the bias gathered per row (``rows``: each row's expert; its gradient adds back per
    expert through the gather)."""
    y = grouped_mm(x, p.weight, ends, sizes)
    if p.lora_A is not None:
        xa = grouped_mm(x, _lora_operand(p.lora_A, x.dtype), ends, sizes)  # (rows, r)
        lora = grouped_mm(xa, _lora_operand(p.lora_B, x.dtype), ends, sizes)
        y = y.add(lora, alpha=p.scaling)
    if p.bias is not None:
        y = y + p.bias.to(y.dtype)[rows]  # (rows, out)
    return y


def _lora_operand(factor: Tensor, dtype: torch.dtype) -> Tensor:
    """A LoRA factor, A (E, r, in) or B (E, out, r), as the grouped GEMM's operand (E, in, r) or
    (E, r, out), dense, in the rows' dtype. PEFT's expert adapters are strided views (B's
    experts are its innermost dimension), which torch._grouped_mm refuses: a copy of a few MB
    (made anyway where the dtype changes) beats one GEMM per expert and its host read."""
    operand = factor.transpose(1, 2)
    if operand.dtype == dtype and operand.is_contiguous():
        return operand
    dense = torch.empty_like(operand, dtype=dtype, memory_format=torch.contiguous_format)
    return dense.copy_(operand)  # one copy, the cast included; autograd passes through it


# --------------------------------------------------------------------------- aux loss


@dataclass
class AuxLossGradient:
    """What a MoE block's backward needs for the load-balancing loss's gradient (see the module
    docstring), shared by the blocks of one model and filled per training step: ``start`` before
    the body runs, ``finish`` with every layer's logits after it, ``loss_scale`` as backward
    passes the loss (``record_loss_scale``)."""

    active: bool = False
    mask: Tensor | None = None  # (N,) 1.0 for a real token, 0.0 for padding
    expert_weights: Tensor | None = None  # (E,) coef · E · f_e / T
    loss_scale: Tensor | None = None  # c: the gradient that reached the loss

    def start(self, attention_mask: Tensor | None) -> None:
        """A fused-loss training step begins: the blocks add the gradient from now on."""
        mask = None if attention_mask is None else attention_mask.reshape(-1).float()
        self.active, self.mask, self.expert_weights, self.loss_scale = True, mask, None, None

    def stop(self) -> None:
        """A call that computes no fused loss (eval, no labels): no gradient to add."""
        self.active = False

    def finish(self, router_logits, num_experts: int, top_k: int, coefficient: float) -> None:
        """f_e and T from every layer's (detached) logits: the backward's weights."""
        counts = torch.zeros(num_experts, device=router_logits[0].device)
        tokens = torch.zeros((), device=counts.device)
        for logits in router_logits:
            keep = self._keep(logits)
            chosen = torch.topk(logits.detach().float(), top_k, dim=-1).indices  # (N, k)
            counts += (F.one_hot(chosen, num_experts).sum(1) * keep[:, None]).sum(0)
            tokens += keep.sum()
        self.expert_weights = coefficient * num_experts * counts / tokens / tokens

    def _keep(self, logits: Tensor) -> Tensor:
        if self.mask is None:
            return logits.new_ones(logits.shape[0], dtype=torch.float32)
        return self.mask.to(logits.device)


class _AuxLossBackward(torch.autograd.Function):
    """out unchanged; backward adds dz = c · mask · p ⊙ (w − <p, w>), w = coef·E·f/T, to the
    router logits z (p = softmax(z), recomputed from the saved z)."""

    @staticmethod
    def forward(ctx, out: Tensor, logits: Tensor, aux: AuxLossGradient) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.aux = aux
        return out.clone()

    @staticmethod
    def backward(ctx, d_out: Tensor):
        (logits,) = ctx.saved_tensors
        aux = ctx.aux
        if aux.expert_weights is None or aux.loss_scale is None:
            return d_out, None, None  # the backward did not start from the fused loss
        p = torch.softmax(logits.float(), dim=-1)  # (N, E)
        w = aux.expert_weights * aux.loss_scale  # (E,)
        dz = p * (w - (p * w).sum(-1, keepdim=True)) * aux._keep(logits)[:, None]
        return d_out, dz.to(logits.dtype), None


class _RecordLossScale(torch.autograd.Function):
    """loss unchanged; backward records the gradient that reached it (c) before any layer's."""

    @staticmethod
    def forward(ctx, loss: Tensor, aux: AuxLossGradient) -> Tensor:
        ctx.aux = aux
        return loss.clone()

    @staticmethod
    def backward(ctx, d_loss: Tensor):
        ctx.aux.loss_scale = d_loss.detach().float()
        return d_loss, None


def record_loss_scale(loss: Tensor, aux: AuxLossGradient) -> Tensor:
    """``loss`` whose backward tells the MoE blocks the scale they multiply the aux gradient by.

    Usage: ``loss = record_loss_scale(ce + coef * aux.detach(), state.moe_aux)``."""
    return _RecordLossScale.apply(loss, aux)


def load_balancing_loss(
    router_logits: tuple[Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Switch Transformer's load-balancing loss over every MoE layer's router logits (N, E):

        f_e = (tokens routed to e, over layers) / (tokens over layers)     (top-k counts)
        P_e = (sum of softmax(z)_e over tokens and layers) / (tokens over layers)
        loss = E · sum_e f_e · P_e

    Padding tokens (``attention_mask`` (B, S) == 0) count in neither. f carries no gradient
    (a count); P carries the router's. Usage: ``aux = load_balancing_loss(out.router_logits,
    8, 2, batch["attention_mask"])``.
    """
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sums = torch.zeros(num_experts, dtype=torch.float32, device=device)
    tokens = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.to(device).float(), dim=-1)  # (N, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        keep = torch.ones(probs.shape[0], device=device)
        if attention_mask is not None:
            keep = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
        hits = F.one_hot(chosen, num_experts).float().sum(dim=1)  # (N, E): 1 where routed
        counts = counts + (hits * keep[:, None]).sum(dim=0)
        prob_sums = prob_sums + (probs * keep[:, None]).sum(dim=0)
        tokens = tokens + keep.sum()
    return num_experts * torch.sum((counts / tokens) * (prob_sums / tokens))


def aux_loss_settings(config, moe: MixtureOfExperts) -> tuple[int, int, float]:
    """(experts, experts per token, coefficient) of the load-balancing loss from a config."""
    return (
        getattr(config, moe.num_experts_attr),
        getattr(config, moe.experts_per_token_attr),
        getattr(config, moe.aux_loss_coef_attr),
    )


# --------------------------------------------------------------------------- report


def moe_report_rows(name: str, block: nn.Module, moe: MixtureOfExperts) -> list[dict]:
    """``fused_report`` rows of a MoE block: one per experts parameter (grouped GEMMs or not)."""
    experts = getattr(block, moe.experts_attr)
    projections, reason = expert_weights(experts, moe)
    rows = []
    for key, param in (("gate_up", moe.gate_up), ("down", moe.down)):
        lora = projections is not None and projections[key].lora_A is not None
        rows.append(
            {
                "module": f"{name}.{moe.experts_attr}.{param} (grouped)",
                "fused": projections is not None,
                "lora": lora or (projections is None and _wraps(experts, param)),
                "reason": reason,
            }
        )
    return rows


def _wraps(experts: nn.Module, param: str) -> bool:
    """A PEFT ParamWrapper in the chain adapts ``param``."""
    module = experts
    while ParamWrapper and isinstance(module, ParamWrapper):
        if module.parameter_name == param:
            return True
        module = module.base_layer
    return False
