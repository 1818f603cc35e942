"""CPU smoke test of the embedding benchmark (fastlm.benchmarking.embedding_bench, and the
checkout's benchmarks/embedding_bench.py around it), tiny Qwen3 shape.

The systems' children run in this process (imports already paid) on one cached checkpoint; one
end-to-end run goes through the parent and a child process as on the GPU machine. The
variable-length mode (--lengths) runs as a dry run through the parent, every system in-process.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = "tiny-qwen3-embedding"
# LoRA r=16 on 2 layers: q,o 64->64; k,v 64->32; gate,up 64->128; down 128->64.
TINY_LORA_PARAMS = 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)


def _bench():
    return importlib.import_module("fastlm.benchmarking.embedding_bench")


def _script():
    """benchmarks/embedding_bench.py, imported as a module."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("embedding_bench")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    bench = _bench()
    cache = tmp_path_factory.mktemp("embedding-bench-cache")
    return {"cache": cache, **bench.ensure_checkpoint(bench.SHAPES[TINY], cache, "cpu")}


def _spec(checkpoint: dict, system: str) -> dict:
    return {
        "shape": TINY,
        "system": system,
        "path": checkpoint["path"],
        "batch": 4,
        "seq": 12,
        "query_seq": 6,
        "warmup": 1,
        "steps": 2,
        "checkpointing": "true",
    }


def test_shapes_are_the_qwen3_embedding_models():
    bench = _bench()
    from fastlm.benchmarking.shapes import make_config

    expected = {
        "qwen3-embedding-0.6b": (1024, 28, 16, 8, 3072, 151669),
        "qwen3-embedding-4b": (2560, 36, 32, 8, 9728, 151665),
    }
    for name, (hidden, layers, heads, kv, inter, vocab) in expected.items():
        shape = bench.SHAPES[name]
        config = make_config(shape)
        assert config.model_type == "qwen3" and (shape.batch, shape.seq) == (64, 256)
        assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
        assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv)
        assert (config.head_dim, config.intermediate_size, config.vocab_size) == (128, inter, vocab)
    assert bench.SHAPES[TINY].tiny
    table = bench._list_shapes()
    assert "| qwen3-embedding-4b | 2560 | 36 | 32 / 8 | 128 | 9728 | 151665 | 64 | 256 |" in table


def test_checkpoint_is_a_sentence_transformers_directory(checkpoint):
    from fastlm.embeddings.st_format import read_layout

    path = Path(checkpoint["path"])
    layout = read_layout(str(path))
    assert (layout.pooling, layout.normalize) == ("lasttoken", True)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3Model"] and config["dtype"] == "bfloat16"
    assert checkpoint["reused"] is False
    again = _bench().ensure_checkpoint(_bench().SHAPES[TINY], checkpoint["cache"], "cpu")
    assert again["reused"] is True


def test_hf_and_fastlm_run_without_sentence_transformers_and_st_is_skipped(checkpoint, monkeypatch):
    bench = _bench()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    skipped = bench.child_main(_spec(checkpoint, "st"))
    assert skipped["status"] == "skipped"
    assert "import sentence_transformers failed" in skipped["reason"]
    records = {system: bench.child_main(_spec(checkpoint, system)) for system in ("hf", "fastlm")}
    for system, rec in records.items():
        assert rec["status"] == "ok", (system, rec.get("error"), rec.get("traceback"))
        assert rec["trainable_params"] == TINY_LORA_PARAMS
        assert len(rec["losses"]) == 3 and all(math.isfinite(x) for x in rec["losses"])
        assert rec["tokens_per_s"] > 0 and rec["peak_gib"] is None and rec["device"] == "cpu"
        assert rec["versions"]["torch"] and rec["versions"]["peft"]
    # InfoNCE of 4 pairs at temperature 0.05 lies in (0, 2 / 0.05 + ln 4). Same weights, data
    # and LoRA init: the same losses (fp32 on the CPU), step 0 and after two AdamW updates.
    hf, fastlm = records["hf"], records["fastlm"]
    assert 0 < hf["step0_loss"] < 2 / bench.TEMPERATURE + math.log(4)
    assert fastlm["losses"] == pytest.approx(hf["losses"], rel=1e-4, abs=1e-5)
    assert fastlm["versions"]["fastlm_git"] is not None or fastlm["versions"]["fastlm"]


def test_sentence_transformers_system_matches_hf(checkpoint):
    pytest.importorskip("sentence_transformers")
    bench = _bench()
    st = bench.child_main(_spec(checkpoint, "st"))
    assert st["status"] == "ok", (st.get("error"), st.get("traceback"))
    assert st["versions"]["sentence-transformers"]
    assert st["trainable_params"] == TINY_LORA_PARAMS and st["trainable_dtypes"] == ["float32"]
    hf = bench.child_main(_spec(checkpoint, "hf"))
    assert st["losses"] == pytest.approx(hf["losses"], rel=1e-4, abs=1e-5)


def test_versus_st_and_report(tmp_path):
    bench = _bench()
    common = {"shape": "s", "mode": "lora", "status": "ok", "device": "cpu", "batch": 32}
    records = [
        {**common, "system": "hf", "tokens_per_s": 1000.0, "peak_gib": 4.0, "step0_loss": 3.5},
        {**common, "system": "st", "tokens_per_s": 1100.0, "peak_gib": 4.4, "step0_loss": 3.5},
        {**common, "system": "fastlm", "tokens_per_s": 2200.0, "peak_gib": 2.2,
         "step0_loss": 3.502, "pairs_per_s": 250.0, "query_seq": 64, "seq": 256},
    ]  # fmt: skip
    comparison = bench.versus_st(records)
    assert comparison["s"]["speedup"] == pytest.approx(2.0)
    assert comparison["s"]["memory_ratio"] == pytest.approx(0.5)
    assert comparison["s"]["loss_delta"] == pytest.approx(0.002)
    md = bench.write_report(tmp_path, {"date": "d", "runs": [], "records": records})
    assert md.startswith(bench.TITLE) and "fastlm 2.00× the tokens/s of sentence" in md
    assert "- s / fastlm: 250.0 pairs/s (64 / 256 tokens), peak 2.20 GiB" in md
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["fastlm_vs_st"]["s"]["speedup"] == pytest.approx(2.0)


def test_end_to_end_in_a_child_process(checkpoint, tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "out"
    argv = [
        "--shapes", TINY, "--systems", "fastlm", "--warmup", "1", "--steps", "1",
        "--seq", "8", "--batch", "2", "--out", str(out), "--cache", str(checkpoint["cache"]),
        "--child-timeout", "300",
    ]  # fmt: skip
    assert _script().main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.rstrip().splitlines()[-1].startswith(f"| {TINY} | fastlm |")
    payload = json.loads((out / "results.json").read_text())
    assert payload["runs"][0]["command"].startswith("python benchmarks/embedding_bench.py")
    (rec,) = payload["records"]
    assert rec["status"] == "ok", (rec.get("error"), rec.get("log_tail"), rec.get("traceback"))
    assert (rec["batch"], rec["seq"], rec["checkpointing"]) == (2, 8, "true")
    assert rec["tokens_per_s"] == pytest.approx(2 * 2 * 8 / rec["timed_s"])
    assert payload["checkpoints"][TINY]["reused"] is True
    assert (out / "results.md").read_text().startswith(bench.TITLE)
    assert (out / "results.png").stat().st_size > 0


def test_unsloth_is_skipped_when_it_does_not_import(checkpoint, monkeypatch):
    bench = _bench()
    monkeypatch.setitem(sys.modules, "unsloth", None)  # import fails
    rec = bench.child_main(_spec(checkpoint, "unsloth"))
    assert rec["status"] == "skipped" and "import unsloth failed" in rec["reason"]
    assert rec["versions"]["torch"]


def test_full_fine_tuning_trains_every_weight_and_agrees(checkpoint):
    bench = _bench()
    records = {
        system: bench.child_main({**_spec(checkpoint, system), "mode": "full"})
        for system in ("hf", "fastlm")
    }
    n_weights = None
    for system, rec in records.items():
        assert rec["status"] == "ok", (system, rec.get("error"), rec.get("traceback"))
        assert rec["mode"] == "full" and rec["trainable_params"] > 2 * TINY_LORA_PARAMS
        n_weights = n_weights or rec["trainable_params"]
        assert rec["trainable_params"] == n_weights
    assert records["fastlm"]["step0_loss"] == pytest.approx(records["hf"]["step0_loss"], rel=1e-4)


# The data file both length histograms (and packing_bench's) were counted on.
ALPACA_SHA256 = "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318"


def test_pair_histograms_are_counted_on_the_packing_data():
    from fastlm.benchmarking.lengths import load_histogram, sample_lengths, sample_pairs

    bench = _bench()
    query, positive = bench.pair_histograms("alpaca_en_demo")
    example = load_histogram("alpaca_en_demo")  # packing_bench's
    for hist in (query, positive):
        assert hist.n == example.n == 999
        assert hist.source["sha256"] == ALPACA_SHA256 and ALPACA_SHA256 in example.source["data"]
        assert hist.source["tokenizer"].startswith(example.source["tokenizer"].split(", encode")[0])
        assert "eos=True" in hist.source["tokenizer"] and "bos=False" in hist.source["tokenizer"]
        assert hist.stats["min"] >= hist.bins[0][0] and hist.stats["max"] < hist.bins[-1][1]
    assert query.source["fields"].startswith("instruction")
    assert positive.source["fields"] == "output"
    # Queries are short, positives long; each side sampled as packing_bench samples, seeded.
    assert query.stats["median"] < 20 < 100 < positive.stats["median"]
    pairs = sample_pairs(query, positive, 500, seed=3)
    assert [q for q, _ in pairs] == sample_lengths(query, 500, seed=3)
    assert [p for _, p in pairs] == sample_lengths(positive, 500, seed=4)


def test_variable_length_pairs_dry_run(checkpoint, tmp_path, capsys):
    """Same pairs in every system; hf, fastlm padded and fastlm padding-free agree on the step-0
    loss (fp32, CPU); the padding-free system's body embeds no pad token."""
    from fastlm.benchmarking import packing_bench

    bench = _bench()
    out = tmp_path / "varlen"
    argv = ["--shapes", TINY, "--lengths", "alpaca_en_demo", "--length-scale", "0.25",
            "--batch", "4", "--warmup", "1", "--steps", "1", "--in-process",
            "--out", str(out), "--cache", str(checkpoint["cache"])]  # fmt: skip
    assert bench.main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    records = {r["system"]: r for r in payload["records"]}
    assert list(records) == list(bench.VARLEN_SYSTEMS)
    for system, rec in records.items():
        if system in ("st", "unsloth") and rec["status"] == "skipped":  # not installed here
            continue
        assert rec["status"] == "ok", (system, rec.get("error"), rec.get("traceback"))
    ok = {s: r for s, r in records.items() if r["status"] == "ok"}
    assert {"hf", "fastlm-padded", "fastlm-padding-free"} <= set(ok)

    # Step 0: the same pairs and weights, LoRA B = 0: the same loss wherever it is laid out.
    base = ok["hf"]["step0_loss"]
    assert 0 < base < 2 / bench.TEMPERATURE + math.log(4)
    for system, rec in ok.items():
        assert abs(rec["step0_loss"] - base) < 1e-4, (system, rec["step0_loss"], base)

    # The pairs: drawn from the histograms, the same in every record; counts of the timed step.
    spec = {"warmup": 1, "steps": 1, "batch": 4, "lengths": "alpaca_en_demo",
            "seed": bench.SEED, "length_scale": 0.25, "seq": 256}  # fmt: skip
    steps = bench.pair_steps(spec, vocab=bench.SHAPES[TINY].vocab_size)
    (timed,) = steps[1:]
    own = sum(len(q) + len(p) for q, p in timed)
    padded = 4 * max(len(q) for q, _ in timed) + 4 * max(len(p) for _, p in timed)
    assert own < padded  # the lengths vary: padding exists to be saved
    for system, rec in ok.items():
        assert rec["data_sha256"] == packing_bench.data_digest(steps), system
        assert rec["useful_tokens"] == own and rec["padded_tokens"] == padded, system
        assert rec["tokens_per_s"] == pytest.approx(own / rec["timed_s"])
        assert rec["pairs_per_s"] == pytest.approx(4 / rec["timed_s"])
        if rec["layout"] == "padded":
            assert rec["embedding_calls"] == 4, system  # a body call per side a step, two steps
            assert rec["computed_tokens"] == padded and rec["padding_fraction"] > 0, system
        else:  # measured at the body's input embedding: no pad token enters it
            assert rec["embedding_calls"] == 2, system  # both sides in one packed row a step
            assert rec["computed_tokens"] == own and rec["padding_fraction"] == 0, system
        source = rec["lengths_source"]
        assert source["query"]["sha256"] == source["positive"]["sha256"] == ALPACA_SHA256
        assert "llamafactory 0.9.5" in source["query"]["data"]
        assert "Tekken" in source["positive"]["tokenizer"]
    assert ok["fastlm-padding-free"]["batch_path"] == "padding-free"
    assert ok["fastlm-padded"]["batch_path"] == "padded"

    md = (out / "results.md").read_text()
    assert md.startswith(bench.VARLEN_TITLE) and "`alpaca_en_demo_query`, 999 texts" in md
    assert md.count(f"\n| {TINY} | lora |") == len(bench.VARLEN_SYSTEMS)
    assert (out / "results.png").stat().st_size > 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]  # the table comes last
    assert last.startswith(f"| {TINY} | lora | fastlm-padding-free | padding-free |")
    # A fixed-length run cannot be appended to this folder (the records would replace others).
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", TINY, "--out", str(out), "--append"])
