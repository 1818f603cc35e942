"""fastlm: fast, exact fine-tuning of language models on Hugging Face + PEFT.

from fastlm import FastModel   # FastLanguageModel is the same class
"""

from fastlm.api import FastLanguageModel, FastModel

__version__ = "0.1.0"
__all__ = ["FastLanguageModel", "FastModel", "__version__"]
