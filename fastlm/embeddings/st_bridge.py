"""A real ``SentenceTransformer`` built around a fastlm model's own modules (shared parameters).

Sentence-Transformers' ``Transformer`` module loads its model from a directory; fastlm hands it
the already loaded (patched, possibly LoRA-wrapped) body instead, and writes only the config and
tokenizer to a temporary directory for it to read. Pooling, Dense and Normalize are
Sentence-Transformers' own modules, with the Dense ``linear`` layers shared with fastlm's.
Training the result with ``SentenceTransformerTrainer`` therefore updates the fastlm model.
"""

from __future__ import annotations

import inspect
import tempfile

from torch import nn


def build_sentence_transformer(model):
    """``SentenceTransformer`` whose modules share ``model``'s parameters (see module doc)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "to_sentence_transformer needs sentence-transformers: pip install 'fastlm[embeddings]'"
        ) from error
    transformer_cls, pooling_cls, dense_cls, normalize_cls = _module_classes()

    class _SharedBodyTransformer(transformer_cls):
        """Sentence-Transformers' Transformer, with the model handed over instead of loaded."""

        def _load_model(self, *args, **kwargs):
            return body

    body = model.backbone
    with tempfile.TemporaryDirectory(prefix="fastlm-st-") as folder:
        model.base_model.config.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        options = {"max_seq_length": model.max_seq_length, "do_lower_case": model.do_lower_case}
        if "modality_config" in inspect.signature(transformer_cls.__init__).parameters:
            # Plain text in, token states out: Sentence-Transformers ≥ 6 would otherwise read the
            # tokenizer's chat template as a "message" modality and wrap texts in it.
            options["modality_config"] = {
                "text": {"method": "forward", "method_output_name": "last_hidden_state"}
            }
            options["module_output_name"] = "token_embeddings"
        transformer = _SharedBodyTransformer(folder, **options)
    modules: list[nn.Module] = [
        transformer,
        pooling_cls(model.hidden_size, pooling_mode=model.pooling),
    ]
    for layer in model.dense:
        shared = dense_cls(
            layer.in_features,
            layer.out_features,
            bias=layer.linear.bias is not None,
            activation_function=layer.activation,
        )
        shared.linear = layer.linear
        modules.append(shared)
    if model.normalize:
        modules.append(normalize_cls())
    st_model = SentenceTransformer(modules=modules, device=str(model.device))
    st_model.prompts = model._prompts_to_save()
    st_model.default_prompt_name = model.default_prompt_name
    return st_model


def _module_classes():
    try:  # sentence-transformers ≥ 6
        from sentence_transformers.base.modules import Dense, Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    return Transformer, Pooling, Dense, Normalize
