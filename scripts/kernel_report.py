"""Compile every Triton kernel ahead of time for H100 and A100, on a machine with no GPU; report
registers, spills and shared memory per launch config, and each kernel's roofline floor.

    python scripts/kernel_report.py        # every config: table on stdout and in benchmarks/results/kernel_report.md
    python scripts/kernel_report.py --ci   # only the configs marked in_ci (what tests/test_kernel_report.py runs)
    PYTHONPATH=.triton36 python scripts/kernel_report.py   # the same under triton 3.6 (scripts/setup_triton36.sh)

Exit status 1 when a config fails to compile, a bf16 config spills registers, or a config needs more
shared memory than the GPU gives one program; the problems are listed last.

Registers and spills depend on the Triton version (its code generation and the ptxas it ships), so
the report has one section per Triton version, named with its ptxas versions: a run replaces its own
version's section of benchmarks/results/kernel_report.md and keeps the others.

Each kernel module in triton_kernels/ that defines `launch_configs()` and `reference_costs()` is
included (see triton_kernels/launch.py). Triton compiles each config to a cubin exactly as its JIT
would at run time (same signature, divisibility hints, warps, stages), with Triton's own ptxas, and
`cuobjdump -res-usage` (shipped beside it) reads the cubin's resources.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: @triton.jit must build real kernels

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's triton_kernels, whatever is installed

from triton_kernels.launch import H100_BYTES_PER_S, H100_FP32_FLOPS, H100_TENSOR_FLOPS  # noqa: E402

REPORT = ROOT / "benchmarks" / "results" / "kernel_report.md"


@dataclass(frozen=True)
class Target:
    gpu: str
    arch: str
    capability: int  # Triton compiles capability 90 for sm_90a, Hopper's full instruction set
    max_shared: int  # bytes one program may use: the per-block opt-in limit (CUDA guide, compute capabilities)


TARGETS = (Target("H100", "sm_90a", 90, 227 * 1024), Target("A100", "sm_80", 80, 163 * 1024))


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    spill: int  # bytes per thread of stack frame + local memory: registers that did not fit
    # bytes per program: static (ptxas; on sm_90a 1 KB whenever the kernel uses shared memory at all)
    # + dynamic (Triton's reduction scratch and pipelining buffers)
    shared: int


def resource_usage(cuobjdump_out: str) -> dict[str, int]:
    """`cuobjdump -res-usage` → {"REG": 32, "STACK": 0, "SHARED": 1024, "LOCAL": 0, ...} of its one function."""
    line = next(line for line in cuobjdump_out.splitlines() if line.strip().startswith("REG:"))
    return {key: int(value) for key, value in (field.split(":") for field in line.split())}


def compile_config(config, target: Target) -> Resources:
    signature, attrs = config.triton_signature()
    src = ASTSource(fn=config.jit_fn, signature=signature, constexprs=config.constexprs, attrs=attrs)
    # enable_fp_fusion: the JIT's default in triton 3.6–3.9 (named, so that 3.9 does not warn about it)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    kernel = triton.compile(src, target=GPUTarget("cuda", target.capability, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
        out = subprocess.run([cuobjdump, "-res-usage", cubin.name], check=True, capture_output=True, text=True).stdout
    usage = resource_usage(out)
    return Resources(usage["REG"], usage["STACK"] + usage["LOCAL"], usage["SHARED"] + kernel.metadata.shared)


def problems(config, target: Target, res: Resources | str) -> list[str]:
    where = f"{config.jit_fn.__name__} [{config.label}] on {target.gpu} {target.arch}"
    if isinstance(res, str):
        return [f"{where}: does not compile: {res}"]
    found = []
    if res.spill and config.dtype == "bf16":
        found.append(f"{where}: spills {res.spill} bytes per thread ({res.registers} registers)")
    if res.shared > target.max_shared:
        found.append(f"{where}: needs {res.shared} bytes of shared memory, over {target.gpu}'s {target.max_shared}")
    return found


def kernel_modules() -> list:
    names = sorted(path.stem for path in (ROOT / "triton_kernels").glob("*.py"))
    modules = [importlib.import_module(f"triton_kernels.{name}") for name in names]
    return [m for m in modules if hasattr(m, "launch_configs")]


def ptxas_version(capability: int) -> str:
    try:  # not public API; the same function in triton 3.6 and 3.9
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).version
    except Exception:
        return "?"


def version_section(rows: list, found: list[str]) -> str:
    """This Triton version's table and problems, under a heading naming it and its ptxas versions."""
    versions = ", ".join(f"ptxas {ptxas_version(t.capability)} for {t.arch}" for t in TARGETS)
    lines = [
        f"## triton {triton.__version__} ({versions})",
        "",
        "| kernel | config | warps | stages | CI | "
        + " | ".join(f"{t.gpu} regs | {t.gpu} spill | {t.gpu} smem" for t in TARGETS)
        + " |",
        "|---|---|--:|--:|:-:|" + "--:|--:|--:|" * len(TARGETS),
    ]
    for config, results in rows:
        cells = [
            f"{r.registers} | {r.spill} | {r.shared}" if isinstance(r, Resources) else "error | | " for r in results
        ]
        ci = "✓" if config.in_ci else ""
        lines.append(
            f"| {config.jit_fn.__name__} | {config.label} | {config.num_warps} | {config.num_stages} | {ci} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Problems: " + ("none." if not found else ""), *(f"- {p}" for p in found)]
    return "\n".join(lines) + "\n"


def roofline_section(costs: list) -> str:
    lines = [
        "## Roofline floor on an H100",
        "",
        f"max(bytes / {H100_BYTES_PER_S / 1e12:.1f} TB/s, tensor FLOPs / {H100_TENSOR_FLOPS / 1e12:.0f} TFLOP/s, "
        f"fp32 FLOPs / {H100_FP32_FLOPS / 1e12:.0f} TFLOP/s): a measured time is compared with it.",
        "",
        "| kernel | shape | MB moved | tensor GFLOP | fp32 GFLOP | floor (µs) | bound by |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for cost in costs:
        floor, bound = cost.floor_s()
        lines.append(
            f"| {cost.kernel} | {cost.shape} | {cost.bytes / 1e6:,.0f} | {cost.tensor_flops / 1e9:,.1f} | "
            f"{cost.fp32_flops / 1e9:,.1f} | {floor * 1e6:,.0f} | {bound} |"
        )
    return "\n".join(lines) + "\n"


INTRO = (
    "# Kernel report: ahead-of-time compiles for H100 and A100\n\n"
    "Written by `scripts/kernel_report.py`, one section per Triton version it was run under (each run "
    "replaces its own). Per thread: registers (255 at most); spill = stack frame + local memory in bytes, 0 "
    "unless registers ran out. Per program: shared memory in bytes, static + dynamic, against a limit of "
    + ", ".join(f"{t.max_shared} on {t.gpu}" for t in TARGETS)
    + ". ✓ = compiled in CI (under each version).\n"
)


def merged_report(old: str, version: str, section: str, roofline: str) -> str:
    """The report file with triton `version`'s section put in (newest version first), the others kept."""
    sections = {
        m.group(1): m.group(0).rstrip("\n") + "\n"
        for m in re.finditer(r"^## triton (\S+).*?(?=^## |\Z)", old, re.M | re.S)
    }
    sections[version] = section
    newest_first = sorted(sections, key=lambda v: [int(x) for x in re.findall(r"\d+", v)], reverse=True)
    return "\n".join([INTRO, *(sections[v] for v in newest_first), roofline])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="compile only the configs marked in_ci; write no file")
    args = parser.parse_args()

    start = time.perf_counter()
    rows, costs, found = [], [], []
    for module in kernel_modules():
        costs += module.reference_costs()
        for config in module.launch_configs():
            if args.ci and not config.in_ci:
                continue
            # Progress on stderr: a config that never finishes compiling is named by the last line.
            print(f"{config.jit_fn.__name__} [{config.label}]", end="", file=sys.stderr, flush=True)
            results, config_start = [], time.perf_counter()
            for target in TARGETS:
                try:
                    res = compile_config(config, target)
                except Exception as e:  # a compile error is a finding, not a crash
                    res = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
                results.append(res)
                found += problems(config, target, res)
            print(f" {time.perf_counter() - config_start:.1f} s", file=sys.stderr)
            rows.append((config, results))

    section = version_section(rows, found)
    roofline = roofline_section(costs)
    print(section + "\n" + roofline)
    n_compiles = len(rows) * len(TARGETS)
    print(f"{n_compiles} compiles in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if not args.ci:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        old = REPORT.read_text() if REPORT.exists() else ""
        REPORT.write_text(merged_report(old, triton.__version__, section, roofline))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
