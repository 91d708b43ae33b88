"""The import rules of docs/ARCHITECTURE.md: resnet_core is pure PyTorch; commands import the job
core and libraries, never each other; libraries and the job core import no command."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("ray", "mlflow", "pipelines", "cluster")
# Libraries that run Ray tasks start Ray the commands' way.
LIBRARY_MAY_USE_FROM_JOB = {"pipelines.job.session"}
BENCH_SHARED = "pipelines.bench.common"  # what the benchmark subcommands share


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _commands() -> set[str]:
    """The pipelines modules behind the console scripts, and every benchmark subcommand
    (resnet_core's selfcheck is a library module with a main, not a layer of its own)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {target.partition(":")[0] for target in scripts.values()}
    bench = ROOT / "pipelines" / "bench"
    modules |= {_module(p) for p in bench.glob("*.py") if p.stem not in ("__init__", "__main__")}
    return {m for m in modules if m.startswith("pipelines.")} - {BENCH_SHARED}


def _pipelines_sources() -> dict[str, Path]:
    return {_module(p): p for p in sorted((ROOT / "pipelines").rglob("*.py"))}


def test_resnet_core_sources_import_no_ray_mlflow_or_pipelines():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            {name.split(".")[0] for name in _imports(path)} & set(FORBIDDEN_IN_CORE)
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


def _imported_commands(module: str, path: Path, commands: set[str]) -> set[str]:
    return {
        command
        for name in _imports(path)
        if not name.startswith(BENCH_SHARED)
        for command in commands
        if command != module and (name == command or name.startswith(command + "."))
    }


def test_commands_import_no_other_command():
    commands = _commands()
    assert {"pipelines.train", "pipelines.tune", "pipelines.evaluate", "pipelines.prepare"} <= (
        commands
    )
    offenders = {
        module: sorted(_imported_commands(module, path, commands))
        for module, path in _pipelines_sources().items()
        # The resnet-bench dispatcher loads its subcommands; that is its job.
        if module in commands and module != "pipelines.bench"
    }
    assert {m: found for m, found in offenders.items() if found} == {}


def test_libraries_and_the_job_core_import_no_command_and_libraries_not_the_job_core():
    commands = _commands() | {"pipelines.bench"}
    offenders = {}
    for module, path in _pipelines_sources().items():
        if module in commands or module.startswith("pipelines.bench."):
            continue
        found = _imported_commands(module, path, commands)
        if not module.startswith("pipelines.job"):
            found |= {
                name
                for name in _imports(path)
                if name.startswith("pipelines.job")
                and name not in LIBRARY_MAY_USE_FROM_JOB
                and not any(name.startswith(f"{allowed}.") for allowed in LIBRARY_MAY_USE_FROM_JOB)
            }
        if found:
            offenders[module] = sorted(found)
    assert offenders == {}


def test_the_architecture_page_exists_and_names_every_job_module():
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for path in sorted((ROOT / "pipelines" / "job").glob("*.py")):
        if path.stem != "__init__":
            assert f"`{path.name}`" in page, path.name
