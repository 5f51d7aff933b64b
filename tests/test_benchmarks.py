"""The benchmark scripts run (smoke sizes): a broken benchmark is found here, not on a GPU day."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_ppo_step_benchmark_smoke(tmp_path):
    out = tmp_path / "ppo_step.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/ppo_step.py", "--smoke", "--no-trl", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    ours = record["results"]["ours"]["throughput"]
    assert ours["update_tok_s"] > 0 and ours["generation_tok_s"] > 0
    assert record["meta"]["ours"]["padding_free"] is True
    assert record["meta"]["student"].startswith("warm-started")
    assert "trl" not in record["results"]


def test_trainer_backends_benchmark_smoke(tmp_path):
    """Triton (interpreted) and torch backends through the whole trainer: the script runs and both agree."""
    out = tmp_path / "backends.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/trainer_backends.py", "--smoke", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"triton", "torch"}
    first = record["per_step"][0]
    assert first["loss/total"]["rel_diff"] < 1e-3 and first["loss/distill"]["rel_diff"] < 1e-3


def test_ddp_sync_benchmark_smoke(tmp_path):
    """Two gloo processes: DDP's synchronised and local backward, a flat and a per-parameter all-reduce."""
    out = tmp_path / "ddp.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/ddp_sync.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["meta"]["backend"] == "gloo" and record["meta"]["tensors"] > 1
    assert record["flat_allreduce_ms"] > 0 and record["per_param_ms"] > 0 and record["step_s"] > 0
