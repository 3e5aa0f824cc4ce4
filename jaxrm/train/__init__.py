"""Training loops: Bradley-Terry reward models (:mod:`jaxrm.train.reward`)."""

from jaxrm.train.reward import (
    PreferencePairs,
    RewardTrainConfig,
    RewardTrainResult,
    bradley_terry_loss,
    evaluate_reward_model,
    pair_rewards,
    pairwise_accuracy,
    train_reward_model,
)

__all__ = [
    "PreferencePairs",
    "RewardTrainConfig",
    "RewardTrainResult",
    "bradley_terry_loss",
    "evaluate_reward_model",
    "pair_rewards",
    "pairwise_accuracy",
    "train_reward_model",
]
