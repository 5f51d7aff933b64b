"""The whole pipeline under a preset (default gpu_small), stage by stage, each stage in its own process: its
wall time and peak GPU memory -> benchmarks/results/gpu-pipeline-<gpu>.json. A part of benchmarks/run_gpu.sh.

    python benchmarks/gpu_pipeline.py                                 # CUDA: params/gpu_small.yaml as it is
    python benchmarks/gpu_pipeline.py --smoke --out /tmp/pipeline.json    # CPU: the preset shrunk; proves it runs

The stages run in a fresh project directory (temporary unless --workdir): its params.yaml holds only
`preset: <--preset>`, `tracking.enabled: false` and, with --smoke, the SMOKE keys (which override the preset as
any key of params.yaml does), and params/ is copied beside it. So the preset is applied by load_params as under
`dvc repro`, without DVC, and the repository's own pipeline outputs are left alone. Each stage runs in a child
process (`--stage NAME`) in which dvc, mlflow and datasets cannot be imported, as on the GPU image, so a stage
that needs one fails here too. The child resets CUDA's peak memory statistics, runs `stages.<name>.main([])` and
writes its record (seconds to import the stage and start CUDA, seconds to run it, torch.cuda.max_memory_allocated,
exit code); the parent adds the process's seconds and rewrites the results file after every stage, so a run
stopped by its time limit keeps the stages it finished. Stages run in dvc.yaml's order; the first to fail ends
the run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tnd.io import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ABSENT = ("dvc", "mlflow", "datasets")  # not on the GPU image
BUDGET_S = 300  # what params/gpu_small.yaml is sized for
# --smoke: tiny models and data, the preset's other keys kept (its padded vocabulary, bf16, lengths). Every
# value differs from the schema's default, or it would not override the preset (tnd.config.parse_params).
SMOKE = {
    "data": {"n_train": 400, "n_eval": 60, "n_prompts": 40, "n_eval_prompts": 16},
    "tokenizer": {"vocab_size": 400, "pad_vocab_to": 512},
    "teacher": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2}, "eval": {"n_samples": 8, "max_new_tokens": 8}},
    "student": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
                "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1}},
    "reward": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
               "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2}},
    "cache": {"n_prompts": 16, "max_new_tokens": 8, "batch_size": 16, "chunk_tokens": 64},
    "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 8, "save_every": 1},
    "tnd": {"demo_batch_size": 4},
    "eval": {"n_prompts": 8, "max_new_tokens": 8, "batch_size": 16},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpu_small", help="a file of params/ without .yaml (default: gpu_small)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (SMOKE), for a CPU: proves the script runs")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu-pipeline-<gpu>.json)")
    p.add_argument("--workdir", default=None, help="project directory to run in, kept (default: a temporary one)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # child mode: run this stage, write --record
    p.add_argument("--record", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def hide_absent_packages() -> None:
    """Make ABSENT look uninstalled to import and to importlib.util.find_spec (which transformers and accelerate
    use to probe for optional packages), as on the GPU image."""
    find_spec = importlib.machinery.PathFinder.find_spec

    def without_absent(name, path=None, target=None):
        return None if name.split(".")[0] in ABSENT else find_spec(name, path, target)

    importlib.machinery.PathFinder.find_spec = staticmethod(without_absent)


def run_stage(name: str, record: Path) -> int:
    """Child mode: import and run stage `name` in this directory, write its record, return its exit code."""
    hide_absent_packages()
    started = time.perf_counter()
    module = importlib.import_module(f"stages.{name}")
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    imported = time.perf_counter()
    code = 0
    try:
        module.main([])
    except SystemExit as exc:  # a stage's own exit: 2 bad input, 3 environment
        code = exc.code if isinstance(exc.code, int) else 1
    row = {"stage": name, "exit_code": code, "import_s": round(imported - started, 3),
           "run_s": round(time.perf_counter() - imported, 3),
           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    atomic_write_json(record, row)
    return code


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_project(work: Path, preset: str, smoke: bool) -> None:
    shutil.copytree(ROOT / "params", work / "params", dirs_exist_ok=True)
    params = {"preset": preset, "tracking": {"enabled": False}, **(SMOKE if smoke else {})}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def results(meta: dict, rows: list[dict]) -> dict:
    failed = [row["stage"] for row in rows if row["exit_code"]]
    total = sum(row["process_s"] for row in rows)
    peaks = [row["peak_gpu_bytes"] for row in rows if row.get("peak_gpu_bytes") is not None]
    summary = {"stages_run": len(rows), "failed": failed, "total_s": round(total, 1),
               "peak_gpu_bytes_max": max(peaks) if peaks else None}
    if not meta["smoke"]:
        summary.update(budget_s=BUDGET_S, within_budget=not failed and total <= BUDGET_S)
    return {"meta": meta, "stages": rows, "summary": summary}


def main() -> int:
    args = parse_args()
    if args.stage:
        return run_stage(args.stage, Path(args.record))
    try:
        import pydantic  # noqa: F401  (tnd.config's schema; the GPU image has it only from .whl/)
    except ImportError:
        print("gpu_pipeline: pydantic is not importable; on the GPU image, put its wheels in .whl/ "
              "(benchmarks/README.md, 'Wheels for the GPU image') and run benchmarks/run_gpu.sh", file=sys.stderr)
        return 2
    import torch
    import transformers

    device = device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"gpu-pipeline-{slug}.json"
    meta = {"preset": args.preset, "smoke": args.smoke, "smoke_overrides": SMOKE if args.smoke else None,
            "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": ("SMOKE RUN on CPU at tiny sizes: proves the pipeline runs; the numbers are not measurements"
                     if args.smoke else f"every stage of dvc.yaml under params/{args.preset}.yaml, tracking off")}
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as scratch:
        work = Path(args.workdir or scratch).resolve()
        work.mkdir(parents=True, exist_ok=True)
        write_project(work, args.preset, args.smoke)
        print(f"gpu_pipeline: preset {args.preset}{' (smoke)' if args.smoke else ''} on {device} in {work}", flush=True)
        for name in stages:
            record = Path(scratch) / f"{name}.json"
            started = time.perf_counter()
            code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stage", name,
                                   "--record", str(record)], cwd=work, env=env).returncode
            row = json.loads(record.read_text()) if record.is_file() else {"stage": name}
            row.update(exit_code=code, process_s=round(time.perf_counter() - started, 3))
            rows.append(row)
            peak = row.get("peak_gpu_bytes")
            print(f"gpu_pipeline: {json.dumps(row)}"
                  + (f"  [{row['process_s']:.1f}s, peak {peak / 2**20:.0f} MiB]" if peak is not None else ""), flush=True)
            atomic_write_json(out, results(meta, rows))
            if code:
                break
    summary = results(meta, rows)["summary"]
    print(f"gpu_pipeline: {json.dumps(summary)}\nwrote {out}", flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
