"""Rewards: the ``Reward`` protocol, its implementations, their combination and the catalog.

>>> from diffalign.rewards import load_reward
>>> judge = load_reward("sandbox-judge")          # reward_models/sandbox-judge.yaml
>>> scores = judge.score(images, prompts)         # float32 [B]
"""

from diffalign.rewards.base import (
    ModelReward,
    Reward,
    to_float_tensor,
    to_pil_list,
)
from diffalign.rewards.catalog import MissingWeightsError, list_rewards, load_manifest, load_reward
from diffalign.rewards.combine import CombinedReward, LambdaHarmonicReward, lambda_harmonic
from diffalign.rewards.multi_aspect import (
    MultiAspectConfig,
    MultiAspectReward,
    MultiAspectRewardModel,
    bt_loss,
    soft_bt_loss,
)

__all__ = [
    "CombinedReward",
    "LambdaHarmonicReward",
    "MissingWeightsError",
    "ModelReward",
    "MultiAspectConfig",
    "MultiAspectReward",
    "MultiAspectRewardModel",
    "Reward",
    "bt_loss",
    "lambda_harmonic",
    "list_rewards",
    "load_manifest",
    "load_reward",
    "soft_bt_loss",
    "to_float_tensor",
    "to_pil_list",
]
