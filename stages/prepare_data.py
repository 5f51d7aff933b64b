"""Stage prepare_data: texts, tokenizer, trial prompts and reward preference pairs.

Writes data/prepared/{train,eval,prompts,eval_prompts,pairs_train,pairs_eval}.jsonl,
data/prepared/stats.json and artifacts/tokenizer/.
"""

from __future__ import annotations

from pathlib import Path

from tnd.config import CORRUPTION_KINDS, Params
from tnd.data.pairs import make_pairs
from tnd.data.prompts import make_prompts
from tnd.data.sources import load_corpus
from tnd.data.tokenizer import encode, load_tokenizer, train_bpe
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
    eval_prompts = make_prompts(tokenizer, corpus.eval, data.n_eval_prompts, data.prompt_tokens, params.seed + 1)
    if not prompts or not eval_prompts:
        raise TndError(
            f"data.prompt_tokens = {data.prompt_tokens}: no text is longer than that many tokens; lower it"
        )
    pairs_train = make_pairs(corpus.train, data.pair_corruptions, params.seed, use_grammar=nursery)
    # Eval pairs use every corruption kind, so a kind left out of training is a held-out test.
    pairs_eval = make_pairs(corpus.eval, CORRUPTION_KINDS, params.seed + 1, use_grammar=nursery)
    stats = {
        **corpus.stats,
        "n_train": len(corpus.train),
        "n_eval": len(corpus.eval),
        "n_prompts": len(prompts),
        "n_pairs_train": len(pairs_train),
        "n_pairs_eval": len(pairs_eval),
        "vocab_size": len(tokenizer),
        "mean_tokens": sum(len(encode(tokenizer, t)) for t in corpus.train[:2000]) / min(len(corpus.train), 2000),
    }

    with atomic_dir(PREPARED) as out:
        atomic_write_jsonl(out / "train.jsonl", ({"text": t} for t in corpus.train))
        atomic_write_jsonl(out / "eval.jsonl", ({"text": t} for t in corpus.eval))
        atomic_write_jsonl(out / "prompts.jsonl", prompts)
        atomic_write_jsonl(out / "eval_prompts.jsonl", eval_prompts)
        atomic_write_jsonl(out / "pairs_train.jsonl", pairs_train)
        atomic_write_jsonl(out / "pairs_eval.jsonl", pairs_eval)
        atomic_write_json(out / "stats.json", stats)
    with atomic_dir(TOKENIZER) as out:
        tokenizer.save_pretrained(out)

    run.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    run.log_artifact(Path(PREPARED) / "stats.json")
    print(f"prepare_data: {len(corpus.train)} train / {len(corpus.eval)} eval texts, vocab {len(tokenizer)}")


def main(argv: list[str] | None = None) -> None:
    run_stage("prepare_data", prepare, argv)


if __name__ == "__main__":
    main()
