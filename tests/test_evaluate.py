"""The evaluate stage's measures on hand examples, and the stage end to end on tiny params."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tnd.config import ArchParams
from tnd.data import nursery
from tnd.data.tokenizer import train_bpe
from tnd.evaluation import (
    WordOccurrence,
    chance_surprisals,
    distinct_n,
    locate_words,
    mean_word_surprisal,
    perplexity_from_logprobs,
    sequence_logprobs,
    spearman,
    target_logprobs,
    token_kl,
    word_category,
    word_surprisals,
)
from tnd.io import read_jsonl
from tnd.models import build_causal_lm

TINY_ARCH = ArchParams(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def tokenizer():
    # A small vocabulary, so that rarer words are spelled with several tokens.
    return train_bpe(nursery.generate_sentences(300, seed=0), vocab_size=300)


# --- distinct-n -------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    texts = ["the dog runs", "the dog sleeps"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the dog runs sleeps / 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the dog) twice, (dog runs), (dog sleeps)
    assert distinct_n(["a b", "c"], 2) == 1.0  # n-grams never cross texts
    assert distinct_n([], 1) == 0.0 and distinct_n(["one"], 2) == 0.0


# --- word surprisal ---------------------------------------------------------------------------


def test_surprisal_of_a_word_spelled_with_two_tokens_sums_its_tokens():
    # bos w1 w2a w2b eos: the word's tokens are positions 2 and 3.
    logprobs = [torch.tensor([0.0, math.log(0.5), math.log(0.25), math.log(0.5), math.log(0.9)], dtype=torch.float64)]
    occurrences = [WordOccurrence(0, "doggy", (2, 3)), WordOccurrence(0, "the", (1,))]
    result = word_surprisals(logprobs, occurrences)
    assert result["doggy"] == {"count": 1, "surprisal": pytest.approx(3.0)}  # 2 bits + 1 bit
    assert result["the"]["surprisal"] == pytest.approx(1.0)
    # two occurrences average
    twice = word_surprisals(logprobs * 2, [WordOccurrence(0, "the", (1,)), WordOccurrence(1, "the", (2,))])
    assert twice["the"] == {"count": 2, "surprisal": pytest.approx(1.5)}
    assert mean_word_surprisal(result) == pytest.approx(2.0)
    assert mean_word_surprisal({}) is None


def test_locate_words_finds_every_token_of_a_multi_token_word(tokenizer):
    multi = next(
        w for w in nursery.CONTENT_WORDS
        if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 2
    )
    text = f"the {multi} is big."
    sequences, occurrences = locate_words(tokenizer, [text, "nothing here"], [multi, "big", "absent"], max_length=48)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sequences[0] == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    found = {occ.word: occ for occ in occurrences}
    assert set(found) == {multi, "big"}
    word_tokens = tokenizer(" " + multi, add_special_tokens=False)["input_ids"]
    assert [sequences[0][p] for p in found[multi].positions] == word_tokens
    assert tokenizer.decode([sequences[0][p] for p in found["big"].positions]).strip() == "big"
    # cut off by max_length: the word is left out, never counted half
    _, cut = locate_words(tokenizer, [text], [multi], max_length=found[multi].positions[-1])
    assert cut == []


def test_word_surprisal_matches_the_model_by_hand(tokenizer):
    model = build_causal_lm(TINY_ARCH, tokenizer, seed=0).eval()
    text = "the dog is big."
    # as the evaluate stage computes it: locate, score every token, sum per occurrence
    sequences, occurrences = locate_words(tokenizer, [text, "nothing here"], ["dog", "big"], 48)
    result = word_surprisals(sequence_logprobs(model, sequences, tokenizer.pad_token_id), occurrences)
    ids = torch.tensor([sequences[0]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    dog = next(occ for occ in occurrences if occ.word == "dog")
    expected = -sum(float(logp[p - 1, sequences[0][p]]) for p in dog.positions) / math.log(2)
    assert result["dog"]["surprisal"] == pytest.approx(expected, rel=1e-5)
    assert result["dog"]["count"] == 1 and set(result) == {"dog", "big"}
    # scoring in a batch with padding gives the same numbers as alone
    batch = sequence_logprobs(model, [sequences[0], sequences[0][:3]], tokenizer.pad_token_id)
    alone = sequence_logprobs(model, [sequences[0]], tokenizer.pad_token_id)
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-6)


def test_perplexity_from_logprobs_matches_the_lm_perplexity(tokenizer):
    from tnd.batching import encode_for_lm
    from tnd.trainers.lm import perplexity

    model = build_causal_lm(TINY_ARCH, tokenizer, seed=0).eval()
    texts = nursery.generate_sentences(5, seed=2)
    sequences, _ = locate_words(tokenizer, texts, [], max_length=12)
    assert sequences == encode_for_lm(tokenizer, texts, 12)
    logprobs = sequence_logprobs(model, sequences, tokenizer.pad_token_id, batch_size=2)
    assert perplexity_from_logprobs(logprobs) == pytest.approx(perplexity(model, tokenizer, texts, 12), rel=1e-5)


def test_word_category():
    assert word_category("dog") == "noun" and word_category("runs") == "verb"
    assert word_category("the") == "determiner" and word_category("xyz") is None


# --- KL --------------------------------------------------------------------------------------------


def test_kl_of_a_model_to_itself_is_zero_and_to_another_positive(tokenizer):
    texts = nursery.generate_sentences(6, seed=1)
    a = build_causal_lm(TINY_ARCH, tokenizer, seed=0).eval()
    b = build_causal_lm(TINY_ARCH, tokenizer, seed=1).eval()
    kl = token_kl({"self": a, "other": b}, a, tokenizer, texts, max_length=48, batch_size=4)
    assert kl["self"] == pytest.approx(0.0, abs=1e-6) and kl["other"] > 0
    # mean per token: the batch size does not change it
    assert token_kl({"other": b}, a, tokenizer, texts, max_length=48, batch_size=1)["other"] == pytest.approx(
        kl["other"], rel=1e-5)


def test_target_logprobs_in_chunks_are_log_softmax():
    logits = torch.randn(37, 11, dtype=torch.bfloat16)
    targets = torch.randint(11, (37,))
    exact = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 5, 37, 100):
        assert torch.allclose(target_logprobs(logits, targets, chunk=chunk), exact, atol=1e-6)


# --- the stage end to end --------------------------------------------------------------------------


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_evaluate_stage_end_to_end(project, capsys):
    from stages import evaluate, prepare_data, train_teacher
    from tnd.config import load_params
    from tnd.data.tokenizer import load_tokenizer
    from stages.common import snapshot_path
    from tnd.models import load_causal_lm, save_model
    from tnd.reward import build_reward_model

    project.write(eval={"n_prompts": 6, "max_new_tokens": 8}, ppo={"steps": 10})

    def write_snapshot(step, model):  # as train_ppo keeps them
        snapshot_path(step).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), snapshot_path(step))

    prepare_data.main([])
    train_teacher.main([])
    p = project.path
    tokenizer = load_tokenizer(p / "artifacts/tokenizer")
    teacher = load_causal_lm(p / "models/teacher", tokenizer, role="teacher")
    save_model(teacher, tokenizer, p / "models/student")
    save_model(teacher, tokenizer, p / "models/initial_student")
    params = load_params(p / "params.yaml")
    save_model(build_reward_model(params.reward.arch, tokenizer, 0), tokenizer, p / "models/reward")
    midway = build_causal_lm(params.teacher.arch, tokenizer, seed=7)  # a random student at step 5
    write_snapshot(5, midway)
    (p / "plots").mkdir(exist_ok=True)
    (p / "plots/train.csv").write_text(
        "step,env/reward_mean,objective/kl,objective/kl_coef,loss/policy,loss/value,loss/distill,student/updates\n"
        + "".join(f"{s},0.1,0.5,0.05,0.2,0.3,1.0,{4 * s}\n" for s in range(1, 11))
    )
    (p / "plots/train_trial_words.csv").write_text("word,trained_count\ndog,7\ncat,3\nfish,1\n")

    evaluate.main([])
    metrics = json.loads((p / "metrics/eval.json").read_text())
    assert set(metrics) == {"student", "initial_student", "teacher", "naoa", "practice"}
    # nAoA: the initial and the final student are the same, so no word was learned; and steps 5 and 10
    # are too few snapshots for a fit anyway, which the note says
    naoa = metrics.pop("naoa")
    practised = metrics.pop("practice")
    assert set(naoa) == {"overall", "noun", "verb", "adjective", "name", "note", "scale", "acquired"}
    assert "ppo.snapshot_schedule: paper" in naoa["note"]
    assert naoa["overall"]["not_learned"] == naoa["overall"]["words"] > 0 and naoa["overall"]["t50"] is None
    assert sum(naoa[c]["words"] for c in evaluate.WORD_CATEGORIES) == naoa["overall"]["words"]
    keys = set(evaluate.KEYS)
    for name, m in metrics.items():
        assert keys <= set(m), name
        for key in keys:
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key)
        assert 0 <= m["grammaticality"] <= 1 and 0 < m["distinct_1"] <= 1 and m["perplexity"] > 1
        assert m["word_surprisal"] > 0
    assert abs(metrics["teacher"]["kl_to_teacher"]) < 1e-5
    teacher_json = json.loads((p / "metrics/teacher.json").read_text())
    assert metrics["teacher"]["perplexity"] == pytest.approx(teacher_json["eval_perplexity"], rel=1e-5)
    for key in keys:  # same weights, same seed: same numbers
        assert metrics["student"][key] == pytest.approx(metrics["teacher"][key], abs=1e-5), key
        assert metrics["initial_student"][key] == pytest.approx(metrics["teacher"][key], abs=1e-5), key

    models = _read_csv(p / "plots/eval_models.csv")
    assert [r["model"] for r in models] == ["student", "initial_student", "teacher"]
    assert float(models[2]["perplexity"]) == pytest.approx(metrics["teacher"]["perplexity"])
    words = _read_csv(p / "plots/eval_word_surprisal.csv")
    assert words and list(words[0]) == ["word", "category", "count", "student", "initial_student", "teacher"]
    assert all(r["word"] in nursery.CONTENT_WORDS and int(r["count"]) > 0 for r in words)
    mean = sum(float(r["teacher"]) for r in words) / len(words)
    assert mean == pytest.approx(metrics["teacher"]["word_surprisal"])

    samples = [json.loads(line) for line in (p / "eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    for row in samples:
        assert row["prompt"] and set(row) == {"prompt", "student", "initial_student", "teacher"}
        assert set(row["student"]) == {"continuation", "reward", "grammatical"}
        assert isinstance(row["teacher"]["grammatical"], bool)
        assert row["student"] == row["teacher"]
    curve = _read_csv(p / "plots/eval_word_curve.csv")
    assert [int(r["step"]) for r in curve] == [0, 5, 10]  # initial student, the snapshot, the final student
    assert list(curve[0])[:7] == ["step", "updates", "mean", "noun", "verb", "adjective", "name"]
    assert [int(r["updates"]) for r in curve] == [0, 20, 40]  # from train.csv's student/updates
    acquired = int(curve[0]["vocabulary"])
    assert int(curve[2]["vocabulary"]) == naoa["acquired"] == acquired and int(curve[1]["vocabulary"]) < acquired
    assert float(curve[0]["mean"]) == pytest.approx(metrics["initial_student"]["word_surprisal"])
    assert float(curve[2]["mean"]) == pytest.approx(metrics["student"]["word_surprisal"])
    texts = [row["text"] for row in read_jsonl(p / "data/prepared/eval.jsonl")]
    content = [w for c in evaluate.WORD_CATEGORIES for w in nursery.WORDS_BY_CATEGORY[c]]
    sequences, occurrences = locate_words(tokenizer, texts, content, params.eval.max_length)
    # on the shared scale the student, the teacher itself, sits at the floor: acquired, every word the teacher
    # knows better than chance (the random student at step 5 knows fewer)
    chance = chance_surprisals(occurrences, len(tokenizer))
    assert acquired == sum(float(w["teacher"]) < chance[w["word"]] for w in words) > 0
    logprobs = sequence_logprobs(midway, sequences, tokenizer.pad_token_id, params.eval.batch_size)
    by_hand = word_surprisals(logprobs, occurrences)
    assert float(curve[1]["mean"]) == pytest.approx(mean_word_surprisal(by_hand))
    assert float(curve[0][f"word:{words[0]['word']}"]) == pytest.approx(float(words[0]["initial_student"]))
    naoa_words = _read_csv(p / "plots/eval_naoa_words.csv")
    assert [r["word"] for r in naoa_words] == [r["word"] for r in words]
    assert {r["status"] for r in naoa_words} == {"not_learned"} and naoa_words[0]["t50"] == ""
    assert [r["threshold"] for r in _read_csv(p / "plots/eval_naoa.csv")] == ["0.5", "0.6", "0.7", "0.8", "0.9", "0.95"]
    # practice: each word's count from train_ppo beside its final surprisal, and their rank correlation
    practice = _read_csv(p / "plots/eval_practice.csv")
    assert [r["word"] for r in practice] == [r["word"] for r in words]
    counts = {r["word"]: int(r["trained_count"]) for r in practice}
    assert {w: n for w, n in counts.items() if n} == {w: n for w, n in {"dog": 7, "cat": 3, "fish": 1}.items()
                                                    if w in counts}
    assert [float(r["surprisal"]) for r in practice] == pytest.approx([float(r["student"]) for r in words])
    assert practised["words"] == len(words) and practised["practised"] == sum(n > 0 for n in counts.values())
    assert practised["spearman_surprisal"] == pytest.approx(
        spearman(list(counts.values()), [float(r["surprisal"]) for r in practice]))
    assert practised["spearman_naoa_t50"] is None  # no word was learned, so none has an nAoA
    for png in ("eval_models.png", "eval_word_surprisal.png", "train_curves.png", "word_curve.png", "practice.png"):
        assert (p / "eval" / png).read_bytes()[:4] == b"\x89PNG", png

    # Reruns agree exactly.
    outputs = {name: (p / name).read_bytes() for name in (
        "metrics/eval.json", "plots/eval_models.csv", "plots/eval_word_surprisal.csv", "plots/eval_word_curve.csv",
        "plots/eval_naoa.csv", "plots/eval_naoa_words.csv", "plots/eval_practice.csv", "eval/samples.jsonl")}
    evaluate.main([])
    assert {name: (p / name).read_bytes() for name in outputs} == outputs

    # Without train_ppo's word counts, the stage to run is named.
    (p / "plots/train_trial_words.csv").unlink()
    with pytest.raises(SystemExit) as exc:
        evaluate.main([])
    assert exc.value.code == 2 and "run `dvc repro train_ppo`" in capsys.readouterr().err
    (p / "plots/train_trial_words.csv").write_text("word,trained_count\n")

    # A snapshot of another architecture is refused with one line naming it.
    write_snapshot(7, build_causal_lm(TINY_ARCH, tokenizer, seed=7))
    with pytest.raises(SystemExit) as exc:
        evaluate.main([])
    assert exc.value.code == 2
