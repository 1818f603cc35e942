"""Which streamed decoder layer is in which GPU slot: the direct-mapped home-slot policy.

Pure bookkeeping, no tensors: ``ResidencyPolicy.access`` turns "the model enters layer i" into
``Copy`` (host to slot) and ``Wait`` (compute waits for that copy) actions, which the
``WeightStreamer`` carries out and ``memory_plan.simulate_copies`` counts.

- Residency is direct-mapped: the layer at streamed position ``p`` always uses slot
  ``p % slots`` (its *home* slot), at the same offsets.
- Why home slots: bitsandbytes' own ``MatMul4Bit`` (modules that do not run fused, e.g. LoRA
  dropout) keeps a *view* of the packed weight from the forward in ``ctx`` -- outside autograd's
  saved tensors, so checkpointing cannot re-create it. With a layer always in the same slot at
  the same offsets, that view reads the right bytes again whenever the layer is resident, which
  the streamer's gradient hook guarantees for its backward. fastlm's fused LoRA Functions save
  the ``Params4bit`` itself (autograd keeps the leaf object, whose ``.data`` is the binding at
  backward time). So training is exact with or without gradient checkpointing.

    policy = ResidencyPolicy(n_layers=32, streamed=list(range(32)), slots=2)
    policy.access(0, backward=False, grad=True)  # [Copy(0, 0, None), Wait(0, 0), Copy(1, 1, None)]
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

__all__ = ["Copy", "ResidencyPolicy", "Wait"]


class Copy(NamedTuple):
    """Copy streamed ``layer`` into ``slot``; ``evict``: the layer that held the slot, if any."""

    layer: int
    slot: int
    evict: int | None


class Wait(NamedTuple):
    """The compute stream waits for ``layer``'s copy; its weights are then bound to ``slot``."""

    layer: int
    slot: int


class ResidencyPolicy:
    """Which streamed layer is in which GPU slot: pure bookkeeping, no tensors.

    A streamed layer is on the host, in flight (copy started) or resident. The layer at streamed
    position ``p`` always uses slot ``p % slots``. ``access(layer, backward, grad)`` returns the
    actions for entering ``layer``: its copy if needed, the wait, then the copies of the next
    ``slots - 1`` streamed layers in the direction of travel (forward; backward; wrapping to layer
    0 in inference), stopping at a layer whose slot is taken by the current one or an earlier
    target. Usage: ``ResidencyPolicy(32, list(range(32)), 2).access(0, False, True)``.
    """

    def __init__(self, n_layers: int, streamed: list[int], slots: int):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.n_layers = n_layers
        self.slots = slots
        self.position = {layer: p for p, layer in enumerate(streamed)}
        self.state = dict.fromkeys(self.position, "host")
        self.owner: list[int | None] = [None] * slots

    def home(self, layer: int) -> int:
        return self.position[layer] % self.slots

    def access(self, layer: int, backward: bool, grad: bool) -> list:
        actions: list = []
        if layer in self.position:
            actions += self._fetch(layer)
            if self.state[layer] == "inflight":
                self.state[layer] = "resident"
                actions.append(Wait(layer, self.home(layer)))
        for target in self.upcoming(layer, backward, grad):
            actions += self._fetch(target)
        return actions

    def upcoming(self, layer: int, backward: bool, grad: bool) -> list[int]:
        """The streamed layers to prefetch after entering ``layer``."""
        n = self.n_layers
        if backward:
            order: Any = range(layer - 1, -1, -1)
        elif grad:  # training: the backward comes next and starts with the layers just used
            order = range(layer + 1, n)
        else:  # inference: the next forward (next token) starts at layer 0
            order = itertools.chain(range(layer + 1, n), range(0, layer))
        taken = {self.home(layer)} if layer in self.position else set()
        targets: list[int] = []
        for target in order:
            if len(targets) >= self.slots - 1:
                break
            if target not in self.position:
                continue
            slot = self.home(target)
            if slot in taken:
                break
            taken.add(slot)
            targets.append(target)
        return targets

    def _fetch(self, layer: int) -> list:
        if self.state[layer] != "host":
            return []
        slot = self.home(layer)
        evicted = self.owner[slot]
        if evicted is not None:
            self.state[evicted] = "host"
        self.owner[slot] = layer
        self.state[layer] = "inflight"
        return [Copy(layer, slot, evicted)]
