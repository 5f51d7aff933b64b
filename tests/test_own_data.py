"""A user's own corpus (data.source: a file): every text is used unless data.n_train says otherwise, and then
prepare_data says so in one line; the source is streamed, not held; the teacher's steps follow the data."""

import json
import math
import subprocess
import sys
import tracemalloc

import pytest

from stages import prepare_data, train_teacher
from tnd import health
from tnd.config import CustomPPOConfig, DataParams, Params, load_params, parse_params
from tnd.data.sources import TextStream, load_corpus
from tnd.errors import TndError
from tnd.io import read_jsonl
from tests.conftest import ROOT, repo_params, merge


def texts(n: int) -> list[str]:
    return [f"sentence number {i} of a corpus that is {'long ' * (i % 7)}enough." for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


def test_a_file_source_trains_on_every_distinct_text_by_default(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", texts(500) + texts(20))  # 20 repeats
    corpus = load_corpus(DataParams(source=str(path)), seed=0)
    assert DataParams(source=str(path)).n_train is None
    assert (len(corpus.train), len(corpus.valid), len(corpus.eval)) == (400, 50, 50)  # a tenth each held out
    assert sorted(list(corpus.train) + corpus.valid + corpus.eval) == sorted(texts(500))
    assert corpus.stats["n_unused"] == 0 and corpus.stats["duplicates_dropped"] == 20
    assert isinstance(corpus.train, TextStream) and list(corpus.train) == list(corpus.train)  # read again, the same


def test_a_number_in_n_train_draws_that_many_at_random(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", texts(500))
    corpus = load_corpus(DataParams(source=str(path), n_train=100), seed=0)
    train = list(corpus.train)
    assert len(train) == len(corpus.train) == 100 and corpus.stats["n_unused"] == 300
    assert train != texts(500)[:100] and not set(train) & set(corpus.eval + corpus.valid)


def test_nursery_still_generates_its_twenty_thousand():
    assert DataParams().n_train == 20_000 and Params().data.n_train == 20_000


@pytest.mark.slow
def test_prepare_data_says_in_one_line_what_n_train_left_out(project, capsys):
    write_jsonl(project.path / "mine.jsonl", texts(300))
    project.write(data={"source": "mine.jsonl", "n_train": 100})
    prepare_data.main([])
    stats = json.loads((project.path / "data/prepared/stats.json").read_text())
    assert stats["n_train"] == 100 and stats["n_unused"] == 140  # 300 - 30 validation - 30 eval - 100
    notes = [line for line in capsys.readouterr().err.splitlines() if "n_unused" in line]
    assert len(notes) == 1 and "140" in notes[0] and "data.n_train: null" in notes[0]

    project.write(data={"source": "mine.jsonl", "n_train": None})
    prepare_data.main([])
    assert "n_unused" not in capsys.readouterr().err
    out = project.path / "data/prepared"
    assert len(read_jsonl(out / "train.jsonl")) == 240 == len(read_jsonl(out / "pairs_train.jsonl"))
    assert json.loads((out / "stats.json").read_text())["n_pairs_train"] == 240


def test_the_source_is_streamed_not_held(tmp_path):
    """Loading a 36 MB file and reading its training split holds what the rows' count needs (a digest to find the
    repeats, a byte for the split, the sort: under 100 bytes a row here), not the texts, which each pass reads again."""
    rows = [f"{i:06d} " + "a fairly long sentence of real looking prose " * 5 for i in range(150_000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        corpus = load_corpus(DataParams(source=str(path)), seed=0)
        n = sum(1 for _ in corpus.train)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 148_000
    assert peak < 100 * len(rows) < size / 2, f"peak {peak / 1e6:.1f} MB while reading a {size / 1e6:.1f} MB file"


def test_a_hub_source_is_read_a_batch_at_a_time_like_a_file(monkeypatch):
    import datasets

    rows = {"body": texts(300) + [None, "  "], "id": list(range(302))}
    loaded = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded.append(a) or datasets.Dataset.from_dict(rows))
    corpus = load_corpus(DataParams(source="someone/corpus", text_field="body"), seed=0)
    assert sorted(list(corpus.train) + corpus.valid + corpus.eval) == sorted(texts(300))
    assert corpus.stats["empty_skipped"] == 2 and len(loaded) == 1  # loaded once, read on every pass
    with pytest.raises(TndError, match="has no field 'text'"):
        load_corpus(DataParams(source="someone/corpus"), seed=0)


def test_a_source_that_changes_between_passes_is_one_clear_line(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", texts(100))
    corpus = load_corpus(DataParams(source=str(path)), seed=0)
    write_jsonl(path, texts(150))
    with pytest.raises(TndError, match="changed while prepare_data read it") as info:
        list(corpus.train)
    assert "\n" not in str(info.value)


# --- the teacher's steps ----------------------------------------------------------------------------


def test_the_teachers_steps_follow_the_training_texts():
    nursery = load_params(ROOT / "params.yaml")
    assert nursery.teacher.train.steps == 1500  # 4.8 passes of 64 over 20,000: what they always were
    own = parse_params(merge(repo_params(), {"data": {"source": "mine.jsonl"}}))
    train = own.teacher.train
    assert train.steps is None and own.data.n_train is None
    assert train.planned_steps(88_582) == math.ceil(4.8 * 88_582 / 64) == 6644
    assert train.planned_steps(480) == 1500  # a small corpus keeps min_steps: validation stops it
    fixed = parse_params(merge(repo_params(), {"data": {"source": "mine.jsonl"}, "teacher": {"train": {"steps": 300}}}))
    assert fixed.teacher.train.planned_steps(88_582) == 300


def test_a_preset_does_not_fix_the_steps_or_the_size_of_a_file_source():
    raw = merge(repo_params(), {"preset": "tnd_original", "data": {"source": "mine.jsonl"}})
    del raw["data"]["n_train"], raw["teacher"]["train"]["steps"]  # as a params.yaml that never names them
    params = parse_params(raw, source=str(ROOT / "params.yaml"), quiet=True)
    assert params.data.n_train is None and params.teacher.train.steps is None
    nursery = parse_params(merge(repo_params(), {"preset": "tnd_original"}), source=str(ROOT / "params.yaml"), quiet=True)
    assert nursery.teacher.train.steps == 1500 and nursery.data.n_train == 20_000


def test_small_data_counts_the_steps_the_teacher_will_take():
    own = parse_params(merge(repo_params(), {"data": {"source": "mine.jsonl"}, "teacher": {"train": {"min_steps": 0}}}))
    assert health.small_data(own, {"n_train": 88_582}).warn is False  # 4.8 passes
    found = health.small_data(own.model_copy(update={"teacher": own.teacher.model_copy(update={
        "train": own.teacher.train.model_copy(update={"epochs": 30.0})})}), {"n_train": 88_582})
    assert found.warn and f"teacher {math.ceil(30 * 88_582 / 64)} steps x 64 = 30 passes" in found.message


@pytest.mark.slow
def test_train_teacher_plans_its_steps_from_the_data(project, capsys):
    write_jsonl(project.path / "mine.jsonl", texts(200))
    project.write(data={"source": "mine.jsonl", "n_train": None},
                  teacher={"train": {"steps": None, "epochs": 1.5, "min_steps": 0, "eval_every": 0}})
    prepare_data.main([])
    train_teacher.main([])
    metrics = json.loads((project.path / "metrics/teacher.json").read_text())
    assert metrics["steps_planned"] == math.ceil(1.5 * 160 / 8) == metrics["steps_run"] == 30
    assert "at most 30 steps of 8 texts, 1.5 passes over the 160 training texts" in capsys.readouterr().out


# --- the measurement of docs/own-data.md ------------------------------------------------------------------


@pytest.mark.slow
def test_own_data_benchmark_smoke(tmp_path):
    """benchmarks/own_data.py at tiny sizes on a corpus it builds from installed docstrings: every candidate is
    scored on both yardsticks, and the default run trains on every text."""
    out = tmp_path / "own.json"
    proc = subprocess.run([sys.executable, "benchmarks/own_data.py", "--smoke", "--workdir", str(tmp_path / "work"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(out.read_text())
    stats = record["stats"]["default"]
    assert stats["n_unused"] == 0 and stats["n_train"] + stats["n_valid"] + stats["n_eval"] == record["corpus"]["rows"]
    assert record["teacher"]["steps_planned"] == record["teacher"]["steps_run"] >= 8
    for name in ("rm_default", "rm_n_train_20000", "rm_teacher_vs_student", "teacher_logprob", "teacher_logratio"):
        for stick in ("corruptions", "teacher_vs_student"):
            assert 0 <= record["candidates"][name][stick]["accuracy"] <= 1
    assert record["candidates"]["rm_default"]["corruptions"]["n_pairs"] == stats["n_pairs_eval"]
    proc = subprocess.run([sys.executable, "benchmarks/own_data.py", "--smoke", "--reuse", "--workdir",
                           str(tmp_path / "work"), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.count(": reused (") == 5, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads(out.read_text())["stats"] == record["stats"]


def test_health_names_the_recommended_trial_reward_when_the_reward_model_is_near_chance():
    own = parse_params(merge(repo_params(), {"data": {"source": "mine.jsonl"}, "tnd": {"trial_reward": "reward_model"}}))
    check = health.reward_near_chance(own, {"pairwise_accuracy": 0.618, "n_eval_pairs": 1000})  # the figure
    assert check.warn and "PPO would optimise noise; set tnd.trial_reward: teacher" in check.message
    assert "docs/own-data.md" in check.message and "\n" not in check.message
    regression = own.model_copy(update={"reward": own.reward.model_copy(update={"objective": "regression"})})
    assert "set tnd.trial_reward: teacher" in health.reward_near_chance(regression, {"pearson": 0.05}).message


# --- the trial reward on a user's own data ----------------------------------------------------------------


def own_params(**sections) -> Params:
    return parse_params(merge(repo_params(), {"data": {"source": "mine.jsonl"}, **sections}))


def test_on_a_users_own_text_the_trials_get_the_teachers_reward_unless_told():
    assert load_params(ROOT / "params.yaml").tnd.trial_reward == "reward_model"  # nursery: exact corruptions
    assert own_params().tnd.trial_reward == "teacher"
    assert CustomPPOConfig.from_params(own_params()).trial_reward == "teacher"
    assert own_params(tnd={"trial_reward": "reward_model"}).tnd.trial_reward == "reward_model"
    # the reward model stays where it is the user's own or learns labels, and where PPO never sees trials
    assert own_params(reward={"objective": "regression"}).tnd.trial_reward == "reward_model"
    assert own_params(reward={"source": "my/reward-model"}).tnd.trial_reward == "reward_model"
    assert own_params(tnd={"mode": "demos_only"}).tnd.trial_reward == "reward_model"
    assert CustomPPOConfig().trial_reward == "reward_model" == CustomPPOConfig(mode="demos_only").trial_reward
    preset = merge(repo_params(), {"data": {"source": "mine.jsonl"}})
    for name, chosen in (("gpu_small", "teacher"), ("tnd_original", "reward_model")):  # tnd_original: the age reward
        params = parse_params({**preset, "preset": name}, source=str(ROOT / "params.yaml"), quiet=True)
        assert params.tnd.trial_reward == chosen


def test_health_does_not_warn_of_a_reward_model_that_only_monitors_own_text():
    check = health.reward_near_chance(own_params(), {"pairwise_accuracy": 0.6})
    assert check.warn is False and "tnd.trial_reward: teacher" in check.message
