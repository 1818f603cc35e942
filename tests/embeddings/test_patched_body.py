"""fastlm-patched embedding bodies vs unpatched transformers + PEFT (Qwen3, bidirectional Gemma 3).

Same weights and LoRA initialisation (B ≠ 0), a padded batch, fp32. Pooled embeddings within
atol 1e-5 and the InfoNCE loss within relative error 1e-4 of transformers + PEFT; every LoRA
gradient within 1e-4 of the fp64 truth (the reference model in float64), or no further from it
than transformers' own fp32 run (on Gemma 3 that is 1.5e-4 off on some hosts: comparing two
fp32 runs at 1e-4 failed there, fastlm being the closer one), with and without checkpointing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from embedding_helpers import CPU, TEXTS, save_tiny_embedding_model
from nf4_format import run_4bit_layers_from_format
from tiny_models import copy_lora, on_device, relative_error

from fastlm.embeddings import EmbeddingCollator, InfoNCELoss, load_embedding_model
from fastlm.models import attention, fused_report, is_patched

RTOL = 1e-4
ROWS = [
    {"query": "find the cat", "response": TEXTS[0], "rejected_response": [TEXTS[1], TEXTS[2]]},
    {"query": "fox?", "response": TEXTS[1], "rejected_response": [TEXTS[3]]},
    {"query": "greeting", "response": TEXTS[2], "rejected_response": []},
]


def _pair(tmp_path, kind, checkpointing, device, all_fused=True):
    """(unpatched reference, patched model): the same weights and LoRA (B ≠ 0), in train mode;
    ``all_fused``: every fused_report row fused (a family with transformers' linears has not)."""
    path = save_tiny_embedding_model(kind, tmp_path / kind)
    models = []
    for kernels in (False, True):
        model, _ = load_embedding_model(
            str(path),
            max_seq_length=120,
            dtype=torch.float32,
            device_map=device,
            use_fastlm_kernels=kernels,
        )
        model.get_peft_model(
            r=4, lora_alpha=8, init_lora_weights=False, use_gradient_checkpointing=checkpointing
        )
        model.train()
        models.append(model)
    reference, fast = models
    assert not is_patched(reference.backbone) and is_patched(fast.backbone)
    rows = fused_report(fast.backbone)
    assert rows and (not all_fused or all(row["fused"] and row["lora"] for row in rows)), rows
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = InfoNCELoss(temperature=0.05).batch_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads


def _assert_same_embeddings_loss_and_grads(reference, fast, batch) -> None:
    """Pooled embeddings within atol 1e-5 and the InfoNCE loss within RTOL of the reference;
    every (non-zero) LoRA gradient within RTOL of the fp64 truth, or as close as the
    reference's own."""
    with torch.no_grad():
        expected = reference(**batch["response"])
        actual = fast(**batch["response"])
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0)
    expected_loss, expected_grads = _loss_and_grads(reference, batch)
    actual_loss, actual_grads = _loss_and_grads(fast, batch)
    assert abs(actual_loss - expected_loss) <= RTOL * abs(expected_loss)
    assert expected_grads.keys() == actual_grads.keys() and len(expected_grads) > 0
    _, truth = _loss_and_grads(copy.deepcopy(reference).double(), batch)
    for name, grad in truth.items():
        assert grad.abs().sum() > 0, name
        ours = relative_error(actual_grads[name].double(), grad)
        theirs = relative_error(expected_grads[name].double(), grad)
        assert ours <= max(RTOL, theirs), (name, ours, theirs)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_embeddings_and_lora_gradients_match_hf(tmp_path, kind, checkpointing, device):
    reference, fast = _pair(tmp_path, kind, checkpointing, device)
    # No prompts: the point here is the body; short texts keep the interpreter runs small.
    batch = EmbeddingCollator(fast, prompts={})(ROWS)
    batch = on_device(batch, device)
    _assert_same_embeddings_loss_and_grads(reference, fast, batch)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
@pytest.mark.usefixtures("kernel_on_cpu")
def test_padded_batch_on_the_kernel_matches_hf(tmp_path, kind, device):
    """The kernel (on a CPU host in the interpreter): a padded batch of bidirectional rows runs
    the padded launch (Gemma 3's windowed layers stay on SDPA: the kernel's window is causal
    only)."""
    reference, fast = _pair(tmp_path, kind, False, device)
    fast.padding_free = False  # the padded launch (test_padding_free.py: the packed one)
    batch = EmbeddingCollator(fast, prompts={})(ROWS)
    assert not batch["response"]["attention_mask"].all()  # padded
    batch = on_device(batch, device)
    _assert_same_embeddings_loss_and_grads(reference, fast, batch)
    ran = {row["attention"] for row in fused_report(fast.backbone).attention}
    windowed = {"sdpa"} if kind == "gemma3" else set()
    assert ran == {attention.FLASH_VARLEN, *windowed}


def test_patched_gemma3_attends_both_ways(tmp_path):
    """The non-causal mask survives the patch: the first token's state depends on the next one."""
    path = save_tiny_embedding_model("gemma3", tmp_path / "gemma3")
    model, _ = load_embedding_model(str(path), max_seq_length=64, **CPU)
    assert is_patched(model.backbone)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    mask = torch.ones_like(ids)

    def hidden(tokens):
        with torch.no_grad():
            return model.backbone(input_ids=tokens, attention_mask=mask).last_hidden_state

    base = hidden(ids)
    next_changed = ids.clone()
    next_changed[0, 1] = 20
    assert (hidden(next_changed)[0, 0] - base[0, 0]).abs().max() > 1e-4  # sees the future


def test_4bit_body_embeddings_gradients_and_merged_save(tmp_path):
    """QLoRA: the same NF4 body patched and unpatched, then a save whose LoRA is merged into the
    dequantised weights reloads as a 16-bit model, same vectors. The unpatched reference's 4-bit
    layers compute with the NF4 format's values (tests/nf4_format.py): bitsandbytes' CPU
    dequantisation is wrong for this body's rows of 96 (o_proj) on some hosts."""
    pytest.importorskip("bitsandbytes")
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    models = []
    for kernels in (False, True):
        model, _ = load_embedding_model(
            str(path), max_seq_length=120, use_fastlm_kernels=kernels, load_in_4bit=True, **CPU
        )
        model.get_peft_model(r=4, lora_alpha=8, init_lora_weights=False)
        models.append(model.train())
    reference, fast = models
    run_4bit_layers_from_format(reference)
    assert any("4bit" in type(m).__name__ for m in fast.backbone.modules())
    assert all(row["fused"] and row["lora"] for row in fused_report(fast.backbone))
    copy_lora(reference, fast)  # the packed 4-bit weights are equal: the adapters only
    batch = EmbeddingCollator(fast, prompts={})(ROWS)
    _assert_same_embeddings_loss_and_grads(reference, fast, batch)

    fast.save_pretrained(tmp_path / "merged")
    reloaded, _ = load_embedding_model(str(tmp_path / "merged"), max_seq_length=120, **CPU)
    assert not any("4bit" in type(m).__name__ for m in reloaded.backbone.modules())
    with torch.no_grad():
        vectors = reloaded.eval()(**batch["response"])
        in_memory = fast.eval()(**batch["response"])
    assert torch.allclose(vectors, in_memory, atol=1e-4, rtol=0), (vectors - in_memory).abs().max()


def test_4bit_refuses_full_finetuning(tmp_path):
    path = save_tiny_embedding_model("qwen3", tmp_path / "qwen3")
    with pytest.raises(ValueError, match="QLoRA"):
        load_embedding_model(str(path), load_in_4bit=True, full_finetuning=True, **CPU)
