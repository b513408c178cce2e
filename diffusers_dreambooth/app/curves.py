"""Curves of a run's validation images against steps, for the page: binding and language drift as a checker judges
them, and the paper's DINO, CLIP-I, CLIP-T (and PRES) as the run's evaluation models score them.

Both are computed here, in the app's process, from the images the trainer saves (`validation/step-N/{i}.png`, and
`class-{i}.png` with `--num_validation_class_images`), not by the trainer at each validation: the run spends no time
or accelerator memory on them, an evaluation model that fails to load (a Hub id offline) cannot end the run, and
runs already on disk get them too. Each image is judged or embedded once, then cached; a step's images are embedded
together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..evaluation import (
    ImageEmbedder,
    TextImageEmbedder,
    load_evaluation_models,
    mean_pairwise_cosine,
    strip_identifier,
)
from ..toy.checker import ToyChecker

logger = logging.getLogger(__name__)


def validation_step(path: Path) -> int:
    """The step of a validation image, from its folder `step-N`."""
    return int(path.parent.name[len("step-") :])


def by_step(paths: list[Path]) -> dict[int, list[Path]]:
    """`paths` grouped by validation step, in step order."""
    groups: dict[int, list[Path]] = {}
    for path in sorted(paths, key=lambda path: (validation_step(path), path.name)):
        groups.setdefault(validation_step(path), []).append(path)
    return groups


def image_prompt(image: Image.Image) -> str | None:
    """The prompt a validation image was drawn with (the PNG text `prompt` the trainer writes), if it holds one."""
    return image.info.get("prompt")


class CheckerCurves:
    """Binding (the share of subject-prompt images a checker calls the subject) and language drift (the share of
    class-prompt images it calls the subject, DreamBooth Sec. 4.3) per validation step."""

    def __init__(self) -> None:
        self._checkers: dict[str, ToyChecker] = {}
        self._judged: dict[Path, bool] = {}

    def rows(self, checker_dir: str, subject_images: list[Path], class_images: list[Path]) -> list[dict[str, Any]]:
        """`{"step", "share", "curve"}` rows, `curve` being `binding` or `drift` (the latter with class images)."""
        if checker_dir not in self._checkers:
            self._checkers[checker_dir] = ToyChecker.from_pretrained(checker_dir, use_safetensors=True).eval()
        checker = self._checkers[checker_dir]
        rows = []
        for curve, paths in (("binding", subject_images), ("drift", class_images)):
            for step, step_paths in by_step(paths).items():
                self._judge(checker, step_paths)
                share = sum(self._judged[path] for path in step_paths) / len(step_paths)
                rows.append({"step": step, "share": share, "curve": curve})
        return rows

    def _judge(self, checker: ToyChecker, paths: list[Path]) -> None:
        unseen = [path for path in paths if path not in self._judged]
        if unseen:
            images = [Image.open(path).convert("RGB") for path in unseen]
            for path, judgement in zip(unseen, checker.judge(images)):
                self._judged[path] = judgement.is_subject


@dataclass(frozen=True)
class MetricRequest:
    """What scoring a run's validation images needs: its evaluation models, the subject's photos (read on first
    use), the identifier CLIP-T leaves out of the prompt, and the images."""

    dino_model: str
    clip_model: str
    photos_key: str
    load_photos: Callable[[], list[Image.Image]]
    identifier: str | None
    subject_images: tuple[Path, ...]
    class_images: tuple[Path, ...] = ()


class MetricCurves:
    """DINO, CLIP-I and CLIP-T of each validation step's images against the subject's photos, and PRES (DINO of its
    class-prompt images), as `evaluate_subject` computes them after training, scored in a background thread so the
    page's poll never waits on a model.

    Per image, DINO and CLIP-I are the mean cosine with every photo and CLIP-T the cosine with its prompt; their mean
    over a step's images is exactly the metric of that step's images together.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], tuple[ImageEmbedder, TextImageEmbedder]] = {}
        self._photos: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._scores: dict[Path, dict[str, float]] = {}
        self._failed: dict[tuple[str, str, str], str] = {}
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def rows(self, request: MetricRequest, wait: bool = False) -> list[dict[str, Any]]:
        """`{"step", "score", "metric"}` rows of the steps scored so far; scores the rest in the background (or now,
        with `wait`)."""
        pending = [path for path in (*request.subject_images, *request.class_images) if path not in self._scores]
        with self._lock:
            idle = self._worker is None or not self._worker.is_alive()
            if pending and idle and self._key(request) not in self._failed:
                self._worker = threading.Thread(target=self._score, args=(request, pending), daemon=True)
                self._worker.start()
            worker = self._worker
        if wait and worker is not None:
            worker.join()
        return self._rows(request)

    def error(self, request: MetricRequest) -> str | None:
        """Why the request's models could not score its images, if they could not."""
        return self._failed.get(self._key(request))

    @staticmethod
    def _key(request: MetricRequest) -> tuple[str, str, str]:
        return request.dino_model, request.clip_model, request.photos_key

    def _rows(self, request: MetricRequest) -> list[dict[str, Any]]:
        rows = []
        for paths, metrics in (
            (request.subject_images, ("DINO", "CLIP-I", "CLIP-T")),
            (request.class_images, ("PRES",)),
        ):
            for step, step_paths in by_step(list(paths)).items():
                for metric in metrics:  # a step's metric once each of its images has it
                    if all(metric in self._scores.get(path, {}) for path in step_paths):
                        score = sum(self._scores[path][metric] for path in step_paths) / len(step_paths)
                        rows.append({"step": step, "score": score, "metric": metric})
        return rows

    def _score(self, request: MetricRequest, pending: list[Path]) -> None:
        try:
            dino, clip = self._loaded(request)
            real_dino, real_clip = self._photo_embeddings(request, dino, clip)
            class_images = set(request.class_images)
            pending_classes = [path for path in pending if path in class_images]
            pending_subjects = [path for path in pending if path not in class_images]
            for classes in by_step(pending_classes).values():  # one call per model for a step's images
                rows = dino.embed_images([Image.open(path).convert("RGB") for path in classes])
                for path, row in zip(classes, rows):
                    self._scores[path] = {"PRES": mean_pairwise_cosine(row[None], real_dino)}
            for subjects in by_step(pending_subjects).values():
                self._score_subject_images(request, subjects, dino, clip, real_dino, real_clip)
        except Exception as error:  # a model not found, offline, or not a DINO/CLIP: no curve, the page goes on
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self._failed[self._key(request)] = message
            logger.warning("No DINO/CLIP curves for `%s`/`%s`: %s", request.dino_model, request.clip_model, message)

    def _score_subject_images(
        self,
        request: MetricRequest,
        paths: list[Path],
        dino: ImageEmbedder,
        clip: TextImageEmbedder,
        real_dino: torch.Tensor,
        real_clip: torch.Tensor,
    ) -> None:
        """DINO, CLIP-I and CLIP-T of one step's subject images, each model embedding them in one call. Images saved
        before validation wrote their prompt get no CLIP-T."""
        opened = [Image.open(path) for path in paths]
        prompts = [image_prompt(image) for image in opened]
        images = [image.convert("RGB") for image in opened]
        dino_rows, clip_rows = dino.embed_images(images), clip.embed_images(images)
        prompted = [i for i, prompt in enumerate(prompts) if prompt is not None]
        texts = [
            strip_identifier(prompts[i], request.identifier) if request.identifier else prompts[i] for i in prompted
        ]
        text_rows = dict(zip(prompted, clip.embed_texts(texts))) if prompted else {}
        for i, path in enumerate(paths):
            scores = {
                "DINO": mean_pairwise_cosine(dino_rows[i : i + 1], real_dino),
                "CLIP-I": mean_pairwise_cosine(clip_rows[i : i + 1], real_clip),
            }
            if i in text_rows:  # CLIP-T: the cosine of the image with its own prompt
                scores["CLIP-T"] = mean_pairwise_cosine(clip_rows[i : i + 1], text_rows[i][None])
            self._scores[path] = scores

    def _loaded(self, request: MetricRequest) -> tuple[ImageEmbedder, TextImageEmbedder]:
        """The request's DINO and CLIP embedders, on the CPU (the run holds the accelerator), loaded once."""
        key = (request.dino_model, request.clip_model)
        if key not in self._models:
            self._models[key] = load_evaluation_models(*key)
        return self._models[key]

    def _photo_embeddings(
        self, request: MetricRequest, dino: ImageEmbedder, clip: TextImageEmbedder
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DINO and CLIP embeddings of the subject's photos, computed once per photos and models."""
        key = self._key(request)
        if key not in self._photos:
            photos = request.load_photos()
            self._photos[key] = (dino.embed_images(photos), clip.embed_images(photos))
        return self._photos[key]
