"""Bad input gets a clear error that says what to do."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_model, tiny_batch

from fastlm import FastModel, versions
from fastlm.errors import (
    NonFiniteLossError,
    SequenceTooLongError,
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
