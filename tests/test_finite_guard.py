"""A NaN never becomes a saved adapter: TRL's SFTTrainer, the HF Trainer and ``fastlm sft`` stop
on a NaN/inf loss or gradient with ``NonFiniteLossError`` (or its subclass
``NonFiniteGradientError``) naming the likely cause, before an optimizer step applies it (CPU), and
write no file holding NaN/inf. The model-level pieces: tests/models/test_finite.py; the embedding
and reranker trainers: tests/embeddings/test_finite_training.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from finite_helpers import (
    BROKEN,
    break_base_weight,
    inf_gradient,
    non_finite_files,
    trainable,
    unchanged,
)
from safetensors.torch import load_file, save_file
from test_cli import chat_records, run, write_jsonl
from test_trl import ON_GPU, _data, _tiny_peft_model, _training_args

from fastlm.errors import NonFiniteGradientError, NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_thread", "cli_logging")


# --------------------------------------------------------------------------- TRL and HF Trainer


def test_sft_trainer_stops_on_a_nan_base_weight_and_saves_nothing(tmp_path):
    """The reported case: TRL computes its own loss (fastlm's loss check never runs)."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _tiny_peft_model(tmp_path, "llama", r=4)
    break_base_weight(model)
    before = trainable(model)
    overrides = dict(max_steps=3, max_length=64, save_strategy="steps", save_steps=1)
    args = SFTConfig(**_training_args(tmp_path, **overrides))
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=_data(), args=args)
    with pytest.raises(NonFiniteLossError, match=rf"(?i)nan.*{BROKEN}\.base_layer\.weight"):
        trainer.train()
    if not ON_GPU:  # CPU: raised before the optimizer; CUDA: before anything was saved
        assert unchanged(model, before)
    assert non_finite_files(tmp_path / "out") == []


def test_sft_trainer_stops_on_an_inf_gradient_under_a_finite_loss(tmp_path):
    """The gradient guard on its own: the loss is finite, TRL computes it, the gradient is inf."""
    from trl import SFTConfig, SFTTrainer

    class Regularised(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, inputs, *args, **kwargs) + inf_gradient(model)

    model, tokenizer = _tiny_peft_model(tmp_path, "llama", r=4)
    before = trainable(model)
    args = SFTConfig(**_training_args(tmp_path, max_steps=2, max_length=64))
    trainer = Regularised(model=model, processing_class=tokenizer, train_dataset=_data(), args=args)
    if ON_GPU:  # the verdict arrives at the next forward
        with pytest.raises(NonFiniteGradientError, match="backward pass 1"):
            trainer.train()
        return
    with pytest.raises(NonFiniteGradientError, match="gradient norm is inf at backward pass 1"):
        trainer.train()
    assert unchanged(model, before)


def test_hf_trainer_stops_on_the_micro_batch_whose_gradient_is_inf(tmp_path):
    """Gradient accumulation: the second micro-batch's backward raises, before the first
    optimizer step (the Trainer would have clipped a grad_norm of inf, then stepped)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    class SecondBatchBroken(Trainer):
        calls = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.calls += 1
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            return loss + inf_gradient(model) if self.calls == 2 else loss

    model, tokenizer = _tiny_peft_model(tmp_path, "gemma3_text", r=4)
    before = trainable(model)
    dataset = [tokenizer(f"{i} plus {i} is {2 * i}.") for i in range(32)]
    args = TrainingArguments(**_training_args(tmp_path, gradient_accumulation_steps=2, max_steps=2))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = SecondBatchBroken(
        model=model, args=args, train_dataset=dataset, data_collator=collator
    )
    if ON_GPU:  # the verdict arrives at the next forward, or at the latest before a save
        with pytest.raises(NonFiniteGradientError, match="backward pass 2"):
            trainer.train()
            model.save_pretrained(tmp_path / "adapter")
        return
    with pytest.raises(NonFiniteGradientError, match=r"gradient norm is inf at backward pass 2"):
        trainer.train()
    assert unchanged(model, before)


# --------------------------------------------------------------------------- the CLI


def _sft(model: Path, out: Path, *extra) -> int:
    data = write_jsonl(out.parent / "chat.jsonl", chat_records())
    return run(
        ["sft", "--model", model, "--data", data, "--output-dir", out, "--max-steps", 3]
        + ["--batch-size", 4, "--grad-accum", 1, "--warmup-steps", 0, "--max-seq-length", 64]
        + ["--lora-r", 4, *extra]
    )


def _error_line(err: str) -> str:
    """The one error line ``fastlm sft`` printed (after progress-bar and status output)."""
    lines = [
        line[line.index("fastlm sft: error: ") :] for line in err.splitlines() if "error: " in line
    ]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_sft_diverging_run_exits_1_with_one_line_and_no_adapter(tiny_llama, tmp_path, capsys):
    """lr 1e30: step 1 is finite, its update makes step 2's forward overflow. Without the guard
    this printed "done", exited 0 and saved an adapter of NaN."""
    out = tmp_path / "out"
    assert _sft(tiny_llama, out, "--lr", 1e30, "--save-steps", 1) == 1
    error = _error_line(capsys.readouterr().err)
    # CPU: raised before step 2's update; CUDA: read at step 3, before any save
    assert re.search(r"the training loss (is nan|was NaN/inf) at step 2", error), error
    assert not (out / "adapter").exists() and not (out / "sft_summary.json").exists()
    assert non_finite_files(out) == []


def test_cli_sft_refuses_a_checkpoint_with_inf_weights(tiny_llama, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_llama.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"][3, :2] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert _sft(broken, tmp_path / "out", "--lr", 1e-3) == 1
    error = _error_line(capsys.readouterr().err)
    assert "model.layers.1.self_attn.o_proj.weight (2 of" in error
    assert "checkpoint is damaged" in error
    assert not (tmp_path / "out" / "adapter").exists()
