"""DreamBooth (Ruiz et al., CVPR 2023) for Hugging Face diffusers: one trainer for every model family."""

from . import quiet_imports  # noqa: F401 (first: filters what optional packages log when diffusers imports them)

# isort: split
from .config import DreamBoothConfig
from .families import FAMILIES, DreamBoothFamily, family_for_pipeline
from .losses import dreambooth_loss
from .mixin import DreamBoothTrainingMixin, train_dreambooth
from .pipeline import DreamBoothPipeline
from .safeguards import DreamBoothInputError
from .subject import Subject, SubjectMetadata
from .trainer import DreamBoothTrainer

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Subject",
    "SubjectMetadata",
    "DreamBoothConfig",
    "DreamBoothFamily",
    "DreamBoothInputError",
    "DreamBoothPipeline",
    "DreamBoothTrainer",
    "DreamBoothTrainingMixin",
    "dreambooth_loss",
    "family_for_pipeline",
    "train_dreambooth",
]
