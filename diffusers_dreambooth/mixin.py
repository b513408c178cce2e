"""`DreamBoothTrainingMixin`: DreamBooth training as a method of a diffusers pipeline."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from diffusers import DiffusionPipeline

from .config import DreamBoothConfig
from .pipeline_loading import diffusers_pipeline_class
from .trainer import DreamBoothTrainer


def train_dreambooth(
    pipeline: DiffusionPipeline, config: DreamBoothConfig | None = None, **options: Any
) -> DreamBoothTrainer:
    """Train a subject into an already loaded `pipeline`, in place; return the finished trainer.

    Options are `DreamBoothConfig` fields; given with `config`, they override its values.

    Example:

    ```python
    >>> from diffusers import StableDiffusionPipeline
    >>> from diffusers_dreambooth import train_dreambooth

    >>> pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> train_dreambooth(pipe, instance_data_dir="dog", instance_prompt="a photo of sks dog", output_dir="sks-dog")
    >>> image = pipe("a photo of sks dog in a bucket").images[0]
    ```
    """
    if config is None:
        config = DreamBoothConfig(**options)
    elif options:
        config = dataclasses.replace(config, **options)
    trainer = DreamBoothTrainer(config, pipeline=pipeline)
    trainer.train()
    return trainer


class DreamBoothTrainingMixin:
    """Gives a diffusers pipeline class a `train_dreambooth` method.

    Mix it in before the pipeline class. What the subclass saves still names the diffusers class in
    `model_index.json`, so plain `DiffusionPipeline.from_pretrained` loads it.

    Example:

    ```python
    >>> from diffusers import StableDiffusionXLPipeline
    >>> from diffusers_dreambooth import DreamBoothTrainingMixin

    >>> class DreamBoothSDXLPipeline(DreamBoothTrainingMixin, StableDiffusionXLPipeline):
    ...     pass

    >>> pipe = DreamBoothSDXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    >>> pipe.train_dreambooth(instance_data_dir="dog", instance_prompt="a photo of sks dog", adapter="lora")
    ```
    """

    def train_dreambooth(self, config: DreamBoothConfig | None = None, **options: Any) -> DreamBoothTrainer:
        """Train a subject into this pipeline in place; see `train_dreambooth`."""
        return train_dreambooth(self, config, **options)

    def to_json_string(self) -> str:
        """The pipeline config with `_class_name` set to the diffusers class this pipeline extends."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = diffusers_pipeline_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
