"""``EmbeddingTrainer``: the Hugging Face ``Trainer`` for embedding losses.

trainer = EmbeddingTrainer(model, TrainingArguments("out", ...), train_dataset=rows,
                           loss=InfoNCELoss(temperature=0.05))
trainer.train()

Differences from ``Trainer``: the dataset's text columns are kept (``remove_unused_columns`` is
forced off) and tokenised by ``EmbeddingCollator``; the loss is ``loss.batch_loss(model, batch)``;
evaluation reports the loss only; saves write a Sentence-Transformers directory (LoRA merged)
plus ``fastlm_trainable.safetensors`` (the trainable tensors), which resuming reloads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from fastlm.embeddings.data import EmbeddingCollator
from fastlm.embeddings.losses import EmbeddingLoss, InfoNCELoss
from fastlm.export._atomic import atomic_directory
from fastlm.models.finite_guard import FiniteLossMonitor, verify_finite

TRAINABLE_STATE_NAME = "fastlm_trainable.safetensors"
logger = logging.getLogger("fastlm")


class EmbeddingTrainer(Trainer):
    """``Trainer`` for a ``FastSentenceTransformer`` and an ``EmbeddingLoss`` (see module doc).

    Usage: ``EmbeddingTrainer(model, args, train_dataset=ds, loss=InfoNCELoss()).train()``.
    ``prompts`` (``{"query": ..., "response": ...}``) overrides the model's prefixes.
    ``check_finite_loss``: raise ``NonFiniteLossError`` on a NaN/inf training loss (as
    ``FastModel``; on CUDA the check is asynchronous and names the step). NaN/inf gradients are
    stopped by the guard the loaders put on the model (``fastlm.models.finite_guard``), and
    checkpoints holding NaN/inf trained weights are refused (``NonFiniteWeightsError``).
    ``padding_free``: True / False sets the model's ``padding_free`` (each set of texts laid end
    to end in one row where the body runs that exactly); None keeps the model's (default on).
    ``batch_path`` says which layout the batches take, and why padded.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        loss: EmbeddingLoss | None = None,
        data_collator: Any = None,
        prompts: dict[str, str] | None = None,
        check_finite_loss: bool = True,
        padding_free: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="embedding_trainer_output")
        args.remove_unused_columns = False  # the text columns are the inputs
        self.loss = loss if loss is not None else InfoNCELoss()
        self.loss_monitor = FiniteLossMonitor() if check_finite_loss else None
        if padding_free is not None:
            model.padding_free = padding_free
        if data_collator is None:
            data_collator = EmbeddingCollator(model, prompts)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )

    @property
    def batch_path(self):
        """The model's ``batch_path()``: ``BatchPath(layout, reason)`` ("" when padding-free);
        None for a model without one (a reranker)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.batch_path() if hasattr(model, "batch_path") else None

    def train(self, *args, **kwargs):
        """``Trainer.train`` after one log line naming the batch layout (and why padded).

        Usage: ``EmbeddingTrainer(model, args, train_dataset=rows).train()``.
        """
        path = self.batch_path
        if path is not None:  # which layout the steps run, as the loaders report fused paths
            reason = f" ({path.reason})" if path.reason else ""
            logger.info("%s: %s batches%s", type(self).__name__, path.layout, reason)
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.loss.batch_loss(model, inputs)
        if self.loss_monitor is not None and model.training:
            self.loss_monitor.watch(loss, model)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.loss.batch_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        verify_finite(model)  # before anything is written: a pending CUDA verdict, NaN weights
        output_dir.mkdir(parents=True, exist_ok=True)
        self._write_model(model, output_dir)
        _save_trainable(model, output_dir / TRAINABLE_STATE_NAME)
        torch.save(self.args, output_dir / "training_args.bin")

    def _write_model(self, model: nn.Module, output_dir: Path) -> None:
        """The model part of a checkpoint: a Sentence-Transformers folder, written as exports
        write (staged under fastlm's temporary name in the folder, which may already hold the
        trainer's other files, then moved in file by file; a killed save's leftovers are
        removed by the next save there)."""
        with atomic_directory(output_dir) as staged:
            model._write_sentence_transformer(staged, None, "5GB")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        _load_trainable(model, Path(resume_from_checkpoint) / TRAINABLE_STATE_NAME)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _save_trainable(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    save_file(state, str(path))


def _load_trainable(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a checkpoint written by EmbeddingTrainer")
    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing}, unknown {unknown}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
