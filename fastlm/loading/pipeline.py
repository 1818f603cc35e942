"""The loading pipeline: checkpoint → transformers model → fastlm patches → LoRA → fused report.

model, tokenizer = load_causal_lm("./llama", max_seq_length=2048, load_in_4bit=True)
model = add_lora(model, r=16, lora_alpha=16, target_modules=None, task_type="CAUSAL_LM")

``FastModel`` (``fastlm.api``), the embedding models and the rerankers all load through these
functions, so they share defaults, reports and errors. The export methods Unsloth users call on
a model (``save_pretrained_merged``...) are attached by ``fastlm.api``, which sits above export.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlm import model_folder, models, quant
from fastlm.errors import (
    UnknownTargetModulesError,
    UnsupportedArchitectureError,
    UnsupportedKeywordError,
)
from fastlm.loading import mxfp4 as mxfp4_loading
from fastlm.loading.checkpointing import enable_checkpointing
from fastlm.loading.device import placement
from fastlm.loading.streaming import streaming_request
from fastlm.models.nf4_experts import quantize_experts
from fastlm.models.spec import PROJECTIONS, MixtureOfExperts
from fastlm.offload import place_trainable
from fastlm.versions import check_versions

logger = logging.getLogger("fastlm")

DEFAULT_MAX_SEQ_LENGTH = 2048  # Unsloth's default, for a causal LM
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Unsloth keywords fastlm does not implement. Passing Unsloth's default value is harmless and
# accepted; any other value raises, naming the keyword (never silently ignored).
FROM_PRETRAINED_DEFAULTS: dict[str, Any] = {
    "load_in_8bit": False,
    "fast_inference": False,
    "gpu_memory_utilization": None,
    "float8_kv_cache": False,
    "max_lora_rank": None,
    "disable_log_stats": None,
    "qat_scheme": None,
    "rope_scaling": None,
    "resize_model_vocab": None,
    "use_exact_model_name": False,
    "fix_tokenizer": True,
    "full_finetuning_8bit": False,
    "unsloth_vllm_standby": False,
    "offload_embedding": False,
    "load_in_fp8": False,
}
GET_PEFT_MODEL_DEFAULTS: dict[str, Any] = {
    "loftq_config": None,
    "qat_scheme": None,
    "temporary_location": "_unsloth_temporary_saved_buffers",
    "layers_pattern": None,
}


# --------------------------------------------------------------------------- causal LMs


def load_causal_lm(
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
    allow_untested_versions: bool = False,
    check_finite_loss: bool = True,
    check_finite_weights: bool = True,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """A causal LM (or a LoRA adapter folder on its base), patched: ``(model, tokenizer)``.

    Usage: ``model, tok = load_causal_lm("./llama", max_seq_length=4096)``. The keywords are
    ``FastModel.from_pretrained``'s (docs/api.md); the rest go to transformers.
    """
    refuse_unimplemented(kwargs, FROM_PRETRAINED_DEFAULTS, "from_pretrained")
    kwargs.pop("load_in_16bit", None)  # Unsloth's flag; ``dtype`` decides
    options = dict(
        max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
        full_finetuning=full_finetuning, device_map=device_map, token=token,
        trust_remote_code=trust_remote_code, random_state=random_state,
        allow_untested_versions=allow_untested_versions, check_finite_loss=check_finite_loss,
        check_finite_weights=check_finite_weights,
    )  # fmt: skip
    gguf_file = kwargs.get("gguf_file")
    given_name = model_name
    model_name = model_folder.resolve(
        model_name, (gguf_file or "config.json",), kwargs.get("revision")
    )
    if os.path.isdir(model_name):
        base = model_folder.adapter_base(model_name)
        if base is not None:  # Unsloth's habit: an adapter folder loads its base, then it
            return load_adapter(
                model_name, base, use_gradient_checkpointing=use_gradient_checkpointing,
                **options, **kwargs,
            )  # fmt: skip
        model_folder.check_model_folder(model_name, (gguf_file or "config.json",))
    model = _load_patched(model_name, given_name, options, kwargs)
    if full_finetuning:
        model.requires_grad_(True)
        enable_checkpointing(model, use_gradient_checkpointing)
    config_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision") if k in kwargs}
    tokenizer = load_tokenizer(model_name, token, trust_remote_code, config_kwargs)
    return model, tokenizer


def _load_patched(model_name: str, given_name: str, options: dict, kwargs: dict) -> nn.Module:
    """transformers' model of ``model_name`` (resident or streamed), checked and patched."""
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: seconds to import

    max_seq_length = options["max_seq_length"]
    explicit_max_seq_length = max_seq_length is not None
    if max_seq_length is None:
        max_seq_length = DEFAULT_MAX_SEQ_LENGTH
    if not options["allow_untested_versions"]:
        check_versions(("torch", "transformers", "peft"))
    torch.manual_seed(options["random_state"])
    config_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision") if k in kwargs}
    token, trust_remote_code = options["token"], options["trust_remote_code"]
    try:
        config = AutoConfig.from_pretrained(
            model_name, token=token, trust_remote_code=trust_remote_code, **config_kwargs
        )
    except OSError as error:
        if os.path.isdir(model_name):
            raise
        raise model_folder.not_found(given_name, error) from error
    spec = models.spec_for(config)
    if spec.embedding_only:
        raise UnsupportedArchitectureError(
            f"{given_name}: {spec.family} is an embedding model with no causal-LM head; load it "
            "with FastModel.from_pretrained(..., embedding_mode=True) or load_embedding_model."
        )
    positions = trained_positions(config)
    if explicit_max_seq_length and positions and max_seq_length > positions:
        # not refused: RoPE runs past the trained positions, only worse
        logger.warning(
            "max_seq_length=%d is longer than the %d positions %s was trained on "
            "(max_position_embeddings and its RoPE scaling): expect worse results past %d",
            max_seq_length, positions, given_name, positions,
        )  # fmt: skip
    device, dtype, device_map = placement(options["device_map"], options["dtype"])
    mxfp4 = mxfp4_loading.is_mxfp4(config)
    mxfp4_to_nf4 = mxfp4 and options["load_in_4bit"]
    if mxfp4:  # openai/gpt-oss-*: transformers, or fastlm for QLoRA, reads the experts' bytes
        mxfp4_loading.prepare(kwargs, config, spec.moe, options["load_in_4bit"], given_name)
    add_quantization_config(kwargs, options["load_in_4bit"], options["full_finetuning"], dtype)
    # offload_weights / offload_enabled / offload_folder: NF4 layers streamed from CPU RAM
    # (also chosen automatically, and logged, when a 4-bit model does not fit the GPU).
    streaming = streaming_request(
        kwargs, config, load_in_4bit=options["load_in_4bit"], device=device,
        device_map=device_map, dtype=dtype, max_seq_length=max_seq_length,
    )  # fmt: skip
    causal_lm = AutoModelForCausalLM
    if spec.causal_lm_class:  # a family AutoModelForCausalLM does not map (Mistral 4)
        import transformers

        causal_lm = getattr(transformers, spec.causal_lm_class)
    load = causal_lm.from_pretrained if streaming is None else streaming.load
    if mxfp4_to_nf4 and streaming is not None:
        raise UnsupportedKeywordError(
            f"weight streaming of {given_name}, an MXFP4 checkpoint: streaming reads 16-bit "
            "weights. Write a 16-bit copy (load without load_in_4bit, then "
            "model.save_pretrained_merged(folder, tokenizer, save_method='merged_16bit')) and "
            "stream that folder."
        )
    if mxfp4_to_nf4:  # the experts' MXFP4 bytes decoded by fastlm, then quantised as below
        load = partial(mxfp4_loading.load_nf4_from_mxfp4, load, moe=spec.moe)
    model = load(
        model_name,
        dtype=dtype,
        device_map=device_map,
        token=token,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if options["check_finite_weights"]:  # one pass where the weights are (docs/api.md)
        models.check_finite_weights(model, given_name)
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in kwargs:
        # A GGUF checkpoint is dequantised on load; the leftover quantizer would make
        # Trainer and save_pretrained refuse the (plain floating-point) model.
        model.hf_quantizer = None
        model.is_quantized = False
    if options["load_in_4bit"] and spec.moe is not None:  # bitsandbytes quantised the linears
        quantize_experts(model, spec.moe)
    if mxfp4 and spec.moe is not None:  # transformers' MXFP4 is gpt-oss's experts
        mxfp4_loading.log_experts(model, spec.moe)
    model.max_seq_length = max_seq_length
    models.patch_model(model, spec, max_seq_length, check_finite_loss=options["check_finite_loss"])
    return model


def load_adapter(
    adapter: str, base: str, use_gradient_checkpointing: bool | str = True, **options: Any
) -> tuple[nn.Module, Any]:
    """A LoRA adapter folder, as Unsloth loads it: the base model it names, patched, with the
    adapter on top as a trainable ``PeftModel`` (the adapter folder's tokenizer when it has one:
    a chat template set in training travels with it).

    Usage: ``model, tok = load_adapter("run/adapter", "./llama")``.
    """
    from peft import PeftModel  # lazy: seconds to import

    if options["full_finetuning"]:
        raise ValueError(
            f"full_finetuning=True with the LoRA adapter {adapter}: merge it first (fastlm export "
            f"--adapter {adapter} --method merged_16bit) and fully fine-tune the merged folder."
        )
    model, tokenizer = load_causal_lm(base, use_gradient_checkpointing=False, **options)
    model_folder.check_weights(Path(adapter))
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    # PEFT keeps the base model's path only; exports refuse to write where they read from
    model.adapter_folder = os.path.abspath(adapter)
    if options["check_finite_weights"]:  # the base was checked; an adapter saved mid-divergence
        models.check_finite_weights(model, adapter)
    place_trainable(model)  # streamed 4-bit layers: the adapter's weights to the GPU
    enable_checkpointing(model, use_gradient_checkpointing)
    log_fused_report(model)
    if any(os.path.isfile(os.path.join(adapter, name)) for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(adapter, options["token"], options["trust_remote_code"], {})
    return model, tokenizer


def load_tokenizer(model_name: str, token, trust_remote_code: bool, extra: dict):
    """The folder's tokenizer, or None (with a warning) for a local folder without one.

    Usage: ``tokenizer = load_tokenizer("./llama", None, False, {})``."""
    from transformers import AutoTokenizer  # lazy: seconds to import

    local = os.path.isdir(model_name) and "gguf_file" not in extra
    if local and not any(os.path.exists(os.path.join(model_name, n)) for n in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: returning tokenizer=None", model_name)
        return None
    return AutoTokenizer.from_pretrained(
        model_name, token=token, trust_remote_code=trust_remote_code, **extra
    )


def add_causal_lm_lora(model: nn.Module, **options: Any) -> nn.Module:
    """LoRA on a model from ``load_causal_lm``: ``add_lora`` after the checks and keywords of
    ``FastModel.get_peft_model`` (Unsloth's unimplemented keywords refused, ``max_seq_length``
    updated, ``task_type`` "CAUSAL_LM" unless given).

    Usage: ``peft_model = add_causal_lm_lora(model, r=16, lora_alpha=16)``.
    """
    refuse_unimplemented(options, GET_PEFT_MODEL_DEFAULTS, "get_peft_model")
    max_seq_length = options.pop("max_seq_length", None)
    if not models.is_patched(model):
        raise ValueError(
            "get_peft_model expects a model from FastModel.from_pretrained (it carries the "
            "fastlm patches)."
        )
    if max_seq_length is not None:
        models.patch_state(model).max_seq_length = max_seq_length
        model.max_seq_length = max_seq_length
    options.setdefault("task_type", "CAUSAL_LM")
    spec = models.patch_state(model).spec
    if spec.lora_targets is not None:  # the family's own names (Mistral 4's MLA linears)
        options.setdefault("default_targets", spec.lora_targets)
    if spec.moe is not None and "target_parameters" not in options:
        targets = options.get("target_modules")
        if not _peft_maps_experts(model, targets):
            options["target_modules"], options["target_parameters"] = expert_targets(
                model, spec.moe, targets
            )
    if spec.moe is not None and options.get("target_modules") == "all-linear":
        _keep_linear_routers(model, spec.moe, options)
    return add_lora(model, **options)


def _keep_linear_routers(model: nn.Module, moe: MixtureOfExperts, options: dict) -> None:
    """Target "all-linear" without the MoE routers that are ``nn.Linear`` subclasses (Llama
    4's): PEFT would wrap them as linear layers, and its LoRA forward adds to what the router
    returns, a (scores, logits) tuple: a crash, with transformers' forward too. Logged."""
    linear = any(
        isinstance(m, nn.Linear) for m in model.modules() if type(m).__name__ == moe.router_class
    )
    if not linear or "exclude_modules" in options:
        return
    options["exclude_modules"] = [moe.router_attr]
    logger.info(
        "fastlm: target_modules='all-linear' leaves out the %s routers (%r): nn.Linear "
        "subclasses whose forward returns a tuple, which a LoRA layer cannot add to",
        moe.router_class, moe.router_attr,
    )  # fmt: skip


# What an MLP projection name means on a mixture-of-experts layer: its experts' 3-D parameter.
_EXPERT_PARAMETER_OF = {"gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}


def _peft_maps_experts(model: nn.Module, target_modules: list[str] | str | None) -> bool:
    """PEFT itself turns these module names into expert parameters for this model type (0.21
    does for Qwen2/3-MoE and Mixtral, fusing gate + up at twice the rank), so fastlm adds
    nothing and the adapter is the one PEFT makes from the same config."""

    from peft import LoraConfig

    try:  # PEFT's conversion of transformers-v4 MoE targets: private, so probed, not assumed
        from peft.utils.transformers_weight_conversion import _convert_peft_config_moe
    except ImportError:
        logger.warning("fastlm: PEFT has no MoE target conversion; experts get target_parameters")
        return False
    names = list(PROJECTIONS) if target_modules is None else copy.copy(target_modules)
    probe = LoraConfig(target_modules=names)
    _convert_peft_config_moe(probe, model)  # in place, on a config of its own
    return bool(probe.target_parameters)


def expert_targets(
    model: nn.Module, moe: MixtureOfExperts, target_modules: list[str] | str | None
) -> tuple[list[str] | str | None, list[str] | None]:
    """(target_modules, target_parameters) for LoRA on a mixture-of-experts model when the
    caller named only modules, as Unsloth reads them: ``gate_proj`` / ``up_proj`` also adapt
    every experts module's gate-up parameter and ``down_proj`` its down parameter (PEFT's
    ``target_parameters``, suffixes like ``mlp.experts.gate_up_proj``). A name that matches no
    linear layer left (Qwen3-MoE has no dense MLP) is dropped from the modules; None (the
    default seven) and "all-linear" take every expert parameter; any other string (a regex) is
    PEFT's, and no expert is added. Logged, never silent.

    Usage: ``modules, parameters = expert_targets(model, spec.moe, ["q_proj", "down_proj"])``.
    """
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return target_modules, None
    names = list(PROJECTIONS) if target_modules in (None, "all-linear") else list(target_modules)
    wanted = {getattr(moe, _EXPERT_PARAMETER_OF[n]) for n in names if n in _EXPERT_PARAMETER_OF}
    places = {
        _within_layer(path)
        for path, module in model.named_modules()
        if type(module).__name__ == moe.experts_class
    }  # "mlp.experts": PEFT matches target_parameters as suffixes of "<module path>.<param>"
    parameters = sorted(f"{place}.{param}" for place in places for param in wanted)
    if not parameters:
        return target_modules, None
    linear = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if _is_linear(m)}
    if target_modules is not None and target_modules != "all-linear":
        target_modules = [n for n in names if n in linear or n not in _EXPERT_PARAMETER_OF]
    logger.info("fastlm: LoRA on the experts too: target_parameters=%s", parameters)
    return target_modules, parameters


def _within_layer(path: str) -> str:
    """A module's path inside its decoder layer: what follows the last layer index
    ("model.layers.3.mlp.experts" -> "mlp.experts"; Gemma 4's "model.layers.3.experts" ->
    "experts"), the same for every layer."""
    parts = path.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[indices[-1] + 1 :] if indices else parts[-2:])


# --------------------------------------------------------------------------- shared steps


def add_quantization_config(
    kwargs: dict, load_in_4bit: bool, full_finetuning: bool, dtype: torch.dtype
) -> None:
    """``kwargs["quantization_config"]`` = QLoRA's NF4 config when ``load_in_4bit``; a 4-bit
    model cannot be fully fine-tuned. Usage: ``add_quantization_config(kw, True, False, bf16)``.
    """
    if not load_in_4bit:
        return
    if full_finetuning:
        raise ValueError(
            "full_finetuning=True with load_in_4bit=True: 4-bit weights cannot be trained; "
            "use LoRA on the 4-bit model (QLoRA) or load in 16-bit for full fine-tuning."
        )
    kwargs["quantization_config"] = quant.nf4_config(dtype, kwargs.get("quantization_config"))


def add_lora(
    model: nn.Module,
    *,
    target_modules: list[str] | str | None = None,
    default_targets: tuple[str, ...] | None = PROJECTIONS,
    task_type: str | None = "CAUSAL_LM",
    use_gradient_checkpointing: bool | str = True,
    random_state: int = 3407,
    **lora_options: Any,
) -> nn.Module:
    """``model`` (patched by fastlm, or any transformers body) wrapped in LoRA adapters: a plain
    ``peft.PeftModel``. The target names are checked first, LoRA A is drawn after
    ``random_state``, streamed 4-bit layers get their LoRA weights on the GPU, checkpointing is
    turned on as asked, and the fused report is logged.

    Usage: ``peft_model = add_lora(model, r=16, lora_alpha=16)``. ``target_modules=None``:
    ``default_targets`` (the seven projections; None leaves the choice to PEFT's table of
    model types).
    """
    from peft import LoraConfig, get_peft_model  # lazy: seconds to import

    check_target_modules(model, target_modules)
    if target_modules is None and default_targets is not None:
        target_modules = list(default_targets)
    torch.manual_seed(random_state)
    config = LoraConfig(
        target_modules=target_modules,
        task_type=task_type,
        **lora_options,
    )
    peft_model = get_peft_model(model, config)
    place_trainable(peft_model)  # streamed 4-bit layers: their new LoRA weights to the GPU
    enable_checkpointing(peft_model, use_gradient_checkpointing)
    log_fused_report(peft_model)
    return peft_model


def check_target_modules(model: nn.Module, target_modules: list[str] | str | None) -> None:
    """Every name of a ``target_modules`` list matches a linear layer of ``model`` (PEFT matches
    a name against the end of each module path); an ``UnknownTargetModulesError`` listing the
    layer names otherwise. PEFT itself only refuses a list of which *no* name matches, so a typo
    in one of several names would train fewer layers than asked for, silently. A string (a regex,
    or "all-linear") is PEFT's to check. Usage: ``check_target_modules(model, ["q_proj"])``.
    """
    if target_modules is None or isinstance(target_modules, str):
        return
    paths = [name for name, module in model.named_modules() if _is_linear(module)]
    unknown = [
        target
        for target in target_modules
        if not any(path == target or path.endswith(f".{target}") for path in paths)
    ]
    if unknown:
        valid = sorted({path.rsplit(".", 1)[-1] for path in paths})
        raise UnknownTargetModulesError(
            f"target_modules {unknown} match no layer of this model; its linear layers are "
            f"named {', '.join(valid)}"
        )


def _is_linear(module: nn.Module) -> bool:
    """A layer LoRA's target_modules can name: a 2-D weight that is not an embedding."""
    weight = getattr(module, "weight", None)
    return getattr(weight, "ndim", 0) == 2 and not isinstance(module, nn.Embedding)


def log_fused_report(model: nn.Module) -> None:
    """Log how many projections run fused, and a warning per reason naming those that do not.

    Usage: ``log_fused_report(peft_model)`` (every loader calls it after adding LoRA)."""
    if not models.is_patched(model):  # e.g. a BERT body: no spec, PEFT's and torch's code
        logger.info("fastlm: %s runs without fastlm's kernels (no spec)", _model_type(model))
        return
    report = models.fused_report(model)
    slow = [row for row in report if not row["fused"]]
    logger.info("fastlm: %d of %d projections run fused", len(report) - len(slow), len(report))
    by_reason: dict[str, list[str]] = {}
    for row in slow:  # one line per reason: a reason shared by every layer is one line, not N
        by_reason.setdefault(row["reason"], []).append(row["module"])
    for reason, names in by_reason.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        logger.warning("fastlm: %s%s run%s unfused: %s", names[0], more, "s" * (not more), reason)
    paths = Counter((row["attention"], row["reason"]) for row in report.attention)
    for (path, reason), count in sorted(paths.items()):  # expected paths: no call has run yet
        logger.info(
            "fastlm: %d attention modules run %s%s", count, path, f" ({reason})" * bool(reason)
        )


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def refuse_unimplemented(kwargs: dict, defaults: dict, where: str) -> None:
    """Unsloth keywords fastlm does not implement: their default value is dropped from
    ``kwargs``; any other raises ``UnsupportedKeywordError`` naming it.

    Usage: ``refuse_unimplemented(kwargs, FROM_PRETRAINED_DEFAULTS, "from_pretrained")``."""
    for key, default in defaults.items():
        if key in kwargs and kwargs[key] != default:
            raise UnsupportedKeywordError(
                f"{where}({key}={kwargs[key]!r}) is not implemented by fastlm yet; remove the "
                f"keyword or pass {default!r}."
            )
        kwargs.pop(key, None)  # Unsloth's default: nothing to do, and not a transformers keyword


def trained_positions(config) -> int | None:
    """The longest sequence the checkpoint is made for: ``max_position_embeddings``, times the
    factor of a linear / dynamic / YaRN RoPE scaling in the config (Qwen2.5's long-context
    recipe keeps max_position_embeddings and adds the factor; llama3 scaling has it built in).

    Usage: ``trained_positions(model.config)``."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind in ("linear", "dynamic", "yarn") and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or positions
        positions = max(positions, int(original * rope["factor"]))
    return positions
