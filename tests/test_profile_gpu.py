"""benchmarks/profile_gpu.py --cpu-smoke: the script for a short GPU window runs end to end on CPU, so a broken
profile is found here and not in the GPU minutes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_profile_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "benchmarks/profile_gpu.py", "--cpu-smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(out.read_text())
    assert record["meta"]["smoke"] is True

    static = record["static"]
    if "skipped" not in static:  # a triton without its CUDA backend cannot compile for sm_90
        jsd = static["distill jsd"]["kernels"][0]
        assert jsd["local_bytes"] == 0 and [p["bytes"] for p in jsd["passes"]] == [4, 4, 6]  # three passes, bf16
        topk = static["topk forward_kl"]["kernels"][0]
        assert len(topk["passes"]) == 2
        # the tail recount no longer sets the kernel's registers (it took 80: 3 programs of 8 warps per SM)
        assert topk["programs_per_sm"] >= 5, topk["registers"]

    bench = record["bench"]
    assert [row["op"] for row in bench["shapes"]] == ["distill forward_kl", "distill jsd", "topk forward_kl", "token"]
    assert all(row["parity_rel_err"]["loss"] < 1e-3 and row["parity_rel_err"]["grad"] < 2e-2 for row in bench["shapes"])
    assert len(bench["sweep"]) == 4 * 2
    assert record["ncu"]["skipped"] == "no CUDA device"

    runs = record["trainer"]["runs"]
    assert [run["backend"] for run in runs] == ["triton", "torch", "triton"]
    assert runs[0]["kernel_launches"] and not runs[1]["kernel_launches"]
    # under bf16 autocast the policy's logits reach both backends as float32 (accelerate's output conversion)
    for run in runs[:2]:
        assert f"token_logprobs_entropy(float32, backend={run['backend']})" in run["op_calls"]
