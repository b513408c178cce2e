"""HiDream-I1: the four frozen encoders' embeddings are `encode_prompt`'s, the Llama text encoder and tokenizer load
from `--pretrained_text_encoder_4_name_or_path`/`--pretrained_tokenizer_4_name_or_path` (the script's options), the
objective is the script's (negated transformer output against `noise - x`, shift-3 sigmas), the defaults are those of
diffusers' `train_dreambooth_lora_hidream.py`, and its README command trains on the tiny model."""

import json
import shutil

import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from family_tester import DreamBoothFamilyTester
from test_drop_in_options import readme_command
from transformers import AutoTokenizer, LlamaForCausalLM

from diffusers_dreambooth import DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.families.base import ImageConditioning
from diffusers_dreambooth.pipeline_loading import HIDREAM_LLAMA, load_base_component, load_base_pipeline
from diffusers_dreambooth.safeguards import DreamBoothInputError

PROMPTS = ["a photo of sks dog", "a dog"]


class TestHiDream(DreamBoothFamilyTester):
    family = "hidream"
    trains_text_encoders = False  # its text encoders are frozen, as in diffusers' script: refused
    # One validation image: `HiDreamImagePipeline` samples 128x128 latents whatever the size asked.
    run_options = {"num_validation_images": 1}
    # The script trains the transformer's LoRA only; all four text encoders stay frozen.
    lora_trains_text_encoder = False


def configured(path, **options):
    pipeline = DiffusionPipeline.from_pretrained(path)
    family = family_for_pipeline(pipeline)
    config = tiny_config(path, "unused", "unused", adapter="lora", **options)
    for name, value in family.option_defaults["lora"].items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    family.configure(config)
    return family


def test_cached_embeddings_are_the_pipelines_encode_prompt(pipeline_dirs):
    family = configured(pipeline_dirs["hidream"])
    cached = family.encode_frozen_prompts(PROMPTS)
    t5, _, llama, _, pooled, _ = family.pipeline.encode_prompt(
        prompt=PROMPTS, do_classifier_free_guidance=False, max_sequence_length=128
    )
    torch.testing.assert_close(cached["prompt_embeds_t5"], t5)
    torch.testing.assert_close(cached["prompt_embeds_llama3"], llama.transpose(0, 1))  # prompt first
    torch.testing.assert_close(cached["pooled_prompt_embeds"], pooled)
    assert cached["prompt_embeds_llama3"].shape[:3] == (2, 2, 128)  # prompts, Llama layers, tokens


def test_defaults_are_the_scripts(pipeline_dirs):
    family = configured(pipeline_dirs["hidream"])
    defaults = family.option_defaults["lora"]
    assert defaults["learning_rate"] == 1e-4 and defaults["adam_weight_decay"] == 1e-4
    assert defaults["resolution"] == 512 and defaults["max_sequence_length"] == 128
    assert defaults["weighting_scheme"] == "none"
    assert family.denoiser_lora_target_modules == ("to_k", "to_q", "to_v", "to_out")
    assert family.noise_scheduler.config.shift == 3.0  # FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert family.hub_tags == ("hidream", "hidream-diffusers")
    assert family.resolution_multiple == 4  # a 2x VAE and 2x2 patches


def test_objective_is_the_scripts(pipeline_dirs):
    family = configured(pipeline_dirs["hidream"])
    timesteps = family.noise_scheduler.timesteps[[0, 500]]
    sigmas = family.noise_scheduler.sigmas[[0, 500]].view(-1, 1, 1, 1)
    plain = FlowMatchEulerDiscreteScheduler().sigmas[[0, 500]]
    torch.testing.assert_close(sigmas.flatten(), 3.0 * plain / (1 + 2.0 * plain))  # shift 3
    torch.testing.assert_close(timesteps, sigmas.flatten() * 1000)
    latents, noise = torch.full((2, 4, 8, 8), 0.5), torch.full((2, 4, 8, 8), -1.0)
    noisy, target = family.noisy_input_and_target(latents, noise, timesteps)
    torch.testing.assert_close(noisy, ((1 - sigmas) * 0.5 - sigmas).expand(2, 4, 8, 8))
    torch.testing.assert_close(target, noise - latents)
    embeds = family.encode_frozen_prompts(PROMPTS)
    conditioning = ImageConditioning(torch.zeros(2, 2), torch.zeros(2, 2), (16, 16))
    prediction = family.predict(family.denoiser, noisy, timesteps, embeds, conditioning)
    raw = family.denoiser(
        hidden_states=noisy,
        timesteps=timesteps,
        encoder_hidden_states_t5=embeds["prompt_embeds_t5"],
        encoder_hidden_states_llama3=embeds["prompt_embeds_llama3"].transpose(0, 1),
        pooled_embeds=embeds["pooled_prompt_embeds"],
        return_dict=False,
    )[0]
    torch.testing.assert_close(prediction, -raw)
    assert prediction.shape == noisy.shape
    assert family.loss_weights(timesteps, None) is None


def without_llama(pipeline_dirs, tmp_path):
    """The tiny pipeline as HiDream's Hub folders are: no `text_encoder_4`/`tokenizer_4`; the Llama saved apart."""
    folder, llama = tmp_path / "hidream", tmp_path / "llama"
    shutil.copytree(pipeline_dirs["hidream"], folder)
    llama.mkdir()
    for name in ("text_encoder_4", "tokenizer_4"):
        for path in (folder / name).iterdir():
            shutil.move(path, llama / path.name)
        (folder / name).rmdir()
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_4=[None, None], tokenizer_4=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, llama


def test_the_llama_loads_from_the_fourth_encoder_options(pipeline_dirs, tmp_path):
    folder, llama = without_llama(pipeline_dirs, tmp_path)
    paths = dict(pretrained_text_encoder_4_name_or_path=str(llama), pretrained_tokenizer_4_name_or_path=str(llama))
    config = tiny_config(str(folder), "unused", "unused", **paths)
    pipeline = load_base_pipeline(config)
    reference = LlamaForCausalLM.from_pretrained(llama)
    assert isinstance(pipeline.text_encoder_4, LlamaForCausalLM)
    for (name, value), expected in zip(pipeline.text_encoder_4.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name
    assert pipeline.tokenizer_4.pad_token == pipeline.tokenizer_4.eos_token  # the script pads with end-of-text
    assert pipeline.tokenizer_4("a dog").input_ids == AutoTokenizer.from_pretrained(llama)("a dog").input_ids
    # Reloaded for sampling after its embeddings are cached (`IdleModules`): from the same option.
    reloaded = load_base_component(config, "text_encoder_4", torch.float32)
    assert torch.equal(reloaded.lm_head.weight, reference.lm_head.weight)


def test_the_options_override_the_folders_llama_and_default_to_the_scripts(pipeline_dirs, tmp_path, monkeypatch):
    folder, llama = without_llama(pipeline_dirs, tmp_path)
    other = tmp_path / "other-llama"
    model = LlamaForCausalLM.from_pretrained(llama)
    torch.nn.init.zeros_(model.lm_head.weight)
    model.save_pretrained(other)
    config = tiny_config(
        pipeline_dirs["hidream"], "unused", "unused", pretrained_text_encoder_4_name_or_path=str(other)
    )
    assert not load_base_pipeline(config).text_encoder_4.lm_head.weight.any()
    # A folder without a Llama and no option: diffusers' default, meta-llama/Meta-Llama-3.1-8B-Instruct.
    asked = []

    def record(config, name, path, dtype):
        asked.append((name, path))
        raise DreamBoothInputError("offline")

    monkeypatch.setattr("diffusers_dreambooth.pipeline_loading.load_separate_component", record)
    with pytest.raises(DreamBoothInputError):
        load_base_pipeline(tiny_config(str(folder), "unused", "unused"))
    assert asked == [("text_encoder_4", HIDREAM_LLAMA)]


def test_readme_command_trains_two_steps(pipeline_dirs, tmp_path):
    """README_hidream.md's command, on a local captioned dataset in place of `linoyts/3d_icon`."""
    dataset = write_subject_images(tmp_path / "3d_icon", count=2)
    rows = [{"file_name": f"photo_{i}.png", "prompt": f"3d icon of sks dog, {i}"} for i in range(2)]
    (dataset / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs["hidream"],
        "--dataset_name": str(dataset),
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
    }
    flags = [f for f in readme_command("hidream", tmp_path) if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    flags += [f"{name}={value}" for name, value in swapped.items()] + ["--num_validation_images=1"]
    trainer = DreamBoothTrainer(parse_config(flags))
    trainer.train()
    assert trainer.global_step == 2
    assert (tmp_path / "trained-hidream-lora" / "pytorch_lora_weights.safetensors").is_file()
