"""Embedding models (one L2-normalised vector per text) and rerankers, trained with LoRA or fully.

from fastlm.embeddings import load_embedding_model, EmbeddingTrainer, InfoNCELoss
model, tokenizer = load_embedding_model("Qwen/Qwen3-Embedding-0.6B", lora_r=16)
EmbeddingTrainer(model, args, train_dataset=rows, loss=InfoNCELoss()).train()
model.save_pretrained("out")  # a Sentence-Transformers directory
reranker = FastReranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B")  # yes/no-logit scores

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
from fastlm.embeddings.padding_free import BatchPath
from fastlm.embeddings.pooling import POOLING_MODES, Dense, pool, pool_packed
from fastlm.embeddings.reranker import (
    GEMMA_RERANKER_TEMPLATE,
    QWEN3_RERANKER_TEMPLATE,
    FastReranker,
    ListwiseRerankLoss,
    PointwiseRerankLoss,
    RerankerCollator,
    RerankerTemplate,
    RerankerTrainer,
    RerankLoss,
    answer_logits,
    listwise_rerank_loss,
    pointwise_rerank_loss,
)
from fastlm.embeddings.trainer import EmbeddingTrainer

__all__ = [
    "GEMMA_RERANKER_TEMPLATE",
    "POOLING_MODES",
    "PROMPT_STYLES",
    "BatchPath",
    "QWEN3_RERANKER_TEMPLATE",
    "ContrastiveLoss",
    "CosineSimilarityLoss",
    "Dense",
    "EmbeddingCollator",
    "EmbeddingLoss",
    "EmbeddingTrainer",
    "FastReranker",
    "FastSentenceTransformer",
    "GradCacheInfoNCELoss",
    "InfoNCELoss",
    "ListwiseRerankLoss",
    "MultipleNegativesRankingLoss",
    "OnlineContrastiveLoss",
    "PointwiseRerankLoss",
    "PromptStyle",
    "RerankLoss",
    "RerankerCollator",
    "RerankerTemplate",
    "RerankerTrainer",
    "answer_logits",
    "contrastive_loss",
    "cosine_similarity_loss",
    "evaluate_retrieval",
    "format_metrics",
    "infonce_loss",
    "listwise_rerank_loss",
    "load_embedding_model",
    "normalize_row",
    "online_contrastive_loss",
    "pointwise_rerank_loss",
    "pool",
    "pool_packed",
    "retrieval_metrics",
]
