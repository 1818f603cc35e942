"""fastlm: fast, exact fine-tuning of language models on Hugging Face + PEFT.

from fastlm import FastModel   # FastLanguageModel is the same class
"""

from fastlm.api import FastLanguageModel, FastModel
from fastlm.memory import MemoryCallback, memory_stats, print_memory

__version__ = "0.1.0"
__all__ = [
    "FastLanguageModel",
    "FastModel",
    "MemoryCallback",
    "__version__",
    "memory_stats",
    "print_memory",
]
