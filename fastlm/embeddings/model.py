"""``FastSentenceTransformer``: a Hugging Face encoder/decoder body + pooling + dense + L2 norm.

model, tokenizer = load_embedding_model("Qwen/Qwen3-Embedding-0.6B", max_seq_length=512)
model.get_peft_model(r=16)                      # LoRA (fused kernels on decoder families)
vectors = model.encode_queries(["how do I ...?"])   # (N, D) fp32, unit length

The body is loaded with ``AutoModel`` (Qwen3Model, Gemma3TextModel, EmbeddingGemma2TextModel,
BertModel, XLMRobertaModel…). Qwen3, Gemma 3 and EmbeddingGemma 2 bodies get fastlm's kernels
(``fastlm.models.patch_model``); other architectures run their transformers code, with LoRA
through plain PEFT.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlm import model_folder, models
from fastlm.embeddings import st_format
from fastlm.embeddings.padding_free import (
    PADDED,
    PADDING_FREE,
    BatchPath,
    PackedTexts,
    body_problem,
    bucketed,
    join_packed,
    pack_texts,
)
from fastlm.embeddings.pooling import POOLING_MODES, Dense, l2_normalize, pool, pool_packed
from fastlm.export import save_pretrained_merged
from fastlm.export._atomic import atomic_directory
from fastlm.export.merged import input_folders
from fastlm.loading.checkpointing import TrainerCheckpointing, enable_checkpointing
from fastlm.loading.device import placement
from fastlm.loading.pipeline import add_lora, add_quantization_config
from fastlm.models import PROJECTIONS, SPECS, PromptStyle, embedding_pooling, encoder_spec
from fastlm.offload import checkpoint
from fastlm.versions import check_versions

logger = logging.getLogger("fastlm")

# The query/document prefixes of the decoder families' embedding models (from their specs).
PROMPT_STYLES = {t: spec.prompt_style for t, spec in SPECS.items() if spec.prompt_style}


class FastSentenceTransformer(TrainerCheckpointing, nn.Module):
    """Texts → one L2-normalised vector each. ``forward`` takes token ids, ``encode`` texts.

    Usage: ``model = FastSentenceTransformer.from_pretrained("./minilm"); model.encode(["hi"])``.
    ``padding_free`` (default True): a forward lays its texts end to end in one row where the
    body runs that exactly (``fastlm.embeddings.padding_free``); ``batch_path()`` says whether
    it will, ``latest_batch_path`` what the latest forward ran, each with the reason if padded.
    """

    CHECKPOINTED_BODY = "backbone"  # TrainerCheckpointing: the Trainer's enable calls

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        dense: list[Dense] | None = None,
        normalize: bool = True,
        max_seq_length: int = 512,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        prompt_style: PromptStyle | None = None,
        do_lower_case: bool = False,
        padding_free: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling={pooling!r}: choose one of {POOLING_MODES}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.dense = nn.ModuleList(dense or [])
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.prompt_style = prompt_style
        self.do_lower_case = do_lower_case
        self.padding_free = padding_free
        self.latest_batch_path: BatchPath | None = None  # set by each forward
        self._body_verdict: tuple = (None, None, "")  # (backbone, attn_implementation, reason)
        self._reported: set[str] = set()  # fallback reasons already logged

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, model_name: str, **kwargs: Any) -> FastSentenceTransformer:
        """Load a Sentence-Transformers or plain Hugging Face directory (or Hub name).

        Usage: ``FastSentenceTransformer.from_pretrained("./st_dir", max_seq_length=256)``;
        keyword arguments as in ``load_embedding_model``.
        """
        model, _ = load_embedding_model(model_name, **kwargs)
        return model

    # ------------------------------------------------------------------ properties

    @property
    def config(self):
        """The transformers config of the body."""
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        """The transformers model (under PEFT's wrapper when LoRA is attached)."""
        body = self.backbone
        return body.get_base_model() if hasattr(body, "get_base_model") else body

    @property
    def hidden_size(self) -> int:
        """Width of the body's token states, what pooling sees (EmbeddingGemma 2: embedding_dim,
        its forward projects them)."""
        return models.output_width(self.config)

    @property
    def embedding_dim(self) -> int:
        """Length of the output vectors (after the dense layers)."""
        return self.dense[-1].out_features if len(self.dense) else self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def query_prompt(self, task: str | None = None) -> str:
        """The prefix for queries: the card's instruction for ``task`` or the saved default."""
        if task is not None:
            if self.prompt_style is None:
                raise ValueError("this model family has no task-instruction template")
            return self.prompt_style.query_prompt(task)
        if "query" in self.prompts:
            return self.prompts["query"]
        return self.prompt_style.query_prompt() if self.prompt_style else ""

    def document_prompt(self) -> str:
        """The prefix for documents ("" for Qwen3-Embedding and BGE-M3)."""
        for name in ("document", "passage", "corpus"):
            if name in self.prompts:
                return self.prompts[name]
        return self.prompt_style.document_prompt if self.prompt_style else ""

    # ------------------------------------------------------------------ forward / encode

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, S) token ids and mask → (B, D) fp32 embeddings (unit length when normalising);
        padding-free where ``batch_path()`` allows it and the batch packs."""
        path = self.batch_path()
        if path.layout == PADDING_FREE:
            packed = pack_texts(input_ids, attention_mask, token_type_ids)
            if isinstance(packed, PackedTexts):
                self.latest_batch_path = path
                return self._head(self._pool_packed(packed))
            path = BatchPath(PADDED, packed)  # this batch only (e.g. an empty text)
        self._record(path)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state  # (B, S, H)
        return self._head(pool(hidden, attention_mask, self.pooling))

    def embed_sides(self, *sides: dict) -> list[torch.Tensor]:
        """The vectors of several collated sides (each ``input_ids``, ``attention_mask`` [,
        ``token_type_ids``]), as ``[self(**side) for side in sides]`` gives them.

        Padding-free, all their texts go through the body in one packed row (``join_packed``):
        one call instead of one per side. Where any side does not pack, each side runs as
        ``forward`` runs it. Usage: ``q, d = model.embed_sides(batch["query"], batch["response"])``.
        """
        if len(sides) > 1 and self.batch_path().layout == PADDING_FREE:
            # Each side packed once, with padding or not (one host read each); a side without
            # padding joins the padded ones, and when no side has any each runs as it is.
            packs = [_pack_side(side) for side in sides]
            packed_all = all(isinstance(packed, PackedTexts) for packed in packs)
            if packed_all and any(_stripped(p, s) for p, s in zip(packs, sides, strict=True)):
                self.latest_batch_path = BatchPath(PADDING_FREE)
                vectors = self._head(self._pool_packed(join_packed(packs)))
                return list(vectors.split([len(side["input_ids"]) for side in sides]))
        return [self(**side) for side in sides]

    def batch_path(self) -> BatchPath:
        """How the next forward will lay out its texts, as far as is known before a call (a
        batch that does not pack, e.g. with an empty text, runs padded).

        Usage: ``model.batch_path()`` → ``BatchPath("padding-free", "")``.
        """
        if not self.padding_free:
            return BatchPath(PADDED, "padding_free=False")
        backbone = self.backbone
        implementation = getattr(backbone.config, "_attn_implementation", None)
        seen, seen_implementation, reason = self._body_verdict
        if seen is not backbone or seen_implementation != implementation:
            reason = body_problem(backbone)  # a walk over the modules: once per body
            self._body_verdict = (backbone, implementation, reason)
        return BatchPath(PADDED, reason) if reason else BatchPath(PADDING_FREE)

    def _pool_packed(self, packed: PackedTexts) -> torch.Tensor:
        total = packed.inputs["input_ids"].shape[1]  # the texts' tokens
        if checkpoint.layers_will_replay(self.backbone, packed.inputs["input_ids"]):
            packed = bucketed(packed, self.max_seq_length)  # steady shapes: layers replay
        inputs = packed.inputs
        if getattr(self.backbone.config, "_attn_implementation", None) == "sdpa":
            # A (1, T) mask of ones: transformers then reads no packing from the restarting
            # position_ids and builds no (T, T) block mask (117 MB at T = 10,800, a host read
            # each forward); fastlm's SDPA attention keeps the texts apart from cu_seq_lens.
            ones = torch.ones_like(inputs["input_ids"])
            inputs = {**inputs, "attention_mask": ones}
        hidden = self.backbone(**inputs).last_hidden_state  # (1, T, H)
        return pool_packed(hidden[0, :total], packed.cu_seqlens, packed.max_length, self.pooling)

    def _head(self, vectors: torch.Tensor) -> torch.Tensor:
        for layer in self.dense:
            vectors = layer(vectors)
        return l2_normalize(vectors) if self.normalize else vectors.float()

    def _record(self, path: BatchPath) -> None:
        """Keep the latest path; log each reason for running padded once per model."""
        self.latest_batch_path = path
        if path.reason not in self._reported:
            self._reported.add(path.reason)
            logger.info("embedding batches run padded: %s", path.reason)

    def tokenize(
        self, texts: list[str], prompt: str = "", to_device: bool = True
    ) -> dict[str, torch.Tensor]:
        """Padded, truncated token tensors for ``prompt + text`` (on the model's device)."""
        texts = [prompt + text for text in texts]
        if self.do_lower_case:
            texts = [text.lower() for text in texts]
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        )
        keep = ("input_ids", "attention_mask", "token_type_ids")
        device = self.device if to_device else "cpu"
        return {k: v.to(device) for k, v in batch.items() if k in keep}

    def embed(self, texts: list[str], prompt: str = "") -> torch.Tensor:
        """Embed with gradients (training). Usage: ``q = model.embed(queries, prompt)``."""
        return self(**self.tokenize(list(texts), prompt))

    @torch.no_grad()
    def encode(
        self,
        sentences: str | list[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        convert_to_numpy: bool = False,
        show_progress_bar: bool = False,
    ):
        """Embed texts in eval mode without gradients → (N, D) fp32 tensor (or numpy).

        Usage: ``model.encode(["a", "b"], prompt_name="query")``; a single string gives (D,).
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if prompt is None:
            name = prompt_name if prompt_name is not None else self.default_prompt_name
            if name is not None and name not in self.prompts:
                raise KeyError(f"prompt_name={name!r}: known prompts are {sorted(self.prompts)}")
            prompt = self.prompts[name] if name is not None else ""
        # Sort by length so each batch pads little; the result is put back in input order.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        chunks = []
        try:
            starts = range(0, len(texts), batch_size)
            if show_progress_bar:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="Encoding")
            for start in starts:
                batch = [texts[i] for i in order[start : start + batch_size]]
                chunks.append(self.embed(batch, prompt))
        finally:
            self.train(was_training)
        if chunks:
            vectors = torch.cat(chunks)
        else:
            vectors = torch.empty(0, self.embedding_dim, device=self.device)
        result = torch.empty_like(vectors)
        result[torch.tensor(order, device=vectors.device)] = vectors
        result = result[0] if single else result
        return result.cpu().numpy() if convert_to_numpy else result

    def encode_queries(self, queries: list[str], task: str | None = None, **kwargs) -> Any:
        """Embed queries with the family's instruction prefix (``task`` overrides the default)."""
        return self.encode(queries, prompt=self.query_prompt(task), **kwargs)

    def encode_documents(self, documents: list[str], **kwargs) -> Any:
        """Embed documents with the family's document prefix (none for Qwen3 / BGE-M3)."""
        return self.encode(documents, prompt=self.document_prompt(), **kwargs)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix (N, M) of two sets of embeddings."""
        a = torch.nn.functional.normalize(torch.as_tensor(a).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(b).float(), dim=-1)
        return a @ b.T

    # ------------------------------------------------------------------ training set-up

    def get_peft_model(
        self,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        use_gradient_checkpointing: bool | str = True,
        random_state: int = 3407,
        **lora_kwargs: Any,
    ) -> FastSentenceTransformer:
        """Attach LoRA adapters to the body (in place; dense layers stay frozen); returns self.

        Usage: ``model.get_peft_model(r=16, lora_alpha=32)``.
        """
        if hasattr(self.backbone, "peft_config"):
            raise ValueError("this model already has LoRA adapters")
        model_type = self.config.model_type
        default_targets = None  # another family: PEFT's own table of model types
        if model_type in SPECS:  # a decoder family fastlm patches
            default_targets = list(PROJECTIONS)
        elif encoder_spec(model_type) is not None:
            default_targets = list(encoder_spec(model_type).lora_targets)
            if target_modules is None:
                lora_kwargs.setdefault("exclude_modules", ["pooler.dense"])
        self.backbone = add_lora(
            self.backbone,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            default_targets=default_targets,
            task_type=None,  # a body without a head: PEFT's plain LoRA model
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
            **lora_kwargs,
        )
        self.dense.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        merge_lora: bool = True,
        dtype: torch.dtype | None = None,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write a Sentence-Transformers directory (LoRA merged in; the model is unchanged).

        Usage: ``model.save_pretrained("out/st")``, then
        ``sentence_transformers.SentenceTransformer("out/st")`` gives the same embeddings.
        ``merge_lora=False`` saves only the PEFT adapter (``save_adapter``).
        """
        if not merge_lora:
            return self.save_adapter(save_directory)
        with atomic_directory(save_directory, inputs=self._input_folders()) as tmp:
            self._write_sentence_transformer(tmp, dtype, max_shard_size)
        return Path(save_directory).absolute()

    def _input_folders(self) -> list[str]:
        """The folders this model was loaded from: a save must not write there."""
        return input_folders(self.backbone, self.tokenizer)

    def _write_sentence_transformer(self, folder: Path, dtype, max_shard_size) -> None:
        save_pretrained_merged(
            self.backbone,
            folder,
            self.tokenizer,
            save_method="merged_16bit",
            max_shard_size=max_shard_size,
            dtype=dtype,
        )
        st_format.write_layout(
            str(folder),
            pooling=self.pooling,
            hidden_size=self.hidden_size,
            dense=list(self.dense),
            normalize=self.normalize,
            max_seq_length=self.max_seq_length,
            do_lower_case=self.do_lower_case,
            prompts=self._prompts_to_save(),
            default_prompt_name=self.default_prompt_name,
        )

    def save_adapter(self, save_directory: str | os.PathLike) -> Path:
        """Save the PEFT LoRA adapter alone (loads with ``peft.PeftModel.from_pretrained``)."""
        if not hasattr(self.backbone, "peft_config"):
            raise ValueError("no LoRA adapter to save: use save_pretrained for a full model")
        with atomic_directory(save_directory, inputs=self._input_folders()) as tmp:
            self.backbone.save_pretrained(tmp)
        return Path(save_directory).absolute()

    def _prompts_to_save(self) -> dict[str, str]:
        prompts = dict(self.prompts)
        if self.prompt_style is not None:
            prompts.setdefault("query", self.prompt_style.query_prompt())
            prompts.setdefault("document", self.prompt_style.document_prompt)
        return prompts

    # ------------------------------------------------------------------ interop

    def to_sentence_transformer(self):
        """A ``sentence_transformers.SentenceTransformer`` sharing this model's parameters.

        Usage: ``st = model.to_sentence_transformer()`` then train it with
        ``SentenceTransformerTrainer`` (fastlm kernels and LoRA stay in use; updates land here).
        """
        from fastlm.embeddings.st_bridge import (  # lazy: sentence-transformers is optional
            build_sentence_transformer,
        )

        return build_sentence_transformer(self)


# ---------------------------------------------------------------------------------------------


def load_embedding_model(
    model_name: str,
    max_seq_length: int | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = "auto",
    pooling: str | None = None,
    normalize: bool = True,
    full_finetuning: bool = False,
    lora_r: int | None = None,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    use_gradient_checkpointing: bool | str = True,
    load_in_4bit: bool = False,
    load_in_16bit: bool = True,
    token: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    random_state: int = 3407,
    use_fastlm_kernels: bool = True,
    allow_untested_versions: bool = False,
    check_finite_loss: bool = True,
    check_finite_weights: bool = True,
    padding_free: bool = True,
    **kwargs: Any,
) -> tuple[FastSentenceTransformer, Any]:
    """Load an embedding model → ``(model, tokenizer)``; fastlm kernels on decoder bodies.

    Usage: ``model, tok = load_embedding_model("./bge-m3", max_seq_length=512, lora_r=16)``.
    ``model_name``: a Sentence-Transformers directory (modules.json: pooling, dense layers,
    normalisation and prompts are read from it), a plain transformers directory or a Hub name.
    ``pooling`` overrides the saved/default pooling ("lasttoken" Qwen3, "mean" Gemma 3 and
    others, "cls" XLM-RoBERTa). ``lora_r`` attaches LoRA at once (else call ``get_peft_model``).
    Extra keyword arguments go to ``AutoModel.from_pretrained`` (e.g. ``attn_implementation``,
    or config overrides such as ``use_bidirectional_attention=True`` for a Gemma 3 LM).
    ``load_in_16bit`` is accepted for ``FastModel.from_pretrained`` parity (``dtype`` decides).
    ``check_finite_loss`` / ``check_finite_weights``: as ``FastModel.from_pretrained`` (the
    finite-training guard; NaN/inf weights refused at load).
    ``padding_free``: lay each batch's texts end to end in one row where the body runs that
    exactly (``FastSentenceTransformer.batch_path()`` says which layout runs, and why padded).
    """
    from transformers import AutoModel, AutoTokenizer  # lazy: seconds to import

    if full_finetuning and lora_r is not None:
        raise ValueError("choose full_finetuning=True or lora_r=..., not both")
    if not allow_untested_versions:
        check_versions(("torch", "transformers", "peft"))
    path = _local_path(model_name, token, revision, local_files_only)
    layout = st_format.read_layout(path) if st_format.is_sentence_transformer_dir(path) else None
    body_path = layout.transformer_path if layout else path
    if layout is not None and not layout.include_prompt:
        raise ValueError(f"{model_name}: pooling with include_prompt=False is not supported")

    device, dtype, device_map = placement(device_map, dtype)
    add_quantization_config(kwargs, load_in_4bit, full_finetuning, dtype)  # NF4, as FastModel
    torch.manual_seed(random_state)
    backbone = AutoModel.from_pretrained(
        body_path,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        local_files_only=local_files_only or os.path.isdir(model_name),
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(body_path, trust_remote_code=trust_remote_code)
    model_type = backbone.config.model_type
    _warn_if_causal(backbone.config, model_name)
    if pooling is None:
        pooling = (layout.pooling if layout else None) or embedding_pooling(model_type)
        if layout is None or layout.pooling is None:
            logger.info("%s: no pooling configured; using %r", model_name, pooling)
    max_seq_length = _max_seq_length(backbone.config, layout, max_seq_length, model_name)
    if use_fastlm_kernels and model_type in models.SPECS:
        spec = models.spec_for(backbone.config)
        models.patch_model(backbone, spec, max_seq_length, check_finite_loss=check_finite_loss)
    else:
        _report_unpatched(model_name, model_type, use_fastlm_kernels)
        if check_finite_loss:  # an unpatched body (BERT...) gets the NaN/inf gradient guard alone
            models.install_finite_guard(backbone)
    dense = [
        layer.to(device=_device_of(backbone), dtype=dtype)
        for layer in (layout.dense if layout else [])
    ]
    model = FastSentenceTransformer(
        backbone,
        tokenizer,
        pooling=pooling,
        dense=dense,
        normalize=normalize,
        max_seq_length=max_seq_length,
        prompts=layout.prompts if layout else None,
        default_prompt_name=layout.default_prompt_name if layout else None,
        prompt_style=PROMPT_STYLES.get(model_type),
        do_lower_case=layout.do_lower_case if layout else False,
        padding_free=padding_free,
    )
    path = model.batch_path()  # reported as fused paths are: what runs, and why not the fast one
    reason = f" ({path.reason})" if path.reason else ""
    logger.info("%s: %s batches%s", model_name, path.layout, reason)
    if check_finite_weights:  # the body and the dense layers: one pass (fastlm.models.finite)
        models.check_finite_weights(model, model_name)
    if full_finetuning:
        model.requires_grad_(True)
        enable_checkpointing(model.backbone, use_gradient_checkpointing)
    elif lora_r is not None:
        model.get_peft_model(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=target_modules,
            use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state,
        )
    else:
        model.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------- helpers


def _pack_side(side: dict) -> PackedTexts | str:
    """``pack_texts`` over one collated side (its ids, mask and token types if any), packed
    whether it has padding or not."""
    ids, mask = side["input_ids"], side["attention_mask"]
    return pack_texts(ids, mask, side.get("token_type_ids"), unpadded=True)


def _stripped(packed: PackedTexts, side: dict) -> bool:
    """Whether packing ``side`` left padding out (its row is shorter than the padded batch)."""
    return packed.inputs["input_ids"].shape[1] < side["input_ids"].numel()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _report_unpatched(model_name: str, model_type: str, asked: bool) -> None:
    """One line when a body runs transformers' code alone: a known encoder family is meant to
    (info); anything else (e.g. the multimodal EmbeddingGemma 2) is a family fastlm has no
    patches for (warning), so nobody takes its speed for fastlm's."""
    if not asked:
        logger.info("%s: use_fastlm_kernels=False: transformers' code runs", model_name)
    elif encoder_spec(model_type) is not None:
        logger.info("%s: %s body: transformers' code, LoRA through PEFT", model_name, model_type)
    else:
        logger.warning(
            "%s: fastlm has no patches for model_type %r: transformers' code runs, LoRA "
            "through PEFT (docs/supported.md lists the patched families)",
            model_name, model_type,
        )  # fmt: skip


def _warn_if_causal(config, model_name: str) -> None:
    """A decoder family whose embedding models attend both ways, loaded with causal attention."""
    decoder = SPECS.get(config.model_type)
    bidirectional = decoder.bidirectional_attention_attr if decoder else None
    if bidirectional and not getattr(config, bidirectional, False):
        logger.warning(
            "%s: %s with causal attention; its embedding models use bidirectional attention "
            "(pass %s=True to turn the LM into an encoder)",
            model_name, decoder.family, bidirectional,
        )  # fmt: skip


def _max_seq_length(config, layout, asked: int | None, model_name: str) -> int:
    """The longest input: as asked, else the Sentence-Transformers folder's, else 2048; never
    past an encoder's learned position table (longer inputs would index past it)."""
    encoder = encoder_spec(config.model_type)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and encoder is not None:
        limit -= encoder.reserved_positions  # RoBERTa's learned positions start after padding_idx
    if asked is None:
        asked = layout.max_seq_length if layout and layout.max_seq_length else 2048
        return min(asked, limit) if limit else asked
    if limit and asked > limit and encoder is not None:
        logger.warning(
            "%s: max_seq_length=%d exceeds the model's %d positions; using %d",
            model_name, asked, limit, limit,
        )  # fmt: skip
        return limit
    return asked


# Other frameworks' exports, left out of a Hub download.
_NOT_DOWNLOADED = [
    "onnx/*",
    "openvino/*",
    "*.onnx",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "coreml/*",
    "*.gguf",
]


def _local_path(model_name: str, token, revision, local_files_only: bool) -> str:
    # a missing folder, a file or an uncached name while offline: one clear error, not the Hub's
    path = model_folder.resolve(model_name, ("config.json", "modules.json"), revision)
    if os.path.isdir(path):
        model_folder.check_model_folder(path, ("config.json", "modules.json"))
        return path
    from huggingface_hub import snapshot_download

    try:  # the whole repository: the Sentence-Transformers module folders live beside the weights
        return snapshot_download(
            model_name,
            revision=revision,
            token=token,
            local_files_only=local_files_only,
            ignore_patterns=_NOT_DOWNLOADED,
        )
    except OSError as error:
        raise model_folder.not_found(model_name, error) from error
