"""save_pretrained_merged on mixture-of-experts models (Qwen3-MoE, Qwen3.5-MoE text, gpt-oss).

LoRA on the experts is PEFT's ParamWrapper: per expert e, A_e and B_e live in two Linears and
the merge adds s·B_e A_e to the 3-D parameter's slice e ((s·B_e A_e)ᵀ where the parameter is
stored (E, in, out), as gpt-oss's; its expert biases, sinks and router bias are written as they
are). A fastlm model with LoRA (B ≠ 0) on
the experts and on attention → merged_16bit → plain AutoModelForCausalLM (eager experts) →
eval logits equal the adapter model's (fp32, atol 1e-5 / rtol 1e-4); the expert weights equal
PEFT's own merge. merged_4bit refuses MoE models in one line (GGUF export of these families:
tests/export/test_gguf_moe.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import save_tiny_model, tiny_batch
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.export import save_pretrained_merged
from fastlm.export.merged import merge_lora_weight

pytest.importorskip("transformers.models.qwen3_moe")
pytestmark = pytest.mark.usefixtures("one_thread")

ATOL, RTOL = 1e-5, 1e-4
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FAMILIES = [
    pytest.param("qwen3_moe", id="qwen3_moe"),
    pytest.param(
        "qwen3_5_moe_text",
        id="qwen3_5_moe",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("transformers.models.qwen3_5_moe") is None,
            reason="transformers without Qwen3.5-MoE",
        ),
    ),
    pytest.param(
        "gpt_oss",
        id="gpt_oss",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("transformers.models.gpt_oss") is None,
            reason="transformers without gpt-oss",
        ),
    ),
]


def _trained(tmp_path, family):
    """A fastlm model with LoRA (B ≠ 0) on attention and on both expert parameters."""
    path = save_tiny_model(family, tmp_path / f"src-{family}")
    model, tokenizer = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "o_proj"])
    return FastModel.get_peft_model(model, target_parameters=EXPERTS, **lora), tokenizer, path


def _reload(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, experts_implementation="eager", output_loading_info=True
    )


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    batch = tiny_batch()
    return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_16bit_reloads_with_the_adapter_models_logits(tmp_path, family):
    model, tokenizer, source = _trained(tmp_path, family)
    expected = _logits(model)
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    reloaded, info = _reload(out)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    torch.testing.assert_close(_logits(reloaded), expected, atol=ATOL, rtol=RTOL)
    # The experts' LoRA is not negligible: without it the logits differ.
    base, _ = _reload(source)
    assert not torch.allclose(_logits(base), expected, atol=1e-3)
    # Every expert weight is PEFT's own merge: W[e] + s·B_e A_e, slice by slice.
    original = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, model.peft_config["default"])
    peft_model.load_state_dict(model.state_dict())
    merged_by_peft = peft_model.merge_and_unload().state_dict()
    written = reloaded.state_dict()
    experts = [k for k in written if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    layers = sum(type(m).__name__.endswith("Experts") for m in reloaded.modules())
    assert layers and len(experts) == 2 * layers
    for key in experts:
        torch.testing.assert_close(written[key], merged_by_peft[key], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(written[key], original[key], atol=1e-4), key


def test_an_expert_parameter_stored_in_out_takes_the_transposed_delta():
    """A parameter stored (E, in, out) (``is_transposed``): PEFT keeps A (E·r, in), B (out, r·E)
    and the merge adds (B_e A_e)ᵀ; checked against PEFT's get_delta_weight."""

    class Experts(torch.nn.Module):
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.weight_stack = torch.nn.Parameter(torch.randn(3, 6, 5))  # (E, in, out)

        def forward(self, x):
            return torch.einsum("ti,eio->teo", x, self.weight_stack)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

        def forward(self, x):
            return self.experts(x)

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=6, target_parameters=["experts.weight_stack"])
    config.init_lora_weights = False
    wrapper = get_peft_model(Model(), config).base_model.model.experts
    weight = wrapper.get_base_layer().weight_stack
    expected = weight + wrapper.get_delta_weight("default")
    assert not torch.allclose(expected, weight)
    torch.testing.assert_close(merge_lora_weight(wrapper, weight), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_4bit_is_refused_for_experts(tmp_path, family):
    model, tokenizer, _ = _trained(tmp_path, family)
    with pytest.raises(NotImplementedError, match=r"merged_4bit: model\.layers\.0\.mlp\.experts "):
        save_pretrained_merged(model, tmp_path / "out", tokenizer, "merged_4bit")
    assert not (tmp_path / "out").exists()
