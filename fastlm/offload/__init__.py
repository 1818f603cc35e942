"""CPU offload: activations of gradient checkpointing, and 4-bit weights streamed layer by layer.

``enable_offloaded_checkpointing`` keeps checkpointed layer inputs in pinned CPU memory, and
``LAYER_GRAPHS`` replays those layers as CUDA graphs;
``stream_weights`` / ``FastModel.from_pretrained(..., load_in_4bit=True, offload_weights=True)``
keep NF4 decoder-layer weights in CPU RAM and stream them to the GPU (docs/big_models.md).
"""

from fastlm.offload.checkpoint import (
    BUDGET,
    PinnedBudget,
    enable_offloaded_checkpointing,
    offloaded_checkpoint,
)
from fastlm.offload.copy_engine import CopyEngine, CudaCopyEngine, SyncCopyEngine
from fastlm.offload.layer_graphs import LAYER_GRAPHS, LayerGraphs
from fastlm.offload.memory_plan import HostBudget, HostMemoryError, MemoryPlan, plan_memory
from fastlm.offload.streamed_loading import build_random_nf4_model, load_streamed_model
from fastlm.offload.streamer import (
    WeightStreamer,
    WeightStreamingError,
    get_weight_streamer,
    place_trainable,
    stream_weights,
    unstream_weights,
)

__all__ = [
    "BUDGET",
    "CopyEngine",
    "CudaCopyEngine",
    "HostBudget",
    "HostMemoryError",
    "LAYER_GRAPHS",
    "LayerGraphs",
    "MemoryPlan",
    "PinnedBudget",
    "SyncCopyEngine",
    "WeightStreamer",
    "WeightStreamingError",
    "build_random_nf4_model",
    "enable_offloaded_checkpointing",
    "get_weight_streamer",
    "load_streamed_model",
    "offloaded_checkpoint",
    "place_trainable",
    "plan_memory",
    "stream_weights",
    "unstream_weights",
]
