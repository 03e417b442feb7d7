"""Builds tcsm_kernels._C, the C++ CPU kernels in csrc/, with torch's cpp_extension (ninja).

The extension is compiled against the torch of the Python that runs this file, and works only
with that torch. Install with `pip install --no-build-isolation .`: pip's default build
isolation would compile it against another torch, downloaded into a throwaway environment, so
torch is deliberately not a build requirement and an isolated build stops with instructions.

Vector code for the build machine's CPU (AVX-512 or AVX2/FMA, csrc/cpu_flags.py; TCSM_PORTABLE=1
for any x86-64). No -ffast-math: the kernels rely on IEEE inf/NaN semantics.
TCSM_NO_EXTENSION=1 installs the Python package alone (scripts/env.sh registers the `tcsm`
command this way after building the extension in place, so pip does not compile it again).
"""
import glob
import os
import runpy
import shutil

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
build_info = runpy.run_path(os.path.join(ROOT, "tcsm_kernels", "_build_info.py"))

NO_TORCH = """
tcsm_kernels: torch is not importable by the Python running this build, most likely because pip
builds in an isolated environment. The C++ extension must be compiled against the torch you will
run it with, so install it with build isolation off, from the environment that has torch:

    pip install --no-build-isolation .       (or: pip install --no-build-isolation -e .)

(that environment also needs setuptools and ninja: pip install -U setuptools ninja).
"""


class BuildPyWithSources(build_py):
    """Also ships csrc/ inside the package (tcsm_kernels/_csrc), for the TCSM_JIT=1 fallback that
    compiles the extension on first import (tcsm_kernels/_jit.py)."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "tcsm_kernels", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for pattern in ("*.cpp", "*.h", "cpu_flags.py"):
            for path in glob.glob(os.path.join(CSRC, pattern)):
                shutil.copy2(path, dest)


class NoTorchBuildExt(build_ext):
    def run(self):
        raise SystemExit(NO_TORCH)


def extension_and_command():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return Extension("tcsm_kernels._C", sources=[]), NoTorchBuildExt
    compile_args = runpy.run_path(os.path.join(CSRC, "cpu_flags.py"))["compile_args"]()
    # The record of the torch version, compiled into the library (relative path: the objects
    # then land inside the build directory).
    info_source = os.path.relpath(
        build_info["write_source"](os.path.join(ROOT, "build", "generated"), torch.__version__),
        ROOT)
    extension = CppExtension(
        "tcsm_kernels._C",
        sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cpp")))
        + [info_source],
        include_dirs=[CSRC],
        # headers too, so that a header change alone rebuilds (ninja then recompiles just the
        # files that include it)
        depends=sorted(glob.glob(os.path.join(CSRC, "*.h"))),
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )
    return extension, BuildExtension.with_options(use_ninja=True)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("TCSM_NO_EXTENSION") != "1":
    extension, cmdclass["build_ext"] = extension_and_command()
    ext_modules.append(extension)

setup(
    packages=find_packages(include=["tcsm_kernels", "tcsm_kernels.*"]),
    package_data={"tcsm_kernels": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
