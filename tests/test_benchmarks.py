"""The benchmark scripts run (smoke sizes): a broken benchmark is found here, not on a GPU day."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


@pytest.mark.slow
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


@pytest.mark.slow
def test_run_gpu_script_cpu_smoke():
    """benchmarks/run_gpu.sh --cpu-smoke: the GPU script end to end on CPU at tiny sizes (interpreted kernels):
    every pipeline stage under the gpu_small preset shrunk (without dvc, mlflow or datasets), kernel tests,
    kernel sweep, and the trainer on the Triton and torch backends, which agree."""
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0 and "=== all parts passed" in proc.stdout, proc.stdout[-3000:]
    out = Path(proc.stdout.split("=== log: ")[1].split()[0]).parent
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert pipeline["meta"]["preset"] == "gpu_small" and pipeline["meta"]["smoke"] is True
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert [row["stage"] for row in pipeline["stages"]] == stages
    assert all(row["exit_code"] == 0 and row["run_s"] > 0 and row["process_s"] >= row["run_s"]
               for row in pipeline["stages"])
    assert pipeline["summary"]["failed"] == [] and pipeline["summary"]["peak_gpu_bytes_max"] is None  # CPU
    assert set(json.loads((out / "kernels.json").read_text())) >= {"meta"}
    record = json.loads((out / "backends.json").read_text())
    assert set(record["results"]) == {"triton", "torch"}
    first = record["per_step"][0]
    assert first["loss/total"]["rel_diff"] < 1e-3 and first["loss/distill"]["rel_diff"] < 1e-3
    # on CPU a step after load_checkpoint repeats the step after save_checkpoint exactly
    assert [record["results"][b]["checkpoint_roundtrip_max_rel_diff"] for b in ("triton", "torch")] == [0.0, 0.0]


@pytest.mark.slow
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


@pytest.mark.slow
def test_cache_format_benchmark_smoke(tmp_path):
    """Bytes per token of the old and new layouts at both vocabularies, the reconstruction KL of a 32k-style
    teacher (tiny here), and the bytes-vs-quality curve (one end-to-end setting) come out of the script."""
    out = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/cache_format.py", "--smoke", "--project", str(tmp_path), "--out", str(out),
         "--e2e", "sampled S=4", "--seeds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    sizes = {(row["vocab"], row["format"]): row["bytes_per_token"] for row in record["bytes_per_token"]}
    assert set(sizes) == {(v, f) for v in (32000, 128256) for f in ("v2", "v3-compact", "v3-float16")}
    assert sizes[(128256, "v2")] > 770 and sizes[(128256, "v3-compact")] < sizes[(128256, "v2")] / 2
    teacher = record["reconstruction"][-1]
    assert teacher["rows"] > 0 and set(teacher["kl"]) == {"compact", "float16", "bfloat16"}
    assert all(stats["mean"] >= 0 for stats in teacher["kl"].values())
    curve = record["curve"]
    for vocab in ("32000", "128256"):
        row = curve["bytes_per_token"][vocab]
        assert set(row) == {f"topk_tail k={k}" for k in (8, 32, 64, 128)} | {f"sampled S={s}" for s in (4, 12, 32)}
        assert row["sampled S=4"] < row["sampled S=12"] < row["sampled S=32"] < row["topk_tail k=128"]
    assert curve["teacher_32k"]["sampled S=12"]["kl_stored_from_teacher"] is None  # infinite: not defined
    (run,) = curve["end_to_end"]["runs"]
    assert run["setting"] == "sampled S=4" and math.isfinite(run["kl_to_teacher"]) and run["bytes_per_token"] > 0


@pytest.mark.slow
def test_tnd_study_smoke(tmp_path):
    """The study as queued DVC experiments, on HEAD's code at tiny sizes: two arms, one seed; then --collect
    reads the same figures back from its scratch project."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("the study archives a git revision of the checkout; this copy is not a git checkout")
    out = tmp_path / "study.json"
    common = ["--smoke", "--recipes", "default", "--arms", "trials_and_demos", "lm_on_rollout", "--seeds", "1"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/tnd_study.py", *common, "--steps", "4", "--workdir", str(tmp_path / "work"),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(out.read_text())
    assert set(record["runs"]) == {"default-trials-and-demos-s1", "default-lm-on-rollout-s1"}
    assert record["meta"]["missing"] == {"default": []}
    for arm in ("trials_and_demos", "lm_on_rollout"):
        summary = record["summary"]["default"][arm]
        assert summary["perplexity"]["n"] == 1 and summary["perplexity"]["mean"] > 1
        assert summary["seconds_per_step"]["mean"] > 0 and summary["words_acquired"]["n"] == 1
        vocabulary = record["curves"]["default"][arm]["vocabulary"]
        assert [x for x, _ in vocabulary][0] == 0 and len(vocabulary) >= 3  # step 0 and the paper's snapshots
    assert "| default | lm_on_rollout |" in proc.stdout
    assert record["runs"]["default-trials-and-demos-s1"]["naoa_t50_minus_base"] is None  # the base itself
    assert isinstance(record["runs"]["default-lm-on-rollout-s1"]["common_words"], int)
    for kind in ("vocabulary", "grammaticality"):
        assert (tmp_path / f"study-default-{kind}.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again.json"
    proc = subprocess.run([sys.executable, "benchmarks/tnd_study.py", *common, "--collect", str(tmp_path / "work"),
                           "--out", str(again)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads(again.read_text())["runs"] == record["runs"]


def test_tnd_study_pairs_words_both_modes_fit():
    """A mode's nAoA against the base's on the words both fit, whatever else each learned."""
    from benchmarks import tnd_study

    def rows(**t50):
        return {w: {"status": "fitted" if t is not None else "not_learned", "t50": "" if t is None else str(t)}
                for w, t in t50.items()}

    base = rows(cat=1.0, dog=2.0, sun=None, hat=1.5)
    mode = rows(cat=1.5, dog=2.0, sun=0.5, hat=None, cup=0.1)  # sun, hat, cup: fitted by one side only
    assert tnd_study.paired_naoa(mode, base) == {"common_words": 2, "naoa_t50_minus_base": 0.25}
    assert tnd_study.paired_naoa(rows(sun=1.0), base) == {"common_words": 0, "naoa_t50_minus_base": None}
