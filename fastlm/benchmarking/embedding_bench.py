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

Variable-length mode (``--lengths alpaca_en_demo``): the pairs have real lengths. Each step's
`batch` query / positive lengths are drawn (seed 1234, ``lengths.sample_pairs``) from two
histograms counted on the same data as packing_bench's (fastlm/benchmarking/lengths_<name>_query
.json: instruction [+ input], mean 19.8 tokens; lengths_<name>_positive.json: the output, mean
148, max 560), capped at --seq (default 1024: none is cut); random token ids; every system trains
on the same pairs in the same steps (`data_sha256`), a new batch each step:

    python -m fastlm.benchmarking.embedding_bench --shapes qwen3-embedding-0.6b \
        --lengths alpaca_en_demo --out benchmarks/results/<name>

- hf, st, unsloth: as above, each step's texts padded to the batch's longest (hf by hand, right,
  with the attention mask; st and unsloth with their tokenizer's ``pad``, as Sentence-Transformers
  pads what it tokenises);
- fastlm-padded:       the fastlm system with ``padding_free=False`` (what ``EmbeddingTrainer(...,
                       padding_free=False)`` sets), the batch padded by its tokenizer, as
                       EmbeddingCollator pads; the loss is ``InfoNCELoss.batch_loss``;
- fastlm-padding-free: the same with the loader's default ``padding_free=True``: the loss
                       packs the step's queries and positives into one row
                       (``FastSentenceTransformer.embed_sides``: one body call a step) and the
                       body runs its varlen attention, the path EmbeddingTrainer takes.

Recorded besides the loop's figures: useful (non-pad) tokens/s (``tokens_per_s``), pairs/s, the
tokens the body computed (counted at its input embedding: padding included) and the padding
share, the layout fastlm's model reports, and both histograms' source. ``--length-scale`` shrinks
the lengths and ``--in-process`` runs every system in the parent: CPU smoke tests only.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

from fastlm.benchmarking import packing_bench, report, train_bench
from fastlm.benchmarking import shapes as _shapes
from fastlm.benchmarking.lengths import LengthHistogram, load_histogram, sample_pairs
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
# The variable-length mode (--lengths): system -> how its batches are laid out.
VARLEN_SYSTEMS = {
    "hf": "padded",
    "st": "padded",
    "unsloth": "padded",
    "fastlm-padded": "padded",
    "fastlm-padding-free": "padding-free",
}
VARLEN_CAP = 1024  # a text's length cap (--seq): over both histograms' longest (169, 560)
SEED = 1234  # of the drawn lengths and the random token ids
VARLEN_TITLE = f"{TITLE}: variable-length pairs"

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


def build_fastlm(
    path: str,
    seq: int,
    cuda: bool,
    dtype,
    checkpointing: str,
    full: bool = False,
    padding_free: bool = True,
):
    """fastlm.embeddings as users call it: load_embedding_model(lora_r=16) + InfoNCELoss, whose
    ``batch_loss`` is what EmbeddingTrainer computes. `padding_free`: the loader's flag (default
    on; a batch without padding runs as it is)."""
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
        padding_free=padding_free,
        **lora,
    )
    infonce = InfoNCELoss(temperature=TEMPERATURE)

    def loss(query: dict, positive: dict):
        return infonce.batch_loss(model, {"query": query, "response": positive})

    return model, loss


BUILDERS = {
    "hf": build_hf,
    "st": build_st,
    "unsloth": build_unsloth,
    "fastlm": build_fastlm,
    "fastlm-padded": functools.partial(build_fastlm, padding_free=False),
    "fastlm-padding-free": functools.partial(build_fastlm, padding_free=True),
}


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
# Variable-length pairs (--lengths): the same pairs for every system, padded or packed.
# --------------------------------------------------------------------------------------------
def pair_histograms(name: str) -> tuple[LengthHistogram, LengthHistogram]:
    """The query and positive histograms of data set `name`: lengths_<name>_query.json and
    lengths_<name>_positive.json."""
    return load_histogram(f"{name}_query"), load_histogram(f"{name}_positive")


def pair_steps(spec: dict, vocab: int) -> list[list[tuple[list[int], list[int]]]]:
    """Per step, its `batch` (query ids, positive ids) pairs: lengths drawn from the spec's
    histograms (seeded, times `length_scale`, capped at `seq`), random token ids."""
    import torch

    n_steps, batch = spec["warmup"] + spec["steps"], spec["batch"]
    lengths = sample_pairs(
        *pair_histograms(spec["lengths"]), n_steps * batch, spec["seed"],
        scale=spec.get("length_scale", 1.0), max_len=spec["seq"],
    )  # fmt: skip
    flat = [n for pair in lengths for n in pair]  # q0, p0, q1, p1, ...
    gen = torch.Generator().manual_seed(spec["seed"])
    texts = [x.tolist() for x in torch.randint(0, vocab, (sum(flat),), generator=gen).split(flat)]
    pairs = list(zip(texts[0::2], texts[1::2]))
    return [pairs[i * batch : (i + 1) * batch] for i in range(n_steps)]


def pad_texts(system: str, model, texts: list[list[int]], pad_id: int) -> dict:
    """One side of a step as the system gets it: (B, longest) input_ids + attention_mask. hf
    pads by hand (right, `pad_id`); the others with their own tokenizer's ``pad`` (its side and
    pad token), as Sentence-Transformers and fastlm's EmbeddingCollator pad what they tokenise."""
    if system == "hf":
        batch = packing_bench.padded_batch(texts, pad_id)
        return {k: batch[k] for k in ("input_ids", "attention_mask")}
    batch = model.tokenizer.pad({"input_ids": texts}, padding=True, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def count_embedded_tokens(model) -> tuple[list[int], object]:
    """(counts, hook handle): every call of the body's input embedding (``embed_tokens``)
    appends how many token ids it embeds, padding included: what the body computes."""
    import torch

    embeddings = [
        m for name, m in model.named_modules()
        if isinstance(m, torch.nn.Embedding) and name.endswith("embed_tokens")
    ]  # fmt: skip
    if len(embeddings) != 1:
        raise RuntimeError(f"expected one embed_tokens in the model, found {len(embeddings)}")
    counts: list[int] = []
    handle = embeddings[0].register_forward_pre_hook(lambda m, args: counts.append(args[0].numel()))
    return counts, handle


def varlen_loop(model, loss_fn, batches: list, *, warmup: int, steps: int, profile: bool = False):
    """train_bench's step over prepared (query, positive) batches, one a step (warm-up first);
    useful (non-pad) tokens/s and pairs/s over the timed steps, and the tokens the body
    computed (``count_embedded_tokens``: the same number of embedding calls every step -- two,
    one per side, or one for sides joined in a packed row -- or the count is unknown)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = [tuple({k: v.to(device) for k, v in side.items()} for side in b) for b in batches]
    feed = iter(on_device)

    def loss(pair=None):
        query, positive = pair or next(feed)
        return loss_fn(dict(query), dict(positive))  # fresh dicts: ST writes into them

    counts, handle = count_embedded_tokens(model)
    try:
        loop = timed_training(model, loss, warmup=warmup, steps=steps, record_dtypes=True)
    finally:
        handle.remove()
    timed = batches[warmup:]
    useful = sum(int(side["attention_mask"].sum()) for b in timed for side in b)
    per_step, odd = divmod(len(counts), warmup + steps)  # 2 (a call per side) or 1 (joined)
    computed = sum(counts[per_step * warmup :]) if per_step and not odd else None
    elapsed = loop["timed_s"]
    if profile and device == "cuda":
        loop["gpu_busy_ms_per_step"] = _profile(torch, lambda: loss(on_device[-1]))
    return {
        "tokens_per_s": useful / elapsed,  # the figure: useful (non-pad) tokens per second
        "pairs_per_s": sum(len(b[0]["input_ids"]) for b in timed) / elapsed,
        "ms_per_step": 1000.0 * elapsed / steps,
        "useful_tokens": useful,
        "padded_tokens": sum(side["input_ids"].numel() for b in timed for side in b),
        "computed_tokens": computed,
        "computed_tokens_per_s": computed / elapsed if computed is not None else None,
        "padding_fraction": 1.0 - useful / computed if computed else None,
        "embedding_calls": len(counts),
        **loop,
    }


def varlen_child(spec: dict, t_start: float) -> dict:
    """One system on the variable-length pairs; always returns a record."""
    shape = get_shape(spec["shape"])
    system, mode = spec["system"], spec.get("mode", "lora")
    query, positive = pair_histograms(spec["lengths"])
    rec = train_bench.new_record(
        spec, mode, layout=VARLEN_SYSTEMS[system], lengths=spec["lengths"],
        lengths_source={"query": query.source, "positive": positive.source},
        seed=spec["seed"], length_scale=spec.get("length_scale", 1.0),
        checkpointing=spec["checkpointing"], fastlm_graphs=spec.get("fastlm_graphs", False),
    )  # fmt: skip

    def load(cuda: bool, dtype):
        from transformers import AutoTokenizer

        model, loss_fn = BUILDERS[system](
            spec["path"], spec["seq"], cuda, dtype, spec["checkpointing"], full=mode == "full"
        )
        steps = pair_steps(spec, shape.vocab_size)
        pad_id = AutoTokenizer.from_pretrained(spec["path"]).pad_token_id
        batches = [
            tuple(pad_texts(system, model, list(side), pad_id) for side in zip(*step))
            for step in steps
        ]
        rec["data_sha256"] = packing_bench.data_digest(steps)

        def run() -> dict:
            out = varlen_loop(model, loss_fn, batches, warmup=spec["warmup"],
                              steps=spec["steps"], profile=spec.get("profile", False))  # fmt: skip
            path = getattr(model, "latest_batch_path", None)  # fastlm: what the last step ran
            if path is not None:
                out |= {"batch_path": path.layout, "batch_path_reason": path.reason}
            return out

        return model, run

    return train_bench.measure_child(
        rec, t_start, load, lambda: _versions(system), prepare=lambda: preimport(system)
    )


# --------------------------------------------------------------------------------------------
# Child process: one (shape, system).
# --------------------------------------------------------------------------------------------
def _versions(system: str) -> dict:
    loader = "fastlm" if system.startswith("fastlm") else system
    out = versions(loader if loader in ("fastlm", "unsloth") else "hf", "lora")
    if system in ("st", "unsloth"):
        out["sentence-transformers"] = dist_version("sentence-transformers")
    return out


def child_main(spec: dict) -> dict:
    """Load, add LoRA, run the loop; always returns a record (status ok / error / skipped)."""
    t_start = time.perf_counter()
    if spec.get("lengths"):
        return varlen_child(spec, t_start)
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


def versus(records: list[dict], other: str, fast: str = "fastlm") -> dict[str, dict]:
    """Per shape (and mode): the system `fast`'s speed-up, memory ratio and |Δ step-0 loss|
    against the system `other` (both ok)."""
    ok = {(_label(r), r["system"]): r for r in records if r.get("status") == "ok"}
    out = {}
    for (label, system), base in ok.items():
        fast_rec = ok.get((label, fast))
        if system != other or fast_rec is None:
            continue
        peak_f, peak_b = fast_rec.get("peak_gib"), base.get("peak_gib")
        out[label] = {
            "speedup": fast_rec["tokens_per_s"] / base["tokens_per_s"],
            "memory_ratio": peak_f / peak_b if peak_f and peak_b else None,
            "loss_delta": abs(fast_rec["step0_loss"] - base["step0_loss"]),
        }
    return out


def versus_st(records: list[dict]) -> dict[str, dict]:
    """`versus(records, "st")`: fastlm against Sentence-Transformers."""
    return versus(records, "st")


OTHERS = {"st": "sentence-transformers", "unsloth": "Unsloth"}


def _versus_lines(
    comparison: dict[str, dict], name: str = OTHERS["st"], fast: str = "fastlm"
) -> list[str]:
    lines = []
    for shape, c in comparison.items():
        memory = "n/a" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}×"
        lines.append(
            f"- {shape}: {fast} {c['speedup']:.2f}× the tokens/s of {name}, "
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


VARLEN_COLUMNS = ["shape", "mode", "system", "layout", "useful tok/s", "× hf", "pairs/s",
                  "ms/step", "padding", "peak GiB", "× hf memory", "step-0 loss",
                  "\\|Δ step-0 loss\\| vs hf"]  # fmt: skip


def varlen_table(records: list[dict]) -> str:
    """The variable-length mode's markdown table, one line per record, ratios against hf."""
    base = report.baselines(records)
    lines = ["| " + " | ".join(VARLEN_COLUMNS) + " |", "|" + " --- |" * len(VARLEN_COLUMNS)]
    for r in records:
        head = [str(r.get("shape")), str(r.get("mode")), str(r.get("system")), str(r.get("layout"))]
        if r.get("status") != "ok":
            cells = head + [str(r.get("status"))] + [report.DASH] * (len(VARLEN_COLUMNS) - 5)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        vs = report.derived(r, base.get(report._key(r)))
        tps, pad = report._num(r.get("tokens_per_s")), report._num(r.get("padding_fraction"))
        times = {k: report.DASH if x is None else f"{x:.2f}×" for k, x in vs.items()}
        cells = head + [
            report.DASH if tps is None else f"{tps:,.0f}",
            times["speedup"],
            report._fmt(r.get("pairs_per_s"), ".1f"),
            report._fmt(r.get("ms_per_step"), ".1f"),
            report.DASH if pad is None else f"{100 * pad:.0f}%",
            report._fmt(r.get("peak_gib"), ".2f"),
            times["memory_ratio"],
            report._fmt(r.get("step0_loss"), ".4f"),
            report._fmt_delta(vs["loss_delta"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_varlen_report(out: Path, payload: dict) -> str:
    """The variable-length mode's results.json / .md / .png: where and how it ran, both
    histograms' source, the table (against hf), fastlm-padding-free against st and Unsloth."""
    out.mkdir(parents=True, exist_ok=True)
    records = payload["records"]
    base = report.baselines(records)
    for r in records:
        r["vs_hf"] = report.derived(r, base.get(report._key(r)))
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    devices = sorted({r["device"] for r in records if r.get("device")})
    md = [VARLEN_TITLE, "", f"- date: {payload.get('date')}"]
    md += [f"- command: `{run['command']}`" for run in payload.get("runs", [])]
    md.append(f"- device: {', '.join(devices) or report.DASH}")
    md += [f"- CUDA: {c}" for c in sorted({str(r["cuda"]) for r in records if r.get("cuda")})]
    md += sorted({
        f"- loop: {r.get('batch')} pairs per step, texts capped at {r.get('seq')} tokens, "
        f"lengths × {r.get('length_scale')}, {r.get('warmup')} warm-up + {r.get('steps')} timed "
        f"steps, seed {r.get('seed')}, checkpointing {r.get('checkpointing')}"
        for r in records if r.get("status") == "ok"
    })  # fmt: skip
    for name in sorted({r["lengths"] for r in records if r.get("lengths")}):
        for side, hist in zip(("queries", "positives"), pair_histograms(name)):
            src = hist.source
            md.append(
                f"- {side}: `{hist.name}`, {hist.n} texts: {src['data']}; {src['fields']}; "
                f"counted with {src['tokenizer']}. Stats: {hist.stats}"
            )
    md += ["", "Versions:", *report._versions_lines(records), ""]
    md += [
        "useful tok/s: the pairs' own tokens (queries and positives, no padding) of the timed "
        "steps / their time; padding: the share of the tokens the body computed (counted at its "
        "input embedding) that are padding; pairs/s; peak GiB: `max_memory_allocated`. Same "
        "pairs, steps and random-init weights in every system (`data_sha256`), "
        + (
            "all in one process (--in-process: a smoke test, not a measurement)."
            if any(r.get("in_process") for r in records)
            else "each in its own process."
        ),
        "",
        varlen_table(records),
        "",
    ]
    notes = report._notes(records)
    if notes:
        md += ["Not measured:", *notes, ""]
    for other, name in OTHERS.items():
        lines = _versus_lines(versus(records, other, VARLEN_FAST), name, VARLEN_FAST)
        if lines:
            md += [f"fastlm padding-free vs {name}:", *lines, ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    if importlib.util.find_spec("matplotlib") is not None:
        report.plot(records, out / "results.png", speed_title=VARLEN_SPEED_TITLE)
    return text


VARLEN_FAST = "fastlm-padding-free"  # the system set against st and Unsloth
VARLEN_SPEED_TITLE = "useful (non-pad) tokens/s, higher is better"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes",
        default="qwen3-embedding-0.6b,qwen3-embedding-4b",
        help=f"comma list of: {', '.join(SHAPES)}",
    )
    p.add_argument(
        "--systems",
        help=f"comma list of: {','.join(SYSTEMS)} (default all); with --lengths: "
        f"{','.join(VARLEN_SYSTEMS)} (default all)",
    )
    p.add_argument(
        "--mode", choices=MODES, default="lora", help="lora (r=16), or full: every weight trained"
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-embedding)")
    train_bench.add_loop_args(
        p,
        seq_help="override every shape's document length (256); with --lengths: the cap on a "
        f"text's length (default {VARLEN_CAP}, or the shape's positions if fewer)",
        batch_help="override every shape's pairs per step (64)",
    )
    p.add_argument("--query-seq", type=int, default=64, help="query length (at most --seq)")
    p.add_argument(
        "--lengths",
        help="variable-length mode: query / positive lengths drawn from the histograms "
        "fastlm/benchmarking/lengths_<NAME>_query.json / _positive.json (alpaca_en_demo)",
    )
    p.add_argument("--seed", type=int, default=SEED, help="--lengths: seed of lengths and ids")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="--lengths: scale the drawn lengths (CPU smoke tests: 0.25)")  # fmt: skip
    p.add_argument(
        "--in-process", action="store_true",
        help="run every system in this process (CPU smoke tests only: no isolation)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="also profile two passes (in the logs)")
    p.add_argument(
        "--checkpointing",
        choices=CHECKPOINTING,
        default="true",
        help="true: every system recomputes activations (non-reentrant; Unsloth its own "
        '"unsloth" mode); false: none does; fastlm: fastlm offloads layer inputs to CPU '
        "(as Unsloth does), hf and st recompute",
    )
    p.add_argument(
        "--fastlm-graphs",
        action="store_true",
        help="fastlm's checkpointed layers replayed as CUDA graphs (with --checkpointing fastlm; "
        "padding-free rows are then padded to steady shapes)",
    )
    train_bench.add_parent_args(p, child_timeout=600.0, list_help="print the shapes and exit")
    args = p.parse_args(argv)
    systems = tuple(VARLEN_SYSTEMS) if args.lengths else SYSTEMS
    args.systems = args.systems or ",".join(systems)
    if args.child is None:
        if args.lengths:
            pair_histograms(args.lengths)  # an unknown name exits here, listing the known ones
        _refuse_mixed_append(p, args)
    return train_bench.check_args(p, args, get_shape, systems)


def _refuse_mixed_append(p: argparse.ArgumentParser, args) -> None:
    """--append adds to an --out folder of the same kind only: fixed-length and variable-length
    records share their (shape, system, mode) keys and would replace each other."""
    old = Path(args.out or "") / "results.json"
    if not (args.append and args.out and old.is_file()):
        return
    kinds = {r.get("lengths") for r in json.loads(old.read_text()).get("records", [])}
    if kinds - {args.lengths}:
        p.error(f"{old} holds records of another length mode ({sorted(map(str, kinds))}): "
                "give this run another --out")  # fmt: skip


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
        common = train_bench.base_spec(shape, system, path, args) | {
            "mode": args.mode,
            "profile": args.profile,
            "checkpointing": args.checkpointing,
            "fastlm_graphs": args.fastlm_graphs,
        }
        if not args.lengths:
            return common | {"query_seq": min(args.query_seq, args.seq or shape.seq)}
        cap = args.seq or min(VARLEN_CAP, int(shape.config["max_position_embeddings"]))
        return common | {"seq": cap, "lengths": args.lengths, "seed": args.seed,
                         "length_scale": args.length_scale}  # fmt: skip

    def run(spec: dict, log: Path, timeout: float, cuda: bool) -> dict:
        if args.in_process:
            log.write_text("run in the parent process (--in-process)\n")
            return child_main(spec) | {"in_process": True}
        return run_child(spec, log, timeout, cuda)

    varlen = "-varlen" if args.lengths else ""
    write = write_varlen_report if args.lengths else write_report
    parent = train_bench.Parent(f"embedding{varlen}", f"embedding{varlen}-{args.mode}",
                                get_shape, ensure_checkpoint, spec, run, write)  # fmt: skip
    out, records = train_bench.parent_loop(parent, args, command_line(program, argv))
    train_bench.print_failures(records)
    fast = VARLEN_FAST if args.lengths else "fastlm"
    for other, name in OTHERS.items():
        lines = _versus_lines(versus(records, other, fast), name, fast)
        if lines:
            print(f"\n{fast} vs {name}:\n" + "\n".join(lines))
    if args.lengths:
        written = [n for n in ("results.json", "results.md", "results.png") if (out / n).is_file()]
        print(f"\nwrote {out}/{', '.join(written)}\n")
        print(varlen_table(records), flush=True)
    else:
        train_bench.print_table(out, records)
    return 0


if __name__ == "__main__":
    # Exit code 0 even when a child failed: failures are results, recorded in the output.
    sys.exit(main())
