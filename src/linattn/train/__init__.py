"""Training: tasks on real or standard data, a DDP-ready loop, comparison runs."""

from .config import TrainConfig
from .loop import read_metrics, train
from .tasks import TASKS, ByteLM, Fortunes, ListOps, build_task

__all__ = [
    "TASKS",
    "ByteLM",
    "Fortunes",
    "ListOps",
    "TrainConfig",
    "build_task",
    "read_metrics",
    "train",
]
