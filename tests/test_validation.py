"""Held-out validation, early stopping and the best checkpoint kept, in LM pretraining (teacher, student
warm-up) and reward training, on a small corpus of real English that the tests build (tests/real_text.py):
160 training sentences, which the default-sized loops would memorise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.real_text import sentences
from tnd.config import ArchParams, LMTrainParams, RewardParams, RewardTrainParams
from tnd.data.pairs import make_pairs
from tnd.data.tokenizer import train_bpe
from tnd.models import build_causal_lm
from tnd.trainers.lm import perplexity, pretrain_lm
from tnd.reward import build_reward_model, score_texts
from tnd.trainers.reward import RewardTrainer, bradley_terry_loss

TEACHER = ArchParams(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=32)
STUDENT = ArchParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=32)
EPOCH = 10  # steps of one pass over the 160 training texts at batch size 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread buys nothing, and on a busy machine it costs several times the run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    texts = sentences(200)
    return texts[40:], texts[:40]  # train, held out


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(corpus[0], vocab_size=600)


def lm_cfg(**overrides) -> LMTrainParams:
    base = dict(batch_size=16, learning_rate=3e-3, warmup_steps=10, max_length=32, eval_every=50, eval_size=64)
    return LMTrainParams(**{**base, **overrides})


def test_early_stopping_keeps_a_teacher_that_beats_the_initial_student(corpus, tokenizer):
    train, held_out = corpus
    # The student's warm-up, as train_ppo runs it (validated too): 80 steps, 8 passes over the data.
    student = build_causal_lm(STUDENT, tokenizer, seed=0)
    pretrain_lm(student, tokenizer, train, lm_cfg(steps=80), seed=0, eval_texts=held_out)
    student_ppl = perplexity(student, tokenizer, held_out, 32)

    # The teacher is asked for 600 steps (60 passes): run to the end it memorises the 160 texts and ends far
    # worse than the student on held-out text (perplexity ~450 against ~170 with Python 3.11's docstrings).
    teacher = build_causal_lm(TEACHER, tokenizer, seed=0)
    curve: list[dict] = []
    out = pretrain_lm(teacher, tokenizer, train, lm_cfg(steps=600, patience=3), seed=0, eval_texts=held_out,
                      on_eval=curve.append)

    # Validated every epoch (eval_every is 50, an epoch 10 steps); stopped 3 validations after the best, once
    # the held-out loss had turned up.
    assert [row["step"] for row in curve] == list(range(EPOCH, out["steps_run"] + 1, EPOCH))
    assert out["stopped_early"] and out["steps_run"] == out["best_step"] + 3 * EPOCH < 600
    best = min(curve, key=lambda row: row["eval_loss"])
    assert out["best_step"] == best["step"] and out["best_eval_loss"] == best["eval_loss"]
    assert curve[-1]["eval_loss"] > best["eval_loss"] and curve[-1]["train_loss"] < best["train_loss"]  # overfitting
    assert all(row["best_step"] <= row["step"] for row in curve) and curve[-1]["best_step"] == best["step"]

    # The teacher kept is the best validation's, not the last step's ...
    teacher_ppl = perplexity(teacher, tokenizer, held_out, 32)
    assert teacher_ppl == pytest.approx(out["best_eval_perplexity"], rel=1e-5)
    assert teacher_ppl == pytest.approx(math.exp(best["eval_loss"]), rel=1e-5)
    # ... and it beats the student it is meant to teach.
    assert teacher_ppl < 0.8 * student_ppl, (teacher_ppl, student_ppl)


def test_validation_changes_nothing_in_the_steps_it_lets_run(corpus, tokenizer):
    # Validation draws no random numbers and leaves the model in training mode: with no early stop and the
    # last weights kept, the model is bit for bit the one trained without validation.
    train, held_out = corpus
    models = []
    for cfg in (lm_cfg(steps=12, eval_every=0), lm_cfg(steps=12, eval_every=4, patience=0, keep_best=False)):
        model = build_causal_lm(STUDENT.model_copy(update={"dropout": 0.1}), tokenizer, seed=0)
        curve: list[dict] = []
        out = pretrain_lm(model, tokenizer, train, cfg, seed=0, eval_texts=held_out, on_eval=curve.append)
        models.append(model)
        assert out["steps_run"] == 12 and not out["stopped_early"]
        assert [row["step"] for row in curve] == ([4, 8, 12] if cfg.eval_every else [])
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_without_held_out_texts_nothing_is_validated(corpus, tokenizer):
    train, _ = corpus
    model = build_causal_lm(STUDENT, tokenizer, seed=0)
    out = pretrain_lm(model, tokenizer, train, lm_cfg(steps=4), seed=0)
    assert out.keys() == {"train_loss", "steps_run", "stopped_early"} and out["steps_run"] == 4


def test_reward_training_stops_and_keeps_its_best_validation(corpus, tokenizer):
    # Word-level corruptions of real sentences (prepare_data's pairs on data other than nursery): 160
    # training pairs are learnt by heart (training loss to ~0.1) while held-out pairs stay near chance,
    # the case the reward_near_chance health check is for.
    train, held_out = corpus
    kinds = ["adjacent_swap", "drop_word", "duplicate_word"]
    pairs = make_pairs(train, kinds, seed=0, use_grammar=False)
    held_out_pairs = make_pairs(held_out, kinds, seed=1, use_grammar=False)
    cfg = RewardTrainParams(steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=10, max_length=32,
                            eval_every=10, eval_size=64, patience=3)
    trainer = RewardTrainer(build_reward_model(STUDENT, tokenizer, seed=0), tokenizer,
                            RewardParams(arch=STUDENT, train=cfg), seed=0)
    curve: list[dict] = []
    out = trainer.train(pairs, eval_rows=held_out_pairs, on_eval=curve.append)

    assert out["stopped_early"] and out["steps_run"] == out["best_step"] + 3 * 10 < 300
    best = min(curve, key=lambda row: row["eval_loss"])
    assert out["best_step"] == best["step"] and out["best_eval_accuracy"] == best["eval_accuracy"]
    assert curve[-1]["eval_loss"] > best["eval_loss"]
    # The model kept is the best validation's: the held-out figures are those of that validation.
    chosen = score_texts(trainer.model, tokenizer, [p["chosen"] for p in held_out_pairs], max_length=32)
    rejected = score_texts(trainer.model, tokenizer, [p["rejected"] for p in held_out_pairs], max_length=32)
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(best["eval_loss"], rel=1e-5)
    assert trainer.evaluate(held_out_pairs)["pairwise_accuracy"] == pytest.approx(best["eval_accuracy"])
    assert set(best) >= {"step", "train_loss", "eval_loss", "eval_accuracy", "best_step"}


def validation_figure(project_path, stage: str) -> float:
    """The saved teacher's perplexity (reward model: pairwise accuracy) on the rows it was validated on."""
    from stages.common import REWARD, TEACHER, TOKENIZER
    from tnd.config import load_params
    from tnd.data.tokenizer import load_tokenizer
    from tnd.io import read_jsonl
    from tnd.models import load_causal_lm
    from tnd.reward import load_reward_model

    params = load_params(project_path / "params.yaml", quiet=True)
    tokenizer = load_tokenizer(project_path / TOKENIZER)
    prepared = project_path / "data/prepared"
    if stage == "teacher":
        texts = [row["text"] for row in read_jsonl(prepared / "valid.jsonl")][: params.teacher.train.eval_size]
        model = load_causal_lm(str(project_path / TEACHER), tokenizer, role="teacher")
        return perplexity(model, tokenizer, texts, params.teacher.train.max_length)
    rows = read_jsonl(prepared / "pairs_valid.jsonl")[: params.reward.train.eval_size]
    model = load_reward_model(str(project_path / REWARD), tokenizer)
    return RewardTrainer(model, tokenizer, params.reward, params.seed).evaluate(rows)["pairwise_accuracy"]


def test_the_teacher_selects_on_the_validation_split_and_reports_on_the_eval_split(project, monkeypatch):
    # Finding 4c: eval.jsonl picked the teacher's (and warm-up's, reward model's) best checkpoint and was then
    # reported by evaluate and health. Now the validation split (valid.jsonl, pairs_valid.jsonl) selects.
    from stages import prepare_data, train_teacher
    from stages.common import TEACHER, TOKENIZER
    from tnd.config import load_params
    from tnd.data.tokenizer import load_tokenizer
    from tnd.io import read_jsonl
    from tnd.models import load_causal_lm

    seen: dict = {}

    def fake_pretrain(model, tokenizer, texts, cfg, seed, eval_texts=None, **kwargs):
        seen["teacher"] = list(eval_texts)
        return {}

    monkeypatch.setattr(train_teacher, "pretrain_lm", fake_pretrain)
    prepare_data.main([])
    prepared = project.path / "data/prepared"
    valid = [row["text"] for row in read_jsonl(prepared / "valid.jsonl")]
    test = [row["text"] for row in read_jsonl(prepared / "eval.jsonl")]
    assert valid and test and not set(valid) & set(test)

    train_teacher.main([])
    assert seen["teacher"] == valid
    reported = json.loads((project.path / "metrics/teacher.json").read_text())["eval_perplexity"]
    tokenizer = load_tokenizer(project.path / TOKENIZER)
    teacher = load_causal_lm(str(project.path / TEACHER), tokenizer, role="teacher")
    max_length = load_params(project.path / "params.yaml", quiet=True).teacher.train.max_length
    assert reported == pytest.approx(perplexity(teacher, tokenizer, test, max_length), rel=1e-6)  # the eval split


def test_the_reward_model_selects_on_the_validation_pairs_and_reports_on_the_eval_pairs(project, monkeypatch):
    from stages import prepare_data, train_reward
    from tnd.io import read_jsonl

    seen: dict = {}

    def fake_train(self, rows, eval_rows=None, **kwargs):
        seen["reward"] = list(eval_rows)
        return {}

    monkeypatch.setattr(train_reward.RewardTrainer, "train", fake_train)
    prepare_data.main([])
    prepared = project.path / "data/prepared"
    train_reward.main([])
    pairs_valid, pairs_eval = read_jsonl(prepared / "pairs_valid.jsonl"), read_jsonl(prepared / "pairs_eval.jsonl")
    assert seen["reward"] == pairs_valid
    assert not {p["chosen"] for p in pairs_valid} & {p["chosen"] for p in pairs_eval}
    assert json.loads((project.path / "metrics/reward.json").read_text())["n_eval_pairs"] == len(pairs_eval)


@pytest.mark.slow
def test_the_stages_save_the_best_validation_and_its_curve(project):
    import csv

    import mlflow

    from stages import prepare_data, train_reward, train_teacher

    project.write(teacher={"train": {"steps": 12, "eval_every": 4}}, reward={"train": {"steps": 12, "eval_every": 4}},
                  # an absolute store: MLflow caches stores by URI, and a relative one may still point at the
                  # directory an earlier test ran in
                  tracking={"enabled": True, "uri": f"sqlite:///{project.path}/mlflow.db", "experiment": "validation",
                            "log_models": False, "system_metrics_interval": 0})
    prepare_data.main([])
    train_teacher.main([])
    train_reward.main([])

    p = project.path
    for stage, held_out, final in (("teacher", "eval_perplexity", "eval_perplexity"),
                                   ("reward", "eval_accuracy", "pairwise_accuracy")):
        with open(p / f"plots/{stage}_validation.csv", newline="") as handle:
            curve = list(csv.DictReader(handle))
        assert list(curve[0]) == ["step", "train_loss", "eval_loss", held_out, "best_step"], stage
        assert [int(row["step"]) for row in curve] == [4, 8, 12], stage
        metrics = json.loads((p / f"metrics/{stage}.json").read_text())
        assert metrics["steps_run"] == 12 and metrics["stopped_early"] is False
        assert metrics["best_step"] == int(curve[-1]["best_step"])
        # the saved model is the best validation's: its figure on the validation rows it was chosen on is the
        # best validation's (the reported `final` is on the eval split, which chose nothing)
        best = next(row for row in curve if int(row["step"]) == metrics["best_step"])
        assert validation_figure(p, stage) == pytest.approx(float(best[held_out]), rel=1e-5), stage
        assert metrics[final] > 0, stage

    mlflow.set_tracking_uri(f"sqlite:///{p}/mlflow.db")
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["validation"], output_format="list")
    teacher_run = next(r for r in runs if r.data.tags["stage"] == "train_teacher")
    history = client.get_metric_history(teacher_run.info.run_id, "validation/eval_loss")
    assert [m.step for m in history] == [4, 8, 12]


def test_training_under_bf16_autocast_keeps_fp32_weights_and_the_models_own_forward(
        corpus, tokenizer, fresh_accelerate_state):
    """engine.mixed_precision: bf16 in the teacher / warm-up / reward loop (tnd/trainers/fit.py), on CPU."""
    from tnd.engine import make_accelerator

    model = build_causal_lm(STUDENT, tokenizer, seed=0)
    dtypes = []
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    out = pretrain_lm(model, tokenizer, corpus[0], lm_cfg(steps=3, eval_every=0), seed=0,
                      accelerator=make_accelerator("bf16"))
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the forward ran under bf16 autocast ...
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # ... on fp32 weights
    assert math.isfinite(out["train_loss"]) and out["steps_run"] == 3
    dtypes.clear()
    with torch.no_grad():  # after training, the model's own forward again: no autocast left patched in
        model(input_ids=torch.tensor([[tokenizer.bos_token_id, 5, 6]]))
    assert dtypes == [torch.float32]
