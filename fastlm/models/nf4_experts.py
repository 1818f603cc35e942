"""QLoRA for mixture-of-experts: the experts' 3-D weights stored NF4, read back as the format says.

bitsandbytes' NF4 (``Params4bit`` in ``Linear4bit``) quantises linear layers only, so on a MoE
model ``load_in_4bit`` alone leaves the experts -- 90 % and more of the weights of Qwen3-30B-A3B or
gpt-oss -- in 16 bits. Here each experts parameter (``gate_up_proj`` (E, 2·I, H), ``down_proj``
(E, H, I), or gpt-oss's (E, in, out)) is quantised with the same format and settings as QLoRA's
linears: the whole tensor flattened row-major into blocks of 64, one absmax per block, the
absmaxes double-quantised (bitsandbytes' ``quantize_4bit``, its quantiser being right on every
device). The packed bytes then live in an ``NF4ExpertWeight``: a tensor subclass whose shape and
dtype are the original parameter's, so PEFT's ``target_parameters`` wrapper, transformers' own
experts forward and fastlm's grouped path all see the parameter they expect. Any operation on it
runs on its dequantised values (``fastlm.kernels.nf4_dequant``: bit-exact to the format's
definition), so every reader computes with the same numbers:

    w = dequantize_nf4(packed, state)              (E, out, in) in the parameter's dtype
    anything(w_nf4, ...) = anything(w, ...)        (``__torch_dispatch__``)

The grouped path (``moe.py``) reads each projection once per call and keeps that dense copy for
its backward, so a layer holds one dense copy of its experts from its forward to its backward;
with gradient checkpointing (the default) that is one layer's at a time. The weight is frozen:
in-place writes other than a whole ``copy_`` (re-quantised, as loading a state dict does) raise.

    model, tok = FastModel.from_pretrained(path, load_in_4bit=True)   # experts quantised too
    quantize_experts(model, spec.moe)                                  # what the loader calls
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fastlm.kernels.nf4_dequant import dequantize_nf4
from fastlm.models.spec import MixtureOfExperts

logger = logging.getLogger("fastlm")

__all__ = ["NF4ExpertWeight", "is_nf4_expert_weight", "quantize_experts"]

BLOCKSIZE = 64  # QLoRA's block for the weights (bitsandbytes' default for NF4 linears)
_aten = torch.ops.aten
_SHARING = (_aten.detach.default, _aten.alias.default)  # a new view of the same bytes


def _quantize(dense: torch.Tensor):
    """(packed uint8 (n/2, 1), QuantState) of ``dense``: NF4, blocks of 64, double quant."""
    from bitsandbytes.functional import quantize_4bit  # lazy: the optional "quant" extra

    return quantize_4bit(
        dense.detach().contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )


class NF4ExpertWeight(torch.Tensor):
    """A frozen 3-D experts weight in NF4: the shape and dtype of the dense one, 4.5 bits a weight.

    Usage: ``w = NF4ExpertWeight.quantize(experts.gate_up_proj.data)``; ``w.dequantize()``.
    """

    packed: torch.Tensor
    nf4_state: object  # bitsandbytes QuantState (shape, absmax, nested state)

    @staticmethod
    def __new__(cls, packed: torch.Tensor, nf4_state, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(nf4_state.shape), dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(self, packed: torch.Tensor, nf4_state, dtype: torch.dtype):
        self.packed = packed
        self.nf4_state = nf4_state

    @classmethod
    def quantize(cls, dense: torch.Tensor) -> NF4ExpertWeight:
        """``dense`` quantised, keeping its dtype as the one it reads back in."""
        packed, state = _quantize(dense)
        return cls(packed, state, dense.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (``dtype``: the weight's own by default), exact to the format."""
        return dequantize_nf4(self.packed, self.nf4_state, dtype or self.dtype)

    def nbytes_stored(self) -> int:
        """Bytes held: the packed nibbles and the (double-quantised) absmax."""
        state = self.nf4_state
        total = self.packed.numel() * self.packed.element_size()
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return total

    def __repr__(self) -> str:
        return (
            f"NF4ExpertWeight(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, blocksize={self.nf4_state.blocksize})"
        )

    def _moved(self, device: torch.device) -> NF4ExpertWeight:
        """The packed bytes and their state on ``device`` (a new state: this one is kept)."""
        state = copy.copy(self.nf4_state)
        state.to(device)  # moves its tensors in place
        return NF4ExpertWeight(self.packed.to(device), state, self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        this = args[0] if args and isinstance(args[0], NF4ExpertWeight) else None
        if this is not None and func in _SHARING:
            return NF4ExpertWeight(this.packed, this.nf4_state, this.dtype)
        if this is not None and func is _aten._to_copy.default and _moves_only(this, kwargs):
            return this._moved(torch.device(kwargs["device"]))
        if this is not None and func is _aten.clone.default:  # deepcopy: still NF4
            return NF4ExpertWeight(this.packed.clone(), copy.deepcopy(this.nf4_state), this.dtype)
        if this is not None and func is _aten.copy_.default:
            return this._assign(args[1])
        if this is not None and func._schema.is_mutable:
            raise NotImplementedError(
                f"{func}: NF4 expert weights are frozen (QLoRA trains the LoRA weights beside "
                "them); merge through fastlm's export, which dequantises them"
            )
        dense = tree_map(lambda t: t.dequantize() if isinstance(t, NF4ExpertWeight) else t, args)
        kwargs = tree_map(lambda t: t.dequantize() if isinstance(t, NF4ExpertWeight) else t, kwargs)
        return func(*dense, **kwargs)

    def _assign(self, source: torch.Tensor) -> NF4ExpertWeight:
        """``copy_``: the source's values quantised into this weight (a state dict loading)."""
        if isinstance(source, NF4ExpertWeight):
            source = source.dequantize()
        if tuple(source.shape) != tuple(self.shape):
            raise RuntimeError(f"copy_ into {self!r} from shape {tuple(source.shape)}")
        self.packed, self.nf4_state = _quantize(source.to(self.device, self.dtype))
        return self


def _moves_only(weight: NF4ExpertWeight, kwargs: dict) -> bool:
    """A ``.to`` to another device that keeps the dtype (``model.to("cuda")``): the packed bytes
    move. Any other copy (a dtype, or a copy on the same device, as a merge makes) is dense."""
    dtype, device = kwargs.get("dtype"), kwargs.get("device")
    other = set(kwargs) - {"dtype", "device", "non_blocking", "layout", "pin_memory"}
    moved = device is not None and torch.device(device) != weight.device
    return moved and (dtype is None or dtype == weight.dtype) and not other


def is_nf4_expert_weight(tensor) -> bool:
    """``True`` for an experts weight stored NF4: ``is_nf4_expert_weight(experts.down_proj)``."""
    return isinstance(tensor, NF4ExpertWeight)


def quantize_experts(model: nn.Module, moe: MixtureOfExperts, log: bool = True) -> int:
    """Every experts module's 3-D weights (``moe.gate_up`` and ``moe.down``) stored NF4 in place;
    biases and the router stay as loaded. Returns the bytes freed, and logs them (``log``; a
    loader that quantises layer by layer says it once itself).

    Usage: ``quantize_experts(model, spec.moe)`` (``FastModel.from_pretrained(load_in_4bit=True)``
    calls it).
    """
    freed, count = 0, 0
    for module in model.modules():
        if type(module).__name__ != moe.experts_class:
            continue
        for name in (moe.gate_up, moe.down):
            dense = module._parameters.get(name)
            if dense is None or dense.dim() != 3 or is_nf4_expert_weight(dense):
                continue
            quantized = NF4ExpertWeight.quantize(dense.data)
            freed += dense.numel() * dense.element_size() - quantized.nbytes_stored()
            module._parameters[name] = nn.Parameter(quantized, requires_grad=False)
            count += 1
    if count and log:
        logger.info(
            "load_in_4bit: %d experts weights stored NF4 (%.2f GiB freed)", count, freed / 2**30
        )
    return freed
