"""The assertions every model family passes end to end on its tiny pipeline, full and LoRA: `DreamBoothFamilyTester`.

A test module subclasses it per family and sets only attributes (as diffusers' pipeline tests do).
"""

import json
import shutil

import pytest
import torch
import yaml
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline

from diffusers_dreambooth import DreamBoothConfig, DreamBoothInputError, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.model_card import FAMILY_TAGS


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict, after: dict, keys=None) -> set[str]:
    keys = before.keys() if keys is None else keys
    return {k for k in keys if not torch.equal(before[k].float(), after[k].float())}


def denoiser_name(pipeline) -> str:
    return family_for_pipeline(pipeline).denoiser_name


def text_encoders(pipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by attribute name, as its family reads them (SD3's T5 only when it has one)."""
    family = family_for_pipeline(pipeline)
    return dict(zip(family.text_encoder_names, family.text_encoders))


def generate(pipeline, prompt: str = "a photo of sks dog", **options) -> torch.Tensor:
    output = pipeline(
        prompt,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,  # Flux's default size is 128 latents, whatever the model
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **options,
    ).images
    return torch.from_numpy(output)


def unchanged_vae(base, trained) -> bool:
    """Whether the VAE kept its weights; pixel-space pipelines (DeepFloyd IF) have none."""
    if getattr(base, "vae", None) is None:
        return True
    return not changed(state_of(base.vae), state_of(trained.vae))


class DreamBoothFamilyTester:
    """Assertions every family must pass; subclasses set `family`."""

    family: str
    #: Denoiser modules whose LoRA gets no gradient by the model's design, so whose `lora_B` stays zero.
    lora_modules_without_gradient: tuple[str, ...] = ()
    #: Text encoders that `--train_text_encoder` leaves frozen, as diffusers' scripts for the family do.
    frozen_text_encoders: tuple[str, ...] = ()
    #: Options every run of the family's tests takes.
    run_options: dict = {}
    #: Pipeline arguments besides the prompt that generation needs (a super-resolution stage's input image).
    call_options: dict = {}
    #: Whether `--train_text_encoder` trains (False: LLM text encoders, frozen as in diffusers' scripts, so the option
    #: is refused before training).
    trains_text_encoders: bool = True
    #: Whether `--train_text_encoder` combines with LoRA (DeepFloyd IF: no, diffusers cannot load a T5 LoRA).
    lora_trains_text_encoder: bool = True
    #: Whether the pipeline makes class images from the class prompt; if not, the tests supply them.
    generates_class_images: bool = True

    def generate(self, pipeline) -> torch.Tensor:
        return generate(pipeline, **self.call_options)

    def config(self, pipeline_dirs, instance_dir, tmp_path, **overrides) -> DreamBoothConfig:
        options = {
            "train_batch_size": 2,
            "max_train_steps": 4,
            "checkpointing_steps": 2,
            **self.run_options,
            **overrides,
        }
        return tiny_config(pipeline_dirs[self.family], instance_dir, tmp_path / "out", **options)

    def test_full_fine_tune_trains_the_denoiser_only(self, pipeline_dirs, instance_dir, tmp_path):
        config = self.config(
            pipeline_dirs,
            instance_dir,
            tmp_path,
            with_prior_preservation=True,
            class_prompt="a photo of dog",
            class_data_dir=str(tmp_path / "class"),
            num_class_images=3,
        )
        if not self.generates_class_images:
            write_subject_images(tmp_path / "class", count=3, size=(TINY_RESOLUTION, TINY_RESOLUTION), seed=1)
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()
        name = denoiser_name(base)
        denoiser = getattr(pipeline, name)

        assert len(changed(state_of(getattr(base, name)), state_of(denoiser))) > 0.9 * len(denoiser.state_dict())
        assert unchanged_vae(base, pipeline)
        for encoder_name, encoder in text_encoders(base).items():
            assert not changed(state_of(encoder), state_of(getattr(pipeline, encoder_name))), encoder_name
        # The output is a plain diffusers pipeline folder that reproduces the trained pipeline's images.
        model_index = json.loads((tmp_path / "out" / "model_index.json").read_text())
        assert model_index["_class_name"] == type(base).__name__
        reloaded = DiffusionPipeline.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(self.generate(reloaded), self.generate(pipeline), atol=1e-5, rtol=0)
        assert not torch.allclose(self.generate(base), self.generate(pipeline), atol=1e-4)
        saved_config = json.loads((tmp_path / "out" / "dreambooth_config.json").read_text())
        assert saved_config["instance_prompt"] == "a photo of sks dog"
        # diffusers' README: a checkpoint's unet (transformer) folder loads for inference.
        checkpointed = type(denoiser).from_pretrained(tmp_path / "out" / "checkpoint-4" / name)
        assert not changed(state_of(checkpointed), state_of(denoiser))

    def test_train_text_encoder_updates_the_family_text_encoders(self, pipeline_dirs, instance_dir, tmp_path):
        config = self.config(pipeline_dirs, instance_dir, tmp_path, train_text_encoder=True, max_train_steps=2)
        if not self.trains_text_encoders:
            trainer = DreamBoothTrainer(config)
            with pytest.raises(DreamBoothInputError, match="--train_text_encoder"):
                trainer.train()
            assert not (tmp_path / "out" / "checkpoint-2").exists()
            return
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()
        for name, encoder in text_encoders(base).items():
            trained = bool(changed(state_of(encoder), state_of(getattr(pipeline, name))))
            assert trained == (name not in self.frozen_text_encoders), name
        assert unchanged_vae(base, pipeline)

    def test_lora_trains_adapters_and_loads_in_plain_diffusers(self, pipeline_dirs, instance_dir, tmp_path):
        train_text_encoder = self.lora_trains_text_encoder
        config = self.config(
            pipeline_dirs, instance_dir, tmp_path, adapter="lora", rank=4, train_text_encoder=train_text_encoder
        )
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()
        name = denoiser_name(base)

        trained_denoiser = state_of(getattr(pipeline, name))
        base_keys = [k for k in trained_denoiser if "lora_" not in k]
        lora_keys = [k for k in trained_denoiser if "lora_B" in k]
        assert lora_keys
        # PEFT wraps base layers (`to_q.weight` -> `to_q.base_layer.weight`): compare by original name.
        original = state_of(getattr(base, name))
        assert all(torch.equal(original[k.replace(".base_layer", "")], trained_denoiser[k]) for k in base_keys)
        # lora_B starts at zero, so it moved wherever the loss reaches it.
        unchanged = {k.split(".lora_B")[0] for k in lora_keys if not trained_denoiser[k].abs().sum() > 0}
        assert unchanged == set(self.lora_modules_without_gradient)

        assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
        assert not (tmp_path / "out" / name).exists()
        plain = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        plain.load_lora_weights(tmp_path / "out")
        family_for_pipeline(plain).sample_as_trained()  # IF: fixed variance, as diffusers' docs say after loading
        torch.testing.assert_close(self.generate(plain), self.generate(pipeline), atol=1e-5, rtol=0)
        assert not torch.allclose(self.generate(base), self.generate(pipeline), atol=1e-4)

    def test_precomputed_embeddings_train_and_the_card_names_the_family(self, pipeline_dirs, instance_dir, tmp_path):
        config = self.config(
            pipeline_dirs, instance_dir, tmp_path, adapter="lora", rank=4, pre_compute_text_embeddings=True
        )
        base = DiffusionPipeline.from_pretrained(pipeline_dirs[self.family])
        pipeline = DreamBoothTrainer(config).train()
        assert not torch.allclose(self.generate(base), self.generate(pipeline), atol=1e-4)
        family = family_for_pipeline(base)
        card = (tmp_path / "out" / "README.md").read_text()
        tags = yaml.safe_load(card.split("---")[1])["tags"]
        assert {"dreambooth", "lora", *FAMILY_TAGS[family.name]} <= set(tags)
        assert f"from diffusers import {type(base).__name__}" in card

    @pytest.mark.parametrize("adapter", ["full", "lora"])
    def test_resumed_run_matches_an_unbroken_one(self, pipeline_dirs, instance_dir, tmp_path, adapter):
        options = dict(adapter=adapter, max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear")
        unbroken = DreamBoothTrainer(self.config(pipeline_dirs, instance_dir, tmp_path, **options)).train()
        name = denoiser_name(unbroken)
        expected = state_of(getattr(unbroken, name))

        # Simulate a run that died after its step-2 checkpoint: only checkpoint-2 is left.
        out = tmp_path / "out"
        for path in out.iterdir():
            if path.name != "checkpoint-2":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        config = self.config(pipeline_dirs, instance_dir, tmp_path, resume_from_checkpoint="latest", **options)
        resumed = DreamBoothTrainer(config).train()
        assert not changed(expected, state_of(getattr(resumed, name)))
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
