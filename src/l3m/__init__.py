"""l3m: constrained fine-tuning of LLMs with log barriers (L3Ms, Lagrange Large Language Models)."""

from l3m.config import L3MConfig, ModelConfig, ScriptArguments, TrainScriptArguments
from l3m.constraints import Constraint
from l3m.errors import L3MConfigError, L3MDataError, L3MError, L3MTrainingStopped
from l3m.rewards.training import RewardConfig, RewardModelTrainer
from l3m.rewards.models import ModelReward
from l3m.training.grpo import ConstrainedGRPOTrainer
from l3m.training.grpo_config import ConstrainedGRPOConfig
from l3m.training.trainer import L3MTrainer

__version__ = "0.1.0"

__all__ = [
    "ConstrainedGRPOConfig",
    "ConstrainedGRPOTrainer",
    "Constraint",
    "L3MConfig",
    "L3MConfigError",
    "L3MDataError",
    "L3MError",
    "L3MTrainer",
    "L3MTrainingStopped",
    "ModelConfig",
    "ModelReward",
    "RewardConfig",
    "RewardModelTrainer",
    "ScriptArguments",
    "TrainScriptArguments",
]
