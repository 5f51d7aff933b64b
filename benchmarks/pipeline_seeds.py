"""Student vs initial student over several PPO seeds, on a project where `dvc repro` has run.

The upstream stages (data, tokenizer, teacher, reward model, cache) are kept as they are; for
each seed, train_ppo and evaluate run again with only `seed` changed (it drives the student's
warm-up and PPO), from a params file written beside params.yaml. Each seed's metrics/eval.json
is collected; the summary gives mean, min and max per model and metric.

    dvc repro && python benchmarks/pipeline_seeds.py --seeds 1234 1 2
        -> benchmarks/results/pipeline-3-seeds-cpu.json

It overwrites the train_ppo and evaluate outputs (models/student, metrics, plots): run it in a
scratch clone, or `dvc repro` afterwards to restore them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("student", "initial_student")


def run(stage: str, params: Path, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", str(params)], cwd=cwd, check=True)


def summarise(per_seed: dict) -> dict:
    out = {}
    for model in MODELS:
        metrics = sorted(set.intersection(*(set(r[model]) for r in per_seed.values())))
        out[model] = {}
        for name in metrics:
            values = [r[model][name] for r in per_seed.values() if isinstance(r[model][name], (int, float))]
            if values:
                out[model][name] = {"mean": statistics.mean(values), "min": min(values), "max": max(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--project", default=str(ROOT), help="the project directory (default: this checkout)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/pipeline-<n>-seeds-cpu.json")
    args = parser.parse_args()
    project = Path(args.project).resolve()
    if not (project / "metrics" / "eval.json").exists():
        sys.exit(f"{project}: no metrics/eval.json; run `dvc repro` there first")
    base = yaml.safe_load((project / "params.yaml").read_text())
    per_seed, seconds = {}, {}
    # checkpoints belong to one params set: a stale one would be refused (or resumed) by train_ppo
    shutil.rmtree(project / "checkpoints" / "ppo", ignore_errors=True)
    for seed in args.seeds:
        params = project / f".params-seed-{seed}.yaml"
        params.write_text(yaml.safe_dump({**base, "seed": seed}, sort_keys=False))
        started = time.perf_counter()
        try:
            run("train_ppo", params, project)
            run("evaluate", params, project)
        finally:
            params.unlink()
            shutil.rmtree(project / "checkpoints" / "ppo", ignore_errors=True)
        seconds[seed] = time.perf_counter() - started
        report = json.loads((project / "metrics" / "eval.json").read_text())
        per_seed[str(seed)] = {model: report[model] for model in (*MODELS, "teacher") if model in report}
        student = per_seed[str(seed)]["student"]
        print(f"seed {seed}: reward {student['reward']:.2f}, grammaticality {student['grammaticality']}, "
              f"KL {student['kl_to_teacher']:.3f} ({seconds[seed]:.0f} s)", flush=True)
    record = {
        "what": "evaluate on the project's params.yaml: upstream stages once (as `dvc repro` left them), then "
                f"train_ppo + evaluate with seed = {', '.join(map(str, args.seeds))} (the seed drives the student's "
                "warm-up and PPO)",
        "seconds_per_seed": seconds,
        "summary": summarise(per_seed),
        "per_seed": per_seed,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"pipeline-{len(args.seeds)}-seeds-cpu.json"
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
