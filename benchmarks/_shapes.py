"""The model shapes the training benchmark runs: plain data, one entry per shape.

A shape is a transformers `model_type`, the config keyword arguments that define the architecture
(random-init weights are built from them), and the batch / sequence length of the reference loop.
To add a model, add an entry to `SHAPES`; nothing else in the harness needs to change (Liger's
patch function is looked up as `apply_liger_kernel_to_<liger>`, `liger` defaulting to the
`model_type`).

Stdlib only: the benchmark's child processes import this before deciding what else to import
(Unsloth must be imported before transformers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    """One benchmarked architecture: `AutoConfig.for_model(model_type, **config)`, batch, seq."""

    name: str
    model_type: str
    config: dict = field(hash=False)
    batch: int
    seq: int = 2048
    liger: str | None = None  # suffix of liger_kernel.transformers.apply_liger_kernel_to_*
    tiny: bool = False  # a CPU smoke-test shape
    attn_implementation: str = "sdpa"  # Gemma 2 soft-caps attention logits: eager only in HF

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def fingerprint(self) -> str:
        """Hash of everything that determines the checkpoint's weights (used to reuse caches)."""
        blob = json.dumps({"model_type": self.model_type, "config": self.config}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return asdict(self)


def _llama3_rope(factor: float) -> dict:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_LLAMA3_COMMON = {
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

_TINY_LLAMA = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape(
            name="llama-3.2-1b",
            model_type="llama",
            batch=4,
            config={
                **_LLAMA3_COMMON,
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "head_dim": 64,
                "tie_word_embeddings": True,
                "rope_parameters": _llama3_rope(32.0),
            },
        ),
        Shape(
            name="llama-3.1-8b",
            model_type="llama",
            batch=2,
            config={
                **_LLAMA3_COMMON,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "head_dim": 128,
                "tie_word_embeddings": False,
                "rope_parameters": _llama3_rope(8.0),
            },
        ),
        Shape(
            name="qwen3-4b",
            model_type="qwen3",
            batch=2,
            config={
                "vocab_size": 151936,
                "hidden_size": 2560,
                "intermediate_size": 9728,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6,
                "hidden_act": "silu",
                "attention_bias": False,
                "tie_word_embeddings": True,
                "use_sliding_window": False,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        Shape(
            name="mistral-7b",
            model_type="mistral",
            batch=2,
            config={
                "vocab_size": 32768,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-5,
                "hidden_act": "silu",
                "sliding_window": None,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        Shape(
            name="gemma2-2b",
            model_type="gemma2",
            batch=2,
            attn_implementation="eager",
            config={
                "vocab_size": 256000,
                "hidden_size": 2304,
                "intermediate_size": 9216,
                "num_hidden_layers": 26,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "query_pre_attn_scalar": 256,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6,
                "hidden_activation": "gelu_pytorch_tanh",
                "sliding_window": 4096,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "tie_word_embeddings": True,
                "bos_token_id": 2,
                "eos_token_id": 1,
                "pad_token_id": 0,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        Shape(
            name="qwen2.5-7b",
            model_type="qwen2",
            batch=2,
            config={
                "vocab_size": 152064,
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6,
                "hidden_act": "silu",
                "tie_word_embeddings": False,
                "use_sliding_window": False,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        Shape(
            name="gemma-2b",
            model_type="gemma",
            batch=2,
            config={
                "vocab_size": 256000,
                "hidden_size": 2048,
                "intermediate_size": 16384,
                "num_hidden_layers": 18,
                "num_attention_heads": 8,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6,
                "hidden_activation": "gelu_pytorch_tanh",
                "tie_word_embeddings": True,
                "bos_token_id": 2,
                "eos_token_id": 1,
                "pad_token_id": 0,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        Shape(
            name="tiny-llama",
            model_type="llama",
            batch=2,
            seq=32,
            tiny=True,
            config=_TINY_LLAMA,
        ),
        Shape(
            name="tiny-gemma3",
            model_type="gemma3_text",
            batch=2,
            seq=32,
            tiny=True,
            config={
                "vocab_size": 128,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "max_position_embeddings": 256,
                "sliding_window": 16,  # shorter than seq, so the sliding mask matters
                "layer_types": ["sliding_attention", "full_attention"],
                "tie_word_embeddings": True,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                },
            },
        ),
    ]
}


def get_shape(name: str) -> Shape:
    """`get_shape("llama-3.2-1b")` -> Shape; a clear error listing the known names otherwise."""
    try:
        return SHAPES[name]
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None


def make_config(shape: Shape):
    """The transformers config of a shape (imports transformers)."""
    import copy

    from transformers import AutoConfig

    return AutoConfig.for_model(shape.model_type, **copy.deepcopy(shape.config))
