"""A real OpenELM checkpoint whose greedy reply to any chat is a text chosen by the test.

The tiny fixture's shape, with an untied head and a vocabulary extended by one added token
per word of the reply, and weights that make the model a bigram table: every layer's
output projections are zero, so the residual stream is the current token's embedding;
each token of the script has an embedding direction of its own, and the head maps that
direction to the script's next token. A chat prompt always ends with the same
assistant-marker token, which starts the script; its last word leads to EOS. It runs on
the real PyTorch engine and tokenizer like any other checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from elmd.engine.tokenizer import Tokenizer
from elmd.fixtures import TINY, write_checkpoint

LOGIT = 50.0  # the scripted next token's logit; every other token's is 0


def write_scripted_checkpoint(out_dir: Path, reply: str) -> Path:
    """A checkpoint in `out_dir` whose greedy reply to any chat message is `reply`."""
    words = re.findall(r"\s*\S+", reply)  # each with the spaces before it
    if len(set(words)) != len(words):
        raise ValueError("a bigram model cannot say the same word twice: make the reply's words unique")
    base = TINY["vocab_size"]
    out = write_checkpoint(out_dir, shape="tiny", seed=0,
                           config_overrides={"share_input_output_layers": False, "vocab_size": base + len(words)})
    tokenizer_json = out / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text())
    spec["added_tokens"] += [{"id": base + i, "content": word, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": False} for i, word in enumerate(words)]
    tokenizer_json.write_text(json.dumps(spec))

    tokenizer = Tokenizer.from_dir(out)
    start = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])[-1]  # the assistant marker's last token
    script = [start, *range(base, base + len(words)), min(tokenizer.eos_ids)]
    weights = load_file(str(out / "model.safetensors"))
    dim = weights["transformer.norm.weight"].shape[0]
    if len(script) > dim:
        raise ValueError(f"at most {dim - 2} words: each token of the script needs an embedding direction")
    for name, tensor in weights.items():
        if name.endswith(("attn.out_proj.weight", "ffn.proj_2.weight", "token_embeddings.weight", "lm_head.weight")):
            tensor.zero_()
    weights["transformer.norm.weight"].fill_(1.0)
    embeddings, head = weights["transformer.token_embeddings.weight"], weights["lm_head.weight"]
    for direction, (token, following) in enumerate(zip(script, script[1:])):
        embeddings[token, direction] = 1.0
        head[following, direction] = LOGIT / dim**0.5  # the final norm scales a unit vector by sqrt(dim)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
