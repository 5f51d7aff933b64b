"""The paper's comparison on the built-in data: the four `tnd.mode`s x several student seeds, for the
default recipe and for the paper's (`preset: tnd_original`, a student from scratch), as queued DVC
experiments.

In a scratch copy of this project (`git archive` of `--rev`, default HEAD: committed code only), for each recipe:

  1. `dvc repro` up to score_rewards (data, tokenizer, teacher, reward model, cache) and a git commit of
     the result, so that every experiment of the recipe reuses those stages;
  2. one queued `dvc exp run` per mode and seed (`-S tnd.mode=<mode> -S student.seed=<seed>`: the seed
     changes the student's initialisation, warm-up and PPO alone), then `dvc queue start -j 1` until
     `dvc queue status` shows them all finished, and `dvc queue stop` (`dvc exp run --run-all` once hung
     after its last experiment: dvc-task's worker monitor died on a JSONDecodeError and never shut it down);
  3. `dvc exp show --json` collects each experiment's metrics/eval.json and metrics/train.json.

The LM-only baseline needs LM steps on the corpus (`tnd.lm_data: corpus`): the paper's recipe has 3 per
step; for the default recipe, which has none, the baseline gets `tnd.lm_steps_per_ppo_step` 1 (it is still
"the same schedule with the PPO part removed", with the least LM training that makes it learn at all).
Tracking (MLflow) is off in the scratch copy, to spend the time on training.

Reported per recipe and mode, mean and [min, max] over seeds: nAoA@0.5 and the mean nAoA over the
thresholds 0.5 ... 0.95 (log10 PPO step, lower is earlier; over the words the fit covers), how many words
the fit covers, and, since a mode that learns fewer words keeps the easier ones, each mode's nAoA@0.5 minus
trials_and_demos' on the words both fit in the same seed; the student's reward, grammaticality, KL to the
teacher and perplexity, and the practice correlation (Spearman of a word's count in the trials with its
final surprisal).

    python benchmarks/tnd_study.py                 # -> benchmarks/results/tnd-study-cpu.json (about 40 min, 2 cores)
    python benchmarks/tnd_study.py --smoke --recipes default --modes trials_and_demos lm_only --seeds 1 \
        --out /tmp/study.json                     # tiny params: proves it runs (about 2 minutes)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
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
MODES = ("trials_and_demos", "trials_only", "demos_only", "lm_only")
RECIPES = {"default": None, "tnd_original": "tnd_original"}  # name -> preset
# The LM-only baseline of a recipe without LM steps (see the module docstring).
LM_ONLY = {"tnd.lm_data": "corpus", "tnd.lm_steps_per_ppo_step": 1}
STUDENT_KEYS = ("reward", "grammaticality", "kl_to_teacher", "perplexity")
WORDS_CSV = "plots/eval_naoa_words.csv"
BASE_MODE = "trials_and_demos"  # the paired comparison's reference
# Tiny sizes for --smoke (merged into params.yaml of the scratch copy).
SMOKE = {
    "data": {"n_train": 400, "n_eval": 60, "n_prompts": 60, "n_eval_prompts": 8},
    "tokenizer": {"vocab_size": 300},
    "teacher": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "train": {"steps": 20, "batch_size": 16, "eval_every": 10, "eval_size": 32}, "eval": {"n_samples": 8}},
    "student": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "train": {"steps": 5, "batch_size": 16, "eval_every": 5, "eval_size": 32}},
    "reward": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
               "train": {"steps": 20, "batch_size": 16, "eval_every": 10, "eval_size": 32}},
    "cache": {"n_prompts": 32, "max_new_tokens": 8, "batch_size": 32},
    "ppo": {"steps": 4, "batch_size": 8, "mini_batch_size": 4, "max_new_tokens": 8, "save_every": 2},
    "tnd": {"demo_batch_size": 4, "lm_batch_size": 8},
    "eval": {"n_prompts": 8, "max_new_tokens": 8},
}


class StudyError(RuntimeError):
    pass


def sh(cwd: Path, *command: str) -> str:
    """Run a command in the scratch project; its output on failure."""
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise StudyError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def scratch_project(workdir: Path, rev: str, smoke: bool) -> Path:
    """This project's code at git revision `rev` in `workdir`, as its own git + DVC repository, tracking off."""
    project = workdir / "project"
    project.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(project)], input=archive, check=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params = merge(params, {"tracking": {"enabled": False}, **(SMOKE if smoke else {})})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(project, "git", "init", "-q")
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=study", "-c", "user.email=study@localhost", "commit", "-qm", "study base")
    return project


def commit(project: Path, message: str) -> None:
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=study", "-c", "user.email=study@localhost", "commit", "-qm", message)


def set_preset(project: Path, preset: str | None) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["preset"] = preset
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def experiment_name(recipe: str, mode: str, seed: int) -> str:
    return f"{recipe}-{mode}-s{seed}".replace("_", "-")


def queue(project: Path, recipe: str, modes: list[str], seeds: list[int], lm_only_extra: dict) -> list[str]:
    names = []
    for mode in modes:
        extra = {"tnd.mode": mode, **(lm_only_extra if mode == "lm_only" else {})}
        for seed in seeds:
            name = experiment_name(recipe, mode, seed)
            sets = [arg for key, value in {**extra, "student.seed": seed}.items() for arg in ("-S", f"{key}={value}")]
            sh(project, "dvc", "exp", "run", "--queue", "-n", name, *sets)
            names.append(name)
    return names


def run_queue(project: Path, names: list[str], poll_seconds: float = 10.0) -> None:
    """One queue worker runs the queued experiments `names`; returns once each has succeeded or failed."""
    # The worker is a daemon that inherits `dvc queue start`'s stdout and stderr: a file, not a pipe, or
    # reading the pipe to its end would wait for the worker to exit.
    log = project / ".dvc" / "tmp" / "queue-start.log"
    with open(log, "w") as out:
        started = subprocess.run(["dvc", "queue", "start", "-j", "1"], cwd=project, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT)
    if started.returncode:
        raise StudyError(f"dvc queue start failed (exit {started.returncode}): see {log}")
    seen, start_by = False, time.monotonic() + 300  # a worker takes seconds to come up; this long is a failure
    while True:
        # `dvc queue status`: one row per task (task, name, created in two words, status), then a line
        # "Worker status: <n> active, <m> idle"
        lines = sh(project, "dvc", "queue", "status").splitlines()
        state = {row[1]: row[-1] for row in map(str.split, lines) if len(row) >= 4 and row[0] != "Worker"}
        if all(state.get(name) in ("Success", "Failed") for name in names):
            break
        no_worker = any(line.startswith("Worker status: 0 active, 0 idle") for line in lines)
        seen = seen or not no_worker
        if no_worker and (seen or time.monotonic() > start_by):
            raise StudyError(f"no queue worker runs, experiments unfinished: see {log} and `dvc queue logs <name>`")
        time.sleep(poll_seconds)
    sh(project, "dvc", "queue", "stop")


def collect(project: Path, names: list[str]) -> dict[str, dict]:
    """name -> {"eval": metrics/eval.json, "train": metrics/train.json} of each finished experiment."""
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json", "--force"))
    found: dict[str, dict] = {}
    for commit_entry in shown:
        for exp in commit_entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name, data = rev.get("name"), rev.get("data") or {}
                if name in names and data.get("metrics"):
                    metrics = data["metrics"]
                    found[name] = {"eval": metrics.get("metrics/eval.json", {}).get("data"),
                                   "train": metrics.get("metrics/train.json", {}).get("data")}
    missing = sorted(set(names) - set(found))
    if missing:
        raise StudyError(f"no metrics for experiment(s) {', '.join(missing)}: see `dvc queue logs <name>` in {project}")
    return found


def word_rows(project: Path, name: str) -> dict[str, dict]:
    """word -> its row of plots/eval_naoa_words.csv (status, t50, ...) in experiment `name`'s commit."""
    refs = sh(project, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    ref = next(r for r in refs if r.rsplit("/", 1)[-1] == name)
    return {row["word"]: row for row in csv.DictReader(io.StringIO(sh(project, "git", "show", f"{ref}:{WORDS_CSV}")))}


def paired_naoa(words: dict[str, dict], base: dict[str, dict]) -> dict:
    """nAoA@0.5 of a mode against the base mode's on the words BOTH fit, in one seed: a mode's own mean
    covers the words it learned, and a mode that learns fewer words keeps the easier ones."""
    common = [w for w, row in words.items() if row["status"] == "fitted" and base.get(w, {}).get("status") == "fitted"]
    diffs = [float(words[w]["t50"]) - float(base[w]["t50"]) for w in common]
    return {"common_words": len(common), "naoa_t50_minus_base": statistics.mean(diffs) if diffs else None}


def figures(result: dict) -> dict:
    """The reported figures of one experiment."""
    evaluation, naoa = result["eval"], result["eval"]["naoa"]["overall"]
    thresholds = [naoa[key] for key in naoa if key.startswith("t") and key[1:].isdigit()]
    out = {"naoa_t50": naoa["t50"],
           "naoa_mean": statistics.mean(thresholds) if None not in thresholds and thresholds else None,
           "words_fitted": naoa["fitted"], "words": naoa["words"],
           "practice_spearman": evaluation.get("practice", {}).get("spearman_surprisal"),
           "train_reward_last10": (result["train"] or {}).get("last10", {}).get("reward")}
    out.update({key: evaluation["student"][key] for key in STUDENT_KEYS})
    return out


def summarise(per_seed: list[dict]) -> dict:
    """mean, min, max over seeds of each figure (None where a seed has none)."""
    out = {}
    for key in per_seed[0]:
        values = [row[key] for row in per_seed if isinstance(row[key], (int, float))]
        out[key] = ({"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}
                    if values else None)
    return out


def table(summary: dict) -> str:
    """The table of docs/results.md: one row per recipe and mode."""
    def cell(entry, digits=2):
        if entry is None:
            return "—"
        return f"{entry['mean']:.{digits}f} [{entry['min']:.{digits}f}, {entry['max']:.{digits}f}]"

    def paired(s):  # the difference and, in parentheses, the mean number of words it covers
        if s["naoa_t50_minus_base"] is None:
            return "—"
        n = s["common_words"]["mean"]
        return f"{cell(s['naoa_t50_minus_base'])} ({n:.0f} words)" if n >= 1 else f"{cell(s['naoa_t50_minus_base'])} ({n:.1f} words)"

    lines = ["| recipe | mode | nAoA@0.5 | mean nAoA | words fitted | nAoA@0.5 minus TnD's, same words | reward | "
             "grammaticality | KL to teacher | perplexity | practice rho |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe, modes in summary.items():
        for mode, s in sorted(modes.items(), key=lambda item: MODES.index(item[0])):
            lines.append(f"| {recipe} | {mode} | {cell(s['naoa_t50'])} | {cell(s['naoa_mean'])} | "
                         f"{cell(s['words_fitted'], 0)} | {paired(s)} | {cell(s['reward'])} | "
                         f"{cell(s['grammaticality'])} | {cell(s['kl_to_teacher'], 3)} | {cell(s['perplexity'])} | "
                         f"{cell(s['practice_spearman'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--smoke", action="store_true", help="tiny params: proves the study runs (figures mean nothing)")
    parser.add_argument("--rev", default="HEAD", help="the code to study: a git revision of this checkout")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one, kept)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/tnd-study-cpu.json (not with --smoke)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tnd-study-"))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's dvc, python
    started = time.perf_counter()
    rev = sh(ROOT, "git", "rev-parse", args.rev).strip()  # once: the checkout may move on while the study runs
    project = scratch_project(workdir, rev, args.smoke)
    print(f"study: scratch project {project}", flush=True)
    runs, summary, seconds = {}, {}, {}
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS / "tnd-study-cpu.json")

    def save(done: list[str]) -> None:
        """The figures so far (after each recipe: a later failure loses nothing finished)."""
        record = {
            "meta": {"seeds": args.seeds, "modes": args.modes, "recipes": args.recipes, "done": done,
                     "smoke": args.smoke, "seconds": {**seconds, "total": time.perf_counter() - started},
                     "lm_only_extra_default": LM_ONLY, "rev": rev,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "project": str(project)},
            "summary": summary,
            "runs": runs,
        }
        if out is not None:
            atomic_write_json(out, record)
            print(f"wrote {out}", flush=True)

    for recipe in args.recipes:
        t0 = time.perf_counter()
        set_preset(project, RECIPES[recipe])
        sh(project, "dvc", "repro", "score_rewards")  # and every stage it needs
        commit(project, f"{recipe}: upstream stages")
        print(f"study: {recipe}: upstream stages in {time.perf_counter() - t0:.0f} s", flush=True)
        lm_only_extra = {} if recipe == "tnd_original" else LM_ONLY
        names = queue(project, recipe, args.modes, args.seeds, lm_only_extra)
        t1 = time.perf_counter()
        run_queue(project, names)
        print(f"study: {recipe}: {len(names)} experiments in {time.perf_counter() - t1:.0f} s", flush=True)
        found = collect(project, names)
        summary[recipe] = {}
        words = {(mode, seed): word_rows(project, experiment_name(recipe, mode, seed))
                 for mode in args.modes for seed in args.seeds}
        for mode in args.modes:
            per_seed = [figures(found[experiment_name(recipe, mode, seed)]) for seed in args.seeds]
            for seed, row in zip(args.seeds, per_seed):
                base = words.get((BASE_MODE, seed))
                row.update(paired_naoa(words[mode, seed], base) if base is not None and mode != BASE_MODE
                           else {"common_words": None, "naoa_t50_minus_base": None})
            runs.update({experiment_name(recipe, mode, seed): row for seed, row in zip(args.seeds, per_seed)})
            summary[recipe][mode] = summarise(per_seed)
            s = summary[recipe][mode]
            print(f"study: {recipe} {mode}: nAoA@0.5 {s['naoa_t50'] and round(s['naoa_t50']['mean'], 3)}, reward "
                  f"{s['reward'] and round(s['reward']['mean'], 2)}", flush=True)
        seconds[recipe] = time.perf_counter() - t0
        save(list(summary))
    print(table(summary))


if __name__ == "__main__":
    try:
        main()
    except StudyError as exc:
        sys.exit(f"error: {exc}")
