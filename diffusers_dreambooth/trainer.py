"""`DreamBoothTrainer`: the one training loop, for every supported family and for full or LoRA training.

Randomness is a pure function of (seed, step): each micro-step draws its noise, timesteps, latent samples and crops
from its own seeded generator, for the whole global batch, and each process takes its slice. So a run resumed from a
checkpoint, or spread over more processes, computes the same steps as one unbroken single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, ProjectConfiguration
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from tqdm.auto import tqdm

from . import checkpoints
from .config import CONFIG_NAME, DreamBoothConfig, concept_has_placeholder
from .data import (
    BucketedTrainingOrder,
    SubjectImages,
    TrainingImage,
    TrainingOrder,
    aspect_ratio_buckets,
    crop_and_flip,
    has_fixed_crop,
    load_folder_images,
    load_subject_photos,
    mix_seed,
    step_generator,
)
from .ema import EMA_STATE_NAME, load_ema_state, make_ema, save_ema_state
from .families import ImageConditioning, family_for_pipeline
from .finishing import FinishingJob, finish_subject
from .identifiers import AUTO_IDENTIFIER, rare_token_identifiers
from .idle_modules import IdleModules, releases_text_encoders
from .input_checks import check_before_loading, check_bucket_sizes, check_inputs, check_resolution
from .kohya import export_kohya_lora
from .lora import load_lora_checkpoint
from .losses import DreamBoothLoss, dreambooth_loss
from .optimization import free_memory, make_optimizer, release_optimizer_state
from .pipeline_loading import diffusers_pipeline_class, load_base_component, load_base_pipeline
from .pivotal import TEXTUAL_INVERSION_WEIGHT_NAME, TokenEmbeddings, new_token_names
from .prior import generate_class_images, missing_class_images
from .progress import trackers_for
from .quantization import cast_frozen_base, quantize_base, quantize_component
from .safeguards import (
    DreamBoothInputError,
    NonFiniteLossError,
    StopRequest,
    TrainingInterrupted,
    check_free_space,
    stop_requests,
)
from .subject import SUBJECT_FILE_NAME, Subject, SubjectMetadata, fill_subject
from .text_encoder_sharding import shard_text_encoders
from .validation import run_validation, vae_slicing

logger = logging.getLogger(__name__)

MIXED_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LatentCache:
    """VAE posterior (mean, std) per image, for images whose crop is the same every step; None elsewhere."""

    mean: list[torch.Tensor | None]
    std: list[torch.Tensor | None]


class DreamBoothTrainer:
    """Trains a subject into a diffusers pipeline (DreamBooth, Ruiz et al., CVPR 2023).

    Args:
        config (`DreamBoothConfig`): the run's options.
        pipeline (`DiffusionPipeline`, *optional*): an already loaded base pipeline; trained in place. When omitted
            it is loaded from `config.pretrained_model_name_or_path`.

    Example:

    ```python
    >>> from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer

    >>> config = DreamBoothConfig(pretrained_model_name_or_path="...", instance_data_dir="dog",
    ...                           instance_prompt="a photo of sks dog", adapter="lora", max_train_steps=400)
    >>> pipeline = DreamBoothTrainer(config).train()
    >>> image = pipeline("a photo of sks dog on the moon").images[0]
    ```
    """

    def __init__(self, config: DreamBoothConfig, pipeline: DiffusionPipeline | None = None) -> None:
        self.config = config
        self.pipeline = pipeline
        self.global_step = 0
        self.last_checkpoint: Path | None = None  # and the step it holds, so a stop does not save the same step twice
        self.last_checkpoint_step: int | None = None

    # Set-up

    def train(self) -> DiffusionPipeline:
        """Run the whole job: class images, caches, the loop, checkpoints, validation, final save."""
        config = self.config
        check_before_loading(config, pipeline_given=self.pipeline is not None)  # bad paths fail before any loading
        self.accelerator = accelerator = self._make_accelerator()
        resume_dir = checkpoints.resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
        self.seed = checkpoints.run_seed(config.seed, resume_dir)
        loaded_base = self.pipeline is None
        if loaded_base:
            self.pipeline = load_base_pipeline(config)
        self.pipeline.to(accelerator.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.family = family_for_pipeline(self.pipeline)
        self.config = config = config.with_defaults(self.family.option_defaults[config.adapter])
        self.family.configure(config)
        self.config = config = self._resolve_identifier(config)
        self.subject_data = config.subject_data()  # identifiers filled in
        self._check_resolution()
        self.buckets = self._aspect_ratio_buckets()
        check_inputs(config, self.family)

        if self.prior_from_images:
            self._generate_class_images()
        self.family.sample_as_trained()
        self._load_images()
        self._set_up_trainable_modules()
        shard_text_encoders(config, self.family, accelerator)  # `--fsdp_text_encoder`: dropped after the caches
        self._build_caches()
        self._set_aside_idle_modules(loaded_base)
        free_memory()  # the caching's activations
        self._set_up_optimization()
        if resume_dir is not None:
            self._resume(resume_dir)
        self._run_loop()
        self._save_final()
        accelerator.end_training()
        return self.pipeline

    def _resolve_identifier(self, config: DreamBoothConfig) -> DreamBoothConfig:
        """Fill `{identifier}` in the prompts; `--identifier auto` picks the rarest token of the model's tokenizers."""
        self.identifier_source = None
        if config.train_text_encoder_ti:  # pivotal tuning: the new tokens, added to the tokenizers before training
            if not self.family.textual_inversion_keys:
                raise DreamBoothInputError(
                    "`--train_text_encoder_ti` (pivotal tuning) supports Stable Diffusion 1.x/2.x and SDXL, whose CLIP"
                    f" text encoders diffusers' `load_textual_inversion` extends; not {self.family.name} (T5 encoders"
                    " are not supported). Remove it, or name the subject with `--identifier` instead."
                )
            self.identifier_source = "new tokens (pivotal tuning)"
            return config.with_identifier("".join(new_token_names(config.num_new_tokens_per_abstraction)))
        if config.has_concepts:
            return self._resolve_concept_identifiers(config)
        if config.identifier is None:
            return config
        identifier, self.identifier_source = config.identifier, "given"
        if identifier == AUTO_IDENTIFIER:
            identifier = rare_token_identifiers(self.pipeline, count=1, exclude=config.prompt_vocabulary())[0]
            self.identifier_source = "rare token (auto)"
            logger.info("`--identifier auto` picked the rare token `%s` of the base model's tokenizers.", identifier)
        return config.with_identifier(identifier)

    def _resolve_concept_identifiers(self, config: DreamBoothConfig) -> DreamBoothConfig:
        """`--concepts_list`: each subject's identifier is its entry's, or with `auto` (the entry's or
        `--identifier auto`) a rare token of its own, the rarest to the first such subject; all must differ."""
        wanted = [
            concept["identifier"] or (config.identifier if concept_has_placeholder(concept) else None)
            for concept in config.concepts_list
        ]
        auto = [index for index, identifier in enumerate(wanted) if identifier == AUTO_IDENTIFIER]
        sources = [
            "rare token (auto)" if index in auto else "given" if identifier else "from the prompt"
            for index, identifier in enumerate(wanted)
        ]
        if auto:
            taken = [identifier for identifier in wanted if identifier not in (None, AUTO_IDENTIFIER)]
            exclude = [*config.prompt_vocabulary(), *taken]
            tokens = rare_token_identifiers(self.pipeline, count=len(auto), exclude=exclude)
            if len(tokens) < len(auto):
                raise DreamBoothInputError(
                    f"`--identifier auto` found {len(tokens)} rare tokens for {len(auto)} subjects; set `identifier`"
                    " in the entries of `--concepts_list` that need one."
                )
            for index, token in zip(auto, tokens):
                wanted[index] = token
                logger.info(
                    "`--identifier auto` picked the rare token `%s` for `--concepts_list` entry %d (%r).",
                    token,
                    index,
                    config.concepts_list[index]["instance_prompt"],
                )
        config = config.with_concept_identifiers(wanted)
        identifiers = [subject.identifier for subject in self._subjects(config)]
        if any(identifier is not None for identifier in wanted):  # how each subject's identifier was chosen
            if len(set(sources)) == 1:
                self.identifier_source = sources[0]
            else:
                self.identifier_source = ", ".join(f"{i}: {source}" for i, source in zip(identifiers, sources))
        repeated = sorted({identifier for identifier in identifiers if identifiers.count(identifier) > 1})
        if repeated:
            raise DreamBoothInputError(
                f"Several subjects of `--concepts_list` have the identifier {', '.join(map(repr, repeated))}; each"
                " subject needs its own, or they train into one. Give each entry a different identifier word."
            )
        return config

    def _subjects(self, config: DreamBoothConfig) -> list[Subject]:
        """Identifier, class noun and prompts of each subject, read from its prompts."""
        subjects = []
        for index, data in enumerate(config.subject_data()):
            instance_prompt = data.instance_prompt
            if instance_prompt is None:  # `--dataset_name` with `--caption_column`: the first caption names it
                instance_prompt = self.subject_photos[index][0].prompt
            subjects.append(Subject.from_prompts(instance_prompt, data.class_prompt, identifier=data.identifier))
        return subjects

    def _class_image_sets(self) -> list[tuple[str, str]]:
        """The distinct `(class_data_dir, class_prompt)` of the subjects, in order; subjects may share one."""
        sets = {}
        for data in self.subject_data:
            sets.setdefault(os.path.normpath(data.class_data_dir), (data.class_data_dir, data.class_prompt))
        return list(sets.values())

    def _generate_class_images(self) -> None:
        """Top up each class folder with the frozen model, every process listing it before any of them writes."""
        for index, (class_data_dir, class_prompt) in enumerate(self._class_image_sets()):
            # The first folder keeps the run's seed (a one-subject run's images); others get a seed of their own.
            seed = self.seed if index == 0 else mix_seed(self.seed, index, salt=5)
            self._generate_class_folder(class_data_dir, class_prompt, seed)

    def _generate_class_folder(self, class_data_dir: str, class_prompt: str, seed: int) -> None:
        config, accelerator = self.config, self.accelerator
        missing = missing_class_images(class_data_dir, config.num_class_images)
        if missing and not self.family.generates_from_prompt:
            raise DreamBoothInputError(
                f"`--class_data_dir={class_data_dir}` holds fewer than `--num_class_images="
                f"{config.num_class_images}` images, and `{type(self.pipeline).__name__}` cannot generate them from"
                " `--class_prompt` alone (it needs an input image). Put class images at `--resolution` there: for a"
                " super-resolution stage, the class images the cascade generated, or real photos of the class."
            )
        if missing and accelerator.is_main_process:
            # An 8-bit RGB PNG is at most about its raw size.
            check_free_space(class_data_dir, len(missing) * 3 * config.resolution**2, "the class images")
        accelerator.wait_for_everyone()
        generate_class_images(
            self.pipeline,
            class_prompt,
            class_data_dir,
            config.num_class_images,
            batch_size=config.sample_batch_size,
            seed=seed,
            num_inference_steps=config.prior_generation_steps,
            precision=config.prior_generation_precision,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            missing=missing,
            guidance_scale=config.guidance_scale,
            scheduler=config.prior_generation_scheduler,
            sampling_inputs=self.family.sampling_inputs(),
        )
        accelerator.wait_for_everyone()

    def _make_accelerator(self) -> Accelerator:
        config, output_dir = self.config, Path(self.config.output_dir)
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            kwargs_handlers=[AutocastKwargs(enabled=not config.disable_training_autocast)],  # Ideogram 4's option
            log_with=trackers_for(config, output_dir / config.logging_dir),
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
            ),
        )
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        return accelerator

    def _check_resolution(self) -> None:
        check_resolution(self.config.resolution, self.family.resolution_multiple)

    def _aspect_ratio_buckets(self) -> list[tuple[int, int]] | None:
        """The bucket sizes of `--aspect_ratio_buckets`: its explicit list, or given alone those computed from
        `--resolution` (`data.aspect_ratio_buckets`); None without it.

        The step defaults to `resolution / 16` rounded to the family's `resolution_multiple` (64 pixels at 1024, the
        step of SDXL's training sizes), so that latents stay divisible by most of the denoiser's downsampling.
        """
        config, family = self.config, self.family
        if not config.aspect_ratio_buckets:
            return None
        if not family.supports_aspect_ratio_buckets:
            raise DreamBoothInputError(
                f"`--aspect_ratio_buckets` is not supported for {family.name}: it trains at square sizes only."
                " Remove the option; images are then resized and cropped to `--resolution` squares."
            )
        multiple = family.resolution_multiple
        buckets = config.bucket_sizes
        if buckets is not None:
            check_bucket_sizes(buckets, multiple)
        else:
            step = config.bucket_step or max(multiple, config.resolution // 16 // multiple * multiple)
            if step % multiple or config.resolution % step:
                raise DreamBoothInputError(
                    f"`--bucket_step={step}` must be a multiple of {multiple} (this model's `resolution_multiple`)"
                    f" that divides `--resolution={config.resolution}`; try {multiple}."
                )
            buckets = aspect_ratio_buckets(config.resolution, step, config.bucket_max_aspect_ratio)
        for height, width in buckets:
            family.check_sample_size(height, width)
        logger.info("Aspect-ratio buckets (height x width): %s", ", ".join(f"{h}x{w}" for h, w in buckets))
        return buckets

    def _load_images(self) -> None:
        """Every subject's photos (repeated `--repeats` times) and class images, in two lists, and their order."""
        config, buckets = self.config, self.buckets
        size, mode = config.resolution, config.image_interpolation_mode
        self.subject_photos: list[list[TrainingImage]] = []
        self.instance_images: list[TrainingImage] = []
        self.class_images: list[TrainingImage] = []
        class_slices: dict[str, tuple[int, int]] = {}
        slices = []
        for index, data in enumerate(self.subject_data):
            photos = load_subject_photos(config, data, buckets)
            for image in photos:
                image.subject = index
            self.subject_photos.append(photos)
            start = len(self.instance_images)
            self.instance_images += photos * config.repeats
            class_start, num_class = 0, 1
            if self.prior_from_images:
                folder = os.path.normpath(data.class_data_dir)
                if folder not in class_slices:
                    images = load_folder_images(
                        data.class_data_dir,
                        data.class_prompt,
                        size,
                        mode,
                        limit=config.num_class_images,
                        buckets=buckets,
                    )
                    class_slices[folder] = (len(self.class_images), len(images))
                    self.class_images += images
                class_start, num_class = class_slices[folder]
            slices.append(SubjectImages(start, len(photos) * config.repeats, class_start, num_class))
        if buckets is None:
            self.order = TrainingOrder.for_subjects(slices, self.seed)
        else:  # batches of one bucket, drawn from all subjects' photos together
            self.order = BucketedTrainingOrder(
                [image.bucket for image in self.instance_images],
                [image.bucket for image in self.class_images],
                config.train_batch_size * self.accelerator.num_processes,
                self.seed,
            )

    def _set_up_trainable_modules(self) -> None:
        """Freeze everything, then unfreeze the denoiser (and text encoders) or add LoRA adapters to them."""
        config, family = self.config, self.family
        for module in self.pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        quantize_base(self.pipeline, family, config, self.mixed_precision_dtype)
        self.trained = {family.denoiser_name: family.denoiser}
        # `--prior_preservation_mode model` needs the base denoiser's predictions: LoRA turns its adapters off for
        # them; a full fine-tune keeps a frozen copy (one more denoiser's weights in memory, no gradients).
        self.frozen_denoiser = None
        if self.prior_from_model and config.adapter == "full":
            self.frozen_denoiser = copy.deepcopy(family.denoiser).eval()
        if config.train_text_encoder:
            names = family.trained_text_encoder_names(config.adapter)
            self.trained.update((name, getattr(self.pipeline, name)) for name in names)
        self.token_embeddings = None
        if config.train_text_encoder_ti:
            self.token_embeddings = TokenEmbeddings(
                dict(zip(family.text_encoder_names, family.text_encoders)),
                family.tokenizers,
                list(family.textual_inversion_keys),
                new_token_names(config.num_new_tokens_per_abstraction),
                torch.Generator().manual_seed(self.seed),
            )
        if config.adapter == "lora":
            self._add_lora_adapters()
        else:
            for name, module in self.trained.items():
                if module.dtype != torch.float32:
                    raise DreamBoothInputError(
                        f"Full fine-tuning needs float32 weights, but the pipeline's `{name}` is {module.dtype}"
                        " (mixed precision keeps float32 master weights). Load the pipeline with"
                        " `torch_dtype=torch.float32`, or train `--adapter lora`."
                    )
                module.requires_grad_(True)
        if config.gradient_checkpointing:
            for name, module in self.trained.items():
                if name == family.denoiser_name:
                    module.enable_gradient_checkpointing()
                else:
                    module.gradient_checkpointing_enable()
        if config.enable_xformers_memory_efficient_attention:
            family.denoiser.enable_xformers_memory_efficient_attention()
        for module in self.trained.values():
            module.train()

    def _add_lora_adapters(self) -> None:
        """PEFT adapters in float32 on a frozen base kept in its own dtype, or in the mixed-precision dtype if set."""
        config, family = self.config, self.family
        targets = family.denoiser_lora_targets(config)
        cast_to = self.mixed_precision_dtype
        device = self.accelerator.device
        # The adapters' random initial weights come from the seed alone, not from whatever drew from torch's global
        # generator before (class-image generation, say): same seed, same adapters, in any process and any rerun.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(mix_seed(self.seed, salt=4))
            for name, module in self.trained.items():
                is_denoiser = name == family.denoiser_name
                cast_frozen_base(module, cast_to)  # a quantized base keeps its weights
                module.add_adapter(
                    LoraConfig(
                        r=config.rank,
                        lora_alpha=config.lora_scale_alpha,
                        lora_dropout=config.lora_dropout,
                        init_lora_weights="gaussian",
                        target_modules=list(targets if is_denoiser else family.text_encoder_lora_target_modules),
                        use_dora=config.use_dora,
                    )
                )
        cast_training_params(list(self.trained.values()), dtype=torch.float32)

    @property
    def mixed_precision_dtype(self) -> torch.dtype | None:
        """The dtype of `--mixed_precision` as accelerate runs it (None without mixed precision)."""
        return MIXED_PRECISION_DTYPES.get(self.accelerator.mixed_precision)

    @property
    def prior_from_images(self) -> bool:
        """The paper's prior-preservation loss, on generated class images (`--prior_preservation_mode images`)."""
        return self.config.with_prior_preservation and self.config.prior_preservation_mode == "images"

    @property
    def prior_from_model(self) -> bool:
        """Prior preservation against the frozen base model's prediction (`--prior_preservation_mode model`)."""
        return self.config.with_prior_preservation and self.config.prior_preservation_mode == "model"

    @property
    def text_encoders_frozen(self) -> bool:
        return not (self.config.train_text_encoder or self.config.train_text_encoder_ti)

    # Caches

    @torch.no_grad()
    def _build_caches(self) -> None:
        """Token ids of every prompt; text embeddings when encoders are frozen; latents of fixed crops."""
        family, config = self.family, self.config
        prompts = {image.prompt for image in self.instance_images + self.class_images}
        class_prompts = sorted({data.class_prompt for data in self.subject_data}) if self.prior_from_model else []
        prompts.update(class_prompts)
        prompts = sorted(prompts)
        token_ids = family.tokenize(prompts, config.tokenizer_max_length)
        self.prompt_tokens = {p: [ids[i] for ids in token_ids] for i, p in enumerate(prompts)}
        self.prompt_embeds = None
        if self.text_encoders_frozen:
            embeds = family.encode_frozen_prompts(prompts, config.tokenizer_max_length)
            self.prompt_embeds = {p: {k: v[i].float() for k, v in embeds.items()} for i, p in enumerate(prompts)}
        if self.prior_from_model:  # the base model's conditioning: encoded before any step changes the encoders
            embeds = family.encode_frozen_prompts(class_prompts, config.tokenizer_max_length)
            self.base_class_embeds = {
                p: {k: v[i : i + 1].float() for k, v in embeds.items()} for i, p in enumerate(class_prompts)
            }
        self.instance_latents = self._cache_latents(self.instance_images)
        self.class_latents = self._cache_latents(self.class_images)

    def _set_aside_idle_modules(self, loaded_base: bool) -> None:
        """Set aside the modules no training step runs (`IdleModules`), until sampling needs them. Frozen text
        encoders are released (`releases_text_encoders`) only from a base the trainer loaded itself, which it can load
        again."""
        family, device = self.family, self.accelerator.device
        releases = loaded_base and self.text_encoders_frozen and releases_text_encoders(type(family), device)
        loaded = [name for name in family.text_encoder_names if getattr(self.pipeline, name) is not None]
        released = loaded if releases else []
        offloaded = self.modules_idle_during_training()
        self.idle = IdleModules(self.pipeline, device, offloaded, released, self._reload_component)
        self.idle.set_aside()

    def _reload_component(self, name: str, dtype: torch.dtype) -> torch.nn.Module:
        """A released base component loaded again, and quantized as the run quantizes it."""
        module = load_base_component(self.config, name, dtype)
        quantize_component(module, name, type(self.family), self.config, self.mixed_precision_dtype)
        return module

    def modules_idle_during_training(self) -> list[torch.nn.Module]:
        """The frozen modules no training step runs once the caches are built: the VAE when every image's latents
        are cached, the text encoders when they are frozen (their embeddings are cached)."""
        idle = []
        caches = (self.instance_latents, self.class_latents)
        if self.family.vae is not None and all(mean is not None for cache in caches for mean in cache.mean):
            idle.append(self.family.vae)
        if self.text_encoders_frozen:
            idle += [encoder for encoder in self.family.text_encoders if encoder is not None]
        return idle

    def _cache_latents(self, images: list[TrainingImage]) -> LatentCache:
        """Latents of the images with a fixed crop, in batches of one crop size (one per bucket), the VAE encoding one
        image at a time (`vae_slicing`)."""
        config = self.config
        fixed = [has_fixed_crop(im, config.resolution, config.center_crop, config.random_flip) for im in images]
        cache = LatentCache([None] * len(images), [None] * len(images))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, is_fixed in enumerate(fixed):
            if is_fixed:
                by_size.setdefault(images[i].crop_size(config.resolution), []).append(i)
        with vae_slicing(self.family.vae):
            for todo in by_size.values():
                for start in range(0, len(todo), config.sample_batch_size):
                    chunk = todo[start : start + config.sample_batch_size]
                    pixels = torch.stack([self._pixels(images[i], None)[0] for i in chunk])
                    mean, std = self.family.encode_image_distribution(pixels)
                    for j, i in enumerate(chunk):
                        cache.mean[i], cache.std[i] = mean[j], std[j]
        return cache

    def _pixels(self, image: TrainingImage, generator: torch.Generator | None) -> tuple[torch.Tensor, tuple]:
        config = self.config
        return crop_and_flip(image, config.resolution, config.center_crop, config.random_flip, generator)

    # Optimization

    def _set_up_optimization(self) -> None:
        config, accelerator = self.config, self.accelerator
        self.global_batch_size = config.train_batch_size * accelerator.num_processes
        self.max_train_steps = config.steps_for(self.order.length, accelerator.num_processes)
        self.steps_per_epoch = math.ceil(
            self.order.length / (self.global_batch_size * config.gradient_accumulation_steps)
        )
        learning_rate = config.learning_rate
        if config.scale_lr:
            learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
        param_groups = []
        for name, module in self.trained.items():
            is_denoiser = name == self.family.denoiser_name
            param_groups.append(
                {
                    "params": [p for p in module.parameters() if p.requires_grad],
                    "lr": learning_rate if is_denoiser else (config.text_encoder_lr or learning_rate),
                    "weight_decay": config.adam_weight_decay if is_denoiser else config.adam_weight_decay_text_encoder,
                }
            )
        if self.token_embeddings is not None:  # diffusers' advanced script: the text encoder's rate and decay
            param_groups.append(
                {
                    "params": list(self.token_embeddings.weights),
                    "lr": config.text_encoder_lr or learning_rate,
                    "weight_decay": config.adam_weight_decay_text_encoder,
                }
            )
        optimizer = make_optimizer(config, param_groups, learning_rate)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_train_steps * accelerator.num_processes,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
        names = list(self.trained)
        prepared = accelerator.prepare(*self.trained.values(), optimizer, lr_scheduler)
        self.prepared = dict(zip(names, prepared[: len(names)]))
        self.optimizer, self.lr_scheduler = prepared[len(names) :]
        # The EMA averages the trained modules; pivotal-tuning embeddings are clipped with them but not averaged.
        self.clipped_parameters = [p for group in param_groups for p in group["params"]]
        self.trained_parameters = [p for group in param_groups[: len(self.trained)] for p in group["params"]]
        self.trained_parameter_names = [
            f"{name}.{key}"
            for name, module in self.trained.items()
            for key, p in module.named_parameters()
            if p.requires_grad
        ]
        self.ema = make_ema(self.trained_parameters, config.ema_decay) if config.use_ema else None
        # The frozen base's dtype for LoRA (bf16, say), float32 for full fine-tuning; the denoiser's inputs follow it.
        self.input_dtype = self.family.denoiser.dtype
        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)

    def _component_name(self, model: torch.nn.Module) -> str:
        model = self.accelerator.unwrap_model(model)
        for name, module in self.trained.items():
            if module is model:
                return name
        raise ValueError(f"Unexpected model of type {type(model).__name__} in the accelerate state.")

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Write trained modules as diffusers' scripts do (`unet/` folders, or the LoRA file), not as raw state."""
        if not self.accelerator.is_main_process:
            return
        modules = {self._component_name(model): self.accelerator.unwrap_model(model) for model in models}
        if self.config.adapter == "lora":
            self.family.save_lora_weights(output_dir, modules)
        else:
            for name, module in modules.items():
                module.save_pretrained(os.path.join(output_dir, name))
        if self.token_embeddings is not None:
            self.token_embeddings.save(output_dir)
        weights.clear()

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        modules = {self._component_name(model): self.accelerator.unwrap_model(model) for model in models}
        models.clear()
        if self.token_embeddings is not None:
            self.token_embeddings.load(input_dir)
        if self.config.adapter == "lora":
            load_lora_checkpoint(input_dir, modules)
            return
        for name, module in modules.items():
            loaded = type(module).from_pretrained(input_dir, subfolder=name)
            module.load_state_dict(loaded.state_dict())
            del loaded

    def _resume(self, checkpoint: Path) -> None:
        logger.info("Resuming from %s", checkpoint)
        self.accelerator.load_state(str(checkpoint))
        self.global_step = checkpoints.read_trainer_state(checkpoint)["global_step"]
        if self.ema is None:
            return
        if (checkpoint / EMA_STATE_NAME).is_file():
            load_ema_state(self.ema, self.trained_parameter_names, checkpoint)
        else:
            logger.warning(
                "%s has no EMA state (it was saved without `--use_ema`); the average starts from its weights.",
                checkpoint,
            )
            self.ema = make_ema(self.trained_parameters, self.config.ema_decay)

    # The loop

    def _run_loop(self) -> None:
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            accelerator.init_trackers("dreambooth", config=_tracker_config(config))
        validation_every = config.validation_steps
        if config.validation_epochs is not None:
            validation_every = config.validation_epochs * self.steps_per_epoch
        progress = tqdm(
            total=self.max_train_steps,
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        with stop_requests() as stop:
            while self.global_step < self.max_train_steps:
                logs = self._optimizer_step()
                self.global_step += 1
                progress.update(1)
                progress.set_postfix(**logs)
                accelerator.log(logs, step=self.global_step)
                if self.global_step % config.checkpointing_steps == 0:
                    self.save_checkpoint()
                if config.validation_prompt and self.global_step % validation_every == 0:
                    self._validate()
                if self._stop_requested(stop):
                    progress.close()
                    self._stop(stop)
        progress.close()

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any process got a stop signal; with several processes, all of them agree on the step."""
        if self.accelerator.num_processes == 1:
            return bool(stop)
        if stop:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def _stop(self, stop: StopRequest) -> None:
        """Save a checkpoint of the finished step (unless one was just saved), then raise `TrainingInterrupted`."""
        checkpoint = self.last_checkpoint if self.last_checkpoint_step == self.global_step else self.save_checkpoint()
        self.accelerator.end_training()
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.global_step, checkpoint)

    def _optimizer_step(self) -> dict[str, float]:
        """One optimizer step: `gradient_accumulation_steps` micro-batches, then the update."""
        config, accelerator = self.config, self.accelerator
        trained = list(self.prepared.values())
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(*trained):
                micro_step = self.global_step * config.gradient_accumulation_steps + micro
                halves = self._backward_passes()
                parts = []
                for number, half in enumerate(halves):
                    with self._gradient_sync(last=number == len(halves) - 1):
                        part_losses = self._micro_step(micro_step, half)
                        accelerator.backward(part_losses.loss)
                    parts.append(DreamBoothLoss(*(value.detach() for value in part_losses)))
                losses = DreamBoothLoss(*(sum(values) for values in zip(*parts)))
                # One host sync per micro-step: the loss values for the logs, checked before the update is applied.
                values = self._loss_values(losses)
                if accelerator.sync_gradients and self.token_embeddings is not None:
                    self.token_embeddings.reduce_gradients(accelerator)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.clipped_parameters, config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients and self.token_embeddings is not None:
                    self.token_embeddings.restore_frozen_rows()
        if self.ema is not None:
            self.ema.step(self.trained_parameters)
        return {**values, "lr": self.lr_scheduler.get_last_lr()[0]}

    def _loss_values(self, losses) -> dict[str, float]:
        """The micro-step's losses (averaged over processes) as floats; stop on a NaN or infinite loss."""
        parts = [losses.loss]
        if self.config.with_prior_preservation:
            parts += [losses.instance_loss, losses.prior_loss]
        stacked = torch.stack([part.detach().float() for part in parts])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        values = dict(zip(("loss", "instance_loss", "prior_loss"), stacked.tolist()))
        if not math.isfinite(values["loss"]):
            last = checkpoints.list_checkpoints(self.config.output_dir)[-1:]
            raise NonFiniteLossError(
                f"The loss became {values['loss']} at step {self.global_step + 1}; stopping before applying it."
                f" The latest checkpoint, saved before that step, is {last[0] if last else 'none (none saved yet)'}."
                " Lower `--learning_rate`, keep `--max_grad_norm` on, or use bf16 instead of fp16, then resume with"
                " `--resume_from_checkpoint latest`."
            )
        return values

    def _backward_passes(self) -> list[str | None]:
        """The halves of a micro-batch that run forward and backward in turn: the whole batch (`None`), or with
        `--prior_backward separate` the subject half, then the class half."""
        if self.config.prior_backward == "joint" or not self.config.with_prior_preservation:
            return [None]
        return ["subject", "class"]

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Before the last backward pass of a micro-batch, gradients are not averaged over processes: they are, once,
        summed over both passes, by the last (accelerate's `no_sync`, which does nothing on one process). In a
        micro-step that does not sync, `accumulate` holds every pass's sync off already."""
        if last or not self.accelerator.sync_gradients:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for model in self.prepared.values():
            stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def _micro_step(self, micro_step: int, half: str | None = None) -> DreamBoothLoss:
        """Loss of this process's slice of global micro-batch `micro_step`, or of its `"subject"` or `"class"` half,
        the other half left out of the sum (`_backward_passes`: the halves' losses add up to the whole batch's). The
        class half is the class examples, or with `--prior_preservation_mode model` the subject examples conditioned
        on the class prompt, with the base model's prediction as their target.

        The examples form one shape group, or with `--aspect_ratio_buckets` two when the batch's subject bucket and
        class bucket differ: each group is noised and denoised at its own shape (one denoiser call per group), and
        the DreamBooth loss averages over the examples of both, as it would over one batch. A half's noise and
        timesteps are the whole batch's draws for its examples.
        """
        config, family = self.config, self.family
        examples, positions = self._batch_examples(micro_step)
        groups = self._shape_groups(examples)
        num_global = sum(count for _, _, count, _ in groups)
        device = family.device
        generator = step_generator(self.seed, micro_step, device)
        shapes = [family.sample_shape(self._crop_size(examples[start])) for start, _, _, _ in groups]
        draws = []
        for _ in ("noise", "latent_noise"):  # all groups' noise, then all groups' latent noise: one group as before
            for (start, stop, count, offset), shape in zip(groups, shapes):
                index = torch.tensor([p - offset for p in positions[start:stop]], device=device)
                draws.append(torch.randn((count, *shape), generator=generator, device=device)[index])
        noise, latent_noise = draws[: len(groups)], draws[len(groups) :]
        index = torch.tensor(positions, device=device)
        timesteps = family.sample_timesteps(num_global, generator)[index]
        if config.offset_noise:
            channels = shapes[0][0]
            channel_noise = torch.randn((num_global, channels, 1, 1), generator=generator, device=device)[index]
            noise = [
                n + config.noise_offset * channel_noise[start:stop] for n, (start, stop, _, _) in zip(noise, groups)
            ]

        per_process = config.train_batch_size
        part = slice(0, len(examples))
        if self.prior_from_images and half is not None:
            part = slice(0, per_process) if half == "subject" else slice(per_process, 2 * per_process)
        pieces = []  # each shape group's examples within the part, with their noise
        for (start, stop, _, _), group_noise, group_latent_noise in zip(groups, noise, latent_noise):
            first, last = max(start, part.start), min(stop, part.stop)
            if first < last:
                rows = slice(first - start, last - start)
                pieces.append((first - part.start, last - part.start, group_noise[rows], group_latent_noise[rows]))
        examples, positions, timesteps = examples[part], positions[part], timesteps[part]

        prompts = [images[i].prompt for images, _, i in examples]
        dtype = self.input_dtype
        is_prior = torch.tensor([p >= self.global_batch_size for p in positions], device=device)
        if self.prior_from_model:  # no class images: one group, conditioned again on each subject's class prompt
            class_prompts = [self.subject_data[images[i].subject].class_prompt for images, _, i in examples]
        model_prior_half = self.prior_from_model and half == "class"  # needs no subject prompt, only class prompts
        prompt_embeds = {}
        if not model_prior_half:
            prompt_embeds = {name: value.to(dtype) for name, value in self._prompt_embeds(prompts).items()}
            prompt_embeds = family.step_prompt_embeds(prompt_embeds, is_prior, generator)
        denoiser = self.prepared[family.denoiser_name]
        predictions, targets, group_timesteps = [], [], []
        for start, stop, group_noise, group_latent_noise in pieces:
            mean, std, conditioning = self._latent_distribution(
                examples[start:stop], positions[start:stop], micro_step
            )
            latents = mean + std * group_latent_noise
            steps = timesteps[start:stop]
            noisy, target = family.noisy_input_and_target(latents, group_noise, steps)
            noisy = noisy.to(dtype)
            embeds = {name: value[start:stop] for name, value in prompt_embeds.items()}
            if model_prior_half:
                embeds, base_target = self._base_model_prior_half(noisy, steps, conditioning, class_prompts)
                target, is_prior = base_target.to(target.dtype), torch.ones_like(is_prior)
            elif self.prior_from_model and half is None:
                noisy, steps, embeds, conditioning, target, is_prior = self._with_base_model_targets(
                    noisy, steps, embeds, conditioning, target, class_prompts
                )
            predictions.append(family.predict(denoiser, noisy, steps, embeds, conditioning))
            targets.append(target)
            group_timesteps.append(steps)
        weights = family.loss_weights(torch.cat(group_timesteps), config.snr_gamma)
        return dreambooth_loss(predictions, targets, is_prior, config.prior_loss_weight, weights)

    def _batch_examples(self, micro_step: int) -> tuple[list, list[int]]:
        """This process's `(images, latent cache, index)` examples of global micro-batch `micro_step`, subject
        images first, and their positions in the global batch (class examples after all subject examples)."""
        rank, per_process, size = self.accelerator.process_index, self.config.train_batch_size, self.global_batch_size
        instance_ids, class_ids = self.order.batch(micro_step, size)
        local = slice(rank * per_process, (rank + 1) * per_process)
        examples = [(self.instance_images, self.instance_latents, i) for i in instance_ids[local]]
        positions = list(range(rank * per_process, (rank + 1) * per_process))
        if self.prior_from_images:
            examples += [(self.class_images, self.class_latents, i) for i in class_ids[local]]
            positions += [p + size for p in positions]
        return examples, positions

    def _shape_groups(self, examples: list) -> list[tuple[int, int, int, int]]:
        """`(start, stop, global count, global offset)` of each run of local examples that share a crop size: the
        whole batch, or with buckets the subject half and the class half when their buckets differ."""
        per_process, size = self.config.train_batch_size, self.global_batch_size
        if len({self._crop_size(example) for example in examples}) == 1:
            return [(0, len(examples), size * len(examples) // per_process, 0)]
        return [(0, per_process, size, 0), (per_process, 2 * per_process, size, size)]

    def _crop_size(self, example: tuple) -> tuple[int, int]:
        images, _, i = example
        return images[i].crop_size(self.config.resolution)

    def _base_model_prior_half(self, noisy, timesteps, conditioning, class_prompts) -> tuple[dict, torch.Tensor]:
        """`--prior_preservation_mode model`'s prior half: the conditioning of each example's class prompt (by the
        trained encoders) and the frozen base model's prediction for it on the same noisy latents, the target."""
        dtype = self.input_dtype
        keys = self.base_class_embeds[class_prompts[0]].keys()
        base_embeds = {k: torch.cat([self.base_class_embeds[p][k] for p in class_prompts]).to(dtype) for k in keys}
        base_pred = self.base_prediction(noisy, timesteps, base_embeds, conditioning)
        class_embeds = {k: v.to(dtype) for k, v in self._prompt_embeds(class_prompts).items()}
        return class_embeds, base_pred

    def _with_base_model_targets(self, noisy, timesteps, prompt_embeds, conditioning, target, class_prompts):
        """`--prior_preservation_mode model`: the batch again, each example conditioned on its subject's class
        prompt, with the frozen base model's prediction for it as the target (`_base_model_prior_half`). Returns the
        doubled inputs, targets and the prior mask."""
        count = noisy.shape[0]
        class_embeds, base_pred = self._base_model_prior_half(noisy, timesteps, conditioning, class_prompts)
        both_embeds = {k: torch.cat([v, class_embeds[k]]) for k, v in prompt_embeds.items()}
        both_conditioning = ImageConditioning(
            original_sizes=conditioning.original_sizes.repeat(2, 1),
            crops_top_left=conditioning.crops_top_left.repeat(2, 1),
            target_size=conditioning.target_size,
        )
        is_prior = torch.arange(2 * count, device=noisy.device) >= count
        return (
            torch.cat([noisy, noisy]),
            torch.cat([timesteps, timesteps]),
            both_embeds,
            both_conditioning,
            torch.cat([target, base_pred.to(target.dtype)]),
            is_prior,
        )

    @torch.no_grad()
    def base_prediction(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: dict, conditioning: ImageConditioning
    ) -> torch.Tensor:
        """The frozen base model's prediction: the denoiser with its LoRA adapters off, or its frozen copy."""
        family = self.family
        if self.frozen_denoiser is not None:
            return family.predict(self.frozen_denoiser, noisy, timesteps, prompt_embeds, conditioning)
        denoiser = family.denoiser
        denoiser.disable_adapters()
        try:
            return family.predict(denoiser, noisy, timesteps, prompt_embeds, conditioning)
        finally:
            denoiser.enable_adapters()

    def _latent_distribution(self, examples: list, positions: list[int], micro_step: int):
        """Posterior mean/std of each example's latents (cached, or encoded now for random crops); the examples share
        one crop size."""
        config = self.config
        means, stds, sizes, crops, to_encode = [], [], [], [], []
        for slot, ((images, cache, i), position) in enumerate(zip(examples, positions)):
            image = images[i]
            sizes.append(image.original_size)
            if cache.mean[i] is not None:
                means.append(cache.mean[i])
                stds.append(cache.std[i])
                crops.append(_fixed_crop(image, image.crop_size(config.resolution)))
                continue
            generator = step_generator(self.seed, micro_step, salt=1000 + position)
            pixels, crop = self._pixels(image, generator)
            crops.append(crop)
            to_encode.append((slot, pixels))
            means.append(None)
            stds.append(None)
        if to_encode:
            mean, std = self.family.encode_image_distribution(torch.stack([pixels for _, pixels in to_encode]))
            for j, (slot, _) in enumerate(to_encode):
                means[slot], stds[slot] = mean[j], std[j]
        conditioning = ImageConditioning(  # the examples share one crop size: the bucket's, else the square's
            original_sizes=torch.tensor(sizes),
            crops_top_left=torch.tensor(crops),
            target_size=self._crop_size(examples[0]),
        )
        return torch.stack(means), torch.stack(stds), conditioning

    def _prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.prompt_embeds is not None:
            keys = self.prompt_embeds[prompts[0]].keys()
            return {k: torch.stack([self.prompt_embeds[p][k] for p in prompts]) for k in keys}
        family = self.family
        token_ids = [torch.stack(ids) for ids in zip(*(self.prompt_tokens[p] for p in prompts))]
        encoders = [
            self.prepared.get(name, module) for name, module in zip(family.text_encoder_names, family.text_encoders)
        ]
        return family.encode_prompt(token_ids, encoders)

    # Checkpoints, validation, saving

    def save_checkpoint(self) -> Path | None:
        """Save a resumable `checkpoint-{global_step}` atomically, keeping `--checkpoints_total_limit`."""
        accelerator, config = self.accelerator, self.config
        saved = None
        if accelerator.is_main_process:
            check_free_space(config.output_dir, self._checkpoint_bytes(), f"checkpoint-{self.global_step}")
            checkpoints.prune_checkpoints(config.output_dir, config.checkpoints_total_limit)
            temporary = checkpoints.temporary_checkpoint_dir(config.output_dir, self.global_step)
            accelerator.save_state(str(temporary))
            if self.ema is not None:
                save_ema_state(self.ema, self.trained_parameter_names, temporary)
            state = {"global_step": self.global_step, "seed": self.seed}
            saved = checkpoints.publish_checkpoint(temporary, self.global_step, state)
            logger.info("Saved %s", saved)
        accelerator.wait_for_everyone()
        self.last_checkpoint, self.last_checkpoint_step = saved, self.global_step
        return saved

    def _checkpoint_bytes(self) -> int:
        """A generous estimate of one checkpoint's size: trained weights, two optimizer moments (and the EMA), plus
        10%, plus 1 MB for the random states, the scheduler and the pickles' own overhead (which dominate on tiny
        models)."""
        weights = sum(p.numel() * p.element_size() for p in self.clipped_parameters)
        if self.config.adapter == "full":
            weights = sum(p.numel() * p.element_size() for m in self.trained.values() for p in m.parameters())
        return int(weights * (4 if self.ema is not None else 3) * 1.1) + 10**6

    def _final_bytes(self) -> int:
        """The final save's size: the adapter weights for LoRA, every pipeline module for a full fine-tune."""
        if self.config.adapter == "lora":
            return sum(p.numel() * p.element_size() for p in self.trained_parameters)
        modules = [m for m in self.pipeline.components.values() if isinstance(m, torch.nn.Module)]
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    def _validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        for module in self.trained.values():
            module.eval()
        if self.ema is not None:  # validate what would be saved: the average
            self.ema.store(self.trained_parameters)
            self.ema.copy_to(self.trained_parameters)
        with self.idle.on_device(), self.accelerator.autocast(), self.family.validation_pipeline() as pipeline:
            run_validation(
                pipeline,
                self.config,
                self.global_step,
                self.seed,
                self.accelerator.trackers,
                sampling_inputs=self.family.validation_inputs(),
                prompt=fill_subject(self.config.validation_prompt, self._subjects(self.config)),
            )
        if self.ema is not None:
            self.ema.restore(self.trained_parameters)
        for module in self.trained.values():
            module.train()

    def _save_final(self) -> None:
        accelerator, config = self.accelerator, self.config
        accelerator.wait_for_everyone()
        for module in self.trained.values():
            module.eval()
        if self.ema is not None:  # the average is the result: saved, sampled, evaluated and returned
            self.ema.copy_to(self.trained_parameters)
        self.release_training_state()
        self.idle.restore()  # the returned pipeline is whole again on the training device
        if not accelerator.is_main_process:
            return
        output_dir = Path(config.output_dir)
        modules = {name: accelerator.unwrap_model(model) for name, model in self.prepared.items()}
        check_free_space(output_dir, self._final_bytes(), "the trained subject")
        # Written aside, then renamed into place: a run killed here leaves the old outputs or the new, not a mix.
        staging = checkpoints.final_staging_dir(output_dir)
        if config.adapter == "lora":
            self.family.save_lora_weights(str(staging), modules)
            if config.output_kohya_format:
                export_kohya_lora(staging)
        else:
            self._save_full_pipeline(staging)
        if self.token_embeddings is not None:
            self.token_embeddings.save(staging)
        config.to_json_file(staging / CONFIG_NAME)
        metadata = self.subject_metadata()
        metadata.to_json_file(staging)
        checkpoints.publish_final(staging, output_dir, last=SUBJECT_FILE_NAME)
        logger.info("Saved the trained subject to %s", output_dir)
        photos = [[image.image for image in subject_photos] for subject_photos in self.subject_photos]
        job = FinishingJob(self.pipeline, config, output_dir, metadata, self.seed, photos, self.family)
        job.autocast = accelerator.autocast
        finish_subject(job, job.requested_stages())

    def release_training_state(self) -> None:
        """After the last step, before the final save: drop what only training needs (the optimizer's state and
        gradients, the EMA's shadow weights once copied in, the frozen base copy), so that the save and the samples and
        evaluation drawn after it do not hold them too (issue #21)."""
        release_optimizer_state(self.optimizer)
        self.ema = self.frozen_denoiser = None
        free_memory()

    def subject_metadata(self) -> SubjectMetadata:
        """The `dreambooth.json` record of this run: subject, base model, and the settings that matter."""
        config = self.config
        subjects = self._subjects(config)
        training = {
            "max_train_steps": self.max_train_steps,
            "learning_rate": config.learning_rate,
            "train_batch_size": config.train_batch_size,
            "resolution": config.resolution,
            "with_prior_preservation": config.with_prior_preservation,
            "prior_loss_weight": config.prior_loss_weight if config.with_prior_preservation else None,
            "prior_preservation_mode": config.prior_preservation_mode if config.with_prior_preservation else None,
            "num_class_images": len(self.class_images) or None,
            "train_text_encoder": config.train_text_encoder,
            "train_text_encoder_ti": config.train_text_encoder_ti or None,
            "ema_decay": config.ema_decay if config.use_ema else None,
            "seed": self.seed,
        }
        if config.adapter == "lora":
            training.update(rank=config.rank, lora_alpha=config.lora_scale_alpha)
            if config.lora_target_modules:  # recorded only when not the family's default, as buckets below
                training["lora_target_modules"] = config.lora_target_modules
        if config.bucket_sizes:  # an explicit list: its most elongated bucket, long side over short
            training["aspect_ratio_buckets"] = round(max(max(size) / min(size) for size in config.bucket_sizes), 2)
        elif config.aspect_ratio_buckets:  # recorded only when on: cards and records of square runs stay as they were
            training["aspect_ratio_buckets"] = config.bucket_max_aspect_ratio
        if "sr_noise_level" in self.family.option_defaults[config.adapter]:
            training["sr_noise_level"] = config.sr_noise_level  # what `DreamBoothPipeline` upscales at
        if self.identifier_source is not None:
            training["identifier"] = ", ".join(subject.identifier for subject in subjects)
            training["identifier_source"] = self.identifier_source
        return SubjectMetadata(
            subjects=subjects,
            adapter=config.adapter,
            family=self.family.name,
            pipeline_class=diffusers_pipeline_class(type(self.pipeline)).__name__,
            base_model=str(config.pretrained_model_name_or_path or self.pipeline.name_or_path or "") or None,
            base_model_revision=config.revision,
            base_model_variant=config.variant,
            lora_weight_name=LORA_WEIGHT_NAME_SAFE if config.adapter == "lora" else None,
            textual_inversion_weight_name=TEXTUAL_INVERSION_WEIGHT_NAME if self.token_embeddings else None,
            textual_inversion_tokens=list(self.token_embeddings.tokens) if self.token_embeddings else [],
            training=training,
        )

    def _save_full_pipeline(self, output_dir: Path) -> None:
        """`save_pretrained` of the trained pipeline; `--skip_save_text_encoder` leaves the text encoders out."""
        skipped = self.family.text_encoder_names if self.config.skip_save_text_encoder else ()
        kept = {name: getattr(self.pipeline, name) for name in skipped}
        self.pipeline.register_modules(**{name: None for name in skipped})
        try:
            self.pipeline.save_pretrained(str(output_dir))
        finally:
            self.pipeline.register_modules(**kept)


def _fixed_crop(image: TrainingImage, crop_size: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the center crop of `crop_size` `(height, width)`, as `crop_and_flip` cuts it."""
    width, height = image.image.size
    return (height - crop_size[0]) // 2, (width - crop_size[1]) // 2


def _tracker_config(config: DreamBoothConfig) -> dict:
    """Scalar options only: trackers such as tensorboard reject lists and None."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
