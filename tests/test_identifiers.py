"""Rare-token identifiers (`diffusers_dreambooth.identifiers`) and the `--identifier` option with `{identifier}`."""

import json

import pytest
from conftest import tiny_config
from diffusers import DiffusionPipeline

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.identifiers import prior_strength, rare_token_identifiers


@pytest.fixture(scope="module")
def pipelines(pipeline_dirs):
    families = ("sd", "sdxl", "sd3", "flux")
    return {family: DiffusionPipeline.from_pretrained(pipeline_dirs[family]) for family in families}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_identifiers_are_short_single_tokens_in_every_tokenizer(pipelines, family):
    pipeline = pipelines[family]
    identifiers = rare_token_identifiers(pipeline, count=5)

    assert identifiers and len(identifiers) == len(set(identifiers)) <= 5
    for identifier in identifiers:
        assert identifier.isascii() and identifier.isalpha() and 1 <= len(identifier) <= 3
        for tokenizer in family_for_pipeline(pipeline).tokenizers:
            assert len(tokenizer(identifier, add_special_tokens=False).input_ids) == 1, (identifier, tokenizer)
    # Deterministic: the same pipeline gives the same list, and a shorter list is its prefix.
    assert rare_token_identifiers(pipeline, count=5) == identifiers
    assert rare_token_identifiers(pipeline, count=2) == identifiers[:2]


def test_identifiers_come_from_the_rare_range_weakest_prior_first(pipelines):
    pipeline = pipelines["sd"]
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    identifiers = rare_token_identifiers(pipeline, count=1000)
    ids = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in identifiers]

    assert all(token_id >= len(tokenizer) // 2 for token_id in ids)  # the later half of a BPE vocabulary
    strength = prior_strength(encoder)
    assert [float(strength[i]) for i in ids] == sorted(float(strength[i]) for i in ids)
    # Without text encoders: latest merges first.
    by_id = rare_token_identifiers([tokenizer], count=1000)
    assert sorted(by_id) == sorted(identifiers)
    assert [tokenizer(w, add_special_tokens=False).input_ids[0] for w in by_id] == sorted(ids, reverse=True)


def test_excluded_words_and_an_empty_range_are_handled(pipelines):
    pipeline = pipelines["sd"]
    first = rare_token_identifiers(pipeline, count=1)[0]

    assert first not in rare_token_identifiers(pipeline, count=3, exclude=[first.upper()])
    with pytest.raises(ValueError, match="No rare-token identifier found"):
        rare_token_identifiers(pipeline, vocab_range=(0.0, 0.001))


def test_placeholder_without_an_identifier_is_a_clear_error(pipeline_dirs, instance_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`--instance_prompt` contains `\{identifier\}`.*--identifier auto"):
        tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path, instance_prompt="a photo of {identifier} dog")
    with pytest.raises(ValueError, match=r"`--validation_prompt` contains"):
        tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path, validation_prompt="{identifier} dog on the moon")
    with pytest.raises(ValueError, match="one word"):
        tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path, identifier="two words")


def test_with_identifier_fills_every_prompt(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path,
        identifier="auto",
        instance_prompt="a photo of {identifier} dog",
        validation_prompt="{identifier} dog on the moon",
        sample_prompts=["a {identifier} dog", "a dog"],
        evaluation_prompts=["{identifier} dog in a bucket"],
    )
    filled = config.with_identifier("zq")

    assert filled.identifier == "zq"
    assert filled.instance_prompt == "a photo of zq dog"
    assert filled.validation_prompt == "zq dog on the moon"
    assert filled.sample_prompts == ["a zq dog", "a dog"]
    assert filled.evaluation_prompts == ["zq dog in a bucket"]
    assert isinstance(DreamBoothConfig.from_dict(filled.to_dict()), DreamBoothConfig)


def test_auto_identifier_trains_and_is_recorded(pipeline_dirs, pipelines, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path / "out",
        identifier="auto",
        instance_prompt="a photo of {identifier} dog",
        validation_prompt="a photo of {identifier} dog on the moon",
        validation_steps=100,
        num_validation_images=1,
        max_train_steps=1,
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()
    prompt_words = ["a", "photo", "of", "dog", "on", "the", "moon"]
    expected = rare_token_identifiers(pipelines["sd"], count=1, exclude=prompt_words)

    out = tmp_path / "out"
    subject = json.loads((out / "dreambooth.json").read_text())
    assert subject["subjects"][0]["identifier"] == expected[0]
    assert subject["subjects"][0]["class_noun"] == "dog"
    assert subject["subjects"][0]["instance_prompt"] == f"a photo of {expected[0]} dog"
    assert subject["training"]["identifier_source"] == "rare token (auto)"
    assert subject["sample_prompt"] == f"a photo of {expected[0]} dog on the moon"
    saved = json.loads((out / "dreambooth_config.json").read_text())
    assert saved["identifier"] == expected[0] and "{identifier}" not in saved["instance_prompt"]
    assert trainer.instance_images[0].prompt == f"a photo of {expected[0]} dog"
    card = (out / "README.md").read_text()
    assert f"| identifier | {expected[0]} |" in card
    assert f"`{expected[0]} dog`" in card


def test_given_identifier_fills_the_placeholder(pipeline_dirs, instance_dir, tmp_path):
    config = tiny_config(
        pipeline_dirs["sd"],
        instance_dir,
        tmp_path / "out",
        identifier="sks",
        instance_prompt="a photo of {identifier} dog",
        num_validation_images=0,
        max_train_steps=1,
    )
    DreamBoothTrainer(config).train()

    subject = json.loads((tmp_path / "out" / "dreambooth.json").read_text())
    assert subject["subjects"][0]["instance_prompt"] == "a photo of sks dog"
    assert subject["training"]["identifier"] == "sks" and subject["training"]["identifier_source"] == "given"
