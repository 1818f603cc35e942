"""CPU smoke test of the training benchmark harness (fastlm.benchmarking, run here through the
checkout's benchmarks/train_bench.py), tiny shapes.

The parent part (checkpoint, report) runs in this process; each system runs in a child process
as on the GPU machine (about 10 s of imports each, so at most two children).
"""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """Import a script of benchmarks/ as a module."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _fastlm_available() -> bool:
    try:
        import fastlm

        return hasattr(fastlm, "FastModel")
    except Exception:
        return False


def test_shape_table_builds_configs():
    from fastlm.benchmarking import shapes

    for name in ("llama-3.2-1b", "llama-3.1-8b", "qwen3-4b", "tiny-llama", "tiny-gemma3"):
        assert name in shapes.SHAPES
    for shape in shapes.SHAPES.values():
        config = shapes.make_config(shape)
        assert config.model_type == shape.model_type
        assert config.vocab_size == shape.vocab_size
        assert config.hidden_size == shape.config["hidden_size"]
    big = shapes.make_config(shapes.SHAPES["llama-3.2-1b"])
    rope = big.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (32.0, 1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192
    assert big.tie_word_embeddings and big.num_key_value_heads == 8
    assert shapes.make_config(shapes.SHAPES["llama-3.1-8b"]).rope_parameters["factor"] == 8.0
    assert not shapes.make_config(shapes.SHAPES["llama-3.1-8b"]).tie_word_embeddings
    qwen35 = shapes.make_config(shapes.SHAPES["qwen3.5-9b"])
    assert qwen35.layer_types.count("full_attention") == 8 and qwen35.num_hidden_layers == 32
    gemma4 = shapes.make_config(shapes.SHAPES["gemma4-4b"])
    assert gemma4.hidden_size_per_layer_input == 256 and gemma4.sliding_window == 512
    qwen = shapes.make_config(shapes.SHAPES["qwen3-4b"])
    assert qwen.head_dim == 128 and qwen.tie_word_embeddings
    assert qwen.rope_parameters["rope_theta"] == 1e6
    # A changed config must not reuse a cached checkpoint.
    a = shapes.SHAPES["tiny-llama"]
    b = shapes.Shape(a.name, a.model_type, {**a.config, "hidden_size": 72}, a.batch)
    assert a.fingerprint() != b.fingerprint()


def test_report_ratios_against_hf(tmp_path):
    from fastlm.benchmarking import report

    common = {"shape": "s", "mode": "lora", "status": "ok", "device": "cpu"}
    records = [
        {**common, "system": "hf", "tokens_per_s": 1000.0, "ms_per_step": 8.0, "peak_gib": 4.0,
         "step0_loss": 11.75, "last_loss": 11.0},
        {**common, "system": "fastlm", "tokens_per_s": 2500.0, "ms_per_step": 3.2,
         "peak_gib": 1.0, "step0_loss": 11.7525, "last_loss": 11.0},
        {"shape": "s", "mode": "lora", "system": "liger", "status": "skipped", "reason": "absent"},
    ]  # fmt: skip
    d = report.derived(records[1], records[0])
    assert d["speedup"] == pytest.approx(2.5)
    assert d["memory_ratio"] == pytest.approx(0.25)
    assert d["loss_delta"] == pytest.approx(0.0025)
    table = report.markdown_table(records)
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count(" | ") == 9 for line in lines)  # 10 columns
    assert "| s | fastlm | 2,500 | 2.50× | 3.2 | 1.00 | 0.25× | 11.7525 | 0.0025 |" in table
    assert "| s | liger | skipped |" in table
    md = report.write_outputs(tmp_path, {"date": "d", "runs": [], "records": records})
    assert "absent" in md
    assert json.loads((tmp_path / "results.json").read_text())["records"][1]["vs_hf"]["speedup"]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_harness_end_to_end_on_cpu(tmp_path, capsys):
    bench = _load("train_bench")
    systems = ["hf"] + (["fastlm"] if _fastlm_available() else [])
    out = tmp_path / "out"
    argv = [
        "--shapes", "tiny-llama", "--systems", ",".join(systems), "--warmup", "1",
        "--steps", "2", "--seq", "16", "--batch", "2", "--out", str(out),
        "--cache", str(tmp_path / "cache"), "--child-timeout", "300",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.rstrip().splitlines()[-1].startswith("| tiny-llama |")  # the table comes last

    payload = json.loads((out / "results.json").read_text())
    assert payload["runs"][0]["command"].startswith("python benchmarks/train_bench.py --shapes")
    records = {r["system"]: r for r in payload["records"]}
    assert set(records) == set(systems)
    for system, rec in records.items():
        assert rec["status"] == "ok", (system, rec.get("error"), rec.get("traceback"))
        assert math.isfinite(rec["step0_loss"])
        assert abs(rec["step0_loss"] - math.log(128)) < 0.5  # random init: about ln(vocab)
        assert rec["tokens_per_s"] > 0 and rec["ms_per_step"] > 0
        assert len(rec["losses"]) == 3
        assert rec["optimizer"] == ("AdamW (foreach)" if torch.cuda.is_available()
                                    else "AdamW (for-loop)")  # fmt: skip
        # LoRA r=16 on 2 layers: q,o 64->64; k,v 64->32; gate,up 64->128; down 128->64.
        assert rec["trainable_params"] == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)
        expected_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        assert rec["device"] == expected_device and rec["versions"]["torch"]
    if "fastlm" in records:  # same weights, data, LoRA init: same losses
        assert records["fastlm"]["step0_loss"] == pytest.approx(records["hf"]["step0_loss"])
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 0
    assert "| tiny-llama | hf |" in (out / "results.md").read_text()

    # The cached checkpoint carries a tokenizer whose pad token is not EOS (Unsloth needs that).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "cache" / "tiny-llama"))
    assert len(tok) == 128 and tok.pad_token_id not in (None, tok.eos_token_id)


def test_the_loop_runs_and_records_the_fused_adamw_when_asked(monkeypatch):
    """``FASTLM_BENCH_OPTIMIZER=fused`` gives every system the fused AdamW (the HF Trainer's
    default); an unknown value stops with one line naming the choices."""
    from fastlm.benchmarking import timing

    model = torch.nn.Linear(4, 2)
    seen = []
    original = torch.optim.AdamW

    def recording(*args, **kwargs):
        seen.append(kwargs.get("fused", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    monkeypatch.setenv(timing.OPTIMIZER_ENV, "fused")
    rec = timing.timed_training(model, lambda: model(torch.ones(3, 4)).sum(), warmup=0, steps=1)
    assert rec["optimizer"] == "AdamW (fused)" and seen == [True]
    monkeypatch.setenv(timing.OPTIMIZER_ENV, "adam8")
    with pytest.raises(SystemExit, match="use one of foreach, fused"):
        timing.timed_training(model, lambda: model(torch.ones(3, 4)).sum(), warmup=0, steps=1)


def test_step_flops_counts_the_shape_s_weights(tmp_path):
    """Llama-3.1-8B: the decoder Linears a token passes are 32 x (H(H + 2 KV) + H·H + 3 H·I)
    weights; a LoRA step with recompute is three decoder passes plus head, attention and LoRA;
    rates implied by a results.json follow tok/s."""
    step_flops = _load("step_flops")
    H, inter, KV, L, V = 4096, 14336, 1024, 32, 128256
    decoder = L * (H * (H + 2 * KV) + H * H + 3 * H * inter)
    shape = step_flops.get_shape("llama-3.1-8b")
    tokens = shape.batch * shape.seq
    flops = step_flops.step_flops(shape, "lora", rank=16, recompute=True)
    parts = flops["parts"]
    assert parts["decoder forward"] == parts["decoder recompute"] == 2 * tokens * decoder
    assert parts["decoder backward"] == parts["decoder forward"]  # frozen: dX only
    assert parts["head forward + backward"] == 4 * tokens * H * V
    full = step_flops.step_flops(shape, "full", rank=16, recompute=False)
    assert full["parts"]["decoder backward"] == 2 * full["parts"]["decoder forward"]
    assert full["parts"]["decoder recompute"] == 0 == full["parts"]["LoRA products"]
    results = tmp_path / "results.json"
    record = {"shape": "llama-3.1-8b", "mode": "lora", "status": "ok", "tokens_per_s": 1000.0}
    results.write_text(json.dumps({"records": [{**record, "system": "unsloth"}]}))
    assert step_flops.measured_rates(results, "llama-3.1-8b", "lora") == {"unsloth": 1000.0}
    assert step_flops.main(["--shape", "llama-3.1-8b", "--results", str(results)]) == 0


def test_step_flops_counts_attention_layer_by_layer():
    """Softmax attention only where a layer has it, at its own head_dim and window: Qwen3.5-9B's
    8 full-attention layers of 32 (the other 24 are linear attention), and Gemma-4 4B's sliding
    layers over their window's pairs, its full ones over the whole causal triangle."""
    step_flops = _load("step_flops")
    qwen = step_flops.get_shape("qwen3.5-9b")
    S, B = qwen.seq, qwen.batch
    triangle = S * (S + 1) // 2
    per_layer = 4 * B * triangle * 16 * 256  # 16 query heads of 256 (q_proj also yields a gate)
    assert step_flops._attention_forward(step_flops._meta_model(qwen)[0], B, S) == 8 * per_layer
    assert step_flops._causal_pairs(10, None) == step_flops._causal_pairs(10, 10) == 55
    assert step_flops._causal_pairs(10, 4) == 10 + 6 * 4  # 1+2+3+4, then 4 per position
    gemma = step_flops.get_shape("gemma4-4b")
    model, config = step_flops._meta_model(gemma)
    text = config.get_text_config()
    window = step_flops._causal_pairs(gemma.seq, text.sliding_window)
    expected = sum(
        4 * gemma.batch * (window if kind == "sliding_attention" else triangle) * heads * dim
        for kind, heads, dim in (
            (layer.self_attn.layer_type, text.num_attention_heads, layer.self_attn.head_dim)
            for layer in model.model.layers
        )
    )
    assert text.sliding_window < gemma.seq and "full_attention" in text.layer_types
    assert step_flops._attention_forward(model, gemma.batch, gemma.seq) == expected
