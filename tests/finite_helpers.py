"""Shared by the finite-guard tests: a NaN put into a loaded model, a loss term with an inf
gradient, and checks that nothing was updated or written with NaN/inf."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

BROKEN = "layers.0.mlp.up_proj"  # where the tests put a NaN


def break_base_weight(model: torch.nn.Module) -> None:
    """One NaN in the frozen base weight of ``BROKEN``, after loading (the load-time check
    refuses a checkpoint holding it)."""
    for name, param in model.named_parameters():
        if BROKEN in name and "lora" not in name and name.endswith("weight"):
            with torch.no_grad():
                param.view(-1)[0] = float("nan")
            return
    raise AssertionError(f"no {BROKEN} weight")


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable tensors."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """No optimizer step happened: every trainable tensor is as ``trainable`` copied it."""
    now = trainable(model)
    return now.keys() == before.keys() and all(torch.equal(now[n], before[n]) for n in now)


def non_finite_files(root: Path) -> list[str]:
    """The safetensors files under ``root`` that hold NaN/inf."""
    return [
        str(path)
        for path in Path(root).rglob("*.safetensors")
        if not all(torch.isfinite(t).all() for t in load_file(path).values())
    ]


def inf_gradient(model: torch.nn.Module) -> torch.Tensor:
    """A loss term whose value is 0 and whose gradient is +inf for every trainable weight:
    d/dw (s − s₀)^½ = ½·(s − s₀)^(−½)·ds/dw = inf at s = s₀, with s = Σ trainable weights."""
    total = sum(p.sum() for p in model.parameters() if p.requires_grad)
    return (total - total.detach()).pow(0.5)
