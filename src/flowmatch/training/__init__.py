"""Training: config dataclasses, the objective-agnostic loop, EMA, checkpoints, distributed runs.

``train(model, objective, source, config, run_dir)`` is the entry point; ``load_checkpoint`` and
``latest_checkpoint`` read what it writes.
"""

from flowmatch.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flowmatch.training.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from flowmatch.training.ema import EMA
from flowmatch.training.loop import (
    DataSource,
    Objective,
    TrainingDiverged,
    TrainResult,
    micro_batch_seed,
    train,
)
from flowmatch.training.lr import learning_rate

__all__ = [
    "EMA",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DataSource",
    "Objective",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "micro_batch_seed",
    "save_checkpoint",
    "train",
]
