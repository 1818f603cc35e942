"""What distinguishes one decoder architecture from another, as data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureSpec:
    """The handful of facts the shared patching code needs about an architecture.

    Modules are recognised by class name, so a spec never copies a model's forward.
    """

    model_type: str  # config.model_type
    family: str  # human name, used in messages
    norm_class: str  # RMSNorm class name
    attention_class: str
    mlp_class: str
    norm_offset: float  # 0.0: y = w·x̂ (Llama); 1.0: y = (1 + w)·x̂ (Gemma)
    activation: str  # "swiglu" (SiLU-gated) or "geglu" (tanh-GELU-gated)
    activation_config_attr: str  # config attribute that names the activation
    activation_config_values: tuple[str, ...]  # values of it this spec implements
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Gemma 3, Qwen3)
    attention_softcap_attr: str | None = None  # module attribute with attention-logit soft-cap
    final_logit_softcap_attr: str | None = None  # config attribute with final-logit soft-cap


# The projections fastlm's patched attention and MLP forwards compute (and read directly), in the
# order LoRA targets them by default. Every family so far names them alike.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
