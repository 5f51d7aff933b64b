"""Text sources: the built-in nursery grammar, local files, or a datasets hub id.

All loaders return plain strings and fail with a `TndError` that names the file or
field and the fix; texts longer than `data.max_chars` are truncated and counted.
Hub ids are read by `datasets` (imported when first used); local files by `read_local_rows`,
which also reads the reward model's labelled texts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from tnd.data import nursery
from tnd.errors import TndError, one_line

if TYPE_CHECKING:  # annotations only: tnd.trainers.reward reads files through here without pydantic (the GPU image)
    from tnd.config import DataParams


@dataclass
class Corpus:
    """Three disjoint splits of distinct texts: `train`, `valid` (validation: what early stopping and keep_best
    select on) and `eval` (the test split the results are reported on)."""

    train: list[str]
    eval: list[str]
    stats: dict = field(default_factory=dict)
    valid: list[str] = field(default_factory=list)


# The nursery grammar repeats its short sentences (about 11% of 22,000 draws): it is drawn until the splits hold
# this many distinct ones, giving up after NURSERY_MAX_DRAWS times as many draws (a grammar too small for them).
NURSERY_MAX_DRAWS = 20


def load_corpus(data: DataParams, seed: int) -> Corpus:
    """Train, validation and eval texts for `data.source`: deduplicated, shuffled and split deterministically,
    so that no text is in two splits. stats.json records `duplicates_dropped`."""
    wanted = data.n_train + data.n_valid + data.n_eval
    if data.source == "nursery":
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
        return _split(texts, n_valid, n_eval, data.n_train, stats)
    raw = _load_raw(data)
    cleaned, truncated, empty = _clean(raw, data.max_chars)
    texts = list(dict.fromkeys(cleaned))  # first occurrences, in file order (then shuffled)
    if len(texts) < 3:
        raise TndError(
            f"data.source '{data.source}': found {len(texts)} distinct non-empty text(s) in field "
            f"'{data.text_field}'; need at least 3 (one each for train, validation and eval)"
        )
    random.Random(seed).shuffle(texts)
    n_eval, n_valid = _held_out_sizes(len(texts), data)
    stats = {"source": data.source, "n_raw": len(raw), "truncated": truncated, "empty_skipped": empty,
             "duplicates_dropped": len(cleaned) - len(texts)}
    return _split(texts, n_valid, n_eval, data.n_train, stats)


def _held_out_sizes(n: int, data: DataParams) -> tuple[int, int]:
    """(eval, validation) sizes from `n` distinct texts: at most a tenth each, at least one."""
    tenth = max(1, n // 10)
    return min(data.n_eval, tenth), min(data.n_valid, tenth)


def _split(texts: list[str], n_valid: int, n_eval: int, n_train: int, stats: dict) -> Corpus:
    held_out = n_eval + n_valid
    return Corpus(texts[held_out : held_out + n_train], texts[:n_eval], stats, valid=texts[n_eval:held_out])


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


def _load_raw(data: DataParams) -> list:
    path = Path(data.source)
    if path.suffix in LOCAL_SUFFIXES:
        column = "text" if path.suffix == ".txt" else data.text_field  # a .txt file's one column is its lines
        return [row[column] for _, row in read_local_rows(path, {column: "data.text_field"})]
    if path.exists():
        raise TndError(
            f"data.source: '{path}' has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    return _load_hub(data)


# Local files are parsed here, not by datasets.load_dataset: a 200k-row .jsonl reads in a twelfth of the
# time, an error names the line, and a JSON field whose type varies between rows is not a schema failure.
def read_local_rows(path: str | Path, fields: Mapping[str, str]) -> list[tuple[str, dict]]:
    """(where, {field: value}) for each row of the local .jsonl, .csv, .parquet or .txt file `path`, in file
    order; `fields` maps each field read to the param that names it, for the error. JSON values as parsed, CSV
    cells as the strings in the file, a .txt file as one field "text" per line. Anything wrong -- no such file,
    not UTF-8, empty, a line that is not a JSON object, a row without a field -- is one TndError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TndError(f"data.source: file '{path}' not found; fix the path in params.yaml")
    rows = _LOCAL_READERS[path.suffix](path)
    if not rows:
        raise _empty(path)
    picked = []
    for where, row in rows:
        missing = next((name for name in fields if name not in row), None)
        if missing is not None:
            raise _missing_field(path, missing, fields[missing], list(row), where)
        picked.append((where, {name: row[name] for name in fields}))
    return picked


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
    for where, row in read_local_rows(path, {text_field: "data.text_field", label_field: "reward.label_field"}):
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


def _read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TndError(
            f"data.source: '{path}' is not valid UTF-8 (bad byte at offset {exc.start}); re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        raise _empty(path)
    return text


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise TndError(f"data.source: '{path}' line {number} is not valid JSON; fix or remove it") from None
        if not isinstance(row, dict):
            raise TndError(f"data.source: '{path}' line {number} is not a JSON object; fix or remove it")
        rows.append((f"line {number}", row))
    return rows


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    return [(f"row {number}", row) for number, row in enumerate(reader, start=2)]  # row 1 is the header


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise TndError(f"data.source: '{path}' is not a readable .parquet file ({one_line(exc, 200)}); fix or replace it") from None
    if not table.num_rows:
        raise _empty(path)
    return [(f"row {number}", row) for number, row in enumerate(table.to_pylist(), start=1)]


def _txt_rows(path: Path) -> list[tuple[str, dict]]:
    return [(f"line {number}", {"text": line}) for number, line in enumerate(_read_text(path).splitlines(), start=1)]


_LOCAL_READERS = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows, ".txt": _txt_rows}
LOCAL_SUFFIXES = tuple(_LOCAL_READERS)


def _empty(path: Path) -> TndError:
    return TndError(f"data.source: '{path}' is empty; point data.source at a file with texts")


def _load_hub(data: DataParams) -> list:
    """A datasets hub id such as 'roneneldan/TinyStories' (needs network or a local HF cache)."""
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
    return list(dataset[data.text_field])


def _missing_field(source, name: str, param: str, columns: list, where: str = "") -> TndError:
    at = f" at {where}" if where else ""
    return TndError(
        f"{param}: '{source}' has no field '{name}'{at} (fields: {', '.join(map(str, columns)) or 'none'}); "
        f"set {param} to the column that holds it"
    )


def _clean(raw: list, max_chars: int) -> tuple[list[str], int, int]:
    texts, truncated, empty = [], 0, 0
    for value in raw:
        text = " ".join(str(value).split()) if value is not None else ""
        if not text:
            empty += 1
            continue
        if len(text) > max_chars:
            text = text[:max_chars]
            truncated += 1
        texts.append(text)
    return texts, truncated, empty
