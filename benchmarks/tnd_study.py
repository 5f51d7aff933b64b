"""The paper's comparison on the built-in data, on one yardstick: the study's arms (the `tnd.mode`s, and the
trial rewards of on-policy distillation) x several student seeds, for the default recipe and for the paper's
(`preset: tnd_original`, a student from scratch), as queued DVC experiments.

The arms (`ARMS`): lm_only (the paper's baseline: LM steps on the corpus), lm_on_rollout (the paper's control:
trials_and_demos with the PPO update replaced by an LM update on the same texts), trials_only, demos_only,
trials_and_demos, each with the reward model's trial reward; and trials_only+teacher (on-policy distillation:
the teacher's per-token log-ratio as the reward), trials_and_demos+teacher and trials_and_demos+both (reward
model + teacher). nAoA is on the shared scale (eval.naoa_scale: shared: each word's way from chance to the
teacher's surprisal, the same anchors in every arm and seed), in log10 student updates (PPO and LM optimizer
steps, as the paper counts them).

In a scratch copy of this project (`git archive` of `--rev`, default HEAD: committed code only), for each recipe:

  1. `dvc repro` up to score_rewards (data, tokenizer, teacher, reward model, cache) and a git commit of
     the result, so that every experiment of the recipe reuses those stages;
  2. one queued `dvc exp run` per arm and seed (`-S tnd.mode=<mode> ... -S student.seed=<seed>`: the seed
     changes the student's initialisation, warm-up and PPO alone), seed by seed (all arms of seed 1 first, so
     a study stopped early has whole seeds), then `dvc queue start -j <jobs>` until `dvc queue status` shows
     them all finished, and `dvc queue stop` (`dvc exp run --run-all` once hung after its last experiment:
     dvc-task's worker monitor died on a JSONDecodeError and never shut it down);
  3. `dvc exp show --json` collects each experiment's metrics/eval.json and metrics/train.json, and `git show`
     its plots (the effective vocabulary and the trials' grammaticality over the student's updates).

`--collect WORKDIR` collects what a study in WORKDIR has finished (e.g. one stopped early: `dvc queue kill`),
and names the experiments that had not.

The LM-only baseline needs LM steps on the corpus (`tnd.lm_data: corpus`): the paper's recipe has 3 per
step; for the default recipe, which has none, the baseline gets `tnd.lm_steps_per_ppo_step` 1 (it is still
"the same schedule with the PPO part removed", with the least LM training that makes it learn at all).
Tracking (MLflow) is off in the scratch copy, to spend the time on training; each queue worker runs with one
thread (OMP_NUM_THREADS=1), so `--jobs` workers share the cores.

Reported per recipe and arm, mean and [min, max] over seeds: grammaticality of the student's free samples on
the eval prompts, nAoA@0.5 and the mean nAoA over the thresholds 0.5 ... 0.95 (log10 student update, lower
is earlier; over the words the fit covers), the words acquired (half-way from chance to the teacher at the
end), and, since an arm that learns fewer words keeps the easier ones, each arm's nAoA@0.5 minus
trials_and_demos' on the words both fit in the same seed; the student's reward, KL to the teacher and
perplexity, the practice correlation (Spearman of a word's count in the trials with its final surprisal), and
the wall-clock seconds per PPO step. Figures: the effective vocabulary and the trials' grammaticality against
the student's updates, one line per arm (mean over seeds), beside the JSON.

    python benchmarks/tnd_study.py --recipes default --steps 500 --jobs 2   # -> benchmarks/results/tnd-study-cpu.json
    python benchmarks/tnd_study.py --smoke --recipes default --arms trials_and_demos lm_only --seeds 1 \
        --out /tmp/study.json                     # tiny params: proves it runs (about 2 minutes)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tnd.io import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# arm -> its params (besides the seed)
ARMS = {
    "trials_and_demos": {"tnd.mode": "trials_and_demos"},
    "trials_only": {"tnd.mode": "trials_only"},
    "demos_only": {"tnd.mode": "demos_only"},
    "lm_on_rollout": {"tnd.mode": "lm_on_rollout"},
    "lm_only": {"tnd.mode": "lm_only"},
    "trials_only+teacher": {"tnd.mode": "trials_only", "tnd.trial_reward": "teacher"},
    "trials_and_demos+teacher": {"tnd.mode": "trials_and_demos", "tnd.trial_reward": "teacher"},
    "trials_and_demos+both": {"tnd.mode": "trials_and_demos", "tnd.trial_reward": "both"},
}
RECIPES = {"default": None, "tnd_original": "tnd_original"}  # name -> preset
# The LM-only baseline of a recipe without LM steps (see the module docstring).
LM_ONLY = {"tnd.lm_data": "corpus", "tnd.lm_steps_per_ppo_step": 1}
STUDENT_KEYS = ("reward", "grammaticality", "kl_to_teacher", "perplexity")
WORDS_CSV = "plots/eval_naoa_words.csv"
CURVE_CSV = "plots/eval_word_curve.csv"
TRAIN_CSV = "plots/train.csv"
BASE_ARM = "trials_and_demos"  # the paired comparison's reference
SMOOTH = 10  # steps in the moving mean of the trials' grammaticality (32 trials a step are noisy)
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


def experiment_name(recipe: str, arm: str, seed: int) -> str:
    return f"{recipe}-{arm}-s{seed}".replace("_", "-").replace("+", "-")


def queue(project: Path, recipe: str, arms: list[str], seeds: list[int], extra: dict) -> list[str]:
    """Queue every arm x seed, seed by seed; `extra`: params every experiment of the recipe gets."""
    names = []
    for seed in seeds:
        for arm in arms:
            sets = {**ARMS[arm], **(LM_ONLY if arm == "lm_only" and recipe != "tnd_original" else {}), **extra,
                    "student.seed": seed}
            name = experiment_name(recipe, arm, seed)
            sh(project, "dvc", "exp", "run", "--queue", "-n", name,
               *[arg for key, value in sets.items() for arg in ("-S", f"{key}={value}")])
            names.append(name)
    return names


def run_queue(project: Path, names: list[str], jobs: int, poll_seconds: float = 10.0) -> None:
    """`jobs` queue workers run the queued experiments `names`; returns once each has succeeded or failed."""
    # The worker is a daemon that inherits `dvc queue start`'s stdout and stderr: a file, not a pipe, or
    # reading the pipe to its end would wait for the worker to exit.
    log = project / ".dvc" / "tmp" / "queue-start.log"
    with open(log, "w") as out:
        started = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=project, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if started.returncode:
        raise StudyError(f"dvc queue start failed (exit {started.returncode}): see {log}")
    seen, start_by = False, time.monotonic() + 600  # a worker takes seconds to come up; this long is a failure
    idle_polls = 0  # on a loaded machine the status can show no worker for a poll while one hands over
    while True:
        # `dvc queue status`: one row per task (task, name, created in two words, status), then a line
        # "Worker status: <n> active, <m> idle"
        lines = sh(project, "dvc", "queue", "status").splitlines()
        state = {row[1]: row[-1] for row in map(str.split, lines) if len(row) >= 4 and row[0] != "Worker"}
        if all(state.get(name) in ("Success", "Failed") for name in names):
            break
        no_worker = any(line.startswith("Worker status: 0 active, 0 idle") for line in lines)
        seen = seen or not no_worker
        idle_polls = idle_polls + 1 if no_worker else 0
        if idle_polls >= 3 and (seen or time.monotonic() > start_by):
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
    return found


def experiment_csv(project: Path, name: str, path: str) -> list[dict]:
    """The rows of the CSV file `path` in experiment `name`'s commit."""
    refs = sh(project, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    ref = next(r for r in refs if r.rsplit("/", 1)[-1] == name)
    return list(csv.DictReader(io.StringIO(sh(project, "git", "show", f"{ref}:{path}"))))


def word_rows(project: Path, name: str) -> dict[str, dict]:
    """word -> its row of plots/eval_naoa_words.csv (status, t50, ...) in experiment `name`'s commit."""
    return {row["word"]: row for row in experiment_csv(project, name, WORDS_CSV)}


def _float(cell: str) -> float:
    return float(cell) if cell not in ("", None) else math.nan


def curves(project: Path, name: str) -> dict[str, list]:
    """An experiment's curves against the student's updates: "vocabulary" [(updates, words acquired)] at each
    snapshot, "grammaticality" [(updates, the trials' grammaticality, a moving mean over SMOOTH steps)]."""
    vocabulary = [(int(row["updates"]), int(row["vocabulary"])) for row in experiment_csv(project, name, CURVE_CSV)]
    train = experiment_csv(project, name, TRAIN_CSV)
    values = [_float(row.get("trials/grammaticality")) for row in train]
    smooth = []
    for i, row in enumerate(train):
        window = [v for v in values[max(0, i - SMOOTH + 1): i + 1] if math.isfinite(v)]
        smooth.append((int(_float(row["student/updates"])), statistics.mean(window) if window else None))
    return {"vocabulary": vocabulary, "grammaticality": smooth}


def mean_curve(per_seed: list[list]) -> list[tuple]:
    """The mean over seeds, point by point (the seeds of an arm share its steps), at the first seed's x."""
    n = min(map(len, per_seed))
    out = []
    for i in range(n):
        ys = [c[i][1] for c in per_seed if c[i][1] is not None]
        out.append((per_seed[0][i][0], statistics.mean(ys) if ys else None))
    return out


def plot_curves(by_arm: dict[str, dict[str, list]], out: Path) -> list[Path]:
    """tnd-study-<recipe>-vocabulary.png and -grammaticality.png beside the JSON: one line per arm."""
    from tnd import plots

    made = [plots.effective_vocabulary({arm: c["vocabulary"] for arm, c in by_arm.items()},
                                       out.with_name(f"{out.stem}-vocabulary.png")),
            plots.curves_by_mode({arm: c["grammaticality"] for arm, c in by_arm.items()},
                                 "grammaticality of the trials", "the student's free samples as it trains",
                                 out.with_name(f"{out.stem}-grammaticality.png"))]
    return [p for p in made if p is not None]


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
    train = result["train"] or {}
    out = {"naoa_t50": naoa.get("t50"),
           "naoa_mean": statistics.mean(thresholds) if None not in thresholds and thresholds else None,
           "words_fitted": naoa.get("fitted"), "words": naoa.get("words"),
           "words_acquired": result["eval"]["naoa"].get("acquired"),
           "practice_spearman": evaluation.get("practice", {}).get("spearman_surprisal"),
           "train_reward_last10": train.get("last10", {}).get("reward"),
           "seconds_per_step": train["total_seconds"] / train["steps"] if train.get("steps") else None}
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

    lines = ["| recipe | arm | grammaticality | nAoA@0.5 | mean nAoA | words acquired | words fitted | "
             "nAoA@0.5 minus TnD's, same words | KL to teacher | perplexity | reward | practice rho | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe, arms in summary.items():
        for arm, s in sorted(arms.items(), key=lambda item: list(ARMS).index(item[0])):
            lines.append(f"| {recipe} | {arm} | {cell(s['grammaticality'])} | {cell(s['naoa_t50'])} | "
                         f"{cell(s['naoa_mean'])} | {cell(s['words_acquired'], 0)} | {cell(s['words_fitted'], 0)} | "
                         f"{paired(s)} | {cell(s['kl_to_teacher'], 3)} | {cell(s['perplexity'])} | "
                         f"{cell(s['reward'])} | {cell(s['practice_spearman'])} | {cell(s['seconds_per_step'])} |")
    return "\n".join(lines)


def report(project: Path, recipe: str, arms: list[str], seeds: list[int], out: Optional[Path]) -> tuple[dict, dict, dict]:
    """(summary per arm, figures per run, which experiments had no metrics) of a recipe's finished experiments,
    and its figures beside `out`."""
    names = [experiment_name(recipe, arm, seed) for seed in seeds for arm in arms]
    found = collect(project, names)
    missing = sorted(set(names) - set(found))
    runs, summary, by_arm = {}, {}, {}
    words = {(arm, seed): word_rows(project, experiment_name(recipe, arm, seed))
             for arm in arms for seed in seeds if experiment_name(recipe, arm, seed) in found}
    for arm in arms:
        done = [seed for seed in seeds if (arm, seed) in words]
        if not done:
            continue
        per_seed = [figures(found[experiment_name(recipe, arm, seed)]) for seed in done]
        for seed, row in zip(done, per_seed):
            base = words.get((BASE_ARM, seed))
            row.update(paired_naoa(words[arm, seed], base) if base is not None and arm != BASE_ARM
                       else {"common_words": None, "naoa_t50_minus_base": None})
        runs.update({experiment_name(recipe, arm, seed): row for seed, row in zip(done, per_seed)})
        summary[arm] = summarise(per_seed)
        seed_curves = [curves(project, experiment_name(recipe, arm, seed)) for seed in done]
        by_arm[arm] = {key: mean_curve([c[key] for c in seed_curves]) for key in ("vocabulary", "grammaticality")}
        s = summary[arm]
        print(f"study: {recipe} {arm} ({len(done)} seeds): grammaticality "
              f"{s['grammaticality'] and round(s['grammaticality']['mean'], 3)}, nAoA@0.5 "
              f"{s['naoa_t50'] and round(s['naoa_t50']['mean'], 3)}, KL {round(s['kl_to_teacher']['mean'], 3)}",
              flush=True)
    if out is not None and by_arm:
        plot_curves(by_arm, out.with_name(f"{out.stem}-{recipe}.json"))
    return summary, runs, {"missing": missing, "curves": by_arm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="ppo.steps of every experiment (default: the recipe's)")
    parser.add_argument("--jobs", type=int, default=1, help="queue workers (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="tiny params: proves the study runs (figures mean nothing)")
    parser.add_argument("--rev", default="HEAD", help="the code to study: a git revision of this checkout")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new temporary one, kept)")
    parser.add_argument("--collect", default=None, metavar="WORKDIR",
                        help="only collect the finished experiments of the study in WORKDIR")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/tnd-study-cpu.json (not with --smoke)")
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's dvc, python
    started = time.perf_counter()
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS / "tnd-study-cpu.json")
    if args.collect:
        project = Path(args.collect) / "project"
        rev = json.loads((project / "study.json").read_text())["rev"]
    else:
        rev = sh(ROOT, "git", "rev-parse", args.rev).strip()  # once: the checkout may move on while the study runs
        project = scratch_project(Path(args.workdir or tempfile.mkdtemp(prefix="tnd-study-")), rev, args.smoke)
        atomic_write_json(project / "study.json", {"rev": rev})
    print(f"study: scratch project {project}", flush=True)
    runs, summary, seconds, missing, curves_ = {}, {}, {}, {}, {}
    extra = {} if args.steps is None else {"ppo.steps": args.steps}

    def save(done: list[str]) -> None:
        """The figures so far (after each recipe: a later failure loses nothing finished)."""
        record = {
            "meta": {"seeds": args.seeds, "arms": {arm: ARMS[arm] for arm in args.arms}, "recipes": args.recipes,
                     "done": done, "steps": args.steps, "jobs": args.jobs, "smoke": args.smoke,
                     "naoa": "shared scale (chance to the teacher), x: log10 student updates",
                     "seconds": {**seconds, "total": time.perf_counter() - started},
                     "lm_only_extra_default": LM_ONLY, "rev": rev, "missing": missing,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "project": str(project)},
            "summary": summary,
            "runs": runs,
            "curves": curves_,
        }
        if out is not None:
            atomic_write_json(out, record)
            print(f"wrote {out}", flush=True)

    for recipe in args.recipes:
        t0 = time.perf_counter()
        if not args.collect:
            set_preset(project, RECIPES[recipe])
            sh(project, "dvc", "repro", "score_rewards")  # and every stage it needs
            commit(project, f"{recipe}: upstream stages")
            print(f"study: {recipe}: upstream stages in {time.perf_counter() - t0:.0f} s", flush=True)
            names = queue(project, recipe, args.arms, args.seeds, extra)
            t1 = time.perf_counter()
            run_queue(project, names, args.jobs)
            print(f"study: {recipe}: {len(names)} experiments in {time.perf_counter() - t1:.0f} s", flush=True)
        summary[recipe], found, more = report(project, recipe, args.arms, args.seeds, out)
        runs.update(found)
        missing[recipe], curves_[recipe] = more["missing"], more["curves"]
        seconds[recipe] = time.perf_counter() - t0
        save(list(summary))
    print(table(summary))


if __name__ == "__main__":
    try:
        main()
    except StudyError as exc:
        sys.exit(f"error: {exc}")
