"""Text sources: the built-in nursery grammar, local files, or a datasets hub id.

All loaders return plain strings and fail with a `TndError` that names the file or
field and the fix; texts longer than `data.max_chars` are truncated and counted.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tnd.config import DataParams
from tnd.data import nursery
from tnd.errors import TndError, one_line

LOCAL_SUFFIXES = (".jsonl", ".csv", ".parquet", ".txt")


@dataclass
class Corpus:
    train: list[str]
    eval: list[str]
    stats: dict = field(default_factory=dict)


def load_corpus(data: DataParams, seed: int) -> Corpus:
    """Train and eval texts for `data.source`, split and shuffled deterministically."""
    if data.source == "nursery":
        texts = nursery.generate_sentences(data.n_train + data.n_eval, seed)
        return Corpus(texts[: data.n_train], texts[data.n_train :], {"source": "nursery"})
    raw = _load_raw(data)
    texts, truncated, empty = _clean(raw, data.max_chars)
    if len(texts) < 2:
        raise TndError(
            f"data.source '{data.source}': found {len(texts)} non-empty text(s) in field "
            f"'{data.text_field}'; need at least 2 (one for train, one for eval)"
        )
    random.Random(seed).shuffle(texts)
    n_eval = min(data.n_eval, max(1, len(texts) // 10))
    stats = {"source": data.source, "n_raw": len(raw), "truncated": truncated, "empty_skipped": empty}
    return Corpus(texts[n_eval : n_eval + data.n_train], texts[:n_eval], stats)


def _load_raw(data: DataParams) -> list:
    path = Path(data.source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise TndError(f"data.source: file '{path}' not found; fix the path in params.yaml")
        return _LOCAL_LOADERS[path.suffix](path, data.text_field)
    if path.exists():
        raise TndError(
            f"data.source: '{path}' has an unsupported type; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    return _load_hub(data)


def _read_text(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TndError(
            f"data.source: '{path}' is not valid UTF-8 (bad byte at offset {exc.start}); "
            "re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        raise TndError(f"data.source: '{path}' is empty; point data.source at a file with texts")
    return text


def _load_jsonl(path: Path, text_field: str) -> list:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TndError(f"data.source: '{path}' line {number} is not valid JSON; fix or remove it") from None
        texts.append(_field(row, text_field, path, f"line {number}"))
    return texts


def _load_csv(path: Path, text_field: str) -> list:
    rows = list(csv.DictReader(_read_text(path).splitlines()))
    return [_field(row, text_field, path, f"row {i + 2}") for i, row in enumerate(rows)]


def _load_parquet(path: Path, text_field: str) -> list:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise TndError(f"data.source: '{path}' is not a readable parquet file ({exc})") from None
    if text_field not in table.column_names:
        raise _missing_field(path, text_field, table.column_names)
    if table.num_rows == 0:
        raise TndError(f"data.source: '{path}' is empty; point data.source at a file with texts")
    return table.column(text_field).to_pylist()


def _load_txt(path: Path, text_field: str) -> list:
    return _read_text(path).splitlines()


_LOCAL_LOADERS = {".jsonl": _load_jsonl, ".csv": _load_csv, ".parquet": _load_parquet, ".txt": _load_txt}


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
        raise _missing_field(data.source, data.text_field, dataset.column_names)
    return list(dataset[data.text_field])


def _field(row: dict, text_field: str, path: Path, where: str):
    if not isinstance(row, dict) or text_field not in row:
        raise _missing_field(path, text_field, list(row) if isinstance(row, dict) else [], where)
    return row[text_field]


def _missing_field(source, text_field: str, columns: list, where: str = "") -> TndError:
    at = f" at {where}" if where else ""
    return TndError(
        f"data.text_field: '{source}' has no field '{text_field}'{at} (fields: {', '.join(map(str, columns)) or 'none'}); "
        "set data.text_field to the column holding the text"
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
