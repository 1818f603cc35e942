"""Padding-free embedding batches (``fastlm.embeddings.padding_free``) vs the padded computation.

fp32. A causal body (Qwen3, last-token pooling, left padding) and a bidirectional one (Gemma 3
with full-attention layers, mean pooling), texts of very different lengths: the packed row's
embeddings, the InfoNCE loss and every LoRA gradient equal the patched padded batch's and
unpatched transformers + PEFT's (padded) within 1e-4 (embeddings 1e-5). The attention runs SDPA
with the per-text mask (on the CPU), or the varlen kernel (``kernel_on_cpu``: on the GPU where
there is one, else in the interpreter). Changing one text leaves the others' vectors
bit-identical. Bodies the layout cannot take run padded, and say why.
"""

from __future__ import annotations

import logging

import pytest
import torch
from embedding_helpers import CPU, TEXTS, cpu_training_args, save_tiny_embedding_model
from tiny_models import on_device, relative_error

from fastlm.embeddings import (
    EmbeddingCollator,
    EmbeddingTrainer,
    InfoNCELoss,
    load_embedding_model,
    pool,
)
from fastlm.embeddings.padding_free import (
    PADDED,
    PADDING_FREE,
    bucketed,
    join_packed,
    pack_texts,
)
from fastlm.embeddings.pooling import POOLING_MODES, pool_packed
from fastlm.models import attention, fused_report

RTOL = 1e-4
LONG = "a much longer document about cats, mats, foxes and retrieval, to pad the rest by far"
ROWS = [
    {"query": "find the cat", "response": LONG, "rejected_response": ["hi", TEXTS[1]]},
    {"query": "fox?", "response": "x", "rejected_response": [TEXTS[3]]},
    {
        "query": "a longer query about greetings and such",
        "response": "hi!",
        "rejected_response": [],
    },
]


# --------------------------------------------------------------------------- packing, pooling


def test_pack_texts_lays_left_and_right_padded_rows_end_to_end():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4], [0, 0, 0, 3]])  # left padding
    packed = pack_texts(ids, (ids != 0).long())
    assert packed.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3, 0]]
    assert packed.cu_seqlens.tolist() == [0, 2, 6, 7] and packed.max_length == 4
    right = pack_texts(torch.tensor([[5, 6, 0, 0]]), torch.tensor([[1, 1, 0, 0]]))
    assert right.inputs["input_ids"].tolist() == [[5, 6]]


def test_pack_texts_refuses_empty_texts_and_holes():
    ids = torch.tensor([[5, 6, 7], [8, 9, 1]])
    assert pack_texts(ids, torch.tensor([[1, 1, 1], [0, 0, 0]])) == "a text with no tokens"
    assert "between a text's tokens" in pack_texts(ids, torch.tensor([[1, 0, 1], [1, 1, 1]]))


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_packed_equals_pool_on_the_padded_states(mode):
    """The same tokens are selected or summed in the same order: bit-identical."""
    lengths = [7, 1, 3]
    states = torch.randn(len(lengths), 7, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    packed = states[mask]  # (T, H), the real tokens end to end
    cu = torch.tensor([0, 7, 8, 11], dtype=torch.int32)
    assert torch.equal(pool_packed(packed, cu, 7, mode), pool(states, mask, mode))


# --------------------------------------------------------------------------- against padded / HF


def _models(tmp_path, kind, device="cpu"):
    """(unpatched reference, patched padded, patched padding-free): the same weights and LoRA
    (B ≠ 0, gradient checkpointing on), in train mode, on ``device``."""
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    models = []
    for kernels, padding_free in ((False, True), (True, False), (True, True)):
        model, _ = load_embedding_model(
            str(path), max_seq_length=120, use_fastlm_kernels=kernels, padding_free=padding_free,
            **{**CPU, "device_map": device},
        )  # fmt: skip
        model.get_peft_model(r=4, lora_alpha=8, init_lora_weights=False)
        model.load_state_dict(models[0].state_dict()) if models else None
        models.append(model.train())
    return models


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = InfoNCELoss(temperature=0.05).batch_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()
             if "lora_" in n}  # fmt: skip
    return loss.detach(), grads


@pytest.mark.parametrize("kernel", [False, True], ids=["sdpa", "varlen-kernel"])
@pytest.mark.parametrize("kind", ["qwen3", "gemma3_full"])
def test_padding_free_equals_padded_and_hf(tmp_path, kind, kernel, request, device):
    calls = request.getfixturevalue("kernel_on_cpu") if kernel else None
    device = device if kernel else "cpu"  # SDPA: the CPU's path (CUDA would run the kernel)
    reference, padded, packed = _models(tmp_path, kind, device)
    batch = on_device(EmbeddingCollator(packed, prompts={})(ROWS), device)
    lengths = batch["response"]["attention_mask"].sum(1).tolist()
    assert max(lengths) >= 20 * min(lengths)  # very different lengths: mostly padding
    with torch.no_grad():
        want = reference(**batch["response"])
        assert torch.allclose(padded(**batch["response"]), want, atol=1e-5, rtol=0)
        got = packed(**batch["response"])
    assert packed.latest_batch_path == (PADDING_FREE, "")
    assert padded.latest_batch_path == (PADDED, "padding_free=False")
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    want_loss, want_grads = _loss_and_grads(reference, batch)
    for model in (padded, packed):
        loss, grads = _loss_and_grads(model, batch)
        assert abs(loss - want_loss) <= RTOL * abs(want_loss)
        assert grads.keys() == want_grads.keys() and len(grads) > 0
        for name, grad in want_grads.items():
            assert grad.abs().sum() > 0, name
            assert relative_error(grads[name], grad) <= RTOL, name
    paths = {(row["attention"], row["reason"]) for row in fused_report(packed.backbone).attention}
    if kernel:
        assert "varlen" in calls and 1 not in calls  # no fixed-length launch
        reason = "packed sequences from cu_seq_lens, in place of sdpa"
        assert paths == {(attention.FLASH_VARLEN, reason)}
    else:
        (ran, reason), *others = paths  # SDPA with the per-text mask: the kernel is for CUDA
        assert not others and ran == "sdpa" and reason.startswith("packed sequences from cu_seq")


@pytest.mark.parametrize(
    "kind, kernel", [("qwen3", False), ("gemma3_full", False), ("qwen3", True)]
)
def test_changing_one_text_leaves_the_others_bit_identical(tmp_path, kind, kernel, request, device):
    if kernel:
        request.getfixturevalue("kernel_on_cpu")
    device = device if kernel else "cpu"  # SDPA: the CPU's path (CUDA would run the kernel)
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    model, _ = load_embedding_model(str(path), max_seq_length=120, **{**CPU, "device_map": device})
    model.eval()
    texts = ["hi", LONG, "the cat sat on the mat", "x"]
    changed = [*texts]
    changed[2] = "a dog ran by the bay!!"  # as many tokens: the others keep their places
    with torch.no_grad():
        before = model.embed(texts)
        after = model.embed(changed)
        assert model.latest_batch_path.layout == PADDING_FREE
        shifted = model.embed(["hello there", *texts[1:]])  # longer first text: the rest move
    keep = [0, 1, 3]
    assert torch.equal(before[keep], after[keep])
    assert (before[2] - after[2]).abs().max() > 1e-3  # the changed text did change
    assert torch.allclose(before[1:], shifted[1:], atol=1e-6, rtol=0)


def test_join_packed_keeps_every_boundary():
    first = pack_texts(torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    full = torch.tensor([[8, 9, 1, 2]])
    second = pack_texts(full, torch.ones_like(full), unpadded=True)
    assert (
        pack_texts(full, torch.ones_like(full))
        == "no padding in the batch (every text fills the row)"
    )
    joined = join_packed([first, second])
    assert joined.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2]]
    assert joined.inputs["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2, 3]]
    assert joined.cu_seqlens.tolist() == [0, 2, 3, 7] and joined.max_length == 4
    assert joined.inputs["cu_seq_lens_k"] is joined.cu_seqlens


def test_bucketed_rows_pad_with_texts_of_their_own():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    packed = pack_texts(ids, (ids != 0).long())  # T = 5
    steady = bucketed(packed, max_text=512)
    assert steady.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9] + [0] * 59]  # T -> 64
    assert steady.inputs["position_ids"][0, 5:].tolist() == list(range(59))
    assert steady.inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 64]  # the padding: a text
    assert steady.inputs["max_length_q"] == 64  # a power of two >= every text, padding's too
    assert steady.cu_seqlens.tolist() == [0, 3, 5] and steady.max_length == 3  # for pooling
    long = pack_texts(torch.ones(3, 3600, dtype=torch.long), torch.ones(3, 3600), unpadded=True)
    assert bucketed(long, 8192).inputs["input_ids"].shape[1] == 12288  # multiples of 2,048


def test_bucketed_padding_texts_are_never_longer_than_the_model_takes():
    """A bucket's padding (up to a quarter of the row) is split into a fixed number of texts no
    longer than the model's max_seq_length (rounded down to a power of two): one padding text
    of 1,780 tokens stopped a model loaded with max_seq_length=1024. Rows of one bucket keep one
    cu_seq_lens length and one max_length, whatever their padding."""
    rows = []
    for total in (9000, 9500):  # one bucket: multiples of 2,048, padded to 10,240
        ids = torch.ones(1, total, dtype=torch.long)
        steady = bucketed(pack_texts(ids, torch.ones(1, total), unpadded=True), max_text=1000)
        cu = steady.inputs["cu_seq_lens_q"]
        lengths = cu.diff().tolist()
        assert cu.dtype == torch.int32  # what the kernel and the layer graphs take
        assert steady.inputs["input_ids"].shape[1] == cu[-1] == 10240
        assert lengths[0] == total and max(lengths[1:]) <= 512 and min(lengths[1:]) >= 1
        assert steady.inputs["position_ids"][0, total : total + lengths[1]].tolist() == list(
            range(lengths[1])
        )
        rows.append((len(cu), steady.inputs["max_length_q"]))
    assert rows[0] == rows[1] == (1 + 1 + 4, 16384)  # 4 padding texts; max_length >= 9,500


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_full"])  # causal; bidirectional
def test_steady_row_shapes_embed_the_same(tmp_path, monkeypatch, kind):
    """With layer graphs on, packed rows are padded to steady shapes (``bucketed``): the same
    vectors, loss and LoRA gradients as the rows as they are (a bidirectional body would see
    padding that joined the last text)."""
    from fastlm.offload import checkpoint

    _, _, packed = _models(tmp_path, kind)
    batch = EmbeddingCollator(packed, prompts={})(ROWS)
    want_loss, want_grads = _loss_and_grads(packed, batch)
    with torch.no_grad():
        want = packed(**batch["response"])
    monkeypatch.setattr(checkpoint, "layers_will_replay", lambda body, like: True)
    lengths = []
    packed.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        assert torch.allclose(packed(**batch["response"]), want, atol=1e-5, rtol=0)
    loss, grads = _loss_and_grads(packed, batch)
    assert lengths[0] % 64 == 0 and lengths[1] % 64 == 0  # the steady shapes ran
    assert abs(loss - want_loss) <= RTOL * abs(want_loss)
    for name, grad in want_grads.items():
        assert relative_error(grads[name], grad) <= RTOL, name


def test_rows_are_bucketed_only_where_the_layers_will_replay(tmp_path, monkeypatch):
    """Padding to steady shapes costs tokens; only a run whose layers replay as graphs (graphs
    on, their device, training with fastlm's offloaded checkpointing, gradients on) pays it."""
    from fastlm.offload import checkpoint

    graphs = checkpoint.LAYER_GRAPHS
    _, _, packed = _models(tmp_path, "qwen3")
    body, ids = packed.backbone, torch.ones(1, 5, dtype=torch.long)
    monkeypatch.setattr(graphs, "enabled", True)
    monkeypatch.setattr(graphs, "_device_ok", lambda tensor: True)  # as if on the GPU
    packed.train()
    assert not checkpoint.layers_will_replay(body, ids)  # no checkpointing
    body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not checkpoint.layers_will_replay(body, ids)  # torch's checkpoint: never graphed
    checkpoint.enable_offloaded_checkpointing(body)
    assert checkpoint.layers_will_replay(body, ids)
    with torch.no_grad():
        assert not checkpoint.layers_will_replay(body, ids)
    packed.eval()
    assert not checkpoint.layers_will_replay(body, ids)
    packed.train()
    monkeypatch.setattr(graphs, "_device_ok", lambda tensor: tensor.is_cuda)
    assert not checkpoint.layers_will_replay(body, ids)  # a CPU tensor
    monkeypatch.setattr(graphs, "_device_ok", lambda tensor: True)
    monkeypatch.setattr(graphs, "enabled", False)
    assert not checkpoint.layers_will_replay(body, ids)


def _body_calls(model) -> list:
    calls = []
    model.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(1), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("kernel", [False, True], ids=["sdpa", "varlen-kernel"])
def test_a_loss_embeds_all_its_sides_in_one_body_call(tmp_path, kernel, request, device):
    """Queries, positives and negatives (one side without padding) in one packed row: each
    side's vectors as its own forward gives them, with one body call instead of three."""
    if kernel:
        request.getfixturevalue("kernel_on_cpu")
    device = device if kernel else "cpu"  # SDPA: the CPU's path (CUDA would run the kernel)
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=120, **{**CPU, "device_map": device})
    model.eval()
    batch = on_device(EmbeddingCollator(model, prompts={})(ROWS), device)
    unpadded = model.tokenize([LONG, LONG])  # no padding: it packs only to join the others
    sides = [batch["query"], batch["response"], unpadded]
    calls = _body_calls(model)
    with torch.no_grad():
        joined = model.embed_sides(*sides)
        assert len(calls) == 1 and model.latest_batch_path == (PADDING_FREE, "")
        apart = [model(**side) for side in sides]
    assert len(calls) == 4
    for got, want in zip(joined, apart, strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_a_packed_row_builds_no_row_wide_mask(tmp_path):
    """An SDPA body gets a (1, T) mask of ones with the packed row: transformers then builds no
    (T, T) block mask from the restarting positions (the attention keeps the texts apart from
    cu_seq_lens), and the layers see none."""
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=120, **CPU)
    masks = []
    layer = model.backbone.layers[0]
    layer.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    batch = EmbeddingCollator(model, prompts={})(ROWS)
    with torch.no_grad():
        model.eval().embed_sides(batch["query"], batch["response"])
    assert model.latest_batch_path.layout == PADDING_FREE
    assert masks == [None]


def test_sides_run_one_by_one_where_they_do_not_pack(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=120, padding_free=False, **CPU)
    batch = EmbeddingCollator(model, prompts={})(ROWS)
    calls = _body_calls(model.eval())
    with torch.no_grad():
        model.embed_sides(batch["query"], batch["response"])
    assert len(calls) == 2 and model.latest_batch_path == (PADDED, "padding_free=False")
    model.padding_free = True
    with torch.no_grad():  # no side has padding: each runs padded (and keeps its layer graphs)
        model.embed_sides(model.tokenize([LONG]), model.tokenize(["x"]))
    assert len(calls) == 4 and "no padding" in model.latest_batch_path.reason


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("gemma3", "bidirectional sliding-window layers"),  # window 4, attending both ways
        ("embedding_gemma2", "bidirectional sliding-window layers"),
        ("bert", "bert body runs transformers' code"),
    ],
)
def test_unsupported_bodies_run_padded_and_say_why(tmp_path, kind, reason, caplog):
    if kind == "embedding_gemma2":
        pytest.importorskip("transformers.models.embedding_gemma2")
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    with caplog.at_level(logging.INFO, logger="fastlm"):
        model, _ = load_embedding_model(str(path), max_seq_length=100, **CPU)
    assert model.batch_path().layout == PADDED and reason in model.batch_path().reason
    assert any(reason in record.getMessage() for record in caplog.records)
    with torch.no_grad():
        model.eval().embed(TEXTS[:2])
    assert model.latest_batch_path == model.batch_path()


def test_a_batch_that_does_not_pack_runs_padded(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=120, **CPU)
    model.eval()
    batch = model.tokenize(["the cat", "a fox"])
    batch["attention_mask"][1] = 0  # an empty text
    with torch.no_grad():
        vectors = model(**batch)
    assert model.latest_batch_path == (PADDED, "a text with no tokens")
    assert model.batch_path().layout == PADDING_FREE  # the next batch packs again
    with torch.no_grad():
        assert torch.allclose(vectors[0], model.embed(["the cat"])[0], atol=1e-5)


def test_trainer_option_turns_it_off_and_on(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=120, lora_r=4, **CPU)
    args = cpu_training_args(tmp_path, learning_rate=1e-3, max_steps=1)
    trainer = EmbeddingTrainer(model, args, train_dataset=ROWS, padding_free=False)
    assert trainer.batch_path == (PADDED, "padding_free=False")
    trainer.train()
    assert model.latest_batch_path == (PADDED, "padding_free=False")
    trainer = EmbeddingTrainer(model, args, train_dataset=ROWS, padding_free=True)
    trainer.train()
    assert model.latest_batch_path == (PADDING_FREE, "")


def test_a_batch_without_padding_is_not_packed(tmp_path):
    """Nothing to strip: the padded batch is the same work (and keeps the layer CUDA graphs)."""
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), **CPU)
    with torch.no_grad():
        model.eval().embed([LONG] * 3)
    assert model.latest_batch_path.layout == PADDED
    assert "no padding" in model.latest_batch_path.reason


def test_max_seq_length_applies_per_text_not_per_row(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=90, **CPU)
    with torch.no_grad():
        vectors = model.eval().embed([LONG, LONG[:40], LONG])  # one row of about 210 tokens
    assert model.latest_batch_path.layout == PADDING_FREE
    assert torch.allclose(vectors[0], vectors[2], atol=1e-6, rtol=0)  # the same text
