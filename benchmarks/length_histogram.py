#!/usr/bin/env python
"""Rebuild the token-length histograms beside fastlm/benchmarking/lengths.py, counted on one real
instruction set:

    alpaca_en_demo           a causal-LM training example (packing_bench's example lengths)
    alpaca_en_demo_query     the instruction (+ input): an embedding pair's query
    alpaca_en_demo_positive  the output: the pair's positive document (embedding_bench --lengths)

What is measured: every record of ``data/alpaca_en_demo.json`` in the llamafactory 0.9.5 source
distribution on PyPI (999 English instruction / input / output records in the Alpaca format,
LLaMA-Factory's bundled Alpaca example set), counted with the 131,072-token Tekken tokenizer that
mistral-common 1.13.1 ships (``mistral_common/data/tekken_240911.json``, a tiktoken byte-level
BPE of the kind Llama 3's and Qwen's tokenizers are; those two are not installable offline).
``alpaca_en_demo`` lays a record out as Stanford Alpaca's train.py lays out a training example
(its prompt template, the output, end-of-sequence; BOS and EOS). The pair histograms count the
bare fields, no template: the query is the instruction, with the input after a newline when there
is one (LLaMA-Factory's AlpacaDatasetConverter joins them so), the positive is the output; each
with EOS and no BOS (an embedding model's tokenizer, Qwen3-Embedding's, appends its end token for
last-token pooling; a model's query instruction prefix would add its own tokens). Lengths are
binned in bins of ``--bin`` tokens (16; the queries, median 16 tokens, 2).

Both packages come from PyPI, nothing from a hub (the command needs PyPI once, not at bench time):

    pip download --no-deps --no-binary :all: -d /tmp/lf llamafactory==0.9.5
    pip install --target /tmp/toktools mistral-common==1.13.1
    PYTHONPATH=/tmp/toktools python benchmarks/length_histogram.py \
        --sdist /tmp/lf/llamafactory-0.9.5.tar.gz                       # alpaca_en_demo
    PYTHONPATH=/tmp/toktools python benchmarks/length_histogram.py \
        --sdist /tmp/lf/llamafactory-0.9.5.tar.gz \
        --histograms alpaca_en_demo_query,alpaca_en_demo_positive      # the embedding pairs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
DIR = REPO / "fastlm" / "benchmarking"  # lengths_<name>.json
MEMBER = "llamafactory-0.9.5/data/alpaca_en_demo.json"
TEKKEN = "tekken_240911.json"
# Stanford Alpaca's train.py (PROMPT_DICT): the prompt, then the output and EOS right after it.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
DATA_NOTE = (
    "LLaMA-Factory's data README presents it as its Alpaca-format example; the instructions are "
    "Stanford Alpaca's (Taori et al. 2023, https://github.com/tatsu-lab/stanford_alpaca) and the "
    "outputs read like the GPT-4 answers of Alpaca-GPT4 (Peng et al. 2023, 'Instruction Tuning "
    "with GPT-4'); the file itself does not say which set it was sampled from"
)


def alpaca_text(record: dict) -> str:
    """One training example's text (the tokenizer adds BOS and EOS)."""
    prompt = PROMPT_INPUT if record.get("input") else PROMPT_NO_INPUT
    return prompt.format_map(record) + record["output"]


def query_text(record: dict) -> str:
    """An embedding pair's query: the instruction, then "\\n" and the input when there is one
    (LLaMA-Factory's AlpacaDatasetConverter: ``"\\n".join([instruction, input])``)."""
    return "\n".join(t for t in (record["instruction"], record.get("input")) if t)


def positive_text(record: dict) -> str:
    """An embedding pair's positive document: the output."""
    return record["output"]


class Counted(NamedTuple):
    """What one histogram counts: a record's `text`, encoded with or without BOS (EOS always),
    binned `width` tokens a bin unless --bin says otherwise, and how its JSON describes that
    (`what`; `source` entries beside data and tokenizer)."""

    text: Callable[[dict], str]
    bos: bool
    width: int
    what: str
    source: dict


HISTOGRAMS = {
    "alpaca_en_demo": Counted(
        alpaca_text, True, 16,
        "tokens per training example (BOS + Alpaca prompt template + instruction [+ input] + "
        "output + EOS) of the 999 records of LLaMA-Factory's bundled English Alpaca-format "
        "example set",
        {"template": "Stanford Alpaca train.py PROMPT_DICT, output appended after "
                     "'### Response:', then EOS"},
    ),
    "alpaca_en_demo_query": Counted(
        query_text, False, 2,  # queries are short (median 16 tokens): narrow bins
        "tokens per embedding query (instruction [+ newline + input] + EOS, no template) of the "
        "999 records of LLaMA-Factory's bundled English Alpaca-format example set",
        {"fields": "instruction, then '\\n' + input when input is not empty (LLaMA-Factory's "
                   "AlpacaDatasetConverter join)",
         "template": "none (no query instruction prefix); EOS appended, no BOS"},
    ),
    "alpaca_en_demo_positive": Counted(
        positive_text, False, 16,
        "tokens per embedding positive document (output + EOS, no template) of the 999 records "
        "of LLaMA-Factory's bundled English Alpaca-format example set",
        {"fields": "output", "template": "none; EOS appended, no BOS"},
    ),
}  # fmt: skip


def histogram(lengths: list[int], width: int) -> list[list[int]]:
    """[[lo, hi, count], ...]: bins [lo, hi) of `width` tokens, empty ones left out."""
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n // width] = counts.get(n // width, 0) + 1
    return [[b * width, (b + 1) * width, c] for b, c in sorted(counts.items())]


def payload(name: str, lengths: list[int], raw: bytes, tokenizer: str, width: int) -> dict:
    """The JSON of histogram `name`: what it counts, its source, stats and bins."""
    counted = HISTOGRAMS[name]
    sha256 = hashlib.sha256(raw).hexdigest()
    source = {
        "data": f"{MEMBER} in the llamafactory 0.9.5 sdist on PyPI (sha256 of the file {sha256})",
        "data_note": DATA_NOTE,
    }
    if name != "alpaca_en_demo":  # its JSON predates these two entries: it stays as it was
        source |= {"sha256": sha256, "fields": counted.source["fields"]}
    bos = "True" if counted.bos else "False"
    source |= {
        "template": counted.source["template"],
        "tokenizer": f"{tokenizer}, encode(bos={bos}, eos=True)",
        "script": "benchmarks/length_histogram.py",
    }
    ordered = sorted(lengths)
    return {
        "name": name,
        "what": counted.what,
        "source": source,
        "n": len(lengths),
        "bin_width": width,
        "stats": {
            "min": ordered[0],
            "mean": round(statistics.fmean(lengths), 2),
            "median": statistics.median(lengths),
            "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1],
        },
        "bins": histogram(lengths, width),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sdist", required=True, help="llamafactory-0.9.5.tar.gz from PyPI")
    p.add_argument("--histograms", default="alpaca_en_demo",
                   help=f"comma list of: {', '.join(HISTOGRAMS)}")  # fmt: skip
    p.add_argument("--bin", type=int, help="bin width in tokens (default: alpaca_en_demo and "
                   "the positives 16, the queries 2)")  # fmt: skip
    p.add_argument("--out", help="output file (one histogram only; default "
                   "fastlm/benchmarking/lengths_<name>.json)")  # fmt: skip
    args = p.parse_args()
    names = args.histograms.split(",")
    unknown = sorted(set(names) - set(HISTOGRAMS))
    if unknown:
        p.error(f"unknown histograms {unknown}; known: {', '.join(HISTOGRAMS)}")
    if args.out and len(names) > 1:
        p.error("--out names one file: give one histogram, or leave --out out")

    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    with tarfile.open(args.sdist) as tar:
        raw = tar.extractfile(MEMBER).read()
    records = json.loads(raw)
    tekken = Path(mistral_common.__file__).parent / "data" / TEKKEN
    tok = Tekkenizer.from_file(str(tekken))
    tokenizer = (f"Tekken (mistral-common {mistral_common.__version__}, "
                 f"mistral_common/data/{TEKKEN}, vocab {tok.n_words})")  # fmt: skip
    for name in names:
        counted = HISTOGRAMS[name]
        lengths = [len(tok.encode(counted.text(r), bos=counted.bos, eos=True)) for r in records]
        data = payload(name, lengths, raw, tokenizer, args.bin or counted.width)
        text = json.dumps(data, indent=1)
        # One bin per line: [lo, hi, count].
        text = text.replace("[\n   ", "[").replace(",\n   ", ", ").replace("\n  ]", "]")
        out = Path(args.out or DIR / f"lengths_{name}.json")
        out.write_text(text + "\n")
        print(f"wrote {out}: {data['n']} examples, {data['stats']}")


if __name__ == "__main__":
    main()
