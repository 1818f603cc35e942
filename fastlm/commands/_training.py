"""What ``fastlm sft``, ``embed`` and ``rerank`` do alike around a transformers ``Trainer``.

The settings and summary files, the range checks, the training rows of ``embed`` and ``rerank``,
model loading (its status lines, errors, checkpointing choice and LoRA), the trainer arguments
they set the same way, the progress bar (and a token count for trainers that log none), training
(stopped at a step's end by Ctrl-C / SIGTERM, which saves that step's checkpoint; ``--resume``
continues from one) with its statistics (and before / after metrics), and the summary and
metrics tables. Imports of torch / transformers, and of the fastlm modules that load them, stay
inside the functions: the command modules import this one to build the parser (see
``fastlm.commands``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastlm.commands import CommandError, Console, format_seconds, hub_hint, write_json
from fastlm.errors import FastLMError

# --resume is how this run started, not a setting: a rerun from the settings file starts afresh
_NOT_SETTINGS = ("command", "verbose", "quiet", "config", "resume")
_PATH_SETTINGS = ("model", "data", "eval_data", "chat_template", "output_dir")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as ``--config`` keys (flag names), as given (defaults unresolved), but
    with local paths made absolute: the file then works from any folder (``--resume`` too)."""
    values = {}
    for key, value in vars(args).items():
        if key in _NOT_SETTINGS or value is None:
            continue
        if key in _PATH_SETTINGS and (key == "output_dir" or os.path.exists(value)):
            value = os.path.abspath(value)
        values[key.replace("_", "-")] = value
    return values


def write_run(output_dir: Path, command: str, args: argparse.Namespace, summary: dict) -> None:
    """``<command>_config.json`` (``settings``, for ``--config``) and ``<command>_summary.json``."""
    write_json(output_dir / f"{command}_config.json", settings(args))
    write_json(output_dir / f"{command}_summary.json", summary)


def check_ranges(
    args: argparse.Namespace, at_least: dict[str, int], positive: tuple[str, ...] = ()
) -> None:
    """A ``CommandError`` for a flag below its ``at_least`` value, or one of ``positive`` not
    above 0; flags left unset (None) pass. Usage: ``check_ranges(args, {"lora_r": 1}, ("lr",))``.
    """
    for name, least in at_least.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {least}")
    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be greater than 0")


def check_training(args: argparse.Namespace) -> None:
    """The checks ``fastlm sft``, ``embed`` and ``rerank`` share, before anything loads: the
    training and LoRA flags' ranges (``check_ranges`` for the rest) and ``check_output_dir``."""
    check_ranges(
        args,
        {"warmup_steps": 0, "weight_decay": 0, "max_grad_norm": 0, "save_total_limit": 1},
        ("lr", "epochs"),
    )
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        raise CommandError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.save_total_limit and not args.save_steps:
        raise CommandError("--save-total-limit keeps the newest checkpoints: it needs --save-steps")
    check_output_dir(args.output_dir)


def check_output_dir(output_dir: str) -> None:
    """``--output-dir`` is a folder or can be made one (checked before any model loads)."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise CommandError(f"--output-dir {output_dir} {what}; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"--output-dir {output_dir}: {existing} is not writable")


def positions(model_path: str) -> int | None:
    """The model's ``max_position_embeddings`` from a local folder's config.json, else None."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a Hub name, or no config: from_pretrained says what is wrong
    if not isinstance(config, dict):
        return None
    value = config.get("max_position_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def max_seq_length(args: argparse.Namespace, model_path: str, default: int | None) -> int | None:
    """``--max-seq-length``, else ``default`` capped to the model's positions. A value beyond
    them is the user's to choose (RoPE models run past them, and a config's RoPE scaling may
    extend them): ``from_pretrained`` logs one warning line for it."""
    if args.max_seq_length is not None:
        return args.max_seq_length
    limit = positions(model_path)
    return min(default, limit) if default is not None and limit else default


def with_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """Each flag of ``defaults``: its value, else its default there (one chosen by the data)."""
    return {
        name: getattr(args, name) if getattr(args, name) is not None else default
        for name, default in defaults.items()
    }


# --gradient-checkpointing value -> use_gradient_checkpointing (None: auto, see checkpointing)
GRADIENT_CHECKPOINTING = {"auto": None, "fastlm": "fastlm", "true": True, "false": False}


def checkpointing(choice: str, device: str, auto_on_gpu: str | bool = "fastlm") -> str | bool:
    """``--gradient-checkpointing`` as ``use_gradient_checkpointing``; auto: ``auto_on_gpu`` on
    a GPU, off on the CPU. Usage: ``checkpointing(args.gradient_checkpointing, "cuda")``.
    """
    value = GRADIENT_CHECKPOINTING[choice]
    if value is None:  # auto: on the CPU there is no device memory to save
        value = auto_on_gpu if device == "cuda" else False
    return value


@contextlib.contextmanager
def loading(
    console: Console, model_path: str, device: str, value_errors: bool = True
) -> Iterator[float]:
    """Around loading ``--model``: a status line, its start time, its errors as CommandErrors.

    Usage: ``with loading(console, path, device) as start: model = ...``. An ``OSError`` gets
    ``hub_hint``; a ``ValueError`` (a model the command cannot take) names ``--model``, unless
    ``value_errors`` is False.
    """
    console.status(f"loading {model_path} on {device} ...")
    try:
        yield time.perf_counter()
    except FastLMError:
        raise  # already one clear line (a missing folder, a damaged weights file, ...)
    except OSError as error:
        raise hub_hint(error, model_path) from error
    except ValueError as error:
        if not value_errors:
            raise
        raise CommandError(f"--model {model_path}: {error}") from error


def model_arguments(
    args: argparse.Namespace, device: str, dtype, use_gradient_checkpointing
) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of the shared model flags and --seed (``FastModel``,
    ``FastReranker``, ``load_embedding_model``); ``dtype``: ``resolve_torch_dtype``'s."""
    return dict(
        max_seq_length=args.max_seq_length,
        dtype=dtype,
        device_map=device,
        full_finetuning=args.full_finetune,
        load_in_4bit=args.load_in_4bit,
        use_gradient_checkpointing=use_gradient_checkpointing,
        random_state=args.seed,
    )


def check_method(args: argparse.Namespace) -> None:
    """Before loading anything: --load-in-4bit is QLoRA (LoRA on a 4-bit base), not full."""
    if args.load_in_4bit and args.full_finetune:
        raise CommandError("--full-finetune and --load-in-4bit do not go together (QLoRA is LoRA)")


def loaded_status(console: Console, model, start: float, *about: str) -> None:
    """``loaded 270.4M parameters in 3.1 s``; ``start`` is ``loading``'s. With ``about`` (an
    embedding model or reranker): `` (model type, *about, max N tokens)`` after it.
    """
    n_params = sum(p.numel() for p in model.parameters())
    text = f"loaded {n_params / 1e6:,.1f}M parameters in {time.perf_counter() - start:.1f} s"
    if about:
        parts = (model.config.model_type, *about, f"max {model.max_seq_length} tokens")
        text += f" ({', '.join(parts)})"
    console.status(text)


def training_rows(console: Console, args: argparse.Namespace, demo_data, kind=None, check=None):
    """``fastlm embed`` / ``rerank``'s training rows, with a status line: ``(data, held_out)``.

    ``--data``'s rows, read and checked by ``load_embedding_data``, then ``check(data)``;
    ``kind(data)`` names them (default: ``data.kind``); ``held_out`` is None. Without ``--data``,
    ``demo_data(max_samples)``: the built-in set and its held-out part.
    """
    from fastlm.embeddings.data import load_embedding_data  # lazy: start-up (module doc)

    if args.data is None:
        data, held_out = demo_data(args.max_samples)
        console.status(f"data: no --data, so the built-in demo set ({len(data)} questions)")
        return data, held_out
    data = load_embedding_data(args.data, args.max_samples)
    if check is not None:
        check(data)
    what = kind(data) if kind is not None else data.kind
    console.status(f"data: {len(data)} {what} rows from {describe_files(data.files)}")
    return data, None


def describe_files(files: list[Path]) -> str:
    """The data's one file, or how many there are."""
    return str(files[0]) if len(files) == 1 else f"{len(files)} files"


def compute_dtype(model):
    """The dtype of the first floating-point weight (4-bit weights are stored as integers)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def lora_arguments(args: argparse.Namespace, use_gradient_checkpointing) -> dict[str, Any]:
    """The ``get_peft_model`` keywords of the LoRA flags (all but ``--use-rslora``) and --seed."""
    return dict(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        use_gradient_checkpointing=use_gradient_checkpointing,
        random_state=args.seed,
    )


def add_lora(model, args: argparse.Namespace, use_gradient_checkpointing) -> None:
    """``model.get_peft_model`` (in place: an embedding model or reranker) from the LoRA flags,
    unless ``--full-finetune``."""
    if not args.full_finetune:
        lora = {"use_rslora": True} if args.use_rslora else {}
        model.get_peft_model(**lora_arguments(args, use_gradient_checkpointing), **lora)


def trainer_arguments(
    args: argparse.Namespace,
    model,
    device: str,
    knobs: dict[str, Any] | None = None,
    **values: Any,
) -> dict[str, Any]:
    """``TrainingArguments`` keywords from the training flags, plus ``values``.

    ``knobs``: batch_size, lr, epochs and warmup_steps when they are not the flags' own values
    (``fastlm embed`` picks their defaults by data set).
    """
    import torch

    if knobs is None:
        knobs = {
            name: getattr(args, name) for name in ("batch_size", "lr", "epochs", "warmup_steps")
        }
    dtype = compute_dtype(model)
    on_gpu = device == "cuda"
    extra = {"optim": args.optim} if args.optim else {}
    return dict(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        per_device_train_batch_size=knobs["batch_size"],
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=knobs["lr"],
        num_train_epochs=knobs["epochs"],
        warmup_steps=knobs["warmup_steps"],
        max_steps=args.max_steps if args.max_steps else -1,
        lr_scheduler_type=args.lr_scheduler,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        # the model set up checkpointing itself (offloaded or not); the Trainer must not redo it
        gradient_checkpointing=False,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        report_to=[],
        disable_tqdm=True,  # progress_callback's bar shows loss and tokens/s
        **extra,
        **values,
    )


def show_progress(trainer):
    """Replace the Trainer's printer and progress bar by ``progress_callback``; returns it."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_callback())
    return trainer


def counting_tokens(trainer_class, count):
    """A subclass of ``trainer_class`` that logs ``num_tokens``: ``count(inputs)`` per batch.

    Usage: ``counting_tokens(RerankerTrainer, lambda inputs: int(inputs["attention_mask"].sum()))``;
    for trainers whose logs lack the token count that ``progress_callback`` and ``train_stats``
    read (training batches only).
    """

    class Counting(trainer_class):
        tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens_seen += count(inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs, *rest, **kwargs):
            logs["num_tokens"] = float(self.tokens_seen)
            return super().log(logs, *rest, **kwargs)

    Counting.__name__ = Counting.__qualname__ = trainer_class.__name__
    return Counting


def loss_trainer(trainer_class, count, model, rows: list[dict], loss, args, knobs, device: str):
    """``trainer_class(model, TrainingArguments, train_dataset=rows, loss=loss)`` counting tokens
    with ``count`` (``counting_tokens``), with ``show_progress``'s bar. For ``EmbeddingTrainer``
    and ``RerankerTrainer``; ``knobs`` as in ``trainer_arguments``.
    """
    from transformers import TrainingArguments

    config = TrainingArguments(**trainer_arguments(args, model, device, knobs))
    trainer = counting_tokens(trainer_class, count)(model, config, train_dataset=rows, loss=loss)
    return show_progress(trainer)


def progress_callback():
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
            self.close_bar()

        def close_bar(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def training_status(model, args: argparse.Namespace) -> str:
    """``training: LoRA r=16, 1.23M trainable parameters`` (or ``full fine-tune``)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = "full fine-tune" if args.full_finetune else f"LoRA r={args.lora_r}"
    return f"training: {what}, {trainable / 1e6:.2f}M trainable parameters"


def train(
    trainer, output_dir: str | Path, resume: str | None, continue_with: str
) -> dict[str, Any]:
    """``trainer.train()`` (from the checkpoint ``resume``), then ``train_stats``; no empty
    checkpoints/ folder is left behind.

    Ctrl-C or SIGTERM stops training at the end of the current optimizer step
    (``stop_at_step_end``): the Trainer saves that step's checkpoint first, and the
    KeyboardInterrupt raised then says where it is and how to continue (``continue_with``: the
    command that resumes). A second Ctrl-C or SIGTERM stops at once and saves nothing (the update
    under way may be half applied); its KeyboardInterrupt names the newest complete checkpoint.
    """
    # read now: --save-total-limit may delete that checkpoint during the run
    resumed_step = _checkpoint_step(resume)
    stop = stop_callback()
    trainer.add_callback(stop)
    try:
        with stop_at_step_end(stop):
            result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        _close_bars(trainer)
        raise KeyboardInterrupt(stopped_at_once(trainer, continue_with)) from None
    finally:
        trainer.remove_callback(stop)
        checkpoints = Path(output_dir) / "checkpoints"
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # the Trainer makes it even when it saves no checkpoint
    if stop.requested:
        _close_bars(trainer)
        raise KeyboardInterrupt(save_interrupted(trainer, continue_with))
    return train_stats(trainer, result, resumed_step)


def _close_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "close_bar"):
            callback.close_bar()


def stop_callback():
    """A TrainerCallback whose ``requested`` (set by the first Ctrl-C / SIGTERM, see
    ``stop_at_step_end``) stops the Trainer at the end of the current optimizer step, after the
    optimizer and scheduler steps, as ``max_steps`` does. Under gradient accumulation that is the
    end of the update whose micro-batches are under way: the update is completed, never cut. That
    step's checkpoint is saved by the Trainer's own path (``--save-total-limit`` applies).
    Requested during an evaluation or a checkpoint save (both follow a finished step), it stops
    after them, at that same step; an evaluation due at the stopping step is skipped. A request
    before the first step ends stops after step 1."""
    from transformers import TrainerCallback

    class StopAtStepEnd(TrainerCallback):
        def __init__(self) -> None:
            self.requested = False

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_training_stop = True
                control.should_evaluate = False  # stop now, not after an evaluation
                control.should_log = True  # the last steps' loss goes into the checkpoint
                control.should_save = True

        def on_evaluate(self, args, state, control, **kwargs):
            if self.requested:  # the step it follows is finished: save it after the evaluation
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            if self.requested:  # this step's checkpoint is written
                control.should_training_stop = True

    return StopAtStepEnd()


STOPPING = "stopping after this step and saving a checkpoint; press Ctrl-C again to stop at once"


@contextlib.contextmanager
def stop_at_step_end(stop) -> Iterator[None]:
    """While it lasts, the first SIGINT (Ctrl-C) or SIGTERM sets ``stop.requested`` and prints one
    line; a second raises KeyboardInterrupt at once. The previous handlers after. In a thread
    other than the main one (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        _say(f"fastlm: {STOPPING}")

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, request) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            # None: a handler set outside Python, which cannot be set again; the default then
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _say(line: str) -> None:
    """``line`` on stderr, on a line of its own (the progress bar's line ends first), from a
    signal handler."""
    try:
        print(f"\n{line}", file=sys.stderr, flush=True)
    except RuntimeError:  # the signal came inside a write to stderr (the bar's): "reentrant call"
        os.write(2, f"\n{line}\n".encode())


def stopped_at_once(trainer, continue_with: str) -> str:
    """The line for a run stopped at once (a second Ctrl-C): nothing saved, and the newest
    complete checkpoint, if there is one, with how to continue from it."""
    latest = latest_checkpoint(Path(trainer.args.output_dir))
    if latest is None:
        return "stopped at once; nothing was saved, and there is no checkpoint to continue from"
    step = latest.name[len(CHECKPOINT_PREFIX) :]
    return (
        f"stopped at once; nothing was saved. The newest complete checkpoint is {latest} (step "
        f"{step} of {trainer.state.max_steps}); continue with: {continue_with}"
    )


def save_interrupted(trainer, continue_with: str) -> str:
    """After a stopped ``trainer.train()`` has returned: its checkpoint (the Trainer's own:
    weights, optimizer, scheduler, RNG and trainer_state.json, the last), saved here unless the
    Trainer saved it (``stop_callback``); a line that says where it is and how to continue.

    Saving here is safe only because ``trainer.train()`` has returned: no update is under way.
    (A stop requested after the last step's end, where the Trainer no longer looks at it.)"""
    state = trainer.state
    if state.global_step == 0:
        return "before the first optimizer update; nothing to save"
    folder = Path(trainer.args.output_dir) / f"checkpoint-{state.global_step}"
    if not is_complete_checkpoint(folder):
        trainer._save_checkpoint(trainer.model, trial=None)
    return (
        f"saved {folder} (step {state.global_step} of {state.max_steps}); continue with: "
        f"{continue_with}"
    )


CHECKPOINT_PREFIX = "checkpoint-"
RESUME_LATEST = "latest"  # --resume without a path


def is_complete_checkpoint(folder: Path) -> bool:
    """A Trainer checkpoint that was written to the end: the Trainer writes trainer_state.json
    after the weights, optimizer, scheduler and RNG states (transformers 5.x,
    ``Trainer._save_checkpoint``), so a save cut short (a second Ctrl-C, a kill) has none, or a
    partial one."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder of ``folder`` with the highest step, or None."""
    steps = {}
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX) :]
        if step.isdigit() and path.is_dir() and is_complete_checkpoint(path):
            steps[int(step)] = path
    return steps[max(steps)] if steps else None


def resume_checkpoint(resume: str | None, output_dir: str) -> str | None:
    """``--resume``'s checkpoint folder: "latest" (the flag alone): the newest complete one in
    ``output_dir``/checkpoints; a PATH: that checkpoint, or the newest in that folder or its
    checkpoints/. A ``CommandError`` when there is none."""
    if resume is None:
        return None
    if resume == RESUME_LATEST:
        where = Path(output_dir) / "checkpoints"
        found = latest_checkpoint(where)
        if found is None:
            raise CommandError(
                f"--resume: no complete checkpoint in {where}; pass the --output-dir of the "
                "interrupted run, or --resume PATH"
            )
        return str(found)
    path = Path(resume)
    if not path.is_dir():
        raise CommandError(f"--resume {resume}: no such folder")
    if is_complete_checkpoint(path):
        return str(path)
    found = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
    if found is None:
        what = "an incomplete checkpoint (no trainer_state.json)"
        if not path.name.startswith(CHECKPOINT_PREFIX):
            what = "not a checkpoint, and holds no complete checkpoint-N folder"
        raise CommandError(f"--resume {resume}: {what}")
    return str(found)


def resume_from(args: argparse.Namespace, command: str) -> str | None:
    """``--resume``'s checkpoint folder (``resume_checkpoint``; None without the flag), checked
    against the run's flags (``check_resume``), before any data or model loads.

    Usage: ``resume = resume_from(args, "embed")``.
    """
    resume = resume_checkpoint(args.resume, args.output_dir)
    if resume is not None:
        check_resume(resume, args, command)
    return resume


def check_resume(checkpoint: str, args: argparse.Namespace, command: str) -> None:
    """A ``CommandError`` when the checkpoint is of another kind of run than the flags ask: LoRA
    against ``--full-finetune`` or the reverse, or a LoRA rank other than ``--lora-r``.

    Usage: ``check_resume("out/checkpoints/checkpoint-4", args, "sft")``.
    """
    lora, rank = _checkpoint_lora(Path(checkpoint))
    again = (
        f"resume with the interrupted run's flags (its --output-dir has them in {command}_config"
        ".json)"
    )
    if args.full_finetune == lora:
        kind = "a LoRA" if lora else "a full fine-tune"
        raise CommandError(f"--resume {checkpoint} is {kind} checkpoint; {again}")
    if lora and rank not in (None, args.lora_r):
        raise CommandError(
            f"--resume {checkpoint} has LoRA rank {rank}, not --lora-r {args.lora_r}; {again}"
        )


# fastlm.embeddings.trainer.TRAINABLE_STATE_NAME, written out: importing it loads torch, and the
# --resume checks run before anything heavy (tests/test_cli_embed.py checks the two agree).
TRAINABLE_STATE_NAME = "fastlm_trainable.safetensors"


def _checkpoint_lora(folder: Path) -> tuple[bool, int | None]:
    """Whether ``folder`` is a LoRA run's checkpoint, and its rank (None: not recorded).

    ``fastlm sft`` and ``rerank`` checkpoints hold the adapter (adapter_config.json); ``fastlm
    embed``'s hold a Sentence-Transformers folder with the LoRA merged in, and the trainable
    tensors beside it: LoRA A matrices, of shape (r, in), when it was a LoRA run.
    """
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        try:
            rank = json.loads(adapter.read_text(encoding="utf-8")).get("r")
        except (OSError, ValueError, AttributeError):
            rank = None
        return True, rank if isinstance(rank, int) else None
    shapes = _tensor_shapes(folder / TRAINABLE_STATE_NAME)
    ranks = [shape[0] for name, shape in shapes.items() if ".lora_A." in name and shape]
    return (True, ranks[0]) if ranks else (False, None)


def _tensor_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8 bytes of length, then JSON);
    empty when there is no such file or it cannot be read."""
    try:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    if not isinstance(header, dict):
        return {}
    return {
        name: entry.get("shape") or []
        for name, entry in header.items()
        if isinstance(entry, dict) and name != "__metadata__"
    }


def train_resumable(
    console: Console, trainer, args: argparse.Namespace, command: str, resume: str | None
) -> dict[str, Any]:
    """``train`` as the commands run it: ``<command>_config.json`` written first (an interrupted
    run's line names the command that continues it: ``--config`` that file ``--resume``), and a
    status line when it continues from the checkpoint ``resume``.

    Usage: ``stats = train_resumable(console, trainer, args, "sft", resume_from(args, "sft"))``.
    """
    config_file = Path(args.output_dir) / f"{command}_config.json"
    write_json(config_file, settings(args))
    if resume is not None:
        console.status(f"resuming from {resume}")
    continue_with = f"fastlm {command} --config {config_file.absolute()} --resume"
    return train(trainer, args.output_dir, resume, continue_with)


def train_evaluated(
    console: Console,
    args: argparse.Namespace,
    model,
    new_trainer,
    loss: str,
    evaluate,
    title: str,
    command: str,
    resume: str | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Measure, train, measure again: ``train``'s statistics and ``{"before": ..., "after": ...}``.

    ``evaluate(when)``: metric -> value, None without held-out data (then no metrics: None);
    ``new_trainer()``: the trainer, built after the first measurement; ``loss``: its description
    for the status line. The metrics are printed as a ``print_metrics`` table titled ``title``.
    Training is ``train_resumable``'s (``command``, from the checkpoint ``resume``); "before" is
    the loaded model's, before the checkpoint's weights too.
    """
    before = evaluate("before training") if evaluate is not None else None
    trainer = new_trainer()
    console.status(f"{training_status(model, args)}, {loss}")
    stats = train_resumable(console, trainer, args, command, resume)
    if before is None:
        return stats, None
    after = evaluate("after training")
    print_metrics(console, title, before, after)
    return stats, {"before": before, "after": after}


def train_stats(trainer, result, resumed_step: int = 0) -> dict[str, Any]:
    """Steps, losses, trained tokens and tokens/s of a finished ``trainer.train()``.

    ``resumed_step``: the global step of the checkpoint the run resumed from. The log history
    then holds the checkpoint's entries too, but the token counters (TRL's, ``counting_tokens``)
    start again from 0 in each process: the run's tokens are those logged up to that step plus
    this session's, and tokens/s is this session's over its own time (``train_runtime``).
    """
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    earlier = [e.get("num_tokens", 0) for e in history if e.get("step", 0) <= resumed_step]
    session = [e.get("num_tokens", 0) for e in history if e.get("step", 0) > resumed_step]
    tokens = max(session, default=0)
    seconds = float(result.metrics.get("train_runtime", 0.0))
    return {
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "trained_tokens": int(max(earlier, default=0) + tokens),
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }


def _checkpoint_step(checkpoint: str | None) -> int:
    """The global step of the checkpoint a run resumes from (``resume_checkpoint``'s, complete:
    its trainer_state.json is readable); 0 for a run from the start."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"])


def run_rows(summary: dict) -> list[tuple[str, str]]:
    """The summary table's method, steps and final loss rows."""
    loss = summary["final_loss"]
    return [
        ("method", f"{summary['method']} ({summary['dtype']} on {summary['device']})"),
        ("steps", str(summary["steps"])),
        ("final loss", "n/a" if loss is None else f"{loss:.4f}"),
    ]


def speed_rows(summary: dict) -> list[tuple[str, str]]:
    """The summary table's token count, tokens/s and time rows."""
    return [
        ("tokens", f"{summary['trained_tokens']:,}"),
        ("tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("train time", format_seconds(summary["train_seconds"])),
        ("total time", format_seconds(summary["wall_seconds"])),
    ]


def metric_rows(
    metrics: dict | None, names: tuple[str, ...] | None = None
) -> list[tuple[str, str]]:
    """The summary table's ``before -> after`` rows of ``train_evaluated``'s metrics (``names``:
    those alone); none without metrics."""
    if metrics is None:
        return []
    before, after = metrics["before"], metrics["after"]
    return [(name, f"{before[name]:.4f} -> {after[name]:.4f}") for name in names or before]


def print_summary(
    console: Console, command: str, summary: dict, output_dir: Path, rows: list, outputs: list
) -> None:
    """The ``fastlm <command>: done`` table: ``rows``, ``speed_rows``, ``outputs`` (the rows of the
    saved paths) and the summary file; then ``warn_if_not_finite``."""
    summary_file = ("summary", str(Path(output_dir) / f"{command}_summary.json"))
    rows = [*rows, *speed_rows(summary), *outputs, summary_file]
    console.table(f"fastlm {command}: done", rows, ("", ""))
    warn_if_not_finite(console, summary["final_loss"])


def print_metrics(console: Console, title: str, before: dict, after: dict) -> None:
    """A metric / before / after / change table."""
    rows = [
        (name, f"{value:.4f}", f"{after[name]:.4f}", f"{after[name] - value:+.4f}")
        for name, value in before.items()
    ]
    console.table(title, rows, ("metric", "before", "after", "change"))


def warn_if_not_finite(console: Console, loss: float | None) -> None:
    """A warning line when training ended on a NaN / infinite loss."""
    if loss is not None and not math.isfinite(loss):
        console.status(f"warning: the final loss is {loss}; check the data and --lr")
