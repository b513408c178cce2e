"""What a run does after its last step, once the trained subject is saved: samples, evaluation, card and push.

The trainer publishes the weights, `dreambooth_config.json` and `dreambooth.json` before any of these stages runs,
so none of them can cost the trained subject. Each stage that fails (an out-of-memory while sampling, an evaluation
model that will not load, an unreachable Hub) is logged with its traceback; the others still run, and the run then
raises `FinishingError`, which names what failed and the command that redoes it from the saved folder:

    python -m diffusers_dreambooth.finishing OUTPUT_DIR --stages samples evaluation card push
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from . import checkpoints
from .config import CONFIG_NAME, DreamBoothConfig
from .data import load_subject_photos
from .evaluation import describe_evaluation_model, evaluate_subject, load_evaluation_models, paper_prompts
from .families import DreamBoothFamily, family_class_named, family_for_pipeline
from .hub import default_repo_name, push_subject_folder
from .model_card import write_model_card
from .subject import SUBJECT_FILE_NAME, SUBJECT_PLACEHOLDER, SubjectMetadata, fill_subject
from .validation import generate_images, generate_validation_images, image_grid

logger = logging.getLogger(__name__)

#: The stages after the weights are saved, in the order they run: each later one uses what the earlier ones wrote.
STAGES = ("samples", "evaluation", "card", "push")
SAMPLES_FOLDER = "samples"


class FinishingError(RuntimeError):
    """Some stage after the final save failed; the trained subject itself is saved whole."""

    def __init__(self, output_dir: str | Path, failures: dict[str, BaseException]) -> None:
        self.output_dir, self.failures = Path(output_dir), failures
        what = "; ".join(f"{stage}: {type(error).__name__}: {error}" for stage, error in failures.items())
        super().__init__(
            f"The trained subject is saved whole in `{output_dir}` (weights, `{SUBJECT_FILE_NAME}`), but"
            f" {len(failures)} stage(s) after it failed ({what}). Fix the cause, then redo them with"
            f" `python -m diffusers_dreambooth.finishing {output_dir} --stages {' '.join(failures)}`."
        )


@dataclass
class FinishingJob:
    """A saved subject and the pipeline that generates it: what the stages after the final save need."""

    #: The trained pipeline; None where only the card or the push is redone, which need none.
    pipeline: DiffusionPipeline | None
    config: DreamBoothConfig
    output_dir: Path
    metadata: SubjectMetadata
    seed: int
    #: Each subject's photos, as evaluation compares generated images with them (None where evaluation is not run).
    subject_photos: list[list[Image.Image]] | None
    #: The configured family of the pipeline, whose `sampling_inputs` every image is drawn with (None with it).
    family: DreamBoothFamily | None = None
    #: The precision generation runs in (the trainer's `accelerator.autocast`).
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext

    def requested_stages(self) -> list[str]:
        """The stages the run's options ask for: samples (when the model samples from prompts, without
        `--skip_final_inference`, and `--num_validation_images` is not 0), `--evaluate`, the card, `--push_to_hub`."""
        config = self.config
        samples = bool(config.num_validation_images) and not config.skip_final_inference
        wanted = {
            "samples": samples and generates_from_prompt(self.metadata.pipeline_class),
            "evaluation": config.evaluate,
            "card": True,
            "push": config.push_to_hub,
        }
        return [stage for stage in STAGES if wanted[stage]]

    @property
    def repo_id(self) -> str:
        return self.config.hub_model_id or default_repo_name(self.output_dir)


def generates_from_prompt(pipeline_class: str) -> bool:
    """Whether the pipeline class named in `dreambooth.json` samples from a prompt alone (not a super-resolution
    stage), so that sample images can be drawn."""
    family = family_class_named(pipeline_class)
    return family is None or family.generates_from_prompt


def finish_subject(job: FinishingJob, stages: Sequence[str]) -> None:
    """Run `stages` (in `STAGES` order) on the saved subject; raise `FinishingError` after all ran if any failed."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"Unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}.")
    actions = {"samples": write_samples, "evaluation": write_evaluation, "card": write_card, "push": push}
    failures = {}
    for stage in (stage for stage in STAGES if stage in stages):
        try:
            actions[stage](job)
        except Exception as error:  # every stage's failure is reported; none may cost the saved weights
            logger.error(
                "The `%s` stage failed; the saved subject in %s is whole.", stage, job.output_dir, exc_info=True
            )
            failures[stage] = error
    if failures:
        raise FinishingError(job.output_dir, failures)


def write_samples(job: FinishingJob) -> None:
    """Sample images for the model card: `samples/sample_{i}.png` of the first prompt (the validation prompt, else
    `--final_validation_prompt`, else the instance prompt), and with `--sample_prompts` or several subjects
    `samples/grid.png`, one row per prompt."""
    config, metadata = job.config, job.metadata
    prompt = config.validation_prompt or config.final_validation_prompt
    default = [prompt] if prompt else [s.instance_prompt for s in metadata.subjects]
    prompts = [fill_subject(prompt, metadata.subjects) for prompt in config.sample_prompts or default]
    with job.autocast(), job.family.validation_pipeline(lora_weights=job.output_dir) as pipeline:
        inputs = job.family.validation_inputs()
        rows = [generate_validation_images(pipeline, config, job.seed, p, inputs) for p in prompts]
    staging = checkpoints.final_staging_dir(job.output_dir)
    (staging / SAMPLES_FOLDER).mkdir()
    metadata.sample_prompt = prompts[0]
    metadata.sample_images = [f"{SAMPLES_FOLDER}/sample_{index}.png" for index in range(len(rows[0]))]
    for name, image in zip(metadata.sample_images, rows[0]):
        image.save(staging / name)
    metadata.sample_grid, metadata.sample_grid_prompts = None, []
    if len(rows) > 1:
        metadata.sample_grid, metadata.sample_grid_prompts = f"{SAMPLES_FOLDER}/grid.png", prompts
        image_grid(rows).save(staging / metadata.sample_grid)
    checkpoints.publish_final(staging, job.output_dir, last=SAMPLES_FOLDER)
    metadata.to_json_file(job.output_dir)


def write_evaluation(job: FinishingJob) -> None:
    """The paper's metrics of the trained subject (`diffusers_dreambooth.evaluation`), into `dreambooth.json` and so
    onto the card; with several subjects, each subject's, named `<identifier class>: <metric>`."""
    config, metadata = job.config, job.metadata
    dino, clip = load_evaluation_models(
        config.evaluation_dino_model, config.evaluation_clip_model, allow_pickle=config.allow_pickle
    )

    def generate(batch: list[str], seed: int) -> list[Image.Image]:
        with job.autocast():
            return generate_images(job.pipeline, config, batch, seed, **job.family.sampling_inputs())

    metrics, num_prompts = {}, 0
    for subject, data, photos in zip(metadata.subjects, config.subject_data(), job.subject_photos):
        prompts = [  # `{subject}` is the one evaluated
            fill_subject(p, metadata.subjects, subject)
            for p in config.evaluation_prompts or paper_prompts(SUBJECT_PLACEHOLDER)
        ]
        result = evaluate_subject(
            generate,
            photos,
            prompts,
            class_prompt=data.class_prompt,
            identifier=subject.identifier,
            dino=dino,
            clip=clip,
            images_per_prompt=config.evaluation_images_per_prompt,
            seed=job.seed,
        )
        logger.info("Evaluation of `%s`: %s", subject.phrase, result.as_dict())
        values = result.as_dict()
        values.pop("num_images")
        prefix = f"{subject.phrase}: " if len(metadata.subjects) > 1 else ""
        metrics.update((prefix + name, value) for name, value in values.items())
        num_prompts = len(prompts)
    models = {"DINO model": config.evaluation_dino_model, "CLIP model": config.evaluation_clip_model}
    metadata.evaluation = {
        **metrics,
        "images per prompt": config.evaluation_images_per_prompt,
        "prompts": num_prompts,
        **{name: describe_evaluation_model(value) for name, value in models.items()},
    }
    metadata.to_json_file(job.output_dir)


def write_card(job: FinishingJob) -> None:
    """The model card, `README.md`, from `dreambooth.json` as the earlier stages left it."""
    write_model_card(job.output_dir, job.metadata, job.repo_id, token=job.config.hub_token)


def push(job: FinishingJob) -> None:
    """Upload the subject folder to the Hub repo `--hub_model_id` (default: the folder's name)."""
    push_subject_folder(job.output_dir, job.repo_id, token=job.config.hub_token)


def load_finishing_job(
    output_dir: str | Path,
    stages: Sequence[str] | None = None,
    device: str | None = None,
    hub_token: str | None = None,
) -> tuple[FinishingJob, list[str]]:
    """A saved subject folder as a `FinishingJob`, and the stages to redo (default: those its options ask for).

    Only what those stages need is loaded: the pipeline (`DreamBoothPipeline`) for samples or evaluation, the
    subject's photos for evaluation; the card and the push need neither. `hub_token` is for the push and for a run
    trained with `--remote_text_encoder`, whose samples are drawn with the endpoint again (its text encoder is not
    loaded).
    """
    from .pipeline import DreamBoothPipeline

    output_dir = Path(output_dir)
    for name in (SUBJECT_FILE_NAME, CONFIG_NAME):
        if not (output_dir / name).is_file():
            raise FileNotFoundError(f"`{output_dir}` holds no `{name}`: pass the `--output_dir` of a finished run.")
    config = DreamBoothConfig.from_json_file(output_dir / CONFIG_NAME)
    config.hub_token = hub_token or config.hub_token
    metadata = SubjectMetadata.from_json_file(output_dir / SUBJECT_FILE_NAME)
    seed = metadata.training.get("seed", config.seed or 0)
    job = FinishingJob(None, config, output_dir, metadata, seed, None)
    stages = list(stages or job.requested_stages())
    if "samples" in stages or "evaluation" in stages:
        unloaded = {"text_encoder": None} if config.remote_text_encoder else {}
        job.pipeline = DreamBoothPipeline.from_pretrained(output_dir, **unloaded).pipeline
        job.pipeline.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        job.pipeline.set_progress_bar_config(disable=True)
        job.family = family_for_pipeline(job.pipeline)
        job.family.configure(config)  # the saved config holds the family's defaults: sampling as in training
    if "evaluation" in stages:
        job.subject_photos = [
            [image.image for image in load_subject_photos(config, data)] for data in config.subject_data()
        ]
    return job, stages


def main(args: Sequence[str] | None = None) -> None:
    """`python -m diffusers_dreambooth.finishing OUTPUT_DIR [--stages ...]`: redo the stages after a run's final
    save from the saved subject, e.g. after one failed."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_dreambooth.finishing",
        description="Redo samples, evaluation, model card or push of a trained subject from its saved folder.",
    )
    parser.add_argument("output_dir", help="The `--output_dir` of a finished run.")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=None, help="Default: those the run's options ask for."
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--hub_token", default=None, help="For `push` (default: the saved login).")
    parsed = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job, stages = load_finishing_job(parsed.output_dir, parsed.stages, parsed.device, parsed.hub_token)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    try:
        finish_subject(job, stages)
    except FinishingError as error:
        logger.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
