"""Draft-model speculation (issue 20) on fixture checkpoints, in this process, batch 1, greedy.

The target is a fixture shape (default 1.1B) and the drafts are (a) the 270M fixture:
random weights of another model, which guesses almost nothing, so this row shows what an
unhelpful draft costs once it rests; (b) a copy of the target: every guess is kept, the
mechanism's ceiling of tokens per verifying pass, though drafting with a model as large as
the target costs as much as it saves. So the run also times the parts: a plain decode step
of the target, a decode step of the 270M, and a verifying pass of the target over 1 + k
tokens; from them (same run) it prints the tok/s a 270M-sized draft would give at each
acceptance rate: (accepted + 1) tokens per (k draft steps + one k-token pass).

    python benchmarks/draft.py [--target 1.1B] [--quant int8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from common import model_dirs, prompt_ids


def decode_rate(engine, ids: list[int], tokens: int) -> float:
    from elmd.engine.protocol import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    stamps = [time.perf_counter() for _ in engine.backend.submit(ids, params, frozenset())]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def pass_seconds(engine, width: int, repeats: int = 20) -> float:
    """Median time of one cached forward of `width` tokens on the scheduler's thread."""
    import torch

    scheduler = engine.backend.scheduler

    def timed() -> float:
        runner = scheduler.runner  # the idle scheduler's cache: one row of 256 tokens
        slot = torch.tensor([0])
        runner(torch.arange(3, 3 + 64)[None], torch.arange(64)[None], slot, span=64)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            runner(torch.arange(5, 5 + width)[None], torch.arange(64, 64 + width)[None], slot, span=64 + width)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return scheduler.call(timed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="1.1B")
    p.add_argument("--draft", default="270M")
    p.add_argument("--quant", default="int8")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="guess length for the modelled rows")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "elmd-bench")
    args = p.parse_args(argv)

    from elmd.engine.load import load_engine

    dirs = model_dirs([args.target, args.draft], args.work_dir)
    target, small = dirs[f"{args.target} fixture"], dirs[f"{args.draft} fixture"]
    copy = args.work_dir / "fixtures" / f"{args.target}-copy"
    if not copy.exists():
        shutil.copytree(target, copy)
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    ids = prompt_ids(64, vocab, 7)
    rows = []
    for label, draft in (("no speculation", None), (f"draft: {args.draft} fixture", small), ("draft: copy of target", copy)):
        options = {"speculation": draft is not None, "draft_dir": draft} if draft else {"speculation": False}
        engine = load_engine(target, backend="torch", quant=args.quant, slots=1, **options)
        try:
            decode_rate(engine, prompt_ids(16, vocab, 1), 8)  # warm-up
            rates = [decode_rate(engine, ids, args.tokens) for _ in range(3)]
            scheduler = engine.backend.scheduler
            accepted = scheduler.accepted_tokens / max(1, scheduler.proposed_tokens)
            rows.append((label, statistics.median(rates), scheduler.proposed_tokens, accepted))
            if draft is None:
                plain = pass_seconds(engine, 1)
                verify = pass_seconds(engine, 1 + args.k)
        finally:
            engine.close()
    small_engine = load_engine(small, backend="torch", quant=args.quant, slots=1, speculation=False)
    try:
        draft_step = pass_seconds(small_engine, 1)
    finally:
        small_engine.close()

    print(f"\ntarget {args.target} fixture ({args.quant}), batch 1, greedy, {args.tokens} tokens after a 64-token prompt")
    print(f"{'':28} {'decode tok/s':>12} {'vs plain':>9} {'guessed':>8} {'kept':>6}")
    for label, rate, proposed, kept in rows:
        print(f"{label:28} {rate:12.1f} {rate / rows[0][1]:8.2f}x {proposed:8d} {kept:6.0%}")
    print(f"\nparts (median, same run): target step {plain * 1e3:.1f} ms, target pass over {1 + args.k} tokens "
          f"{verify * 1e3:.1f} ms ({verify / plain:.2f}x a step), {args.draft} step {draft_step * 1e3:.1f} ms "
          f"({draft_step / plain:.2f}x)")
    print(f"modelled: a {args.draft}-sized draft guessing {args.k} tokens per pass")
    for rate in (0.5, 0.7, 0.9):
        kept = sum(rate ** i for i in range(1, args.k + 1))  # expected guesses kept, each given the ones before
        seconds = args.k * draft_step + verify
        print(f"  acceptance {rate:.0%}: {(kept + 1) / seconds:6.1f} tok/s ({(kept + 1) / seconds * plain:.2f}x plain)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
