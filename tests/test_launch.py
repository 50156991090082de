"""triton_kernels/launch.py: a LaunchConfig becomes the signature Triton compiles; a Cost its roofline."""

import pytest
import triton

from triton_kernels.cross_entropy import cross_entropy_kernel
from triton_kernels.launch import H100_BYTES_PER_S, H100_FP32_FLOPS, H100_TENSOR_FLOPS, Cost, LaunchConfig

ARGS = {
    "logits_ptr": "*bf16:16", "logits_row_stride": "i32:16", "grad_ptr": "*bf16:16", "grad_row_stride": "i32",
    "labels_ptr": "*i64", "loss_ptr": "*fp32:16", "grad_scale_ptr": "*fp32", "n_cols": "i32", "ignore_index": "i32",
}  # fmt: skip


def test_signature_follows_the_kernels_argument_order_with_divisibility_hints():
    shuffled = dict(reversed(ARGS.items()))
    config = LaunchConfig(cross_entropy_kernel, "t", "bf16", shuffled, {"BLOCK": 64}, num_warps=4)
    signature, attrs = config.triton_signature()
    assert list(signature) == list(cross_entropy_kernel.arg_names)
    assert signature["logits_ptr"] == "*bf16" and signature["grad_row_stride"] == "i32"
    assert signature["BLOCK"] == "constexpr"
    assert attrs == {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 5)}


def test_signature_rejects_missing_arguments_and_unknown_hints():
    missing = {k: v for k, v in ARGS.items() if k != "n_cols"}
    with pytest.raises(ValueError, match="kernel's"):
        LaunchConfig(cross_entropy_kernel, "t", "bf16", missing, {"BLOCK": 64}, 4).triton_signature()
    with pytest.raises(ValueError, match="':16'"):
        LaunchConfig(cross_entropy_kernel, "t", "bf16", ARGS | {"n_cols": "i32:8"}, {"BLOCK": 64}, 4).triton_signature()


def test_roofline_floor_is_the_slowest_of_bytes_and_flops():
    assert Cost("k", "s", bytes=int(3e9)).floor_s() == (3e9 / H100_BYTES_PER_S, "memory")
    assert Cost("k", "s", bytes=1, tensor_flops=int(8e14)).floor_s() == (8e14 / H100_TENSOR_FLOPS, "tensor")
    assert Cost("k", "s", bytes=1, fp32_flops=int(67e12)).floor_s() == (67e12 / H100_FP32_FLOPS, "fp32")


def test_autotuned_kernel_is_unwrapped_to_its_jit_function():
    autotuned = triton.autotune([triton.Config({"BLOCK": 64})], key=["n_cols"])(cross_entropy_kernel)
    config = LaunchConfig(triton.heuristics({})(autotuned), "t", "bf16", ARGS, {"BLOCK": 64}, 4)
    assert config.jit_fn is cross_entropy_kernel
    assert list(config.triton_signature()[0]) == list(cross_entropy_kernel.arg_names)
