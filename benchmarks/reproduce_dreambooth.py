"""Reproduce the DreamBooth paper's prior-preservation ablation on the bundled toy base model, on a CPU.

Each run trains the bundled subject (`sks star`) with `toy_dreambooth_config` and some overrides (`RUNS`), and the
toy checker judges what the trained pipeline draws. The runs of the plot (`PLOTTED`) train in segments of
`--eval_every` steps, each resuming the previous one's checkpoint (exact by design), judged after each segment.

- binding: share of "a photo of sks star" images that show the subject;
- drift: share of "a photo of a star" images that show the subject (language drift);
- prior kept: all-three accuracy on every full prompt of the world, relative to the base model's;
- recontextualization: "a photo of sks star on a green background" shows the subject / the green background;
- the paper's DINO, CLIP-I, CLIP-T, PRES and DIV, with the checker as DINO and CLIP.

Usage (about 3 minutes per run and seed on one CPU thread):

    python benchmarks/reproduce_dreambooth.py --seeds 0 1 2 --output_dir benchmarks/results

It prints a markdown table (mean +- spread over seeds) and writes `results.json`, `binding_drift.png` and one
sample grid per run into `--output_dir`; `--workers 2` runs two trainings at once (one torch thread each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer  # noqa: E402
from diffusers_dreambooth.evaluation import evaluate_subject  # noqa: E402
from diffusers_dreambooth.toy import BASE_MODEL_DIR, CHECKER_DIR, toy_dreambooth_config, write_image_folder  # noqa: E402
from diffusers_dreambooth.toy.checker import ToyChecker  # noqa: E402
from diffusers_dreambooth.toy.metrics import (  # noqa: E402
    ToyAttributeEmbedder,
    background_share,
    generate,
    prior_accuracy,
    subject_share,
)
from diffusers_dreambooth.toy.recipe import EVALUATION_PROMPTS  # noqa: E402
from diffusers_dreambooth.toy.world import (  # noqa: E402
    BACKGROUNDS,
    CLASS_PROMPT,
    IMAGE_SIZE,
    SUBJECT_PROMPT,
    subject_photo_scenes,
)

#: The LoRA runs of the first ablation: rank 8 on the attention layers at lr 1e-3, the main job's prompt and prior
#: weight (not `toy_dreambooth_config(adapter="lora")`'s recipe, whose other settings are named to keep these runs).
LORA = {
    "adapter": "lora",
    "learning_rate": 1e-3,
    "rank": 8,
    "lora_target_modules": None,
    "train_text_encoder_ti": False,
    "text_encoder_lr": None,
    "instance_prompt": SUBJECT_PROMPT,
    "prior_loss_weight": 1.0,
}
VARIED = ("white", "black", "pink", "gray")
PIVOTAL = {
    "train_text_encoder": False,
    "train_text_encoder_ti": True,
    "instance_prompt": "a photo of {identifier} star",
}

#: The runs of the table: name -> overrides of `toy_dreambooth_config`, plus two keys of this script:
#: `instance_backgrounds` (the photos' backgrounds, cycled; default white only), `instance_count` (photos, default 4)
#: and `background_captions`: True, each photo's caption names its background ("a photo of sks star on a white
#: background") instead of being the one instance prompt; "half", only the second half of the photos' captions do.
RUNS: dict[str, dict] = {
    "full + TE, prior": {},
    "full + TE, no prior": {"with_prior_preservation": False},
    "full, prior": {"train_text_encoder": False},
    "LoRA + TE, prior": {**LORA},
    "LoRA, prior": {**LORA, "train_text_encoder": False},
    "full + TE, prior, varied backgrounds": {"instance_backgrounds": VARIED},
    "full + TE, prior, background captions": {"background_captions": True},
    "full + TE, prior, varied backgrounds + captions": {"instance_backgrounds": VARIED, "background_captions": True},
    "full + TE, prior, 8 photos on varied backgrounds": {"instance_backgrounds": VARIED, "instance_count": 8},
    "full + TE, prior, 8 photos on varied backgrounds, half captioned": {
        "instance_backgrounds": VARIED,
        "instance_count": 8,
        "background_captions": "half",
    },
    "full, no prior": {"train_text_encoder": False, "with_prior_preservation": False},
    "LoRA + TE, no prior": {**LORA, "with_prior_preservation": False},
    # Issue #7: the identifier. `identifier` fills "a photo of {identifier} star"; `auto` is the rarest token of the
    # toy tokenizer by `rare_token_identifiers`; "qzvx" is made up and splits into 4 single-letter tokens.
    "identifier: auto (rare token)": {"identifier": "auto"},
    "identifier: sks": {"identifier": "sks"},
    "identifier: qzvx (4 tokens)": {"identifier": "qzvx"},
    # Issue #7: the main recipe with an EMA of the trained weights, saved as the final weights.
    "full + TE, prior, EMA": {"use_ema": True},
    # Issue #7: the prior-preservation target, generated class images (the paper) or the frozen base model's
    # prediction for the class prompt on the same noisy latents (no class images).
    "full + TE, prior: class images": {},
    "full + TE, prior: base-model target": {"prior_preservation_mode": "model", "class_data_dir": None},
    "LoRA + TE, prior: class images": {**LORA},
    "LoRA + TE, prior: base-model target": {**LORA, "prior_preservation_mode": "model", "class_data_dir": None},
    # Issue #7: pivotal tuning, the new token `<s0>` with a trained embedding in place of `sks`; the text encoder's
    # weights stay frozen (its embedding rows of the new token train, at the run's learning rate).
    "LoRA, prior, pivotal tuning": {**LORA, **PIVOTAL},
    "full, prior, pivotal tuning": {**PIVOTAL},
    # Issue #7: aspect-ratio buckets, on wide photos (`wide_photos`: the subject at one end of a 48x32 canvas), cropped
    # to 32 px squares at random positions as usual, or trained whole in their 40x24 bucket.
    "full + TE, prior, wide photos, square crops": {"wide_photos": True},
    "full + TE, prior, wide photos, buckets": {"wide_photos": True, "aspect_ratio_buckets": True},
    "LoRA, prior, pivotal tuning, embeddings lr 1e-2": {**LORA, **PIVOTAL, "text_encoder_lr": 1e-2},
    "full, prior, pivotal tuning, embeddings lr 1e-2": {**PIVOTAL, "text_encoder_lr": 1e-2},
}

#: Runs whose binding and drift are also measured every `--eval_every` steps, for the plot; the others at the end.
PLOTTED = (
    "full + TE, prior",
    "full + TE, no prior",
    "identifier: auto (rare token)",
    "identifier: sks",
    "identifier: qzvx (4 tokens)",
)

NUM_JUDGED = 32
WIDE_PHOTO_WIDTH = 48
RECONTEXT_BACKGROUND = "green"


@dataclass
class RunResult:
    name: str
    seed: int
    curve: list[dict] = field(default_factory=list)  # per segment: step, binding, drift
    final: dict = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0  # in `DreamBoothTrainer.train`: class images, caches, steps, final save
    identifier: str = "sks"


def segment_config(
    run_dir: Path, base_model: str, data: dict, overrides: dict, seed: int, step: int, segment: int, last: bool
) -> DreamBoothConfig:
    """The run trained up to `step`, resuming the checkpoint of the segment before (checkpoints every `segment`
    steps); card samples after the last segment only, evaluation by the caller."""
    return toy_dreambooth_config(
        output_dir=run_dir,
        pretrained_model_name_or_path=base_model,
        **data,
        seed=seed,
        max_train_steps=step,
        checkpointing_steps=segment,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        num_validation_images=4 if last else 0,
        evaluate=False,
        **overrides,
    )


def run_one(name: str, seed: int, steps: int, eval_every: int, output_dir: str, base_model: str) -> RunResult:
    """Train run `name` with `seed` in segments; judge after each; return the curve and the final figures."""
    torch.set_num_threads(1)
    overrides = dict(RUNS[name])
    if overrides.get("identifier"):
        overrides["instance_prompt"] = "a photo of {identifier} star"
    run_dir = Path(output_dir) / "runs" / f"{slug(name)}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    data, instance_images = write_subject_photos_for_run(run_dir, overrides)
    checker = ToyChecker.from_pretrained(CHECKER_DIR).eval()
    result = RunResult(name, seed)
    start = time.perf_counter()
    pipeline = None
    segment = eval_every if name in PLOTTED else steps
    for step in range(segment, steps + 1, segment):
        config = segment_config(run_dir, base_model, data, overrides, seed, step, segment, last=step == steps)
        trainer = DreamBoothTrainer(config)
        train_start = time.perf_counter()
        pipeline = trainer.train()
        result.train_seconds += time.perf_counter() - train_start
        identifier = trainer.config.identifier or "sks"
        subject_prompt = SUBJECT_PROMPT.replace("sks", identifier)
        point = dict(step=step, **judge_binding_and_drift(pipeline, checker, subject_prompt, seed))
        result.identifier = identifier
        result.curve.append(point)
        logging.info("%s seed %d: %s", name, seed, point)
    result.final = dict(
        result.curve[-1],
        prior=judge_prior(pipeline, checker, seed),
        **judge_recontext(pipeline, checker, subject_prompt, seed),
        **judge_paper_metrics(pipeline, checker, instance_images, identifier, seed),
    )
    result.seconds = time.perf_counter() - start
    logging.info("%s seed %d final (%.0f s): %s", name, seed, result.seconds, result.final)
    shutil.copy(run_dir / "samples" / "grid.png", Path(output_dir) / f"grid-{slug(name)}-seed{seed}.png")
    return result


def write_subject_photos_for_run(run_dir: Path, overrides: dict) -> tuple[dict, list[Image.Image]]:
    """Write the run's subject photos under `run_dir/subject`, popping this script's own keys from `overrides`;
    return the data options of `toy_dreambooth_config` and the photos as rendered (the DINO and CLIP-I reference)."""
    count = overrides.pop("instance_count", 4)
    scenes = subject_photo_scenes(count, seed=0, backgrounds=overrides.pop("instance_backgrounds", ("white",)))
    instance_dir = run_dir / "subject"
    background_captions = overrides.pop("background_captions", False)
    if background_captions:
        first_captioned = count // 2 if background_captions == "half" else 0
        captions = [
            f"{SUBJECT_PROMPT} on a {scene.background} background" if index >= first_captioned else SUBJECT_PROMPT
            for index, scene in enumerate(scenes)
        ]
        write_image_folder(instance_dir, [(s, s.render(), c) for s, c in zip(scenes, captions)], captions=True)
        data = dict(instance_data_dir=None, dataset_name=str(instance_dir), caption_column="text")
    else:
        data = dict(instance_data_dir=str(instance_dir))
        instance_dir.mkdir(parents=True)
        wide = overrides.pop("wide_photos", False)
        for index, scene in enumerate(scenes):
            photo = wide_photo(scene, left=index % 2 == 0) if wide else scene.render()
            photo.save(instance_dir / f"subject_{index}.png")
    return data, [scene.render() for scene in scenes]


def judge_binding_and_drift(pipeline, checker: ToyChecker, subject_prompt: str, seed: int) -> dict:
    """Binding: share of `subject_prompt` images judged the subject; drift: the same for "a photo of a star"."""
    subject_images = generate(pipeline, [subject_prompt] * NUM_JUDGED, seed=1000 + seed)
    class_images = generate(pipeline, [CLASS_PROMPT] * NUM_JUDGED, seed=2000 + seed)
    return dict(binding=subject_share(checker, subject_images), drift=subject_share(checker, class_images))


def judge_prior(pipeline, checker: ToyChecker, seed: int) -> float:
    """All-three accuracy on the world's 144 full prompts (divide by the base model's for "prior kept")."""
    return prior_accuracy(pipeline, checker, seed=4000 + seed)


def judge_recontext(pipeline, checker: ToyChecker, subject_prompt: str, seed: int) -> dict:
    """The subject on a background its photos never had: shares judged the subject, and on that background."""
    prompt = f"{subject_prompt} on a {RECONTEXT_BACKGROUND} background"
    recontext = generate(pipeline, [prompt] * NUM_JUDGED, seed=3000 + seed)
    return dict(
        recontext_subject=subject_share(checker, recontext),
        recontext_background=background_share(checker, recontext, RECONTEXT_BACKGROUND),
    )


def judge_paper_metrics(pipeline, checker: ToyChecker, instance_images: list, identifier: str, seed: int) -> dict:
    """The paper's DINO, CLIP-I, CLIP-T, PRES and DIV, with the checker as DINO and CLIP."""
    return evaluate_subject(
        lambda prompts, s: generate(pipeline, prompts, seed=s),
        instance_images,
        [p.replace("{subject}", f"{identifier} star") for p in EVALUATION_PROMPTS],
        class_prompt=CLASS_PROMPT,
        identifier=identifier,
        dino=checker,
        clip=ToyAttributeEmbedder(checker),
        seed=seed,
    ).as_dict()


def wide_photo(scene, left: bool):
    """The scene's 32 px photo pasted at the left or right end of a white 48x32 canvas: a wide photo whose square
    crops cut into (a random 32 px crop keeps the whole pasted photo at one offset of 17)."""
    canvas = Image.new("RGB", (WIDE_PHOTO_WIDTH, IMAGE_SIZE), BACKGROUNDS[scene.background])
    canvas.paste(scene.render(), (0 if left else WIDE_PHOTO_WIDTH - IMAGE_SIZE, 0))
    return canvas


def base_model_figures(seed: int, base_model: str) -> dict:
    """Drift and all-three accuracy of the untouched base model, the reference for 'prior kept'."""
    torch.set_num_threads(1)
    pipeline = DiffusionPipeline.from_pretrained(base_model)
    pipeline.set_progress_bar_config(disable=True)
    checker = ToyChecker.from_pretrained(CHECKER_DIR).eval()
    return dict(
        prior=judge_prior(pipeline, checker, seed),
        **judge_binding_and_drift(pipeline, checker, SUBJECT_PROMPT, seed),
    )


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).replace("--", "-").strip("-")


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


#: What the toy checker judges of a trained run: the keys of a run's record and the table's column titles.
JUDGED_COLUMNS = [
    ("binding", "binding ↑"),
    ("drift", "drift ↓"),
    ("prior_kept", "prior kept ↑"),
    ("recontext_subject", "recontext: subject ↑"),
    ("recontext_background", "recontext: green ↑"),
    ("DINO", "DINO ↑"),
    ("CLIP-I", "CLIP-I ↑"),
    ("CLIP-T", "CLIP-T ↑"),
    ("PRES", "PRES ↓"),
    ("DIV", "DIV ↑"),
]
COLUMNS = [("train_seconds", "train s"), *JUDGED_COLUMNS]


def table(results: list[RunResult], base: list[dict]) -> str:
    """Markdown table: one row per run, mean ± standard deviation over seeds."""
    base_prior = {index: figures["prior"] for index, figures in enumerate(base)}
    lines = [
        "| run | " + " | ".join(label for _, label in COLUMNS) + " |",
        "| --- |" + " --- |" * len(COLUMNS),
    ]
    base_row = {
        "binding": [b["binding"] for b in base],
        "drift": [b["drift"] for b in base],
        "prior_kept": [1.0 for _ in base],
    }
    lines.append(
        "| base model (no training) | "
        + " | ".join(mean_spread(base_row[key]) if key in base_row else "" for key, _ in COLUMNS)
        + " |"
    )
    for name in RUNS:
        runs = [r for r in results if r.name == name]
        if not runs:
            continue
        values = {key: [] for key, _ in COLUMNS}
        for index, run in enumerate(runs):
            prior_kept = run.final["prior"] / max(base_prior.get(index, base[0]["prior"]), 1e-9)
            final = dict(run.final, prior_kept=prior_kept, train_seconds=run.train_seconds)
            for key, _ in COLUMNS:
                values[key].append(final[key])
        lines.append(f"| {name} | " + " | ".join(mean_spread(values[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def curve_table(results: list[RunResult], metric: str = "binding") -> str:
    """Markdown table of `metric` against training steps, one column per plotted run (mean over seeds)."""
    names = [name for name in PLOTTED if any(r.name == name for r in results)]
    if not names:
        return ""
    by_name = {name: [r for r in results if r.name == name] for name in names}
    steps = [point["step"] for point in by_name[names[0]][0].curve]
    header = [f"{name} (`{by_name[name][0].identifier}`)" for name in names]
    lines = [f"| {metric} at step | " + " | ".join(header) + " |", "| --- |" + " --- |" * len(names)]
    for i, step in enumerate(steps):
        cells = [mean_spread([r.curve[i][metric] for r in by_name[name]]) for name in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[RunResult], path: Path) -> None:
    """Binding and drift against training steps, with and without the prior loss (full + TE runs), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, metric, title in ((axes[0], "binding", "identifier binding"), (axes[1], "drift", "language drift")):
        for name, style in zip(PLOTTED, ("-o", "--s")):
            runs = [r for r in results if r.name == name]
            if not runs:
                continue
            steps = [point["step"] for point in runs[0].curve]
            means = [statistics.mean(r.curve[i][metric] for r in runs) for i in range(len(steps))]
            axis.plot(steps, means, style, label=name)
        axis.set_title(
            f'{title}: share of "{"a photo of sks star" if metric == "binding" else "a photo of a star"}"'
            " judged the subject",
            fontsize=9,
        )
        axis.set_xlabel("training steps")
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS)[:8],
        choices=list(RUNS),
        metavar="RUN",
        help="Default: the first 8 of RUNS (the others are extra ablations).",
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--base_model", default=str(BASE_MODEL_DIR), help="Default: the bundled toy base model.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("diffusers_dreambooth").setLevel(logging.WARNING)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        base_futures = [pool.submit(base_model_figures, seed, args.base_model) for seed in args.seeds]
        futures = [
            pool.submit(run_one, name, seed, args.steps, args.eval_every, str(output_dir), args.base_model)
            for seed in args.seeds  # every run's first seed first, so a first look at the log comes early
            for name in args.runs
        ]
        base = [future.result() for future in base_futures]
        results = [future.result() for future in futures]
    markdown = table(results, base) + "\n\n" + curve_table(results) + "\n\n" + curve_table(results, "drift")
    (output_dir / "results.json").write_text(
        json.dumps({"base": base, "runs": [r.__dict__ for r in results]}, indent=2) + "\n", encoding="utf-8"
    )
    plot(results, output_dir / "binding_drift.png")
    (output_dir / "table.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    print(
        f"\n{len(results)} runs, seeds {args.seeds}, {time.perf_counter() - start:.0f} s in all "
        f"({args.workers} worker(s)); command: python {shlex.join(sys.argv)}"
    )


if __name__ == "__main__":
    main()
