"""Mixture-of-experts (Qwen3-MoE): fastlm's grouped experts vs transformers' per-expert loop + PEFT.

The tiny model (tiny_models: 3 layers, 5 experts of width 27, top-2, renormalised weights, one
dense layer, aux loss coefficient 0.05) has an expert that no token reaches (``starve_expert``)
and runs on a padded batch. The reference is unpatched transformers with its eager experts
(``experts_implementation="eager"``: one GEMM per expert in a loop) and PEFT's LoRA on the
experts (``ParamWrapper``: W_e + s·B_e A_e for the whole stack). Tolerance: 1e-4 relative on the
loss (aux loss included) and on every gradient, fp32 on CPU, plain and checkpointed.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import relative_error, save_tiny_model, tiny_batch
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.kernels.grouped_gemm import (
    group_ends,
    grouped_mm,
    grouped_mm_reference,
    torch_grouped_mm_fits,
)
from fastlm.models import fused_report
from fastlm.models.moe import load_balancing_loss

pytest.importorskip("transformers.models.qwen3_moe")
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
STARVED = 4  # the expert no token reaches (starve_expert)
# fastlm's default targets: PEFT 0.21 maps gate/up/down_proj of a MoE model to its experts'
# gate_up_proj (rank and alpha doubled: two projections fused) and down_proj parameters.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _pair(tmp_path, checkpointing, target_parameters=None, target_modules=DEFAULT_TARGETS):
    """(transformers + PEFT with eager experts, fastlm), same weights and LoRA (B != 0)."""
    path = save_tiny_model("qwen3_moe", tmp_path / "qwen3_moe")
    lora = dict(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    if target_parameters:
        lora["target_parameters"] = target_parameters
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager"
    )
    reference = get_peft_model(reference, LoraConfig(**lora))
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=checkpointing, **lora)
    fast.load_state_dict(reference.state_dict())
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    reference.train()
    fast.train()
    return reference, fast


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return output, grads


def _assert_match(reference, fast, batch):
    expected, expected_grads = _step(reference, batch)
    actual, actual_grads = _step(fast, batch)
    assert actual.logits is None  # the fused cross-entropy ran
    assert abs(actual.aux_loss.item() - expected.aux_loss.item()) <= RTOL * expected.aux_loss
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * expected.loss.item()
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= RTOL, name
    return actual, actual_grads


def _assert_an_expert_without_tokens(output, top_k=2):
    """Every MoE layer's routing left STARVED without tokens, and every other expert had some."""
    assert len(output.router_logits) == 2  # layers 0 and 2 (layer 1 is dense)
    for logits in output.router_logits:
        counts = torch.bincount(torch.topk(logits, top_k).indices.flatten(), minlength=5)
        assert counts[STARVED] == 0 and (counts[:STARVED] > 0).all(), counts


@pytest.mark.parametrize(
    "checkpointing", [False, True, "unsloth"], ids=["plain", "checkpointed", "unsloth"]
)
def test_loss_aux_loss_and_lora_gradients_match_hf(tmp_path, checkpointing):
    reference, fast = _pair(tmp_path, checkpointing)
    report = fused_report(fast)
    assert all(row["fused"] for row in report), report
    grouped = [row for row in report if "(grouped)" in row["module"]]
    assert len(grouped) == 4 and all(row["lora"] for row in grouped)
    actual, grads = _assert_match(reference, fast, tiny_batch())
    _assert_an_expert_without_tokens(actual)
    experts = [n for n in grads if ".experts." in n]
    assert len(experts) == 2 * 2 * 2  # 2 MoE layers x (gate_up, down) x (A, B)


def test_target_parameters_and_a_trainable_router_match_hf(tmp_path):
    """PEFT's own spelling (attention modules + target_parameters), and router weights that
    train: their gradients (through the top-k weights and the aux loss) match too."""
    reference, fast = _pair(
        tmp_path, False, target_parameters=EXPERT_PARAMETERS, target_modules=ATTENTION
    )
    for model in (reference, fast):
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.requires_grad_(True)
    _, grads = _assert_match(reference, fast, tiny_batch())
    assert sum(name.endswith("mlp.gate.weight") for name in grads) == 2


def test_twenty_steps_follow_the_same_loss_curve(tmp_path):
    reference, fast = _pair(tmp_path, "unsloth")
    batch = tiny_batch(seed=1)
    curves = []
    for model in (reference, fast):
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(20):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    expected, actual = map(torch.tensor, curves)
    assert expected[-1] < expected[0]
    assert torch.allclose(actual, expected, rtol=1e-3, atol=0), (actual - expected).abs().max()


def test_eval_logits_generation_and_unpatch(tmp_path):
    reference, fast = _pair(tmp_path, False)
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


def test_two_active_adapters_run_peft_and_say_why(tmp_path):
    _, fast = _pair(tmp_path, False)
    fast.add_adapter("second", LoraConfig(r=2, target_modules=DEFAULT_TARGETS))
    fast.base_model.set_adapter(["default", "second"])
    rows = [row for row in fused_report(fast) if "(grouped)" in row["module"]]
    assert rows and not any(row["fused"] for row in rows)
    assert all("2 active adapters" in row["reason"] for row in rows)


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padded"])
def test_load_balancing_loss_matches_transformers(masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

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
