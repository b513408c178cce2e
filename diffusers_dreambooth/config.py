"""`DreamBoothConfig`: every training option in one typed dataclass.

Field names and meanings follow diffusers' `examples/dreambooth/train_dreambooth*.py`, so a command written for those
scripts parses unchanged (`HfArgumentParser` turns the fields into flags). Those scripts' defaults differ by adapter
and model family (learning rate 5e-6 for full fine-tuning, 5e-4 for SD LoRA, 1e-4 for SDXL LoRA and SD3, ...); such
fields default to None here and take the matching diffusers script's value once the family is known (`with_defaults`).
Options that those scripts accept but this trainer does not implement are parsed, and rejected with a message naming
them when set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .quantization import check_quantization_options

logger = logging.getLogger(__name__)

#: The options file a run leaves in its output folder.
CONFIG_NAME = "dreambooth_config.json"

#: Config keys that may carry secrets; they never reach a saved config, a card or a log.
SECRET_FIELDS = ("hub_token",)

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)


#: Scheduler class names for class, validation and sample images (`validation.SAMPLING_SCHEDULERS`), or `pipeline`.
SamplingScheduler = Literal["DPMSolverMultistepScheduler", "DDPMScheduler", "DDIMScheduler", "pipeline"]

#: Timestep densities and loss weightings of flow-matching training (`diffusers.training_utils`, SD3 paper Sec. 3.1).
WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]

#: `--optimizer` values, compared case-insensitively as diffusers' scripts do (their READMEs write `adamW`).
OPTIMIZERS = ("AdamW", "prodigy")

#: `--aspect_ratio_buckets` given alone (or `true` in a config file): buckets computed from `--resolution`.
AUTO_BUCKETS = "auto"

#: Options of diffusers' DreamBooth scripts that this trainer parses but cannot honour yet, with why and what to do
#: instead. Setting one to anything but its default stops the run before any model loads.
UNSUPPORTED_OPTIONS = {
    "enable_npu_flash_attention": "Ascend NPUs are not supported; remove the flag (PyTorch SDPA attention is used)",
}


#: `--remote_text_encoder_url` default: the endpoint diffusers' FLUX.2 script and model card use.
DEFAULT_REMOTE_TEXT_ENCODER_URL = "https://remote-text-encoder-flux-2.huggingface.co/predict"

#: Defaults of options that only some families' scripts set otherwise (`DreamBoothFamily.option_defaults`).
FALLBACK_DEFAULTS: dict[str, Any] = {"rank": 4, "logit_std": 1.0}


def parse_bucket_sizes(text: str) -> list[tuple[int, int]]:
    """The `(height, width)` sizes of diffusers' `--aspect_ratio_buckets` list, `"H,W;H,W;..."`.

    Example: `parse_bucket_sizes("1024,1024;768,1360")` is `[(1024, 1024), (768, 1360)]`.
    """
    sizes = []
    for pair in text.split(";"):
        sides = [side.strip() for side in pair.split(",")]
        if len(sides) != 2 or not all(side.isdigit() and int(side) > 0 for side in sides):
            raise ValueError(
                f"`--aspect_ratio_buckets` takes height,width pairs separated by `;` (e.g. `1024,1024;768,1360`), or"
                f" no value for buckets computed from `--resolution`; `{pair.strip()}` in `{text}` is not a pair of"
                " positive whole numbers."
            )
        sizes.append((int(sides[0]), int(sides[1])))
    return list(dict.fromkeys(sizes))


def concept_has_placeholder(concept: dict[str, Any]) -> bool:
    """Whether a `--concepts_list` entry's prompts hold `{identifier}`."""
    from .identifiers import IDENTIFIER_PLACEHOLDER

    return any(IDENTIFIER_PLACEHOLDER in (concept.get(key) or "") for key in ("instance_prompt", "class_prompt"))


def read_options_file(path: str | os.PathLike, what: str) -> Any:
    """The content of a YAML (`.yaml`/`.yml`) or JSON file of `what` (a config's options, a list of subjects)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The file of {what} `{path}` does not exist; fix the path.")
    text = path.read_text(encoding="utf-8")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        return yaml.safe_load(text) if is_yaml else json.loads(text)
    except (yaml.YAMLError, ValueError) as error:
        raise ValueError(f"`{path}` is not valid {'YAML' if is_yaml else 'JSON'}: {error}") from error


def _option(default: Any, help: str, *, repr: bool = True, **kwargs: Any) -> Any:
    """A dataclass field whose one-line help becomes the CLI help; `repr=False` keeps it out of the config's repr."""
    return field(default=default, repr=repr, metadata={"help": help, **kwargs})


#: The keys of one `--concepts_list` entry (diffusers' multi-subject script's, plus `identifier`).
CONCEPT_KEYS = ("instance_data_dir", "instance_prompt", "class_prompt", "class_data_dir", "identifier")


@dataclass
class SubjectData:
    """One subject of a run: where its photos are, how they are prompted, and the class images of its prior.

    A run with `--concepts_list` has one per entry; any other run one, from the top-level options (its photos may
    then come from `--dataset_name` instead of a folder).
    """

    instance_data_dir: str | None
    instance_prompt: str | None
    class_prompt: str | None = None
    class_data_dir: str | None = None
    identifier: str | None = None


@dataclass
class DreamBoothConfig:
    """Options of a DreamBooth run (Ruiz et al., CVPR 2023), named as in diffusers' DreamBooth scripts.

    Example:

    ```python
    >>> from diffusers_dreambooth import DreamBoothConfig

    >>> config = DreamBoothConfig(
    ...     pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ...     instance_data_dir="dog",
    ...     instance_prompt="a photo of sks dog",
    ...     with_prior_preservation=True,
    ...     class_prompt="a photo of dog",
    ...     class_data_dir="class-dog",
    ...     adapter="lora",
    ... )
    ```
    """

    # Model
    pretrained_model_name_or_path: str | None = _option(
        None, "Base pipeline: a Hub repo id or a local diffusers folder (model_index.json)."
    )
    revision: str | None = _option(None, "Revision (branch, tag or commit) of the base model on the Hub.")
    variant: str | None = _option(None, "Weight variant of the base model files, e.g. `fp16`.")
    tokenizer_name: str | None = _option(None, "Tokenizer to use instead of the base pipeline's own.")
    pretrained_vae_model_name_or_path: str | None = _option(
        None, "VAE to use instead of the base pipeline's (e.g. an fp16-safe SDXL VAE)."
    )
    allow_pickle: bool = _option(
        False,
        "Also load base-model and evaluation-model weights stored as pickle (`.bin`/`.ckpt`), which can run code"
        " when loaded; only for files you trust. Default: safetensors only.",
    )
    adapter: Literal["full", "lora"] = _option(
        "full", "What is trained: `full` fine-tunes the denoiser's weights, `lora` trains PEFT LoRA adapters."
    )

    # Subject data
    instance_data_dir: str | None = _option(None, "Folder with the subject's photos.")
    dataset_name: str | None = _option(
        None, "A `datasets` dataset (Hub id or local folder) with the subject's photos, instead of instance_data_dir."
    )
    dataset_config_name: str | None = _option(None, "Configuration name of `dataset_name`.")
    image_column: str = _option("image", "Column of `dataset_name` holding the images.")
    caption_column: str | None = _option(
        None, "Column of `dataset_name` holding per-image prompts; without it every image uses instance_prompt."
    )
    cache_dir: str | None = _option(None, "Where downloaded models and datasets are cached.")
    repeats: int = _option(1, "How many times each subject photo is repeated in an epoch.")
    instance_prompt: str | None = _option(
        None,
        "Prompt with the identifier and class noun for the subject's photos, e.g. `a photo of sks dog`, or"
        " `a photo of {identifier} dog` with `--identifier`.",
    )
    identifier: str | None = _option(
        None,
        "The identifier [V] that `{identifier}` stands for in the prompts: a word such as `sks`, or `auto` for the"
        " rarest single token of the base model's own tokenizers (`diffusers_dreambooth.identifiers`).",
    )
    concepts_list: list[dict[str, Any]] | str | None = _option(
        None,
        "Several subjects trained together: a JSON or YAML file (or, in a config file, the list itself) of entries"
        " with `instance_data_dir`, `instance_prompt` and, for prior preservation, `class_prompt` and"
        " `class_data_dir` (optional `identifier`), as diffusers' multi-subject script reads it.",
    )

    # Prior preservation (DreamBooth Sec. 3.3)
    with_prior_preservation: bool = _option(False, "Add the class-specific prior-preservation loss.")
    prior_loss_weight: float = _option(1.0, "Weight lambda of the prior-preservation loss.")
    prior_preservation_mode: Literal["images", "model"] = _option(
        "images",
        "`images`: the paper's loss on class images the base model generated; `model`: no class images, the target is"
        " the frozen base model's own prediction for the class prompt on the same noisy latents.",
    )
    prior_backward: Literal["joint", "separate"] = _option(
        "joint",
        "`joint`: a prior-preservation batch runs forward and backward as one (diffusers' scripts); `separate`: its"
        " subject half, then its prior half (the class images, or with `--prior_preservation_mode model` the"
        " class-prompted copy), each forward and backward in turn, so only half its activations are held at once:"
        " the same gradients, summed, for slower steps (1.4x on a CPU).",
    )
    class_prompt: str | None = _option(None, "Prompt for the class images, e.g. `a photo of dog`.")
    class_data_dir: str | None = _option(
        None, "Folder of class images; missing ones are generated there by the frozen base model."
    )
    num_class_images: int = _option(100, "How many class images prior preservation uses (generated if missing).")
    sample_batch_size: int = _option(
        4,
        "Batch size for generating images (class, validation, sample and evaluation images) and for caching"
        " latents: larger is faster and takes more memory.",
    )
    prior_generation_precision: Literal["no", "fp32", "fp16", "bf16"] | None = _option(
        None, "Precision of class-image generation (autocast); default: fp16 on GPU, fp32 on CPU."
    )
    prior_generation_steps: int = _option(
        25, "Denoising steps per class image (25 with DPM-Solver++; diffusers' scripts: 50 with the pipeline's own)."
    )
    prior_generation_scheduler: SamplingScheduler = _option(
        "DPMSolverMultistepScheduler", "Scheduler of class-image generation; `pipeline` keeps the pipeline's own."
    )

    # Images
    resolution: int | None = _option(
        None, "Training resolution; images are resized and cropped to it. Default: 512 (SD, SD3), 1024 (SDXL)."
    )
    center_crop: bool = _option(False, "Center-crop images instead of cropping at a random position.")
    random_flip: bool = _option(False, "Flip images horizontally at random.")
    aspect_ratio_buckets: str | None = _option(
        None,
        "Crop each image to the bucket closest to its aspect ratio, not a square: alone, buckets of about"
        " resolution**2 pixels; or diffusers' list of height,width pairs, e.g. `1024,1024;768,1360;1360,768`.",
        nargs="?",
        const=AUTO_BUCKETS,
    )
    use_aspect_ratio_buckets: bool = _option(
        False, "Same as --aspect_ratio_buckets alone (the name in diffusers' FLUX.2 klein and Z-Image scripts)."
    )
    bucket_step: int | None = _option(
        None, "With --aspect_ratio_buckets: bucket sides are multiples of this. Default: resolution/16 (64 at 1024)."
    )
    bucket_max_aspect_ratio: float = _option(
        2.0, "With --aspect_ratio_buckets: the most elongated bucket's long side over its short side."
    )
    image_interpolation_mode: Literal["bilinear", "bicubic", "lanczos", "nearest", "box", "hamming"] | None = _option(
        None, "Resampling filter used to resize images. Default: bilinear (full, SD3), lanczos (SD/SDXL LoRA)."
    )

    # Training
    output_dir: str | None = _option(
        None, "Where checkpoints and the trained subject go. Default: dreambooth-model (full), lora-dreambooth-model."
    )
    seed: int | None = _option(None, "Seed for reproducible training; a resumed run then matches an unbroken one.")
    train_text_encoder: bool = _option(False, "Also fine-tune the text encoder(s).")
    train_text_encoder_ti: bool = _option(
        False,
        "Pivotal tuning: add new tokens (`<s0>`, ...) to every tokenizer and train only their embeddings, with the"
        " denoiser. `{identifier}` in the prompts becomes the new tokens; SD 1.x/2.x and SDXL only.",
    )
    num_new_tokens_per_abstraction: int = _option(
        1, "How many new tokens `--train_text_encoder_ti` adds (`<s0><s1>` for 2); diffusers' default is 2."
    )
    train_batch_size: int = _option(4, "Subject images per device per step (as many class images are added).")
    num_train_epochs: int = _option(1, "Epochs to train; overridden by max_train_steps.")
    max_train_steps: int | None = _option(None, "Total optimizer steps; overrides num_train_epochs.")
    checkpointing_steps: int = _option(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _option(None, "Keep at most this many checkpoints (oldest removed).")
    resume_from_checkpoint: str | None = _option(
        None, "Resume from `latest` or a checkpoint folder (`checkpoint-N`, or a path)."
    )
    gradient_accumulation_steps: int = _option(1, "Micro-batches accumulated per optimizer step.")
    gradient_checkpointing: bool = _option(False, "Recompute activations in backward to save memory.")
    learning_rate: float | None = _option(
        None, "Learning rate after warm-up. Default: 5e-6 (full), 5e-4 (SD LoRA), 1e-4 (SDXL LoRA, SD3)."
    )
    text_encoder_lr: float | None = _option(None, "Learning rate of the text encoder(s); default: learning_rate.")
    scale_lr: bool = _option(False, "Scale the learning rate by processes x batch size x gradient accumulation steps.")
    lr_scheduler: str = _option("constant", f"Learning-rate schedule, one of {', '.join(LR_SCHEDULERS)}.")
    lr_warmup_steps: int = _option(500, "Warm-up steps of the learning-rate schedule.")
    lr_num_cycles: int = _option(1, "Hard restarts of `cosine_with_restarts`.")
    lr_power: float = _option(1.0, "Power of the `polynomial` schedule.")
    optimizer: str = _option("AdamW", "Optimizer: AdamW or prodigy (any case, as in diffusers' scripts).")
    use_8bit_adam: bool = _option(False, "Use bitsandbytes' 8-bit AdamW (needs `pip install bitsandbytes`).")
    adam_beta1: float = _option(0.9, "Adam beta1.")
    adam_beta2: float = _option(0.999, "Adam beta2.")
    adam_weight_decay: float | None = _option(
        None, "Weight decay of the denoiser's parameters. Default: 1e-2, 1e-4 for SDXL LoRA and SD3."
    )
    adam_weight_decay_text_encoder: float = _option(1e-3, "Weight decay of the text encoder(s)' parameters.")
    adam_epsilon: float = _option(1e-8, "Adam epsilon.")
    prodigy_beta3: float | None = _option(None, "Prodigy beta3 (prodigy optimizer only).")
    prodigy_decouple: bool = _option(True, "Prodigy decoupled weight decay (prodigy optimizer only).")
    prodigy_use_bias_correction: bool = _option(True, "Prodigy bias correction (prodigy optimizer only).")
    prodigy_safeguard_warmup: bool = _option(True, "Prodigy safeguard warm-up (prodigy optimizer only).")
    max_grad_norm: float = _option(1.0, "Clip gradients to this norm.")
    use_ema: bool = _option(
        False,
        "Keep an exponential moving average of the trained weights (diffusers' EMAModel; LoRA: of the adapter weights"
        " only) and save it as the final weights; checkpoints hold it, so resuming stays exact.",
    )
    ema_decay: float = _option(0.9999, "Highest decay of `--use_ema` (the decay ramps up as (1 + n) / (10 + n)).")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _option(
        None, "Mixed precision; default: accelerate's config. bf16 also works on CPU."
    )
    allow_tf32: bool = _option(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    snr_gamma: float | None = _option(None, "Min-SNR loss weighting gamma (5.0 is common); off when unset.")
    weighting_scheme: WeightingScheme | None = _option(
        None,
        "Flow matching (SD3, Flux): timestep density or loss weighting; default: as diffusers' scripts, logit_normal"
        " for SD3, none (uniform) for Flux.",
    )
    logit_mean: float = _option(0.0, "Flow matching: mean of the `logit_normal` timestep density.")
    logit_std: float | None = _option(
        None,
        "Flow matching: std of the `logit_normal` timestep density; default: the family's script's (1.0;"
        " Ideogram 4: 1.5).",
    )
    mode_scale: float = _option(1.29, "Flow matching: scale of the `mode` timestep density.")
    precondition_outputs: int | None = _option(
        None,
        "Flow matching: 1 reads the prediction as a clean-latent estimate, regressed on the latents. Default: as"
        " diffusers' scripts, 1 for SD3, 0 for Flux.",
    )
    offset_noise: bool = _option(False, "Add offset noise (0.1 x per-channel noise) to the training noise.")
    noise_offset: float = _option(0.1, "Scale of the offset noise when offset_noise is on.")
    pre_compute_text_embeddings: bool = _option(
        False, "Encode prompts once before training (always done when the text encoders are frozen)."
    )
    tokenizer_max_length: int | None = _option(None, "Tokenizer max length; default: the tokenizer's own.")
    max_sequence_length: int | None = _option(
        None, "T5 tokens per prompt (SD3, Flux); default: as diffusers' scripts, 77 (Flux LoRA: 512)."
    )
    text_encoder_use_attention_mask: bool = _option(
        False, "Accepted for compatibility: DeepFloyd IF's T5 always reads its attention mask, as IF's pipelines do."
    )
    sr_noise_level: int | None = _option(
        None,
        "DeepFloyd IF stage II: the noise-augmentation level (a timestep of `image_noising_scheduler`) of the"
        " low-resolution input, in training and in the cascade. Default: 0, IF's lowest, where the DreamBooth paper's"
        " 1e-5 falls (IF samples at 250).",
    )
    set_grads_to_none: bool = _option(True, "Free gradients with set_to_none (always on; kept for compatibility).")
    dataloader_num_workers: int = _option(0, "Accepted for compatibility; images are cached in memory instead.")
    cache_latents: bool = _option(
        False, "Accepted for compatibility; latents of images whose crop never changes are always cached."
    )
    offload: bool = _option(
        False,
        "Accepted for compatibility: on a GPU the VAE and frozen text encoders always leave it while no step runs"
        " them (latents and prompts cached); a VAE that encodes random crops every step stays.",
    )
    enable_xformers_memory_efficient_attention: bool = _option(
        False, "Use xFormers attention (needs xformers); PyTorch SDPA is used otherwise."
    )
    local_rank: int = _option(-1, "Set by distributed launchers; use `accelerate launch` instead.")

    # LoRA
    rank: int | None = _option(None, "LoRA rank; default: the family's script's (4; Krea 2: 32).")
    lora_alpha: int | None = _option(None, "LoRA alpha; default: equal to rank (scale 1).")
    lora_dropout: float = _option(0.0, "LoRA dropout.")
    lora_target_modules: str | None = _option(
        None, "Comma-separated module names that get LoRA in the denoiser; default: the family's attention layers."
    )
    lora_layers: str | None = _option(None, "Same as lora_target_modules (the name in diffusers' SD3 LoRA script).")
    lora_blocks: str | None = _option(
        None, "Comma-separated numbers of the transformer blocks that get LoRA (SD3), e.g. `12,30`; default: all."
    )
    use_dora: bool = _option(False, "Train DoRA (weight-decomposed LoRA) instead of LoRA.")

    # Saving
    skip_save_text_encoder: bool = _option(False, "Do not save the trained text encoder in the final pipeline.")
    upcast_before_saving: bool = _option(
        False, "Accepted for compatibility; LoRA weights train, and are saved, in float32 whatever the precision."
    )

    # Validation and logging
    validation_prompt: str | None = _option(
        None, "Prompt for validation images during training; `{subject}` (`{subject_2}`, ...) as in `sample_prompts`."
    )
    num_validation_images: int = _option(4, "Validation images per validation run.")
    num_validation_class_images: int = _option(
        0,
        "Images of the class prompt (the first subject's `--class_prompt`, no identifier) drawn at each validation"
        " too, as `validation/step-N/class-{i}.png`: the web app plots language drift from them. Default 0: none,"
        " so validation costs what diffusers' does.",
    )
    validation_steps: int | None = _option(
        None, "Run validation every N optimizer steps. Default: 100 (full); LoRA runs use validation_epochs."
    )
    validation_epochs: int | None = _option(
        None, "Run validation every N epochs (N x steps per epoch). Default: 50 for LoRA, as diffusers' LoRA scripts."
    )
    validation_inference_steps: int = _option(25, "Denoising steps of validation images.")
    validation_scheduler: SamplingScheduler = _option(
        "DPMSolverMultistepScheduler", "Scheduler of validation and sample images; `pipeline`: the pipeline's own."
    )
    guidance_scale: float | None = _option(
        None,
        "Classifier-free guidance of class, validation, sample and evaluation images; default: the pipeline's. Flux:"
        " the distilled guidance it samples and trains with (default 3.5, as diffusers' Flux scripts).",
    )
    final_validation_prompt: str | None = _option(
        None, "Prompt of the sample images written after training when --validation_prompt is unset."
    )
    skip_final_inference: bool = _option(
        False, "Write no sample images after training (the `samples` stage); validation during training still runs."
    )
    sample_prompts: list[str] | None = _option(
        None,
        "Rows of a sample grid written after training (samples/grid.png), `{subject}` standing for identifier and"
        " class noun (`{subject_2}`, ... for further subjects); the first row also gives the card's sample images."
        " Default: no grid.",
    )
    report_to: str = _option("tensorboard", "Tracker(s): tensorboard, wandb, comet_ml, all or none.")
    logging_dir: str = _option("logs", "Tracker log folder, relative to output_dir.")

    # Evaluation after training
    evaluate: bool = _option(
        False, "After training, compute the paper's DINO, CLIP-I, CLIP-T, PRES and DIV; they go into the model card."
    )
    evaluation_prompts: list[str] | None = _option(
        None,
        "Evaluation prompts, `{subject}` standing for the evaluated subject's identifier and class noun; default: the"
        " paper's 25.",
    )
    evaluation_images_per_prompt: int = _option(4, "Images generated per evaluation prompt (the paper: 4).")
    evaluation_dino_model: str = _option(
        "facebook/dino-vits16", "DINO model (repo id or folder) for DINO and PRES, or a toy checker folder."
    )
    evaluation_clip_model: str = _option(
        "openai/clip-vit-base-patch32",
        "CLIP model (repo id or folder) for CLIP-I and CLIP-T, or a toy checker folder.",
    )

    # Hub
    push_to_hub: bool = _option(False, "Push the trained subject to the Hub.")
    hub_token: str | None = _option(None, "Hub token; never written to any file or log.", repr=False)
    hub_model_id: str | None = _option(None, "Hub repo id to push to; default: the output_dir's name.")

    # Diffusers options of other families or features, parsed so drop-in commands fail clearly.
    class_labels_conditioning: str | None = _option(
        None,
        "diffusers' IF stage II option (`timesteps`); accepted for stage II, which is conditioned on its"
        " `--sr_noise_level` as the pipeline samples, not on the timestep.",
    )
    validation_images: list[str] | None = _option(
        None, "Low-resolution images a super-resolution stage (IF stage II) upscales with `--validation_prompt`."
    )
    output_kohya_format: bool = _option(
        False, "Also write the LoRA as `pytorch_lora_weights_kohya.safetensors` (AUTOMATIC1111/ComfyUI format)."
    )
    do_edm_style_training: bool = _option(
        False, "SDXL: EDM-style training on Euler sigmas; always on with an EDM scheduler (Playground v2.5)."
    )
    do_fp8_training: bool = _option(
        False,
        "The denoiser's linear layers compute in FP8 (torchao), as diffusers' FLUX.2, Z-Image, Krea 2 and Ideogram 4"
        " scripts; needs torchao and a GPU of compute capability 8.9+ (or the CPU).",
    )
    bnb_quantization_config_path: str | None = _option(
        None,
        "JSON file of the arguments of a bitsandbytes `BitsAndBytesConfig` (`load_in_4bit` and `bnb_4bit_quant_type`"
        " `nf4`, say) quantizing the frozen base denoiser for LoRA (QLoRA), as diffusers' FLUX.2 script does.",
    )
    quantize_base: Literal["nf4", "int8"] | None = _option(
        None, "Quantize the frozen base denoiser for LoRA (QLoRA): 4-bit NF4 or 8-bit bitsandbytes weights."
    )
    quantize_text_encoders: bool = _option(
        False, "Quantize the frozen text encoders too, as `--quantize_base`/`--bnb_quantization_config_path` say."
    )
    remote_text_encoder: bool = _option(
        False,
        "FLUX.2 [dev], LoRA: prompt embeddings from Hugging Face's hosted text encoder (needs a Hub token), so its"
        " Mistral 3 never loads.",
    )
    remote_text_encoder_url: str = _option(
        DEFAULT_REMOTE_TEXT_ENCODER_URL, "Endpoint of `--remote_text_encoder` (diffusers' FLUX.2 script's)."
    )
    fsdp_text_encoder: bool = _option(
        False,
        "FLUX.2, FLUX.2 [klein], Z-Image, Ideogram 4: shard the frozen LLM text encoder over the processes with FSDP"
        " while prompts are encoded (`text_encoder_sharding`).",
    )
    enable_npu_flash_attention: bool = _option(False, "Flash attention on Ascend NPUs; not supported.")
    enable_vae_tiling: bool = _option(
        False, "Sana: tile the DC-AE for validation and card samples, as diffusers' Sana script does."
    )
    validation_model_path: str | None = _option(
        None,
        "Krea 2, LoRA: the checkpoint (Krea 2 Turbo) that validation and card samples are drawn by, with the adapter"
        " trained so far loaded on it; default: the trained model.",
    )
    validation_num_inference_steps: int = _option(8, "Steps of sampling on `--validation_model_path` (Krea 2).")
    validation_guidance_scale: float = _option(0.0, "Guidance of sampling on `--validation_model_path` (Krea 2).")
    disable_training_autocast: bool = _option(
        False,
        "Ideogram 4: no autocast anywhere in the run (training, validation, samples): the transformer computes in its"
        " own dtype (`--mixed_precision`'s for the frozen base) on inputs cast to it, as the pipeline samples.",
    )
    upsample_prompt: bool = _option(
        False,
        "Ideogram 4 (LoRA): rewrite every prompt (captions, instance and class prompts, the validation prompt) into"
        " its JSON caption schema with the pipeline's prompt enhancer (`--prompt_enhancer_head_id`), seeded by"
        " `--seed`, before it is encoded.",
    )
    prompt_enhancer_head_id: str = _option(
        "diffusers/qwen3-vl-8b-instruct-lm-head", "Ideogram 4's prompt-enhancer head, for `--upsample_prompt`."
    )
    caption_dropout: float = _option(
        0.0, "FLUX.2 [klein]: probability that a subject example trains on the empty prompt (class examples never)."
    )
    vae_encode_mode: Literal["sample", "mode"] | None = _option(
        None,
        "Latent of an image: a `sample` of the VAE's posterior, or its `mode`; default: the family's (`mode` for"
        " FLUX.1 Kontext, as its diffusers script; `sample` otherwise).",
    )
    cond_image_column: str | None = _option(
        None,
        "Column of `dataset_name` with each example's condition image (FLUX.1 Kontext image-to-image: the model learns"
        " to turn it into the `image_column` image, as `caption_column` instructs).",
    )
    validation_image: str | None = _option(
        None, "FLUX.1 Kontext: an image that validation edits with `validation_prompt` (at the training resolution)."
    )
    text_encoder_out_layers: list[int] | None = _option(
        None,
        "FLUX.2: the text-encoder hidden states stacked into prompt embeddings; default [dev] 10 20 30, [klein]"
        " 9 18 27 (its pipeline's).",
    )
    pretrained_tokenizer_4_name_or_path: str | None = _option(
        None,
        "HiDream: its Llama tokenizer; default the pipeline folder's `tokenizer_4`, else diffusers' default"
        " meta-llama/Meta-Llama-3.1-8B-Instruct.",
    )
    pretrained_text_encoder_4_name_or_path: str | None = _option(
        None,
        "HiDream: its Llama text encoder; default the pipeline folder's `text_encoder_4`, else diffusers' default"
        " meta-llama/Meta-Llama-3.1-8B-Instruct.",
    )
    complex_human_instruction: str | None = _option(
        None, "Sana: instruction text Gemma reads before each prompt (none unless given, as diffusers' script)."
    )
    system_prompt: str | None = _option(None, "Lumina 2: system prompt before each prompt (default: the pipeline's).")

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "lora-dreambooth-model" if self.adapter == "lora" else "dreambooth-model"
        if self.validation_steps is None and self.validation_epochs is None:
            if self.adapter == "lora":
                self.validation_epochs = 50
            else:
                self.validation_steps = 100
        self._check_concepts()
        self._check_subject_data()
        self._check_identifier()
        self._check_subject_numbers()
        self._check_pivotal_tuning()
        self._check_prior_preservation()
        self._check_training()
        self._check_mixed_precision()
        self._check_lora()
        self._check_unsupported()
        check_quantization_options(self)
        if self.num_validation_class_images < 0:
            raise ValueError(
                f"`--num_validation_class_images` must be 0 or more, got {self.num_validation_class_images}."
            )
        if self.num_validation_class_images and not self.subject_data()[0].class_prompt:
            raise ValueError(
                "`--num_validation_class_images` draws images of `--class_prompt` at each validation; pass it (e.g."
                " `a photo of dog`) or set it to 0."
            )
        if self.evaluate and not all(subject.class_prompt for subject in self.subject_data()):
            raise ValueError(
                "`--evaluate` measures prior preservation (PRES) on `--class_prompt`; pass it (e.g. `a photo of dog`),"
                " for every subject of `--concepts_list`."
            )

    @property
    def has_concepts(self) -> bool:
        """Whether the subjects come from `--concepts_list` (one or several) rather than the top-level options."""
        return self.concepts_list is not None

    def subject_data(self) -> list[SubjectData]:
        """The run's subjects: one per `--concepts_list` entry, else the one of the top-level options."""
        if self.has_concepts:
            return [SubjectData(**concept) for concept in self.concepts_list]
        return [
            SubjectData(
                self.instance_data_dir, self.instance_prompt, self.class_prompt, self.class_data_dir, self.identifier
            )
        ]

    def _check_concepts(self) -> None:
        """Read `--concepts_list` into a list of complete entries; the top-level subject options must be unset."""
        if self.concepts_list is None:
            return
        source = "`--concepts_list`"
        if isinstance(self.concepts_list, str):
            source = f"`--concepts_list={self.concepts_list}`"
            self.concepts_list = read_options_file(self.concepts_list, "a list of subjects")
        if not isinstance(self.concepts_list, list) or not self.concepts_list:
            raise ValueError(
                f"{source} must be a non-empty list of subjects, each a mapping with `instance_data_dir` and"
                " `instance_prompt`."
            )
        top_level = ("instance_data_dir", "dataset_name", "instance_prompt", "class_prompt", "class_data_dir")
        given = [f"`--{name}`" for name in top_level if getattr(self, name) is not None]
        if given:
            raise ValueError(
                f"{source} lists the subjects, so {', '.join(given)} must not be set as well; put them in the list's"
                " entries (one per subject)."
            )
        concepts = []
        for index, concept in enumerate(self.concepts_list):
            where = f"{source}, entry {index}"
            if not isinstance(concept, dict):
                raise ValueError(f"{where} must be a mapping of {', '.join(CONCEPT_KEYS)}, got {concept!r}.")
            unknown = sorted(set(concept) - set(CONCEPT_KEYS))
            if unknown:
                raise ValueError(
                    f"{where} has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(CONCEPT_KEYS)}."
                )
            for key in ("instance_data_dir", "instance_prompt"):
                if not str(concept.get(key) or "").strip():
                    raise ValueError(f"{where} needs `{key}` (e.g. `dog` and `a photo of sks dog`).")
            concepts.append({key: concept.get(key) for key in CONCEPT_KEYS})
        self.concepts_list = concepts
        self._check_class_folders()

    def _check_class_folders(self) -> None:
        """Subjects may share a class folder only if they share its prompt: it holds one prompt's class images."""
        prompts: dict[str, str | None] = {}
        for subject in self.subject_data():
            if subject.class_data_dir is None:
                continue
            folder = os.path.normpath(subject.class_data_dir)
            if prompts.setdefault(folder, subject.class_prompt) != subject.class_prompt:
                raise ValueError(
                    f"`--concepts_list` gives the class folder `{subject.class_data_dir}` two class prompts"
                    f" ({prompts[folder]!r} and {subject.class_prompt!r}); a folder holds the images of one class"
                    " prompt, so give each prompt its own folder."
                )

    def _check_subject_data(self) -> None:
        if self.has_concepts:
            self._check_images_options()
            return
        if self.instance_data_dir is None and self.dataset_name is None:
            raise ValueError("Pass the subject's photos with `--instance_data_dir` (a folder) or `--dataset_name`.")
        if self.instance_data_dir is not None and self.dataset_name is not None:
            raise ValueError(
                f"Got both `--instance_data_dir={self.instance_data_dir}` and `--dataset_name={self.dataset_name}`;"
                " pass only one of them."
            )
        if not (self.instance_prompt or "").strip() and not (self.dataset_name and self.caption_column):
            raise ValueError(
                "`--instance_prompt` is required (e.g. `a photo of sks dog`), unless every image has a caption"
                " through `--dataset_name` and `--caption_column`."
            )
        if self.cond_image_column and (self.dataset_name is None or self.with_prior_preservation):
            raise ValueError(
                "`--cond_image_column` names a column of `--dataset_name` (the condition of each target image), and"
                " class images have no condition image: pass the pairs with `--dataset_name`, without"
                " `--with_prior_preservation` (as diffusers' FLUX.1 Kontext script requires)."
            )
        self._check_images_options()

    def _check_images_options(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"`--repeats` must be at least 1, got {self.repeats}.")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"`--resolution` must be a positive multiple of 8, got {self.resolution}.")
        self._check_buckets()

    def _check_buckets(self) -> None:
        """`--aspect_ratio_buckets` is off (None), `auto` (given alone, or `true` in a file) or diffusers' list of
        sizes, kept as `"H,W;H,W"`; `--bucket_*` options shape the `auto` buckets only, which must be possible."""
        self.aspect_ratio_buckets = self._normalized_buckets()
        if self.aspect_ratio_buckets != AUTO_BUCKETS:
            changed = [
                f"`--{name}`"
                for name, default in (("bucket_step", None), ("bucket_max_aspect_ratio", 2.0))
                if getattr(self, name) != default
            ]
            if changed:
                logger.warning(
                    "%s ignored: it shapes the buckets `--aspect_ratio_buckets` computes when given alone.",
                    ", ".join(changed),
                )
            return
        if self.bucket_max_aspect_ratio < 1.0:
            raise ValueError(
                f"`--bucket_max_aspect_ratio` is a long side over a short side, at least 1.0 (square buckets only),"
                f" got {self.bucket_max_aspect_ratio}."
            )
        if self.bucket_step is not None and self.bucket_step < 1:
            raise ValueError(f"`--bucket_step` must be a positive number of pixels, got {self.bucket_step}.")

    def _normalized_buckets(self) -> str | None:
        value = self.aspect_ratio_buckets
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", AUTO_BUCKETS):
            value = AUTO_BUCKETS
        elif value is True:
            value = AUTO_BUCKETS
        elif value is False or (isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "")):
            value = None
        if value is None and self.use_aspect_ratio_buckets:
            return AUTO_BUCKETS
        if value in (None, AUTO_BUCKETS):
            return value
        return ";".join(f"{height},{width}" for height, width in parse_bucket_sizes(str(value)))

    @property
    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The `(height, width)` sizes of an explicit `--aspect_ratio_buckets` list; None when off or `auto`."""
        if self.aspect_ratio_buckets in (None, AUTO_BUCKETS):
            return None
        return parse_bucket_sizes(self.aspect_ratio_buckets)

    def _check_identifier(self) -> None:
        """`{identifier}` in a prompt needs `--identifier`; the identifier must be one word."""
        from .identifiers import IDENTIFIER_PLACEHOLDER

        if self.identifier is not None and (not self.identifier.strip() or len(self.identifier.split()) > 1):
            raise ValueError(f"`--identifier` must be one word such as `sks`, or `auto`, got {self.identifier!r}.")
        if self.has_concepts:
            self._check_concept_identifiers()
            return
        if self.identifier is None and not self.train_text_encoder_ti:
            for name, text in self.identifier_prompts().items():
                if IDENTIFIER_PLACEHOLDER in text:
                    raise ValueError(
                        f"`--{name}` contains `{IDENTIFIER_PLACEHOLDER}` ({text!r}) but no identifier is set. Pass"
                        " `--identifier auto` to pick a rare token from the model's tokenizers, or `--identifier`"
                        " with a word of your own (e.g. `sks`)."
                    )

    def _check_concept_identifiers(self) -> None:
        """Each subject has its own identifier: an entry's `identifier`, or with `--identifier auto` a rare token of
        its own; `{identifier}` in the run-wide prompts is ambiguous with several subjects."""
        from .identifiers import AUTO_IDENTIFIER, IDENTIFIER_PLACEHOLDER

        if self.identifier not in (None, AUTO_IDENTIFIER) and len(self.concepts_list) > 1:
            raise ValueError(
                f"`--identifier={self.identifier}` would give all {len(self.concepts_list)} subjects of"
                " `--concepts_list` the same identifier; set `identifier` in each entry, or pass `--identifier auto`"
                " for a rare token per subject."
            )
        for index, concept in enumerate(self.concepts_list):
            identifier = concept["identifier"]
            if identifier is not None and (not str(identifier).strip() or len(str(identifier).split()) > 1):
                raise ValueError(
                    f"`--concepts_list` entry {index}: `identifier` must be one word such as `sks`, or `auto`, got"
                    f" {identifier!r}."
                )
            if concept_has_placeholder(concept) and identifier is None and self.identifier is None:
                raise ValueError(
                    f"`--concepts_list` entry {index} writes `{IDENTIFIER_PLACEHOLDER}`"
                    f" ({concept['instance_prompt']!r}) but no identifier is set: give the entry an `identifier`"
                    " (e.g. `sks`), or pass `--identifier auto` for a rare token per subject."
                )
        if len(self.concepts_list) > 1:
            for name, text in self.identifier_prompts(run_wide_only=True).items():
                if IDENTIFIER_PLACEHOLDER in text:
                    raise ValueError(
                        f"`--{name}` contains `{IDENTIFIER_PLACEHOLDER}` ({text!r}), which is ambiguous with several"
                        " subjects: write `{subject_1}`, `{subject_2}`, ... for the subjects in list order"
                        " (`{subject}` is the first), or `{<identifier>}` (e.g. `{sks}`) for a subject by its"
                        " identifier."
                    )

    def _check_subject_numbers(self) -> None:
        """`{subject_N}` in the run-wide prompts names one of the run's subjects."""
        from .subject import NUMBERED_SUBJECT

        count = len(self.subject_data())
        if count == 1:
            valid = "write `{subject}` (or `{subject_1}`)"
        else:
            valid = f"number them from `{{subject_1}}` to `{{subject_{count}}}`, in `--concepts_list` order"
        for name, text in self.identifier_prompts(run_wide_only=True).items():
            for number in NUMBERED_SUBJECT.findall(text):
                if not 1 <= int(number) <= count:
                    raise ValueError(
                        f"`--{name}` names `{{subject_{number}}}` ({text!r}), but the run trains {count} subject(s):"
                        f" {valid}."
                    )

    def identifier_prompts(self, run_wide_only: bool = False) -> dict[str, str]:
        """The prompts where `{identifier}` is filled in, by option name (list items indexed: `sample_prompts[0]`,
        `concepts_list[1].instance_prompt`); `run_wide_only` leaves out the subjects' own prompts."""
        run_wide = ("validation_prompt", "final_validation_prompt")
        names = run_wide if run_wide_only else ("instance_prompt", "class_prompt", *run_wide)
        prompts = {name: getattr(self, name) for name in names}
        for name in ("sample_prompts", "evaluation_prompts"):
            prompts.update((f"{name}[{i}]", p) for i, p in enumerate(getattr(self, name) or []))
        if not run_wide_only:
            for i, concept in enumerate(self.concepts_list or []):
                prompts.update(
                    (f"concepts_list[{i}].{key}", concept[key]) for key in ("instance_prompt", "class_prompt")
                )
        return {name: text for name, text in prompts.items() if text is not None}

    def prompt_vocabulary(self) -> list[str]:
        """Every word of the prompts in `identifier_prompts` (`{identifier}` left out): what an automatic identifier
        must never be."""
        from .identifiers import IDENTIFIER_PLACEHOLDER
        from .subject import prompt_words

        return prompt_words(" ".join(self.identifier_prompts().values()).replace(IDENTIFIER_PLACEHOLDER, " "))

    def with_concept_identifiers(self, identifiers: list[str | None]) -> DreamBoothConfig:
        """A copy whose `--concepts_list` entries have their identifiers set (None: read from the prompt) and
        `{identifier}` filled in; with one subject, the run-wide prompts' `{identifier}` too."""
        from .identifiers import IDENTIFIER_PLACEHOLDER

        concepts = []
        for concept, identifier in zip(self.concepts_list, identifiers):
            filled = {
                key: concept[key].replace(IDENTIFIER_PLACEHOLDER, identifier)
                for key in ("instance_prompt", "class_prompt")
                if concept[key] is not None and identifier is not None
            }
            concepts.append({**concept, **filled, "identifier": identifier})
        config = dataclasses.replace(self, concepts_list=concepts)
        if len(concepts) == 1 and identifiers[0] is not None:
            config = dataclasses.replace(config.with_identifier(identifiers[0]), identifier=self.identifier)
        return config

    def with_identifier(self, identifier: str) -> DreamBoothConfig:
        """A copy with `identifier` set and `{identifier}` replaced by it in every prompt."""
        from .identifiers import IDENTIFIER_PLACEHOLDER

        def fill(text: str | None) -> str | None:
            return None if text is None else text.replace(IDENTIFIER_PLACEHOLDER, identifier)

        return dataclasses.replace(
            self,
            identifier=identifier,
            instance_prompt=fill(self.instance_prompt),
            class_prompt=fill(self.class_prompt),
            validation_prompt=fill(self.validation_prompt),
            final_validation_prompt=fill(self.final_validation_prompt),
            sample_prompts=None if self.sample_prompts is None else [fill(p) for p in self.sample_prompts],
            evaluation_prompts=None if self.evaluation_prompts is None else [fill(p) for p in self.evaluation_prompts],
        )

    def _check_prior_preservation(self) -> None:
        if self.prior_preservation_mode == "model" and not self.with_prior_preservation:
            raise ValueError(
                "`--prior_preservation_mode model` chooses how the prior-preservation loss is computed; add"
                " `--with_prior_preservation` (and `--class_prompt`) to turn that loss on."
            )
        if self.prior_backward == "separate" and not self.with_prior_preservation:
            raise ValueError(
                "`--prior_backward separate` runs a batch's prior-preservation half apart from its subject photos;"
                " add `--with_prior_preservation` (and `--class_prompt`), or leave it at `joint`."
            )
        if self.with_prior_preservation and self.prior_preservation_mode == "images" and self.num_class_images < 1:
            raise ValueError(f"`--num_class_images` must be at least 1, got {self.num_class_images}.")
        if self.has_concepts:
            self._check_concept_priors()
            return
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise ValueError("`--with_prior_preservation` needs `--class_prompt` (e.g. `a photo of dog`).")
            if self.prior_preservation_mode == "model":
                if self.class_data_dir:
                    logger.warning(
                        "`--class_data_dir` is ignored with `--prior_preservation_mode model`: no class images are"
                        " read or generated."
                    )
                return
            if not self.class_data_dir:
                raise ValueError(
                    "`--with_prior_preservation` needs `--class_data_dir`, the folder where class images are read"
                    " and generated."
                )
        elif (self.class_prompt and not self.num_validation_class_images) or self.class_data_dir:
            logger.warning("`--class_prompt`/`--class_data_dir` are ignored without `--with_prior_preservation`.")

    def _check_concept_priors(self) -> None:
        """With prior preservation, every subject of `--concepts_list` needs its class prompt (and class folder)."""
        needs = ["class_prompt"] if self.prior_preservation_mode == "model" else ["class_prompt", "class_data_dir"]
        for index, concept in enumerate(self.concepts_list):
            if not self.with_prior_preservation:
                if concept["class_prompt"] or concept["class_data_dir"]:
                    logger.warning(
                        "`--concepts_list` entry %d: `class_prompt`/`class_data_dir` are ignored without"
                        " `--with_prior_preservation`.",
                        index,
                    )
                continue
            missing = [f"`{key}`" for key in needs if not concept[key]]
            if missing:
                raise ValueError(
                    f"`--with_prior_preservation` needs {' and '.join(missing)} in every `--concepts_list` entry;"
                    f" entry {index} ({concept['instance_prompt']!r}) has none (e.g. `a photo of dog`, `class-dog`)."
                )

    def _check_pivotal_tuning(self) -> None:
        """`--train_text_encoder_ti` names the subject with its new tokens, through `{identifier}` in the prompts."""
        from .identifiers import IDENTIFIER_PLACEHOLDER
        from .pivotal import new_token_names

        if not self.train_text_encoder_ti:
            return
        if self.num_new_tokens_per_abstraction < 1:
            raise ValueError(
                f"`--num_new_tokens_per_abstraction` must be at least 1, got {self.num_new_tokens_per_abstraction}."
            )
        new_tokens = "".join(new_token_names(self.num_new_tokens_per_abstraction))
        placeholder = IDENTIFIER_PLACEHOLDER if self.identifier is None else self.identifier
        conflicts = {
            "train_text_encoder": "it trains only the new tokens' embeddings, the rest of the text encoder stays"
            " frozen; drop `--train_text_encoder`",
            "pre_compute_text_embeddings": "the new tokens' embeddings change every step",
            "identifier": "the identifier is the new tokens (`<s0>`, ...); remove `--identifier` and write"
            f" `{IDENTIFIER_PLACEHOLDER}` in the prompts where they go",
            "skip_save_text_encoder": "the saved text encoders hold the new tokens",
        }
        if self.has_concepts:
            conflicts["concepts_list"] = "pivotal tuning trains the new tokens of one subject"
        for name, reason in conflicts.items():
            # The trainer sets `identifier` to the new tokens themselves (`with_identifier`): that one is theirs.
            if getattr(self, name) and not (name == "identifier" and self.identifier == new_tokens):
                raise ValueError(
                    f"`--train_text_encoder_ti` cannot be combined with `--{name}={getattr(self, name)}`: {reason}."
                )
        if self.instance_prompt is not None and placeholder not in self.instance_prompt:
            raise ValueError(
                f"`--train_text_encoder_ti` trains new tokens that `{IDENTIFIER_PLACEHOLDER}` in `--instance_prompt`"
                f" stands for, but it has none: {self.instance_prompt!r}. Write it as"
                f" `a photo of {IDENTIFIER_PLACEHOLDER} dog`."
            )

    def _check_training(self) -> None:
        if self.train_text_encoder and self.pre_compute_text_embeddings:
            raise ValueError(
                "`--pre_compute_text_embeddings` cannot be combined with `--train_text_encoder`: a trained text"
                " encoder's embeddings change every step. Drop one of the two flags."
            )
        for name in ("prior_generation_scheduler", "validation_scheduler"):
            if getattr(self, name) not in typing.get_args(SamplingScheduler):
                raise ValueError(
                    f"Unknown `--{name}={getattr(self, name)}`; choose one of"
                    f" {', '.join(typing.get_args(SamplingScheduler))}."
                )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(
                f"Unknown `--lr_scheduler={self.lr_scheduler}`; choose one of {', '.join(LR_SCHEDULERS)}."
            )
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"`--{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"`--max_train_steps` must be at least 1, got {self.max_train_steps}.")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"`--learning_rate` must be positive, got {self.learning_rate}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"`--checkpoints_total_limit` must be at least 1, got {self.checkpoints_total_limit}.")
        if self.optimizer.lower() not in [name.lower() for name in OPTIMIZERS]:
            raise ValueError(f"Unknown `--optimizer={self.optimizer}`; choose one of {', '.join(OPTIMIZERS)}.")
        if self.use_8bit_adam and self.optimizer.lower() != "adamw":
            raise ValueError(f"`--use_8bit_adam` only applies to AdamW, got `--optimizer={self.optimizer}`.")
        if self.local_rank != -1:
            logger.warning("`--local_rank` is ignored; `accelerate launch` sets the process layout.")
        if self.report_to in ("wandb", "all") and self.hub_token is not None:
            raise ValueError(
                "`--report_to wandb` with `--hub_token` could expose the token in the run's logged config; log in with"
                " `hf auth login` instead of passing `--hub_token`."
            )
        if self.dataloader_num_workers:
            logger.warning("`--dataloader_num_workers` is ignored: images are decoded once and cached in memory.")
        if self.cache_latents:
            logger.warning(
                "`--cache_latents` is ignored: latents are cached for images whose crop never changes (square images,"
                " or `--center_crop` without `--random_flip`); random crops are encoded every step."
            )
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"`--max_sequence_length` must be at least 1, got {self.max_sequence_length}.")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"`--ema_decay` must be in [0, 1], got {self.ema_decay}.")
        if self.logit_std is not None and self.logit_std <= 0:
            raise ValueError(f"`--logit_std` must be positive, got {self.logit_std}.")

    def _check_mixed_precision(self) -> None:
        """Fail now, not after the model loads, when this machine's PyTorch cannot run the requested precision."""
        if self.mixed_precision not in ("fp16", "bf16"):
            return
        import torch

        if self.mixed_precision == "fp16":
            has_gpu = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
            if not has_gpu:
                raise ValueError(
                    "`--mixed_precision=fp16` needs a GPU, and this PyTorch sees none (CPU only). Pass"
                    " `--mixed_precision bf16` (which also runs on CPU) or `--mixed_precision no`."
                )
        elif torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"`--mixed_precision=bf16` is not supported by this GPU ({torch.cuda.get_device_name()}); pass"
                " `--mixed_precision fp16` or `--mixed_precision no`."
            )

    def _check_lora(self) -> None:
        if self.adapter != "lora":
            if self.output_kohya_format:
                raise ValueError("`--output_kohya_format` exports a LoRA adapter; it needs `--adapter lora`.")
            return
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"`--rank` must be at least 1 for `--adapter lora`, got {self.rank}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(
                f"`--lora_alpha` must be positive, got {self.lora_alpha}; leave it unset to use `--rank` (scale 1)."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`--lora_dropout` must be in [0, 1), got {self.lora_dropout}.")
        if self.lora_layers:
            if self.lora_target_modules not in (None, self.lora_layers):
                raise ValueError(
                    f"Got both `--lora_layers={self.lora_layers}` and"
                    f" `--lora_target_modules={self.lora_target_modules}`; they name the same option, pass only one."
                )
            self.lora_target_modules = self.lora_layers
        if self.lora_blocks and not all(block.strip().isdigit() for block in self.lora_blocks.split(",")):
            raise ValueError(
                f"`--lora_blocks` takes comma-separated block numbers such as `12,30`, got `{self.lora_blocks}`."
            )

    def _check_unsupported(self) -> None:
        """Stop on an option of diffusers' scripts that this trainer cannot honour (`UNSUPPORTED_OPTIONS`)."""
        defaults = {option.name: option.default for option in fields(self)}
        for name, reason in UNSUPPORTED_OPTIONS.items():
            value = getattr(self, name)
            if value == defaults[name]:
                continue
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            given = f"`--{name}`" if value is True else f"`--{name}={shown}`"
            raise ValueError(f"{given} is not supported: {reason}.")

    # Derived values and serialisation

    def with_defaults(self, defaults: dict[str, Any]) -> DreamBoothConfig:
        """A copy whose unset (None) fields take `defaults`, the family's values for this adapter, else
        `FALLBACK_DEFAULTS`."""
        defaults = {**FALLBACK_DEFAULTS, **defaults}
        unset = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    @property
    def lora_scale_alpha(self) -> int:
        """LoRA alpha actually used: `lora_alpha`, or `rank` when unset (diffusers' scripts' default)."""
        return self.lora_alpha if self.lora_alpha is not None else self.rank

    def steps_for(self, num_examples: int, num_processes: int) -> int:
        """Optimizer steps of the run: `max_train_steps`, or `num_train_epochs` over `num_examples` items."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        global_batch = self.train_batch_size * num_processes * self.gradient_accumulation_steps
        return self.num_train_epochs * math.ceil(num_examples / global_batch)

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-safe dict, secrets removed."""
        values = asdict(self)
        for name in SECRET_FIELDS:
            values.pop(name, None)
        return values

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the options (secrets removed) as JSON, as saved beside the trained weights."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> DreamBoothConfig:
        """The options a run saved with `to_json_file` (`dreambooth_config.json` beside its weights)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DreamBoothConfig:
        """Build a config from a dict, naming any key that is not an option."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown DreamBooth option(s): {', '.join(unknown)}.")
        return cls(**values)
