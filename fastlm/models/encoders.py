"""Encoder families (BERT and its descendants): no fastlm patches, only what embeddings need.

Their transformers code runs as is, with LoRA through plain PEFT. All of them use learned absolute
positions, so an input longer than the position table cannot be embedded.
"""

from __future__ import annotations

from dataclasses import dataclass

# BERT's naming: attention q/k/v, attention output, intermediate and output dense layers (the
# pooler's dense layer feeds no pooling mode, so callers exclude it).
BERT_PROJECTIONS = ("query", "key", "value", "dense")
# DistilBERT names its attention q/k/v/out and feed-forward linears differently.
DISTILBERT_PROJECTIONS = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")
MPNET_PROJECTIONS = ("q", "k", "v", "o", "dense")  # attention q/k/v/o; feed-forward as BERT's


@dataclass(frozen=True)
class EncoderSpec:
    """The facts fastlm's embedding loader needs about an encoder family."""

    model_type: str  # config.model_type
    family: str  # human name
    embedding_pooling: str = "mean"  # default pooling of a body without a saved one
    # Rows of the position table no token can use: RoBERTa's (and MPNet's) positions start after
    # padding_idx (1), so max_position_embeddings - 2 tokens fit.
    reserved_positions: int = 0
    lora_targets: tuple[str, ...] = BERT_PROJECTIONS  # default LoRA target module names


ENCODERS: dict[str, EncoderSpec] = {
    spec.model_type: spec
    for spec in (
        EncoderSpec("bert", "BERT"),
        EncoderSpec("xlm-roberta", "XLM-RoBERTa", embedding_pooling="cls", reserved_positions=2),
        EncoderSpec("roberta", "RoBERTa", reserved_positions=2),
        EncoderSpec("camembert", "CamemBERT", reserved_positions=2),
        EncoderSpec("distilbert", "DistilBERT", lora_targets=DISTILBERT_PROJECTIONS),
        EncoderSpec("mpnet", "MPNet", reserved_positions=2, lora_targets=MPNET_PROJECTIONS),
    )
}


def encoder_spec(model_type: str | None) -> EncoderSpec | None:
    """The encoder spec for a ``config.model_type``; None for decoders and unknown families.

    Usage: ``spec = encoder_spec(config.model_type)``.
    """
    return ENCODERS.get(model_type)
