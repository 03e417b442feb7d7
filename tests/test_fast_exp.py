"""Accuracy and special values of the C++ kernels' float32 exp (csrc/fast_exp.h).

tests/fast_exp_check.cpp is compiled with the extension's optimisation and CPU flags (so the
vectorised code path is what runs) and compares every 257th float of [-87.3, 88.7] and every
float near both ends of the range with double exp: at most 2 ulp (the contract in fast_exp.h),
NaN -> NaN, +inf and x > ln(FLT_MAX) -> +inf, -inf and x < -126 ln 2 -> +0, finite normal
results up to FLT_MAX; and fast_exp_nonpositive (the CTMC step's exp for x <= 0): equal to
fast_exp on [-126 ln 2, 0], +0 or a subnormal below, exactly +0 from -104 and for -inf,
NaN -> NaN.
"""
from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> list[str]:
    """The extension's own vector flags (csrc/cpu_flags.py)."""
    return runpy.run_path(str(ROOT / "csrc" / "cpu_flags.py"))["cpu_flags"]()


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_fast_exp_accuracy_and_special_values(tmp_path):
    exe = tmp_path / "fast_exp_check"
    subprocess.run(
        ["g++", "-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
         *_cpu_flags(), f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "fast_exp_check.cpp"),
         "-o", str(exe)],
        check=True, capture_output=True, text=True, timeout=120)
    out = subprocess.run([str(exe), "257"], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    failures = [line for line in out.splitlines() if line.startswith("fail")]
    assert not failures, out
    max_ulp = float(re.search(r"max_ulp (\S+)", out).group(1))
    assert max_ulp <= 2.0, out
