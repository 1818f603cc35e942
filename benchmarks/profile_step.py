"""Where a training step's GPU time goes: torch.profiler over two steps of the reference loop.

    python benchmarks/profile_step.py --shape llama-3.2-1b --system fastlm [--rows 30]

Prints the kernels sorted by total CUDA time (a diagnosis aid; the numbers that count come from
train_bench.py). ``--memory-snapshot FILE`` also records one more step's allocations
(``torch.cuda.memory._record_memory_history``), dumps the allocator snapshot to FILE (for
pytorch.org/memory_viz) and prints what is live at that step's peak, by the code that allocated
it (``fastlm.benchmarking.memory_peak``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastlm

from fastlm.benchmarking.checkpoint import CACHE, ensure_checkpoint  # noqa: E402
from fastlm.benchmarking.shapes import get_shape  # noqa: E402
from fastlm.benchmarking.systems import LOADERS, Ctx, preimport  # noqa: E402
from fastlm.benchmarking.timing import kernel_time, reference_adamw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--system", default="fastlm")
    parser.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--cache", default=CACHE)
    parser.add_argument("--checkpointing", default="fastlm", help="fastlm's checkpointing mode")
    parser.add_argument("--host", action="store_true", help="also list operators by host time")
    parser.add_argument("--no-graphs", action="store_true", help="fastlm: no layer CUDA graphs")
    parser.add_argument("--memory-snapshot", help="dump one step's allocator snapshot here")
    args = parser.parse_args()
    from fastlm.offload.layer_graphs import LAYER_GRAPHS

    LAYER_GRAPHS.enabled = not args.no_graphs
    LAYER_GRAPHS.measure_peak = True  # peak_bytes() counts the pool once
    preimport(args.system)
    import torch

    shape = get_shape(args.shape)
    path = ensure_checkpoint(shape, args.cache)["path"]
    ctx = Ctx(
        shape=shape,
        path=path,
        mode=args.mode,
        seq=shape.seq,
        cuda=True,
        dtype=torch.bfloat16,
        checkpointing=args.checkpointing,
    )
    model = LOADERS[args.system](ctx)
    model.train()
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq), device="cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = reference_adamw(torch, trainable)  # as the benchmarks' loop

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    import time

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # the steps' peak, not loading's
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 5 * 1000
    if args.memory_snapshot:
        _memory_snapshot(torch, step, args.memory_snapshot)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    averages = profiler.key_averages()
    try:
        table = averages.table(sort_by="self_cuda_time_total", row_limit=args.rows)
    except (AttributeError, KeyError):
        table = averages.table(sort_by="self_device_time_total", row_limit=args.rows)
    gpu_ms, launches = kernel_time(torch, averages, passes=2)
    pool_gib = LAYER_GRAPHS.pool_bytes() / 2**30
    peak_gib = LAYER_GRAPHS.peak_bytes() / 2**30
    reserved_gib = torch.cuda.max_memory_reserved() / 2**30
    print(f"== {args.system} {args.shape} {args.mode}: 2 steps ==")
    print(
        f"wall {wall_ms:.1f} ms/step (unprofiled), GPU kernels {gpu_ms:.1f} ms/step and "
        f"{launches} kernels/step (profiled), peak {peak_gib:.2f} GiB (graph pool "
        f"{pool_gib:.2f} included), reserved {reserved_gib:.2f} GiB"
    )
    print(LAYER_GRAPHS.report())
    print(table)
    if args.host:
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


def _memory_snapshot(torch, step, path: str) -> None:
    """One recorded step: its allocator snapshot to ``path`` and its peak's live memory by site."""
    import pickle

    from fastlm.benchmarking.memory_peak import format_breakdown, peak_breakdown

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()  # what _dump_snapshot pickles
    torch.cuda.memory._record_memory_history(enabled=None)
    with open(path, "wb") as file:
        pickle.dump(snapshot, file)
    device = torch.cuda.current_device()
    print(format_breakdown(peak_breakdown(snapshot, device=device, before=before)))


if __name__ == "__main__":
    main()
