"""Embedding models: one L2-normalised vector per text, trained with LoRA or fully.

from fastlm.embeddings import load_embedding_model, EmbeddingTrainer, InfoNCELoss
model, tokenizer = load_embedding_model("Qwen/Qwen3-Embedding-0.6B", lora_r=16)
EmbeddingTrainer(model, args, train_dataset=rows, loss=InfoNCELoss()).train()
model.save_pretrained("out")  # a Sentence-Transformers directory

See docs/embeddings.md.
"""

from fastlm.embeddings.data import EmbeddingCollator, normalize_row
from fastlm.embeddings.evaluation import evaluate_retrieval, format_metrics, retrieval_metrics
from fastlm.embeddings.gradcache import GradCacheInfoNCELoss
from fastlm.embeddings.losses import (
    ContrastiveLoss,
    CosineSimilarityLoss,
    EmbeddingLoss,
    InfoNCELoss,
    MultipleNegativesRankingLoss,
    OnlineContrastiveLoss,
    contrastive_loss,
    cosine_similarity_loss,
    infonce_loss,
    online_contrastive_loss,
)
from fastlm.embeddings.model import (
    PROMPT_STYLES,
    FastSentenceTransformer,
    PromptStyle,
    load_embedding_model,
)
from fastlm.embeddings.pooling import POOLING_MODES, Dense, pool
from fastlm.embeddings.trainer import EmbeddingTrainer

__all__ = [
    "POOLING_MODES",
    "PROMPT_STYLES",
    "ContrastiveLoss",
    "CosineSimilarityLoss",
    "Dense",
    "EmbeddingCollator",
    "EmbeddingLoss",
    "EmbeddingTrainer",
    "FastSentenceTransformer",
    "GradCacheInfoNCELoss",
    "InfoNCELoss",
    "MultipleNegativesRankingLoss",
    "OnlineContrastiveLoss",
    "PromptStyle",
    "contrastive_loss",
    "cosine_similarity_loss",
    "evaluate_retrieval",
    "format_metrics",
    "infonce_loss",
    "load_embedding_model",
    "normalize_row",
    "online_contrastive_loss",
    "pool",
    "retrieval_metrics",
]
