"""Reward model: loss, training objectives, loading checks, statistics and the two stages."""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tnd.config import ArchParams, RewardParams, RewardTrainParams
from tnd.data.tokenizer import encode, train_bpe
from tnd.data.sources import load_labelled_texts
from tnd.errors import TndError
from tnd.io import atomic_write_jsonl, read_jsonl
from tnd.models import llama_config, save_model
from tnd.reward import build_reward_model, load_reward_model, reward_stats, score_texts, score_token_ids
from tnd.trainers.reward import RewardTrainer, bradley_terry_loss

ARCH = ArchParams(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
WORDS = "the a cat dog sees likes runs big small red ball tree bird fish jumps".split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(_sentences(500, 0) + [s + " ." for s in _sentences(200, 1)], vocab_size=300)


def _cfg(objective: str = "pairwise", steps: int = 80, lr: float = 3e-3, margin: float = 0.0) -> RewardParams:
    train = RewardTrainParams(steps=steps, batch_size=16, learning_rate=lr, warmup_steps=5, max_length=16)
    return RewardParams(arch=ARCH, objective=objective, margin=margin, train=train)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326; -log sigmoid(-1) = log(1 + e) = 1.31326
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.813262, abs=1e-5)
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2
    assert bradley_terry_loss(chosen, rejected, margin=0.5).item() == pytest.approx(with_margin, abs=1e-6)


def test_pairwise_training_beats_chance(tokenizer):
    # chosen ends with " .", rejected is the same sentence without it
    pairs = [{"chosen": s + " .", "rejected": s, "kind": "no_stop"} for s in _sentences(300, 2)]
    held_out = [{"chosen": s + " .", "rejected": s, "kind": "no_stop"} for s in _sentences(80, 3)]
    model = build_reward_model(ARCH, tokenizer, seed=0)
    trainer = RewardTrainer(model, tokenizer, _cfg(), seed=0)
    logged = []
    out = trainer.train(pairs, on_log=lambda metrics, step: logged.append(step), log_every=20)
    assert math.isfinite(out["train_loss"]) and logged == [20, 40, 60, 80]
    metrics = trainer.evaluate(held_out)
    assert metrics["pairwise_accuracy"] >= 0.9
    assert metrics["pairwise_accuracy_no_stop"] == metrics["pairwise_accuracy"]
    assert metrics["n_eval_pairs"] == 80


def test_training_is_deterministic(tokenizer):
    pairs = [{"chosen": s + " .", "rejected": s, "kind": "k"} for s in _sentences(50, 4)]
    scores = []
    for _ in range(2):
        model = build_reward_model(ARCH, tokenizer, seed=1)
        RewardTrainer(model, tokenizer, _cfg(steps=5), seed=1).train(pairs)
        scores.append(score_texts(model, tokenizer, ["the cat runs", "a dog"]))
    assert torch.equal(scores[0], scores[1])


def test_regression_reduces_mse(tokenizer, tmp_path):
    rows = [{"text": s, "score": float(len(s.split()))} for s in _sentences(300, 5)]
    path = tmp_path / "labelled.jsonl"
    atomic_write_jsonl(path, rows)
    labelled = load_labelled_texts(path, "text", "score")
    assert labelled[0] == {"text": rows[0]["text"], "label": rows[0]["score"]}
    train, held_out = labelled[:250], labelled[250:]
    model = build_reward_model(ARCH, tokenizer, seed=0)
    trainer = RewardTrainer(model, tokenizer, _cfg("regression", steps=120, lr=5e-3), seed=0)
    before = trainer.evaluate(held_out)
    trainer.train(train)
    after = trainer.evaluate(held_out)
    assert after["mse"] < 0.5 * before["mse"]
    assert after["pearson"] > 0.5


def _age_rows(tokenizer, n: int = 24) -> list[dict]:
    """Rows as sample_ages writes them, from an untrained LM (mostly unfinished samples, like step 1's)."""
    from tnd.evaluation import sample_rows
    from tnd.models import build_causal_lm

    lm = build_causal_lm(ARCH, tokenizer, 0)
    prompts = [[tokenizer.bos_token_id] + encode(tokenizer, s)[:2] for s in _sentences(n, 10)]
    samples = sample_rows(lm, tokenizer, prompts, 6, seed=0, desc="age rows")
    assert sum(not s["ended"] for s in samples) > n // 2
    return [{"text": s["text"], "ids": s["prompt_ids"] + s["continuation_ids"], "label": float(i % 3)}
            for i, s in enumerate(samples)]


def test_an_age_row_trains_and_is_evaluated_on_the_ids_ppo_scores(tokenizer, monkeypatch):
    """The age model learns each sample as PPO scores that trial (score_token_ids: bos + prompt + the
    sampled ids, no eos unless it ended): not the decoded text re-tokenized with an eos appended."""
    from tnd import reward as scoring
    from tnd.trainers import reward as training

    rows = _age_rows(tokenizer)
    scored = {tuple(scoring.with_bos(row["ids"], tokenizer)) for row in rows}
    seen: list[tuple[int, ...]] = []
    real_collate = scoring.collate
    for module in (scoring, training):  # validation scores through tnd.reward, training batches are collated here
        monkeypatch.setattr(module, "collate",
                            lambda seqs, pad: seen.extend(map(tuple, seqs)) or real_collate(seqs, pad))
    model = build_reward_model(ARCH, tokenizer, seed=0)
    trainer = RewardTrainer(model, tokenizer, _cfg("age", steps=6), seed=0)
    trainer.train(rows[:16], eval_rows=rows[16:])
    assert seen and set(seen) <= scored  # training batches and validation
    labels = torch.tensor([row["label"] for row in rows])
    ppo = score_token_ids(model, tokenizer, [row["ids"] for row in rows])
    assert trainer.evaluate(rows)["mse"] == pytest.approx(float(((ppo - labels) ** 2).mean()), rel=1e-5)


def test_labelled_texts_split_three_ways_and_none_is_dropped():
    """Test rows (reported) apart from validation rows (early stop, kept weights); data.n_train, the corpus's
    cap, drops none of 24,000 age texts (12 checkpoints x 2,000; it once kept 20,000 without a word)."""
    from stages.train_reward import split_labelled
    from tnd.config import Params

    rows = [{"text": f"t{i}", "label": float(i % 12)} for i in range(24_000)]
    train, valid, test = split_labelled(rows, Params())
    assert (len(train), len(valid), len(test)) == (24_000 - 256 - 1000, 256, 1000)  # eval_size, data.n_eval
    texts = [{r["text"] for r in part} for part in (train, valid, test)]
    assert set.union(*texts) == {r["text"] for r in rows} and sum(map(len, texts)) == len(rows)
    assert [len(part) for part in split_labelled(rows[:40], Params())] == [32, 4, 4]  # a tenth each
    assert [len(part) for part in split_labelled(rows[:9], Params())] == [8, 0, 1]  # too few to validate on
    assert [len(part) for part in split_labelled(rows[:40], Params(reward={"train": {"eval_every": 0}}))] == [36, 0, 4]
    assert split_labelled(rows, Params())[2] == test  # seeded


def test_labelled_texts_need_a_numeric_field(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nthe cat runs,1.5\na dog,oops\n")
    with pytest.raises(TndError, match=r"row 3 has label = \"oops\", not a finite number"):
        load_labelled_texts(path, "text", "label")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "the cat runs", "label": 1}\n\n{"text": "a dog"}\n')
    with pytest.raises(TndError, match="reward.label_field: .* has no field 'label' at line 3"):
        load_labelled_texts(jsonl, "text", "label")
    with pytest.raises(TndError, match="no field 'score'.*reward.label_field"):
        load_labelled_texts(path, "text", "score")
    with pytest.raises(TndError, match="local .jsonl or .csv"):
        load_labelled_texts(tmp_path / "data.parquet", "text", "label")


def test_load_reward_model_round_trip(tokenizer, tmp_path):
    model = build_reward_model(ARCH, tokenizer, seed=0)
    save_model(model, tokenizer, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm", tokenizer)
    texts = ["the cat runs", "a big red ball sees the dog"]
    assert torch.allclose(score_texts(model, tokenizer, texts), score_texts(loaded, tokenizer, texts))


def test_load_reward_model_refuses_two_labels(tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(llama_config(ARCH, tokenizer, num_labels=2))
    save_model(model, tokenizer, tmp_path / "rm")
    with pytest.raises(TndError, match="num_labels=2.*needs exactly 1"):
        load_reward_model(tmp_path / "rm", tokenizer)


def test_load_reward_model_refuses_a_small_vocabulary(tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    config = llama_config(ARCH, tokenizer, num_labels=1)
    config.vocab_size = len(tokenizer) - 10
    save_model(LlamaForSequenceClassification(config), tokenizer, tmp_path / "rm")
    with pytest.raises(TndError, match=r"vocabulary \(\d+\) is smaller than the tokenizer's"):
        load_reward_model(tmp_path / "rm", tokenizer)


def test_load_reward_model_names_a_missing_model(tokenizer, tmp_path):
    with pytest.raises(TndError, match="could not load a sequence classifier.*reward.source"):
        load_reward_model(tmp_path / "nothing", tokenizer)


def test_token_ids_score_like_texts(tokenizer):
    model = build_reward_model(ARCH, tokenizer, seed=0)
    texts = ["the cat runs", "a big red ball sees the dog", "fish"]
    ids = [encode(tokenizer, t) + [tokenizer.eos_token_id] for t in texts]  # no bos: it is added
    by_ids = score_token_ids(model, tokenizer, [torch.tensor(x) for x in ids], batch_size=2)
    by_text = score_texts(model, tokenizer, texts, batch_size=3)
    assert by_ids.dtype == torch.float32 and by_ids.shape == (3,)
    assert torch.allclose(by_ids, by_text, atol=1e-5)
    # padding in a batch does not change a score
    alone = torch.cat([score_texts(model, tokenizer, [t]) for t in texts])
    assert torch.allclose(alone, by_text, atol=1e-5)


def _ppo_scores(model, tokenizer, sequences):
    """CustomPPOTrainer.compute_scores on `sequences`, without building a whole trainer."""
    from tnd.trainers.ppo import CustomPPOTrainer

    trainer = SimpleNamespace(reward_model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                              bos_id=tokenizer.bos_token_id, pad_id=tokenizer.pad_token_id,
                              accelerator=SimpleNamespace(autocast=contextlib.nullcontext))  # no mixed precision
    return CustomPPOTrainer.compute_scores(trainer, sequences)


def test_ppo_and_the_scorer_give_the_same_rewards(tokenizer):
    """One function scores for PPO, score_rewards and evaluate: bos put in front once, in one place."""
    model = build_reward_model(ARCH, tokenizer, seed=0)
    bos = tokenizer.bos_token_id
    sequences = [encode(tokenizer, "the cat runs"), [bos] + encode(tokenizer, "a big red ball sees the dog"), []]
    torch.testing.assert_close(_ppo_scores(model, tokenizer, sequences), score_token_ids(model, tokenizer, sequences))
    with_bos = score_token_ids(model, tokenizer, [[bos] + sequences[0]])
    assert torch.equal(score_token_ids(model, tokenizer, sequences[:1]), with_bos)  # bos is not doubled


def test_a_sequence_longer_than_the_reward_model_is_refused_not_cut(tokenizer):
    model = build_reward_model(ARCH, tokenizer, seed=0)  # 64 positions
    too_long = encode(tokenizer, " ".join(["the cat runs"] * 30))
    assert len(too_long) >= 64
    with pytest.raises(TndError, match=r"^reward: a sequence of \d+ tokens .* max_position_embeddings \(64\); lower"):
        score_token_ids(model, tokenizer, [too_long])


def test_an_id_the_reward_model_lacks_is_a_clear_error(tokenizer):
    model = build_reward_model(ARCH, tokenizer, seed=0)
    n = len(tokenizer)
    with pytest.raises(TndError, match=rf"token id {n + 3} is outside the reward model's {n} embeddings"):
        score_token_ids(model, tokenizer, [[5, 6], [7, n + 3]])


def test_reward_stats_ignore_and_count_nonfinite():
    stats = reward_stats(torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0, float("-inf")]))
    assert stats["count"] == 6 and stats["nan_count"] == 3 and stats["nonfinite_fraction"] == 0.5
    assert stats["mean"] == pytest.approx(2.0) and stats["min"] == 1.0 and stats["max"] == 3.0
    assert stats["std"] == pytest.approx(math.sqrt(2 / 3))
    assert stats["q50"] == pytest.approx(2.0) and stats["q05"] == pytest.approx(1.1)
    assert set(stats) >= {"q05", "q25", "q50", "q75", "q95"}
    empty = reward_stats(torch.tensor([float("nan")]))
    assert empty["nan_count"] == 1 and empty["mean"] is None
    json.dumps(empty)  # still valid JSON


# --- score_rewards stage (the teacher cache is faked: only its reading API is used) ----------


@pytest.fixture
def scoring_project(project, tokenizer):
    """A project with a tokenizer, eval texts, a saved reward model and a fake 10-demo cache."""
    tokenizer.save_pretrained(project.path / "artifacts/tokenizer")
    atomic_write_jsonl(project.path / "data/prepared/eval.jsonl", ({"text": t} for t in _sentences(7, 6)))
    save_model(build_reward_model(ARCH, tokenizer, seed=0), tokenizer, project.path / "models/reward")
    demos = [encode(tokenizer, t) + [tokenizer.eos_token_id] for t in _sentences(10, 7)]

    class FakeCache:
        def __init__(self, path, tokenizer_fingerprint=None, **kwargs):
            assert Path(path) == Path("cache/teacher") and tokenizer_fingerprint

        def __len__(self):
            return len(demos)

        def __getitem__(self, i):
            return SimpleNamespace(input_ids=torch.tensor(demos[i], dtype=torch.int32), prompt_len=2)

    from stages import score_rewards

    project.demos = demos
    project.write(ppo={"max_nonfinite_reward_fraction": 0.25})
    return project, score_rewards, FakeCache


def test_score_rewards_writes_the_statistics_ppo_uses(scoring_project, monkeypatch, tokenizer):
    project, stage, fake = scoring_project
    monkeypatch.setattr(stage, "TeacherCache", fake)
    stage.main([])
    assert not (project.path / "cache/rewards").exists()  # per-demonstration rewards: no stage read them
    model = load_reward_model(project.path / "models/reward", tokenizer)
    rewards = score_token_ids(model, tokenizer, project.demos)
    metrics = json.loads((project.path / "metrics/rewards.json").read_text())
    assert metrics["demonstrations"]["count"] == 10 and metrics["demonstrations"]["nan_count"] == 0
    assert metrics["eval"]["count"] == 7 and metrics["eval"]["truncated"] == 0
    assert metrics["demonstrations"]["mean"] == pytest.approx(rewards.mean().item(), abs=1e-5)


def test_stored_demonstration_rewards_are_the_ones_ppo_computes(scoring_project, monkeypatch, tokenizer):
    """A demonstration longer than reward.train.max_length (48) is scored whole, as PPO scores its trials;
    an eval text longer than it is cut as in reward training, and counted."""
    project, stage, fake = scoring_project
    monkeypatch.setattr(stage, "TeacherCache", fake)
    long_demo = encode(tokenizer, " ".join(_sentences(12, 10)))[:58] + [tokenizer.eos_token_id]
    assert 48 < len(long_demo) + 1 <= 64  # bos + demo fits the reward model, not reward.train.max_length
    project.demos[:] = [long_demo]
    rows = read_jsonl(project.path / "data/prepared/eval.jsonl") + [{"text": " ".join(_sentences(12, 11))}]
    atomic_write_jsonl(project.path / "data/prepared/eval.jsonl", rows)
    stage.main([])
    metrics = json.loads((project.path / "metrics/rewards.json").read_text())
    model = load_reward_model(project.path / "models/reward", tokenizer)
    ppo = _ppo_scores(model, tokenizer, [long_demo]).item()
    assert metrics["demonstrations"]["mean"] == pytest.approx(ppo, abs=1e-5)
    assert metrics["eval"]["count"] == 8 and metrics["eval"]["truncated"] == 1


def test_score_rewards_counts_a_few_nonfinite(scoring_project, monkeypatch):
    project, stage, fake = scoring_project
    monkeypatch.setattr(stage, "TeacherCache", fake)
    real = stage.score_token_ids
    kept = []

    def some_nans(*args, **kwargs):
        out = real(*args, **kwargs)
        out[3] = float("nan")
        out[5] = float("inf")
        kept.append(out)
        return out

    monkeypatch.setattr(stage, "score_token_ids", some_nans)
    stage.main([])  # 2 of 10 = 20% <= 25%
    rewards = kept[0]  # the demonstrations' (the eval texts go through score_texts)
    stats = json.loads((project.path / "metrics/rewards.json").read_text())["demonstrations"]
    assert stats["count"] == 10 and stats["nan_count"] == 2 and math.isfinite(stats["mean"])
    assert stats["mean"] == pytest.approx(rewards[torch.isfinite(rewards)].mean().item(), abs=1e-5)


def test_score_rewards_fails_above_the_nonfinite_limit(scoring_project, monkeypatch, capsys):
    project, stage, fake = scoring_project
    monkeypatch.setattr(stage, "TeacherCache", fake)
    monkeypatch.setattr(stage, "score_token_ids", lambda model, tok, seqs, *a, **k: torch.full((len(seqs),), float("nan")))
    with pytest.raises(SystemExit) as exit_info:
        stage.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "10 of 10 demonstration rewards are not finite" in err and "max_nonfinite_reward_fraction = 0.25" in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "not finite" in error_lines[0]
    assert not (project.path / "metrics/rewards.json").exists()


# --- train_reward stage, end to end on tiny params -------------------------------------------


@pytest.mark.slow
def test_train_reward_stage(project):
    from stages import prepare_data, train_reward

    prepare_data.main([])
    train_reward.main([])
    metrics = json.loads((project.path / "metrics/reward.json").read_text())
    assert metrics["objective"] == "pairwise" and 0 <= metrics["pairwise_accuracy"] <= 1
    kinds = ("agreement_swap", "adjacent_swap", "drop_word", "duplicate_word")
    assert all(f"pairwise_accuracy_{k}" in metrics for k in kinds)
    assert all(f"fresh_accuracy_{k}" in metrics for k in kinds) and metrics["fresh_pairs"] > 0
    assert metrics["held_out_kinds"] == "adjacent_swap"
    from tnd.data.tokenizer import load_tokenizer

    stage_tokenizer = load_tokenizer(project.path / "artifacts/tokenizer")
    model = load_reward_model(project.path / "models/reward", stage_tokenizer)
    assert model.config.num_labels == 1


@pytest.mark.slow
def test_train_reward_stage_regression(project):
    from stages import prepare_data, train_reward

    rows = [{"text": s, "label": float(len(s.split()))} for s in _sentences(120, 8)]
    atomic_write_jsonl(project.path / "labelled.jsonl", rows)
    project.write(data={"source": "labelled.jsonl"}, reward={"objective": "regression"})
    prepare_data.main([])
    train_reward.main([])
    metrics = json.loads((project.path / "metrics/reward.json").read_text())
    assert metrics["objective"] == "regression" and metrics["mse"] >= 0 and "fresh_accuracy" not in metrics
    assert (project.path / "models/reward/model.safetensors").is_file()


@pytest.mark.slow
def test_train_reward_stage_missing_label_field(project, capsys):
    from stages import prepare_data, train_reward

    atomic_write_jsonl(project.path / "texts.jsonl", ({"text": s} for s in _sentences(60, 9)))
    project.write(data={"source": "texts.jsonl"}, reward={"objective": "regression", "label_field": "grade"})
    prepare_data.main([])
    with pytest.raises(SystemExit) as exit_info:
        train_reward.main([])
    assert exit_info.value.code == 2
    assert "no field 'grade'" in capsys.readouterr().err
