"""How the benchmarks time things: CUDA-event medians, peak memory, the timed training loop.

Stdlib only at import time (torch is imported by the functions), like the other helper modules.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

# The reference loop's AdamW: torch's default ("foreach", multi-tensor, whose update allocates
# temporaries as large as the trainable parameters), or "fused" (one kernel, no temporaries:
# what the HF Trainer runs by default with torch >= 2.8). Every system of a run gets the same;
# set it for the parent and its children inherit it. Each record says which ran.
OPTIMIZER_ENV = "FASTLM_BENCH_OPTIMIZER"
OPTIMIZERS = ("foreach", "fused")


def optimizer_kind() -> str:
    """The AdamW implementation the loop runs (``FASTLM_BENCH_OPTIMIZER``, default foreach)."""
    kind = os.environ.get(OPTIMIZER_ENV, "foreach")
    if kind not in OPTIMIZERS:
        raise SystemExit(f"{OPTIMIZER_ENV}={kind!r}: use one of {', '.join(OPTIMIZERS)}")
    return kind


def reference_adamw(torch, trainable: list):
    """The reference loop's AdamW (lr 2e-4) over ``trainable``, fused where
    ``FASTLM_BENCH_OPTIMIZER=fused``; ``optimizer.defaults["fused"]`` says which.

    Usage: ``optimizer = reference_adamw(torch, trainable_parameters)``.
    """
    fused = {"fused": True} if optimizer_kind() == "fused" else {}
    return torch.optim.AdamW(trainable, lr=2e-4, **fused)


def cuda_median_ms(fn, torch, iters: int, warmup: int, repeat: int = 1) -> float:
    """Median over `iters` samples of `repeat` back-to-back calls of `fn` between two CUDA
    events, divided by `repeat`, after `warmup` untimed calls (milliseconds)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / repeat)
    return statistics.median(samples)


def kernel_time(torch, averages, passes: int) -> tuple[float, int]:
    """(GPU kernel ms, kernel launches) per pass from a profiler's ``key_averages()``. Kernel
    rows only: an operator's row repeats its kernels' time as its own "self" time."""
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1000 / passes
    return busy_ms, sum(e.count for e in kernels) // passes


def peak_mib(fn, torch) -> float:
    """How far one call of `fn` raises `max_memory_allocated` above what is allocated (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_gib(torch) -> float:
    """Peak GiB in use since the last reset: the allocator's peak of allocated memory, or, in a
    fastlm process that captured layer CUDA graphs, ``LAYER_GRAPHS.peak_bytes()``, which adds the
    graphs' private pool (scratch the allocator stops counting as allocated once a capture has
    ended, though every replay uses it) without counting a capture's scratch twice."""
    graphs = sys.modules.get("fastlm.offload.layer_graphs")
    if graphs is None:
        return torch.cuda.max_memory_allocated() / 2**30
    return graphs.LAYER_GRAPHS.peak_bytes() / 2**30


def layer_graph_counts() -> dict | None:
    """fastlm's layer CUDA graphs: how many layer pieces replayed, were captured or ran eagerly
    and why (None in other systems' processes)."""
    graphs = sys.modules.get("fastlm.offload.layer_graphs")
    return dict(graphs.LAYER_GRAPHS.counts) if graphs is not None else None


def layer_graph_pool_growth() -> dict | None:
    """MiB the layer graphs' private pool grew by, per kind of capture (a layer's forward, its
    backward, the loss; ``measure_peak`` on), or None outside fastlm's processes."""
    graphs = sys.modules.get("fastlm.offload.layer_graphs")
    if graphs is None:
        return None
    return {who: grown / 2**20 for who, grown in graphs.LAYER_GRAPHS.pool_growth.items()}


def autocast(torch, cuda: bool):
    """bf16 autocast on the GPU; CPU (smoke tests only) runs fp32 without autocast."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def timed_training(model, loss_fn, *, warmup: int, steps: int, record_dtypes: bool = False) -> dict:
    """The reference loop around `loss_fn()`: bf16 autocast forward, backward, AdamW (lr 2e-4)
    on the trainable parameters (foreach, or fused with ``FASTLM_BENCH_OPTIMIZER=fused``).

    Peak memory counts from just before the first warm-up step; `steps` steps are timed between
    two synchronisations. Losses are read (`.item()`) only after the timed region. Returns the
    loop's part of the record; `timed_s` is the timed region's length.
    """
    import torch

    cuda = torch.cuda.is_available()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = reference_adamw(torch, trainable)
    fused = bool(optimizer.defaults["fused"])
    model.train()

    def step():
        with autocast(torch, cuda):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(step())
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    sync()
    elapsed = time.perf_counter() - t0
    values = [float(x.item()) for x in losses]
    rec = {
        "timed_s": elapsed,
        "warmup_s": warmup_s,
        "step0_loss": values[0] if values else None,
        "last_loss": values[-1] if values else None,
        "losses": values,
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer": f"AdamW ({'fused' if fused else 'foreach' if cuda else 'for-loop'})",
    }
    if record_dtypes:
        rec["trainable_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    rec["peak_gib"] = peak_gib(torch) if cuda else None
    rec["layer_graphs"] = layer_graph_counts()
    rec["layer_graph_pool_growth_mib"] = layer_graph_pool_growth()
    rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
    return rec
