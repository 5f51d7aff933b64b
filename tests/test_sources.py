"""Text sources on local files (the hub loader shares the same code after loading), and the tokenizer."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tnd.config import DataParams
from tnd.data.prompts import make_eval_prompts, make_prompts
from tnd.data.sources import load_corpus
from tnd.data.tokenizer import decode, encode, load_tokenizer, train_bpe
from tnd.errors import TndError
from tests.conftest import ROOT

TEXTS = [f"the dog number {i} runs to the park." for i in range(30)]


def write(path, kind, texts=TEXTS, field="text"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif kind == "csv":
        path.write_text(f"id,{field}\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)))
    elif kind == "txt":
        path.write_text("\n".join(texts) + "\n")
    elif kind == "parquet":
        pq.write_table(pa.table({field: texts}), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "txt", "parquet"])
def test_each_local_format_loads_all_texts(tmp_path, kind):
    path = write(tmp_path / f"data.{kind}", kind)
    corpus = load_corpus(DataParams(source=str(path), n_eval=5), seed=0)
    assert sorted(list(corpus.train) + corpus.valid + corpus.eval) == sorted(TEXTS)
    assert len(corpus.eval) == len(corpus.valid) == 3  # at most a tenth goes to eval (and to validation) on small data


def test_nursery_splits_are_disjoint_and_full():
    # Repro r01: 14.1% of the nursery eval texts were verbatim training texts (a positional split, no dedup).
    data = DataParams()
    corpus = load_corpus(data, seed=1234)
    train, test = set(corpus.train), set(corpus.eval)
    assert not test & train, f"{len(test & train)} eval texts are training texts"
    valid = set(corpus.valid)
    assert not valid & (train | test)
    assert (len(corpus.train), len(corpus.valid), len(corpus.eval)) == (data.n_train, data.n_valid, data.n_eval)
    assert len(train) + len(valid) + len(test) == data.n_train + data.n_valid + data.n_eval  # no repeats within
    assert corpus.stats["duplicates_dropped"] > 0  # the grammar repeats its short sentences
    assert corpus.stats["n_drawn"] == data.n_train + data.n_valid + data.n_eval + corpus.stats["duplicates_dropped"]
    assert corpus.train == load_corpus(data, seed=1234).train


def test_a_small_nursery_request_splits_exactly():
    data = DataParams(n_train=400, n_valid=60, n_eval=60)
    corpus = load_corpus(data, seed=0)
    assert (len(corpus.train), len(corpus.valid), len(corpus.eval)) == (400, 60, 60)
    assert len(set(corpus.train) | set(corpus.valid) | set(corpus.eval)) == 520


def test_a_grammar_with_too_few_sentences_gives_smaller_splits_and_says_so(monkeypatch, capsys):
    from tnd.data import sources

    monkeypatch.setattr(sources.nursery, "generate_sentences", lambda n, seed: [f"s{i % 50}." for i in range(n)])
    corpus = load_corpus(DataParams(n_train=400, n_valid=60, n_eval=60), seed=0)
    assert (len(corpus.train), len(corpus.valid), len(corpus.eval)) == (40, 5, 5)  # a tenth each held out
    assert corpus.stats["short_of_distinct"] == 470 and corpus.stats["n_drawn"] == 20 * 520
    assert "gave 50 distinct sentences" in capsys.readouterr().err


def test_local_duplicates_are_dropped_before_the_split(tmp_path):
    texts = [f"text number {i}" for i in range(40)]
    # repeats, one of them only up to whitespace (texts are compared as cleaned)
    path = write(tmp_path / "d.jsonl", "jsonl", texts + texts[:20] + ["  text   number 3 "])
    corpus = load_corpus(DataParams(source=str(path)), seed=0)
    assert corpus.stats["duplicates_dropped"] == 21
    assert sorted(list(corpus.train) + corpus.valid + corpus.eval) == sorted(texts)
    assert not set(corpus.eval) & set(corpus.train) and not set(corpus.valid) & (set(corpus.train) | set(corpus.eval))
    assert len(corpus.eval) == len(corpus.valid) == 4  # a tenth each on small data


def test_split_is_deterministic(tmp_path):
    path = write(tmp_path / "data.jsonl", "jsonl")
    first = load_corpus(DataParams(source=str(path)), seed=3)
    assert list(first.train) == list(load_corpus(DataParams(source=str(path)), seed=3).train)
    assert list(first.train) != list(load_corpus(DataParams(source=str(path)), seed=4).train)


def test_long_texts_are_truncated_and_counted(tmp_path):
    path = write(tmp_path / "data.txt", "txt", TEXTS + ["word " * 500])
    corpus = load_corpus(DataParams(source=str(path), max_chars=100), seed=0)
    assert corpus.stats["truncated"] == 1
    assert max(len(t) for t in list(corpus.train) + corpus.valid + corpus.eval) == 100


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: write(p / "d.jsonl", "jsonl", field="body"), "no field 'text'"),
        (lambda p: write(p / "d.csv", "csv", field="body"), "no field 'text'"),
        (lambda p: write(p / "d.parquet", "parquet", field="body"), "no field 'text'"),
        (lambda p: (p / "d.txt").write_text("") and p / "d.txt" or p / "d.txt", "is empty"),
        (lambda p: (p / "d.txt").write_bytes(b"ok line\n\xff\xfe bad\n") and p / "d.txt", "not valid UTF-8 .*offset 8"),
        (lambda p: (p / "d.jsonl").write_bytes(b'{"text": "a\xff"}\n') and p / "d.jsonl", "not valid UTF-8 .*offset 11"),
        (lambda p: p / "missing.jsonl", "not found"),
        (lambda p: (p / "d.jsonl").write_text('{"text": "a"}\n{oops\n') and p / "d.jsonl", "line 2 is not valid JSON"),
        (lambda p: (p / "d.jsonl").write_text('{"text": "a"}\n\n["a"]\n') and p / "d.jsonl", "line 3 is not a JSON object"),
        (lambda p: (p / "d.jsonl").write_text(" \n") and p / "d.jsonl", "is empty"),
        (lambda p: (p / "d.csv").write_text("id,text\n") and p / "d.csv", "is empty"),
        (lambda p: write(p / "d.parquet", "parquet", []), "is empty"),
        (lambda p: (p / "d.parquet").write_text("not parquet") and p / "d.parquet", "not a readable .parquet file"),
        (lambda p: (p / "d.xlsx").write_text("x") and p / "d.xlsx", "unsupported type"),
        (lambda p: write(p / "d.txt", "txt", ["only one", "and two"]), "need at least 3"),
        (lambda p: write(p / "d.txt", "txt", ["only one", " only  one", "only one"]), "1 distinct non-empty"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(TndError, match=message) as info:
        load_corpus(DataParams(source=str(path)), seed=0)
    assert "\n" not in str(info.value)


def test_csv_cells_are_read_as_the_strings_in_the_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("n,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(["01", "NA", "1e3", "null", "a, b"] * 2)))
    path.write_text(path.read_text().replace("a, b", '"a, b"'))
    corpus = load_corpus(DataParams(source=str(path)), seed=0)
    assert sorted(list(corpus.train) + corpus.valid + corpus.eval) == sorted(["01", "NA", "1e3", "null", "a, b"])
    assert corpus.stats["duplicates_dropped"] == 5


def test_csv_column_changing_type_after_the_first_chunk_loads(tmp_path):
    # pandas (datasets' CSV reader) would read 10,000 rows at a time, guessing each chunk's types anew
    path = tmp_path / "d.csv"
    path.write_text("id,text\n" + "".join(f"{i if i < 10_000 else 'x'},text {i}\n" for i in range(10_010)))
    corpus = load_corpus(DataParams(source=str(path), n_train=20_000), seed=0)
    assert len(list(corpus.train) + corpus.valid + corpus.eval) == 10_010


def test_a_local_file_loads_offline_and_writes_nothing_outside(tmp_path):
    path = write(tmp_path / "data.jsonl", "jsonl")
    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), TMPDIR=str(temp), HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    code = ("import sys; from tnd.config import DataParams; from tnd.data.sources import load_corpus; "
            "c = load_corpus(DataParams(source=sys.argv[1]), 0); print(len(list(c.train) + c.valid + c.eval))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(len(TEXTS))]
    assert list(home.rglob("*")) == [] and list(temp.rglob("*")) == []


def test_eval_prompts_avoid_the_training_prompts_and_count_what_they_cannot():
    texts = [f"the {animal} runs to the {place}." for animal in ("dog", "cat", "cow", "pig") for place in ("park", "sea")]
    tokenizer = train_bpe(texts * 5, vocab_size=300)
    seen_openings = texts[:4]  # "the dog ...", "the cat ..."
    train = make_prompts(tokenizer, seen_openings, 20, 2, seed=0)
    train_ids = {tuple(p["prompt_ids"]) for p in train}
    prompts, stats = make_eval_prompts(tokenizer, texts, 4, 2, seed=1, train_prompts=train)
    assert len(prompts) == 4 and not {tuple(p["prompt_ids"]) for p in prompts} & train_ids
    assert stats == {"n_eval_prompts": 4, "eval_prompts_distinct": 2, "eval_prompts_in_train": 0}
    assert {p["prompt"] for p in prompts} == {"the cow", "the pig"}
    # more prompts than texts with an unseen opening: those, then training prompts, counted
    prompts, stats = make_eval_prompts(tokenizer, texts, 6, 2, seed=1, train_prompts=train)
    assert len(prompts) == 6 and stats["eval_prompts_in_train"] == 2
    assert stats["eval_prompts_in_train"] == sum(tuple(p["prompt_ids"]) in train_ids for p in prompts)
    # nothing but training openings: the prompts are made anyway, every one counted
    prompts, stats = make_eval_prompts(tokenizer, seen_openings, 3, 2, seed=1, train_prompts=train)
    assert len(prompts) == 3 and stats["eval_prompts_in_train"] == 3


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    tokenizer = train_bpe(TEXTS * 3, vocab_size=300)
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token} == {"<pad>", "<s>", "</s>"}
    for text in TEXTS[:5] + ["unseen words: zebra & qüokka!"]:
        assert decode(tokenizer, encode(tokenizer, text)) == text
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert encode(loaded, TEXTS[0]) == encode(tokenizer, TEXTS[0])
    assert loaded.pad_token_id == tokenizer.pad_token_id


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TndError, match="could not load"):
        load_tokenizer(tmp_path / "nope")
