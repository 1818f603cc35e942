"""EmbeddingGemma 2 text bodies: fastlm-patched vs unpatched transformers + PEFT.

The tiny body (tests/tiny_models.py) has sliding and full layers (their own head_dim and kv heads,
a symmetric window shorter than the texts), q/k norms and the weightless v norm, per-layer inputs
and the projection to embedding_dim. Same weights and LoRA (B ≠ 0) on all seven projections, a
padded batch of different lengths, fp32: pooled embeddings within atol 1e-5, InfoNCE loss and every
LoRA gradient within 1e-4 relative (test_patched_body.py's check), plain, checkpointed and with
offloaded checkpointing.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers.models.embedding_gemma2", reason="no EmbeddingGemma 2")

from embedding_helpers import CPU, TEXTS, save_tiny_embedding_model  # noqa: E402
from test_patched_body import ROWS, _assert_same_embeddings_loss_and_grads  # noqa: E402
from test_patched_body import _pair as _patched_body_pair  # noqa: E402
from tiny_models import on_device  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.embeddings import EmbeddingCollator, load_embedding_model  # noqa: E402
from fastlm.errors import UnsupportedArchitectureError  # noqa: E402
from fastlm.models import SPECS, fused_report, is_patched, spec_for  # noqa: E402

KIND = "embedding_gemma2"
LAYERS = 4
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The linears that run transformers' code: the model's per-layer-input projection, each layer's
# per-layer-input gate and projection, the projection to embedding_dim.
TRANSFORMERS_LINEARS = 1 + 2 * LAYERS + 1


def _pair(tmp_path, checkpointing, device):
    """test_patched_body's pair on the EmbeddingGemma 2 body (some linears are transformers')."""
    return _patched_body_pair(tmp_path, KIND, checkpointing, device, all_fused=False)


def _split_report(model):
    fused = [row for row in fused_report(model.backbone) if row["fused"]]
    unfused = [row for row in fused_report(model.backbone) if not row["fused"]]
    return fused, unfused


@pytest.mark.parametrize(
    "checkpointing", [False, True, "fastlm"], ids=["plain", "checkpointed", "offloaded"]
)
def test_embeddings_and_lora_gradients_match_hf(tmp_path, checkpointing, device):
    reference, fast = _pair(tmp_path, checkpointing, device)
    fused, unfused = _split_report(fast)
    assert len(fused) == LAYERS * len(PROJECTIONS) and all(row["lora"] for row in fused)
    assert len(unfused) == TRANSFORMERS_LINEARS
    layers = [m for m in fast.modules() if type(m).__name__ == "EmbeddingGemma2EncoderLayer"]
    assert all(layer.gradient_checkpointing == bool(checkpointing) for layer in layers)

    batch = EmbeddingCollator(fast, prompts={})(ROWS)
    batch = on_device(batch, device)
    lengths = batch["response"]["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # padded, rows of different lengths
    assert lengths.max() > 2 * fast.config.sliding_window + 1  # the window cuts the long rows
    _assert_same_embeddings_loss_and_grads(reference, fast, batch)


def test_fused_report_names_what_runs_transformers_code(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fastlm"):
        _, fast = _pair(tmp_path, checkpointing=False, device="cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # the patched model: one line per reason, not one per layer
    assert "layers.0.ple_block.per_layer_input_gate and 7 more run unfused" in warnings[-3]
    _, unfused = _split_report(fast)
    names = [row["module"].split("model.", 2)[-1] for row in unfused]
    assert names == [
        f"layers.{i}.ple_block.{linear}"
        for i in range(LAYERS)
        for linear in ("per_layer_input_gate", "per_layer_projection")
    ] + ["ple.per_layer_model_projection", "embedding_projection"]  # fmt: skip
    assert all(not row["lora"] and "no fused path" in row["reason"] for row in unfused)
    assert "per-layer" in unfused[0]["reason"] and "embedding_dim" in unfused[-1]["reason"]
    # A LoRA put on one of them by the user is reported too (PEFT's forward runs it).
    model, _ = load_embedding_model(str(tmp_path / KIND), max_seq_length=120, **CPU)
    model.get_peft_model(r=2, target_modules=["q_proj", "embedding_projection"])
    rows = {row["module"]: row for row in fused_report(model.backbone)}
    assert rows["base_model.model.embedding_projection"]["lora"]
    assert not rows["base_model.model.embedding_projection"]["fused"]


def test_sentence_transformers_folder_pooling_prompts_and_width(tmp_path):
    """Mean pooling and the prompts come from the folder; the vectors are embedding_dim wide
    (the model's projection is part of them), as Sentence-Transformers computes them, before and
    after a LoRA merged into a saved folder."""
    path = save_tiny_embedding_model(KIND, tmp_path / KIND)
    model, _ = load_embedding_model(str(path), **CPU)
    assert is_patched(model.backbone)
    assert model.pooling == "mean" and model.max_seq_length == 120
    assert model.query_prompt() == "query: " and model.document_prompt() == "document: "
    assert model.hidden_size == model.embedding_dim == model.config.embedding_dim == 50
    vectors = model.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 50)
    st = pytest.importorskip("sentence_transformers")
    expected = st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(vectors, expected, atol=1e-5, rtol=0), (vectors - expected).abs().max()
    # A LoRA-tuned model saves (merged) as a folder Sentence-Transformers runs the same way.
    model.get_peft_model(r=4, lora_alpha=8, init_lora_weights=False)
    tuned = model.encode(TEXTS)
    assert (tuned - vectors).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "merged")
    saved = st.SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    expected = saved.encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(tuned, expected, atol=1e-5, rtol=0), (tuned - expected).abs().max()


def test_causal_lm_loading_is_refused_with_the_way_to_load_it(tmp_path):
    path = save_tiny_embedding_model(KIND, tmp_path / KIND)
    with pytest.raises(UnsupportedArchitectureError, match="embedding_mode=True"):
        FastModel.from_pretrained(str(path), **CPU)
    model, _ = FastModel.from_pretrained(str(path), embedding_mode=True, **CPU)
    assert is_patched(model.backbone) and model.embedding_dim == 50


def test_spec_facts_and_refusals():
    spec = SPECS["embedding_gemma2_text"]
    assert spec.embedding_pooling == "mean" and spec.output_width_attr == "embedding_dim"
    assert spec.v_norm and spec.qk_norm and spec.kv_sharing is None
    assert spec.gguf_arch is None  # no llama.cpp arch: GGUF export refuses it (test_specs.py)
    multimodal = type("Config", (), {"model_type": "embedding_gemma2"})()
    with pytest.raises(UnsupportedArchitectureError, match="EmbeddingGemma2TextModel"):
        spec_for(multimodal)
