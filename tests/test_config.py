"""params.yaml schema: the repository file is valid, and every kind of mistake is one clear line."""

import subprocess
import sys

import pytest
import yaml

from tnd.config import Params, load_params, parse_params
from tnd.errors import ParamsError

from tests.conftest import ROOT, merge, repo_params


def error_for(override: dict) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(merge(repo_params(), override))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "nursery"
    assert params.flat()["ppo.learning_rate"] == params.ppo.learning_rate


def test_unknown_key_names_the_closest_valid_key():
    message = error_for({"ppo": {"learnng_rate": 1e-4}})
    assert "'ppo.learnng_rate'" in message and "'ppo.learning_rate'" in message


def test_unknown_section_names_the_closest_section():
    assert "did you mean 'teacher'" in error_for({"teachr": {}})


def test_unknown_key_far_from_any_lists_the_valid_keys():
    message = error_for({"distill": {"zzzzzz": 1}})
    assert "valid keys here" in message and "temperature" in message


def test_wrong_type_names_key_value_and_type():
    message = error_for({"ppo": {"batch_size": "many"}})
    assert "ppo.batch_size" in message and '"many"' in message and "int > 0" in message


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ({"ppo": {"learning_rate": -1.0}}, "ppo.learning_rate", "> 0"),
        ({"cache": {"temperature": 0}}, "cache.temperature", "> 0"),
        ({"ppo": {"lam": 1.5}}, "ppo.lam", "<= 1"),
        ({"tokenizer": {"vocab_size": 10}}, "tokenizer.vocab_size", ">= 300"),
    ],
)
def test_out_of_range_names_key_value_and_range(override, key, allowed):
    message = error_for(override)
    assert key in message and allowed in message


def test_unknown_choice_lists_the_choices():
    message = error_for({"distill": {"loss": "kl"}})
    assert "distill.loss" in message and "'forward_kl'" in message and "'jsd'" in message


def test_cross_field_rules():
    assert "must not exceed batch_size" in error_for({"ppo": {"mini_batch_size": 64, "batch_size": 32}})
    assert "divisible" in error_for({"ppo": {"batch_size": 30, "mini_batch_size": 8}})
    assert "num_heads" in error_for({"teacher": {"arch": {"hidden_size": 30, "num_heads": 4}}})


def test_empty_invalid_and_missing_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match="empty"):
        load_params(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("ppo: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_fingerprint_is_stable_and_sensitive():
    base = Params()
    assert base.fingerprint() == Params().fingerprint()
    changed = parse_params({"ppo": {"learning_rate": 3e-5}})
    assert changed.fingerprint() != base.fingerprint()


def test_stage_exits_2_with_one_line_and_no_traceback(tmp_path):
    params = repo_params()
    params["ppo"]["cliprange"] = -0.2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "stages.prepare_data", "--params", str(path)],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo.cliprange" in lines[0]
