"""``fastlm sft``: supervised fine-tuning (LoRA, QLoRA or full) with TRL's SFTTrainer.

Reads and checks the data first (a bad line fails in a second, before any model loads), loads the
model with ``FastModel`` (fastlm's kernels), trains with ``trl.SFTTrainer``, saves the adapter (or
the full model), optionally exports merged / GGUF copies, and prints a summary.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

from fastlm.commands import (
    DTYPES,
    CommandError,
    Console,
    check_model_path,
    default_model_path,
    export_dtype,
    format_seconds,
    hub_hint,
    resolve_device,
    resolve_torch_dtype,
    write_json,
)

EXAMPLES = """\
examples:
  fastlm sft --data train.jsonl --max-steps 60          # LoRA on the bundled Gemma 3 270M
  fastlm sft --model ./Llama-3.2-1B --data data/ --lora-r 32 --epochs 2 --output-dir out/llama
  fastlm sft --model ./Qwen3-8B --data chat.jsonl --load-in-4bit --gguf q8_0
  fastlm sft --model ./Qwen3-0.6B --data notes.jsonl --full-finetune --lr 2e-5
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
  sft_summary.json   steps, losses, tokens/s, time and the paths above
  sft_config.json    every setting of the run; reuse it with --config
"""
GRADIENT_CHECKPOINTING = {"auto": None, "fastlm": "fastlm", "true": True, "false": False}
SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
_NOT_SETTINGS = ("command", "verbose", "quiet", "config")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm sft`` flags, in groups."""
    from fastlm.data.formats import FORMATS, TRAIN_ON
    from fastlm.export.gguf_writer import METHODS as GGUF_METHODS

    parser.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file of flag values")
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="PATH",
        help="local Hugging Face model folder (default: the bundled Gemma 3 270M)",
    )
    group.add_argument(
        "--max-seq-length", type=int, metavar="N", default=2048, help="longer examples are cut"
    )
    group.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    group.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available"
    )
    group.add_argument(
        "--load-in-4bit", action="store_true", help="QLoRA: 4-bit NF4 base weights (GPU)"
    )
    group.add_argument(
        "--full-finetune", action="store_true", help="train every weight instead of LoRA"
    )
    group.add_argument(
        "--chat-template",
        metavar="FILE|NAME",
        help="Jinja template file, or 'chatml' / 'gemma', when the tokenizer has none",
    )

    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="PATH", help="training data: .jsonl, .json or a folder")
    group.add_argument(
        "--data-format",
        choices=("auto", *FORMATS),
        default="auto",
        help="auto: detected from the first record's keys",
    )
    group.add_argument("--eval-data", metavar="PATH", help="held-out data, same formats")
    group.add_argument(
        "--eval-steps",
        type=int,
        metavar="N",
        help="evaluate every N steps (default: once, at the end)",
    )
    group.add_argument("--max-samples", type=int, metavar="N", help="use the first N records")
    group.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default="completion",
        help="completion: loss on the answers only; all: on every token",
    )
    group.add_argument("--packing", action="store_true", help="pack short examples together")

    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=int, metavar="N", default=16, help="adapter rank")
    group.add_argument("--lora-alpha", type=int, metavar="N", default=16, help="scale = alpha / r")
    group.add_argument(
        "--lora-dropout", type=float, metavar="X", default=0.0, help="0 keeps layers fused"
    )
    group.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="projections to adapt (default: q k v o gate up down), e.g. q_proj v_proj",
    )
    group.add_argument("--use-rslora", action="store_true", help="scale = alpha / sqrt(r)")

    group = parser.add_argument_group("training")
    group.add_argument(
        "--batch-size", type=int, metavar="N", default=2, help="examples per device step"
    )
    group.add_argument(
        "--grad-accum", type=int, metavar="N", default=4, help="steps per optimizer update"
    )
    group.add_argument("--lr", type=float, metavar="X", default=2e-4, help="peak learning rate")
    group.add_argument(
        "--epochs", type=float, metavar="X", default=1.0, help="passes over the data"
    )
    group.add_argument(
        "--max-steps", type=int, metavar="N", help="optimizer updates (overrides --epochs)"
    )
    group.add_argument(
        "--warmup-steps", type=int, metavar="N", default=5, help="linear warm-up updates"
    )
    group.add_argument(
        "--lr-scheduler",
        metavar="NAME",
        default="linear",
        help="linear, cosine, constant, ... (transformers)",
    )
    group.add_argument(
        "--weight-decay", type=float, metavar="X", default=0.0, help="AdamW weight decay"
    )
    group.add_argument(
        "--max-grad-norm", type=float, metavar="X", default=1.0, help="gradient clipping"
    )
    group.add_argument(
        "--optim", metavar="NAME", help="optimizer name (transformers), e.g. adamw_torch"
    )
    group.add_argument(
        "--seed", type=int, metavar="N", default=3407, help="data order and LoRA init"
    )
    group.add_argument(
        "--gradient-checkpointing",
        choices=tuple(GRADIENT_CHECKPOINTING),
        default="auto",
        help="fastlm: recompute activations, layer inputs kept in CPU memory; true: plain "
        "recompute; false: keep everything (fastest, most memory); auto: fastlm on GPU, false "
        "on CPU",
    )
    group.add_argument(
        "--logging-steps", type=int, metavar="N", default=1, help="log the loss every N updates"
    )
    group.add_argument(
        "--save-steps", type=int, metavar="N", help="write a checkpoint every N updates"
    )

    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-dir", default="outputs/sft", metavar="DIR", help="where everything is written"
    )
    group.add_argument(
        "--save-method",
        choices=SAVE_METHODS,
        default="lora",
        help="besides adapter/: merged_16bit or merged_4bit also writes a merged model",
    )
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


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as ``--config`` keys (flag names)."""
    return {
        key.replace("_", "-"): value
        for key, value in vars(args).items()
        if key not in _NOT_SETTINGS and value is not None
    }


def _check_args(args: argparse.Namespace) -> None:
    if not args.data:
        raise CommandError("--data is required: a .jsonl / .json file or a folder of them")
    positive = ("max_seq_length", "batch_size", "grad_accum", "lora_r", "logging_steps")
    for name in positive:
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_steps", "eval_steps", "save_steps", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    if args.full_finetune and args.load_in_4bit:
        raise CommandError("--full-finetune and --load-in-4bit do not go together (QLoRA is LoRA)")
    if args.full_finetune and args.save_method != "lora":
        raise CommandError("--save-method is for LoRA runs; --full-finetune saves model/ anyway")
    if args.eval_steps and not args.eval_data:
        raise CommandError("--eval-steps needs --eval-data")


def run_sft(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the summary that is also written to sft_summary.json."""
    from fastlm.data.formats import load_data

    console = Console()
    wall_start = time.perf_counter()
    _check_args(args)
    data = load_data(args.data, args.data_format, args.max_samples)
    eval_data = load_data(args.eval_data, args.data_format) if args.eval_data else None
    console.status(f"data: {len(data)} {data.format} records from {_describe(data.files)}")
    if eval_data is not None:
        console.status(f"eval data: {len(eval_data)} {eval_data.format} records")

    device = resolve_device(args.device)
    dtype = resolve_torch_dtype(args.dtype, device)
    model, tokenizer, model_path = _load_model(args, device, dtype, console)
    train_set = _to_dataset(data, tokenizer, args)
    eval_set = _to_dataset(eval_data, tokenizer, args) if eval_data is not None else None

    trainer = _trainer(model, tokenizer, train_set, eval_set, args, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = "full fine-tune" if args.full_finetune else f"LoRA r={args.lora_r}"
    console.status(f"training: {what}, {trainable / 1e6:.2f}M trainable parameters")
    result = trainer.train()
    checkpoints = Path(args.output_dir) / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # the Trainer makes it even when it saves no checkpoint
    stats = _train_stats(trainer, result)
    if eval_set is not None:
        stats["eval_loss"] = trainer.evaluate().get("eval_loss")

    output_dir = Path(args.output_dir)
    outputs = _save(model, tokenizer, args, model_path, output_dir, console)
    summary = {
        "model": model_path,
        "data": str(args.data),
        "data_format": data.format,
        "examples": len(data),
        "device": device,
        "dtype": str(_compute_dtype(model)).replace("torch.", ""),
        "method": "full" if args.full_finetune else "qlora" if args.load_in_4bit else "lora",
        **stats,
        "outputs": outputs,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    write_json(output_dir / "sft_config.json", settings(args))
    write_json(output_dir / "sft_summary.json", summary)
    _print_summary(console, summary, output_dir)
    return summary


def _compute_dtype(model):
    """The dtype of the first floating-point weight (4-bit weights are stored as integers)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _describe(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{len(files)} files"


def _load_model(args, device: str, dtype, console: Console):
    from fastlm import FastModel

    model_path = args.model or default_model_path(console)
    check_model_path(model_path)
    checkpointing = GRADIENT_CHECKPOINTING[args.gradient_checkpointing]
    if checkpointing is None:  # auto: on the CPU there is no device memory to save
        checkpointing = "fastlm" if device == "cuda" else False
    console.status(f"loading {model_path} on {device} ...")
    start = time.perf_counter()
    try:
        model, tokenizer = FastModel.from_pretrained(
            model_path,
            max_seq_length=args.max_seq_length,
            dtype=dtype,
            load_in_4bit=args.load_in_4bit,
            full_finetuning=args.full_finetune,
            device_map=device,
            use_gradient_checkpointing=checkpointing,
            random_state=args.seed,
        )
    except OSError as error:
        raise hub_hint(error, model_path) from error
    if tokenizer is None:
        raise CommandError(f"{model_path} has no tokenizer files; fastlm sft needs a tokenizer")
    if args.chat_template:
        tokenizer.chat_template = _chat_template(args.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_params = sum(p.numel() for p in model.parameters())
    console.status(
        f"loaded {n_params / 1e6:,.1f}M parameters in {time.perf_counter() - start:.1f} s"
    )
    if not args.full_finetune:
        model = FastModel.get_peft_model(
            model,
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.target_modules,
            use_rslora=args.use_rslora,
            use_gradient_checkpointing=checkpointing,
            random_state=args.seed,
        )
    return model, tokenizer, model_path


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_template(value: str) -> str:
    """--chat-template: a built-in name, a file, or the template text itself."""
    from fastlm.real_models import GEMMA_CHAT_TEMPLATE

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

    from fastlm.data.formats import sft_rows

    has_template = getattr(tokenizer, "chat_template", None) is not None
    return Dataset.from_list(sft_rows(data, has_template, args.train_on))


def _trainer(model, tokenizer, train_set, eval_set, args, device: str):
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    dtype = _compute_dtype(model)
    on_gpu = device == "cuda"
    extra = {"optim": args.optim} if args.optim else {}
    config = SFTConfig(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps,
        max_length=args.max_seq_length,
        packing=args.packing,
        completion_only_loss=args.train_on == "completion",
        # fastlm already set up checkpointing (offloaded or not); the Trainer must not redo it.
        gradient_checkpointing=False,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        report_to=[],
        disable_tqdm=True,  # our own bar below shows loss and tokens/s
        **extra,
    )
    _quiet_datasets()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback())
    return trainer


def _quiet_datasets() -> None:
    import logging

    if logging.getLogger("fastlm").getEffectiveLevel() > logging.DEBUG:
        import datasets

        datasets.disable_progress_bars()


def _progress_callback():
    """A tqdm bar over optimizer steps with the latest loss, learning rate and tokens/s."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.bar = None
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is None or not logs:
                return
            if "loss" in logs:
                postfix = {"loss": f"{logs['loss']:.4f}"}
                if "learning_rate" in logs:
                    postfix["lr"] = f"{logs['learning_rate']:.2e}"
                elapsed = time.perf_counter() - self.start
                if logs.get("num_tokens") and elapsed > 0:
                    postfix["tok/s"] = f"{logs['num_tokens'] / elapsed:,.0f}"
                self.bar.set_postfix(postfix, refresh=False)
            if "eval_loss" in logs:
                self.bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def _train_stats(trainer, result) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    tokens = max((entry.get("num_tokens", 0) for entry in history), default=0)
    seconds = float(result.metrics.get("train_runtime", 0.0))
    return {
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "trained_tokens": int(tokens),
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }


def _save(model, tokenizer, args, model_path: str, output_dir: Path, console: Console) -> dict:
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
    loss = summary["final_loss"]
    rows = [
        ("model", summary["model"]),
        ("data", f"{summary['examples']} {summary['data_format']} records"),
        ("method", f"{summary['method']} ({summary['dtype']} on {summary['device']})"),
        ("steps", str(summary["steps"])),
        ("final loss", "n/a" if loss is None else f"{loss:.4f}"),
    ]
    if summary.get("eval_loss") is not None:
        rows.append(("eval loss", f"{summary['eval_loss']:.4f}"))
    rows += [
        ("tokens", f"{summary['trained_tokens']:,}"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("train time", format_seconds(summary["train_seconds"])),
        ("total time", format_seconds(summary["wall_seconds"])),
    ]
    for name, value in summary["outputs"].items():
        rows.append((name, "\n".join(value) if isinstance(value, list) else value))
    rows.append(("summary", str(output_dir / "sft_summary.json")))
    console.table("fastlm sft: done", rows, ("", ""))
    if loss is not None and not math.isfinite(loss):
        console.status(f"warning: the final loss is {loss}; check the data and --lr")
