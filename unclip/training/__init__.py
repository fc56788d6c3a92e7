"""One accelerate-based training loop for every stage."""

from unclip.training.config import TrainerConfig
from unclip.training.data import DataStream, StreamBatchSampler, stream_loader
from unclip.training.optim import lr_at
from unclip.training.trainer import NonFiniteLossError, NonFiniteWeightsError, Trainer, TrainResult

__all__ = ["TrainerConfig", "Trainer", "TrainResult", "NonFiniteLossError", "NonFiniteWeightsError", "DataStream",
           "StreamBatchSampler", "stream_loader", "lr_at"]
