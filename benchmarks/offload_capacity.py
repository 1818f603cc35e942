#!/usr/bin/env python
"""Weight streaming on the GPU: exactness (Llama-3.1-8B shape) and capacity (Qwen2.5-32B shape).

    python benchmarks/offload_capacity.py --out benchmarks/results/<date>-h100-offload-capacity

Two parts, each in its own Python process (this script with --child PART), so that peak-memory
figures and the memory cap belong to that part alone:

- ``exactness``: a random-weight Llama-3.1-8B-shape NF4 model (bitsandbytes NF4, double quant,
  bf16 compute) built straight into pinned CPU RAM and streamed (``--slots`` GPU slots), LoRA
  r=16 on all seven projections with random A and B (so every LoRA gradient is non-zero),
  checkpointing ``--checkpointing``; one forward + backward under bf16 autocast on a seeded
  random batch (``--exact-seq`` tokens). Then the same model is made resident
  (``unstream_weights``) and the step repeated twice. Recorded: loss and every LoRA gradient of
  the streamed step against the resident one (bit-identical, or else the largest relative
  difference next to the resident run's own run-to-run difference), and both step times and peak
  memories.
- ``capacity``: ``torch.cuda.set_per_process_memory_fraction`` caps the process at ``--cap-gib``
  (8 GiB); a random-weight Qwen2.5-32B-shape NF4 model (hidden 5120, 64 layers, 40/8 heads,
  intermediate 27648, vocab 152064, q/k/v bias, untied head) is built into pinned RAM without
  ever being on the GPU, LoRA r=16 on all projections, batch 1 x ``--seq`` 2048 tokens,
  ``--warmup`` + ``--steps`` optimiser steps with torch's fused AdamW -- and, only if that runs
  out of memory, again in a fresh process with bitsandbytes' AdamW8bit (``--optimizer``
  lists the order). Recorded: the memory plan printed before training, peak GPU memory
  allocated and reserved, host RSS and pinned bytes, step time, the bytes copied per step and
  the bandwidth that implies. An out-of-memory error is recorded as such (with the plan).

``--capacity-shape`` runs the capacity part on a benchmark shape instead (issue 18's MoE one:
``--capacity-shape qwen3-30b-a3b-24l``, experts stored NF4 and streamed with their layer), and
``--resident`` repeats it with every layer on the GPU and no cap: the step time streaming is
compared with.

Output (``--out``): results.json (records, command, date, device, versions), results.md (table),
and each child's log under logs/. The table is also printed. The whole run stays within
``--total-timeout`` (560 s). Without CUDA the script exits with an error (``--help`` works
anywhere; ``--tiny-cpu`` runs the same code on tiny shapes on the CPU, as a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402, F401  (puts this checkout's fastlm on sys.path)

from fastlm.benchmarking.processes import (  # noqa: E402
    OFFLINE_ENV,
    child_env,
    dist_version,
    log_tail,
    run_recorded,
)
from fastlm.benchmarking.shapes import QWEN_COMMON, SHAPES, dims  # noqa: E402  (stdlib only)
from fastlm.benchmarking.timing import autocast  # noqa: E402

GIB = 1024**3
CHILD_ENV = {
    **OFFLINE_ENV,
    # Fewer, growable segments: less fragmentation under a hard cap.
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}

QWEN25_32B = {
    **QWEN_COMMON,
    **dims(vocab=152064, hidden=5120, intermediate=27648, layers=64, heads=40, kv_heads=8),
    "tie_word_embeddings": False,
}
PARTS = {
    "exactness": ("llama-3.1-8b", "llama", SHAPES["llama-3.1-8b"].config),
    "capacity": ("qwen2.5-32b", "qwen2", QWEN25_32B),
}
# --tiny: the same code on small shapes (CPU smoke test of this script, or a quick GPU check).
_TINY = dims(vocab=256, hidden=64, intermediate=160, layers=5, heads=4, kv_heads=2, head_dim=16)


class _Device:
    """The few device calls the children make: CUDA, or the CPU for --tiny smoke tests."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.name = "cuda" if cuda else "cpu"
        self.dtype = torch.bfloat16 if cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self, reserved: bool = False) -> float:
        if not self.cuda:
            return float("nan")
        memory = self.torch.cuda
        return (memory.max_memory_reserved() if reserved else memory.max_memory_allocated()) / GIB

    def autocast(self):
        return autocast(self.torch, self.cuda)


# --------------------------------------------------------------------------------------------
# Children.
# --------------------------------------------------------------------------------------------
def _part(part: str, args) -> tuple[str, str, dict]:
    """(shape name, model_type, config) of a part: the capacity part's --capacity-shape, if
    given, is a benchmark shape (e.g. the MoE ``qwen3-30b-a3b-24l``)."""
    if part == "capacity" and args.capacity_shape:
        shape = SHAPES[args.capacity_shape]
        return shape.name, shape.model_type, shape.config
    return PARTS[part]


def _config(part: str, args):
    from transformers import AutoConfig

    _, model_type, config = _part(part, args)
    config = {**config, **(_TINY if args.tiny else {})}
    if args.tiny and "num_experts" in config:  # a MoE shape: few, narrow experts
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return AutoConfig.for_model(model_type, **config)


def _lora_model(config, args, dev: _Device, *, stream: bool, random_b: bool):
    from fastlm import FastModel, models
    from fastlm.offload import build_random_nf4_model, place_trainable

    attn = "sdpa" if dev.cuda else None
    model = build_random_nf4_model(
        config, dtype=dev.dtype, device=dev.name, seed=0, slots=args.slots, stream=stream,
        attn_implementation=attn,
    )  # fmt: skip
    model.max_seq_length = max(args.seq, args.exact_seq)
    models.patch_model(model, models.spec_for(model.config), model.max_seq_length)
    checkpointing = True if args.checkpointing == "true" else "fastlm"
    model = FastModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=args.rank,
        init_lora_weights=not random_b,  # False: A and B both random, every gradient non-zero
        use_gradient_checkpointing=checkpointing,
        random_state=3407,
    )
    place_trainable(model)
    model.train()
    return model


def _batch(vocab: int, batch: int, seq: int, dev: _Device):
    import torch

    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids.to(dev.name)


def _forward_backward(model, ids, dev: _Device):
    model.zero_grad(set_to_none=True)
    with dev.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def _lora_grads(model) -> dict:
    return {
        name: param.grad.detach().float().cpu()
        for name, param in model.named_parameters()
        if param.grad is not None
    }


def _compare(expected: dict, actual: dict) -> dict:
    worst, identical = 0.0, True
    for name, grad in expected.items():
        other = actual[name]
        identical = identical and bool((grad == other).all())
        scale = grad.norm().clamp_min(1e-30)
        worst = max(worst, float((grad - other).norm() / scale))
    return {"bit_identical": identical, "max_rel_diff": worst, "tensors": len(expected)}


def _timed(fn, repeats: int, dev: _Device) -> list[float]:
    times = []
    for _ in range(repeats):
        dev.sync()
        start = time.perf_counter()
        fn()
        dev.sync()
        times.append(time.perf_counter() - start)
    return times


def _host_rss() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def child_exactness(args, dev: _Device) -> dict:
    from fastlm.offload import get_weight_streamer, unstream_weights

    config = _config("exactness", args)
    dev.reset_peak()
    start = time.perf_counter()
    model = _lora_model(config, args, dev, stream=True, random_b=True)
    build_s = time.perf_counter() - start
    streamer = get_weight_streamer(model)
    ids = _batch(config.vocab_size, 1, args.exact_seq, dev)

    def step():
        return _forward_backward(model, ids, dev)

    dev.reset_peak()
    streamed_loss = step().item()
    streamed = _lora_grads(model)
    streamer.stats.reset()
    streamed_times = _timed(step, 2, dev)
    copies = streamer.stats.copies // 2
    streamed_peak = dev.peak()
    plan = streamer.weight_plan()

    unstream_weights(model)
    dev.reset_peak()
    resident_loss = step().item()
    resident = _lora_grads(model)
    repeat_loss = step().item()
    repeat = _lora_grads(model)
    resident_times = _timed(step, 2, dev)
    resident_peak = dev.peak()

    versus = _compare(resident, streamed)
    floor = _compare(resident, repeat)
    exact = streamed_loss == resident_loss and versus["max_rel_diff"] <= 2 * floor["max_rel_diff"]
    return {
        "status": "ok",
        "passed": bool(exact),
        "shape": PARTS["exactness"][0] + ("-tiny" if args.tiny else ""),
        "layers": config.num_hidden_layers,
        "seq": args.exact_seq,
        "loss_streamed": streamed_loss,
        "loss_resident": resident_loss,
        "loss_resident_repeat": repeat_loss,
        "streamed_vs_resident": versus,
        "resident_vs_resident": floor,
        "build_s": build_s,
        "step_s_streamed": min(streamed_times),
        "step_s_resident": min(resident_times),
        "peak_gib_streamed": streamed_peak,
        "peak_gib_resident": resident_peak,
        "copies_per_step": copies,
        "transfer_gib_per_step": plan.transfer_per_step / GIB,
        "bandwidth_gbs": (plan.bandwidth or 0) / 1e9,
        "pinned_gib": plan.host.get("streamed weights (pinned)", 0) / GIB,
    }


def child_capacity(args, dev: _Device) -> dict:
    import torch

    from fastlm.offload import get_weight_streamer, plan_memory

    stream = not args.resident
    if dev.cuda and stream:  # before anything is allocated: the cap counts reserved memory
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    config = _config("capacity", args)
    record: dict = {
        "status": "ok",
        "shape": _part("capacity", args)[0] + ("-tiny" if args.tiny else ""),
        "streamed": stream,
        "layers": config.num_hidden_layers,
        "seq": args.seq,
        "batch": args.batch,
        "cap_gib": args.cap_gib if stream else None,
        "optimizer": args.optimizer,
        "checkpointing": args.checkpointing,
    }
    try:
        start = time.perf_counter()
        model = _lora_model(config, args, dev, stream=stream, random_b=False)
        record["build_s"] = time.perf_counter() - start
        record["peak_gib_while_loading"] = dev.peak()
        streamer = get_weight_streamer(model)
        plan = plan_memory(model, batch_size=args.batch, seq_len=args.seq)
        record["plan"] = plan.format()
        record["plan_gpu_gib"] = plan.gpu_total / GIB
        record["pinned_gib"] = plan.host.get("streamed weights (pinned)", 0) / GIB
        record["pageable_gib"] = plan.host.get("streamed weights (pageable)", 0) / GIB
        record["bandwidth_gbs"] = (plan.bandwidth or 0) / 1e9
        record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(plan.format(), flush=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if args.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"--optimizer {args.optimizer!r}: use adamw or adamw8bit")
        if args.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(trainable, lr=2e-4)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=dev.cuda)
        ids = _batch(config.vocab_size, args.batch, args.seq, dev)
        dev.reset_peak()
        losses, times, copied = [], [], []
        for _ in range(args.warmup + args.steps):
            if streamer is not None:
                streamer.stats.reset()
            dev.sync()
            begin = time.perf_counter()
            loss = _forward_backward(model, ids, dev)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dev.sync()
            times.append(time.perf_counter() - begin)
            losses.append(loss.item())
            copied.append(streamer.stats.bytes if streamer is not None else 0)
        timed = times[args.warmup :] or times
        step_s = sorted(timed)[len(timed) // 2]
        record.update(
            {
                "losses": losses,
                "step_times_s": times,
                "step_s": step_s,
                "tokens_per_s": args.batch * args.seq / step_s,
                "peak_gib_allocated": dev.peak(),
                "peak_gib_reserved": dev.peak(reserved=True),
                "host_rss_gib": _host_rss(),
                "transfer_gib_per_step": copied[-1] / GIB,
                "plan_transfer_gib_per_step": plan.transfer_per_step / GIB,
                "effective_h2d_gbs": copied[-1] / step_s / 1e9,
            }
        )
    except torch.OutOfMemoryError as error:
        record.update(
            {
                "status": "oom",
                "error": str(error).splitlines()[0],
                "peak_gib_allocated": dev.peak(),
                "peak_gib_reserved": dev.peak(reserved=True),
                "memory_summary": torch.cuda.memory_summary(abbreviated=True),
            }
        )
    return record


def child_main(args) -> int:
    import torch

    record = {"part": args.child}
    try:
        cuda = torch.cuda.is_available() and not args.tiny_cpu
        if not cuda and not args.tiny_cpu:
            raise RuntimeError("no CUDA device")
        run = child_exactness if args.child == "exactness" else child_capacity
        record.update(run(args, _Device(cuda)))
        record["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    except Exception as error:  # the parent records it and goes on
        record.update({"status": "error", "error": f"{type(error).__name__}: {error}"})
        record["traceback"] = traceback.format_exc()[-4000:]
    args.record.write_text(json.dumps(record, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_child(part: str, name: str, argv: list[str], logs: Path, timeout: float) -> dict:
    log_path = logs / f"{name}.log"
    record_path = logs / f"{name}.record.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", part]
    cmd += ["--record", str(record_path)]
    start = time.perf_counter()
    env = child_env(CHILD_ENV, override=False, triton_interpret=not _has_cuda())
    record, why = run_recorded(cmd, log_path, record_path, env, timeout)
    if record is None:
        tail = log_tail(log_path)
        record = {"part": part, "status": "error", "error": f"child died ({why})", "log": tail}
    record["wall_s"] = time.perf_counter() - start
    return record


def _versions() -> dict:
    names = ("torch", "transformers", "peft", "bitsandbytes", "triton", "accelerate")
    out = {name: dist_version(name) for name in names}
    try:
        from fastlm.benchmarking.systems import git_revision

        out["fastlm_git"] = git_revision(REPO)
    except Exception:  # noqa: BLE001 - provenance is best-effort
        out["fastlm_git"] = None
    return out


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "—"


def table(records: list[dict]) -> str:
    lines = [
        "| part | shape | status | result | step s | peak GPU GiB (alloc / reserved) | "
        "host RSS GiB | pinned GiB | copied GiB/step | H2D GB/s (measured / effective) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in records:
        status = rec.get("status")
        if rec.get("part") == "exactness" and status == "ok":
            versus, floor = rec["streamed_vs_resident"], rec["resident_vs_resident"]
            result = (
                f"{'PASS' if rec['passed'] else 'FAIL'}: loss {rec['loss_streamed']:.6f} vs "
                f"{rec['loss_resident']:.6f}; grads "
                + (
                    "bit-identical"
                    if versus["bit_identical"]
                    else f"max rel {versus['max_rel_diff']:.1e} (resident repeat "
                    f"{floor['max_rel_diff']:.1e})"
                )  # fmt: skip
            )
            step = f"{rec['step_s_streamed']:.3f} (resident {rec['step_s_resident']:.3f})"
            peak = f"{rec['peak_gib_streamed']:.2f} (resident {rec['peak_gib_resident']:.2f})"
            rss, effective = "—", "—"
        elif rec.get("part") == "capacity" and status == "ok":
            result = (
                f"{rec['optimizer']}: loss {rec['losses'][0]:.4f} → {rec['losses'][-1]:.4f}; "
                f"{rec['tokens_per_s']:.0f} tok/s"
            )
            step = _fmt(rec["step_s"], ".2f")
            cap = f"cap {rec['cap_gib']:g}" if rec.get("cap_gib") else "resident, no cap"
            peak = f"{rec['peak_gib_allocated']:.2f} / {rec['peak_gib_reserved']:.2f} ({cap})"
            rss = _fmt(rec.get("host_rss_gib"), ".1f")
            effective = _fmt(rec.get("effective_h2d_gbs"), ".1f")
        else:
            result = (f"{rec['optimizer']}: " if rec.get("optimizer") else "") + str(
                rec.get("error", "")
            )[:120]
            step = "—"
            peak = _fmt(rec.get("peak_gib_allocated"), ".2f")
            rss, effective = "—", "—"
        lines.append(
            f"| {rec.get('part')} | {rec.get('shape', '—')} | {status} | {result} | {step} | "
            f"{peak} | {rss} | {_fmt(rec.get('pinned_gib'), '.2f')} | "
            f"{_fmt(rec.get('transfer_gib_per_step'), '.2f')} | "
            f"{_fmt(rec.get('bandwidth_gbs'), '.1f')} / {effective} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="fastlm weight streaming on the GPU: exactness and capacity.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--parts", default="exactness,capacity", help="comma-separated parts")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--cap-gib", type=float, default=8.0, help="GPU memory cap (capacity)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (capacity)")
    parser.add_argument("--batch", type=int, default=1, help="rows per batch (capacity)")
    parser.add_argument("--exact-seq", type=int, default=2048, help="tokens (exactness)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--slots", type=int, default=2, help="GPU slots of the streamer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (capacity)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (capacity)")
    parser.add_argument(
        "--checkpointing",
        choices=["fastlm", "true"],
        default="fastlm",
        help="fastlm: layer inputs offloaded to pinned RAM; true: kept on the GPU",
    )
    parser.add_argument(
        "--optimizer",
        default="adamw,adamw8bit",
        help="capacity: optimisers to try in order; the next runs only if one runs out of memory",
    )
    parser.add_argument(
        "--capacity-shape",
        default=None,
        choices=sorted(SHAPES),
        help="capacity: a benchmark shape instead of Qwen2.5-32B (e.g. qwen3-30b-a3b-24l, MoE)",
    )
    parser.add_argument(
        "--resident",
        action="store_true",
        help="capacity: the same steps with every layer on the GPU and no cap (the reference)",
    )
    parser.add_argument("--layers", type=int, default=None, help="override layer counts (smoke)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a quick check")
    parser.add_argument("--tiny-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-timeout", type=float, default=240, help="seconds per child")
    parser.add_argument("--total-timeout", type=float, default=560, help="seconds in all")
    parser.add_argument("--child", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.tiny = args.tiny or args.tiny_cpu  # the CPU smoke test runs the tiny shapes
    if args.child:
        return child_main(args)
    import torch

    if not torch.cuda.is_available() and not args.tiny_cpu:
        print(
            "offload_capacity.py measures weight streaming on a CUDA GPU and there is none here "
            "(torch.cuda.is_available() is False). Run it on the GPU machine.",
            file=sys.stderr,
        )
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"unknown parts {sorted(unknown)}; choose from {sorted(PARTS)}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    out = args.out or REPO / "benchmarks" / "results" / f"{stamp}-offload-capacity"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    child_argv = list(argv)  # a child reads its part from --child
    meta = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu" if args.tiny_cpu else torch.cuda.get_device_name(),
        "host": {"hostname": platform.node(), "python": platform.python_version()},
        "versions": _versions(),
        "env": {k: os.environ.get(k, v) for k, v in CHILD_ENV.items()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    records: list[dict] = []
    deadline = time.perf_counter() + args.total_timeout
    runs = [("exactness", None)] if "exactness" in parts else []
    optimizers = [o.strip() for o in args.optimizer.split(",") if o.strip()]
    runs += [("capacity", o) for o in optimizers] if "capacity" in parts else []
    for part, optimizer in runs:
        if part == "capacity" and any(
            r.get("part") == "capacity" and r.get("status") != "oom" for r in records
        ):
            break  # a capacity run finished (or failed for another reason): no fallback needed
        left = deadline - time.perf_counter()
        if left < 30:
            records.append({"part": part, "status": "skipped", "error": "out of time"})
            continue
        extra = [] if optimizer is None else ["--optimizer", optimizer]
        name = part if optimizer is None else f"{part}-{optimizer}"
        print(f"[offload_capacity] {name} ...", flush=True)
        timeout = min(args.child_timeout, left)
        records.append(run_child(part, name, child_argv + extra, logs, timeout))
        (out / "results.json").write_text(
            json.dumps({**meta, "records": records}, indent=2, default=str)
        )
        rec = records[-1]
        print(f"[offload_capacity] {name}: {rec.get('status')} {rec.get('error', '')}", flush=True)
    text = table(records)
    plans = "\n\n".join(
        f"Memory plan printed before training ({r['shape']}):\n\n```\n{r['plan']}\n```"
        for r in records
        if r.get("plan")
    )
    header = (
        f"# Weight streaming: exactness and capacity\n\n{meta['device']}, "
        f"{', '.join(f'{k} {v}' for k, v in meta['versions'].items())}\n\n"
        f"Command: `{meta['command']}` ({meta['date']})\n\n"
    )
    (out / "results.md").write_text(header + text + "\n\n" + plans + "\n")
    print(text)
    if plans:
        print(plans)
    print(f"[offload_capacity] results in {out}")
    finished = {r.get("part") for r in records if r.get("status") == "ok"}
    failed = [r for r in records if r.get("passed") is False] or set(parts) - finished
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
