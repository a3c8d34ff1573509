"""llama.cpp as the benchmark's peer: the same weights, measured the way bench.py measures elmd.

The weights reach llama.cpp as a GGUF written here with the `gguf` package (an elmd
dependency): llama.cpp's `openelm` architecture, the tensor names and keys its loader
reads (per-layer head counts and FFN widths, fused QKV, QK-norm, the tied head), and a
SentencePiece-style ("llama") vocabulary from the model's own tokenizer. llama.cpp's
convert_hf_to_gguf.py has an OpenELM class too, but it ships only in the llama-cpp-python
source package, and without a tokenizer.model (elmd's fixtures carry tokenizer.json) it
substitutes a Llama-2 vocabulary file from the llama.cpp tree.

elmd quant -> GGUF: none -> f32, bf16 -> bf16 (written directly), int8 -> q8_0 and
int4 -> q4_0 (llama.cpp's own quantizer from the f32 file, its default recipe).

    python benchmarks/llamacpp.py MODEL_DIR --quant int4 --threads 2   # one measurement, as JSON
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

GGUF_TYPES = {"none": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
INSTALL_HINT = ("the llama.cpp peer needs llama-cpp-python: pip install -e '.[llamacpp]' "
                "(compiles llama.cpp, about 5 minutes on 2 cores)")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- the GGUF ------------------------------------------------------------------------

def tensor_plan(cfg) -> list[tuple[str, str, slice | None]]:
    """(GGUF name, checkpoint name, rows taken) for every tensor llama.cpp's OpenELM loader
    creates; proj_1 holds the gate rows, then the up rows."""
    plan = [("token_embd.weight", "transformer.token_embeddings.weight", None),
            ("output_norm.weight", "transformer.norm.weight", None)]
    for i, width in enumerate(cfg.ffn_dims):
        hub, blk = f"transformer.layers.{i}.", f"blk.{i}."
        plan += [
            (blk + "attn_norm.weight", hub + "attn_norm.weight", None),
            (blk + "attn_qkv.weight", hub + "attn.qkv_proj.weight", None),
            (blk + "attn_q_norm.weight", hub + "attn.q_norm.weight", None),
            (blk + "attn_k_norm.weight", hub + "attn.k_norm.weight", None),
            (blk + "attn_output.weight", hub + "attn.out_proj.weight", None),
            (blk + "ffn_norm.weight", hub + "ffn_norm.weight", None),
            (blk + "ffn_gate.weight", hub + "ffn.proj_1.weight", slice(0, width)),
            (blk + "ffn_up.weight", hub + "ffn.proj_1.weight", slice(width, 2 * width)),
            (blk + "ffn_down.weight", hub + "ffn.proj_2.weight", None),
        ]
    return plan


def read_vocab(model_dir: Path, size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types in SentencePiece's terms, padded to the embedding's
    `size` rows with unused pieces (llama.cpp wants one piece per row)."""
    from gguf import TokenType

    pieces, scores, types = [], [], []
    if (model_dir / "tokenizer.json").is_file():
        spec = json.loads((model_dir / "tokenizer.json").read_text())
        by_id = {i: p for p, i in spec["model"]["vocab"].items()}
        special = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        by_id.update(special)
        unk = spec["model"].get("unk_token")
        for i in range(min(size, max(by_id) + 1)):
            piece = by_id.get(i, f"[PAD{i}]")
            pieces.append(piece)
            if i not in by_id:
                types.append(TokenType.UNUSED)
            elif piece == unk:
                types.append(TokenType.UNKNOWN)
            elif i in special:
                types.append(TokenType.CONTROL)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                types.append(TokenType.BYTE)
            else:
                types.append(TokenType.NORMAL)
            # BPE merges learnt first have the lowest ids: SentencePiece's highest scores.
            scores.append(-float(i) if types[-1] == TokenType.NORMAL else 0.0)
    elif (model_dir / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        for i in range(min(size, sp.get_piece_size())):
            pieces.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                         else TokenType.BYTE if sp.is_byte(i) else TokenType.UNUSED if sp.is_unused(i)
                         else TokenType.NORMAL)
    else:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json or tokenizer.model")
    for i in range(len(pieces), size):
        pieces.append(f"[PAD{i}]")
        scores.append(0.0)
        types.append(TokenType.UNUSED)
    return pieces, scores, [int(t) for t in types]


def write_gguf(model_dir: str | Path, path: str | Path, dtype: str = "f32") -> Path:
    """Write the OpenELM checkpoint in `model_dir` as a llama.cpp GGUF: matrices in `dtype`
    (f32, or bf16 rounded to nearest even), norms in f32. Tensors are streamed one at a
    time, and the file appears only when complete."""
    import gguf
    import torch
    from safetensors import safe_open

    from elmd.engine.checkpoint import read_config, weight_files

    if dtype not in ("f32", "bf16"):
        raise ValueError(f"dtype must be f32 or bf16, not {dtype!r}")
    model_dir, path = Path(model_dir), Path(path)
    cfg = read_config(model_dir)
    missing = [what for what, ok in (("a tied output head", cfg.share_input_output_layers),
                                     ("QK-norm", cfg.normalize_qk_projections),
                                     ("a gated FFN", cfg.ffn_with_glu)) if not ok]
    if missing:
        raise ValueError(f"{model_dir}: llama.cpp's openelm architecture needs {', '.join(missing)}")
    files = weight_files(model_dir)
    plan = tensor_plan(cfg)
    shapes = {}
    for name, source, rows in plan:
        with safe_open(str(files[source]), framework="pt") as f:
            shape = list(f.get_slice(source).get_shape())
        shapes[name] = shape if rows is None else [rows.stop - rows.start, *shape[1:]]

    pieces, scores, types = read_vocab(model_dir, cfg.vocab_size)
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "openelm")
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_block_count(cfg.num_transformer_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.model_dim)
    writer.add_feed_forward_length(cfg.ffn_dims)
    writer.add_head_count(cfg.num_query_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_freq_constant))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def target(shape) -> tuple[torch.dtype, gguf.GGMLQuantizationType]:
        if dtype == "bf16" and len(shape) == 2:
            return torch.bfloat16, gguf.GGMLQuantizationType.BF16
        return torch.float32, gguf.GGMLQuantizationType.F32

    for name, source, rows in plan:
        shape = shapes[name]
        torch_dtype, ggml_type = target(shape)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=torch_dtype).element_size()
        writer.add_tensor_info(name, shape, np.dtype(np.float32 if torch_dtype == torch.float32 else np.uint16),
                               nbytes, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, source, rows in plan:
        with safe_open(str(files[source]), framework="pt") as f:
            tensor = f.get_slice(source)[rows] if rows is not None else f.get_tensor(source)
        torch_dtype, _ = target(tensor.shape)
        tensor = tensor.to(torch_dtype).contiguous()
        data = tensor.view(torch.int16).numpy().view(np.uint16) if torch_dtype == torch.bfloat16 else tensor.numpy()
        writer.write_tensor_data(data)
    writer.close()
    tmp.replace(path)
    return path


def quantize(src: Path, dst: Path, gguf_type: str, threads: int) -> None:
    """llama.cpp's own quantizer (its default recipe for the type), as a library call."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[gguf_type]
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {gguf_type} failed")
    tmp.replace(dst)


def gguf_for(model_dir: Path, quant: str, work: Path, threads: int, quantizer: Path | None = None) -> Path:
    """The model's GGUF for an elmd quant, built once into `work` (keyed by the weight
    files' path, size and mtime); quantizing runs in a child, whose log is kept out of sight:
    llama-cpp-python's quantizer, or the `llama-quantize` binary given as `quantizer`."""
    from elmd.engine.checkpoint import weight_files

    if quant not in GGUF_TYPES:
        raise ValueError(f"no llama.cpp counterpart for quant {quant!r} (have {', '.join(GGUF_TYPES)})")
    stamp = sorted(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in set(weight_files(model_dir).values()))
    folder = work / "gguf" / f"{model_dir.name}-{hashlib.sha1(''.join(stamp).encode()).hexdigest()[:10]}"
    gguf_type = GGUF_TYPES[quant]
    path = folder / f"{gguf_type}.gguf"
    if path.exists():
        return path
    if gguf_type in ("f32", "bf16"):
        return write_gguf(model_dir, path, gguf_type)
    source = gguf_for(model_dir, "none", work, threads)
    if quantizer is not None:
        cmd = [str(quantizer), str(source), str(path), gguf_type.upper(), str(threads)]
    else:
        cmd = [sys.executable, __file__, "--quantize", str(source), str(path), gguf_type, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"quantizing to {gguf_type}: " + (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
    return path


def describe(path: Path) -> dict:
    """Bytes of weights (what a decoded token reads) and how many tensors of each type."""
    import gguf

    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name.lower()] = types.get(t.tensor_type.name.lower(), 0) + 1
    return {"weights_bytes": int(sum(int(t.n_bytes) for t in reader.tensors)), "gguf_tensor_types": types}


# ---- the measurement, in its own process ---------------------------------------------

def run_child(args) -> dict:
    """bench.py's definitions: a 16-token warm-up; prompt tok/s = prompt tokens over the time
    to the first sampled token; decode tok/s = tokens after the first over their span, at
    batch 1 after a 64-token prompt; greedy, one token per eval; peak RSS from VmHWM."""
    import llama_cpp
    import psutil

    from common import peak_rss_bytes, token_rates

    batch = max(512, args.prompt_tokens)
    t = time.perf_counter()
    # Flash attention on: llama.cpp's own default ("auto") turns it on for the CPU, where
    # llama-cpp-python's Llama turns it off (prompts 15-30% slower on the 270M, decode alike).
    llm = llama_cpp.Llama(str(args.child), n_ctx=0, n_batch=batch, n_ubatch=batch, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=True, verbose=False)
    load_s = time.perf_counter() - t
    rss_loaded = psutil.Process().memory_info().rss
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def generate(ids: list[int], max_tokens: int) -> list[float]:
        llm.reset()
        llm.eval(ids)
        token = greedy()
        stamps = [time.perf_counter()]
        for _ in range(max_tokens - 1):
            llm.eval([token])
            token = greedy()
            stamps.append(time.perf_counter())
        return stamps

    rates = token_rates(generate, args.vocab, args)
    llm.close()
    return {
        "load_s": load_s,
        "device": "cpu",
        "rss_loaded_bytes": rss_loaded,
        "rss_peak_bytes": peak_rss_bytes(),
        **rates,
    }


def measure_in_process(model_dir: Path, quant: str, args) -> dict:
    """One llama.cpp row for `model_dir` at elmd's `quant`: the GGUF built (or found) in
    args.work_dir, then measured in a fresh process with args.threads threads."""
    from common import child_result, rate_options

    from elmd.engine.tokenizer import Tokenizer

    try:
        path = gguf_for(Path(model_dir), quant, args.work_dir, args.threads)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        return {"error": str(e)}
    cmd = [sys.executable, __file__, "--child", str(path), "--vocab", str(Tokenizer.from_dir(model_dir).vocab_size),
           *rate_options(args)]
    # A crashed llama.cpp leaves no explanation of its own.
    result = child_result(cmd, crashed=" (a GCC 12 build of llama.cpp on an AMX CPU does this: README, Benchmarks)")
    if "error" in result:
        return result
    return {**result, "dtype": GGUF_TYPES[quant], "gguf": str(path), **describe(path)}


def main(argv=None) -> int:
    from common import add_rate_options

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, nargs="?")
    p.add_argument("--quant", default="int4", choices=sorted(GGUF_TYPES))
    add_rate_options(p)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "elmd-bench")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quantize:
        src, dst, gguf_type = args.quantize
        quantize(Path(src), Path(dst), gguf_type, args.threads)
        return 0
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    if args.model_dir is None:
        p.error("a model directory is needed")
    if not available():
        p.exit(2, f"{INSTALL_HINT}\n")
    print(json.dumps(measure_in_process(args.model_dir, args.quant, args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
