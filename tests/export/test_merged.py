"""save_pretrained_merged: merged checkpoints reload in plain transformers with the same logits.

Every family: fastlm model + LoRA (B ≠ 0) → merged_16bit → AutoModelForCausalLM.from_pretrained →
eval-mode logits equal the in-memory PEFT model's (fp32, atol 1e-5 / rtol 1e-4). Also: the plain
adapter round trip, sharding, the model left unchanged, atomicity, the disk check, DoRA.
What exports do to the folder they write into: test_export_safety.py.
"""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny_models import save_tiny_model, tiny_batch
from transformers import AutoModelForCausalLM

import fastlm.export.merged as merged_module
from fastlm import FastModel
from fastlm.export import ExportPathError, atomic_file, save_pretrained_merged

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
ATOL, RTOL = 1e-5, 1e-4


def _trained(tmp_path, model_type="llama", **peft_kwargs):
    """A fastlm model with non-zero LoRA B (as after training), its tokenizer and source path."""
    path = save_tiny_model(model_type, tmp_path / f"src-{model_type}")
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    peft_kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **peft_kwargs}
    return FastModel.get_peft_model(model, **peft_kwargs), tokenizer, path


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    batch = tiny_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits is not None
    return logits.float()


def _leftovers(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("src-"))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_merged_16bit_reloads_with_the_same_logits(tmp_path, model_type):
    model, tokenizer, _ = _trained(tmp_path, model_type)
    expected = _logits(model)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")

    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert "tokenizer.json" in files and "generation_config.json" in files
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    torch.testing.assert_close(_logits(reloaded), expected, atol=ATOL, rtol=RTOL)
    # The LoRA delta is not negligible, so the comparison above really checks the merge.
    base = AutoModelForCausalLM.from_pretrained(tmp_path / f"src-{model_type}", dtype=torch.float32)
    assert not torch.allclose(_logits(base), expected, atol=1e-3)


def test_tied_embeddings_are_written_once(tmp_path):
    model, tokenizer, _ = _trained(tmp_path, "qwen2")  # tie_word_embeddings=True
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    with safe_open(out / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert not any("lora" in key or "base_layer" in key for key in keys)


def test_lora_method_round_trips_through_plain_peft(tmp_path):
    model, tokenizer, source = _trained(tmp_path)
    expected = _logits(model)
    out = save_pretrained_merged(model, tmp_path / "adapter", tokenizer, save_method="lora")
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_logits(reloaded), expected, atol=ATOL, rtol=RTOL)


def test_small_max_shard_size_writes_several_shards_and_an_index(tmp_path):
    model, tokenizer, _ = _trained(tmp_path, "gemma2")
    expected = _logits(model)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, max_shard_size="60KB")

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    written = 0
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            names = set(handle.keys())  # noqa: SIM118 (safe_open is not a dict)
            assert {k for k, v in index["weight_map"].items() if v == shard.name} == names
            written += sum(handle.get_tensor(name).nbytes for name in names)
    assert index["metadata"]["total_size"] == written
    for shard in shards[:-1]:  # only tensors bigger than the limit may exceed it
        assert shard.stat().st_size < 60_000 + 40_000
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), expected, atol=ATOL, rtol=RTOL)


def test_export_leaves_the_training_model_unchanged(tmp_path):
    model, tokenizer, _ = _trained(tmp_path)
    model.train()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    save_pretrained_merged(model, tmp_path / "merged", tokenizer)

    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    assert layers and not any(layer.merged for layer in layers)


def test_dtype_argument_casts_the_written_weights(tmp_path):
    model, tokenizer, _ = _trained(tmp_path)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16


def test_modules_to_save_writes_the_trained_copy(tmp_path):
    model, tokenizer, _ = _trained(tmp_path, modules_to_save=["lm_head"])  # llama: untied head
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = _logits(model)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), expected, atol=ATOL, rtol=RTOL)


def test_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model, tokenizer, _ = _trained(tmp_path)
    real_write = merged_module._write_shard
    calls = []

    def failing_write(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real_write(tensors, path)

    monkeypatch.setattr(merged_module, "_write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_merged(model, tmp_path / "merged", tokenizer, max_shard_size="60KB")
    assert len(calls) == 2
    assert _leftovers(tmp_path) == []


def test_interrupted_export_keeps_a_previous_export(tmp_path, monkeypatch):
    model, tokenizer, _ = _trained(tmp_path)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    before = sorted(p.name for p in out.iterdir())

    def failing_write(tensors, path):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(merged_module, "_write_shard", failing_write)
    with pytest.raises(RuntimeError, match="disk went away"):
        save_pretrained_merged(model, out, tokenizer)
    assert sorted(p.name for p in out.iterdir()) == before
    assert _leftovers(tmp_path) == ["merged"]


@pytest.mark.parametrize("save_method", ["merged_16bit", "lora"])
def test_full_disk_raises_before_writing(tmp_path, monkeypatch, save_method):
    model, tokenizer, _ = _trained(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        "fastlm.export._atomic.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1024, 1024)
    )
    message = r"Not enough free disk space.*MiB needed.*only 1.00 KiB free"
    with pytest.raises(OSError, match=message):
        save_pretrained_merged(model, tmp_path / "out" / "merged", tokenizer, save_method)
    assert _leftovers(tmp_path) == []


def test_dora_is_refused_by_name(tmp_path):
    model, tokenizer, _ = _trained(tmp_path, use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    assert _leftovers(tmp_path) == []


def test_unknown_methods_are_refused(tmp_path):
    model, tokenizer, _ = _trained(tmp_path)
    with pytest.raises(ValueError, match="save_method"):
        save_pretrained_merged(model, tmp_path / "m", tokenizer, save_method="gguf")
    assert _leftovers(tmp_path) == []


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "model.bin"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"first")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_file_in_the_way_is_refused_before_merging(tmp_path, monkeypatch):
    model, tokenizer, _ = _trained(tmp_path)
    (tmp_path / "merged").write_text("not a folder")
    monkeypatch.setattr(merged_module, "_write_shard", pytest.fail)
    with pytest.raises(ExportPathError, match="not a folder"):
        save_pretrained_merged(model, tmp_path / "merged", tokenizer)
    assert _leftovers(tmp_path) == ["merged"]


def test_model_method_as_unsloth_users_call_it(tmp_path):
    from tiny_models import save_tiny_model, tiny_batch
    from transformers import AutoModelForCausalLM

    from fastlm import FastModel

    path = save_tiny_model("llama", tmp_path / "llama")
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    out = model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.eval()
    batch = tiny_batch()
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-4
        )
