"""What imports without what: the library, the trainer included, without dvc and mlflow (the GPU image has
neither; it gets pydantic from carried wheels), the kernels with torch alone (tests/kernels/test_api.py)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

# The blocked packages look uninstalled: not found by import, nor by importlib.util.find_spec
# (which transformers and accelerate use to probe for optional packages).
BLOCK = r"""
import importlib, importlib.machinery
BLOCKED = {blocked!r}
path_find_spec = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    return None if name.split(".")[0] in BLOCKED else path_find_spec(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
for module in {modules!r}:
    importlib.import_module(module)
"""

LIBRARY = ["tnd.config", "tnd.data.nursery", "tnd.data.tokenizer", "tnd.models", "tnd.cache", "tnd.generation",
           "tnd.batching", "tnd.packing", "tnd.checkpoint", "tnd.numbers", "tnd.evaluation", "tnd.trainers",
           "tnd.trainers.ppo", "tnd.trainers.ppo_math", "tnd.trainers.reward", "tnd.reward",
           "tnd.trainers.lm", "tnd.engine", "tnd_kernels"]


def test_library_imports_without_dvc_and_mlflow():
    code = BLOCK.format(blocked=["dvc", "mlflow"], modules=LIBRARY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_library_module_imports_the_trainers():
    """The trainers sit on top of the library: engine, batching, packing, checkpoint ... never import them."""
    upward = []
    for path in sorted((ROOT / "tnd").rglob("*.py")):
        if "trainers" in path.relative_to(ROOT / "tnd").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            upward += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.startswith("tnd.trainers")]
    assert upward == []
