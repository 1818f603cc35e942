#!/usr/bin/env python
"""What a training step of a benchmark shape costs in matmul FLOPs, and what that allows.

    python benchmarks/step_flops.py --shape llama-3.1-8b --results <run folder>/results.json
    python benchmarks/step_flops.py --shape llama-3.1-8b --measure-ceiling   # on a GPU

Counted on the shape's model built on the meta device (no weights, no formula per family), for
T = batch x seq tokens:

- every Linear of the decoder layers: 2·T·in·out forward; experts (3-D weights): k of E per token;
- the LM head (the loss's GEMM): 2·T·hidden·vocab forward;
- softmax attention's scores and values, layer by layer (each layer's own head_dim; a sliding
  window's layer only the pairs within its window): 4·B·pairs·Hq·D forward, where the causal
  pairs are S(S+1)/2 (W(W+1)/2 + (S-W)·W under a window W < S). Linear-attention layers
  (Qwen3.5's Gated DeltaNet) have no such term: their chunked products, O(T·C·D) per head, are
  left out with the other small work;
- LoRA (``--mode lora``, rank ``--rank`` on the shape's targets): 2·T·r·(in + out) forward.

Backward: frozen weights (LoRA, QLoRA) need dX only, as much as the forward; trained weights
(``--mode full``) need dW too, twice the forward; LoRA's products 2x their forward; attention
2.5x its forward (flash backward). Checkpointing (``--no-recompute`` to leave it out) runs every
decoder layer's forward once more in the backward. Elementwise work, norms and copies are not
counted: the FLOPs here bound a step from below, they do not predict it.

``--results`` reads a benchmark's results.json and prints, per system that ran this shape, the
matmul TFLOP/s its measured tok/s implies, and the TFLOP/s a 1.3x-Unsloth step would need.
``--measure-ceiling`` times bf16 GEMMs of the shape's own sizes on the GPU (the rate the step's
big matmuls could run at, if nothing else took time). Prints a table; ``--out`` saves JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastlm

from fastlm.benchmarking.shapes import get_shape  # noqa: E402

ATTENTION_BACKWARD = 2.5  # flash attention's backward: about 2.5 forwards of matmul work


def _meta_model(shape):
    from transformers import AutoConfig

    from fastlm.offload.memory_plan import meta_causal_lm

    config = AutoConfig.for_model(shape.model_type, **shape.config)
    return meta_causal_lm(config), config


def _per_token_products(model, config) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(decoder matmul weights a token passes through, head in·out, the decoder Linears as
    (name, in, out)): experts' 3-D weights count k of E."""
    import torch

    from fastlm.models import spec_for

    text = config.get_text_config()
    moe = spec_for(text).moe  # the family's own name for k (Gemma 4: top_k_experts)
    experts_per_token = getattr(text, moe.experts_per_token_attr) if moe is not None else 1
    decoder, linears = 0, []
    for name, module in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        if isinstance(module, torch.nn.Linear):
            decoder += module.in_features * module.out_features
            linears.append((name, module.in_features, module.out_features))
        for param in module.parameters(recurse=False):
            if param.dim() == 3:  # (E, a, b) experts: each token meets k of them
                decoder += experts_per_token * param.shape[1] * param.shape[2]
    head = model.get_output_embeddings()
    return decoder, head.in_features * head.out_features, linears


def _causal_pairs(seq: int, window: int | None) -> int:
    """(query, key) pairs a causal attention scores over ``seq`` positions, within ``window``."""
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def _attention_forward(model, batch: int, seq: int) -> float:
    """Forward FLOPs of every softmax attention's scores and values: the modules with q_proj,
    o_proj and a head_dim, each with its own head_dim and sliding window."""
    flops = 0.0
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None)
        if not (hasattr(module, "q_proj") and hasattr(module, "o_proj") and head_dim):
            continue
        heads = module.o_proj.in_features // head_dim  # q_proj may yield a gate as well
        pairs = _causal_pairs(seq, getattr(module, "sliding_window", None))
        flops += 4 * batch * pairs * heads * head_dim
    return flops


def step_flops(shape, mode: str, rank: int, recompute: bool) -> dict:
    """The step's matmul FLOPs by part (see the module docstring)."""
    model, config = _meta_model(shape)
    tokens = shape.batch * shape.seq
    decoder, head, linears = _per_token_products(model, config)
    targets = set(shape.lora_modules)
    lora = sum(rank * (i + o) for name, i, o in linears if name.rsplit(".", 1)[-1] in targets)
    attention = _attention_forward(model, shape.batch, shape.seq)
    forward = 2 * tokens * decoder
    weight_backward = 2 if mode == "full" else 1  # dX, and dW where the weights train
    parts = {
        "decoder forward": forward,
        "decoder backward": weight_backward * forward,
        "decoder recompute": forward if recompute else 0,
        "head forward + backward": (1 + weight_backward) * 2 * tokens * head,
        "attention (fwd, bwd, recompute)": attention
        * (1 + ATTENTION_BACKWARD + (1 if recompute else 0)),
        "LoRA products": 0 if mode == "full" else 2 * tokens * lora * (3 + (1 if recompute else 0)),
    }
    return {"shape": shape.name, "mode": mode, "tokens": tokens, "recompute": recompute,
            "parts": parts, "total": sum(parts.values())}  # fmt: skip


def measure_ceiling(shape) -> float:
    """bf16 TFLOP/s of the shape's decoder GEMMs (T x in x out, each size once), timed on the
    GPU: the best the step's big matmuls can do."""
    import torch

    model, config = _meta_model(shape)
    _, _, linears = _per_token_products(model, config)
    tokens = shape.batch * shape.seq
    sizes = sorted({(i, o) for _, i, o in linears})
    flops, seconds = 0.0, 0.0
    for i, o in sizes:
        x = torch.randn(tokens, i, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            x @ w.T
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            x @ w.T
        end.record()
        torch.cuda.synchronize()
        flops += 20 * 2 * tokens * i * o
        seconds += start.elapsed_time(end) / 1e3
    return flops / seconds / 1e12


def measured_rates(path: Path, shape_name: str, mode: str) -> dict[str, float]:
    """tok/s per system of the records of ``shape_name`` / ``mode`` in a results.json."""
    records = json.loads(path.read_text()).get("records", [])
    return {
        r["system"]: float(r["tokens_per_s"])
        for r in records
        if r.get("shape") == shape_name and r.get("mode") == mode and r.get("status") == "ok"
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", required=True)
    p.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-recompute", action="store_true", help="no checkpointing's recompute")
    p.add_argument("--results", type=Path, help="a benchmark results.json: rates implied")
    p.add_argument("--measure-ceiling", action="store_true", help="time the shape's GEMMs (GPU)")
    p.add_argument("--out", type=Path, help="save the figures as JSON here")
    args = p.parse_args(argv)
    shape = get_shape(args.shape)
    flops = step_flops(shape, args.mode, args.rank, not args.no_recompute)
    print(f"{shape.name} {args.mode}, {flops['tokens']} tokens a step, recompute "
          f"{flops['recompute']}:")  # fmt: skip
    for part, value in flops["parts"].items():
        print(f"  {part:34s} {value / 1e12:8.1f} TFLOP")
    print(f"  {'total':34s} {flops['total'] / 1e12:8.1f} TFLOP")
    record = {"flops": flops}
    if args.measure_ceiling:
        record["ceiling_tflops"] = ceiling = measure_ceiling(shape)
        bound = flops["tokens"] / (flops["total"] / (ceiling * 1e12))
        print(f"bf16 GEMM rate of its sizes: {ceiling:.0f} TFLOP/s -> at most {bound:,.0f} tok/s")
    if args.results:
        rates = measured_rates(args.results, shape.name, args.mode)
        record["implied_tflops"] = {}
        for system, rate in sorted(rates.items()):
            implied = flops["total"] * rate / flops["tokens"] / 1e12
            record["implied_tflops"][system] = implied
            print(f"  {system:8s} {rate:10,.0f} tok/s -> {implied:5.0f} TFLOP/s of matmul")
        if "unsloth" in rates:
            needed = flops["total"] * 1.3 * rates["unsloth"] / flops["tokens"] / 1e12
            record["needed_for_1.3x_unsloth"] = needed
            target = 1.3 * rates["unsloth"]
            print(f"  1.3x Unsloth ({target:,.0f} tok/s) needs {needed:.0f} TFLOP/s")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
