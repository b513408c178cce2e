"""Two subjects in one run, on the toy world: does each identifier draw its own subject, and only its own?

Subject A is the bundled one (`sks star`, the red and yellow striped star). Subject B is four photos of a purple
circle on white, prompted `a photo of {identifier} circle` with `--identifier auto` (the toy tokenizer's rarest
token, `ack`), its class "a photo of a circle". The checker judges B by what it can see: a circle, coloured purple.
The base model draws circles of every colour for "a circle" (about 1/6 purple) and never A.

Runs, each the main job's recipe (`toy_dreambooth_config`: full fine-tune + text encoder, prior preservation, batch
4, lr 1e-4, 100 class images per class): A alone and B alone for `--steps`, and A + B from one `--concepts_list`
for twice as many steps, so that each subject sees as many examples as alone (a joint batch holds both subjects), or
for each of `--joint_steps`. `--runs` picks the runs.

    python benchmarks/two_subjects.py --seeds 0 --workers 2 --output_dir benchmarks/results/issue7-two-subjects
    python benchmarks/two_subjects.py --runs "A + B together" --joint_steps 3000 --seeds 0 1 2 --workers 1 \
        --output_dir benchmarks/results/issue7-two-subjects-longer

Per run and seed, 32 images per prompt: A's binding ("a photo of sks star" judged A), B's binding ("a photo of ack
circle" judged a purple circle), bleed (each subject's prompt judged the other subject), class drift ("a photo of a
star" judged A; "a photo of a circle" judged purple) and prior kept (all-three accuracy on the 144 full prompts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_dreambooth import DreamBoothTrainer
from diffusers_dreambooth.toy import BASE_MODEL_DIR, CHECKER_DIR, SUBJECT_PHOTOS_DIR, toy_dreambooth_config
from diffusers_dreambooth.toy.checker import ToyChecker
from diffusers_dreambooth.toy.metrics import generate, prior_accuracy, subject_share
from diffusers_dreambooth.toy.world import CLASS_PROMPT, SUBJECT_PROMPT, Scene
from diffusers_dreambooth.validation import image_grid

NUM_JUDGED = 32
B_SHAPE, B_COLOR = "circle", "purple"
B_PROMPT = "a photo of {identifier} circle"
B_CLASS_PROMPT = "a photo of a circle"
#: Subject B's four photos: one purple circle on white at four positions and sizes.
B_SCENES = [
    Scene(B_SHAPE, B_COLOR, "white", x=14.0, y=15.0, size=11.0),
    Scene(B_SHAPE, B_COLOR, "white", x=18.0, y=16.0, size=10.0),
    Scene(B_SHAPE, B_COLOR, "white", x=16.0, y=13.0, size=12.0),
    Scene(B_SHAPE, B_COLOR, "white", x=15.0, y=18.0, size=9.5),
]
RUNS = ("A alone", "B alone", "A + B together")
RUN_ORDER = {name: index for index, name in enumerate(("base model", *RUNS))}
#: The token `--identifier auto` gives B (the rarest of the toy tokenizer); the base model and run A are judged on
#: B's prompt with it too, so every row asks the same question.
AUTO_B_IDENTIFIER = "ack"


def looks_like_b(checker: ToyChecker, images: list) -> float:
    """Share of images the checker calls a purple circle (subject B)."""
    return sum(j.shape == B_SHAPE and j.color == B_COLOR for j in checker.judge(images)) / len(images)


def judge(pipeline: DiffusionPipeline, checker: ToyChecker, b_identifier: str | None, seed: int) -> dict:
    """The figures of one trained (or base) pipeline; B's prompts use `b_identifier` (None: the base model's B
    prompt is judged with the same token the trained runs use)."""
    a_images = generate(pipeline, [SUBJECT_PROMPT] * NUM_JUDGED, seed=1000 + seed)
    b_images = generate(pipeline, [B_PROMPT.format(identifier=b_identifier)] * NUM_JUDGED, seed=1500 + seed)
    star_images = generate(pipeline, [CLASS_PROMPT] * NUM_JUDGED, seed=2000 + seed)
    circle_images = generate(pipeline, [B_CLASS_PROMPT] * NUM_JUDGED, seed=2500 + seed)
    return {
        "A binding": subject_share(checker, a_images),
        "B binding": looks_like_b(checker, b_images),
        "A in B's prompt": subject_share(checker, b_images),
        "B in A's prompt": looks_like_b(checker, a_images),
        "star drift (A)": subject_share(checker, star_images),
        "circle: purple": looks_like_b(checker, circle_images),
        "prior kept": prior_accuracy(pipeline, checker, seed=4000 + seed),
    }


def b_photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(B_SCENES):
        scene.render().save(folder / f"subject_b_{index}.png")
    return folder


def run_one(name: str, seed: int, steps: int, output_dir: str) -> dict:
    """Train run `name` with `seed` for `steps`; judge it; copy its sample grid next to the results."""
    torch.set_num_threads(1)
    run_dir = Path(output_dir) / "runs" / f"{name.replace(' ', '-').replace('+', 'and')}-{steps}-steps-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    b_dir = b_photos(run_dir / "subject_b")
    a_concept = dict(
        instance_data_dir=str(SUBJECT_PHOTOS_DIR),
        instance_prompt=SUBJECT_PROMPT,
        class_prompt=CLASS_PROMPT,
        class_data_dir=str(run_dir / "class_star"),
    )
    b_concept = dict(
        instance_data_dir=str(b_dir),
        instance_prompt=B_PROMPT,
        class_prompt=B_CLASS_PROMPT,
        class_data_dir=str(run_dir / "class_circle"),
    )
    concepts = {"A alone": [a_concept], "B alone": [b_concept], "A + B together": [a_concept, b_concept]}[name]
    config = toy_dreambooth_config(
        output_dir=run_dir,
        concepts_list=concepts,
        identifier="auto",
        seed=seed,
        max_train_steps=steps,
        checkpointing_steps=steps,
        sample_prompts=None,  # one grid row per subject
        evaluate=False,
    )
    start = time.perf_counter()
    trainer = DreamBoothTrainer(config)
    pipeline = trainer.train()
    seconds = time.perf_counter() - start
    identifiers = [subject.identifier for subject in trainer.subject_metadata().subjects]
    b_identifier = identifiers[-1] if name != "A alone" else None
    checker = ToyChecker.from_pretrained(CHECKER_DIR).eval()
    figures = judge(pipeline, checker, b_identifier or AUTO_B_IDENTIFIER, seed)
    samples = Path(output_dir) / f"samples-{run_dir.name}.png"
    if len(concepts) > 1:  # one row per subject
        shutil.copy(run_dir / "samples" / "grid.png", samples)
    else:
        image_grid([[Image.open(path) for path in sorted((run_dir / "samples").glob("sample_*.png"))]]).save(samples)
    logging.info("%s seed %d (%.0f s, identifiers %s): %s", name, seed, seconds, identifiers, figures)
    return {"run": name, "seed": seed, "steps": config.max_train_steps, "train_seconds": seconds, **figures}


def base_figures(seed: int) -> dict:
    torch.set_num_threads(1)
    pipeline = DiffusionPipeline.from_pretrained(BASE_MODEL_DIR)
    pipeline.set_progress_bar_config(disable=True)
    checker = ToyChecker.from_pretrained(CHECKER_DIR).eval()
    return {"run": "base model", "seed": seed, "steps": 0, **judge(pipeline, checker, AUTO_B_IDENTIFIER, seed)}


def table(rows: list[dict]) -> str:
    metrics = [key for key in rows[0] if key not in ("run", "seed", "steps", "train_seconds")]
    lines = [
        "| run | steps | " + " | ".join(metrics) + " |",
        "| --- | --- | " + " | ".join("---" for _ in metrics) + " |",
    ]
    for name, steps in sorted(
        {(row["run"], row["steps"]) for row in rows}, key=lambda key: (RUN_ORDER[key[0]], key[1])
    ):
        group = [row for row in rows if row["run"] == name and row["steps"] == steps]
        cells = []
        for metric in metrics:
            values = [row[metric] for row in group]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{spread}")
        lines.append(f"| {name} | {steps:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000, help="Steps of a one-subject run.")
    parser.add_argument(
        "--joint_steps", type=int, nargs="+", help="Steps of the joint run, one run per value; default: twice --steps."
    )
    parser.add_argument("--runs", nargs="+", choices=("base model", *RUNS), default=("base model", *RUNS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output_dir", default="benchmarks/results/issue7-two-subjects")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        # The joint runs are the longest: start them first.
        runs = [("A + B together", steps) for steps in args.joint_steps or [2 * args.steps]]
        runs += [(name, args.steps) for name in ("A alone", "B alone")]
        jobs = [
            pool.submit(run_one, name, seed, steps, str(output_dir))
            for name, steps in runs
            if name in args.runs
            for seed in args.seeds
        ]
        if "base model" in args.runs:
            jobs += [pool.submit(base_figures, seed) for seed in args.seeds]
        rows = [job.result() for job in jobs]
    rows.sort(key=lambda row: (row["run"], row["seed"]))
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (output_dir / "table.md").write_text(text)
    print(text)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
