"""Several subjects in one run (`--concepts_list`): options, the training order, and training on the tiny SD model."""

import json
import logging
import shutil
from collections import Counter

import pytest
import torch
import yaml
from conftest import TINY_RUN, write_subject_images

from diffusers_dreambooth import DreamBoothConfig, DreamBoothPipeline, DreamBoothTrainer
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.data import SubjectImages, TrainingOrder
from diffusers_dreambooth.subject import SubjectMetadata
from diffusers_dreambooth.toy import CHECKER_DIR


@pytest.fixture
def two_subjects(tmp_path) -> list[dict]:
    """A dog with three photos and a cat with two, each with its class prompt and class folder."""
    dog = write_subject_images(tmp_path / "dog", count=3, size=(32, 32), seed=0)
    cat = write_subject_images(tmp_path / "cat", count=2, size=(32, 32), seed=1)
    return [
        dict(
            instance_data_dir=str(dog),
            instance_prompt="a photo of sks dog",
            class_prompt="a photo of dog",
            class_data_dir=str(tmp_path / "class-dog"),
        ),
        dict(
            instance_data_dir=str(cat),
            instance_prompt="a photo of zwx cat",
            class_prompt="a photo of cat",
            class_data_dir=str(tmp_path / "class-cat"),
        ),
    ]


def config_for(pretrained, concepts, output_dir, **overrides) -> DreamBoothConfig:
    options = {**TINY_RUN, "instance_prompt": None, "train_batch_size": 2, **overrides}
    return DreamBoothConfig(
        pretrained_model_name_or_path=str(pretrained), output_dir=str(output_dir), concepts_list=concepts, **options
    )


# Options


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_concepts_list_file_is_read_into_complete_entries(tmp_path, two_subjects, suffix):
    path = tmp_path / f"concepts{suffix}"
    path.write_text(json.dumps(two_subjects) if suffix == ".json" else yaml.safe_dump(two_subjects))

    config = parse_config(["--concepts_list", str(path), "--with_prior_preservation", "--output_dir", "out"])

    assert config.concepts_list == [{**concept, "identifier": None} for concept in two_subjects]
    assert [data.instance_prompt for data in config.subject_data()] == ["a photo of sks dog", "a photo of zwx cat"]
    assert [data.class_data_dir for data in config.subject_data()] == [c["class_data_dir"] for c in two_subjects]


def test_a_config_file_may_hold_the_list_itself(tmp_path, two_subjects):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"concepts_list": two_subjects, "with_prior_preservation": True}))

    config = parse_config(["--config", str(path)])

    assert [data.class_prompt for data in config.subject_data()] == ["a photo of dog", "a photo of cat"]


def test_one_subject_without_concepts_list_is_the_top_level_options():
    config = DreamBoothConfig(instance_data_dir="dog", instance_prompt="a photo of sks dog", identifier="sks")

    [data] = config.subject_data()
    assert (data.instance_data_dir, data.instance_prompt, data.identifier) == ("dog", "a photo of sks dog", "sks")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(instance_prompt="a photo of sks dog"), "`--instance_prompt` must not be set as well"),
        (dict(instance_data_dir="dog"), "`--instance_data_dir` must not be set as well"),
        (dict(concepts_list=[]), "non-empty list of subjects"),
        (dict(concepts_list=[{"instance_data_dir": "dog"}]), "entry 0 needs `instance_prompt`"),
        (dict(concepts_list=[{"instance_data_dir": "d", "instance_prompt": "p", "colour": 1}]), "unknown key"),
        (dict(concepts_list=["dog"]), "entry 0 must be a mapping"),
        (dict(identifier="sks"), "the same identifier"),
        (dict(validation_prompt="a photo of {identifier} dog", identifier="auto"), "ambiguous with several"),
        (dict(train_text_encoder_ti=True), "concepts_list"),
        (
            dict(sample_prompts=["{subject_1}", "{subject_3} at the beach"]),
            r"`--sample_prompts\[1\]` names `\{subject_3\}`",
        ),
        (dict(validation_prompt="{subject_0}"), r"from `\{subject_1\}` to `\{subject_2\}`"),
    ],
)
def test_bad_concepts_fail_naming_the_option(two_subjects, change, message):
    options = {"concepts_list": two_subjects, **change}
    with pytest.raises(ValueError, match=message):
        DreamBoothConfig(**options)


def test_prior_preservation_needs_every_subjects_class(two_subjects):
    two_subjects[1]["class_data_dir"] = None
    with pytest.raises(ValueError, match=r"`class_data_dir` in every `--concepts_list` entry; entry 1"):
        DreamBoothConfig(concepts_list=two_subjects, with_prior_preservation=True)
    # The base model's own prediction needs no class folder.
    DreamBoothConfig(concepts_list=two_subjects, with_prior_preservation=True, prior_preservation_mode="model")


def test_prior_preservation_needs_class_images_for_every_subject(two_subjects):
    with pytest.raises(ValueError, match="`--num_class_images` must be at least 1, got 0"):
        DreamBoothConfig(concepts_list=two_subjects, with_prior_preservation=True, num_class_images=0)
    # The base model's own prediction reads no class images.
    options = dict(with_prior_preservation=True, prior_preservation_mode="model", num_class_images=0)
    DreamBoothConfig(concepts_list=two_subjects, **options)


def test_one_class_folder_cannot_hold_two_class_prompts(two_subjects):
    two_subjects[1]["class_data_dir"] = two_subjects[0]["class_data_dir"]
    with pytest.raises(ValueError, match="two class prompts"):
        DreamBoothConfig(concepts_list=two_subjects, with_prior_preservation=True)


def test_identifier_placeholder_needs_an_identifier(two_subjects):
    two_subjects[1]["instance_prompt"] = "a photo of {identifier} cat"
    with pytest.raises(ValueError, match=r"entry 1 writes `\{identifier\}`"):
        DreamBoothConfig(concepts_list=two_subjects)
    DreamBoothConfig(concepts_list=[two_subjects[0], {**two_subjects[1], "identifier": "zwx"}])


def test_missing_concepts_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        DreamBoothConfig(concepts_list=str(tmp_path / "missing.yaml"))


# The training order


def test_every_subject_gets_an_equal_share_paired_with_its_own_class_images():
    dog, cat = SubjectImages(0, 3, 0, 4), SubjectImages(3, 2, 4, 6)  # 3 dog photos, 2 cat photos
    order = TrainingOrder.for_subjects([dog, cat], seed=0)

    assert order.length == 2 * 6  # each subject's longest list (the cat's 6 class images) fills half an epoch
    instance_ids, class_ids = order.batch(0, order.length)
    dogs = [(i, c) for i, c in zip(instance_ids, class_ids) if i < 3]
    cats = [(i, c) for i, c in zip(instance_ids, class_ids) if i >= 3]
    assert len(dogs) == len(cats) == 6
    assert all(c < 4 for _, c in dogs) and all(4 <= c < 10 for _, c in cats)
    assert Counter(i for i, _ in dogs) == {0: 2, 1: 2, 2: 2} and Counter(i for i, _ in cats) == {3: 3, 4: 3}
    assert sorted(c for _, c in cats) == list(range(4, 10))


def test_one_subject_through_for_subjects_is_the_plain_order():
    plain = TrainingOrder(num_instance=3, num_class=5, seed=7)
    subjects = TrainingOrder.for_subjects([SubjectImages(0, 3, 0, 5)], seed=7)

    assert [plain.batch(b, 4) for b in range(6)] == [subjects.batch(b, 4) for b in range(6)]


# Training


def test_two_subjects_train_into_one_model_that_knows_both(pipeline_dirs, two_subjects, tmp_path):
    output_dir = tmp_path / "out"
    config = config_for(
        pipeline_dirs["sd"], two_subjects, output_dir, with_prior_preservation=True, num_class_images=3
    )
    trainer = DreamBoothTrainer(config)
    pipeline = trainer.train()

    # Each subject's class images were generated from its own class prompt, into its own folder.
    assert [len(list((tmp_path / f"class-{name}").glob("*.png"))) for name in ("dog", "cat")] == [3, 3]
    assert {image.prompt for image in trainer.class_images} == {"a photo of dog", "a photo of cat"}
    assert [image.prompt for image in trainer.instance_images] == ["a photo of sks dog"] * 3 + [
        "a photo of zwx cat"
    ] * 2
    metadata = SubjectMetadata.from_json_file(output_dir / "dreambooth.json")
    assert [(s.identifier, s.class_noun, s.class_prompt) for s in metadata.subjects] == [
        ("sks", "dog", "a photo of dog"),
        ("zwx", "cat", "a photo of cat"),
    ]
    assert metadata.sample_grid_prompts == ["a photo of sks dog", "a photo of zwx cat"]  # a grid row per subject
    card = (output_dir / "README.md").read_text()
    assert "# DreamBooth full fine-tune: sks dog, zwx cat" in card
    assert "| **`zwx cat`** | `a photo of zwx cat` | `{zwx}` |" in card
    assert 'pipe("a photo of {subject} and {zwx} on the beach")' in card  # DreamBoothPipeline
    assert 'pipe("a photo of sks dog and zwx cat on the beach")' in card  # plain diffusers

    loaded = DreamBoothPipeline.from_pretrained(output_dir)
    assert loaded.fill_prompt("{sks} and {zwx}") == "sks dog and zwx cat"
    assert loaded.fill_prompt("a photo of {subject}") == "a photo of sks dog"
    generator = torch.Generator().manual_seed(0)
    ours = loaded("a photo of {zwx}", num_inference_steps=2, generator=generator, output_type="np").images
    generator = torch.Generator().manual_seed(0)
    direct = pipeline("a photo of zwx cat", num_inference_steps=2, generator=generator, output_type="np").images
    assert torch.allclose(torch.from_numpy(ours), torch.from_numpy(direct), atol=1e-5)


def test_subjects_of_one_class_share_its_class_images(pipeline_dirs, two_subjects, tmp_path):
    for concept in two_subjects:
        concept.update(class_prompt="a photo of pet", class_data_dir=str(tmp_path / "class-pet"))
    config = config_for(
        pipeline_dirs["sd"], two_subjects, tmp_path / "out", with_prior_preservation=True, num_class_images=3
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()

    assert len(trainer.class_images) == 3 and len(list((tmp_path / "class-pet").glob("*.png"))) == 3
    assert [(s.class_start, s.num_class) for s in trainer.order.subjects] == [(0, 3), (0, 3)]


def test_auto_gives_each_subject_its_own_rare_token(pipeline_dirs, two_subjects, tmp_path):
    for concept in two_subjects:
        concept["instance_prompt"] = concept["instance_prompt"].replace("sks", "{identifier}")
        concept["instance_prompt"] = concept["instance_prompt"].replace("zwx", "{identifier}")
    output_dir = tmp_path / "out"
    trainer = DreamBoothTrainer(config_for(pipeline_dirs["sd"], two_subjects, output_dir, identifier="auto"))
    trainer.train()

    subjects = SubjectMetadata.from_json_file(output_dir / "dreambooth.json").subjects
    first, second = (subject.identifier for subject in subjects)
    assert first != second
    assert [s.instance_prompt for s in subjects] == [f"a photo of {first} dog", f"a photo of {second} cat"]
    assert "| identifier chosen | rare token (auto) |" in (output_dir / "README.md").read_text()
    saved = json.loads((output_dir / "dreambooth_config.json").read_text())
    assert [c["identifier"] for c in saved["concepts_list"]] == [first, second]  # a rerun uses the same tokens


def test_validation_during_training_fills_each_subjects_placeholder(pipeline_dirs, two_subjects, tmp_path, caplog):
    """`{subject_2}` names the second subject whatever token `--identifier auto` gave it, in step validation too."""
    two_subjects[1]["instance_prompt"] = "a photo of {identifier} cat"
    options = dict(
        identifier="auto",
        validation_prompt="{subject_2} next to {subject}",
        validation_steps=1,
        num_validation_images=1,
    )
    trainer = DreamBoothTrainer(config_for(pipeline_dirs["sd"], two_subjects, tmp_path / "out", **options))
    with caplog.at_level(logging.INFO, logger="diffusers_dreambooth"):
        trainer.train()

    second = SubjectMetadata.from_json_file(tmp_path / "out" / "dreambooth.json").subjects[1].identifier
    validated = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Validation at step")]
    assert validated == [f"Validation at step {step}: images of '{second} cat next to sks dog'" for step in (1, 2)]
    assert sorted(p.name for p in (tmp_path / "out" / "validation" / "step-2").glob("*.png")) == ["0.png"]


def test_two_subjects_with_one_identifier_are_refused(pipeline_dirs, two_subjects, tmp_path):
    two_subjects[1]["instance_prompt"] = "a photo of sks cat"
    with pytest.raises(ValueError, match="have the identifier 'sks'"):
        DreamBoothTrainer(config_for(pipeline_dirs["sd"], two_subjects, tmp_path / "out")).train()


def test_prior_from_the_base_model_uses_each_subjects_class_prompt(pipeline_dirs, two_subjects, tmp_path):
    config = config_for(
        pipeline_dirs["sd"],
        two_subjects,
        tmp_path / "out",
        adapter="lora",
        with_prior_preservation=True,
        prior_preservation_mode="model",
    )
    trainer = DreamBoothTrainer(config)
    trainer.train()

    assert sorted(trainer.base_class_embeds) == ["a photo of cat", "a photo of dog"]
    dog, cat = (trainer.base_class_embeds[p]["prompt_embeds"] for p in ("a photo of dog", "a photo of cat"))
    assert not torch.equal(dog, cat)
    # The prior half of a dog-and-cat batch is conditioned on each example's own class prompt.
    noisy = torch.zeros(2, 4, 4, 4)
    embeds = trainer._prompt_embeds(["a photo of sks dog", "a photo of zwx cat"])
    conditioning = trainer._latent_distribution(
        [
            (trainer.instance_images, trainer.instance_latents, 0),
            (trainer.instance_images, trainer.instance_latents, 3),
        ],
        [0, 1],
        0,
    )[2]
    _, _, both, _, _, is_prior = trainer._with_base_model_targets(
        noisy, torch.tensor([10, 10]), embeds, conditioning, noisy, ["a photo of dog", "a photo of cat"]
    )
    expected = trainer._prompt_embeds(["a photo of dog", "a photo of cat"])["prompt_embeds"]
    assert torch.equal(both["prompt_embeds"][2:], expected.to(both["prompt_embeds"].dtype))
    assert is_prior.tolist() == [False, False, True, True]


def test_a_resumed_two_subject_run_matches_an_unbroken_one(pipeline_dirs, two_subjects, tmp_path):
    options = dict(max_train_steps=4, checkpointing_steps=2, with_prior_preservation=True, num_class_images=2)
    out = tmp_path / "out"
    unbroken = DreamBoothTrainer(config_for(pipeline_dirs["sd"], two_subjects, out, **options)).train()
    expected = {k: v.clone() for k, v in unbroken.unet.state_dict().items()}

    for path in out.iterdir():  # a run that died after its step-2 checkpoint
        if path.name != "checkpoint-2":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    config = config_for(pipeline_dirs["sd"], two_subjects, out, resume_from_checkpoint="latest", **options)
    resumed = DreamBoothTrainer(config).train()

    assert all(torch.equal(expected[k], v) for k, v in resumed.unet.state_dict().items())
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_evaluation_measures_each_subject(pipeline_dirs, two_subjects, tmp_path):
    output_dir = tmp_path / "out"
    config = config_for(
        pipeline_dirs["sd"],
        two_subjects,
        output_dir,
        evaluate=True,
        evaluation_prompts=["a photo of {subject}"],
        evaluation_images_per_prompt=2,
        evaluation_dino_model=str(CHECKER_DIR),
        evaluation_clip_model=str(CHECKER_DIR),
        num_validation_images=1,
    )
    DreamBoothTrainer(config).train()

    evaluation = SubjectMetadata.from_json_file(output_dir / "dreambooth.json").evaluation
    for phrase in ("sks dog", "zwx cat"):
        for metric in ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"):
            assert isinstance(evaluation[f"{phrase}: {metric}"], float), (phrase, metric)
    assert evaluation["sks dog: DINO"] != evaluation["zwx cat: DINO"]  # measured against each subject's own photos


def test_without_prior_preservation_class_entries_are_ignored(pipeline_dirs, two_subjects, tmp_path, caplog):
    two_subjects[1].update(class_prompt=None, class_data_dir=None)  # only the dog names its class
    trainer = DreamBoothTrainer(config_for(pipeline_dirs["sd"], two_subjects, tmp_path / "out", max_train_steps=1))
    trainer.train()

    assert trainer.class_images == [] and not (tmp_path / "class-dog").exists()
    assert "entry 0: `class_prompt`/`class_data_dir` are ignored without `--with_prior_preservation`" in caplog.text
