"""Text sources: the built-in nursery grammar, local files, or a datasets hub id.

All loaders give plain strings and fail with a `TndError` that names the file or
field and the fix; texts longer than `data.max_chars` are truncated and counted.
Hub ids are read by `datasets` (imported when first used); local files by `iter_local_rows`,
which also reads the reward model's labelled texts (`read_local_rows`).

A file or hub source is streamed, never held whole: one pass finds the distinct texts by a 64-bit
digest of each (8 bytes a row, not the text), the splits are drawn over those, and every later pass
reads the source again and keeps the rows of its split (`TextStream`). The validation and eval
splits, at most `data.n_valid` and `data.n_eval` texts, are held as lists.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Union

import numpy as np

from tnd.data import nursery
from tnd.errors import TndError, one_line

if TYPE_CHECKING:  # annotations only: tnd.trainers.reward reads files through here without pydantic (the GPU image)
    from tnd.config import DataParams


class TextStream:
    """The texts of one split of a file or hub source, in the source's order: each iteration reads the
    source again (`read`), so none is held in memory; `len` is known from the first pass."""

    def __init__(self, read: Callable[[], Iterator[str]], n: int) -> None:
        self._read, self._n = read, n

    def __iter__(self) -> Iterator[str]:
        return self._read()

    def __len__(self) -> int:
        return self._n


@dataclass
class Corpus:
    """Three disjoint splits of distinct texts: `train`, `valid` (validation: what early stopping and keep_best
    select on) and `eval` (the test split the results are reported on). `train` is a list for the nursery
    grammar and a `TextStream` for a file or hub source."""

    train: Union[list[str], TextStream]
    eval: list[str]
    stats: dict = field(default_factory=dict)
    valid: list[str] = field(default_factory=list)


# The nursery grammar repeats its short sentences (about 11% of 22,000 draws): it is drawn until the splits hold
# this many distinct ones, giving up after NURSERY_MAX_DRAWS times as many draws (a grammar too small for them).
NURSERY_MAX_DRAWS = 20

# What each cleaned text of a file or hub source is, by its position in the source (an int8 a row).
UNUSED, TRAIN, VALID, EVAL = 0, 1, 2, 3


def load_corpus(data: DataParams, seed: int) -> Corpus:
    """Train, validation and eval texts for `data.source`: deduplicated, shuffled and split deterministically,
    so that no text is in two splits. stats.json records `duplicates_dropped`; for a file or hub source also
    `n_unused`, the distinct texts that `data.n_train` left out of the training split (null: none)."""
    if data.source == "nursery":
        wanted = data.n_train + data.n_valid + data.n_eval
        texts, drawn = _distinct_sentences(wanted, seed)
        stats = {"source": "nursery", "n_drawn": drawn, "duplicates_dropped": drawn - len(texts)}
        random.Random(seed).shuffle(texts)
        if len(texts) >= wanted:
            n_eval, n_valid = data.n_eval, data.n_valid
        else:
            n_eval, n_valid = _held_out_sizes(len(texts), data)
            stats["short_of_distinct"] = wanted - len(texts)
            print(f"warning: data: the nursery grammar gave {len(texts)} distinct sentences in {drawn} draws, not "
                  f"the {wanted} of data.n_train + n_valid + n_eval; split {len(texts) - n_valid - n_eval} / "
                  f"{n_valid} / {n_eval}", file=sys.stderr, flush=True)
        held_out = n_eval + n_valid
        return Corpus(texts[held_out : held_out + data.n_train], texts[:n_eval], stats,
                      valid=texts[n_eval:held_out])
    return _load_source(data, seed)


def _load_source(data: DataParams, seed: int) -> Corpus:
    """`load_corpus` for a file or hub source, in two passes over it and a third (and more) for each use of
    the training split."""
    values = _values_of(data)
    digests, n_raw, truncated, empty = array("Q"), 0, 0, 0
    for value in values():
        n_raw += 1
        text = _clean(value)
        if not text:
            empty += 1
            continue
        truncated += len(text) > data.max_chars
        # 64 bits: two distinct texts of ten million share a digest with odds of about 3 in a million
        digests.append(int.from_bytes(hashlib.blake2b(text[: data.max_chars].encode(), digest_size=8).digest(), "little"))
    keys = np.frombuffer(digests, dtype=np.uint64) if digests else np.zeros(0, np.uint64)
    first = np.sort(np.unique(keys, return_index=True)[1])  # each distinct text's first row, in source order
    if len(first) < 3:
        raise TndError(
            f"data.source '{data.source}': found {len(first)} distinct non-empty text(s) in field "
            f"'{data.text_field}'; need at least 3 (one each for train, validation and eval)"
        )
    order = first[np.random.default_rng(seed).permutation(len(first))]
    n_eval, n_valid = _held_out_sizes(len(first), data)
    held_out = n_eval + n_valid
    available = len(first) - held_out
    n_train = available if data.n_train is None else min(data.n_train, available)
    role = np.full(len(keys), UNUSED, dtype=np.int8)
    role[order[:n_eval]], role[order[n_eval:held_out]] = EVAL, VALID
    role[order[held_out : held_out + n_train]] = TRAIN
    del keys, digests, first

    def cleaned() -> Iterator[tuple[int, str]]:
        """(position among the non-empty texts, text cut to data.max_chars), checking the source did not change."""
        position = -1
        for value in values():
            text = _clean(value)
            if text:
                position += 1
                if position >= len(role):
                    break
                yield position, text[: data.max_chars]
        if position + 1 != len(role):
            raise TndError(f"data.source '{data.source}' changed while prepare_data read it (its non-empty texts: "
                           f"{len(role)}, then {position + 1}); leave it alone while prepare_data runs and rerun it")

    rank = {int(position): i for i, position in enumerate(order[:held_out])}  # held-out texts in shuffled order
    held = [""] * held_out
    for position, text in cleaned():
        if role[position] >= VALID:
            held[rank[position]] = text

    def train() -> Iterator[str]:
        return (text for position, text in cleaned() if role[position] == TRAIN)

    stats = {"source": data.source, "n_raw": n_raw, "truncated": truncated, "empty_skipped": empty,
             "duplicates_dropped": n_raw - empty - (available + held_out), "n_unused": available - n_train}
    return Corpus(TextStream(train, n_train), held[:n_eval], stats, valid=held[n_eval:])


def _held_out_sizes(n: int, data: DataParams) -> tuple[int, int]:
    """(eval, validation) sizes from `n` distinct texts: at most a tenth each, at least one."""
    tenth = max(1, n // 10)
    return min(data.n_eval, tenth), min(data.n_valid, tenth)


def _distinct_sentences(n: int, seed: int) -> tuple[list[str], int]:
    """The first `n` distinct sentences of the nursery grammar's stream for `seed`, and the draws that took
    (at most NURSERY_MAX_DRAWS * n: fewer sentences when the grammar has no more)."""
    size, limit = n + n // 8 + 16, NURSERY_MAX_DRAWS * n
    while True:
        # the same seed draws the same stream, so a longer list extends a shorter one
        drawn = nursery.generate_sentences(size, seed)
        if len(set(drawn)) >= n or size >= limit:
            break
        size = min(limit, 2 * size)
    seen: dict[str, None] = {}
    for draws, sentence in enumerate(drawn, start=1):
        seen.setdefault(sentence)
        if len(seen) == n:
            return list(seen), draws
    return list(seen), len(drawn)


def _values_of(data: DataParams) -> Callable[[], Iterator[object]]:
    """A function that reads the text field of every row of the file or hub source `data.source`, in order, each
    time it is called; a missing file, an unknown type or a hub id that does not load fails here, at once."""
    path = Path(data.source)
    if path.suffix in LOCAL_SUFFIXES:
        column = "text" if path.suffix == ".txt" else data.text_field  # a .txt file's one column is its lines
        if not path.is_file():
            raise _not_found(path)
        return lambda: (row[column] for _, row in iter_local_rows(path, {column: "data.text_field"}))
    if path.exists():
        raise TndError(
            f"data.source: '{path}' has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    return _hub_values(data)


# Local files are parsed here, not by datasets.load_dataset: a 200k-row .jsonl reads in a twelfth of the
# time, an error names the line, and a JSON field whose type varies between rows is not a schema failure.
def iter_local_rows(path: str | Path, fields: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
    """(where, {field: value}) for each row of the local .jsonl, .csv, .parquet or .txt file `path`, in file
    order, read a line (a parquet batch) at a time; `fields` maps each field read to the param that names it, for
    the error. JSON values as parsed, CSV cells as the strings in the file, a .txt file as one field "text" per
    line. Anything wrong -- no such file, not UTF-8, empty, a line that is not a JSON object, a row without a
    field -- is one TndError naming it, raised when the reading reaches it."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path)
    if path.suffix not in _LOCAL_READERS:
        raise TndError(f"data.source: '{path}' has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}")
    rows = 0
    for where, row in _LOCAL_READERS[path.suffix](path, fields):
        missing = next((name for name in fields if name not in row), None)
        if missing is not None:
            raise _missing_field(path, missing, fields[missing], list(row), where)
        rows += 1
        yield where, {name: row[name] for name in fields}
    if not rows:
        raise _empty(path)


def read_local_rows(path: str | Path, fields: Mapping[str, str]) -> list[tuple[str, dict]]:
    """`iter_local_rows` as a list."""
    return list(iter_local_rows(path, fields))


def load_labelled_texts(path: str | Path, text_field: str, label_field: str) -> list[dict]:
    """The regression reward model's data (reward.objective: regression): rows {"text", "label"} from a local
    .jsonl or .csv with a numeric label column; rows whose text is empty are left out."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise TndError(
            f"reward.objective = regression reads labelled texts from data.source, which must be a local "
            f".jsonl or .csv file (got '{path}'); point data.source at one or use reward.objective: pairwise"
        )
    rows = []
    for where, row in iter_local_rows(path, {text_field: "data.text_field", label_field: "reward.label_field"}):
        text, value = row[text_field], row[label_field]
        try:
            label = float(value) if not isinstance(value, bool) and value not in (None, "") else None
        except (TypeError, ValueError):
            label = None
        if label is None or not math.isfinite(label):
            raise TndError(
                f"reward.label_field: '{path}' {where} has {label_field} = {json.dumps(value, default=str)}, "
                "not a finite number; fix the value or set reward.label_field to a numeric column"
            )
        text = " ".join(str(text or "").split())
        if text:
            rows.append({"text": text, "label": label})
    if len(rows) < 2:
        raise TndError(f"data.source: '{path}' has {len(rows)} labelled text(s); regression needs at least 2")
    return rows


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, each with its line end, one at a time (split at "\n" alone; a leading BOM
    dropped). Bytes that are not UTF-8 are a TndError naming their offset; a file of white space alone is empty."""
    offset, blank = 0, True
    with path.open("rb") as handle:
        for raw in handle:
            try:
                line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TndError(f"data.source: '{path}' is not valid UTF-8 (bad byte at offset {offset + exc.start}); "
                               "re-encode the file as UTF-8") from None
            offset += len(raw)
            blank = blank and not line.strip()
            yield line
    if blank:
        raise _empty(path)


def _jsonl_rows(path: Path, fields: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(_lines(path), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise TndError(f"data.source: '{path}' line {number} is not valid JSON; fix or remove it") from None
        if not isinstance(row, dict):
            raise TndError(f"data.source: '{path}' line {number} is not a JSON object; fix or remove it")
        yield f"line {number}", row


def _csv_rows(path: Path, fields: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(_lines(path))  # the lines keep their ends, as csv wants (a quoted cell may span lines)
    return ((f"row {number}", row) for number, row in enumerate(reader, start=2))  # row 1 is the header


def _parquet_rows(path: Path, fields: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> TndError:
        return TndError(f"data.source: '{path}' is not a readable .parquet file ({one_line(exc, 200)}); fix or replace it")

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise unreadable(exc) from None
    columns = table.schema_arrow.names
    if not table.metadata.num_rows:
        raise _empty(path)
    missing = next((name for name in fields if name not in columns), None)
    if missing is not None:
        raise _missing_field(path, missing, fields[missing], columns, "row 1")
    number = 0
    batches = table.iter_batches(batch_size=4096, columns=list(fields))
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:
            raise unreadable(exc) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", row


def _txt_rows(path: Path, fields: Mapping[str, str]) -> Iterator[tuple[str, dict]]:
    number = 0
    for line in _lines(path):
        for piece in line.splitlines():  # the lines splitlines() of the whole file gives, \r\n, \r, U+2028 ...
            number += 1
            yield f"line {number}", {"text": piece}


_LOCAL_READERS = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows, ".txt": _txt_rows}
LOCAL_SUFFIXES = tuple(_LOCAL_READERS)


def _not_found(path: Path) -> TndError:
    return TndError(f"data.source: file '{path}' not found; fix the path in params.yaml")


def _empty(path: Path) -> TndError:
    return TndError(f"data.source: '{path}' is empty; point data.source at a file with texts")


def _hub_values(data: DataParams) -> Callable[[], Iterator[object]]:
    """A datasets hub id such as 'roneneldan/TinyStories' (needs network or a local HF cache), loaded once; the
    function reads its text column a batch at a time (datasets keeps the rows on disk, memory-mapped)."""
    import datasets

    try:
        dataset = datasets.load_dataset(data.source, data.hub_config, split=data.hub_split)
    except Exception as exc:
        raise TndError(
            f"data.source: could not load '{data.source}' from the datasets hub ({one_line(exc, 200)}); "
            "check the id, data.hub_config and data.hub_split, or use a local file"
        ) from None
    if data.text_field not in dataset.column_names:
        raise _missing_field(data.source, data.text_field, "data.text_field", dataset.column_names)
    column = dataset.select_columns([data.text_field])

    def values() -> Iterator[object]:
        for batch in column.iter(batch_size=4096):
            yield from batch[data.text_field]

    return values


def _missing_field(source, name: str, param: str, columns: list, where: str = "") -> TndError:
    at = f" at {where}" if where else ""
    return TndError(
        f"{param}: '{source}' has no field '{name}'{at} (fields: {', '.join(map(str, columns)) or 'none'}); "
        f"set {param} to the column that holds it"
    )


def _clean(value: object) -> str:
    """The text with its white space folded to single spaces; "" for None."""
    return " ".join(str(value).split()) if value is not None else ""
