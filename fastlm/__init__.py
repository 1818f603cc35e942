"""fastlm: fast, exact fine-tuning of language models on Hugging Face + PEFT.

from fastlm import FastModel   # FastLanguageModel is the same class
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Imported on first use, so that `fastlm --help` and `import fastlm.cli` do not pay for torch,
# transformers and peft.
_LAZY = {
    "FastModel": "fastlm.api",
    "FastLanguageModel": "fastlm.api",
    "MemoryCallback": "fastlm.memory",
    "memory_stats": "fastlm.memory",
    "print_memory": "fastlm.memory",
}
__all__ = [
    "FastLanguageModel",
    "FastModel",
    "MemoryCallback",
    "__version__",
    "memory_stats",
    "print_memory",
]

if TYPE_CHECKING:
    from fastlm.api import FastLanguageModel, FastModel
    from fastlm.memory import MemoryCallback, memory_stats, print_memory


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
