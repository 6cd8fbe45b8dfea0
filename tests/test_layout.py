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
