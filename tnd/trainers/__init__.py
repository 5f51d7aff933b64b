"""Trainers: PPO with Trials and Demonstrations, the reward model, and plain LM pretraining."""

from tnd.trainers.ppo import CustomPPOConfig, CustomPPOTrainer

__all__ = ["CustomPPOConfig", "CustomPPOTrainer"]
