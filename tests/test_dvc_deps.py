"""dvc.yaml's deps cover every project file each stage runs, so editing one reruns the stage.

Each stage is imported in a fresh interpreter (imports made by earlier stages or tests must not
leak in); the project modules it then holds, plus the project modules those import lazily
(inside functions, e.g. `from tnd import plots`), are the code the stage can run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# Run in the fresh interpreter: import the stage, then, to a fixed point, every project module named
# by an import statement at any depth of a loaded project file (TYPE_CHECKING blocks never run, and a
# module-level __getattr__ runs only for a stage that uses it, so both are skipped); print the loaded
# project files. Empty files (bare package markers) hold no code.
PROBE = r"""
import ast, importlib, importlib.util, json, sys
from pathlib import Path

root = Path.cwd().resolve()
packages = {p.parent.name for p in root.glob("*/__init__.py")}

def project_files():
    files = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or not Path(file).is_absolute():  # torch's _ops/_classes carry bare names
            continue
        path = Path(file).resolve()
        if root in path.parents and not {".venv", "site-packages"} & set(path.relative_to(root).parts):
            files[path.relative_to(root).as_posix()] = module
    return files

def imported_names(tree, package):
    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in visit(child))
            return
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and node in tree.body:
            return  # a package's lazy attributes: a stage that uses one loads its module, which is then seen
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
    yield from visit(tree)

importlib.import_module("stages." + sys.argv[1])
done = set()
while True:
    todo = {path: module for path, module in project_files().items() if path not in done}
    if not todo:
        break
    for path, module in todo.items():
        done.add(path)
        package = module.__package__ or module.__name__.rpartition(".")[0]
        for name in imported_names(ast.parse((root / path).read_text()), package):
            if name.split(".")[0] in packages and name not in sys.modules:
                try:
                    found = importlib.util.find_spec(name) is not None
                except ModuleNotFoundError:
                    found = False
                if found:  # not found: a class or function imported from a module, not a module
                    importlib.import_module(name)
print(json.dumps(sorted(path for path in project_files() if (root / path).stat().st_size)))
"""


def covered(path: str, deps: list[str]) -> bool:
    """A dep names the file itself or a directory above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def loaded_files(stage: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, stage], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_stage_is_a_module_and_runs_as_one():
    for name, stage in STAGES.items():
        assert (ROOT / "stages" / f"{name}.py").is_file(), name
        assert stage["cmd"] == f"python -m stages.{name}", name


def test_covered_follows_files_and_directories():
    assert covered("tnd/data/nursery.py", ["tnd/data"]) and covered("tnd/data/nursery.py", ["tnd/data/"])
    assert covered("tnd/models.py", ["tnd/models.py"])
    assert not covered("tnd/data_extra.py", ["tnd/data"]) and not covered("tnd/models.py", ["tnd/trainers"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_cover_every_project_file_the_stage_imports(stage):
    deps = STAGES[stage]["deps"]
    files = loaded_files(stage)
    assert f"stages/{stage}.py" in files and "tnd/config.py" in files  # the probe really saw the stage's imports
    missing = [path for path in files if not covered(path, deps)]
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing}; list them (or a folder above them) in its deps"
    # and no code dep the stage never loads: editing it would rerun the stage for nothing
    code = [dep for dep in deps if dep.split("/")[0] in ("stages", "tnd", "tnd_kernels")]
    unused = [dep for dep in code if not any(covered(path, [dep]) for path in files)]
    assert not unused, f"dvc.yaml stage {stage!r} lists {unused} but never loads them; drop them from its deps"


def test_code_deps_exist():
    # A dep left behind by a rename or a deletion covers nothing.
    for name, stage in STAGES.items():
        code = [dep for dep in stage["deps"] if dep.split("/")[0] in ("stages", "tnd", "tnd_kernels")]
        assert [dep for dep in code if not (ROOT / dep).exists()] == [], name
