"""The small helpers the stages share: one-line exception text, undefined figures, the position check,
the closing-line format and the prepared rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from stages import common
from tnd.errors import TndError, one_line
from tnd.numbers import finite, finite_mean


def test_one_line_folds_white_space_and_marks_a_cut():
    exc = ValueError("bad\n  thing\there ")
    assert one_line(exc) == "bad thing here"
    assert one_line(exc, 8) == "bad t..." and len(one_line(exc, 8)) == 8
    assert one_line(exc, 14) == "bad thing here"
    assert one_line(ValueError()) == ""


def test_finite_and_finite_mean():
    assert finite(1) == 1.0 and finite("2.5") == 2.5
    assert [finite(v) for v in (None, "", "x", math.nan, math.inf, -math.inf)] == [None] * 6
    assert finite_mean([1.0, math.nan, None, 3.0, math.inf]) == 2.0
    assert finite_mean([math.nan, None]) is None and finite_mean([]) is None


def test_check_positions_names_the_role_and_the_param():
    models = {"student": SimpleNamespace(config=SimpleNamespace(max_position_embeddings=16)),
              "reward": SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8)),
              "other": SimpleNamespace(config=SimpleNamespace())}  # no limit: any length
    common.check_positions(models, 8, "ppo.max_new_tokens", 6, "prompts + samples")
    with pytest.raises(TndError) as info:
        common.check_positions(models, 9, "ppo.max_new_tokens", 6, "prompts + samples")
    assert str(info.value) == ("ppo.max_new_tokens = 6: prompts + samples reach 9 tokens, more than the reward's "
                               "max_position_embeddings (8); lower ppo.max_new_tokens")


def test_fmt():
    assert common.fmt(None) == "n/a" and common.fmt(1.23456) == "1.235"


def test_prepared_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TndError, match=r"prompts.jsonl: not found; run `dvc repro prepare_data`"):
        common.prepared_rows("prompts.jsonl")
    (tmp_path / common.PREPARED).mkdir(parents=True)
    (tmp_path / common.PREPARED / "prompts.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    assert common.prepared_rows("prompts.jsonl") == [{"a": 1}, {"a": 2}]
