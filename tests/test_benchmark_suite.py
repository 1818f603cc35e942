"""CPU dry run of the benchmark suite (fastlm.benchmarking.suite: every row of issue 15's table)
and of the SFTTrainer benchmark it runs, on tiny shapes; no timing is asserted.

The whole suite runs in this process (--in-process: the imports are paid once); one SFTTrainer
child runs as its own process, as on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _suite():
    from fastlm.benchmarking import suite

    return suite


def test_rows_are_the_issue_table_and_parse():
    suite = _suite()
    rows = suite.SUITES["issue15"]
    got = [(r.id, r.loop, r.shape, r.mode) for r in rows]
    assert got == [
        (1, "train", "llama-3.1-8b", "lora"),
        (2, "train", "llama-3.1-8b", "qlora"),
        (3, "train", "qwen3-4b", "qlora"),
        (4, "train", "qwen3-4b", "lora"),
        (5, "train", "llama-3.2-1b", "qlora"),
        (6, "train", "llama-3.2-1b", "lora"),
        (7, "embed", "qwen3-embedding-0.6b", "lora"),
        (8, "embed", "qwen3-embedding-0.6b", "full"),
        (9, "sft", "llama-3.2-1b", "lora"),
    ]
    assert all({"hf", "unsloth", "fastlm"} <= set(r.systems) for r in rows)
    assert [r.id for r in suite.parse_rows("1-3,7", rows)] == [1, 2, 3, 7]
    assert len(suite.parse_rows(None, rows)) == 9
    with pytest.raises(SystemExit, match="unknown rows"):
        suite.parse_rows("10", rows)
    # The shapes: the issue's batches at seq 2048; the embedding loop's 64 pairs of 64 / 256.
    batches = {r.id: (suite._shape_of(r, False).batch, suite._shape_of(r, False).seq) for r in rows}
    assert batches[1] == (2, 2048) and batches[3] == (2, 2048) and batches[9] == (4, 2048)
    assert batches[7] == (64, 256) and suite.QUERY_SEQ == 64


def test_versus_unsloth_and_table():
    suite = _suite()
    ok = {"status": "ok", "loop": "train", "step0_loss": 11.76}
    records = [
        {**ok, "row": 1, "system": "hf", "tokens_per_s": 6948.0, "peak_gib": 23.4},
        {**ok, "row": 1, "system": "unsloth", "tokens_per_s": 10492.0, "peak_gib": 16.68},
        {**ok, "row": 1, "system": "fastlm", "tokens_per_s": 13639.6, "peak_gib": 16.0,
         "step0_loss": 11.765},
        {"row": 1, "system": "liger", "status": "error", "error": "OOM"},
    ]  # fmt: skip
    vs = suite.versus_unsloth(records[2], records[1])
    assert vs["speed"] == pytest.approx(1.3) and vs["memory"] == pytest.approx(16.0 / 16.68)
    rows = [{"id": 1, "label": "Llama-3.1-8B LoRA, B2 S2048", "loop": "train", "shape": None}]
    text = suite.table(rows, records)
    assert "| 1 | Llama-3.1-8B LoRA, B2 S2048 | tok/s | 6,948 · 23.40 | error | 10,492 · 16.68 " \
        "| 13,640 · 16.00 | 1.30×, 0.96× | 0.005 |" in text  # fmt: skip


def test_dry_run_writes_one_record_per_row_and_system(tmp_path, capsys):
    suite = _suite()
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--dry-run", "--in-process", "--out", str(out), "--cache", str(cache)]
    assert suite.main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    records = payload["records"]
    expected = {(r.id, s) for r in suite.SUITES["issue15"] for s in r.systems}
    assert {(r["row"], r["system"]) for r in records} == expected
    assert len(records) == len(expected)
    cuda = importlib.util.find_spec("torch") and __import__("torch").cuda.is_available()
    for rec in records:
        key = (rec["row"], rec["system"], rec.get("reason"), rec.get("error"))
        assert rec["status"] in ("ok", "skipped"), key
        if rec["system"] in ("hf", "fastlm") and (rec["mode"] != "qlora" or cuda):
            assert rec["status"] == "ok", (key, rec.get("traceback"))
            assert rec["step0_loss"] > 0 and len(rec["losses"]) == 2  # 1 warm-up + 1 timed
        if rec["system"] == "unsloth" and importlib.util.find_spec("unsloth") is None:
            assert rec["status"] == "skipped" and rec["reason"]
    by = {(r["row"], r["system"]): r for r in records}
    if importlib.util.find_spec("unsloth") is None:
        assert by[(7, "unsloth")]["reason"] == "unsloth is not installed"
    for row in (1, 6, 7, 8, 9):  # same weights, data and LoRA init: the same step-0 loss
        assert by[(row, "fastlm")]["step0_loss"] == pytest.approx(
            by[(row, "hf")]["step0_loss"], rel=1e-3
        )
    assert "pairs_per_s" in by[(7, "fastlm")] and by[(8, "fastlm")]["mode"] == "full"
    assert by[(8, "fastlm")]["trainable_params"] > by[(7, "fastlm")]["trainable_params"]
    sft = by[(9, "hf")]
    assert sft["loop"] == "sft" and sft["sft_config"]["weight_decay"] == "0.01"
    if not cuda:
        assert "adamw_8bit -> adamw_torch" in sft["substitutions"]["optim"]
    md = (out / "results.md").read_text()
    assert (
        "| # | shape / mode | unit | HF + PEFT | Liger | Unsloth | fastlm | fastlm ÷ Unsloth" in md
    )
    assert md.count("\n| ") == 2 + 9  # header, rule, one line per row
    assert (out / "results.png").stat().st_size > 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| 9 | TRL SFTTrainer")

    # A later part into the same folder keeps the records; --resume skips what is measured.
    assert suite.main([*argv, "--rows", "9", "--systems", "hf", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert len(again["records"]) == len(expected) and len(again["runs"]) == 2
    assert "already measured" in capsys.readouterr().out


def test_sft_row_in_a_child_process(tmp_path):
    suite = _suite()
    out = tmp_path / "out"
    argv = ["--dry-run", "--rows", "9", "--systems", "fastlm,unsloth", "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--child-timeout", "300"]  # fmt: skip
    assert suite.main(argv) == 0
    records = {r["system"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    rec = records["fastlm"]
    assert rec["status"] == "ok", (rec.get("error"), rec.get("log_tail"), rec.get("traceback"))
    assert rec["tokens_per_s"] > 0 and rec["versions"]["trl"]
    assert (out / rec["log"]).is_file()
    assert records["unsloth"]["status"] in ("skipped", "ok", "error")


def test_bench_command_runs_the_suite_and_the_loops():
    from fastlm import cli
    from fastlm.commands.bench import SUITE_MODULE, command_line

    args = cli.parse_args(["bench", "--suite", "issue15", "--rows", "1-3", "--out", "d"])
    assert command_line(args)[1:] == ["-m", SUITE_MODULE, "--suite", "issue15", "--rows", "1-3",
                                      "--out", "d"]  # fmt: skip
    args = cli.parse_args(["bench", "--loop", "sft", "--shapes", "llama-3.2-1b"])
    assert command_line(args)[1:] == ["-m", "fastlm.benchmarking.sft_bench", "--shapes",
                                      "llama-3.2-1b"]  # fmt: skip


def test_issue17_dry_run_trains_both_new_families(tmp_path):
    """The issue-17 rows on their tiny twins (CPU): HF + PEFT and fastlm train each LoRA row from
    the same step-0 loss; QLoRA rows are skipped without CUDA, Unsloth without its package."""
    suite = _suite()
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--suite", "issue17", "--dry-run", "--in-process", "--out", str(out),
            "--cache", str(cache)]  # fmt: skip
    assert suite.main(argv) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    by = {(r["row"], r["system"]): r for r in records}
    assert set(by) == {(r.id, s) for r in suite.SUITES["issue17"] for s in r.systems}
    for row in (1, 3):  # the LoRA rows
        for system in ("hf", "fastlm"):
            assert by[(row, system)]["status"] == "ok", by[(row, system)].get("traceback")
        assert by[(row, "fastlm")]["step0_loss"] == pytest.approx(
            by[(row, "hf")]["step0_loss"], rel=1e-3
        )


def test_hf_runs_the_pytorch_delta_rule_where_fla_refuses_the_gpu(monkeypatch):
    """On a GPU fla refuses (Hopper with Triton < 3.7.1), transformers would call fla's delta
    rule and stop: the HF system hides fla from transformers, so its PyTorch functions run, and
    the record and the report say so. Elsewhere nothing changes."""
    import sys

    from fastlm.benchmarking import systems
    from fastlm.benchmarking.shapes import get_shape
    from fastlm.models import linear_attention

    refusal = "fla's delta rule cannot train here: Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs"
    monkeypatch.setattr(linear_attention, "has_fla", lambda: True)
    monkeypatch.setattr(linear_attention, "fla_refusal", lambda device: refusal)
    monkeypatch.delitem(sys.modules, "fla", raising=False)  # restored afterwards

    def ctx(shape: str, cuda: bool) -> systems.Ctx:
        return systems.Ctx(get_shape(shape), "unused", "lora", 64, cuda, None)

    plain = ctx("tiny-qwen3.5", cuda=False)
    systems._hf_linear_attention(plain)
    dense = ctx("tiny-llama", cuda=True)
    systems._hf_linear_attention(dense)
    assert plain.notes == dense.notes == []
    hybrid = ctx("tiny-qwen3.5", cuda=True)
    systems._hf_linear_attention(hybrid)
    assert hybrid.notes == [f"transformers' PyTorch delta rule ({refusal})"]
    assert sys.modules["fla"] is None  # transformers' kernel decorator's import now fails
    with pytest.raises(ImportError):
        importlib.import_module("fla")

    suite = _suite()
    record = {"row": 1, "shape": "qwen3.5-9b", "system": "hf", "status": "ok", "loop": "train",
              "tokens_per_s": 1.0, "peak_gib": 1.0, "notes": hybrid.notes}  # fmt: skip
    payload = {"suite": "issue17", "records": [record], "rows": [], "runs": []}
    assert f"- row 1 (qwen3.5-9b) / hf: {hybrid.notes[0]}" in suite.markdown(payload)
