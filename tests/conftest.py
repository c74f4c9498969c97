"""Shared test fixtures: CPU-only, few threads, and the location of the real data."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "maisi"
DATA = SHARED / "data"

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
