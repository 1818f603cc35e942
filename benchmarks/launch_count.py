"""Kernel launches of one fastlm training step, counted on the CPU.

    TRITON_INTERPRET=1 python benchmarks/launch_count.py --family llama --layers 2
    TRITON_INTERPRET=1 python benchmarks/launch_count.py --family qwen3 --checkpointing unsloth

Small training shapes are paced by the host: each kernel launch costs CPU time whether the
kernel does much or not. This script counts, for one step (forward with labels, so the fused
cross-entropy loss, then ``loss.backward()``; no optimizer step), the operations that would be
CUDA kernel launches, on a tiny model that runs on the CPU in seconds. The count does not depend
on the model's sizes (only on its structure), so a tiny model's per-layer count is the per-layer
count of the real one.

The model: a tiny config of the family (``AutoConfig.for_model``, hidden 64, 2 layers...), saved
and loaded with ``FastModel.from_pretrained`` (SDPA attention, as ``benchmarks/train_bench.py``
loads it), ``FastModel.get_peft_model`` with LoRA r=16 on the seven projections and the chosen
``use_gradient_checkpointing``. As on the GPU benchmark, the base weights are bf16, the adapters
fp32 (PEFT's default) and the step runs under bf16 autocast (``--dtype fp32``: all fp32, no
autocast).

What is counted, per op, and how it maps to CUDA:
- **aten ops**: every op a ``TorchDispatchMode`` sees, except those that launch nothing on a
  GPU: views and metadata ops (``VIEW_OPS`` below: view, _unsafe_view, reshape, as_strided, t,
  transpose, permute, expand, detach, alias, (un)squeeze, slice, select, split, unbind...) and
  allocations (``ALLOC_OPS``: empty, empty_like, empty_strided, new_empty...: the caching
  allocator, no kernel). Everything else (GEMMs, casts ``_to_copy``, ``copy_``, ``clone``,
  fills ``zero_``, element-wise ops, reductions, SDPA) is one launch. A GEMM is one launch as
  cuBLAS runs it (no split-K workspace zeroing counted). ``_local_scalar_dense`` (``.item()``) is
  counted: on a GPU it is a copy and a host sync.
- **Triton launches**: each ``kernel[grid](...)`` is one launch. fastlm's ops pick their Triton
  kernels only for CUDA tensors (``fastlm/kernels/_dispatch.py``); here every ``use_triton`` in
  fastlm is made to answer True, so the CPU tensors take the CUDA path and the kernels run in
  Triton's interpreter (which is why ``TRITON_INTERPRET=1`` must be set before triton is
  imported). The aten ops the interpreter runs to move arguments are not counted.
- **one CUDA-only branch emulated**: ``lora_weights._mm_to`` writes an fp32 gradient from bf16
  operands with one ``mm(out_dtype=float32)`` on CUDA; the CPU has no such kernel and upcasts
  first (3 ops), so here that call counts as one launch.

Not the same as on a GPU: ops that a CUDA run would do on CPU tensors (none in the patched path
for token ids already on the device) count here; CUDA autocast's and CPU autocast's op lists
differ for ops outside fastlm's Functions (the embedding and the residual adds are not
autocast); offloaded checkpointing ("unsloth") copies a layer input to the host only above
4 MiB, so on the tiny model, as on a GPU at small shapes, it copies nothing.

Attribution: an op in a forward goes to the innermost module kind running it (a forward hook
stack); an op in the backward goes to the kind whose forward created the autograd node that is
running (``torch._C._current_autograd_node``). Kinds: embedding, norm (RMSNorm, q/k norms),
qkv (the LoRA q/k/v projections), attention (the rest of the attention module: RoPE, SDPA or
flash, casts), o_proj, mlp (gate/up/down and the activation), layer (the rest of a decoder
layer: residual adds, the checkpoint function), body (rotary tables, masks), loss (the LM head
with cross-entropy), engine (backward work no node of the model owns: gradient accumulation).
Ops inside a decoder layer are also counted per layer; "per layer" is their mean over layers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout: this checkout's fastlm
    sys.path.insert(0, str(ROOT))

aten = torch.ops.aten

# Views and metadata: no kernel on a GPU.
VIEW_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "t", "transpose",
        "permute", "expand", "expand_as", "detach", "alias", "squeeze", "unsqueeze", "slice",
        "select", "split", "split_with_sizes", "unbind", "narrow", "chunk", "view_as",
        "lift_fresh", "_unsafe_split", "unflatten", "flatten", "movedim", "diagonal",
        "numpy_T", "mT", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
        "is_same_size", "is_contiguous", "_has_compatible_shallow_copy_type", "set_",
    }
)  # fmt: skip
# Allocations: the caching allocator, no kernel.
ALLOC_OPS = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
)
KINDS = (
    "embedding", "norm", "qkv", "attention", "o_proj", "mlp", "layer", "body", "loss", "engine",
)  # fmt: skip
LAYER_KINDS = ("norm", "qkv", "attention", "o_proj", "mlp", "layer")

# Small sizes per family; the launch count depends on the structure, not the sizes.
_SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LaunchCounter(TorchDispatchMode):
    """Counts launch-like aten ops and Triton launches, per (kind, layer, op name)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()  # (kind, layer, phase, op) -> launches
        # forward scopes, innermost last: (kind, layer, grad_fns of the scope's inputs)
        self.stack: list[tuple[str, int | None, set]] = []
        self.node_kind: dict = {}  # autograd node -> (kind, layer)
        self.muted = 0  # inside a Triton launch, or counted as one op already
        self.phase = "forward"

    # -- attribution
    def where(self) -> tuple[str, int | None]:
        if self.stack:
            return self.stack[-1][:2]
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            if node is not None:
                return self.node_kind.get(node, ("engine", None))
            return ("engine", None)
        return ("loss", None)  # the top level: the LM head and loss around the body

    def add(self, op: str, n: int = 1) -> None:
        kind, layer = self.where()
        phase = self.phase
        if self.stack and phase == "backward":
            phase = "recompute"  # a checkpointed layer's forward, run again in backward
        self.counts[(kind, layer, phase, op)] += n

    @contextlib.contextmanager
    def as_one(self, op: str):
        """Everything inside counts as one launch named ``op``."""
        self.add(op)
        self.muted += 1
        try:
            yield
        finally:
            self.muted -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.muted and name not in VIEW_OPS and name not in ALLOC_OPS:
            self.add(name)
        return func(*args, **(kwargs or {}))

    # -- module scopes
    def enter(self, kind: str, layer: int | None, inputs) -> None:
        self.stack.append((kind, layer, _grad_fns(inputs)))

    def leave(self, outputs) -> None:
        kind, layer, boundary = self.stack.pop()
        # Tag the nodes this scope created: those between its outputs and its inputs that no
        # inner scope tagged already (walked through, not stopped at: they lead to ours).
        todo, seen = list(_grad_fns(outputs)), set()
        while todo:
            node = todo.pop()
            if node is None or node in boundary or node in seen:
                continue
            seen.add(node)
            self.node_kind.setdefault(node, (kind, layer))
            todo += [n for n, _ in node.next_functions]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _grad_fns(obj) -> set:
    return {t.grad_fn for t in _tensors(obj) if t.grad_fn is not None}


def _scopes(counter: LaunchCounter, model, spec):
    """Wrap each module's forward (and the patched attention's q/k/v and o_proj calls) in a scope
    of its kind; returns the undo function. Wrappers, not forward hooks: non-reentrant
    checkpointing stops a recompute with an exception once it has what it needs, and a
    ``finally`` is what closes the scopes it left open."""
    import fastlm.models.patch as patch  # noqa: PLC0415

    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    index = {m: i for i, m in enumerate(layers)}
    current = {"layer": None}

    def kind_of(module) -> str | None:
        cls = type(module).__name__
        if cls == spec.norm_class:
            return "norm"
        if cls == spec.attention_class:
            return "attention"
        if cls == spec.mlp_class:
            return "mlp"
        if module in index:
            return "layer"
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        if hasattr(module, "rotary_emb"):
            return "body"
        return None

    def scoped(fn, kind, layer_index=None):
        def run(*args, **kwargs):
            outer = current["layer"]
            if layer_index is not None:
                current["layer"] = layer_index
            counter.enter(kind, current["layer"] if kind in LAYER_KINDS else None, (args, kwargs))
            out = None
            try:
                out = fn(*args, **kwargs)
                return out
            finally:
                counter.leave(out)
                current["layer"] = outer

        return run

    undo = []
    for module in model.modules():
        kind = kind_of(module)
        if kind is not None:
            undo.append((module, module.__dict__.get("forward"), "forward"))
            module.forward = scoped(module.forward, kind, index.get(module))
    # A checkpointed layer hands its class forward to _gradient_checkpointing_func, which calls
    # it again in backward: scope that function too, so that the recompute is counted per layer.
    for module, i in index.items():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is not None:
            undo.append((module, checkpoint, "_gradient_checkpointing_func"))
            module._gradient_checkpointing_func = functools.partial(
                _scoped_checkpoint,
                checkpoint,
                functools.partial(scoped, kind="layer", layer_index=i),
            )
    originals = patch._project_qkv, patch._project
    patch._project_qkv = scoped(originals[0], "qkv")
    patch._project = scoped(originals[1], "o_proj")

    def restore():
        patch._project_qkv, patch._project = originals
        for module, value, name in reversed(undo):
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)

    return restore


def _scoped_checkpoint(checkpoint, scope, run, *args, **kwargs):
    return checkpoint(scope(run), *args, **kwargs)


def _force_cuda_path(counter: LaunchCounter):
    """Make fastlm take its CUDA (Triton) path on CPU tensors, count each Triton launch as one,
    and emulate the one CUDA-only GEMM branch. Returns an undo function."""
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    import fastlm.autograd.lora_weights as lora_weights  # noqa: PLC0415
    from fastlm.kernels import _dispatch  # noqa: PLC0415

    undo, original = [], _dispatch.use_triton
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fastlm.") and (
            getattr(module, "use_triton", None) is original
        ):
            undo.append((module, "use_triton", module.use_triton))
            module.use_triton = lambda tensor: True

    run = InterpretedFunction.run

    def counted_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        with counter.as_one(f"triton:{self.fn.__name__}"):
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    undo.append((InterpretedFunction, "run", run))
    InterpretedFunction.run = counted_run

    mm_to = lora_weights._mm_to

    def cuda_mm_to(a, b, out_dtype, alpha=1.0):
        if a.dtype != out_dtype and out_dtype == torch.float32 and a.dtype in lora_weights._HALF:
            with counter.as_one("mm"):  # CUDA: one mm(out_dtype=float32), then alpha apart
                out = mm_to(a, b, out_dtype)
            return out if alpha == 1.0 else out.mul_(alpha)
        return mm_to(a, b, out_dtype, alpha)

    undo.append((lora_weights, "_mm_to", mm_to))
    lora_weights._mm_to = cuda_mm_to

    def restore():
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)

    return restore


def build_model(family: str, layers: int, checkpointing, dtype: str, folder: Path, rank: int):
    """A tiny ``family`` model saved in ``folder``, loaded and LoRA-wrapped by fastlm."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    from fastlm import FastModel  # noqa: PLC0415

    config = AutoConfig.for_model(family, num_hidden_layers=layers, **_SIZES)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model, _ = FastModel.from_pretrained(
        str(folder), dtype=torch.float32, device_map="cpu", attn_implementation="sdpa"
    )
    model = FastModel.get_peft_model(
        model,
        r=rank,
        lora_alpha=rank,
        lora_dropout=0,
        target_modules=list(PROJECTIONS),
        use_gradient_checkpointing=checkpointing,
        random_state=3407,
    )
    if dtype == "bf16":  # from_pretrained refuses bf16 on the CPU: cast, adapters stay fp32
        model.to(torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    model.train()
    return model


def count_step(family: str, layers: int = 2, checkpointing=True, dtype: str = "bf16",
               rank: int = 16, batch: int = 2, seq: int = 16) -> dict:  # fmt: skip
    """Launches of one forward+backward step; a dict with the totals, per kind and per layer.

    Usage: ``count_step("llama", layers=2, checkpointing="unsloth")["per_layer"]["total"]``.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before Python starts (triton reads it once)")
    from fastlm.models import patch as patch_module  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(family, layers, checkpointing, dtype, Path(tmp) / family, rank)
    spec = patch_module.patch_state(model).spec
    ids = torch.randint(
        0, _SIZES["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    counter = LaunchCounter()
    restore_path = _force_cuda_path(counter)
    restore_scopes = _scopes(counter, model, spec)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    try:
        with counter:
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            counter.phase = "backward"
            loss.backward()
    finally:
        restore_scopes()
        restore_path()
    return summarise(counter.counts, layers, family, checkpointing, dtype, float(loss.detach()))


def summarise(counts: Counter, layers: int, family, checkpointing, dtype, loss) -> dict:
    per_kind: dict = defaultdict(lambda: Counter())
    per_layer_kind: dict = defaultdict(lambda: Counter())
    ops: Counter = Counter()
    for (kind, layer, phase, op), n in counts.items():
        per_kind[kind][phase] += n
        per_kind[kind]["total"] += n
        ops[op] += n
        if layer is not None:
            per_layer_kind[kind][phase] += n
            per_layer_kind[kind]["total"] += n
    total = sum(counts.values())
    in_layers = sum(c["total"] for c in per_layer_kind.values())
    return {
        "family": family,
        "layers": layers,
        "checkpointing": checkpointing,
        "dtype": dtype,
        "loss": loss,
        "total": total,
        "triton": sum(n for op, n in ops.items() if op.startswith("triton:")),
        "per_kind": {k: dict(per_kind[k]) for k in KINDS if k in per_kind},
        "per_layer": {
            "total": in_layers / layers,
            **{k: per_layer_kind[k]["total"] / layers for k in LAYER_KINDS if k in per_layer_kind},
        },
        "per_layer_by_phase": {
            k: {p: n / layers for p, n in per_layer_kind[k].items()} for k in per_layer_kind
        },
        "ops": dict(ops.most_common()),
        "layer_ops": {
            f"{kind} {phase} {op}": n / layers
            for (kind, phase, op), n in sorted(_layer_ops(counts).items())
        },
    }


def _layer_ops(counts: Counter) -> Counter:
    out: Counter = Counter()
    for (kind, layer, phase, op), n in counts.items():
        if layer is not None:
            out[(kind, phase, op)] += n
    return out


def format_table(result: dict) -> str:
    phases = ("forward", "recompute", "backward", "total")
    lines = [
        f"{result['family']} · {result['layers']} layers · checkpointing="
        f"{result['checkpointing']!r} · {result['dtype']} · loss {result['loss']:.4f}",
        f"{'kind':<10}" + "".join(f"{p:>11}" for p in phases) + f"{'per layer':>11}",
    ]
    for kind, row in result["per_kind"].items():
        per_layer = result["per_layer"].get(kind)
        lines.append(
            f"{kind:<10}"
            + "".join(f"{row.get(p, 0):>11}" for p in phases)
            + (f"{per_layer:>11.1f}" if per_layer is not None else f"{'':>11}")
        )
    lines.append(
        f"{'total':<10}{'':>33}{result['total']:>11}{result['per_layer']['total']:>11.1f}"
        f"   (Triton launches: {result['triton']})"
    )
    return "\n".join(lines)


def _checkpointing(value: str):
    return {"true": True, "false": False}.get(value.lower(), value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", default=["llama", "qwen3"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--checkpointing", nargs="+", type=_checkpointing, default=[True, "unsloth"]
    )
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ops", action="store_true", help="also print the per-layer op names")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/launch_count.json")
    args = parser.parse_args(argv)
    results = []
    for family in args.family:
        for checkpointing in args.checkpointing:
            result = count_step(family, args.layers, checkpointing, args.dtype, args.rank)
            results.append(result)
            print(format_table(result))
            if args.ops:
                for name, n in result["layer_ops"].items():
                    print(f"    {name:<40}{n:>7.1f}")
            print()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
