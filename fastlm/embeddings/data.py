"""Training rows → tokenised batches for the embedding losses.

Row formats (a ``datasets.Dataset`` or a list of dicts):

- retrieval: ``{"query": str, "response": str, "rejected_response": [str, ...]}`` (negatives
  optional, any number per row) → ``InfoNCELoss`` / ``GradCacheInfoNCELoss``;
- scored pairs: ``{"query": str, "response": str, "label": float}`` → ``CosineSimilarityLoss``,
  ``ContrastiveLoss``, ``OnlineContrastiveLoss``.

Sentence-Transformers column names are accepted: ``anchor`` / ``sentence1`` for query,
``positive`` / ``sentence2`` for response, ``negative`` (str or list) and ``negative_1``,
``negative_2``… for rejected_response, ``score`` for label.

``load_embedding_data`` reads such rows from ``.jsonl`` / ``.json`` files and checks each one
(``fastlm embed`` and ``fastlm rerank`` read their ``--data`` with it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastlm.data.formats import DataFormatError, _clip, data_files, read_records

QUERY_COLUMNS = ("query", "anchor", "sentence1", "text1")
RESPONSE_COLUMNS = ("response", "positive", "sentence2", "text2", "document")
NEGATIVE_COLUMNS = ("rejected_response", "negative", "negatives")
LABEL_COLUMNS = ("label", "score", "labels")
_ROW_EXAMPLES = (
    '  {"query": "...", "response": "...", "rejected_response": ["...", ...]}\n'
    '  {"query": "...", "response": "...", "label": 1.0}\n'
    '  {"anchor": "...", "positive": "...", "negative": "..."}'
)


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


# --------------------------------------------------------------------------- data files


@dataclass
class EmbeddingData:
    """Checked rows in fastlm's column names (query, response, rejected_response, [label])."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    labelled: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> str:
        if self.labelled:
            return "scored-pair"
        negatives = sum(1 for row in self.rows if row["rejected_response"])
        return f"retrieval ({negatives} with hard negatives)" if negatives else "retrieval"


def load_embedding_data(path: str | os.PathLike, max_samples: int | None = None) -> EmbeddingData:
    """Read and check every row of a data file or folder; errors name the file and line.

    Usage: ``data = load_embedding_data("train.jsonl")``; all rows have a label, or none.
    """
    files = data_files(path)
    data = EmbeddingData(files=files)
    first_where = None
    for file in files:
        for record, where in read_records(file):
            row = _check_record(record, where)
            labelled = "label" in row
            if first_where is None:
                data.labelled, first_where = labelled, where
            elif labelled != data.labelled:
                has, lacks = (where, first_where) if labelled else (first_where, where)
                raise DataFormatError(
                    f"{where}: {has} has a label and {lacks} has none; every row of a data "
                    "set needs a label (scored pairs) or none does (retrieval)"
                )
            data.rows.append(row)
            data.locations.append(where)
            if max_samples is not None and len(data.rows) >= max_samples:
                return data
    if not data.rows:
        raise DataFormatError(f"{path}: no rows (the file(s) are empty)")
    return data


def _check_record(record: dict, where: str) -> dict[str, Any]:
    """One record → ``{"query", "response", "rejected_response", ["label"]}``, or an error."""
    row: dict[str, Any] = {
        "query": _text_column(record, QUERY_COLUMNS, "query", where),
        "response": _text_column(record, RESPONSE_COLUMNS, "response", where),
    }
    name = next((n for n in NEGATIVE_COLUMNS if record.get(n) is not None), None)
    if name is not None:
        negatives = record[name]
    else:  # negative_1, negative_2, ...
        numbered = sorted(
            (k for k in record if k.startswith("negative_") and k[9:].isdigit()),
            key=lambda k: int(k[9:]),
        )
        negatives = [record[k] for k in numbered if record[k] is not None]
        name = "negative_N"
    if isinstance(negatives, str):
        negatives = [negatives]
    if not isinstance(negatives, list):
        raise DataFormatError(
            f'{where}: "{name}" must be a string or a list of strings, got '
            f"{type(negatives).__name__}: {_clip(negatives)}"
        )
    for index, text in enumerate(negatives):
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(
                f'{where}: "{name}"[{index}] must be a non-empty string: {_clip(text)}'
            )
    row["rejected_response"] = negatives
    name = next((n for n in LABEL_COLUMNS if record.get(n) is not None), None)
    if name is not None:
        label = record[name]
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise DataFormatError(f'{where}: "{name}" must be a number, got {_clip(label)}')
        if not math.isfinite(label):
            raise DataFormatError(f'{where}: "{name}" must be finite, got {label}')
        row["label"] = float(label)
    return row


def _text_column(record: dict, names: tuple[str, ...], role: str, where: str) -> str:
    name = next((n for n in names if record.get(n) is not None), None)
    if name is None:
        aliases = ", ".join(f'"{n}"' for n in names)
        raise DataFormatError(
            f"{where}: no {role} (one of {aliases}) in the keys {sorted(record)}. Each row "
            f"needs one of these shapes:\n{_ROW_EXAMPLES}"
        )
    value = record[name]
    if not isinstance(value, str):
        raise DataFormatError(
            f'{where}: "{name}" must be a string, got {type(value).__name__}: {_clip(value)}'
        )
    if not value.strip():
        raise DataFormatError(f'{where}: "{name}" is empty')
    return value
