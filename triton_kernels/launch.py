"""What a kernel's wrapper can launch, and what a launch should cost: declared beside the wrapper.

Every kernel module that wants its kernels checked for real GPUs defines two functions:

    launch_configs() -> list[LaunchConfig]   every configuration its wrapper can pick (dtypes, block
                                             sizes, warps, stages, each autotune config), built from
                                             the same constants the wrapper launches with
    reference_costs() -> list[Cost]          bytes moved and FLOPs at a realistic shape

`scripts/kernel_report.py` compiles every config ahead of time for H100 (sm_90a) and A100 (sm_80)
on a machine without a GPU and reports registers, spills and shared memory beside the roofline time
of each cost; `tests/test_kernel_report.py` compiles the configs marked `in_ci` and fails on a
compile error, a spill in a bf16 config, or shared memory over the GPU's limit.

The roofline: a kernel cannot finish before its bytes have crossed DRAM nor before its FLOPs have
been done, so max(bytes / bandwidth, FLOPs / peak) is the floor a measured time is compared with
(Williams, Waterman & Patterson 2009, "Roofline").
"""

from __future__ import annotations

from dataclasses import dataclass

from triton.runtime import Autotuner, Heuristics

# H100 SXM ceilings, none measured by this project (no GPU has timed anything yet): practical
# rates below the datasheet's 3.35 TB/s HBM3 and 989 TFLOP/s dense bf16, at what a device-to-device
# copy (reads + writes) and a large bf16 matmul are commonly reported to reach; fp32 is the
# datasheet's non-tensor rate (elementwise work, exp counted as one FLOP).
H100_BYTES_PER_S = 3.0e12
H100_TENSOR_FLOPS = 800e12
H100_FP32_FLOPS = 67e12


@dataclass(frozen=True)
class LaunchConfig:
    """One way a wrapper launches a kernel: what Triton compiles, as it would at run time."""

    kernel: object  # the @triton.jit function (through @triton.autotune / @triton.heuristics is fine)
    label: str  # for the report, e.g. "bf16 BLOCK=4096"
    dtype: str  # the data dtype ("bf16", "fp16", "fp32"); a bf16 config must not spill
    # Every run-time argument's Triton type: "*bf16" (pointer), "i32", "fp32". A ":16" suffix says
    # the value is divisible by 16 — an aligned pointer, a stride or size multiple of 16 — as
    # Triton's JIT specialises it (it then emits wider loads and stores).
    args: dict[str, str]
    constexprs: dict[str, int]  # the tl.constexpr arguments
    num_warps: int
    num_stages: int = 3  # Triton's default
    in_ci: bool = False  # what real training launches: the CI test compiles it (keep these few)

    @property
    def jit_fn(self):
        """The @triton.jit function itself, under any autotune or heuristics decorator."""
        fn = self.kernel
        while isinstance(fn, (Autotuner, Heuristics)):
            fn = fn.fn
        return fn

    def triton_signature(self) -> tuple[dict[str, str], dict[tuple[int], list]]:
        """-> (signature, attrs) for `triton.compiler.ASTSource`, in the kernel's argument order."""
        names = list(self.jit_fn.arg_names)
        if sorted(names) != sorted([*self.args, *self.constexprs]):
            raise ValueError(f"{self.label}: args + constexprs {[*self.args, *self.constexprs]} != kernel's {names}")
        signature, attrs = {}, {}
        for i, name in enumerate(names):
            if name in self.constexprs:
                signature[name] = "constexpr"
                continue
            ty, _, hint = self.args[name].partition(":")
            signature[name] = ty
            if hint == "16":
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif hint:
                raise ValueError(f"{self.label}: {name}: the only hint is ':16', got {self.args[name]!r}")
        return signature, attrs


@dataclass(frozen=True)
class Cost:
    """Bytes and FLOPs of one launch at a stated shape; `floor_s` is its H100 roofline time."""

    kernel: str
    shape: str  # e.g. "N=8192 × V=151936, bf16"
    bytes: int  # through DRAM, as the kernel is written (re-reads included)
    tensor_flops: int = 0  # matmuls on tensor cores (bf16)
    fp32_flops: int = 0  # elementwise work on the CUDA cores

    def floor_s(self) -> tuple[float, str]:
        """-> (the roofline time on an H100 in seconds, what bounds it: memory, tensor or fp32)."""
        times = {
            "memory": self.bytes / H100_BYTES_PER_S,
            "tensor": self.tensor_flops / H100_TENSOR_FLOPS,
            "fp32": self.fp32_flops / H100_FP32_FLOPS,
        }
        bound = max(times, key=times.get)
        return times[bound], bound
