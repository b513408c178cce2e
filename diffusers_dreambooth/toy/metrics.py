"""Measuring DreamBooth in the toy world: the checker judges what a pipeline draws for the world's prompts.

These are the quantities of the paper's prior-preservation ablation, made exact by the known generator: identifier
binding ("a photo of sks star" shows the subject), language drift ("a photo of a star" shows the subject), prior kept
(shape, colour and background all right for full prompts) and recontextualization (the subject on a background its
photos never had). `ToyAttributeEmbedder` lets the paper's CLIP-T and CLIP-I run on the checker too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image

from .checker import HEADS, ToyChecker
from .world import BACKGROUNDS, COLORS, SHAPES, Scene, full_caption

#: Sampling settings of the toy world (TOYWORLD notes): DDIM with 20 steps and guidance 4.
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 4.0


@torch.no_grad()
def generate(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str],
    seed: int = 0,
    batch_size: int = 64,
    num_inference_steps: int = NUM_INFERENCE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
) -> list[Image.Image]:
    """One image per prompt, in batches, each batch seeded from (`seed`, batch index) so results do not depend on
    how many prompts come before in other calls."""
    images = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator(pipeline.device).manual_seed(seed * 100_003 + start)
        images += pipeline(
            list(prompts[start : start + batch_size]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        ).images
    return images


def full_prompt_scenes() -> list[Scene]:
    """Every plain (shape, colour, background) of the world once: the fixed prompt set of the prior-kept score."""
    return [
        Scene(shape, color, background) for shape, color, background in itertools.product(SHAPES, COLORS, BACKGROUNDS)
    ]


def subject_share(checker: ToyChecker, images: Sequence[Image.Image]) -> float:
    """Share of `images` the checker calls the subject (binding for "[V] star", drift for "a star")."""
    return sum(judgement.is_subject for judgement in checker.judge(images)) / len(images)


def background_share(checker: ToyChecker, images: Sequence[Image.Image], background: str) -> float:
    """Share of `images` whose background the checker names `background`."""
    return sum(judgement.background == background for judgement in checker.judge(images)) / len(images)


def all_three_accuracy(checker: ToyChecker, images: Sequence[Image.Image], scenes: Sequence[Scene]) -> float:
    """Share of images with shape, colour and background all as their scene asked."""
    judgements = checker.judge(images)
    right = [(j.shape, j.color, j.background) == (s.shape, s.color, s.background) for j, s in zip(judgements, scenes)]
    return sum(right) / len(right)


def prior_accuracy(pipeline: DiffusionPipeline, checker: ToyChecker, seed: int = 0) -> float:
    """The base model's all-three accuracy on `full_prompt_scenes()`, one image per full prompt."""
    scenes = full_prompt_scenes()
    images = generate(pipeline, [full_caption(scene) for scene in scenes], seed)
    return all_three_accuracy(checker, images, scenes)


@dataclass
class ToyAttributeEmbedder:
    """The checker as a CLIP-like text-image embedder: both sides become (shape, colour, background) vectors.

    An image is its concatenated class probabilities; a prompt is the one-hot of the shape, colour and background
    words it names (zeros for what it leaves out). Their cosine is the toy world's CLIP-T, and the cosine of two
    images' vectors its CLIP-I: agreement on what is drawn, looser than the checker's subject features.
    """

    checker: ToyChecker

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        probabilities = self.checker.probabilities(images)
        return F.normalize(torch.cat([probabilities[name] for name in _ATTRIBUTES], dim=-1), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            words = text.lower().replace(",", " ").split()
            parts = []
            for name in _ATTRIBUTES:
                labels = HEADS[name]
                if name == "background":
                    named = {words[i - 1] for i, word in enumerate(words) if word == "background" and i > 0}
                else:
                    named = set(words[: words.index("on")] if "on" in words else words)
                parts.append(torch.tensor([float(label in named) for label in labels]))
            rows.append(torch.cat(parts))
        return F.normalize(torch.stack(rows), dim=-1)


_ATTRIBUTES = ("shape", "color", "background")
