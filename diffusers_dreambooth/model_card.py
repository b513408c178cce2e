"""The model card of a trained subject, rendered from `model_cards/dreambooth.md` (shipped in the package)."""

from __future__ import annotations

import html
import re
from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .families import FAMILIES
from .subject import SubjectMetadata

TEMPLATE_NAME = "dreambooth.md"
#: Pivotal-tuning embeddings: the key in the file, and the text encoder and tokenizer it extends (diffusers' advanced
#: scripts' convention; SDXL has both, SD 1.x/2.x the first).
TEXTUAL_INVERSION_LOADS = [("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")]
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")
#: Hub tags of each family's cards, by family name.
FAMILY_TAGS = {family.name: family.hub_tags for family in FAMILIES}
#: Families that regress only the epsilon half of a learned-variance UNet: a LoRA samples with a fixed variance.
FIXED_VARIANCE_FAMILIES = ("deepfloyd-if", "deepfloyd-if-super-resolution")
TRAINING_LABELS = {
    "identifier": "identifier",
    "identifier_source": "identifier chosen",
    "max_train_steps": "steps",
    "learning_rate": "learning rate",
    "train_batch_size": "batch size (subject images per device)",
    "resolution": "resolution",
    "aspect_ratio_buckets": "aspect-ratio buckets (most elongated long/short side)",
    "with_prior_preservation": "prior preservation",
    "prior_loss_weight": "prior loss weight",
    "prior_preservation_mode": "prior preservation target (images: class images; model: the base model)",
    "num_class_images": "class images",
    "train_text_encoder": "text encoder trained",
    "train_text_encoder_ti": "pivotal tuning (new token embeddings trained)",
    "ema_decay": "EMA of the weights, decay",
    "rank": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "lora_target_modules": "LoRA target modules",
    "sr_noise_level": "noise-augmentation level of the low-resolution input",
    "seed": "seed",
}


def is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repo id (`org/name`) rather than a local path."""
    return bool(name) and HUB_ID_PATTERN.match(name) is not None and not Path(name).exists()


def base_model_license(base_model: str | None, token: str | bool | None = None) -> str | None:
    """The license in the base model's card (a local folder's README.md or the Hub repo's), when there is one."""
    if not base_model:
        return None
    try:
        card = ModelCard.load(Path(base_model) / "README.md" if Path(base_model).is_dir() else base_model, token=token)
    except Exception:  # noqa: BLE001 - a missing or unreachable card only means the license is unknown.
        return None
    return card.data.get("license")


def render_model_card(
    metadata: SubjectMetadata,
    repo_id: str,
    sample_images: list[str] | None = None,
    sample_prompt: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The card for `repo_id`: Hub metadata (base model, license, tags, widget) and a body a stranger can use.

    Local paths never reach the card: a base model given as a folder is described, not named.
    """
    subject = metadata.subjects[0]
    base_model = metadata.base_model if is_hub_id(metadata.base_model) else None
    sample_images = sample_images or []
    sample_prompt = sample_prompt or subject.instance_prompt
    tags = ["text-to-image", "diffusers", "dreambooth", *FAMILY_TAGS.get(metadata.family, (metadata.family,))]
    if metadata.adapter == "lora":
        tags.append("lora")
    card_data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        instance_prompt=subject.instance_prompt,
        widget=[{"text": sample_prompt, "output": {"url": image}} for image in sample_images] or None,
    )
    mode = "LoRA adapter" if metadata.adapter == "lora" else "full fine-tune"
    template = files("diffusers_dreambooth.model_cards").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=_markdown_text(f"DreamBooth {mode}: {', '.join(s.phrase for s in metadata.subjects)}"),
        subjects=metadata.subjects,
        other_subjects=metadata.subjects[1:],
        # The example prompt names every subject: `{sks}` for DreamBoothPipeline, the phrase for plain diffusers.
        usage_prompt=_example_prompt(["{" + s.identifier + "}" for s in metadata.subjects[1:]], "{subject}"),
        plain_prompt=_example_prompt([s.phrase for s in metadata.subjects[1:]], subject.phrase),
        repo_id=repo_id,
        adapter=metadata.adapter,
        subject_phrase=subject.phrase,
        subject_phrase_md=f"`{subject.phrase}`",
        base_model_md=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local base model",
        base_model_or_placeholder=base_model or "<base model>",
        mode_md=mode,
        pipeline_class=metadata.pipeline_class,
        fixed_variance=metadata.family in FIXED_VARIANCE_FAMILIES,
        sr_noise_level=metadata.training.get("sr_noise_level"),
        instance_prompt=subject.instance_prompt,
        sample_images=sample_images,
        sample_prompt=sample_prompt,
        sample_grid=metadata.sample_grid,
        sample_grid_prompts=metadata.sample_grid_prompts,
        training_rows=_rows(metadata.training, TRAINING_LABELS, mode),
        evaluation_rows=[(name, _format(value)) for name, value in metadata.evaluation.items()],
        textual_inversion_file=metadata.textual_inversion_weight_name,
        textual_inversion_tokens=metadata.textual_inversion_tokens,
        textual_inversion_loads=TEXTUAL_INVERSION_LOADS[: 2 if metadata.family == "stable-diffusion-xl" else 1],
    )


def subject_card(metadata: SubjectMetadata, repo_id: str, token: str | bool | None = None) -> ModelCard:
    """The card of a subject for `repo_id`, with its recorded samples and its base model's license."""
    return render_model_card(
        metadata,
        repo_id,
        sample_images=metadata.sample_images,
        sample_prompt=metadata.sample_prompt,
        license=base_model_license(metadata.base_model, token=token),
    )


def write_model_card(
    folder: str | Path, metadata: SubjectMetadata, repo_id: str, token: str | bool | None = None
) -> Path:
    """Render the card of the subject in `folder` and write it as `folder/README.md`."""
    card = subject_card(metadata, repo_id, token=token)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def _example_prompt(others: list[str], first: str) -> str:
    """ "a photo of sks dog on the beach", or with more subjects "a photo of sks dog and zwx cat on the beach"."""
    return f"a photo of {' and '.join([first, *others])} on the beach"


def _rows(values: dict, labels: dict[str, str], mode: str) -> list[tuple[str, str]]:
    rows = [("mode", mode)]
    rows += [(labels[key], _format(values[key])) for key in labels if values.get(key) is not None]
    return rows


def _format(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return _markdown_text(str(value))


def _markdown_text(text: str) -> str:
    """`text` for Markdown outside code spans: pivotal tuning's tokens (`<s0>`) would otherwise render as HTML tags,
    that is, not at all."""
    return html.escape(text, quote=False)
