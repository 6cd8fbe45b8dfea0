"""Repository layout rules that keep Ray jobs working (PLATFORM.md P2, P12): nothing at the repository
root shadows a standard-library module (``ray job submit --working-dir .`` puts the root first on
PYTHONPATH), ``import ray`` works that way, the pure library never imports Ray or MLflow, and no Ray
Train V1 / AIR API is used."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def top_level_module_names() -> set[str]:
    names = set()
    for p in REPO.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix in (".py", ".so", ".pyc"):
            names.add(p.name.split(".")[0])
        elif p.is_dir():
            names.add(p.name)          # namespace packages shadow too, even without __init__.py
    return names


def test_no_top_level_name_shadows_the_standard_library():
    clash = sorted(top_level_module_names() & set(sys.stdlib_module_names))
    assert not clash, f"rename {clash}: with the repo root first on PYTHONPATH they replace stdlib modules"


def test_import_ray_with_the_repo_root_first_on_pythonpath():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import platform, ray, ray.train, ray.tune, mlflow; platform.system(); "
            "import sftok_platform.train, sftok; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def test_the_tokenizer_library_never_imports_ray_or_mlflow():
    offenders = {}
    for path in sorted((REPO / "sftok").rglob("*.py")):
        bad = {m for m in imports_of(path) if m.split(".")[0] in ("ray", "mlflow")}
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, offenders


def test_no_ray_train_v1_or_air_apis():
    banned = ("ray.air", "MLflowLoggerCallback", "checkpoint_frequency", "resume_from_checkpoint")
    offenders = []
    for folder in ("sftok", "sftok_platform", "experiments", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            mods = imports_of(path)
            text = path.read_text()
            for b in banned:
                if any(m == b or m.startswith(b + ".") for m in mods) or (b != "ray.air" and b in text):
                    offenders.append(f"{path.relative_to(REPO)}: {b}")
    assert not offenders, offenders


def _sftok_imports(path: Path, *, top_level: bool) -> set[str]:
    """``sftok.*`` modules that ``path`` imports at module level (or, with ``top_level=False``, inside
    functions and classes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level else [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                                                    ast.AsyncFunctionDef))]
    found = set()
    for top in nodes:
        for node in (ast.walk(top) if not top_level else [top]):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftok.") \
                    and node.module != "sftok.__init__":
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("sftok."))
    return found


def test_the_tokenizer_library_has_no_import_cycles():
    """Every ``sftok`` module imports its ``sftok`` dependencies at the top, and the graph is acyclic (a
    cycle would have to be patched with a function-local import, which this also refuses)."""
    modules = {f"sftok.{p.stem}": p for p in (REPO / "sftok").glob("*.py") if p.stem != "__init__"}
    local = {m: sorted(_sftok_imports(p, top_level=False)) for m, p in modules.items()}
    assert not {m: v for m, v in local.items() if v}, f"function-local sftok imports (cycle patches?): {local}"
    graph = {m: _sftok_imports(p, top_level=True) & set(modules) for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
