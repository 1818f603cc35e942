"""The forward of a bitsandbytes NF4 ``Linear4bit`` that does not run fused, on the CPU.

Most 4-bit projections never run their own forward: the patched attention and MLP hand their
packed weights to the fused LoRA Functions. The others (a LoRA layer with dropout, DoRA, several
active adapters: ``fused_report`` lists them) call the base layer, and there bitsandbytes 0.50.2's
CPU path is not usable: its dequantisation is wrong when a row is not a whole number of blocks
(e.g. rows of 80 or 96 with blocks of 64; which lengths depends on the host's kernel), and in eval
mode on AVX512-BF16 hosts it repacks the weight in place for a kernel that needs
``out_features % 32 == 0``. So on the CPU the layer computes ``y = x·Wᵀ + b`` with fastlm's NF4
dequantisation (``lora_linear`` without an adapter: the backward dequantises the packed weight
again, no dense copy is kept). On CUDA bitsandbytes' own forward runs (right, and what
transformers runs).
"""

from __future__ import annotations

import torch
from torch import nn

from fastlm.autograd import lora_linear
from fastlm.models.lora_layers import BnbLinear4bit, base_weights


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """True for a plain bitsandbytes ``Linear4bit``: ``if is_bnb_linear4bit(layer): ...``."""
    return bool(BnbLinear4bit) and type(module) is BnbLinear4bit


def nf4_linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Instance-level forward of a ``Linear4bit`` (patch.py sets it): fastlm's path on the CPU."""
    weights, _ = base_weights(self)  # None: not quantised yet, not NF4, or repacked by bnb
    if weights is None or x.device.type != "cpu":
        return type(self).forward(self, x)
    compute_dtype = self.compute_dtype or x.dtype  # as bnb: compute there, return x's dtype
    return lora_linear(x.to(compute_dtype), weights).to(x.dtype)
