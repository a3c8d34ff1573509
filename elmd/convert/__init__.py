"""Bring models from other formats into the store as OpenELM checkpoints in the hub's layout."""

from elmd.convert.gguf import UnsupportedModelError, import_gguf, offline_model_path
from elmd.convert.gguf_tokenizer import UnsupportedTokenizerError

__all__ = ["UnsupportedModelError", "UnsupportedTokenizerError", "import_gguf", "offline_model_path"]
