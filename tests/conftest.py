"""Shared test fixtures: CPU-only, few threads, and the location of the real data."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "maisi"
DATA = SHARED / "data"

# The experiments' shared helpers (experiments/common.py) and measures are tested where they are:
# their folder is importable the way it is when Python runs one of its scripts.
sys.path.insert(0, str(REPO / "experiments"))

torch.set_num_threads(2)


def need(path: Path) -> Path:
    """Skip (with the reason) when a file from ../shared is absent, e.g. outside this workspace."""
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/ is only present in the project workspace)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return need(DATA)


@pytest.fixture
def reference_dir() -> Path:
    return need(REFERENCE)


@pytest.fixture
def one_thread():
    """One torch thread for the test. Files of small-tensor tests use it: on a busy 2-core machine
    thread hand-offs cost far more than they save (measured 10-50x slower with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _identical_set_round_off(stats) -> float:
    """How far from 0 round-off can take the FID of a set with itself (a bound, any CPU or BLAS).

    The covariances here are singular (fewer independent slices than features). In float64,
    C @ C carries an error of about d * eps * |C|^2, so each of its (up to d) zero eigenvalues
    comes out as about that, and sqrtm turns each into sqrt(d * eps) * |C|: the trace of
    sqrtm(C C) misses 2 Tr(C) by at most 2 d sqrt(d eps) |C|, with |C| <= Tr(C). The square root
    is what makes this ~1e-7 relative rather than ~1e-14: which tiny eigenvalue a given BLAS
    leaves (Intel AMX gave 4e-6 absolute on one of these sets) is not something a test may fix.
    """
    eps = np.finfo(np.float64).eps
    return max(2 * p.dim * np.sqrt(p.dim * eps) * np.trace(p.cov) for p in stats.planes.values())


@pytest.fixture
def fid_round_off():
    """The bound above, for tests that compare a FID of identical sets with 0."""
    return _identical_set_round_off
