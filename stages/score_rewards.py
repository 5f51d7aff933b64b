"""Stage score_rewards: the reward statistics of the cached teacher demonstrations and the eval texts.

Demonstrations are scored from their token ids (prompt + continuation, as cached, nothing decoded
and re-encoded) by `tnd.reward.score_token_ids`, the function PPO's `compute_scores`
calls: bos in front, scored whole, so each is the reward PPO would give it (a demonstration longer
than the reward model's positions is refused, never cut). Eval texts are scored as in reward
training: bos + text + eos cut to reward.train.max_length; the cut ones are counted (`truncated`
in their statistics) and reported.

Writes metrics/rewards.json: reward_stats of both sets; the demonstrations' mean, std and count
seed PPO's score normaliser (train_ppo). The per-demonstration rewards are not kept: no stage
reads them. Non-finite rewards are left out of the statistics and counted; above
ppo.max_nonfinite_reward_fraction the stage fails and writes nothing. The reward model runs on the
accelerator, under bf16/fp16 autocast when engine.mixed_precision says so.
"""

from __future__ import annotations

from pathlib import Path

from tnd.cache import TeacherCache, fingerprint_tokenizer
from tnd.config import Params
from tnd.data.tokenizer import load_tokenizer
from tnd.engine import make_accelerator
from tnd.errors import TndError
from tnd.io import atomic_write_json, read_jsonl
from tnd.tracking import Tracker
from tnd.reward import count_cut, load_reward_model, reward_stats, score_texts, score_token_ids

from stages.common import CACHE, METRICS, PREPARED, REWARD, TOKENIZER, fmt, run_stage


def check_finite(name: str, stats: dict, limit: float) -> None:
    if stats["count"] and stats["nan_count"] / stats["count"] > limit:
        raise TndError(
            f"score_rewards: {stats['nan_count']} of {stats['count']} {name} rewards are not finite "
            f"({stats['nan_count'] / stats['count']:.1%}), above ppo.max_nonfinite_reward_fraction = {limit}; "
            "the reward model is broken: retrain it (dvc repro train_reward) or check reward.source"
        )


def score_rewards(params: Params, run: Tracker) -> None:
    cfg = params.reward
    tokenizer = load_tokenizer(TOKENIZER)
    model = load_reward_model(REWARD, tokenizer)
    # The demonstrations' token ids must mean what they mean to this tokenizer.
    cache = TeacherCache(CACHE, tokenizer_fingerprint=fingerprint_tokenizer(tokenizer))
    demos = [cache[i].input_ids for i in range(len(cache))]
    eval_texts = [row["text"] for row in read_jsonl(Path(PREPARED) / "eval.jsonl")]

    batch_size = max(cfg.train.batch_size, 64)
    accelerator = make_accelerator(params.engine.mixed_precision)  # the device, and autocast where engine says
    model.to(accelerator.device)
    with accelerator.autocast():
        rewards = score_token_ids(model, tokenizer, demos, batch_size).float()
        eval_rewards = score_texts(model, tokenizer, eval_texts, batch_size, cfg.train.max_length).float()
    if rewards.shape != (len(demos),) or eval_rewards.shape != (len(eval_texts),):
        raise RuntimeError(f"scorer returned {tuple(rewards.shape)} / {tuple(eval_rewards.shape)} rewards")

    demo_stats, eval_stats = reward_stats(rewards), reward_stats(eval_rewards)
    limit = params.ppo.max_nonfinite_reward_fraction
    check_finite("demonstration", demo_stats, limit)
    check_finite("eval-text", eval_stats, limit)
    eval_stats["truncated"] = count_cut(tokenizer, eval_texts, cfg.train.max_length)

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
            "rewards are not finite; they are left out of the statistics"
        )
    if eval_stats["truncated"]:
        print(
            f"score_rewards: {eval_stats['truncated']} of {len(eval_texts)} eval texts are longer than "
            f"reward.train.max_length = {cfg.train.max_length} tokens and were scored cut to it, as in reward training"
        )
    print(
        f"score_rewards: {len(demos)} demonstrations (mean reward {fmt(demo_stats['mean'])}), "
        f"{len(eval_texts)} eval texts (mean reward {fmt(eval_stats['mean'])})"
    )


def main(argv: list[str] | None = None) -> None:
    run_stage("score_rewards", score_rewards, argv)


if __name__ == "__main__":
    main()
