"""Rerankers: a causal LM that answers "yes" or "no" to "does this document meet the query?".

reranker = FastReranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B", max_seq_length=1024)
reranker.get_peft_model(r=16, lora_alpha=32)
RerankerTrainer(reranker, args, train_dataset=rows, loss=ListwiseRerankLoss()).train()
reranker.rerank("how do I ...?", documents, top_k=3)  # [(index, score, document), ...]

Each (query, document) pair is written as ``prefix + body + suffix`` (Qwen3-Reranker's template
by default). With h the final hidden state at the last real token, W and b the LM head and c the
final-logit soft-cap (Gemma 2/3; no cap elsewhere):

    l_t = c·tanh((W_t·h + b_t) / c),   z = l_yes − l_no,   score = σ(z) = softmax([l_no, l_yes])_yes

Only the rows W_yes and W_no are multiplied: the (B, S, V) logits are never formed. Losses on z:

- pointwise: L = 1/N Σ_i BCE-with-logits(z_i, y_i), y_i ∈ [0, 1];
- listwise:  L = −1/G Σ_g log softmax(z_g / τ)_0 over each query's group g = [positive,
  negatives...] (groups of any size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from fastlm.distributed import is_plain_linear, unshard_for_direct_read
from fastlm.embeddings.data import normalize_row
from fastlm.embeddings.pooling import pool
from fastlm.embeddings.trainer import EmbeddingTrainer
from fastlm.export import save_pretrained_merged
from fastlm.export._atomic import atomic_directory
from fastlm.export.merged import input_folders
from fastlm.loading.checkpointing import TrainerCheckpointing
from fastlm.loading.pipeline import DEFAULT_MAX_SEQ_LENGTH, add_causal_lm_lora, load_causal_lm
from fastlm.models import decoder_body

TEMPLATE_FILE = "fastlm_reranker.json"  # the template, saved beside the weights or adapter


@dataclass(frozen=True)
class RerankerTemplate:
    """A reranker prompt: ``prefix + body + suffix``, answered by the token ``yes`` or ``no``.

    Usage: ``RerankerTemplate(prefix, "Q: {query}\\nD: {document}", suffix)``; ``body`` may use
    ``{instruction}``, ``{query}`` and ``{document}``. Only the body is truncated.
    """

    prefix: str
    body: str
    suffix: str
    default_instruction: str = ""
    yes: str = "yes"
    no: str = "no"

    def format(self, query: str, document: str, instruction: str | None = None) -> str:
        """The body for one pair (``instruction=None``: the default instruction)."""
        if instruction is None:
            instruction = self.default_instruction
        return self.body.format(instruction=instruction, query=query, document=document)


# As on the Qwen3-Reranker model card.
QWEN3_RERANKER_TEMPLATE = RerankerTemplate(
    prefix=(
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
        'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n"
    ),
    body="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction=(
        "Given a web search query, retrieve relevant passages that answer the query"
    ),
)

# Gemma's turn format around Qwen3-Reranker's body and instruction, for Gemma-family causal LMs
# (their tokenizers have "yes" and "no" as single tokens); ``fastlm rerank --template gemma``.
GEMMA_RERANKER_TEMPLATE = RerankerTemplate(
    prefix=(
        "<start_of_turn>user\nJudge whether the Document meets the requirements based on the "
        'Query and the Instruct provided. Note that the answer can only be "yes" or "no".\n'
    ),
    body=QWEN3_RERANKER_TEMPLATE.body,
    suffix="<end_of_turn>\n<start_of_turn>model\n",
    default_instruction=QWEN3_RERANKER_TEMPLATE.default_instruction,
)


def answer_logits(
    hidden: torch.Tensor, head: nn.Module, token_ids: Sequence[int], softcap: float | None = None
) -> torch.Tensor:
    """(N, H) final hidden states → (N, len(token_ids)) fp32 LM logits of those tokens alone.

    Usage: ``answer_logits(h, model.lm_head, [yes_id, no_id], softcap=None)``. A plain linear
    head multiplies only the wanted rows (with its bias); any other head runs on the N states.
    """
    ids = torch.tensor(list(token_ids), device=hidden.device)
    if is_plain_linear(head):
        unshard_for_direct_read(head)  # an FSDP2 unit: its forward (FSDP's hook) is skipped
        logits = hidden.float() @ head.weight.index_select(0, ids).float().T
        if head.bias is not None:
            logits = logits + head.bias.index_select(0, ids).float()
    else:
        logits = head(hidden).index_select(-1, ids).float()
    if softcap:  # Gemma 2/3: l = c·tanh(l / c), as their causal-LM forward
        logits = torch.tanh(logits / softcap) * softcap
    return logits


# --------------------------------------------------------------------------- losses


def pointwise_rerank_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L = 1/N Σ_i −[y_i log σ(z_i) + (1 − y_i) log(1 − σ(z_i))], labels y ∈ [0, 1].

    Usage: ``pointwise_rerank_loss(z, torch.tensor([1.0, 0.0]))``.
    """
    labels = labels.to(device=logits.device, dtype=logits.dtype)
    if labels.shape != logits.shape:
        raise ValueError(f"{tuple(labels.shape)} labels for {tuple(logits.shape)} logits")
    if labels.numel() and (labels.min() < 0 or labels.max() > 1):
        raise ValueError("pointwise reranker labels must lie in [0, 1]")
    return F.binary_cross_entropy_with_logits(logits, labels)


def listwise_rerank_loss(
    logits: torch.Tensor, group_sizes: torch.Tensor | Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """L = −1/G Σ_g log( exp(z_g0/τ) / Σ_j exp(z_gj/τ) ): each group's first pair is positive.

    Usage: ``listwise_rerank_loss(z, [3, 1, 4], temperature=0.5)``; ``logits`` holds the groups
    one after the other (here 8 pairs). Groups may differ in size (padded with −inf).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sizes = torch.as_tensor(group_sizes, dtype=torch.long, device=logits.device)
    if sizes.numel() == 0 or bool((sizes < 1).any()) or int(sizes.sum()) != logits.numel():
        raise ValueError(
            f"group sizes {sizes.tolist()} must be ≥ 1 and add up to the {logits.numel()} logits"
        )
    groups = torch.arange(len(sizes), device=logits.device).repeat_interleave(sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    slots = torch.arange(logits.numel(), device=logits.device) - starts[groups]
    padded = logits.new_full((len(sizes), int(sizes.max())), float("-inf"))
    padded = padded.index_put((groups, slots), logits / temperature)  # out of place: keeps grad
    return F.cross_entropy(padded, torch.zeros_like(sizes))


class RerankLoss(nn.Module):
    """Base: ``batch_loss(reranker, batch)`` scores the collated pairs and applies ``forward``."""

    def batch_loss(self, reranker: nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError


class PointwiseRerankLoss(RerankLoss):
    """``pointwise_rerank_loss`` as a module: every pair against its label.

    Usage: ``PointwiseRerankLoss()``. A row's response has its ``label`` (1 when the row has
    none) and each of its ``rejected_response`` texts label 0.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pointwise_rerank_loss(logits, labels)

    def batch_loss(self, reranker: nn.Module, batch: dict) -> torch.Tensor:
        return self(reranker(batch["input_ids"], batch["attention_mask"]), batch["label"])


class ListwiseRerankLoss(RerankLoss):
    """``listwise_rerank_loss`` as a module: per row, its response against its negatives.

    Usage: ``ListwiseRerankLoss(temperature=1.0)``; rows ``{"query", "response",
    "rejected_response": [...]}`` (or Sentence-Transformers' anchor / positive / negative).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        return listwise_rerank_loss(logits, group_sizes, self.temperature)

    def batch_loss(self, reranker: nn.Module, batch: dict) -> torch.Tensor:
        sizes = batch["group_sizes"]
        if bool((sizes == 1).all()):
            raise ValueError(
                "listwise reranker loss: no row has a rejected_response, so every group holds "
                "its positive alone and the loss is 0; add negatives or use PointwiseRerankLoss"
            )
        first = (torch.cumsum(sizes, 0) - sizes).to(batch["label"].device)
        if bool((batch["label"][first] != 1).any()):
            raise ValueError(
                "listwise reranker loss: each row's response is its positive, but some rows have "
                "label != 1 (scored pairs belong to PointwiseRerankLoss)"
            )
        return self(reranker(batch["input_ids"], batch["attention_mask"]), sizes)


# --------------------------------------------------------------------------- model


class FastReranker(TrainerCheckpointing, nn.Module):
    """A fastlm-patched causal LM scored by its "yes" vs "no" logit (see module doc).

    Usage: ``FastReranker(model, tokenizer)`` for a model from ``FastModel.from_pretrained``, or
    ``FastReranker.from_pretrained(path)``. The tokenizer is switched to left padding.
    ``forward(input_ids, attention_mask)`` gives the relevance logits z, with gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        template: RerankerTemplate | None = None,
        max_seq_length: int = 2048,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("a reranker needs the model's tokenizer (the folder has none)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        tokenizer.padding_side = "left"  # the last real token is then the last position
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.template = template if template is not None else QWEN3_RERANKER_TEMPLATE
        self._body_budget()  # fail now if the template leaves no room

    @property
    def template(self) -> RerankerTemplate:
        """The prompt template; setting it re-tokenises its prefix, suffix and answers."""
        return self._template

    @template.setter
    def template(self, template: RerankerTemplate) -> None:
        tokenizer = self.tokenizer
        yes = _answer_token_id(tokenizer, template.yes, "yes")
        no = _answer_token_id(tokenizer, template.no, "no")
        if yes == no:
            raise ValueError(f"'yes' and 'no' are the same token ({yes})")
        self._template = template
        self.yes_token_id, self.no_token_id = yes, no
        self._prefix_ids = _leading_special_ids(tokenizer) + tokenizer.encode(
            template.prefix, add_special_tokens=False
        )
        self._suffix_ids = tokenizer.encode(template.suffix, add_special_tokens=False)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        max_seq_length: int | None = None,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool = False,
        device_map: str | dict | None = "auto",
        template: RerankerTemplate | None = None,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> FastReranker:
        """Load a causal LM (or a saved reranker, or a LoRA adapter folder) as a reranker.

        Usage: ``FastReranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B", max_seq_length=1024)``.
        The model goes through ``FastModel.from_pretrained`` (fastlm's kernels; ``kwargs`` go
        there). An adapter folder loads its base model, then the adapter (``is_trainable``: to
        train it further). ``template=None``: the folder's saved template, else Qwen3-Reranker's.
        """
        from transformers import AutoTokenizer  # lazy: seconds to import

        if max_seq_length is None:
            max_seq_length = DEFAULT_MAX_SEQ_LENGTH
        folder = Path(model_name)
        adapter = (folder / "adapter_config.json").is_file() and not (
            folder / "config.json"
        ).is_file()
        base_name = model_name
        if adapter:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            base_name = config["base_model_name_or_path"]
        model, tokenizer = load_causal_lm(
            base_name,
            max_seq_length=max_seq_length,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            device_map=device_map,
            **kwargs,
        )
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_name, is_trainable=is_trainable)
            if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
                tokenizer = AutoTokenizer.from_pretrained(model_name)
        if template is None and (folder / TEMPLATE_FILE).is_file():
            template = RerankerTemplate(**json.loads((folder / TEMPLATE_FILE).read_text("utf-8")))
        return cls(model, tokenizer, template=template, max_seq_length=max_seq_length)

    def _body_budget(self) -> int:
        fixed = len(self._prefix_ids) + len(self._suffix_ids)
        if self.max_seq_length - fixed < 1:
            raise ValueError(
                f"max_seq_length={self.max_seq_length} leaves no room for the query and "
                f"document: the template's prefix and suffix take {fixed} tokens"
            )
        return self.max_seq_length - fixed

    # ------------------------------------------------------------------ properties

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` (under PEFT's wrapper when LoRA is attached)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def config(self):
        """The transformers config of the causal LM."""
        return self.causal_lm.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ scoring

    def tokenize(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        instruction: str | None = None,
        to_device: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Token tensors of the templated pairs, padded on the tokenizer's side.

        Usage: ``batch = reranker.tokenize(["q", "q"], ["doc 1", "doc 2"])``. As the model card:
        prefix tokens + body tokens (cut to fit ``max_seq_length``) + suffix tokens.
        """
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        budget = self._body_budget()
        bodies = [self.template.format(q, d, instruction) for q, d in zip(queries, documents)]
        encoded = []
        if bodies:
            encoded = self.tokenizer(
                bodies, add_special_tokens=False, truncation=True, max_length=budget
            )["input_ids"]
        rows = [self._prefix_ids + ids + self._suffix_ids for ids in encoded]
        width = max((len(row) for row in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row)
            attention_mask[i, span] = 1
        device = self.device if to_device else "cpu"
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, S) token ids and mask → (N,) fp32 relevance logits z = l_yes − l_no."""
        causal_lm = self.causal_lm
        body = decoder_body(causal_lm)
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (N, S, H)
        last = pool(hidden, attention_mask, "lasttoken")  # either padding side
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        logits = answer_logits(
            last,
            causal_lm.get_output_embeddings(),
            (self.yes_token_id, self.no_token_id),
            softcap,
        )
        return logits[:, 0] - logits[:, 1]

    @torch.no_grad()
    def score(
        self,
        queries: str | Sequence[str],
        documents: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 16,
        return_logits: bool = False,
    ) -> torch.Tensor:
        """Relevance σ(z) ∈ (0, 1) of each (query, document) pair → (N,) fp32 CPU tensor.

        Usage: ``reranker.score(["q1", "q2"], ["d1", "d2"])``; one query string is paired with
        every document. ``return_logits=True`` gives z itself. Runs in eval mode.
        """
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string")
        documents = list(documents)
        queries = [queries] * len(documents) if isinstance(queries, str) else list(queries)
        if not documents:
            raise ValueError("score() got no documents: pass at least one (query, document) pair")
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        # Longest first, so that each batch pads little; put back in input order at the end.
        order = sorted(range(len(documents)), key=lambda i: -len(queries[i]) - len(documents[i]))
        was_training = self.training
        self.eval()
        chunks = []
        try:
            for start in range(0, len(order), batch_size):
                picked = order[start : start + batch_size]
                batch = self.tokenize(
                    [queries[i] for i in picked], [documents[i] for i in picked], instruction
                )
                chunks.append(self(**batch).cpu())
        finally:
            self.train(was_training)
        logits = torch.empty(len(documents))
        logits[torch.tensor(order)] = torch.cat(chunks)
        return logits if return_logits else torch.sigmoid(logits)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        batch_size: int = 16,
        instruction: str | None = None,
    ) -> list[tuple[int, float, str]]:
        """Documents by relevance to ``query``, best first: ``[(index, score, document), ...]``.

        Usage: ``reranker.rerank("capital of France?", docs, top_k=3)``; ``index`` is the
        position in ``documents``, ``score`` is σ(z) (ties keep the input order).
        """
        if not isinstance(query, str):
            raise TypeError(f"rerank() takes one query string, got {type(query).__name__}")
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string")
        documents = list(documents)
        if not documents:
            raise ValueError("rerank() got no documents to rank")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be ≥ 1 (or None for all), got {top_k}")
        logits = self.score(query, documents, instruction, batch_size, return_logits=True)
        order = sorted(range(len(documents)), key=lambda i: (-logits[i].item(), i))
        scores = torch.sigmoid(logits)  # ranked by z: σ saturates to 1.0 for z > ~17 in fp32
        return [(i, scores[i].item(), documents[i]) for i in order[:top_k]]

    # ------------------------------------------------------------------ training set-up

    def get_peft_model(
        self,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        use_gradient_checkpointing: bool | str = True,
        random_state: int = 3407,
        **kwargs: Any,
    ) -> FastReranker:
        """Attach LoRA through ``FastModel.get_peft_model`` (fused fastlm paths); returns self.

        Usage: ``reranker.get_peft_model(r=16, lora_alpha=32)``; ``kwargs`` as there.
        """
        if hasattr(self.model, "peft_config"):
            raise ValueError("this reranker already has LoRA adapters")
        self.model = add_causal_lm_lora(
            self.model,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
            **kwargs,
        )
        return self

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """The LoRA adapter (or, fully fine-tuned, the model), tokenizer and template.

        Usage: ``reranker.save_pretrained("out/adapter")``, then
        ``FastReranker.from_pretrained("out/adapter")`` scores the same.
        """
        inputs = input_folders(self.model, self.tokenizer)  # never write where it was read
        with atomic_directory(save_directory, inputs=inputs) as tmp:
            self._write(Path(tmp))
        return Path(save_directory).absolute()

    def save_pretrained_merged(
        self, save_directory: str | os.PathLike, save_method: str = "merged_16bit", **kwargs: Any
    ) -> Path:
        """LoRA merged into the weights (``fastlm.export.save_pretrained_merged``) + template.

        Usage: ``reranker.save_pretrained_merged("out/merged")``: a plain causal-LM folder that
        ``FastReranker.from_pretrained`` (or transformers) loads.
        """
        path = save_pretrained_merged(
            self.model, save_directory, self.tokenizer, save_method, **kwargs
        )
        self._write_template(path)
        return path

    def _write(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self._write_template(folder)

    def _write_template(self, folder: Path) -> None:
        text = json.dumps(asdict(self.template), indent=2, ensure_ascii=False)
        (Path(folder) / TEMPLATE_FILE).write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- data and training


class RerankerCollator:
    """Rows → templated, tokenised pairs (CPU) for ``loss.batch_loss(reranker, batch)``.

    Usage: ``RerankerCollator(reranker)(rows)`` → ``{"input_ids", "attention_mask" (N, S),
    "label" (N,), "group_sizes" (B,)}``: per row its response (its ``label``, else 1), then its
    ``rejected_response`` texts (label 0). Column names as ``fastlm.embeddings.normalize_row``.
    """

    def __init__(self, reranker: FastReranker, instruction: str | None = None) -> None:
        self.reranker = reranker
        self.instruction = instruction

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        queries, documents, labels, sizes = [], [], [], []
        for row in (normalize_row(dict(row)) for row in rows):
            negatives = row["rejected_response"]
            queries += [row["query"]] * (1 + len(negatives))
            documents += [row["response"], *negatives]
            labels += [row.get("label", 1.0)] + [0.0] * len(negatives)
            sizes.append(1 + len(negatives))
        batch = self.reranker.tokenize(queries, documents, self.instruction, to_device=False)
        batch["label"] = torch.tensor(labels, dtype=torch.float32)
        batch["group_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return batch


class RerankerTrainer(EmbeddingTrainer):
    """The Hugging Face ``Trainer`` for a ``FastReranker`` and a ``RerankLoss``.

    Usage: ``RerankerTrainer(reranker, args, train_dataset=rows, loss=ListwiseRerankLoss())``.
    As ``EmbeddingTrainer``: text columns kept (``remove_unused_columns`` off), tokenised by
    ``RerankerCollator`` (``instruction``: the template's instruction for every row), evaluation
    reports the loss, NaN/inf losses raise ``NonFiniteLossError``. Checkpoints hold the adapter
    (or full model), tokenizer, template and ``fastlm_trainable.safetensors`` (for resuming).
    """

    def __init__(
        self,
        model: FastReranker,
        args: TrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        loss: RerankLoss | None = None,
        data_collator: Any = None,
        instruction: str | None = None,
        check_finite_loss: bool = True,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = TrainingArguments(output_dir="reranker_trainer_output")
        super().__init__(
            model,
            args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            loss=loss if loss is not None else PointwiseRerankLoss(),
            data_collator=data_collator or RerankerCollator(model, instruction),
            check_finite_loss=check_finite_loss,
            **kwargs,
        )

    def _write_model(self, model: FastReranker, output_dir: Path) -> None:
        """The model part of a checkpoint: adapter (or full model), tokenizer and template."""
        model._write(output_dir)


# --------------------------------------------------------------------------- helpers


def _answer_token_id(tokenizer, word: str, role: str) -> int:
    """The id of ``word``: a vocabulary entry (as Qwen3-Reranker's card looks it up), else the
    one token it encodes to."""
    token_id = tokenizer.get_vocab().get(word)
    if token_id is not None:
        return token_id
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return ids[0]
    raise ValueError(
        f"the reranker's {role!r} answer {word!r} is not a single token of this tokenizer (it "
        f"encodes to {tokenizer.convert_ids_to_tokens(ids)}). Pass a template whose answers are "
        f"single tokens, e.g. template=dataclasses.replace(QWEN3_RERANKER_TEMPLATE, {role}=...), "
        "or add the word with tokenizer.add_tokens([...]) and model.resize_token_embeddings(...)."
    )


def _leading_special_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer starts every text with it (Llama, Gemma), else [] (Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] else []
