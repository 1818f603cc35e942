"""Pooling picks the right tokens under left and right padding; batched = one-by-one embeddings.

Tolerances (fp32): pool() is exact (the same numbers are selected or summed); a padded batch
vs each text alone within atol 1e-5 (different padding shifts RoPE positions, which cancel in
q·k only up to rounding).
"""

from __future__ import annotations

import pytest
import torch
from embedding_helpers import CPU, TEXTS, save_tiny_embedding_model

from fastlm.embeddings import load_embedding_model, pool


def _padded(lengths, seq, left, hidden=5):
    """(B, S, H) states whose real tokens are 1..L (per row), padding filled with 1e6."""
    generator = torch.Generator().manual_seed(0)
    states = torch.full((len(lengths), seq, hidden), 1e6)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    real = []
    for row, length in enumerate(lengths):
        values = torch.randn(length, hidden, generator=generator)
        span = slice(seq - length, seq) if left else slice(0, length)
        states[row, span] = values
        mask[row, span] = 1
        real.append(values)
    return states, mask, real


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_pool_against_hand_selection(left):
    states, mask, real = _padded([7, 3, 1], seq=7, left=left)
    expected = {
        "mean": torch.stack([r.mean(0) for r in real]),
        "cls": torch.stack([r[0] for r in real]),
        "lasttoken": torch.stack([r[-1] for r in real]),
        "max": torch.stack([r.max(0).values for r in real]),
    }
    for mode, want in expected.items():
        got = pool(states, mask, mode)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), mode


def test_pool_ignores_non_finite_padding():
    states, mask, real = _padded([4, 2], seq=4, left=False)
    states = states.masked_fill(~mask.bool().unsqueeze(-1), float("nan"))
    assert torch.isfinite(pool(states, mask, "mean")).all()
    assert torch.allclose(pool(states, mask, "mean")[1], real[1].mean(0), atol=1e-6)


def test_pool_rejects_unknown_mode():
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "weightedmean")


@pytest.mark.parametrize(
    "kind,pooling,sides",
    [
        ("qwen3", "lasttoken", ("left", "right")),
        ("gemma3", "mean", ("left", "right")),
        ("bert", "cls", ("right",)),  # learned absolute positions: BERT tokenizers pad right
    ],
)
def test_batch_embeddings_equal_single_text_embeddings(tmp_path, kind, pooling, sides):
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    model, tokenizer = load_embedding_model(str(path), max_seq_length=120, **CPU)
    assert model.pooling == pooling
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model.embed([text]) for text in TEXTS])
        for side in sides:
            tokenizer.padding_side = side
            batch = model.tokenize(TEXTS)
            assert (batch["attention_mask"] == 0).any()  # the batch really is padded
            first = batch["attention_mask"][:, 0 if side == "left" else -1]
            assert (first == 0).any(), side  # ... on that side
            together = model(**batch)
            assert torch.allclose(together, alone, atol=1e-5, rtol=0), (side, together - alone)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)


def test_last_token_is_the_last_real_token(tmp_path):
    """Qwen3 is causal: the last real token's state depends on every token, earlier ones not on
    later ones; so pooling the wrong position would change when the end of the text changes."""
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    model, _ = load_embedding_model(str(path), max_seq_length=64, **CPU)
    model.eval()
    with torch.no_grad():
        a, b = model.embed(["abcdefg", "abcdefh"])
    assert (a - b).abs().max() > 1e-3
