"""The facade users call: ``FastModel`` (also importable as ``FastLanguageModel``).

from fastlm import FastModel
model, tokenizer = FastModel.from_pretrained("path/or/name", max_seq_length=2048)
model = FastModel.get_peft_model(model, r=16, lora_alpha=16)

Nothing inside the package imports this module: the work is done by ``fastlm.loading`` (the
pipeline), ``fastlm.embeddings`` (``embedding_mode=True``) and ``fastlm.export`` (the
``save_pretrained_merged`` / ``save_pretrained_gguf`` methods attached to the models it returns).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from fastlm import models
from fastlm.embeddings import FastSentenceTransformer, load_embedding_model
from fastlm.export import save_pretrained_gguf, save_pretrained_merged
from fastlm.loading import pipeline
from fastlm.loading.checkpointing import (
    enable_checkpointing,
    release_checkpoint_function,
    set_use_cache,
)


class FastModel:
    """Load, patch and LoRA-wrap Hugging Face causal LMs (the families in ``models.SPECS``)."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = None,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool = False,
        full_finetuning: bool = False,
        device_map: str | dict | None = "auto",
        token: str | None = None,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: bool | str = True,
        random_state: int = 3407,
        load_in_16bit: bool = True,
        allow_untested_versions: bool = False,
        check_finite_loss: bool = True,
        check_finite_weights: bool = True,
        embedding_mode: bool = False,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load a checkpoint, patch it with fastlm's kernels, return ``(model, tokenizer)``.

        Usage: ``model, tok = FastModel.from_pretrained("./llama", max_seq_length=4096)``.
        ``tokenizer`` is None when the folder has no tokenizer files. ``embedding_mode=True``
        returns a ``fastlm.embeddings.FastSentenceTransformer`` (one normalised vector per text;
        see docs/embeddings.md) instead of a causal LM. ``check_finite_weights=False`` skips the
        load-time check for NaN/inf weights (``NonFiniteWeightsError``). ``load_in_16bit`` is
        Unsloth's flag, accepted for its scripts (``dtype`` decides).
        """
        options = dict(
            max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            full_finetuning=full_finetuning, device_map=device_map, token=token,
            trust_remote_code=trust_remote_code,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
            allow_untested_versions=allow_untested_versions, check_finite_loss=check_finite_loss,
            check_finite_weights=check_finite_weights,
        )  # fmt: skip
        if embedding_mode:  # max_seq_length None: the folder's own (Sentence-Transformers)
            return load_embedding_model(
                model_name, load_in_16bit=load_in_16bit, **options, **kwargs
            )
        model, tokenizer = pipeline.load_causal_lm(model_name, **options, **kwargs)
        _attach_export_methods(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: list[int] | None = None,
        use_gradient_checkpointing: bool | str = True,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
        ensure_weight_tying: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        """Wrap a fastlm-loaded model with LoRA adapters (a normal ``peft.PeftModel``).

        Usage: ``model = FastModel.get_peft_model(model, r=16, lora_alpha=16)``.
        Layers that cannot run fused (dropout, DoRA, bias...) still work through PEFT and are
        listed by ``FastModel.fused_report(model)``.
        """
        lora_options = dict(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            layers_to_transform=layers_to_transform,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            use_dora=use_dora,
            ensure_weight_tying=ensure_weight_tying,
            target_modules=target_modules,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
        )
        if isinstance(model, FastSentenceTransformer):  # embedding_mode=True: BERT targets too
            return model.get_peft_model(**lora_options, **kwargs)
        peft_model = pipeline.add_causal_lm_lora(model, **lora_options, **kwargs)
        _attach_export_methods(peft_model)
        return peft_model

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool | str = True) -> nn.Module:
        """Switch to training mode (checkpointing on, KV cache off). Usage: ``for_training(m)``."""
        model.train()
        enable_checkpointing(model, use_gradient_checkpointing)
        set_use_cache(model, False)
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Switch to generation mode (eval, KV cache on). Usage: ``for_inference(m)``."""
        model.eval()
        set_use_cache(model, True)
        return model

    @staticmethod
    def fused_report(model: nn.Module) -> models.FusedReport:
        """Which projections run fused and why the others do not (a list of rows), and which
        attention each attention module runs and why when not fastlm's flash kernel
        (``.attention``). Usage: ``for row in FastModel.fused_report(model): print(row)``."""
        return models.fused_report(model)

    @staticmethod
    def unpatch(model: nn.Module) -> nn.Module:
        """Remove fastlm's patches: the model runs transformers' own code again (and its own
        checkpointing enable methods)."""
        release_checkpoint_function(model)
        return models.unpatch_model(model)


FastLanguageModel = FastModel


def _attach_export_methods(model: nn.Module) -> None:
    """``model.save_pretrained_merged(...)`` / ``model.save_pretrained_gguf(...)`` as Unsloth users
    call them (instance attributes, like the other patches: no class is changed)."""

    def save_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
        return save_pretrained_merged(self, save_directory, tokenizer, save_method, **kwargs)

    def save_gguf(self, save_directory, tokenizer, quantization_method="q8_0", **kwargs):
        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, **kwargs)

    model.save_pretrained_merged = types.MethodType(save_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_gguf, model)
