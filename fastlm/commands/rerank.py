"""``fastlm rerank``: fine-tune a reranker (a causal LM scored by "yes" vs "no"), LoRA or full.

Reads and checks the data first with ``fastlm.embeddings.data.load_embedding_data``, as
``fastlm embed`` does (a bad line fails with its file and line, before any model loads), loads
the model with ``FastReranker.from_pretrained`` (fastlm's kernels), ranks each ``--eval-data``
query's candidates, trains with ``RerankerTrainer``, ranks them again, saves the adapter (or the
full model, or a merged copy) as folders that ``FastReranker.from_pretrained`` loads, and prints
a summary. Without ``--model`` it trains the bundled Gemma 3 270M (it has single "yes" and
"no" tokens); without ``--data`` it trains on a built-in set made from
``fastlm.embeddings.demo_data`` and evaluates on its held-out questions.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path
from typing import Any

from fastlm.commands import (
    CommandError,
    Console,
    _training,
    check_model_folder,
    default_model_path,
    export_dtype,
    resolve_torch_dtype,
)
from fastlm.commands._common_args import add_flags, add_group, data_dependent_defaults
from fastlm.data.formats import DataFormatError

EXAMPLES = """\
examples:
  fastlm rerank                      # demo: the bundled Gemma 3 270M, built-in question set
  fastlm rerank --model ./Qwen3-Reranker-0.6B --data train.jsonl --eval-data held_out.jsonl
  fastlm rerank --model ./Qwen3-Reranker-0.6B --data scored.jsonl --loss pointwise \\
      --max-seq-length 512 --save-method merged_16bit
  fastlm rerank --data train.jsonl --instruction "Given a bug report, find the fix" \\
      --temperature 0.5 --max-steps 300
  fastlm rerank --config rerank.yaml --lr 1e-4    # keys = flag names; flags win

data (--data, --eval-data: a .jsonl file, a .json list, or a folder of them):
  listwise   {"query": "how do I reset it?", "response": "Hold the button 5 s.",
              "rejected_response": ["The button is blue.", "Reset costs $5."]}
             -> --loss listwise: softmax over [response, rejected...] per row
  pointwise  {"query": "how do I reset it?", "response": "Hold the button 5 s.", "label": 1}
             -> --loss pointwise: BCE of each pair against its label (0/1 or a score in
                [0, 1]); a row's rejected_response texts count as label 0
  Sentence-Transformers column names work too: anchor / positive / negative (a string, a list,
  or negative_1, negative_2, ...), sentence1 / sentence2 / score.
  --loss defaults to listwise when every row has a rejected_response and none has a label,
  else pointwise. --eval-data groups the rows by query: each query's candidates (its
  responses and rejected_responses) are ranked, a response is relevant unless its label is
  below 0.5, and recall@1, MRR@10 and NDCG@10 are printed before and after training.

outputs (in --output-dir):
  adapter/             the LoRA adapter, tokenizer and prompt template (fastlm_reranker.json):
                       FastReranker.from_pretrained("<output-dir>/adapter") loads the base + it
  model/               the whole model (same files), with --full-finetune
  merged_16bit/        LoRA merged into the weights, with --save-method merged_16bit
  rerank_summary.json  steps, losses, tokens/s, ranking metrics, times and the paths above
  rerank_config.json   every setting of the run; reuse it with --config
"""
LOSSES = ("listwise", "pointwise")
TEMPLATE_CHOICES = ("auto", "qwen3", "gemma")
SAVE_METHODS = ("lora", "merged_16bit")
DEFAULT_MAX_SEQ_LENGTH = 2048  # capped to the model's positions when it has fewer
DEFAULTS = {"batch_size": 8, "lr": 1e-4, "epochs": 1.0, "warmup_steps": 0}
# The demo set is 32 rows of 3 candidates: a few epochs of small steps show a clear gain.
DEMO_DEFAULTS = {"batch_size": 4, "lr": 2e-4, "epochs": 2.0, "warmup_steps": 2}
METRIC_KS = (1,)  # recall@1; retrieval_metrics adds mrr@10 and ndcg@10
SCORE_BATCH_SIZE = 16  # pairs per forward when ranking --eval-data
_DEFAULT_MODEL_NAME = "Gemma 3 270M (bundled)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm rerank`` flags, in groups (the ones other commands share: _common_args)."""
    add_flags(parser, "--config")
    group = parser.add_argument_group("model")
    add_flags(
        group,
        "--model",
        "--max-seq-length",
        "--dtype",
        "--device",
        "--load-in-4bit",
        "--full-finetune",
        model={
            "help": "causal LM or reranker folder, e.g. Qwen3-Reranker (default: the bundled "
            "Gemma 3 270M)"
        },
        max_seq_length={
            "help": "longer pairs have their query/document cut (default: 2048, or the model's "
            "max_position_embeddings when smaller)"
        },
    )
    group.add_argument(
        "--template",
        choices=TEMPLATE_CHOICES,
        default="auto",
        help="prompt around each pair. auto: the folder's saved one, else gemma for tokenizers "
        "with <start_of_turn> and no <|im_start|>, else qwen3 (Qwen3-Reranker's)",
    )
    group.add_argument(
        "--instruction",
        metavar="TEXT",
        help="the template's instruction, for training, evaluation and the saved template "
        "(default: 'Given a web search query, retrieve relevant passages that answer the "
        "query')",
    )

    add_group(parser, "data", eval_data={"help": "held-out rows: each query's candidates ranked"})

    group = parser.add_argument_group("loss")
    group.add_argument(
        "--loss",
        choices=LOSSES,
        help="listwise: softmax over each row's [response, rejected...]; pointwise: BCE per "
        "pair (default: listwise when every row has a rejected_response and no label)",
    )
    add_flags(
        group, "--temperature", temperature={"help": "listwise softmax temperature (default: 1.0)"}
    )

    add_group(
        parser,
        "LoRA",
        lora_alpha={"default": 32},
        lora_dropout={"help": "0 keeps layers fused"},
        target_modules={"help": "projections to adapt (default: q k v o gate up down)"},
    )
    knobs = data_dependent_defaults(
        DEFAULTS,
        DEMO_DEFAULTS,
        batch_size="rows per step, each with all its candidates",
    )
    add_group(
        parser,
        "training",
        **knobs,
        grad_accum={"default": 1},
    )
    group = add_group(parser, "output", output_dir={"default": "outputs/rerank"})
    save_method = "besides adapter/: merged_16bit also writes the model with LoRA merged in"
    add_flags(group, "--save-method", save_method={"choices": SAVE_METHODS, "help": save_method})


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm rerank`` (called by ``fastlm.cli``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_rerank(args)
    return 0


# --------------------------------------------------------------------------- data


def _check_data(data, loss: str | None, flag: str) -> str:
    """Labels in [0, 1] and rows that suit the loss; returns the loss (``None``: picked here)."""
    for row, where in zip(data.rows, data.locations):
        label = row.get("label")
        if label is not None and not 0.0 <= label <= 1.0:
            raise DataFormatError(
                f"{where}: a reranker label must lie in [0, 1] (1 = relevant), got {label:g}"
            )
    bare = next((w for r, w in zip(data.rows, data.locations) if not r["rejected_response"]), None)
    if loss is None:
        loss = "pointwise" if data.labelled or bare is not None else "listwise"
    where = str(data.files[0]) if data.files else flag
    if loss == "listwise":
        if bare is not None:
            raise DataFormatError(
                f"{bare}: --loss listwise ranks each row's response against its "
                "rejected_response, and this row has none; add negatives or use --loss pointwise"
            )
        for row, location in zip(data.rows, data.locations):
            if row.get("label", 1.0) != 1.0:
                raise DataFormatError(
                    f"{location}: --loss listwise takes each row's response as relevant, but its "
                    f"label is {row['label']:g}; use --loss pointwise for scored pairs"
                )
    elif all(not r["rejected_response"] and r.get("label", 1.0) == 1.0 for r in data.rows):
        raise CommandError(
            f"{flag} {where}: every pair is relevant (label 1, no rejected_response), so there is "
            "nothing to learn; add labels below 1 or rejected_response texts"
        )
    return loss


def _kind(data) -> str:
    if data.labelled:
        return "scored-pair"
    negatives = sum(1 for row in data.rows if row["rejected_response"])
    return "listwise" if negatives == len(data) else f"pair ({negatives} with rejected_response)"


def ranking_groups(data) -> list[tuple[str, list[str], set[int]]]:
    """Rows → ``(query, candidates, relevant indices)``, one per query that can be ranked.

    A query's candidates are the distinct responses and rejected_responses of all its rows; a
    response is relevant unless its label is below 0.5. Queries with nothing relevant, or with
    fewer than two candidates, are left out (their rank is undefined or trivial).
    """
    candidates: dict[str, dict[str, bool]] = {}  # query -> text -> relevant
    for row in data.rows:
        texts = candidates.setdefault(row["query"], {})
        relevant = row.get("label", 1.0) >= 0.5
        texts[row["response"]] = texts.get(row["response"], False) or relevant
        for text in row["rejected_response"]:
            texts.setdefault(text, False)
    groups = []
    for query, texts in candidates.items():
        relevant = {i for i, hit in enumerate(texts.values()) if hit}
        if relevant and len(texts) > 1:
            groups.append((query, list(texts), relevant))
    return groups


def _demo_data(max_samples: int | None):
    """The built-in set: each question's answer against its paraphrase and another answer."""
    from fastlm.embeddings.data import EmbeddingData  # lazy: start-up (fastlm.commands doc)
    from fastlm.embeddings.demo_data import retrieval_demo  # lazy: start-up (fastlm.commands doc)

    demo = retrieval_demo()
    train = demo["train"]
    rows = [
        {**row, "rejected_response": [*row["rejected_response"], train[i - 1]["response"]]}
        for i, row in enumerate(train)
    ]
    rows = rows[:max_samples] if max_samples else rows
    data = EmbeddingData(rows=rows, locations=[f"demo row {i}" for i in range(len(rows))])
    held_out = demo["eval"]
    answers = [held_out["corpus"][f"a{i}"] for i in range(len(held_out["queries"]))]
    groups = []
    for i, query in enumerate(held_out["queries"].values()):
        others = [answers[(i + k) % len(answers)] for k in (1, 2)]
        groups.append((query, [answers[i], held_out["corpus"][f"d{i}"], *others], {0}))
    return data, groups


# --------------------------------------------------------------------------- checks


def _check_args(args: argparse.Namespace) -> None:
    names = ("lora_r", "grad_accum", "logging_steps", "max_seq_length", "batch_size")
    at_least = {**dict.fromkeys(names, 1), "max_steps": 1, "save_steps": 1, "max_samples": 1}
    _training.check_ranges(args, {**at_least, "warmup_steps": 0}, ("lr", "epochs", "temperature"))
    _training.check_training(args)
    _training.check_method(args)
    if args.full_finetune and (args.target_modules or args.use_rslora):
        raise CommandError("--target-modules / --use-rslora are LoRA flags; drop --full-finetune")
    if args.full_finetune and args.save_method != "lora":
        raise CommandError("--save-method is for LoRA runs; --full-finetune saves model/ anyway")


def make_loss(loss: str, temperature: float | None):
    """The ``RerankLoss`` module of ``--loss`` and ``--temperature``."""
    # lazy: start-up (fastlm.commands doc)
    from fastlm.embeddings import ListwiseRerankLoss, PointwiseRerankLoss

    if loss == "listwise":
        return ListwiseRerankLoss(temperature=1.0 if temperature is None else temperature)
    return PointwiseRerankLoss()


def _describe_loss(loss) -> str:
    temperature = getattr(loss, "temperature", None)
    if temperature is not None:
        return f"listwise (temperature {temperature:g})"
    return "pointwise (BCE)"


# --------------------------------------------------------------------------- run


def run_rerank(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the summary that is also written to rerank_summary.json."""
    from fastlm.embeddings.data import load_embedding_data  # lazy: start-up (fastlm.commands doc)
    from fastlm.loading.device import resolve_device  # lazy: start-up (fastlm.commands doc)

    console = Console()
    wall_start = time.perf_counter()
    _check_args(args)
    resume = _training.resume_from(args, "rerank")
    demo = args.data is None
    data, groups = _training.training_rows(console, args, _demo_data, _kind)
    loss_name = _check_data(data, args.loss, "--data")
    if args.temperature is not None and loss_name != "listwise":
        raise CommandError("--temperature is for --loss listwise, not pointwise")
    if args.eval_data:
        groups = ranking_groups(load_embedding_data(args.eval_data))
        if not groups:
            raise CommandError(
                f"--eval-data {args.eval_data}: no query has a relevant response and another "
                "candidate to rank it against"
            )
    if groups:
        pairs = sum(len(candidates) for _, candidates, _ in groups)
        console.status(f"eval data: {len(groups)} queries, {pairs} candidates in all")
    knobs = _training.with_defaults(args, DEMO_DEFAULTS if demo else DEFAULTS)

    device = resolve_device(args.device)
    dtype = resolve_torch_dtype(args.dtype, device)
    reranker, model_path = _load_model(args, device, dtype, console)
    loss = make_loss(loss_name, args.temperature)
    evaluate = functools.partial(_evaluate, reranker, groups, console) if groups else None
    title = f"reranking, {len(groups or ())} held-out queries"
    new_trainer = functools.partial(_trainer, reranker, data.rows, loss, args, knobs, device)
    described = _describe_loss(loss)
    stats, metrics = _training.train_evaluated(
        console, args, reranker, new_trainer, described, evaluate, title, "rerank", resume
    )

    output_dir = Path(args.output_dir)
    outputs = _save(reranker, args, model_path, output_dir, console)
    summary = {
        "model": model_path,
        "data": "built-in demo (fastlm.embeddings.demo_data)" if demo else str(args.data),
        "data_kind": _kind(data),
        "rows": len(data),
        "loss": _describe_loss(loss),
        "template": _template_name(reranker.template),
        "instruction": reranker.template.default_instruction,
        "device": device,
        "dtype": str(_training.compute_dtype(reranker)).replace("torch.", ""),
        "method": "full" if args.full_finetune else "qlora" if args.load_in_4bit else "lora",
        "max_seq_length": reranker.max_seq_length,
        **knobs,
        **stats,
        "eval": metrics,
        "outputs": outputs,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    _training.write_run(output_dir, "rerank", args, summary)
    _print_summary(console, summary, output_dir, default_model=args.model is None)
    return summary


def _templates() -> dict:
    # lazy: start-up (fastlm.commands doc)
    from fastlm.embeddings import GEMMA_RERANKER_TEMPLATE, QWEN3_RERANKER_TEMPLATE

    return {"qwen3": QWEN3_RERANKER_TEMPLATE, "gemma": GEMMA_RERANKER_TEMPLATE}


def _template_name(template) -> str:
    builtin = {(t.prefix, t.body, t.suffix, t.yes, t.no): name for name, t in _templates().items()}
    key = (template.prefix, template.body, template.suffix, template.yes, template.no)
    return builtin.get(key, "the model folder's (fastlm_reranker.json)")


def _pick_template(reranker, choice: str, model_path: str, instruction: str | None):
    """``--template`` and ``--instruction`` as a ``RerankerTemplate`` (see the flags' help)."""
    import dataclasses

    from fastlm.embeddings.reranker import TEMPLATE_FILE  # lazy: start-up (fastlm.commands doc)

    templates = _templates()
    if choice != "auto":
        template = templates[choice]
    elif (Path(model_path) / TEMPLATE_FILE).is_file():
        template = reranker.template  # from_pretrained read the folder's own
    else:
        vocab = reranker.tokenizer.get_vocab()
        gemma = "<start_of_turn>" in vocab and "<|im_start|>" not in vocab
        template = templates["gemma" if gemma else "qwen3"]
    if instruction is not None:
        template = dataclasses.replace(template, default_instruction=instruction)
    return template


def _load_model(args, device: str, dtype, console: Console):
    from fastlm.embeddings import FastReranker  # lazy: start-up (fastlm.commands doc)

    model_path = args.model or default_model_path(console)
    check_model_folder(
        model_path, "merged_16bit/ folder that fastlm rerank --save-method merged_16bit writes"
    )
    checkpointing = _training.checkpointing(args.gradient_checkpointing, device)
    arguments = _training.model_arguments(args, device, dtype, checkpointing)
    arguments["max_seq_length"] = _training.max_seq_length(args, model_path, DEFAULT_MAX_SEQ_LENGTH)
    # a ValueError: no tokenizer, "yes"/"no" not single tokens, too short
    with _training.loading(console, model_path, device) as start:
        reranker = FastReranker.from_pretrained(model_path, **arguments)
        template = _pick_template(reranker, args.template, model_path, args.instruction)
        if template != reranker.template:  # checked again: answers, room left for the pair
            reranker = FastReranker(
                reranker.model, reranker.tokenizer, template, reranker.max_seq_length
            )
    _training.loaded_status(
        console, reranker, start, f"{_template_name(reranker.template)} template"
    )
    _training.add_lora(reranker, args, checkpointing)
    return reranker, model_path


def _evaluate(reranker, groups, console: Console, when: str) -> dict[str, float]:
    """recall@1, MRR@10 and NDCG@10 of ranking each query's candidates by z = l_yes − l_no.

    Ties count against the model: a relevant candidate ranks below the irrelevant ones that
    score the same (an untrained model that scores every pair alike gets no credit).
    """
    import torch

    # lazy: start-up (fastlm.commands doc)
    from fastlm.embeddings.evaluation import retrieval_metrics

    console.status(f"ranking metrics {when} ...")
    queries = [query for query, candidates, _ in groups for _ in candidates]
    documents = [text for _, candidates, _ in groups for text in candidates]
    logits = reranker.score(
        queries, documents, batch_size=SCORE_BATCH_SIZE, return_logits=True
    ).tolist()
    # One row per query holding each candidate's place (width − rank: distinct, so the ranking
    # retrieval_metrics reads is this one); absent candidates are −inf and never count.
    width = max(len(candidates) for _, candidates, _ in groups)
    places = torch.full((len(groups), width), float("-inf"))
    start = 0
    for i, (_, candidates, relevant) in enumerate(groups):
        z = logits[start : start + len(candidates)]
        start += len(candidates)
        ranked = sorted(range(len(candidates)), key=lambda j: (-z[j], j in relevant))
        for rank, j in enumerate(ranked):
            places[i, j] = float(width - rank)
    return retrieval_metrics(places, [relevant for _, _, relevant in groups], ks=METRIC_KS)


def _trainer(reranker, rows: list[dict], loss, args, knobs: dict, device: str):
    from fastlm.embeddings import RerankerTrainer  # lazy: start-up (fastlm.commands doc)

    def count(inputs) -> int:  # the real (non-padding) tokens of a batch's pairs
        return int(inputs["attention_mask"].sum())

    return _training.loss_trainer(RerankerTrainer, count, reranker, rows, loss, args, knobs, device)


def _save(reranker, args, model_path: str, output_dir: Path, console: Console) -> dict[str, str]:
    outputs: dict[str, str] = {}
    if args.full_finetune:
        target = output_dir / "model"
        reranker.save_pretrained_merged(target, "merged_16bit")  # in the training dtype
        outputs["model"] = str(target)
    else:
        target = output_dir / "adapter"
        reranker.save_pretrained(target)
        outputs["adapter"] = str(target)
    console.status(f"saved {target}")
    if args.save_method == "merged_16bit":
        saved, target = target, output_dir / "merged_16bit"
        console.status(f"writing merged_16bit to {target} ...")
        try:
            reranker.save_pretrained_merged(target, "merged_16bit", dtype=export_dtype(model_path))
        except (NotImplementedError, ValueError) as error:
            raise CommandError(
                f"training finished and {saved} is saved, but the merge into {target} failed: "
                f"{error}"
            ) from error
        outputs["merged_16bit"] = str(target)
    return outputs


def _print_summary(console: Console, summary: dict, output_dir: Path, default_model: bool) -> None:
    rows = [
        ("model", _DEFAULT_MODEL_NAME if default_model else summary["model"]),
        ("data", f"{summary['rows']} {summary['data_kind']} rows"),
        ("loss", summary["loss"]),
        ("template", summary["template"]),
        *_training.run_rows(summary),
        *_training.metric_rows(summary["eval"]),
    ]
    saved = [(f"saved {name}", path) for name, path in summary["outputs"].items()]
    _training.print_summary(console, "rerank", summary, output_dir, rows, saved)
