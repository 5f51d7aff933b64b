"""Shared fixtures: a project directory with tiny params, so stages run in seconds."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CI machine, large enough that every code path runs.
TINY = {
    "data": {"n_train": 400, "n_valid": 60, "n_eval": 60, "n_prompts": 40, "n_eval_prompts": 16},
    "tokenizer": {"vocab_size": 400},
    "teacher": {
        "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2},
        "eval": {"n_samples": 8, "max_new_tokens": 8},
    },
    "student": {
        "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1},
    },
    "reward": {
        "arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2},
    },
    "tracking": {"enabled": False},
}


# The tiny corpus the trainer tests share: a tokenizer and models on it are built in a second or two.
SENTENCES = [
    "the cat sat on the mat .",
    "a dog runs in the park .",
    "the bird sings a song .",
    "my mom reads a book .",
    "the baby likes the red ball .",
    "we see the big tree .",
    "she eats an apple .",
    "he jumps over the log .",
] * 4


# tnd is imported inside these helpers: this conftest is also loaded for tests/kernels, which need only torch.
def tiny_arch():
    """The shape of the trainer tests' models: one layer, 16 wide."""
    from tnd.config import ArchParams

    return ArchParams(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64)


def tiny_tokenizer():
    """A byte-level BPE on SENTENCES; the same merges every time (also in a test's worker processes)."""
    from tnd.data.tokenizer import train_bpe

    return train_bpe(SENTENCES, vocab_size=300, min_frequency=1)


def tiny_prompts(tokenizer, tokens: int | None = None) -> list[list[int]]:
    """bos + the first `tokens` tokens of each of the first 8 sentences, or (None) of 1 to 3 in turn."""
    out = []
    for i, text in enumerate(SENTENCES[:8]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append([tokenizer.bos_token_id] + ids[: tokens if tokens is not None else 1 + i % 3])
    return out


@pytest.fixture(scope="module")
def tokenizer():
    """tiny_tokenizer(); a test module with a corpus of its own defines its own `tokenizer`."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return tiny_prompts(tokenizer)


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params(**overrides) -> dict:
    return merge(merge(repo_params(), TINY), overrides)


@pytest.fixture(autouse=True)
def no_mlflow_uri_from_elsewhere():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI: keep one test's store (or the
    user's) out of the next test's stages."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project dir (cwd) holding tiny params.yaml; `project.write(**overrides)` rewrites it."""

    class Project:
        path = tmp_path

        def write(self, **overrides) -> Path:
            path = tmp_path / "params.yaml"
            path.write_text(yaml.safe_dump(tiny_params(**overrides), sort_keys=False))
            return path

    monkeypatch.chdir(tmp_path)
    project = Project()
    project.write()
    return project


@pytest.fixture
def dvc_project(tmp_path, monkeypatch):
    """A git+dvc repo holding a copy of the pipeline code, the presets and tiny params (for `dvc repro` tests)."""
    for name in ("tnd", "tnd_kernels", "stages", "params", "dvc.yaml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / name)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    # dvc init keeps it: __pycache__/ stays out of the hashes of code-folder deps (tnd/trainers, tnd_kernels)
    shutil.copy(ROOT / ".dvcignore", tmp_path / ".dvcignore")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    # Stage commands call `python`: make it this interpreter, with the copied code first.
    monkeypatch.setenv("PATH", f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    for env in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(env, "tnd-test")
    for env in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(env, "tnd-test@example.invalid")
    return tmp_path


def dvc(*args: str) -> str:
    """Run dvc in the current directory; fail the test with its output if it fails."""
    result = subprocess.run(["dvc", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def init_git_dvc() -> None:
    """Make the current directory a git + DVC repo (analytics off)."""
    subprocess.run(["git", "init", "-q"], check=True)
    dvc("init", "-q")
    dvc("config", "core.analytics", "false")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: start and leave clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
