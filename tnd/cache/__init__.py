"""The teacher-logit cache: the teacher's sampled demonstrations and its distribution at each of
their positions, on disk.

    codec         the format: the layout of a cache directory and the coding of its rows
    fingerprints  what a cache is checked against: the teacher's weights, the tokenizer
    writer        `CacheWriter`, `teacher_rows`, `write_teacher_cache` (one process or several)
    reader        `TeacherCache`

Everything public is importable from `tnd.cache`.
"""

from .codec import (
    COMMON_TENSORS,
    DTYPES,
    FORMAT_VERSION,
    INDEX,
    MAX_DEPTH,
    RERUN,
    SHARD_KEYS,
    VALUE_TENSORS,
    CacheError,
    decode_logprobs,
    encode_logprobs,
    index_bits,
    levels,
    pack_bits,
    reconstruction_kl,
    unpack_bits,
    value_bytes,
)
from .fingerprints import fingerprint_model, fingerprint_tokenizer, fingerprint_vocabulary, tokenizer_content
from .reader import CachedSequence, TeacherCache, cache_bytes
from .writer import VOCAB_SLICE, CacheWriter, shard_prompts, teacher_rows, teacher_topk, write_teacher_cache

__all__ = [
    "COMMON_TENSORS", "DTYPES", "FORMAT_VERSION", "INDEX", "MAX_DEPTH", "RERUN", "SHARD_KEYS", "VALUE_TENSORS",
    "VOCAB_SLICE", "CacheError", "CachedSequence", "CacheWriter", "TeacherCache", "cache_bytes", "decode_logprobs",
    "encode_logprobs", "fingerprint_model", "fingerprint_tokenizer", "fingerprint_vocabulary", "index_bits",
    "levels", "pack_bits", "reconstruction_kl", "shard_prompts", "teacher_rows", "teacher_topk",
    "tokenizer_content", "unpack_bits", "value_bytes", "write_teacher_cache",
]
