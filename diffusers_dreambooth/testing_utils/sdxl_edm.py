"""A tiny Playground v2.5-style `StableDiffusionXLPipeline`: the tiny SDXL of `get_dummy_sdxl_components` with the EDM
scheduler Playground v2.5 ships (`EDMDPMSolverMultistepScheduler`) and a VAE with `latents_mean`/`latents_std`."""

from pathlib import Path

from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline

from . import _dummy_vae, get_dummy_sdxl_components

#: `scheduler/scheduler_config.json` of playgroundai/playground-v2.5-1024px-aesthetic.
PLAYGROUND_SCHEDULER_CONFIG = dict(
    algorithm_type="dpmsolver++",
    dynamic_thresholding_ratio=0.995,
    euler_at_final=False,
    final_sigmas_type="zero",
    lower_order_final=True,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    rho=7.0,
    sample_max_value=1.0,
    sigma_data=0.5,
    sigma_max=80.0,
    sigma_min=0.002,
    solver_order=2,
    solver_type="midpoint",
    thresholding=False,
)
#: `vae/config.json` of Playground v2.5: per-channel latent statistics and its scaling factor.
PLAYGROUND_VAE_LATENTS = dict(
    scaling_factor=0.5,
    latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
    latents_std=[8.4927, 5.9022, 6.5498, 5.2299],
)


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> StableDiffusionXLPipeline:
    components = get_dummy_sdxl_components(tmp_dir / "tokenizer", seed=seed)
    components["scheduler"] = EDMDPMSolverMultistepScheduler(**PLAYGROUND_SCHEDULER_CONFIG)
    components["vae"] = _dummy_vae(seed, **PLAYGROUND_VAE_LATENTS)
    return StableDiffusionXLPipeline(**components)
