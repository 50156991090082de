"""Model FLOPs utilisation (MFU): the FLOPs training needs per second ÷ the most the device can do.

    MFU = tokens/s × FLOPs per token / peak FLOP/s

FLOPs per token come from the model's shape, `ModelConfig.flops_per_token` (PaLM, Chowdhery et al.
2022, appendix B: 6N + the attention term); recomputation, padding and optimizer work are not
counted, so MFU compares runs and machines on the work the model itself needs. The peak:

- a GPU: the datasheet's dense bf16 tensor-core rate (without 2:4 sparsity), by device name —
  training on CUDA runs bf16 autocast. H100 SXM: 989 TFLOP/s, the convention MFU papers use; the
  ~800 TFLOP/s a large bf16 matmul reaches in practice is the roofline's ceiling in
  triton_kernels/launch.py, not the yardstick here. An unlisted GPU gets no MFU.
- a CPU: no datasheet number applies (the same cores run at other clocks and vector widths
  behind every VM, and bf16 matmuls use other units than fp32 ones), so the peak is *measured*:
  the best of a few fp32 1024 × 1024 matmuls at the run's thread count, once per process (about
  0.1 s). CPU training runs fp32. On this project's 2-core machine that is ~140 GFLOP/s at one
  thread. A busy machine measures a lower peak, so a CPU's MFU says how much of the matmul rate
  available at the start of the run the training used.
"""

from __future__ import annotations

import functools
import time

import torch

# Dense bf16 tensor-core FLOP/s without sparsity, from NVIDIA's datasheets; the first name found in
# torch.cuda.get_device_name() wins, so the longer names come first.
GPU_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,  # SXM: H100's compute, more memory
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for training's matmuls (see the module docstring); None if unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        return measured_cpu_peak(torch.get_num_threads())
    return None


@functools.cache
def measured_cpu_peak(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` fp32 (size × size) matmuls on this CPU, at `threads` threads
    (the argument only keys the cache: the matmuls run at torch's current setting)."""
    # A generator of its own: drawing from torch's global one (once per process, cached) would shift
    # the training's random stream (dropout) in a process's first run only.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    a @ b  # the first call pays for allocation and thread start-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
