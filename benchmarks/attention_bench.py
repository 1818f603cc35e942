"""Gemma 2 attention, forward + backward: fastlm's flash kernel vs materialised eager attention.

    python benchmarks/attention_bench.py [--seqs 1024,2048,4096] [--batch 1] [--iters 20]
        [--model-layers 4] [--out benchmarks/results/<date>-attention.json]

Shapes are Gemma-2-2B's: 8 query heads, 4 kv heads, head_dim 256, scale 256**-0.5, logit soft-cap
50, sliding window 4096 (so it never binds at seq <= 4096), bf16, causal. Systems:

- ``fastlm``: ``flash_attention(q, k, v, scale, softcap=50, sliding_window=4096)`` (Triton);
- ``eager``: transformers' Gemma 2 ``eager_attention_forward`` (what HF trains Gemma 2 with): the
  S x S scores, soft-capped, plus the additive float mask, softmax in fp32;
- ``sdpa-nocap``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)``, which cannot soft-cap (a different function: a speed reference only);
- ``fastlm-nocap``: fastlm without the cap, the same function as ``sdpa-nocap``.

A sample is one call (forward) or one forward + backward of ``(out * g).sum()`` between two CUDA
events; the median of ``--iters`` samples after ``--warmup`` is reported. Peak memory is the
increase of ``max_memory_allocated`` over the inputs during one forward + backward. Errors are the
max |out - ref| of the bf16 output against an fp32 reference of the same function.

``--model-layers N`` (> 0) also times a whole Gemma-2-2B-shaped model cut to N layers (random bf16
weights, full fine-tuning, forward + backward of the LM loss) with ``attn_implementation="eager"``
against fastlm's attention registered through ``register_fastlm_attention``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this checkout's fastlm; the helpers here (_common.py)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from _common import add_json_out, load_kernel_module, no_cuda, print_table, write_record  # noqa: E402

from fastlm.benchmarking.timing import cuda_median_ms, peak_mib  # noqa: E402

SYSTEMS = ["fastlm", "eager", "sdpa-nocap", "fastlm-nocap"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", default="1024,2048,4096", help="comma list of sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--window", type=int, default=4096, help="sliding window (0: none)")
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS)
    )
    p.add_argument("--iters", type=int, default=20, help="timed samples per case (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument(
        "--blocks",
        default="",
        help="JSON overriding fastlm's launch shapes, e.g. '{\"fwd\": [64, 64, 8, 2]}' "
        "(block_m, block_n, num_warps, num_stages per kernel: fwd, dq, dkdv)",
    )
    p.add_argument("--model-layers", type=int, default=0, help="also time an N-layer Gemma 2 model")
    p.add_argument("--model-seq", type=int, default=2048, help="sequence length of the model step")
    add_json_out(p, "attention")
    return p.parse_args(argv)


def _measured(rec: dict, torch, measure, *measure_args) -> dict:
    """`measure(rec, torch, *measure_args)` fills `rec`; status "ok", or "oom" with the error's
    first line."""
    try:
        measure(rec, torch, *measure_args)
        rec["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0])
    torch.cuda.empty_cache()
    return rec


def _attention_fns(args, fa, torch):
    """{system: fn(q, k, v) -> (B, H, S, D) output}."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    scale = args.head_dim**-0.5
    window = args.window or None
    group = args.heads // args.kv_heads
    module = types.SimpleNamespace(
        head_dim=args.head_dim, num_key_value_groups=group, training=True
    )
    masks = {}

    def eager(q, k, v):
        s = q.shape[2]
        if s not in masks:  # transformers' eager mask: (B, 1, S, S) additive, in the model dtype
            keep = fa.keep_pattern(s, True, window, q.device)
            m = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
            masks[s] = m.masked_fill(~keep, torch.finfo(q.dtype).min).expand(q.shape[0], 1, s, s)
        out, _ = eager_attention_forward(
            module, q, k, v, masks[s], dropout=0.0, scaling=scale, softcap=args.softcap
        )
        return out.transpose(1, 2)

    def fastlm(q, k, v, cap=args.softcap):
        return fa.flash_attention(q, k, v, scale=scale, softcap=cap, sliding_window=window)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True
        )

    return {
        "fastlm": fastlm,
        "eager": eager,
        "sdpa-nocap": sdpa,
        "fastlm-nocap": lambda q, k, v: fastlm(q, k, v, cap=None),
    }


def _attention_case(rec: dict, torch, args, fn, inputs, ref, fwd, fwd_bwd) -> None:
    """Error against the fp32 reference, then forward and forward + backward times and peak."""
    out = fn(*inputs)
    rec["max_abs_err_vs_fp32"] = (out.float() - ref).abs().max().item()
    del out
    rec["fwd_ms"] = cuda_median_ms(fwd, torch, args.iters, args.warmup)
    rec["fwd_bwd_ms"] = cuda_median_ms(fwd_bwd, torch, args.iters, args.warmup)
    rec["fwd_bwd_peak_mib"] = peak_mib(fwd_bwd, torch)


def _attention_cases(args, fa, torch) -> list[dict]:
    fns = _attention_fns(args, fa, torch)
    systems = [s for s in args.systems.split(",") if s]
    rows = []
    for seq in [int(s) for s in args.seqs.split(",") if s]:
        gen = torch.Generator(device="cuda").manual_seed(seq)
        shape_q = (args.batch, args.heads, seq, args.head_dim)
        shape_k = (args.batch, args.kv_heads, seq, args.head_dim)

        def rand(shape, gen=gen):
            return torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)

        # q scaled up so that capping at 50 bites on some logits.
        q, k, v = rand(shape_q) * 4, rand(shape_k) * 4, rand(shape_k)
        g = rand(shape_q)
        refs = {}
        for cap in (args.softcap, None):
            refs[cap] = fa.flash_attention_reference(
                q.float(), k.float(), v.float(), scale=args.head_dim**-0.5, softcap=cap,
                sliding_window=args.window or None,
            )  # fmt: skip
        for system in systems:
            fn = fns[system]
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def fwd(fn=fn, inputs=(q, k, v)):
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd(fn=fn, leaves=leaves, g=g):
                out = fn(*leaves)
                torch.autograd.grad(out, leaves, g)

            rec = {"seq": seq, "batch": args.batch, "system": system}
            ref = refs[None if system.endswith("nocap") else args.softcap]
            rows.append(
                _measured(rec, torch, _attention_case, args, fn, (q, k, v), ref, fwd, fwd_bwd)
            )
        del refs, q, k, v, g
    base = {r["seq"]: r for r in rows if r["system"] == "eager" and r["status"] == "ok"}
    for r in rows:
        e = base.get(r["seq"])
        if r["status"] == "ok" and e:
            r["fwd_bwd_speedup_vs_eager"] = e["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["peak_mem_ratio_vs_eager"] = r["fwd_bwd_peak_mib"] / e["fwd_bwd_peak_mib"]
    return rows


def _model_step(args, fa, torch) -> list[dict]:
    """fwd + bwd of an N-layer Gemma-2-2B-shaped model, eager vs fastlm attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=args.model_layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).to("cuda", torch.bfloat16)
    model.train()
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.model_seq), generator=gen).cuda()
    from fastlm.models.attention import register_fastlm_attention

    name = register_fastlm_attention()
    rows, losses = [], {}
    for system in ("eager", "fastlm"):
        model.set_attn_implementation("eager" if system == "eager" else name)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss

        def measure(rec, torch, step=step, system=system):
            losses[system] = step().item()
            rec["loss"] = losses[system]
            rec["step_ms"] = cuda_median_ms(step, torch, max(3, args.iters // 4), 2)
            rec["peak_mib"] = peak_mib(step, torch)

        rec = {"system": f"model-{system}", "layers": args.model_layers, "seq": args.model_seq,
               "batch": args.batch}  # fmt: skip
        rows.append(_measured(rec, torch, measure))
    if all(r["status"] == "ok" for r in rows):
        rows[1]["step_speedup_vs_eager"] = rows[0]["step_ms"] / rows[1]["step_ms"]
        rows[1]["peak_mem_ratio_vs_eager"] = rows[1]["peak_mib"] / rows[0]["peak_mib"]
        rows[1]["loss_delta_vs_eager"] = abs(rows[1]["loss"] - rows[0]["loss"])
    return rows


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _case_line(r: dict) -> str:
    head = f"{r['seq']:>5} {r['system']:>13}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('error', '')}"
    return (
        f"{head} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f} "
        f"{_fmt(r.get('fwd_bwd_speedup_vs_eager'), '>6.2f')}x {r['fwd_bwd_peak_mib']:>9.0f} "
        f"{_fmt(r.get('peak_mem_ratio_vs_eager'), '>10.3f')} {r['max_abs_err_vs_fp32']:>9.2e}"
    )


def _model_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['system']}: {r['status']} {r.get('error', '')}"
    line = (
        f"{r['system']} ({r['layers']} layers, batch {r['batch']}, seq {r['seq']}): "
        f"{r['step_ms']:.1f} ms/step, peak {r['peak_mib']:.0f} MiB, loss {r['loss']:.5f}"
    )
    if "step_speedup_vs_eager" in r:
        line += (
            f", {r['step_speedup_vs_eager']:.2f}x eager speed, "
            f"{r['peak_mem_ratio_vs_eager']:.3f}x eager memory"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if no_cuda("attention_bench.py needs a CUDA GPU (torch.cuda.is_available() is False)."):
        return 2
    import torch

    fa = load_kernel_module("flash_attention")
    if args.blocks:
        blocks = {k: fa.Blocks(*v) for k, v in json.loads(args.blocks).items()}
        default = fa._default_blocks
        fa._default_blocks = lambda d, q: {**default(d, q), **blocks}
    rows = _attention_cases(args, fa, torch)
    header = (
        f"{'seq':>5} {'system':>13} {'fwd ms':>8} {'fwd+bwd ms':>11} {'×eager':>7} "
        f"{'peak MiB':>9} {'×eager mem':>10} {'max|err|':>9}"
    )
    print_table(header, map(_case_line, rows))
    model_rows = _model_step(args, fa, torch) if args.model_layers > 0 else []
    for r in model_rows:
        print(_model_line(r))
    write_record(
        args.out,
        "attention",
        torch.cuda.get_device_name(),
        ("transformers",),
        dtype="bfloat16",
        config={k: v for k, v in vars(args).items() if k != "out"},
        results=rows,
        model_step=model_rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
