"""fastlm models run unchanged under TRL's SFTTrainer and the HF Trainer."""

from __future__ import annotations

import torch
from tiny_models import save_tiny_model

from fastlm import FastModel

ON_GPU = torch.cuda.is_available()
DEVICE_MAP = "cuda" if ON_GPU else "cpu"


def _data(n=64):
    from datasets import Dataset

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"add {i} {i + 1}"},
                {"role": "assistant", "content": str(2 * i + 1)},
            ]
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def _tiny_peft_model(tmp_path, model_type, r=8, lora_alpha=16, load_in_4bit=False, **peft):
    """A tiny saved ``model_type`` loaded by FastModel (max_seq_length 64) with LoRA."""
    path = save_tiny_model(model_type, tmp_path / model_type)
    model, tokenizer = FastModel.from_pretrained(
        str(path), max_seq_length=64, load_in_4bit=load_in_4bit, device_map=DEVICE_MAP
    )
    return FastModel.get_peft_model(model, r=r, lora_alpha=lora_alpha, **peft), tokenizer


def _training_args(tmp_path, **overrides) -> dict:
    """The trainer arguments the tests share (batch 8, lr 1e-2, a loss logged per step, bf16
    on the GPU, no saving); ``overrides`` add or replace."""
    args = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        bf16=ON_GPU,
        use_cpu=not ON_GPU,
        report_to=[],
        save_strategy="no",
    )
    return {**args, **overrides}


def test_sft_trainer_runs_and_loss_falls(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _tiny_peft_model(tmp_path, "llama")
    args = SFTConfig(
        **_training_args(tmp_path, gradient_accumulation_steps=2, max_steps=12, max_length=64)
    )
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=_data(), args=args)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_hf_trainer_uses_the_fused_loss_with_gradient_accumulation(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tokenizer = _tiny_peft_model(tmp_path, "gemma3_text")
    texts = [f"{i} plus {i} is {2 * i}." for i in range(48)]
    dataset = [tokenizer(t) for t in texts]
    args = TrainingArguments(
        **_training_args(tmp_path, gradient_accumulation_steps=2, max_steps=10)
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]


def _checkpoint_functions(model) -> set:
    return {
        layer._gradient_checkpointing_func
        for layer in model.modules()
        if hasattr(layer, "_gradient_checkpointing_func")
    }


def test_trainers_keep_fastlms_offloaded_checkpointing(tmp_path, caplog):
    """TRL's SFTConfig turns checkpointing on by default, and the Trainer then re-enables it at
    ``train()``: transformers put torch's checkpoint back on every layer, and fastlm's offloaded
    mode was gone without a word. Both trainers now leave fastlm's function on the layers (and
    say so once); ``FastModel.unpatch`` removes the wrappers."""
    import logging

    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from fastlm.offload import offloaded_checkpoint

    model, tokenizer = _tiny_peft_model(tmp_path, "llama", use_gradient_checkpointing="unsloth")
    assert _checkpoint_functions(model) == {offloaded_checkpoint}
    args = SFTConfig(**_training_args(tmp_path, max_steps=1, max_length=64))
    assert args.gradient_checkpointing  # TRL's default
    trainer = SFTTrainer(model=model, args=args, train_dataset=_data(8), processing_class=tokenizer)
    with caplog.at_level(logging.INFO, logger="fastlm"):
        trainer.train()
    assert _checkpoint_functions(model) == {offloaded_checkpoint}
    assert sum("the layers keep fastlm's offloaded_checkpoint" in m for m in caplog.messages) == 1

    hf_args = TrainingArguments(
        **_training_args(tmp_path, max_steps=1, gradient_checkpointing=True)
    )
    batch = tokenizer(["add 1 2 3"] * 8, return_tensors="pt")
    rows = [{"input_ids": ids, "labels": ids} for ids in batch["input_ids"]]
    Trainer(model=model, args=hf_args, train_dataset=rows).train()
    assert _checkpoint_functions(model) == {offloaded_checkpoint}

    FastModel.unpatch(model)
    model.base_model.model.gradient_checkpointing_enable()
    assert offloaded_checkpoint not in _checkpoint_functions(model)  # transformers' own again
