"""The compiler's vectorisation report: every `#pragma omp simd` loop of the C++ kernels is
vectorised with the build's own flags (csrc/cpu_flags.py), in every instantiation. A loop that
stops vectorising (an opaque call, a volatile or aliasing access, a branch the compiler cannot
if-convert) still gives the right numbers, so only this report catches it.

GCC reports a loop with a reduction clause at its pragma, others at the `for` line or the first
statement of the body, so reports within three lines after the pragma belong to it: at least one
"loop vectorized" and no "couldn't vectorize loop" (a template instantiation or inlined copy
left scalar). Each file is compiled once; tcsm_loss.cpp is the slow one."""
from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = ["tcsm_loss.cpp", "ctmc_step.cpp", "topk_scores.cpp", "shard_rows.cpp"]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def loop_reports(source: Path) -> tuple[set[int], set[int]]:
    """Lines of `source` where GCC, with the build's flags, reports a loop vectorised and where it
    reports one it could not vectorise."""
    flags = runpy.run_path(str(CSRC / "cpu_flags.py"))["compile_args"]()
    report = subprocess.run(
        ["g++", *flags, "-I", str(CSRC), "-fopt-info-vec-all", "-c", str(source),
         "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr

    def lines(message: str) -> set[int]:
        pattern = re.compile(rf"{re.escape(source.name)}:(\d+):\d+: {message}")
        return {int(match.group(1)) for match in pattern.finditer(report)}

    return lines("optimized: loop vectorized"), lines("missed: couldn't vectorize loop")


@pytest.mark.parametrize("name", KERNELS)
def test_every_simd_loop_is_vectorised(name):
    source = CSRC / name
    lines = source.read_text().splitlines()
    pragmas = [number for number, line in enumerate(lines, start=1)
               if line.strip().startswith("#pragma omp simd")]
    assert pragmas, f"no `#pragma omp simd` loops in {name}"
    vectorised, scalar = loop_reports(source)
    missed = [p for p in pragmas
              if not vectorised & set(range(p, p + 4)) or scalar & set(range(p, p + 4))]
    assert not missed, (f"{name}: the omp simd loops at lines {missed} are not vectorised "
                        f"everywhere (vectorised: {sorted(vectorised)}, not: {sorted(scalar)})")
