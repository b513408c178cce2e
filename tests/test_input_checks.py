"""Bad options fail when the config is built, and bad prompts or output folders fail or warn before any step runs.

Each error and warning names the option and the value received.
"""

import logging
import re

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline

from diffusers_dreambooth import (
    DreamBoothConfig,
    DreamBoothInputError,
    DreamBoothPipeline,
    DreamBoothTrainer,
    family_for_pipeline,
)
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.config import CONFIG_NAME
from diffusers_dreambooth.identifiers import rare_token_identifiers
from diffusers_dreambooth.input_checks import check_before_loading, check_inputs, check_output_dir
from diffusers_dreambooth.subject import Subject, SubjectMetadata
from diffusers_dreambooth.testing_utils import DEFAULT_CORPUS, build_t5_tokenizer

SUBJECT = dict(instance_data_dir="photos", instance_prompt="a photo of sks dog")
# Words the tiny tokenizer keeps whole: 5 + 18 * 4 + 3 = 80 tokens, 82 with start and end; 77 keep the first 75.
LONG_PROMPT = "a photo of sks dog" + " on a red dog" * 18 + " of a photo"


@pytest.fixture(scope="module")
def families(pipeline_dirs):
    """The family adapters of the tiny SD and SDXL pipelines, whose CLIP tokenizers know `sks` but not `qzxv`."""
    return {
        name: family_for_pipeline(DiffusionPipeline.from_pretrained(pipeline_dirs[name])) for name in ("sd", "sdxl")
    }


def warnings_of(caplog, config, family) -> str:
    """What `check_inputs` warns, without the config's own construction warnings."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusers_dreambooth"):
        check_inputs(config, family)
    return caplog.text


# Options rejected when the config is built


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(with_prior_preservation=True, class_data_dir="class"), "needs `--class_prompt`"),
        (dict(with_prior_preservation=True, class_prompt="a photo of dog"), "needs `--class_data_dir`"),
        (dict(train_text_encoder=True, pre_compute_text_embeddings=True), "`--pre_compute_text_embeddings` cannot"),
        (dict(adapter="lora", rank=0), "`--rank` must be at least 1 .*got 0"),
        (dict(adapter="lora", lora_alpha=0), "`--lora_alpha` must be positive, got 0"),
        (dict(adapter="lora", lora_alpha=-8), "`--lora_alpha` must be positive, got -8"),
        (dict(resolution=0), "`--resolution` must be a positive multiple of 8, got 0"),
        (dict(resolution=-512), "`--resolution` must be a positive multiple of 8, got -512"),
        (dict(train_batch_size=0), "`--train_batch_size` must be at least 1, got 0"),
        (dict(gradient_accumulation_steps=0), "`--gradient_accumulation_steps` must be at least 1, got 0"),
        (dict(max_train_steps=0), "`--max_train_steps` must be at least 1, got 0"),
        (dict(num_train_epochs=0), "`--num_train_epochs` must be at least 1, got 0"),
        (dict(learning_rate=0.0), "`--learning_rate` must be positive, got 0.0"),
        (dict(learning_rate=-1e-4), "`--learning_rate` must be positive, got -0.0001"),
        (dict(checkpointing_steps=0), "`--checkpointing_steps` must be at least 1, got 0"),
        (
            dict(with_prior_preservation=True, class_prompt="a dog", class_data_dir="class", num_class_images=0),
            "`--num_class_images` must be at least 1, got 0",
        ),
        (dict(lr_scheduler="cosine_annealing"), "`--lr_scheduler=cosine_annealing`.*constant_with_warmup"),
        (dict(validation_scheduler="Euler"), "`--validation_scheduler=Euler`.*DPMSolverMultistepScheduler"),
        (dict(prior_generation_scheduler="PNDM"), "`--prior_generation_scheduler=PNDM`.*DDIMScheduler"),
    ],
)
def test_bad_option_fails_at_construction_naming_it(options, message):
    with pytest.raises(ValueError, match=message):
        DreamBoothConfig(**SUBJECT, **options)


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_empty_instance_prompt_fails_at_construction(prompt):
    with pytest.raises(ValueError, match="`--instance_prompt` is required"):
        DreamBoothConfig(instance_data_dir="photos", instance_prompt=prompt)


def test_fp16_without_a_gpu_fails_and_suggests_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"`--mixed_precision=fp16` needs a GPU.*`--mixed_precision bf16`.*`--mixed_precision no`"
    ):
        DreamBoothConfig(**SUBJECT, mixed_precision="fp16")


def test_fp16_with_a_gpu_is_accepted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DreamBoothConfig(**SUBJECT, mixed_precision="fp16").mixed_precision == "fp16"


def test_bf16_on_a_gpu_without_bf16_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    with pytest.raises(ValueError, match=r"`--mixed_precision=bf16` is not supported by this GPU \(Tesla V100\)"):
        DreamBoothConfig(**SUBJECT, mixed_precision="bf16")


def test_bf16_on_cpu_is_accepted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DreamBoothConfig(**SUBJECT, mixed_precision="bf16").mixed_precision == "bf16"


# Prompts checked against the loaded pipeline's tokenizers


def test_instance_prompt_without_the_class_noun_warns(families, tmp_path, caplog):
    config = tiny_config(
        "sd", tmp_path, tmp_path / "out", instance_prompt="a photo of sks", class_prompt="a photo of dog"
    )
    text = warnings_of(caplog, config, families["sd"])
    assert "`--instance_prompt='a photo of sks'` has no class noun after the identifier `sks`" in text
    assert "`--class_prompt='a photo of dog'` names the class `dog`" in text
    assert "`... sks dog`" in text and "class-prior ablation" in text


@pytest.mark.parametrize(
    ("options", "found"),
    [
        (dict(instance_prompt="a photo of dog", class_prompt="a photo of dog"), "has no word that `--class_prompt="),
        (dict(instance_prompt="a photo of a dog", class_prompt="a photo of dog"), "has no word that"),
        (dict(instance_prompt="a photo of dog", identifier="sks"), "does not contain the identifier `sks`"),
    ],
)
def test_instance_prompt_without_an_identifier_warns(families, tmp_path, caplog, options, found):
    config = tiny_config("sd", tmp_path, tmp_path / "out", **options)
    text = warnings_of(caplog, config, families["sd"])
    assert f"`--instance_prompt={options['instance_prompt']!r}` {found}" in text
    assert "binds the subject to a rare identifier word" in text
    assert "has no class noun" not in text  # one warning for one mistake


def test_instance_prompt_with_another_class_noun_warns(families, tmp_path, caplog):
    config = tiny_config(
        "sd", tmp_path, tmp_path / "out", instance_prompt="a photo of sks cat", class_prompt="a photo of dog"
    )
    text = warnings_of(caplog, config, families["sd"])
    assert (
        "names `cat` after the identifier `sks`, but `--class_prompt='a photo of dog'` names the class `dog`" in text
    )


def test_matching_prompts_do_not_warn(families, tmp_path, caplog):
    config = tiny_config("sd", tmp_path, tmp_path / "out", class_prompt="a photo of dog", validation_prompt="sks dog")
    assert warnings_of(caplog, config, families["sd"]) == ""


def test_identifier_split_into_several_tokens_warns(families, tmp_path, caplog):
    assert families["sd"].tokenizers[0].tokenize("qzxv") == ["q", "z", "x", "v</w>"]
    config = tiny_config("sd", tmp_path, tmp_path / "out", instance_prompt="a photo of qzxv dog")
    text = warnings_of(caplog, config, families["sd"])
    assert "The identifier `qzxv` of `--instance_prompt` is split into several tokens" in text
    assert "`tokenizer`: ['q', 'z', 'x', 'v</w>']" in text
    rare = rare_token_identifiers(families["sd"].pipeline, count=1, exclude=["qzxv", "a", "photo", "of", "dog"])[0]
    assert f"such as `{rare}`, or pass `--identifier auto` to pick one" in text


def test_identifier_hint_is_one_token_in_every_tokenizer(pipeline_dirs, tmp_path, caplog):
    """Issue #19: a T5 tokenizer that splits `sks` must not be told to use `sks`."""
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["flux"])
    pipeline.tokenizer_2 = build_t5_tokenizer(tmp_path / "t5", [text.replace("sks", "") for text in DEFAULT_CORPUS])
    assert pipeline.tokenizer_2.tokenize("sks") == ["▁", "s", "k", "s"]
    config = tiny_config("flux", tmp_path, tmp_path / "out", instance_prompt="a photo of sks dog")
    text = warnings_of(caplog, config, family_for_pipeline(pipeline))
    assert "The identifier `sks` of `--instance_prompt` is split into several tokens" in text
    assert "`tokenizer_2`: ['▁', 's', 'k', 's']" in text and "`sks`," not in text
    suggested = text.split("such as `")[1].split("`")[0]
    assert all(len(tokenizer.tokenize(suggested)) == 1 for tokenizer in (pipeline.tokenizer, pipeline.tokenizer_2))
    assert suggested not in ("a", "photo", "of", "dog") and "`--identifier auto`" in text


def test_identifier_split_names_both_sdxl_tokenizers(families, tmp_path, caplog):
    config = tiny_config("sdxl", tmp_path, tmp_path / "out", instance_prompt="a photo of qzxv dog")
    text = warnings_of(caplog, config, families["sdxl"])
    assert "`tokenizer`: ['q', 'z', 'x', 'v</w>']; `tokenizer_2`: ['q', 'z', 'x', 'v</w>']" in text


@pytest.mark.parametrize("option", ["instance_prompt", "class_prompt", "validation_prompt"])
def test_prompt_longer_than_the_tokenizer_warns_it_is_truncated(option, families, tmp_path, caplog):
    prompts = {"class_prompt": "a photo of dog", option: LONG_PROMPT}
    if option == "class_prompt":
        prompts["instance_prompt"] = "a photo of sks dog on a red dog"
    config = tiny_config("sd", tmp_path, tmp_path / "out", **prompts)
    text = warnings_of(caplog, config, families["sd"])
    assert f"`--{option}='{LONG_PROMPT}'` is longer than the text encoder takes and will be truncated" in text
    assert "dropping `red dog of a photo` (`tokenizer` counts 82 tokens and keeps 77" in text


def test_tokenizer_max_length_sets_where_training_prompts_are_cut(families, tmp_path, caplog):
    prompt = "a photo of sks dog on a red dog"
    config = tiny_config("sd", tmp_path, tmp_path / "out", instance_prompt=prompt, tokenizer_max_length=8)
    text = warnings_of(caplog, config, families["sd"])
    assert f"`--instance_prompt='{prompt}'` is longer" in text
    assert "dropping `a red dog` (`tokenizer` counts 11 tokens and keeps 8" in text


# Output folder holding another run


def test_resume_into_a_different_run_fails_before_any_step(pipeline_dirs, instance_dir, tmp_path):
    out = tmp_path / "out"
    DreamBoothTrainer(tiny_config(pipeline_dirs["sd"], instance_dir, out, checkpointing_steps=1)).train()
    saved = (out / CONFIG_NAME).read_text()
    other = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        out,
        instance_prompt="a photo of zwx cat",
        resume_from_checkpoint="latest",
        max_train_steps=4,
    )
    with pytest.raises(ValueError) as error:
        DreamBoothTrainer(other).train()
    message = str(error.value)
    assert "`--resume_from_checkpoint=latest` would resume a different run" in message
    assert str(out / CONFIG_NAME) in message
    assert "`--instance_prompt` was 'a photo of sks dog', now 'a photo of zwx cat'" in message
    assert [path.name for path in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / CONFIG_NAME).read_text() == saved


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (dict(pretrained_model_name_or_path="other-model"), "`--pretrained_model_name_or_path` was"),
        (dict(adapter="lora"), "`--adapter` was 'full', now 'lora'"),
    ],
)
def test_resume_with_another_base_model_or_adapter_fails(options, field, tmp_path):
    tiny_config("model", tmp_path, tmp_path).to_json_file(tmp_path / CONFIG_NAME)
    config = tiny_config("model", tmp_path, tmp_path, resume_from_checkpoint="checkpoint-2", **options)
    with pytest.raises(ValueError, match=field):
        check_output_dir(config)


def test_resume_of_the_same_run_passes(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "sub").mkdir()
    tiny_config(tmp_path / "model", tmp_path, tmp_path).to_json_file(tmp_path / CONFIG_NAME)
    same_folder = tmp_path / "sub" / ".." / "model"
    check_output_dir(tiny_config(same_folder, tmp_path, tmp_path, resume_from_checkpoint="latest", seed=1))


def test_new_run_over_a_different_run_fails_before_overwriting_it(tmp_path):
    tiny_config("model", tmp_path, tmp_path).to_json_file(tmp_path / CONFIG_NAME)
    config = tiny_config("model", tmp_path, tmp_path, instance_prompt="a photo of zwx cat")
    with pytest.raises(ValueError) as error:
        check_output_dir(config)
    assert f"`--output_dir={tmp_path}` holds a different run, which this one would overwrite" in str(error.value)
    assert "`--instance_prompt` was 'a photo of sks dog', now 'a photo of zwx cat'" in str(error.value)
    assert "delete that file" in str(error.value)
    # The same run again (a rerun of one command) is no different run.
    check_output_dir(tiny_config("model", tmp_path, tmp_path))


def test_unreadable_saved_config_warns_and_passes(tmp_path, caplog):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="diffusers_dreambooth"):
        check_output_dir(tiny_config("model", tmp_path, tmp_path, resume_from_checkpoint="latest"))
    assert "Could not read" in caplog.text


# Model paths: one line that says what was found and what is expected


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "if", "if_sr"])
def test_resolution_is_checked_against_the_model_folder_before_loading(pipeline_dirs, instance_dir, tmp_path, name):
    """The factor read from the folder's configs is the loaded family's `resolution_multiple`."""
    factor = family_for_pipeline(DiffusionPipeline.from_pretrained(pipeline_dirs[name])).resolution_multiple
    check_before_loading(tiny_config(pipeline_dirs[name], instance_dir, tmp_path / "out", resolution=8 * factor))
    bad = 8 * factor + 1
    config = tiny_config(pipeline_dirs[name], instance_dir, tmp_path / "out", resolution=bad)
    with pytest.raises(DreamBoothInputError, match=rf"`--resolution={bad}` must be a multiple of {factor} "):
        check_before_loading(config)


def test_a_folder_that_is_not_a_pipeline_fails(instance_dir, tmp_path):
    (tmp_path / "weights").mkdir()
    config = tiny_config(tmp_path / "weights", instance_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=r"is a folder without `model_index.json`, so not a diffusers pipeline"):
        DreamBoothTrainer(config).train()


def test_a_pipeline_of_an_unsupported_family_fails_naming_the_supported_ones(instance_dir, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    config = tiny_config(tmp_path / "ddpm", instance_dir, tmp_path / "out")
    with pytest.raises(ValueError, match=r"does not support `DDPMPipeline`\. Supported pipelines: .*StableDiffusion"):
        DreamBoothTrainer(config).train()


def test_a_hub_id_while_offline_says_to_download_it_first(instance_dir, tmp_path):
    config = tiny_config("some-org/not-cached-model", instance_dir, tmp_path / "out", cache_dir=str(tmp_path))
    with pytest.raises(
        DreamBoothInputError, match=r"^Could not load `--pretrained_model_name_or_path=some-org/not-cached-model`: "
    ):
        DreamBoothTrainer(config).train()
    with pytest.raises(
        DreamBoothInputError, match=r"the Hub is offline \(HF_HUB_OFFLINE\).*hf download some-org/not-cached-mod"
    ):
        DreamBoothTrainer(config).train()


@pytest.fixture
def pickled_pipeline_dir(pipeline_dirs, tmp_path):
    """The tiny SD pipeline with its UNet saved only as a pickle `.bin` file."""
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    pipeline.save_pretrained(tmp_path / "pickled")
    unet_dir = tmp_path / "pickled" / "unet"
    pipeline.unet.save_pretrained(unet_dir, safe_serialization=False)
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    return tmp_path / "pickled"


def test_pickle_weights_are_refused_unless_allowed(pickled_pipeline_dir, instance_dir, tmp_path):
    config = tiny_config(pickled_pipeline_dir, instance_dir, tmp_path / "out", max_train_steps=1)
    with pytest.raises(
        DreamBoothInputError, match=r"only in pickle files \(`\.bin`\).*pass `--allow_pickle` if you trust them"
    ):
        DreamBoothTrainer(config).train()
    allowed = tiny_config(pickled_pipeline_dir, instance_dir, tmp_path / "out", max_train_steps=1, allow_pickle=True)
    DreamBoothTrainer(allowed).train()
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("option", "make", "message"),
    [
        ("evaluation_dino_model", lambda d: d, r"`--evaluation_dino_model=.*` holds no safetensors weights"),
        ("evaluation_clip_model", lambda d: d / "missing", r"`--evaluation_clip_model=.*` is neither a folder nor"),
    ],
)
def test_evaluation_models_are_checked_before_loading(option, make, message, pipeline_dirs, instance_dir, tmp_path):
    folder = tmp_path / "evaluation_model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"a pickle")
    options = {"evaluate": True, "class_prompt": "a photo of dog", option: str(make(folder))}
    config = tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", max_train_steps=1, **options)
    with pytest.raises(DreamBoothInputError, match=message):
        check_before_loading(config)
    if option == "evaluation_dino_model":
        config.allow_pickle = True
        check_before_loading(config)


def test_a_subject_with_pickle_weights_is_refused_unless_asked_for(pickled_pipeline_dir):
    subject = Subject("sks", "dog", "a photo of sks dog")
    metadata = SubjectMetadata([subject], "full", "stable-diffusion", "StableDiffusionPipeline")
    metadata.to_json_file(pickled_pipeline_dir)  # a downloaded full subject whose UNet is a pickle
    with pytest.raises(OSError, match="safetensors"):
        DreamBoothPipeline.from_pretrained(pickled_pipeline_dir)
    loaded = DreamBoothPipeline.from_pretrained(pickled_pipeline_dir, use_safetensors=None)
    assert loaded.subjects == [subject]


def test_pushing_a_lora_of_a_local_base_model_fails_before_training(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sd"], instance_dir, tmp_path / "out", adapter="lora", push_to_hub=True, hub_model_id="u/r"
    )
    with pytest.raises(ValueError, match=r"`--push_to_hub` with `--adapter lora`: the base model `.*` is a local"):
        DreamBoothTrainer(config).train()
    assert (
        not list_checkpoints(tmp_path / "out") and not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    )


def test_an_output_dir_that_is_a_file_stops_the_python_api_before_loading(pipeline_dirs, instance_dir, tmp_path):
    """`DreamBoothTrainer.train` runs the same checks as `examples/train.py`, before any model loads."""
    (tmp_path / "out").write_text("")
    config = tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out")
    with pytest.raises(DreamBoothInputError, match="is an existing file, not a folder"):
        DreamBoothTrainer(config).train()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"complex_human_instruction": "Describe the image."}, "`--complex_human_instruction` is an option of sana"),
        ({"system_prompt": "You are an artist."}, "`--system_prompt` is an option of lumina2"),
        ({"text_encoder_out_layers": [1, 2, 3]}, "`--text_encoder_out_layers` is an option of flux2, flux2-klein"),
        ({"do_edm_style_training": True}, "`--do_edm_style_training` is an option of stable-diffusion-xl"),
    ],
)
def test_another_familys_option_is_refused_not_ignored(pipeline_dirs, instance_dir, tmp_path, options, message):
    config = tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path / "out", **options)
    with pytest.raises(DreamBoothInputError, match=f"{re.escape(message)}, not of stable-diffusion"):
        DreamBoothTrainer(config).train()
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize(
    ("options", "package", "option"),
    [
        ({"optimizer": "prodigy"}, "prodigyopt", "--optimizer prodigy"),
        ({"use_8bit_adam": True}, "bitsandbytes", "--use_8bit_adam"),
    ],
)
def test_a_missing_optimizer_package_stops_in_one_line_before_loading(
    options, package, option, monkeypatch, instance_dir, tmp_path
):
    """README_flux.md's `--optimizer=prodigy` without prodigyopt, say: one line naming the option and the install,
    before any model loads (here there is none)."""
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # what `import` meets where it is not installed
    config = tiny_config(tmp_path / "no-model", instance_dir, tmp_path / "out", **options)
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config).train()
    assert str(raised.value) == f"`{option}` needs {package}: `pip install {package}`, or remove the option."
