"""Padded vs padding-free (packed) LoRA training on real example lengths, side by side:
HF + PEFT, Unsloth and fastlm.

    python -m fastlm.benchmarking.packing_bench --shapes llama-3.1-8b,qwen3-4b --modes lora,qlora
    fastlm bench --loop packing --shapes qwen3-4b --mode qlora      # the same harness
    python benchmarks/packing_bench.py --dry-run                    # tiny model, CPU, seconds

The data: ``warmup + steps`` steps of ``--examples`` examples each (16), their lengths drawn
with a seeded generator from a real instruction set's token-length histogram
(``fastlm.benchmarking.lengths``: the Alpaca-format set that LLaMA-Factory bundles, mean 197
tokens, max 706), capped at the shape's sequence length; random token ids (seed 1234). Every
system trains on the same examples in the same steps; only how a step's examples are laid out
differs:

    padded        (E, longest) right-padded, attention_mask, labels -100 on the pads
    padding-free  transformers' DataCollatorWithFlattening: one row of the E examples end to end,
                  position_ids restarting at 0 for each, labels -100 at each example's first token

The systems, each in its own process on the same random-init checkpoint (train_bench's):

    hf-padded            transformers + PEFT (SDPA), the padded batch
    hf-padding-free      transformers + PEFT, the padding-free batch; flash_attention_2 with the
                         collator's cu_seq_lens where flash-attn is installed, else SDPA (then
                         transformers builds a per-example mask from the position_ids)
    unsloth-packing      Unsloth's FastLanguageModel, the padding-free batch plus the
                         ``packed_seq_lengths`` its packing collator adds (unsloth.utils.packing);
                         skipped, with the reason, where unsloth or its packing does not import
    fastlm-padded        fastlm's FastModel, the padded batch
    fastlm-padding-free  fastlm's FastModel, the padding-free batch (its packed attention kernel)

The step is train_bench's (bf16 autocast forward, backward, AdamW lr 2e-4; peak memory from
the first warm-up step; the timed steps between two synchronisations). Figures: useful tokens/s
(the examples' own tokens, never padding, over the timed steps), peak GiB, and the step-0 loss,
which is the same in every system (same examples and weights, LoRA B = 0, every example's own
next tokens predicted and nothing across examples).

Stdlib only at import time: the Unsloth child imports Unsloth before transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

from fastlm.benchmarking import report, train_bench
from fastlm.benchmarking.checkpoint import ensure_checkpoint
from fastlm.benchmarking.lengths import DEFAULT, load_histogram, sample_lengths
from fastlm.benchmarking.processes import command_line
from fastlm.benchmarking.shapes import SHAPES, get_shape
from fastlm.benchmarking.systems import LOADERS, Ctx, SkipSystem, preimport, versions
from fastlm.benchmarking.timing import timed_training

MODULE = "fastlm.benchmarking.packing_bench"
PROGRAM = f"python -m {MODULE}"
# system -> (loader in systems.LOADERS, batch layout)
SYSTEMS = {
    "hf-padded": ("hf", "padded"),
    "hf-padding-free": ("hf", "padding-free"),
    "unsloth-packing": ("unsloth", "padding-free"),
    "fastlm-padded": ("fastlm", "padded"),
    "fastlm-padding-free": ("fastlm", "padding-free"),
}
BASELINE = "hf-padded"
SHAPES_DEFAULT = "llama-3.1-8b,qwen3-4b"
EXAMPLES = 16  # examples per step: 16 x 197 tokens on average, about the 2 x 2048 of train_bench
SEED = 1234
# --dry-run: the tiny twin, lengths shrunk 8x (5 to 88 tokens, under its 256 positions, capped
# at 128 rather than its seq of 32), one warm-up and one timed step.
DRY_RUN = {"shapes": "tiny-llama", "examples": 4, "length_scale": 0.125, "seq": 128, "warmup": 1,
           "steps": 1}  # fmt: skip
SPEED_TITLE = "useful (non-pad) tokens/s, higher is better"
DASH = report.DASH


# --------------------------------------------------------------------------------------------
# The data: the same examples for every system, laid out padded or padding-free.
# --------------------------------------------------------------------------------------------
def step_examples(spec: dict, vocab: int) -> list[list[list[int]]]:
    """Per step, its examples' token ids: lengths from the histogram (seeded), random ids."""
    import torch

    n_steps, per_step = spec["warmup"] + spec["steps"], spec["examples"]
    lengths = sample_lengths(
        load_histogram(spec["lengths"]), n_steps * per_step, spec["seed"],
        scale=spec.get("length_scale", 1.0), max_len=spec["seq"],
    )  # fmt: skip
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, vocab, (sum(lengths),), generator=gen).split(lengths)
    examples = [x.tolist() for x in ids]
    return [examples[i * per_step : (i + 1) * per_step] for i in range(n_steps)]


def padded_batch(examples: list[list[int]], pad_id: int) -> dict:
    """(E, longest) right-padded: input_ids, attention_mask, labels (-100 on the pads)."""
    import torch

    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def padding_free_batch(examples: list[list[int]], *, flash_kwargs: bool = False) -> dict:
    """transformers' DataCollatorWithFlattening: (1, total) ids, restarting position_ids,
    labels -100 at each example's first token; `flash_kwargs`: cu_seq_lens_q/k, max_length_q/k."""
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(
        return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=flash_kwargs
    )
    return dict(collate([{"input_ids": e} for e in examples], return_tensors="pt"))


def unsloth_batch(examples: list[list[int]]) -> dict:
    """The padding-free batch plus ``packed_seq_lengths`` (int32), as Unsloth's packing
    collator (unsloth.utils.packing.enable_sample_packing) gives its models."""
    import torch

    batch = padding_free_batch(examples)
    batch["packed_seq_lengths"] = torch.tensor([len(e) for e in examples], dtype=torch.int32)
    return batch


def useful_tokens(batch: dict) -> int:
    """The examples' own tokens in a batch: the attention mask's ones (a padded batch), else
    every token (a padding-free row has no padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def data_digest(steps: list[list[list[int]]]) -> str:
    """sha256 of every step's examples: the same in every system's record."""
    return hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16]


def attention_for(system: str, shape, cuda: bool) -> str:
    """HF's padding-free batch runs flash_attention_2 where flash-attn is installed (CUDA)."""
    if system == "hf-padding-free" and cuda and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return shape.attn_implementation


def make_batches(system: str, steps: list[list[list[int]]], pad_id: int, attn: str) -> list[dict]:
    """Each step's examples in `system`'s layout (host tensors)."""
    if SYSTEMS[system][1] == "padded":
        return [padded_batch(s, pad_id) for s in steps]
    if system == "unsloth-packing":
        return [unsloth_batch(s) for s in steps]
    return [padding_free_batch(s, flash_kwargs=attn == "flash_attention_2") for s in steps]


# --------------------------------------------------------------------------------------------
# The loop: train_bench's step over the prepared batches, one batch a step.
# --------------------------------------------------------------------------------------------
def packing_loop(model, batches: list[dict], *, warmup: int, steps: int) -> dict:
    """Train on `batches` in order (warm-up ones first); useful tokens/s over the timed ones."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        for b in batches
    ]
    feed = iter(on_device)
    loop = timed_training(model, lambda: model(**next(feed)).loss, warmup=warmup, steps=steps)
    timed = batches[warmup:]
    useful = sum(useful_tokens(b) for b in timed)
    computed = sum(b["input_ids"].numel() for b in timed)
    elapsed = loop["timed_s"]
    return {
        "tokens_per_s": useful / elapsed,  # the figure: useful (non-pad) tokens per second
        "computed_tokens_per_s": computed / elapsed,
        "ms_per_step": 1000.0 * elapsed / steps,
        "useful_tokens": useful,
        "computed_tokens": computed,
        "padding_fraction": 1.0 - useful / computed,
        "useful_tokens_per_step": [useful_tokens(b) for b in batches],
        **loop,
    }


# --------------------------------------------------------------------------------------------
# Child process: one (shape, mode, system).
# --------------------------------------------------------------------------------------------
def _allow_unsloth_packing(model) -> None:
    """What Unsloth's trainer does before packed batches: rows may exceed max_seq_length."""
    try:
        from unsloth.utils.packing import mark_allow_overlength
    except ImportError as exc:
        raise SkipSystem(f"this Unsloth has no packing (unsloth.utils.packing): {exc}") from exc
    mark_allow_overlength(model)


def child_main(spec: dict) -> dict:
    """Load, add LoRA, train on the system's layout of the examples; always returns a record."""
    t_start = time.perf_counter()
    shape = get_shape(spec["shape"])
    system, mode = spec["system"], spec["mode"]
    loader, layout = SYSTEMS[system]
    rec = train_bench.new_record(spec, mode, layout=layout, examples=spec["examples"],
                                 lengths=spec["lengths"], seed=spec["seed"])  # fmt: skip

    def load(cuda: bool, dtype):
        if mode == "qlora" and not cuda:
            raise SkipSystem("QLoRA needs CUDA (bitsandbytes NF4); this machine has none")
        attn = attention_for(system, shape, cuda)
        steps = step_examples(spec, shape.vocab_size)
        # fastlm refuses a row longer than max_seq_length, a padding-free row included (each of
        # its examples may be shorter): those systems are loaded with the longest row's length.
        rows = [sum(map(len, s)) if layout == "padding-free" else 0 for s in steps]
        max_seq_length = max(spec["seq"], *rows)
        ctx = Ctx(
            shape=dataclasses.replace(shape, attn_implementation=attn), path=spec["path"],
            mode=mode, seq=max_seq_length, cuda=cuda, dtype=dtype,
            checkpointing=spec.get("fastlm_checkpointing", "fastlm"),
        )  # fmt: skip
        model = LOADERS[loader](ctx)
        if system == "unsloth-packing":
            _allow_unsloth_packing(model)
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(spec["path"]).pad_token_id
        batches = make_batches(system, steps, pad_id, attn)
        rec.update(attn_implementation=attn, data_sha256=data_digest(steps),
                   max_seq_length=max_seq_length if loader != "hf" else None)  # fmt: skip
        return model, lambda: packing_loop(
            model, batches, warmup=spec["warmup"], steps=spec["steps"]
        )

    return train_bench.measure_child(
        rec, t_start, load, lambda: versions(loader, mode), prepare=lambda: preimport(loader)
    )


# --------------------------------------------------------------------------------------------
# The table: useful tok/s, peak GiB, step-0 loss, against HF padded.
# --------------------------------------------------------------------------------------------
def compare(rec: dict, base: dict | None) -> dict:
    """Speed and memory ÷ the baseline's (HF padded), |Δ step-0 loss|; None where missing."""
    if rec.get("status") != "ok" or not base or base.get("status") != "ok":
        return {"speed": None, "memory": None, "loss_delta": None}
    a, b = report._num(rec.get("step0_loss")), report._num(base.get("step0_loss"))
    return {
        "speed": report._ratio(rec.get("tokens_per_s"), base.get("tokens_per_s")),
        "memory": report._ratio(rec.get("peak_gib"), base.get("peak_gib")),
        "loss_delta": abs(a - b) if a is not None and b is not None else None,
    }


COLUMNS = ["shape", "mode", "system", "useful tok/s", "× HF padded", "ms/step", "padding",
           "peak GiB", "× HF padded memory", "step-0 loss",
           "\\|Δ step-0 loss\\| vs HF padded"]  # fmt: skip


def _times(x) -> str:
    return DASH if x is None else f"{x:.2f}×"


def table(records: list[dict]) -> str:
    """The markdown table, one line per record, grouped by (shape, mode) in run order."""
    base = {(r.get("shape"), r.get("mode")): r for r in records if r.get("system") == BASELINE}
    groups = list(dict.fromkeys((r.get("shape"), r.get("mode")) for r in records))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for group in groups:
        for r in (r for r in records if (r.get("shape"), r.get("mode")) == group):
            head = [str(r.get("shape")), str(r.get("mode")), str(r.get("system"))]
            if r.get("status") != "ok":
                lines.append("| " + " | ".join(head + [str(r.get("status"))] + [DASH] * 7) + " |")
                continue
            vs = compare(r, base.get(group))
            tps, pad = report._num(r.get("tokens_per_s")), report._num(r.get("padding_fraction"))
            cells = head + [
                DASH if tps is None else f"{tps:,.0f}",
                _times(vs["speed"]),
                report._fmt(r.get("ms_per_step"), ".1f"),
                DASH if pad is None else f"{100 * pad:.0f}%",
                report._fmt(r.get("peak_gib"), ".2f"),
                _times(vs["memory"]),
                report._fmt(r.get("step0_loss"), ".4f"),
                report._fmt_delta(vs["loss_delta"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(payload: dict) -> str:
    """results.md: where and how it ran, the data, the table, what was not measured."""
    records = payload["records"]
    hist = load_histogram(payload.get("lengths", DEFAULT))
    devices = sorted({r["device"] for r in records if r.get("device")})
    out = ["# fastlm packing benchmark: padded vs padding-free on real lengths", ""]
    out.append(f"- date: {payload.get('date')}")
    out += [f"- command: `{run['command']}`" for run in payload.get("runs", [])]
    out.append(f"- device: {', '.join(devices) or DASH}")
    out += [f"- CUDA: {c}" for c in sorted({str(r["cuda"]) for r in records if r.get("cuda")})]
    loops = sorted({
        f"{r.get('examples')} examples per step, lengths capped at {r.get('seq')}, "
        f"{r.get('warmup')} warm-up + {r.get('steps')} timed steps, seed {r.get('seed')}"
        for r in records if r.get("status") == "ok"
    })  # fmt: skip
    out += [f"- loop: {loop}" for loop in loops]
    out += [
        f"- lengths: `{hist.name}`, {hist.n} examples: {hist.source['data']}; counted with "
        f"{hist.source['tokenizer']}; {hist.source['template']}. Stats: {hist.stats}",
        "",
        "Versions:",
        *report._versions_lines(records),
        "",
        "useful tok/s: the examples' own tokens (no padding) of the timed steps / their time; "
        "padding: the share of computed tokens that are padding; peak GiB: "
        "`max_memory_allocated`. Same examples, steps and random-init weights in every system, "
        + (
            "all in one process (--in-process: a smoke test, not a measurement)."
            if any(r.get("in_process") for r in records)
            else "each in its own process."
        ),
        "",
        table(records),
        "",
    ]
    notes = [
        f"- {r.get('shape')} ({r.get('mode')}) / {r.get('system')} ({r.get('status')}): "
        + " ".join(str(r.get("reason") or r.get("error") or "").split())[:400]
        for r in records
        if r.get("status") != "ok"
    ]
    if notes:
        out += ["Not measured:", *notes, ""]
    return "\n".join(out)


def write_outputs(out: Path, payload: dict) -> str:
    """results.json, results.md and (with matplotlib) results.png; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    records = payload["records"]
    base = {(r.get("shape"), r.get("mode")): r for r in records if r.get("system") == BASELINE}
    for r in records:
        r["vs_hf_padded"] = compare(r, base.get((r.get("shape"), r.get("mode"))))
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    (out / "results.md").write_text(md)
    if importlib.util.find_spec("matplotlib") is not None:
        report.plot(records, out / "results.png", speed_title=SPEED_TITLE)
    return md


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", help=f"comma list of: {', '.join(SHAPES)} "
                   f"(default {SHAPES_DEFAULT}; --dry-run: {DRY_RUN['shapes']})")  # fmt: skip
    p.add_argument("--modes", "--mode", dest="modes", default="lora,qlora",
                   help="comma list of lora, qlora (default both)")  # fmt: skip
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma list of: {', '.join(SYSTEMS)}")  # fmt: skip
    p.add_argument("--examples", type=int, help=f"examples per step (default {EXAMPLES})")
    p.add_argument("--lengths", default=DEFAULT, help="length histogram (lengths_<name>.json)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the lengths and the token ids")
    p.add_argument("--length-scale", type=float, help=argparse.SUPPRESS)  # dry run: 1/8
    p.add_argument("--seq", type=int, help="cap on an example's length (default: the shape's seq)")
    p.add_argument("--cache", default=train_bench.CACHE, help="checkpoint cache folder")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 3)")
    p.add_argument("--steps", type=int, help="timed steps (default 10)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-packing)")
    p.add_argument(
        "--fastlm-checkpointing", default="fastlm", choices=("fastlm", "activations"),
        help="fastlm's use_gradient_checkpointing (default: fastlm, offloaded as Unsloth's)",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help=f"{DRY_RUN['shapes']}, {DRY_RUN['examples']} examples a step of lengths / 8, "
        "1 warm-up + 1 timed step, LoRA only unless --modes says otherwise: the CPU smoke test",
    )  # fmt: skip
    p.add_argument(
        "--in-process", action="store_true",
        help="run every system in this process (CPU smoke tests only: no isolation)",
    )  # fmt: skip
    train_bench.add_parent_args(p, child_timeout=600.0, list_help="print the shapes and exit")
    p.set_defaults(batch=None)  # train_bench.base_spec's; a step here is --examples examples
    args = p.parse_args(argv)
    dry = DRY_RUN if args.dry_run else {}
    if args.dry_run and "--modes" not in (argv or []) and "--mode" not in (argv or []):
        args.modes = "lora"
    args.shapes = args.shapes or dry.get("shapes", SHAPES_DEFAULT)
    defaults = {"examples": EXAMPLES, "length_scale": 1.0, "seq": None, "warmup": 3, "steps": 10}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, dry.get(key, default))
    unknown = set(args.modes.split(",")) - {"lora", "qlora"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known: lora, qlora")
    if args.examples < 1:
        p.error("--examples must be >= 1")
    return train_bench.check_args(p, args, get_shape, tuple(SYSTEMS))


def run_child(spec: dict, log_path: Path, timeout: float, cuda: bool) -> dict:
    """train_bench's child runner, pointed at this module."""
    return train_bench.run_child(spec, log_path, timeout, cuda, module=MODULE)


def main(argv: list[str] | None = None, *, program: str = PROGRAM) -> int:
    """Run the benchmark with `argv`; `program` is how the results record the command."""
    args = parse_args(argv)
    if (code := train_bench.child_entry(args, child_main)) is not None:
        return code
    if args.list_shapes:
        print(train_bench._list_shapes())
        return 0

    def run(spec: dict, log: Path, timeout: float, cuda: bool) -> dict:
        loader = SYSTEMS[spec["system"]][0]
        package = {"unsloth": "unsloth"}.get(loader)
        if package and importlib.util.find_spec(package) is None:  # no process to start
            log.write_text(f"not started: {package} is not installed\n")
            rec = train_bench.new_record(spec, spec["mode"], layout=SYSTEMS[spec["system"]][1])
            return rec | {"status": "skipped", "reason": f"{package} is not installed"}
        if args.in_process:
            log.write_text("run in the parent process (--in-process)\n")
            return child_main(spec) | {"in_process": True}
        return run_child(spec, log, timeout, cuda)

    def parent(mode: str) -> train_bench.Parent:
        def spec(shape, system: str, path: str, out: Path) -> dict:
            return train_bench.base_spec(shape, system, path, args) | {
                "mode": mode,
                "batch": args.examples,
                "examples": args.examples,
                "lengths": args.lengths,
                "seed": args.seed,
                "length_scale": args.length_scale,
                "fastlm_checkpointing": args.fastlm_checkpointing,
            }

        return train_bench.Parent("packing", f"packing-{mode}", get_shape, ensure_checkpoint,
                                  spec, run, write)  # fmt: skip

    def write(out: Path, payload: dict) -> None:
        payload["lengths"] = args.lengths
        write_outputs(out, payload)

    parents = [parent(mode) for mode in args.modes.split(",")]
    out, records = train_bench.parent_loop(parents, args, command_line(program, argv))
    train_bench.print_failures(records)
    written = [n for n in ("results.json", "results.md", "results.png") if (out / n).is_file()]
    print(f"\nwrote {out}/{', '.join(written)}\n")
    print(table(records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
