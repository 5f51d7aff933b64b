"""The nursery grammar: generator, exact checker, vocabulary and corruptions."""

import functools
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tnd.config import CORRUPTION_KINDS
from tnd.data import nursery
from tnd.data.nursery import CORRUPTIONS, VOCABULARY, WORDS_BY_CATEGORY, corrupt, generate_sentences, is_grammatical

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("agreement_swap", "adjacent_swap", "drop_word", "duplicate_word")
# Words whose number/person form a swap can break: be/do, this/that/these/those, verbs in -s.
AGREEING = {"am", "is", "are", "was", "were", "do", "does", "this", "that", "these", "those"}


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    return [s for seed in (0, 1, 2, 3, 4) for s in generate_sentences(1000, seed)]


def words_of(sentence: str) -> list[str]:
    return sentence[:-1].split(" ")


def in_language(sentence: str) -> bool:
    """An oracle for the checker: whether the grammar derives `sentence`. It shares the rule tables (the
    language's definition) with is_grammatical but none of its code: its own surface split and a/an rule,
    and a plain memoised recursion over spans (no first sets, no preterminal shortcut)."""
    if not re.fullmatch(r"[a-z]+( [a-z]+)*[.?]", sentence):
        return False
    words = words_of(sentence)
    for i, word in enumerate(words):
        if word in ("a", "an"):
            if i + 1 == len(words) or (words[i + 1][0] in "aeiou") != (word == "an"):
                return False
            words[i] = "a"
    tokens = (*words, sentence[-1])

    @functools.cache
    def derives(symbol: str, i: int, j: int) -> bool:  # symbol =>* tokens[i:j]
        if not symbol[0].isupper():
            return j == i + 1 and tokens[i] == symbol
        return any(sequence(rule.rhs, i, j) for rule in nursery.GRAMMAR[symbol])

    def sequence(rhs: tuple[str, ...], i: int, j: int) -> bool:
        if len(rhs) == 1:
            return derives(rhs[0], i, j)
        return any(derives(rhs[0], i, k) and sequence(rhs[1:], k, j) for k in range(i + 1, j - len(rhs) + 2))

    return derives(nursery.START, 0, len(tokens))


def made_by(kind: str, original: list[str], bad: list[str]) -> bool:
    """Whether `bad` is `original` changed as `kind` says: one noun, verb, auxiliary or determiner for
    another of its category, two adjacent words swapped, one word dropped, one word repeated."""
    n = len(original)
    if kind == "agreement_swap":
        changed = [(a, b) for a, b in zip(original, bad) if a != b] if len(bad) == n else []
        categories = ("noun", "verb", "auxiliary", "determiner")
        return len(changed) == 1 and any(set(changed[0]) <= set(WORDS_BY_CATEGORY[c]) for c in categories)
    if kind == "adjacent_swap":
        swaps = ([*original[:i], original[i + 1], original[i], *original[i + 2:]] for i in range(n - 1))
        return any(bad == swap != original for swap in swaps)
    if kind == "drop_word":
        return any(bad == [*original[:i], *original[i + 1:]] for i in range(n))
    return any(bad == [*original[: i + 1], original[i], *original[i + 1:]] for i in range(n))


# --- generator ----------------------------------------------------------------------------


def test_same_seed_same_sentences_and_different_seed_differs():
    assert generate_sentences(300, 5) == generate_sentences(300, 5)
    assert generate_sentences(300, 5) != generate_sentences(300, 6)
    assert generate_sentences(0, 5) == []


def test_generator_does_not_touch_the_global_rng():
    random.seed(11)
    expected = random.random()
    random.seed(11)
    generate_sentences(50, 1)
    assert random.random() == expected


def test_generator_is_the_same_under_any_hash_seed():
    # Set iteration order changes with PYTHONHASHSEED; the sentences must not.
    code = "from tnd.data.nursery import generate_sentences as g; print('|'.join(g(200, 9)))"
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(run.stdout)
    assert outputs == {"|".join(generate_sentences(200, 9)) + "\n"}


def test_sentences_are_diverse_and_short(sentences):
    first = sentences[:2000]
    assert len(set(first)) > 0.5 * len(first)
    lengths = [len(s.split(" ")) for s in sentences]
    assert min(lengths) >= 2
    assert sum(3 <= n <= 12 for n in lengths) > 0.8 * len(lengths)


def test_surface_format(sentences):
    for s in sentences:
        assert s == s.strip() and s[-1] in ".?" and s[-2] != " "
        assert all(w and w.islower() and w.isalpha() for w in words_of(s))


def test_grammar_covers_the_promised_constructions(sentences):
    joined = set(sentences)
    assert any(s.endswith("?") and s.startswith(("does ", "do ", "did ")) for s in joined)
    assert any(s.startswith(("is ", "are ", "was ", "were ")) for s in joined)
    assert any(s.startswith("where ") for s in joined)
    assert any(" and " in s for s in joined) and any(" but " in s for s in joined)
    assert any(w.endswith("ing") for s in joined for w in words_of(s) if w in WORDS_BY_CATEGORY["verb"])
    assert any(" an " in f" {s}" for s in joined)
    assert any(set(words_of(s)) & set(WORDS_BY_CATEGORY["preposition"]) for s in joined)


# --- vocabulary ---------------------------------------------------------------------------


def test_vocabulary_is_sorted_few_hundred_words_and_covers_every_sentence(sentences):
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    assert 200 <= len(VOCABULARY) <= 800
    vocabulary = set(VOCABULARY)
    assert {w for s in sentences for w in words_of(s)} <= vocabulary


def test_categories_partition_sizes_and_union():
    assert set().union(*map(set, WORDS_BY_CATEGORY.values())) == set(VOCABULARY)
    assert 80 <= len(WORDS_BY_CATEGORY["noun"]) // 2 <= 150  # singular + plural forms
    assert 30 <= len(WORDS_BY_CATEGORY["adjective"]) <= 60
    assert set(nursery.CONTENT_WORDS) <= set(VOCABULARY)
    assert "an" in WORDS_BY_CATEGORY["determiner"]


def test_spelling_predicts_the_article():
    # "a"/"an" is decided by the first letter; words like "unicorn" or "hour" would lie.
    tricky = ("uni", "use", "eu", "one", "hour", "honest")
    assert not [w for w in VOCABULARY if w.startswith(tricky)]


# --- checker ------------------------------------------------------------------------------


def test_checker_accepts_every_generated_sentence(sentences):
    assert [s for s in sentences if not is_grammatical(s)] == []
    assert [s for s in sentences[:500] if not in_language(s)] == []  # the oracle is no stricter


@pytest.mark.parametrize(
    "sentence",
    [
        "the dog runs.",
        "the big red ball rolls.",
        "i am running.",
        "you were happy.",
        "these dogs chase a cat near the tree.",
        "an old owl is very angry.",
        "an elephant eats an apple.",
        "she sees me.",
        "does the dog run?",
        "do you like my hat?",
        "is the cat big?",
        "where is the ball?",
        "what does the dog want?",
        "who is sleeping?",
        "the dog runs and the cat sleeps.",
        "  mommy hugged the baby. \n",
    ],
)
def test_checker_accepts_handwritten_sentences(sentence):
    assert is_grammatical(sentence)
    assert in_language(sentence.strip())  # the oracle agrees with the hand label


@pytest.mark.parametrize(
    "sentence",
    [
        "the dogs runs.",  # subject-verb agreement
        "a dogs run.",  # determiner-noun agreement
        "those dog runs.",
        "i is happy.",
        "does the dog runs?",  # do-support takes the base form
        "dog the runs.",
        "the dog the runs.",
        "",
        "   ",
        ".",
        "the dog runs",  # no final mark
        "the dog runs?",  # a statement is not a question
        "is the cat big.",
        "the dog runs .",
        "the  dog runs.",
        "The dog runs.",
        "the dog runs!",
        "the dog, runs.",
        "the zorblax runs.",
        "a elephant runs.",
        "an dog runs.",
        "me runs.",
        "the dog sees i.",
        "the red big ball rolls.",  # colour adjectives come last
        "the ball eats the cake.",  # eating wants an animate subject
        "i am liking the cat.",  # stative verbs have no progressive
        "the dog runs and.",
    ],
)
def test_checker_rejects_handwritten_sentences(sentence):
    assert not is_grammatical(sentence)
    assert not in_language(sentence.strip())  # the oracle agrees with the hand label


def test_checker_rejects_non_strings():
    assert not is_grammatical(None)  # type: ignore[arg-type]


# --- corruptions --------------------------------------------------------------------------


def test_corruption_kinds_are_exactly_the_four():
    assert tuple(CORRUPTIONS) == KINDS == CORRUPTION_KINDS  # the grammar implements what params accept


@pytest.mark.parametrize("kind", KINDS)
def test_every_corruption_is_its_kind_and_ungrammatical_and_most_sentences_have_one(sentences, kind):
    # corrupt() picks a variant the checker rejects, so the checker cannot judge it: the oracle does
    # (on the first 500, for time), and made_by checks the change is the one named.
    rng = random.Random(0)
    corrupted = [corrupt(s, kind, rng) for s in sentences]
    made = [(s, c) for s, c in zip(sentences, corrupted) if c is not None]
    assert len(made) > 0.8 * len(sentences)
    for original, bad in made:
        assert made_by(kind, words_of(original), words_of(bad)), (original, bad)
        assert bad[-1] == original[-1] and bad == bad.strip() and "  " not in bad and " ." not in bad
        assert set(words_of(bad)) <= set(VOCABULARY)
    assert [pair for pair in made[:500] if in_language(pair[1])] == []


@pytest.mark.parametrize(
    "sentence,kind,expected",
    [
        # "the dog sees the cats." is grammatical: never a corruption
        ("the dog sees the cat.", "agreement_swap", {"the dogs sees the cat.", "the dog see the cat."}),
        ("the dogs ran.", "agreement_swap", set()),  # "the dog ran." is grammatical
        # "the dog runs." is grammatical: never a corruption
        ("the big dog runs.", "drop_word", {"big dog runs.", "the big runs.", "the big dog."}),
        ("is the cat big?", "adjacent_swap", {"the is cat big?", "is cat the big?", "is the big cat?"}),
        ("an owl sleeps.", "adjacent_swap", {"owl an sleeps.", "an sleeps owl."}),
        ("the dog runs.", "duplicate_word", {"the the dog runs.", "the dog dog runs.", "the dog runs runs."}),
    ],
)
def test_corrupt_makes_exactly_the_ungrammatical_variants(sentence, kind, expected):
    # Hand-labelled: every variant of its kind that is ungrammatical, none that is grammatical.
    made = {corrupt(sentence, kind, random.Random(seed)) for seed in range(60)}
    assert made - {None} == expected
    assert (None in made) == (not expected)


def test_agreement_swap_finds_one_where_something_agrees(sentences):
    agreeing = AGREEING | {w for w in WORDS_BY_CATEGORY["verb"] if w.endswith("s")}
    candidates = [s for s in sentences if agreeing & set(words_of(s))]
    rng = random.Random(1)
    found = sum(corrupt(s, "agreement_swap", rng) is not None for s in candidates)
    # Misses are "read": "she reads it." -> "she read it." is a grammatical past.
    assert found > 0.98 * len(candidates)


def test_corruptions_change_words_as_named():
    rng = random.Random(0)
    assert corrupt("the dog runs.", "agreement_swap", rng) in {"the dog run.", "the dogs runs."}
    assert corrupt("the dog runs.", "adjacent_swap", rng) in {"dog the runs.", "the runs dog."}
    assert corrupt("the dog runs.", "drop_word", rng) in {"dog runs.", "the runs.", "the dog."}
    assert corrupt("the dog runs.", "duplicate_word", rng) in {
        "the the dog runs.", "the dog dog runs.", "the dog runs runs."
    }


def test_corrupt_is_deterministic_for_an_rng_seed(sentences):
    for kind in KINDS:
        first = [corrupt(s, kind, random.Random(3)) for s in sentences[:50]]
        assert first == [corrupt(s, kind, random.Random(3)) for s in sentences[:50]]


def test_corrupt_returns_none_when_no_kind_of_that_change_breaks_it():
    rng = random.Random(0)
    assert corrupt("the dog ran.", "agreement_swap", rng) is None  # "the dogs ran." is fine
    assert corrupt("run.", "drop_word", rng) is None  # nothing would be left


def test_corrupt_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="agreement_swap.*adjacent_swap.*drop_word.*duplicate_word"):
        corrupt("the dog runs.", "shuffle", random.Random(0))


def test_generate_rejects_negative_count():
    with pytest.raises(ValueError):
        generate_sentences(-1, 0)
