"""Builds tcsm_kernels._C, the C++ CPU kernels in csrc/, with torch's cpp_extension (ninja).

AVX2/FMA code is generated when the build machine has them, a portable x86-64/arm build
otherwise. No -ffast-math: the kernels rely on IEEE inf/NaN semantics.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def cpu_flags():
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("TCSM_PORTABLE") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as info:
            flags = set(info.read().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


compile_args = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"] + cpu_flags()

setup(
    packages=find_packages(include=["tcsm_kernels", "tcsm_kernels.*"]),
    ext_modules=[
        CppExtension(
            "tcsm_kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
