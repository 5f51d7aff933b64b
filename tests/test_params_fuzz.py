"""A seeded fuzzer over params.yaml: every mutation is either valid or one clear ParamsError line."""

import copy
import random
import subprocess
import sys

import pytest
import yaml

from tnd.config import parse_params
from tnd.errors import ParamsError

from tests.conftest import ROOT, repo_params

WEIRD_VALUES = [None, -1, 0, -0.5, 1e30, float("nan"), float("inf"), "", "abc", "1e-3", True, [], [1, 2], {}, {"x": 1}]


def leaves(tree: dict, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def mutate(params: dict, rng: random.Random) -> dict:
    mutated = copy.deepcopy(params)
    path = rng.choice(list(leaves(mutated)))
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(["value", "value", "rename", "delete_section", "new_key", "scalar_section"])
    if action == "value":
        parent[path[-1]] = rng.choice(WEIRD_VALUES)
    elif action == "rename":
        name = path[-1]
        parent[name[:-1] + rng.choice("xyz_") if len(name) > 1 else "q"] = parent.pop(name)
    elif action == "delete_section":
        mutated.pop(path[0], None)
    elif action == "new_key":
        parent[f"unknown_{rng.randrange(100)}"] = 1
    else:
        mutated[path[0]] = rng.choice([1, "x", [1]])
    return mutated


def test_250_mutated_params_never_escape_as_anything_but_one_line():
    rng = random.Random(20251125)
    base = repo_params()
    outcomes = {"valid": 0, "error": 0}
    for _ in range(250):
        candidate = mutate(base, rng)
        try:
            parse_params(candidate)
            outcomes["valid"] += 1
        except ParamsError as exc:
            message = str(exc)
            assert message and "\n" not in message and "Traceback" not in message
            outcomes["error"] += 1
    assert outcomes["error"] >= 150  # the fuzzer really produces bad params


@pytest.mark.slow
def test_fuzzed_params_through_a_stage_exit_2_without_traceback(tmp_path):
    rng = random.Random(7)
    base = repo_params()
    checked = 0
    while checked < 3:
        candidate = mutate(base, rng)
        try:
            parse_params(candidate)
            continue
        except ParamsError:
            pass
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(candidate))
        result = subprocess.run(
            [sys.executable, "-m", "stages.train_teacher", "--params", str(path)],
            capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        checked += 1
