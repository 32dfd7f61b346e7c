"""Training: AdamW with SSM parameter groups, warmup + cosine, a trainer with atomic checkpoints,
data parallelism, byte-level text data, and the papers' experiments (``ssmkit reproduce``)."""

from ssmkit.training.checkpoint import load_checkpoint, load_latest, save_checkpoint  # noqa: F401
from ssmkit.training.data import ByteCorpus  # noqa: F401
from ssmkit.training.optim import build_optimizer, param_groups  # noqa: F401
from ssmkit.training.schedule import build_scheduler, lr_factor  # noqa: F401
from ssmkit.training.trainer import TrainConfig, Trainer  # noqa: F401
