"""Builds tcsm_kernels._C, the C++ CPU kernels in csrc/, with torch's cpp_extension (ninja).

Vector code for the build machine's CPU (AVX-512 or AVX2/FMA, csrc/cpu_flags.py; TCSM_PORTABLE=1
for any x86-64). No -ffast-math: the kernels rely on IEEE inf/NaN semantics.
"""
import glob
import os
import runpy

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
compile_args = runpy.run_path(os.path.join(ROOT, "csrc", "cpu_flags.py"))["compile_args"]()

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
