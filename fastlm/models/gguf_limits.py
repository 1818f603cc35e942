"""Config checks shared by the families' GGUF refusals (``ArchitectureSpec.gguf_checks``).

A check raises NotImplementedError for a config that llama.cpp would run differently from
transformers (it has no key for the feature, or hard-codes another value), so that no file is
written that silently computes something else. Family-specific checks live in the family files.
"""

from __future__ import annotations

# The way out every refusal offers: a merged 16-bit folder runs in plain transformers.
USE_MERGED = "use merged_16bit with transformers instead."


def rope_parameters(config) -> dict:
    """The RoPE parameters as a dict (transformers 5 ``rope_parameters``, 4 ``rope_scaling``).

    Usage: ``rope_parameters(config).get("rope_type", "default")``.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return dict(params or {})


def default_rope_only(config) -> None:
    """Refuse a scaled RoPE: only rope_theta is written, so llama.cpp would run it unscaled."""
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(f"{config.model_type} RoPE type {rope_type!r} is not exported")
