"""Builds the C++ extension in place (``setup.py build_ext --inplace``) with a short progress
report: one line per compiled file with the elapsed time, the full compiler output in a log.

    python tcsm_kernels/_build.py [--jobs N] [--log build/tcsm_build.log]

Run by scripts/env.sh (so by `make test` / `make demo`); run as a file, not with -m, so that
the package itself (which would try to load the extension) is not imported. Exit status: the
build's.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ninja prints "[3/10] c++ ... -c /path/csrc/file.cpp -o ..." as each file finishes
NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] .*? -c (\S+\.cpp) ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--log", default=os.path.join(ROOT, "build", "tcsm_build.log"))
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    # torch's ninja build takes its number of jobs from MAX_JOBS (setup.py's -j does not reach
    # it; ninja's default is cores + 2)
    env = dict(os.environ, MAX_JOBS=str(args.jobs), PYTHONUNBUFFERED="1")
    # the ninja of this Python's environment (pip's ninja package) when it is not on PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    print(f"tcsm_kernels: compiling the C++ extension ({args.jobs} jobs; full log: "
          f"{os.path.relpath(args.log)})", flush=True)
    start = time.monotonic()
    with open(args.log, "w") as log:
        log.write(" ".join(command) + "\n")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            step = NINJA_STEP.match(line)
            if step:
                done, total, source = step.groups()
                print(f"  [{done:>2}/{total}] {os.path.relpath(source, ROOT):<38}"
                      f"{time.monotonic() - start:4.0f} s", flush=True)
            elif " -shared " in line and line.lstrip().startswith(("c++", "g++", "gcc", "x86_64")):
                print(f"  {'linking tcsm_kernels/_C':<45}{time.monotonic() - start:4.0f} s",
                      flush=True)
        status = proc.wait()
    elapsed = time.monotonic() - start
    if status == 0:
        print(f"tcsm_kernels: C++ extension built in {elapsed:.0f} s", flush=True)
    else:
        with open(args.log) as log:
            tail = log.readlines()[-40:]
        sys.stdout.write("".join(tail))
        print(f"tcsm_kernels: the C++ build FAILED after {elapsed:.0f} s (exit {status}); the "
              f"full log is {args.log}. The ops fall back to the slow reference implementation "
              "until it builds.", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
