"""Validation images during training: saved to `output_dir/validation/` and logged to the trackers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    SchedulerMixin,
)
from diffusers.utils import make_image_grid
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import DreamBoothConfig
from .safeguards import DreamBoothInputError

logger = logging.getLogger(__name__)

#: Schedulers that class, validation and sample images can be drawn with, by class name; "pipeline" keeps its own.
SAMPLING_SCHEDULERS = {
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
}


def is_flow_matching(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler` samples a flow-matching model: SD3's and Flux's `FlowMatchEulerDiscreteScheduler`, or a
    DPM-Solver++ already in its flow mode (`use_flow_sigmas`, `flow_prediction`, as Sana ships it)."""
    config = scheduler.config
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas"))
        or config.get("prediction_type") == "flow_prediction"
    )


class FlowDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++ in its flow mode that reads the pipeline's `mu` as the flow-matching scheduler it stands in for.

    `FluxPipeline` passes `mu` (its resolution-dependent shift) whatever the scheduler. The flow-matching scheduler
    shifts by `exp(mu)` (`time_shift_type="exponential"`, FLUX.1-dev) or `mu` (`"linear"`) when it has
    `use_dynamic_shifting`, and ignores `mu` for its fixed `shift` otherwise (FLUX.1-schnell); DPM-Solver++ itself
    accepts only the first and asserts on the others, so this does all three. `Lumina2Pipeline` passes its spacing of
    the flow-matching schedule as `sigmas` (`linspace(1, 1/n, n)`, which that scheduler shifts): only their number is
    taken, and DPM-Solver++ spaces the same shifted schedule its own way.
    """

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        if sigmas is not None:
            num_inference_steps = num_inference_steps or len(sigmas)
        if mu is not None and not self.config.use_dynamic_shifting:
            mu = None  # a fixed shift: `flow_shift` stays the model's `shift`
        elif mu is not None and self.config.time_shift_type == "linear":
            self.config.flow_shift, mu = float(mu), None
        super().set_timesteps(num_inference_steps, device=device, mu=mu, timesteps=timesteps)


def sampling_scheduler(name: str, scheduler: SchedulerMixin) -> SchedulerMixin:
    """The scheduler class `name`, configured from the pipeline's `scheduler`.

    A flow-matching model gets DPM-Solver++ in its flow mode with the model's timestep shift
    (`FlowDPMSolverMultistepScheduler`, which follows the pipeline's `mu` as the model's own scheduler does); DDPM and
    DDIM cannot sample it and raise.
    """
    if "EDM" in type(scheduler).__name__:  # Playground v2.5: DPM-Solver++ in its EDM form, as the model ships it
        if name != "DPMSolverMultistepScheduler":
            raise DreamBoothInputError(
                f"`{name}` cannot sample an EDM model (its scheduler is `{type(scheduler).__name__}`); pass"
                " `DPMSolverMultistepScheduler` or `pipeline` as `--validation_scheduler` or"
                " `--prior_generation_scheduler`."
            )
        return EDMDPMSolverMultistepScheduler.from_config(scheduler.config)
    if not is_flow_matching(scheduler):
        return SAMPLING_SCHEDULERS[name].from_config(scheduler.config)
    if name != "DPMSolverMultistepScheduler":
        raise DreamBoothInputError(
            f"`{name}` cannot sample a flow-matching model (its scheduler is `{type(scheduler).__name__}`); pass"
            " `DPMSolverMultistepScheduler` or `pipeline` as `--validation_scheduler`/`--prior_generation_scheduler`."
        )
    config = scheduler.config
    return FlowDPMSolverMultistepScheduler.from_config(
        config,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=config.get("shift", config.get("flow_shift", 1.0)),
    )


@contextlib.contextmanager
def swapped_scheduler(pipeline: DiffusionPipeline, name: str) -> Iterator[None]:
    """Sample with the scheduler class `name` (`sampling_scheduler`, or the pipeline's own) inside the block."""
    if name == "pipeline":
        yield
        return
    original = pipeline.scheduler
    pipeline.scheduler = sampling_scheduler(name, original)
    try:
        yield
    finally:
        pipeline.scheduler = original


@torch.no_grad()
def generate_images(
    pipeline: DiffusionPipeline, config: DreamBoothConfig, prompts: list[str], seed: int, **inputs: Any
) -> list[Image.Image]:
    """One image per prompt with the pipeline's scheduler, `--validation_inference_steps` and `--guidance_scale`;
    `inputs` go to the pipeline's call too (e.g. the image a super-resolution stage upscales), and override those two
    (Krea 2's `--validation_num_inference_steps` and `--validation_guidance_scale` on `--validation_model_path`).

    At most `--sample_batch_size` prompts go in one call (the evaluation's 32 class-prompt images would otherwise be
    one batch, 64 with guidance), all calls drawing from one generator seeded with `seed`: with a deterministic
    scheduler the images are those of one call with every prompt.
    """
    options = {"num_inference_steps": config.validation_inference_steps}
    if config.guidance_scale is not None:
        options["guidance_scale"] = config.guidance_scale
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    images = []
    with vae_slicing(getattr(pipeline, "vae", None)):
        for start in range(0, len(prompts), config.sample_batch_size):
            batch = prompts[start : start + config.sample_batch_size]
            images.extend(pipeline(prompt=batch, generator=generator, **{**options, **inputs}).images)
    return images


@contextlib.contextmanager
def vae_slicing(vae: torch.nn.Module | None) -> Iterator[None]:
    """Inside the block the VAE encodes and decodes one image at a time (its `use_slicing`), as diffusers' scripts
    draw validation images one by one and encode each training batch: at full resolution the VAE's activations are
    the largest part of the peak memory of sampling and of latent caching, and they grow with the batch (issue #21).
    The latents and images differ from a batched pass only by rounding."""
    if not hasattr(vae, "use_slicing"):
        yield
        return
    sliced, vae.use_slicing = vae.use_slicing, True
    try:
        yield
    finally:
        vae.use_slicing = sliced


def generate_validation_images(
    pipeline: DiffusionPipeline,
    config: DreamBoothConfig,
    seed: int,
    prompt: str | None = None,
    sampling_inputs: dict[str, Any] | None = None,
    num_images: int | None = None,
) -> list[Image.Image]:
    """`num_images` (default: `num_validation_images`) images of `prompt` (default: `validation_prompt`), validation
    scheduler, fixed seed.

    With `--validation_images` (a super-resolution stage), one image per file instead: that file upscaled, as
    diffusers' IF stage II script validates. `sampling_inputs` are the family's extra call arguments. A checkpoint of
    `--validation_model_path` (Krea 2 Turbo, distilled for its own few Euler steps) samples with its own scheduler, as
    diffusers' script samples it; `--validation_scheduler` is the trained model's.
    """
    prompt, inputs = prompt or config.validation_prompt, sampling_inputs or {}
    scheduler = "pipeline" if config.validation_model_path else config.validation_scheduler
    with swapped_scheduler(pipeline, scheduler):
        if not config.validation_images:
            count = config.num_validation_images if num_images is None else num_images
            return generate_images(pipeline, config, [prompt] * count, seed, **inputs)
        return [
            generate_images(pipeline, config, [prompt], seed, image=load_validation_image(path), **inputs)[0]
            for path in config.validation_images
        ]


def load_validation_image(path: str) -> Image.Image:
    """An RGB image from `--validation_images`, with a clear error naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise DreamBoothInputError(f"`--validation_images`: cannot read `{path}` as an image ({error}).") from error


#: A validation image's file name prefix when it shows the class prompt (`--num_validation_class_images`).
CLASS_IMAGE_PREFIX = "class-"


def run_validation(
    pipeline: DiffusionPipeline,
    config: DreamBoothConfig,
    step: int,
    seed: int,
    trackers: list,
    sampling_inputs: dict[str, Any] | None = None,
    prompt: str | None = None,
) -> list[Path]:
    """Generate validation images of `prompt` (default: `validation_prompt`), write them as
    `validation/step-{step}/{i}.png`, log them; return the paths.

    With `--num_validation_class_images`, images of the first subject's class prompt follow with the same seed, as
    `class-{i}.png` beside them (for the language-drift curve). Each PNG holds its prompt as the text `prompt`.
    """
    prompt = prompt or config.validation_prompt
    logger.info("Validation at step %d: images of %r", step, prompt)
    images = generate_validation_images(pipeline, config, seed, prompt=prompt, sampling_inputs=sampling_inputs)
    folder = Path(config.output_dir) / "validation" / f"step-{step}"
    paths = save_validation_images(images, prompt, folder)
    logged = {"validation": (images, prompt)}
    if config.num_validation_class_images:
        class_prompt = config.subject_data()[0].class_prompt
        class_images = generate_validation_images(
            pipeline, config, seed, class_prompt, sampling_inputs, num_images=config.num_validation_class_images
        )
        paths += save_validation_images(class_images, class_prompt, folder, CLASS_IMAGE_PREFIX)
        logged["validation_class"] = (class_images, class_prompt)
    log_validation_images(trackers, logged, step)
    return paths


def save_validation_images(images: list[Image.Image], prompt: str, folder: Path, prefix: str = "") -> list[Path]:
    """Write `images` as `folder/{prefix}{i}.png`, each with its prompt as PNG text, each whole or not at all (written
    aside, then renamed): the web app reads them, prompt included, while the run goes on."""
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("prompt", prompt)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"{prefix}{index}.png")
        partial = folder / f".{prefix}{index}.png.partial"
        image.save(partial, format="PNG", pnginfo=info)
        partial.replace(paths[-1])
    return paths


def log_validation_images(trackers: list, logged: dict[str, tuple[list[Image.Image], str]], step: int) -> None:
    """Each tag's images (and their prompt) to tensorboard or wandb, as diffusers' scripts log validation: one wandb
    log call for all tags, so they share a step."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            for tag, (images, _) in logged.items():
                stacked = np.stack([np.asarray(image) for image in images])
                tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    tag: [wandb.Image(image, caption=prompt) for image in images]
                    for tag, (images, prompt) in logged.items()
                }
            )


def image_grid(rows: list[list[Image.Image]], min_cell_size: int = 128) -> Image.Image:
    """One image of `rows` (same-sized images), small images scaled up (nearest) so that the grid is legible."""
    images = [image for row in rows for image in row]
    width, height = images[0].size
    scale = max(1, -(-min_cell_size // width))
    if scale > 1:
        images = [image.resize((width * scale, height * scale), Image.Resampling.NEAREST) for image in images]
    return make_image_grid(images, rows=len(rows), cols=len(rows[0]))
