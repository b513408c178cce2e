"""`--remote_text_encoder` (FLUX.2 [dev]): prompts are encoded by a remote endpoint speaking diffusers' protocol (here
a local stand-in running the tiny model's own encoder), the text encoder never loads, every image the run draws is
conditioned through the endpoint, the token never reaches a log or a file, and mistakes stop in one line."""

import logging

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from diffusers import DiffusionPipeline, Flux2Pipeline
from PIL import Image
from remote_encoder_server import LocalTextEncoder
from test_drop_in_options import readme_command

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer, family_for_pipeline
from diffusers_dreambooth.cli import parse_config
from diffusers_dreambooth.finishing import finish_subject, load_finishing_job
from diffusers_dreambooth.input_checks import check_before_loading
from diffusers_dreambooth.pipeline_loading import load_base_pipeline
from diffusers_dreambooth.safeguards import DreamBoothInputError

TOKEN = "hf_remoteTestToken123"
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def reference(pipeline_dirs):
    """The tiny FLUX.2 [dev] with its text encoder: what the endpoint runs, and what plain diffusers loads."""
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dirs["flux2"])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def endpoint(reference):
    with LocalTextEncoder(reference, TOKEN) as server:
        yield server


def remote_config(pipeline_dirs, instance_dir, output_dir, endpoint, **options) -> DreamBoothConfig:
    options = dict(adapter="lora", remote_text_encoder=True, remote_text_encoder_url=endpoint.url, **options)
    return tiny_config(pipeline_dirs["flux2"], instance_dir, output_dir, hub_token=TOKEN, **options)


def as_served(embeds: torch.Tensor) -> torch.Tensor:
    return embeds.to(torch.bfloat16).float()


def test_embeddings_come_from_the_endpoint_with_the_token_and_each_prompt_once(
    pipeline_dirs, instance_dir, tmp_path, endpoint, reference
):
    config = remote_config(pipeline_dirs, instance_dir, tmp_path / "out", endpoint)
    pipeline = load_base_pipeline(config)
    assert pipeline.text_encoder is None  # Mistral 3 is never loaded
    family = family_for_pipeline(pipeline)
    family.configure(config.with_defaults(family.option_defaults["lora"]))
    prompts = [PROMPT, "a dog", PROMPT]
    embeds = family.encode_frozen_prompts(prompts)["prompt_embeds"]
    with torch.no_grad():
        expected, _ = reference.encode_prompt(prompts, max_sequence_length=512)
    torch.testing.assert_close(embeds, as_served(expected), rtol=0, atol=0)
    assert endpoint.prompts == [PROMPT, "a dog"]  # asked once each
    assert endpoint.authorizations == [f"Bearer {TOKEN}"] * 2
    family.encode_frozen_prompts([PROMPT])
    assert len(endpoint.prompts) == 2  # remembered


def all_text_under(folder) -> str:
    return "".join(path.read_bytes().decode("latin-1") for path in folder.rglob("*") if path.is_file())


@pytest.mark.slow
def test_a_lora_run_draws_every_image_through_the_endpoint_and_never_shows_the_token(
    pipeline_dirs, instance_dir, tmp_path, endpoint, reference, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    output_dir = tmp_path / "out"
    options = dict(
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(tmp_path / "class"),
        num_class_images=2,
        validation_prompt="a photo of sks dog on the moon",
        validation_steps=2,
        num_validation_images=1,
        checkpointing_steps=1,
        guidance_scale=1.0,
    )
    trainer = DreamBoothTrainer(remote_config(pipeline_dirs, instance_dir, output_dir, endpoint, **options))
    trained = trainer.train()
    assert trained.text_encoder is None
    # Class images, the cached embeddings, validation and the card sample: all through the endpoint.
    assert {"a photo of dog", PROMPT, "a photo of sks dog on the moon"} <= set(endpoint.prompts)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    validation = output_dir / "validation" / "step-2" / "0.png"
    assert validation.is_file() and (output_dir / "samples" / "sample_0.png").is_file()

    # The saved adapter, on the base in plain diffusers, draws the validation image from the endpoint's embeddings.
    reference.load_lora_weights(output_dir)
    try:
        embeds = endpoint.embeddings("a photo of sks dog on the moon").float()
        image = reference(
            prompt_embeds=embeds,
            num_inference_steps=2,
            guidance_scale=1.0,  # and the pipeline's default size, as validation draws
            generator=torch.Generator().manual_seed(trainer.seed),
            output_type="np",
        ).images[0]
    finally:
        reference.unload_lora_weights()
    drawn = np.asarray(Image.open(validation), dtype=np.float32) / 255
    assert np.abs(drawn - image).max() <= 2 / 255

    # A redo of the samples uses the endpoint again, without loading the text encoder.
    asked = len(endpoint.authorizations)
    (output_dir / "samples" / "sample_0.png").unlink()
    job, stages = load_finishing_job(output_dir, ["samples"], device="cpu", hub_token=TOKEN)
    assert job.pipeline.text_encoder is None
    finish_subject(job, stages)
    assert (output_dir / "samples" / "sample_0.png").is_file() and len(endpoint.authorizations) > asked

    shown = caplog.text + "".join(capfd.readouterr())
    assert endpoint.url in caplog.text and TOKEN not in shown
    assert TOKEN not in all_text_under(output_dir)


def test_the_readme_command_trains_two_steps(pipeline_dirs, tmp_path, endpoint):
    """README_flux2.md's remote-encoder command (without `--do_fp8_training`, which needs an FP8 GPU)."""
    flags = readme_command("flux2", tmp_path) + ["--remote_text_encoder"]
    write_subject_images(tmp_path / "dog", count=2)
    swapped = {
        "--pretrained_model_name_or_path": pipeline_dirs["flux2"],
        "--max_train_steps": "2",
        "--resolution": str(TINY_RESOLUTION),
        "--report_to": "none",
    }
    flags = [f for f in flags if f != "--push_to_hub" and f.split("=")[0] not in swapped]
    flags += [f"{name}={value}" for name, value in swapped.items()]
    flags += ["--num_validation_images=0", f"--remote_text_encoder_url={endpoint.url}", f"--hub_token={TOKEN}"]
    trainer = DreamBoothTrainer(parse_config(flags))
    assert trainer.train().text_encoder is None and trainer.global_step == 2
    assert (tmp_path / "trained-flux2-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert PROMPT in endpoint.prompts


# Mistakes


def test_no_token_and_a_full_fine_tune_stop_before_loading(pipeline_dirs, instance_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    options = dict(remote_text_encoder=True, adapter="lora")
    config = tiny_config(pipeline_dirs["flux2"], instance_dir, tmp_path / "out", **options)
    with pytest.raises(DreamBoothInputError, match="needs a Hugging Face token.*hf auth login"):
        check_before_loading(config)
    config = tiny_config(pipeline_dirs["flux2"], instance_dir, tmp_path / "out", hub_token=TOKEN, **options)
    config.adapter = "full"
    with pytest.raises(DreamBoothInputError, match="trains LoRA.*--adapter lora"):
        check_before_loading(config)


def test_other_families_and_other_layers_are_refused(pipeline_dirs, instance_dir, tmp_path, endpoint):
    klein = remote_config(pipeline_dirs, instance_dir, tmp_path / "klein", endpoint)
    klein.pretrained_model_name_or_path = pipeline_dirs["flux2_klein"]
    with pytest.raises(
        DreamBoothInputError, match="`--remote_text_encoder` is an option of flux2, not of flux2-klein"
    ):
        DreamBoothTrainer(klein).train()
    layers = remote_config(
        pipeline_dirs, instance_dir, tmp_path / "layers", endpoint, text_encoder_out_layers=[1, 2, 3]
    )
    with pytest.raises(DreamBoothInputError, match="`--text_encoder_out_layers` with `--remote_text_encoder`"):
        DreamBoothTrainer(layers).train()
    assert endpoint.prompts == []


@pytest.mark.parametrize("answer", ["wrong token", "html", "no server"])
def test_a_failing_endpoint_stops_in_one_line_naming_it(answer, pipeline_dirs, instance_dir, tmp_path, endpoint):
    config = remote_config(pipeline_dirs, instance_dir, tmp_path / "out", endpoint)
    if answer == "wrong token":
        config.hub_token = "hf_wrong"
    endpoint.answer_html = answer == "html"
    if answer == "no server":
        endpoint.__exit__()
    with pytest.raises(DreamBoothInputError) as raised:
        DreamBoothTrainer(config).train()
    message = str(raised.value)
    assert f"`--remote_text_encoder_url={endpoint.url}`" in message and "\n" not in message
    assert "hf_wrong" not in message and TOKEN not in message
    expected = {"wrong token": "HTTP 401", "html": "did not answer with a saved tensor", "no server": "not be reached"}
    assert expected[answer] in message
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_the_pipeline_samples_through_the_endpoint_for_users_too(reference, endpoint, pipeline_dirs):
    """What the README shows: `use_remote_text_encoder` on a pipeline loaded without its text encoder."""
    from diffusers_dreambooth.remote_text_encoder import RemoteTextEncoder, use_remote_text_encoder

    pipeline = Flux2Pipeline.from_pretrained(pipeline_dirs["flux2"], text_encoder=None)
    use_remote_text_encoder(pipeline, RemoteTextEncoder(endpoint.url, TOKEN))
    options = dict(num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="np")
    remote = pipeline(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **options).images
    local = reference(
        prompt_embeds=as_served(reference.encode_prompt([PROMPT])[0]),
        generator=torch.Generator().manual_seed(0),
        **options,
    ).images
    np.testing.assert_allclose(remote, local, atol=1e-5)
