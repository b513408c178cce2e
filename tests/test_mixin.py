"""Training from Python: the mixin on a pipeline class, `train_dreambooth` on a plain pipeline, family lookup."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DModel

from diffusers_dreambooth import DreamBoothTrainingMixin, family_for_pipeline, train_dreambooth
from diffusers_dreambooth.subject import SubjectMetadata

OPTIONS = TINY_RUN


class DreamBoothStableDiffusionPipeline(DreamBoothTrainingMixin, StableDiffusionPipeline):
    pass


def test_mixin_trains_in_place_and_saves_a_plain_diffusers_pipeline(pipeline_dirs, instance_dir, tmp_path):
    pipe = DreamBoothStableDiffusionPipeline.from_pretrained(pipeline_dirs["sd"])
    before = pipe.unet.conv_in.weight.detach().clone()
    trainer = pipe.train_dreambooth(instance_data_dir=str(instance_dir), output_dir=str(tmp_path / "out"), **OPTIONS)
    assert trainer.global_step == 2
    assert not torch.equal(before, pipe.unet.conv_in.weight)

    pipe.save_pretrained(tmp_path / "saved")
    model_index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is StableDiffusionPipeline
    assert torch.equal(reloaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_train_dreambooth_works_on_a_plain_pipeline(pipeline_dirs, instance_dir, tmp_path):
    # Loaded from a `Path`, so the pipeline's `name_or_path` is one too: dreambooth.json must still record it.
    pipe = DiffusionPipeline.from_pretrained(Path(pipeline_dirs["sdxl"]))
    before = pipe.unet.conv_in.weight.detach().clone()
    train_dreambooth(pipe, instance_data_dir=str(instance_dir), output_dir=str(tmp_path / "out"), **OPTIONS)
    assert not torch.equal(before, pipe.unet.conv_in.weight)
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert SubjectMetadata.from_json_file(tmp_path / "out" / "dreambooth.json").base_model == str(
        pipeline_dirs["sdxl"]
    )


def test_full_fine_tune_of_a_half_precision_pipeline_is_refused(pipeline_dirs, instance_dir, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"], torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        train_dreambooth(pipe, instance_data_dir=str(instance_dir), output_dir=str(tmp_path / "out"), **OPTIONS)
    lora = DiffusionPipeline.from_pretrained(pipeline_dirs["sd"], torch_dtype=torch.bfloat16)
    train_dreambooth(
        lora, instance_data_dir=str(instance_dir), output_dir=str(tmp_path / "lora"), adapter="lora", **OPTIONS
    )
    assert {p.dtype for n, p in lora.unet.named_parameters() if "lora_" in n} == {torch.float32}


def test_unsupported_pipeline_error_lists_the_supported_ones():
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="DDPMPipeline") as error:
        family_for_pipeline(pipeline)
    assert "StableDiffusionPipeline" in str(error.value) and "StableDiffusionXLPipeline" in str(error.value)
