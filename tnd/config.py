"""Typed schema of params.yaml: the one place where parameters are defined and checked.

Every stage reads params through `load_params`, so a typo or a bad value fails the
same way everywhere: one line naming the key, the value and what is allowed, raised
as `ParamsError` (stages turn it into exit code 2). Sections forbid unknown keys, so
`ppo.learnng_rate` is an error that suggests `ppo.learning_rate`, not a silent no-op.

`CustomPPOConfig`, the trainer's settings for library users, is the same parameters flat (`TRAINER_FIELDS`):
its fields are these sections' fields, so a type, default, bound or rule is written once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from tnd.errors import ParamsError, one_line

PositiveInt = typing.Annotated[int, Field(gt=0)]
NonNegativeInt = typing.Annotated[int, Field(ge=0)]
PositiveFloat = typing.Annotated[float, Field(gt=0)]
NonNegativeFloat = typing.Annotated[float, Field(ge=0)]
Probability = typing.Annotated[float, Field(ge=0, le=1)]
# The ways a reward-model preference pair is made (tnd.data.pairs; nursery.CORRUPTIONS implements each).
CorruptionKind = Literal["agreement_swap", "adjacent_swap", "drop_word", "duplicate_word"]
CORRUPTION_KINDS: tuple[str, ...] = typing.get_args(CorruptionKind)


# data.n_train: null on the nursery data: the 20,000 sentences every default was sized on (docs/getting-started.md).
NURSERY_N_TRAIN = 20_000


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data and tokenizer -----------------------------------------------------------


class DataParams(Section):
    source: str = "nursery"  # "nursery", a local .jsonl/.csv/.parquet/.txt path, or a datasets hub id
    hub_config: Optional[str] = None
    hub_split: str = "train"
    text_field: str = "text"
    # nursery: sentences generated (null: NURSERY_N_TRAIN); a file or hub source: at most this many, null: every text
    # (prepare_data says in one line how many a number leaves out)
    n_train: Optional[PositiveInt] = None
    # Texts are deduplicated, then split three ways, disjoint: eval.jsonl is the test split (evaluate, health,
    # the reported figures), valid.jsonl the validation split that early stopping and keep_best select on
    # (teacher, student warm-up, reward model); a local file or hub source gives each at most a tenth
    n_valid: PositiveInt = 1000
    n_eval: PositiveInt = 1000
    max_chars: PositiveInt = 2000  # longer texts are truncated (and counted in stats.json)
    prompt_tokens: PositiveInt = 2  # trial prompts are the first tokens of a text
    n_prompts: PositiveInt = 2000
    n_eval_prompts: PositiveInt = 200
    pair_corruptions: list[CorruptionKind] = Field(
        default=["agreement_swap", "drop_word", "duplicate_word"], min_length=1
    )

    @model_validator(mode="before")
    @classmethod
    def _nursery_size(cls, data: Any) -> Any:
        # The grammar generates as many sentences as asked, so it needs a number; a corpus has its own size.
        if isinstance(data, dict) and data.get("source", "nursery") == "nursery" and data.get("n_train") is None:
            return {**data, "n_train": NURSERY_N_TRAIN}
        return data


class TokenizerParams(Section):
    source: str = "train"  # "train": byte-level BPE on the train split; else a name/path
    vocab_size: typing.Annotated[int, Field(ge=300, le=1_000_000)] = 2048
    min_frequency: PositiveInt = 2
    # The built-in teacher's and student's embedding and output rows: null = one per token; a number = that
    # many, the rows beyond the tokenizer never sampled (tnd.generation), so a small tokenizer costs what a
    # vocabulary of this size does in the output layer and the losses (nanoGPT pads GPT-2's 50257 to 50304)
    pad_vocab_to: Optional[PositiveInt] = None

    @model_validator(mode="after")
    def _padding_holds_the_vocabulary(self) -> "TokenizerParams":
        # A trained BPE may reach vocab_size tokens; another tokenizer's size is checked when a model is built.
        if self.source == "train" and self.pad_vocab_to is not None and self.pad_vocab_to < self.vocab_size:
            raise ValueError(
                f"pad_vocab_to ({self.pad_vocab_to}) must be at least vocab_size ({self.vocab_size}), the tokens "
                "the trained BPE may have; raise it or set null"
            )
        return self


# --- models -----------------------------------------------------------------------


class ArchParams(Section):
    """A Llama-style decoder; the reward model reuses it with a scalar head."""

    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 384
    max_position_embeddings: PositiveInt = 64
    dropout: typing.Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ArchParams":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        return self


class LMTrainParams(Section):
    steps: NonNegativeInt = 1500  # at most: validation may stop training earlier (patience)
    batch_size: PositiveInt = 64
    learning_rate: PositiveFloat = 3e-3
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: NonNegativeInt = 100
    max_length: PositiveInt = 48
    max_grad_norm: PositiveFloat = 1.0
    # Held-out validation on the eval split (transformers' Trainer with load_best_model_at_end):
    eval_every: NonNegativeInt = 100  # validate every this many steps, at most an epoch apart; 0 = no validation
    eval_size: PositiveInt = 256  # on the first this many eval texts (reward model: eval pairs / labelled texts)
    patience: NonNegativeInt = 5  # stop after this many validations in a row without a better one; 0 = never
    keep_best: bool = True  # end on the weights of the best validation, not of the last step

    def planned_steps(self, n_texts: int) -> int:
        """The steps asked for on `n_texts` training texts (or pairs): `steps` (the teacher's may follow the data)."""
        return self.steps


class LMEvalParams(Section):
    n_samples: PositiveInt = 200  # sampled continuations scored by the grammar checker
    max_new_tokens: PositiveInt = 24
    temperature: PositiveFloat = 1.0


class TeacherTrainParams(LMTrainParams):
    """The teacher's steps follow its data: `steps` null (the default) is `epochs` passes over the training texts,
    at least `min_steps` (`planned_steps`); a number is that many steps whatever the data."""

    steps: Optional[NonNegativeInt] = None  # at most (validation may stop earlier); null: from epochs and min_steps
    # 4.8 passes: the 1,500 steps of 64 texts over the nursery's 20,000 that the defaults were tuned with
    epochs: PositiveFloat = 4.8
    # a small corpus still gets the 1,500 steps it always got: validation stops it when it stops improving
    min_steps: NonNegativeInt = 1500
    # The age-predictor reward's checkpoints (reward.objective: age): the built-in teacher's weights at about
    # this many log-spaced steps, 1 ... the last (tnd.trainers.lm.age_steps), in models/teacher_ages/; 0: none
    age_checkpoints: NonNegativeInt = 0

    def planned_steps(self, n_texts: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(self.min_steps, math.ceil(self.epochs * n_texts / self.batch_size))


class TeacherParams(Section):
    source: str = "builtin"  # "builtin": build from `arch` and pretrain; else a HF name/path
    arch: ArchParams = ArchParams()
    train: TeacherTrainParams = TeacherTrainParams()
    eval: LMEvalParams = LMEvalParams()


class StudentParams(Section):
    source: str = "builtin"
    seed: Optional[int] = None  # its initialisation, warm-up and PPO; null: seed (varied alone, upstream stays)
    arch: ArchParams = ArchParams(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
    train: LMTrainParams = LMTrainParams(steps=200, eval_every=50)  # brief warm-up before PPO; 0 = from scratch


class RewardTrainParams(LMTrainParams):
    """The LM loop's params (and validation) with the reward model's defaults. Its held-out accuracy is
    the validation's measure (ties: the loss); on 256 pairs it moves in steps of 0.4%, hence more patience."""

    steps: NonNegativeInt = 3000
    learning_rate: PositiveFloat = 1e-3
    warmup_steps: NonNegativeInt = 50
    patience: NonNegativeInt = 10


class AgeParams(Section):
    """reward.objective: age -- the texts of known age that stage sample_ages draws from each teacher checkpoint."""

    n_samples_per_checkpoint: PositiveInt = 1000  # continuations of the trial prompts (data/prepared/prompts.jsonl)
    max_new_tokens: PositiveInt = 24  # as ppo.max_new_tokens: the ages are learnt on texts like the trials
    temperature: PositiveFloat = 1.0


class RewardParams(Section):
    source: str = "builtin"
    arch: ArchParams = ArchParams(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
    # age: the paper's age predictor, a regression on texts sampled from the teacher's checkpoints
    objective: Literal["pairwise", "regression", "age"] = "pairwise"
    label_field: str = "label"  # regression: the numeric column of the labelled data
    margin: NonNegativeFloat = 0.0
    age: AgeParams = AgeParams()
    train: RewardTrainParams = RewardTrainParams()


# --- cache, PPO, distillation -------------------------------------------------------


class CacheParams(Section):
    n_prompts: PositiveInt = 8000  # demonstrations; prompts are reused (resampled) past data.n_prompts
    max_new_tokens: PositiveInt = 24
    # what is stored per token (docs/cache.md): topk_tail (the top_k log-probs + the tail's mass, exact
    # buckets) | sampled (`samples` draws from the teacher as ids + counts: unbiased, a tenth of the bytes)
    targets: Literal["topk_tail", "sampled"] = "topk_tail"
    top_k: PositiveInt = 128  # per token; the rest of the vocabulary is one tail bucket (docs/pipeline.md)
    samples: PositiveInt = 12  # targets = sampled: draws per token at cache.temperature
    temperature: PositiveFloat = 1.0  # the teacher's softmax temperature for stored log-probs
    sample_temperature: PositiveFloat = 1.0
    sample_top_k: NonNegativeInt = 0  # 0 = no top-k filtering
    sample_top_p: typing.Annotated[float, Field(gt=0, le=1)] = 1.0
    # the top-k log-probs on disk: compact (2.8125 bits a log-prob, ~329 bytes/token at V=128k, k=128;
    # tnd/cache/codec.py) | float16 | bfloat16 | float32 (exact); topk_tail only
    dtype: Literal["compact", "float16", "bfloat16", "float32"] = "compact"
    batch_size: PositiveInt = 64
    shard_tokens: PositiveInt = 65536  # about this many target tokens per shard (whole batches of prompts)
    chunk_tokens: PositiveInt = 1024  # teacher logits [chunk_tokens, V] computed at a time (memory: not [B, T, V])


class PPOParams(Section):
    steps: PositiveInt = 100
    learning_rate: PositiveFloat = 3e-4
    batch_size: PositiveInt = 32
    mini_batch_size: PositiveInt = 8
    # rows per no-grad forward of the rollout (old policy, reference) in each process, as TRL's
    # local_rollout_forward_batch_size
    rollout_forward_batch_size: PositiveInt = 64
    gradient_accumulation_steps: PositiveInt = 1
    ppo_epochs: PositiveInt = 4
    gamma: Probability = 1.0
    lam: Probability = 0.95
    cliprange: PositiveFloat = 0.2
    cliprange_value: PositiveFloat = 0.2
    vf_coef: NonNegativeFloat = 0.1
    ent_coef: NonNegativeFloat = 0.0
    max_grad_norm: PositiveFloat = 1.0
    whiten_advantages: bool = True
    init_kl_coef: NonNegativeFloat = 0.05
    adap_kl_ctrl: bool = True
    kl_target: PositiveFloat = 6.0
    kl_horizon: PositiveInt = 640
    kl_reference: Literal["teacher", "initial_student"] = "teacher"
    early_stopping: bool = False
    target_kl: PositiveFloat = 1.0
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: Optional[PositiveFloat] = None
    optimizer_name: str = "AdamW"
    optimizer_kwargs: dict[str, Any] = {}
    scheduler_name: Literal["linear", "cosine", "constant"] = "constant"
    scheduler_kwargs: dict[str, Any] = {}
    warmup_steps: NonNegativeInt = 0
    optimize_cuda_cache: bool = False
    padding_free: bool = True  # forward passes on the real tokens only (tnd/packing.py)
    max_new_tokens: PositiveInt = 24
    temperature: PositiveFloat = 1.0
    top_k: NonNegativeInt = 0
    top_p: typing.Annotated[float, Field(gt=0, le=1)] = 1.0
    save_every: PositiveInt = 25
    keep_student_snapshots: bool = True  # student weights at snapshot_schedule's steps, for evaluate's word curve
    # log: 5 log-spaced steps per decade (1, 2, 3, 4, 6, 10, 16, ..., and the last; evaluate's nAoA); every: each checkpoint
    snapshot_schedule: Literal["paper", "log", "every"] = "paper"
    max_nonfinite_reward_fraction: Probability = 0.5

    @model_validator(mode="after")
    def _batches_divide(self) -> "PPOParams":
        if self.mini_batch_size > self.batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must not exceed batch_size ({self.batch_size})"
            )
        step = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by mini_batch_size * "
                f"gradient_accumulation_steps ({self.mini_batch_size} * {self.gradient_accumulation_steps})"
            )
        return self


class DistillParams(Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: PositiveFloat = 1.0
    beta: Probability = 0.5  # jsd only: 0 = forward KL, 1 = reverse KL
    coef: NonNegativeFloat = 5.0
    online: bool = False  # also distil on the trials against the teacher's dense logits
    online_coef: NonNegativeFloat = 0.5


class TnDParams(Section):
    # lm_only: the paper's baseline, only lm_steps_per_ppo_step LM steps on the corpus per step;
    # lm_on_rollout: the paper's control, trials_and_demos with the PPO update replaced by an LM update on the same texts
    mode: Literal["trials_and_demos", "trials_only", "demos_only", "lm_only", "lm_on_rollout"] = "trials_and_demos"
    # what a trial's PPO reward is: the reward model's score on its last token | the teacher's per-token
    # log-ratio log p_teacher - log p_student (on-policy distillation) | both (score + teacher_reward_coef x ratio);
    # null: chosen by Params from the data (`Params._defaults_from_the_data`), reward_model in a bare CustomPPOConfig
    trial_reward: Optional[Literal["reward_model", "teacher", "both"]] = None
    teacher_reward_coef: NonNegativeFloat = 1.0  # weight of the teacher's per-token log-ratio (teacher, both)
    demos_as: Literal["distill", "ppo"] = "distill"  # "ppo": the paper's recipe, demos join the PPO batch
    demo_batch_size: PositiveInt = 16
    demo_score: float = 1.0  # demos_as=ppo: the fixed score a demonstration gets
    demos_from: Literal["cache", "teacher"] = "cache"  # demos_as=ppo: cached demos, or the teacher continuing the step's prompts
    lm_steps_per_ppo_step: NonNegativeInt = 0  # the paper interleaves 3 plain LM steps
    lm_data: Literal["demonstrations", "corpus"] = "demonstrations"  # what those LM steps train on (the paper: corpus)
    lm_batch_size: PositiveInt = 16  # sequences per interleaved LM step
    lm_learning_rate: Optional[PositiveFloat] = None  # null: LM steps share the PPO optimizer; else their own AdamW
    lm_warmup_steps: NonNegativeInt = 0  # that AdamW's linear warm-up, in trainer steps
    lm_on_rollout: bool = False  # one LM update on the PPO batch's sequences after each PPO update (the paper)
    score_offset: Literal["none", "log2_step"] = "none"  # log2_step: every PPO score minus log2(step) (the paper)


class KernelParams(Section):
    backend: Literal["auto", "triton", "torch"] = "auto"
    # The student's losses apply its output head a chunk of tokens at a time (tnd_kernels.fused_head), so no
    # [tokens, vocabulary] logits exist: off by default, as on CPU it saves memory at large vocabularies but is
    # no faster (docs/kernels.md, "Fused head"); not with FSDP or DeepSpeed (the head's weight is sharded)
    fused_head: bool = False


class EngineParams(Section):
    processes: PositiveInt = 1  # processes of the training stages (teacher, reward, train_ppo) and cache_teacher_logits; dvc repro starts them
    config: Optional[str] = None  # an accelerate config file (configs/ddp.yaml, fsdp.yaml, zero3.yaml)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; trainable weights stay fp32
    gradient_checkpointing: bool = False  # recompute the student's activations in the backward

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false (and `dvc exp run -S` writes it bare): it means "no".
        return "no" if value is False else value


class EvalParams(Section):
    n_prompts: PositiveInt = 200  # first n of data/prepared/eval_prompts.jsonl
    max_new_tokens: PositiveInt = 24
    temperature: PositiveFloat = 1.0
    seed: int = 0  # sampling seed, the same for every model
    max_length: PositiveInt = 48  # eval texts (bos + text + eos) are cut to this many tokens
    batch_size: PositiveInt = 64
    # nAoA's yardstick: shared (each word's way from chance to the teacher's surprisal, the same in every run of a
    # comparison) | per_run (from this run's initial to its final surprisal)
    naoa_scale: Literal["shared", "per_run"] = "shared"


class HealthParams(Section):
    """The health stage's checks (tnd/health.py; docs/pipeline.md "Health checks")."""

    strict: bool = False  # a check that fires fails the health stage (exit code 2) instead of only warning
    ignore: list[
        Literal[
            "small_data", "prompts_repeated", "teacher_not_better_than_student", "reward_near_chance",
            "student_kl_worse", "student_perplexity_worse", "reward_hacking_length", "reward_hacking_diversity",
            "kl_blowup",
        ]
    ] = []  # checks still reported in metrics/health.json, but neither printed as warnings nor failing under strict


class TrackingParams(Section):
    enabled: bool = True
    uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "tnd-pipeline"
    log_models: bool = True  # teacher, reward model and student as MLflow models (a copy of each in the store)
    model_name: Optional[str] = "tnd-student"  # the student's registered model (alias: the pipeline); null: none
    system_metrics_interval: NonNegativeFloat = 10.0  # seconds between CPU/memory/GPU samples; 0: none


class Params(Section):
    preset: Optional[str] = None  # params/<preset>.yaml under params.yaml's own changes (load_params)
    seed: int = 1234
    data: DataParams = DataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    teacher: TeacherParams = TeacherParams()
    student: StudentParams = StudentParams()
    reward: RewardParams = RewardParams()
    cache: CacheParams = CacheParams()
    ppo: PPOParams = PPOParams()
    distill: DistillParams = DistillParams()
    tnd: TnDParams = TnDParams()
    kernels: KernelParams = KernelParams()
    engine: EngineParams = EngineParams()
    eval: EvalParams = EvalParams()
    health: HealthParams = HealthParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_the_data(cls, raw: Any) -> Any:
        """teacher.train.steps and tnd.trial_reward null, chosen from data.source (FOLLOW_THE_DATA)."""
        if not isinstance(raw, dict):
            return raw
        try:
            data, teacher, reward, tnd = (_as_model(model, raw.get(name, {})) for name, model in (
                ("data", DataParams), ("teacher", TeacherParams), ("reward", RewardParams), ("tnd", TnDParams)))
        except ValidationError:
            return raw  # the section's own validation names the problem
        raw = dict(raw)
        if data.source == "nursery" and teacher.train.steps is None:
            # The steps follow the training texts. The grammar's are data.n_train, known before any stage runs, so
            # they are written in here (the nursery default: 1,500); a file's are counted by prepare_data, and
            # train_teacher plans them (TeacherTrainParams.planned_steps).
            train = teacher.train.model_copy(update={"steps": teacher.train.planned_steps(data.n_train)})
            raw["teacher"] = teacher.model_copy(update={"train": train})
        if tnd.trial_reward is None:
            # The teacher's per-token reward where the reward model would be the built-in one on word-level
            # corruptions of a file or hub source, which ranks real prose poorly (docs/own-data.md); the reward
            # model everywhere else: the nursery's exact corruptions, a user's labels or model, a mode whose
            # trials PPO never learns from.
            corruptions_of_real_text = (data.source != "nursery" and reward.source == "builtin"
                                        and reward.objective == "pairwise")
            own = corruptions_of_real_text and tnd.mode in ("trials_only", "trials_and_demos")
            raw["tnd"] = tnd.model_copy(update={"trial_reward": "teacher" if own else "reward_model"})
        return raw

    @model_validator(mode="after")
    def _demonstrations_at_the_cache_temperature(self) -> "Params":
        # The cache holds the teacher's top-k log-probs at cache.temperature. Re-tempering them would
        # need the teacher's whole distribution (the tail bucket hides how its mass is spread), so the
        # top-k loss compares both sides at that one temperature, as the dense loss softens both.
        topk_loss = self.tnd.mode == "demos_only" or (
            self.tnd.mode in ("trials_and_demos", "lm_on_rollout") and self.tnd.demos_as == "distill")
        if topk_loss and self.distill.temperature != self.cache.temperature:
            raise ValueError(
                f"distill.temperature ({self.distill.temperature}) must equal cache.temperature "
                f"({self.cache.temperature}): the cached teacher log-probs are at cache.temperature and a top-k + tail "
                "distribution cannot be re-tempered exactly; set both (changing cache.temperature reruns "
                "cache_teacher_logits)"
            )
        if topk_loss and self.cache.targets == "sampled" and self.distill.loss != "forward_kl":
            # Only the cross-entropy is linear in the teacher's distribution, so only forward KL is
            # unbiased on draws; reverse KL and JSD would weigh the student's mass off the draws as infinitely wrong.
            raise ValueError(
                f"distill.loss = {self.distill.loss} with cache.targets = sampled: the sampled targets give an unbiased "
                "loss for forward_kl only; set distill.loss: forward_kl or cache.targets: topk_tail"
            )
        try:  # the trainer's own rules, checked here too so that a bad mix fails before any stage runs
            CustomPPOConfig.from_params(self)
        except PPOConfigError as exc:
            raise ValueError(exc.problem) from None
        return self

    @model_validator(mode="after")
    def _ages_from_the_builtin_teacher(self) -> "Params":
        # The ages are the steps of the teacher's own pretraining (stage train_teacher keeps those checkpoints).
        teacher, ages = self.teacher, self.teacher.train.age_checkpoints
        steps = teacher.train.steps if teacher.train.steps is not None else teacher.train.min_steps  # at least
        if self.reward.objective == "age" and (teacher.source != "builtin" or ages < 2 or steps < 2):
            raise ValueError(
                "reward.objective: age learns the ages of texts sampled from checkpoints of the built-in teacher's "
                "pretraining, which needs teacher.source: builtin, teacher.train.age_checkpoints >= 2 and "
                f"teacher.train.steps >= 2 (got {teacher.source}, {ages} and {steps}); set them "
                "(params/tnd_original.yaml keeps 12 checkpoints) or choose another reward.objective"
            )
        if ages and teacher.source != "builtin":
            raise ValueError(
                f"teacher.train.age_checkpoints ({ages}) keeps checkpoints of the built-in teacher's pretraining, but "
                f"teacher.source is {teacher.source}, loaded pretrained; set it to 0"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Params as {"ppo.learning_rate": 1e-4, ...}, for logging."""
        return _flatten(self.model_dump(mode="json"))

    @property
    def student_seed(self) -> int:
        return self.seed if self.student.seed is None else self.student.seed

    def fingerprint(self) -> str:
        """Short stable hash of all params (tagged on every tracked run): of the values in effect, so a preset
        and the same values written out in params.yaml are one configuration."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"preset"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _as_model(model: type[BaseModel], value: Any) -> BaseModel:
    return value if isinstance(value, model) else model.model_validate(value)


# --- the trainer's settings: params.yaml's sections, flat -------------------------------------------

# Where CustomPPOConfig's fields come from: (section of Params, "" = top level; the prefix its keys take as
# fields; the keys, None = all). ppo.* and tnd.* keep their names. `seed` takes its definition from the top-level
# key and its value from Params.student_seed (student.seed when set: the student alone varies).
TRAINER_FIELDS: tuple[tuple[str, str, Optional[tuple[str, ...]]], ...] = (
    ("", "", ("seed",)),
    ("ppo", "", None),
    ("tnd", "", None),
    ("distill", "distill_", None),
    ("kernels", "kernel_", None),
    ("engine", "", ("mixed_precision", "gradient_checkpointing")),
)


def _section(params: Any, name: str) -> Any:
    return getattr(params, name) if name else params


def _trainer_field_definitions() -> dict[str, Any]:
    """pydantic field definitions copied from the sections (type, default, bounds), under the trainer's names."""
    definitions: dict[str, Any] = {}
    for name, prefix, keys in TRAINER_FIELDS:
        model = Params.model_fields[name].annotation if name else Params
        for key, info in model.model_fields.items():
            if keys is None or key in keys:
                definitions[prefix + key] = (info.annotation, info)
    return definitions


def trainer_values(params: Params) -> dict[str, Any]:
    """A Params' values under CustomPPOConfig's field names; the trainer's seed is the student's."""
    values = {
        prefix + key: value
        for name, prefix, keys in TRAINER_FIELDS
        for key, value in dict(_section(params, name)).items()
        if keys is None or key in keys
    }
    return {**values, "seed": params.student_seed}


# One definition per parameter: the fields are the sections' own (PPOParams and TnDParams as bases, so their
# validators apply; the others copied under their prefix), not a second list to keep in step.
_TrainerFields = create_model(
    "_TrainerFields", __base__=(PPOParams, TnDParams), __module__=__name__,
    **{k: v for k, v in _trainer_field_definitions().items() if k not in PPOParams.model_fields | TnDParams.model_fields},
)


class PPOConfigError(ParamsError, ValueError):
    """An invalid CustomPPOConfig value."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"CustomPPOConfig: {problem}")
        self.problem = problem


class CustomPPOConfig(_TrainerFields):
    """All trainer settings, flat: each params.yaml key of `TRAINER_FIELDS` under the name it has in its
    section (`ppo.learning_rate` -> `learning_rate`, `tnd.mode` -> `mode`), prefixed for `distill.<key>` ->
    `distill_<key>` and `kernels.<key>` -> `kernel_<key>` (`kernel_backend`, `kernel_fused_head`); same types,
    defaults and checks. A bad value raises `PPOConfigError` with one line."""

    # initial score statistics (e.g. from metrics/rewards.json) for use_score_scaling / use_score_norm;
    # reward_count: how many scores they summarise (None: they weigh as one batch)
    reward_mean: Optional[float] = None
    reward_std: Optional[PositiveFloat] = None
    reward_count: Optional[PositiveInt] = None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise PPOConfigError(_describe(exc.errors()[0], CustomPPOConfig)) from None

    @classmethod
    def from_params(cls, params: Params, **overrides: Any) -> "CustomPPOConfig":
        """The trainer's settings in `params`; keyword overrides (e.g. reward_mean=...) win."""
        return cls(**{**trainer_values(params), **overrides})

    @model_validator(mode="before")
    @classmethod
    def _reward_model_unless_told(cls, values: Any) -> Any:
        # a config built by hand has no data to choose by (Params chooses from data.source)
        if isinstance(values, dict) and values.get("trial_reward") is None:
            return {**values, "trial_reward": "reward_model"}
        return values

    @model_validator(mode="after")
    def _modes_agree(self) -> "CustomPPOConfig":
        # Written in params.yaml's words: Params checks these too, through this model.
        if (self.reward_mean is None) != (self.reward_std is None):
            raise ValueError("reward_mean and reward_std must be given together")
        if self.demos_from == "teacher" and self.demos_as != "ppo":
            raise ValueError(
                "tnd.demos_from: teacher (the teacher continues each step's prompts) needs tnd.demos_as: ppo; "
                "the distillation loss reads the cached top-k"
            )
        if self.mode in ("trials_only", "lm_only") and self.distill_online:
            raise ValueError(
                f"distill.online learns from the teacher, which tnd.mode: {self.mode} excludes; "
                "set distill.online: false or tnd.mode: trials_and_demos"
            )
        if self.trial_reward != "reward_model" and not self.uses_trials:
            raise ValueError(
                f"tnd.trial_reward: {self.trial_reward} is the reward of a PPO update on the trials, which tnd.mode: "
                f"{self.mode} never takes; set tnd.trial_reward: reward_model or tnd.mode: trials_only / trials_and_demos"
            )
        if self.mode == "lm_only" and (self.lm_data != "corpus" or not self.lm_steps_per_ppo_step):
            raise ValueError(
                "tnd.mode: lm_only (the paper's baseline: no trials, no demonstrations) learns only through LM steps "
                f"on the training corpus, but tnd.lm_data is {self.lm_data} and tnd.lm_steps_per_ppo_step "
                f"{self.lm_steps_per_ppo_step}; set tnd.lm_data: corpus and tnd.lm_steps_per_ppo_step >= 1 "
                "(the paper: 3)"
            )
        return self

    @property
    def num_mini_batches(self) -> int:
        return self.batch_size // self.mini_batch_size

    @property
    def uses_trials(self) -> bool:
        """PPO updates on the trials. demos_only and lm_only still sample and score trials, for monitoring only;
        lm_on_rollout learns from them by an LM update instead (`lm_on_trials`)."""
        return self.mode in ("trials_and_demos", "trials_only")

    @property
    def trains_on_trials(self) -> bool:
        """Some update learns from the trials: PPO (`uses_trials`) or the lm_on_rollout mode's LM update."""
        return self.uses_trials or self.mode == "lm_on_rollout"

    @property
    def lm_on_trials(self) -> bool:
        """An LM update on the step's PPO batch: the lm_on_rollout mode (no PPO), or tnd.lm_on_rollout (after it)."""
        return self.mode == "lm_on_rollout" or (self.uses_trials and self.lm_on_rollout)

    @property
    def uses_demos(self) -> bool:
        """lm_only (the paper's LM-only baseline) is the same schedule without trials or demonstrations: only
        lm_steps_per_ppo_step LM steps on the corpus per step change the student. lm_on_rollout has trials_and_demos'
        demonstrations."""
        return self.mode in ("trials_and_demos", "demos_only", "lm_on_rollout")

    @property
    def demos_in_ppo_batch(self) -> bool:
        """The paper's recipe: demonstrations join the PPO batch with a fixed score (lm_on_rollout: the batch its LM
        update learns from)."""
        return (self.uses_trials or self.mode == "lm_on_rollout") and self.uses_demos and self.demos_as == "ppo"

    @property
    def demos_distilled(self) -> bool:
        """Demonstrations through the top-k KL loss (demos_only always, whatever demos_as says)."""
        return self.uses_demos and not self.demos_in_ppo_batch

    @property
    def lm_steps(self) -> int:
        """Interleaved LM steps per trainer step: on the corpus in every mode, on demonstrations only when the
        mode has demonstrations."""
        return self.lm_steps_per_ppo_step if (self.lm_data == "corpus" or self.uses_demos) else 0

    @property
    def value_head_sometimes_unused(self) -> bool:
        """Some backward passes leave the value head out (LM updates, a mini-batch of demonstrations only)."""
        return not self.uses_trials or bool(self.lm_steps) or self.lm_on_rollout

    @property
    def reads_demo_cache(self) -> bool:
        return (self.demos_distilled or (self.demos_in_ppo_batch and self.demos_from == "cache")
                or (self.lm_steps > 0 and self.lm_data == "demonstrations"))


# --- loading and error messages -----------------------------------------------------


PRESETS = "params"  # the folder of presets, beside params.yaml: params/<name>.yaml


def load_params(path: str | Path = "params.yaml", quiet: bool = False) -> Params:
    """params.yaml (or `path`), its preset applied (`parse_params`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; run from the project root or pass --params PATH")
    return parse_params(_read_yaml(path), source=str(path), quiet=quiet)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ParamsError(f"{path}: not valid YAML{line}; fix the syntax ({one_line(exc)})") from None


def parse_params(raw: Any, source: str = "params.yaml", quiet: bool = False) -> Params:
    """The params in `raw` (read from `source`). With `preset: <name>`, three layers, the later winning: the
    schema's defaults, the overrides in params/<name>.yaml (beside `source`), and every key of `raw` whose value
    differs from the schema's default -- so `dvc exp run -S preset=x -S ppo.learning_rate=1e-4` is preset x with
    that learning rate. The keys where `raw` overrides the preset are noted in one line on stderr, unless `quiet`.
    (A value equal to the schema's default cannot override a preset: it reads as unchanged.)"""
    if raw is None:
        raise ParamsError(f"{source}: file is empty; start from the params.yaml in the repository")
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    if raw.get("preset") is None:
        return _validate(raw, source)
    name = raw["preset"]
    merged, overridden = _apply_preset(raw, source)
    params = _validate(merged, f"{source} + {Path(source).parent / PRESETS / name}.yaml")
    if overridden and not quiet:
        print(f"note: {source} overrides preset {name}: {'; '.join(overridden)}", file=sys.stderr, flush=True)
    return params


def _validate(raw: dict, source: str) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ParamsError(f"{source}: {_describe(errors[0])}{more}") from None


def _apply_preset(raw: dict, source: str) -> tuple[dict, list[str]]:
    """`raw` over its preset (`parse_params`), and `key = value (preset: value)` for each key where `raw`
    overrides the preset."""
    name, folder = raw["preset"], Path(source).parent / PRESETS
    available = sorted(path.stem for path in folder.glob("*.yaml"))
    if name not in available:
        close = difflib.get_close_matches(str(name), available, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        choices = f"one of {', '.join(map(repr, available))}" if available else f"none ({folder} holds no *.yaml)"
        raise ParamsError(f"{source}: preset = {json.dumps(name, default=str)} is not a preset; {hint}"
                          f"allowed: null or {choices}")
    path = folder / f"{name}.yaml"
    overrides = _read_yaml(path)
    if not isinstance(overrides, dict):
        raise ParamsError(f"{path}: a preset is a mapping of the params it sets (e.g. ppo: {{learning_rate: 2.0e-5}}), "
                          f"got {type(overrides).__name__}")
    if "preset" in overrides:
        raise ParamsError(f"{path}: unknown key 'preset'; a preset cannot apply another (copy that one's keys instead)")
    defaults, preset = _declared_defaults(), _leaves(overrides)
    _validate(_tree({**defaults, **preset}), str(path))  # a bad key or value is named in the preset's file
    changed = {loc: value for loc, value in _leaves(raw).items() if loc not in defaults or value != defaults[loc]}
    overridden = [
        f"{'.'.join(loc)} = {json.dumps(value, default=str)} (preset: {json.dumps(preset[loc], default=str)})"
        for loc, value in changed.items() if loc in preset and value != preset[loc]
    ]
    # on the whole defaults tree: a partial section would take its class's defaults, not the ones the section
    # has where it sits (student.train.eval_every is 50, LMTrainParams' own 100)
    return _tree({**defaults, **preset, **changed}), overridden


# Defaults that the validators fill in from the data (DataParams._nursery_size, Params._defaults_from_the_data): as
# preset layers they stay null, so that a file source under a preset is sized and rewarded by its own data.
FOLLOW_THE_DATA = (("data", "n_train"), ("teacher", "train", "steps"), ("tnd", "trial_reward"))


def _declared_defaults() -> dict[tuple[str, ...], Any]:
    return {loc: None if loc in FOLLOW_THE_DATA else value for loc, value in _leaves(Params().model_dump(mode="json")).items()}


def _leaves(tree: dict, loc: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{("ppo", "learning_rate"): 1e-4, ...}: a params tree's values by key, down to the schema's sections (so a
    mapping value such as ppo.optimizer_kwargs is one value, replaced whole, never merged)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        here = (*loc, str(key))
        if isinstance(value, dict) and _model_at(here) is not None:
            out.update(_leaves(value, here))
        else:
            out[here] = value
    return out


def _tree(leaves: dict[tuple[str, ...], Any]) -> dict:
    """The params tree of `_leaves`' output; a later key replaces whatever an earlier one put at its place."""
    tree: dict = {}
    for loc, value in leaves.items():
        node = tree
        for part in loc[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[loc[-1]] = value
    return tree


def _describe(error: dict, root: type[BaseModel] = Params) -> str:
    loc = tuple(str(part) for part in error["loc"] if not isinstance(part, int))
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])[1:]
    if error["type"] == "extra_forbidden":
        return _unknown_key(loc, root)
    if error["type"] in ("value_error", "assertion_error") and error.get("ctx", {}).get("error"):
        prefix = f"{key}: " if key else ""
        return f"{prefix}{error['ctx']['error']}"
    allowed = _allowed(loc, root)
    value = error.get("input")
    shown = json.dumps(value) if _jsonable(value) else repr(value)
    if error["type"] == "missing":
        return f"{key} is missing; add it ({allowed})"
    if error["type"] == "literal_error":
        return f"{key} = {shown} is not a valid choice; allowed: {allowed}"
    reason = error["msg"][0].lower() + error["msg"][1:]
    return f"{key} = {shown} is invalid: {reason}; allowed: {allowed}"


def _unknown_key(loc: tuple[str, ...], root: type[BaseModel]) -> str:
    parent, name = loc[:-1], loc[-1]
    model = _model_at(parent, root)
    valid = sorted(model.model_fields) if model else []
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    key = ".".join(loc)
    if close:
        hint = f"did you mean '{'.'.join(parent + (close[0],))}'?"
    else:
        hint = f"valid keys here: {', '.join(valid)}"
    return f"unknown key '{key}'; {hint}"


def _model_at(loc: tuple[str, ...], root: type[BaseModel] = Params) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _allowed(loc: tuple[str, ...], root: type[BaseModel] = Params) -> str:
    """What a field accepts, in words: its type, choices and bounds."""
    model = _model_at(loc[:-1], root)
    field = model.model_fields.get(loc[-1]) if model else None
    if field is None:
        return "see params.yaml"
    annotation = field.annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        return "a list of " + _allowed_type(annotation, [])
    return _allowed_type(annotation, field.metadata)


def _allowed_type(annotation: Any, metadata: list) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        for item in extra:  # a pydantic Field() inside Annotated keeps its bounds in .metadata
            metadata = [*metadata, *getattr(item, "metadata", [item])]
        return _allowed_type(inner, metadata)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return _allowed_type(args[0], metadata) + " or null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of " + ", ".join(annotation.model_fields)
    name = getattr(annotation, "__name__", str(annotation))
    bounds = []
    for item in metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            bound = getattr(item, attr, None)
            if bound is not None and isinstance(item, annotated_types.BaseMetadata):
                bounds.append(f"{sign} {bound}")
    return name + (" " + " and ".join(bounds) if bounds else "")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
