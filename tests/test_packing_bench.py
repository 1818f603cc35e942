"""The packing benchmark (fastlm.benchmarking.packing_bench) on the CPU: the length sampler
against its histogram, useful tokens counted without padding, and the dry run's table and JSON
with a record for every (mode, system). No timing is asserted.

The dry run runs its systems in this process (--in-process: the imports are paid once).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from fastlm.benchmarking import packing_bench
from fastlm.benchmarking.lengths import load_histogram, sample_lengths


def test_histogram_is_the_recorded_alpaca_set():
    hist = load_histogram("alpaca_en_demo")
    assert hist.n == 999 and all(hi - lo == 16 for lo, hi, _ in hist.bins)
    assert hist.stats["min"] >= hist.bins[0][0] and hist.stats["max"] < hist.bins[-1][1]
    assert "llamafactory 0.9.5" in hist.source["data"] and "Tekken" in hist.source["tokenizer"]
    with pytest.raises(SystemExit, match="known: alpaca_en_demo"):
        load_histogram("no-such-set")


def test_sampler_reproduces_the_histogram():
    hist = load_histogram()
    n = 200_000
    drawn = sample_lengths(hist, n, seed=7)
    assert drawn == sample_lengths(hist, n, seed=7)  # seeded
    assert drawn[:50] != sample_lengths(hist, 50, seed=8)
    counts = Counter(length // 16 for length in drawn)
    for (lo, _, _), expected in zip(hist.bins, hist.frequencies()):
        got = counts.pop(lo // 16, 0) / n
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(got - expected) < 5 * sigma + 1e-9, (lo, got, expected)
    assert not counts  # nothing outside the histogram's bins
    mean = sum(drawn) / n  # uniform within a bin: the mean of the bin midpoints
    midpoints = sum(c * (lo + hi - 1) / 2 for lo, hi, c in hist.bins) / hist.n
    assert mean == pytest.approx(midpoints, rel=5e-3)
    assert mean == pytest.approx(hist.stats["mean"], rel=0.02)
    # The dry run's shrunk lengths, and the cap at the shape's sequence length.
    small = sample_lengths(hist, 1000, seed=7, scale=0.125, max_len=64)
    assert min(small) >= 2 and max(small) == 64


def test_useful_tokens_are_the_examples_own_tokens():
    examples = [[5] * 3, [6] * 7, [7] * 2, [8] * 5]
    own = 3 + 7 + 2 + 5
    padded = packing_bench.padded_batch(examples, pad_id=0)
    assert padded["input_ids"].shape == (4, 7)  # padded to the batch's longest
    assert packing_bench.useful_tokens(padded) == own  # not 4 x 7 = 28
    assert int((padded["labels"] != -100).sum()) == own
    flat = packing_bench.padding_free_batch(examples)
    assert flat["input_ids"].shape == (1, own) and packing_bench.useful_tokens(flat) == own
    assert flat["position_ids"][0].tolist() == [*range(3), *range(7), *range(2), *range(5)]
    # Both layouts predict each example's own next tokens, none across examples: after the
    # shift, the same number of labels (own - one per example).
    shifted = [int((b["labels"][:, 1:] != -100).sum()) for b in (padded, flat)]
    assert shifted == [own - 4, own - 4]
    packed = packing_bench.unsloth_batch(examples)
    assert packed["packed_seq_lengths"].tolist() == [3, 7, 2, 5]
    assert packing_bench.useful_tokens(packed) == own


def test_dry_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--dry-run", "--in-process", "--modes", "lora,qlora", "--out", str(out),
            "--cache", str(tmp_path / "cache")]  # fmt: skip
    assert packing_bench.main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    records = {(r["mode"], r["system"]): r for r in payload["records"]}
    assert set(records) == {(m, s) for m in ("lora", "qlora") for s in packing_bench.SYSTEMS}
    for (mode, system), rec in records.items():
        if system == "unsloth-packing" and rec["status"] != "ok":  # not installed here
            assert rec["status"] == "skipped" and "unsloth" in rec["reason"]
        elif mode == "qlora":  # no CUDA here: bitsandbytes NF4 cannot run
            assert rec["status"] == "skipped" and "QLoRA needs CUDA" in rec["reason"]
        else:
            assert rec["status"] == "ok", (system, rec.get("error"), rec.get("traceback"))

    # The same examples in every system; useful tokens are theirs, never the padding.
    spec = {"warmup": 1, "steps": 1, "examples": 4, "lengths": "alpaca_en_demo",
            "seed": packing_bench.SEED, "length_scale": 0.125, "seq": 128}  # fmt: skip
    steps = packing_bench.step_examples(spec, vocab=128)
    timed_own = sum(len(e) for e in steps[1])
    ok = [r for r in payload["records"] if r["status"] == "ok"]
    assert {r["data_sha256"] for r in ok} == {packing_bench.data_digest(steps)}
    for rec in ok:
        assert rec["useful_tokens"] == timed_own
        assert rec["tokens_per_s"] == pytest.approx(timed_own / rec["timed_s"])
        if rec["layout"] == "padded":
            assert rec["computed_tokens"] == 4 * max(len(e) for e in steps[1]) > timed_own
            assert rec["padding_fraction"] > 0
        else:
            assert rec["computed_tokens"] == timed_own and rec["padding_fraction"] == 0
    base = records[("lora", "hf-padded")]["step0_loss"]
    for rec in ok:  # same weights, examples and LoRA init: the same step-0 loss
        assert rec["step0_loss"] == pytest.approx(base, rel=1e-4), rec["system"]

    md = (out / "results.md").read_text()
    assert "| shape | mode | system | useful tok/s |" in md and "llamafactory 0.9.5" in md
    assert md.count("\n| tiny-llama |") == 10
    assert (out / "results.png").stat().st_size > 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]  # the table comes last
    assert last.startswith("| tiny-llama | qlora | fastlm-padding-free | skipped")


def test_fastlm_bench_runs_the_packing_loop():
    from fastlm.cli import build_parser
    from fastlm.commands.bench import command_line

    args = build_parser().parse_args(["bench", "--loop", "packing", "--dry-run", "--mode", "lora"])
    command = command_line(args)
    assert command[1:3] == ["-m", packing_bench.MODULE]
    assert "--dry-run" in command and command[command.index("--mode") + 1] == "lora"
