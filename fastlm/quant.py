"""The NF4 (QLoRA) facts in one place: the quantisation config, which weights are 4-bit, and
reading them back as floating point.

from fastlm import quant
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant.nf4_config(bf16))
for name, module, weight in quant.packed_weights(model): ...
w = quant.dequantized(weight)  # fp32, bit-exact to the format (fastlm.kernels.nf4_dequant)

A 4-bit weight is a bitsandbytes ``Params4bit``: a ``uint8`` tensor of packed nibbles carrying a
``quant_state`` (absmax, block size, code book, shape). FSDP2 replaces a sharded parameter by a
``DTensor`` that does not carry the state, so a module is also 4-bit when its class (or the class
FSDP2 derived from it) is bitsandbytes' ``Linear4bit``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn

from fastlm.errors import UnsupportedKeywordError
from fastlm.kernels.nf4_dequant import dequantize_nf4

__all__ = ["dequantize_nf4", "dequantized", "is_4bit_linear", "nf4_config", "packed_weights"]


def nf4_config(compute_dtype: torch.dtype, given=None):
    """QLoRA's quantisation: NF4, double-quantised absmax, matmuls in ``compute_dtype``.

    Usage: ``AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(bf16))``.
    A ``BitsAndBytesConfig`` the caller passed is kept if it asks for NF4 4-bit.
    """
    try:  # lazy: bitsandbytes is the optional "quant" extra
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise ImportError(
            "load_in_4bit=True needs bitsandbytes: pip install 'fastlm[quant]'"
        ) from error
    if given is not None:
        if not (getattr(given, "load_in_4bit", False) and given.bnb_4bit_quant_type == "nf4"):
            raise UnsupportedKeywordError(
                "load_in_4bit=True with a quantization_config that is not NF4 4-bit: fastlm's "
                "QLoRA path takes bitsandbytes NF4 (drop quantization_config to get it)."
            )
        return given
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def is_4bit_linear(module: nn.Module) -> bool:
    """Whether ``module`` holds a bitsandbytes 4-bit weight: its own ``weight`` carries a
    quant_state, or it is a bitsandbytes ``Linear4bit`` (also after FSDP2 made it a unit, when its
    sharded weight no longer carries the state). PEFT's LoRA wrapper around one is not: its
    weight is the base layer's. Usage: ``is_4bit_linear(model.model.layers[0].mlp.up_proj)``.
    """
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if getattr(weight, "quant_state", None) is not None:
        return True
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # not imported: no module can be one
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def packed_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """``(module path, module, weight)`` of every 4-bit linear layer under ``model`` (a module
    reachable under two paths is listed once, under its first).

    Usage: ``{f"{name}.weight": w for name, _, w in packed_weights(model)}``.
    """
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and is_4bit_linear(module):
            yield name, module, weight


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A 4-bit weight as an fp32 tensor of its logical shape (a dense weight: an fp32 copy).

    Usage: ``w = dequantized(model.model.layers[0].mlp.up_proj.weight)``.
    """
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach().to(torch.float32, copy=True)
    return dequantize_nf4(weight, quant_state, torch.float32)
