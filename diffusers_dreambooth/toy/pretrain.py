"""Pretrain the toy base model from scratch: the VAE alone first, then the UNet and text encoder together with EMA.

The recipe follows the project's TOYWORLD notes (batch 64, AdamW lr 1e-3, warm-up, EMA, precomputed latents). Every
random choice is seeded, so on one torch thread the same config rebuilds the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from .checker import images_to_tensor
from .models import build_untrained_pipeline, build_world_tokenizer
from .world import Scene, caption, sample_scene

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Options of the toy base model's pretraining; the defaults are the shipped model's."""

    seed: int = 0
    num_images: int = 40_000  # rendered once; the model sees each about six times
    pattern_p: float = 0.15  # share of striped "texture" images, so the model can draw patterns at all
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_final_learning_rate: float = 4e-4  # for the last third of the VAE steps
    vae_kl_weight: float = 1e-6
    steps: int = 6000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 300
    ema_decay: float = 0.999
    log_every: int = 100


def render_world(config: PretrainConfig) -> tuple[list[Scene], torch.Tensor]:
    """The pretraining scenes and their images, drawn from the config's seed."""
    rng = np.random.default_rng([config.seed, 1])
    scenes = [sample_scene(rng, config.pattern_p) for _ in range(config.num_images)]
    return scenes, images_to_tensor([scene.render() for scene in scenes])


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, config: PretrainConfig) -> None:
    """Fit the autoencoder to the world's images (MSE + a small KL term), then set its latent scaling factor."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    vae.train()
    start = time.perf_counter()
    for step in range(config.vae_steps):
        if step == config.vae_steps * 2 // 3:
            for group in optimizer.param_groups:
                group["lr"] = config.vae_final_learning_rate
        batch = pixels[torch.randint(len(pixels), (config.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.log_every == 0:
            logger.info("vae step %d/%d loss %.5f (%.0fs)", step + 1, config.vae_steps, loss.item(), _since(start))
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels[:4096].split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, scaled as the UNet sees them."""
    means, stds = [], []
    for chunk in pixels.split(512):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def train_denoiser(
    pipeline: StableDiffusionPipeline,
    scenes: list[Scene],
    latents: tuple[torch.Tensor, torch.Tensor],
    config: PretrainConfig,
) -> None:
    """Train UNet and text encoder on (latent, caption) pairs with the epsilon loss; keep the EMA weights."""
    unet, text_encoder, tokenizer, scheduler = (
        pipeline.unet,
        pipeline.text_encoder,
        pipeline.tokenizer,
        pipeline.scheduler,
    )
    modules = (unet, text_encoder)
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    emas = [EMAModel(module.parameters(), decay=config.ema_decay) for module in modules]
    generator = torch.Generator().manual_seed(config.seed + 1)
    caption_rng = np.random.default_rng([config.seed, 2])
    alphas = scheduler.alphas_cumprod
    means, stds = latents
    for module in modules:
        module.train()
    start = time.perf_counter()
    for step in range(config.steps):
        index = torch.randint(len(scenes), (config.batch_size,), generator=generator)
        texts = [caption(scenes[i], caption_rng) for i in index.tolist()]
        input_ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        clean = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
        prediction = unet(noisy, timesteps, text_encoder(input_ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for ema, module in zip(emas, modules):
            ema.step(module.parameters())
        if (step + 1) % config.log_every == 0:
            logger.info("denoiser step %d/%d loss %.4f (%.0fs)", step + 1, config.steps, loss.item(), _since(start))
    for ema, module in zip(emas, modules):
        ema.copy_to(module.parameters())
        module.eval()


def pretrain_toy_model(output_dir: str | os.PathLike, config: PretrainConfig | None = None) -> Path:
    """Build, pretrain and save the toy base model in `output_dir` (a `save_pretrained` folder). Returns the folder."""
    config = config or PretrainConfig()
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    tokenizer = build_world_tokenizer(output_dir / "tokenizer")
    pipeline = build_untrained_pipeline(tokenizer, seed=config.seed)
    scenes, pixels = render_world(config)
    logger.info("rendered %d images", len(scenes))
    train_vae(pipeline.vae, pixels, config)
    latents = encode_latents(pipeline.vae, pixels)
    del pixels
    train_denoiser(pipeline, scenes, latents, config)
    # Sampling as the world needs it (TOYWORLD notes: DDIM, 20 steps); training reads the same betas from it.
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.save_pretrained(output_dir)
    (output_dir / "pretrain_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    return output_dir


def _since(start: float) -> float:
    return time.perf_counter() - start
