"""How good is the bundled toy base model? The figures and images of `RESULTS.md`'s toy-base-model section.

    python benchmarks/toy_base_model.py --output_dir benchmarks

Prints, judged by the toy checker: shape / colour / background / all-three accuracy on one image per full prompt of
the world (144), the share of stars and of the subject for the class and subject prompts, and how many of the
subject's photos are still the subject after the VAE's encode and decode. Writes `toy_base_model_144_prompts.png`
(rows: shape x colour, columns: background) and `toy_vae_subject.png` (the subject photos over their reconstructions).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.utils import make_image_grid  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_dreambooth.toy import BASE_MODEL_DIR, CHECKER_DIR  # noqa: E402
from diffusers_dreambooth.toy.checker import ToyChecker, images_to_tensor  # noqa: E402
from diffusers_dreambooth.toy.metrics import full_prompt_scenes, generate, subject_share  # noqa: E402
from diffusers_dreambooth.toy.world import (  # noqa: E402
    BACKGROUNDS,
    CLASS_PROMPT,
    SUBJECT_PROMPT,
    full_caption,
    subject_photo_scenes,
)

NUM_JUDGED = 32


def to_image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", default=str(BASE_MODEL_DIR))
    parser.add_argument("--checker", default=str(CHECKER_DIR))
    parser.add_argument("--output_dir", default="benchmarks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    checker = ToyChecker.from_pretrained(args.checker).eval()
    pipeline = DiffusionPipeline.from_pretrained(args.base_model)
    pipeline.set_progress_bar_config(disable=True)

    scenes = full_prompt_scenes()
    images = generate(pipeline, [full_caption(scene) for scene in scenes], seed=args.seed)
    judgements = checker.judge(images)
    right = {
        field: [getattr(j, field) == getattr(s, field) for j, s in zip(judgements, scenes)]
        for field in ("shape", "color", "background")
    }
    all_three = [all(values) for values in zip(*right.values())]
    figures = {f"{field} accuracy": sum(values) / len(values) for field, values in right.items()}
    figures["all-three accuracy"] = sum(all_three) / len(all_three)
    for name, prompt in (("class prompt", CLASS_PROMPT), ("subject prompt", SUBJECT_PROMPT)):
        judged = checker.judge(generate(pipeline, [prompt] * NUM_JUDGED, seed=args.seed + 1))
        figures[f"{name}: stars"] = sum(j.shape == "star" for j in judged) / NUM_JUDGED
        figures[f"{name}: the subject"] = sum(j.is_subject for j in judged) / NUM_JUDGED
    photos = [scene.render() for scene in subject_photo_scenes(8)]
    with torch.no_grad():
        latents = pipeline.vae.encode(images_to_tensor(photos)).latent_dist.mean
        reconstructions = [to_image(pixels) for pixels in pipeline.vae.decode(latents).sample]
    figures["VAE reconstructions of subject photos judged the subject"] = subject_share(checker, reconstructions)
    print(json.dumps(figures, indent=2))

    upscaled = [image.resize((64, 64), Image.Resampling.NEAREST) for image in images]
    make_image_grid(upscaled, rows=len(scenes) // len(BACKGROUNDS), cols=len(BACKGROUNDS)).save(
        output_dir / "toy_base_model_144_prompts.png"
    )
    pairs = [image.resize((64, 64), Image.Resampling.NEAREST) for image in photos + reconstructions]
    make_image_grid(pairs, rows=2, cols=len(photos)).save(output_dir / "toy_vae_subject.png")


if __name__ == "__main__":
    main()
