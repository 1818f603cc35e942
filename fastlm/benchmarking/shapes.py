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
ATTENTION_TARGETS = LORA_TARGETS[:4]
# A mixture-of-experts shape's experts, by PEFT's target_parameters (every system the same, so
# no library's own reading of "gate_proj" on experts, e.g. PEFT's fused rank doubling, enters).
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


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
    # LoRA targets: the seven projections, or (a MoE shape) attention modules + expert parameters
    lora_modules: tuple[str, ...] = tuple(LORA_TARGETS)
    lora_parameters: tuple[str, ...] = ()

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def lora_targets(self) -> dict:
        """The target keywords of every system's LoRA: ``target_modules`` and, on a MoE shape,
        ``target_parameters``."""
        targets: dict = {"target_modules": list(self.lora_modules)}
        if self.lora_parameters:
            targets["target_parameters"] = list(self.lora_parameters)
        return targets

    def fingerprint(self) -> str:
        """Hash of everything that determines the checkpoint's weights (used to reuse caches)."""
        blob = json.dumps({"model_type": self.model_type, "config": self.config}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return asdict(self)


def dims(
    *, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra
) -> dict:
    """The size entries of a config (`extra`: more entries, e.g. head_dim)."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        **extra,
    }


def default_rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


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


def _llama3(
    *, hidden: int, intermediate: int, layers: int, head_dim: int, tie: bool, rope_factor: float
) -> dict:
    """A Llama 3.x config: the family's common entries plus what differs between the sizes."""
    return {
        **_LLAMA3_COMMON,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "head_dim": head_dim,
        "tie_word_embeddings": tie,
        "rope_parameters": _llama3_rope(rope_factor),
    }


# What the Qwen2 / Qwen2.5 / Qwen3 configs share (Qwen3 adds head_dim and attention_bias).
QWEN_COMMON = {
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "rope_parameters": default_rope(1000000.0),
}
_GEMMA_COMMON = {
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "rope_parameters": default_rope(10000.0),
}
# The CPU smoke-test shapes' sizes.
TINY_DIMS = {
    **dims(vocab=128, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
    "max_position_embeddings": 256,
}

_TINY_LLAMA = {
    **TINY_DIMS,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": default_rope(10000.0),
}

# fmt: off
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape(
            name="llama-3.2-1b",
            model_type="llama",
            batch=4,
            config=_llama3(hidden=2048, intermediate=8192, layers=16, head_dim=64, tie=True,
                           rope_factor=32.0),
        ),
        Shape(
            name="llama-3.1-8b",
            model_type="llama",
            batch=2,
            config=_llama3(hidden=4096, intermediate=14336, layers=32, head_dim=128, tie=False,
                           rope_factor=8.0),
        ),
        Shape(
            name="qwen3-4b",
            model_type="qwen3",
            batch=2,
            config={
                **QWEN_COMMON,
                **dims(vocab=151936, hidden=2560, intermediate=9728, layers=36,
                       heads=32, kv_heads=8, head_dim=128),
                "max_position_embeddings": 40960,
                "attention_bias": False,
                "tie_word_embeddings": True,
            },
        ),
        Shape(
            name="mistral-7b",
            model_type="mistral",
            batch=2,
            config={
                **dims(vocab=32768, hidden=4096, intermediate=14336, layers=32,
                       heads=32, kv_heads=8, head_dim=128),
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-5,
                "hidden_act": "silu",
                "sliding_window": None,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "rope_parameters": default_rope(1000000.0),
            },
        ),
        Shape(
            name="gemma2-2b",
            model_type="gemma2",
            batch=2,
            attn_implementation="eager",
            config={
                **_GEMMA_COMMON,
                **dims(vocab=256000, hidden=2304, intermediate=9216, layers=26,
                       heads=8, kv_heads=4, head_dim=256),
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
            },
        ),
        Shape(
            name="qwen2.5-7b",
            model_type="qwen2",
            batch=2,
            config={
                **QWEN_COMMON,
                **dims(vocab=152064, hidden=3584, intermediate=18944, layers=28,
                       heads=28, kv_heads=4),
                "tie_word_embeddings": False,
            },
        ),
        Shape(
            name="gemma-2b",
            model_type="gemma",
            batch=2,
            config={
                **_GEMMA_COMMON,
                **dims(vocab=256000, hidden=2048, intermediate=16384, layers=18,
                       heads=8, kv_heads=1, head_dim=256),
            },
        ),
        # This year's families (issue 17), as transformers 5.23's config classes document them
        # (their defaults): Qwen3.5 text 8.95B parameters (24 Gated DeltaNet and 8 gated full-
        # attention layers); Gemma 4 text 5.1B, 2.6B of them embedding tables (the per-layer
        # input tables included), so about 2.5B in its 30 layers.
        Shape(
            name="qwen3.5-9b",
            model_type="qwen3_5_text",
            batch=2,
            config=dims(vocab=248320, hidden=4096, intermediate=12288, layers=32, heads=16,
                        kv_heads=4, head_dim=256),
        ),
        Shape(
            name="gemma4-4b",
            model_type="gemma4_text",
            batch=2,
            config=dims(vocab=262144, hidden=2304, intermediate=9216, layers=30, heads=8,
                        kv_heads=4, head_dim=256),
        ),
        # Mixture-of-experts (issue 18). Qwen3-30B-A3B's layer (128 experts of width 768, 8 per
        # token) in 24 of its 48 layers: 15.6B parameters, 31 GB in bf16, so the random-weight
        # checkpoint fits the benchmark machine's disk (the whole 61 GB would not).
        Shape(
            name="qwen3-30b-a3b-24l",
            model_type="qwen3_moe",
            batch=1,
            lora_modules=tuple(ATTENTION_TARGETS),
            lora_parameters=EXPERT_PARAMETERS,
            config={
                **QWEN_COMMON,
                **dims(vocab=151936, hidden=2048, intermediate=6144, layers=24, heads=32,
                       kv_heads=4, head_dim=128),
                "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "router_aux_loss_coef": 0.001, "max_position_embeddings": 40960,
                "attention_bias": False, "tie_word_embeddings": False,
            },
        ),
        # gpt-oss-20b: 24 layers alternating sliding (128) and full attention with sinks, 32
        # experts of width 2880, 4 per token, 20.9B parameters (42 GB in bf16). transformers'
        # gpt-oss attention has no SDPA path (the sinks): eager, as for Gemma 2.
        Shape(
            name="gpt-oss-20b",
            model_type="gpt_oss",
            batch=1,
            attn_implementation="eager",
            lora_modules=tuple(ATTENTION_TARGETS),
            lora_parameters=EXPERT_PARAMETERS,
            config={
                **dims(vocab=201088, hidden=2880, intermediate=2880, layers=24, heads=64,
                       kv_heads=8, head_dim=64),
                "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention"] * 12,
                "swiglu_limit": 7.0, "router_aux_loss_coef": 0.001, "attention_bias": True,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "max_position_embeddings": 131072,
                "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                    "original_max_position_embeddings": 4096},
            },
        ),
        Shape(
            name="tiny-gpt-oss",
            model_type="gpt_oss",
            batch=2,
            seq=32,
            tiny=True,
            attn_implementation="eager",
            lora_modules=tuple(ATTENTION_TARGETS),
            lora_parameters=EXPERT_PARAMETERS,
            config={**TINY_DIMS, "head_dim": 16, "intermediate_size": 48, "num_local_experts": 5,
                    "num_experts_per_tok": 2, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
        ),
        Shape(
            name="tiny-qwen3-moe",
            model_type="qwen3_moe",
            batch=2,
            seq=32,
            tiny=True,
            lora_modules=tuple(ATTENTION_TARGETS),
            lora_parameters=EXPERT_PARAMETERS,
            config={**TINY_DIMS, "head_dim": 16, "moe_intermediate_size": 48, "num_experts": 5,
                    "num_experts_per_tok": 2, "norm_topk_prob": True, "mlp_only_layers": [],
                    "decoder_sparse_step": 1},
        ),
        # CPU dry-run twins of the two above: every layer kind present (tests/tiny_models.py's).
        Shape(
            name="tiny-qwen3.5",
            model_type="qwen3_5_text",
            batch=2,
            seq=32,
            tiny=True,
            config={**TINY_DIMS, "head_dim": 16, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16, "num_hidden_layers": 4},
        ),
        Shape(
            name="tiny-gemma4",
            model_type="gemma4_text",
            batch=2,
            seq=32,
            tiny=True,
            config={**TINY_DIMS, "head_dim": 16, "global_head_dim": 32, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8},
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
                **TINY_DIMS,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": 16,  # shorter than seq, so the sliding mask matters
                "layer_types": ["sliding_attention", "full_attention"],
                "tie_word_embeddings": True,
                "rope_parameters": {
                    "sliding_attention": default_rope(10000.0),
                    "full_attention": default_rope(1000000.0),
                },
            },
        ),
    ]
}
# fmt: on


def get_shape(name: str, shapes: dict[str, Shape] = SHAPES) -> Shape:
    """`get_shape("llama-3.2-1b")` -> Shape; a clear error listing the known names otherwise."""
    try:
        return shapes[name]
    except KeyError:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(shapes)}") from None


# The columns `shape_table` can show: header -> cell of a shape.
_COLUMNS = {
    "shape": lambda s: s.name,
    "model_type": lambda s: s.model_type,
    "hidden": lambda s: s.config["hidden_size"],
    "layers": lambda s: s.config["num_hidden_layers"],
    "heads / kv": lambda s: (
        f"{s.config['num_attention_heads']} / {s.config['num_key_value_heads']}"
    ),
    "head_dim": lambda s: s.config["head_dim"],
    "intermediate": lambda s: s.config["intermediate_size"],
    "vocab": lambda s: s.config["vocab_size"],
    "batch": lambda s: s.batch,
    "seq": lambda s: s.seq,
}


def shape_table(shapes: dict[str, Shape], columns: list[str]) -> str:
    """A markdown table of `shapes` (--list-shapes), one row per shape, `columns` of _COLUMNS."""
    rows = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for s in shapes.values():
        rows.append("| " + " | ".join(str(_COLUMNS[c](s)) for c in columns) + " |")
    return "\n".join(rows)


def make_config(shape: Shape):
    """The transformers config of a shape (imports transformers)."""
    import copy

    from transformers import AutoConfig

    return AutoConfig.for_model(shape.model_type, **copy.deepcopy(shape.config))
