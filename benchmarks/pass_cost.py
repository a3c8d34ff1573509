"""What a verifying pass costs (issue #36): the model's pass over k rows per sequence (the
next token and k - 1 guessed ones) against a plain step of one row per sequence, for 1, 4
and 8 sequences, on the path the daemon runs (the native plan where the kernels build).
Best of --repeats, in-process, the offline model (SmolLM2-135M-Instruct) at each --quants.

    python benchmarks/pass_cost.py [--quants int4 int8 none] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from speculation import offline_checkpoint

ROWS_PER_SEQUENCE = (1, 2, 3, 5, 9)
SEQUENCES = (1, 4, 8)
START = 300  # the position the passes start at: a reply under way


def pass_seconds(runner, sequences: int, rows: int, repeats: int) -> float:
    tokens = torch.randint(0, 1000, (sequences * rows, 1))
    positions = torch.tensor([[START + j] for _ in range(sequences) for j in range(rows)])
    slots = torch.tensor([s for s in range(sequences) for _ in range(rows)])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            runner(tokens, positions, slots, span=START + rows)
            best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    from elmd.engine.load import load_engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quants", nargs="+", default=["int4", "int8"])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "elmd-bench-speculation")
    args = p.parse_args(argv)
    model = offline_checkpoint(args.work)
    for quant in args.quants:
        engine = load_engine(model, backend="torch", quant=quant, speculation=False)
        scheduler = engine.backend.scheduler
        info = engine.backend.info

        def measure():
            scheduler.runner.model.setup_caches(max(SEQUENCES), 1024)
            return {(n, k): pass_seconds(scheduler.runner, n, k, args.repeats) for n in SEQUENCES for k in ROWS_PER_SEQUENCE}

        try:
            seconds = scheduler.call(measure)  # on the scheduler's thread, as the daemon runs passes
        finally:
            engine.close()
        print(f"{quant} ({info.extra.get('cpu_kernels')} kernels): pass of k rows per sequence / one-row step")
        for n in SEQUENCES:
            print(f"  {n} sequence(s), step {seconds[n, 1] * 1000:6.2f} ms: " +
                  "  ".join(f"k={k} {seconds[n, k] / seconds[n, 1]:.2f}x" for k in ROWS_PER_SEQUENCE[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
