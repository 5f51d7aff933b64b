"""Quality measures shared by the teacher, PPO and evaluate stages.

Everything here works on models, tokenizers and lists of texts or token ids; where the
inputs come from (file layout) is the stages' business.

* sampling: `sample_rows` (prompt + continuation, as text and token ids)
* `grammaticality` (nursery grammar), `distinct_n`, `mean_length`
* `token_kl`: mean per-token KL(reference || model) on texts, via `tnd_kernels.distill_loss`
* `perplexity_from_logprobs`: perplexity from `sequence_logprobs` (device-aware, unlike a
  plain batch loop on CPU tensors)
* word acquisition (the TnD paper's measure): `locate_words` finds where given words occur
  in texts and which tokens spell them, `sequence_logprobs` scores every token of those texts
  under a model, and `word_surprisals` sums each occurrence's token surprisals (bits) and
  averages them per word.
* the age at which each word is acquired over training (nAoA): `word_acquisition` fits a
  sigmoid to a word's surprisal curve over the student snapshots, `word_naoa` does it for every
  word and `naoa_summary` averages per word category (method in `word_acquisition`);
  `on_shared_scale` reads each fit against anchors every run of a comparison shares (chance and the
  teacher), and `effective_vocabulary` counts the words acquired at each snapshot.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tnd.batching import IGNORE_INDEX, collate, encode_for_lm, lm_sequence
from tnd.data import nursery
from tnd.data.tokenizer import decode
from tnd.generation import sample_continuations

LN2 = math.log(2.0)


# --- sampling -----------------------------------------------------------------------------


def sample_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    desc: str = "sampling",
    batch_size: int = 64,
) -> list[dict]:
    """One sampled continuation per prompt: prompt/continuation/full text, their token ids, length, ended."""
    continuations = sample_continuations(
        model, tokenizer, prompts, max_new_tokens, seed, temperature=temperature, batch_size=batch_size, desc=desc
    )
    rows = []
    for prompt, continuation in zip(prompts, continuations):
        rows.append(
            {
                "prompt": decode(tokenizer, prompt),
                "continuation": decode(tokenizer, continuation),
                "text": decode(tokenizer, prompt + continuation),
                "prompt_ids": list(prompt),
                "continuation_ids": list(continuation),
                "length": len(continuation),
                "ended": bool(continuation) and continuation[-1] == tokenizer.eos_token_id,
            }
        )
    return rows


def is_grammatical_row(row: dict) -> bool:
    """A sample is grammatical when it ended (eos) and the nursery grammar accepts its text."""
    return bool(row["ended"]) and nursery.is_grammatical(row["text"])


def grammatical_count(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                      continuations: Sequence[Sequence[int]]) -> int:
    """How many of prompt + continuation (token ids, as sampled) are grammatical (`is_grammatical_row`)."""
    return sum(bool(c) and c[-1] == tokenizer.eos_token_id and nursery.is_grammatical(decode(tokenizer, list(p) + list(c)))
               for p, c in zip(prompts, continuations))


def grammaticality(rows: list[dict]) -> float:
    """Fraction of sampled texts that the nursery grammar accepts (unfinished ones count as wrong)."""
    ok = [is_grammatical_row(row) for row in rows]
    return sum(ok) / max(len(ok), 1)


# --- diversity and length -----------------------------------------------------------------


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over all texts.

    Words are whitespace-separated; n-grams never cross texts. 0.0 when there is no n-gram.
    """
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def mean_length(rows: Sequence[dict]) -> float:
    """Mean continuation length in tokens (eos included)."""
    return sum(row["length"] for row in rows) / max(len(rows), 1)


# --- KL to a reference model ------------------------------------------------------------------


def _shared_vocab(a: torch.Tensor, b: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits over the same vocabulary (embeddings may be padded beyond the tokenizer)."""
    if a.shape[-1] == b.shape[-1]:
        return a, b
    return a[..., :vocab], b[..., :vocab]


@torch.no_grad()
def token_kl(
    models: Mapping[str, PreTrainedModel],
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    backend: str = "auto",
) -> dict[str, float]:
    """Per model, the mean per-token KL(reference || model) in nats on bos + text + eos.

    Every model reads the same ids, and each batch's reference logits are computed once for all of
    them. The positions averaged over are those that predict a real next token (the tokens perplexity
    counts: every non-pad position but the last). Computed with
    `tnd_kernels.distill_loss(loss="forward_kl", reduction="sum")` / count.
    """
    from tnd_kernels import distill_loss

    reference.eval()
    device = next(reference.parameters()).device
    data = encode_for_lm(tokenizer, texts, max_length)
    totals, count = dict.fromkeys(models, 0.0), 0
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        keep = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device).flatten()
        p = reference(input_ids=ids, attention_mask=mask).logits[:, :-1]
        for name, model in models.items():
            model.eval()
            q = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            q, p_ = _shared_vocab(q, p, len(tokenizer))
            kl = distill_loss(q.flatten(0, 1), p_.flatten(0, 1), loss="forward_kl", mask=keep, reduction="sum",
                              backend=backend)
            totals[name] += float(kl)
        count += int(keep.sum())
    return {name: total / max(count, 1) for name, total in totals.items()}


# --- word acquisition: surprisal of words in context ---------------------------------------------


class WordOccurrence(NamedTuple):
    sequence: int  # index into the encoded sequences
    word: str
    positions: tuple[int, ...]  # positions in the sequence (bos + text + eos) of the word's tokens


LOGPROB_CHUNK = 4096  # rows of logits turned into float32 log-probs at a time (memory: LOGPROB_CHUNK x V floats)
_WORD = re.compile(r"[A-Za-z]+")


def _owner_positions(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the character it belongs to: its first non-space character.

    A token of whitespace only (byte-level BPE's lone "Ġ") belongs to the word after it.
    """
    owners = []
    for start, end in offsets:
        pos = start
        while pos < len(text) and text[pos].isspace():
            pos += 1
        owners.append(pos)
    return owners


def locate_words(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], words: Iterable[str], max_length: int
) -> tuple[list[list[int]], list[WordOccurrence]]:
    """Encode texts as `encode_for_lm` does (bos + text + eos) and find every occurrence of `words`.

    Words are maximal runs of letters, matched case-insensitively; an occurrence's tokens
    are those whose first non-space character lies inside it (so "Ġ" + "l" + "ittle" all
    belong to "little"). Occurrences cut off by max_length, or sharing a token with a
    neighbouring character (a BPE merge across the word's edge), are left out.
    Needs a fast (Rust) tokenizer for character offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("locate_words needs a fast tokenizer (character offsets)")
    wanted = {w.lower() for w in words}
    sequences: list[list[int]] = []
    occurrences: list[WordOccurrence] = []
    for index, text in enumerate(texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        sequences.append(lm_sequence(tokenizer, ids, max_length))
        owners = _owner_positions(text, offsets)
        for match in _WORD.finditer(text):
            word = match.group().lower()
            if word not in wanted:
                continue
            start, end = match.span()
            tokens = [j for j, owner in enumerate(owners) if start <= owner < end]
            if not tokens:
                continue
            # the word's tokens must cover exactly its characters (no merge with a neighbour)
            if offsets[tokens[-1]][1] != end or tokens != list(range(tokens[0], tokens[-1] + 1)):
                continue
            positions = tuple(j + 1 for j in tokens)  # + 1 for the bos in front
            if positions[-1] >= len(sequences[-1]):
                continue
            occurrences.append(WordOccurrence(index, word, positions))
    return sequences, occurrences


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64
) -> list[torch.Tensor]:
    """Per sequence, float64 [len]: log p(token_j | tokens before j) in nats (entry 0, the bos: 0)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start : start + batch_size]]
        batch = collate(chunk, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logp = target_logprobs(logits.flatten(0, 1), ids[:, 1:].flatten()).view(ids.shape[0], -1).double().cpu()
        for row, seq in enumerate(chunk):
            out.append(torch.cat([torch.zeros(1, dtype=torch.float64), logp[row, : len(seq) - 1]]))
    return out


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = LOGPROB_CHUNK) -> torch.Tensor:
    """float32 [N]: log_softmax(logits)[i, targets[i]] for logits [N, V] in any dtype, `chunk` rows at a time,
    so the float32 copy is [chunk, V] and never [N, V]."""
    return torch.cat([
        rows.gather(-1, t[:, None]).squeeze(-1).float() - torch.logsumexp(rows.float(), dim=-1)
        for rows, t in zip(logits.split(chunk), targets.split(chunk))
    ]) if len(logits) else logits.new_zeros(0, dtype=torch.float32)


def perplexity_from_logprobs(logprobs: Sequence[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every token but each sequence's first (the bos), as
    `tnd.trainers.lm.perplexity` computes it from the same sequences."""
    total = sum(float(lp[1:].sum()) for lp in logprobs)
    count = sum(max(len(lp) - 1, 0) for lp in logprobs)
    return math.exp(-total / max(count, 1))


def word_surprisals(logprobs: Sequence[torch.Tensor], occurrences: Sequence[WordOccurrence]) -> dict[str, dict]:
    """{word: {"count", "surprisal"}}: mean over occurrences of -log2 p(word | left context),
    the sum of the surprisals of the word's tokens."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for occ in occurrences:
        bits = -sum(float(logprobs[occ.sequence][p]) for p in occ.positions) / LN2
        sums[occ.word] = sums.get(occ.word, 0.0) + bits
        counts[occ.word] = counts.get(occ.word, 0) + 1
    return {w: {"count": counts[w], "surprisal": sums[w] / counts[w]} for w in sorted(sums)}


def mean_word_surprisal(per_word: Mapping[str, dict]) -> float | None:
    """Mean over words (each word once, whatever its count); None when no word occurred."""
    values = [entry["surprisal"] for entry in per_word.values()]
    return sum(values) / len(values) if values else None


def word_category(word: str, categories: Mapping[str, Iterable[str]] = nursery.WORDS_BY_CATEGORY) -> str | None:
    """The first category (in `categories` order) that holds `word`."""
    for name, members in categories.items():
        if word in members:
            return name
    return None


# --- neural age of acquisition (nAoA) ---------------------------------------------------------

NAOA_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
NAOA_MIN_DROP = 0.1  # bits: a word whose surprisal fell by less was not learned (no nAoA)
NAOA_MIN_POINTS = 3  # snapshots at steps >= 1 (the last included) needed to fit the two parameters
NAOA_MAX_RMSE = 0.25  # in fractions of the way: a sigmoid further off than this does not describe the curve
_MAX_SLOPE = 1e3  # per decade of steps: a jump between two snapshots fits as a (near) step function


class WordAcquisition(NamedTuple):
    """One word's fit (`word_acquisition`). status: "fitted", or why there is no nAoA: "not_learned",
    "too_few_points", "fit_failed". naoa[t]: log10 step (None unless fitted); censored[t]: the fitted
    curve covers fraction t only after the last step, so naoa[t] is that step's log10."""

    status: str
    initial: float  # surprisal (bits) at the first step of the curve (step 0: the initial student)
    final: float  # at the last step (the final student)
    midpoint: Optional[float]  # m: log10 step where the fitted curve is half-way
    slope: Optional[float]  # k: per decade of steps
    rmse: Optional[float]  # of the fit, in fractions of the way from initial to final
    naoa: dict[float, Optional[float]]
    censored: dict[float, bool]


def threshold_key(t: float) -> str:
    """0.5 -> "t50", 0.95 -> "t95": metric names without a dot (DVC reads dots as nesting)."""
    return f"t{round(t * 100)}"


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _sse(xs: Sequence[float], ys: Sequence[float], m: float, k: float) -> float:
    return sum((_sigmoid(k * (x - m)) - y) ** 2 for x, y in zip(xs, ys))


def _levenberg_marquardt(xs, ys, m: float, k: float, iterations: int = 200) -> tuple[float, float, float]:
    """Least squares of sigmoid(k (x - m)) against ys, from (m, k); returns (m, k, sum of squares)."""
    current = _sse(xs, ys, m, k)
    damping = 1e-3
    for _ in range(iterations):
        a = b = c = g_m = g_k = 0.0
        for x, y in zip(xs, ys):
            s = _sigmoid(k * (x - m))
            d, r = s * (1.0 - s), s - y
            j_m, j_k = -k * d, (x - m) * d
            a, b, c = a + j_m * j_m, b + j_m * j_k, c + j_k * j_k
            g_m, g_k = g_m + j_m * r, g_k + j_k * r
        accepted = False
        while damping < 1e12:
            big_a, big_c = a + damping * max(a, 1e-12), c + damping * max(c, 1e-12)
            det = big_a * big_c - b * b
            if det > 0:
                new_m = m - (big_c * g_m - b * g_k) / det
                new_k = min(max(k - (big_a * g_k - b * g_m) / det, -_MAX_SLOPE), _MAX_SLOPE)
                new = _sse(xs, ys, new_m, new_k)
                if math.isfinite(new) and new < current:
                    gain = current - new
                    m, k, current = new_m, new_k, new
                    damping = max(damping / 10, 1e-12)
                    accepted = gain > 1e-14 * (1.0 + current) and current > 1e-28
                    break
            damping *= 10
        if not accepted:
            break
    return m, k, current


def _fit_fraction(xs: list[float], ys: list[float]) -> Optional[tuple[float, float, float]]:
    """The best (m, k, sse) over several starts (Chang & Bergen restart theirs too), or None."""
    lo, hi = min(xs), max(xs)
    width = max(hi - lo, 1e-6)
    starts = [(lo + f * width, 8.0 / width) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
    inner = [(x, math.log(y / (1 - y))) for x, y in zip(xs, ys) if 0.02 < y < 0.98]
    if len(inner) >= 2:  # a line through logit(fraction) against x: logit = k (x - m)
        mx = sum(x for x, _ in inner) / len(inner)
        my = sum(z for _, z in inner) / len(inner)
        var = sum((x - mx) ** 2 for x, _ in inner)
        if var > 0:
            k = sum((x - mx) * (z - my) for x, z in inner) / var
            if k > 0:
                starts.insert(0, (mx - my / k, k))
    best = None
    for m, k in starts:
        m, k, sse = _levenberg_marquardt(xs, ys, m, k)
        if math.isfinite(m) and math.isfinite(k) and math.isfinite(sse) and (best is None or sse < best[2]):
            best = (m, k, sse)
    return best


def word_acquisition(
    steps: Sequence[int],
    surprisals: Sequence[Optional[float]],
    thresholds: Sequence[float] = NAOA_THRESHOLDS,
    min_drop: float = NAOA_MIN_DROP,
) -> WordAcquisition:
    """A word's neural age of acquisition (nAoA) from its surprisal curve over training.

    The measure is Chang & Bergen's (2022, "Word acquisition in neural language models", TACL),
    as the TnD paper (Ma, Wang & Chai, NAACL 2025) uses it, at several thresholds:

    * the curve: the word's mean surprisal (bits, `word_surprisals`) at steps[i]; steps[0] is the
      start (step 0, the initial student) and steps[-1] the end (the final student). Points
      without a finite surprisal are left out.
    * initial = the surprisal at the first step, final = at the last; the fraction of the way
      covered at a step is (initial - surprisal) / (initial - final).
    * the fit: a sigmoid in x = log10(step) from the initial to the final value,
      surprisal(x) = initial - (initial - final) / (1 + exp(-k (x - m))), fitted by least squares
      on the fractions at the steps >= 1 (step 0 lies at x = -inf, where the sigmoid equals the
      initial value exactly, so it adds nothing to the fit): Levenberg-Marquardt over (m, k) from
      several starting points, the best kept. m is the log10 step half-way, k the steepness
      per decade.
    * nAoA@t = m + ln(t / (1 - t)) / k: the log10 step where the fitted curve has covered
      fraction t of the way from initial to final surprisal (t = 0.5: m, the paper's AoA).
      It is clamped to [log10 first step >= 1, log10 last step]: a crossing before the first
      snapshot is reported at it (the curve's resolution), one after the last step is reported at
      the last step and marked `censored` (by the fit the word had not got that far when training
      ended; counted per threshold by `naoa_summary`).

    Words without an nAoA, left out of the means and counted (`status`):
    * "not_learned": the surprisal fell by less than `min_drop` bits from initial to final (flat
      or rising curves: nothing was acquired, so no step of acquisition exists);
    * "too_few_points": fewer than NAOA_MIN_POINTS snapshots at steps >= 1 (two parameters);
    * "fit_failed": no finite fit with k > 0, or one whose root-mean-square error exceeds
      NAOA_MAX_RMSE (0.25 of the way from initial to final): the sigmoid does not describe the
      curve (noise as large as the drop; a curve that overshoots the final value and comes back).
    """
    points = [(int(s), float(v)) for s, v in zip(steps, surprisals) if v is not None and math.isfinite(v)]
    initial, final = (points[0][1], points[-1][1]) if points else (math.nan, math.nan)

    def failed(status: str) -> WordAcquisition:
        return WordAcquisition(status, initial, final, None, None, None, {t: None for t in thresholds},
                               {t: False for t in thresholds})

    if not points:
        return failed("too_few_points")
    if not initial - final >= min_drop:
        return failed("not_learned")
    fit_points = [(math.log10(s), (initial - v) / (initial - final)) for s, v in points if s >= 1]
    if len(fit_points) < NAOA_MIN_POINTS or len({x for x, _ in fit_points}) < 2:
        return failed("too_few_points")
    xs, ys = [x for x, _ in fit_points], [y for _, y in fit_points]
    best = _fit_fraction(xs, ys)
    if best is None or not best[1] > 0 or math.sqrt(best[2] / len(xs)) > NAOA_MAX_RMSE:
        return failed("fit_failed")
    m, k, sse = best
    lo, hi = xs[0], xs[-1]
    naoa: dict[float, Optional[float]] = {}
    censored: dict[float, bool] = {}
    for t in thresholds:
        x = m + math.log(t / (1 - t)) / k
        censored[t] = x > hi
        naoa[t] = min(max(x, lo), hi)
    return WordAcquisition("fitted", initial, final, m, k, math.sqrt(sse / len(xs)), naoa, censored)


def chance_surprisals(occurrences: Sequence[WordOccurrence], vocab_size: int) -> dict[str, float]:
    """{word: the surprisal (bits) of a uniform guess over `vocab_size` ids}: per occurrence, its number of
    tokens x log2(vocab_size), averaged as `word_surprisals` averages."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for occ in occurrences:
        sums[occ.word] = sums.get(occ.word, 0.0) + len(occ.positions) * math.log2(vocab_size)
        counts[occ.word] = counts.get(occ.word, 0) + 1
    return {w: sums[w] / counts[w] for w in sorted(sums)}


def shared_cutoff(chance: float, floor: float, t: float) -> float:
    """The surprisal that is fraction t of the way from `chance` down to `floor` (the teacher's)."""
    return chance - t * (chance - floor)


def on_shared_scale(
    fit: WordAcquisition, steps: Sequence[float], chance: float, floor: float,
    thresholds: Sequence[float] = NAOA_THRESHOLDS,
) -> WordAcquisition:
    """`fit` (a word's own curve, `word_acquisition`) read against shared anchors: nAoA@t is the log10 step at
    which the fitted curve crosses `shared_cutoff(chance, floor, t)`, the same surprisal in every mode and seed of
    a comparison (the teacher is theirs in common, chance is the vocabulary's), where the per-run nAoA crosses
    fraction t of the run's own way from initial to final. A word past the cutoff at the first snapshot is
    reported there; one whose fitted curve never reaches it, at the last step, `censored` (it had not got that
    far when training ended). Only fitted words have a curve to read; a word whose anchors do not fall
    (teacher no better than chance) gets status "no_scale"."""
    if fit.status != "fitted":
        return fit
    if not chance > floor:
        return fit._replace(status="no_scale", naoa={t: None for t in thresholds},
                            censored={t: False for t in thresholds})
    xs = [math.log10(s) for s in steps if s >= 1]
    lo, hi = min(xs), max(xs)
    naoa: dict[float, Optional[float]] = {}
    censored: dict[float, bool] = {}
    for t in thresholds:
        f = (fit.initial - shared_cutoff(chance, floor, t)) / (fit.initial - fit.final)  # of the word's own way
        if f <= 0:
            x = lo
        elif f >= 1:
            x = math.inf
        else:
            x = fit.midpoint + math.log(f / (1 - f)) / fit.slope
        censored[t] = x > hi
        naoa[t] = min(max(x, lo), hi)
    return fit._replace(naoa=naoa, censored=censored)


def half_way(anchors: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """{word: its cutoff half-way from chance to the teacher} for anchors {word: (chance, teacher)}: acquired below."""
    return {w: shared_cutoff(chance, floor, 0.5) for w, (chance, floor) in anchors.items()}


def effective_vocabulary(curve: Sequence[Mapping[str, Optional[float]]], cutoffs: Mapping[str, float]) -> list[int]:
    """Per row of a word curve ({"word:<w>": surprisal}), how many words have a measured surprisal at or below
    their cutoff (`shared_cutoff` at 0.5: acquired); the paper's effective vocabulary over training."""
    return [sum(1 for w, c in cutoffs.items()
                if row.get(f"word:{w}") is not None and math.isfinite(row[f"word:{w}"]) and row[f"word:{w}"] <= c)
            for row in curve]


def fitted_surprisal(fit: WordAcquisition, step: float) -> float:
    """The fitted curve of `word_acquisition` at `step` (> 0); NaN when the word has no fit."""
    if fit.status != "fitted":
        return math.nan
    return fit.initial - (fit.initial - fit.final) * _sigmoid(fit.slope * (math.log10(step) - fit.midpoint))


def word_naoa(
    steps: Sequence[int],
    curves: Mapping[str, Sequence[Optional[float]]],
    thresholds: Sequence[float] = NAOA_THRESHOLDS,
    min_drop: float = NAOA_MIN_DROP,
) -> dict[str, WordAcquisition]:
    """`word_acquisition` of every word: curves[word][i] is its surprisal at steps[i]."""
    return {word: word_acquisition(steps, curve, thresholds, min_drop) for word, curve in curves.items()}


def naoa_summary(
    fits: Mapping[str, WordAcquisition],
    categories: Mapping[str, Optional[str]],
    names: Sequence[str],
    thresholds: Sequence[float] = NAOA_THRESHOLDS,
) -> dict[str, dict]:
    """Per word category (`names`, in order, each word's from `categories`) and "overall" (every
    word): the mean nAoA (log10 step) at each threshold over the fitted words (threshold_key:
    "t50", ...; None when no word was fitted), and how many words there were, were fitted, were
    not learned, had too few points or failed to fit, and per threshold how many were censored
    (reported at the last step)."""
    groups = {"overall": list(fits), **{name: [w for w in fits if categories.get(w) == name] for name in names}}
    out: dict[str, dict] = {}
    for group, words in groups.items():
        fitted = [fits[w] for w in words if fits[w].status == "fitted"]
        entry: dict = {"words": len(words), "fitted": len(fitted)}
        for status in ("not_learned", "too_few_points", "fit_failed", "no_scale"):
            entry[status] = sum(fits[w].status == status for w in words)
        for t in thresholds:
            values = [f.naoa[t] for f in fitted]
            entry[threshold_key(t)] = sum(values) / len(values) if values else None
        entry["censored"] = {threshold_key(t): sum(f.censored[t] for f in fitted) for t in thresholds}
        out[group] = entry
    return out


# --- practice makes perfect (the paper's figure: a word's count in the trials against how well it is known) ---


def word_counts(texts: Iterable[str], words: Iterable[str]) -> dict[str, int]:
    """How often each of `words` occurs in `texts` (words found as `locate_words` finds them: runs of letters,
    any case); words that do not occur are left out."""
    wanted = {w.lower() for w in words}
    counts: dict[str, int] = {}
    for text in texts:
        for match in _WORD.finditer(text):
            word = match.group().lower()
            if word in wanted:
                counts[word] = counts.get(word, 0) + 1
    return counts


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation, ties sharing their mean rank; None for fewer than 3 pairs or a side with
    one value only."""
    if len(xs) < 3:
        return None

    def ranks(values: Sequence[float]) -> torch.Tensor:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = torch.empty(len(values), dtype=torch.float64)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            out[order[i : j + 1]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = float(rx.norm() * ry.norm())
    return float(rx @ ry) / norm if norm > 0 else None


def practice(counts: Mapping[str, int], final: Mapping[str, dict], fits: Mapping[str, WordAcquisition]) -> tuple[list[dict], dict]:
    """Per word of `final` (word -> {"surprisal", ...}, the student's, as `word_surprisals` gives): its category,
    its count in the student's trials, its final surprisal and its nAoA@0.5; and the rank correlations of the count with
    each (over the words that have one). Practice helps when they are negative: words the student produced
    more often end up less surprising and are acquired earlier."""
    rows = []
    for word in sorted(final):
        fit = fits.get(word)
        half = fit.naoa.get(0.5) if fit is not None and fit.status == "fitted" else None
        rows.append({"word": word, "category": word_category(word), "trained_count": counts.get(word, 0),
                     "surprisal": final[word]["surprisal"], "naoa_t50": half})

    def rho(key: str) -> Optional[float]:
        pairs = [(r["trained_count"], r[key]) for r in rows if r[key] is not None and math.isfinite(r[key])]
        return spearman([c for c, _ in pairs], [v for _, v in pairs])

    summary = {"words": len(rows), "practised": sum(r["trained_count"] > 0 for r in rows),
               "spearman_surprisal": rho("surprisal"), "spearman_naoa_t50": rho("naoa_t50")}
    return rows, summary
