"""Torch work off the scheduler's thread, in threads that end with it.

libgomp (torch's OpenMP) keeps a pool of worker threads for every thread that ran a parallel
op, for that thread's life. Once the pools hold more threads than there are cores, it turns
to its throttled mode: workers sleep after about a hundred spins, so every parallel region
waits for a wake-up, and a decode step runs about a hundred of them (each matmul, each norm).
Measured on the offline model (2 cores, native int4 kernels): in-process a decode step of
3.4 ms took 11.4 ms once one other thread had run a single parallel op, for that thread's
life. Through HTTP, after a first start whose conversion ran on an executor thread, decode
ran at 78 tok/s instead of 154; after one embeddings request (the encoder kept a thread) a
chat model's decode ran at 142 tok/s instead of 349. So the daemon's torch work runs on each
model's scheduler thread, and what must run elsewhere (a model's conversion or load, an
encoder's batch) runs in a thread that ends with it, taking its pool along
(tests/test_compute_threads.py names the threads that start teams).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a new thread, which ends when fn returns."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="elmd-work")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread ends once fn returns, even if the caller was cancelled
