"""TRL's SFTTrainer as a user runs it, timed side by side: HF + PEFT, Liger, Unsloth, fastlm.

    python -m fastlm.benchmarking.sft_bench --shapes llama-3.2-1b \
        --systems hf,liger,unsloth,fastlm --out benchmarks/results/<name>
    fastlm bench --loop sft ...                       # the same

Not the bare reference loop of train_bench: each child does what the seed scripts do,

    model, tok = <System>.from_pretrained(dir, max_seq_length=seq, dtype=bf16, load_in_4bit=False)
    model = <System>.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                    target_modules=<the seven>, random_state=3407,
                                    use_gradient_checkpointing="unsloth")
    SFTTrainer(model=model, processing_class=tok, train_dataset=rows, args=SFTConfig(
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=2e-4,
        warmup_steps=1, bf16=True, logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
        lr_scheduler_type="linear", seed=3407, max_length=seq, max_steps=warmup + steps,
        report_to="none", save_strategy="no")).train()

with every other SFTConfig field at TRL's default. `hf` is AutoModelForCausalLM + peft's
get_peft_model with the same LoraConfig and nothing else (TRL's default gradient checkpointing
applies); `liger` is the same with SFTConfig(use_liger_kernel=True), as a TRL user turns it on.
The data: batch · (warmup + steps) rows of `seq` random token ids (seeded generator 1234),
pre-tokenised, so TRL neither tokenises nor packs them.

A TrainerCallback times the steps: it synchronises and reads the clock before step warmup + 1
and after the last step; peak memory is `max_memory_allocated` after a reset at train begin, with
fastlm's layer-graph pool counted once (`timing.peak_gib`).
Without CUDA (smoke tests) the loop runs in fp32 with `use_cpu=True`, and adamw_8bit (a
bitsandbytes CUDA optimizer) is replaced by adamw_torch: each substitution is recorded.

Stdlib only at import time, like the other modules here: the Unsloth child imports Unsloth
before transformers and TRL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fastlm.benchmarking import timing, train_bench
from fastlm.benchmarking.checkpoint import ensure_checkpoint
from fastlm.benchmarking.processes import command_line, dist_version
from fastlm.benchmarking.report import write_outputs
from fastlm.benchmarking.shapes import SHAPES, get_shape
from fastlm.benchmarking.systems import (
    LORA_SEED,
    Ctx,
    SkipSystem,
    _peft_kwargs,
    _to_device,
    lora_config,
    preimport,
    versions,
)

MODULE = "fastlm.benchmarking.sft_bench"  # what the children run: python -m MODULE --child
PROGRAM = f"python -m {MODULE}"
SYSTEMS = ("hf", "liger", "unsloth", "fastlm")
TITLE = "# fastlm SFTTrainer benchmark"

# The seed scripts' SFTConfig fields (everything else at TRL's default).
SEED_SETTINGS = {
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,
    "warmup_steps": 1,
    "logging_steps": 1,
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "seed": 3407,
    "report_to": "none",
    "save_strategy": "no",
}


# --------------------------------------------------------------------------------------------
# The systems: (model, tokenizer) as a user has them before building the trainer.
# --------------------------------------------------------------------------------------------
def _load_fast(api, ctx: Ctx):
    """Unsloth's or fastlm's FastLanguageModel: from_pretrained, then get_peft_model with the
    "unsloth" checkpointing, as the seed scripts pass it."""
    # load_in_4bit=False said outright: Unsloth's default is True, this row is 16-bit LoRA.
    model, tokenizer = api.from_pretrained(
        ctx.path, max_seq_length=ctx.seq, dtype=ctx.dtype, load_in_4bit=False
    )
    model = _to_device(model, ctx)
    model = api.get_peft_model(model, **_peft_kwargs("unsloth"))
    return _to_device(model, ctx), tokenizer


def load_model(system: str, ctx: Ctx):
    """(model, tokenizer) of `system` for the SFTTrainer."""
    from transformers import AutoTokenizer

    if system == "unsloth":
        from unsloth import FastLanguageModel  # preimport() has imported unsloth first

        return _load_fast(FastLanguageModel, ctx)
    if system == "fastlm":
        from fastlm import FastLanguageModel  # lazy: a child imports only its own system

        return _load_fast(FastLanguageModel, ctx)
    if system == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception as exc:
            raise SkipSystem(f"import liger_kernel failed: {type(exc).__name__}: {exc}") from exc
    # hf and liger: transformers + PEFT, nothing else (SFTConfig turns Liger on).
    return _load_hf(ctx), AutoTokenizer.from_pretrained(ctx.path)


def _load_hf(ctx: Ctx):
    """AutoModelForCausalLM + peft.get_peft_model(LoraConfig): what a TRL user writes."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": ctx.dtype, "attn_implementation": ctx.shape.attn_implementation}
    if ctx.cuda:
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(ctx.path, **kwargs)
    torch.manual_seed(LORA_SEED)
    return get_peft_model(model, lora_config(task_type="CAUSAL_LM"))


# --------------------------------------------------------------------------------------------
# The loop: SFTTrainer(SFTConfig(...)).train(), timed by a callback.
# --------------------------------------------------------------------------------------------
def sft_config_kwargs(system: str, *, batch: int, seq: int, max_steps: int, cuda: bool, out: str):
    """(SFTConfig keyword arguments, substitutions made for this machine)."""
    kwargs = {
        **SEED_SETTINGS,
        "output_dir": out,
        "per_device_train_batch_size": batch,
        "max_length": seq,
        "max_steps": max_steps,
        "bf16": cuda,
    }
    substitutions = {}
    if system == "liger":
        kwargs["use_liger_kernel"] = True
    if not cuda:
        kwargs["use_cpu"] = True
        kwargs["optim"] = "adamw_torch"
        substitutions["optim"] = "adamw_8bit -> adamw_torch (no CUDA: bitsandbytes' 8-bit AdamW)"
        substitutions["bf16"] = "True -> False (no CUDA: fp32 on the CPU)"
    return kwargs, substitutions


def _step_clock(warmup: int, steps: int):
    """A TrainerCallback: peak-memory reset at train begin, the clock read (after a
    synchronisation) before step warmup + 1 and after step warmup + steps."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t_begin = self.t_start = self.t_end = None

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t_begin = now()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.t_start = now()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps:
                self.t_end = now()

    return StepClock()


def sft_loop(model, tokenizer, system: str, *, vocab: int, batch: int, seq: int, warmup: int,
             steps: int, out: str) -> dict:  # fmt: skip
    """SFTTrainer with the seed scripts' SFTConfig on pre-tokenised rows; the record's loop part."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    rows = batch * (warmup + steps)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    kwargs, substitutions = sft_config_kwargs(
        system, batch=batch, seq=seq, max_steps=warmup + steps, cuda=cuda, out=out
    )
    clock = _step_clock(warmup, steps)
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=data,
        args=SFTConfig(**kwargs),
        callbacks=[clock],
    )
    trainer.train()
    elapsed = clock.t_end - clock.t_start
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "tokens_per_s": batch * seq * steps / elapsed,
        "ms_per_step": 1000.0 * elapsed / steps,
        "timed_s": elapsed,
        "warmup_s": clock.t_start - clock.t_begin,
        "step0_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_gib": timing.peak_gib(torch) if cuda else None,
        "layer_graphs": timing.layer_graph_counts(),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "sft_config": {k: str(v) for k, v in kwargs.items() if k != "output_dir"},
        "substitutions": substitutions,
    }


# --------------------------------------------------------------------------------------------
# Child process: one (shape, system).
# --------------------------------------------------------------------------------------------
def _versions(system: str) -> dict:
    out = versions(system, "lora")
    out.update({name: dist_version(name) for name in ("trl", "datasets", "bitsandbytes")})
    return out


def child_main(spec: dict) -> dict:
    """Load, add LoRA, train with SFTTrainer; always returns a record (ok / error / skipped)."""
    t_start = time.perf_counter()
    shape = get_shape(spec["shape"])
    system = spec["system"]
    rec = train_bench.new_record(spec, "sft")

    def load(cuda: bool, dtype):
        ctx = Ctx(shape=shape, path=spec["path"], mode="lora", seq=spec["seq"], cuda=cuda,
                  dtype=dtype)  # fmt: skip
        model, tokenizer = load_model(system, ctx)
        loop = {k: spec[k] for k in ("batch", "seq", "warmup", "steps")}
        out = spec.get("trainer_dir") or os.path.join(spec["path"], "sft-trainer-out")
        return model, lambda: sft_loop(
            model, tokenizer, system, vocab=shape.vocab_size, out=out, **loop
        )

    return train_bench.measure_child(
        rec, t_start, load, lambda: _versions(system), prepare=lambda: preimport(system)
    )


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def run_child(spec: dict, log_path, timeout: float, cuda: bool) -> dict:
    """train_bench's child runner, pointed at this module."""
    return train_bench.run_child(spec, log_path, timeout, cuda, module=MODULE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b", help=f"comma list of: {', '.join(SHAPES)}")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma list of: {','.join(SYSTEMS)}"
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-sft)")
    train_bench.add_loop_args(
        p,
        seq_help="override every shape's sequence length (SFTConfig max_length)",
        batch_help="override every shape's per-device batch size",
    )
    p.set_defaults(steps=12)
    train_bench.add_parent_args(p, child_timeout=1200.0, list_help="print the shapes and exit")
    args = train_bench.check_args(p, p.parse_args(argv), get_shape, SYSTEMS)
    if args.child is None and args.warmup < 1:
        p.error("--warmup must be >= 1 (the clock starts after a completed step)")
    return args


def main(argv: list[str] | None = None, *, program: str = PROGRAM) -> int:
    """Run the benchmark with `argv`; `program` is how the results record the command."""
    args = parse_args(argv)
    if (code := train_bench.child_entry(args, child_main)) is not None:
        return code
    if args.list_shapes:
        print(train_bench._list_shapes())
        return 0

    def spec(shape, system: str, path: str, out: Path) -> dict:
        return train_bench.base_spec(shape, system, path, args) | {
            "trainer_dir": str(out / "trainer" / system),
        }

    def write(out: Path, payload: dict) -> None:
        md = write_outputs(out, payload).replace("# fastlm training benchmark", TITLE, 1)
        (out / "results.md").write_text(md)

    parent = train_bench.Parent("sft", "sft", get_shape, ensure_checkpoint, spec, run_child, write)
    out, records = train_bench.parent_loop(parent, args, command_line(program, argv))
    train_bench.print_failures(records)
    train_bench.print_table(out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
