"""``fastlm demo``: LoRA-train the real Gemma 3 270M on the bundled event -> JSON data set.

Loads the model, scores the held-out prompts with ``format_check`` before training, trains a LoRA
adapter with a plain PyTorch loop, scores again, shows before/after side by side and saves the
adapter (plain PEFT) plus ``demo_summary.json``. Everything stays local: no network, no telemetry.

    fastlm demo                       # CPU: ~60 steps, a few minutes; GPU: 150 steps
    fastlm demo --steps 2 --batch-size 2 --eval-prompts 2 --max-new-tokens 8   # smoke test

The data helpers (``build_example``, ``collate``) are importable for tests and other scripts.
``fastlm --help`` imports this module to build its parser, and must not load torch: torch and the
fastlm modules that load it (``fastlm.FastModel``, ``fastlm.loading``: seconds) are imported
inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastlm.data import demo_prompts, format_check, load_demo_dataset
from fastlm.real_models import GEMMA3_270M, GEMMA_CHAT_TEMPLATE, cache_dir, gemma3_270m_path

logger = logging.getLogger("fastlm")

IGNORE_INDEX = -100
DEFAULT_STEPS = {"cpu": 60, "cuda": 150}
# End-of-turn markers of common chat templates; generation stops at any that the vocab has.
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


@dataclass
class DemoConfig:
    """Settings of one demo run (the CLI flags)."""

    steps: int | None = None  # None: DEFAULT_STEPS for the device
    batch_size: int = 8
    lr: float = 2e-4
    max_seq_length: int = 128
    output_dir: str = "outputs/demo"
    device: str = "auto"  # auto | cpu | cuda
    model: str | None = None  # None: the real Gemma 3 270M from the local cache
    max_new_tokens: int = 48
    eval_prompts: int = 12  # how many held-out prompts are generated and scored
    show: int = 3  # how many of them are printed before/after
    lora_r: int = 16
    lora_alpha: int = 16
    warmup_steps: int | None = None  # None: 10% of the steps
    gradient_checkpointing: bool = False
    seed: int = 3407


@dataclass
class TrainStats:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- data preparation


def prompt_text(tokenizer, user: str) -> str:
    """The chat-templated prompt for one user turn, ending where the model's answer begins."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def build_example(tokenizer, messages: list[dict[str, str]], max_seq_length: int) -> dict:
    """Token ids and labels for a ``[user, assistant]`` conversation.

    Labels are ``-100`` on the prompt (everything up to and including the template's
    "model turn starts" text) so that the loss covers only the assistant answer and its
    end-of-turn token. Whatever the template puts after the end-of-turn marker (Gemma: a newline)
    is dropped. Sequences longer than ``max_seq_length`` are cut from the end.
    """
    user, assistant = messages
    prompt = prompt_text(tokenizer, user["content"])
    full = tokenizer.apply_chat_template([user, assistant], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the full conversation; "
            "cannot tell the answer tokens apart"
        )
    completion = full[len(prompt) :].rstrip()  # answer + end-of-turn marker
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_seq_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def training_examples(tokenizer, max_seq_length: int) -> list[dict]:
    """The bundled train split (480 records) as token ids + masked labels."""
    examples = [
        build_example(tokenizer, rec["messages"], max_seq_length)
        for rec in load_demo_dataset("train")
    ]
    kept = [ex for ex in examples if any(label != IGNORE_INDEX for label in ex["labels"])]
    if len(kept) < len(examples):
        logger.warning(
            "fastlm: %d examples lost their whole answer to max_seq_length=%d and are skipped",
            len(examples) - len(kept),
            max_seq_length,
        )
    return kept


def _pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def _stop_token_ids(tokenizer) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab]
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------- generation


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers for ``prompts`` (user turns), in one left-padded batch."""
    import torch

    from fastlm import FastModel  # lazy: start-up (module doc)

    FastModel.for_inference(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [prompt_text(tokenizer, p) for p in prompts]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=_stop_token_ids(tokenizer),
            pad_token_id=_pad_token_id(tokenizer),
        )
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# --------------------------------------------------------------------------- training


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay (never exactly 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train(model, examples: list[dict], config: DemoConfig, steps: int, pad_token_id: int):
    """A plain PyTorch LoRA loop: AdamW, warm-up/decay, bf16 autocast on GPU, tqdm progress."""
    import torch
    from tqdm.auto import tqdm

    from fastlm import FastModel  # lazy: start-up (module doc)

    FastModel.for_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = config.warmup_steps
    if warmup is None:
        warmup = max(1, round(0.1 * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup)
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    stats = TrainStats()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(steps), desc="training", unit="step", dynamic_ncols=True, mininterval=0.5)
    for _ in bar:
        picked = []
        while len(picked) < config.batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            picked.append(examples[order.pop()])
        batch = {k: v.to(device) for k, v in collate(picked, pad_token_id).items()}
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # also waits for the GPU, so the timing below is real
        stats.seconds += time.perf_counter() - start
        stats.steps += 1
        stats.losses.append(value)
        stats.tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{stats.tokens_per_s:,.0f}", refresh=False)
    bar.close()
    return stats


# --------------------------------------------------------------------------- output


class _Console:
    """Status lines and the before/after table through rich, or plain print if rich fails."""

    def __init__(self) -> None:
        try:
            from rich.console import Console

            self.rich = Console(highlight=False)
        except Exception:  # pragma: no cover - rich is a dependency
            self.rich = None

    def status(self, message: str) -> None:
        if self.rich is not None:
            try:
                self.rich.print(f"[bold cyan]fastlm[/] {message}", markup=True, soft_wrap=True)
                return
            except Exception:
                self.rich = None
        print(f"fastlm {message}", flush=True)

    def comparison(self, rows: list[dict], before: str, after: str) -> None:
        if self.rich is not None:
            try:
                self._rich_comparison(rows, before, after)
                return
            except Exception:
                self.rich = None
        for i, row in enumerate(rows, 1):
            print(f"\n--- prompt {i}: {row['sentence']}")
            print(f"before [{'ok' if row['before_ok'] else 'bad'}]: {row['before']}")
            print(f"after  [{'ok' if row['after_ok'] else 'bad'}]: {row['after']}")
        print(f"\nformat_check  before: {before}   after: {after}", flush=True)

    def _rich_comparison(self, rows: list[dict], before: str, after: str) -> None:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="Held-out prompts: before vs after LoRA", show_lines=True)
        table.add_column("sentence", ratio=2)
        table.add_column(f"before ({before})", ratio=3)
        table.add_column(f"after ({after})", ratio=3)

        def cell(text: str, ok: bool) -> str:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            return f"{mark} {escape(text) if text else '[dim](empty)[/]'}"

        for row in rows:
            table.add_row(
                escape(row["sentence"]),
                cell(row["before"], row["before_ok"]),
                cell(row["after"], row["after_ok"]),
            )
        self.rich.print(table)
        self.rich.print(
            f"[bold]format_check[/] (held-out prompts): {before} [bold]→[/] {after}",
            soft_wrap=True,
        )


def _sentence(prompt: str) -> str:
    """The event sentence of a demo prompt (its last paragraph)."""
    return prompt.strip().split("\n\n")[-1]


# --------------------------------------------------------------------------- the demo


def _model_path(config: DemoConfig, console: _Console) -> str:
    if config.model:
        return config.model
    cached = cache_dir() / GEMMA3_270M / "model.safetensors"
    if not cached.exists():
        console.status(
            "converting Gemma 3 270M from the bundled GGUF once (about 90 s; cached in "
            f"{cached.parent}) ..."
        )
    return str(gemma3_270m_path())


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns (and writes) the summary dict."""
    import torch

    from fastlm import FastModel  # lazy: start-up (module doc)
    from fastlm.loading.device import resolve_device  # lazy: start-up (module doc)

    console = _Console()
    wall_start = time.perf_counter()
    device = resolve_device(config.device)
    steps = DEFAULT_STEPS[device] if config.steps is None else config.steps
    if steps < 1 or config.batch_size < 1:
        raise SystemExit("fastlm demo: --steps and --batch-size must be at least 1")
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    path = _model_path(config, console)
    console.status(f"loading {path} on {device} ...")
    start = time.perf_counter()
    model, tokenizer = FastModel.from_pretrained(
        path,
        max_seq_length=config.max_seq_length,
        device_map="cpu" if device == "cpu" else "cuda",
        random_state=config.seed,
    )
    if tokenizer is None:
        raise SystemExit(f"fastlm demo: {path} has no tokenizer files")
    if tokenizer.chat_template is None:
        console.status("the tokenizer has no chat template: using Gemma's turn format")
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    n_params = sum(p.numel() for p in model.parameters())
    console.status(
        f"loaded {n_params / 1e6:.0f}M parameters ({dtype}) in {time.perf_counter() - start:.1f} s"
    )

    prompts = demo_prompts()[: max(1, config.eval_prompts)]
    total = len(prompts)
    console.status(f"generating for {total} held-out prompts before training ...")
    start = time.perf_counter()
    before = generate_answers(model, tokenizer, prompts, config.max_new_tokens)
    before_ok = [format_check(text) for text in before]
    console.status(
        f"before training: {sum(before_ok)}/{total} pass format_check "
        f"({time.perf_counter() - start:.1f} s)"
    )

    model = FastModel.get_peft_model(
        model,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0,
        use_gradient_checkpointing=config.gradient_checkpointing,
        random_state=config.seed,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = training_examples(tokenizer, config.max_seq_length)
    console.status(
        f"training LoRA r={config.lora_r} ({trainable / 1e6:.2f}M trainable parameters) for "
        f"{steps} steps, batch {config.batch_size}, lr {config.lr:g} on {len(examples)} examples"
    )
    stats = train(model, examples, config, steps, _pad_token_id(tokenizer))
    final_loss = stats.losses[-1]
    tail = stats.losses[-min(10, len(stats.losses)) :]
    console.status(
        f"trained {stats.steps} steps in {stats.seconds:.1f} s: final loss {final_loss:.4f}, "
        f"{stats.tokens_per_s:,.0f} tokens/s"
    )

    console.status("generating again after training ...")
    after = generate_answers(model, tokenizer, prompts, config.max_new_tokens)
    after_ok = [format_check(text) for text in after]
    score_before = f"{sum(before_ok)}/{total}"
    score_after = f"{sum(after_ok)}/{total}"
    rows = [
        {
            "prompt": prompt,
            "sentence": _sentence(prompt),
            "before": b,
            "after": a,
            "before_ok": bo,
            "after_ok": ao,
        }
        for prompt, b, a, bo, ao in zip(prompts, before, after, before_ok, after_ok)
    ]
    console.comparison(rows[: max(0, config.show)], score_before, score_after)

    output_dir = Path(config.output_dir)
    adapter_dir = output_dir / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    summary = {
        "model": path,
        "device": device,
        "dtype": dtype,
        "steps": stats.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "max_seq_length": config.max_seq_length,
        "final_loss": final_loss,
        "mean_loss_last_10": sum(tail) / len(tail),
        "losses": stats.losses,
        "train_seconds": stats.seconds,
        "tokens_per_s": stats.tokens_per_s,
        "trained_tokens": stats.tokens,
        "format_check": {
            "before": sum(before_ok),
            "after": sum(after_ok),
            "total": total,
        },
        "generations": [{k: v for k, v in row.items() if k != "sentence"} for row in rows],
        "config": asdict(config),
        "wall_seconds": time.perf_counter() - wall_start,
    }
    summary_path = output_dir / "demo_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if not math.isfinite(final_loss):
        logger.warning("fastlm: the final loss is not finite (%s)", final_loss)
    console.status(f"saved the LoRA adapter and tokenizer to {adapter_dir}")
    console.status(f"wrote {summary_path} (total {summary['wall_seconds']:.0f} s)")
    return summary


# --------------------------------------------------------------------------- CLI glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm demo`` flags."""
    d = DemoConfig()
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: {DEFAULT_STEPS['cpu']} on CPU, "
        f"{DEFAULT_STEPS['cuda']} on GPU)",
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument(
        "--max-seq-length", type=int, default=d.max_seq_length, help="longer examples are cut"
    )
    parser.add_argument(
        "--output-dir",
        default=d.output_dir,
        help="where adapter/ (LoRA + tokenizer) and demo_summary.json go",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=d.device,
        help="auto: CUDA if available (bf16), else CPU (fp32)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a local model folder (default: the real Gemma 3 270M, converted once to "
        "~/.cache/fastlm)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help="generation length cap"
    )
    parser.add_argument(
        "--eval-prompts",
        type=int,
        default=d.eval_prompts,
        help="how many of the 12 held-out prompts to generate and score",
    )
    parser.add_argument(
        "--show", type=int, default=d.show, help="how many prompts to print before/after"
    )
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of steps")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=d.gradient_checkpointing,
        help="trade compute for activation memory (not needed at this size)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="data order and LoRA init")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    fields = DemoConfig.__dataclass_fields__
    return DemoConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm demo`` (called by ``fastlm.cli``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(config_from_args(args))
    return 0
