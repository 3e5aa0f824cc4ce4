"""Training: Bradley-Terry reward models (:mod:`jaxrm.train.reward`, exported here), SFT
(:mod:`jaxrm.train.sft`), RLHF iterations (:mod:`jaxrm.train.rlhf`), the one run driver
(:mod:`jaxrm.train.driver`) and its checkpoints (:mod:`jaxrm.train.checkpoints`)."""

from jaxrm.train.reward import (
    PreferencePairs,
    RewardTrainConfig,
    RewardTrainResult,
    bradley_terry_loss,
    evaluate_reward_model,
    pair_rewards,
    pairwise_accuracy,
    train_reward_model,
    train_reward_models,
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
    "train_reward_models",
]
