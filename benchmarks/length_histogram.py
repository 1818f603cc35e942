#!/usr/bin/env python
"""Rebuild fastlm/benchmarking/lengths_alpaca_en_demo.json: the token-length histogram that the
packing benchmark samples its example lengths from.

What is measured: every record of ``data/alpaca_en_demo.json`` in the llamafactory 0.9.5 source
distribution on PyPI (999 English instruction / input / output records in the Alpaca format,
LLaMA-Factory's bundled Alpaca example set), laid out as Stanford Alpaca's train.py lays out a
training example (its prompt template, the output, end-of-sequence) and counted with the 131,072-
token Tekken tokenizer that mistral-common 1.13.1 ships (``mistral_common/data/
tekken_240911.json``, a tiktoken byte-level BPE of the kind Llama 3's and Qwen's tokenizers are;
those two are not installable offline). Lengths are binned in bins of ``--bin`` tokens.

Both packages come from PyPI, nothing from a hub (the command needs PyPI once, not at bench time):

    pip download --no-deps --no-binary :all: -d /tmp/lf llamafactory==0.9.5
    pip install --target /tmp/toktools mistral-common==1.13.1
    PYTHONPATH=/tmp/toktools python benchmarks/length_histogram.py \
        --sdist /tmp/lf/llamafactory-0.9.5.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "fastlm" / "benchmarking" / "lengths_alpaca_en_demo.json"
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


def alpaca_text(record: dict) -> str:
    """One training example's text (the tokenizer adds BOS and EOS)."""
    prompt = PROMPT_INPUT if record.get("input") else PROMPT_NO_INPUT
    return prompt.format_map(record) + record["output"]


def histogram(lengths: list[int], width: int) -> list[list[int]]:
    """[[lo, hi, count], ...]: bins [lo, hi) of `width` tokens, empty ones left out."""
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n // width] = counts.get(n // width, 0) + 1
    return [[b * width, (b + 1) * width, c] for b, c in sorted(counts.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sdist", required=True, help="llamafactory-0.9.5.tar.gz from PyPI")
    p.add_argument("--bin", type=int, default=16, help="bin width in tokens")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    with tarfile.open(args.sdist) as tar:
        raw = tar.extractfile(MEMBER).read()
    records = json.loads(raw)
    tekken = Path(mistral_common.__file__).parent / "data" / TEKKEN
    tok = Tekkenizer.from_file(str(tekken))
    lengths = [len(tok.encode(alpaca_text(r), bos=True, eos=True)) for r in records]
    ordered = sorted(lengths)
    payload = {
        "name": "alpaca_en_demo",
        "what": "tokens per training example (BOS + Alpaca prompt template + instruction "
        "[+ input] + output + EOS) of the 999 records of LLaMA-Factory's bundled English "
        "Alpaca-format example set",
        "source": {
            "data": f"{MEMBER} in the llamafactory 0.9.5 sdist on PyPI (sha256 of the file "
            f"{hashlib.sha256(raw).hexdigest()})",
            "data_note": "LLaMA-Factory's data README presents it as its Alpaca-format example; "
            "the instructions are Stanford Alpaca's (Taori et al. 2023, "
            "https://github.com/tatsu-lab/stanford_alpaca) and the outputs read like the GPT-4 "
            "answers of Alpaca-GPT4 (Peng et al. 2023, 'Instruction Tuning with GPT-4'); the "
            "file itself does not say which set it was sampled from",
            "template": "Stanford Alpaca train.py PROMPT_DICT, output appended after "
            "'### Response:', then EOS",
            "tokenizer": f"Tekken (mistral-common {mistral_common.__version__}, "
            f"mistral_common/data/{TEKKEN}, vocab {tok.n_words}), encode(bos=True, eos=True)",
            "script": "benchmarks/length_histogram.py",
        },
        "n": len(lengths),
        "bin_width": args.bin,
        "stats": {
            "min": ordered[0],
            "mean": round(statistics.fmean(lengths), 2),
            "median": statistics.median(lengths),
            "p90": ordered[int(0.9 * (len(ordered) - 1))],
            "max": ordered[-1],
        },
        "bins": histogram(lengths, args.bin),
    }
    text = json.dumps(payload, indent=1)
    # One bin per line: [lo, hi, count].
    text = text.replace("[\n   ", "[").replace(",\n   ", ", ").replace("\n  ]", "]")
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}: {payload['n']} examples, {payload['stats']}")


if __name__ == "__main__":
    main()
