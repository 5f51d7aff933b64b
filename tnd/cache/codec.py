"""The teacher-logit cache format: the layout on disk and the codec of its rows.

A cache stores, per continuation token, one of two `targets` (index.json `targets`, from
cache.targets):

  * topk_tail  the teacher's top-k log-probs, their ids and the exact log-mass of the rest: the
               (k+1)-bucket distribution the trainer distils on exactly
  * sampled    `samples` (S) ids drawn from the teacher at the cache temperature, stored as the
               distinct ids and their counts: the empirical distribution c_j / S, an unbiased
               estimate of the teacher's (random-sampling KD; below, "The sampled targets")

Layout of one cache directory (normally `cache/teacher/`)::

    index.json                 written last, atomically, by one process; the only list of valid shards
    shard-00000.safetensors    each written atomically (temp file + os.replace)
    shard-00001.safetensors
    ...

A shard holds whole sequences (a sequence never spans two shards) and these tensors, with
n_seq sequences and N = the number of continuation tokens ("targets", one stored row each):

    input_ids       int32   [sum of sequence lengths]  prompt + continuation, concatenated
    seq_offsets     int64   [n_seq + 1]   sequence i is input_ids[seq_offsets[i]:seq_offsets[i+1]]
    prompt_lengths  int32   [n_seq]       the first prompt_lengths[i] tokens of sequence i are prompt
    target_offsets  int64   [n_seq + 1]   sequence i's rows are [target_offsets[i]:target_offsets[i+1]]
    topk_indices    uint8   [N, ceil(k b / 8)]  the k token ids of a row, b = ceil(log2 V) bits each
    tail_logmass    float32 [N]   log(1 - top-k mass), exact; -inf when k == V
    and the top-k log-probs, by the index's `dtype` (topk_tail):
      compact (default):
        topk_codes  uint8   [N, value_bytes]   the log-probs' levels, unary-coded (below)
        topk_step   float16 [N]   the level step of the row, in nats
      float16 | bfloat16 | float32:
        topk_logprobs dtype [N, k]
  sampled, instead of the top-k tensors:
    sample_groups   uint8   [N, ceil((S - 1) / 8)]  bit i - 1 (i = 1..S-1) is 1 when the i-th of the
                                  row's S sorted draws differs from the one before: a row has
                                  m = 1 + (its one bits) distinct ids, and the run lengths are their counts
    sample_ids      uint8   [ceil(M b / 8)]  the distinct ids of every row of the shard, ascending
                                  within a row, row after row, as one bit string (M = the sum of m)

Row j of sequence i (0 <= j < n_continuation) is the teacher's distribution at position
prompt_len + j - 1, i.e. the one that predicts continuation token input_ids[prompt_len + j].
Top-k entries are sorted by decreasing log-prob l_1 >= l_2 >= ... >= l_k, l = log_softmax(logits / T).

Bit packing: a row's values v_1..v_m of b bits each form one little-endian bit string (bit t of
v_i is bit i b + t of the row; bit s of the row is bit s mod 8 of byte s div 8), zero-padded to
whole bytes. Indices take b = ceil(log2 V) bits: 17 at V = 128,256, 15 at 32,000, 11 at 1,205.

The compact log-probs. Only the depths d_i = min(l_1 - l_i, D) for i = 2..k are stored (d_1 = 0,
D = MAX_DEPTH = 30 nats: a token e^-30 times less likely than the top one weighs nothing), on a
grid of L levels with a per-row step s = d_k / L (rounded up to float16): q_i = round(d_i / s),
0 <= q_2 <= ... <= q_k <= L. A non-decreasing sequence is coded in unary: for i = 2..k, the
(i-1)-th one bit of the row's code sits at position q_i + (i - 2), so the code has exactly k - 1
ones and q_k <= L zeros before the last one, and q_i = the number of zeros before the (i-1)-th
one. The code is value_bytes = ceil(45 (k - 1) / 128) bytes (2.8125 bits per log-prob) and L =
8 value_bytes - (k - 1): L = 233 at k = 128. The top-1 log-prob is not stored: the exact tail
fixes the top-k mass M = 1 - exp(tail), and decoding renormalises to it,

    l^_i = log M - s q_i - logsumexp_j(-s q_j),   log M = log(-expm1(tail)),

so the stored (k+1)-bucket distribution (the k decoded probabilities and the exact tail) sums
to 1, and its error is the rounding of each depth to the grid: |l^_i - l_i - c| <= s / 2 for one
constant c per row (plus the clamp at D). At V = 128,256, k = 128 a row takes 272 (indices) +
45 (codes) + 2 (step) + 4 (tail) = 323 bytes, against 772 for float16 values and int32 indices;
`reconstruction_kl` (KL of the stored distribution from the exact one, over the k + 1 buckets)
measures what the rounding costs and the writer records it in index.json.

The sampled targets. Row j's S draws x_1..x_S ~ p = softmax(logits / T) at the cache temperature
give w_v = (count of v) / S, with E[w] = p. The student's cross-entropy against w,
-sum_v w_v log q_v, has expectation CE(p, q) = KL(p || q) + H(p), so its gradient q - w is an
unbiased estimate of the full forward-KL gradient q - p (Anshumann et al., ACL 2025, "Sparse
Logit Sampling"); top-k, renormalised or not, is biased. No teacher log-prob is stored: with the
draws from p itself the weights are the counts. The reader gives a sampled row as S slots with
topk_logprobs = log w (-inf in the S - m slots past the distinct ids, which hold other distinct
filler ids) and tail_logmass = -inf (no mass outside the draws), so the top-k + tail loss reads it
unchanged: its forward KL over those buckets is KL(w || q) = CE(w, q) - H(w), the RS-KD loss up to
H(w), a constant of the student; its expectation is KL(p || q) + H(p) - E[H(w)], above the full
KL by H(p) - E[H(w)] >= 0 (the empirical entropy is biased low), and its gradient is exactly q - w.
The KL of the stored distribution from the teacher's is infinite (w is 0 off the draws): a
sampled cache has no `reconstruction_kl`; index.json records `distinct_mean`, the mean m.

index.json records format_version, targets, the teacher and tokenizer fingerprints, vocab size,
temperature, index_bits, totals, per targets k, dtype, value_bytes and levels (compact), the mean
and largest reconstruction KL (topk_tail) or samples and distinct_mean (sampled), and per shard: file, n_sequences, n_tokens (target tokens), bytes and
sha256, computed once as the shard is written. Files in the directory that index.json does not
list (a shard left by a crash before the index was written) are ignored.

`TeacherCache` reads it back. Opening reads index.json, checks it, the fingerprints and every
listed shard's size (a stat, no read); a shard's sha256 is checked the first time the shard is
read (once per process), so opening a large cache is cheap. Problems are one-line `CacheError`s
that name the file and the fix.

Several processes write one cache (`write_teacher_cache`): shard j holds prompts [j P, (j+1) P)
(P = shard_prompts: a whole number of batches), process r of R writes shards r, r + R, ..., each
batch of prompts sampled with its own seed (seed + the index of its first prompt; the sampled
targets of that batch with a seed derived from it, `target_seed`), and process 0
writes index.json once all have finished. So the same params give the same shards whatever R, and the same
index.json but for its `reconstruction_kl` diagnostic: it is computed from the teacher's unrounded log-probs,
whose last bits depend on the threads a process's matrix products run on.
"""


from __future__ import annotations

import math

import torch

from tnd.errors import TndError

# 2: the tokenizer fingerprint covers merges, normalizer and pre-tokenizer (`tokenizer_content`).
# 3: bit-packed indices, the compact log-prob code, per-batch sampling seeds (several processes), sha256
#    checked on first read, the threaded teacher fingerprint.
# 4: index.json `targets` (topk_tail | sampled) and the sampled targets. Older caches are refused by their version.
FORMAT_VERSION = 4
INDEX = "index.json"
RERUN = "rerun `dvc repro -f cache_teacher_logits`"
DTYPES = {"compact": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TARGETS = ("topk_tail", "sampled")
SEQUENCE_TENSORS = ("input_ids", "seq_offsets", "prompt_lengths", "target_offsets")
TOPK_TENSORS = ("topk_indices", "tail_logmass")
SAMPLE_TENSORS = ("sample_groups", "sample_ids")
VALUE_TENSORS = {"compact": ("topk_codes", "topk_step")}  # any other dtype: ("topk_logprobs",)
MAX_DEPTH = 30.0  # nats below the top-1 log-prob beyond which the compact code clamps


class CacheError(TndError):
    """The teacher-logit cache is missing, corrupted, or made by another teacher/tokenizer."""


SHARD_KEYS = ("file", "n_sequences", "n_tokens", "bytes", "sha256")


def index_bits(vocab_size: int) -> int:
    """Bits per stored token id: ceil(log2 vocab_size), at least 1."""
    return max(1, (int(vocab_size) - 1).bit_length())


def value_bytes(k: int) -> int:
    """Bytes of a row's compact log-prob code: 2.8125 bits per log-prob below the top one."""
    return -(-45 * (int(k) - 1) // 128)


def levels(k: int) -> int:
    """L, the grid levels of the compact code: the bits of the code not taken by its k - 1 ones."""
    return 8 * value_bytes(k) - (int(k) - 1)


def _spans(m: int, bits: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For m values of `bits` bits in a little-endian bit string, from its bit `start`: each value's
    first byte, its bit offset in that byte, and how many bytes a value can touch."""
    offsets = start + torch.arange(m, dtype=torch.int64) * bits
    return offsets // 8, offsets % 8, (bits + 7 + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [N, ceil(m bits / 8)]: the m non-negative integers (< 2^bits) of each row of `values`
    [N, m], `bits` bits each, as one little-endian bit string (see the module docstring)."""
    n, m = values.shape
    n_bytes = -(-m * bits // 8)
    first, shift, span = _spans(m, bits)
    shifted = values.long() << shift.to(values.device)
    out = torch.zeros(n, n_bytes + span, dtype=torch.int64, device=values.device)
    for j in range(span):  # the bits of different values never share a bit: adding is or-ing
        out.index_add_(1, first.to(values.device) + j, (shifted >> (8 * j)) & 0xFF)
    return out[:, :n_bytes].to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, m: int, start: int = 0) -> torch.Tensor:
    """int64 [N, m]: the inverse of `pack_bits` (the values from bit `start` of each row on)."""
    first, shift, span = _spans(m, bits, start)
    padded = torch.cat([data, data.new_zeros(data.shape[0], span)], dim=1).long()
    first = first.to(data.device)
    word = padded[:, first]
    for j in range(1, span):
        word |= padded[:, first + j] << (8 * j)
    return (word >> shift.to(data.device)) & ((1 << bits) - 1)


def _popcount_select() -> tuple[torch.Tensor, torch.Tensor]:
    """For every byte value: its number of one bits, and the position of its r-th one bit (r = 0..7)."""
    popcount = torch.zeros(256, dtype=torch.int64)
    select = torch.zeros(256, 8, dtype=torch.int64)
    for byte in range(256):
        ones = [bit for bit in range(8) if byte >> bit & 1]
        popcount[byte] = len(ones)
        select[byte, : len(ones)] = torch.tensor(ones, dtype=torch.int64)
    return popcount, select


_POPCOUNT, _SELECT = _popcount_select()


def encode_logprobs(topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compact code of sorted top-k log-probs [N, k]: (codes uint8 [N, value_bytes(k)], step fp16 [N])."""
    n, k = topk_logprobs.shape
    if k == 1:  # nothing below the top one: its log-prob is log(1 - exp(tail))
        return torch.zeros(n, 0, dtype=torch.uint8), torch.zeros(n, dtype=torch.float16)
    n_levels = levels(k)
    lp = topk_logprobs.float()
    depth = torch.nan_to_num(lp[:, :1] - lp[:, 1:], nan=0.0, posinf=MAX_DEPTH).clamp(0.0, MAX_DEPTH)  # [N, k-1]
    deepest = depth[:, -1]
    step = (deepest / n_levels).to(torch.float16)
    short = step.float() * n_levels < deepest  # float16 rounded down: one ulp up, so q_k <= L
    step = torch.where(short, torch.nextafter(step, torch.full_like(step, math.inf)), step)
    safe = step.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = torch.where(step.unsqueeze(-1) > 0, torch.round(depth / safe), 0.0).clamp(0, n_levels).long()
    q = torch.cummax(q, dim=-1).values  # non-decreasing (it already is, unless rounding ties go astray)
    position = q + torch.arange(k - 1, device=lp.device)  # of the one bit of each level: distinct, increasing
    codes = torch.zeros(n, value_bytes(k), dtype=torch.int64, device=lp.device)
    codes.scatter_add_(1, position // 8, 1 << (position % 8))
    return codes.to(torch.uint8), step


def decode_logprobs(codes: torch.Tensor, step: torch.Tensor, tail_logmass: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [N, k] top-k log-probs from the compact code (`encode_logprobs`), renormalised so that
    their mass is 1 - exp(tail_logmass). Raises ValueError on a code without k - 1 ones."""
    n = codes.shape[0]
    if k == 1:
        depth = torch.zeros(n, 1)
    else:
        byte = codes.long()
        ones = _POPCOUNT.to(codes.device)[byte]  # [N, B]
        through = ones.cumsum(-1)  # ones in bytes 0..b
        if n and not bool((through[:, -1] == k - 1).all()):
            raise ValueError("compact code: a row does not hold k - 1 levels")
        rank = torch.arange(1, k, device=codes.device).expand(n, k - 1).contiguous()
        where = torch.searchsorted(through, rank)  # the byte holding the rank-th one
        within = rank - (through.gather(1, where) - ones.gather(1, where)) - 1
        bit = _SELECT.to(codes.device)[byte.gather(1, where), within]
        q = (8 * where + bit - (rank - 1)).float()  # zeros before the rank-th one
        depth = torch.cat([q.new_zeros(n, 1), q * step.float().unsqueeze(-1)], dim=-1)
    top_logmass = torch.log(-torch.expm1(tail_logmass.float()))
    return top_logmass.unsqueeze(-1) - depth - torch.logsumexp(-depth, dim=-1, keepdim=True)


def reconstruction_kl(exact: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """KL(exact || stored) [N] (float64) over the k + 1 buckets of each row, from the exact top-k
    log-probs [N, k] and the stored ones; the tail bucket is stored exactly and adds nothing.

    Computed as sum_i p_i (e^-d_i - 1 + d_i), d_i = log p_i - log q_i: the KL when both sides sum to
    1, and otherwise the generalised KL (sum p log p/q - sum p + sum q), so each term is >= 0 and
    float32 rounding of the two sides (or an unnormalised float16 row) does not make it negative."""
    p_log = exact.float()
    diff = p_log - stored.float()
    terms = p_log.exp() * (torch.expm1(-diff) + diff).clamp_min(0.0)
    return torch.where(p_log > -math.inf, terms, 0.0).sum(-1, dtype=torch.float64)



# --- the sampled targets -----------------------------------------------------------------------


def group_bytes(samples: int) -> int:
    """Bytes of a sampled row's `sample_groups`: one bit per draw after the first."""
    return -(-(int(samples) - 1) // 8)


def encode_samples(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample_groups uint8 [N, group_bytes(S)], the distinct ids int64 [M], row after row, ascending
    within a row) of the draws [N, S]; the ids are bit-packed per shard (`pack_bits` of [1, M])."""
    draws = draws.sort(dim=-1).values
    new = draws[:, 1:] != draws[:, :-1]
    first = torch.ones(draws.shape[0], 1, dtype=torch.bool, device=draws.device)
    return pack_bits(new.long(), 1), draws[torch.cat([first, new], dim=1)]


def distinct_counts(groups: torch.Tensor, samples: int) -> torch.Tensor:
    """int64 [N]: m, the distinct ids of each sampled row, from its `sample_groups`."""
    return 1 + unpack_bits(groups, 1, int(samples) - 1).sum(-1)


def decode_samples(groups: torch.Tensor, ids: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-weights float32 [N, S], ids int64 [N, S]) of sampled rows from their `sample_groups` and
    their distinct ids [M] (`encode_samples`). A row's first m slots are its distinct ids with
    log(count / S); the other S - m hold the smallest ids not among them, with -inf, so the ids of a
    row are distinct (the top-k loss's contract) and weigh nothing. Raises ValueError on groups and
    ids that do not fit together (a corrupted cache)."""
    n, s = groups.shape[0], int(samples)
    new = unpack_bits(groups, 1, s - 1).bool()
    if groups.shape[1] * 8 > s - 1 and bool((groups[:, -1].long() >> ((s - 1) % 8 or 8)).any()):
        raise ValueError("sampled rows: padding bits set in sample_groups")
    starts = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=groups.device), new], dim=1)
    m = starts.sum(-1)
    if int(m.sum()) != ids.numel():
        raise ValueError(f"sampled rows: sample_groups give {int(m.sum())} distinct ids, sample_ids holds {ids.numel()}")
    counts = torch.zeros(n, s, dtype=torch.int64, device=groups.device)
    counts.scatter_add_(1, starts.long().cumsum(-1) - 1, torch.ones_like(counts))
    slot = torch.arange(s, device=groups.device).expand(n, s)
    used = slot < m.unsqueeze(-1)
    row_ids = torch.zeros(n, s, dtype=torch.int64, device=groups.device)
    row_ids[used] = ids.long()
    if bool((used[:, 1:] & (row_ids[:, 1:] <= row_ids[:, :-1])).any()):
        raise ValueError("sampled rows: the ids of a row are not strictly ascending")
    # At most m of the candidates 0..S-1 are taken, so at least the S - m fillers needed are free.
    taken = ((slot.unsqueeze(-1) == row_ids.unsqueeze(1)) & used.unsqueeze(1)).any(-1)
    free = slot.gather(1, taken.long().argsort(dim=-1, stable=True))
    filled = torch.where(used, row_ids, free.gather(1, (slot - m.unsqueeze(-1)).clamp_min(0)))
    log_weights = torch.where(used, torch.log(counts.float() / s), -math.inf)
    return log_weights, filled
