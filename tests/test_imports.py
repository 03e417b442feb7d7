"""The import graph of tcsm_kernels, read with ast (module-level and function-level imports):
no cycle; the training app (tcsm_kernels.train) is imported by nothing else in the project but
the `python -m tcsm_kernels` entry point; no module of train/ takes another's private name."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "tcsm_kernels"
TRAIN = f"{PACKAGE}.train"
ENTRY_POINT = f"{PACKAGE}.__main__"  # forwards to the CLI


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted((REPO / PACKAGE).rglob("*.py"))}


def imports_of(path: Path, name: str, modules: Set[str]) -> List[Tuple[str, Optional[str]]]:
    """(imported module, imported name or None) for every import statement in the file, at any
    depth; ``from X import y`` names the module X.y when that is a module."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule, None) if submodule in modules
                             else (source, alias.name))
    return found


def top_level_names(path: Path) -> Set[str]:
    """Names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the modules of the package it imports. ``from pkg import name`` where name is
    neither a module nor bound in pkg/__init__.py (a compiled extension such as ``_C``) adds no
    edge."""
    modules = package_modules()
    bound = {name: top_level_names(path) for name, path in modules.items()}
    return {name: {target for target, imported in imports_of(path, name, set(modules))
                   if target in modules and target != name
                   and (imported is None or imported in bound[target])}
            for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve_to_modules():
    graph = import_graph()
    assert f"{TRAIN}.options" in graph[f"{TRAIN}.cli"]
    assert f"{TRAIN}.checkpoint" in graph[f"{TRAIN}.trainer"]  # from . import checkpoint
    assert f"{PACKAGE}.schedules" in graph[f"{TRAIN}.run"]  # from ..schedules import ...


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_only_the_training_app_and_the_entry_point_import_it():
    modules = package_modules()
    scripts = {f"{folder}/{path.name}": path for folder in ("benchmarks", "scripts")
               for path in sorted((REPO / folder).glob("*.py"))}
    outside = {name: path for name, path in modules.items()
               if not (name == TRAIN or name.startswith(TRAIN + "."))
               and name != ENTRY_POINT}
    offenders = [(name, target) for name, path in {**outside, **scripts}.items()
                 for target, _ in imports_of(path, name, set(modules))
                 if target == TRAIN or target.startswith(TRAIN + ".")]
    assert offenders == []


def test_no_private_name_is_imported_across_train_modules():
    modules = package_modules()
    offenders = [(name, f"{source}.{imported}") for name, path in modules.items()
                 if name.startswith(TRAIN)
                 for source, imported in imports_of(path, name, set(modules))
                 if source.startswith(TRAIN) and imported and imported.startswith("_")
                 and imported != "__future__"]
    assert offenders == []


def test_first_eager_calls_do_not_import_the_compiler():
    """Eager calls skip the custom-op dispatch, whose wrapper imports torch._dynamo (~900
    modules, about a second) on the first call of a session."""
    import subprocess
    import sys
    code = """
import sys, torch, tcsm_kernels
z = torch.randn(8, 16, requires_grad=True); y = torch.randint(1, 16, (8,))
tcsm_kernels.fused_tcsm_loss(z, y).backward()
tcsm_kernels.fused_tcsm_loss(z * 1, y, inplace_backward=True).backward()
h = torch.randn(8, 4, requires_grad=True); w = torch.randn(16, 4, requires_grad=True)
tcsm_kernels.fused_linear_tcsm_loss(h, w, y).backward()
tcsm_kernels.topk_concrete_scores(z.detach(), y, 3)
tcsm_kernels.ctmc_step(z.detach(), y, torch.full((8,), 0.5, dtype=torch.float64), mask_id=0)
assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_eager_inplace_backward_still_bumps_the_version_counter():
    """Bypassing the op must keep autograd's check: logits saved by an upstream op (exp saves
    its output) and then overwritten by inplace_backward make backward raise."""
    import pytest
    import torch
    from tcsm_kernels import fused_tcsm_loss
    x = torch.randn(6, 9, requires_grad=True)
    logits = x.exp()
    loss = fused_tcsm_loss(logits, torch.randint(0, 9, (6,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
