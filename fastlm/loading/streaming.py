"""The weight-streaming keywords of ``from_pretrained``: what was asked (or decided), checked.

request = streaming_request(kwargs, config, load_in_4bit=True, device="cuda", device_map="auto",
                            dtype=torch.bfloat16, max_seq_length=2048)
model = AutoModelForCausalLM.from_pretrained(path) if request is None else request.load(path)

The streaming itself is ``fastlm.offload``'s; this module only parses and decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fastlm.offload.memory_plan import DEFAULT_SLOTS, automatic_streaming_decision
from fastlm.offload.streamed_loading import load_streamed_model

logger = logging.getLogger("fastlm")


@dataclass
class StreamingRequest:
    """What ``FastModel.from_pretrained`` was asked (or decided) to stream; ``load`` does it."""

    device: str
    dtype: torch.dtype
    slots: int = DEFAULT_SLOTS
    resident_layers: int | str = "auto"
    folder: str | None = None
    max_seq_length: int | None = None
    reason: str = "offload_weights=True"
    options: dict = field(default_factory=dict)

    def load(
        self,
        model_name: str,
        dtype=None,
        device_map=None,
        token=None,
        trust_remote_code=False,
        **kwargs,
    ) -> nn.Module:
        """Load ``model_name`` streamed (the signature of ``from_pretrained``; the dtype and
        device were settled when the request was made)."""
        quantization_config = kwargs.pop("quantization_config", None)
        attn = kwargs.pop("attn_implementation", None)
        revision = kwargs.pop("revision", None)
        kwargs.pop("low_cpu_mem_usage", None)
        if "gguf_file" in kwargs:
            raise NotImplementedError(
                "offload_weights with gguf_file: weight streaming reads safetensors checkpoints."
            )
        if kwargs:
            raise TypeError(
                f"from_pretrained(..., offload_weights=True) does not take {sorted(kwargs)}"
            )
        if self.device == "cpu":
            logger.warning(
                "fastlm weight streaming on the CPU (no GPU): the layers are copied "
                "synchronously, which only makes sense for testing."
            )
        logger.info("fastlm: streaming the decoder layers from CPU RAM (%s)", self.reason)
        return load_streamed_model(
            model_name,
            dtype=self.dtype,
            device=self.device,
            quantization_config=quantization_config,
            slots=self.slots,
            resident_layers=self.resident_layers,
            folder=self.folder,
            token=token,
            revision=revision,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn,
            max_seq_length=self.max_seq_length,
        )


_OFFLOAD_KEYS = (
    "offload_weights",
    "offload_enabled",
    "offload_folder",
    "offload_slots",
    "offload_resident_layers",
)


def streaming_request(
    kwargs: dict,
    config,
    *,
    load_in_4bit: bool,
    device: str,
    device_map,
    dtype: torch.dtype,
    max_seq_length: int | None = None,
) -> StreamingRequest | None:
    """Pop the weight-offload keywords from ``kwargs``; a StreamingRequest, or None to load the
    model normally. Without keywords, a 4-bit model that does not fit the GPU is streamed (and
    the log says so); ``offload_weights=False`` never streams.

    Usage (inside from_pretrained): ``request = streaming_request(kwargs, config, ...)``.
    """
    options = {key: kwargs.pop(key) for key in _OFFLOAD_KEYS if key in kwargs}
    folder = options.get("offload_folder")
    asked = [options.get("offload_weights"), options.get("offload_enabled")]
    asked = [bool(v) for v in asked if v is not None]
    if folder is not None:
        asked.append(True)
    if True in asked and False in asked:
        raise ValueError(
            "conflicting weight-offload keywords: offload_weights/offload_enabled=False with "
            "offload_weights/offload_enabled=True or offload_folder."
        )
    slots = int(options.get("offload_slots", DEFAULT_SLOTS))
    # Asked for: every layer streamed unless told otherwise; chosen automatically: as many
    # layers as fit stay on the GPU.
    resident = options.get("offload_resident_layers", 0 if asked else "auto")
    if slots < 1:
        raise ValueError(f"offload_slots must be at least 1, got {slots}")
    if resident != "auto" and (not isinstance(resident, int) or resident < 0):
        raise ValueError(f"offload_resident_layers must be 'auto' or an int >= 0: {resident!r}")
    if asked and not asked[0]:
        return None
    reason = "requested"
    if not asked:  # automatic: a 4-bit model on a GPU that it does not fit
        if not load_in_4bit or device != "cuda":
            return None
        decision = automatic_streaming_decision(config, dtype, max_seq_length)
        if decision is None:
            return None
        reason = decision
    if not load_in_4bit:
        raise NotImplementedError(
            "offload_weights streams 4-bit NF4 weights: pass load_in_4bit=True as well "
            "(16-bit weight streaming is not implemented)."
        )
    if device_map not in (None, "auto", "cuda", "cpu") and not (
        isinstance(device_map, dict) and set(device_map) == {""}
    ):
        raise ValueError(
            f"offload_weights places the model itself; device_map={device_map!r} cannot be "
            "combined with it (use device_map='auto')."
        )
    return StreamingRequest(
        device=device,
        dtype=dtype,
        slots=slots,
        resident_layers=resident,
        folder=None if folder is None else str(folder),
        max_seq_length=max_seq_length,
        reason=reason,
        options=options,
    )
