"""The build and install paths: what the package says when its C++ extension is missing or was
compiled against another torch, the torch version the build records, setup.py refusing to build
without the running torch (pip's build isolation), the build driver's progress lines and the
dependency ranges of pyproject.toml.

The missing/mismatched cases run in a subprocess on a copy of the package without the real
extension, so the extension this test session uses is not touched.
"""
from __future__ import annotations

import importlib.machinery
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from tcsm_kernels import _backend

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tcsm_kernels"
BUILD_INFO = runpy.run_path(str(PACKAGE / "_build_info.py"))

# Runs in the subprocess: an editable install of this checkout (`make test`'s .venv) maps
# tcsm_kernels.* to the checkout through a finder on sys.meta_path, which would find the real
# extension for the copy too; dropped so that only the copy on sys.path is seen.
PROBE = textwrap.dedent("""
    import sys, warnings
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    warnings.simplefilter("always")
    import torch
    import tcsm_kernels
    from tcsm_kernels import _backend
    assert _backend.__file__.startswith(sys.argv[1]), _backend.__file__
    print("cpp_available", _backend.cpp_available())
    try:
        _backend.resolve("cpp", torch.device("cpu"), torch.float32)
    except RuntimeError as err:
        print("resolve:", err)
""")


def copy_package(dest: Path) -> Path:
    """The package's Python files under dest/tcsm_kernels, without any built extension."""
    shutil.copytree(PACKAGE, dest / "tcsm_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    return dest


def probe(site: Path, env_extra: dict[str, str] | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "TCSM_JIT": "0",
           "HOME": str(site), **(env_extra or {})}
    result = subprocess.run([sys.executable, "-c", PROBE, str(site)], cwd=site, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_missing_extension_in_a_pip_install_says_how_to_install_it(tmp_path):
    out = probe(copy_package(tmp_path / "site"))
    assert "cpp_available False" in out
    assert "tcsm_kernels._C is not built" in out
    assert "pip install --no-build-isolation ." in out
    assert "TCSM_JIT=1" in out
    assert "circular import" not in out
    assert "make test" not in out  # not a source checkout
    assert "resolve: backend='cpp' requested, but the C++ extension" in out


def test_missing_extension_in_a_source_checkout_says_how_to_build_it(tmp_path):
    checkout = copy_package(tmp_path / "checkout")
    (checkout / "setup.py").write_text("")
    (checkout / "csrc").mkdir()
    out = probe(checkout)
    assert "cpp_available False" in out
    assert "tcsm_kernels._C is not built" in out
    assert f"source checkout {checkout}" in out
    assert "`make test` or `bash scripts/env.sh`" in out
    assert "circular import" not in out


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    site = copy_package(tmp_path / "site")
    # not a loadable library: it must be rejected from its record alone, before any import
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (site / "tcsm_kernels" / f"_C{suffix}").write_bytes(
        b"\x7fELF junk " + BUILD_INFO["MARKER"] + b"1.0.0+old\x00 more junk")
    out = probe(site)
    assert "cpp_available False" in out
    assert f"compiled against torch 1.0.0+old, but torch {torch.__version__} is running" in out
    assert "pip install --no-build-isolation ." in out


@pytest.mark.skipif(not _backend.cpp_available(), reason="the C++ extension is not built")
def test_built_extension_records_the_torch_it_was_compiled_against():
    import tcsm_kernels._C as ext
    assert BUILD_INFO["torch_version_of"](ext.__file__) == torch.__version__


def test_build_info_source_is_rewritten_only_when_it_changes(tmp_path):
    path = Path(BUILD_INFO["write_source"](str(tmp_path), "9.9.9"))
    stamp = path.stat().st_mtime_ns
    assert BUILD_INFO["write_source"](str(tmp_path), "9.9.9") == str(path)
    assert path.stat().st_mtime_ns == stamp
    assert '"TCSM_BUILD_TORCH_VERSION=9.9.9"' in path.read_text()


def test_setup_without_torch_says_to_turn_build_isolation_off(tmp_path):
    """What pip's isolated build (no torch in it) prints: setup.py stops before compiling."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    work = tmp_path / "src"
    work.mkdir()
    shutil.copy(ROOT / "setup.py", work)
    shutil.copytree(ROOT / "csrc", work / "csrc")
    copy_package(work)
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocker.parent)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr
    assert not list((work / "tcsm_kernels").glob("_C*.so"))


def test_build_driver_reports_each_compiled_file():
    step = runpy.run_path(str(PACKAGE / "_build.py"))["NINJA_STEP"]
    line = ("[3/11] c++ -MMD -MF /x/build/temp/csrc/row_lse_op.o.d -O3 -fPIC -I/x/csrc -c "
            "-c /x/csrc/row_lse_op.cpp -o /x/build/temp/csrc/row_lse_op.o -O3 -g0")
    assert step.match(line).groups() == ("3", "11", "/x/csrc/row_lse_op.cpp")


def test_dependencies_admit_the_installed_torch_and_never_build_against_another():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = list(project["project"]["dependencies"])
    for extra in project["project"]["optional-dependencies"].values():
        requirements += extra
    installed = Version(torch.__version__.split("+")[0])
    torch_reqs = [Requirement(r) for r in requirements if re.match(r"torch\b", r)]
    assert torch_reqs, "torch must be an install requirement"
    for req in torch_reqs:
        assert req.specifier.contains(installed, prereleases=True), str(req)
    # a build requirement on torch would make pip's isolated build compile against another one
    assert not [r for r in project["build-system"]["requires"] if re.match(r"torch\b", r)]
