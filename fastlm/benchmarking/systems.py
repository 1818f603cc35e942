"""How each benchmarked system loads the checkpoint and becomes a LoRA model ready to train.

Every loader takes the same `Ctx` and returns a model whose trainable parameters are the LoRA
weights (r=16, alpha=16, dropout 0, no bias, the seven projections), with gradient checkpointing
on. The training loop itself lives in `train_bench.py` (`timing.timed_training`) and is the
same for every system.

Imports are lazy: this module is imported by child processes before they know whether Unsloth
(which must come before transformers) is needed.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastlm.benchmarking.processes import dist_version, source_checkout
from fastlm.benchmarking.shapes import LORA_TARGETS, Shape

LORA_SEED = 3407  # same LoRA A init for every system (B = 0, so step 0 does not depend on it)
SYSTEMS = ("hf", "fastlm", "liger", "unsloth")


class SkipSystem(Exception):
    """The system cannot run here (its package is missing); recorded as status "skipped"."""


@dataclass
class Ctx:
    shape: Shape
    path: str  # checkpoint folder
    mode: str  # "lora" or "qlora"
    seq: int
    cuda: bool
    dtype: object  # torch.dtype the weights are loaded in (bf16 on GPU, fp32 on CPU)
    checkpointing: str = "fastlm"  # fastlm's use_gradient_checkpointing (diagnosis scripts vary it)
    notes: list[str] = field(default_factory=list)  # how a loader ran the system, for the record

    @property
    def qlora(self) -> bool:
        return self.mode == "qlora"


def preimport(system: str) -> None:
    """Import what must come first in the process (Unsloth patches transformers on import)."""
    if system == "unsloth":
        try:
            import unsloth  # noqa: F401
        except Exception as exc:  # ImportError, or its own error when no accelerator is found
            raise SkipSystem(f"import unsloth failed: {type(exc).__name__}: {exc}") from exc


def _bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _to_device(model, ctx: Ctx):
    """Move a model that a loader left on the CPU to the GPU (never a 4-bit one)."""
    if not ctx.cuda or ctx.qlora:
        return model
    if any(p.device.type == "cpu" for p in model.parameters()):
        model = model.to("cuda")
    return model


def lora_config(shape: Shape | None = None, **extra):
    """PEFT's LoraConfig of every system: r=16, alpha=16, no dropout, no bias, the shape's
    targets (the seven projections; a MoE shape's attention + experts) (`extra`: more fields,
    e.g. task_type)."""
    from peft import LoraConfig

    targets = shape.lora_targets() if shape else {"target_modules": list(LORA_TARGETS)}
    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", **targets, **extra)


def plain_checkpointing(model) -> None:
    """transformers' own gradient checkpointing, non-reentrant, as HF training uses it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def _peft_kwargs(checkpointing: str, shape: Shape | None = None) -> dict:
    """The get_peft_model arguments of fastlm's and Unsloth's loaders (the same LoRA as HF's)."""
    targets = shape.lora_targets() if shape else {"target_modules": list(LORA_TARGETS)}
    return {
        "r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0,
        "bias": "none",
        **targets,
        "use_gradient_checkpointing": checkpointing,
        "random_state": LORA_SEED,
    }


# Gated DeltaNet models: transformers takes fla's delta rule at import when fla is installed.
LINEAR_ATTENTION_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")


def _hf_linear_attention(ctx: Ctx) -> None:
    """Where fla refuses this GPU (it knows its gated backward to be wrong on Hopper with
    Triton 3.4 to 3.7.0), transformers would call it anyway and stop; an HF user's way out is
    transformers' PyTorch delta rule, so the HF system runs that (fla hidden before
    transformers' modeling module imports it), and the record says so."""
    if not ctx.cuda or ctx.shape.model_type not in LINEAR_ATTENTION_TYPES:
        return
    import torch

    # lazy: a child imports only what its system needs (this module's rule, above)
    from fastlm.models.linear_attention import fla_refusal, has_fla

    if not has_fla():
        return
    refusal = fla_refusal(torch.device("cuda", 0))  # where load_hf puts the model
    if refusal:
        sys.modules["fla"] = None  # transformers' import of fla now fails: its torch functions
        ctx.notes.append(f"transformers' PyTorch delta rule ({refusal})")


def load_hf(ctx: Ctx):
    """transformers + PEFT, SDPA attention, non-reentrant checkpointing (and transformers'
    PyTorch delta rule where fla refuses the GPU: ``_hf_linear_attention``)."""
    _hf_linear_attention(ctx)
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": ctx.dtype, "attn_implementation": ctx.shape.attn_implementation}
    if ctx.cuda:
        kwargs["device_map"] = {"": 0}
    if ctx.qlora:
        kwargs["quantization_config"] = _bnb_config()
    model = AutoModelForCausalLM.from_pretrained(ctx.path, **kwargs)
    torch.manual_seed(LORA_SEED)
    model = get_peft_model(model, lora_config(ctx.shape, task_type="CAUSAL_LM"))
    plain_checkpointing(model)
    return model


def load_liger(ctx: Ctx):
    """Liger-Kernel's patch for the model type (its defaults), then exactly the HF path."""
    try:
        import liger_kernel.transformers as lk
    except Exception as exc:
        raise SkipSystem(f"import liger_kernel failed: {type(exc).__name__}: {exc}") from exc
    name = f"apply_liger_kernel_to_{ctx.shape.liger or ctx.shape.model_type}"
    apply = getattr(lk, name, None)
    if apply is None:
        raise SkipSystem(f"liger_kernel.transformers has no {name}")
    apply()
    return load_hf(ctx)


def load_fastlm(ctx: Ctx):
    """fastlm's FastModel, the public API exactly as users call it."""
    from fastlm import FastModel  # lazy: a child imports only the packages of its own system

    kwargs = {"load_in_4bit": True} if ctx.qlora else {}
    # The same attention implementation as the HF system (eager for Gemma 2, whose soft-capping
    # SDPA cannot do; fastlm then runs its flash-attention kernel in eager's place).
    kwargs["attn_implementation"] = ctx.shape.attn_implementation
    model, _tokenizer = FastModel.from_pretrained(
        ctx.path, max_seq_length=ctx.seq, dtype=ctx.dtype, **kwargs
    )
    model = _to_device(model, ctx)
    # "fastlm" checkpointing: offloaded, as Unsloth's "unsloth" mode.
    model = FastModel.get_peft_model(model, **_peft_kwargs(ctx.checkpointing, ctx.shape))
    return _to_device(model, ctx)


def load_unsloth(ctx: Ctx):
    """Unsloth's FastLanguageModel with its own ("unsloth") gradient checkpointing."""
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=ctx.path,
        max_seq_length=ctx.seq,
        dtype=ctx.dtype,
        load_in_4bit=ctx.qlora,
    )
    model = FastLanguageModel.get_peft_model(model, **_peft_kwargs("unsloth", ctx.shape))
    return _to_device(model, ctx)


LOADERS = {"hf": load_hf, "fastlm": load_fastlm, "liger": load_liger, "unsloth": load_unsloth}


def _module_version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", None)
    except Exception:
        return None


def git_revision(repo: Path | None = None) -> str | None:
    """`<sha>` or `<sha>-dirty` of `repo` (default: the source checkout fastlm runs from; None
    for an installed fastlm, or without git)."""
    repo = repo or source_checkout()
    if repo is None:
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions(system: str, mode: str) -> dict:
    """Versions of the common stack and of the system's own packages (None where absent)."""
    out = {
        name: dist_version(name) or _module_version(name)
        for name in ("torch", "transformers", "peft", "triton", "accelerate")
    }
    if mode == "qlora":
        out["bitsandbytes"] = dist_version("bitsandbytes")
    if system == "fastlm":
        out["fastlm"] = dist_version("fastlm") or _module_version("fastlm")
        out["fastlm_git"] = git_revision()
    elif system == "liger":
        out["liger-kernel"] = dist_version("liger-kernel")
    elif system == "unsloth":
        out["unsloth"] = dist_version("unsloth") or _module_version("unsloth")
        out["unsloth_zoo"] = dist_version("unsloth_zoo") or dist_version("unsloth-zoo")
    return out
