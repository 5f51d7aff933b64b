"""The "nursery" built-in data: a seeded grammar of short child-directed English and an exact checker.

The language is defined once, by the rule tables below, and both the generator and the
checker read those tables, so they cannot drift apart.

Grammar in brief (features in brackets are expanded into plain context-free rules):

    S        -> DECL .  |  Q ?
    DECL     -> CLAUSE  |  CLAUSE and CLAUSE  |  CLAUSE but CLAUSE
    CLAUSE   -> SUBJ[agr,anim] PRED[agr,anim,tense]
    PRED     -> VP in the form the subject and tense ask for (run / runs / ran)
              | BE[agr,tense] (adjective | PP | VP-ing)        "is big", "was running"
    VP       -> V[iv] (PP)  |  V[tv] OBJ (PP)
    NP       -> DET[num] (ADJ[q]) (ADJ[c]) N[num,anim]          "these big red balls"
    Q        -> do-support "does the dog run?", be-inversion "is the cat big?",
                "where is the ball?", "what does the dog want?", "who is sleeping?"

Features: agreement (agr: 1s = "i", 3s = singular nouns, names, he/she/it; pl = plural
nouns, we/you/they), tense (present, past; progressive through BE + -ing), noun number
(determiners this/a agree with singular nouns, these/those with plural ones) and
animacy (most verbs want an animate subject; copular sentences take any subject).
Pronouns have case: subject i/he/she/we/they, object me/him/her/us/them.
The article "a" becomes "an" before a vowel-initial word; that is the one rule outside
the context-free core, applied by the generator and checked by the checker.

Surface form: lowercase words separated by single spaces, the final "." or "?" attached
to the last word. Words within a category are drawn with Zipfian weights (the order of
the tables below), so some words are frequent and others rare, as in child-directed
speech.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Callable, NamedTuple

__all__ = [
    "CONTENT_WORDS",
    "CORRUPTIONS",
    "VOCABULARY",
    "WORDS_BY_CATEGORY",
    "corrupt",
    "generate_sentences",
    "is_grammatical",
]

# ---------------------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------------------

# "singular" or "singular/plural" when the plural is not singular + "s".
ANIMATE_NOUNS = """
    dog cat baby/babies boy girl bird duck cow pig horse bunny/bunnies puppy/puppies
    kitten frog bear monkey mouse/mice fox/foxes lion tiger elephant owl ant bee
    rabbit goat hen chick turtle snail friend child/children man/men woman/women
    sister brother teacher doctor farmer king queen giraffe zebra penguin butterfly/butterflies
    goose/geese wolf/wolves donkey squirrel whale dinosaur spider octopus/octopuses
"""
THING_NOUNS = """
    ball book cup hat shoe sock toy car truck train boat bus/buses plane bike box/boxes
    bed chair table door window house tree flower apple banana cookie cake egg
    sandwich/sandwiches spoon bowl bottle blanket pillow doll block crayon drum kite
    balloon bubble star cloud leaf/leaves rock stick puddle garden park bag key clock
    lamp picture umbrella shell boot coat dress/dresses brush/brushes towel swing slide
    castle bridge hill pond road orange/oranges
"""

# Quality adjectives come before colour adjectives ("the big red ball", never "the red big").
QUALITY_ADJECTIVES = """
    big little small happy sad silly funny nice good bad hungry sleepy tired soft wet dry
    hot cold clean dirty new old tall fast slow pretty loud quiet fluffy tiny huge angry
    empty shiny sticky brave cute busy icy
"""
COLOUR_ADJECTIVES = "red blue green yellow pink purple brown black white"

NAMES = "mommy daddy grandma grandpa sam mia ben lily max emma tom lucy"
PREPOSITIONS = "on in under with near behind"

# -ing "-" = no progressive: stative verbs sound wrong in it ("i am liking the cat").
# subject "any" = also takes an inanimate subject ("the ball rolls").
VERBS = """
    # base   -s        past      -ing       valency  subject
    run      runs      ran       running    iv       ani
    jump     jumps     jumped    jumping    iv       ani
    sleep    sleeps    slept     sleeping   iv       ani
    sit      sits      sat       sitting    iv       ani
    cry      cries     cried     crying     iv       ani
    laugh    laughs    laughed   laughing   iv       ani
    walk     walks     walked    walking    iv       ani
    swim     swims     swam      swimming   iv       ani
    smile    smiles    smiled    smiling    iv       ani
    dance    dances    danced    dancing    iv       ani
    hide     hides     hid       hiding     iv       ani
    wait     waits     waited    waiting    iv       ani
    hop      hops      hopped    hopping    iv       ani
    nap      naps      napped    napping    iv       ani
    giggle   giggles   giggled   giggling   iv       ani
    yawn     yawns     yawned    yawning    iv       ani
    crawl    crawls    crawled   crawling   iv       ani
    fall     falls     fell      falling    iv       any
    roll     rolls     rolled    rolling    iv       any
    fly      flies     flew      flying     iv       any
    spin     spins     spun      spinning   iv       any
    bounce   bounces   bounced   bouncing   iv       any
    float    floats    floated   floating   iv       any
    sink     sinks     sank      sinking    iv       any
    stop     stops     stopped   stopping   iv       any
    play     plays     played    playing    iv,tv    ani
    eat      eats      ate       eating     iv,tv    ani
    sing     sings     sang      singing    iv,tv    ani
    read     reads     read      reading    iv,tv    ani
    draw     draws     drew      drawing    iv,tv    ani
    climb    climbs    climbed   climbing   iv,tv    ani
    see      sees      saw       -          tv       ani
    like     likes     liked     -          tv       ani
    want     wants     wanted    -          tv       ani
    have     has       had       -          tv       ani
    love     loves     loved     -          tv       ani
    need     needs     needed    -          tv       ani
    hear     hears     heard     -          tv       ani
    find     finds     found     finding    tv       ani
    hold     holds     held      holding    tv       ani
    kick     kicks     kicked    kicking    tv       ani
    push     pushes    pushed    pushing    tv       ani
    pull     pulls     pulled    pulling    tv       ani
    throw    throws    threw     throwing   tv       ani
    catch    catches   caught    catching   tv       ani
    hug      hugs      hugged    hugging    tv       ani
    take     takes     took      taking     tv       ani
    make     makes     made      making     tv       ani
    carry    carries   carried   carrying   tv       ani
    open     opens     opened    opening    tv       ani
    build    builds    built     building   tv       ani
    drop     drops     dropped   dropping   tv       ani
    touch    touches   touched   touching   tv       ani
    kiss     kisses    kissed    kissing    tv       ani
    bring    brings    brought   bringing   tv       ani
    wash     washes    washed    washing    tv       ani
    watch    watches   watched   watching   tv       ani
    feed     feeds     fed       feeding    tv       ani
    chase    chases    chased    chasing    tv       ani
"""
VERB_FORMS = ("base", "s", "past", "ing")

# Frequency falls off as 1 / rank ** ZIPF_EXPONENT down each word list.
ZIPF_EXPONENT = 1.0

# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------

# Feature variables and the weight of each value when a rule leaves the variable free
# (when the left-hand side fixes it, the parent already chose).
DOMAINS: dict[str, dict[str, float]] = {
    "agr": {"1s": 1.0, "3s": 5.0, "pl": 3.0},
    "num": {"sg": 3.0, "pl": 2.0},
    "anim": {"ani": 3.0, "thg": 1.0},
    "tense": {"pres": 3.0, "past": 2.0},
    # Only ever literal or fixed by a left-hand side, so their weights never matter.
    "form": {form: 1.0 for form in VERB_FORMS},
    "vc": {"iv": 1.0, "tv": 1.0},  # intransitive, transitive
    "adj": {"q": 1.0, "c": 1.0},  # quality, colour
}

# weight  LHS -> RHS. Upper-case symbols are nonterminals, anything else is a word.
# Feature slots hold a variable from DOMAINS or a literal value.
RULES = """
    4    S -> DECL .
    1    S -> Q ?

    8    DECL -> CLAUSE
    1.5  DECL -> CLAUSE and CLAUSE
    0.5  DECL -> CLAUSE but CLAUSE
    3    CLAUSE -> SUBJ[agr,ani] PRED[agr,ani,tense]
    1    CLAUSE -> SUBJ[agr,thg] PRED[agr,thg,tense]

    1    SUBJ[1s,ani] -> i
    1    SUBJ[pl,ani] -> we
    1    SUBJ[pl,ani] -> you
    1    SUBJ[pl,anim] -> they
    4    SUBJ[pl,anim] -> NP[pl,anim]
    1    SUBJ[3s,ani] -> he
    1    SUBJ[3s,ani] -> she
    1    SUBJ[3s,anim] -> it
    2    SUBJ[3s,ani] -> NAME
    5    SUBJ[3s,anim] -> NP[sg,anim]

    2    OBJ -> NP[num,ani]
    4    OBJ -> NP[num,thg]
    1.5  OBJ -> NAME
    0.5  OBJ -> me
    0.5  OBJ -> you
    0.5  OBJ -> him
    0.5  OBJ -> her
    0.5  OBJ -> it
    0.5  OBJ -> us
    0.5  OBJ -> them

    1    NP[num,anim] -> DET[num] NOM[num,anim]
    6    NOM[num,anim] -> N[num,anim]
    2    NOM[num,anim] -> ADJ[q] N[num,anim]
    1.5  NOM[num,anim] -> ADJ[c] N[num,anim]
    0.5  NOM[num,anim] -> ADJ[q] ADJ[c] N[num,anim]
    1    PP -> P OBJ

    3    DET[sg] -> the
    2    DET[sg] -> a
    1    DET[sg] -> this
    1    DET[sg] -> that
    1    DET[sg] -> my
    1    DET[sg] -> your
    3    DET[pl] -> the
    1    DET[pl] -> these
    1    DET[pl] -> those
    1    DET[pl] -> my
    1    DET[pl] -> your

    3    PRED[1s,anim,pres] -> VP[anim,base]
    3    PRED[pl,anim,pres] -> VP[anim,base]
    3    PRED[3s,anim,pres] -> VP[anim,s]
    3    PRED[agr,anim,past] -> VP[anim,past]
    2    PRED[agr,anim,tense] -> BE[agr,tense] BECOMP[anim]
    3    BECOMP[anim] -> ADJP
    1.5  BECOMP[anim] -> PP
    2.5  BECOMP[anim] -> VP[anim,ing]
    4    ADJP -> ADJ[q]
    1    ADJP -> very ADJ[q]
    2    ADJP -> ADJ[c]

    3    VP[anim,form] -> V[iv,anim,form]
    1.5  VP[anim,form] -> V[iv,anim,form] PP
    3    VP[anim,form] -> V[tv,anim,form] OBJ
    1    VP[anim,form] -> V[tv,anim,form] OBJ PP

    3    Q -> DO[agr,tense] SUBJ[agr,anim] VP[anim,base]
    3    Q -> BE[agr,tense] SUBJ[agr,anim] BECOMP[anim]
    1.5  Q -> where BE[agr,tense] SUBJ[agr,anim]
    1    Q -> what DO[agr,tense] SUBJ[agr,ani] V[tv,ani,base]
    0.5  Q -> what BE[agr,tense] SUBJ[agr,ani] V[tv,ani,ing]
    1    Q -> who PRED[3s,ani,tense]

    1    BE[1s,pres] -> am
    1    BE[3s,pres] -> is
    1    BE[pl,pres] -> are
    1    BE[1s,past] -> was
    1    BE[3s,past] -> was
    1    BE[pl,past] -> were
    1    DO[1s,pres] -> do
    1    DO[pl,pres] -> do
    1    DO[3s,pres] -> does
    1    DO[agr,past] -> did
"""
START = "S"
END_MARKS = (".", "?")

# Number partners for agreement_swap: verb -s <-> base, be/do forms, determiners, nouns.
_AUX_PARTNERS = {
    "am": ("is", "are"),
    "is": ("am", "are"),
    "are": ("am", "is"),
    "was": ("were",),
    "were": ("was",),
    "do": ("does",),
    "does": ("do",),
    "this": ("these",),
    "these": ("this",),
    "that": ("those",),
    "those": ("that",),
}


class Rule(NamedTuple):
    lhs: str
    rhs: tuple[str, ...]
    weight: float


def _words(table: str) -> list[str]:
    return table.split()


def _nouns(table: str) -> list[tuple[str, str]]:
    pairs = []
    for entry in _words(table):
        singular, _, plural = entry.partition("/")
        pairs.append((singular, plural or singular + "s"))
    return pairs


class _Verb(NamedTuple):
    forms: dict[str, str]  # form -> word; a form the verb lacks is absent
    valency: tuple[str, ...]
    subjects: tuple[str, ...]


def _verbs(table: str) -> list[_Verb]:
    verbs = []
    for line in table.strip().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        *forms, valency, subject = line.split()
        verbs.append(
            _Verb(
                forms={f: w for f, w in zip(VERB_FORMS, forms, strict=True) if w != "-"},
                valency=tuple(valency.split(",")),
                subjects=("ani", "thg") if subject == "any" else (subject,),
            )
        )
    return verbs


def _zipf(rank: int) -> float:
    return 1.0 / (rank + 1) ** ZIPF_EXPONENT


def _lexical_rules() -> list[Rule]:
    """Preterminal rules N[..], V[..], ADJ[..], NAME, P, weighted by rank within each list."""
    rules = []
    for anim, table in (("ani", ANIMATE_NOUNS), ("thg", THING_NOUNS)):
        for rank, (singular, plural) in enumerate(_nouns(table)):
            rules.append(Rule(f"N[sg,{anim}]", (singular,), _zipf(rank)))
            rules.append(Rule(f"N[pl,{anim}]", (plural,), _zipf(rank)))
    for kind, table in (("q", QUALITY_ADJECTIVES), ("c", COLOUR_ADJECTIVES)):
        rules += [Rule(f"ADJ[{kind}]", (w,), _zipf(r)) for r, w in enumerate(_words(table))]
    rules += [Rule("NAME", (w,), _zipf(r)) for r, w in enumerate(_words(NAMES))]
    rules += [Rule("P", (w,), _zipf(r)) for r, w in enumerate(_words(PREPOSITIONS))]
    # Rank within each (valency, subject) list so every list has its own frequent words.
    ranks: dict[tuple[str, str], int] = {}
    for verb in _verbs(VERBS):
        for vc, anim in itertools.product(verb.valency, verb.subjects):
            rank = ranks[vc, anim] = ranks.get((vc, anim), -1) + 1
            for form, word in verb.forms.items():
                rules.append(Rule(f"V[{vc},{anim},{form}]", (word,), _zipf(rank)))
    return rules


_SYMBOL = re.compile(r"^([A-Z][A-Z_]*)(?:\[([a-z0-9_,]*)\])?$")


def _features(symbol: str) -> list[str]:
    match = _SYMBOL.match(symbol)
    return match.group(2).split(",") if match and match.group(2) else []


def _is_nonterminal(symbol: str) -> bool:
    return symbol[0].isupper()


def _substitute(symbol: str, binding: dict[str, str]) -> str:
    if not _is_nonterminal(symbol) or "[" not in symbol:
        return symbol
    name = symbol[: symbol.index("[")]
    return f"{name}[{','.join(binding.get(f, f) for f in _features(symbol))}]"


def _expand_template(weight: float, lhs: str, rhs: list[str]) -> list[Rule]:
    """One plain rule per assignment of the template's feature variables."""
    known_values = {v for values in DOMAINS.values() for v in values}
    variables: list[str] = []
    for symbol in [lhs, *rhs]:
        if _is_nonterminal(symbol) and not _SYMBOL.match(symbol):
            raise ValueError(f"nursery grammar: bad symbol {symbol!r}")
        for feature in _features(symbol):
            if feature in DOMAINS:
                if feature not in variables:
                    variables.append(feature)
            elif feature not in known_values:
                raise ValueError(f"nursery grammar: unknown feature {feature!r} in {symbol!r}")
    free = [v for v in variables if v not in _features(lhs)]
    rules = []
    for values in itertools.product(*(DOMAINS[v] for v in variables)):
        binding = dict(zip(variables, values))
        w = weight
        for v in free:
            w *= DOMAINS[v][binding[v]]
        rules.append(Rule(_substitute(lhs, binding), tuple(_substitute(s, binding) for s in rhs), w))
    return rules


def _template_rules(table: str) -> list[Rule]:
    rules = []
    for line in table.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        weight, lhs, arrow, *rhs = line.split()
        if arrow != "->" or not rhs:
            raise ValueError(f"nursery grammar: bad rule line {line!r}")
        rules += _expand_template(float(weight), lhs, rhs)
    return rules


def _prune(rules: list[Rule], start: str) -> list[Rule]:
    """Drop rules that cannot derive a sentence (e.g. SUBJ[1s,thg]) or are unreachable."""
    def derivable(rule: Rule) -> bool:
        return all(not _is_nonterminal(s) or s in productive for s in rule.rhs)

    productive: set[str] = set()
    changed = True
    while changed:
        changed = False
        for rule in rules:
            if rule.lhs not in productive and derivable(rule):
                productive.add(rule.lhs)
                changed = True
    rules = [r for r in rules if r.lhs in productive and derivable(r)]
    reachable, frontier = {start}, [start]
    while frontier:
        symbol = frontier.pop()
        for rule in rules:
            if rule.lhs == symbol:
                for s in rule.rhs:
                    if _is_nonterminal(s) and s not in reachable:
                        reachable.add(s)
                        frontier.append(s)
    return [r for r in rules if r.lhs in reachable]


def _check_acyclic(rules_by_lhs: dict[str, list[Rule]]) -> None:
    # The checker's memoised descent would loop on left recursion; the grammar has none
    # (no recursion at all, so the language is finite), and this keeps it that way.
    state: dict[str, int] = {}

    def visit(symbol: str) -> None:
        if state.get(symbol) == 2:
            return
        if state.get(symbol) == 1:
            raise ValueError(f"nursery grammar: recursion through {symbol!r}")
        state[symbol] = 1
        for rule in rules_by_lhs[symbol]:
            for s in rule.rhs:
                if _is_nonterminal(s):
                    visit(s)
        state[symbol] = 2

    visit(START)


def _build() -> dict[str, list[Rule]]:
    rules = _prune(_template_rules(RULES) + _lexical_rules(), START)
    by_lhs: dict[str, list[Rule]] = {}
    for rule in rules:
        by_lhs.setdefault(rule.lhs, []).append(rule)
    _check_acyclic(by_lhs)
    return by_lhs


GRAMMAR: dict[str, list[Rule]] = _build()


def _first_sets(grammar: dict[str, list[Rule]]) -> dict[str, frozenset[str]]:
    """Words each nonterminal can start with (no rule is empty, so only rhs[0] matters)."""
    first: dict[str, set[str]] = {lhs: set() for lhs in grammar}
    changed = True
    while changed:
        changed = False
        for lhs, rules in grammar.items():
            for rule in rules:
                head = rule.rhs[0]
                new = first[head] if _is_nonterminal(head) else {head}
                if not new <= first[lhs]:
                    first[lhs] |= new
                    changed = True
    return {lhs: frozenset(words) for lhs, words in first.items()}


_FIRST = _first_sets(GRAMMAR)
# Preterminals (every rule one word) are matched by set lookup instead of descent.
_PRETERMINAL = {
    lhs for lhs, rules in GRAMMAR.items()
    if all(len(r.rhs) == 1 and not _is_nonterminal(r.rhs[0]) for r in rules)
}
# Parser view: distinct right-hand sides per nonterminal (weights do not matter here).
_ALTERNATIVES = {lhs: tuple(dict.fromkeys(r.rhs for r in rules)) for lhs, rules in GRAMMAR.items()}
# Generator view: alternatives with cumulative weights for random.choices.
_CHOICES = {
    lhs: ([r.rhs for r in rules], list(itertools.accumulate(r.weight for r in rules)))
    for lhs, rules in GRAMMAR.items()
}

# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------


def _terminals_of(*names: str) -> tuple[str, ...]:
    """The words of the preterminals called `names` (any features)."""
    words = set()
    for lhs in _PRETERMINAL:
        if lhs.split("[")[0] in names:
            words.update(rule.rhs[0] for rule in GRAMMAR[lhs])
    return tuple(sorted(words))


WORDS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "noun": _terminals_of("N"),
    "verb": _terminals_of("V"),
    "adjective": _terminals_of("ADJ"),
    "name": _terminals_of("NAME"),
    "determiner": tuple(sorted(set(_terminals_of("DET")) | {"an"})),
    "pronoun": ("he", "her", "him", "i", "it", "me", "she", "them", "they", "us", "we", "you"),
    "preposition": _terminals_of("P"),
    "auxiliary": _terminals_of("BE", "DO"),
    "function": ("and", "but", "very", "what", "where", "who"),
}
CONTENT_WORDS: tuple[str, ...] = tuple(sorted(
    set(WORDS_BY_CATEGORY["noun"]) | set(WORDS_BY_CATEGORY["verb"])
    | set(WORDS_BY_CATEGORY["adjective"]) | set(WORDS_BY_CATEGORY["name"])
))
VOCABULARY: tuple[str, ...] = tuple(sorted({w for words in WORDS_BY_CATEGORY.values() for w in words}))
_VOCABULARY_SET = frozenset(VOCABULARY)


def _grammar_words() -> set[str]:
    words = {s for rules in GRAMMAR.values() for r in rules for s in r.rhs if not _is_nonterminal(s)}
    return words - set(END_MARKS)


if _grammar_words() | {"an"} != _VOCABULARY_SET:
    raise ValueError(
        "nursery: WORDS_BY_CATEGORY does not cover the grammar's words exactly: "
        f"{sorted(_grammar_words() ^ (_VOCABULARY_SET - {'an'}))}"
    )

# ---------------------------------------------------------------------------------------
# The article rule: "a" before a consonant, "an" before a vowel
# ---------------------------------------------------------------------------------------


def _vowel_onset(word: str) -> bool:
    # Spelling stands in for sound: the vocabulary avoids "unicorn"/"hour"-type words.
    return word[0] in "aeiou"


def _apply_articles(words: list[str]) -> list[str]:
    return [
        "an" if w == "a" and i + 1 < len(words) and _vowel_onset(words[i + 1]) else w
        for i, w in enumerate(words)
    ]


def _undo_articles(words: list[str]) -> list[str] | None:
    """The words with "an" read as "a", or None when an article does not fit its next word."""
    out = []
    for i, w in enumerate(words):
        if w in ("a", "an"):
            if i + 1 >= len(words) or _vowel_onset(words[i + 1]) != (w == "an"):
                return None
            w = "a"
        out.append(w)
    return out

# ---------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------


def _derive(symbol: str, rng: random.Random, out: list[str]) -> None:
    if not _is_nonterminal(symbol):
        out.append(symbol)
        return
    alternatives, cum_weights = _CHOICES[symbol]
    for s in rng.choices(alternatives, cum_weights=cum_weights)[0]:
        _derive(s, rng, out)


def _join(words: list[str], mark: str) -> str:
    return " ".join(words) + mark


def generate_sentences(n: int, seed: int) -> list[str]:
    """`n` sentences drawn from the grammar; the same seed always gives the same list."""
    if n < 0:
        raise ValueError(f"generate_sentences: n must be >= 0, got {n}")
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        tokens: list[str] = []
        _derive(START, rng, tokens)
        sentences.append(_join(_apply_articles(tokens[:-1]), tokens[-1]))
    return sentences

# ---------------------------------------------------------------------------------------
# Checker
# ---------------------------------------------------------------------------------------


def _split(sentence: str) -> tuple[list[str], str] | None:
    """(words, final mark) of a well-formed surface string, else None."""
    text = sentence.strip()
    if len(text) < 2 or text[-1] not in END_MARKS:
        return None
    words = text[:-1].split(" ")
    if not all(words):  # "" from double spaces or a space before the mark
        return None
    return words, text[-1]


def _derives(tokens: list[str]) -> bool:
    """Whether START derives exactly `tokens`: memoised descent returning end positions."""
    n = len(tokens)
    memo: dict[tuple[str, int], frozenset[int]] = {}
    empty: frozenset[int] = frozenset()

    def ends(symbol: str, i: int) -> frozenset[int]:
        if i >= n:
            return empty
        if not _is_nonterminal(symbol):
            return frozenset((i + 1,)) if tokens[i] == symbol else empty
        key = (symbol, i)
        found = memo.get(key)
        if found is not None:
            return found
        if tokens[i] not in _FIRST[symbol]:
            found = empty
        elif symbol in _PRETERMINAL:
            found = frozenset((i + 1,))
        else:
            result: set[int] = set()
            for rhs in _ALTERNATIVES[symbol]:
                positions = {i}
                for s in rhs:
                    positions = {e for p in positions for e in ends(s, p)}
                    if not positions:
                        break
                result |= positions
            found = frozenset(result)
        memo[key] = found
        return found

    return n in ends(START, 0)


def is_grammatical(sentence: str) -> bool:
    """Exact membership in the nursery language (surrounding whitespace is ignored)."""
    if not isinstance(sentence, str):
        return False
    split = _split(sentence)
    if split is None:
        return False
    words, mark = split
    if not all(w in _VOCABULARY_SET for w in words):
        return False
    words = _undo_articles(words)
    return words is not None and _derives([*words, mark])

# ---------------------------------------------------------------------------------------
# Corruptions
# ---------------------------------------------------------------------------------------


def _number_partners() -> dict[str, tuple[str, ...]]:
    partners: dict[str, set[str]] = {w: set(p) for w, p in _AUX_PARTNERS.items()}
    pairs = [p for t in (ANIMATE_NOUNS, THING_NOUNS) for p in _nouns(t)]
    pairs += [(v.forms["base"], v.forms["s"]) for v in _verbs(VERBS)]
    for a, b in pairs:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    return {w: tuple(sorted(p)) for w, p in partners.items()}


_NUMBER_PARTNERS = _number_partners()


def _first_rejected(
    words: list[str], mark: str, candidates: list[list[str]], rng: random.Random
) -> str | None:
    """Try candidate word lists in random order; the first the checker rejects, or None."""
    rng.shuffle(candidates)
    for candidate in candidates:
        if candidate and candidate != words:
            text = _join(candidate, mark)
            if not is_grammatical(text):
                return text
    return None


def _agreement_swap(words: list[str]) -> list[list[str]]:
    return [
        [*words[:i], partner, *words[i + 1:]]
        for i, w in enumerate(words)
        for partner in _NUMBER_PARTNERS.get(w, ())
    ]


def _adjacent_swap(words: list[str]) -> list[list[str]]:
    return [[*words[:i], words[i + 1], words[i], *words[i + 2:]] for i in range(len(words) - 1)]


def _drop_word(words: list[str]) -> list[list[str]]:
    return [[*words[:i], *words[i + 1:]] for i in range(len(words))]


def _duplicate_word(words: list[str]) -> list[list[str]]:
    return [[*words[:i + 1], words[i], *words[i + 1:]] for i in range(len(words))]


Corruption = Callable[[str, random.Random], str | None]


def _corruption(candidates: Callable[[list[str]], list[list[str]]]) -> Corruption:
    def apply(sentence: str, rng: random.Random) -> str | None:
        text = sentence.strip()
        mark = text[-1] if text and text[-1] in END_MARKS else ""
        words = text[: len(text) - len(mark)].split()
        return _first_rejected(words, mark, candidates(words), rng)

    apply.__name__ = candidates.__name__.lstrip("_")
    apply.__doc__ = f"{apply.__name__} of `sentence` that the checker rejects, or None if there is none."
    return apply


CORRUPTIONS: dict[str, Corruption] = {
    "agreement_swap": _corruption(_agreement_swap),
    "adjacent_swap": _corruption(_adjacent_swap),
    "drop_word": _corruption(_drop_word),
    "duplicate_word": _corruption(_duplicate_word),
}


def corrupt(sentence: str, kind: str, rng: random.Random) -> str | None:
    """An ungrammatical variant of `sentence` made by `kind`, or None when `kind` cannot make one.

    agreement_swap flips the number of a verb, auxiliary, determiner or noun (runs <-> run,
    is <-> are, this <-> these, dog <-> dogs); the others swap two adjacent words, drop one
    or repeat one. The final "." or "?" stays on the last word.
    """
    try:
        corruption = CORRUPTIONS[kind]
    except KeyError:
        raise ValueError(f"unknown corruption kind {kind!r}; valid kinds: {', '.join(CORRUPTIONS)}") from None
    return corruption(sentence, rng)
