"""A small corpus of real English prose, built on the spot: sentences from the docstrings of Python's
standard library (no download, no file shipped). Technical prose with a vocabulary of a few thousand
words, unlike the nursery grammar's few hundred; it varies a little between Python versions, so tests
assert what holds for any such corpus."""

from __future__ import annotations

import importlib
import inspect
import random
import re

MODULES = (
    "argparse", "asyncio", "calendar", "collections", "contextlib", "csv", "datetime", "decimal", "difflib",
    "email", "fractions", "functools", "gettext", "glob", "heapq", "http.client", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing", "optparse", "os", "pathlib",
    "pickle", "pdb", "queue", "random", "re", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.request", "uuid",
    "zipfile",
)
_SPLIT = re.compile(r"(?<=[.!?])\s+")
_PROSE = re.compile(r"^[A-Z][A-Za-z ,;'-]+[a-z]\.$")  # a plain sentence: letters, spaces, commas, one full stop


def _docstrings(module) -> list[str]:
    name = module.__name__
    objects = [module] + [
        value for key, value in sorted(vars(module).items())
        if not key.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "").startswith(name)
    ]
    docs = []
    for obj in objects:
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            docs += [inspect.getdoc(m) or "" for k, m in sorted(vars(obj).items())
                     if inspect.isfunction(m) and not k.startswith("_")]
    return docs


def sentences(n: int, seed: int = 0) -> list[str]:
    """n distinct sentences of 6 to 24 words, shuffled with `seed`."""
    seen: dict[str, None] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for doc in _docstrings(module):
            for paragraph in doc.split("\n\n"):
                for sentence in _SPLIT.split(" ".join(paragraph.split())):
                    if _PROSE.match(sentence) and 6 <= len(sentence.split()) <= 24:
                        seen.setdefault(sentence)
    found = list(seen)
    if len(found) < n:
        raise RuntimeError(f"only {len(found)} docstring sentences found, {n} asked for")
    random.Random(seed).shuffle(found)
    return found[:n]
