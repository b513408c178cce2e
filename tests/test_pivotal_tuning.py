"""Pivotal tuning (`--train_text_encoder_ti`): only the new tokens' embeddings train; plain diffusers loads them."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffusers_dreambooth import DreamBoothPipeline, DreamBoothTrainer
from diffusers_dreambooth.pivotal import TEXTUAL_INVERSION_WEIGHT_NAME

TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
TI_RUN = dict(
    train_text_encoder_ti=True,
    instance_prompt="a photo of {identifier} dog",
    adapter="lora",
    learning_rate=1e-2,
    text_encoder_lr=1e-1,
    max_train_steps=3,
    lr_warmup_steps=0,
)


def train(pipeline_dirs, instance_dir, output_dir, family, **overrides):
    config = tiny_config(pipeline_dirs[family], instance_dir, output_dir, **{**TI_RUN, **overrides})
    return DreamBoothTrainer(config).train()


def images(pipe, prompt):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def text_encoder_state(pipe, family):
    return {
        f"{name}.{k}": v.clone() for name in TEXT_ENCODERS[family] for k, v in getattr(pipe, name).state_dict().items()
    }


@pytest.mark.parametrize(("family", "num_tokens"), [("sd", 1), ("sdxl", 2)])
def test_only_new_token_rows_train_and_plain_diffusers_reproduces_the_subject(
    pipeline_dirs, instance_dir, tmp_path, family, num_tokens
):
    base = text_encoder_state(DiffusionPipeline.from_pretrained(pipeline_dirs[family]), family)
    trained = train(pipeline_dirs, instance_dir, tmp_path / "out", family, num_new_tokens_per_abstraction=num_tokens)
    tokens = [f"<s{i}>" for i in range(num_tokens)]
    after = text_encoder_state(trained, family)
    for name in TEXT_ENCODERS[family]:
        tokenizer = getattr(trained, name.replace("text_encoder", "tokenizer"))
        ids = tokenizer.convert_tokens_to_ids(tokens)
        embedding = getattr(trained, name).get_input_embeddings().weight
        key = next(f"{name}.{k}" for k, p in getattr(trained, name).named_parameters() if p is embedding)
        old_rows = base[key].shape[0]
        assert min(ids) >= old_rows and after[key].shape[0] == old_rows + num_tokens
        assert torch.equal(after[key][:old_rows], base[key]), f"{name}: a base token's embedding changed"
        assert after[key][ids].abs().sum() > 0
        for other, value in base.items():
            if other.startswith(f"{name}.") and other != key:
                assert torch.equal(after[other], value), f"{other} changed"

    metadata = json.loads((tmp_path / "out" / "dreambooth.json").read_text())
    identifier = "".join(tokens)
    assert metadata["textual_inversion_weight_name"] == TEXTUAL_INVERSION_WEIGHT_NAME
    assert metadata["textual_inversion_tokens"] == tokens
    assert metadata["subjects"][0]["identifier"] == identifier and metadata["subjects"][0]["class_noun"] == "dog"
    embeddings = load_file(tmp_path / "out" / TEXTUAL_INVERSION_WEIGHT_NAME)
    assert sorted(embeddings) == (["clip_g", "clip_l"] if family == "sdxl" else ["clip_l"])
    assert "<s0>" in (tmp_path / "out" / "README.md").read_text()

    prompt = f"a photo of {identifier} dog on the moon"
    expected = images(trained, prompt)
    plain = DiffusionPipeline.from_pretrained(pipeline_dirs[family])
    assert not torch.allclose(torch.from_numpy(images(plain, prompt)), torch.from_numpy(expected), atol=1e-4)
    plain.load_lora_weights(tmp_path / "out")
    if family == "sd":  # one token: the file path alone loads
        plain.load_textual_inversion(tmp_path / "out" / TEXTUAL_INVERSION_WEIGHT_NAME, token="<s0>")
    else:  # diffusers' advanced-script README
        plain.load_textual_inversion(
            embeddings["clip_l"], token=tokens, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer
        )
        plain.load_textual_inversion(
            embeddings["clip_g"], token=tokens, text_encoder=plain.text_encoder_2, tokenizer=plain.tokenizer_2
        )
    torch.testing.assert_close(images(plain, prompt), expected, atol=1e-5, rtol=0)

    pipe = DreamBoothPipeline.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(images(pipe, "a photo of {subject} on the moon"), expected, atol=1e-5, rtol=0)
    pipe.save_pretrained(tmp_path / "copy")
    again = DreamBoothPipeline.from_pretrained(tmp_path / "copy")
    torch.testing.assert_close(images(again, prompt), expected, atol=1e-5, rtol=0)


def test_resumed_run_equals_an_unbroken_one(pipeline_dirs, instance_dir, tmp_path):
    options = dict(max_train_steps=4, checkpointing_steps=2)
    unbroken = train(pipeline_dirs, instance_dir, tmp_path / "unbroken", "sd", **options)
    checkpoint = tmp_path / "unbroken" / "checkpoint-2"
    assert (checkpoint / TEXTUAL_INVERSION_WEIGHT_NAME).is_file()
    # A run that died after its step-2 checkpoint: only that checkpoint is left.
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = train(
        pipeline_dirs, instance_dir, tmp_path / "resumed", "sd", resume_from_checkpoint="latest", **options
    )
    final = {name: load_file(tmp_path / name / TEXTUAL_INVERSION_WEIGHT_NAME) for name in ("unbroken", "resumed")}
    assert torch.equal(final["unbroken"]["clip_l"], final["resumed"]["clip_l"])
    assert torch.equal(
        unbroken.text_encoder.get_input_embeddings().weight, resumed.text_encoder.get_input_embeddings().weight
    )
    expected = unbroken.unet.state_dict()
    for key, value in resumed.unet.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_full_fine_tune_saves_the_tokens_in_the_pipeline(pipeline_dirs, instance_dir, tmp_path):
    trained = train(pipeline_dirs, instance_dir, tmp_path / "out", "sd", adapter="full", learning_rate=1e-4)
    prompt = "a photo of <s0> dog"
    expected = images(trained, prompt)
    plain = DiffusionPipeline.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(images(plain, prompt), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        images(DreamBoothPipeline.from_pretrained(tmp_path / "out"), "a photo of {subject}"),
        expected,
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(train_text_encoder=True), "--train_text_encoder=True"),
        (dict(identifier="sks"), "remove `--identifier`"),
        (dict(pre_compute_text_embeddings=True), "--pre_compute_text_embeddings"),
        (dict(instance_prompt="a photo of sks dog"), "has none"),
        (dict(num_new_tokens_per_abstraction=0), "at least 1"),
    ],
)
def test_conflicting_options_are_refused(pipeline_dirs, instance_dir, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(pipeline_dirs["sd"], instance_dir, tmp_path, **{**TI_RUN, **overrides})


@pytest.mark.parametrize("family", ["sd3", "if"])
def test_families_without_clip_only_text_encoders_are_refused(pipeline_dirs, instance_dir, tmp_path, family):
    with pytest.raises(ValueError, match="train_text_encoder_ti"):
        train(pipeline_dirs, instance_dir, tmp_path / "out", family)


def test_card_shows_how_plain_diffusers_loads_the_embeddings(monkeypatch):
    from pathlib import Path

    from diffusers_dreambooth import model_card
    from diffusers_dreambooth.subject import Subject, SubjectMetadata

    # The template of this checkout, whichever copy of the package is installed.
    monkeypatch.setattr(model_card, "files", lambda package: Path(__file__).resolve().parents[1] / "model_cards")
    metadata = SubjectMetadata(
        subjects=[Subject.from_prompts("a photo of <s0><s1> dog", identifier="<s0><s1>")],
        adapter="lora",
        family="stable-diffusion-xl",
        pipeline_class="StableDiffusionXLPipeline",
        lora_weight_name="pytorch_lora_weights.safetensors",
        textual_inversion_weight_name=TEXTUAL_INVERSION_WEIGHT_NAME,
        textual_inversion_tokens=["<s0>", "<s1>"],
        training={"train_text_encoder_ti": True},
    )
    card = str(model_card.render_model_card(metadata, "user/subject"))
    assert f'hf_hub_download("user/subject", "{TEXTUAL_INVERSION_WEIGHT_NAME}")' in card
    for key, encoder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        assert f"embeddings[\"{key}\"], token=['<s0>', '<s1>'], text_encoder=pipe.{encoder}," in card
    assert "`<s0><s1> dog`" in card and "pivotal tuning" in card


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(pipeline_dirs, instance_dir, tmp_path):
    """The embeddings live outside the DDP-wrapped denoiser: their gradients are averaged over processes by hand.

    A full fine-tune, as in test_launch: its one- and two-process UNets agree to float rounding."""
    from test_launch import DOUBLE, SINGLE, diffusers_flags, launch

    def flags(output_dir, batch_size):
        options = diffusers_flags(pipeline_dirs["sd"], instance_dir, tmp_path / "class", output_dir, batch_size)
        options = [f for f in options if not f.startswith("--instance_prompt")]
        return options + [
            "--instance_prompt=a photo of {identifier} dog",
            "--train_text_encoder_ti",
            "--text_encoder_lr=1e-1",
        ]

    launch(SINGLE, flags(tmp_path / "one", batch_size=2))
    launch(DOUBLE, flags(tmp_path / "two", batch_size=1), env={"ACCELERATE_USE_CPU": "1"})
    one, two = (load_file(tmp_path / name / TEXTUAL_INVERSION_WEIGHT_NAME)["clip_l"] for name in ("one", "two"))
    initial = load_file(tmp_path / "one" / "checkpoint-2" / TEXTUAL_INVERSION_WEIGHT_NAME)["clip_l"]
    assert not torch.equal(one, initial)
    torch.testing.assert_close(two, one, atol=2e-5, rtol=1e-4)
