"""Shared by the distributed tests and their worker: model, data, one training step, results.

One optimizer step of LoRA training on a global batch of four micro-batches with very different
numbers of target tokens (one row has none). Under DDP / FSDP2 each of two ranks takes two of
them (gradient accumulation 2); single-process takes all four. With ``num_items_in_batch`` the
global target-token count and the loss multiplied by the world size (what HF Trainer does), the
all-reduced gradients must equal the single-process ones.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for path in (str(TESTS), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)

from tiny_models import VOCAB, save_tiny_model  # noqa: E402

WORLD = 2
LR = 0.5
RANK_MICRO_BATCHES = {0: (0, 1), 1: (2, 3)}
# (rows, seq, prompt tokens masked from the labels, right padding per row, rows without targets)
_SHAPES = [
    (3, 11, 1, (0, 2, 5), ()),  # many target tokens
    (2, 9, 2, (0, 1), ()),
    (2, 7, 5, (0, 0), ()),  # few target tokens
    (3, 10, 3, (0, 4, 7), (2,)),  # one row with no target token at all
]


def micro_batches(vocab: int = VOCAB, seed: int = 0) -> list[dict]:
    """The four micro-batches of the global batch (right-padded, prompt masked with -100)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for rows, seq, prompt, pads, no_targets in _SHAPES:
        ids = torch.randint(3, vocab, (rows, seq), generator=generator)
        mask = torch.ones(rows, seq, dtype=torch.long)
        for row, pad in enumerate(pads):
            if pad:
                mask[row, seq - pad :] = 0
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt] = -100
        labels[list(no_targets)] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def save_models(root: Path) -> dict[str, Path]:
    """The tiny checkpoints every process loads (same weights everywhere)."""
    return {t: save_tiny_model(t, root / t) for t in ("llama", "gemma3_text")}


def build(path, checkpointing=False, patched=True, load_in_4bit=False):
    """A fastlm (or, with patched=False, plain HF) LoRA model with random (non-zero) A and B."""
    from fastlm import FastModel

    model, _ = FastModel.from_pretrained(
        str(path), max_seq_length=64, device_map="cpu", load_in_4bit=load_in_4bit
    )
    model = FastModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        use_gradient_checkpointing=checkpointing,
        random_state=1234,
    )
    if not patched:
        FastModel.unpatch(model)
    model.train()
    return model


def lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2-sharded) gathered, else the tensor itself; detached, on the CPU."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone()


def train_step(peft_model, wrapped, batches, world: int, sync=None) -> dict:
    """Loss, LoRA gradients, and the loss after one SGD step, for these micro-batches.

    ``sync(i_is_last)`` returns the context for micro-batch i (DDP's no_sync) or sets FSDP2's
    gradient sync; the returned losses are summed over ranks (the global-batch loss).
    """
    from fastlm.distributed import global_num_items_in_batch

    params = lora_params(peft_model)
    num_items = global_num_items_in_batch([b["labels"] for b in batches])
    loss = torch.zeros(())
    for i, batch in enumerate(batches):
        context = sync(i == len(batches) - 1) if sync else contextlib.nullcontext()
        with context:
            out = wrapped(**batch, num_items_in_batch=num_items)
            (out.loss * world).backward()
        loss += out.loss.detach()
    grads = {n: full(p.grad) for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p -= LR * p.grad
            p.grad = None
        after = torch.zeros(())
        for batch in batches:
            after += wrapped(**batch, num_items_in_batch=num_items).loss.detach()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(loss)
        dist.all_reduce(after)
    return {"loss": loss, "grads": grads, "loss_after": after}


# --------------------------------------------------------------------------- HF / TRL Trainer


def _token_rows(n: int = 16, vocab: int = VOCAB) -> list[dict]:
    """Rows of different lengths whose prompts (label -100) differ a lot in length."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 5 + (i * 7) % 9
        prompt = min(length - 1, (i * 5) % 4 + (6 if i % 4 == 3 else 0))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _prompt_completion_rows(n: int = 16):
    from datasets import Dataset

    rows = [
        {"prompt": f"q{i}:" + "xy" * (i % 5), "completion": f" {i * 7}" + "!" * ((3 * i) % 4)}
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def run_trainer(path, kind: str, out_dir, world: int) -> dict:
    """Two SGD steps of 8 examples (4 per process with 2 processes, accumulation 2) with HF
    ``Trainer`` (kind="hf": fastlm's fused cross-entropy) or TRL ``SFTTrainer`` ("sft"), the same
    examples in the same order whatever the world size, in fp32. Returns the LoRA weights, losses
    and the mixed precision the trainer ran in ("no")."""
    from torch.utils.data import SequentialSampler

    from fastlm import FastModel

    model, tokenizer = FastModel.from_pretrained(str(path), max_seq_length=64, device_map="cpu")
    model = FastModel.get_peft_model(
        model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1234
    )
    common = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=2,
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )

    def sequential(cls):
        class Sequential(cls):  # one fixed order, so 1 and 2 processes see the same global batches
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        return Sequential

    if kind == "hf":
        from transformers import Trainer, TrainingArguments

        trainer = sequential(Trainer)(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=_token_rows(),
            data_collator=_collate,
        )
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = sequential(SFTTrainer)(
            model=model,
            # TRL defaults to bf16=True (autocast, on the CPU too): at bf16 precision the result
            # depends on the micro-batch shapes (6.3e-5 between 2 processes of 2 rows and 1 of 4),
            # which would hide the fp32 comparison this is for.
            args=SFTConfig(**common, max_length=64, bf16=False),
            train_dataset=_prompt_completion_rows(),
            processing_class=tokenizer,
        )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    weights = {n: full(p) for n, p in model.named_parameters() if "lora_" in n}
    return {"weights": weights, "losses": losses, "precision": trainer.accelerator.mixed_precision}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once by the forkserver, so that the forked ranks start warm (transformers imports model
# code lazily, on first use).
_PRELOAD = [
    "_dist_worker",
    "torch.distributed.fsdp",
    "torch.nn.parallel",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gemma3.modeling_gemma3",
    "peft",
    "accelerate.utils.fsdp_utils",
    "trl",
    "bitsandbytes",
]


def launch(args: list[str], logs: Path, timeout: float = 300.0) -> None:
    """Run the worker as ranks 0 and 1 of a gloo group (what torchrun would do) and raise with
    both logs on failure. The processes fork from a forkserver that has imported torch, fastlm,
    transformers, PEFT and TRL once: two fresh interpreters importing them side by side cost
    most of a minute on a 2-core machine."""
    import multiprocessing

    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_WORLD_SIZE": str(WORLD),
        "OMP_NUM_THREADS": "1",
    }
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    import _dist_worker

    logs.mkdir(parents=True, exist_ok=True)
    files = [logs / f"rank{rank}.log" for rank in range(WORLD)]
    procs = [
        context.Process(target=_dist_worker.entry, args=(rank, env, args, str(files[rank])))
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(1.0, deadline - time.monotonic()))
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    if hung or any(proc.exitcode != 0 for proc in procs):
        tails = "\n".join(f"--- rank {r} ---\n{f.read_text()[-6000:]}" for r, f in enumerate(files))
        state = "timed out" if hung else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"distributed worker failed ({state}):\n{tails}")
