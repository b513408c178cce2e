"""The frozen modules that no training step runs once the caches are built, and where they wait meanwhile.

On a GPU, the VAE (when every image's latents are cached) and frozen text encoders (their embeddings are cached) move
to the CPU, so their memory goes to training. Frozen text encoders leave memory altogether where that frees more
(`releases_text_encoders`): a family's LLM encoders on any device (`releases_frozen_text_encoders`: Flux.2 [dev]'s
Mistral 3 alone holds 24B parameters), and every family's when training runs off a GPU, where moving to the CPU frees
nothing. A released encoder is loaded again from the base model only while sampling needs it: at each validation, and
for the final save and finishing stages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)


def offloading_frees_memory(device: torch.device) -> bool:
    """Whether moving an idle module from `device` to the CPU frees memory: only from a GPU's own memory."""
    return device.type == "cuda"


def releases_text_encoders(family: type, device: torch.device) -> bool:
    """Whether a run on `device` releases the frozen text encoders of `family` (a `DreamBoothFamily` class) rather
    than keeping them: always for LLM encoders, and off a GPU for every encoder. On the CPU a released CLIP costs a
    read of its safetensors for each sampling (from the page cache after the first) and takes its weights off the
    loop's peak (issue #21); on a GPU, CLIP waiting on the CPU costs no reload."""
    return family.releases_frozen_text_encoders or not offloading_frees_memory(device)


class IdleModules:
    """Sets aside `offloaded` modules (to the CPU, on a GPU only) and `released` pipeline components (dropped, then
    rebuilt by `reload(name, dtype)`) between the moments sampling needs them."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        device: torch.device,
        offloaded: list[torch.nn.Module],
        released: list[str],
        reload: Callable[[str, torch.dtype], torch.nn.Module],
    ) -> None:
        self.pipeline, self.device, self.reload = pipeline, device, reload
        # A released component is not offloaded as well: moved to the CPU first and held in this list, it would stay
        # in memory after its release, and come back to the device beside its reloaded copy.
        released_modules = [getattr(pipeline, name) for name in released]
        kept = [module for module in offloaded if not any(module is other for other in released_modules)]
        self.offloaded = kept if offloading_frees_memory(device) else []
        self.released = {name: getattr(pipeline, name).dtype for name in released}
        self.away = False

    def set_aside(self) -> None:
        """Move the offloaded modules to the CPU and drop the released components from memory."""
        for module in self.offloaded:
            module.to("cpu")
        if self.released:
            logger.info("Dropping %s from memory until sampling needs them.", ", ".join(self.released))
            self.pipeline.register_modules(**dict.fromkeys(self.released))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.away = True

    def restore(self) -> None:
        """Bring everything back on the training device, the released components loaded again."""
        if not self.away:
            return
        for module in self.offloaded:
            module.to(self.device)
        for name, dtype in self.released.items():
            self.pipeline.register_modules(**{name: self.reload(name, dtype).to(self.device).requires_grad_(False)})
        self.away = False

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """Everything back for the duration of the block (sampling), then set aside again."""
        self.restore()
        try:
            yield
        finally:
            self.set_aside()
