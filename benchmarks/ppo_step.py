"""Benchmark one PPO step on CPU: our CustomPPOTrainer against the classic TRL PPOTrainer (trl 0.11.4).

Both sides train the same models on the same batches, each in its own process with the same
number of torch threads:

  models      the default student (params `student.arch`) after the pipeline's LM warm-up
              (`student.train`, as train_ppo starts from it; `--student random`: randomly
              initialised, which never samples eos), the teacher as KL reference (params
              `teacher.arch`) and a reward model (params `reward.arch`), randomly initialised, and
              a byte-level BPE trained on `data.n_train` nursery sentences; saved with
              save_pretrained into a temporary directory that both sides load
  batches     `ppo.batch_size` prompts of bos + 2 tokens (as prepare_data makes them), the same
              batches on both sides; `ppo.mini_batch_size`, `ppo.ppo_epochs`, `ppo.max_new_tokens`,
              sampling at `ppo.temperature` with no top-k / top-p; the other PPO settings (lr, KL
              controller, GAE, clip ranges, vf_coef, max_grad_norm, AdamW) from params.yaml
  responses   each side samples its responses (timed as generation), then both update on the
              same responses, sampled once from the initial student before the run: the two
              students drift apart over the steps (TRL initialises its value head differently),
              and with a warm-started student their samples' lengths would drift too, so the
              update would not do the same work on both sides. The sides' own samples decide
              the generation figures only.
  ours        CustomPPOTrainer, tnd.mode = trials_only (TRL has no demonstrations), kernel backend
              "torch"; one call of `step()`, split into its three phases by timing `_sample`
              (generation) and `compute_scores` (reward model) from inside the step
  TRL         trl==0.11.4 PPOTrainer with AutoModelForCausalLMWithValueHead (student and teacher),
              in its own venv (.venv-trl/, created on first use: torch==2.13.0, trl==0.11.4,
              transformers==4.46.3, rich); generation is `ppo_trainer.generate(batch_size=
              ppo.batch_size)` (the whole batch at once, not TRL's default of 4), scores come
              from the same reward model, then `ppo_trainer.step(queries, responses, scores)`

Both sides run at the same time as two worker processes that take turns, one PPO step each, in
the order ours, TRL, TRL, ours, ours, TRL, ... so that load from other work on the machine falls on
both alike: 2 warm-up steps, then 60 measured steps per side (fewer left the update ratio varying between
runs by more than its distance to the 1.5x target). Reported: the median over the
measured steps, the best step (other load can only slow a step down), and the median of the
per-step ratios ours / TRL of neighbouring steps. Phases, timed per step:
  generation  sampling the responses
  scoring     the reward model on prompt + response (outside TRL's step(); reported, not compared)
  update      everything else in a PPO step: old log-probs and values, reference log-probs,
              per-token KL rewards, GAE, whitening, ppo_epochs x mini-batches of forward +
              backward + AdamW, statistics and the KL controller (ours: step() minus the two
              phases above; TRL: its step())

Token counts (real tokens, padding excluded; the same function for both sides, `throughput`):
  generation tokens/s = sum of the lengths of the side's own samples (up to and including eos) /
                        generation seconds (with a warm-started student the sides' lengths differ:
                        decoding runs until the longest sample ends, so compare generation on
                        `--student random`, where every sample is max_new_tokens long)
  update tokens/s     = ppo_epochs x sum of (prompt + response lengths) / update seconds

Peak memory: the process's peak resident set size (RSS) during each phase, from the kernel's
high-water mark VmHWM, reset at the start of the phase by writing 5 to /proc/self/clear_refs (where
that is refused: VmRSS sampled every 2 ms by a thread). Reported absolute and above the process's
RSS after loading the models and building the trainer ("above base"); the TRL process imports more
libraries (datasets, pandas, pyarrow), so compare the "above base" figures.

  python benchmarks/ppo_step.py            # full default shapes -> benchmarks/results/ppo_step-cpu.json
  python benchmarks/ppo_step.py --no-trl   # ours only
  python benchmarks/ppo_step.py --ours-tf4 # also our trainer inside .venv-trl (transformers 4.46.3), to tell
                                           # the trainers' cost from the transformers versions' cost
  python benchmarks/ppo_step.py --smoke    # tiny models and batches, seconds; writes a JSON only with --out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRL_VENV = ROOT / ".venv-trl"
# torch pinned so pip takes the local CPU build (an unpinned torch is a multi-GB CUDA download);
# trl 0.11.4 imports rich without declaring it; pydantic: our trainer's config, for --ours-tf4.
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==0.11.4", "transformers==4.46.3", "rich", "pydantic"]
SMOKE_ARCH = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


class BenchError(RuntimeError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models and batches (seconds)")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL side")
    p.add_argument("--steps", type=int, default=None, help="measured steps per side (default 60; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per side, not measured (default 2; smoke 1)")
    p.add_argument("--student", choices=["warm", "random"], default="warm",
                   help="warm: the student after the pipeline's LM warm-up (student.train), as train_ppo starts "
                        "from; random: randomly initialised (it never samples eos: every response is max length)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/ppo_step-cpu.json; smoke: none)")
    p.add_argument("--trl-python", default=None, help="an interpreter with trl 0.11.4, instead of .venv-trl")
    p.add_argument("--ours-tf4", action="store_true",
                   help="also run our trainer in the TRL venv (transformers 4.46.3): trainer vs library cost")
    # internal: a worker process (python ppo_step.py --worker ours|trl DIR, or --trl-worker DIR), which
    # loads the models from DIR, prints one JSON line, then runs one step per "step <i>" line on stdin
    p.add_argument("--worker", choices=["ours", "trl", "ours-tf4"], help=argparse.SUPPRESS)
    p.add_argument("--trl-worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("workdir", nargs="?", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- shared by both sides (stdlib + torch only) --------------------------------------------------


class PeakRSS:
    """Peak RSS of this process since `start()` (see the module docstring)."""

    def __init__(self) -> None:
        try:
            self._reset_hwm()
            self.method = "VmHWM reset through /proc/self/clear_refs"
            self._max = None
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
            self._max = self.rss()
            threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def _sample(self) -> None:
        while True:
            self._max = max(self._max, self.rss())
            time.sleep(0.002)

    def rss(self) -> int:
        return self._status("VmRSS")

    def start(self) -> None:
        if self._max is None:
            self._reset_hwm()
        else:
            self._max = self.rss()

    def peak(self) -> int:
        return self._status("VmHWM") if self._max is None else max(self._max, self.rss())


def checksums(student, teacher, reward, batch: list[list[int]]) -> dict[str, float]:
    """Sums of the three models' outputs on one batch: the two sides must have loaded the same weights."""
    import torch

    ids = torch.tensor(batch)
    with torch.no_grad():
        return {"student": student(input_ids=ids).logits.double().sum().item(),
                "teacher": teacher(input_ids=ids).logits.double().sum().item(),
                "reward": reward(input_ids=ids).logits.double().sum().item()}


def hello(check: dict, mem: PeakRSS) -> dict:
    """The worker's first message: versions, weight checksums, RSS after setup."""
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    return {"info": info, "checksums": check, "base_rss": mem.rss(), "rss_method": mem.method}


def serve(make_side, workdir: Path) -> None:
    """Worker loop: set up, say hello, then one step per "step <i>" line; JSON lines on the real stdout
    (anything the libraries print goes to stderr)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    settings = json.loads((workdir / "settings.json").read_text())
    import torch

    torch.set_num_threads(settings["threads"])
    first, step = make_side(workdir, settings)
    print(json.dumps(first), file=out, flush=True)
    for line in sys.stdin:
        words = line.split()
        if len(words) != 2 or words[0] != "step":
            break
        print(json.dumps(step(int(words[1]))), file=out, flush=True)


def step_record(batch, generated, responses, times: dict, peaks: dict, epochs_run, breakdown: dict) -> dict:
    """One step's measurements: `generated` the side's samples, `responses` what it updated on;
    `breakdown` splits the update (seconds, each side's own parts)."""
    return {**times, "total_s": sum(times.values()), "peak_rss": peaks, "prompt_lengths": [len(p) for p in batch],
            "generated_lengths": [len(g) for g in generated], "response_lengths": [len(r) for r in responses],
            "ppo_epochs_run": epochs_run, "update_breakdown": breakdown}


# --- our side (project venv) ---------------------------------------------------------------------


def make_ours(workdir: Path, settings: dict, portable: bool = False):
    """Our trainer; portable: the models loaded with transformers' own loaders, to run in the TRL venv."""
    sys.path.insert(0, str(ROOT))
    from tnd.trainers import CustomPPOConfig, CustomPPOTrainer

    if portable:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        tokenizer = load_tokenizer_json(workdir, settings)
        student = AutoModelForCausalLM.from_pretrained(str(workdir / "student"))
        teacher = AutoModelForCausalLM.from_pretrained(str(workdir / "teacher"))
        reward = AutoModelForSequenceClassification.from_pretrained(str(workdir / "reward"))
        reward.config.pad_token_id = tokenizer.pad_token_id
    else:
        from tnd.data.tokenizer import load_tokenizer
        from tnd.models import load_causal_lm
        from tnd.reward import load_reward_model

        tokenizer = load_tokenizer(workdir / "tokenizer")
        student = load_causal_lm(workdir / "student", tokenizer, role="student")
        teacher = load_causal_lm(workdir / "teacher", tokenizer, role="teacher")
        reward = load_reward_model(workdir / "reward", tokenizer)
    batches = settings["batches"]
    check = checksums(student, teacher, reward, batches[0])
    config = CustomPPOConfig(**settings["ppo"])
    trainer = CustomPPOTrainer(teacher, student, reward, config, train_dataset=[p for b in batches for p in b],
                               tokenizer=tokenizer)
    mem = PeakRSS()

    # time the two phases from inside step(); the update is the rest of the step
    rec: dict = {}
    sample, compute_scores = trainer._sample, trainer.compute_scores

    def timed_sample(prompts):
        mem.start()
        t = time.perf_counter()
        generated = sample(prompts)
        rec.update(generation_s=time.perf_counter() - t, generation_peak=mem.peak(), generated=generated)
        return rec["responses"]  # the batch's shared responses (see the module docstring)

    def timed_scores(sequences):
        mem.start()
        t = time.perf_counter()
        scores = compute_scores(sequences)
        rec.update(scoring_s=time.perf_counter() - t, scoring_peak=mem.peak())
        mem.start()  # the update phase starts here
        return scores

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            rec[name] = time.perf_counter() - t
            return out

        return wrapper

    trainer._sample, trainer.compute_scores = timed_sample, timed_scores
    # the update's two big parts: old policy + reference + rewards + GAE, then the PPO epochs
    trainer.make_rollout = timed("rollout_s", trainer.make_rollout)
    trainer._optimize = timed("optimize_s", trainer._optimize)

    def step(i: int) -> dict:
        rec.clear()
        rec["responses"] = settings["responses"][i]
        t = time.perf_counter()
        stats = trainer.step(batches[i])
        total = time.perf_counter() - t
        times = {"generation_s": rec["generation_s"], "scoring_s": rec["scoring_s"],
                 "update_s": total - rec["generation_s"] - rec["scoring_s"]}
        peaks = {"generation": rec["generation_peak"], "scoring": rec["scoring_peak"], "update": mem.peak()}
        breakdown = {"rollout_s": rec["rollout_s"], "optimize_s": rec["optimize_s"]}
        breakdown["rest_s"] = times["update_s"] - sum(breakdown.values())
        return step_record(batches[i], rec["generated"], rec["responses"], times, peaks, stats["ppo/epochs"], breakdown)

    return hello(check, mem), step


# --- the TRL side (.venv-trl: trl 0.11.4, transformers 4.46.3; must not import tnd) ---------------


def load_tokenizer_json(workdir: Path, settings: dict):
    """The tokenizer_config.json written by transformers 5 names a class 4.46 lacks: load tokenizer.json itself."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(workdir / "tokenizer" / "tokenizer.json"),
                                   **settings["special_tokens"], padding_side="left")


def score_sequences(model, sequences: list[list[int]], pad_id: int, bos_id: int):
    """As CustomPPOTrainer.compute_scores: bos + prompt + response, right-padded, one scalar each."""
    import torch

    encoded = [s if (bos_id is None or (s and s[0] == bos_id)) else [bos_id] + s for s in sequences]
    width = max(len(s) for s in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits.reshape(len(encoded), -1)[:, 0].float()


def make_trl(workdir: Path, settings: dict):
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    cfg = settings["ppo"]
    tokenizer = load_tokenizer_json(workdir, settings)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(workdir / "student"))
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(str(workdir / "teacher"))
    reward = AutoModelForSequenceClassification.from_pretrained(str(workdir / "reward")).eval()
    reward.config.pad_token_id = tokenizer.pad_token_id
    batches = settings["batches"]
    check = checksums(model.pretrained_model, ref_model.pretrained_model, reward, batches[0])
    config = PPOConfig(
        exp_name="ppo_step", seed=cfg["seed"], learning_rate=cfg["learning_rate"], batch_size=cfg["batch_size"],
        mini_batch_size=cfg["mini_batch_size"], gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        ppo_epochs=cfg["ppo_epochs"], init_kl_coef=cfg["init_kl_coef"], adap_kl_ctrl=cfg["adap_kl_ctrl"],
        target=cfg["kl_target"], horizon=cfg["kl_horizon"], gamma=cfg["gamma"], lam=cfg["lam"],
        cliprange=cfg["cliprange"], cliprange_value=cfg["cliprange_value"], vf_coef=cfg["vf_coef"],
        max_grad_norm=cfg["max_grad_norm"], early_stopping=cfg["early_stopping"], target_kl=cfg["target_kl"],
        use_score_scaling=cfg["use_score_scaling"], use_score_norm=cfg["use_score_norm"],
        score_clip=cfg["score_clip"], kl_penalty="kl", whiten_rewards=False, log_with=None,
    )
    optimizer = getattr(torch.optim, cfg["optimizer_name"])(
        [p for p in model.parameters() if p.requires_grad], lr=cfg["learning_rate"], **cfg["optimizer_kwargs"])
    trainer = PPOTrainer(config, model, ref_model, tokenizer, optimizer=optimizer)
    generation_kwargs = {"do_sample": True, "temperature": cfg["temperature"], "top_k": cfg["top_k"],
                         "top_p": cfg["top_p"], "max_new_tokens": cfg["max_new_tokens"],
                         "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    mem = PeakRSS()

    def step(i: int) -> dict:
        batch = batches[i]
        queries = [torch.tensor(p) for p in batch]
        torch.manual_seed(cfg["seed"] * 1_000_003 + i + 1)
        times, peaks = {}, {}
        mem.start()
        t = time.perf_counter()
        generated = trainer.generate(queries, batch_size=len(queries), return_prompt=False, **generation_kwargs)
        times["generation_s"], peaks["generation"] = time.perf_counter() - t, mem.peak()
        responses = [torch.tensor(r) for r in settings["responses"][i]]  # shared (see the module docstring)
        mem.start()
        t = time.perf_counter()
        scores = score_sequences(reward, [p + r.tolist() for p, r in zip(batch, responses)],
                                 tokenizer.pad_token_id, tokenizer.bos_token_id)
        times["scoring_s"], peaks["scoring"] = time.perf_counter() - t, mem.peak()
        mem.start()
        t = time.perf_counter()
        stats = trainer.step(queries, responses, list(scores))
        times["update_s"], peaks["update"] = time.perf_counter() - t, mem.peak()
        # TRL's own timing of the parts of step() (time.time())
        breakdown = {f"{key.split('/')[-1]}_s": float(stats[key]) for key in stats if key.startswith("time/ppo/")}
        return step_record(batch, generated, responses, times, peaks, cfg["ppo_epochs"], breakdown)

    return hello(check, mem), step


# --- the driver (project venv) --------------------------------------------------------------------


def build_workdir(workdir: Path, args) -> dict:
    """Tokenizer, models, prompt batches and PPO settings, written for both sides to load."""
    sys.path.insert(0, str(ROOT))
    from tnd.config import load_params
    from tnd.data.nursery import generate_sentences
    from tnd.data.prompts import make_prompts
    from tnd.data.tokenizer import train_bpe
    from tnd.generation import sample_continuations
    from tnd.models import build_causal_lm
    from tnd.trainers import CustomPPOConfig
    from tnd.trainers.lm import pretrain_lm
    from tnd.reward import build_reward_model

    params = load_params(args.params)
    n_texts, vocab = params.data.n_train, params.tokenizer.vocab_size
    archs = {"student": params.student.arch, "teacher": params.teacher.arch, "reward": params.reward.arch}
    # raw scores on both sides: TRL 0.11's score scaling fails (docs/trainer.md, "Differences from classic TRL")
    overrides = {"mode": "trials_only", "kernel_backend": "torch", "use_score_scaling": False, "use_score_norm": False}
    warmup = params.student.train
    if args.smoke:
        n_texts, vocab = 400, 400
        archs = {k: a.model_copy(update=SMOKE_ARCH) for k, a in archs.items()}
        overrides.update(batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4)
        warmup = warmup.model_copy(update={"steps": 5})
    config = CustomPPOConfig.from_params(params, **overrides)

    texts = generate_sentences(n_texts, params.seed)
    tokenizer = train_bpe(texts, vocab, params.tokenizer.min_frequency)
    tokenizer.save_pretrained(workdir / "tokenizer")
    student = build_causal_lm(archs["student"], tokenizer, params.seed)
    if args.student == "warm":  # as train_ppo: the built-in student after its LM warm-up on the train texts
        pretrain_lm(student, tokenizer, texts, warmup, params.seed, desc="student warm-up")
    student.save_pretrained(workdir / "student")
    build_causal_lm(archs["teacher"], tokenizer, params.seed + 1).save_pretrained(workdir / "teacher")
    build_reward_model(archs["reward"], tokenizer, params.seed + 2).save_pretrained(workdir / "reward")

    size = config.batch_size
    prompts = [row["prompt_ids"] for row in make_prompts(
        tokenizer, texts, size * (args.warmup + args.steps), params.data.prompt_tokens, params.seed)]
    responses = sample_continuations(student, tokenizer, prompts, config.max_new_tokens, params.seed,
                                     config.temperature, config.top_k, config.top_p, batch_size=size)
    settings = {
        "ppo": config.model_dump(), "threads": args.threads,
        "batches": [prompts[i : i + size] for i in range(0, len(prompts), size)],
        "responses": [responses[i : i + size] for i in range(0, len(responses), size)],
        "special_tokens": {"pad_token": tokenizer.pad_token, "bos_token": tokenizer.bos_token,
                           "eos_token": tokenizer.eos_token},
        "models": {name: arch.model_dump() for name, arch in archs.items()}, "vocab_size": len(tokenizer),
        "student": {"warm": f"warm-started: {warmup.steps} LM steps (student.train), as train_ppo starts from",
                    "random": "randomly initialised"}[args.student],
    }
    (workdir / "settings.json").write_text(json.dumps(settings))
    return settings


def ensure_trl_venv() -> str:
    """.venv-trl/bin/python with TRL_REQUIREMENTS installed (created on first use)."""
    python = TRL_VENV / "bin" / "python"
    marker = TRL_VENV / ".ppo_step-installed"
    if python.exists() and marker.exists() and marker.read_text().split() == TRL_REQUIREMENTS:
        return str(python)
    print(f"setting up {TRL_VENV.relative_to(ROOT)}: pip install {' '.join(TRL_REQUIREMENTS)} (once, about a minute)",
          flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True, capture_output=True, text=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS],
                       check=True, capture_output=True, text=True)
        subprocess.run([str(python), "-c", "from trl import PPOTrainer"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        tail = "\n".join((exc.stderr or exc.stdout or "").strip().splitlines()[-15:])
        raise BenchError(f"could not set up {TRL_VENV} ({' '.join(map(str, exc.cmd))}):\n{tail}") from None
    marker.write_text(" ".join(TRL_REQUIREMENTS) + "\n")
    return str(python)


class Worker:
    """One side in its own process (see `serve`)."""

    def __init__(self, side: str, python: str, workdir: Path, threads: int) -> None:
        self.side = side
        self.log = tempfile.TemporaryFile("w+")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", side, str(workdir)],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = "\n".join(self.log.read().strip().splitlines()[-20:])
            raise BenchError(f"the {self.side} worker failed (exit {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def step(self, i: int) -> dict:
        try:
            self.proc.stdin.write(f"step {i}\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died; read() says why
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_sides(pythons: dict[str, str], workdir: Path, args) -> tuple[dict, dict, Optional[str]]:
    """Start the workers, then take turns, one step each: ours, trl, trl, ours, ours, trl, ... (ABBA order;
    with a third worker: A B C, C B A, ...)."""
    workers = {name: Worker(name, python, workdir, args.threads) for name, python in pythons.items()}
    hellos, steps, trl_error = {}, {name: [] for name in workers}, None
    try:
        for name in list(workers):
            try:
                hellos[name] = workers[name].read()
            except BenchError as exc:
                if name == "ours":
                    raise
                trl_error = str(exc)
                workers.pop(name).close()
                del steps[name]
        for i in range(args.warmup + args.steps):
            order = list(workers) if i % 2 == 0 else list(workers)[::-1]
            print(f"step {i + 1}/{args.warmup + args.steps}" + (" (warm-up)" if i < args.warmup else ""),
                  end="\r", flush=True)
            for name in order:
                try:
                    steps[name].append(workers[name].step(i))
                except BenchError as exc:
                    if name == "ours":
                        raise
                    trl_error = str(exc)
                    workers.pop(name).close()
                    del steps[name], hellos[name]
                time.sleep(0.05)  # let the other side's threads go idle
        print()
    finally:
        for worker in workers.values():
            worker.close()
    if trl_error:
        print(f"TRL side failed: {trl_error}", file=sys.stderr)
    return hellos, steps, trl_error


def rates(step: dict, ppo_epochs: int) -> dict:
    """The token counts, defined once for both sides (see the module docstring)."""
    generated = sum(step["generated_lengths"])
    update_tokens = ppo_epochs * sum(p + r for p, r in zip(step["prompt_lengths"], step["response_lengths"]))
    return {"generation_tok_s": generated / step["generation_s"], "update_tok_s": update_tokens / step["update_s"],
            "generated_tokens": generated, "update_tokens": update_tokens}


def throughput(measured: list[dict], ppo_epochs: int) -> dict:
    """Medians (and the best step) over the measured steps."""
    rows = [rates(s, ppo_epochs) for s in measured]
    med = lambda key, src=rows: statistics.median(r[key] for r in src)  # noqa: E731
    return {
        "generation_tok_s": med("generation_tok_s"), "update_tok_s": med("update_tok_s"),
        "best_generation_tok_s": max(r["generation_tok_s"] for r in rows),
        "best_update_tok_s": max(r["update_tok_s"] for r in rows),
        "generation_s": med("generation_s", measured), "scoring_s": med("scoring_s", measured),
        "update_s": med("update_s", measured), "step_s": med("total_s", measured),
        "generated_tokens": med("generated_tokens"), "update_tokens": med("update_tokens"),
        "mean_response_length": statistics.mean(r for s in measured for r in s["response_lengths"]),
        "mean_generated_length": statistics.mean(g for s in measured for g in s["generated_lengths"]),
        "measured_steps": len(rows),
        "update_breakdown_median_s": {k: statistics.median(s["update_breakdown"][k] for s in measured)
                                      for k in measured[0]["update_breakdown"]},
        "per_step": [{**{k: round(s[k], 5) for k in ("generation_s", "scoring_s", "update_s")},
                      "update_breakdown": {k: round(v, 5) for k, v in s["update_breakdown"].items()}}
                     for s in measured],
    }


def memory(first: dict, measured: list[dict]) -> dict:
    """Per phase: the highest peak RSS over the measured steps, absolute and above the RSS after setup."""
    mib = 2**20
    out = {"base_rss_mib": first["base_rss"] / mib, "method": first["rss_method"]}
    for phase in ("generation", "scoring", "update"):
        peak = max(s["peak_rss"][phase] for s in measured)
        out[f"{phase}_peak_rss_mib"] = peak / mib
        out[f"{phase}_above_base_mib"] = (peak - first["base_rss"]) / mib
    return out


def machine_info() -> dict:
    model = None
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpu": model or platform.processor(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "loadavg_before": os.getloadavg()}


def print_table(sides: dict, ratios: dict) -> None:
    names = list(sides)
    rows = [
        ("generation tok/s", "generation_tok_s", "{:.0f}"), ("update tok/s", "update_tok_s", "{:.0f}"),
        ("generation tok/s, best step", "best_generation_tok_s", "{:.0f}"),
        ("update tok/s, best step", "best_update_tok_s", "{:.0f}"),
        ("generation s", "generation_s", "{:.3f}"), ("scoring s", "scoring_s", "{:.3f}"),
        ("update s", "update_s", "{:.3f}"), ("step s", "step_s", "{:.3f}"),
        ("generation peak RSS MiB (above base)", ("generation_peak_rss_mib", "generation_above_base_mib"), None),
        ("update peak RSS MiB (above base)", ("update_peak_rss_mib", "update_above_base_mib"), None),
    ]
    others = [n for n in names if n != "trl"] if "trl" in sides else []
    header = f"{'':40s}" + "".join(f"{n:>16s}" for n in names) + "".join(f"{n + '/trl':>14s}" for n in others)
    print(header)
    print("-" * len(header))
    for label, key, fmt in rows:
        cells = []
        for n in names:
            s = sides[n]
            if isinstance(key, tuple):
                cells.append(f"{s['memory'][key[0]]:.0f} ({s['memory'][key[1]]:+.0f})")
            else:
                cells.append(fmt.format(s["throughput"][key]))
        ratio = "".join(f"{sides[n]['throughput'][key] / sides['trl']['throughput'][key]:14.2f}"
                        for n in others if not isinstance(key, tuple))
        print(f"{label:40s}" + "".join(f"{c:>16s}" for c in cells) + ratio)
    if ratios:
        print(f"update ours/TRL: {ratios['update_speedup']:.2f}x (median of paired steps "
              f"{ratios['update_speedup_paired']:.2f}x; target >= 1.5: "
              f"{'met' if ratios['update_target_met'] else 'NOT met'})")
        print(f"generation ours/TRL: {ratios['generation_ratio']:.2f}x (median of paired steps "
              f"{ratios['generation_ratio_paired']:.2f}x; target >= 1.0: "
              f"{'met' if ratios['generation_target_met'] else 'NOT met'})")
        if "same_transformers_update_speedup" in ratios:
            print(f"on the same transformers 4.46.3, ours/TRL: update {ratios['same_transformers_update_speedup']:.2f}x, "
                  f"generation {ratios['same_transformers_generation_ratio']:.2f}x")


def main() -> None:
    args = parse_args()
    if args.trl_worker:
        args.worker, args.workdir = "trl", args.trl_worker
    if args.worker:
        makers = {"ours": make_ours, "trl": make_trl, "ours-tf4": lambda w, s: make_ours(w, s, portable=True)}
        serve(makers[args.worker], Path(args.workdir))
        return
    if args.steps is None:
        args.steps = 1 if args.smoke else 60
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 2
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")

    machine = machine_info()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory(prefix="ppo_step-") as tmp:
        workdir = Path(tmp)
        settings = build_workdir(workdir, args)
        ppo = settings["ppo"]
        print(f"{settings['student']} student; "
              f"batch {ppo['batch_size']}, mini-batch {ppo['mini_batch_size']}, {ppo['ppo_epochs']} epochs, "
              f"{ppo['max_new_tokens']} new tokens, vocab {settings['vocab_size']}, {args.threads} threads, "
              f"{args.warmup} warm-up + {args.steps} measured steps per side"
              + ("  [SMOKE]" if args.smoke else ""), flush=True)
        pythons, trl_error = {"ours": sys.executable}, None
        if not args.no_trl:
            try:
                pythons["trl"] = args.trl_python or ensure_trl_venv()
                if args.ours_tf4:
                    pythons["ours-tf4"] = pythons["trl"]
            except BenchError as exc:
                trl_error = str(exc)
                print(f"TRL side skipped: {trl_error}", file=sys.stderr)
        hellos, steps, run_error = run_sides(pythons, workdir, args)
        trl_error = trl_error or run_error

    sides = {}
    for name, recs in steps.items():
        measured = recs[args.warmup:]
        sides[name] = {"versions": hellos[name]["info"], "throughput": throughput(measured, ppo["ppo_epochs"]),
                       "memory": memory(hellos[name], measured),
                       "ppo_epochs_run": sorted({s["ppo_epochs_run"] for s in measured})}
    ratios, check = {}, None
    if "trl" in sides:
        ours, trl = sides["ours"]["throughput"], sides["trl"]["throughput"]
        paired = [(rates(a, ppo["ppo_epochs"]), rates(b, ppo["ppo_epochs"]))
                  for a, b in zip(steps["ours"][args.warmup:], steps["trl"][args.warmup:])]
        ratios = {
            "update_speedup": ours["update_tok_s"] / trl["update_tok_s"],
            "update_speedup_paired": statistics.median(a["update_tok_s"] / b["update_tok_s"] for a, b in paired),
            "generation_ratio": ours["generation_tok_s"] / trl["generation_tok_s"],
            "generation_ratio_paired": statistics.median(
                a["generation_tok_s"] / b["generation_tok_s"] for a, b in paired),
        }
        ratios.update(update_target_met=ratios["update_speedup"] >= 1.5,
                      generation_target_met=ratios["generation_ratio"] >= 1.0)
        if "ours-tf4" in sides:  # diagnostic: the same trainers on the same transformers
            tf4 = sides["ours-tf4"]["throughput"]
            ratios.update(same_transformers_update_speedup=tf4["update_tok_s"] / trl["update_tok_s"],
                          same_transformers_generation_ratio=tf4["generation_tok_s"] / trl["generation_tok_s"])
        a = hellos["ours"]["checksums"]
        check = {k: {**{n: h["checksums"][k] for n, h in hellos.items()},
                     "match": all(abs(h["checksums"][k] - a[k]) <= 1e-4 * max(1.0, abs(a[k])) for h in hellos.values())}
                 for k in a}
        if not all(v["match"] for v in check.values()):
            print(f"WARNING: the sides' model outputs differ (not the same weights?): {check}", file=sys.stderr)
    print()
    print_table(sides, ratios)

    machine["loadavg_after"] = os.getloadavg()
    record = {
        "meta": {
            "smoke": bool(args.smoke), "time": started, "machine": machine, "torch_threads": args.threads,
            "warmup_steps": args.warmup, "measured_steps": args.steps,
            "schedule": "all workers alive, one step each in turn, the order reversed every step (ours, trl, trl, ours, ...)",
            "statistic": "median over the measured steps; best_*: the fastest step; *_paired: median over "
                         "step pairs of ours / trl",
            "definitions": {
                "generation_tok_s": "sum of the side's own sample lengths (up to and including eos) / generation "
                                    "seconds",
                "responses": "both sides update on the same responses, sampled once from the initial student",
                "update_tok_s": "ppo_epochs * sum of (prompt + response lengths) / update seconds",
                "update": "ours: step() minus _sample and compute_scores; TRL: PPOTrainer.step()",
                "peak_rss": "max over measured steps of the phase's peak RSS (VmHWM); above_base: minus the "
                            "RSS after loading the models and building the trainer",
            },
            "shapes": {k: ppo[k] for k in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                                           "temperature", "top_k", "top_p", "gradient_accumulation_steps")},
            "models": settings["models"], "vocab_size": settings["vocab_size"], "student": settings["student"],
            "ours": {k: ppo[k] for k in ("mode", "kernel_backend", "kl_reference", "padding_free")},
            "sides": {"ours": "CustomPPOTrainer, project venv", "trl": "trl PPOTrainer, .venv-trl",
                      "ours-tf4": "CustomPPOTrainer run inside .venv-trl (transformers 4.46.3), --ours-tf4 only"},
            "trl_requirements": TRL_REQUIREMENTS, "trl_error": trl_error, "same_weights_check": check,
        },
        "ratios": ratios,
        "results": sides,
    }
    default_out = RESULTS / ("ppo_step-cpu.json" if args.student == "warm" else "ppo_step-cpu-random-student.json")
    out = Path(args.out) if args.out else (None if args.smoke else default_out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
