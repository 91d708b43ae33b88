"""The dependency direction of DESIGN.md: resnet_core is pure PyTorch and never reaches Ray or MLflow."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("ray", "mlflow", "pipelines", "cluster")


def _imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_resnet_core_sources_import_no_ray_mlflow_or_pipelines():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            _imported_top_level_modules(path) & set(FORBIDDEN_IN_CORE)
        )
        for path in sorted((ROOT / "resnet_core").rglob("*.py"))
    }
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert offenders == {}


def test_importing_every_resnet_core_module_loads_neither_ray_nor_mlflow():
    modules = sorted(
        "resnet_core." + p.stem for p in (ROOT / "resnet_core").glob("*.py") if p.stem != "__init__"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
