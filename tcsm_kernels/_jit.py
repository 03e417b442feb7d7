"""The TCSM_JIT=1 fallback: compiles the C++ extension on first import, against the running
torch, with torch.utils.cpp_extension.load (same sources and flags as setup.py), and loads it.

Used only when the prebuilt tcsm_kernels._C is missing or was compiled against another torch,
and only when asked for: compiling takes about a minute of every core, needs a C++ compiler and
Python's headers, and would otherwise start unannounced inside an import (a DataLoader worker,
each rank of a distributed job). Without it the ops run on the reference implementation.

The library is cached per torch version and Python under $TCSM_JIT_CACHE (default
~/.cache/tcsm_kernels/jit); torch rebuilds it there when a source or a flag changes.
"""
from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

import torch

from . import _build_info

NAME = "tcsm_kernels_C"


def source_dir() -> Path | None:
    """csrc/ of a source checkout, else the copy a wheel ships (tcsm_kernels/_csrc)."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if (candidate / "cpu_flags.py").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("TCSM_JIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tcsm_kernels", "jit")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"torch-{torch.__version__}-{python}"


def load() -> str:
    """Compiles (when not cached) and loads the extension, which registers the tcsm::*_cpu ops;
    returns the library's path. Raises RuntimeError with the reason when it cannot."""
    from torch.utils import cpp_extension

    sources = source_dir()
    if sources is None:
        raise RuntimeError("TCSM_JIT=1: the C++ sources are not in this install (neither csrc/ "
                           "beside the package nor tcsm_kernels/_csrc)")
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    compile_args = runpy.run_path(str(sources / "cpu_flags.py"))["compile_args"]()
    files = sorted(str(p) for p in sources.glob("*.cpp"))
    files.append(_build_info.write_source(str(build), torch.__version__))
    library = build / f"{NAME}.so"
    fresh = not library.exists()
    if fresh:
        print(f"tcsm_kernels: TCSM_JIT=1: compiling the C++ extension for torch "
              f"{torch.__version__} into {build} (once per torch version; about a minute)...",
              file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        path = cpp_extension.load(name=NAME, sources=files, extra_cflags=compile_args,
                                  extra_ldflags=["-fopenmp"], extra_include_paths=[str(sources)],
                                  build_directory=str(build), is_python_module=False,
                                  verbose=False)
    except Exception as err:  # compiler missing or failing: report it, fall back
        detail = "\n".join(str(err).strip().splitlines()[-15:])
        raise RuntimeError(f"TCSM_JIT=1: compiling the C++ extension in {build} failed:\n"
                           f"{detail}") from err
    if fresh:
        print(f"tcsm_kernels: TCSM_JIT=1: built in {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)
    return str(path)
