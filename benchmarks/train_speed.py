"""Training speed of `DreamBoothTrainer`: does an optimizer step cost more than the denoiser's own work?

One run trains a real `DreamBoothTrainer` for `--warmup` + `--steps` optimizer steps and measures, in one process:

- step: seconds per `trainer._optimizer_step` call after the warm-up (median, IQR, min/max); with `--breakdown`
  (always on CPU) also the `trainer._micro_step` part (batch assembly, text encoding, denoiser forward, loss);
- floor: the same modules' bare forward + backward + optimizer step on random inputs of the step's shapes (latents,
  timesteps, text embeddings, or token ids through the text encoder when it is trained), with the trainer's own
  optimizer, one after each trainer step (paired; `--floor after`: all after training, which drifts); the step / floor
  ratio is the trainer's overhead (1.0 = none); also by CPU seconds of the process (`time.process_time`, all
  threads), which other work on the machine barely moves, so on a CPU device it is the steadier figure;
- peak memory: resident memory (CPU) or `torch.cuda.max_memory_allocated` (GPU), per phase and for the process;
- class-image generation: images per second with `generate_class_images` (its own warm-up batch first);
- end to end: the wall time of loading and of `trainer.train()`, split by the trainer's phases.

Usage (the figures mean something only on a quiet machine; CPU timings are noisy, so compare medians and ratios):

    python benchmarks/train_speed.py --model sd15 --adapter lora --train_batch_size 1 --output_json lora.json
    python benchmarks/train_speed.py --matrix --model tiny --steps 20 --warmup 3 --repeats 3 --output_json all.json

`--matrix` runs every combination of `--matrix_adapters` x `--matrix_batch_sizes` x `--matrix_prior` x
`--matrix_text_encoder`, each in a fresh subprocess (so peak memory is per setting), `--repeats` times in alternating
order, and prints one markdown table. `--model sd15` trains a randomly initialised model with Stable Diffusion 1.5's
architecture, built once into `--cache_dir`; `toy` is the bundled toy model, `tiny` the tests' tiny pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, finishing  # noqa: E402
from diffusers_dreambooth.pipeline_loading import load_base_pipeline  # noqa: E402
from diffusers_dreambooth.prior import generate_class_images  # noqa: E402

logger = logging.getLogger("train_speed")

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
NUM_INSTANCE_PHOTOS = 4
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusers_dreambooth"

#: Stable Diffusion 1.5's configurations (`stable-diffusion-v1-5/stable-diffusion-v1-5`), for random weights.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
SD15_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
#: SD 1.5's CLIP ViT-L/14 text tower. The embedding keeps its 49408 rows so that parameter count, gradient and
#: optimizer cost match; the locally learnt tokenizer only uses the first `len(tokenizer)` ids.
SD15_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

#: Trainer methods timed as end-to-end phases (each resets the memory peak), in the order `train()` calls them.
PHASES = {
    "_generate_class_images": "class_images",
    "_load_images": "image_loading",
    "_set_up_trainable_modules": "trainable_modules",
    "_build_caches": "caching",
    "_set_up_optimization": "optimizer_setup",
    "_run_loop": "training_loop",
    "_save_final": "saving",
}
#: Methods called inside a phase: timed only (validation in the loop; sample images, a stage after the final save).
NESTED = {"_validate": "validation"}
FINISHING_STAGES = {"write_samples": "samples"}

#: Options a `--matrix` run passes on to each setting's subprocess.
PASSED_VALUES = (
    "model_dir",
    "model",
    "cache_dir",
    "resolution",
    "steps",
    "warmup",
    "mixed_precision",
    "device",
    "threads",
    "rank",
    "num_class_images",
    "sample_batch_size",
    "prior_generation_steps",
    "generation_images",
    "max_grad_norm",
    "num_validation_images",
    "validation_inference_steps",
    "seed",
    "floor",
    "prior_backward",
)
PASSED_FLAGS = ("gradient_checkpointing", "use_8bit_adam", "random_flip", "breakdown")


# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float]) -> dict[str, Any]:
    """Median, quartiles and extremes of timings in seconds (robust to the outliers of a busy machine)."""
    if not times:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {
        "n": len(times),
        "median_s": statistics.median(times),
        "q1_s": q1,
        "q3_s": q3,
        "iqr_s": q3 - q1,
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
    }


def _rss_high_water_mib() -> float:
    """Peak resident set size since start or the last reset (VmHWM; `ru_maxrss` where /proc is missing)."""
    with contextlib.suppress(OSError):
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_rss_high_water() -> bool:
    """Reset the kernel's peak-RSS mark (Linux `clear_refs`), so a phase's own peak can be read; False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Peak memory per phase and for the whole process: resident memory on CPU, allocated tensor memory on CUDA.

    On CPU the per-phase peak needs the Linux peak-RSS reset; that reset also resets `ru_maxrss`, so the process
    peak is the maximum of every reading, taken before each reset.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.process_peak_mib = self.current_peak_mib()
        self.resettable = device.type == "cuda" or _reset_rss_high_water()

    def current_peak_mib(self) -> float:
        """The peak since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _rss_high_water_mib()

    def process_peak(self) -> float:
        """The peak of the whole process so far."""
        self.process_peak_mib = max(self.process_peak_mib, self.current_peak_mib())
        return self.process_peak_mib

    def start(self) -> None:
        self.process_peak()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _reset_rss_high_water()

    def stop(self) -> float | None:
        """The peak since `start`, or None where it cannot be told apart from earlier peaks."""
        peak = self.current_peak_mib()
        self.process_peak()
        return peak if self.resettable else None


class PhaseTimer:
    """Wall time of each call of wrapped methods, synchronized on CUDA, and the memory peak of top-level phases."""

    def __init__(self, device: torch.device, memory: MemoryMeter) -> None:
        self.device, self.memory = device, memory
        self.calls: dict[str, list[float]] = {}
        self.cpu_calls: dict[str, list[float]] = {}  # CPU seconds of the process (all threads) per call
        self.first_start: dict[str, float] = {}
        self.peak_mib: dict[str, float | None] = {}

    def wrap(self, owner: Any, attribute: str, phase: str, track_memory: bool = False) -> None:
        """Replace `owner.attribute` (a bound method) on the instance by a timed one."""
        method = getattr(owner, attribute)

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if track_memory:
                self.memory.start()
            synchronize(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            self.first_start.setdefault(phase, start)
            try:
                return method(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.calls.setdefault(phase, []).append(time.perf_counter() - start)
                self.cpu_calls.setdefault(phase, []).append(time.process_time() - cpu_start)
                if track_memory:
                    self.peak_mib[phase] = self.memory.stop()

        setattr(owner, attribute, timed)

    def total(self, phase: str) -> float:
        return sum(self.calls.get(phase, []))


# Models and data


def sd15_pipeline_dir(cache_dir: Path) -> Path:
    """A randomly initialised pipeline with SD 1.5's architecture, saved once under `cache_dir` and reused."""
    return random_sd_pipeline_dir(
        cache_dir / "sd15-random-init", SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER, SD15_SCHEDULER, "about 4 GB"
    )


def random_sd_pipeline_dir(
    target: Path, unet: dict, vae: dict, text_encoder: dict, scheduler: dict, size: str = "small"
) -> Path:
    """A randomly initialised (seed 0) SD-format pipeline of these component configs, saved once at `target`."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_dreambooth.testing_utils import build_clip_tokenizer

    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Building a random SD-format pipeline in %s (once; %s).", target, size)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "tokenizer")
        text_config = CLIPTextConfig(
            **{**text_encoder, "vocab_size": max(text_encoder.get("vocab_size", 0), len(tokenizer))},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipeline = StableDiffusionPipeline(
                vae=AutoencoderKL(**vae),
                text_encoder=CLIPTextModel(text_config),
                tokenizer=tokenizer,
                unet=UNet2DConditionModel(**unet),
                scheduler=DDPMScheduler(**scheduler),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        staging = Path(tmp) / "pipeline"
        pipeline.save_pretrained(staging, safe_serialization=True)
        del pipeline
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


def model_dir(args: argparse.Namespace, work: Path) -> Path:
    """The base pipeline folder of `--model`, or `--model_dir` when given."""
    if args.model_dir:
        return Path(args.model_dir)
    if args.model == "sd15":
        return sd15_pipeline_dir(Path(args.cache_dir))
    if args.model == "toy":
        from diffusers_dreambooth.toy import BASE_MODEL_DIR

        if not (BASE_MODEL_DIR / "model_index.json").is_file():
            raise SystemExit(
                f"The toy base model is not built yet ({BASE_MODEL_DIR} has no model_index.json); run"
                " `python examples/build_toy_model.py`, or use `--model tiny`."
            )
        return BASE_MODEL_DIR
    from diffusers_dreambooth.testing_utils import save_dummy_pipeline

    return Path(save_dummy_pipeline("sd", work / "tiny-sd"))


def write_instance_photos(directory: Path, size: int, seed: int) -> Path:
    """Random square photos of the training resolution (so their crop is fixed and their latents are cached)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(NUM_INSTANCE_PHOTOS):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"photo_{index}.png")
    return directory


def build_config(args: argparse.Namespace, base_model: Path, photos: Path, work: Path) -> DreamBoothConfig:
    total_steps = args.warmup + args.steps
    prior = args.with_prior_preservation
    validate = args.num_validation_images > 0
    return DreamBoothConfig(
        pretrained_model_name_or_path=str(base_model),
        instance_data_dir=str(photos),
        instance_prompt=INSTANCE_PROMPT,
        with_prior_preservation=prior,
        class_prompt=CLASS_PROMPT if prior else None,
        class_data_dir=(args.class_data_dir or str(work / "class_images")) if prior else None,
        num_class_images=args.num_class_images,
        sample_batch_size=args.sample_batch_size,
        prior_generation_steps=args.prior_generation_steps,
        output_dir=str(work / "output"),
        adapter=args.adapter,
        rank=args.rank,
        resolution=args.resolution,
        train_batch_size=args.train_batch_size,
        max_train_steps=total_steps,
        checkpointing_steps=total_steps + 1,
        train_text_encoder=args.train_text_encoder,
        gradient_checkpointing=args.gradient_checkpointing,
        prior_backward=args.prior_backward if args.with_prior_preservation else "joint",
        use_8bit_adam=args.use_8bit_adam,
        mixed_precision=args.mixed_precision,
        random_flip=args.random_flip,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        report_to="none",
        num_validation_images=args.num_validation_images,
        validation_prompt=INSTANCE_PROMPT if validate else None,
        validation_steps=total_steps if validate else None,
        validation_inference_steps=args.validation_inference_steps,
    )


# The measurements


def measure_generation(pipeline: Any, config: DreamBoothConfig, args: argparse.Namespace, work: Path) -> dict:
    """Seconds per class image with the config's batch size, steps and precision, after one untimed batch."""
    device = pipeline.device
    options = {
        "batch_size": config.sample_batch_size,
        "seed": args.seed,
        "num_inference_steps": config.prior_generation_steps,
        "precision": config.prior_generation_precision,
        "guidance_scale": config.guidance_scale,
    }
    if args.warmup:
        warm_up = min(config.sample_batch_size, args.generation_images)
        generate_class_images(pipeline, CLASS_PROMPT, work / "generation-warmup", warm_up, **options)
    synchronize(device)
    start = time.perf_counter()
    generate_class_images(pipeline, CLASS_PROMPT, work / "generation", args.generation_images, **options)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "images": args.generation_images,
        "batch_size": config.sample_batch_size,
        "inference_steps": config.prior_generation_steps,
        "guidance_scale": config.guidance_scale or getattr(pipeline, "_guidance_scale", None),
        "seconds": seconds,
        "images_per_second": args.generation_images / seconds,
        "seconds_per_image": seconds / args.generation_images,
    }


class FloorStep:
    """One bare training step of the trained modules: forward, MSE, backward, optimizer step, on random inputs.

    The inputs have the step's shapes (latents, timesteps, and text embeddings, or token ids through the text encoder
    when it is trained; twice the batch with prior preservation, as two passes with `--prior_backward separate`). The
    modules are those the trainer calls (LoRA adapters, gradient checkpointing, dtypes and accelerate's
    mixed-precision autocast as set up), stepped by the trainer's own optimizer (the torch one inside accelerate's
    wrapper; its state is not allocated twice), with the run's gradient clipping when it clips
    (`torch.nn.utils.clip_grad_norm_`: asked-for work, not overhead). Left out: batch assembly, VAE encoding of random
    crops, noise and timestep sampling, the learning-rate schedule and fp16 loss scaling.
    """

    def __init__(self, trainer: DreamBoothTrainer, seed: int) -> None:
        config, family = trainer.config, trainer.family
        self.device, self.dtype = family.device, trainer.input_dtype
        self.unet = trainer.prepared[family.denoiser_name]
        self.text_encoder = trainer.prepared.get(family.text_encoder_names[0])
        self.optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        self.max_grad_norm, self.parameters = config.max_grad_norm, trainer.trained_parameters
        self.batch = config.train_batch_size * (2 if config.with_prior_preservation else 1)
        # The trainer's passes (`--prior_backward separate`: the subject half, then the prior half).
        halves = {None: slice(None), "subject": slice(None, config.train_batch_size)}
        halves["class"] = slice(config.train_batch_size, None)
        self.parts = [halves[half] for half in trainer._backward_passes()]
        size = config.resolution // family.vae_scale_factor
        self.latent_shape = (self.batch, family.vae.config.latent_channels, size, size)
        generator = torch.Generator(self.device).manual_seed(seed)
        self.latents = torch.randn(self.latent_shape, generator=generator, device=self.device, dtype=self.dtype)
        self.noise = torch.randn(self.latent_shape, generator=generator, device=self.device)
        steps = family.noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.randint(0, steps, (self.batch,), generator=generator, device=self.device)
        if self.text_encoder is not None:
            prompts = [INSTANCE_PROMPT] * self.batch
            self.token_ids = family.tokenize(prompts, config.tokenizer_max_length)[0].to(self.device)
        else:
            shape = next(iter(trainer.prompt_embeds.values()))["prompt_embeds"].shape
            self.prompt_embeds = torch.randn(
                (self.batch, *shape), generator=generator, device=self.device, dtype=self.dtype
            )
        for module in trainer.prepared.values():
            module.train()

    def __call__(self, split: bool) -> tuple[float, float | None, float]:
        """Seconds of the whole step, when `split` of its forward part (synchronized on CUDA), and CPU seconds."""
        synchronize(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        forward = 0.0 if split else None
        for part in self.parts:
            part_start = time.perf_counter()
            if self.text_encoder is None:
                prompt_embeds = self.prompt_embeds[part]
            else:
                prompt_embeds = self.text_encoder(self.token_ids[part])[0]
            latents, timesteps, prompt_embeds = self.latents[part], self.timesteps[part], prompt_embeds.to(self.dtype)
            prediction = self.unet(latents, timesteps, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), self.noise[part])
            if split:
                synchronize(self.device)
                forward += time.perf_counter() - part_start
            loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start, forward, time.process_time() - cpu_start


def interleave_floor(trainer: DreamBoothTrainer, seed: int, split: bool, times: list, wall: list) -> None:
    """Run one floor step right after each trainer step, so that both see the same machine load.

    `times` gets each floor step's timings; `wall` the whole time spent on it in the loop (with building the inputs).
    """
    step = trainer._optimizer_step
    floors: list[FloorStep] = []

    @functools.wraps(step)
    def step_then_floor() -> dict[str, float]:
        logs = step()
        start = time.perf_counter()
        if not floors:
            floors.append(FloorStep(trainer, seed))
        times.append(floors[0](split))
        wall.append(time.perf_counter() - start)
        return logs

    trainer._optimizer_step = step_then_floor


def floor_after_training(
    trainer: DreamBoothTrainer, args: argparse.Namespace, memory: MemoryMeter, split: bool
) -> tuple[list, float | None]:
    """Floor steps after `trainer.train()` returned: `max(--warmup, 1)` unmeasured, then `--steps`."""
    floor = FloorStep(trainer, args.seed)
    warmup = max(args.warmup, 1)
    memory.start()
    times = [floor(split) for _ in range(warmup + args.steps)]
    return times[warmup:], memory.stop()


def floor_report(trainer: DreamBoothTrainer, times: list, split: bool, peak: float | None) -> dict:
    config = trainer.config
    return {
        "batch": config.train_batch_size * (2 if config.with_prior_preservation else 1),
        "text_encoder_trained": config.train_text_encoder,
        "step": summarize([total for total, _, _ in times]),
        "forward": summarize([forward for _, forward, _ in times]) if split else None,
        "cpu": summarize([cpu for _, _, cpu in times]),
        "peak_memory_mib": peak,
    }


def run_once(args: argparse.Namespace) -> dict:
    """One setting: optional generation timing, then a timed `DreamBoothTrainer` run, then the floor."""
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if args.threads:
        torch.set_num_threads(args.threads)
    split = device.type == "cpu" or args.breakdown
    memory = MemoryMeter(device)
    timer = PhaseTimer(device, memory)
    with work_directory(args.work_dir) as work:
        base_model = model_dir(args, work)
        photos = write_instance_photos(work / "instance", args.resolution, args.seed)
        config = build_config(args, base_model, photos, work)

        memory.start()
        start = time.perf_counter()
        pipeline = load_base_pipeline(config)
        load_seconds = time.perf_counter() - start
        load_peak = memory.stop()
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        result: dict[str, Any] = {"settings": _settings(args), "machine": machine_info(device)}
        result["model"] = {
            "name": args.model,
            "path": str(base_model),
            "unet_parameters": sum(p.numel() for p in pipeline.unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in pipeline.text_encoder.parameters()),
        }
        result["generation"] = None if args.skip_generation else measure_generation(pipeline, config, args, work)
        if args.only_generation:
            result["memory"] = {"process_peak_mib": memory.process_peak()}
            return result

        trainer = DreamBoothTrainer(config, pipeline)
        timer.wrap(trainer, "train", "train")
        for attribute, phase in PHASES.items():
            timer.wrap(trainer, attribute, phase, track_memory=True)
        for attribute, phase in NESTED.items():
            timer.wrap(trainer, attribute, phase)
        for attribute, phase in FINISHING_STAGES.items():  # `finish_subject` looks them up in the module per call
            timer.wrap(finishing, attribute, phase)
        timer.wrap(trainer, "_optimizer_step", "step")
        if split:
            timer.wrap(trainer, "_micro_step", "forward")
        floor_times: list[tuple[float, float | None, float]] = []
        floor_wall: list[float] = []
        if args.floor == "interleaved":
            interleave_floor(trainer, args.seed, split, floor_times, floor_wall)
        trainer.train()
        floor_in_loop = sum(floor_wall)
        if args.floor == "interleaved":
            floor_times, floor_peak = floor_times[args.warmup :], None
        else:
            floor_times, floor_peak = floor_after_training(trainer, args, memory, split)
        floor = floor_report(trainer, floor_times, split, floor_peak)
        result["config"] = trainer.config.to_dict()
        result["model"]["trained_parameters"] = sum(p.numel() for p in trainer.trained_parameters)

    step_calls = timer.calls["step"]
    step = summarize(step_calls[args.warmup :])
    examples = floor["batch"]
    result["step"] = {**step, "warmup_times_s": step_calls[: args.warmup], "examples_per_step": examples}
    result["step"]["examples_per_second"] = examples / step["median_s"]
    result["step_forward"] = summarize(timer.calls["forward"][args.warmup :]) if split else None
    result["floor"] = floor
    result["ratio_step_to_floor"] = step["median_s"] / floor["step"]["median_s"]
    # CPU seconds barely change with other load on the machine (wall seconds do): on a CPU device, the steadier ratio.
    step_cpu = summarize(timer.cpu_calls["step"][args.warmup :])
    result["step"]["cpu"] = step_cpu
    result["ratio_step_to_floor_cpu"] = step_cpu["median_s"] / floor["cpu"]["median_s"]
    if args.floor == "interleaved":
        pairs = zip(step_calls[args.warmup :], floor["step"]["times_s"])
        result["paired_ratio_step_to_floor"] = statistics.median(mine / bare for mine, bare in pairs)
    if split:
        result["ratio_forward_to_floor_forward"] = result["step_forward"]["median_s"] / floor["forward"]["median_s"]
    loop = timer.total("training_loop") - timer.total("validation") - floor_in_loop
    result["loop_overhead_per_step_s"] = (loop - sum(step_calls)) / len(step_calls)
    result["end_to_end"] = end_to_end(timer, load_seconds, floor_in_loop)
    result["memory"] = memory_report(device, memory, {"load": load_peak, **timer.peak_mib}, floor["peak_memory_mib"])
    return result


def end_to_end(timer: PhaseTimer, load_seconds: float, floor_in_loop: float) -> dict:
    """Seconds of loading and of each phase of `train()`; interleaved floor steps are taken out of the loop."""
    train_seconds = timer.total("train") - floor_in_loop
    phases = {"load": load_seconds}
    first_phase = min(timer.first_start[phase] for phase in PHASES.values() if phase in timer.first_start)
    phases["setup"] = first_phase - timer.first_start["train"]
    phases.update({phase: timer.total(phase) for phase in PHASES.values()})
    phases["training_loop"] -= floor_in_loop
    phases["other"] = train_seconds - sum(seconds for name, seconds in phases.items() if name != "load")
    return {
        "total_s": load_seconds + train_seconds,
        "train_s": train_seconds,
        "phases_s": phases,
        "nested_s": {phase: timer.total(phase) for phase in [*NESTED.values(), *FINISHING_STAGES.values()]},
        "interleaved_floor_s": floor_in_loop,
    }


def memory_report(
    device: torch.device, memory: MemoryMeter, phase_peaks: dict[str, float | None], floor_peak: float | None
) -> dict:
    report = {
        "kind": "cuda_max_memory_allocated" if device.type == "cuda" else "resident_set_size",
        "process_peak_mib": memory.process_peak(),
        "phase_peaks_mib": phase_peaks,
        "floor_peak_mib": floor_peak,
        "per_phase_available": memory.resettable,
    }
    if device.type == "cuda":
        report["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with contextlib.suppress(ImportError):
        import psutil

        report["psutil_rss_at_end_mib"] = psutil.Process().memory_info().rss / 2**20
    return report


@contextlib.contextmanager
def work_directory(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        yield Path(tmp)


def _settings(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if not key.startswith("matrix")}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    import diffusers

    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Reports


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def describe(result: dict) -> str:
    """A human-readable summary of one run."""
    lines = []
    if "step" in result:
        step, floor = result["step"], result["floor"]
        lines.append(
            f"step   {_timing(step)}  ({step['examples_per_step']} examples, "
            f"{step['examples_per_second']:.3g} examples/s)"
        )
        lines.append(f"floor  {_timing(floor['step'])}")
        paired = result.get("paired_ratio_step_to_floor")
        lines.append(
            f"step / floor: {result['ratio_step_to_floor']:.3f}"
            + ("" if paired is None else f" (median of paired ratios {paired:.3f})")
        )
        if "ratio_step_to_floor_cpu" in result:
            lines.append(
                f"step / floor by CPU time (all threads; meaningful on a CPU device):"
                f" {result['ratio_step_to_floor_cpu']:.3f} ({step['cpu']['median_s']:.4g} s /"
                f" {floor['cpu']['median_s']:.4g} s)"
            )
        if result.get("step_forward"):
            lines.append(
                f"forward part: step {result['step_forward']['median_s']:.4g} s, floor"
                f" {floor['forward']['median_s']:.4g} s, ratio {result['ratio_forward_to_floor_forward']:.3f}"
            )
        lines.append(f"loop overhead outside steps: {result['loop_overhead_per_step_s']:.3g} s/step")
        memory = result["memory"]
        peaks = ", ".join(f"{name} {_mib(value)}" for name, value in memory["phase_peaks_mib"].items())
        lines.append(
            f"peak memory ({memory['kind']}, MiB): process {_mib(memory['process_peak_mib'])}; by phase: {peaks};"
            f" floor {_mib(memory['floor_peak_mib'])}"
        )
        e2e = result["end_to_end"]
        phases = " + ".join(f"{name} {seconds:.3g}" for name, seconds in e2e["phases_s"].items())
        lines.append(f"end to end {e2e['total_s']:.3g} s = {phases}")
    generation = result.get("generation")
    if generation:
        lines.append(
            f"class images: {generation['images']} in {generation['seconds']:.3g} s ="
            f" {generation['images_per_second']:.3g} images/s, {generation['seconds_per_image']:.3g} s/image"
            f" (batch {generation['batch_size']}, {generation['inference_steps']} steps)"
        )
    return "\n".join(lines)


def _timing(stats: dict) -> str:
    return (
        f"{stats['median_s']:.4g} s median (IQR {stats['q1_s']:.4g}-{stats['q3_s']:.4g},"
        f" min {stats['min_s']:.4g}, max {stats['max_s']:.4g}, n={stats['n']})"
    )


# The matrix


def matrix_settings(args: argparse.Namespace) -> list[dict]:
    return [
        {"adapter": adapter, "train_batch_size": batch, "with_prior_preservation": prior, "train_text_encoder": te}
        for adapter in args.matrix_adapters
        for batch in args.matrix_batch_sizes
        for prior in (value == "on" for value in args.matrix_prior)
        for te in (value == "on" for value in args.matrix_text_encoder)
    ]


def setting_name(setting: dict) -> str:
    parts = [setting["adapter"], f"batch {setting['train_batch_size']}"]
    parts.append("prior" if setting["with_prior_preservation"] else "no prior")
    parts.append("TE" if setting["train_text_encoder"] else "no TE")
    return ", ".join(parts)


def child_command(args: argparse.Namespace, options: dict, output_json: Path) -> list[str]:
    """This script, for one setting, with the matrix's common options."""
    command = [sys.executable, str(Path(__file__).resolve())]
    for name in PASSED_VALUES:
        if getattr(args, name) is not None:
            command += [f"--{name}", str(getattr(args, name))]
    command += [f"--{name}" for name in PASSED_FLAGS if getattr(args, name)]
    for name, value in options.items():
        if value is True:
            command.append(f"--{name}")
        elif value is not False and value is not None:
            command += [f"--{name}", str(value)]
    return [*command, "--output_json", str(output_json)]


def run_child(command: list[str], log: Path, output_json: Path) -> dict:
    with open(log, "w") as log_file:
        returncode = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT).returncode
    if returncode or not output_json.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        return {"error": f"exit status {returncode}", "log_tail": tail, "command": shlex.join(command)}
    return {**json.loads(output_json.read_text()), "command": shlex.join(command)}


def run_matrix(args: argparse.Namespace) -> dict:
    """Each setting in a fresh process, `--repeats` times, the order reversed every other round (drift cancels)."""
    if args.model == "sd15":
        sd15_pipeline_dir(Path(args.cache_dir))
    settings = matrix_settings(args)
    results: list[list[dict]] = [[] for _ in settings]
    with work_directory(args.work_dir) as work:
        shared_class_dir = None if args.matrix_fresh_class_images else work / "class_images"
        generation = None
        if not args.skip_generation:
            output_json = work / "generation.json"
            options = {"only_generation": True, "work_dir": work / "generation-run"}
            logger.warning("Timing class-image generation")
            generation = run_child(child_command(args, options, output_json), work / "generation.log", output_json)
        for round_index in range(args.repeats):
            order = list(range(len(settings)))
            if round_index % 2:
                order.reverse()
            for index in order:
                name = f"{index:02d}-{round_index}"
                output_json = work / f"{name}.json"
                options = {
                    **settings[index],
                    "skip_generation": True,
                    "class_data_dir": shared_class_dir,
                    "work_dir": work / name,
                }
                logger.warning("Round %d: %s", round_index + 1, setting_name(settings[index]))
                results[index].append(
                    run_child(child_command(args, options, output_json), work / f"{name}.log", output_json)
                )
                shutil.rmtree(work / name, ignore_errors=True)
    child_machines = [run["machine"] for runs in results for run in runs if "machine" in run]
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": child_machines[0] if child_machines else machine_info(torch.device(args.device)),
        "generation": generation,
        "fresh_class_images": args.matrix_fresh_class_images,
        "settings": [
            {"setting": setting, "name": setting_name(setting), "summary": summarize_runs(runs), "runs": runs}
            for setting, runs in zip(settings, results)
        ],
    }


def summarize_runs(runs: list[dict]) -> dict | None:
    """Step and floor times pooled over repeats; the ratio as the median of each process's own ratio."""
    ok = [run for run in runs if "step" in run]
    if not ok:
        return None
    step = summarize([t for run in ok for t in run["step"]["times_s"]])
    floor = summarize([t for run in ok for t in run["floor"]["step"]["times_s"]])
    return {
        "runs": len(ok),
        "failed": len(runs) - len(ok),
        "step": {key: value for key, value in step.items() if key != "times_s"},
        "floor": {key: value for key, value in floor.items() if key != "times_s"},
        "ratio_step_to_floor": statistics.median(run["ratio_step_to_floor"] for run in ok),
        "examples_per_second": statistics.median(run["step"]["examples_per_second"] for run in ok),
        "process_peak_mib": statistics.median(run["memory"]["process_peak_mib"] for run in ok),
        "loop_peak_mib": _median_or_none([run["memory"]["phase_peaks_mib"].get("training_loop") for run in ok]),
        "phases_s": {
            phase: statistics.median(run["end_to_end"]["phases_s"][phase] for run in ok)
            for phase in ok[0]["end_to_end"]["phases_s"]
        },
        "total_s": statistics.median(run["end_to_end"]["total_s"] for run in ok),
    }


def _median_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def matrix_table(report: dict) -> str:
    """The matrix as one markdown table, with the command and machine above it."""
    machine = report["machine"]
    memory = "GPU MiB (max allocated)" if machine["device"].startswith("cuda") else "RSS MiB"
    lines = [
        f"`{report['command']}`",
        "",
        f"Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), torch {machine['torch']}, diffusers"
        f" {machine['diffusers']}, {machine['torch_threads']} torch thread(s) in each run,"
        f" device {machine['device']}{', ' + machine['gpu'] if 'gpu' in machine else ''}.",
        "",
        f"| setting | step s, median (IQR) | floor s, median (IQR) | step / floor | examples/s | peak {memory},"
        " process (loop) | end to end s | load / class images / caching / loop / saving s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["settings"]:
        summary = entry["summary"]
        if summary is None:
            error = entry["runs"][0].get("error", "failed") if entry["runs"] else "not run"
            lines.append(f"| {entry['name']} | {error} | | | | | | |")
            continue
        step, floor, phases = summary["step"], summary["floor"], summary["phases_s"]
        split = " / ".join(
            f"{phases[name]:.3g}" for name in ("load", "class_images", "caching", "training_loop", "saving")
        )
        lines.append(
            f"| {entry['name']} | {step['median_s']:.4g} ({step['q1_s']:.4g}-{step['q3_s']:.4g})"
            f" | {floor['median_s']:.4g} ({floor['q1_s']:.4g}-{floor['q3_s']:.4g})"
            f" | {summary['ratio_step_to_floor']:.3f} | {summary['examples_per_second']:.3g}"
            f" | {_mib(summary['process_peak_mib'])} ({_mib(summary['loop_peak_mib'])})"
            f" | {summary['total_s']:.3g} | {split} |"
        )
    generation = report.get("generation")
    if generation and generation.get("generation"):
        lines += ["", describe({"generation": generation["generation"]})]
    elif generation:
        lines += ["", f"class images: {generation.get('error')}"]
    runs = [entry["summary"]["runs"] for entry in report["settings"] if entry["summary"]]
    lines += ["", f"Runs per setting: {max(runs, default=0)}; steps, floors pooled over runs; ratio: median of runs."]
    if not report["fresh_class_images"] and any(e["setting"]["with_prior_preservation"] for e in report["settings"]):
        lines.append(
            "Class images are generated once into a folder that the runs share: the first run with prior"
            " preservation generates them, later ones only list them (`--matrix_fresh_class_images` to change)."
        )
    return "\n".join(lines)


# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "toy", "sd15"), default="tiny")
    parser.add_argument(
        "--model_dir", help="A pipeline folder to train instead of --model's (e.g. to time two versions of the code)."
    )
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="Where the random SD 1.5 model is kept.")
    parser.add_argument("--adapter", choices=("full", "lora"), default="full")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--prior_backward", choices=("joint", "separate"), default="joint", help="With --with_prior_preservation."
    )
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--resolution", type=int, help="Default: 512 for sd15, 32 for toy and tiny.")
    parser.add_argument("--random_flip", action="store_true", help="Random flips: latents encoded every step.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns gradient clipping off.")
    parser.add_argument("--steps", type=int, default=20, help="Measured optimizer steps.")
    parser.add_argument("--warmup", type=int, default=3, help="Optimizer steps run before measuring.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's own.")
    parser.add_argument(
        "--floor",
        choices=("after", "interleaved"),
        default="interleaved",
        help="One floor step after each trainer step (paired: steadiest), or all floor steps after training.",
    )
    parser.add_argument("--breakdown", action="store_true", help="On CUDA, also time the forward part (adds syncs).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_class_images", type=int, default=8, help="Class images the trainer generates.")
    parser.add_argument("--class_data_dir", help="Class image folder (kept); default: a temporary one.")
    parser.add_argument("--sample_batch_size", type=int, default=4)
    parser.add_argument("--prior_generation_steps", type=int, default=50)
    parser.add_argument("--generation_images", type=int, default=8, help="Images of the generation timing.")
    parser.add_argument("--skip_generation", action="store_true", help="Do not time class-image generation.")
    parser.add_argument("--only_generation", action="store_true", help="Only time class-image generation.")
    parser.add_argument("--num_validation_images", type=int, default=0, help="> 0: validate once, write samples.")
    parser.add_argument("--validation_inference_steps", type=int, default=25)
    parser.add_argument("--work_dir", help="Folder for photos, outputs and logs (kept); default: a temporary one.")
    parser.add_argument("--output_json", help="Write every figure here.")
    parser.add_argument("--matrix", action="store_true", help="Run the settings grid, one process per setting.")
    parser.add_argument("--matrix_adapters", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    parser.add_argument("--matrix_batch_sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--matrix_prior", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--matrix_text_encoder", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument(
        "--matrix_fresh_class_images", action="store_true", help="Each run generates its own class images."
    )
    parser.add_argument("--repeats", type=int, default=1, help="Rounds of the matrix (order reversed each round).")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 512 if args.model == "sd15" else 32
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device cuda` but this PyTorch sees no GPU.")
    if args.steps < 1 or args.warmup < 0:
        parser.error("`--steps` must be at least 1 and `--warmup` at least 0.")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(argv)
    if args.matrix:
        report = run_matrix(args)
        print(matrix_table(report))
    else:
        report = run_once(args)
        print(describe(report))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
