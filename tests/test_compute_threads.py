"""The daemon's torch work starts OpenMP teams on one long-lived thread per model: the
scheduler's (elmd/engine/threads.py says why). libgomp keeps a thread's pool for the thread's
life, and once the pools hold more threads than cores every parallel region of a decode step
waits for sleeping workers: the offline model's step went from 3.4 ms to 11.4 ms after one
other thread ran one parallel op. A first start converts the model, loads it, answers a chat,
embeds with the offline encoder; a shim preloaded into the daemon (LD_PRELOAD, over libgomp's
GOMP_parallel) names each thread that starts a team."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from live_daemon import offline_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

static __thread int named;
typedef void (*parallel_fn)(void (*)(void*), void*, unsigned, unsigned);

/* The first team a thread starts (a region that may run on more than this thread): append its
   Python name to $ELMD_TEST_TEAMS_LOG, "nested" for a team inside another's. */
void GOMP_parallel(void (*fn)(void*), void* data, unsigned threads, unsigned flags) {
  static parallel_fn next;
  static int (*active_level)(void), (*max_active_levels)(void);
  if (!next) {
    next = (parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
    active_level = (int (*)(void))dlsym(RTLD_NEXT, "omp_get_active_level");
    max_active_levels = (int (*)(void))dlsym(RTLD_NEXT, "omp_get_max_active_levels");
  }
  int level = active_level(), team = threads != 1 && level < max_active_levels();
  if (team && level > 0) {
    FILE* f = fopen(getenv("ELMD_TEST_TEAMS_LOG"), "a");
    if (f) { fputs("nested\n", f); fclose(f); }
  } else if (team && !named) {
    named = 1;
    int (*ensure)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "PyGILState_Ensure");
    void (*release)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "PyGILState_Release");
    int (*run)(const char*) = (int (*)(const char*))dlsym(RTLD_DEFAULT, "PyRun_SimpleString");
    if (ensure && release && run) {
      int state = ensure();
      run("import os, threading\n"
          "with open(os.environ['ELMD_TEST_TEAMS_LOG'], 'a') as f: f.write(threading.current_thread().name + '\\n')\n");
      release(state);
    }
  }
  next(fn, data, threads, flags);
}
"""


def test_only_the_scheduler_keeps_an_openmp_team(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler for the shim")
    (tmp_path / "shim.c").write_text(SHIM)
    shim = tmp_path / "shim.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "shim.c"), "-ldl"], check=True)
    log = tmp_path / "teams.log"
    with offline_daemon(tmp_path / "first-start", LD_PRELOAD=str(shim), ELMD_TEST_TEAMS_LOG=str(log)) as daemon:
        for _ in range(2):
            chat = {"model": daemon.model, "messages": [{"role": "user", "content": "Name three colors."}],
                    "max_tokens": 8}
            httpx.post(f"{daemon.url}/v1/chat/completions", json=chat, timeout=300).raise_for_status()
            httpx.post(f"{daemon.url}/v1/embeddings", json={"model": "all-minilm", "input": ["a harbor at dawn"] * 4},
                       timeout=300).raise_for_status()
    starters = log.read_text().split()
    assert "elmd-scheduler" in starters, starters  # the shim saw the decode steps' teams
    # anything else ran in a thread that ended with its work (in_own_thread), taking its pool along;
    # and no team inside another (MKL's sgemm in ATen's parallel loops, without OMP_MAX_ACTIVE_LEVELS=1)
    assert [name for name in starters if name != "elmd-scheduler" and not name.startswith("elmd-work")] == []
