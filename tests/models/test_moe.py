"""Mixture-of-experts (Qwen3-MoE, Qwen3.5-MoE text, gpt-oss): fastlm's grouped experts vs
transformers' per-expert loop + PEFT.

The tiny models (tiny_models) route each token to 2 of 5 experts of width 27 with renormalised
weights and an aux loss coefficient of 0.05. Qwen3-MoE: 3 layers, the middle one dense.
Qwen3.5-MoE: Qwen3.5's hybrid layers (Gated DeltaNet, gated full attention, Gated DeltaNet), a
MoE block in each, with a shared expert of width 35 behind its sigmoid gate. gpt-oss: 3 layers
(sliding, full, sliding attention with non-zero learned sinks and biases), a MoE block in each:
a biased router (top-2 logits, softmax over those two) and 5 biased experts of width 24 stored
(E, in, out) with gate/up interleaved and the clamped SwiGLU (limit crossed on some rows;
tiny_models.gpt_oss_extras). Each has an expert that no token reaches (``starve_expert``) and
runs on a padded batch. The reference is unpatched
transformers with its eager experts (``experts_implementation="eager"``: one GEMM per expert in
a loop) and PEFT's LoRA on the experts (``ParamWrapper``: W_e + s·B_e A_e for the whole stack).
Tolerance: 1e-4 relative on the loss (aux loss included) and on every gradient, fp32 on CPU,
plain and checkpointed.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_architectures import _assert_same_loss_curve, assert_bf16_as_close_to_fp32_as_hf
from tiny_models import relative_error, save_tiny_model, tiny_batch, tiny_config, train_step
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.errors import UnsupportedArchitectureError
from fastlm.kernels.grouped_gemm import (
    group_ends,
    grouped_mm,
    grouped_mm_reference,
    torch_grouped_mm_fits,
)
from fastlm.models import fused_report, spec_for
from fastlm.models.moe import load_balancing_loss

pytest.importorskip("transformers.models.qwen3_moe")
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
STARVED = 4  # the expert no token reaches (starve_expert)
# fastlm's default targets: PEFT 0.21 maps gate/up/down_proj of a Qwen3-MoE model to its
# experts' gate_up_proj (rank and alpha doubled: two projections fused) and down_proj parameters.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LINEAR = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
QWEN3_5_MOE = "qwen3_5_moe_text"
GPT_OSS = "gpt_oss"


class Family(NamedTuple):
    model_type: str
    target_modules: list[str]
    target_parameters: list[str] | None
    moe_layers: int  # layers with a MoE block
    shared_expert: bool
    router: str = "mlp.gate"  # the router module's path in a layer
    expert_parameters: int = 2  # parameters of an experts module (gpt-oss: and two biases)


FAMILIES = {
    "qwen3_moe": Family("qwen3_moe", DEFAULT_TARGETS, None, 2, False),
    # PEFT 0.21 maps no qwen3_5_moe target onto the experts: gate/up/down_proj are the shared
    # expert's, and the experts take LoRA through target_parameters.
    QWEN3_5_MOE: Family(QWEN3_5_MOE, ATTENTION + LINEAR + MLP, EXPERT_PARAMETERS, 3, True),
    # No dense MLP at all: LoRA on the experts through target_parameters only.
    GPT_OSS: Family(GPT_OSS, ATTENTION, EXPERT_PARAMETERS, 3, False, "mlp.router", 4),
}
_NO_QWEN3_5_MOE = importlib.util.find_spec("transformers.models.qwen3_5_moe") is None
_NO_GPT_OSS = importlib.util.find_spec("transformers.models.gpt_oss") is None
FAMILY_PARAMS = [
    pytest.param("qwen3_moe", id="qwen3_moe"),
    pytest.param(
        QWEN3_5_MOE,
        id="qwen3_5_moe",
        marks=pytest.mark.skipif(_NO_QWEN3_5_MOE, reason="transformers without Qwen3.5-MoE"),
    ),
    pytest.param(
        GPT_OSS,
        id="gpt_oss",
        marks=pytest.mark.skipif(_NO_GPT_OSS, reason="transformers without gpt-oss"),
    ),
]


def _pair(
    tmp_path, checkpointing, family="qwen3_moe", target_parameters=None, target_modules=None,
    device="cpu", dtype=torch.float32, **config,
):  # fmt: skip
    """(transformers + PEFT with eager experts, fastlm), same weights and LoRA (B != 0), loaded
    in ``dtype``; ``config``: sizes that replace the tiny model's."""
    spec = FAMILIES[family]
    path = save_tiny_model(family, tmp_path / family, **config)
    target_parameters = target_parameters or spec.target_parameters
    targets = target_modules or spec.target_modules
    lora = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    if target_parameters:
        lora["target_parameters"] = target_parameters
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager", device_map=device
    )
    reference = get_peft_model(reference, LoraConfig(**lora))
    fast, _ = FastModel.from_pretrained(path, dtype=dtype, device_map=device)
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    fast.load_state_dict(reference.state_dict())
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    reference.train()
    fast.train()
    return reference, fast


def _assert_match(reference, fast, batch):
    expected, expected_grads = train_step(reference, batch)
    actual, actual_grads = train_step(fast, batch)
    assert actual.logits is None  # the fused cross-entropy ran
    assert abs(actual.aux_loss.item() - expected.aux_loss.item()) <= RTOL * expected.aux_loss
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * expected.loss.item()
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= RTOL, name
    return actual, actual_grads


def _assert_an_expert_without_tokens(output, moe_layers, top_k=2):
    """Every MoE layer's routing left STARVED without tokens, and every other expert had some."""
    assert len(output.router_logits) == moe_layers  # Qwen3-MoE: layers 0 and 2 (1 is dense)
    for logits in output.router_logits:
        counts = torch.bincount(torch.topk(logits, top_k).indices.flatten(), minlength=5)
        assert counts[STARVED] == 0 and (counts[:STARVED] > 0).all(), counts


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize(
    "checkpointing", [False, True, "unsloth"], ids=["plain", "checkpointed", "unsloth"]
)
def test_loss_aux_loss_and_lora_gradients_match_hf(tmp_path, checkpointing, family):
    spec = FAMILIES[family]
    reference, fast = _pair(tmp_path, checkpointing, family)
    report = fused_report(fast)
    gates = [row for row in report if row["module"].endswith("shared_expert_gate")]
    assert len(gates) == (spec.moe_layers if spec.shared_expert else 0)
    assert not any(row["fused"] or row["lora"] for row in gates)  # transformers' Linear
    assert all(row["fused"] for row in report if row not in gates), report
    grouped = [row for row in report if "(grouped)" in row["module"]]
    assert len(grouped) == 2 * spec.moe_layers and all(row["lora"] for row in grouped)
    actual, grads = _assert_match(reference, fast, tiny_batch())
    _assert_an_expert_without_tokens(actual, spec.moe_layers)
    experts = [n for n in grads if ".experts." in n]
    assert len(experts) == spec.moe_layers * 2 * 2  # MoE layers x (gate_up, down) x (A, B)
    shared = [n for n in grads if ".shared_expert." in n]
    assert len(shared) == (spec.moe_layers * 3 * 2 if spec.shared_expert else 0)
    if family == QWEN3_5_MOE:  # linear attention in layers 0 and 2, full attention in 1
        assert len([n for n in grads if ".linear_attn." in n]) == 2 * len(LINEAR) * 2
        assert len([n for n in grads if ".self_attn." in n]) == len(ATTENTION) * 2


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_target_parameters_and_a_trainable_router_match_hf(tmp_path, family):
    """PEFT's own spelling (attention modules + target_parameters), and router weights (and the
    shared expert's gate; gpt-oss's router bias and expert biases) that train: their gradients
    (through the top-k weights, the aux loss, the sigmoid gate, the gathered biases) match too."""
    targets = ATTENTION if family == "qwen3_moe" else None  # None: the family's (above)
    reference, fast = _pair(
        tmp_path, False, family, target_parameters=EXPERT_PARAMETERS, target_modules=targets
    )
    spec = FAMILIES[family]
    router = f"{spec.router}.weight"
    trained = (router, f"{spec.router}.bias", "mlp.shared_expert_gate.weight", "proj_bias")
    for model in (reference, fast):
        for name, param in model.named_parameters():
            if name.endswith(trained):
                param.requires_grad_(True)
    _, grads = _assert_match(reference, fast, tiny_batch())
    assert sum(name.endswith(router) for name in grads) == spec.moe_layers
    biases = sum(name.endswith(("router.bias", "proj_bias")) for name in grads)
    assert biases == (3 * spec.moe_layers if family == GPT_OSS else 0)  # router, gate_up, down
    gates = sum(name.endswith("shared_expert_gate.weight") for name in grads)
    assert gates == (spec.moe_layers if spec.shared_expert else 0)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_bf16_is_as_close_to_fp32_as_hf(tmp_path, device, family):
    """bf16 under autocast against the fp32 truth over 16 batches: fastlm's mean error (grouped
    experts, LoRA on them) at most 1.25× that of transformers' eager experts + PEFT."""

    def pair(folder, dtype):
        return _pair(folder, True, family, device=device, dtype=dtype)

    assert_bf16_as_close_to_fp32_as_hf(tmp_path, pair, device, family)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_twenty_steps_follow_the_same_loss_curve(tmp_path, family):
    reference, fast = _pair(tmp_path, "unsloth", family)
    _assert_same_loss_curve(reference, fast, tiny_batch(seed=1), 20)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_eval_logits_generation_and_unpatch(tmp_path, family):
    reference, fast = _pair(tmp_path, False, family)
    batch = tiny_batch()
    reference.eval()
    fast.eval()
    with torch.no_grad():
        expected, actual = reference(**batch), fast(**batch)
    assert relative_error(actual.logits, expected.logits) <= RTOL
    prompt = batch["input_ids"][:1, :5]
    generated = [
        m.generate(input_ids=prompt, max_new_tokens=6, do_sample=False) for m in (reference, fast)
    ]
    assert torch.equal(generated[0], generated[1])
    FastModel.unpatch(fast)
    assert not [m for m in fast.modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
@pytest.mark.parametrize("spelling", ["family", "target_parameters"])
def test_adapter_round_trip_on_unpatched_transformers(tmp_path, family, spelling):
    """save_pretrained writes a plain PEFT adapter (LoRA on the experts through ParamWrapper, and
    on attention): PeftModel.from_pretrained on unpatched transformers (eager experts) loads the
    same tensors and gives the fastlm model's eval logits within 1e-5 (fp32)."""
    from peft import PeftModel

    parameters = EXPERT_PARAMETERS if spelling == "target_parameters" else None
    targets = ATTENTION if spelling == "target_parameters" else None  # None: the family's
    _, fast = _pair(tmp_path, False, family, parameters, targets)
    grouped = [row for row in fused_report(fast) if "(grouped)" in row["module"]]
    assert grouped and all(row["fused"] and row["lora"] for row in grouped)
    fast.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / family, dtype=torch.float32, experts_implementation="eager"
    )
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not [m for m in loaded.modules() if "forward" in m.__dict__]  # unpatched
    lora = {n: v for n, v in loaded.state_dict().items() if "lora_" in n}
    assert lora.keys() == {n for n in fast.state_dict() if "lora_" in n}
    assert all(torch.equal(v, fast.state_dict()[n]) for n, v in lora.items())
    adapted = {n.split(".lora_")[0] for n in lora}
    assert sum(n.endswith(".mlp.experts") for n in adapted) == FAMILIES[family].moe_layers
    assert any(".self_attn." in n for n in adapted)
    batch = tiny_batch()
    fast.eval()
    with torch.no_grad():
        expected, actual = fast(**batch).logits, loaded(**batch).logits
    assert relative_error(actual, expected) < 1e-5 and (actual - expected).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_two_active_adapters_run_peft_and_say_why(tmp_path, family):
    spec = FAMILIES[family]
    _, fast = _pair(tmp_path, False, family)
    second = dict(r=2, target_modules=spec.target_modules)
    if spec.target_parameters:
        second["target_parameters"] = spec.target_parameters
    fast.add_adapter("second", LoraConfig(**second))
    fast.base_model.set_adapter(["default", "second"])
    rows = [row for row in fused_report(fast) if "(grouped)" in row["module"]]
    assert rows and not any(row["fused"] for row in rows)
    assert all("2 active adapters" in row["reason"] for row in rows)


@pytest.mark.skipif(_NO_QWEN3_5_MOE, reason="transformers without Qwen3.5-MoE")
def test_multimodal_qwen3_5_moe_is_refused_with_the_text_model_named():
    from transformers import Qwen3_5MoeConfig

    with pytest.raises(
        UnsupportedArchitectureError, match="load the text-only Qwen3_5MoeForCausalLM"
    ):
        spec_for(Qwen3_5MoeConfig())
    assert spec_for(tiny_config(QWEN3_5_MOE)).family == "Qwen3.5-MoE (text)"


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_load_balancing_loss_matches_transformers(masked, family):
    """Each family's own load_balancing_loss_func (gpt-oss's takes the raw logits, as the others'
    do: softmax over all experts inside), value and gradient."""
    folder = family.removesuffix("_text")
    modeling = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    load_balancing_loss_func = modeling.load_balancing_loss_func
    generator = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(33, 5, generator=generator, requires_grad=True) for _ in range(2))
    mask = tiny_batch()["attention_mask"] if masked else None
    expected = load_balancing_loss_func(logits, 5, 2, mask)
    actual = load_balancing_loss(logits, 5, 2, mask)
    assert torch.allclose(actual, expected, rtol=1e-6)
    grads = [torch.autograd.grad(loss, logits) for loss in (expected, actual)]
    for g_expected, g_actual in zip(*grads):
        assert torch.allclose(g_actual, g_expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("k", "n", "implementation"),
    [(7, 5, "reference"), (8, 4, "reference"), (8, 4, "torch")],
)
def test_grouped_mm_and_its_gradients_match_one_expert_at_a_time(k, n, implementation):
    """Groups of 3, 0 (an expert without rows), 6 and 2 rows; weights passed transposed, as the
    experts hand them over. Odd widths take the reference; aligned ones torch._grouped_mm too."""
    generator = torch.Generator().manual_seed(0)
    ends, sizes = group_ends(torch.tensor([3, 0, 6, 2]))
    x = torch.randn(11, k, generator=generator, requires_grad=True)
    w = torch.randn(4, n, k, generator=generator, requires_grad=True)
    dy = torch.randn(11, n, generator=generator)
    assert torch_grouped_mm_fits(x, w.transpose(1, 2)) == (k % 4 == 0 and n % 4 == 0)
    outputs = []
    for run in (lambda: grouped_mm(x, w.transpose(1, 2), ends, sizes, implementation),
                lambda: grouped_mm_reference(x, w.transpose(1, 2), sizes)):  # fmt: skip
        y = run()
        outputs.append((y, *torch.autograd.grad(y, (x, w), dy)))
    for actual, expected in zip(*outputs):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    assert outputs[0][2][1].abs().sum() == 0  # the empty group's weight gets no gradient
