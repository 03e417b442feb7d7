"""In-process A/B of the C++ loss kernel: a git revision's csrc/tcsm_loss.cpp (base) against the
working tree's (new), built into one executable (ab_loss_kernel.cpp) whose timed calls
alternate. On a noisy shared CPU this is the measurement to trust for changes of a few percent.

    python benchmarks/ab_loss_kernel.py BASE_REV ROWS COLS [--rounds R] [--target data|dense]
        [--objective distrib|score] [--divergence kl|is|gkl] [--inplace]

Needs g++ and git; both builds must declare the same csrc/tcsm_loss.h (the LossProblem passed
to both).
"""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSRC = os.path.join(ROOT, "csrc")


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    base_rev, bench_args = sys.argv[1], sys.argv[2:]
    flags = runpy.run_path(os.path.join(CSRC, "cpu_flags.py"))["compile_args"]()
    with tempfile.TemporaryDirectory() as work:
        archive = subprocess.run(["git", "-C", ROOT, "archive", base_rev, "csrc"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
        base_csrc = os.path.join(work, "csrc")
        with open(os.path.join(base_csrc, "tcsm_loss.h")) as base_header, \
                open(os.path.join(CSRC, "tcsm_loss.h")) as new_header:
            if base_header.read() != new_header.read():
                sys.exit(f"csrc/tcsm_loss.h differs between {base_rev} and the working tree: "
                         "the A/B passes one LossProblem to both builds")
        base_obj, new_obj = os.path.join(work, "base.o"), os.path.join(work, "new.o")
        exe = os.path.join(work, "ab_loss_kernel")
        compile_ = ["g++", *flags, "-c"]
        subprocess.run([*compile_, "-I", base_csrc, "-Dtcsm=tcsm_base",
                        os.path.join(base_csrc, "tcsm_loss.cpp"), "-o", base_obj], check=True)
        subprocess.run([*compile_, "-I", CSRC, os.path.join(CSRC, "tcsm_loss.cpp"), "-o", new_obj],
                       check=True)
        subprocess.run(["g++", *flags, "-I", CSRC, os.path.join(HERE, "ab_loss_kernel.cpp"),
                        base_obj, new_obj, "-o", exe], check=True)
        sys.exit(subprocess.run([exe, *bench_args]).returncode)


if __name__ == "__main__":
    main()
