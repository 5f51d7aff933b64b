"""Text sources on local files (the hub loader shares the same code after loading), and the tokenizer."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tnd.config import DataParams
from tnd.data.sources import load_corpus
from tnd.data.tokenizer import decode, encode, load_tokenizer, train_bpe
from tnd.errors import TndError

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
    assert sorted(corpus.train + corpus.eval) == sorted(TEXTS)
    assert len(corpus.eval) == 3  # at most a tenth goes to eval on small data


def test_split_is_deterministic(tmp_path):
    path = write(tmp_path / "data.jsonl", "jsonl")
    first = load_corpus(DataParams(source=str(path)), seed=3)
    assert first.train == load_corpus(DataParams(source=str(path)), seed=3).train
    assert first.train != load_corpus(DataParams(source=str(path)), seed=4).train


def test_long_texts_are_truncated_and_counted(tmp_path):
    path = write(tmp_path / "data.txt", "txt", TEXTS + ["word " * 500])
    corpus = load_corpus(DataParams(source=str(path), max_chars=100), seed=0)
    assert corpus.stats["truncated"] == 1
    assert max(len(t) for t in corpus.train + corpus.eval) == 100


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: write(p / "d.jsonl", "jsonl", field="body"), "no field 'text'"),
        (lambda p: write(p / "d.csv", "csv", field="body"), "no field 'text'"),
        (lambda p: write(p / "d.parquet", "parquet", field="body"), "no field 'text'"),
        (lambda p: (p / "d.txt").write_text("") and p / "d.txt" or p / "d.txt", "is empty"),
        (lambda p: (p / "d.txt").write_bytes(b"ok line\n\xff\xfe bad\n") and p / "d.txt", "not valid UTF-8"),
        (lambda p: p / "missing.jsonl", "not found"),
        (lambda p: (p / "d.jsonl").write_text('{"text": "a"}\n{oops\n') and p / "d.jsonl", "line 2 is not valid JSON"),
        (lambda p: write(p / "d.txt", "txt", ["only one"]), "need at least 2"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(TndError, match=message) as info:
        load_corpus(DataParams(source=str(path)), seed=0)
    assert "\n" not in str(info.value)


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
