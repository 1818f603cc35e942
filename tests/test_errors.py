"""Bad input gets a clear error that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_batch

from fastlm import FastModel, versions
from fastlm.errors import (
    DamagedCheckpointError,
    FastLMError,
    ModelNotFoundError,
    NonFiniteLossError,
    SequenceTooLongError,
    UnknownTargetModulesError,
    UnsupportedArchitectureError,
    UnsupportedDtypeError,
    UnsupportedKeywordError,
    UnsupportedVersionError,
)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("m") / "llama")


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path
    )
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*Supported: Llama"):
        FastModel.from_pretrained(str(tmp_path), device_map="cpu")


def test_version_outside_tested_range(monkeypatch, llama_path):
    monkeypatch.setattr(versions, "installed_version", lambda p: "9.0.0" if p == "peft" else "2.12")
    with pytest.raises(UnsupportedVersionError, match="peft 9.0.0 is outside"):
        versions.check_versions(("peft",))
    monkeypatch.setattr(
        versions, "installed_version", lambda p: "4.57.0" if p == "transformers" else None
    )
    with pytest.raises(UnsupportedVersionError, match="transformers 4.57.0"):
        FastModel.from_pretrained(llama_path, device_map="cpu")


def test_installed_versions_are_in_range():
    versions.check_versions(("torch", "transformers", "peft", "trl"))


def test_batch_longer_than_max_seq_length(llama_path):
    model, _ = FastModel.from_pretrained(llama_path, max_seq_length=8, device_map="cpu")
    with pytest.raises(SequenceTooLongError, match="11 tokens.*max_seq_length=8"):
        model(**tiny_batch())


def test_a_packed_row_is_checked_per_sequence(llama_path):
    """Padding-free rows hold several sequences: 11 tokens of 4 + 4 + 3 fit max_seq_length=8;
    one sequence of 9 does not."""
    model, _ = FastModel.from_pretrained(llama_path, max_seq_length=8, device_map="cpu")
    ids = tiny_batch(batch=1)["input_ids"]
    model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]))
    with pytest.raises(SequenceTooLongError, match="9 tokens.*max_seq_length=8"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8]]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dtype rule")
def test_half_precision_on_cpu_is_refused(llama_path):
    with pytest.raises(UnsupportedDtypeError, match="float32 on CPU"):
        FastModel.from_pretrained(llama_path, dtype=torch.float16, device_map="cpu")


def test_nan_loss_raises(llama_path):
    """CPU: raised before backward. CUDA: raised at the next forward (no per-step sync)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = FastModel.from_pretrained(llama_path, device_map=device)
    model = FastModel.get_peft_model(model, r=4)
    model.train()
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.fill_(float("nan"))
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    with pytest.raises(NonFiniteLossError, match="(?i)nan"):
        for _ in range(3):
            model(**batch)
            if device == "cuda":
                torch.cuda.synchronize()


@pytest.mark.parametrize(
    "keyword,value", [("fast_inference", True), ("load_in_8bit", True), ("rope_scaling", {})]
)
def test_unimplemented_unsloth_keyword_is_named(llama_path, keyword, value):
    with pytest.raises(UnsupportedKeywordError, match=keyword):
        FastModel.from_pretrained(llama_path, device_map="cpu", **{keyword: value})


def test_unsloth_default_values_are_accepted(llama_path):
    model, tokenizer = FastModel.from_pretrained(
        llama_path, device_map="cpu", fast_inference=False, load_in_8bit=False
    )
    assert tokenizer is not None
    model = FastModel.get_peft_model(model, r=4, loftq_config=None, max_seq_length=2048)
    with pytest.raises(UnsupportedKeywordError, match="loftq_config"):
        FastModel.get_peft_model(model, r=4, loftq_config={"loftq_bits": 4})


def test_load_in_8bit_is_refused_by_name(llama_path):
    with pytest.raises(UnsupportedKeywordError, match="load_in_8bit"):
        FastModel.from_pretrained(llama_path, load_in_8bit=True, device_map="cpu")


def test_fast_language_model_is_the_same_class():
    from fastlm import FastLanguageModel

    assert FastLanguageModel is FastModel


# ------------------------------------------------------------------- what from_pretrained is given


def test_a_missing_folder_is_named_as_such(tmp_path):
    # transformers says "Repo id must be in the form 'repo_name' ..." for these
    for path in (tmp_path / "nowhere", "./no/such/model"):
        with pytest.raises(ModelNotFoundError, match="no such folder$"):
            FastModel.from_pretrained(str(path), device_map="cpu")
    assert issubclass(ModelNotFoundError, ValueError) and issubclass(
        ModelNotFoundError, FastLMError
    )


def test_a_hub_name_not_in_the_cache_says_fastlm_is_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    # transformers says "We couldn't connect to 'https://huggingface.co'" for this
    with pytest.raises(ModelNotFoundError, match="no such folder, and no Hub model.*cache"):
        FastModel.from_pretrained("org/not-cached", device_map="cpu")


def test_a_hub_name_in_the_cache_still_loads_offline(monkeypatch, tmp_path, llama_path):
    """A cached Hub name keeps working without a network, as it did before the path checks."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "models--org--tiny-llama"
    shutil.copytree(llama_path, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model, tokenizer = FastModel.from_pretrained("org/tiny-llama", device_map="cpu")
    assert model.config.model_type == "llama" and tokenizer is not None


def test_a_file_or_a_folder_without_config_json_is_not_a_model(tmp_path, llama_path):
    with pytest.raises(ModelNotFoundError, match="is a file; pass the model's folder"):
        FastModel.from_pretrained(f"{llama_path}/config.json", device_map="cpu")
    (tmp_path / "notes.txt").write_text("not a model")
    # transformers says "Unrecognized model ... Should have a `model_type` key" for this
    with pytest.raises(ModelNotFoundError, match="has no config.json.*its subfolder llama/ is one"):
        FastModel.from_pretrained(str(Path(llama_path).parent), device_map="cpu")
    with pytest.raises(ModelNotFoundError, match="has no config.json, so it is not"):
        FastModel.from_pretrained(str(tmp_path), device_map="cpu")


def test_truncated_weights_name_the_file(tmp_path, llama_path):
    import shutil

    broken = shutil.copytree(llama_path, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # safetensors says "incomplete metadata, file not fully covered", naming no file
    with pytest.raises(DamagedCheckpointError, match=f"{weights} is damaged: truncated"):
        FastModel.from_pretrained(str(broken), device_map="cpu")
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(DamagedCheckpointError, match="shorter than a safetensors header"):
        FastModel.from_pretrained(str(broken), device_map="cpu")


def test_a_missing_shard_is_named(tmp_path):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(
        folder, max_shard_size="100KB"
    )
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(DamagedCheckpointError, match=f"{shards[-1].name} is missing"):
        FastModel.from_pretrained(str(folder), device_map="cpu")


def test_unknown_target_modules_are_refused_with_the_valid_names(llama_path):
    model, _ = FastModel.from_pretrained(llama_path, device_map="cpu")
    # PEFT trains q_proj alone here, silently: the typo in "vv_proj" is ignored
    with pytest.raises(UnknownTargetModulesError, match=r"\['vv_proj'\].*down_proj, gate_proj"):
        FastModel.get_peft_model(model, r=4, target_modules=["q_proj", "vv_proj"])
    with pytest.raises(UnknownTargetModulesError, match="foo"):
        FastModel.get_peft_model(model, r=4, target_modules=["foo"])
    # longer suffixes and the usual names are fine
    peft_model = FastModel.get_peft_model(model, r=4, target_modules=["self_attn.q_proj", "v_proj"])
    adapted = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


def test_embedding_models_refuse_unknown_target_modules_and_missing_folders(tmp_path):
    from fastlm.embeddings import load_embedding_model

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_embedding_model(str(tmp_path / "nowhere"), device_map="cpu")
    folder = save_tiny_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(folder), device_map="cpu")
    with pytest.raises(UnknownTargetModulesError, match="qq_proj"):
        model.get_peft_model(r=4, target_modules=["qq_proj", "k_proj"])


# --------------------------------------------------------------------------- an adapter folder


@pytest.fixture(scope="module")
def adapter_path(llama_path, tmp_path_factory):
    """A LoRA adapter (non-zero B) on the tiny Llama, saved as PEFT saves it, with a tokenizer."""
    model, tokenizer = FastModel.from_pretrained(llama_path, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("adapter") / "lora_model"
    model.save_pretrained(folder)
    tokenizer.chat_template = "{{ 'adapter template' }}"  # set in training: must come back
    tokenizer.save_pretrained(folder)
    return folder


def test_an_adapter_folder_loads_its_base_and_the_adapter_trainable(adapter_path, llama_path):
    """Unsloth's ``from_pretrained("lora_model")``: the base, patched, with the adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastlm import models

    model, tokenizer = FastModel.from_pretrained(str(adapter_path), device_map="cpu")
    assert isinstance(model, PeftModel) and models.is_patched(model.get_base_model())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert tokenizer.chat_template == "{{ 'adapter template' }}"
    assert callable(model.save_pretrained_merged)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32), adapter_path
    )
    batch = tiny_batch()
    model.eval(), reference.eval()
    with torch.no_grad():
        got = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with reference.disable_adapter():
            base = reference(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() > 1e-3  # the adapter is really applied
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_an_adapter_whose_base_is_gone_says_how_to_load_it(adapter_path, tmp_path):
    import json
    import shutil

    moved = shutil.copytree(adapter_path, tmp_path / "lora_model")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "llama")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="LoRA adapter for .*gone/llama.*not here") as info:
        FastModel.from_pretrained(str(moved), device_map="cpu")
    assert f"peft.PeftModel.from_pretrained(model, '{moved}', is_trainable=True)" in str(info.value)
    with pytest.raises(ValueError, match="merge it first"):
        FastModel.from_pretrained(str(adapter_path), device_map="cpu", full_finetuning=True)


def test_an_adapter_holding_nan_is_named_at_load(adapter_path, tmp_path):
    """An adapter saved from a diverged run (by another tool) is refused at load, named."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fastlm.errors import NonFiniteWeightsError

    moved = shutil.copytree(adapter_path, tmp_path / "lora_model")
    weights = load_file(moved / "adapter_model.safetensors")
    name = next(n for n in sorted(weights) if "lora_B" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, moved / "adapter_model.safetensors")
    with pytest.raises(NonFiniteWeightsError, match="lora_B") as info:
        FastModel.from_pretrained(str(moved), device_map="cpu")
    assert str(moved) in str(info.value)
    model, _ = FastModel.from_pretrained(str(moved), device_map="cpu", check_finite_weights=False)
    assert any(torch.isnan(p).any() for n, p in model.named_parameters() if "lora_B" in n)


def test_max_seq_length_past_the_trained_positions_is_one_warning(llama_path, caplog):
    from types import SimpleNamespace

    from fastlm.loading.pipeline import trained_positions as _trained_positions

    with caplog.at_level("WARNING", logger="fastlm"):
        FastModel.from_pretrained(llama_path, max_seq_length=100_000, device_map="cpu")
        FastModel.from_pretrained(llama_path, device_map="cpu")  # the default: no warning
    warnings = [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]
    assert len(warnings) == 1 and "100000 is longer than the 256 positions" in warnings[0]
    # Qwen2.5's long-context recipe: 32768 positions and YaRN x4 in the config -> 131072
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert _trained_positions(SimpleNamespace(max_position_embeddings=32768)) == 32768
    qwen = SimpleNamespace(max_position_embeddings=32768, rope_scaling=yarn)
    assert _trained_positions(qwen) == 131072
    # llama3 scaling: max_position_embeddings is already the extended length
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    llama = SimpleNamespace(max_position_embeddings=131072, rope_parameters=llama3)
    assert _trained_positions(llama) == 131072
