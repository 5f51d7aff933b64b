"""Words' ages of acquisition (nAoA) from the word-surprisal curve, the log-spaced student snapshots
they are fitted on, and tnd.mode: lm_only (the paper's LM-only baseline)."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
import yaml

from tests.conftest import SENTENCES, tiny_arch, tiny_params, tiny_prompts
from tnd.checkpoint import snapshot_due
from tnd.config import parse_params
from tnd.errors import ParamsError
from tnd.evaluation import (
    WordOccurrence,
    chance_surprisals,
    effective_vocabulary,
    half_way,
    on_shared_scale,
    shared_cutoff,
    NAOA_THRESHOLDS,
    WordAcquisition,
    fitted_surprisal,
    naoa_summary,
    practice,
    spearman,
    threshold_key,
    word_acquisition,
    word_counts,
    word_naoa,
)
from tnd.models import build_causal_lm
from tnd.trainers.ppo import CustomPPOConfig, CustomPPOTrainer, PPOConfigError
from tnd.reward import build_reward_model

LOG_STEPS = [0] + sorted({round(10 ** (i / 5)) for i in range(0, 61)})  # 0, 1, 2, 3, 4, 6, 10, ... 10^12


def sigmoid_curve(steps, initial, final, midpoint, slope):
    """Surprisal going from `initial` (step 0) to `final` along a sigmoid in log10 step."""
    return [initial if s == 0 else initial - (initial - final) / (1 + math.exp(-slope * (math.log10(s) - midpoint)))
            for s in steps]


def crossing(midpoint, slope, t):
    return midpoint + math.log(t / (1 - t)) / slope


# --- the snapshot schedule ----------------------------------------------------------------------


def test_log_schedule_keeps_five_log_spaced_steps_per_decade_and_the_last():
    assert [s for s in range(0, 101) if snapshot_due(s, 100, "log", 25)] == [1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100]
    assert [s for s in range(0, 71) if snapshot_due(s, 70, "log", 25)] == [1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 70]
    assert [s for s in range(0, 1001) if snapshot_due(s, 1000, "log", 25)][-6:] == [100, 158, 251, 398, 631, 1000]
    # every: at each checkpoint (save_every) and the last
    assert [s for s in range(0, 11) if snapshot_due(s, 10, "every", 4)] == [4, 8, 10]


def test_paper_schedule_keeps_every_2_steps_to_20_every_5_to_100_every_10_to_500_then_every_50():
    kept = [s for s in range(0, 1001) if snapshot_due(s, 1001, "paper", 25)]
    assert kept[:12] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 25, 30]
    assert [s for s in kept if 90 <= s <= 130] == [90, 95, 100, 110, 120, 130]
    assert [s for s in kept if 480 <= s] == [480, 490, 500, 550, 600, 650, 700, 750, 800, 850, 900, 950, 1000]
    assert [s for s in range(0, 8) if snapshot_due(s, 7, "paper", 25)] == [2, 4, 6, 7]  # and the last


# --- nAoA of one word ---------------------------------------------------------------------------


@pytest.mark.parametrize("midpoint,slope", [(2.0, 4.0), (3.3, 2.5), (1.0, 6.0)])
def test_a_sigmoid_curve_gives_its_exact_crossings(midpoint, slope):
    # steps to 10^12: the curve has reached its final value there (to 1e-8), so the fractions are exact
    fit = word_acquisition(LOG_STEPS, sigmoid_curve(LOG_STEPS, 11.0, 3.0, midpoint, slope))
    assert fit.status == "fitted" and fit.initial == 11.0 and fit.final == pytest.approx(3.0, abs=1e-8)
    assert fit.midpoint == pytest.approx(midpoint, abs=1e-5) and fit.slope == pytest.approx(slope, rel=1e-5)
    for t in NAOA_THRESHOLDS:
        assert fit.naoa[t] == pytest.approx(crossing(midpoint, slope, t), abs=1e-5), t
        assert not fit.censored[t]
    assert fit.naoa[0.5] == pytest.approx(midpoint, abs=1e-5)  # Chang & Bergen's AoA: half-way
    assert fitted_surprisal(fit, 10 ** fit.naoa[0.8]) == pytest.approx(11.0 - 0.8 * 8.0, abs=1e-4)


def test_the_crossing_is_where_the_fit_covers_the_fraction_of_the_way_not_a_fixed_surprisal():
    """The same shape between other initial and final values: the same nAoA."""
    a = word_acquisition(LOG_STEPS, sigmoid_curve(LOG_STEPS, 11.0, 3.0, 2.0, 4.0))
    b = word_acquisition(LOG_STEPS, sigmoid_curve(LOG_STEPS, 6.0, 5.5, 2.0, 4.0))
    assert b.naoa == pytest.approx(a.naoa, abs=1e-5)


def test_noisy_curve_on_the_default_schedule_is_close():
    steps = [s for s in range(0, 101) if s == 0 or snapshot_due(s, 100, "log", 25)]
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn(len(steps), generator=gen, dtype=torch.float64) * 0.05).tolist()
    curve = [v + (e if s else 0.0) for s, v, e in zip(steps, sigmoid_curve(steps, 9.0, 5.0, 1.0, 3.0), noise)]
    fit = word_acquisition(steps, curve)
    assert fit.status == "fitted" and fit.naoa[0.5] == pytest.approx(1.0, abs=0.15)


def test_a_curve_still_falling_at_the_end_is_censored_at_the_last_step():
    """Half-way in log10 step 3 of a training that ends at 100: by the fit, the high thresholds are reached
    only after the last step, so they are reported at it (log10 100 = 2) and marked censored."""
    steps = LOG_STEPS[: LOG_STEPS.index(100) + 1]
    fit = word_acquisition(steps, sigmoid_curve(steps, 10.0, 2.0, 3.0, 2.0))
    assert fit.status == "fitted"
    assert fit.censored[0.95] and fit.naoa[0.95] == 2.0
    assert not fit.censored[0.5] and fit.naoa[0.5] < 2.0
    assert all(fit.naoa[a] <= fit.naoa[b] for a, b in zip(NAOA_THRESHOLDS, NAOA_THRESHOLDS[1:]))


def test_the_way_ends_at_the_last_value_not_the_lowest():
    """A word that dipped below where it ended: the fraction is of the way to the final student's surprisal."""
    steps = [0, 1, 2, 3, 4, 6, 10, 16, 25]
    curve = [10.0, 9.9, 9.5, 8.0, 5.0, 3.5, 3.0, 3.2, 4.0]
    fit = word_acquisition(steps, curve)
    assert fit.final == 4.0 and fit.initial == 10.0 and fit.status == "fitted"
    # half of 10 -> 4 (7 bits) is passed between steps 3 and 4; half of 10 -> 3 (6.5 bits) too, but later
    assert math.log10(3) < fit.naoa[0.5] < math.log10(4)
    lowest = word_acquisition(steps[:7], curve[:7])  # the same curve stopped at its lowest point
    assert lowest.naoa[0.5] > fit.naoa[0.5]


def test_a_word_learned_before_the_first_snapshot_is_reported_at_it():
    fit = word_acquisition(LOG_STEPS, sigmoid_curve(LOG_STEPS, 10.0, 2.0, -2.0, 3.0))
    assert fit.status == "fitted" and fit.naoa[0.5] == 0.0 and not fit.censored[0.5]  # log10(step 1)


def test_flat_rising_and_barely_falling_curves_are_not_learned():
    steps = LOG_STEPS[:12]
    assert word_acquisition(steps, [7.0] * len(steps)).status == "not_learned"
    assert word_acquisition(steps, [7.0 + 0.1 * i for i in range(len(steps))]).status == "not_learned"
    barely = word_acquisition(steps, sigmoid_curve(steps, 7.0, 6.95, 1.0, 3.0))  # 0.05 bits < NAOA_MIN_DROP
    assert barely.status == "not_learned" and barely.naoa == {t: None for t in NAOA_THRESHOLDS}
    assert word_acquisition(steps, sigmoid_curve(steps, 7.0, 6.85, 1.0, 3.0)).status == "fitted"


def test_too_few_snapshots_and_failed_fits_have_no_naoa():
    assert word_acquisition([0, 5, 10], [9.0, 6.0, 4.0]).status == "too_few_points"
    assert word_acquisition([0, 2, 5, 10], [9.0, 6.0, 5.0, 4.0]).status == "fitted"
    assert word_acquisition([0, 5, 10], [None, float("nan"), 4.0]).status == "not_learned"  # one point left
    assert word_acquisition([], []).status == "too_few_points"
    # overshoots the final value and comes back: no sigmoid from initial to final describes it
    steps = [0, 1, 2, 3, 4, 6, 10]
    overshoot = [10.0] + [10.0 - y * 4.0 for y in (2.0, 1.8, 1.5, 1.3, 1.1, 1.0)]
    fit = word_acquisition(steps, overshoot)
    assert fit.status == "fit_failed" and fit.naoa == {t: None for t in NAOA_THRESHOLDS} and fit.midpoint is None


# --- the shared scale: chance to the teacher, the same for every run --------------------------------


def test_shared_scale_crosses_the_same_surprisal_in_every_run():
    """Two runs of one word from the same warm start: one ends at the teacher's surprisal, one stops half-way
    there. Per run, both are half-way at the same step; on the shared scale (chance 12 bits, teacher 2) the
    one that stopped short reaches the 0.9 cutoff never (censored at the last step), the other does."""
    steps = LOG_STEPS[: LOG_STEPS.index(1000) + 1]
    good = word_acquisition(steps, sigmoid_curve(steps, 8.0, 2.0, 1.5, 4.0))
    short = word_acquisition(steps, sigmoid_curve(steps, 8.0, 5.0, 1.5, 4.0))
    assert good.naoa[0.5] == pytest.approx(short.naoa[0.5], abs=1e-3)  # the per-run scale cannot tell them apart
    chance, teacher = 12.0, 2.0
    good_s, short_s = (on_shared_scale(f, steps, chance, teacher) for f in (good, short))
    # good: the cutoff at t is 12 - 10 t bits, (8 - cutoff) / (8 - 2) of its own way
    for t in NAOA_THRESHOLDS:
        own = (good.initial - shared_cutoff(chance, teacher, t)) / (good.initial - good.final)
        assert good_s.naoa[t] == pytest.approx(crossing(good.midpoint, good.slope, own), abs=1e-9), t
    assert good_s.naoa[0.5] < good.naoa[0.5]  # 7 bits is a sixth of its own way down from 8
    known = on_shared_scale(word_acquisition(steps, sigmoid_curve(steps, 6.5, 2.0, 1.5, 4.0)), steps, chance, teacher)
    assert known.naoa[0.5] == 0.0 and not known.censored[0.5]  # 7 bits: passed before the first snapshot
    assert short_s.censored[0.9] and short_s.naoa[0.9] == pytest.approx(3.0)  # 3 bits: never below 5
    assert not good_s.censored[0.9] and good_s.naoa[0.9] < short_s.naoa[0.9]
    assert on_shared_scale(good, steps, 2.0, 2.0).status == "no_scale"
    failed = word_acquisition(steps, [7.0] * len(steps))
    assert on_shared_scale(failed, steps, chance, teacher) is failed


def test_chance_and_effective_vocabulary():
    occurrences = [WordOccurrence(0, "dog", (1,)), WordOccurrence(1, "dog", (2, 3)), WordOccurrence(0, "cat", (4,))]
    chance = chance_surprisals(occurrences, 256)
    assert chance == {"cat": 8.0, "dog": 12.0}  # 1 and 2 tokens of 8 bits each, averaged
    cutoffs = half_way({"cat": (8.0, 2.0), "dog": (12.0, 4.0)})
    assert cutoffs == {"cat": 5.0, "dog": 8.0}
    curve = [{"word:cat": 7.0, "word:dog": 11.0}, {"word:cat": 5.0, "word:dog": 9.0},
             {"word:cat": 4.0, "word:dog": 7.5}, {"word:cat": float("nan"), "word:dog": None}]
    assert effective_vocabulary(curve, cutoffs) == [0, 1, 2, 0]


# --- per category ---------------------------------------------------------------------------------


def _fit(status, naoa=None, censored=()):
    values = {t: (naoa if status == "fitted" else None) for t in NAOA_THRESHOLDS}
    return WordAcquisition(status, 9.0, 5.0, None, None, None, values, {t: t in censored for t in NAOA_THRESHOLDS})


def test_summary_averages_fitted_words_per_category_and_counts_the_rest():
    fits = {
        "dog": _fit("fitted", 1.0), "cat": _fit("fitted", 2.0, censored=(0.9, 0.95)), "ball": _fit("not_learned"),
        "run": _fit("fitted", 0.5), "see": _fit("fit_failed"),
        "red": _fit("too_few_points"),
        "the": _fit("fitted", 3.0),  # in no category: overall only
    }
    categories = {"dog": "noun", "cat": "noun", "ball": "noun", "run": "verb", "see": "verb", "red": "adjective"}
    out = naoa_summary(fits, categories, ["noun", "verb", "adjective", "name"])
    assert list(out) == ["overall", "noun", "verb", "adjective", "name"]
    noun = out["noun"]
    assert (noun["words"], noun["fitted"], noun["not_learned"], noun["fit_failed"], noun["too_few_points"]) == (
        3, 2, 1, 0, 0)
    assert noun["t50"] == pytest.approx(1.5) and noun["t95"] == pytest.approx(1.5)
    assert noun["censored"] == {"t50": 0, "t60": 0, "t70": 0, "t80": 0, "t90": 1, "t95": 1}
    assert out["verb"]["t70"] == pytest.approx(0.5) and out["verb"]["fit_failed"] == 1
    assert out["adjective"]["t50"] is None and out["adjective"]["too_few_points"] == 1
    assert out["name"] == {"words": 0, "fitted": 0, "not_learned": 0, "too_few_points": 0, "fit_failed": 0, "no_scale": 0,
                           **{threshold_key(t): None for t in NAOA_THRESHOLDS},
                           "censored": {threshold_key(t): 0 for t in NAOA_THRESHOLDS}}
    overall = out["overall"]
    assert overall["words"] == 7 and overall["fitted"] == 4 and overall["t80"] == pytest.approx((1 + 2 + 0.5 + 3) / 4)


def test_word_naoa_fits_every_curve():
    fits = word_naoa(LOG_STEPS, {"early": sigmoid_curve(LOG_STEPS, 9, 4, 1.0, 4.0),
                                 "late": sigmoid_curve(LOG_STEPS, 9, 4, 3.0, 4.0), "flat": [5.0] * len(LOG_STEPS)})
    assert fits["early"].naoa[0.5] == pytest.approx(1.0, abs=1e-5)
    assert fits["late"].naoa[0.5] == pytest.approx(3.0, abs=1e-5)
    assert fits["flat"].status == "not_learned"
    assert threshold_key(0.5) == "t50" and threshold_key(0.95) == "t95"


# --- tnd.mode: lm_only ------------------------------------------------------------------------------


def test_lm_only_needs_lm_steps_on_the_corpus():
    base = tiny_params(tnd={"mode": "lm_only", "lm_data": "corpus", "lm_steps_per_ppo_step": 3})
    assert parse_params(base).tnd.mode == "lm_only"
    for tnd in ({"lm_data": "demonstrations"}, {"lm_steps_per_ppo_step": 0}):
        with pytest.raises(ParamsError) as exc:
            parse_params(tiny_params(tnd={**base["tnd"], **tnd}))
        message = str(exc.value)
        assert "\n" not in message and "tnd.mode: lm_only" in message and "tnd.lm_data: corpus" in message
    with pytest.raises(ParamsError, match="distill.online learns from the teacher, which tnd.mode: lm_only"):
        parse_params(tiny_params(tnd=base["tnd"], distill={"online": True}))
    with pytest.raises(PPOConfigError, match="lm_only"):
        CustomPPOConfig(mode="lm_only", lm_steps_per_ppo_step=3)  # lm_data defaults to demonstrations
    config = CustomPPOConfig(mode="lm_only", lm_data="corpus", lm_steps_per_ppo_step=3)
    assert not config.uses_trials and not config.uses_demos and config.lm_steps == 3
    assert not config.reads_demo_cache and config.value_head_sometimes_unused
    assert CustomPPOConfig.from_params(parse_params(base)).mode == "lm_only"


def test_lm_only_changes_the_student_only_through_lm_steps_on_the_corpus(tokenizer):
    arch = tiny_arch()
    prompts = tiny_prompts(tokenizer, 2)
    corpus = [[tokenizer.bos_token_id, *tokenizer(s, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
              for s in SENTENCES[:3]]
    config = CustomPPOConfig(
        mode="lm_only", lm_data="corpus", lm_steps_per_ppo_step=2, lm_batch_size=3, lm_on_rollout=True, steps=3,
        batch_size=4, mini_batch_size=2, learning_rate=1e-2, max_new_tokens=4, kernel_backend="torch",
    )
    trainer = CustomPPOTrainer(build_causal_lm(arch, tokenizer, 1), build_causal_lm(arch, tokenizer, 2),
                               build_reward_model(arch, tokenizer, 3), config, prompts, tokenizer=tokenizer,
                               lm_dataset=corpus)
    student = lambda: {k: v.clone() for k, v in trainer.student.state_dict().items()}  # noqa: E731
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    value_head = {k: v.clone() for k, v in trainer.value_head.state_dict().items()}
    kl_coef, moments = trainer.kl_ctl.value, trainer.score_processor.state_dict()

    def no_ppo(*args, **kwargs):
        raise AssertionError("lm_only ran a PPO / distillation update")

    trainer._optimize = trainer.minibatch_loss = no_ppo
    updates, reads = [], []
    lm_update, lm_loss = trainer._lm_update, trainer.lm_loss

    def recorded_update(*args):
        before = student()
        loss = lm_update(*args)
        updates.append((before, student()))
        return loss

    trainer._lm_update = recorded_update
    trainer.lm_loss = lambda ids, mask, at: reads.append(ids[mask.bool()].tolist()) or lm_loss(ids, mask, at)
    start = student()
    for step in range(3):
        before = student()
        stats = trainer.step(trainer.next_prompts())
        mine = updates[2 * step: 2 * step + 2]
        assert len(mine) == 2  # lm_steps_per_ppo_step, and no LM step on the (monitoring) trials
        # nothing but the LM updates moved the student: the step starts where the first one starts and ends
        # where the last one ends, and each LM update starts where the one before ended
        assert same(before, mine[0][0]) and same(mine[0][1], mine[1][0]) and same(mine[1][1], student())
        assert math.isfinite(stats["loss/lm"]) and math.isnan(stats["loss/lm_rollout"])
        assert math.isnan(stats["loss/policy"]) and math.isnan(stats["loss/distill"]) and stats["ppo/epochs"] == 0
        assert math.isfinite(stats["env/reward_mean"])  # the trials are sampled and scored, for monitoring only
    corpus_tokens = {tok for seq in corpus for tok in seq}
    assert reads and all(set(r) <= corpus_tokens for r in reads)
    assert not same(start, student())
    assert all(torch.equal(v, value_head[k]) for k, v in trainer.value_head.state_dict().items())
    assert trainer.kl_ctl.value == kl_coef and trainer.score_processor.state_dict() == moments


# --- the stages: lm_only trains, log-spaced snapshots, evaluate's nAoA --------------------------------


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_lm_only_pipeline_keeps_the_papers_snapshots_and_evaluate_reports_naoa(tmp_path, monkeypatch):
    from stages import (cache_teacher_logits, evaluate, prepare_data, score_rewards, train_ppo, train_reward,
                        train_teacher)

    params = tiny_params(
        cache={"n_prompts": 16, "max_new_tokens": 8, "batch_size": 16},
        ppo={"steps": 12, "batch_size": 4, "mini_batch_size": 2, "save_every": 5, "max_new_tokens": 6},
        tnd={"mode": "lm_only", "lm_data": "corpus", "lm_steps_per_ppo_step": 2, "lm_batch_size": 8},
        student={"train": {"steps": 0}},  # from scratch, as the paper: the words have something to learn
        eval={"n_prompts": 6, "max_new_tokens": 6},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    for stage in (prepare_data, train_teacher, train_reward, cache_teacher_logits, score_rewards, train_ppo):
        stage.main([])
    kept = sorted(int(p.stem.removeprefix("step-")) for p in (tmp_path / "checkpoints/ppo/students").glob("*.pt"))
    assert kept == [2, 4, 6, 8, 10, 12]  # ppo.snapshot_schedule: paper, every 2 steps below 20
    rows = _read_csv(tmp_path / "plots/train.csv")
    assert all(r["loss/policy"] == "" and r["loss/lm"] != "" for r in rows)
    assert [int(float(r["student/updates"])) for r in rows] == [2 * s for s in range(1, 13)]  # 2 LM steps a step
    assert all(0.0 <= float(r["trials/grammaticality"]) <= 1.0 for r in rows)

    evaluate.main([])
    curve = _read_csv(tmp_path / "plots/eval_word_curve.csv")
    assert [int(r["step"]) for r in curve] == [0, 2, 4, 6, 8, 10, 12]
    assert [int(r["updates"]) for r in curve] == [0, 4, 8, 12, 16, 20, 24]  # nAoA's x-axis
    naoa = json.loads((tmp_path / "metrics/eval.json").read_text())["naoa"]
    assert set(naoa) == {"overall", "noun", "verb", "adjective", "name", "scale", "acquired"}
    assert naoa["scale"] == "shared" and naoa["acquired"] == int(curve[-1]["vocabulary"])
    overall = naoa["overall"]
    counted = (overall["fitted"] + overall["not_learned"] + overall["too_few_points"] + overall["fit_failed"]
               + overall["no_scale"])
    assert overall["words"] == counted == len([k for k in curve[0] if k.startswith("word:")])
    assert overall["too_few_points"] == 0 and overall["fitted"] > 0
    assert all(math.log10(4) <= overall[threshold_key(t)] <= math.log10(24) for t in NAOA_THRESHOLDS)
    by_threshold = _read_csv(tmp_path / "plots/eval_naoa.csv")
    assert [float(r["threshold"]) for r in by_threshold] == list(NAOA_THRESHOLDS)
    assert float(by_threshold[0]["overall"]) == pytest.approx(overall["t50"])
    words = _read_csv(tmp_path / "plots/eval_naoa_words.csv")
    assert len(words) == overall["words"] and sum(w["status"] == "fitted" for w in words) == overall["fitted"]
    assert (tmp_path / "eval/naoa.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "eval/effective_vocabulary.png").read_bytes()[:4] == b"\x89PNG"
    # lm_only samples trials for monitoring but never trains on them: nothing counts as practice
    assert _read_csv(tmp_path / "plots/train_trial_words.csv") == []
    practised = json.loads((tmp_path / "metrics/eval.json").read_text())["practice"]
    table = _read_csv(tmp_path / "plots/eval_practice.csv")
    assert practised["words"] == len(table) == overall["words"]
    assert all(int(r["trained_count"]) == 0 for r in table)
    assert practised["practised"] == 0 and practised["spearman_surprisal"] is None
    assert os.path.getsize(tmp_path / "eval/word_curve.png") > 0


# --- practice makes perfect ------------------------------------------------------------------


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks 0, 1.5, 1.5, 3 against y ranks 0, 1, 2, 3 -> 0.9487 (scipy's value)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2], [2, 1]) is None and spearman([5, 5, 5], [1, 2, 3]) is None


def test_word_counts_find_words_as_locate_words_does():
    assert word_counts(["The dog runs.", "dog-dog cat", "dogs"], ["dog", "runs", "bird"]) == {"dog": 3, "runs": 1}


def test_practice_sets_each_words_trial_count_against_how_well_it_is_known():
    final = {w: {"surprisal": s, "count": 1} for w, s in {"dog": 1.0, "cat": 2.0, "fish": 3.0, "ball": 4.0}.items()}
    fit = lambda half: WordAcquisition("fitted", 8.0, 1.0, half, 1.0, 0.0, {0.5: half}, {0.5: False})  # noqa: E731
    fits = {"dog": fit(0.2), "cat": fit(0.5), "fish": WordAcquisition("not_learned", 8.0, 7.95, None, None, None,
                                                                        {0.5: None}, {0.5: False})}
    rows, summary = practice({"dog": 30, "cat": 10, "fish": 2, "tree": 99}, final, fits)
    assert [(r["word"], r["trained_count"], r["naoa_t50"]) for r in rows] == [
        ("ball", 0, None), ("cat", 10, 0.5), ("dog", 30, 0.2), ("fish", 2, None)]
    assert summary == {"words": 4, "practised": 3, "spearman_surprisal": pytest.approx(-1.0),
                       "spearman_naoa_t50": None}  # two fitted words: too few for a correlation
