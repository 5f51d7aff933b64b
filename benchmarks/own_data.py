"""Your own data: the default pipeline's first stages on a real corpus, and how well each candidate trial reward
tells better text from worse there (docs/own-data.md).

    python benchmarks/own_data.py --build-corpus /tmp/corpus.jsonl   # sentences of the installed packages' docstrings
    python benchmarks/own_data.py --corpus /tmp/corpus.jsonl --workdir /tmp/own-data \
        --out benchmarks/results/own-data-cpu.json                  # about 2 hours on 2 shared CPU cores
    python benchmarks/own_data.py --smoke --out /tmp/own.json       # tiny sizes: proves it runs (about a minute)

To measure a commit while the checkout changes, run a copy: `git archive <rev> | tar -x -C /tmp/code`, then
`TND_COMMIT=<rev> python /tmp/code/benchmarks/own_data.py ...` (the record names the commit).

The corpus: every sentence of 6 to 24 words, plain letters and a full stop (tests/real_text.py's rule), of the
docstrings of the modules installed beside this Python (read with `ast`, nothing imported), deduplicated,
shuffled; nothing is downloaded and the file stays outside the repository.

In --workdir, project folders holding params.yaml (the repository's, data.source: the corpus, tracking off) run
the stages as `dvc repro` would (`python -m stages.<name>`, this checkout's code):

  default/   prepare_data, train_teacher, train_reward with the default params: how many texts are used, the
             teacher's planned and run steps, and the built-in reward model (word-level corruption pairs);
  n20000/    prepare_data and train_reward with data.n_train 20000, the old default (its note line names what
             it left out).

Then, in this process, the initial student is warmed up as train_ppo warms it (student.train on the default
project's training texts) and each candidate reward scores two held-out yardsticks:

  corruptions         data/prepared/pairs_eval.jsonl: each eval text against a word-level corruption of it
                      (adjacent_swap is a kind the reward model never trained on);
  teacher_vs_student  continuations of the eval prompts (held out from training), the teacher's against the
                      initial student's, --samples of each per prompt: what a trial reward must rank for PPO to
                      move the student towards the teacher.

The candidates: rm_default and rm_n_train_20000 (the two reward models above); teacher_logprob (the teacher's
log-probability of the text, summed); teacher_logratio (what `tnd.trial_reward: teacher` gives a trial: the sum
over its tokens of log p_teacher - log p_student, the initial student's); rm_teacher_vs_student (a reward model of
the default reward params trained on teacher against initial-student continuations of the training prompts,
validated on others). A figure is the share of pairs in which the candidate scores the first text higher (ties
count half). The teacher scores its own samples: on teacher_vs_student its figures are an upper bound, not a test.
Sequences are scored as PPO scores a trial: bos + prompt + continuation ids, an eos only where the sample ended.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

from tnd_study import merge  # beside this script (sys.path[0]); it puts the repository on sys.path

from tnd.io import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_SPLIT = re.compile(r"(?<=[.!?])\s+")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;'-]+[a-z]\.$")  # tests/real_text.py's plain sentence

# Tiny sizes for --smoke (the test suite's TINY, tests/conftest.py): every path runs, nothing is measured.
SMOKE = {
    "data": {"n_valid": 30, "n_eval": 30, "n_prompts": 40, "n_eval_prompts": 16},
    "tokenizer": {"vocab_size": 400},
    "teacher": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "train": {"min_steps": 8, "epochs": 0.2, "batch_size": 8, "warmup_steps": 2},
                "eval": {"n_samples": 8, "max_new_tokens": 8}},
    "student": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1}},
    "reward": {"arch": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
               "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2}},
}


def docstring_sentences(limit: int | None = None) -> list[str]:
    """The corpus's sentences, in the order found (files sorted); at most `limit`."""
    seen: dict[str, None] = {}
    for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for paragraph in (ast.get_docstring(node) or "").split("\n\n"):
                    for sentence in _SPLIT.split(" ".join(paragraph.split())):
                        if _PROSE.match(sentence) and 6 <= len(sentence.split()) <= 24:
                            seen.setdefault(sentence)
        if limit is not None and len(seen) >= limit:
            break
    return list(seen)[:limit]


def build_corpus(out: Path, limit: int | None = None) -> int:
    texts = docstring_sentences(limit)
    random.Random(0).shuffle(texts)
    atomic_write_text(out, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return len(texts)


def make_project(folder: Path, corpus: Path, overrides: dict) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(params, {"data": {"source": str(corpus.resolve())}, "tracking": {"enabled": False}})
    (folder / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides), sort_keys=False))
    return folder


# What each stage run here writes last: --reuse skips a stage whose output is there.
STAGE_OUTPUT = {"prepare_data": "data/prepared/stats.json", "train_teacher": "metrics/teacher.json",
                "train_reward": "metrics/reward.json"}


def run_stage(folder: Path, name: str) -> dict:
    """`python -m stages.<name>` in the project folder: its wall time and the lines it printed (no progress bars)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=folder, env=env, capture_output=True, text=True)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith((name, "note:", "warning:"))]
    if proc.returncode:
        raise SystemExit(f"{name} in {folder} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "lines": lines}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def share_first_higher(first, second) -> float:
    """The share of pairs whose first score is the higher (ties: half)."""
    import torch

    first, second = torch.as_tensor(first, dtype=torch.float64), torch.as_tensor(second, dtype=torch.float64)
    return float(((first > second).double() + 0.5 * (first == second).double()).mean())


def measure(default: Path, n20000: Path, samples: int, seed: int) -> dict:
    """The candidates on the two yardsticks (the module's docstring), in the default project."""
    import torch

    from tnd.config import load_params
    from tnd.data.tokenizer import decode, encode, load_tokenizer
    from tnd.evaluation import sequence_logprobs
    from tnd.generation import sample_continuations
    from tnd.io import read_jsonl
    from tnd.models import build_causal_lm, load_causal_lm
    from tnd.reward import build_reward_model, load_reward_model, score_token_ids
    from tnd.trainers.lm import pretrain_lm
    from tnd.trainers.reward import RewardTrainer

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    params = load_params(default / "params.yaml")
    prepared = default / "data/prepared"
    tokenizer = load_tokenizer(default / "artifacts/tokenizer")
    teacher = load_causal_lm(default / "models/teacher", tokenizer, role="teacher")
    default_model = load_reward_model(default / "models/reward", tokenizer)
    own_tokens = load_tokenizer(n20000 / "artifacts/tokenizer")  # that project trained its own tokenizer
    n20000_model = load_reward_model(n20000 / "models/reward", own_tokens)
    texts = [row["text"] for row in read_jsonl(prepared / "train.jsonl")]
    valid = [row["text"] for row in read_jsonl(prepared / "valid.jsonl")]
    # the initial student, as stages/train_ppo.py warms it up
    student = build_causal_lm(params.student.arch, tokenizer, params.student_seed, params.tokenizer.pad_vocab_to)
    if params.student.train.steps:
        pretrain_lm(student, tokenizer, texts, params.student.train, params.student_seed, desc="student warm-up",
                    eval_texts=valid, name="student")
    student.eval()
    new_tokens = params.ppo.max_new_tokens

    def continuations(prompts: list[list[int]], tag: int) -> tuple[list[list[int]], list[list[int]]]:
        """(teacher's, student's) prompt + continuation ids, `samples` of each per prompt."""
        many = [p for p in prompts for _ in range(samples)]
        out = []
        for offset, model in enumerate((teacher, student)):
            cont = sample_continuations(model, tokenizer, many, new_tokens, seed + 10 * tag + offset,
                                        temperature=params.ppo.temperature, progress=False)
            out.append([list(p) + list(c) for p, c in zip(many, cont)])
        return out[0], out[1]

    def text_ids(texts_: list[str]) -> list[list[int]]:
        # a finished text, as the reward model trains on it: bos + text + eos
        return [[tokenizer.bos_token_id] + encode(tokenizer, t) + [tokenizer.eos_token_id] for t in texts_]

    pairs = read_jsonl(prepared / "pairs_eval.jsonl")
    eval_prompts = [row["prompt_ids"] for row in read_jsonl(prepared / "eval_prompts.jsonl")]
    yardsticks = {
        "corruptions": (text_ids([p["chosen"] for p in pairs]), text_ids([p["rejected"] for p in pairs]),
                        [p["kind"] for p in pairs]),
        "teacher_vs_student": (*continuations(eval_prompts, 1), None),
    }
    train_prompts = [row["prompt_ids"] for row in read_jsonl(prepared / "prompts.jsonl")]
    cut = len(train_prompts) - max(len(train_prompts) // 8, 1)  # the last eighth of the prompts validates
    fitted, checked = continuations(train_prompts[:cut], 2), continuations(train_prompts[cut:], 3)

    def rows(first: list[list[int]], second: list[list[int]]) -> list[dict]:
        # texts, as the pairwise trainer takes them (it trains on each as a finished text: bos + text + eos)
        return [{"chosen": decode(tokenizer, a), "rejected": decode(tokenizer, b), "kind": "teacher_vs_student"}
                for a, b in zip(first, second)]

    trained = build_reward_model(params.reward.arch, tokenizer, params.seed)
    fit_summary = RewardTrainer(trained, tokenizer, params.reward, params.seed).train(
        rows(*fitted), eval_rows=rows(*checked), desc="reward model: teacher vs student")
    trained.eval()

    def summed(model, sequences: list[list[int]]) -> list[float]:
        return [float(x.sum()) for x in sequence_logprobs(model, sequences, tokenizer.pad_token_id)]

    def in_tokens_of(other, sequences: list[list[int]]) -> list[list[int]]:
        """The sequences in another tokenizer's ids (the n20000 project trained its own): the same text, with an
        eos where the sample ended."""
        out = []
        for seq in sequences:
            ended = [other.eos_token_id] if seq[-1] == tokenizer.eos_token_id else []
            out.append([other.bos_token_id] + encode(other, decode(tokenizer, seq)) + ended)
        return out

    scorers = {name: (lambda seqs, m=m: score_token_ids(m, tokenizer, seqs).tolist()) for name, m in (
        ("rm_default", default_model),
        ("rm_teacher_vs_student", trained),
    )}
    scorers["rm_n_train_20000"] = lambda seqs: score_token_ids(
        n20000_model, own_tokens, in_tokens_of(own_tokens, seqs)).tolist()
    scorers["teacher_logprob"] = lambda seqs: summed(teacher, seqs)
    scorers["teacher_logratio"] = lambda seqs: [t - s for t, s in zip(summed(teacher, seqs), summed(student, seqs))]

    results: dict = {}
    with torch.no_grad():
        for name, scorer in scorers.items():
            results[name] = {}
            for stick, (first, second, kinds) in yardsticks.items():
                a, b = scorer(first), scorer(second)
                entry = {"accuracy": round(share_first_higher(a, b), 4), "n_pairs": len(a)}
                if kinds is not None:
                    for kind in sorted(set(kinds)):
                        idx = [i for i, k in enumerate(kinds) if k == kind]
                        entry[f"accuracy_{kind}"] = round(share_first_higher([a[i] for i in idx], [b[i] for i in idx]), 4)
                results[name][stick] = entry
    results["rm_teacher_vs_student"]["training"] = {
        "n_pairs": len(fitted[0]), "n_validation_pairs": len(checked[0]),
        **{k: fit_summary[k] for k in ("best_step", "steps_run", "best_eval_accuracy") if k in fit_summary}}
    return results


def commit() -> str:
    """HEAD's short hash, "+changes" when the code differs from it; $TND_COMMIT in a copy without git (git archive)."""
    if "TND_COMMIT" in os.environ:
        return os.environ["TND_COMMIT"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "tnd", "stages", "params.yaml", "benchmarks/own_data.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-corpus", type=Path, help="write the corpus to this .jsonl and stop")
    parser.add_argument("--corpus", type=Path, help="the corpus (.jsonl, field text)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tnd-own-data"))
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--samples", type=int, default=4, help="continuations of each model per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed")
    parser.add_argument("--smoke", action="store_true", help="a small corpus and tiny models: proves it runs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the stages a run in --workdir finished (their records name the commit they ran on)")
    args = parser.parse_args(argv)
    if args.build_corpus:
        print(f"{build_corpus(args.build_corpus)} sentences -> {args.build_corpus}")
        return
    overrides: dict = {}
    if args.smoke:
        args.corpus = args.workdir / "corpus.jsonl"
        args.workdir.mkdir(parents=True, exist_ok=True)
        build_corpus(args.corpus, limit=400)
        overrides, args.samples = SMOKE, 1
    if args.corpus is None or args.out is None:
        parser.error("--corpus and --out are needed (or --build-corpus, or --smoke with --out)")
    started = datetime.now(timezone.utc)
    default = make_project(args.workdir / "default", args.corpus, overrides)
    n20000 = make_project(args.workdir / "n20000", args.corpus, merge(overrides, {"data": {"n_train": 20000}}))
    # each stage's record is kept beside the projects, so that --reuse can skip what a stopped run finished
    log = args.workdir / "stages.json"
    runs = read_json(log) if args.reuse and log.is_file() else {"default": {}, "n20000": {}}
    for folder, names in ((default, ("prepare_data", "train_teacher", "train_reward")),
                          (n20000, ("prepare_data", "train_reward"))):
        for name in names:
            if name in runs[folder.name] and (folder / STAGE_OUTPUT[name]).is_file():
                print(f"{folder.name}/{name}: reused ({runs[folder.name][name]['commit']})", flush=True)
                continue
            runs[folder.name][name] = {**run_stage(folder, name), "commit": commit()}
            atomic_write_json(log, runs)
            print(f"{folder.name}/{name}: {runs[folder.name][name]}", flush=True)
    teacher = read_json(default / "metrics/teacher.json")
    result = {
        "date": started.strftime("%Y-%m-%d"), "commit": commit(), "smoke": args.smoke,
        "corpus": {"path": str(args.corpus), "rows": len(args.corpus.read_text(encoding="utf-8").splitlines()),
                   "what": "sentences of the docstrings of the installed packages (benchmarks/own_data.py)"},
        "stats": {"default": read_json(default / "data/prepared/stats.json"),
                  "n20000": read_json(n20000 / "data/prepared/stats.json")},
        "teacher": {k: teacher.get(k) for k in ("steps_planned", "steps_run", "best_step", "stopped_early",
                                                 "eval_perplexity", "best_eval_perplexity")},
        "reward_models": {"default": read_json(default / "metrics/reward.json"),
                          "n20000": read_json(n20000 / "metrics/reward.json")},
        "stages": runs,
        "candidates": measure(default, n20000, args.samples, args.seed),
        "minutes": round((datetime.now(timezone.utc) - started).total_seconds() / 60, 1),
    }
    atomic_write_json(args.out, result)
    for name, sticks in result["candidates"].items():
        print(f"{name:24s} " + "  ".join(f"{stick} {v['accuracy']:.3f}" for stick, v in sticks.items() if "accuracy" in v))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
