"""Gradient-cached InfoNCE (GradCache, Gao et al. 2021): big batches of negatives, small memory.

The loss L(e) depends on the parameters θ only through the embeddings e = f_θ(x), so

    ∂L/∂θ = Σ_i (∂L/∂e_i) · ∂e_i/∂θ.

1. embed every text in mini-batches *without* a graph (activation memory of one mini-batch);
2. compute L and g_i = ∂L/∂e_i on those detached embeddings (cheap: B × D numbers);
3. on ``loss.backward()``: re-embed each mini-batch *with* a graph and back-propagate the
   surrogate Σ_i ⟨e_i, g_i · ∂out⟩ (∂out: the incoming gradient, e.g. a loss-scaler factor),
   accumulating exactly ∂L/∂θ, one mini-batch at a time.

Dropout: each mini-batch's RNG state is recorded in step 1 and restored in step 3, so the
re-embedding draws the same masks. Autocast: the state at ``batch_loss`` time is restored for the
re-embedding, which runs during backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastlm.embeddings.losses import InfoNCELoss, _mask_and_ids, _scatter_negatives


class GradCacheInfoNCELoss(InfoNCELoss):
    """InfoNCE (``infonce_loss``) whose memory does not grow with the batch: see module doc.

    Usage: ``EmbeddingTrainer(model, args, train_dataset=data,
    loss=GradCacheInfoNCELoss(mini_batch_size=16, temperature=0.05))`` with a large
    ``per_device_train_batch_size``. Gradients equal plain InfoNCE's on the same batch.
    """

    def __init__(self, mini_batch_size: int = 16, **infonce_kwargs) -> None:
        super().__init__(**infonce_kwargs)
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.mini_batch_size = mini_batch_size

    def batch_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        groups = [batch["query"], batch["response"]]
        if "rejected" in batch:
            groups.append(batch["rejected"])
        chunks = [_split(group, self.mini_batch_size) for group in groups]
        states = []  # per group, per mini-batch: the RNG state before its forward
        embeddings = []
        with torch.no_grad():
            for group in chunks:
                group_states, outputs = [], []
                for inputs in group:
                    group_states.append(_RngState.capture(inputs["input_ids"].device))
                    outputs.append(model(**inputs))
                states.append(group_states)
                embeddings.append(torch.cat(outputs))
        leaves = [e.detach().requires_grad_() for e in embeddings]
        with torch.enable_grad():
            negatives = None
            if len(leaves) == 3:
                negatives = _scatter_negatives(leaves[2], batch["rejected_mask"])
            loss = self(leaves[0], leaves[1], negatives, **_mask_and_ids(batch))
        trainable = any(p.requires_grad for p in model.parameters())
        if not (torch.is_grad_enabled() and trainable):
            return loss.detach()
        grads = torch.autograd.grad(loss, leaves)
        autocast = _AutocastState.capture(leaves[0].device.type)

        def replay(scale: torch.Tensor) -> None:
            for group, group_states, grad in zip(chunks, states, grads):
                start = 0
                for inputs, state in zip(group, group_states):
                    rows = inputs["input_ids"].shape[0]
                    cached = grad[start : start + rows] * scale
                    start += rows
                    with state.restored(), autocast.restored(), torch.enable_grad():
                        output = model(**inputs)
                        torch.autograd.backward(output, cached.to(output.dtype))

        anchor = torch.zeros((), device=loss.device, requires_grad=True)
        return _ReplayOnBackward.apply(loss.detach(), anchor, replay)


class _ReplayOnBackward(torch.autograd.Function):
    """Identity on the loss value; its backward runs the mini-batch re-embedding (step 3)."""

    @staticmethod
    def forward(ctx, loss, anchor, replay):
        ctx.replay = replay
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.replay(grad_output)
        return None, None, None


def _split(inputs: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    rows = inputs["input_ids"].shape[0]
    pieces = []
    for start in range(0, rows, size):
        piece = {k: v[start : start + size] for k, v in inputs.items()}
        # Trim columns that are padding for every row of this mini-batch (less compute; the
        # pooled vectors do not depend on how much padding a batch carries).
        real = piece["attention_mask"].bool().any(dim=0)
        columns = real.nonzero().flatten()
        if columns.numel():
            first, last = columns[0].item(), columns[-1].item() + 1
            piece = {k: v[:, first:last] for k, v in piece.items()}
        pieces.append(piece)
    return pieces


class _RngState:
    def __init__(self, cpu: torch.Tensor, cuda: torch.Tensor | None, device: torch.device):
        self.cpu, self.cuda, self.device = cpu, cuda, device

    @classmethod
    def capture(cls, device: torch.device) -> _RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _AutocastState:
    def __init__(self, device_type: str, enabled: bool, dtype: torch.dtype):
        self.device_type, self.enabled, self.dtype = device_type, enabled, dtype

    @classmethod
    def capture(cls, device_type: str) -> _AutocastState:
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def restored(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)
