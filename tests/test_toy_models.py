"""The toy base model's architecture: sizes of the TOYWORLD recipe, a tokenizer that knows the world's words."""

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_dreambooth import family_for_pipeline
from diffusers_dreambooth.toy import BACKGROUNDS, COLORS, SHAPES, SUBJECT_IDENTIFIER
from diffusers_dreambooth.toy.models import parameter_counts, save_untrained_pipeline, world_prompts


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return save_untrained_pipeline(tmp_path_factory.mktemp("toy") / "untrained", seed=0)


def test_prompts_cover_the_world_and_the_subject():
    prompts = world_prompts()
    assert "a photo of a red star on a blue background" in prompts
    assert "a photo of a red and yellow striped star on a white background" in prompts
    assert "a photo of sks star" in prompts and "a photo of a star" in prompts and "" in prompts
    assert len(prompts) == len(set(prompts))


def test_every_world_word_is_one_token(toy_dir):
    pipe = DiffusionPipeline.from_pretrained(toy_dir)
    for word in [*SHAPES, *COLORS, *BACKGROUNDS, SUBJECT_IDENTIFIER, "striped", "background"]:
        assert pipe.tokenizer.tokenize(word) == [f"{word}</w>"], word


def test_sizes_match_the_recipe_and_it_generates_32px(toy_dir):
    pipe = DiffusionPipeline.from_pretrained(toy_dir)
    counts = parameter_counts(pipe)
    assert 1.3e6 < counts["unet"] < 1.7e6
    assert 0.55e6 < counts["vae"] < 0.75e6
    assert 0.1e6 < counts["text_encoder"] < 0.2e6
    assert family_for_pipeline(pipe).vae_scale_factor == 4
    image = pipe("a photo of a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_seeded_build_is_reproducible(toy_dir, tmp_path):
    again = DiffusionPipeline.from_pretrained(save_untrained_pipeline(tmp_path / "again", seed=0))
    first = DiffusionPipeline.from_pretrained(toy_dir)
    assert torch.equal(again.unet.conv_in.weight, first.unet.conv_in.weight)
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
