"""Health checks: the signs that a pipeline run got worse than it should, or cannot be trusted.

Every stage can end green while the run is useless: a teacher that memorised a small corpus and
is worse than the student it should teach, a reward model at chance, a student that PPO moved away
from the teacher, a policy that games the reward. Each check here reads the figures the stages
already write and says, in one line, what it saw and what to do (docs/pipeline.md "Health checks" explains
each). `run_checks` runs them all; the `health` stage writes the result to metrics/health.json and
prints one `warning:` line per check that fired.

A check is a `Check` whose `warn` is True (fired), False (quiet) or None (not applicable: its
inputs are missing, e.g. no trials under tnd.mode: demos_only, or no PPO step logged). The
thresholds are the constants below.

Inputs (plain dicts and lists, so the module needs no file layout and no torch):
    params      the Params object (sizes and steps the run was asked for)
    stats       data/prepared/stats.json (n_train, n_eval, n_pairs_train, ...)
    reward      metrics/reward.json
    evaluation  metrics/eval.json ({"student", "initial_student", "teacher"} -> metrics)
    train_rows  plots/train.csv as csv.DictReader reads it (one row of PPO stats per step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tnd.numbers import finite, finite_mean

# --- thresholds -------------------------------------------------------------------------------

MAX_EPOCHS = 20.0  # planned passes over the training data above which the defaults overfit
CHANCE_MARGIN = 0.15  # held-out pairwise accuracy below 0.5 + this (0.65) is "near chance"
MIN_PEARSON = 0.2  # regression reward: held-out correlation below this is "near chance"
WORSE_TOLERANCE = 0.01  # "got worse": more than 1% above the initial student's figure
LENGTH_COLLAPSE = 0.5  # trial length fell below this share of the first steps' ...
DISTINCT_COLLAPSE = 0.75  # ... or the student's distinct-2 below this share of the initial student's
KL_BLOWUP = 2.0  # trial KL to the reference above this many times max(first steps' KL, ppo.kl_target)
WINDOW = 10  # PPO steps averaged at the start and at the end of training
# What reward_near_chance recommends first: the trial reward that needs no reward model (benchmarks/own_data.py measures it)
RECOMMENDED = ("set tnd.trial_reward: teacher (each trial token's log p_teacher - log p_student: no preference pairs "
               "needed, the recommended trial reward for your own data, docs/own-data.md)")

CHECKS = (
    "small_data",
    "prompts_repeated",
    "teacher_not_better_than_student",
    "reward_near_chance",
    "student_kl_worse",
    "student_perplexity_worse",
    "reward_hacking_length",
    "reward_hacking_diversity",
    "kl_blowup",
)


@dataclass(frozen=True)
class Check:
    name: str
    warn: Optional[bool]  # None: not applicable (inputs missing)
    message: str  # one line: what was seen, and what to do when it fired


def _get(tree: Optional[dict], *keys: str) -> Optional[float]:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return finite(tree)


def _skip(name: str, why: str) -> Check:
    return Check(name, None, f"not checked: {why}")


# --- data --------------------------------------------------------------------------------------


def small_data(params, stats: Optional[dict], reward: Optional[dict] = None) -> Check:
    """The steps asked for pass over the training data more than MAX_EPOCHS times (teacher, student
    warm-up, reward model): the defaults are sized for ~20,000 texts, a small corpus is memorised."""
    name = "small_data"
    n_train, n_pairs = _get(stats, "n_train"), _get(stats, "n_pairs_train")
    if params.reward.objective != "pairwise":  # regression, age: labelled texts
        n_pairs = _get(reward, "n_train")
    if not n_train:
        return _skip(name, "no data/prepared/stats.json n_train")
    plans = []
    if params.teacher.source == "builtin":
        plans.append(("teacher", params.teacher.train, n_train, "texts"))
    if params.student.source == "builtin":
        plans.append(("student warm-up", params.student.train, n_train, "texts"))
    if n_pairs:
        plans.append(("reward model", params.reward.train, n_pairs,
                      "pairs" if params.reward.objective == "pairwise" else "labelled texts"))
    # the steps each asked for on its data (the teacher's follow it unless teacher.train.steps is a number)
    planned = [(who, cfg.planned_steps(int(n)), cfg.batch_size, n, unit) for who, cfg, n, unit in plans]
    over = [(who, steps, batch, steps * batch / n, n, unit) for who, steps, batch, n, unit in planned
            if steps * batch / n > MAX_EPOCHS]
    if not over:
        return Check(name, False, f"{int(n_train)} training texts: every model passes over its data at most "
                                  f"{MAX_EPOCHS:g} times")
    parts = [f"{who} {steps} steps x {batch} = {epochs:.0f} passes over {int(n)} {unit}"
             for who, steps, batch, epochs, n, unit in over]
    return Check(name, True, "the data is small for the steps asked: " + "; ".join(parts) + f" (more than "
                 f"{MAX_EPOCHS:g} overfits); validation stops training and keeps the best weights, but lower "
                 "<model>.train.steps (the teacher's min_steps, when its steps follow the data), or add data "
                 "(docs/getting-started.md: A small corpus)")


def prompts_repeated(params, stats: Optional[dict]) -> Check:
    """More trial (or eval) prompts asked for than there are texts to draw them from."""
    name = "prompts_repeated"
    n_train, n_eval = _get(stats, "n_train"), _get(stats, "n_eval")
    if not n_train or not n_eval:
        return _skip(name, "no data/prepared/stats.json n_train / n_eval")
    over = []
    if params.data.n_prompts > n_train:
        over.append(f"data.n_prompts = {params.data.n_prompts} from {int(n_train)} training texts "
                    f"(each prompt ~{params.data.n_prompts / n_train:.1f} times)")
    if params.data.n_eval_prompts > n_eval:
        over.append(f"data.n_eval_prompts = {params.data.n_eval_prompts} from {int(n_eval)} eval texts "
                    f"(each ~{params.data.n_eval_prompts / n_eval:.1f} times)")
    if not over:
        return Check(name, False, f"{params.data.n_prompts} prompts from {int(n_train)} training texts, "
                                  f"{params.data.n_eval_prompts} eval prompts from {int(n_eval)} eval texts")
    return Check(name, True, "prompts repeat because the corpus is smaller than asked: " + "; ".join(over)
                 + "; lower data.n_prompts / data.n_eval_prompts to at most the number of texts, or add data")


# --- teacher and reward model --------------------------------------------------------------------


def teacher_not_better_than_student(evaluation: Optional[dict]) -> Check:
    """The teacher's eval perplexity is not below the initial student's: there is nothing to distil."""
    name = "teacher_not_better_than_student"
    teacher, student = _get(evaluation, "teacher", "perplexity"), _get(evaluation, "initial_student", "perplexity")
    if teacher is None or student is None:
        return _skip(name, "no teacher / initial_student perplexity in metrics/eval.json")
    if teacher < student:
        return Check(name, False, f"teacher eval perplexity {teacher:.4g} < initial student's {student:.4g}")
    return Check(name, True, f"the teacher's eval perplexity {teacher:.4g} is not better than the initial "
                             f"student's {student:.4g}, so it has nothing to teach; on a small corpus a teacher "
                             "trained here learns no more than the student (plots/teacher_validation.csv): more "
                             "data, or a pretrained teacher.source with its tokenizer.source")


def reward_near_chance(params, reward: Optional[dict]) -> Check:
    """The reward model ranks held-out pairs barely better than a coin (or its regression barely correlates)."""
    name = "reward_near_chance"
    if params.tnd.trial_reward == "teacher" or params.tnd.mode not in ("trials_only", "trials_and_demos"):
        return Check(name, False, f"the reward model does not steer PPO here (tnd.mode: {params.tnd.mode}, "
                                  f"tnd.trial_reward: {params.tnd.trial_reward}): it only monitors")
    if params.reward.objective == "pairwise":
        accuracy = _get(reward, "pairwise_accuracy")
        if accuracy is None:
            return _skip(name, "no pairwise_accuracy in metrics/reward.json")
        limit = 0.5 + CHANCE_MARGIN
        if accuracy >= limit:
            return Check(name, False, f"reward model held-out pairwise accuracy {accuracy:.3f} >= {limit:.2f}")
        train = _get(reward, "train_accuracy")
        memorised = train is not None and train > accuracy + 0.2
        seen = f" (training pairs: {train:.3f}: it memorised them)" if memorised else ""
        n = _get(reward, "n_eval_pairs")
        on = f" on {int(n)} held-out pairs" if n else ""
        return Check(name, True, f"the reward model's pairwise accuracy{on} is {accuracy:.3f}, near chance (0.5, "
                                 f"limit {limit:.2f}){seen}: PPO would optimise noise; {RECOMMENDED}, or better "
                                 "preference pairs, labelled texts (reward.objective: regression), or tnd.mode: "
                                 "demos_only")
    pearson = _get(reward, "pearson")
    if pearson is None:
        return _skip(name, "no pearson in metrics/reward.json")
    if pearson >= MIN_PEARSON:
        return Check(name, False, f"reward model held-out pearson {pearson:.3f} >= {MIN_PEARSON}")
    more = ("more samples per checkpoint (reward.age.n_samples_per_checkpoint) or checkpoints "
            "(teacher.train.age_checkpoints)" if params.reward.objective == "age" else "more labelled texts")
    return Check(name, True, f"the reward model's held-out correlation with the labels is {pearson:.3f} (near none): "
                             f"PPO would optimise noise; {RECOMMENDED}, or {more}, or tnd.mode: demos_only")


# --- the student after PPO -----------------------------------------------------------------------


def _worse(name: str, key: str, what: str, evaluation: Optional[dict], advice: str) -> Check:
    final, initial = _get(evaluation, "student", key), _get(evaluation, "initial_student", key)
    if final is None or initial is None:
        return _skip(name, f"no student / initial_student {key} in metrics/eval.json")
    if final <= initial * (1 + WORSE_TOLERANCE):
        return Check(name, False, f"student {what} {initial:.4g} -> {final:.4g}")
    return Check(name, True, f"training made the student's {what} worse on held-out text: {initial:.4g} -> "
                             f"{final:.4g}; {advice}")


def student_kl_worse(evaluation: Optional[dict]) -> Check:
    return _worse("student_kl_worse", "kl_to_teacher", "KL to the teacher", evaluation,
                  "it moved away from the teacher: check teacher_not_better_than_student and reward_near_chance, "
                  "raise distill.coef, lower ppo.learning_rate or ppo.kl_target")


def student_perplexity_worse(evaluation: Optional[dict]) -> Check:
    return _worse("student_perplexity_worse", "perplexity", "perplexity", evaluation,
                  "a teacher worse than the student pulls it there (teacher_not_better_than_student), else PPO "
                  "traded language modelling for reward: raise distill.coef, lower ppo.learning_rate or ppo.steps, "
                  "or try tnd.mode: demos_only")


def _window(rows: Sequence[dict], key: str) -> tuple[Optional[float], Optional[float]]:
    values = [row.get(key) for row in rows]
    n = min(WINDOW, max(len(values) // 2, 1))
    return finite_mean(values[:n]), finite_mean(values[-n:])


def reward_hacking_length(train_rows: Sequence[dict]) -> Check:
    """The trials' reward rises while their length collapses: the policy found a short answer the
    reward model likes."""
    name = "reward_hacking_length"
    if len(train_rows) < 2:
        return _skip(name, "fewer than 2 PPO steps in plots/train.csv")
    (r0, r1), (l0, l1) = _window(train_rows, "env/reward_mean"), _window(train_rows, "tokens/response_length")
    if None in (r0, r1, l0, l1):
        return _skip(name, "no trials (reward / response length) in plots/train.csv")
    fired = r1 > r0 and l1 < LENGTH_COLLAPSE * l0
    seen = f"trial reward {r0:.3g} -> {r1:.3g} while response length {l0:.3g} -> {l1:.3g} tokens"
    if not fired:
        return Check(name, False, seen)
    return Check(name, True, f"reward hacking? {seen}: read eval/samples.jsonl; check reward_near_chance, raise "
                             "distill.coef or ppo.init_kl_coef, lower ppo.learning_rate")


def reward_hacking_diversity(evaluation: Optional[dict]) -> Check:
    """The student's reward rose while the diversity of its samples collapsed (distinct-2 of the eval samples)."""
    name = "reward_hacking_diversity"
    r0, r1 = _get(evaluation, "initial_student", "reward"), _get(evaluation, "student", "reward")
    d0, d1 = _get(evaluation, "initial_student", "distinct_2"), _get(evaluation, "student", "distinct_2")
    if None in (r0, r1, d0, d1):
        return _skip(name, "no reward / distinct_2 of student and initial_student in metrics/eval.json")
    seen = f"student reward {r0:.3g} -> {r1:.3g}, distinct-2 {d0:.3f} -> {d1:.3f}"
    if not (r1 > r0 and d1 < DISTINCT_COLLAPSE * d0):
        return Check(name, False, seen)
    return Check(name, True, f"reward hacking? {seen}: the samples repeat themselves; read eval/samples.jsonl; "
                             "raise distill.coef or ppo.ent_coef, lower ppo.learning_rate")


def kl_blowup(params, train_rows: Sequence[dict]) -> Check:
    """The trials' KL to the reference ends far above where it started and above ppo.kl_target."""
    name = "kl_blowup"
    if len(train_rows) < 2:
        return _skip(name, "fewer than 2 PPO steps in plots/train.csv")
    k0, k1 = _window(train_rows, "objective/kl")
    if k0 is None or k1 is None:
        return _skip(name, "no trials (objective/kl) in plots/train.csv")
    limit = KL_BLOWUP * max(k0, params.ppo.kl_target)
    seen = f"trial KL to the reference ({params.ppo.kl_reference}) {k0:.3g} -> {k1:.3g} (limit {limit:.3g})"
    if k1 <= limit:
        return Check(name, False, seen)
    return Check(name, True, f"the student ran away from its reference: {seen}; raise ppo.init_kl_coef or lower "
                             "ppo.kl_target and ppo.learning_rate, or raise distill.coef")


# --- all together ---------------------------------------------------------------------------------


def run_checks(
    params,
    stats: Optional[dict] = None,
    reward: Optional[dict] = None,
    evaluation: Optional[dict] = None,
    train_rows: Sequence[dict] = (),
) -> list[Check]:
    """Every check, in CHECKS order."""
    checks = [
        small_data(params, stats, reward),
        prompts_repeated(params, stats),
        teacher_not_better_than_student(evaluation),
        reward_near_chance(params, reward),
        student_kl_worse(evaluation),
        student_perplexity_worse(evaluation),
        reward_hacking_length(train_rows),
        reward_hacking_diversity(evaluation),
        kl_blowup(params, train_rows),
    ]
    assert tuple(c.name for c in checks) == CHECKS
    return checks


def report(checks: Sequence[Check], ignore: Sequence[str] = ()) -> dict:
    """metrics/health.json: warnings (how many fired, ignored ones not counted), one true/false/null per check
    (dvc exp show lists them), and the messages of those that fired (a list: kept out of dvc's tables)."""
    fired = [c for c in checks if c.warn and c.name not in ignore]
    out: dict = {"warnings": len(fired)}
    out.update({c.name: c.warn for c in checks})
    out["messages"] = [f"{c.name}: {c.message}" for c in fired]
    out["ignored"] = [c.name for c in checks if c.warn and c.name in ignore]
    return out
