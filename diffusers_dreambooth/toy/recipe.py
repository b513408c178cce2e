"""The bundled toy base model and checker, and the DreamBooth run that the main job and the benchmark make on them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import DreamBoothConfig
from .world import BACKGROUNDS, CLASS_PROMPT, SUBJECT_PROMPT

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
#: The pretrained toy text-to-image model, a Stable Diffusion 1.x `save_pretrained` folder.
BASE_MODEL_DIR = PRETRAINED_DIR / "base_model"
#: The toy world's checker (`ToyChecker.from_pretrained`), its stand-in for DINO and CLIP.
CHECKER_DIR = PRETRAINED_DIR / "checker"
#: The bundled subject: four photos of the red and yellow striped star, `sks star`.
SUBJECT_PHOTOS_DIR = PRETRAINED_DIR / "subject"

#: Rows of the sample grid: the subject, the subject in new contexts, and the class it must not take over.
SAMPLE_PROMPTS = [
    "a photo of {subject}",
    "a photo of {subject} on a black background",
    "a photo of {subject} on a green background",
    CLASS_PROMPT,
    "a photo of a blue circle on a pink background",
]

#: Evaluation prompts of the toy world: the subject on each background (the paper's recontextualization).
EVALUATION_PROMPTS = ["a photo of {subject}"] + [
    f"a photo of {{subject}} on a {background} background" for background in BACKGROUNDS
]


#: The UNet layers the toy LoRA recipe adapts: attention, the transformer blocks' projections and feed-forward, and
#: the resnet blocks' convolutions and time projections. Attention alone (diffusers' default) does not bind the toy
#: subject at any learning rate, rank or alpha tried (benchmarks/RESULTS.md, issue #20).
TOY_LORA_TARGET_MODULES = (
    "to_k,to_q,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj"
)
#: The toy world's LoRA recipe (`toy_dreambooth_config(adapter="lora")`), which binds as the full fine-tune does in
#: as many steps (benchmarks/RESULTS.md, issue #20): a rank-8 adapter on `TOY_LORA_TARGET_MODULES` at lr 1e-3, the
#: text encoder frozen and the identifier a new token whose embedding trains at lr 1e-2 (pivotal tuning: the
#: frozen encoder's `sks` carries too little signal to bind), and a prior loss weighted 0.25.
TOY_LORA_RECIPE: dict[str, Any] = dict(
    adapter="lora",
    rank=8,
    learning_rate=1e-3,
    lora_target_modules=TOY_LORA_TARGET_MODULES,
    train_text_encoder=False,
    train_text_encoder_ti=True,
    text_encoder_lr=1e-2,
    instance_prompt="a photo of {identifier} star",
    prior_loss_weight=0.25,
)


def toy_dreambooth_config(
    output_dir: str | os.PathLike | None = None,
    instance_data_dir: str | os.PathLike | None = SUBJECT_PHOTOS_DIR,
    adapter: str = "full",
    **overrides: Any,
) -> DreamBoothConfig:
    """DreamBooth of the bundled subject on the bundled toy base model, with prior preservation: 1,000 steps of batch
    4 (plus 4 class images), 100 class images, sampling as the world needs (20 steps, guidance 4).

    `adapter="full"` fine-tunes the UNet and the text encoder at lr 1e-4 into `toy-sks-star/`; `adapter="lora"` trains
    `TOY_LORA_RECIPE` into `toy-sks-star-lora/`. Class images go to `output_dir/class_images`. `overrides` set any
    other option; with a `concepts_list` the bundled subject's photos, prompts and class folder are left out: each
    entry names its own."""
    if adapter not in ("full", "lora"):
        raise ValueError(f"`adapter` is `full` or `lora`, not {adapter!r}.")
    output_dir = Path(output_dir or ("toy-sks-star" if adapter == "full" else "toy-sks-star-lora"))
    options: dict[str, Any] = dict(
        pretrained_model_name_or_path=str(BASE_MODEL_DIR),
        instance_data_dir=None if instance_data_dir is None else str(instance_data_dir),
        instance_prompt=SUBJECT_PROMPT,
        with_prior_preservation=True,
        class_prompt=CLASS_PROMPT,
        class_data_dir=str(output_dir / "class_images"),
        num_class_images=100,
        output_dir=str(output_dir),
        resolution=32,
        train_batch_size=4,
        sample_batch_size=50,
        max_train_steps=1000,
        learning_rate=1e-4,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        train_text_encoder=True,
        checkpointing_steps=1000,
        seed=0,
        report_to="none",
        prior_generation_steps=20,
        prior_generation_scheduler="pipeline",  # DDIM, as the toy model is always sampled
        guidance_scale=4.0,
        num_validation_images=4,
        validation_inference_steps=20,
        sample_prompts=SAMPLE_PROMPTS,
        evaluate=True,
        evaluation_prompts=EVALUATION_PROMPTS,
        evaluation_dino_model=str(CHECKER_DIR),
        evaluation_clip_model=str(CHECKER_DIR),
    )
    if adapter == "lora":
        options.update(TOY_LORA_RECIPE)
    if overrides.get("concepts_list") is not None:
        options.update(instance_prompt=None, class_prompt=None, class_data_dir=None)
        if instance_data_dir == SUBJECT_PHOTOS_DIR:
            options["instance_data_dir"] = None
    return DreamBoothConfig(**{**options, **overrides})
