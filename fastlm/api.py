"""The facade users call: ``FastModel`` (also importable as ``FastLanguageModel``).

from fastlm import FastModel
model, tokenizer = FastModel.from_pretrained("path/or/name", max_seq_length=2048)
model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlm import model_folder, models
from fastlm.errors import (
    UnknownTargetModulesError,
    UnsupportedDtypeError,
    UnsupportedKeywordError,
)
from fastlm.versions import check_versions

logger = logging.getLogger("fastlm")

DEFAULT_MAX_SEQ_LENGTH = 2048  # Unsloth's default, for a causal LM
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Unsloth keywords fastlm does not implement. Passing Unsloth's default value is harmless and
# accepted; any other value raises, naming the keyword (never silently ignored).
_FROM_PRETRAINED_DEFAULTS: dict[str, Any] = {
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
_GET_PEFT_MODEL_DEFAULTS: dict[str, Any] = {
    "loftq_config": None,
    "qat_scheme": None,
    "temporary_location": "_unsloth_temporary_saved_buffers",
    "layers_pattern": None,
}


class FastModel:
    """Load, patch and LoRA-wrap Hugging Face causal LMs (Llama, Mistral, Qwen2/3, Gemma 1/2/3)."""

    @staticmethod
    def from_pretrained(
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
        load_in_16bit: bool = True,
        allow_untested_versions: bool = False,
        check_finite_loss: bool = True,
        check_finite_weights: bool = True,
        embedding_mode: bool = False,
        **kwargs: Any,
    ) -> tuple[nn.Module, Any]:
        """Load a checkpoint, patch it with fastlm's kernels, return ``(model, tokenizer)``.

        Usage: ``model, tok = FastModel.from_pretrained("./llama", max_seq_length=4096)``.
        ``tokenizer`` is None when the folder has no tokenizer files. ``embedding_mode=True``
        returns a ``fastlm.embeddings.FastSentenceTransformer`` (one normalised vector per text;
        see docs/embeddings.md) instead of a causal LM. ``check_finite_weights=False`` skips the
        load-time check for NaN/inf weights (``NonFiniteWeightsError``).
        """
        if embedding_mode:
            from fastlm.embeddings import load_embedding_model

            return load_embedding_model(
                model_name,
                max_seq_length=max_seq_length,  # None: the folder's own (Sentence-Transformers)
                dtype=dtype,
                device_map=device_map,
                full_finetuning=full_finetuning,
                token=token,
                trust_remote_code=trust_remote_code,
                use_gradient_checkpointing=use_gradient_checkpointing,
                random_state=random_state,
                load_in_4bit=load_in_4bit,
                load_in_16bit=load_in_16bit,
                allow_untested_versions=allow_untested_versions,
                check_finite_loss=check_finite_loss,
                check_finite_weights=check_finite_weights,
                **kwargs,
            )
        _refuse_unimplemented(kwargs, _FROM_PRETRAINED_DEFAULTS, "from_pretrained")
        gguf_file = kwargs.get("gguf_file")
        given_name = model_name
        model_name = model_folder.resolve(
            model_name, (gguf_file or "config.json",), kwargs.get("revision")
        )
        if os.path.isdir(model_name):
            base = model_folder.adapter_base(model_name)
            if base is not None:  # Unsloth's habit: an adapter folder loads its base, then it
                return _load_adapter(
                    model_name,
                    base,
                    max_seq_length=max_seq_length,
                    dtype=dtype,
                    load_in_4bit=load_in_4bit,
                    full_finetuning=full_finetuning,
                    device_map=device_map,
                    token=token,
                    trust_remote_code=trust_remote_code,
                    use_gradient_checkpointing=use_gradient_checkpointing,
                    random_state=random_state,
                    load_in_16bit=load_in_16bit,
                    allow_untested_versions=allow_untested_versions,
                    check_finite_loss=check_finite_loss,
                    check_finite_weights=check_finite_weights,
                    **kwargs,
                )
            model_folder.check_model_folder(model_name, (gguf_file or "config.json",))
        explicit_max_seq_length = max_seq_length is not None
        if max_seq_length is None:
            max_seq_length = DEFAULT_MAX_SEQ_LENGTH
        if not allow_untested_versions:
            check_versions(("torch", "transformers", "peft"))
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(random_state)
        config_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision") if k in kwargs}
        try:
            config = AutoConfig.from_pretrained(
                model_name, token=token, trust_remote_code=trust_remote_code, **config_kwargs
            )
        except OSError as error:
            if os.path.isdir(model_name):
                raise
            raise model_folder.not_found(given_name, error) from error
        spec = models.spec_for(config)
        positions = _trained_positions(config)
        if explicit_max_seq_length and positions and max_seq_length > positions:
            # not refused: RoPE runs past the trained positions, only worse
            logger.warning(
                "max_seq_length=%d is longer than the %d positions %s was trained on "
                "(max_position_embeddings and its RoPE scaling): expect worse results past %d",
                max_seq_length, positions, given_name, positions,
            )  # fmt: skip
        device = _target_device(device_map)
        dtype = resolve_dtype(dtype, device)
        if device_map == "auto" and device == "cpu":
            device_map = None
        if load_in_4bit:
            if full_finetuning:
                raise ValueError(
                    "full_finetuning=True with load_in_4bit=True: 4-bit weights cannot be trained; "
                    "use LoRA on the 4-bit model (QLoRA) or load in 16-bit for full fine-tuning."
                )
            kwargs["quantization_config"] = nf4_config(dtype, kwargs.get("quantization_config"))
        # offload_weights / offload_enabled / offload_folder: NF4 layers streamed from CPU RAM
        # (also chosen automatically, and logged, when a 4-bit model does not fit the GPU).
        from fastlm.loading.streaming import streaming_request

        streaming = streaming_request(
            kwargs, config, load_in_4bit=load_in_4bit, device=device, device_map=device_map,
            dtype=dtype, max_seq_length=max_seq_length,
        )  # fmt: skip
        load = AutoModelForCausalLM.from_pretrained if streaming is None else streaming.load
        model = load(
            model_name,
            dtype=dtype,
            device_map=device_map,
            token=token,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        if check_finite_weights:  # one pass where the weights are; NaN/inf named (docs/api.md)
            models.check_finite_weights(model, given_name)
        if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in kwargs:
            # A GGUF checkpoint is dequantised on load; the leftover quantizer would make
            # Trainer and save_pretrained refuse the (plain floating-point) model.
            model.hf_quantizer = None
            model.is_quantized = False
        model.max_seq_length = max_seq_length
        models.patch_model(model, spec, max_seq_length, check_finite_loss=check_finite_loss)
        _attach_export_methods(model)
        if full_finetuning:
            model.requires_grad_(True)
            if use_gradient_checkpointing:
                _enable_checkpointing(model, use_gradient_checkpointing)
        tokenizer = _load_tokenizer(model_name, token, trust_remote_code, config_kwargs)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: list[int] | None = None,
        use_gradient_checkpointing: bool | str = True,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: bool | str = True,
        use_dora: bool = False,
        ensure_weight_tying: bool = False,
        **kwargs: Any,
    ) -> nn.Module:
        """Wrap a fastlm-loaded model with LoRA adapters (a normal ``peft.PeftModel``).

        Usage: ``model = FastModel.get_peft_model(model, r=16, lora_alpha=16)``.
        Layers that cannot run fused (dropout, DoRA, bias...) still work through PEFT and are
        listed by ``FastModel.fused_report(model)``.
        """
        from peft import LoraConfig, get_peft_model

        lora_options = dict(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            layers_to_transform=layers_to_transform,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            use_dora=use_dora,
            ensure_weight_tying=ensure_weight_tying,
        )
        if _is_embedding_model(model):  # embedding_mode=True: its own LoRA (BERT targets too)
            return model.get_peft_model(
                target_modules=target_modules,
                use_gradient_checkpointing=use_gradient_checkpointing,
                random_state=random_state,
                **lora_options,
                **kwargs,
            )
        _refuse_unimplemented(kwargs, _GET_PEFT_MODEL_DEFAULTS, "get_peft_model")
        max_seq_length = kwargs.pop("max_seq_length", None)
        if not models.is_patched(model):
            raise ValueError(
                "get_peft_model expects a model from FastModel.from_pretrained (it carries the "
                "fastlm patches)."
            )
        if max_seq_length is not None:
            models.patch_state(model).max_seq_length = max_seq_length
            model.max_seq_length = max_seq_length
        check_target_modules(model, target_modules)
        torch.manual_seed(random_state)
        config = LoraConfig(
            target_modules=ALL_PROJECTIONS if target_modules is None else target_modules,
            task_type=kwargs.pop("task_type", "CAUSAL_LM"),
            **lora_options,
            **kwargs,
        )
        peft_model = get_peft_model(model, config)
        from fastlm.offload import place_trainable

        place_trainable(peft_model)  # streamed 4-bit layers: their new LoRA weights to the GPU
        _attach_export_methods(peft_model)
        if use_gradient_checkpointing:
            _enable_checkpointing(peft_model, use_gradient_checkpointing)
        _log_fused_summary(peft_model)
        return peft_model

    @staticmethod
    def for_training(model: nn.Module, use_gradient_checkpointing: bool | str = True) -> nn.Module:
        """Switch to training mode (checkpointing on, KV cache off). Usage: ``for_training(m)``."""
        model.train()
        if use_gradient_checkpointing:
            _enable_checkpointing(model, use_gradient_checkpointing)
        _set_use_cache(model, False)
        return model

    @staticmethod
    def for_inference(model: nn.Module) -> nn.Module:
        """Switch to generation mode (eval, KV cache on). Usage: ``for_inference(m)``."""
        model.eval()
        _set_use_cache(model, True)
        return model

    @staticmethod
    def fused_report(model: nn.Module) -> list[dict]:
        """Which projections run fused and why the others do not."""
        return models.fused_report(model)

    @staticmethod
    def unpatch(model: nn.Module) -> nn.Module:
        """Remove fastlm's patches: the model runs transformers' own code again."""
        return models.unpatch_model(model)


FastLanguageModel = FastModel


# --------------------------------------------------------------------------- helpers


def resolve_dtype(dtype: torch.dtype | None, device: str) -> torch.dtype:
    """The compute dtype: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if device == "cpu":
        if dtype in (None, torch.float32):
            return torch.float32
        raise UnsupportedDtypeError(
            f"dtype={dtype} on the CPU: fastlm trains in float32 on CPU (no fast half-precision "
            "matmuls there). Pass dtype=None or torch.float32, or run on a GPU."
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if dtype is None:
        return torch.bfloat16 if bf16_ok else torch.float16
    if dtype == torch.bfloat16 and not bf16_ok:
        raise UnsupportedDtypeError(
            f"{torch.cuda.get_device_name()} has no bfloat16 support: pass dtype=torch.float16 "
            "(or dtype=None to choose automatically)."
        )
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedDtypeError(f"dtype={dtype} is not a training dtype: use bf16/fp16/fp32.")
    return dtype


def _trained_positions(config) -> int | None:
    """The longest sequence the checkpoint is made for: ``max_position_embeddings``, times the
    factor of a linear / dynamic / YaRN RoPE scaling in the config (Qwen2.5's long-context
    recipe keeps max_position_embeddings and adds the factor; llama3 scaling has it built in)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind in ("linear", "dynamic", "yarn") and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or positions
        positions = max(positions, int(original * rope["factor"]))
    return positions


def _load_adapter(adapter: str, base: str, **options: Any) -> tuple[nn.Module, Any]:
    """``from_pretrained`` of a LoRA adapter folder, as Unsloth does it: the base model it names,
    patched, with the adapter on top as a trainable ``PeftModel`` (the adapter folder's tokenizer
    when it has one: a chat template set in training travels with it)."""
    from peft import PeftModel

    if options["full_finetuning"]:
        raise ValueError(
            f"full_finetuning=True with the LoRA adapter {adapter}: merge it first (fastlm export "
            f"--adapter {adapter} --method merged_16bit) and fully fine-tune the merged folder."
        )
    use_gradient_checkpointing = options.pop("use_gradient_checkpointing")
    model, tokenizer = FastModel.from_pretrained(base, use_gradient_checkpointing=False, **options)
    model_folder.check_weights(Path(adapter))
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if options["check_finite_weights"]:  # the base was checked; an adapter saved mid-divergence
        models.check_finite_weights(model, adapter)
    from fastlm.offload import place_trainable

    place_trainable(model)  # streamed 4-bit layers: the adapter's weights to the GPU
    _attach_export_methods(model)
    if use_gradient_checkpointing:
        _enable_checkpointing(model, use_gradient_checkpointing)
    _log_fused_summary(model)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(adapter, name)) for name in names):
        tokenizer = _load_tokenizer(adapter, options["token"], options["trust_remote_code"], {})
    return model, tokenizer


def check_target_modules(model: nn.Module, target_modules: list[str] | str | None) -> None:
    """Every name of a ``target_modules`` list matches a linear layer of ``model`` (PEFT matches
    a name against the end of each module path); an ``UnknownTargetModulesError`` listing the
    layer names otherwise. PEFT itself only refuses a list of which *no* name matches, so a typo
    in one of several names would train fewer layers than asked for, silently. A string (a regex,
    or "all-linear") is PEFT's to check. Usage: ``check_target_modules(model, ["q_proj"])``.
    """
    if target_modules is None or isinstance(target_modules, str):
        return
    paths = [
        name
        for name, module in model.named_modules()
        if hasattr(module, "weight") and getattr(module.weight, "ndim", 0) == 2
        and not isinstance(module, nn.Embedding)
    ]  # fmt: skip
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


def _target_device(device_map) -> str:
    if device_map in ("cpu", {"": "cpu"}) or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _is_embedding_model(model) -> bool:
    from fastlm.embeddings import FastSentenceTransformer

    return isinstance(model, FastSentenceTransformer)


def nf4_config(compute_dtype: torch.dtype, given=None):
    """QLoRA's quantisation: NF4, double-quantised absmax, matmuls in ``compute_dtype``.

    Usage: ``AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(bf16))``.
    A ``BitsAndBytesConfig`` the caller passed is kept if it asks for NF4 4-bit.
    """
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise ImportError(
            "load_in_4bit=True needs bitsandbytes: pip install 'fastlm[quant]'"
        ) from error
    if given is not None:
        if not (getattr(given, "load_in_4bit", False) and given.bnb_4bit_quant_type == "nf4"):
            raise UnsupportedKeywordError(
                "load_in_4bit=True with a quantization_config that is not NF4 4-bit: fastlm's "
                "QLoRA path takes bitsandbytes NF4 (drop quantization_config to get it)."
            )
        return given
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _refuse_unimplemented(kwargs: dict, defaults: dict, where: str) -> None:
    for key, default in defaults.items():
        if key in kwargs and kwargs[key] != default:
            raise UnsupportedKeywordError(
                f"{where}({key}={kwargs[key]!r}) is not implemented by fastlm yet; remove the "
                f"keyword or pass {default!r}."
            )
        kwargs.pop(key, None)  # Unsloth's default: nothing to do, and not a transformers keyword


def _enable_checkpointing(model: nn.Module, mode: bool | str = True) -> None:
    """True: transformers' non-reentrant checkpointing. "fastlm" / "unsloth": the same, with each
    layer's saved input offloaded to pinned CPU memory (fastlm.offload)."""
    if mode in ("fastlm", "unsloth"):
        from fastlm.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
    elif mode is True:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(
            f"use_gradient_checkpointing={mode!r}: use True, False, 'fastlm' (offloaded) or "
            "'unsloth' (the same as 'fastlm')."
        )
    _set_use_cache(model, False)


def _set_use_cache(model: nn.Module, value: bool) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = value


def _load_tokenizer(model_name: str, token, trust_remote_code: bool, extra: dict):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    local = os.path.isdir(model_name) and "gguf_file" not in extra
    if local and not any(os.path.exists(os.path.join(model_name, n)) for n in names):
        logger.warning("no tokenizer files in %s: returning tokenizer=None", model_name)
        return None
    return AutoTokenizer.from_pretrained(
        model_name, token=token, trust_remote_code=trust_remote_code, **extra
    )


def _attach_export_methods(model: nn.Module) -> None:
    """``model.save_pretrained_merged(...)`` / ``model.save_pretrained_gguf(...)`` as Unsloth users
    call them (instance attributes, like the other patches: no class is changed)."""
    from fastlm.export import save_pretrained_gguf, save_pretrained_merged

    def save_merged(self, save_directory, tokenizer=None, save_method="merged_16bit", **kwargs):
        return save_pretrained_merged(self, save_directory, tokenizer, save_method, **kwargs)

    def save_gguf(self, save_directory, tokenizer, quantization_method="q8_0", **kwargs):
        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, **kwargs)

    model.save_pretrained_merged = types.MethodType(save_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_gguf, model)


def _log_fused_summary(model: nn.Module) -> None:
    rows = models.fused_report(model)
    slow = [row for row in rows if not row["fused"]]
    logger.info("fastlm: %d of %d projections run fused", len(rows) - len(slow), len(rows))
    for row in slow:
        logger.warning("fastlm: %s runs unfused: %s", row["module"], row["reason"])
