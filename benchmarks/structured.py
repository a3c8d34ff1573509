"""Constrained decoding's cost: decode tok/s with a json_schema reply against free text,
at batch 1 and 8, and time to first token with a schema never seen before (grammar
compile and first mask) against free text; in one process on the 270M-shaped fixture.

The schema asks for a list of at least 64 records (forced keys, bounded strings,
integers, booleans), so every constrained sequence runs its full `--tokens` through
varied grammar states; free sequences run as long with `ignore_eos`. Runs alternate
free / constrained, and the ratios compare medians from the same run.

    python benchmarks/structured.py                     # 270M, fp32, 64 new tokens, 3 rounds
    python benchmarks/structured.py --quant int8 --tokens 128 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from elmd.engine.load import load_engine  # noqa: E402
from elmd.engine.protocol import Constraint  # noqa: E402
from elmd.fixtures import write_checkpoint  # noqa: E402

RECORD = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}


def records_schema(tag: str = "") -> Constraint:
    """The benchmark's schema; a different `tag` makes it new to every cache."""
    record = {**RECORD, "properties": {**RECORD["properties"], f"id{tag}": {"type": "integer"}}} if tag else RECORD
    return Constraint.json_schema({"type": "array", "items": record, "minItems": 64})


def decode_rate(engine, prompt: list[int], batch: int, tokens: int, constraint: Constraint | None) -> float:
    """Generated tokens per second over `batch` sequences running together."""
    counts = [0] * batch

    def run(i: int) -> None:
        params = engine.params(max_tokens=tokens, temperature=1.0, seed=i, constraint=constraint,
                               ignore_eos=constraint is None)
        counts[i] = len(engine.generate(prompt, params).token_ids)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(batch)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def first_token_seconds(engine, prompt: list[int], constraint: Constraint | None) -> float:
    params = engine.params(max_tokens=1, temperature=0, constraint=constraint, ignore_eos=True)
    start = time.perf_counter()
    next(iter(engine.stream(prompt, params)))
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="270M")
    p.add_argument("--quant", default="none")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        model_dir = write_checkpoint(Path(work) / args.shape, shape=args.shape, seed=0)
        engine = load_engine(model_dir, backend="torch", quant=args.quant)
        prompt = engine.tokenizer.encode("List the records as JSON.")
        engine.generate(prompt, engine.params(max_tokens=4, constraint=records_schema()))  # warm up (loads the grammar tokenizer)
        print(f"{args.shape} {args.quant}, {args.tokens} new tokens, median of {args.rounds} rounds")
        for batch in args.batches:
            free, constrained = [], []
            for _ in range(args.rounds):
                free.append(decode_rate(engine, prompt, batch, args.tokens, None))
                constrained.append(decode_rate(engine, prompt, batch, args.tokens, records_schema()))
            f, c = statistics.median(free), statistics.median(constrained)
            print(f"batch {batch}: free {f:7.1f} tok/s   json_schema {c:7.1f} tok/s   ratio {c / f:.3f}")
        free_ttft, new_ttft = [], []
        for i in range(args.rounds):
            free_ttft.append(first_token_seconds(engine, prompt, None))
            new_ttft.append(first_token_seconds(engine, prompt, records_schema(tag=f"{time.time_ns()}_{i}")))
        f, c = statistics.median(free_ttft), statistics.median(new_ttft)
        print(f"time to first token: free {f * 1e3:.1f} ms   new schema {c * 1e3:.1f} ms   (+{(c - f) * 1e3:.1f} ms)")
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
