"""Stage evaluate: the trained student, the initial student and the teacher, side by side.

For each model, on the first eval.n_prompts held-out prompts (one continuation each,
sampled with eval.seed, the same seed for every model) and on the held-out eval texts:

  reward, reward_std  reward model on prompt + continuation token ids (mean, std)
  grammaticality      share of continuations the nursery grammar accepts (nursery data only;
                      else null, with grammaticality_note)
  perplexity          on eval texts (bos + text + eos, cut to eval.max_length)
  kl_to_teacher       mean per-token KL(teacher || model) on the same ids (0 for the teacher)
  distinct_1/2        unique word uni/bigrams over all continuations / all of them
  mean_length         continuation tokens (eos included)
  word_surprisal      mean over nursery content words of the word's mean surprisal (bits) in
                      the eval texts given its left context (the TnD paper's word acquisition)

Writes metrics/eval.json {"student": {...}, "initial_student": {...}, "teacher": {...}},
plots/eval_models.csv (one row per model), plots/eval_word_surprisal.csv (one row per
word: word, category, count, one column per model) and eval/ (samples.jsonl, one row
per prompt, and the PNG figures also logged to MLflow).

Word acquisition over training: plots/eval_word_curve.csv holds, per PPO step with a student
snapshot (checkpoints/ppo/students/, kept by train_ppo at ppo.snapshot_schedule's steps: log-spaced
by default; step 0 is the initial student), the mean word surprisal, its mean per word category and
every word's own (columns `word:<word>`); eval/word_curve.png draws the mean and a few frequent words.

From that curve, each word's age of acquisition (nAoA, the TnD paper's measure; the method is in
tnd.evaluation.word_acquisition): a sigmoid in log10 step fitted from the word's initial to its final
surprisal, nAoA@t the log10 step where the fit has covered fraction t of the way, t = 0.5 ... 0.95.
metrics/eval.json "naoa" holds per word category and overall the mean nAoA at each threshold ("t50"
... "t95", over the fitted words), the counts of words fitted / not learned (surprisal fell by less
than 0.1 bit) / with too few snapshots / whose fit failed, all left out of the means, and per threshold
the count censored (reached only after the last step by the fit, reported at the last step).
plots/eval_naoa.csv: one row per threshold, one column per category; plots/eval_naoa_words.csv: one
row per word (status, initial and final surprisal, the fit, nAoA per threshold); eval/naoa.png.

Every model, the reward model included, runs on the accelerator, under bf16 / fp16 autocast when
engine.mixed_precision says so; the teacher's logits for the KL are computed once per batch for all
three models, and log-probs are taken a few thousand rows of logits at a time (no float32 [B, T, V]).

The paper's "practice makes perfect": per content word, its count in the student's trials over training
(plots/train_trial_words.csv, from train_ppo) against its final surprisal and its nAoA@0.5, in
plots/eval_practice.csv and eval/practice.png; metrics/eval.json "practice" holds the words counted, how
many the student practised, and the Spearman rank correlations of the count with each (negative: the
words practised more are known better).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional

import torch

from tnd.config import Params
from tnd.data import nursery
from tnd.data.tokenizer import load_tokenizer
from tnd.engine import make_accelerator
from tnd.batching import encode_for_lm
from tnd.errors import TndError, one_line
from tnd.evaluation import (
    NAOA_MIN_POINTS,
    NAOA_THRESHOLDS,
    WordAcquisition,
    chance_surprisals,
    distinct_n,
    effective_vocabulary,
    fitted_surprisal,
    grammaticality,
    half_way,
    is_grammatical_row,
    locate_words,
    mean_length,
    mean_word_surprisal,
    naoa_summary,
    on_shared_scale,
    perplexity_from_logprobs,
    practice,
    sample_rows,
    sequence_logprobs,
    threshold_key,
    token_kl,
    word_category,
    word_naoa,
    word_surprisals,
)
from tnd.io import atomic_dir, atomic_write_csv, atomic_write_json, atomic_write_jsonl, read_csv
from tnd.models import load_causal_lm
from tnd.numbers import finite
from tnd.tracking import Tracker
from tnd.reward import load_reward_model, reward_stats, score_token_ids

from stages.common import (
    EVAL, INITIAL_STUDENT, METRICS, PLOTS, PREPARED, REWARD, STUDENT, TEACHER, TOKENIZER, check_positions, fmt,
    prepared_rows, run_stage, snapshot_path, snapshot_steps,
)

MODELS = {"student": STUDENT, "initial_student": INITIAL_STUDENT, "teacher": TEACHER}
KEYS = (
    "reward", "reward_std", "grammaticality", "perplexity", "kl_to_teacher",
    "distinct_1", "distinct_2", "mean_length", "word_surprisal",
)
WORD_CATEGORIES = ("noun", "verb", "adjective", "name")  # nursery.CONTENT_WORDS
GRAMMAR_NOTE = "grammaticality needs the nursery grammar (data.source: nursery)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_lengths(models: dict, prompts: list[list[int]], params: Params) -> None:
    cfg = params.eval
    check_positions(models, max(map(len, prompts)) + cfg.max_new_tokens, "eval.max_new_tokens", cfg.max_new_tokens,
                    "prompts + samples")
    check_positions({role: m for role, m in models.items() if role != "reward"}, cfg.max_length, "eval.max_length",
                    cfg.max_length, "eval texts (cut to it)")


def student_updates(train_csv: Path) -> dict[int, int]:
    """{trainer step: the student's optimizer updates so far} from plots/train.csv (train_ppo), 0 at step 0."""
    try:
        updates = {int(row["step"]): int(float(row["student/updates"])) for row in read_csv(train_csv)}
    except (OSError, KeyError, ValueError) as exc:
        raise TndError(f"{train_csv}: no student/updates per step ({one_line(exc, 120)}); "
                       "rerun `dvc repro -f train_ppo`") from None
    return {0: 0, **updates}


def word_curve(student, per_word_initial: dict, per_word_final: dict, sequences, occurrences,
               params: Params, updates: dict[int, int]) -> list[dict]:
    """Word surprisal of the student along PPO: step 0 (the initial student), every kept snapshot
    before the last step, and the final student (whose surprisals evaluate has already computed),
    one row per step: step, the student's optimizer updates by then (nAoA's x-axis, as the paper counts
    steps), mean, mean per category, then each word."""
    points = [(0, per_word_initial)]
    model = copy.deepcopy(student)
    for step in [s for s in snapshot_steps() if 0 < s < params.ppo.steps]:
        try:
            state = torch.load(snapshot_path(step), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise TndError(
                f"{snapshot_path(step)}: not a snapshot of this student ({one_line(exc, 120)}); "
                "rerun `dvc repro -f train_ppo`"
            ) from None
        logprobs = sequence_logprobs(model, sequences, model.config.pad_token_id, params.eval.batch_size)
        points.append((step, word_surprisals(logprobs, occurrences)))
    points.append((params.ppo.steps, per_word_final))
    missing = [step for step, _ in points if step not in updates]
    if missing:
        raise TndError(f"{PLOTS}/train.csv has no row for PPO step {missing[0]} of the word curve; "
                       "rerun `dvc repro -f train_ppo`")
    rows = []
    for step, per_word in points:
        row = {"step": step, "updates": updates[step], "mean": mean_word_surprisal(per_word)}
        for category in WORD_CATEGORIES:
            row[category] = mean_word_surprisal({w: v for w, v in per_word.items() if word_category(w) == category})
        row.update({f"word:{w}": v["surprisal"] for w, v in per_word.items()})
        rows.append(row)
    return rows


def naoa_from_curve(curve: list[dict], anchors: Optional[dict[str, tuple[float, float]]] = None
                    ) -> tuple[dict[str, WordAcquisition], dict]:
    """Each word's nAoA fit along the word curve (x: log10 of the student's updates), and metrics/eval.json's
    "naoa" (naoa_summary by category, the scale, and a note when the curve has too few snapshots for any fit).
    `anchors` {word: (chance, teacher) surprisal}: nAoA on that shared scale (`on_shared_scale`, eval.naoa_scale:
    shared), with the words acquired (at or below the half-way cutoff) at the end; None: per run."""
    steps = [row["updates"] for row in curve]
    words = [key.removeprefix("word:") for key in curve[0] if key.startswith("word:")]
    fits = word_naoa(steps, {w: [row.get(f"word:{w}") for row in curve] for w in words})
    if anchors is not None:
        fits = {w: on_shared_scale(f, steps, *anchors[w]) for w, f in fits.items()}
    summary = naoa_summary(fits, {w: word_category(w) for w in words}, WORD_CATEGORIES)
    summary["scale"] = "per_run" if anchors is None else "shared"
    if anchors is not None:
        summary["acquired"] = effective_vocabulary(curve[-1:], half_way(anchors))[0]
    if sum(s >= 1 for s in steps) < NAOA_MIN_POINTS:
        summary["note"] = (
            f"nAoA needs student snapshots at {NAOA_MIN_POINTS} or more steps >= 1 (the final student included), "
            f"here {sum(s >= 1 for s in steps)}: ppo.keep_student_snapshots: true and ppo.snapshot_schedule: paper"
        )
    return fits, summary


def _naoa_tables(fits: dict[str, WordAcquisition], summary: dict) -> tuple[list[dict], list[dict]]:
    """The rows of plots/eval_naoa.csv (one per threshold) and plots/eval_naoa_words.csv (one per word)."""
    groups = ["overall", *WORD_CATEGORIES]
    by_threshold = [{"threshold": t, **{g: summary[g][threshold_key(t)] for g in groups}} for t in NAOA_THRESHOLDS]
    words = [
        {"word": w, "category": word_category(w), "status": f.status, "initial": finite(f.initial),
         "final": finite(f.final), "midpoint": f.midpoint, "slope": f.slope, "rmse": f.rmse,
         **{threshold_key(t): f.naoa[t] for t in NAOA_THRESHOLDS}}
        for w, f in sorted(fits.items())
    ]
    return by_threshold, words


def read_trial_words(path: Path) -> dict[str, int]:
    """plots/train_trial_words.csv (train_ppo) as word -> count."""
    try:
        return {row["word"]: int(row["trained_count"]) for row in read_csv(path)}
    except (OSError, KeyError, ValueError) as exc:
        raise TndError(f"{path}: cannot be read ({one_line(exc, 120)}); run `dvc repro train_ppo`") from None


def evaluate(params: Params, run: Tracker) -> None:
    accelerator = make_accelerator(params.engine.mixed_precision)  # the device, and autocast where engine says
    with accelerator.autocast():
        evaluate_on(accelerator.device, params, run)


def evaluate_on(device: torch.device, params: Params, run: Tracker) -> None:
    cfg = params.eval
    tokenizer = load_tokenizer(TOKENIZER)
    models = {name: load_causal_lm(path, tokenizer, role=name).to(device).eval() for name, path in MODELS.items()}
    reward_model = load_reward_model(REWARD, tokenizer).to(device)
    prompts = [list(row["prompt_ids"]) for row in prepared_rows("eval_prompts.jsonl")][: cfg.n_prompts]
    texts = [row["text"] for row in prepared_rows("eval.jsonl")]
    if not prompts or not texts:
        raise TndError(f"{PREPARED}: no eval prompts or texts; run `dvc repro prepare_data`")
    _check_lengths({**models, "reward": reward_model}, prompts, params)
    nursery_data = params.data.source == "nursery"
    words = [w for c in WORD_CATEGORIES for w in nursery.WORDS_BY_CATEGORY[c]]
    word_note = None
    try:
        sequences, occurrences = locate_words(tokenizer, texts, words, cfg.max_length)
    except ValueError:  # a slow tokenizer has no character offsets
        sequences, occurrences = encode_for_lm(tokenizer, texts, cfg.max_length), []
        word_note = "word surprisal needs a fast tokenizer (character offsets)"

    metrics: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    per_word: dict[str, dict] = {}
    kl_to_teacher = token_kl(models, models["teacher"], tokenizer, texts, cfg.max_length, cfg.batch_size,
                             params.kernels.backend)  # the teacher's logits once per batch for all three
    for name, model in models.items():
        rows = sample_rows(
            model, tokenizer, prompts, cfg.max_new_tokens, cfg.seed, cfg.temperature,
            desc=f"sampling ({name})", batch_size=cfg.batch_size,
        )
        rewards = score_token_ids(  # as PPO scores its trials (compute_scores): bos in front, whole
            reward_model, tokenizer, [r["prompt_ids"] + r["continuation_ids"] for r in rows], batch_size=cfg.batch_size
        )
        for row, reward in zip(rows, rewards.tolist()):
            row["reward"] = finite(reward)
            row["grammatical"] = is_grammatical_row(row) if nursery_data else None
        stats = reward_stats(rewards)
        logprobs = sequence_logprobs(model, sequences, tokenizer.pad_token_id, cfg.batch_size)
        per_word[name] = word_surprisals(logprobs, occurrences)
        continuations = [r["continuation"] for r in rows]
        m = {
            "reward": stats["mean"],
            "reward_std": stats["std"],
            "grammaticality": grammaticality(rows) if nursery_data else None,
            "perplexity": perplexity_from_logprobs(logprobs),
            "kl_to_teacher": kl_to_teacher[name],
            "distinct_1": distinct_n(continuations, 1),
            "distinct_2": distinct_n(continuations, 2),
            "mean_length": mean_length(rows),
            "word_surprisal": mean_word_surprisal(per_word[name]),
        }
        if stats["nan_count"]:
            m["reward_nonfinite"] = stats["nan_count"]
        if not nursery_data:
            m["grammaticality_note"] = GRAMMAR_NOTE
        if word_note:
            m["word_surprisal_note"] = word_note
        metrics[name] = m
        samples[name] = rows

    # Per-word table: the words that occur in the eval texts (counts agree across models).
    word_rows = [
        {"word": w, "category": word_category(w), "count": per_word["teacher"][w]["count"],
         **{name: per_word[name][w]["surprisal"] for name in MODELS}}
        for w in sorted(per_word["teacher"])
    ]
    sample_table = [
        {"prompt": samples["teacher"][i]["prompt"],
         **{name: {"continuation": samples[name][i]["continuation"], "reward": samples[name][i]["reward"],
                   "grammatical": samples[name][i]["grammatical"]} for name in MODELS}}
        for i in range(len(prompts))
    ]

    curve = word_curve(models["student"], per_word["initial_student"], per_word["student"], sequences, occurrences,
                       params, student_updates(Path(PLOTS) / "train.csv"))
    anchors = None
    if cfg.naoa_scale == "shared":
        chance = chance_surprisals(occurrences, len(tokenizer))
        anchors = {w: (chance[w], per_word["teacher"][w]["surprisal"]) for w in per_word["teacher"]}
        vocabulary = effective_vocabulary(curve, half_way(anchors))
        for row, n in zip(curve, vocabulary):
            row["vocabulary"] = n
    fits, metrics["naoa"] = naoa_from_curve(curve, anchors)
    practice_rows, metrics["practice"] = practice(read_trial_words(Path(PLOTS) / "train_trial_words.csv"),
                                                  per_word["student"], fits)

    plots = Path(PLOTS)
    atomic_write_json(Path(METRICS) / "eval.json", metrics)
    atomic_write_csv(plots / "eval_models.csv", [{"model": name, **{k: metrics[name][k] for k in KEYS}} for name in MODELS])
    atomic_write_csv(plots / "eval_word_surprisal.csv", word_rows, ["word", "category", "count", *MODELS])
    atomic_write_csv(plots / "eval_word_curve.csv", curve)  # columns: the first row's keys
    naoa_table, naoa_words = _naoa_tables(fits, metrics["naoa"])
    atomic_write_csv(plots / "eval_naoa.csv", naoa_table)
    atomic_write_csv(plots / "eval_naoa_words.csv", naoa_words)
    atomic_write_csv(plots / "eval_practice.csv", practice_rows,
                     ["word", "category", "trained_count", "surprisal", "naoa_t50"])
    figures = []
    with atomic_dir(EVAL) as out:
        atomic_write_jsonl(out / "samples.jsonl", sample_table)
        figures = _figures(out, metrics, word_rows, plots / "train.csv", curve, fits, practice_rows)
    figures = [Path(EVAL) / f.name for f in figures]

    run.log_metrics({f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items() if _is_number(v)})
    run.log_metrics({f"naoa/{group}/{k}": v for group, entry in metrics["naoa"].items() if isinstance(entry, dict)
                     for k, v in {**entry, **{f"censored_{c}": n for c, n in entry["censored"].items()}}.items()
                     if _is_number(v)})
    for figure in figures:
        run.log_artifact(figure, "plots")
    flat_samples = [
        {"prompt": s["prompt"], **{f"{name}/{k}": v for name in MODELS for k, v in s[name].items()}}
        for s in sample_table
    ]
    run.log_table(flat_samples, "eval_samples.json")
    for name in MODELS:
        m = metrics[name]
        print(
            f"evaluate: {name:<15} reward {fmt(m['reward'])}  grammaticality {fmt(m['grammaticality'])}  "
            f"perplexity {fmt(m['perplexity'])}  kl {fmt(m['kl_to_teacher'])}  "
            f"word surprisal {fmt(m['word_surprisal'])}"
        )
    overall = metrics["naoa"]["overall"]
    print(
        f"evaluate: nAoA (log10 student update, {metrics['naoa']['scale']} scale) over {overall['fitted']} of "
        f"{overall['words']} words "
        f"({overall['not_learned']} not learned, {overall['too_few_points']} too few snapshots, "
        f"{overall['fit_failed']} failed fits): "
        + ", ".join(f"@{t} {fmt(overall[threshold_key(t)])}" for t in NAOA_THRESHOLDS)
    )
    practised = metrics["practice"]
    print(
        f"evaluate: practice: {practised['practised']} of {practised['words']} words occurred in the trials; "
        f"Spearman rho of the count with final surprisal {fmt(practised['spearman_surprisal'])}, "
        f"with nAoA@0.5 {fmt(practised['spearman_naoa_t50'])}"
    )


def _figures(out: Path, metrics: dict, word_rows: list[dict], train_csv: Path, curve: list[dict],
             fits: dict[str, WordAcquisition], practice_rows: list[dict]) -> list[Path]:
    from tnd import plots

    made = [plots.model_comparison({name: metrics[name] for name in MODELS}, KEYS, out / "eval_models.png")]
    order = ["initial_student", "student", "teacher"]  # the scatter plots the others against the first
    made.append(plots.word_surprisal(word_rows, order, out / "eval_word_surprisal.png"))
    by_count = [r["word"] for r in sorted(word_rows, key=lambda r: -r["count"])]
    made.append(plots.word_curve(curve, by_count[:6], out / "word_curve.png"))
    groups = ["overall", *WORD_CATEGORIES]
    examples = []
    for word in [w for w in by_count if w in fits and fits[w].status == "fitted"][:4]:
        fit = fits[word]
        points = [(row["updates"], row[f"word:{word}"]) for row in curve if row["updates"] >= 1]
        grid = [10 ** (math.log10(points[0][0]) + i * (math.log10(points[-1][0]) - math.log10(points[0][0])) / 60)
                for i in range(61)]
        half = fit.naoa[0.5] if 0.5 in fit.naoa else None
        examples.append({"word": word, "initial": fit.initial, "points": points,
                         "fitted": [(step, fitted_surprisal(fit, step)) for step in grid],
                         "marker": None if half is None else (half, fitted_surprisal(fit, 10 ** half))})
    lines = {g: [metrics["naoa"][g][threshold_key(t)] for t in NAOA_THRESHOLDS] for g in groups}
    made.append(plots.naoa(NAOA_THRESHOLDS, lines, examples, out / "naoa.png"))
    if "vocabulary" in curve[0]:
        made.append(plots.effective_vocabulary({"student": [(row["updates"], row["vocabulary"]) for row in curve]},
                                               out / "effective_vocabulary.png"))
    made.append(plots.practice(practice_rows, metrics["practice"], out / "practice.png"))
    if train_csv.is_file():
        made.append(plots.training_curves(read_csv(train_csv), out / "train_curves.png"))
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> None:
    run_stage("evaluate", evaluate, argv)


if __name__ == "__main__":
    main()
