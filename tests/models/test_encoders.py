"""Encoder specs: families, default pooling, and how many tokens fit the learned position table."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from fastlm.models import ENCODERS, SPECS, embedding_pooling, encoder_spec

POSITIONS = 20
# Tiny configs; DistilBERT names its sizes differently.
_SIZES = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40)
_DISTILBERT_SIZES = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=40)


def test_encoder_families_and_their_defaults():
    assert set(ENCODERS) == {"bert", "xlm-roberta", "roberta", "camembert", "distilbert", "mpnet"}
    assert not set(ENCODERS) & set(SPECS)  # a family is a decoder or an encoder, not both
    assert {t for t in ENCODERS if embedding_pooling(t) != "mean"} == {"xlm-roberta"}
    assert embedding_pooling("xlm-roberta") == "cls"
    assert encoder_spec("qwen3") is None and encoder_spec(None) is None
    assert encoder_spec("bert").lora_targets == ("query", "key", "value", "dense")


def _body(model_type: str):
    sizes = _DISTILBERT_SIZES if model_type == "distilbert" else _SIZES
    config = AutoConfig.for_model(
        model_type, vocab_size=50, max_position_embeddings=POSITIONS, **sizes
    )
    return AutoModel.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_reserved_positions_leave_exactly_the_tokens_that_fit(model_type):
    """max_position_embeddings - reserved_positions tokens embed; one more indexes past it."""
    body = _body(model_type)
    fits = POSITIONS - encoder_spec(model_type).reserved_positions
    ids = torch.full((1, fits + 1), 5)
    with torch.no_grad():
        body(input_ids=ids[:, :fits], attention_mask=torch.ones_like(ids[:, :fits]))
        with pytest.raises((IndexError, RuntimeError)):
            body(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("model_type", sorted(ENCODERS))
def test_default_lora_targets_name_linear_layers_of_the_family(model_type):
    """Each default target matches a linear layer of a real transformers body of the family
    (PEFT matches a name against the end of a module path)."""
    linear = {name.rsplit(".", 1)[-1] for name, m in _body(model_type).named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    assert set(encoder_spec(model_type).lora_targets) <= linear
