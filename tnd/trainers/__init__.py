"""Trainers: PPO with Trials and Demonstrations, the reward model, and plain LM pretraining."""

__all__ = ["CustomPPOConfig", "CustomPPOTrainer"]


def __getattr__(name: str):
    # Loaded on first use, so a stage that needs only lm.py or reward.py does not load the PPO trainer and
    # the kernels, and editing those does not rerun it under DVC (dvc.yaml lists what each stage loads).
    if name in __all__:
        from tnd.trainers import ppo

        return getattr(ppo, name)
    raise AttributeError(f"module 'tnd.trainers' has no attribute {name!r}")
