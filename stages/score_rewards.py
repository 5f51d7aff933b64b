"""Stage score_rewards: the reward of every cached teacher demonstration and eval text.

Demonstrations are scored from their token ids (prompt + continuation, as cached), so
nothing is decoded and re-encoded; eval texts as bos + text + eos, like in training.

Writes cache/rewards/ (rewards.safetensors: `rewards` [n_demonstrations] in cache order,
`finite` mask, `eval_rewards`, `eval_finite`; index.json: counts and the fingerprint of
the cache index they align with) and metrics/rewards.json (reward_stats of both sets,
the statistics PPO uses for score normalisation). Non-finite rewards are stored as they
are, flagged in the masks, left out of the statistics and counted; above
ppo.max_nonfinite_reward_fraction the stage fails and writes nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from tnd.cache import TeacherCache, fingerprint_tokenizer
from tnd.config import Params
from tnd.data.tokenizer import load_tokenizer
from tnd.errors import TndError
from tnd.io import atomic_dir, atomic_write_json, read_jsonl
from tnd.tracking import Tracker
from tnd.trainers.reward import load_reward_model, reward_stats, score_texts, score_token_ids

from stages.common import CACHE, METRICS, PREPARED, REWARD, REWARDS, TOKENIZER, run_stage

FORMAT_VERSION = 1


def check_finite(name: str, stats: dict, limit: float) -> None:
    if stats["count"] and stats["nan_count"] / stats["count"] > limit:
        raise TndError(
            f"score_rewards: {stats['nan_count']} of {stats['count']} {name} rewards are not finite "
            f"({stats['nan_count'] / stats['count']:.1%}), above ppo.max_nonfinite_reward_fraction = {limit}; "
            "the reward model is broken: retrain it (dvc repro train_reward) or check reward.source"
        )


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def score_rewards(params: Params, run: Tracker) -> None:
    cfg = params.reward
    tokenizer = load_tokenizer(TOKENIZER)
    model = load_reward_model(REWARD, tokenizer)
    # The demonstrations' token ids must mean what they mean to this tokenizer.
    cache = TeacherCache(CACHE, tokenizer_fingerprint=fingerprint_tokenizer(tokenizer))
    demos = [cache[i].input_ids for i in range(len(cache))]
    eval_texts = [row["text"] for row in read_jsonl(Path(PREPARED) / "eval.jsonl")]

    batch_size = max(cfg.train.batch_size, 64)
    rewards = score_token_ids(model, tokenizer, demos, batch_size, cfg.train.max_length).float()
    eval_rewards = score_texts(model, tokenizer, eval_texts, batch_size, cfg.train.max_length).float()
    if rewards.shape != (len(demos),) or eval_rewards.shape != (len(eval_texts),):
        raise RuntimeError(f"scorer returned {tuple(rewards.shape)} / {tuple(eval_rewards.shape)} rewards")

    demo_stats, eval_stats = reward_stats(rewards), reward_stats(eval_rewards)
    limit = params.ppo.max_nonfinite_reward_fraction
    check_finite("demonstration", demo_stats, limit)
    check_finite("eval-text", eval_stats, limit)

    index = {
        "format_version": FORMAT_VERSION,
        "n_demonstrations": len(demos),
        "n_eval": len(eval_texts),
        "nonfinite_demonstrations": demo_stats["nan_count"],
        "nonfinite_eval": eval_stats["nan_count"],
        "cache_index_sha256": _file_sha256(Path(CACHE) / "index.json"),
        "reward_model_sha256": _file_sha256(Path(REWARD) / "model.safetensors"),
    }
    with atomic_dir(REWARDS) as out:
        save_file(
            {
                "rewards": rewards.contiguous(),
                "finite": torch.isfinite(rewards),
                "eval_rewards": eval_rewards.contiguous(),
                "eval_finite": torch.isfinite(eval_rewards),
            },
            str(out / "rewards.safetensors"),
            metadata={"format_version": str(FORMAT_VERSION)},
        )
        atomic_write_json(out / "index.json", index)
    metrics = {"demonstrations": demo_stats, "eval": eval_stats}
    atomic_write_json(Path(METRICS) / "rewards.json", metrics)
    run.log_metrics(
        {
            f"{group}_{key}": value
            for group, stats in (("demo_reward", demo_stats), ("eval_reward", eval_stats))
            for key, value in stats.items()
            if value is not None
        }
    )
    if demo_stats["nan_count"] or eval_stats["nan_count"]:
        print(
            f"score_rewards: warning: {demo_stats['nan_count']} demonstration and {eval_stats['nan_count']} eval "
            "rewards are not finite; they are flagged in cache/rewards and left out of the statistics"
        )
    mean = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.3f}"  # noqa: E731
    print(
        f"score_rewards: {len(demos)} demonstrations (mean reward {mean(demo_stats)}), "
        f"{len(eval_texts)} eval texts (mean reward {mean(eval_stats)})"
    )


def main(argv: list[str] | None = None) -> None:
    run_stage("score_rewards", score_rewards, argv)


if __name__ == "__main__":
    main()
