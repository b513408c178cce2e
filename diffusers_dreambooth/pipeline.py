"""`DreamBoothPipeline`: a trained subject, loaded from a folder or a Hub repo, that generates with it.

It wraps a plain diffusers pipeline rather than subclassing one, so what it saves stays loadable by plain diffusers:
a full fine-tune is a `save_pretrained` folder, a LoRA subject the `pytorch_lora_weights.safetensors` file of the
base model it names; `dreambooth.json` beside them records the subject.

A cascade (DeepFloyd IF) is one subject folder per stage: stage I in the folder, its super-resolution stage II in the
`stage_2/` sub-folder (train stage II with `--output_dir <folder>/stage_2`). Each stage is full or LoRA on its own and
loads in plain diffusers from its folder; `DreamBoothPipeline` loads both and generates stage I, then upscales it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import CommitInfo, hf_hub_download, snapshot_download

from .families import family_for_pipeline
from .hub import push_subject_folder
from .model_card import write_model_card
from .pipeline_loading import load_pipeline
from .pivotal import load_token_embeddings
from .subject import SUBJECT_FILE_NAME, SUPER_RESOLUTION_FOLDER, SubjectMetadata, fill_subject

PROMPT_ARGUMENTS = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")
#: The sub-folder of a stage I subject that holds its trained super-resolution stage (DeepFloyd IF stage II).
#: Arguments of a cascade call that go to the super-resolution stage too; the others go to stage I only.
CASCADE_SHARED_ARGUMENTS = ("prompt", "negative_prompt", "generator", "num_inference_steps", "guidance_scale")


class DreamBoothPipeline:
    """A diffusers pipeline that knows its DreamBooth subject(s).

    `{subject}` in a prompt stands for the subject's identifier and class noun ("sks dog"); a model trained with
    several (`pipe.subjects` lists them) names each by `{subject_N}` (from 1, in training order) or by its identifier,
    `{<identifier>}` ("{sks}"). Prompts without placeholders pass through unchanged. Every other argument goes to
    the wrapped pipeline (`self.pipeline`) as it is.

    Example:

    ```python
    >>> import torch
    >>> from diffusers_dreambooth import DreamBoothPipeline

    >>> pipe = DreamBoothPipeline.from_pretrained("user/sks-dog", torch_dtype=torch.float16).to("cuda")
    >>> image = pipe("a photo of {subject} on the moon", num_inference_steps=30).images[0]
    ```
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        metadata: SubjectMetadata,
        weights_source: str | None = None,
        super_resolution: DreamBoothPipeline | None = None,
    ):
        self.pipeline = pipeline
        self.metadata = metadata
        self.weights_source = weights_source
        #: The trained super-resolution stage that upscales this pipeline's images, if the subject has one.
        self.super_resolution = super_resolution

    @property
    def subjects(self):
        return self.metadata.subjects

    @property
    def instance_prompt(self) -> str:
        return self.subjects[0].instance_prompt

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ) -> DreamBoothPipeline:
        """Load a trained subject from a local folder or a Hub repo id, whatever its training mode.

        A full fine-tune loads as the pipeline it is; a LoRA subject loads its recorded base model (or `base_model`)
        and applies the adapter. Other keyword arguments go to `DiffusionPipeline.from_pretrained`; weights load from
        safetensors only unless `use_safetensors=None` is passed (pickle files can run code when loaded).

        A folder or repo with a trained super-resolution stage in `stage_2/` loads as the cascade of both.
        """
        subject = cls._from_pretrained(
            pretrained_model_name_or_path,
            torch_dtype=torch_dtype,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            base_model=base_model,
            **kwargs,
        )
        hub = dict(revision=revision, token=token, cache_dir=cache_dir)
        stage_2 = _super_resolution_folder(str(pretrained_model_name_or_path), **hub)
        if stage_2 is not None:
            subject.super_resolution = cls._from_pretrained(stage_2, torch_dtype=torch_dtype, **kwargs)
        return subject

    @classmethod
    def _from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ) -> DreamBoothPipeline:
        """One stage's subject: its folder or repo, full or LoRA."""
        source = str(pretrained_model_name_or_path)
        kwargs.setdefault("use_safetensors", True)
        # diffusers >= 0.42 names it `dtype` (and warns on `torch_dtype`); both are accepted here.
        kwargs["dtype"] = kwargs.get("dtype") or torch_dtype
        hub = dict(revision=revision, token=token, cache_dir=cache_dir)
        metadata = SubjectMetadata.from_json_file(_subject_file(source, **hub))
        if metadata.adapter == "full":
            for name in _components_saved_as_none(source, **hub):
                kwargs.setdefault(name, None)  # e.g. SD3 trained without T5: diffusers reloads it only when told
            pipeline = load_pipeline(source, **hub, **kwargs)
            return cls(pipeline, metadata, source)
        base = base_model or metadata.base_model
        if not base:
            raise ValueError(
                f"`{source}` is a LoRA subject whose base model is not recorded; pass `base_model=` to load it."
            )
        pipeline = load_pipeline(
            base,
            revision=metadata.base_model_revision if base == metadata.base_model else None,
            variant=metadata.base_model_variant if base == metadata.base_model else None,
            token=token,
            cache_dir=cache_dir,
            **kwargs,
        )
        pipeline.load_lora_weights(source, weight_name=metadata.lora_weight_name, **hub)
        family = family_for_pipeline(pipeline)
        if metadata.textual_inversion_weight_name:  # pivotal tuning; a full fine-tune's tokenizers hold the tokens
            load_token_embeddings(
                pipeline,
                _resolve_file(source, metadata.textual_inversion_weight_name, **hub),
                metadata.textual_inversion_tokens,
                family.text_encoder_names,
                family.tokenizer_names,
                family.textual_inversion_keys,
            )
        family.sample_as_trained()  # as the trainer left it (IF: fixed variance)
        return cls(pipeline, metadata, source)

    def __call__(self, prompt: str | list[str] | None = None, **kwargs: Any):
        """Generate with the wrapped pipeline, `{subject}` in the prompts filled in.

        A super-resolution stage upscales at the noise level it was trained with unless `noise_level` is passed. A
        cascade generates with stage I, then upscales with the trained stage II: `prompt`, `negative_prompt`,
        `generator`, `num_inference_steps` and `guidance_scale` go to both stages, `output_type` to stage II, other
        arguments to stage I, and `super_resolution_kwargs` (a dict) to stage II only.
        """
        if prompt is not None:
            kwargs["prompt"] = prompt
        for name in PROMPT_ARGUMENTS:
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = self.fill_prompt(kwargs[name])
        if self.super_resolution is not None:
            return self._cascade(kwargs)
        noise_level = self.metadata.training.get("sr_noise_level")
        if noise_level is not None:
            kwargs.setdefault("noise_level", noise_level)
        return self.pipeline(**kwargs)

    def _cascade(self, kwargs: dict[str, Any]):
        """Stage I's images (as tensors in [-1, 1]), upscaled by the super-resolution stage."""
        stage_2_kwargs = {name: kwargs[name] for name in CASCADE_SHARED_ARGUMENTS if name in kwargs}
        stage_2_kwargs.update(kwargs.pop("super_resolution_kwargs", None) or {})
        stage_2_kwargs["output_type"] = kwargs.pop("output_type", "pil")
        images = self.pipeline(**kwargs, output_type="pt").images
        per_prompt = kwargs.get("num_images_per_prompt", 1)
        for name in ("prompt", "negative_prompt"):  # stage II takes one prompt per image
            if per_prompt > 1 and isinstance(stage_2_kwargs.get(name), list):
                stage_2_kwargs[name] = [text for text in stage_2_kwargs[name] for _ in range(per_prompt)]
            elif per_prompt > 1 and isinstance(stage_2_kwargs.get(name), str):
                stage_2_kwargs[name] = [stage_2_kwargs[name]] * per_prompt
        return self.super_resolution(image=images, **stage_2_kwargs)

    def fill_prompt(self, prompt: str | list[str]) -> str | list[str]:
        """The prompt(s) with `{subject}` replaced by the (first) subject's phrase, e.g. "sks dog", and
        `{subject_N}` or `{<identifier>}` by that subject's: with several subjects, `"{sks} next to {subject_2}"`."""
        if isinstance(prompt, str):
            return fill_subject(prompt, self.subjects)
        return [fill_subject(p, self.subjects) for p in prompt]

    def to(self, *args: Any, **kwargs: Any) -> DreamBoothPipeline:
        self.pipeline.to(*args, **kwargs)
        if self.super_resolution is not None:
            self.super_resolution.to(*args, **kwargs)
        return self

    def __getattr__(self, name: str) -> Any:
        if name in ("pipeline", "metadata", "weights_source", "super_resolution"):
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the subject so that both `DreamBoothPipeline` and plain diffusers load it.

        A full fine-tune writes the whole pipeline; a LoRA subject writes only its adapter file (the base model is
        loaded from where `dreambooth.json` says). A cascade's super-resolution stage goes to `stage_2/`.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if self.metadata.adapter == "full":
            self.pipeline.save_pretrained(save_directory)
        else:
            weights = _resolve_file(self.weights_source, self.metadata.lora_weight_name)
            if Path(weights).resolve() != (save_directory / self.metadata.lora_weight_name).resolve():
                shutil.copyfile(weights, save_directory / self.metadata.lora_weight_name)
        files = self.metadata.sample_images
        if self.metadata.textual_inversion_weight_name:
            files = [self.metadata.textual_inversion_weight_name, *files]
        for name in files:
            sample = _resolve_file(self.weights_source, name)
            (save_directory / name).parent.mkdir(parents=True, exist_ok=True)
            if Path(sample).resolve() != (save_directory / name).resolve():
                shutil.copyfile(sample, save_directory / name)
        self.metadata.to_json_file(save_directory)
        write_model_card(save_directory, self.metadata, save_directory.resolve().name)
        if self.super_resolution is not None:
            self.super_resolution.save_pretrained(save_directory / SUPER_RESOLUTION_FOLDER)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
    ) -> CommitInfo:
        """Share the subject as a Hub repo: weights, `dreambooth.json`, sample images and a model card for it."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_subject_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)


def _super_resolution_folder(source: str, **hub: Any) -> Path | None:
    """The local folder of the cascade's trained stage II (`stage_2/`), downloaded from a Hub repo; None if none."""
    root = (
        Path(source)
        if Path(source).is_dir()
        else Path(snapshot_download(source, allow_patterns=[f"{SUPER_RESOLUTION_FOLDER}/*"], **hub))
    )
    stage_2 = root / SUPER_RESOLUTION_FOLDER
    return stage_2 if (stage_2 / SUBJECT_FILE_NAME).is_file() else None


def _components_saved_as_none(source: str, **hub: Any) -> list[str]:
    """Components that `model_index.json` of a full subject lists as `[null, null]` (saved without them)."""
    path = (
        Path(source) / "model_index.json"
        if Path(source).is_dir()
        else hf_hub_download(source, "model_index.json", **hub)
    )
    model_index = json.loads(Path(path).read_text(encoding="utf-8"))
    return [name for name, value in model_index.items() if value == [None, None]]


def _subject_file(source: str, **hub: Any) -> str:
    """Path of `dreambooth.json` in a local folder, or downloaded from a Hub repo."""
    if Path(source).is_dir():
        path = Path(source) / SUBJECT_FILE_NAME
        if not path.is_file():
            raise ValueError(
                f"`{source}` has no `{SUBJECT_FILE_NAME}`, so it is not a trained DreamBooth subject. A plain pipeline"
                " loads with `DiffusionPipeline.from_pretrained`."
            )
        return str(path)
    return hf_hub_download(source, SUBJECT_FILE_NAME, **hub)


def _resolve_file(source: str | None, file_name: str, **hub: Any) -> str:
    if source is None:
        raise ValueError("This subject was not loaded from a folder or repo, so its LoRA weights cannot be copied.")
    if Path(source).is_dir():
        return str(Path(source) / file_name)
    return hf_hub_download(source, file_name, **hub)
