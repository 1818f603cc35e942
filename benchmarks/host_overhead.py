"""Host time of one training step: a shape's architecture and depth, with the GPU work made tiny.

    python benchmarks/host_overhead.py --shape qwen3-4b --mode qlora --system fastlm [--cprofile 40]

Small training shapes are paced by the CPU that launches the kernels, not by the GPU. This script
keeps a shape's model type, depth and config, shrinks its widths (hidden 128, two heads of 64,
MLP 256, vocab 512) and the batch (1 × 64 tokens), and times the reference loop's
step (bf16 autocast forward, backward, AdamW). Each kernel then takes a few microseconds, so a
step's wall time is the host's time to issue it: Python, autograd, the launches. Run it for each
system in turn (each in its own process, as the training benchmark does) to compare their host
cost per step; ``--cprofile N`` adds the N Python functions with the most own time in one step.
A diagnosis aid: the numbers that count come from ``train_bench.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastlm

from fastlm.benchmarking.checkpoint import CACHE, ensure_checkpoint  # noqa: E402
from fastlm.benchmarking.shapes import get_shape  # noqa: E402
from fastlm.benchmarking.systems import LOADERS, Ctx, preimport  # noqa: E402
from fastlm.benchmarking.timing import kernel_time  # noqa: E402

# Widths that keep every kernel tiny but every code path alive (4-bit blocks of 64 divide them).
_NARROW = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 512,
}


def narrow_twin(name: str):
    """The shape ``name`` with its widths shrunk and its depth and architecture kept."""
    shape = get_shape(name)
    config = {**shape.config, **_NARROW}
    return dataclasses.replace(shape, name=f"{name}-narrow", config=config, batch=1, seq=64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--system", default="fastlm")
    parser.add_argument("--mode", choices=("lora", "qlora"), default="qlora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cprofile", type=int, default=0, help="list this many functions")
    parser.add_argument("--sort", default="tottime", help="cProfile order: tottime, cumulative")
    parser.add_argument("--cache", default=CACHE)
    parser.add_argument("--checkpointing", default="fastlm", help="fastlm's checkpointing mode")
    args = parser.parse_args(argv)
    preimport(args.system)
    import torch

    shape = narrow_twin(args.shape)
    path = ensure_checkpoint(shape, args.cache)["path"]
    cuda = torch.cuda.is_available()  # the CPU: a dry run of the script, nothing to learn
    dtype = torch.bfloat16 if cuda else torch.float32
    ctx = Ctx(shape=shape, path=path, mode=args.mode, seq=shape.seq, cuda=cuda, dtype=dtype,
              checkpointing=args.checkpointing)  # fmt: skip
    model = LOADERS[args.system](ctx)
    device = "cuda" if cuda else "cpu"
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq), device=device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()

    def step():  # the reference loop's step (timing.timed_training), one optimizer throughout
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_ms = (time.perf_counter() - start) / args.steps * 1000
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        sync()
    gpu_ms, launches = kernel_time(torch, profiler.key_averages(), passes=1)
    layers = shape.config["num_hidden_layers"]
    print(f"== {args.system} {shape.name} ({layers} layers) {args.mode} ==")
    print(
        f"host-paced step {step_ms:.1f} ms ({step_ms / layers * 1000:.0f} us per layer), "
        f"{launches} launches ({step_ms * 1000 / max(launches, 1):.1f} us each), "
        f"GPU busy {gpu_ms:.1f} ms"
    )
    if args.cprofile:
        profile = cProfile.Profile()
        profile.enable()
        step()
        sync()
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.cprofile)
        print(out.getvalue())


if __name__ == "__main__":
    main()
