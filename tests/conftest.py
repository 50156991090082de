"""Test setup shared by every test file.

TRITON_INTERPRET=1 must be set before triton is imported anywhere: it makes every Triton
kernel run on the CPU through the interpreter, so CI (no GPU) still checks the kernels' maths.
"""

import os
import signal

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


def _fix_interpreter_bf16_dot() -> None:
    """The Triton interpreter (3.6 to 3.9 at least) keeps bf16 values as their raw uint16 bits
    and hands those bits to np.matmul, so every bf16 `tl.dot` returns garbage (~1e10) on the CPU.
    Widen bf16 operands to fp32 first — exact, since bf16 is the top half of an fp32 — so the
    interpreter computes what the GPU computes. Only the test harness is patched; the kernels
    are the ones that run on a GPU."""
    original = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        as_fp32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(as_fp32, tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot


_fix_interpreter_bf16_dot()

# A shell starts a background job (`pytest &`) with SIGINT ignored, and that is inherited: pytest
# would not stop on a Ctrl-C, nor would a run a test starts and interrupts (the Ctrl-C test). Python's
# own handler back; a child's exec turns a handled signal back to its default, so children get it too.
signal.signal(signal.SIGINT, signal.default_int_handler)

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
