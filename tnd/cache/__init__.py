"""The teacher-logit cache: the teacher's sampled demonstrations and its distribution at each of
their positions, on disk.

    codec         the format: the layout of a cache directory and the coding of its rows
    fingerprints  what a cache is checked against: the teacher's weights, the tokenizer
    writer        `CacheWriter`, `teacher_rows`, `write_teacher_cache` (one process or several)
    reader        `TeacherCache`

Everything public is importable from `tnd.cache`.
"""

from .codec import (
    DTYPES,
    FORMAT_VERSION,
    INDEX,
    MAX_DEPTH,
    RERUN,
    SAMPLE_TENSORS,
    SEQUENCE_TENSORS,
    SHARD_KEYS,
    TARGETS,
    TOPK_TENSORS,
    VALUE_TENSORS,
    CacheError,
    decode_logprobs,
    decode_samples,
    distinct_counts,
    encode_logprobs,
    encode_samples,
    group_bytes,
    index_bits,
    levels,
    pack_bits,
    reconstruction_kl,
    unpack_bits,
    value_bytes,
)
from .fingerprints import fingerprint_model, fingerprint_tokenizer, fingerprint_vocabulary, tokenizer_content
from .reader import CachedSequence, TeacherCache, cache_bytes
from .writer import (
    VOCAB_SLICE,
    CacheWriter,
    sample_targets,
    shard_prompts,
    target_seed,
    teacher_logit_chunks,
    teacher_rows,
    teacher_topk,
    write_teacher_cache,
)

__all__ = [
    "DTYPES", "FORMAT_VERSION", "INDEX", "MAX_DEPTH", "RERUN", "SAMPLE_TENSORS", "SEQUENCE_TENSORS", "SHARD_KEYS",
    "TARGETS", "TOPK_TENSORS", "VALUE_TENSORS", "VOCAB_SLICE", "CacheError", "CachedSequence", "CacheWriter",
    "TeacherCache", "cache_bytes", "decode_logprobs", "decode_samples", "distinct_counts", "encode_logprobs",
    "encode_samples", "fingerprint_model", "fingerprint_tokenizer", "fingerprint_vocabulary", "group_bytes",
    "index_bits", "levels", "pack_bits", "reconstruction_kl", "sample_targets", "shard_prompts", "target_seed",
    "teacher_logit_chunks", "teacher_rows", "teacher_topk", "tokenizer_content", "unpack_bits", "value_bytes",
    "write_teacher_cache",
]
