"""Hand-derived torch.autograd.Functions for LoRA-adapted projections and the gated MLP."""

from fastlm.autograd.lora_linear import lora_linear
from fastlm.autograd.lora_mlp import lora_mlp
from fastlm.autograd.lora_qkv import lora_group, lora_qkv
from fastlm.autograd.lora_weights import LoRAWeights

__all__ = ["LoRAWeights", "lora_group", "lora_linear", "lora_mlp", "lora_qkv"]
