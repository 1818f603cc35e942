"""Token states → one vector per text: pooling, the optional dense projections, normalisation.

With ``h`` the (B, S, H) last hidden states and ``m`` the (B, S) attention mask:

- ``mean``:      e_b = Σ_s m_bs·h_bs / max(Σ_s m_bs, 1e-9)           (EmbeddingGemma, MiniLM)
- ``cls``:       e_b = h_b,first(m_b=1)  (position 0 under right padding)          (BGE-M3)
- ``lasttoken``: e_b = h_b,last(m_b=1)   (the final real token, either padding side)  (Qwen3)
- ``max``:       e_b = max_s over real tokens of h_bs

Positions are found from the mask, never assumed, so left- and right-padded batches pool the
same tokens. Padded rows never enter a sum (``where``, not a product), so a NaN/inf a model
leaves at a padded position cannot leak into a text's vector.

A packed row (``padding_free``: (T, H) states, text b at [a_b, a_b+1) of ``cu_seqlens``) pools
the same tokens (``pool_packed``): cls = h_{a_b}, lasttoken = h_{a_b+1 − 1}; mean and max put
the states back in (B, L, H) (L the longest text) and apply the formulas above.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

POOLING_MODES = ("mean", "cls", "lasttoken", "max")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool (B, S, H) token states to (B, H). Usage: ``pool(h, mask, "lasttoken")``."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling={mode!r}: choose one of {POOLING_MODES}")
    mask = attention_mask.to(hidden.device).bool()  # (B, S)
    if mode == "mean":  # summed in fp32: bf16 sums over long texts lose digits
        summed = torch.where(mask.unsqueeze(-1), hidden.float(), 0).sum(dim=1)
        count = mask.sum(dim=1, keepdim=True).to(summed.dtype)
        return summed / count.clamp_min(1e-9)
    if mode == "max":
        return torch.where(mask.unsqueeze(-1), hidden, float("-inf")).amax(dim=1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "cls":
        index = mask.int().argmax(dim=1)  # first real token
    else:  # lasttoken: S-1 minus the distance of the last real token from the end
        index = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
    return hidden[rows, index]


def pool_packed(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int, mode: str
) -> torch.Tensor:
    """Pool a packed row's (T, H) token states to (B, H), text b at [cu[b], cu[b+1]).

    Usage: ``pool_packed(h[0], packed.cu_seqlens, packed.max_length, "mean")``.
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling={mode!r}: choose one of {POOLING_MODES}")
    cu = cu_seqlens.to(hidden.device).long()
    if mode == "cls":
        return hidden.index_select(0, cu[:-1])  # each text's first token
    if mode == "lasttoken":
        return hidden.index_select(0, cu[1:] - 1)  # each text's last token
    # mean / max: (B, L, H) with the mask pool() reads; index_copy, whose backward is a gather
    # (deterministic on CUDA, unlike index_add), and pool()'s own summation order.
    batch, total = cu.numel() - 1, hidden.shape[0]
    lengths = cu.diff()
    text = torch.arange(batch, device=hidden.device).repeat_interleave(lengths, output_size=total)
    offset = torch.arange(total, device=hidden.device) - cu[:-1].repeat_interleave(
        lengths, output_size=total
    )
    slots = text * max_length + offset  # token t's place in (B, L) laid end to end
    padded = hidden.new_zeros(batch * max_length, hidden.shape[-1]).index_copy(0, slots, hidden)
    mask = torch.arange(max_length, device=hidden.device) < lengths[:, None]  # (B, L)
    return pool(padded.view(batch, max_length, -1), mask, mode)


class Dense(nn.Module):
    """``activation(linear(x))``: a Sentence-Transformers Dense module (same state-dict keys).

    Usage: ``Dense(768, 3072, bias=False, activation="torch.nn.modules.linear.Identity")``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "torch.nn.modules.activation.Tanh",
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_name = activation
        self.activation = _activation(activation)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x.to(self.linear.weight.dtype)))

    def config(self) -> dict:
        """The ``config.json`` Sentence-Transformers writes for this module."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.linear.bias is not None,
            "activation_function": self.activation_name,
        }


def _activation(name: str) -> nn.Module:
    # Only torch.nn classes: a config file must not be able to import arbitrary code.
    aliases = {"Identity": "torch.nn.modules.linear.Identity", "Tanh": "torch.nn.Tanh"}
    name = aliases.get(name, name)
    module_name, _, class_name = name.rpartition(".")
    if not module_name.startswith("torch."):
        raise ValueError(f"dense activation {name!r}: only torch.nn activation classes load")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"dense activation {name!r} is not a torch.nn.Module class")
    return cls()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit-length rows, computed in fp32. Usage: ``e = l2_normalize(pooled)``."""
    return F.normalize(x.float(), p=2.0, dim=-1)
