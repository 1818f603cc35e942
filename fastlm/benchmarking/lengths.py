"""Example lengths with a real instruction set's distribution, for the packing and embedding
benchmarks.

A length histogram is data beside this module, ``lengths_<name>.json``: bins ``[lo, hi, count]``
(``count`` examples have ``lo <= tokens < hi``) and where the numbers come from (``source``:
the data, the prompt template and the tokenizer they were counted with; ``stats``: min, mean,
median, p90, max). All three count the 999 Alpaca-format records that the llamafactory 0.9.5
sdist on PyPI bundles, with mistral-common's Tekken tokenizer; ``benchmarks/length_histogram.py``
rebuilds them:

    alpaca_en_demo           a training example as Stanford Alpaca's script lays it out
                             (mean 197 tokens, median 159, max 706): packing_bench
    alpaca_en_demo_query     instruction [+ input] (mean 19.8, median 16, max 169)  } an embedding
    alpaca_en_demo_positive  output (mean 148, median 109, max 560)                 } pair

Sampling draws a bin with probability count / n, then a length uniformly in [lo, hi): the
sampled lengths have the histogram's bin frequencies (tests/test_packing_bench.py checks it).
A pair's two lengths (``sample_pairs``) are drawn from their own histograms independently.

Stdlib only, like the other modules here: the benchmark's children import it first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT = "alpaca_en_demo"
_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LengthHistogram:
    """Token lengths of a data set's examples: ``bins`` of (lo, hi, count), ``source`` (where
    they come from and how they were counted), ``stats`` (min, mean, median, p90, max)."""

    name: str
    bins: tuple[tuple[int, int, int], ...]
    source: dict
    stats: dict

    @property
    def n(self) -> int:
        return sum(count for _, _, count in self.bins)

    def frequencies(self) -> list[float]:
        """Each bin's share of the examples."""
        return [count / self.n for _, _, count in self.bins]


def load_histogram(name: str = DEFAULT) -> LengthHistogram:
    """The histogram in ``lengths_<name>.json``: ``load_histogram("alpaca_en_demo")``."""
    path = _DIR / f"lengths_{name}.json"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("lengths_") for p in _DIR.glob("lengths_*.json"))
        raise SystemExit(f"no length histogram {name!r}; known: {', '.join(known)}")
    data = json.loads(path.read_text())
    bins = tuple((int(lo), int(hi), int(count)) for lo, hi, count in data["bins"])
    return LengthHistogram(data["name"], bins, data["source"], data["stats"])


def sample_lengths(
    hist: LengthHistogram, count: int, seed: int, *, scale: float = 1.0, max_len: int | None = None
) -> list[int]:
    """`count` lengths drawn from `hist` with ``random.Random(seed)``: a bin by its frequency,
    a length uniform within it; then times `scale` (the CPU dry run shrinks them), at least 2
    (one predicted token) and at most `max_len`.

    Usage: ``sample_lengths(load_histogram(), 16, seed=1234, max_len=2048)``.
    """
    rng = random.Random(seed)
    picks = rng.choices(range(len(hist.bins)), weights=[c for _, _, c in hist.bins], k=count)
    lengths = []
    for b in picks:
        lo, hi, _ = hist.bins[b]
        n = max(2, round(rng.randrange(lo, hi) * scale))
        lengths.append(n if max_len is None else min(n, max_len))
    return lengths


def sample_pairs(
    query: LengthHistogram,
    positive: LengthHistogram,
    count: int,
    seed: int,
    *,
    scale: float = 1.0,
    max_len: int | None = None,
) -> list[tuple[int, int]]:
    """`count` (query, positive) lengths: the queries by ``sample_lengths(query, count, seed)``,
    the positives by ``sample_lengths(positive, count, seed + 1)``. Independent draws: how the
    two lengths go together in the data (alpaca_en_demo: Spearman -0.31) is not kept.

    Usage: ``sample_pairs(load_histogram(f"{name}_query"), load_histogram(f"{name}_positive"),
    64, seed=1234)``.
    """
    queries = sample_lengths(query, count, seed, scale=scale, max_len=max_len)
    positives = sample_lengths(positive, count, seed + 1, scale=scale, max_len=max_len)
    return list(zip(queries, positives))
