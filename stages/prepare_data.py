"""Stage prepare_data: texts, tokenizer, trial prompts and reward preference pairs.

Writes data/prepared/{train,valid,eval,prompts,eval_prompts,pairs_train,pairs_valid,pairs_eval}.jsonl,
data/prepared/stats.json and artifacts/tokenizer/. The texts are three disjoint splits of distinct texts
(`tnd.data.sources.load_corpus`): train; valid, the validation split that the teacher, the student's warm-up and
the reward model (pairs_valid) select their weights on; eval, the test split that evaluate and health report
on (pairs_eval: the reward model's reported accuracy). The eval prompts are drawn from eval texts whose prompt
is no training prompt (prompts.jsonl); where too few are, stats.json counts the overlap (`eval_prompts_in_train`).

A file or hub source is used whole unless data.n_train is a number smaller than its distinct texts; then one
line says how many it left out (stats.json `n_unused`). Its training split is streamed from the source into
train.jsonl, the tokenizer, the prompts and pairs_train.jsonl, never held in memory.
"""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path
from typing import Iterable

from tnd.config import CORRUPTION_KINDS, Params
from tnd.data.pairs import iter_pairs, make_pairs
from tnd.data.prompts import make_eval_prompts, make_prompts
from tnd.data.sources import load_corpus
from tnd.data.tokenizer import encode_many, load_tokenizer, train_bpe
from tnd.errors import TndError
from tnd.io import atomic_dir, atomic_write_json, atomic_write_jsonl
from tnd.tracking import Tracker

from stages.common import PREPARED, TOKENIZER, run_stage

def prepare(params: Params, run: Tracker) -> None:
    data = params.data
    corpus = load_corpus(data, params.seed)
    if params.tokenizer.source == "train":
        tokenizer = train_bpe(corpus.train, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    else:
        tokenizer = load_tokenizer(params.tokenizer.source)

    nursery = data.source == "nursery"
    prompts = make_prompts(tokenizer, corpus.train, data.n_prompts, data.prompt_tokens, params.seed)
    eval_prompts, prompt_stats = make_eval_prompts(
        tokenizer, corpus.eval, data.n_eval_prompts, data.prompt_tokens, params.seed + 1, prompts)
    if not prompts or not eval_prompts:
        raise TndError(
            f"data.prompt_tokens = {data.prompt_tokens}: no text is longer than that many tokens; lower it"
        )
    # Validation pairs use the training kinds: a kind held out of training stays unseen by model selection too.
    pairs_valid = make_pairs(corpus.valid, data.pair_corruptions, params.seed + 2, use_grammar=nursery)
    # Eval pairs use every corruption kind, so a kind left out of training is a held-out test.
    pairs_eval = make_pairs(corpus.eval, CORRUPTION_KINDS, params.seed + 1, use_grammar=nursery)
    stats = {
        **corpus.stats,
        "n_train": len(corpus.train),
        "n_valid": len(corpus.valid),
        "n_eval": len(corpus.eval),
        "n_prompts": len(prompts),
        **prompt_stats,
        "n_pairs_valid": len(pairs_valid),
        "n_pairs_eval": len(pairs_eval),
        "vocab_size": len(tokenizer),
        "mean_tokens": sum(map(len, encode_many(tokenizer, islice(corpus.train, 2000)))) / min(len(corpus.train), 2000),
    }

    # The folder is replaced whole (atomic_dir), so its two large files are written as they are read.
    with atomic_dir(PREPARED) as out:
        write_jsonl(out / "train.jsonl", ({"text": t} for t in corpus.train))
        stats["n_pairs_train"] = write_jsonl(
            out / "pairs_train.jsonl", iter_pairs(corpus.train, data.pair_corruptions, params.seed, use_grammar=nursery))
        atomic_write_jsonl(out / "valid.jsonl", ({"text": t} for t in corpus.valid))
        atomic_write_jsonl(out / "eval.jsonl", ({"text": t} for t in corpus.eval))
        atomic_write_jsonl(out / "prompts.jsonl", prompts)
        atomic_write_jsonl(out / "eval_prompts.jsonl", eval_prompts)
        atomic_write_jsonl(out / "pairs_valid.jsonl", pairs_valid)
        atomic_write_jsonl(out / "pairs_eval.jsonl", pairs_eval)
        atomic_write_json(out / "stats.json", stats)
    with atomic_dir(TOKENIZER) as out:
        tokenizer.save_pretrained(out)

    run.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    run.log_artifact(Path(PREPARED) / "stats.json")
    dropped = corpus.stats.get("duplicates_dropped", 0)
    print(f"prepare_data: {len(corpus.train)} train / {len(corpus.valid)} validation / {len(corpus.eval)} eval "
          f"texts ({dropped} duplicate{'' if dropped == 1 else 's'} dropped), vocab {len(tokenizer)}")
    unused = corpus.stats.get("n_unused", 0)
    if unused:
        print(f"note: prepare_data: data.n_train = {data.n_train} trains on {len(corpus.train)} of the "
              f"{unused + len(corpus.train)} distinct texts beside the validation and eval splits: {unused} are not "
              "used (stats.json n_unused); set data.n_train: null to train on all of them", file=sys.stderr, flush=True)
    overlap, distinct = prompt_stats["eval_prompts_in_train"], prompt_stats["eval_prompts_distinct"]
    if overlap:
        print(f"warning: prepare_data: {overlap} of the {len(eval_prompts)} eval prompts are training prompts: the "
              f"eval texts have too few openings of data.prompt_tokens = {data.prompt_tokens} tokens that no "
              "training prompt has (stats.json eval_prompts_in_train); raise data.n_eval or data.prompt_tokens, or lower "
              "data.n_eval_prompts",
              file=sys.stderr, flush=True)
    else:
        print(f"prepare_data: {len(eval_prompts)} eval prompts ({distinct} distinct), none of them a training prompt")


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """One JSON line per row, written as the rows come; the number written. Not atomic itself: for a file
    inside an atomic_dir."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    run_stage("prepare_data", prepare, argv)


if __name__ == "__main__":
    main()
