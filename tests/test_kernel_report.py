"""Every kernel compiles for H100 (sm_90a) and A100 (sm_80) — no GPU needed — in the configs real
training launches (`in_ci`), with no register spill in bf16 and shared memory within each GPU's limit,
under the installed Triton and under triton 3.6, the oldest pyproject.toml allows (registers and
spills differ between Triton versions: their code generation and the ptxas each ships differ).

The Triton interpreter checks the maths but accepts kernels the real compiler rejects or that spill.
This runs `scripts/kernel_report.py --ci` in a fresh process: this one imported triton with
TRITON_INTERPRET=1 (tests/conftest.py), under which @triton.jit builds functions that cannot be compiled.
Triton 3.6 comes from `.triton36/` (scripts/setup_triton36.sh; scripts/test.sh, what CI runs, creates it).
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
TRITON36 = ROOT / ".triton36"


def run_report(triton_dir: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if triton_dir is not None:  # in front of the venv's site-packages: its triton shadows the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_dir), env.get("PYTHONPATH")]))
    script = ROOT / "scripts" / "kernel_report.py"
    try:
        return subprocess.run([sys.executable, script, "--ci"], capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as e:  # an oversized block can unroll into code that takes hours to compile
        stuck = (e.stderr or b"").decode().splitlines()[-1:]
        pytest.fail(f"compiling the CI configs took over 5 minutes; stuck on {stuck}", pytrace=False)


@pytest.mark.slow  # ~30 s of compiling per Triton; the fast set runs every kernel's maths in the interpreter
@pytest.mark.parametrize(
    "triton_dir, version",
    [(None, triton.__version__), (TRITON36, "3.6.0")],
    ids=["installed triton", "triton 3.6.0"],
)
def test_kernels_compile_for_h100_and_a100_without_spills_or_shared_memory_overflow(triton_dir, version):
    if triton_dir is None and not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no NVIDIA backend (ptxas) to compile with")
    if triton_dir is not None and triton.__version__ == version:
        pytest.skip(f"the installed triton is {version}: compiled by the other case")
    if triton_dir is not None and not (triton_dir / "triton").is_dir():
        pytest.skip(f"no {triton_dir.name}/: scripts/setup_triton36.sh installs triton 3.6 (scripts/test.sh runs it)")
    run = run_report(triton_dir)
    assert run.returncode == 0, run.stdout[run.stdout.find("Problems") :] + run.stderr[-3000:]
    assert f"## triton {version} (ptxas " in run.stdout  # the compiler the numbers come from
    assert "| cross_entropy_kernel | bf16 BLOCK=4096 V%16=0 |" in run.stdout


def test_a_run_replaces_its_own_versions_section_and_keeps_the_others(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # importing the script sets it to 0; restored after the test
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    report = importlib.import_module("kernel_report")
    old = report.merged_report("", "3.6.0", "## triton 3.6.0 (ptxas 12.8)\n\nold 3.6 table\n", "## Roofline\n\nold\n")
    old = report.merged_report(old, "3.10.0", "## triton 3.10.0 (ptxas 13.5)\n\n3.10 table\n", "## Roofline\n\nold\n")
    new = report.merged_report(old, "3.6.0", "## triton 3.6.0 (ptxas 12.8)\n\nnew 3.6 table\n", "## Roofline\n\nnew\n")
    assert new.startswith(report.INTRO)
    assert new.count("## triton") == 2 and "old 3.6 table" not in new and "old\n" not in new
    assert (
        new.index("## triton 3.10.0")
        < new.index("## triton 3.6.0")
        < new.index("new 3.6 table")
        < new.index("## Roofline")
    )
    assert new.endswith("## Roofline\n\nnew\n")
