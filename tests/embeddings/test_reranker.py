"""FastReranker against the unpatched Hugging Face model, the losses against plain formulas,
training through RerankerTrainer, rerank(), saving and reloading.

The reference relevance is computed as Qwen3-Reranker's model card does: the full (B, S, V)
logits of transformers' causal LM, the last real position, log_softmax over [no, yes]. Scores
and z within atol 1e-5; losses within 1e-5 and LoRA gradients within 1e-4 (relative, fp32).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from embedding_helpers import CPU, cpu_training_args
from nf4_format import run_4bit_layers_from_format
from peft import LoraConfig, get_peft_model
from reranker_helpers import reranker_tokenizer, save_tiny_reranker
from tiny_models import relative_error, tiny_tokenizer
from transformers import AutoModelForCausalLM

from fastlm.embeddings import (
    QWEN3_RERANKER_TEMPLATE,
    FastReranker,
    ListwiseRerankLoss,
    PointwiseRerankLoss,
    RerankerCollator,
    RerankerTemplate,
    RerankerTrainer,
    answer_logits,
    listwise_rerank_loss,
    pointwise_rerank_loss,
)
from fastlm.embeddings.reranker import TEMPLATE_FILE
from fastlm.embeddings.trainer import TRAINABLE_STATE_NAME
from fastlm.errors import NonFiniteLossError
from fastlm.models import fused_report

pytestmark = pytest.mark.usefixtures("one_thread")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUERIES = ["cats?", "where do dogs sleep", "cats?", "x", "rain"]
DOCS = ["the cat sat on the mat", "a dog bed", "yes no", "", "it rains {a lot} today, 100%"]
# The tiny models' yes/no logits are ~0.03: a cap this small changes them by ~10%, so it matters.
SMALL_CAP = {"final_logit_softcapping": 0.05}
SHORT = RerankerTemplate(prefix="<|im_start|>", body="{query}|{document}", suffix="<|im_end|>")
# Learnable with LoRA in a few steps: each query has its own positive and negatives.
TRAIN_ROWS = [
    {"query": "cat", "response": "a cat naps", "rejected_response": ["hot sun", "fast cars"]},
    {"query": "dog", "response": "the dog barks", "rejected_response": ["rain falls"]},
    {"query": "tea", "response": "green tea", "rejected_response": ["old maps", "blue ink", "x"]},
    {"query": "sea", "response": "the sea waves", "rejected_response": ["a red pen", "snow"]},
]


def _reranker(
    tmp_path, model_type="qwen3", device="cpu", template=None, answer_scale=1.0, **overrides
):
    path = save_tiny_reranker(
        model_type, tmp_path / model_type, answer_scale=answer_scale, **overrides
    )
    reranker = FastReranker.from_pretrained(
        str(path), max_seq_length=400, dtype=torch.float32, device_map=device, template=template
    )
    return path, reranker


def _hf_relevance(reference, batch, yes, no):
    """The model card's computation: full logits, last real position, log_softmax([no, yes])."""
    logits = reference(**batch).logits  # (B, S, V)
    mask = batch["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # the highest position with mask 1
    pair = logits[torch.arange(len(last)), last][:, [no, yes]]
    log_probs = torch.log_softmax(pair, dim=-1)
    return log_probs[:, 1].exp(), pair[:, 1] - pair[:, 0]


# --------------------------------------------------------------------------- 1. exactness


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("qwen3", {}),
        ("llama", {}),
        ("gemma2", SMALL_CAP),
        ("gemma2", {"final_logit_softcapping": None}),
    ],
    ids=["qwen3", "llama", "gemma2-softcap", "gemma2-nocap"],
)
def test_scores_match_hf_full_logits_left_and_right_padding(
    tmp_path, model_type, overrides, device
):
    path, reranker = _reranker(tmp_path, model_type, device, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device)
    reference.eval()
    reranker.eval()
    head = reranker.causal_lm.get_output_embeddings()

    def no_full_logits(*_):
        raise AssertionError("the LM head ran on the full hidden states")

    hook = head.register_forward_hook(no_full_logits)
    yes, no = reranker.yes_token_id, reranker.no_token_id
    assert reranker.tokenizer.padding_side == "left"
    seen = []
    for side in ("left", "right"):
        reranker.tokenizer.padding_side = side
        batch = reranker.tokenize(QUERIES, DOCS)
        mask = batch["attention_mask"]
        assert mask.sum(1).unique().numel() > 1  # rows of different lengths: real padding
        assert bool(mask[:, -1 if side == "left" else 0].all())
        with torch.no_grad():
            expected_scores, expected_z = _hf_relevance(reference, batch, yes, no)
            z = reranker(**batch)
        scores = reranker.score(QUERIES, DOCS)  # batched by length, back in input order
        assert torch.allclose(z, expected_z, atol=1e-5, rtol=0), (z - expected_z).abs().max()
        assert torch.allclose(scores, expected_scores.cpu(), atol=1e-5, rtol=0)
        assert torch.allclose(scores, torch.sigmoid(z).cpu(), atol=1e-6, rtol=0)
        seen.append(z.cpu())
    hook.remove()
    assert torch.allclose(seen[0], seen[1], atol=1e-4)  # padding side changes rounding only
    if overrides == SMALL_CAP:
        reference.config.final_logit_softcapping = None  # the cap matters at these logits
        with torch.no_grad():
            _, uncapped = _hf_relevance(reference, batch, yes, no)
        assert (uncapped - expected_z).abs().max() > 1e-3


def test_4bit_reranker_scores_match_hf_on_the_same_nf4_weights(tmp_path):
    """QLoRA base: the same NF4 bytes on both sides (quantised by bitsandbytes on the CPU); the
    reference's 4-bit layers compute with the NF4 format's values of them (tests/nf4_format.py),
    not bitsandbytes' CPU dequantisation, wrong for qwen3's rows of 96 on some hosts."""
    pytest.importorskip("bitsandbytes")
    from fastlm.quant import nf4_config

    path = save_tiny_reranker("qwen3", tmp_path / "qwen3")
    reranker = FastReranker.from_pretrained(
        str(path), max_seq_length=400, dtype=torch.float32, device_map="cpu", load_in_4bit=True
    )
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu", quantization_config=nf4_config(torch.float32)
    ).eval()
    run_4bit_layers_from_format(reference)
    assert any("4bit" in type(m).__name__ for m in reranker.causal_lm.modules())
    reranker.get_peft_model(r=4, lora_alpha=8, use_gradient_checkpointing=False)
    batch = reranker.tokenize(QUERIES, DOCS)
    with torch.no_grad():
        _, expected_z = _hf_relevance(reference, batch, reranker.yes_token_id, reranker.no_token_id)
        z = reranker.eval()(**batch)
    assert torch.allclose(z, expected_z, atol=1e-5, rtol=0), (z - expected_z).abs().max()


def test_answer_logits_bias_softcap_and_other_heads():
    torch.manual_seed(0)
    hidden = torch.randn(5, 12, dtype=torch.float64)
    head = torch.nn.Linear(12, 9, bias=True).double()
    ids = [7, 2]
    full = head(hidden)
    assert torch.allclose(answer_logits(hidden, head, ids), full[:, ids].float(), atol=1e-6)
    capped = 2.0 * torch.tanh(full[:, ids] / 2.0)
    assert torch.allclose(answer_logits(hidden, head, ids, 2.0), capped.float(), atol=1e-6)
    wrapped = torch.nn.Sequential(head)  # not a plain Linear: runs the module on the N states
    assert torch.allclose(answer_logits(hidden, wrapped, ids, 2.0), capped.float(), atol=1e-6)


def test_tokenize_follows_the_model_card_and_truncates_the_body_only(tmp_path):
    _, reranker = _reranker(tmp_path)
    tokenizer = reranker.tokenizer
    template = reranker.template
    assert template == QWEN3_RERANKER_TEMPLATE
    prefix = tokenizer.encode(template.prefix, add_special_tokens=False)
    suffix = tokenizer.encode(template.suffix, add_special_tokens=False)
    body = tokenizer.encode(template.format("q", "doc"), add_special_tokens=False)
    batch = reranker.tokenize(["q", "q"], ["doc", "a longer document"], to_device=False)
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == prefix + body + suffix
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id  # left padded
    text = "".join(tokenizer.convert_ids_to_tokens(row))
    assert text.startswith("<|im_start|>system\nJudge whether the Document")
    assert "<Instruct>: Given a web search query, retrieve relevant passages" in text
    assert text.endswith("<Query>: q\n<Document>: doc" + template.suffix)
    assert template.suffix == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

    limit = len(prefix) + len(suffix) + 10
    short = FastReranker(reranker.model, tokenizer, max_seq_length=limit)
    batch = short.tokenize(["q"], ["a very long document " * 20], to_device=False)
    row = batch["input_ids"][0].tolist()
    assert len(row) == limit and row[: len(prefix)] == prefix and row[-len(suffix) :] == suffix
    assert row[len(prefix) : -len(suffix)] == body[:10]
    with pytest.raises(ValueError, match="leaves no room"):
        FastReranker(reranker.model, tokenizer, max_seq_length=len(prefix) + len(suffix))


# --------------------------------------------------------------------------- 2. LoRA gradients


def _plain_pointwise(z, labels):
    p = torch.sigmoid(z)
    return -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()


def _plain_listwise(z, sizes, temperature):
    losses, start = [], 0
    for size in sizes:
        group = z[start : start + size] / temperature
        losses.append(-(group[0] - torch.log(torch.exp(group).sum())))
        start += size
    return torch.stack(losses).mean()


@pytest.mark.parametrize("loss_name", ["pointwise", "listwise"])
@pytest.mark.parametrize(
    "model_type,checkpointing,overrides",
    [("qwen3", False, {}), ("gemma2", True, SMALL_CAP)],
    ids=["qwen3", "gemma2-softcap-checkpointed"],
)
def test_lora_loss_and_gradients_match_hf_peft(
    tmp_path, model_type, checkpointing, overrides, loss_name, device
):
    path, fast = _reranker(tmp_path, model_type, device, **overrides)
    fast.get_peft_model(
        r=4, lora_alpha=8, init_lora_weights=False, use_gradient_checkpointing=checkpointing
    )
    report = fused_report(fast.model)
    assert report and all(row["fused"] for row in report), report
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device)
    reference = get_peft_model(
        reference,
        LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False),
    )
    fast.model.load_state_dict(reference.state_dict())
    if checkpointing:
        reference.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    fast.train()
    reference.train()
    rows = [dict(row) for row in TRAIN_ROWS[:3]]  # groups of 3, 2 and 4
    if loss_name == "pointwise":
        rows[1] = {"query": "dog", "response": "rain falls", "label": 0.25}  # a soft label
    batch = {k: v.to(device) for k, v in RerankerCollator(fast)(rows).items()}
    assert batch["group_sizes"].tolist() == ([3, 1, 4] if loss_name == "pointwise" else [3, 2, 4])

    if loss_name == "pointwise":
        actual = PointwiseRerankLoss().batch_loss(fast, batch)
    else:
        actual = ListwiseRerankLoss(temperature=0.5).batch_loss(fast, batch)
    actual.backward()
    _, z = _hf_relevance(reference, batch, fast.yes_token_id, fast.no_token_id)
    if loss_name == "pointwise":
        expected = _plain_pointwise(z, batch["label"])
    else:
        expected = _plain_listwise(z, batch["group_sizes"].tolist(), 0.5)
    expected.backward()

    assert abs(actual.item() - expected.item()) <= 1e-5 * abs(expected.item())
    expected_grads = {n: p.grad for n, p in reference.named_parameters() if "lora_" in n}
    actual_grads = {
        n.removeprefix("model."): p.grad for n, p in fast.named_parameters() if "lora_" in n
    }
    assert expected_grads.keys() == actual_grads.keys()
    assert len(expected_grads) == 2 * len(PROJECTIONS) * fast.config.num_hidden_layers
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative_error(actual_grads[name], grad) <= 1e-4, name


# --------------------------------------------------------------------------- 3. loss formulas


def test_pointwise_loss_matches_the_formula_values_and_gradients():
    torch.manual_seed(0)
    z = torch.randn(7, dtype=torch.float64) * 3
    labels = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.2, 1.0], dtype=torch.float64)
    ours, plain = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = pointwise_rerank_loss(ours, labels)
    expected = _plain_pointwise(plain, labels)
    loss.backward()
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert torch.allclose(ours.grad, plain.grad, rtol=1e-10, atol=1e-14)
    assert torch.allclose(ours.grad, (torch.sigmoid(z) - labels) / 7)  # ∂L/∂z_i = (σ − y)/N
    assert torch.equal(PointwiseRerankLoss()(z, labels), loss.detach())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pointwise_rerank_loss(z, labels * 2)
    with pytest.raises(ValueError, match="labels for"):
        pointwise_rerank_loss(z, labels[:3])


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_listwise_loss_matches_the_formula_for_unequal_groups(temperature):
    torch.manual_seed(1)
    sizes = [3, 1, 5, 2]
    z = torch.randn(sum(sizes), dtype=torch.float64)
    ours, plain = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = listwise_rerank_loss(ours, torch.tensor(sizes), temperature)
    expected = _plain_listwise(plain, sizes, temperature)
    loss.backward()
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert torch.allclose(ours.grad, plain.grad, rtol=1e-10, atol=1e-14)
    assert ours.grad[3] == 0  # a group of one: log 1, no gradient
    module = ListwiseRerankLoss(temperature)
    assert torch.allclose(module(z, torch.tensor(sizes)), loss.detach(), rtol=1e-12)
    for bad in ([3, 1, 5], [3, 0, 6, 2], []):
        with pytest.raises(ValueError, match="group sizes"):
            listwise_rerank_loss(z, bad)
    with pytest.raises(ValueError, match="temperature"):
        ListwiseRerankLoss(temperature=0)


def test_collator_rows_labels_groups_and_listwise_data_checks(tmp_path):
    _, reranker = _reranker(tmp_path)
    collator = RerankerCollator(reranker, instruction="find it")
    st_rows = [  # Sentence-Transformers names
        {"anchor": "cat", "positive": "a cat", "negative": "a dog"},
        {"anchor": "sun", "positive": "hot sun"},
    ]
    batch = collator(st_rows)
    assert batch["group_sizes"].tolist() == [2, 1]
    assert batch["label"].tolist() == [1.0, 0.0, 1.0]
    expected = reranker.tokenize(
        ["cat", "cat", "sun"], ["a cat", "a dog", "hot sun"], "find it", to_device=False
    )
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    pairs = collator([{"query": "q", "response": "d", "label": 0.0}] * 2)
    with pytest.raises(ValueError, match="no row has a rejected_response"):
        ListwiseRerankLoss().batch_loss(reranker, pairs)
    mixed = collator([{"query": "q", "response": "d", "label": 0.0, "rejected_response": ["e"]}])
    with pytest.raises(ValueError, match="label != 1"):
        ListwiseRerankLoss().batch_loss(reranker, mixed)


# --------------------------------------------------------------------------- 4. training


def _args(tmp_path, **overrides):
    return cpu_training_args(tmp_path, **{"learning_rate": 1e-2, "max_steps": 12, **overrides})


def _positives_first(reranker, rows) -> bool:
    return all(
        reranker.rerank(row["query"], [row["response"], *row["rejected_response"]])[0][0] == 0
        for row in rows
    )


@pytest.mark.parametrize(
    "loss", [ListwiseRerankLoss(), PointwiseRerankLoss()], ids=lambda x: type(x).__name__
)
def test_trainer_lowers_the_loss_and_ranks_positives_first(tmp_path, loss):
    # A short template (the document is a larger share of the attention) and answer rows of a
    # realistic size (see save_tiny_reranker): learnable in a dozen steps.
    _, reranker = _reranker(tmp_path, template=SHORT, answer_scale=30.0)
    reranker.get_peft_model(r=4, lora_alpha=8, use_gradient_checkpointing=False)
    assert not _positives_first(reranker, TRAIN_ROWS)
    args = _args(tmp_path, save_strategy="steps", save_steps=12)
    trainer = RerankerTrainer(reranker, args, train_dataset=TRAIN_ROWS, loss=loss)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert _positives_first(reranker, TRAIN_ROWS)
    assert math.isfinite(trainer.evaluate(eval_dataset=TRAIN_ROWS)["eval_loss"])

    checkpoint = tmp_path / "out" / "checkpoint-12"
    for name in ("adapter_config.json", TEMPLATE_FILE, TRAINABLE_STATE_NAME, "optimizer.pt"):
        assert (checkpoint / name).exists(), name
    reloaded = FastReranker.from_pretrained(str(checkpoint), **CPU)
    assert reloaded.template == SHORT
    queries = [row["query"] for row in TRAIN_ROWS]
    documents = [row["response"] for row in TRAIN_ROWS]
    expected = reranker.score(queries, documents)
    assert torch.allclose(reloaded.score(queries, documents), expected, atol=1e-6, rtol=0)


def test_non_finite_loss_stops_training(tmp_path):
    class _Broken(PointwiseRerankLoss):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * float("nan")

    _, reranker = _reranker(tmp_path)
    reranker.get_peft_model(r=4, use_gradient_checkpointing=False)
    trainer = RerankerTrainer(reranker, _args(tmp_path), train_dataset=TRAIN_ROWS, loss=_Broken())
    with pytest.raises(NonFiniteLossError, match="step 1"):
        trainer.train()


# --------------------------------------------------------------------------- 5. rerank, errors


def test_rerank_orders_by_score_with_top_k_and_checks_its_input(tmp_path):
    _, reranker = _reranker(tmp_path)
    documents = DOCS
    scores = reranker.score("cats?", documents, batch_size=2)
    ranked = reranker.rerank("cats?", documents, batch_size=2)
    assert [i for i, _, _ in ranked] == sorted(range(5), key=lambda i: -scores[i].item())
    assert [doc for _, _, doc in ranked] == [documents[i] for i, _, _ in ranked]
    for i, score, _ in ranked:
        assert score == pytest.approx(scores[i].item(), abs=1e-6)
    assert reranker.rerank("cats?", documents, top_k=2) == ranked[:2]
    assert len(reranker.rerank("cats?", documents, top_k=10)) == 5
    instructed = reranker.score("cats?", documents, instruction="Find pets")
    assert not torch.allclose(instructed, scores)  # the instruction is part of the prompt

    with pytest.raises(ValueError, match="no documents"):
        reranker.rerank("cats?", [])
    with pytest.raises(ValueError, match="no documents"):
        reranker.score([], [])
    with pytest.raises(ValueError, match="top_k"):
        reranker.rerank("cats?", documents, top_k=0)
    with pytest.raises(TypeError, match="one query string"):
        reranker.rerank(["cats?"], documents)
    with pytest.raises(TypeError, match="not one string"):
        reranker.rerank("cats?", "a document")
    with pytest.raises(ValueError, match="2 queries but 5 documents"):
        reranker.score(["a", "b"], documents)


def test_missing_answer_token_names_the_fix(tmp_path):
    _, reranker = _reranker(tmp_path)
    with pytest.raises(ValueError, match=r"'yes' answer 'yes' is not a single token.*template="):
        FastReranker(reranker.model, tiny_tokenizer())
    with pytest.raises(ValueError, match=r"'no' answer 'no' is not a single token"):
        FastReranker(reranker.model, reranker_tokenizer(answers=("yes",)))
    # Single characters are tokens of the character tokenizer: any such pair works.
    letters = dataclasses.replace(SHORT, yes="Y", no="N")
    custom = FastReranker(reranker.model, tiny_tokenizer(), template=letters)
    assert custom.yes_token_id == custom.tokenizer.convert_tokens_to_ids("Y")
    assert custom.score("q", ["d"]).shape == (1,)
    with pytest.raises(ValueError, match="not a single token"):
        custom.template = SHORT  # a template is checked (and tokenised) when it is set
    assert custom.template == letters
    reranker.template = letters  # both tokenizers have Y and N
    assert reranker.yes_token_id == reranker.tokenizer.convert_tokens_to_ids("Y")


# --------------------------------------------------------------------------- 6. saving


def test_saving_into_the_folder_the_reranker_was_loaded_from_is_refused(tmp_path):
    from fastlm.export import ExportPathError

    path, reranker = _reranker(tmp_path)
    reranker.get_peft_model(r=4, lora_alpha=8)
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    with pytest.raises(ExportPathError, match="reads from"):
        reranker.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before


def test_adapter_and_merged_saves_reload_with_equal_scores(tmp_path):
    _, reranker = _reranker(tmp_path)
    base_scores = reranker.score(QUERIES, DOCS)
    reranker.get_peft_model(r=4, lora_alpha=8, init_lora_weights=False)  # B ≠ 0: LoRA matters
    reranker.template = dataclasses.replace(QWEN3_RERANKER_TEMPLATE, default_instruction="Judge it")
    scores = reranker.score(QUERIES, DOCS)
    assert (scores - base_scores).abs().max() > 1e-4

    reranker.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = FastReranker.from_pretrained(str(tmp_path / "adapter"), **CPU)
    assert loaded.template == reranker.template
    assert torch.allclose(loaded.score(QUERIES, DOCS), scores, atol=1e-6, rtol=0)

    reranker.save_pretrained_merged(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").exists()
    merged = FastReranker.from_pretrained(str(tmp_path / "merged"), **CPU)
    assert not hasattr(merged.model, "peft_config")
    assert merged.template == reranker.template
    assert torch.allclose(merged.score(QUERIES, DOCS), scores, atol=1e-5, rtol=0)
