"""``fastlm sft --packing`` and ``--padding-free`` end to end: the first step's loss and every
LoRA gradient equal those of unpatched transformers + PEFT run on each example alone (fp32, CPU),
attention was split at the examples' boundaries, and sft_summary.json says how the batches were
laid out.

The examples are tokenized here the way a user reads the data (prompt + completion + EOS, the loss
on the completion and EOS, cut at --max-seq-length), not read back from the trainer; the packed
batch must hold exactly these sequences. The CLI runs in-process; ``sft._trainer`` is wrapped to
record the collated batch and the gradients before the optimizer step. LoRA's B starts at zero,
which would leave every A gradient zero: B is set to random values when training begins, so the
A gradients are compared too.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_cli import run, write_jsonl
from tiny_models import relative_error
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from fastlm.commands import sft
from fastlm.models import fused_report

pytestmark = pytest.mark.usefixtures("cli_logging", "one_thread")

RTOL = 1e-4  # fp32, relative
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 24  # tokens (about one a character with the tiny tokenizer)
RECORDS = [
    {"prompt": "add two", "completion": " four"},
    {"prompt": "a", "completion": " dd us er"},
    {"prompt": "say", "completion": " a longer answer that runs past the row end"},  # cut
    {"prompt": "double three", "completion": " six"},
    {"prompt": "a prompt that fills every token of the row", "completion": " lost"},  # no label
    {"prompt": "hi", "completion": " ok"},
]


class _Recorder(TrainerCallback):
    """Random LoRA B at the start; the LoRA weights then, and the gradients before the step."""

    def __init__(self):
        self.start: dict = {}
        self.grads: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        self.start = _lora(model, lambda p: p.detach().clone())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = _lora(model, lambda p: p.grad.detach().clone())


def _lora(model, value) -> dict:
    return {_key(n): value(p) for n, p in model.named_parameters() if "lora_" in n}


def _key(name: str) -> str:
    """A LoRA weight's name without the wrappers' prefixes, comparable across the two models."""
    return name[name.index("layers.") :]


def _run_cli(monkeypatch, tmp_path, model, flag: str) -> tuple[dict, dict, dict]:
    seen: dict = {}
    recorder = _Recorder()
    build = sft._trainer

    def recording_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(recorder)
        compute_loss = trainer.compute_loss

        def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if "loss" not in seen:
                seen["batch"] = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
                seen["loss"], seen["n_items"] = loss.item(), int(num_items_in_batch)
                seen["model"] = model
            return loss

        trainer.compute_loss = recording
        return trainer

    monkeypatch.setattr(sft, "_trainer", recording_trainer)
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    out = tmp_path / "out"
    code = run(
        ["sft", "--model", model, "--data", data, "--output-dir", out, flag]
        + ["--max-steps", 1, "--batch-size", len(RECORDS), "--grad-accum", 1]
        + ["--max-seq-length", MAX_LENGTH, "--lora-r", 4, "--lora-alpha", 8]
        + ["--max-grad-norm", 0, "--logging-steps", 1, "--dtype", "float32"]
    )
    assert code == 0
    seen["start"], seen["grads"] = recorder.start, recorder.grads
    return seen, json.loads((out / "sft_summary.json").read_text()), seen["model"]


def _examples(model_path) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each record: prompt + completion + EOS, loss on what follows the
    prompt, the first MAX_LENGTH tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = []
    for record in RECORDS:
        prompt = tokenizer(record["prompt"]).input_ids
        ids = tokenizer(record["prompt"] + record["completion"] + tokenizer.eos_token).input_ids
        assert ids[: len(prompt)] == prompt
        labels = [-100] * len(prompt) + ids[len(prompt) :]
        examples.append((ids[:MAX_LENGTH], labels[:MAX_LENGTH]))
    return examples


def _batch_sequences(batch: dict) -> list[tuple[list[int], list[int]]]:
    """The padding-free batch's sequences, split at cu_seq_lens."""
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    cu = batch["cu_seq_lens_q"].tolist()
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    return [(ids[a:b], labels[a:b]) for a, b in zip(cu, cu[1:])]


def _each_example_alone(model_path, lora_start: dict, examples, n_items: int):
    """Unpatched transformers + PEFT, one example at a time: summed loss and LoRA gradients."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(lora_start[_key(name)])
    total = 0.0
    for ids, labels in examples:
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    return total, _lora(model, lambda p: p.grad)


@pytest.mark.parametrize("flag", ["--packing", "--padding-free"])
def test_sft_first_step_matches_each_example_alone(monkeypatch, tmp_path, tiny_llama, flag, capsys):
    seen, summary, model = _run_cli(monkeypatch, tmp_path, tiny_llama, flag)
    printed = capsys.readouterr()
    assert "1 of 6 examples dropped" in printed.out + printed.err  # the prompt filling the row

    examples = _examples(tiny_llama)
    with_labels = [e for e in examples if any(label != -100 for label in e[1][1:])]
    assert len(with_labels) == len(examples) - 1
    # BFD packing keeps the example whose answer was cut off (no label); padding-free drops it
    want_sequences = examples if flag == "--packing" else with_labels
    got_sequences = _batch_sequences(seen["batch"])
    # the collator masks each sequence's first label (it would be predicted across the boundary)
    assert sorted((ids, labels[1:]) for ids, labels in got_sequences) == sorted(
        (ids, labels[1:]) for ids, labels in want_sequences
    )
    n_items = sum(sum(label != -100 for label in labels[1:]) for _, labels in with_labels)
    assert seen["n_items"] == n_items

    want_loss, want = _each_example_alone(tiny_llama, seen["start"], with_labels, n_items)
    assert abs(seen["loss"] - want_loss) <= RTOL * abs(want_loss)
    assert abs(summary["losses"][0] - want_loss) <= RTOL * abs(want_loss)
    got = seen["grads"]
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 2  # A, B of 7 projections, 2 layers
    for name, grad in want.items():
        assert grad.abs().max() > 0, name
        assert relative_error(got[name], grad) <= RTOL, name

    # the attention of the step was split at the sequences' boundaries
    reasons = {row["reason"] for row in fused_report(model).attention}
    assert reasons and all("packed sequences from cu_seq_lens" in r for r in reasons), reasons

    tokens = sum(len(ids) for ids, _ in want_sequences)
    batching = summary["batching"]
    if flag == "--packing":
        rows = batching["rows"]
        assert batching["mode"] == "packed" and batching["strategy"] == "bfd"
        assert batching["examples"] == len(examples) and batching["tokens"] == tokens
        assert 1 <= rows < len(examples) and batching["row_tokens"] == MAX_LENGTH
        assert batching["fill"] == pytest.approx(tokens / (rows * MAX_LENGTH))
    else:
        assert batching == {"mode": "padding_free", "examples": len(with_labels), "tokens": tokens}
