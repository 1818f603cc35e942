"""``fastlm sft``: supervised fine-tuning (LoRA, QLoRA or full) with TRL's SFTTrainer.

Reads and checks the data first (a bad line fails in a second, before any model loads), loads the
model with ``FastModel`` (fastlm's kernels), trains with ``trl.SFTTrainer``, saves the adapter (or
the full model), optionally exports merged / GGUF copies, and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from fastlm.commands import (
    GGUF_METHODS,
    CommandError,
    Console,
    _training,
    default_model_path,
    export_dtype,
    resolve_torch_dtype,
)
from fastlm.commands._common_args import add_flags, add_group
from fastlm.data.formats import FORMATS, TRAIN_ON, load_data, sft_rows
from fastlm.real_models import GEMMA_CHAT_TEMPLATE

EXAMPLES = """\
examples:
  fastlm sft --data train.jsonl --max-steps 60          # LoRA on the bundled Gemma 3 270M
  fastlm sft --model ./Llama-3.2-1B --data data/ --lora-r 32 --epochs 2 --output-dir out/llama
  fastlm sft --model ./Qwen3-8B --data chat.jsonl --load-in-4bit --gguf q8_0
  fastlm sft --model ./Qwen3-0.6B --data notes.jsonl --full-finetune --lr 2e-5
  fastlm sft --model ./Qwen3-0.6B --data chat.jsonl --packing --max-seq-length 4096
  fastlm sft --config sft.yaml --lr 1e-4                # keys = flag names; flags win

data (--data: a .jsonl file, a .json list, or a folder of them; the format is detected):
  chat               {"messages": [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"}]}
  sharegpt           {"conversations": [{"from": "human", "value": "Hi"},
                                        {"from": "gpt", "value": "Hello!"}]}
  instruction        {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
  prompt_completion  {"prompt": "2 + 2 =", "completion": " 4"}
  text               {"text": "Any document."}
  With --train-on completion (the default) the loss covers only the answer: the last assistant
  message, the output or the completion. Chat data uses the tokenizer's chat template.

outputs (in --output-dir):
  adapter/           the LoRA adapter + tokenizer (plain PEFT; `fastlm export` takes it)
  model/             the full model, with --full-finetune
  merged_16bit/      LoRA merged into the weights, with --save-method merged_16bit
  gguf/              llama.cpp / Ollama files, with --gguf q8_0 (or f16, bf16)
  sft_summary.json   steps, losses, tokens/s, time, batching (packed rows) and the paths above
  sft_config.json    every setting of the run; reuse it with --config
"""
SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
DEFAULT_MAX_SEQ_LENGTH = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm sft`` flags, in groups (the ones ``fastlm embed`` has too: _common_args)."""
    add_flags(parser, "--config")
    group = parser.add_argument_group("model")
    add_flags(
        group,
        "--model",
        "--max-seq-length",
        "--dtype",
        "--device",
        model={"help": "local Hugging Face model folder (default: the bundled Gemma 3 270M)"},
        max_seq_length={
            "help": f"longer examples are cut (default: {DEFAULT_MAX_SEQ_LENGTH}, or the model's "
            "max_position_embeddings when smaller)"
        },
    )
    add_flags(group, "--load-in-4bit", "--full-finetune")
    group.add_argument(
        "--chat-template",
        metavar="FILE|NAME",
        help="Jinja template file, or 'chatml' / 'gemma', when the tokenizer has none",
    )

    group = parser.add_argument_group("data")
    add_flags(group, "--data", data={"help": "training data: .jsonl, .json or a folder"})
    group.add_argument(
        "--data-format",
        choices=("auto", *FORMATS),
        default="auto",
        help="auto: detected from the first record's keys",
    )
    add_flags(group, "--eval-data", eval_data={"help": "held-out data, same formats"})
    group.add_argument(
        "--eval-steps",
        type=int,
        metavar="N",
        help="evaluate every N steps (default: once, at the end)",
    )
    add_flags(group, "--max-samples", max_samples={"help": "use the first N records"})
    group.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default="completion",
        help="completion: loss on the answers only; all: on every token",
    )
    group.add_argument(
        "--packing",
        action="store_true",
        help="pack examples into rows of up to --max-seq-length tokens (best-fit decreasing), "
        "batched without padding; attention stays within each example",
    )
    group.add_argument(
        "--padding-free",
        action="store_true",
        help="the same batches as without it, their examples laid end to end instead of padded; "
        "attention stays within each example (--packing does this too)",
    )

    add_group(
        parser,
        "LoRA",
        lora_alpha={"default": 16},
        lora_dropout={"help": "0 keeps layers fused"},
        target_modules={
            "help": "projections to adapt (default: q k v o gate up down), e.g. q_proj v_proj"
        },
    )
    add_group(
        parser,
        "training",
        batch_size={"default": 2, "help": "examples per device step"},
        grad_accum={"default": 4},
        lr={"default": 2e-4},
        epochs={"default": 1.0},
        warmup_steps={"default": 5},
        optim={"help": "optimizer name (transformers), e.g. adamw_torch"},
        gradient_checkpointing={
            "help": "fastlm: recompute activations, layer inputs kept in CPU memory; true: plain "
            "recompute; false: keep everything (fastest, most memory); auto: fastlm on GPU, "
            "false on CPU",
        },
    )
    group = add_group(parser, "output", output_dir={"default": "outputs/sft"})
    save_method = "besides adapter/: merged_16bit or merged_4bit also writes a merged model"
    add_flags(group, "--save-method", save_method={"choices": SAVE_METHODS, "help": save_method})
    group.add_argument(
        "--gguf",
        nargs="+",
        choices=GGUF_METHODS,
        metavar="QUANT",
        help=f"also export GGUF: {', '.join(GGUF_METHODS)}",
    )


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm sft`` (called by ``fastlm.cli``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_sft(args)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if not args.data:
        raise CommandError("--data is required: a .jsonl / .json file or a folder of them")
    names = ("max_seq_length", "batch_size", "grad_accum", "lora_r", "logging_steps")
    optional = ("max_steps", "eval_steps", "save_steps", "max_samples")
    _training.check_ranges(args, dict.fromkeys(names + optional, 1))
    _training.check_training(args)
    _training.check_method(args)
    if args.full_finetune and args.save_method != "lora":
        raise CommandError("--save-method is for LoRA runs; --full-finetune saves model/ anyway")
    if args.eval_steps and not args.eval_data:
        raise CommandError("--eval-steps needs --eval-data")


def run_sft(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the summary that is also written to sft_summary.json."""
    console = Console()
    wall_start = time.perf_counter()
    _check_args(args)
    resume = _training.resume_from(args, "sft")
    data = load_data(args.data, args.data_format, args.max_samples)
    eval_data = load_data(args.eval_data, args.data_format) if args.eval_data else None
    console.status(
        f"data: {len(data)} {data.format} records from {_training.describe_files(data.files)}"
    )
    if eval_data is not None:
        console.status(f"eval data: {len(eval_data)} {eval_data.format} records")

    # lazy: start-up (fastlm.commands doc); here, so that bad data fails before torch loads
    from fastlm.loading.device import resolve_device

    device = resolve_device(args.device)
    dtype = resolve_torch_dtype(args.dtype, device)
    model_path = args.model or default_model_path(console)
    max_length = _training.max_seq_length(args, model_path, DEFAULT_MAX_SEQ_LENGTH)
    model, tokenizer = _load_model(args, model_path, max_length, device, dtype, console)
    train_set = _to_dataset(data, tokenizer, args)
    eval_set = _to_dataset(eval_data, tokenizer, args) if eval_data is not None else None

    trainer = _trainer(model, tokenizer, train_set, eval_set, args, device, max_length)
    _check_left(console, trainer.train_dataset, len(train_set), max_length, "--data")
    if eval_set is not None:
        _check_left(console, trainer.eval_dataset, len(eval_set), max_length, "--eval-data")
    batching = _batching(trainer.train_dataset, args, max_length)
    if batching["mode"] != "padded":
        console.status(f"batches: {_describe_batching(batching)}")
    console.status(_training.training_status(model, args))
    output_dir = Path(args.output_dir)
    stats = _training.train_resumable(console, trainer, args, "sft", resume)
    if eval_set is not None:
        stats["eval_loss"] = trainer.evaluate().get("eval_loss")

    outputs = _save(model, tokenizer, args, model_path, output_dir, console)
    summary = {
        # absolute: a later `fastlm export` or rerun may start from another folder
        "model": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
        "data": os.path.abspath(args.data),
        "data_format": data.format,
        "examples": len(data),
        "device": device,
        "dtype": str(_training.compute_dtype(model)).replace("torch.", ""),
        "method": "full" if args.full_finetune else "qlora" if args.load_in_4bit else "lora",
        **stats,
        "batching": batching,
        "outputs": outputs,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    _training.write_run(output_dir, "sft", args, summary)
    _print_summary(console, summary, output_dir)
    return summary


def _load_model(args, model_path: str, max_length: int, device: str, dtype, console: Console):
    from fastlm import FastModel  # lazy: start-up (fastlm.commands doc)

    folder = Path(model_path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise CommandError(
            f"--model {model_path} is a LoRA adapter: pass the model it was trained on as "
            "--model (to continue an interrupted run, add --resume to its flags)"
        )
    checkpointing = _training.checkpointing(args.gradient_checkpointing, device)
    arguments = _training.model_arguments(args, device, dtype, checkpointing)
    arguments["max_seq_length"] = max_length
    with _training.loading(console, model_path, device, value_errors=False) as start:
        model, tokenizer = FastModel.from_pretrained(model_path, **arguments)
    if tokenizer is None:
        raise CommandError(f"{model_path} has no tokenizer files; fastlm sft needs a tokenizer")
    if args.chat_template:
        tokenizer.chat_template = _chat_template(args.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _training.loaded_status(console, model, start)
    if not args.full_finetune:
        model = FastModel.get_peft_model(
            model, use_rslora=args.use_rslora, **_training.lora_arguments(args, checkpointing)
        )
    return model, tokenizer


def _check_left(console: Console, dataset, total: int, max_length: int, flag: str) -> None:
    """After SFTTrainer's truncation: examples whose answer was cut off entirely have no token
    left to learn from (gone, or with --packing kept in their rows with no label). None left is
    an error; some gone, a warning."""
    left = _examples_left(dataset)
    if left == 0:
        raise CommandError(
            f"{flag}: none of the {total} examples keeps a token to train on within "
            f"--max-seq-length {max_length} (each prompt fills it, cutting the whole answer); "
            "raise --max-seq-length, or shorten the prompts"
        )
    if left < total:
        console.status(
            f"warning: {flag}: {total - left} of {total} examples dropped: their answers start "
            f"after --max-seq-length {max_length} tokens"
        )


def _examples_left(dataset) -> int:
    """The examples with a label token: the rows, or the sequences of packed rows (BFD packing
    cuts an example longer than the row but keeps it, even with every label gone)."""
    if "seq_lengths" not in dataset.column_names:
        return len(dataset)
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    labels = pc.list_flatten(table["labels"]).to_numpy()  # (T,) over all rows
    lengths = pc.list_flatten(table["seq_lengths"]).to_numpy()  # (n,) tokens per example
    example = np.repeat(np.arange(len(lengths)), lengths)  # (T,) the example of each token
    learned = np.bincount(example, weights=labels != -100, minlength=len(lengths))
    return int((learned > 0).sum())


def _batching(dataset, args: argparse.Namespace, max_length: int) -> dict[str, Any]:
    """sft_summary.json's "batching": ``padded`` (rows padded to the batch's longest), or
    ``packed`` / ``padding_free`` (one row per batch, no padding token) with their counts."""
    if not (args.packing or args.padding_free):
        return {"mode": "padded"}
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    tokens = int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
    if not args.packing:
        return {"mode": "padding_free", "examples": len(dataset), "tokens": tokens}
    rows = len(dataset)
    return {
        "mode": "packed",
        "strategy": "bfd",
        "examples": int(pc.sum(pc.list_value_length(table["seq_lengths"])).as_py() or 0),
        "rows": rows,
        "row_tokens": max_length,
        "tokens": tokens,
        "fill": tokens / (rows * max_length) if rows else 0.0,  # the rows' share of max_length
    }


def _describe_batching(batching: dict[str, Any]) -> str:
    if batching["mode"] == "padding_free":
        return f"padding-free, {batching['examples']} examples, {batching['tokens']:,} tokens"
    return (
        f"packed, {batching['examples']} examples in {batching['rows']} rows of up to "
        f"{batching['row_tokens']} tokens ({batching['fill']:.0%} full)"
    )


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_template(value: str) -> str:
    """--chat-template: a built-in name, a file, or the template text itself."""
    builtin = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_CHAT_TEMPLATE}
    if value in builtin:
        return builtin[value]
    if os.path.isfile(value):
        return Path(value).read_text(encoding="utf-8")
    if "{%" in value or "{{" in value:
        return value
    raise CommandError(f"--chat-template {value}: not a file, and not one of {sorted(builtin)}")


def _to_dataset(data, tokenizer, args):
    from datasets import Dataset

    has_template = getattr(tokenizer, "chat_template", None) is not None
    return Dataset.from_list(sft_rows(data, has_template, args.train_on))


def _trainer(model, tokenizer, train_set, eval_set, args, device: str, max_length: int):
    """SFTTrainer on the rows. --packing: TRL's BFD packing, whose batches are padding-free (one
    row, positions restarting at each example, ``cu_seq_lens``: fastlm's attention keeps the
    examples apart); --padding-free alone: the same, without packing."""
    from trl import SFTConfig, SFTTrainer

    # TRL refuses max_length with padding_free but no packing (it would not truncate): cut here
    cut_here = args.padding_free and not args.packing
    config = SFTConfig(
        **_training.trainer_arguments(
            args,
            model,
            device,
            per_device_eval_batch_size=args.batch_size,
            eval_strategy="steps" if args.eval_steps else "no",
            eval_steps=args.eval_steps,
            max_length=None if cut_here else max_length,
            packing=args.packing,
            packing_strategy="bfd",  # whole examples (cut at max_length), never split across rows
            padding_free=args.packing or args.padding_free,
            completion_only_loss=args.train_on == "completion",
        )
    )
    _quiet_datasets()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    if cut_here:
        trainer.train_dataset = _truncated(trainer.train_dataset, max_length)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = _truncated(trainer.eval_dataset, max_length)
    return _training.show_progress(trainer)


def _truncated(dataset, max_length: int):
    """SFTTrainer's own truncation when it pads: the first ``max_length`` tokens of each row, and
    rows left without a label token dropped."""

    def cut(row):
        return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}

    dataset = dataset.map(cut)
    return dataset.filter(lambda row: any(label != -100 for label in row["labels"]))


def _quiet_datasets() -> None:
    import logging

    if logging.getLogger("fastlm").getEffectiveLevel() > logging.DEBUG:
        import datasets

        datasets.disable_progress_bars()


def _save(model, tokenizer, args, model_path: str, output_dir: Path, console: Console) -> dict:
    # lazy: start-up (fastlm.commands doc)
    from fastlm.export import save_pretrained_gguf, save_pretrained_merged

    outputs: dict[str, Any] = {}
    if args.full_finetune:
        target = output_dir / "model"
        save_pretrained_merged(model, target, tokenizer, save_method="merged_16bit")
        outputs["model"] = str(target)
    else:
        target = output_dir / "adapter"
        save_pretrained_merged(model, target, tokenizer, save_method="lora")
        outputs["adapter"] = str(target)
    console.status(f"saved {target}")
    saved = target
    try:
        if args.save_method != "lora":
            target = output_dir / args.save_method
            console.status(f"writing {args.save_method} to {target} ...")
            dtype = export_dtype(model_path) if args.save_method == "merged_16bit" else None
            save_pretrained_merged(model, target, tokenizer, args.save_method, dtype=dtype)
            outputs[args.save_method] = str(target)
        if args.gguf:
            target = output_dir / "gguf"
            console.status(f"writing GGUF ({', '.join(args.gguf)}) to {target} ...")
            paths = save_pretrained_gguf(model, target, tokenizer, args.gguf)
            outputs["gguf"] = [str(p) for p in paths]
    except (NotImplementedError, ValueError) as error:
        raise CommandError(
            f"training finished and {saved} is saved, but the export to {target} failed: {error}"
            f" (retry with `fastlm export`)"
        ) from error
    return outputs


def _print_summary(console: Console, summary: dict, output_dir: Path) -> None:
    rows = [
        ("model", summary["model"]),
        ("data", f"{summary['examples']} {summary['data_format']} records"),
        *_training.run_rows(summary),
    ]
    if summary["batching"]["mode"] != "padded":
        rows.append(("batches", _describe_batching(summary["batching"])))
    if summary.get("eval_loss") is not None:
        rows.append(("eval loss", f"{summary['eval_loss']:.4f}"))
    outputs = [
        (name, "\n".join(value) if isinstance(value, list) else value)
        for name, value in summary["outputs"].items()
    ]
    _training.print_summary(console, "sft", summary, output_dir, rows, outputs)
