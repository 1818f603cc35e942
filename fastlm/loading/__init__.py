"""Loading: from a checkpoint to a patched (and LoRA-wrapped) model, one pipeline for causal LMs,
embedding models and rerankers. Sits above ``models`` and ``offload``; ``api``, ``embeddings``
and the commands call it."""
