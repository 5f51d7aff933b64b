"""Data-parallel training on accelerate's engine: two processes (DDP over gloo on CPU) share every batch
and keep one student. Each worker is a process of its own whose environment says rank and world size,
as `accelerate launch` / `torchrun` set it; the trainer's Accelerator reads it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.common import free_port
from tests.conftest import SENTENCES, tiny_arch, tiny_prompts, tiny_tokenizer
from tests.test_ppo import make_trainer
from tests.test_train_ppo import PPO, ready, upstream  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def _join(rank: int, port: int) -> None:
    """This process as rank `rank` of 2. The process group is accelerate's, torn down as the worker exits
    (destroying it first left a worker hanging at exit now and then)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    prompts = tiny_prompts(tokenizer, 2)
    # early stopping on: its KL is summed over the processes after every epoch
    trainer = make_trainer(tokenizer, prompts, early_stopping=True)
    seen = []
    for _ in range(2):
        batch = trainer.next_prompts()
        seen.append(batch)
        stats = trainer.step(batch)
    weights = torch.cat([p.detach().flatten() for p in trainer.trainable_parameters()])
    torch.save({"weights": weights, "seen": seen, "stats": stats}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_take_disjoint_shards_and_keep_one_student(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for batch0, batch1 in zip(r0["seen"], r1["seen"]):
        assert len(batch0) == len(batch1) == 4  # batch_size 8 split in two
    assert r0["seen"] != r1["seen"]  # different data on each process ...
    assert torch.equal(r0["weights"], r1["weights"])  # ... yet one student: gradients are averaged
    # global statistics are the same on both processes
    for key in ("env/reward_mean", "objective/kl", "objective/kl_coef", "nonfinite_rewards"):
        assert r0["stats"][key] == r1["stats"][key], key


def _warm_up_worker(rank: int, port: int, out_dir: str) -> None:
    """The student's warm-up (tnd/trainers/fit.py) on 2 processes with validation, then the PPO trainer
    on the same student, as train_ppo runs them."""
    _join(rank, port)
    from tnd.config import LMTrainParams
    from tnd.engine import make_accelerator
    from tnd.models import build_causal_lm
    from tnd.trainers.lm import pretrain_lm

    tokenizer = tiny_tokenizer()
    student = build_causal_lm(tiny_arch(), tokenizer, 2)
    cfg = LMTrainParams(steps=6, batch_size=4, learning_rate=3e-3, warmup_steps=1, max_length=16, eval_every=2,
                        eval_size=4)
    curve = []
    summary = pretrain_lm(student, tokenizer, SENTENCES, cfg, seed=0, eval_texts=SENTENCES[:4],
                          accelerator=make_accelerator(), on_eval=curve.append)
    warm = torch.cat([p.detach().flatten() for p in student.parameters()])
    prompts = tiny_prompts(tokenizer, 2)
    trainer = make_trainer(tokenizer, prompts)
    trainer.student.load_state_dict(student.state_dict())
    trainer.train(1)
    trained = torch.cat([p.detach().flatten() for p in trainer.trainable_parameters()])
    torch.save({"warm": warm, "trained": trained, "curve": curve, "summary": summary},
               os.path.join(out_dir, f"warm{rank}.pt"))


def test_two_process_warm_up_then_ppo_keep_one_student(tmp_path):
    mp.spawn(_warm_up_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"warm{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["warm"], r1["warm"])  # DDP averaged the warm-up's gradients
    agreed = [[{k: v for k, v in row.items() if k != "train_loss"} for row in r["curve"]] for r in (r0, r1)]
    assert agreed[0] == agreed[1] and len(agreed[0]) == 3  # validation metrics averaged: one decision
    assert torch.equal(r0["trained"], r1["trained"])  # and the PPO trainer's DDP after it works alike


def _resume_worker(rank: int, port: int, out_dir: str) -> None:
    """3 steps straight, and 2 steps + save_checkpoint (every process) + load_checkpoint + 1 step."""
    _join(rank, port)
    tokenizer = tiny_tokenizer()
    prompts = tiny_prompts(tokenizer, 2)
    straight = make_trainer(tokenizer, prompts)
    straight.train(3)
    first = make_trainer(tokenizer, prompts)
    first.train(2)
    checkpoint = os.path.join(out_dir, "checkpoint")
    first.save_checkpoint(checkpoint)
    dist.barrier()
    resumed = make_trainer(tokenizer, prompts)
    resumed.load_checkpoint(checkpoint)
    resumed.train(1)
    flat = lambda t: torch.cat([p.detach().flatten() for p in t.trainable_parameters()])  # noqa: E731
    torch.save({"straight": flat(straight), "resumed": flat(resumed)}, os.path.join(out_dir, f"resume{rank}.pt"))


def test_two_process_resume_is_bit_exact(tmp_path):
    mp.spawn(_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"resume{rank}.pt", weights_only=False)
        assert torch.equal(out["resumed"], out["straight"]), rank


def _value_head_after_a_demos_only_step() -> torch.Tensor:
    tokenizer = tiny_tokenizer()
    prompts = tiny_prompts(tokenizer, 2)
    # demos_only with LM steps: nothing in the step reads the value head, so it has no gradient
    trainer = make_trainer(tokenizer, prompts, mode="demos_only", lm_steps_per_ppo_step=1,
                           optimizer_kwargs={"weight_decay": 0.1})
    before = torch.cat([p.detach().flatten() for p in trainer.value_head.parameters()])
    trainer.step(trainer.next_prompts())
    after = torch.cat([p.detach().flatten() for p in trainer.value_head.parameters()])
    return before, after


def _unused_parameter_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    before, after = _value_head_after_a_demos_only_step()
    torch.save({"before": before, "after": after}, os.path.join(out_dir, f"unused{rank}.pt"))


def test_a_parameter_without_gradient_stays_put_in_one_process_and_in_two(tmp_path):
    """No gradient anywhere means no update (no weight decay, no momentum), as in a single process."""
    before, after = _value_head_after_a_demos_only_step()
    assert torch.equal(before, after)
    mp.spawn(_unused_parameter_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"unused{rank}.pt", weights_only=False)
        assert torch.equal(out["before"], out["after"]), rank


def _one_update_on_a_fixed_batch(unequal: bool) -> torch.Tensor:
    """One PPO update (SGD, so the step is linear in the gradient) on 8 fixed trials, this process's share of
    them, with unwhitened advantages (whitening is per process, as in TRL). `unequal`: process 0's rows
    (the even ones) hold 6 response tokens, process 1's one, so a mean over each process's own tokens,
    averaged over the processes, would weigh process 1's tokens 6 times as much."""
    from tnd.engine import shard

    tokenizer = tiny_tokenizer()
    prompts = tiny_prompts(tokenizer)
    lengths = [6 if i % 2 == 0 else 1 for i in range(8)] if unequal else [4] * 8
    responses = [[20 + i + 10 * t for t in range(n)] for i, n in enumerate(lengths)]
    scores = torch.linspace(-1.0, 1.0, 8)
    trainer = make_trainer(tokenizer, prompts, mode="trials_only", with_demos=False, batch_size=8, mini_batch_size=8,
                           ppo_epochs=1, whiten_advantages=False, optimizer_name="SGD", learning_rate=0.5)
    rows = shard(trainer.accelerator, list(range(8)))
    rollout = trainer.make_rollout([prompts[i] for i in rows], [responses[i] for i in rows], scores[rows],
                                   torch.zeros(len(rows), dtype=torch.bool))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.trainable_parameters()])
    trainer._optimize(rollout, None)
    return torch.cat([p.detach().flatten() for p in trainer.trainable_parameters()]) - before


def _fixed_batch_worker(rank: int, port: int, out_dir: str, unequal: bool) -> None:
    _join(rank, port)
    torch.save(_one_update_on_a_fixed_batch(unequal), os.path.join(out_dir, f"update{rank}.pt"))


@pytest.mark.parametrize("unequal", [False, True], ids=["equal-lengths", "unequal-lengths"])
def test_one_process_and_two_make_the_same_update_on_the_same_global_batch(tmp_path, unequal):
    """The losses are means over every process's tokens (before: over each process's own, 86% off with unequal
    lengths)."""
    one = _one_update_on_a_fixed_batch(unequal)
    mp.spawn(_fixed_batch_worker, args=(free_port(), str(tmp_path), unequal), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"update{rank}.pt", weights_only=False)
        assert one.abs().max() > 1e-3  # a real update, ...
        # ... the same up to the order of float sums (DDP sums bucketed gradients over the processes)
        torch.testing.assert_close(two, one, rtol=0, atol=1e-6)


def _demo_update() -> torch.Tensor:
    """One demos_only epoch (SGD, 4 mini-batches) on one step's 4 demonstrations: every mini-batch gets one."""
    tokenizer = tiny_tokenizer()
    prompts = tiny_prompts(tokenizer, 2)
    trainer = make_trainer(tokenizer, prompts, mode="demos_only", batch_size=8, mini_batch_size=2, demo_batch_size=4,
                           ppo_epochs=1, optimizer_name="SGD", learning_rate=0.1, max_grad_norm=1e9)
    trainer.global_step = 1
    demo = trainer._demo_batch(trainer._draw_demos())
    body = [p for n, p in trainer.policy.named_parameters() if "value_head" not in n]
    before = torch.cat([p.detach().flatten().clone() for p in body])
    trainer._optimize(None, demo)
    return torch.cat([p.detach().flatten() for p in body]) - before


def _demo_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    torch.save(_demo_update(), os.path.join(out_dir, f"demo{rank}.pt"))


def test_two_processes_distil_as_much_as_one_when_demonstrations_are_fewer_than_mini_batches_per_process(tmp_path):
    """demo_batch_size / processes < num_mini_batches: the demonstrations are split per mini-batch over all
    processes, so no mini-batch loses its share (before: [1, 1, 0, 0] on each process, half the distillation)."""
    one = _demo_update()
    mp.spawn(_demo_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(tmp_path / f"demo{rank}.pt", weights_only=False)
        assert one.abs().max() > 1e-4
        torch.testing.assert_close(two, one, rtol=0, atol=1e-6)


def test_batches_too_small_to_share_are_a_clear_error(tmp_path):
    tokenizer = tiny_tokenizer()
    prompts = [[tokenizer.bos_token_id, 5]]
    # an accelerator of two processes, as far as the checks read it
    two = SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu"), gradient_accumulation_steps=1,
                          ddp_handler=None)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        make_trainer(tokenizer, prompts, mini_batch_size=3, batch_size=9, accelerator=two)


def test_train_ppo_under_accelerate_launch_with_two_processes(ready):
    """The stage launched as docs/multi-gpu.md says: one student, outputs and one MLflow run from process 0."""
    ready.write(**PPO, tracking={"enabled": True, "experiment": "ddp"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "stages.train_ppo"]
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    train = json.loads((ready.path / "metrics/train.json").read_text())
    assert train["steps"] == PPO["ppo"]["steps"] and train["first"]["reward"] is not None
    with open(ready.path / "plots/train.csv", newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["1", "2", "3", "4"]
    assert (ready.path / "models/student/model.safetensors").is_file()
    mlflow.set_tracking_uri(f"sqlite:///{ready.path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["ddp"], output_format="list")
    assert [r.data.tags["stage"] for r in runs] == ["train_ppo"]  # process 1 logged nothing
