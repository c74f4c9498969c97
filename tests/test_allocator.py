"""maisi2.allocator: freed tensor memory is reused without page faults, and given back on request."""

import os
import subprocess
import sys
import textwrap

import pytest

from maisi2 import allocator

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="the allocator policy applies to glibc only")

# Runs in a fresh process whose glibc starts with the mmap threshold pinned at 128 KiB (which also
# turns off glibc's own threshold adjustment): every 16 MiB tensor is then fresh mmap'd pages.
_CHURN = textwrap.dedent("""
    import resource, torch
    from maisi2 import allocator

    def faults_of_churn():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            torch.empty(4 * 2**20).fill_(1.0)  # 16 MiB, made and dropped
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pinned = faults_of_churn()
    assert allocator.reuse_freed_memory()
    faults_of_churn()  # the heap grows once
    print(pinned, faults_of_churn())
""")

_GIVE_BACK = textwrap.dedent("""
    import torch
    from maisi2 import allocator

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    assert allocator.reuse_freed_memory()
    start = rss_mib()
    blocks = [torch.ones(4 * 2**20) for _ in range(32)]  # 512 MiB in 16 MiB blocks, from the heap
    del blocks
    kept = rss_mib() - start
    allocator.give_back_freed_memory()
    print(kept, rss_mib() - start)
""")


def _run(code: str) -> list[float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [float(v) for v in done.stdout.split()]


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    pinned, reused = _run(_CHURN)
    pages = 20 * 16 * 2**20 / 4096
    assert pinned > 0.5 * pages  # the churn really faults every page when memory is handed back
    assert reused < 0.02 * pages


@glibc_only
def test_freed_memory_stays_until_given_back():
    kept, after = _run(_GIVE_BACK)
    assert kept > 400  # of the 512 MiB freed: kept for reuse
    assert after < 100


def test_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.reuse_freed_memory() is False
    allocator.give_back_freed_memory()  # nothing to do, no error
