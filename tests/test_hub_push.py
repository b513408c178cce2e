"""Train -> push_to_hub -> load in a fresh process with an empty cache, through the real client and a local Hub.

The client reads `HF_ENDPOINT` at import, so each Hub step runs in a fresh interpreter (`run_client`) pointed at
`LocalHub`; training runs there too when it must read its base model from the Hub.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION, tiny_config, write_subject_images
from hub_server import LocalHub, run_client

from diffusers_dreambooth import DreamBoothPipeline, DreamBoothTrainer

GENERATE = """
import numpy as np, torch
def generate(pipe):
    images = pipe("a photo of {subject} on the moon", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    return images
"""


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub_storage") as hub:
        yield hub


def load_and_generate(hub, home: Path, repo_id: str, output: Path) -> dict:
    """In a fresh process with an empty cache: load the subject, generate, save the images, return the card data."""
    return run_client(
        hub,
        home,
        GENERATE
        + f"""
from huggingface_hub import model_info
from diffusers_dreambooth import DreamBoothPipeline
pipe = DreamBoothPipeline.from_pretrained({repo_id!r})
np.save({str(output)!r}, generate(pipe))
info = model_info({repo_id!r})
result = {{"card": info.card_data.to_dict(), "files": sorted(s.rfilename for s in info.siblings)}}
""",
    )


@pytest.mark.slow
def test_full_subject_round_trips_and_a_repush_uploads_nothing(hub, pipeline_dirs, instance_dir, tmp_path):
    output_dir = tmp_path / "out"
    config = tiny_config(pipeline_dirs["sd"], instance_dir, output_dir, checkpointing_steps=1, num_validation_images=2)
    DreamBoothTrainer(config).train()
    expected = DreamBoothPipeline.from_pretrained(output_dir)(
        "a photo of {subject} on the moon",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images

    push = f"""
from diffusers_dreambooth import DreamBoothPipeline
DreamBoothPipeline.from_pretrained({str(output_dir)!r}).push_to_hub("user/sks-dog", commit_message="first push")
"""
    run_client(hub, tmp_path / "home_push", push)
    uploaded, lfs_uploads = hub.uploaded_bytes, hub.lfs_uploads

    pulled = load_and_generate(hub, tmp_path / "home_pull", "user/sks-dog", tmp_path / "pulled.npy")
    np.testing.assert_allclose(np.load(tmp_path / "pulled.npy"), expected, atol=1e-5)
    files = pulled["files"]
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "dreambooth.json", "README.md"} <= set(
        files
    )
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/", "validation/")) or "config.json" == f]
    card = pulled["card"]
    assert card["library_name"] == "diffusers" and "dreambooth" in card["tags"]
    assert "base_model" not in card  # the base was a local folder: no path on the Hub
    widget_urls = [entry["output"]["url"] for entry in card["widget"]]
    assert widget_urls == ["samples/sample_0.png", "samples/sample_1.png"]
    assert set(widget_urls) <= set(files)
    assert str(tmp_path) not in str(card)

    run_client(hub, tmp_path / "home_push", push)
    assert (hub.uploaded_bytes, hub.lfs_uploads) == (uploaded, lfs_uploads)


@pytest.mark.slow
def test_lora_subject_on_a_hub_base_model_round_trips(hub, pipeline_dirs, instance_dir, tmp_path):
    output_dir = tmp_path / "out"
    train_and_push = (
        GENERATE
        + f"""
from huggingface_hub import create_repo, upload_file, upload_folder
from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
create_repo("user/tiny-sd")
upload_folder(repo_id="user/tiny-sd", folder_path={pipeline_dirs["sd"]!r})
upload_file(path_or_fileobj=b"---\\nlicense: openrail\\n---\\nA tiny base model.\\n", path_in_repo="README.md",
            repo_id="user/tiny-sd")
config = DreamBoothConfig(
    pretrained_model_name_or_path="user/tiny-sd", instance_data_dir={str(instance_dir)!r},
    instance_prompt="a photo of sks dog", output_dir={str(output_dir)!r}, adapter="lora", rank=4,
    resolution={TINY_RESOLUTION}, train_batch_size=1, max_train_steps=2, learning_rate=1e-2, seed=0,
    num_validation_images=1, validation_inference_steps=2, report_to="none",
    push_to_hub=True, hub_model_id="user/sks-dog-lora",
)
pipe = DreamBoothTrainer(config).train()
np.save({str(tmp_path / "trained.npy")!r}, generate(lambda prompt, **kw: pipe(prompt.format(subject="sks dog"), **kw)))
"""
    )
    run_client(hub, tmp_path / "home_train", train_and_push)

    pulled = load_and_generate(hub, tmp_path / "home_pull", "user/sks-dog-lora", tmp_path / "pulled.npy")
    np.testing.assert_allclose(np.load(tmp_path / "pulled.npy"), np.load(tmp_path / "trained.npy"), atol=1e-5)
    assert "pytorch_lora_weights.safetensors" in pulled["files"] and "unet/config.json" not in pulled["files"]
    assert pulled["card"]["base_model"] == "user/tiny-sd"
    assert pulled["card"]["license"] == "openrail"  # inherited from the base model's card
    assert {"lora", "dreambooth", "stable-diffusion"} <= set(pulled["card"]["tags"])


@pytest.mark.slow
def test_the_token_never_reaches_a_file_a_log_line_or_a_checkpoint(hub, pipeline_dirs, instance_dir, tmp_path):
    output_dir, log_file = tmp_path / "out", tmp_path / "train.log"
    train_and_push = f"""
import logging
logging.basicConfig(filename={str(log_file)!r}, level=logging.DEBUG)
from huggingface_hub import create_repo, upload_folder
from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
create_repo("user/tiny-sd")
upload_folder(repo_id="user/tiny-sd", folder_path={pipeline_dirs["sd"]!r})
config = DreamBoothConfig(
    pretrained_model_name_or_path="user/tiny-sd", instance_data_dir={str(instance_dir)!r},
    instance_prompt="a photo of sks dog", output_dir={str(output_dir)!r}, adapter="lora", rank=4,
    resolution={TINY_RESOLUTION}, train_batch_size=1, max_train_steps=2, checkpointing_steps=1, seed=0,
    num_validation_images=1, validation_inference_steps=2, validation_prompt="a photo of sks dog",
    validation_steps=1, report_to="none", push_to_hub=True, hub_model_id="user/sks-dog-token",
    hub_token={hub.token!r},
)
logging.getLogger("test").info("config: %s", config)
DreamBoothTrainer(config).train()
"""
    run_client(hub, tmp_path / "home_train", train_and_push)  # the token is also in HF_TOKEN

    written = [path for path in output_dir.rglob("*") if path.is_file()] + [log_file]
    assert any(path.name == "optimizer.bin" for path in written) and log_file.stat().st_size > 0
    leaks = [str(path) for path in written if hub.token.encode() in path.read_bytes()]
    assert not leaks
    download = "from huggingface_hub import hf_hub_download as get\n"
    download += "result = open(get('user/sks-dog-token', 'README.md')).read()"
    pulled = run_client(hub, tmp_path / "home_pull", download)
    assert "sks dog" in pulled and hub.token not in pulled


@pytest.mark.slow
def test_a_cascade_pushes_as_one_repo_and_loads_from_it(hub, pipeline_dirs, tmp_path):
    """DeepFloyd IF: stage I at the repo's root, stage II in `stage_2/`; pushing the `stage_2` folder (what
    `--push_to_hub` does after training stage II) pushes the whole cascade, which loads from the repo id."""
    photos = write_subject_images(tmp_path / "photos", size=(TINY_RESOLUTION, TINY_RESOLUTION))
    out = tmp_path / "sks-dog-if"
    options = dict(max_train_steps=2, learning_rate=1e-2, num_validation_images=0, pre_compute_text_embeddings=True)
    DreamBoothTrainer(
        tiny_config(pipeline_dirs["if"], photos, out, resolution=TINY_RESOLUTION // 4, **options)
    ).train()
    DreamBoothTrainer(tiny_config(pipeline_dirs["if_sr"], photos, out / "stage_2", **options)).train()
    expected = DreamBoothPipeline.from_pretrained(out)(
        "a photo of {subject} on the moon",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert expected.shape[1:3] == (TINY_RESOLUTION, TINY_RESOLUTION)  # upscaled by stage II

    push = f"""
from diffusers_dreambooth.hub import default_repo_name, push_subject_folder
push_subject_folder({str(out / "stage_2")!r}, "user/" + default_repo_name({str(out / "stage_2")!r}))
"""
    run_client(hub, tmp_path / "home_push", push)
    pulled = load_and_generate(hub, tmp_path / "home_pull", "user/sks-dog-if", tmp_path / "pulled.npy")
    np.testing.assert_allclose(np.load(tmp_path / "pulled.npy"), expected, atol=1e-5)
    files = set(pulled["files"])
    assert {"dreambooth.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= files
    assert {"stage_2/dreambooth.json", "stage_2/unet/diffusion_pytorch_model.safetensors"} <= files


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_lora_subjects_of_the_other_families_round_trip(hub, pipeline_dirs, instance_dir, tmp_path, family):
    """SDXL, SD3 and Flux LoRA subjects push as SD's do: the adapter, a card naming the base, the family's tags."""
    output_dir, repo_id = tmp_path / "out", f"user/sks-dog-{family}"
    generate = f"""
import numpy as np, torch
def generate(pipe):
    return pipe("a photo of {{subject}} on the moon", num_inference_steps=2, height={TINY_RESOLUTION},
                width={TINY_RESOLUTION}, generator=torch.Generator().manual_seed(0), output_type="np").images
"""
    train_and_push = (
        generate
        + f"""
from huggingface_hub import create_repo, upload_folder
from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
create_repo("user/tiny-{family}")
upload_folder(repo_id="user/tiny-{family}", folder_path={pipeline_dirs[family]!r})
config = DreamBoothConfig(
    pretrained_model_name_or_path="user/tiny-{family}", instance_data_dir={str(instance_dir)!r},
    instance_prompt="a photo of sks dog", output_dir={str(output_dir)!r}, adapter="lora", rank=4,
    resolution={TINY_RESOLUTION}, train_batch_size=1, max_train_steps=2, learning_rate=1e-2, seed=0,
    num_validation_images=1, validation_inference_steps=2, report_to="none", push_to_hub=True,
    hub_model_id={repo_id!r},
)
pipe = DreamBoothTrainer(config).train()
np.save({str(tmp_path / "trained.npy")!r}, generate(lambda prompt, **kw: pipe(prompt.format(subject="sks dog"), **kw)))
"""
    )
    run_client(hub, tmp_path / "home_train", train_and_push)

    pull = (
        generate
        + f"""
from huggingface_hub import model_info
from diffusers_dreambooth import DreamBoothPipeline
pipe = DreamBoothPipeline.from_pretrained({repo_id!r})
np.save({str(tmp_path / "pulled.npy")!r}, generate(pipe))
info = model_info({repo_id!r})
result = {{"card": info.card_data.to_dict(), "files": sorted(s.rfilename for s in info.siblings),
          "pipeline": type(pipe.pipeline).__name__}}
"""
    )
    pulled = run_client(hub, tmp_path / "home_pull", pull)
    np.testing.assert_allclose(np.load(tmp_path / "pulled.npy"), np.load(tmp_path / "trained.npy"), atol=1e-5)
    assert "pytorch_lora_weights.safetensors" in pulled["files"]
    assert not [f for f in pulled["files"] if f.endswith("diffusion_pytorch_model.safetensors")]
    assert pulled["card"]["base_model"] == f"user/tiny-{family}"
    family_tags = {"sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux"}[family]
    assert {"lora", "dreambooth", family_tags} <= set(pulled["card"]["tags"])
    base_class = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
    assert pulled["pipeline"] == base_class[family]
