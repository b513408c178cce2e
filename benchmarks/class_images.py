"""Class-image generation on the toy base model: speed and quality per scheduler and step count.

    python benchmarks/class_images.py --num_images 96

For each setting, `generate_class_images` (the trainer's own function) writes `--num_images` images of "a photo of a
star" into a fresh folder; the toy checker then says which share are stars (the class prompt's accuracy; the rest are
other shapes). Prints a markdown table: scheduler, steps, share of stars, images per second.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_dreambooth.data import list_images  # noqa: E402
from diffusers_dreambooth.prior import generate_class_images  # noqa: E402
from diffusers_dreambooth.toy import BASE_MODEL_DIR, CHECKER_DIR  # noqa: E402
from diffusers_dreambooth.toy.checker import ToyChecker  # noqa: E402
from diffusers_dreambooth.toy.world import CLASS_PROMPT  # noqa: E402

DPM = "DPMSolverMultistepScheduler"
SETTINGS = [("pipeline", 20), ("pipeline", 50), (DPM, 25), (DPM, 15)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checker = ToyChecker.from_pretrained(CHECKER_DIR).eval()
    pipeline = DiffusionPipeline.from_pretrained(BASE_MODEL_DIR)
    pipeline.set_progress_bar_config(disable=True)
    print(f"| scheduler ({type(pipeline.scheduler).__name__} = pipeline) | steps | stars | images/s |")
    print("| --- | --- | --- | --- |")
    for scheduler, steps in SETTINGS:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            generate_class_images(
                pipeline,
                CLASS_PROMPT,
                folder,
                args.num_images,
                batch_size=args.batch_size,
                num_inference_steps=steps,
                guidance_scale=args.guidance_scale,
                scheduler=scheduler,
            )
            seconds = time.perf_counter() - start
            images = [Image.open(path).convert("RGB") for path in list_images(folder)]
            stars = sum(judgement.shape == "star" for judgement in checker.judge(images)) / len(images)
        print(f"| {scheduler} | {steps} | {stars:.2f} | {args.num_images / seconds:.1f} |")


if __name__ == "__main__":
    main()
