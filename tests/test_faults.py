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

    checkpoint = dvc_project / "checkpoints/ppo/state.pt"
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
