"""Finite weights: the scan that names tensors holding NaN or inf, at load and when a run stops.

One pass over the weights where they live (GPU or CPU). Each tensor is summed in fp32
(``torch.sum(w, dtype=torch.float32)``, no copy of the weight): NaN + x = NaN and inf + finite =
inf, so a tensor holding a NaN or inf always has a non-finite sum. The sums are stacked per device
and read with one host synchronisation per device. Only tensors whose sum is not finite are then
counted element by element (in chunks, to bound the temporary), so a finite tensor whose sum merely
overflowed fp32 (values around 1e34) is never reported.

4-bit weights (bitsandbytes NF4) are integer codes: a dequantised value is ``code[q]·absmax[b]``,
with double quantisation ``absmax = code2[q2]·absmax2[b2] + offset``. The code tables of finite
values are fixed, so a dequantised 4-bit weight is finite exactly when the float tensors of its
quant state are; those are checked instead of dequantising (absmax is 1/64 of the weight or less).
Only parameters are checked: buffers are rebuilt at load (RoPE tables) or hold -inf on purpose
(causal masks in some architectures).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fastlm.errors import NonFiniteWeightsError

NON_FINITE_ADVICE = (
    "Lower the learning rate, check the data for broken examples, use bf16 rather than fp16 on "
    "GPUs that support it, or clip gradients (max_grad_norm)."
)
_COUNT_CHUNK = 1 << 24  # elements per isfinite() pass when counting: a 16 MB bool temporary
_LISTED = 3  # tensors named in a message; the rest are counted


@dataclass(frozen=True)
class NonFiniteTensor:
    """A tensor holding NaN or inf: its name, how many of its values, and whether it is trained."""

    name: str
    count: int
    numel: int
    trainable: bool

    def describe(self) -> str:
        """``model.layers.0.mlp.up_proj.weight (1 of 4,096 values)``."""
        return f"{self.name} ({self.count:,} of {self.numel:,} values)"


def nonfinite_tensors(module: nn.Module, trainable_only: bool = False) -> list[NonFiniteTensor]:
    """The parameters of ``module`` (and 4-bit quant states) that hold NaN or inf, in order.

    Usage: ``for t in nonfinite_tensors(model): print(t.describe())``. One pass over the weights,
    one host synchronisation per device (see the module doc).
    """
    checked = list(_checked_tensors(module, trainable_only))
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor, _) in enumerate(checked):
        by_device.setdefault(tensor.device, []).append(index)
    suspects = []
    for indices in by_device.values():
        sums = torch.stack([torch.sum(checked[i][1], dtype=torch.float32) for i in indices])
        finite = torch.isfinite(sums).cpu()
        suspects += [i for i, ok in zip(indices, finite.tolist()) if not ok]
    found = []
    for index in sorted(suspects):
        name, tensor, trainable = checked[index]
        count = _count_nonfinite(tensor)
        if count:  # else the sum overflowed: large values, but finite ones
            found.append(NonFiniteTensor(name, count, tensor.numel(), trainable))
    return found


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Raise ``NonFiniteWeightsError`` naming the loaded weights of ``model`` that hold NaN/inf.

    Usage: ``check_finite_weights(model, "./llama")`` right after loading it from ``source``.
    """
    bad = nonfinite_tensors(model)
    if bad:
        raise NonFiniteWeightsError(
            f"{source}: {listed(bad)} hold NaN/inf values: the checkpoint is damaged or was saved "
            "after a diverged run. Load an earlier checkpoint or download / convert it again "
            "(check_finite_weights=False loads it as it is)."
        )


def likely_cause(model: nn.Module | None) -> str:
    """Advice for a NaN/inf in training: the non-finite weights of ``model`` if any, else the
    usual causes. Usage: ``raise NonFiniteLossError(f"... {likely_cause(model)}")``."""
    bad = nonfinite_tensors(model) if model is not None else []
    frozen = [t for t in bad if not t.trainable]
    trained = [t for t in bad if t.trainable]
    if frozen:  # the likeliest cause: nothing trains them, so they were broken before training
        return (
            f"Frozen weights hold NaN/inf: {listed(frozen)}; the checkpoint is damaged, or they "
            "were changed after loading (fastlm checks them at load)."
        )
    if trained:
        return f"Trained weights hold NaN/inf: {listed(trained)}. {NON_FINITE_ADVICE}"
    return NON_FINITE_ADVICE


def listed(tensors: list[NonFiniteTensor]) -> str:
    """``a (1 of 8 values), b (...)`` or ``28 tensors (first: a, b, c)``."""
    names = ", ".join(t.describe() for t in tensors[:_LISTED])
    if len(tensors) <= _LISTED:
        return names
    return f"{len(tensors)} tensors (first: {names})"


# --------------------------------------------------------------------------- helpers


def _checked_tensors(module: nn.Module, trainable_only: bool) -> Iterator[tuple]:
    """(name, tensor, trainable) for every floating-point parameter or 4-bit quant state."""
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            for part, tensor in _quant_state_tensors(quant_state):
                yield f"{name}.{part}", tensor, param.requires_grad
            continue
        tensor = param.detach()
        if hasattr(tensor, "to_local"):  # an FSDP2 shard (DTensor): this rank's part
            tensor = tensor.to_local()
        if tensor.is_floating_point() and tensor.device.type != "meta":
            yield name, tensor, param.requires_grad


def _quant_state_tensors(state, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for attr in ("absmax", "code", "offset"):
        value = getattr(state, attr, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            yield f"{prefix}{attr}", value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _quant_state_tensors(nested, prefix + "state2.")


def _count_nonfinite(tensor: torch.Tensor) -> int:
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[start : start + _COUNT_CHUNK])).sum())
        for start in range(0, flat.numel(), _COUNT_CHUNK)
    )
