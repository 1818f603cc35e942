"""Losses against hand-written formulas (float64 loops) and Sentence-Transformers' losses.

Tolerance: 1e-6 relative/absolute (fp32 vs an fp64 loop); gradients checked through
torch.autograd.gradcheck where the loss is smooth.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastlm.embeddings import (
    ContrastiveLoss,
    CosineSimilarityLoss,
    EmbeddingCollator,
    InfoNCELoss,
    MultipleNegativesRankingLoss,
    OnlineContrastiveLoss,
    contrastive_loss,
    cosine_similarity_loss,
    infonce_loss,
    normalize_row,
    online_contrastive_loss,
)

TOL = dict(rtol=1e-6, atol=1e-6)


def _vectors(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def _infonce_by_hand(q, p, n, tau, in_batch, margin=None, n_valid=None, p_text=None, n_text=None):
    """Loop version: for each query, list the candidates and drop the masked ones."""
    batch, count = q.shape[0], (0 if n is None else n.shape[1])
    total = 0.0
    for i in range(batch):
        positive = _cos(q[i], p[i])
        candidates = []  # (similarity, text or None)
        for j in range(batch):
            if j != i and in_batch:
                candidates.append((_cos(q[i], p[j]), None if p_text is None else p_text[j]))
            for k in range(count):
                if (j == i or in_batch) and (n_valid is None or n_valid[j][k]):
                    text = None if n_text is None else n_text[j][k]
                    candidates.append((_cos(q[i], n[j, k]), text))
        denominator = math.exp(positive / tau)
        for similarity, text in candidates:
            if margin is not None and similarity > positive - margin:
                continue  # a likely false negative
            if p_text is not None and text == p_text[i]:
                continue  # the positive's own text
            denominator += math.exp(similarity / tau)
        total += -(positive / tau - math.log(denominator))
    return total / batch


@pytest.mark.parametrize("in_batch", [True, False], ids=["in-batch", "own-negatives-only"])
@pytest.mark.parametrize("with_negatives", [True, False], ids=["hard-negatives", "pairs"])
def test_infonce_matches_hand_formula(in_batch, with_negatives):
    q, p = _vectors(5, 24, seed=1), _vectors(5, 24, seed=2)
    n = _vectors(5, 3, 24, seed=3) if with_negatives else None
    got = infonce_loss(q, p, n, temperature=0.07, in_batch_negatives=in_batch)
    want = _infonce_by_hand(q, p, n, 0.07, in_batch)
    assert math.isclose(got.item(), want, rel_tol=1e-6)


def test_infonce_false_negative_margin_masks_close_candidates():
    q, p, n = _vectors(4, 16, seed=4), _vectors(4, 16, seed=5), _vectors(4, 2, 16, seed=6)
    n[1, 0] = q[1] + 0.01 * n[1, 0]  # scores above the positive: must be masked for row 1
    p[3] = p[0] + 0.05 * p[3]  # row 3's positive is a near-duplicate of row 0's
    got = infonce_loss(q, p, n, temperature=0.05, false_negative_margin=0.1)
    want = _infonce_by_hand(q, p, n, 0.05, True, margin=0.1)
    assert math.isclose(got.item(), want, rel_tol=1e-6)
    unmasked = infonce_loss(q, p, n, temperature=0.05)
    assert unmasked.item() > got.item() + 1e-3  # the masking changed the loss


def test_infonce_masks_identical_texts_and_padding_slots():
    q, p, n = _vectors(4, 16, seed=7), _vectors(4, 16, seed=8), _vectors(4, 3, 16, seed=9)
    p_text = ["a", "b", "a", "c"]  # rows 0 and 2 share their positive text
    n_text = [["x", "b", None], ["a", "y", "z"], ["w", None, None], ["c", "v", None]]
    valid = [[t is not None for t in row] for row in n_text]
    p[2] = p[0]  # identical text → identical embedding
    ids = {t: i for i, t in enumerate(dict.fromkeys(p_text + [t for r in n_text for t in r if t]))}
    positive_ids = torch.tensor([ids[t] for t in p_text])
    negative_ids = torch.tensor([[ids[t] if t else -1 for t in row] for row in n_text])
    got = infonce_loss(
        q,
        p,
        n,
        temperature=0.05,
        negatives_mask=torch.tensor(valid),
        positive_ids=positive_ids,
        negative_ids=negative_ids,
    )
    want = _infonce_by_hand(q, p, n, 0.05, True, n_valid=valid, p_text=p_text, n_text=n_text)
    assert math.isclose(got.item(), want, rel_tol=1e-6)


def test_collator_ids_mark_identical_texts(tmp_path):
    class _Stub:  # just a tokenizer front-end
        def query_prompt(self):
            return ""

        def document_prompt(self):
            return ""

        def tokenize(self, texts, prompt, to_device=False):
            return {"input_ids": torch.tensor([[len(t)] for t in texts])}

    rows = [
        {"anchor": "q1", "positive": "doc a", "negative_1": "doc b", "negative_2": "doc c"},
        {"anchor": "q2", "positive": "doc b", "negative": "doc a"},
        {"anchor": "q3", "positive": "doc a"},
    ]
    batch = EmbeddingCollator(_Stub())(rows)
    ids = batch["response_ids"].tolist()
    assert ids[0] == ids[2] != ids[1]
    assert batch["rejected_ids"][0, 0] == ids[1] and batch["rejected_ids"][1, 0] == ids[0]
    assert batch["rejected_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert batch["rejected"]["input_ids"].shape[0] == 3


def test_st_column_aliases():
    row = normalize_row({"sentence1": "a", "sentence2": "b", "score": 0.25})
    assert row == {"query": "a", "response": "b", "rejected_response": [], "label": 0.25}
    row = normalize_row({"anchor": "a", "positive": "b", "negative": "c"})
    assert row["rejected_response"] == ["c"]


def test_mnrl_equals_sentence_transformers():
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    q, p, n = _vectors(6, 20, seed=10), _vectors(6, 20, seed=11), _vectors(6, 2, 20, seed=12)
    theirs = losses.MultipleNegativesRankingLoss(torch.nn.Identity(), scale=20.0)
    expected = theirs.compute_loss_from_embeddings([q, p, n[:, 0], n[:, 1]], None)
    ours = MultipleNegativesRankingLoss(scale=20.0)(q, p, n)
    assert torch.allclose(ours, expected, **TOL)
    assert torch.allclose(InfoNCELoss(temperature=0.05)(q, p, n), expected, **TOL)


def test_pair_losses_match_formulas_and_sentence_transformers():
    a, b = _vectors(7, 12, seed=13), _vectors(7, 12, seed=14)
    b[:4] = a[:4] + 0.3 * b[:4]  # similar pairs: 0-3 and 6
    b[6] = a[6] + 0.3 * b[6]
    b[3] = a[3] + 0.1 * b[3]  # closer than every positive
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 1])  # 3 is a hard negative, 4 and 5 easy ones
    cos = F.cosine_similarity(a.double(), b.double())
    d = 1 - cos
    y = labels.double()
    assert torch.allclose(
        cosine_similarity_loss(a, b, torch.linspace(0, 1, 7)).double(),
        ((cos - torch.linspace(0, 1, 7).double()) ** 2).mean(),
        **TOL,
    )
    contrastive = 0.5 * (y * d**2 + (1 - y) * (0.5 - d).clamp_min(0) ** 2).mean()
    assert torch.allclose(contrastive_loss(a, b, labels, 0.5).double(), contrastive, **TOL)
    pos, neg = d[labels == 1], d[labels == 0]
    hard_pos, hard_neg = pos[pos > neg.min()], neg[neg < pos.max()]
    online = (hard_pos**2).sum() + ((0.5 - hard_neg).clamp_min(0) ** 2).sum()
    assert 0 < len(hard_pos) < len(pos) or 0 < len(hard_neg) < len(neg)  # some pairs dropped
    assert torch.allclose(online_contrastive_loss(a, b, labels, 0.5).double(), online, **TOL)

    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    stub = torch.nn.Identity()
    pairs = [
        (CosineSimilarityLoss(), losses.CosineSimilarityLoss(stub), torch.linspace(0, 1, 7)),
        (ContrastiveLoss(0.5), losses.ContrastiveLoss(stub, margin=0.5), labels),
        (OnlineContrastiveLoss(0.5), losses.OnlineContrastiveLoss(stub, margin=0.5), labels),
    ]
    for ours, theirs, target in pairs:
        expected = theirs.compute_loss_from_embeddings([a, b], target)
        assert torch.allclose(ours(a, b, target), expected.float(), **TOL), type(ours).__name__


def test_infonce_gradients_are_finite_with_padding_slots():
    q = _vectors(3, 8, seed=15).requires_grad_()
    p = _vectors(3, 8, seed=16).requires_grad_()
    n = torch.zeros(3, 2, 8)  # padding slots are zero vectors
    n[0, 0] = _vectors(8, seed=17)
    n.requires_grad_()
    mask = torch.tensor([[True, False], [False, False], [False, False]])
    infonce_loss(q, p, n, negatives_mask=mask).backward()
    for t in (q, p, n):
        assert torch.isfinite(t.grad).all()
    assert n.grad[1:].abs().sum() == 0 and n.grad[0, 1].abs().sum() == 0
