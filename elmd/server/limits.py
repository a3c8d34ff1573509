"""Upper bounds on what one request may ask for, so that no single request can tie up
the daemon (memory, CPU, time) far beyond what a real client needs. Each violation is a
400 naming the parameter; the body size limit (413) is in security.py."""

from __future__ import annotations

# declared with the sampling options they bound
from elmd.sampling_options import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, SEED_RANGE  # noqa: F401

MAX_MESSAGES = 512  # a 2048-token context cannot hold more turns than this anyway
MAX_N = 16  # choices per request (each is a sequence in the batch)
MAX_PROMPTS = 128  # prompts in one /v1/completions batch (lm-evaluation-harness sends a few dozen)
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_EMBEDDING_INPUTS = 2048  # inputs in one embeddings request, as OpenAI
