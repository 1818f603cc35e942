"""One rank of the distributed tests (gloo, CPU). ``_dist_common.launch`` starts it twice, or:
``torchrun --nproc_per_node 2 tests/distributed/_dist_worker.py MODELS_DIR OUT [NAMES]``
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the environment).

Every scenario runs in one process pair (start-up dominates on the CPU); rank 0 saves
``{scenario: result or {"error": message}}`` to OUT/results.pt. A result holds the global loss,
the full LoRA gradients, the loss after one SGD step, and how often each fused path ran.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
import traceback
import types
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist_common import (  # noqa: E402
    RANK_MICRO_BATCHES,
    WORLD,
    build,
    micro_batches,
    run_trainer,
    train_step,
)

import fastlm.models.patch as patch_module  # noqa: E402
from fastlm.distributed import (  # noqa: E402
    UnsupportedDistributedError,
    check_fsdp2,
    fully_shard_model,
    gather_direct_reads,
)

CALLS: Counter = Counter()
_FUSED = ("fused_linear_cross_entropy", "lora_qkv", "lora_mlp", "lora_linear")


def _count_fused_calls() -> None:
    """Count the fused paths patch.py takes, so a test can tell fused from fallback."""
    for name in _FUSED:
        original = getattr(patch_module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            CALLS[_name] += 1
            return _original(*args, **kwargs)

        setattr(patch_module, name, counted)


def _mine(rank: int) -> list[dict]:
    batches = micro_batches()
    return [batches[i] for i in RANK_MICRO_BATCHES[rank]]


def run_ddp(path, rank, checkpointing, load_in_4bit=False):
    from torch.nn.parallel import DistributedDataParallel

    model = build(path, checkpointing, load_in_4bit=load_in_4bit)
    wrapped = DistributedDataParallel(model)

    def sync(last):
        return contextlib.nullcontext() if last else wrapped.no_sync()

    return train_step(model, wrapped, _mine(rank), WORLD, sync)


def _accelerate_prepare(model, mesh, policy: str, peft_policy: bool):
    """accelerate's own FSDP2 preparation (fsdp2_prepare_model), with the plugin it builds from a
    config file; ``peft_policy``: what HF Trainer does for a PEFT model (update_fsdp_plugin_peft).
    accelerate refuses FSDP on a CPU-only machine, so its function is called with the few
    accelerator attributes it reads."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=policy, reshard_after_forward=True
    )
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no",
        is_main_process=dist.get_rank() == 0,
        parallelism_config=None,
        device=torch.device("cpu"),
    )
    if peft_policy:
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    return fsdp2_prepare_model(accelerator, model)


def _shard(model, layout: str, mesh):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    if layout == "layers":  # one unit per decoder layer + root (torchtitan style)
        return fully_shard_model(model, mesh=mesh)
    if layout == "accelerate_trainer":  # HF Trainer + PEFT under accelerate's FSDP2
        return _accelerate_prepare(model, mesh, "transformer_based_wrap", peft_policy=True)
    if layout == "accelerate_layers":  # accelerator.prepare, TRANSFORMER_BASED_WRAP
        return _accelerate_prepare(model, mesh, "transformer_based_wrap", peft_policy=False)
    if layout == "size_based":
        # A small size threshold: every linear (projections, LoRA A/B, lm_head) is its own unit.
        for module in list(model.modules()):
            if type(module) is nn.Linear:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if layout == "peft_lambda":
        # PEFT's FSDP wrap policy as FSDP2 units: every trainable leaf (LoRA A and B) is a unit,
        # then the decoder layers, then the root.
        for module in list(model.modules()):
            if type(module) is nn.Linear and module.weight.requires_grad:
                fully_shard(module, mesh=mesh)
        return fully_shard_model(model, mesh=mesh)
    if layout == "shard_4bit":  # decoder layers with their 4-bit weights sharded too
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(layout)


def _check(model) -> dict:
    """What fastlm.distributed.check_fsdp2 says about the sharded model: error and warnings."""
    found = {"error": None, "warnings": []}
    handler = logging.Handler()
    handler.emit = lambda record: found["warnings"].append(record.getMessage())
    logger = logging.getLogger("fastlm")
    logger.addHandler(handler)
    try:
        check_fsdp2(model)
    except UnsupportedDistributedError as error:
        found["error"] = str(error)
    finally:
        logger.removeHandler(handler)
    return found


def run_fsdp2(path, rank, checkpointing, layout, fix=None, load_in_4bit=False, step=True):
    """Shard, record check_fsdp2's verdict, then (if ``step``) the training step."""
    from torch.distributed.device_mesh import init_device_mesh

    model = build(path, checkpointing, load_in_4bit=load_in_4bit)
    mesh = init_device_mesh("cpu", (WORLD,))
    if fix == "hooks":
        gather_direct_reads(model)
    model = _shard(model, layout, mesh)
    check = _check(model)
    if not step:
        return {"check": check}

    def sync(last):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    try:
        return {**train_step(model, model, _mine(rank), WORLD, sync), "check": check}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "check": check}


def _qlora_available(path) -> bool:
    from fastlm.errors import UnsupportedKeywordError

    try:
        build(path, load_in_4bit=True)
    except (ImportError, UnsupportedKeywordError):  # no bitsandbytes / no QLoRA in this fastlm
        return False
    return True


def scenarios(paths, out: Path):
    """(name, run(rank) -> result) in order; failures that leave FSDP mid-step come last."""
    llama, gemma = paths["llama"], paths["gemma3_text"]
    for ckpt in (False, True, "fastlm"):
        yield f"ddp-llama-ckpt={ckpt}", lambda r, c=ckpt: run_ddp(llama, r, c)
    yield "ddp-gemma3_text-ckpt=True", lambda r: run_ddp(gemma, r, True)
    for ckpt in (False, True, "fastlm"):
        yield f"fsdp2-layers-llama-ckpt={ckpt}", lambda r, c=ckpt: run_fsdp2(llama, r, c, "layers")
    yield "fsdp2-layers-gemma3_text-ckpt=True", lambda r: run_fsdp2(gemma, r, True, "layers")
    for layout in ("accelerate_trainer", "accelerate_layers"):
        yield (
            f"fsdp2-{layout}-llama-ckpt=True",
            lambda r, lay=layout: run_fsdp2(llama, r, True, lay),
        )
    name = "fsdp2-accelerate_trainer-gemma3_text-ckpt=fastlm"
    yield name, lambda r: run_fsdp2(gemma, r, "fastlm", "accelerate_trainer")
    yield "fsdp2-size_based-llama-ckpt=True", lambda r: run_fsdp2(llama, r, True, "size_based")
    name = "fsdp2-peft_lambda-llama-ckpt=True-fix=hooks"
    yield name, lambda r: run_fsdp2(llama, r, True, "peft_lambda", "hooks")
    if _qlora_available(llama):
        yield "qlora-ddp-llama-ckpt=True", lambda r: run_ddp(llama, r, True, load_in_4bit=True)
        for layout in ("layers", "accelerate_trainer"):
            name = f"qlora-fsdp2-{layout}-llama-ckpt=True"
            yield name, lambda r, lay=layout: run_fsdp2(llama, r, True, lay, load_in_4bit=True)
        name = "qlora-fsdp2-shard_4bit-llama"  # check_fsdp2 only: the step cannot run
        yield name, lambda r: run_fsdp2(llama, r, True, "shard_4bit", load_in_4bit=True, step=False)
    for kind in ("hf", "sft"):
        yield f"trainer-{kind}-llama", lambda r, k=kind: run_trainer(llama, k, out / k, WORLD)
    # Last: were a read site not to gather, the forward would fail part-way (both ranks alike).
    name = "fsdp2-peft_lambda-llama-ckpt=True-fix=None"
    yield name, lambda r: run_fsdp2(llama, r, True, "peft_lambda")


def entry(rank: int, env: dict, argv: list[str], log: str) -> None:
    """Process target for ``_dist_common.launch`` (forkserver): rank's env, output to ``log``."""
    os.environ.update({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
    # The forkserver imported torch before OMP_NUM_THREADS=1 was set: two ranks with a thread
    # pool each on a 2-core machine spin against each other (tiny matmuls 100x slower).
    torch.set_num_threads(1)
    with open(log, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    main(argv)


def main(argv: list[str]) -> None:
    models_dir, out = Path(argv[0]), Path(argv[1])
    only = set(argv[2].split(",")) if len(argv) > 2 else None
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    _count_fused_calls()
    paths = {p.name: p for p in models_dir.iterdir() if p.is_dir()}
    results = {}
    for name, run in scenarios(paths, out):
        if only and name not in only:
            continue
        CALLS.clear()
        start = time.perf_counter()
        try:
            results[name] = {**run(rank), "calls": dict(CALLS)}
        except Exception as error:  # recorded; the test decides whether it was expected
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            if os.environ.get("FASTLM_DIST_DEBUG"):
                traceback.print_exc()
        results[name]["seconds"] = time.perf_counter() - start
        dist.barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(results, out / "results.pt")
    gc.collect()  # DDP reducers and FSDP states go before their process group
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
