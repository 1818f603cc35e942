"""Training rows → tokenised batches for the embedding losses.

Row formats (a ``datasets.Dataset`` or a list of dicts):

- retrieval: ``{"query": str, "response": str, "rejected_response": [str, ...]}`` (negatives
  optional, any number per row) → ``InfoNCELoss`` / ``GradCacheInfoNCELoss``;
- scored pairs: ``{"query": str, "response": str, "label": float}`` → ``CosineSimilarityLoss``,
  ``ContrastiveLoss``, ``OnlineContrastiveLoss``.

Sentence-Transformers column names are accepted: ``anchor`` / ``sentence1`` for query,
``positive`` / ``sentence2`` for response, ``negative`` (str or list) and ``negative_1``,
``negative_2``… for rejected_response, ``score`` for label.
"""

from __future__ import annotations

from typing import Any

import torch

QUERY_COLUMNS = ("query", "anchor", "sentence1", "text1")
RESPONSE_COLUMNS = ("response", "positive", "sentence2", "text2", "document")
NEGATIVE_COLUMNS = ("rejected_response", "negative", "negatives")
LABEL_COLUMNS = ("label", "score", "labels")


def normalize_row(row: dict) -> dict:
    """One row in fastlm's column names. Usage: ``normalize_row({"anchor": a, "positive": p})``."""
    out: dict[str, Any] = {}
    out["query"] = _first(row, QUERY_COLUMNS, required=True)
    out["response"] = _first(row, RESPONSE_COLUMNS, required=True)
    negatives = _first(row, NEGATIVE_COLUMNS, required=False)
    if negatives is None:
        numbered = sorted(
            (k for k in row if k.startswith("negative_") and k[9:].isdigit()),
            key=lambda k: int(k[9:]),
        )
        negatives = [row[k] for k in numbered] if numbered else None
    if isinstance(negatives, str):
        negatives = [negatives]
    out["rejected_response"] = [n for n in negatives or [] if n is not None]
    label = _first(row, LABEL_COLUMNS, required=False)
    if label is not None:
        out["label"] = float(label)
    return out


class EmbeddingCollator:
    """Collate rows into token tensors (CPU) for ``loss.batch_loss(model, batch)``.

    Usage: ``EmbeddingCollator(model)(rows)`` →
    ``{"query": {...}, "response": {...}, "rejected": {...}, "rejected_mask": (B, K),
    "response_ids": (B,), "rejected_ids": (B, K), "label": (B,)}`` (the last four when present).
    ``prompts``: ``{"query": ..., "response": ...}`` prefixes; by default the model's query and
    document prompts (negatives get the response prefix). ``*_ids``: equal ids = equal texts.
    """

    def __init__(self, model, prompts: dict[str, str] | None = None) -> None:
        self.model = model
        if prompts is None:
            prompts = {"query": model.query_prompt(), "response": model.document_prompt()}
        self.query_prompt = prompts.get("query", "")
        self.response_prompt = prompts.get("response", "")

    def _tokens(self, texts: list[str], prompt: str) -> dict[str, torch.Tensor]:
        return self.model.tokenize(texts, prompt, to_device=False)

    def __call__(self, rows: list[dict]) -> dict:
        rows = [normalize_row(dict(row)) for row in rows]
        text_ids: dict[str, int] = {}
        batch: dict[str, Any] = {
            "query": self._tokens([r["query"] for r in rows], self.query_prompt),
            "response": self._tokens([r["response"] for r in rows], self.response_prompt),
            "response_ids": torch.tensor(
                [text_ids.setdefault(r["response"], len(text_ids)) for r in rows]
            ),
        }
        width = max(len(r["rejected_response"]) for r in rows)
        if width:
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            ids = torch.full((len(rows), width), -1, dtype=torch.long)
            flat = []
            for i, row in enumerate(rows):
                for k, text in enumerate(row["rejected_response"]):
                    mask[i, k] = True
                    ids[i, k] = text_ids.setdefault(text, len(text_ids))
                    flat.append(text)
            batch["rejected"] = self._tokens(flat, self.response_prompt)
            batch["rejected_mask"] = mask
            batch["rejected_ids"] = ids
        labels = [r.get("label") for r in rows]
        if any(label is not None for label in labels):
            if any(label is None for label in labels):
                raise ValueError("some rows have a label and some do not")
            batch["label"] = torch.tensor(labels, dtype=torch.float32)
        return batch


def _first(row: dict, names: tuple[str, ...], required: bool):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if required:
        raise KeyError(f"row has none of the columns {names}: {sorted(row)}")
    return None
