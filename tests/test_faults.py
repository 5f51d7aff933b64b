"""Faults under the real tools: `kill -9` of a running stage, then `dvc repro`, loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import dvc, init_git_dvc, tiny_params
from tests.test_train_ppo import PPO, outputs

pytestmark = pytest.mark.slow

KILL_PPO = {**PPO, "ppo": {**PPO["ppo"], "steps": 10, "save_every": 2}}


def test_kill_9_during_train_ppo_then_dvc_repro_gives_the_uninterrupted_result(dvc_project):
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**KILL_PPO), sort_keys=False))
    init_git_dvc()
    dvc("repro", "train_ppo")
    uninterrupted = outputs(dvc_project)

    checkpoint = dvc_project / "checkpoints/ppo/latest.json"
    checkpoint.unlink()
    process = subprocess.Popen(
        ["dvc", "repro", "--force", "train_ppo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the stage finished before it could be killed: raise ppo.steps"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (dvc_project / "models/student").exists()  # really interrupted mid-training

    log = dvc("repro", "train_ppo")
    assert "Running stage 'train_ppo'" in log
    assert outputs(dvc_project) == uninterrupted


def test_kill_9_while_cache_shards_are_written_leaves_nothing_readable_and_a_rerun_completes(dvc_project):
    from tnd.cache import CacheError, TeacherCache

    many_shards = {"cache": {"n_prompts": 40, "max_new_tokens": 24, "batch_size": 1, "shard_tokens": 8}}
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**many_shards), sort_keys=False))
    init_git_dvc()
    dvc("repro", "cache_teacher_logits")
    cache = dvc_project / "cache/teacher"
    uninterrupted = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert len(uninterrupted) > 10  # index.json + many shards

    process = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "cache_teacher_logits"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if list((dvc_project / "cache").glob(".teacher.*.tmp/shard-*.safetensors")):
            break  # some shards are on disk, the index is not
        time.sleep(0.002)
    assert process.poll() is None, "the stage finished before it could be killed: raise cache.n_prompts"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    with pytest.raises(CacheError):  # DVC removed the old cache before the run; the new one never landed
        TeacherCache(cache)
    for partial in (dvc_project / "cache").glob(".teacher.*.tmp"):
        with pytest.raises(CacheError, match="index.json"):  # nor is the half-written one valid
            TeacherCache(partial)

    # A plain `dvc repro` restores the cache from DVC's own cache; --force reruns the stage beside the debris.
    assert "checking out outputs" in dvc("repro", "cache_teacher_logits")
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == uninterrupted
    assert "Running stage 'cache_teacher_logits'" in dvc("repro", "--force", "--single-item", "cache_teacher_logits")
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == uninterrupted
    assert len(TeacherCache(cache)) == 40
