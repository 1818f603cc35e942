"""TRL's padding-free and packed SFT on a model loaded with SDPA (transformers' default): the
first step's loss and every LoRA gradient the SFTTrainer computes with fastlm equal those of
unpatched transformers + PEFT run on each of the batch's sequences alone, and the packed batch
ran fastlm's packed kernel (on the GPU, or in the interpreter on CPU tensors without one) or,
without it, SDPA on the CPU with a mask that keeps the sequences apart.

The reference reads its sequences from the batch the trainer collated (``cu_seq_lens_q``), so
TRL's shuffling and packing need no re-implementation; the per-sequence losses are summed over
the batch's ``num_items_in_batch``, as TRL's loss is.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, relative_error, save_tiny_model
from transformers import AutoModelForCausalLM, TrainerCallback

from fastlm import FastModel
from fastlm.models import attention, fused_report

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4  # fp32, relative
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTHS = (7, 3, 12, 1, 9, 5)  # a one-token example: no predicted token, still a sequence
# TRL's two padding-free collations: padding_free on each example, and BFD packing (rows of at
# most max_length tokens, flattened again into one row per batch).
CONFIGS = {
    "padding_free": dict(padding_free=True, max_length=None),
    "packing": dict(packing=True, max_length=16),
}


def _pair(tmp_path, model_type, device="cpu"):
    """Unpatched transformers + PEFT and fastlm, both with SDPA, same weights and LoRA (B ≠ 0),
    both on ``device``."""
    path = save_tiny_model(model_type, tmp_path / model_type)
    lora = dict(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device)
    reference = get_peft_model(reference, LoraConfig(**lora))
    fast, tokenizer = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map=device)
    fast = FastModel.get_peft_model(fast, **lora, use_gradient_checkpointing=False)
    fast.load_state_dict(reference.state_dict())
    assert fast.config._attn_implementation == "sdpa"
    assert reference.config._attn_implementation == "sdpa"
    return reference, fast, tokenizer


def _dataset(lengths=LENGTHS):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (n,), generator=gen).tolist()} for n in lengths]
    return Dataset.from_list(rows)


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if "lora_" in n}  # fmt: skip


class _GradsBeforeStep(TrainerCallback):
    """The LoRA gradients the optimizer is about to apply (clipping is off)."""

    def __init__(self):
        self.grads: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = _lora_grads(model)


def _first_step(tmp_path, model, tokenizer, config: dict):
    """One SFTTrainer step on the whole data set: (loss, LoRA grads, collated batch, n_items)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=len(LENGTHS),
        max_steps=1,
        max_grad_norm=0.0,  # no clipping: the raw gradients are compared
        use_cpu=not next(model.parameters()).is_cuda,  # the trainer keeps the model where it is
        bf16=False,  # SFTConfig's default is bf16 autocast, on the CPU too: compare in fp32
        report_to=[],
        save_strategy="no",
        **config,
    )
    callback = _GradsBeforeStep()
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=_dataset(), args=args,
        callbacks=[callback],
    )  # fmt: skip
    seen = {}
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen["batch"] = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        seen["loss"], seen["n_items"] = loss.item(), num_items_in_batch
        return loss

    trainer.compute_loss = recording
    trainer.train()
    return seen["loss"], callback.grads, seen["batch"], seen["n_items"]


def _each_sequence_alone(model, batch, n_items):
    """The batch's sequences one at a time through ``model``: summed loss and LoRA gradients."""
    model.zero_grad(set_to_none=True)
    cu = batch["cu_seq_lens_q"].tolist()
    tokens = batch["input_ids"][0]
    total = 0.0
    for start, end in zip(cu, cu[1:]):
        ids = tokens[start:end][None]
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    return total, _lora_grads(model), len(cu) - 1


def _assert_same_step(reference, fast, tmp_path, tokenizer, config):
    got_loss, got, batch, n_items = _first_step(tmp_path, fast, tokenizer, config)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free
    want_loss, want, n_sequences = _each_sequence_alone(reference, batch, n_items)
    assert n_sequences == len(LENGTHS)
    assert abs(got_loss - want_loss) <= RTOL * abs(want_loss)
    assert got.keys() == want.keys() and want
    for name, grad in want.items():
        assert relative_error(got[name], grad) <= RTOL, name


@pytest.mark.usefixtures("kernel_on_cpu")
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_sft_first_step_runs_the_packed_kernel_and_matches_each_sequence(
    tmp_path, model_type, config, device
):
    reference, fast, tokenizer = _pair(tmp_path, model_type, device)
    _assert_same_step(reference, fast, tmp_path, tokenizer, CONFIGS[config])
    ran = {(row["attention"], row["reason"]) for row in fused_report(fast).attention}
    reason = "packed sequences from cu_seq_lens, in place of sdpa"
    assert ran == {(attention.FLASH_VARLEN, reason)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_sft_first_step_on_the_cpu_fallback_matches_each_sequence(tmp_path):
    reference, fast, tokenizer = _pair(tmp_path, "llama")
    _assert_same_step(reference, fast, tmp_path, tokenizer, CONFIGS["padding_free"])
    ran = {(row["attention"], row["reason"]) for row in fused_report(fast).attention}
    reason = "packed sequences from cu_seq_lens, but cpu tensors (the kernel runs on CUDA)"
    assert ran == {("sdpa", reason)}
