"""MXFP4 checkpoints (gpt-oss as OpenAI ships it): how they load (``prepare``: dequantised by
transformers; with ``load_in_4bit`` the experts' MXFP4 bytes decoded by fastlm and stored NF4,
bit for bit what loading a 16-bit copy with NF4 gives) and which way they did (``log_experts``).

MXFP4 (OCP Microscaling Formats v1.0): blocks of 32 FP4 E2M1 elements sharing one E8M0 scale.

    E2M1 code c (4 bits): sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0;
                          codes 0-7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8-15 their negatives
    E8M0 scale s (uint8): 2^(s - 127); s = 255 is NaN
    w[i] = E2M1(c[i]) · 2^(s - 127)                       for the 32 elements i of a block

OpenAI's layout, per experts parameter ``<name>``: ``<name>_blocks`` uint8 (E, out, in/32, 16),
two codes a byte, the first element in the low nibble; ``<name>_scales`` uint8 (E, out, in/32).
gpt-oss's parameters are (E, in, out), the transpose of the decoded (E, out, in) rows.

transformers loads one quantisation at a time, so ``load_in_4bit`` loads with bitsandbytes' NF4
config only: the linears become NF4 as usual, and the experts' ``*_blocks`` / ``*_scales`` match
no parameter (their ``gate_up_proj`` / ``down_proj`` come out missing, randomly initialised).
Then the experts are read here from the checkpoint's safetensors files, one expert at a time (a
big model never holds a second dense copy of a layer), decoded and written over those
parameters; the loader's ``quantize_experts`` then stores them NF4.

    model = load_nf4_from_mxfp4(AutoModelForCausalLM.from_pretrained, path, spec.moe, ...)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from fastlm.errors import UnsupportedKeywordError
from fastlm.model_folder import tensor_files
from fastlm.models.nf4_experts import BLOCKSIZE as NF4_BLOCK
from fastlm.models.nf4_experts import is_nf4_expert_weight
from fastlm.models.spec import MixtureOfExperts

__all__ = [
    "E2M1_VALUES",
    "dequantize_mxfp4",
    "is_mxfp4",
    "load_nf4_from_mxfp4",
    "log_experts",
    "prepare",
]

logger = logging.getLogger("fastlm")

MX_BLOCK = 32  # elements sharing one scale
E8M0_BIAS = 127
E8M0_NAN = 255
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES += tuple(-v for v in E2M1_VALUES)  # codes 8-15: the sign bit set


# Storage per weight: the format's 4 bits and its 8-bit scale per block; NF4 (QLoRA): 4 bits,
# an 8-bit absmax per block and, double-quantised, an fp32 absmax per 256 of those.
MXFP4_BITS_PER_WEIGHT = 4 + 8 / MX_BLOCK
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * 256)


def is_mxfp4(config) -> bool:
    """Whether the checkpoint stores weights MXFP4 (gpt-oss's experts, as OpenAI ships them)."""
    stored = getattr(config, "quantization_config", None)
    if isinstance(stored, dict):
        return stored.get("quant_method") == "mxfp4"
    return getattr(stored, "quant_method", None) == "mxfp4"


def prepare(
    kwargs: dict, config, moe: MixtureOfExperts | None, load_in_4bit: bool, name: str
) -> None:
    """``from_pretrained``'s keywords for an MXFP4 checkpoint. Without ``load_in_4bit``: its
    experts dequantised to the load dtype by transformers (``Mxfp4Config(dequantize=True)``,
    unless the caller passed a config): fastlm has no MXFP4 kernels, and transformers' quantised
    experts do not train. With it: transformers loads one quantisation at a time, so it gets the
    NF4 config alone (``kwargs["config"]``: the checkpoint's, without its MXFP4 one) and
    ``load_nf4_from_mxfp4`` decodes the experts; only a mixture-of-experts spec says where."""
    if not load_in_4bit:
        if "quantization_config" not in kwargs:
            from transformers import Mxfp4Config  # lazy: seconds to import

            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        return
    if moe is None:
        raise UnsupportedKeywordError(
            f"load_in_4bit=True on {name}, an MXFP4 checkpoint of a family whose MXFP4 weights "
            "fastlm cannot place (it decodes gpt-oss's experts). Load it without load_in_4bit, "
            "write a 16-bit copy with model.save_pretrained_merged(folder, tokenizer, "
            "save_method='merged_16bit') and load that folder with load_in_4bit=True."
        )
    plain = copy.deepcopy(kwargs.get("config", config))
    del plain.quantization_config
    kwargs["config"] = plain


def log_experts(model: nn.Module, moe: MixtureOfExperts) -> None:
    """Say which way an MXFP4 checkpoint's experts were loaded: decoded by fastlm and stored NF4
    (``load_in_4bit``), dequantised (the spec's experts class, in the load dtype), or kept
    MXFP4 by a ``quantization_config`` the caller passed."""
    experts = [
        getattr(m, moe.gate_up) for m in model.modules() if type(m).__name__ == moe.experts_class
    ]
    if not experts:
        logger.warning(
            "fastlm: MXFP4 experts kept MXFP4 (transformers' kernels): they run transformers' "
            "code unfused and do not train; pass quantization_config=Mxfp4Config(dequantize=True)"
        )
        return
    if is_nf4_expert_weight(experts[0]):
        logger.warning(
            "fastlm: MXFP4 experts decoded and stored NF4 (QLoRA), as a 16-bit copy would load: "
            "%.2f bits a weight for the checkpoint's %.2f (transformers' load report of their "
            "_blocks/_scales tensors and missing parameters is expected, and held back)",
            NF4_BITS_PER_WEIGHT, MXFP4_BITS_PER_WEIGHT,
        )  # fmt: skip
        return
    dtype = experts[0].dtype
    logger.warning(
        "fastlm: MXFP4 experts dequantised to %s (fastlm has no MXFP4 kernels): %d bits a "
        "weight, %.1fx the checkpoint's %.2f",
        dtype, dtype.itemsize * 8, dtype.itemsize * 8 / MXFP4_BITS_PER_WEIGHT,
        MXFP4_BITS_PER_WEIGHT,
    )  # fmt: skip


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """MXFP4 to floating point: blocks uint8 (..., G, 16) and scales uint8 (..., G) give
    (..., G·32) in ``dtype`` (computed in fp32, where every MXFP4 value but 6·2^128 is exact,
    then rounded once). Usage: ``w = dequantize_mxfp4(blocks, scales, torch.bfloat16)``.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype}, {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MX_BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}: expected "
            f"(..., G, {MX_BLOCK // 2}) and (..., G)"
        )
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1)  # low nibble first
    elements = lut[codes.long()].flatten(-2)  # (..., G, 32)
    exponent = scales.to(torch.float32) - E8M0_BIAS
    scale = torch.where(scales == E8M0_NAN, torch.nan, torch.exp2(exponent))
    return (elements * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def load_nf4_from_mxfp4(
    load: Callable[..., nn.Module],
    model_name: str,
    moe: MixtureOfExperts,
    **kwargs,
) -> nn.Module:
    """``load(model_name, **kwargs)`` (``from_pretrained`` with an NF4 config and a config
    without the checkpoint's MXFP4 one) with every experts parameter then set to the values its
    ``_blocks`` / ``_scales`` define. transformers' load report is held back when it lists only
    those (the parameters it calls missing, the tensors it calls unexpected), shown otherwise.

    Usage: ``model = load_nf4_from_mxfp4(AutoModelForCausalLM.from_pretrained, path, moe)``.
    """
    with _held_load_report() as held:
        model, info = load(model_name, output_loading_info=True, **kwargs)
    targets = {
        f"{path}.{param}": getattr(module, param)
        for path, module in model.named_modules()
        if type(module).__name__ == moe.experts_class
        for param in (moe.gate_up, moe.down)
    }
    stored = {f"{name}_{part}" for name in targets for part in ("blocks", "scales")}
    unexplained = (set(info["missing_keys"]) - targets.keys()) | (
        set(info["unexpected_keys"]) - stored
    )
    if unexplained or info["mismatched_keys"] or not targets:
        for record in held:  # something else is wrong: transformers' report as it was
            logging.getLogger(record.name).handle(record)
    files = _tensor_files(model_name, kwargs.get("token"), kwargs.get("revision"))
    for name, parameter in targets.items():
        _write_decoded(parameter, name, files)
    return model


@contextlib.contextmanager
def _held_load_report() -> Iterator[list[logging.LogRecord]]:
    """transformers' load report records, kept out of the log while the block runs."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(hold)
    try:
        yield held
    finally:
        report_logger.removeFilter(hold)


def _tensor_files(model_name: str, token: str | None, revision: str | None) -> dict[str, Path]:
    """``model_folder.tensor_files`` of a local folder or of a Hub checkpoint (already in the
    cache: transformers has just loaded it)."""
    if os.path.isdir(model_name):
        return tensor_files(model_name)
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        model_name, revision=revision, token=token, allow_patterns=["*.safetensors*"],
        local_files_only=True,  # transformers has just fetched them: no second request
    )  # fmt: skip
    return tensor_files(folder)


def _write_decoded(parameter: torch.Tensor, name: str, files: dict[str, Path]) -> None:
    """``parameter`` (E, in, out) := the decoded ``<name>_blocks`` / ``_scales``, one expert at
    a time, in the parameter's dtype and on its device."""
    from safetensors import safe_open

    keys = (f"{name}_blocks", f"{name}_scales")
    if not all(key in files for key in keys):
        raise ValueError(f"MXFP4 checkpoint without {keys[0]} / {keys[1]}: cannot fill {name}")
    if parameter.device.type == "meta":
        raise NotImplementedError(
            f"{name} was offloaded by device_map: an MXFP4 checkpoint with load_in_4bit needs "
            "every layer on a device (device_map='auto' with enough GPU or CPU memory)."
        )
    with safe_open(files[keys[0]], "pt") as f_blocks, safe_open(files[keys[1]], "pt") as f_scales:
        blocks, scales = f_blocks.get_slice(keys[0]), f_scales.get_slice(keys[1])
        experts, inputs, outputs = parameter.shape
        shape = (experts, outputs, inputs // MX_BLOCK, MX_BLOCK // 2)
        if tuple(blocks.get_shape()) != shape:
            raise ValueError(
                f"{keys[0]} has shape {tuple(blocks.get_shape())}; {name} {tuple(parameter.shape)}"
                f" needs {shape}"
            )
        with torch.no_grad():
            for expert in range(experts):
                rows = dequantize_mxfp4(blocks[expert], scales[expert], parameter.dtype)
                parameter[expert].copy_(rows.T)  # (out, in) -> (in, out)
