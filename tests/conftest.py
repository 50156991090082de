"""Test setup shared by every test file.

TRITON_INTERPRET=1 must be set before triton is imported anywhere: it makes every Triton
kernel run on the CPU through the interpreter, so CI (no GPU) still checks the kernels' maths.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The real public files in ../shared/data; skipped in a user's clone where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found (only present in the development checkout)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Matmuls this small are fastest on one thread, and one thread never stalls in OpenMP barriers
    when other processes hold the cores (two threads made model tests ~30x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
