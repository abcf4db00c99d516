"""The training loop for Hugging Face causal LMs, its configuration, checkpoints and metrics sinks."""

from entrorl.trainer.config import ConfigError, ConfigWarning, TrainConfig, load_config
from entrorl.trainer.loggers import read_metrics
from entrorl.trainer.loop import Trainer, TrainingInterrupted, TrainingStopped
from entrorl.trainer.schedule import learning_rate_factor

__all__ = ["ConfigError", "ConfigWarning", "TrainConfig", "Trainer", "TrainingInterrupted", "TrainingStopped", "learning_rate_factor", "load_config", "read_metrics"]
