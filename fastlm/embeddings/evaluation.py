"""Retrieval metrics: recall@k, MRR@10 and NDCG@10 (binary relevance), as in BEIR / MTEB.

For query q with relevant set R_q and documents ranked by cosine similarity (rank 1 = best):

    recall@k = |R_q ∩ top_k| / |R_q|
    MRR@10   = 1 / (rank of the first relevant document), 0 if none is in the top 10
    NDCG@10  = DCG / IDCG,  DCG = Σ_{r ≤ 10, doc_r ∈ R_q} 1 / log2(r + 1),
               IDCG = Σ_{r ≤ min(|R_q|, 10)} 1 / log2(r + 1)

each averaged over the queries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch


def retrieval_metrics(
    scores: torch.Tensor, relevant: Sequence[Iterable[int]], ks: Sequence[int] = (1, 3, 5, 10)
) -> dict[str, float]:
    """Metrics from a (Q, N) score matrix and, per query, the indices of its relevant documents.

    Usage: ``retrieval_metrics(q @ d.T, [{0}, {2, 5}])``.
    """
    relevant = [set(r) for r in relevant]
    if scores.shape[0] != len(relevant):
        raise ValueError(f"{scores.shape[0]} score rows but {len(relevant)} relevance sets")
    depth = min(max(*ks, 10), scores.shape[1])
    ranked = scores.float().topk(depth, dim=1).indices.tolist()
    totals = {f"recall@{k}": 0.0 for k in ks}
    totals.update({"mrr@10": 0.0, "ndcg@10": 0.0})
    counted = 0
    for ranking, wanted in zip(ranked, relevant):
        if not wanted:
            continue  # a query without relevant documents has no defined recall
        counted += 1
        hits = [doc in wanted for doc in ranking]
        for k in ks:
            totals[f"recall@{k}"] += sum(hits[:k]) / len(wanted)
        first = next((r for r, hit in enumerate(hits[:10], start=1) if hit), None)
        totals["mrr@10"] += 1.0 / first if first else 0.0
        dcg = sum(1.0 / math.log2(r + 1) for r, hit in enumerate(hits[:10], start=1) if hit)
        ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(len(wanted), 10) + 1))
        totals["ndcg@10"] += dcg / ideal
    if counted == 0:
        raise ValueError("no query has a relevant document")
    return {name: value / counted for name, value in totals.items()}


def evaluate_retrieval(
    model,
    queries: Mapping[str, str] | Sequence[str],
    corpus: Mapping[str, str] | Sequence[str],
    relevant: Mapping[str, Iterable[str]] | Sequence[Iterable[int]],
    ks: Sequence[int] = (1, 3, 5, 10),
    batch_size: int = 32,
    task: str | None = None,
) -> dict[str, float]:
    """Embed queries (with the query prompt) and corpus (document prompt); rank by cosine.

    Usage: ``evaluate_retrieval(model, {"q1": "..."}, {"d1": "..."}, {"q1": {"d1"}})`` or with
    lists and, per query, the indices of its relevant corpus entries. Returns
    ``{"recall@1": ..., "recall@3": ..., "recall@5": ..., "recall@10": ..., "mrr@10": ...,
    "ndcg@10": ...}``.
    """
    if isinstance(queries, Mapping):
        query_ids, query_texts = list(queries), list(queries.values())
    else:
        query_ids, query_texts = list(range(len(queries))), list(queries)
    if isinstance(corpus, Mapping):
        doc_ids, doc_texts = list(corpus), list(corpus.values())
    else:
        doc_ids, doc_texts = list(range(len(corpus))), list(corpus)
    position = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    if isinstance(relevant, Mapping):
        sets = [relevant.get(qid, ()) for qid in query_ids]
    else:
        sets = list(relevant)
    relevant_idx = [{position[d] for d in docs} for docs in sets]
    q = model.encode_queries(query_texts, task=task, batch_size=batch_size)
    d = model.encode_documents(doc_texts, batch_size=batch_size)
    return retrieval_metrics(model.similarity(q, d), relevant_idx, ks)


def format_metrics(before: dict[str, float], after: dict[str, float] | None = None) -> str:
    """A small text table of metrics (and their change). Usage: ``print(format_metrics(b, a))``."""
    lines = [f"{'metric':<10} {'before':>8}" + (f" {'after':>8} {'change':>8}" if after else "")]
    for name, value in before.items():
        line = f"{name:<10} {value:>8.4f}"
        if after:
            line += f" {after[name]:>8.4f} {after[name] - value:>+8.4f}"
        lines.append(line)
    return "\n".join(lines)
