"""``fastlm rerank`` end to end on a tiny Qwen3 reranker: data checks, listwise and pointwise
runs, the demo set, saved folders.

Commands run in-process through ``fastlm.cli.main(argv)``. The saved adapter (and the full
model of a full fine-tune) must give, through ``FastReranker.from_pretrained``, the scores of the
trained model in the process (fp32 on the CPU, atol 1e-6); the bf16 merged copy within 0.05.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "embeddings"))
from embedding_helpers import CPU  # noqa: E402
from reranker_helpers import save_tiny_reranker  # noqa: E402
from test_cli import REPO, run, write_jsonl  # noqa: E402

from fastlm import cli  # noqa: E402
from fastlm.commands import rerank as rerank_command  # noqa: E402
from fastlm.embeddings.data import EmbeddingData, load_embedding_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "cli_logging")

WORDS = ["cat", "dog", "fox", "owl", "bee", "ant", "elk", "yak", "emu", "gnu"]
PROBE_QUERIES = ["what is cat", "what is owl", "hi"]
PROBE_DOCS = ["cat is an animal", "fox?", "a yak"]


def listwise_rows(words=WORDS) -> list[dict]:
    return [
        {
            "query": f"what is {w}",
            "response": f"{w} is an animal",
            "rejected_response": [f"{w}?", f"{words[i - 1]} is an animal"],
        }
        for i, w in enumerate(words)
    ]


def pointwise_rows(words=WORDS) -> list[dict]:
    rows = []
    for i, w in enumerate(words):
        rows.append({"anchor": f"what is {w}", "positive": f"{w} is an animal", "score": 1})
        rows.append({"anchor": f"what is {w}", "positive": f"{w}?", "score": 0.2})
        rows.append({"anchor": f"what is {w}", "positive": f"{words[i - 3]} runs", "score": 0})
    return rows


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory) -> Path:
    # answer_scale: LM-head rows of a real reranker's size, so a few LoRA steps can move z.
    return save_tiny_reranker("qwen3", tmp_path_factory.mktemp("rerank") / "qwen3", answer_scale=30)


def tiny_argv(model: Path | None, data: Path | None, out: Path, *extra) -> list:
    model_flags = ["--model", model] if model is not None else []
    data_flags = ["--data", data] if data is not None else []
    return [
        "rerank", *model_flags, *data_flags, "--output-dir", out, "--max-steps", 8,
        "--batch-size", 4, "--lr", 5e-3, "--max-seq-length", 400, "--lora-r", 4, "--seed", 0,
        "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture
def trained_scores(monkeypatch) -> dict:
    """The scores of PROBE_* by the trained reranker in the process, just before it is saved."""
    scores = {}
    save = rerank_command._save

    def spy(reranker, *args, **kwargs):
        scores["probe"] = reranker.score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
        scores["template"] = reranker.template
        return save(reranker, *args, **kwargs)

    monkeypatch.setattr(rerank_command, "_save", spy)
    return scores


def reload(folder: Path):
    from fastlm.embeddings import FastReranker

    return FastReranker.from_pretrained(str(folder), max_seq_length=400, **CPU)


# --------------------------------------------------------------------------- help, data errors


def test_help_shows_examples_data_formats_and_defaults(capsys):
    assert "rerank" in cli.COMMANDS  # so test_cli's torch-free --help check covers it
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rerank", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: fastlm rerank" in text
    for flag in ("--loss {listwise,pointwise}", "--temperature", "--instruction", "--lora-r"):
        assert flag in text
    examples = text.split("examples:")[1]
    assert "fastlm rerank --model ./Qwen3-Reranker-0.6B" in examples
    assert '"rejected_response"' in examples and '"label"' in examples


def test_rerank_help_does_not_import_torch():
    code = (
        "import sys\nfrom fastlm import cli\n"
        "try:\n    cli.main(['rerank', '--help'])\nexcept SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\nprint('torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    ("lines", "argv", "match"),
    [
        (['{"query": "a", "response": "b", "rejected_response": ["c"]}', '{"query": "c" "x": 1}'],
         [], r"bad\.jsonl:2: malformed JSON"),
        (['{"query": "a", "response": "b", "label": 1}', '{"query": "a", "response": "c",'
          ' "label": 1.5}'], [], r"bad\.jsonl:2: a reranker label must lie in \[0, 1\].*1\.5"),
        (['{"query": "a", "response": "b", "rejected_response": ["c"]}',
          '{"query": "a", "response": "d"}'], ["--loss", "listwise"],
         r"bad\.jsonl:2: --loss listwise ranks .* this row has none"),
        (['{"query": "a", "response": "b", "rejected_response": ["c"], "label": 0}'],
         ["--loss", "listwise"], r"bad\.jsonl:1: --loss listwise .* its label is 0"),
        (['{"query": "a", "response": "b", "rejected_response": ["c"]}', '{"query": "x"}'], [],
         r'bad\.jsonl:2: no response \(one of "response", "positive"'),
        (['{"query": "a", "response": "b", "label": 1}', '{"query": "a", "response": "c"}'], [],
         r"bad\.jsonl:2: .*bad\.jsonl:1 has a label and .*bad\.jsonl:2 has none"),
        (['{"query": "a", "response": "b"}', '{"query": "c", "response": "d", "label": 1}'], [],
         r"bad\.jsonl:2: .* has a label"),
        (['{"query": "a", "response": "b"}'], [],
         r"--data .*bad\.jsonl: every pair is relevant .* nothing to learn"),
        (['{"query": "a", "response": "b", "label": 0.3}'], ["--temperature", "0.5"],
         r"--temperature is for --loss listwise, not pointwise"),
        (['{"query": "a", "response": "b", "rejected_response": ["c"]}'],
         ["--model", "./no/such/folder"], r"--model ./no/such/folder: no such folder"),
        (['{"query": "a", "response": "b", "rejected_response": ["c"]}'], ["--lr", "0"],
         r"--lr must be greater than 0"),
        (['{"query": "a", "response": "b", "rejected_response": ["c"]}'],
         ["--load-in-4bit", "--full-finetune"], r"--full-finetune and --load-in-4bit do not go"),
    ],
)  # fmt: skip
def test_bad_rows_and_flags_are_named_before_any_model_loads(
    tmp_path, capsys, monkeypatch, lines, argv, match
):
    from fastlm.embeddings import FastReranker

    def no_model(*args, **kwargs):
        raise AssertionError("the data must be checked before a model loads")

    monkeypatch.setattr(FastReranker, "from_pretrained", no_model)
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    assert run(["rerank", "--data", data, "--output-dir", tmp_path / "out", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastlm rerank: error: ")
    assert len(err.strip().splitlines()) <= 4  # no traceback
    assert re.search(match, err), err


def test_bad_eval_rows_and_adapter_as_model(tmp_path, capsys, tiny_reranker):
    data = write_jsonl(tmp_path / "train.jsonl", listwise_rows())
    bad = write_jsonl(tmp_path / "eval.jsonl", ['{"query": "a", "response": "b"}', "{oops"])
    argv = tiny_argv(tiny_reranker, data, tmp_path / "out", "--eval-data", bad)
    assert run(argv) == 1
    assert re.search(r"eval\.jsonl:2: malformed JSON", capsys.readouterr().err)
    lonely = write_jsonl(tmp_path / "lonely.jsonl", ['{"query": "a", "response": "b"}'])
    assert run(tiny_argv(tiny_reranker, data, tmp_path / "out", "--eval-data", lonely)) == 1
    assert "no query has a relevant response and another candidate" in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert run(tiny_argv(adapter, data, tmp_path / "out")) == 1
    assert "a LoRA adapter; pass the model it was trained on" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluation


class _ConstantReranker:
    """Scores every pair alike, except the documents listed in ``high``."""

    def __init__(self, high=()):
        self.high = set(high)

    def score(self, queries, documents, batch_size, return_logits):
        return torch.tensor([5.0 if d in self.high else 0.0 for d in documents])


def test_ranking_groups_and_metrics_count_ties_against_the_model():
    rows = [
        {"query": "q1", "response": "a", "rejected_response": ["b", "c"]},
        {"query": "q1", "response": "d", "rejected_response": ["a"], "label": 0.4},
        {"query": "q2", "response": "e", "rejected_response": ["f"], "label": 0.9},
        {"query": "q3", "response": "g", "rejected_response": []},  # one candidate: left out
        {"query": "q4", "response": "h", "rejected_response": ["i"], "label": 0.0},  # no hit
    ]
    groups = rerank_command.ranking_groups(EmbeddingData(rows=rows))
    assert groups == [("q1", ["a", "b", "c", "d"], {0}), ("q2", ["e", "f"], {0})]

    def evaluate(reranker):
        return rerank_command._evaluate(reranker, groups, rerank_command.Console(), "now")

    # All tied: each relevant candidate ranks last (4th of 4, 2nd of 2).
    tied = evaluate(_ConstantReranker())
    assert tied["recall@1"] == 0.0
    assert tied["mrr@10"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert tied["ndcg@10"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(3)) / 2)
    assert evaluate(_ConstantReranker(high={"a", "e"})) == {
        "recall@1": 1.0,
        "mrr@10": 1.0,
        "ndcg@10": 1.0,
    }
    half = evaluate(_ConstantReranker(high={"c", "e"}))  # q1: "a" ties with b, d behind c
    assert half["recall@1"] == 0.5 and half["mrr@10"] == pytest.approx((1 / 4 + 1) / 2)


# --------------------------------------------------------------------------- training runs


def test_listwise_metrics_summary_and_saved_folders_score_the_same(
    tiny_reranker, tmp_path, capsys, trained_scores
):
    data = write_jsonl(tmp_path / "train.jsonl", listwise_rows())
    held_out = write_jsonl(tmp_path / "eval.jsonl", listwise_rows(WORDS[:6]))
    out = tmp_path / "out"
    argv = tiny_argv(tiny_reranker, data, out, "--eval-data", held_out)
    assert run([*argv, "--save-method", "merged_16bit"]) == 0
    stdout = capsys.readouterr().out
    assert "reranking, 6 held-out queries" in stdout and "fastlm rerank: done" in stdout
    for metric in ("recall@1", "mrr@10", "ndcg@10"):
        assert metric in stdout

    summary = json.loads((out / "rerank_summary.json").read_text())
    assert summary["steps"] == 8 and len(summary["losses"]) == 8
    assert all(math.isfinite(x) for x in summary["losses"])
    assert summary["loss"] == "listwise (temperature 1)" and summary["template"] == "qwen3"
    assert summary["data_kind"] == "listwise" and summary["method"] == "lora"
    assert summary["trained_tokens"] > 0 and summary["tokens_per_s"] > 0
    before, after = summary["eval"]["before"], summary["eval"]["after"]
    assert set(before) == {"recall@1", "mrr@10", "ndcg@10"}
    assert after["mrr@10"] > before["mrr@10"]  # 8 steps on the same kind of rows
    config = json.loads((out / "rerank_config.json").read_text())
    assert (config["lora-r"], config["eval-data"]) == (4, str(held_out))
    assert "loss" not in config  # not given: picked from the data

    adapter = reload(out / "adapter")
    assert hasattr(adapter.model, "peft_config") and adapter.template == trained_scores["template"]
    theirs = adapter.score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert torch.allclose(theirs, trained_scores["probe"], atol=1e-6, rtol=0)
    untouched = reload(tiny_reranker).score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert (theirs - untouched).abs().max() > 1e-3  # training moved the scores
    # The metrics of the reloaded adapter are those printed after training.
    groups = rerank_command.ranking_groups(load_embedding_data(held_out))
    assert rerank_command._evaluate(adapter, groups, rerank_command.Console(), "reloaded") == after

    merged = reload(out / "merged_16bit")  # bfloat16 weights, LoRA merged in
    assert not hasattr(merged.model, "peft_config")
    merged_scores = merged.score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert torch.allclose(merged_scores, trained_scores["probe"], atol=0.05, rtol=0.05)


def test_pointwise_labels_gemma_template_and_instruction_are_saved(
    tiny_reranker, tmp_path, capsys, trained_scores
):
    data = write_jsonl(tmp_path / "train.jsonl", pointwise_rows())
    held_out = write_jsonl(tmp_path / "eval.jsonl", pointwise_rows(WORDS[:5]))
    out = tmp_path / "out"
    extra = ["--eval-data", held_out, "--template", "gemma", "--instruction", "Name the animal"]
    assert run(tiny_argv(tiny_reranker, data, out, *extra)) == 0
    stdout = capsys.readouterr().out
    assert "reranking, 5 held-out queries" in stdout
    summary = json.loads((out / "rerank_summary.json").read_text())
    assert summary["loss"] == "pointwise (BCE)" and summary["data_kind"] == "scored-pair"
    assert (summary["template"], summary["instruction"]) == ("gemma", "Name the animal")
    assert all(math.isfinite(x) for x in summary["losses"])

    adapter = reload(out / "adapter")  # the saved template (fastlm_reranker.json) comes back
    assert adapter.template == trained_scores["template"]
    assert adapter.template.prefix.startswith("<start_of_turn>user")
    assert adapter.template.default_instruction == "Name the animal"
    theirs = adapter.score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert torch.allclose(theirs, trained_scores["probe"], atol=1e-6, rtol=0)


def test_default_model_and_demo_set_full_finetune(
    tiny_reranker, tmp_path, capsys, monkeypatch, trained_scores
):
    """No --model, no --data: the default model (here the tiny one) on the built-in set."""
    monkeypatch.setattr(rerank_command, "default_model_path", lambda console: str(tiny_reranker))
    out = tmp_path / "out"
    assert run(tiny_argv(None, None, out, "--full-finetune", "--lr", 1e-3, "--max-steps", 2)) == 0
    stdout = capsys.readouterr().out
    assert "built-in demo set (32 questions)" in stdout
    assert "Gemma 3 270M (bundled)" in stdout  # the default model is named, not its path
    summary = json.loads((out / "rerank_summary.json").read_text())
    assert summary["model"] == str(tiny_reranker) and summary["method"] == "full"
    assert (summary["batch_size"], summary["warmup_steps"]) == (4, 2)  # the demo's defaults
    assert summary["loss"].startswith("listwise") and summary["steps"] == 2
    assert set(summary["eval"]["after"]) == {"recall@1", "mrr@10", "ndcg@10"}
    assert list(summary["outputs"]) == ["model"]
    model = reload(out / "model")  # every weight, in the training dtype (fp32)
    assert not hasattr(model.model, "peft_config")
    theirs = model.score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert torch.allclose(theirs, trained_scores["probe"], atol=1e-6, rtol=0)
    untouched = reload(tiny_reranker).score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert (theirs - untouched).abs().max() > 1e-3


def test_load_in_4bit_trains_a_qlora_reranker_whose_adapter_reloads(
    tiny_reranker, tmp_path, trained_scores
):
    pytest.importorskip("bitsandbytes")  # its NF4 layers run on the CPU too
    data = write_jsonl(tmp_path / "train.jsonl", listwise_rows())
    out = tmp_path / "out"
    assert run(tiny_argv(tiny_reranker, data, out, "--load-in-4bit", "--max-steps", 2)) == 0
    assert json.loads((out / "rerank_summary.json").read_text())["method"] == "qlora"
    from fastlm.embeddings import FastReranker

    adapter = FastReranker.from_pretrained(
        str(out / "adapter"), max_seq_length=400, load_in_4bit=True, **CPU
    )
    assert any("4bit" in type(m).__name__ for m in adapter.causal_lm.modules())
    theirs = adapter.score(PROBE_QUERIES, PROBE_DOCS, return_logits=True)
    assert torch.allclose(theirs, trained_scores["probe"], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- resume


def test_resume_continues_from_the_newest_checkpoint(tiny_reranker, tmp_path, capsys):
    """2 steps with a checkpoint each, then --resume to 4 (as fastlm sft and embed): the
    Trainer's global_step goes on from 2, steps 1 and 2 being the first run's (their
    checkpoints are not written again)."""
    data = write_jsonl(tmp_path / "train.jsonl", listwise_rows())
    out = tmp_path / "out"
    argv = tiny_argv(tiny_reranker, data, out, "--save-steps", 1, "--max-steps")
    assert run([*argv, 2]) == 0
    first = json.loads((out / "rerank_summary.json").read_text())
    assert first["steps"] == 2
    states = [out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json" for step in (1, 2)]
    written = [(path.stat().st_mtime_ns, path.read_bytes()) for path in states]
    capsys.readouterr()
    assert run([*argv, 4, "--resume"]) == 0
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in capsys.readouterr().out
    resumed = json.loads((out / "rerank_summary.json").read_text())
    assert resumed["steps"] == 4
    assert resumed["losses"][:2] == first["losses"] and len(resumed["losses"]) == 4
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [(path.stat().st_mtime_ns, path.read_bytes()) for path in states] == written


@pytest.mark.parametrize(
    ("resume", "extra", "message"),
    [
        (None, ["--full-finetune"], "is a LoRA checkpoint; resume with the interrupted run's "
         "flags (its --output-dir has them in rerank_config.json)"),
        (None, ["--lora-r", 8], "has LoRA rank 4, not --lora-r 8"),
        ("EMPTY", [], ": not a checkpoint, and holds no complete checkpoint-N folder"),
        ("MISSING", [], "no such folder"),
    ],
)  # fmt: skip
def test_resume_errors_are_one_line(tiny_reranker, tmp_path, capsys, resume, extra, message):
    data = write_jsonl(tmp_path / "train.jsonl", listwise_rows())
    out = tmp_path / "out"
    if resume is None:
        assert run(tiny_argv(tiny_reranker, data, out, "--max-steps", 1, "--save-steps", 1)) == 0
        resume = out / "checkpoints" / "checkpoint-1"
    else:
        resume = tmp_path / resume.lower()
        if resume.name == "empty":
            resume.mkdir()
    capsys.readouterr()
    assert run([*tiny_argv(tiny_reranker, data, out, "--resume", resume), *extra]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastlm rerank: error: --resume {resume}")
    assert message in lines[0]
