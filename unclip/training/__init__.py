"""One accelerate-based training loop for every stage."""

from unclip.training.config import TrainerConfig
from unclip.training.data import StreamBatchSampler, stream_loader
from unclip.training.trainer import NonFiniteLossError, Trainer, TrainResult, lr_at

__all__ = ["TrainerConfig", "Trainer", "TrainResult", "NonFiniteLossError", "StreamBatchSampler", "stream_loader", "lr_at"]
