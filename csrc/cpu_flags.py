"""Vector-ISA compiler flags for the build machine's CPU; setup.py and CMakeLists.txt both use
this (run as a script it prints them).

AVX-512 (F, VL, BW, DQ) when the CPU has it, else AVX2/FMA, else none (portable x86-64/arm).
The kernels are written once in plain loops and the compiler vectorises them for the ISA
chosen here, so the extension runs only on CPUs with the build machine's features:
TCSM_PORTABLE=1 builds for any x86-64.

No debug information (-g0, overriding the -g of Python's own compile flags): for the
torch-binding files most of the compile time goes to the debug information of torch's headers,
and it does not change the generated code. TCSM_DEBUG=1 keeps it (-g), for gdb/perf.
"""
import os
import platform

AVX512 = ("avx512f", "avx512vl", "avx512bw", "avx512dq")


def cpu_flags() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("TCSM_PORTABLE") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as info:
            features = set(info.read().split())
    except OSError:
        return []
    if not {"avx2", "fma"} <= features:
        return []
    flags = ["-mavx2", "-mfma"]
    if set(AVX512) <= features:
        flags += [f"-m{name}" for name in AVX512]
    return flags


def compile_args() -> list[str]:
    """All flags of the C++ kernels' build (setup.py; benchmarks/ab_loss_kernel.py)."""
    debug = "-g" if os.environ.get("TCSM_DEBUG") == "1" else "-g0"
    return ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", debug] + cpu_flags()


if __name__ == "__main__":
    print(";".join(cpu_flags()))
