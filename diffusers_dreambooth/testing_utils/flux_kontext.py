"""Tiny FLUX.1 Kontext pipeline (`FluxKontextPipeline`): the tiny Flux components (`get_dummy_flux_components`, a
guidance-embedding transformer as FLUX.1-Kontext-dev's), as diffusers' Kontext pipeline test reuses Flux's dummy
components."""

from pathlib import Path

from diffusers import FluxKontextPipeline

from . import build_clip_tokenizer, build_t5_tokenizer, get_dummy_flux_components


def build_tiny_pipeline(tmp_dir: Path, seed: int) -> FluxKontextPipeline:
    tokenizer_dir, t5_tokenizer_dir = tmp_dir / "tokenizer", tmp_dir / "tokenizer_2"
    build_clip_tokenizer(tokenizer_dir)
    build_t5_tokenizer(t5_tokenizer_dir)
    return FluxKontextPipeline(**get_dummy_flux_components(tokenizer_dir, t5_tokenizer_dir, seed=seed))
