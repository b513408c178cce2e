"""Write a tiny randomly initialised pipeline (SD 1.x, SD 2.x v-prediction, SDXL or SD3) to try the trainer offline.

`python examples/make_tiny_pipeline.py --family sd --output tiny-sd` writes a `save_pretrained` folder of a few hundred
kilobytes, built from configs with a locally trained tokenizer: nothing is downloaded. Its images are noise (the
weights are random); it exercises every code path at 32x32 pixels in seconds.
"""

import argparse

from diffusers_dreambooth.testing_utils import PIPELINE_FAMILIES, save_dummy_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=PIPELINE_FAMILIES, default="sd", help="Pipeline layout to build.")
    parser.add_argument("--output", required=True, help="Folder to write the pipeline to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    print(save_dummy_pipeline(args.family, args.output, seed=args.seed))


if __name__ == "__main__":
    main()
