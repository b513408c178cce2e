"""Rebuild the bundled toy base model and its checker from scratch, seeded: `python examples/build_toy_model.py`.

Writes `diffusers_dreambooth/toy/pretrained/base_model` (VAE, then UNet + text encoder with EMA), `.../checker` and
the subject's photos `.../subject`, replacing the shipped ones, and prints the wall time and the checker's held-out
accuracy. Checker and base model train on 1 torch thread each (`--threads` changes the base model's); the same
thread count gives the same weights. About 60 minutes on a 2-core CPU; `--skip_checker` and `--skip_base_model` let
the two run at once, one per core.
"""

import argparse
import json
import logging
import os
import shutil
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from diffusers_dreambooth.toy import BASE_MODEL_DIR, CHECKER_DIR, SUBJECT_PHOTOS_DIR, write_subject_photos  # noqa: E402
from diffusers_dreambooth.toy.checker import CheckerTrainingConfig, train_checker  # noqa: E402
from diffusers_dreambooth.toy.pretrain import PretrainConfig, pretrain_toy_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base_model_dir", default=str(BASE_MODEL_DIR))
    parser.add_argument("--checker_dir", default=str(CHECKER_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_base_model", action="store_true", help="Only retrain the checker.")
    parser.add_argument("--skip_checker", action="store_true", help="Only retrain the base model.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the base model's training (the shipped one used 1)."
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    write_subject_photos(SUBJECT_PHOTOS_DIR)  # the bundled subject's 4 photos, drawn from the world's generator
    if not args.skip_checker:
        torch.set_num_threads(1)  # the shipped checker's: one thread, so a rebuild gives the same weights
        start = time.perf_counter()
        checker, accuracy = train_checker(CheckerTrainingConfig(seed=args.seed))
        shutil.rmtree(args.checker_dir, ignore_errors=True)
        checker.save_pretrained(args.checker_dir)
        print(f"checker: held-out accuracy {json.dumps(accuracy)} ({time.perf_counter() - start:.0f} s)")
    if not args.skip_base_model:
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        shutil.rmtree(args.base_model_dir, ignore_errors=True)
        pretrain_toy_model(args.base_model_dir, PretrainConfig(seed=args.seed))
        print(f"base model: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
