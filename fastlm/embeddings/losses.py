"""Embedding losses, as plain functions of embeddings and as ``nn.Module`` s the trainer calls.

Similarities are cosines, s(a, b) = a·b / (‖a‖‖b‖). Each module's ``batch_loss(model, batch)``
embeds the collated columns (see ``fastlm.embeddings.data``) and applies ``forward``:

- ``InfoNCELoss``: query / response / rejected_response (a list of hard negatives).
- ``CosineSimilarityLoss``, ``ContrastiveLoss``, ``OnlineContrastiveLoss``: query / response
  pairs with a float ``label`` (a similarity, or 1 = similar / 0 = dissimilar).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cos_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _cos_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def infonce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    in_batch_negatives: bool = True,
    false_negative_margin: float | None = None,
    negatives_mask: torch.Tensor | None = None,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over cosine similarities; query (B, D), positive (B, D), negatives (B, K, D).

    Usage: ``infonce_loss(q, p, n, temperature=0.05)``.

    For query i the candidates C_i are its positive p_i, its hard negatives n_i1..n_iK and, with
    ``in_batch_negatives``, every other row's positive and hard negatives. Then

        L = −1/B Σ_i log( exp(s(q_i, p_i)/τ) / Σ_{c ∈ C_i, m_ic = 1} exp(s(q_i, c)/τ) )

    where m_ic = 0 (c is dropped as a likely false negative) for c ≠ p_i when
      - ``false_negative_margin`` is set and s(q_i, c) > s(q_i, p_i) − margin, or
      - c is the same text as p_i (``positive_ids`` / ``negative_ids``: equal ids = equal text),
    and for padding slots (``negatives_mask`` (B, K) False). In-batch with scale 20 (τ = 0.05)
    and no masking this is Sentence-Transformers' MultipleNegativesRankingLoss.
    """
    batch = query.shape[0]
    rows = torch.arange(batch, device=query.device)
    candidates = [positive]  # (B, D): candidate j of the first block is row j's positive
    candidate_ids = [positive_ids] if positive_ids is not None else None
    if negatives is not None and negatives.shape[1] > 0:
        count = negatives.shape[1]
        candidates.append(negatives.reshape(batch * count, -1))  # row-major: row j, slot k
        if candidate_ids is not None:
            if negative_ids is None:  # unknown texts: never "identical" to a positive
                negative_ids = -1 - torch.arange(batch * count, device=query.device)
            candidate_ids.append(negative_ids.reshape(-1))
    else:
        count = 0
        negatives_mask = None
    keys = torch.cat(candidates)  # (B + B·K, D)
    scores = _cos_matrix(query, keys)  # (B, B + B·K)
    owner = torch.cat([rows, rows.repeat_interleave(count)])  # the row each candidate belongs to
    keep = torch.ones_like(scores, dtype=torch.bool)
    if not in_batch_negatives:
        keep &= owner.unsqueeze(0) == rows.unsqueeze(1)
    if negatives_mask is not None:
        real = negatives_mask.reshape(-1).to(query.device)
        keep &= torch.cat([real.new_ones(batch), real]).unsqueeze(0)
    target = torch.zeros_like(keep)
    target[rows, rows] = True
    positive_scores = scores[rows, rows]  # (B,)
    with torch.no_grad():
        false_negative = torch.zeros_like(keep)
        if false_negative_margin is not None:
            threshold = positive_scores.unsqueeze(1) - false_negative_margin
            false_negative |= scores > threshold
        if candidate_ids is not None:
            ids = torch.cat(candidate_ids).to(query.device)
            false_negative |= ids.unsqueeze(0) == positive_ids.to(query.device).unsqueeze(1)
    keep &= ~false_negative | target
    logits = (scores / temperature).masked_fill(~keep, float("-inf"))
    return -(positive_scores / temperature - torch.logsumexp(logits, dim=1)).mean()


def cosine_similarity_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE between cosines and float labels: L = 1/B Σ_i (s(a_i, b_i) − y_i)².

    Usage: ``cosine_similarity_loss(u, v, torch.tensor([0.9, 0.1]))``.
    """
    return F.mse_loss(_cos_pairs(a, b), labels.to(a.device).float())


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """Hadsell et al.'s contrastive loss on the cosine distance d = 1 − s(a, b):

        L = 1/B Σ_i ½ [ y_i d_i² + (1 − y_i) max(0, margin − d_i)² ],   y = 1 similar, 0 not.

    Usage: ``contrastive_loss(u, v, torch.tensor([1, 0]), margin=0.5)``.
    """
    labels = labels.to(a.device).float()
    distance = 1 - _cos_pairs(a, b)
    losses = labels * distance.pow(2) + (1 - labels) * F.relu(margin - distance).pow(2)
    return 0.5 * losses.mean()


def online_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """Contrastive loss on the hard pairs of the batch only, d = 1 − s(a, b):

        hard positives: y = 1 and d > min(d over negatives)   (mean of positive d if < 2 negs)
        hard negatives: y = 0 and d < max(d over positives)   (mean of negative d if < 2 pos)
        L = Σ_hard pos d² + Σ_hard neg max(0, margin − d)²

    (a sum, as Sentence-Transformers' OnlineContrastiveLoss). Usage: as ``contrastive_loss``.
    """
    labels = labels.to(a.device)
    distance = 1 - _cos_pairs(a, b)
    positives = distance[labels == 1]
    negatives = distance[labels == 0]
    zero = distance.sum() * 0  # keeps the graph when no pair is hard
    if positives.numel() == 0 or negatives.numel() == 0:
        return zero
    negative_bound = negatives.min() if negatives.numel() > 1 else positives.mean()
    positive_bound = positives.max() if positives.numel() > 1 else negatives.mean()
    hard_positives = positives[positives > negative_bound]
    hard_negatives = negatives[negatives < positive_bound]
    return zero + hard_positives.pow(2).sum() + F.relu(margin - hard_negatives).pow(2).sum()


# --------------------------------------------------------------------------- modules


def embed_sides(model: nn.Module, *sides: dict) -> list[torch.Tensor]:
    """Each collated side's vectors: through ``model.embed_sides`` where the model has it (a
    ``FastSentenceTransformer``: one body call for all sides when padding-free), else one
    ``model(**side)`` call per side.

    Usage: ``query, positive = embed_sides(model, batch["query"], batch["response"])``.
    """
    joint = getattr(model, "embed_sides", None)
    return joint(*sides) if joint is not None else [model(**side) for side in sides]


class EmbeddingLoss(nn.Module):
    """Base: ``batch_loss(model, batch)`` embeds the collated columns and calls ``forward``."""

    def batch_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        query, response = embed_sides(model, batch["query"], batch["response"])
        return self(query, response, batch["label"])


class InfoNCELoss(EmbeddingLoss):
    """``infonce_loss`` as a module (see its docstring for the formula and the masking).

    Usage: ``InfoNCELoss(temperature=0.05, in_batch_negatives=True, false_negative_margin=0.1)``.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        in_batch_negatives: bool = True,
        false_negative_margin: float | None = None,
        mask_identical_texts: bool = True,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.false_negative_margin = false_negative_margin
        self.mask_identical_texts = mask_identical_texts

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
        positive_ids: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.mask_identical_texts:
            positive_ids = negative_ids = None
        return infonce_loss(
            query,
            positive,
            negatives,
            temperature=self.temperature,
            in_batch_negatives=self.in_batch_negatives,
            false_negative_margin=self.false_negative_margin,
            negatives_mask=negatives_mask,
            positive_ids=positive_ids,
            negative_ids=negative_ids,
        )

    def batch_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        sides = [batch[key] for key in ("query", "response", "rejected") if key in batch]
        query, positive, *rest = embed_sides(model, *sides)
        negatives = None
        if rest:  # the rejected texts, flat: (B·K_valid, D)
            negatives = _scatter_negatives(rest[0], batch["rejected_mask"])
        return self(query, positive, negatives, **_mask_and_ids(batch))


class MultipleNegativesRankingLoss(InfoNCELoss):
    """Sentence-Transformers' MNRL: in-batch InfoNCE with scale = 1/τ (default 20, τ = 0.05)."""

    def __init__(self, scale: float = 20.0, mask_identical_texts: bool = False) -> None:
        super().__init__(1.0 / scale, True, None, mask_identical_texts)


class CosineSimilarityLoss(EmbeddingLoss):
    """``cosine_similarity_loss`` as a module (pairs with a float ``label``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosine_similarity_loss(a, b, labels)


class ContrastiveLoss(EmbeddingLoss):
    """``contrastive_loss`` as a module (pairs with label 1 similar / 0 dissimilar)."""

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(a, b, labels, self.margin)


class OnlineContrastiveLoss(ContrastiveLoss):
    """``online_contrastive_loss`` as a module (hard positive / negative pairs only)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return online_contrastive_loss(a, b, labels, self.margin)


def _scatter_negatives(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N_valid, D) embeddings of the real negatives → (B, K, D), zeros in padding slots."""
    out = flat.new_zeros(*mask.shape, flat.shape[-1])
    return out.index_put((mask.nonzero(as_tuple=True)), flat)


def _mask_and_ids(batch: dict) -> dict:
    return {
        "negatives_mask": batch.get("rejected_mask"),
        "positive_ids": batch.get("response_ids"),
        "negative_ids": batch.get("rejected_ids"),
    }
