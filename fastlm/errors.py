"""Errors that say what went wrong and what to do about it."""

from __future__ import annotations


class FastLMError(Exception):
    """Base class of every error fastlm raises on purpose."""


class UnsupportedArchitectureError(FastLMError, ValueError):
    """The checkpoint's ``model_type`` has no fastlm spec."""


class UnsupportedVersionError(FastLMError, RuntimeError):
    """A dependency is outside the range fastlm was tested with."""


class UnsupportedDtypeError(FastLMError, ValueError):
    """The requested dtype cannot run on the device."""


class UnavailableDeviceError(FastLMError, ValueError):
    """The requested device is not there (CUDA without a GPU) or is not one fastlm runs on."""


class SequenceTooLongError(FastLMError, ValueError):
    """A batch is longer than the ``max_seq_length`` the model was loaded with."""


class NonFiniteLossError(FastLMError, FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteGradientError(NonFiniteLossError):
    """A training gradient became NaN or infinite (whoever computed the loss)."""


class NonFiniteWeightsError(FastLMError, FloatingPointError):
    """Weights hold NaN or infinite values: a damaged checkpoint at load, a diverged run at save."""


class UnsupportedKeywordError(FastLMError, TypeError):
    """A keyword that Unsloth accepts but fastlm does not implement (yet)."""


class ModelNotFoundError(FastLMError, ValueError):
    """The model to load is not a local model folder (nor a name the Hugging Face cache holds)."""


class DamagedCheckpointError(FastLMError, ValueError):
    """A weights file is truncated or unreadable, or a shard its index lists is missing."""


class UnknownTargetModulesError(FastLMError, ValueError):
    """A ``target_modules`` name matches no projection of the model."""
