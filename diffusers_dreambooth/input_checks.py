"""Checks of a run's inputs that need the file system or the loaded pipeline.

`DreamBoothConfig` rejects bad option values when it is built. `check_before_loading` then checks the paths (photo
folders, model folder, `--output_dir`) and, for a local model folder, `--resolution` against its configs, before any
weights load. What depends on the base model's tokenizers, or on what an earlier run left in `--output_dir`, is
checked by `check_inputs` once the trainer has loaded the pipeline, before class images are generated or any step
runs. Mistakes that make training impossible or dangerous raise; prompts that train worse than they could only warn.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from accelerate.state import PartialState

from .config import CONFIG_NAME, DreamBoothConfig, SubjectData
from .data import check_image_folder
from .families import FAMILIES, DreamBoothFamily, family_class_named
from .identifiers import AUTO_IDENTIFIER, rare_token_identifiers
from .model_card import is_hub_id
from .optimization import check_optimizer_installed
from .pipeline_loading import check_pipeline_source
from .quantization import check_quantization_file
from .remote_text_encoder import remote_text_encoder_for
from .safeguards import PICKLE_REMEDY, DreamBoothInputError
from .subject import Subject, prompt_words
from .text_encoder_sharding import check_text_encoder_sharding
from .validation import sampling_scheduler

logger = logging.getLogger(__name__)

#: Options that tell one run from another: resuming into a folder whose saved run differs in them mixes two runs.
RUN_IDENTITY_FIELDS = ("instance_prompt", "concepts_list", "pretrained_model_name_or_path", "adapter")


def check_before_loading(config: DreamBoothConfig, pipeline_given: bool = False) -> None:
    """Raise `DreamBoothInputError` for bad paths before any model loads, so they fail in seconds.

    `--pretrained_model_name_or_path` must be a Hub id or a pipeline folder (unless the caller passes a loaded
    pipeline: `pipeline_given`), `--output_dir` must not be a file, each subject's photo folder must hold a readable
    image and no decompression bomb, and for a local model folder `--resolution` (and each size of an
    `--aspect_ratio_buckets` list) must be a multiple of the model's factor, read from its `config.json` files.
    `DreamBoothTrainer.train` calls it first; the trainer checks resolution and buckets again against the loaded model.
    """
    if not pipeline_given:
        check_pipeline_source(config.pretrained_model_name_or_path)
    check_quantization_file(config)
    if config.remote_text_encoder:
        remote_text_encoder_for(config)  # a full fine-tune, or no token, fails before FLUX.2 loads
    if config.validation_model_path is not None:
        check_validation_model(config, pipeline_given)
    check_text_encoder_sharding(config, pipeline_given)
    check_optimizer_installed(config)
    if config.evaluate:
        check_evaluation_models(config)
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DreamBoothInputError(
            f"`--output_dir={config.output_dir}` is an existing file, not a folder. Pass a folder path (a new one, or"
            " the folder of the run to resume) for the run's outputs."
        )
    source = Path(config.pretrained_model_name_or_path or "")
    factor = None
    if not pipeline_given and source.is_dir() and not config.pretrained_vae_model_name_or_path:
        factor = _folder_resolution_multiple(source)
    if factor is not None and config.resolution is not None:
        check_resolution(config.resolution, factor)
    if factor is not None and config.bucket_sizes is not None:
        check_bucket_sizes(config.bucket_sizes, factor)
    for index, data in enumerate(config.subject_data()):
        if data.instance_data_dir is None:  # `--dataset_name`
            continue
        try:
            check_image_folder(data.instance_data_dir)
        except DreamBoothInputError as error:
            option = f"`--concepts_list` entry {index}" if config.has_concepts else "`--instance_data_dir`"
            raise DreamBoothInputError(f"{option}: {error}") from error


def check_resolution(resolution: int, factor: int) -> None:
    """Raise `DreamBoothInputError` unless `--resolution` is a multiple of the model's `resolution_multiple`."""
    if resolution % factor:
        raise DreamBoothInputError(
            f"`--resolution={resolution}` must be a multiple of {factor} for this model (the VAE's downsampling"
            " factor, times the patch size of a transformer denoiser; for pixel-space DeepFloyd IF, the UNet's"
            f" downsampling, and stage II's 4x low-resolution side); try {resolution // factor * factor or factor}."
        )


def check_bucket_sizes(sizes: list[tuple[int, int]], factor: int) -> None:
    """Raise `DreamBoothInputError` unless both sides of every explicit `--aspect_ratio_buckets` size are multiples of
    the model's `resolution_multiple`."""
    for height, width in sizes:
        if height % factor or width % factor:
            fixed = ",".join(str(max(factor, round(side / factor) * factor)) for side in (height, width))
            raise DreamBoothInputError(
                f"`--aspect_ratio_buckets` pair `{height},{width}` (height,width) must have both sides multiples of"
                f" {factor} for this model (its `resolution_multiple`); try `{fixed}`."
            )


def _folder_resolution_multiple(folder: Path) -> int | None:
    """The family's `resolution_multiple` for the pipeline saved in `folder`, from `model_index.json` and the
    components' `config.json`; None where they do not tell (a pipeline we do not train, a missing or broken file:
    loading the pipeline reports those)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        family = family_class_named(index["_class_name"])
        if family is None:
            return None
        configs = {}
        for name in ("vae", family.denoiser_name):
            path = folder / name / "config.json"
            if path.is_file():
                configs[name] = json.loads(path.read_text(encoding="utf-8"))
        return family.resolution_multiple_of(configs)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_evaluation_models(config: DreamBoothConfig) -> None:
    """Raise unless each `--evaluate` model is a Hub id or a folder holding safetensors weights (or
    `--allow_pickle`), so a wrong one fails before training instead of after it."""
    for option in ("evaluation_dino_model", "evaluation_clip_model"):
        name_or_path = getattr(config, option)
        folder = Path(name_or_path)
        if not folder.exists() and not is_hub_id(name_or_path):
            raise DreamBoothInputError(
                f"`--{option}={name_or_path}` is neither a folder nor a Hub repo id (`org/name`). Pass a transformers"
                " model folder or repo id, or the toy world's checker folder."
            )
        if folder.is_dir() and not config.allow_pickle and not any(folder.glob("*.safetensors")):
            raise DreamBoothInputError(
                f"`--{option}={name_or_path}` holds no safetensors weights, only pickle files (`.bin`);"
                f" {PICKLE_REMEDY}"
            )


def check_validation_model(config: DreamBoothConfig, pipeline_given: bool = False) -> None:
    """Raise unless `--validation_model_path` can carry the trained adapter: a LoRA run, and a Hub id or a local
    pipeline folder of a family that reads the option (Krea 2); a local base folder must be of that family too."""
    path = config.validation_model_path
    option = f"`--validation_model_path={path}`"
    if config.adapter != "lora":
        raise DreamBoothInputError(
            f"{option} loads the trained LoRA onto another checkpoint (Krea 2 Turbo), but this run trains"
            f" `--adapter {config.adapter}`. Pass `--adapter lora`, or remove the option."
        )
    local = Path(path)
    if not local.exists() and not is_hub_id(path):
        raise DreamBoothInputError(
            f"{option} is neither a folder nor a Hub repo id (`org/name`). Pass the Krea 2 Turbo checkpoint to"
            " validate on: `krea/Krea-2-Turbo`, or a folder that `save_pretrained` wrote."
        )
    if local.exists() and not (local / "model_index.json").is_file():
        raise DreamBoothInputError(
            f"{option} is a folder without `model_index.json`, so not a diffusers pipeline. Pass the Krea 2 Turbo"
            " checkpoint to validate on: `krea/Krea-2-Turbo`, or a folder that `save_pretrained` wrote."
        )
    readers = [family for family in FAMILIES if "validation_model_path" in family.family_options]
    folders = {"`--validation_model_path`": local}
    if not pipeline_given:
        folders["`--pretrained_model_name_or_path`"] = Path(config.pretrained_model_name_or_path or "")
    for what, folder in folders.items():
        try:
            class_name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError):
            continue  # a Hub id; a base that loading reports on
        if not any(class_name in family.pipeline_class_names for family in readers):
            names = ", ".join(f"`{name}`" for family in readers for name in family.pipeline_class_names)
            raise DreamBoothInputError(
                f"{option}: {what} holds a `{class_name}`, but validating on another checkpoint is an option of"
                f" diffusers' Krea 2 script: base and checkpoint must both be a {names}. Remove the option."
            )


def check_family_options(config: DreamBoothConfig, family: DreamBoothFamily) -> None:
    """Refuse an option set for a family that does not read it (`DreamBoothFamily.family_options`): Sana's
    `--complex_human_instruction` on Flux, say, would otherwise be silently ignored."""
    for option in dict.fromkeys(name for other in FAMILIES for name in other.family_options):
        if getattr(config, option) and option not in family.family_options:
            readers = ", ".join(other.name for other in FAMILIES if option in other.family_options)
            raise DreamBoothInputError(
                f"`--{option}` is an option of {readers}, not of {family.name} (`{type(family.pipeline).__name__}`)."
                " Remove it."
            )


def check_inputs(config: DreamBoothConfig, family: DreamBoothFamily) -> None:
    """Check `--output_dir` against the run saved there, then warn about prompts that train badly.

    Called by the trainer once the base pipeline is loaded and `family` known. A resume into a folder that holds a
    different run raises on every process; the prompt warnings are logged by the main process only.
    """
    check_family_options(config, family)
    check_output_dir(config)
    check_push_target(config, config.pretrained_model_name_or_path or family.pipeline.name_or_path)
    check_sampling_schedulers(config, family)
    if not PartialState().is_main_process:
        return
    for data in config.subject_data():
        if data.instance_prompt and data.instance_prompt.strip():
            subject = Subject.from_prompts(data.instance_prompt, data.class_prompt, identifier=data.identifier)
            if not check_identifier_present(data):
                continue
            check_class_noun(data, subject)
            if not config.train_text_encoder_ti:  # pivotal tuning's new tokens are added to the tokenizers later
                check_identifier_tokens(subject.identifier, family, exclude=config.prompt_vocabulary())
    check_prompt_lengths(config, family)


def check_push_target(config: DreamBoothConfig, base_model: str | None) -> None:
    """Raise before training if `--push_to_hub` of a LoRA subject would fail at the end: its base model must be on
    the Hub for anyone to load the adapter."""
    if config.push_to_hub and config.adapter == "lora" and not is_hub_id(str(base_model or "")):
        raise DreamBoothInputError(
            f"`--push_to_hub` with `--adapter lora`: the base model `{base_model}` is a local folder, so nobody could"
            " load the pushed adapter. Push the base model to the Hub and train from its repo id, or leave out"
            " `--push_to_hub`."
        )


def check_sampling_schedulers(config: DreamBoothConfig, family: DreamBoothFamily) -> None:
    """Raise before training if the class-image or validation scheduler cannot sample the model (DDPM on SD3, Flux)."""
    for name in {config.prior_generation_scheduler, config.validation_scheduler} - {"pipeline"}:
        sampling_scheduler(name, family.pipeline.scheduler)


def check_output_dir(config: DreamBoothConfig) -> None:
    """Raise if `--output_dir` holds a different run: resuming would continue it, a new run would overwrite it.

    The folder's `dreambooth_config.json` names the run that wrote it. Resuming with another instance prompt (or
    subjects), base model or adapter would load that run's checkpoint into this one; a new run would replace its
    weights, card and checkpoints, hours of GPU time, with another subject's. Either way nothing is written: the
    error says to pick a new folder, or to delete that file to overwrite the old run on purpose.
    """
    path = Path(config.output_dir) / CONFIG_NAME
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Could not read `%s` to compare it with this run's options: %s", path, error)
        return
    current = config.to_dict()
    differing = [name for name in RUN_IDENTITY_FIELDS if not _same_value(name, saved.get(name), current[name])]
    if not differing:
        return
    details = "; ".join(f"`--{name}` was {saved.get(name)!r}, now {current[name]!r}" for name in differing)
    if config.resume_from_checkpoint is not None:
        action = f"`--resume_from_checkpoint={config.resume_from_checkpoint}` would resume a different run"
    else:
        action = f"`--output_dir={config.output_dir}` holds a different run, which this one would overwrite"
    raise DreamBoothInputError(
        f"{action}: `{path}` was written by a run with other options ({details}). Pass a new `--output_dir` for"
        " this run, use the options of the run saved there, or delete that file to overwrite the old run."
    )


def check_identifier_present(config: DreamBoothConfig | SubjectData) -> bool:
    """Warn, and return False, when the instance prompt names no identifier: `--identifier` is not in it, or every
    word of it is in `--class_prompt` too. Nothing then tells the subject's photos from the class images."""
    words = {word.lower() for word in prompt_words(config.instance_prompt)}
    if config.identifier is not None:
        identifier = " ".join(prompt_words(config.identifier)).lower()
        if identifier in words:
            return True
        found = f"does not contain the identifier `{config.identifier}`"
    elif config.class_prompt:
        if not words <= {word.lower() for word in prompt_words(config.class_prompt)}:
            return True
        found = f"has no word that `--class_prompt={config.class_prompt!r}` lacks, so no identifier"
    else:
        return True
    logger.warning(
        "`--instance_prompt=%r` %s. DreamBooth binds the subject to a rare identifier word before the class noun:"
        " write it as `a photo of sks dog` (or `a photo of {identifier} dog` with `--identifier`).",
        config.instance_prompt,
        found,
    )
    return False


def check_class_noun(config: DreamBoothConfig | SubjectData, subject: Subject) -> None:
    """Warn when the instance prompt lacks (or changes) the class noun that `--class_prompt` names.

    The paper's class-prior ablation (Ruiz et al., CVPR 2023, Sec. 4.3) trains with no class noun and with a wrong
    one: both give worse subject fidelity than the correct class noun, which ties the subject to the class prior.
    """
    if not config.class_prompt:
        return
    class_words = [word for word in prompt_words(config.class_prompt) if word]
    if not class_words:
        return
    if subject.class_noun is not None and subject.class_noun.lower() in {word.lower() for word in class_words}:
        return
    instance_words = {word.lower() for word in prompt_words(config.instance_prompt)}
    missing = [word for word in class_words if word.lower() not in instance_words]
    noun = missing[-1] if missing else class_words[-1]
    if subject.class_noun is None:
        found = f"has no class noun after the identifier `{subject.identifier}`"
    else:
        found = f"names `{subject.class_noun}` after the identifier `{subject.identifier}`"
    logger.warning(
        "`--instance_prompt=%r` %s, but `--class_prompt=%r` names the class `%s`. Put the class noun after the"
        " identifier (e.g. `... %s %s`): in the paper's class-prior ablation (Ruiz et al., CVPR 2023, Sec. 4.3) a"
        " missing or wrong class noun makes the trained subject worse.",
        config.instance_prompt,
        found,
        config.class_prompt,
        noun,
        subject.identifier,
        noun,
    )


def check_identifier_tokens(identifier: str, family: DreamBoothFamily, exclude: Iterable[str] = ()) -> None:
    """Warn when a tokenizer splits the identifier into several tokens.

    DreamBooth binds the subject to a rare token; an identifier made of several common pieces spreads it over
    tokens that other words share. The warning suggests the word `--identifier auto` would pick (the first of
    `rare_token_identifiers`, never a word of `exclude`): one token in every tokenizer of the model.
    """
    split = {}
    for name, tokenizer in zip(family.tokenizer_names, family.tokenizers):
        tokens = tokenizer.tokenize(identifier)
        if len(tokens) > 1:
            split[name] = tokens
    if split:
        shown = "; ".join(f"`{name}`: {tokens}" for name, tokens in split.items())
        try:
            word = rare_token_identifiers(family.pipeline, count=1, exclude=[identifier, *exclude])[0]
            suggestion = f", such as `{word}`, or pass `--identifier {AUTO_IDENTIFIER}` to pick one"
        except ValueError:  # no rare single-token word in this model's tokenizers
            suggestion = ""
        logger.warning(
            "The identifier `%s` of `--instance_prompt` is split into several tokens (%s). Use a rare word that is a"
            " single token in every tokenizer of this model%s, so the subject binds to one token.",
            identifier,
            shown,
            suggestion,
        )


def check_prompt_lengths(config: DreamBoothConfig, family: DreamBoothFamily) -> None:
    """Warn about prompts longer than a tokenizer's maximum length (special tokens included): they are truncated.

    Training prompts are cut to the family's `token_limits`: `--tokenizer_max_length` (default: the tokenizer's
    `model_max_length`), `--max_sequence_length` for SD3's and Flux's T5. The validation prompt goes through
    the pipeline.
    """
    prompts = {}
    for index, data in enumerate(config.subject_data()):
        where = f"concepts_list[{index}]." if config.has_concepts else ""
        prompts[f"{where}instance_prompt"] = (data.instance_prompt, config.tokenizer_max_length)
        prompts[f"{where}class_prompt"] = (data.class_prompt, config.tokenizer_max_length)
    prompts["validation_prompt"] = (config.validation_prompt, None)
    for option, (prompt, max_length) in prompts.items():
        if not prompt:
            continue
        too_long, dropped = [], None
        limits = family.token_limits(max_length)
        for name, tokenizer, limit in zip(family.tokenizer_names, family.tokenizers, limits):
            length = len(tokenizer(prompt)["input_ids"])
            if length > limit:
                too_long.append(f"`{name}` counts {length} tokens and keeps {limit}")
                dropped = dropped or _dropped_text(tokenizer, prompt, limit)
        if too_long:
            logger.warning(
                "`--%s=%r` is longer than the text encoder takes and will be truncated, dropping `%s` (%s, special"
                " tokens included). Shorten the prompt.",
                option,
                prompt,
                dropped,
                "; ".join(too_long),
            )


def _dropped_text(tokenizer: Any, prompt: str, limit: int) -> str:
    """The end of `prompt` that truncation to `limit` tokens (special tokens included) cuts off."""
    try:
        encoding = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    except NotImplementedError:  # tokenizers without a fast backend have no offsets
        tokens = tokenizer.tokenize(prompt)
        kept = limit - (len(tokenizer(prompt)["input_ids"]) - len(tokens))
        return tokenizer.convert_tokens_to_string(tokens[kept:]).strip()
    specials = encoding["special_tokens_mask"]
    offsets = [offset for offset, special in zip(encoding["offset_mapping"], specials) if not special]
    kept = limit - sum(specials)
    return prompt[offsets[kept][0] :].strip()


def _same_value(name: str, saved: Any, current: Any) -> bool:
    """Whether a saved option equals the current one; two paths to the same local folder count as equal."""
    if saved == current:
        return True
    if name == "pretrained_model_name_or_path" and isinstance(saved, str) and isinstance(current, str):
        if os.path.exists(saved) and os.path.exists(current):
            return os.path.realpath(saved) == os.path.realpath(current)
    return False
