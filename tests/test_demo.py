"""``fastlm demo``: label masking of the training data, the CLI parser, and an end-to-end run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm import cli
from fastlm.demo import (
    IGNORE_INDEX,
    DemoConfig,
    build_example,
    collate,
    config_from_args,
    lr_factor,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fastlm.real_models import gemma3_270m_path

    return AutoTokenizer.from_pretrained(str(gemma3_270m_path()))


@pytest.mark.real_model
def test_labels_cover_only_the_answer(tokenizer):
    from fastlm.data import load_demo_dataset

    for rec in load_demo_dataset("train")[:20]:
        ex = build_example(tokenizer, rec["messages"], max_seq_length=128)
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        # the token ids are exactly the chat-templated conversation, minus the trailing newline
        full = tokenizer.apply_chat_template(rec["messages"], tokenize=False).rstrip()
        assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
        prompt = tokenizer.apply_chat_template(
            rec["messages"][:1], tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert ids[0] == tokenizer.bos_token_id
        assert all(label == IGNORE_INDEX for label in labels[:n_prompt])
        answer = labels[n_prompt:]
        assert answer == ids[n_prompt:]
        assert IGNORE_INDEX not in answer
        # the answer, then its end-of-turn token, is what the loss sees
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        assert answer[-1] == end_of_turn
        assert tokenizer.decode(answer[:-1]) == rec["output"]


@pytest.mark.real_model
def test_truncation_and_padding(tokenizer):
    from fastlm.data import load_demo_dataset

    records = load_demo_dataset("train")[:3]
    short = build_example(tokenizer, records[0]["messages"], max_seq_length=40)
    assert len(short["input_ids"]) == len(short["labels"]) == 40
    examples = [build_example(tokenizer, r["messages"], 128) for r in records] + [short]
    batch = collate(examples, tokenizer.pad_token_id)
    width = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]  # right padding
        assert batch["labels"][row, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()


def test_parser_and_schedule():
    args = cli.build_parser().parse_args(
        ["demo", "--steps", "5", "--batch-size", "2", "--device", "cpu", "--eval-prompts", "3"]
    )
    config = config_from_args(args)
    assert config == DemoConfig(steps=5, batch_size=2, device="cpu", eval_prompts=3)
    factors = [lr_factor(step, 10, 2) for step in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert 0 < factors[-1] < factors[2]
    assert cli.main([]) == 2  # no command: help, non-zero exit


@pytest.mark.slow
@pytest.mark.real_model
def test_demo_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real CLI runs the PyTorch references on CPU
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "fastlm", "demo", "--steps", "2", "--batch-size", "2"]
    command += ["--device", "cpu", "--eval-prompts", "2", "--show", "1", "--max-new-tokens", "8"]
    command += ["--output-dir", str(out)]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 2 and summary["device"] == "cpu"
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert summary["tokens_per_s"] > 0
    assert summary["format_check"]["total"] == 2
    assert len(summary["generations"]) == 2
    assert {"before", "after", "before_ok", "after_ok"} <= set(summary["generations"][0])
    assert "format_check" in result.stdout
