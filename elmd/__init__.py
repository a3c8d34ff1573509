"""elmd: a private, on-device serving daemon for OpenELM with an OpenAI-compatible API."""

import os

# No OpenMP team inside another: torch turns MKL's dynamic threading off, so an sgemm inside
# one of ATen's parallel loops (an encoder's batched matmul) started a team per loop thread,
# twice the cores' threads, and more pools than cores throttle every team (elmd/engine/threads.py).
# Read by libgomp when torch loads it, so it must come first (as `python -m elmd` does).
os.environ.setdefault("OMP_MAX_ACTIVE_LEVELS", "1")

__version__ = "0.1.0"
