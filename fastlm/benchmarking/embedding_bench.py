"""Embedding fine-tuning speed and memory, side by side: HF + PEFT, Sentence-Transformers,
Unsloth, fastlm.

    python -m fastlm.benchmarking.embedding_bench --shapes qwen3-embedding-0.6b \
        --systems hf,st,unsloth,fastlm --out benchmarks/results/<name>
    python benchmarks/embedding_bench.py ...          # the same, from a source checkout

The parent builds one random-init bf16 Qwen3Model checkpoint per shape (seed 0, cached under
--cache; a Sentence-Transformers directory: last-token pooling, Normalize), then runs each
(shape, system) in its own Python process (this module with --child). Every child loads that
checkpoint, adds LoRA (r=16, alpha=16, the seven projections, A drawn after seed 3407) its own
way — or, with --mode full, trains every weight — and runs `embed_loop`: a batch of query /
positive pairs of random token ids, InfoNCE with in-batch negatives (temperature 0.05 =
Sentence-Transformers' MNRL scale 20), bf16 autocast, AdamW. Systems:

- hf:      transformers `AutoModel` + `peft.get_peft_model`, last-token pooling, L2 norm and the
           InfoNCE cross-entropy written out in plain PyTorch (no fastlm code);
- st:      `SentenceTransformer(dir)` + `add_adapter(LoraConfig)` (PEFT) and its
           `MultipleNegativesRankingLoss`; skipped when sentence-transformers does not import;
- unsloth: `unsloth.FastSentenceTransformer.from_pretrained(dir,
           use_gradient_checkpointing="unsloth")` + its `get_peft_model` (same LoRA) and
           Sentence-Transformers' `MultipleNegativesRankingLoss`; Unsloth is imported first in
           its process; skipped when it does not import;
- fastlm:  `fastlm.embeddings.load_embedding_model(dir, lora_r=16)` (fastlm kernels) and
           `InfoNCELoss`.

Results go to --out as results.json, results.md and results.png (report.py, ratios against hf,
plus fastlm against st and Unsloth), rewritten after every child.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fastlm.benchmarking import shapes as _shapes
from fastlm.benchmarking import train_bench
from fastlm.benchmarking.processes import command_line, dist_version
from fastlm.benchmarking.shapes import (
    LORA_TARGETS,
    QWEN_COMMON,
    TINY_DIMS,
    Shape,
    dims,
    shape_table,
)
from fastlm.benchmarking.systems import (
    LORA_SEED,
    SkipSystem,
    lora_config,
    plain_checkpointing,
    preimport,
    versions,
)
from fastlm.benchmarking.timing import kernel_time, timed_training

MODULE = "fastlm.benchmarking.embedding_bench"  # what the children run: python -m MODULE --child
PROGRAM = f"python -m {MODULE}"  # how a run is recorded unless main() is told otherwise
SYSTEMS = ("hf", "st", "unsloth", "fastlm")
MODES = ("lora", "full")  # LoRA r=16, or every weight trained
TEMPERATURE = 0.05  # = 1 / Sentence-Transformers' MNRL scale of 20
CHECKPOINTING = ("true", "false", "fastlm")  # unsloth: "unsloth" unless "false"
TITLE = "# fastlm embedding fine-tuning benchmark"

_QWEN3 = {
    **QWEN_COMMON,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "head_dim": 128,
    "eos_token_id": 151643,
}


def _qwen3_embedding(name: str, batch: int = 64, seq: int = 256, tiny: bool = False, **config):
    """A Qwen3 embedding model: `config` over the family's common entries."""
    return Shape(name, "qwen3", {**_QWEN3, **config}, batch, seq, tiny=tiny)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        _qwen3_embedding(
            "qwen3-embedding-0.6b",
            **dims(vocab=151669, hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8),
        ),
        _qwen3_embedding(
            "qwen3-embedding-4b",
            **dims(vocab=151665, hidden=2560, intermediate=9728, layers=36, heads=32, kv_heads=8),
            max_position_embeddings=40960,
        ),
        _qwen3_embedding(
            "tiny-qwen3-embedding",
            batch=4,
            seq=16,
            tiny=True,
            **TINY_DIMS,
            head_dim=16,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ]
}


def get_shape(name: str) -> Shape:
    return _shapes.get_shape(name, SHAPES)


# --------------------------------------------------------------------------------------------
# The checkpoint: a Sentence-Transformers directory around a random-init Qwen3Model.
# --------------------------------------------------------------------------------------------
def ensure_checkpoint(shape: Shape, cache_root: str | Path, device: str) -> dict:
    """Path and metadata of the shape's checkpoint, built only if missing or stale."""
    from fastlm.benchmarking.checkpoint import is_complete  # lazy: a sibling, stdlib at import

    path = Path(cache_root) / shape.name
    meta = is_complete(path, shape)
    if meta is not None and (path / "modules.json").is_file():
        return {"path": str(path), "reused": True, **meta}
    meta = build_checkpoint(shape, path, device)
    return {"path": str(path), "reused": False, **meta}


def build_checkpoint(shape: Shape, path: Path, device: str) -> dict:
    """Random-init bf16 Qwen3Model (seed 0) + word-level tokenizer + Sentence-Transformers files:
    train_bench's checkpoint builder with the base-model class and the ST layout added."""
    from fastlm.benchmarking import checkpoint  # lazy: a sibling, stdlib at import
    from fastlm.embeddings.st_format import write_layout  # lazy: JSON only, in the parent

    def st_layout(folder: Path, config) -> dict:
        write_layout(
            str(folder),
            pooling="lasttoken",
            hidden_size=config.hidden_size,
            dense=[],
            normalize=True,
            max_seq_length=min(8192, config.max_position_embeddings),
            do_lower_case=False,
            prompts={},
            default_prompt_name=None,
        )
        return {"kind": "Qwen3Model + Sentence-Transformers layout (lasttoken, Normalize)"}

    return checkpoint.build_checkpoint(shape, path, device, "AutoModel", finish=st_layout)


# --------------------------------------------------------------------------------------------
# Systems: each returns (module whose trainable parameters are the LoRA weights — every weight
# with full=True — and loss(q, p)). q and p are {"input_ids", "attention_mask"} dicts of
# (batch, seq) tensors.
# --------------------------------------------------------------------------------------------
def build_hf(path: str, seq: int, cuda: bool, dtype, checkpointing: str, full: bool = False):
    """transformers AutoModel + PEFT; pooling, normalisation and InfoNCE in plain PyTorch."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import AutoModel

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if cuda:
        kwargs["device_map"] = {"": 0}
    body = AutoModel.from_pretrained(path, **kwargs)
    torch.manual_seed(LORA_SEED)
    if not full:
        body = get_peft_model(body, lora_config())
    if checkpointing != "false":
        plain_checkpointing(body)

    def embed(features: dict) -> torch.Tensor:
        hidden = body(**features).last_hidden_state  # (B, S, H)
        mask = features["attention_mask"].bool()
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # last real token
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(pooled.float(), dim=-1)

    def loss(query: dict, positive: dict) -> torch.Tensor:
        q, p = embed(query), embed(positive)
        scores = q @ p.T / TEMPERATURE  # (B, B): row i's positive is column i
        return F.cross_entropy(scores, torch.arange(len(q), device=scores.device))

    return body, loss


def _mnrl_loss(model):
    """Sentence-Transformers' MultipleNegativesRankingLoss at scale 1 / TEMPERATURE, as
    loss(query, positive)."""
    try:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    except Exception as exc:  # ImportError, or a version clash inside the package
        raise SkipSystem(
            f"import sentence_transformers failed: {type(exc).__name__}: {exc}"
        ) from exc
    mnrl = MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE)

    def loss(query: dict, positive: dict):
        return mnrl([query, positive], None)

    return loss


def build_st(path: str, seq: int, cuda: bool, dtype, checkpointing: str, full: bool = False):
    """SentenceTransformer + add_adapter (PEFT LoRA) + MultipleNegativesRankingLoss (scale 20)."""
    import torch

    try:
        from sentence_transformers import SentenceTransformer
    except Exception as exc:  # ImportError, or a version clash inside the package
        raise SkipSystem(
            f"import sentence_transformers failed: {type(exc).__name__}: {exc}"
        ) from exc
    model = SentenceTransformer(
        path,
        device="cuda" if cuda else "cpu",
        model_kwargs={"dtype": dtype, "attn_implementation": "sdpa"},
    )
    torch.manual_seed(LORA_SEED)
    if not full:
        model.add_adapter(lora_config())
        # add_adapter leaves the LoRA weights in the base weights' dtype (bf16); get_peft_model,
        # as in hf and fastlm, keeps them in fp32. Same LoRA everywhere: fp32.
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    if checkpointing != "false":
        plain_checkpointing(model[0].auto_model)
    return model, _mnrl_loss(model)


def build_unsloth(path: str, seq: int, cuda: bool, dtype, checkpointing: str, full: bool = False):
    """Unsloth's FastSentenceTransformer with its "unsloth" checkpointing, its get_peft_model
    (the same LoRA), and Sentence-Transformers' MNRL (which Unsloth patches) as the loss.

    `preimport("unsloth")` has run first in this process: Unsloth patches transformers on import.
    """
    from unsloth import FastSentenceTransformer

    mode = False if checkpointing == "false" else "unsloth"
    model = FastSentenceTransformer.from_pretrained(
        path,
        max_seq_length=seq,
        dtype=dtype,
        load_in_4bit=False,
        full_finetuning=full,
        use_gradient_checkpointing=mode,
        random_state=LORA_SEED,
        pooling_mode="lasttoken",
    )
    if not full:
        model = FastSentenceTransformer.get_peft_model(
            model,
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            target_modules=list(LORA_TARGETS),
            use_gradient_checkpointing=mode,
            random_state=LORA_SEED,
            max_seq_length=seq,
        )
    if cuda:
        model = model.to("cuda")
    return model, _mnrl_loss(model)


def build_fastlm(path: str, seq: int, cuda: bool, dtype, checkpointing: str, full: bool = False):
    """fastlm.embeddings as users call it: load_embedding_model(lora_r=16) + InfoNCELoss."""
    # lazy: a child imports only its own system's packages
    from fastlm.embeddings import InfoNCELoss, load_embedding_model

    mode = {"true": True, "false": False, "fastlm": "fastlm"}[checkpointing]
    lora = {} if full else {"lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.0}
    model, _tokenizer = load_embedding_model(
        path,
        max_seq_length=seq,
        dtype=dtype,
        device_map="cuda" if cuda else "cpu",
        full_finetuning=full,
        target_modules=list(LORA_TARGETS),
        use_gradient_checkpointing=mode,
        random_state=LORA_SEED,
        **lora,
    )
    infonce = InfoNCELoss(temperature=TEMPERATURE)

    def loss(query: dict, positive: dict):
        return infonce(model(**query), model(**positive))

    return model, loss


BUILDERS = {"hf": build_hf, "st": build_st, "unsloth": build_unsloth, "fastlm": build_fastlm}


# --------------------------------------------------------------------------------------------
# The loop: identical for every system.
# --------------------------------------------------------------------------------------------
def embed_loop(
    model,
    loss_fn,
    *,
    vocab: int,
    batch: int,
    seq: int,
    query_seq: int,
    warmup: int,
    steps: int,
    profile: bool = False,
):
    """Seeded random query (`query_seq` tokens) / document (`seq` tokens) ids, no padding, bf16
    autocast, backward, AdamW.

    Peak memory counts from just before the first warm-up step; `steps` steps are timed between
    two synchronisations; losses are read (`.item()`) after the timed region. Tokens per step:
    batch · (query_seq + seq). `profile`: afterwards, torch.profiler over two forward+backward
    passes, printed (kernel table and GPU-busy time per step) to the child's log.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1234)
    query_ids = torch.randint(0, vocab, (batch, query_seq), generator=gen).to(device)
    doc_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    query_mask, doc_mask = torch.ones_like(query_ids), torch.ones_like(doc_ids)

    def loss():
        # Fresh dicts: Sentence-Transformers writes its outputs into the feature dicts.
        query = {"input_ids": query_ids, "attention_mask": query_mask}
        positive = {"input_ids": doc_ids, "attention_mask": doc_mask}
        return loss_fn(query, positive)

    loop = timed_training(model, loss, warmup=warmup, steps=steps, record_dtypes=True)
    elapsed = loop["timed_s"]
    if profile and device == "cuda":
        loop["gpu_busy_ms_per_step"] = _profile(torch, loss)
    return {
        "tokens_per_s": batch * (query_seq + seq) * steps / elapsed,
        "pairs_per_s": batch * steps / elapsed,
        "ms_per_step": 1000.0 * elapsed / steps,
        **loop,
    }


def _profile(torch, loss, passes: int = 2) -> float:
    """Print the kernels of `passes` forward+backward passes; return GPU-busy ms per pass (a
    step's wall time far above it means the step waits on the CPU: launches, Python)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(passes):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                value = loss()
            value.backward()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=30), flush=True)
    busy_ms, launches = kernel_time(torch, table, passes)
    print(f"PROFILE GPU busy {busy_ms:.1f} ms per pass, {launches} kernels per pass",
          flush=True)  # fmt: skip
    return busy_ms


# --------------------------------------------------------------------------------------------
# Child process: one (shape, system).
# --------------------------------------------------------------------------------------------
def _versions(system: str) -> dict:
    out = versions(system if system in ("fastlm", "unsloth") else "hf", "lora")
    if system in ("st", "unsloth"):
        out["sentence-transformers"] = dist_version("sentence-transformers")
    return out


def child_main(spec: dict) -> dict:
    """Load, add LoRA, run the loop; always returns a record (status ok / error / skipped)."""
    t_start = time.perf_counter()
    shape = get_shape(spec["shape"])
    system = spec["system"]
    mode = spec.get("mode", "lora")
    rec = train_bench.new_record(
        spec, mode, query_seq=spec["query_seq"], checkpointing=spec["checkpointing"]
    )

    def load(cuda: bool, dtype):
        model, loss_fn = BUILDERS[system](
            spec["path"], spec["seq"], cuda, dtype, spec["checkpointing"], full=mode == "full"
        )
        loop = {k: spec[k] for k in ("batch", "seq", "warmup", "steps")}
        loop.update(
            query_seq=spec.get("query_seq", spec["seq"]), profile=spec.get("profile", False)
        )
        return model, lambda: embed_loop(model, loss_fn, vocab=shape.vocab_size, **loop)

    return train_bench.measure_child(
        rec, t_start, load, lambda: _versions(system), prepare=lambda: preimport(system)
    )


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def run_child(spec: dict, log_path: Path, timeout: float, cuda: bool) -> dict:
    """train_bench's child runner, pointed at this module."""
    return train_bench.run_child(spec, log_path, timeout, cuda, module=MODULE)


def _label(rec: dict) -> str:
    """The shape, with the mode when it is not LoRA: "qwen3-embedding-0.6b (full)"."""
    mode = rec.get("mode", "lora")
    return rec["shape"] + ("" if mode == "lora" else f" ({mode})")


def versus(records: list[dict], other: str) -> dict[str, dict]:
    """Per shape (and mode): fastlm's speed-up, memory ratio and |Δ step-0 loss| against the
    system `other` (both ok)."""
    ok = {(_label(r), r["system"]): r for r in records if r.get("status") == "ok"}
    out = {}
    for (label, system), base in ok.items():
        fast = ok.get((label, "fastlm"))
        if system != other or fast is None:
            continue
        peak_f, peak_b = fast.get("peak_gib"), base.get("peak_gib")
        out[label] = {
            "speedup": fast["tokens_per_s"] / base["tokens_per_s"],
            "memory_ratio": peak_f / peak_b if peak_f and peak_b else None,
            "loss_delta": abs(fast["step0_loss"] - base["step0_loss"]),
        }
    return out


def versus_st(records: list[dict]) -> dict[str, dict]:
    """`versus(records, "st")`: fastlm against Sentence-Transformers."""
    return versus(records, "st")


OTHERS = {"st": "sentence-transformers", "unsloth": "Unsloth"}


def _versus_lines(comparison: dict[str, dict], name: str = OTHERS["st"]) -> list[str]:
    lines = []
    for shape, c in comparison.items():
        memory = "n/a" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}×"
        lines.append(
            f"- {shape}: fastlm {c['speedup']:.2f}× the tokens/s of {name}, "
            f"{memory} its peak memory, |Δ step-0 loss| {c['loss_delta']:.2g}"
        )
    return lines


def write_report(out: Path, payload: dict) -> str:
    """results.json / .md / .png via report.write_outputs, retitled, with fastlm against st and
    Unsloth."""
    from fastlm.benchmarking.report import write_outputs  # lazy: a sibling, stdlib at import

    comparisons = {other: versus(payload["records"], other) for other in OTHERS}
    payload["fastlm_vs_st"] = comparisons["st"]
    payload["fastlm_vs_unsloth"] = comparisons["unsloth"]
    md = write_outputs(out, payload)
    md = md.replace("# fastlm training benchmark", TITLE, 1)
    notes = [
        "",
        "Embedding loop: query / positive pairs of random token ids (no padding), last-token "
        "pooling, L2 norm, InfoNCE with in-batch negatives (temperature 0.05 = MNRL scale 20); "
        "tokens/s counts queries and positives (`seq` is the document length).",
        "",
        "Pairs per second (query tokens / document tokens per pair):",
        *[
            f"- {_label(r)} / {r['system']}: {r['pairs_per_s']:.1f} pairs/s "
            f"({r.get('query_seq')} / {r['seq']} tokens), peak {r.get('peak_gib') or 0:.2f} GiB"
            for r in payload["records"]
            if r.get("status") == "ok" and "pairs_per_s" in r
        ],
    ]
    for other, comparison in comparisons.items():
        if comparison:
            lines = _versus_lines(comparison, OTHERS[other])
            notes += ["", f"fastlm vs {OTHERS[other]}:", *lines]
    md = md.rstrip("\n") + "\n" + "\n".join(notes) + "\n"
    (out / "results.md").write_text(md)
    return md


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        default="qwen3-embedding-0.6b,qwen3-embedding-4b",
        help=f"comma list of: {', '.join(SHAPES)}",
    )
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma list of: {','.join(SYSTEMS)}"
    )
    p.add_argument(
        "--mode", choices=MODES, default="lora", help="lora (r=16), or full: every weight trained"
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-embedding)")
    train_bench.add_loop_args(
        p,
        seq_help="override every shape's document length (256)",
        batch_help="override every shape's pairs per step (64)",
    )
    p.add_argument("--query-seq", type=int, default=64, help="query length (at most --seq)")
    p.add_argument("--profile", action="store_true", help="also profile two passes (in the logs)")
    p.add_argument(
        "--checkpointing",
        choices=CHECKPOINTING,
        default="true",
        help="true: every system recomputes activations (non-reentrant; Unsloth its own "
        '"unsloth" mode); false: none does; fastlm: fastlm offloads layer inputs to CPU '
        "(as Unsloth does), hf and st recompute",
    )
    train_bench.add_parent_args(p, child_timeout=600.0, list_help="print the shapes and exit")
    return train_bench.check_args(p, p.parse_args(argv), get_shape, SYSTEMS)


def _list_shapes() -> str:
    columns = ["shape", "hidden", "layers", "heads / kv", "head_dim", "intermediate", "vocab"]
    return shape_table(SHAPES, [*columns, "batch", "seq"])


def main(argv: list[str] | None = None, *, program: str = PROGRAM) -> int:
    """Run the benchmark with `argv` (default: ``sys.argv[1:]``); `program` is how the results
    record the command. Exit code 0 even when a child failed: failures are results."""
    args = parse_args(argv)
    if (code := train_bench.child_entry(args, child_main)) is not None:
        return code
    if args.list_shapes:
        print(_list_shapes())
        return 0

    def spec(shape, system: str, path: str, out: Path) -> dict:
        return train_bench.base_spec(shape, system, path, args) | {
            "mode": args.mode,
            "query_seq": min(args.query_seq, args.seq or shape.seq),
            "profile": args.profile,
            "checkpointing": args.checkpointing,
        }

    parent = train_bench.Parent("embedding", f"embedding-{args.mode}", get_shape,
                                ensure_checkpoint, spec, run_child, write_report)  # fmt: skip
    out, records = train_bench.parent_loop(parent, args, command_line(program, argv))
    train_bench.print_failures(records)
    for other, name in OTHERS.items():
        lines = _versus_lines(versus(records, other), name)
        if lines:
            print(f"\nfastlm vs {name}:\n" + "\n".join(lines))
    train_bench.print_table(out, records)
    return 0


if __name__ == "__main__":
    # Exit code 0 even when a child failed: failures are results, recorded in the output.
    sys.exit(main())
