"""`export_kohya_lora`: a trained LoRA, renamed to kohya-ss keys with its alpha, loads back to the same images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RESOLUTION, write_subject_images
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_dreambooth import DreamBoothConfig, DreamBoothTrainer
from diffusers_dreambooth.kohya import KOHYA_WEIGHT_NAME, export_kohya_lora

RANK, LORA_ALPHA = 4, 8
TEXT_ENCODER_PREFIXES = {"sd": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}


def images(pretrained: str, lora_dir: Path | None = None, weight_name: str | None = None) -> np.ndarray:
    """Two seeded steps of a freshly loaded pipeline, with the LoRA in `lora_dir` when given."""
    pipe = DiffusionPipeline.from_pretrained(pretrained)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of sks dog", num_inference_steps=2, generator=generator, output_type="np").images


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_exported_lora_has_kohya_keys_and_loads_to_the_same_images(pipeline_dirs, tmp_path, family):
    output_dir = tmp_path / "output"
    DreamBoothTrainer(
        DreamBoothConfig(
            pretrained_model_name_or_path=pipeline_dirs[family],
            instance_data_dir=str(write_subject_images(tmp_path / "instance", size=(TINY_RESOLUTION,) * 2)),
            instance_prompt="a photo of sks dog",
            output_dir=str(output_dir),
            adapter="lora",
            rank=RANK,
            lora_alpha=LORA_ALPHA,
            train_text_encoder=True,
            resolution=TINY_RESOLUTION,
            train_batch_size=1,
            max_train_steps=3,
            learning_rate=1e-2,
            seed=0,
            report_to="none",
        )
    ).train()

    exported = Path(export_kohya_lora(output_dir))
    assert exported == output_dir / KOHYA_WEIGHT_NAME

    state_dict, metadata = read_safetensors(exported)
    modules = {key.split(".")[0] for key in state_dict}
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in state_dict)
    assert len(state_dict) == 3 * len(modules)
    prefixes = TEXT_ENCODER_PREFIXES[family]
    assert all(module.startswith(("lora_unet_", *prefixes)) for module in modules)
    for prefix in prefixes:
        assert any(module.startswith(f"{prefix}text_model_encoder_layers_") for module in modules), prefix
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    for module in modules:
        assert state_dict[f"{module}.alpha"].item() == float(LORA_ALPHA), module
        assert state_dict[f"{module}.lora_down.weight"].shape[0] == RANK, module
    assert "lora_adapter_metadata" not in metadata
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), str(LORA_ALPHA))

    base = images(pipeline_dirs[family])
    original = images(pipeline_dirs[family], output_dir)
    kohya = images(pipeline_dirs[family], exported.parent, exported.name)
    assert not np.allclose(original, base, atol=1e-3)
    np.testing.assert_allclose(kohya, original, atol=1e-5)


def write_peft_lora(path: Path, metadata: dict | None = None) -> Path:
    """A two-module LoRA file in the layout diffusers' `save_lora_weights` writes, with random weights."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for component, module in (
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("text_encoder", "encoder.layers.1.self_attn.v_proj"),
    ):
        state_dict[f"{component}.{module}.lora_A.weight"] = torch.randn(RANK, 32, generator=generator)
        state_dict[f"{component}.{module}.lora_B.weight"] = torch.randn(32, RANK, generator=generator)
    header = {"format": "pt"}
    if metadata is not None:
        header["lora_adapter_metadata"] = json.dumps(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path), metadata=header)
    return path


def test_alpha_follows_the_adapter_metadata(tmp_path):
    source = write_peft_lora(
        tmp_path / "lora.safetensors",
        {
            "unet.r": RANK,
            "unet.lora_alpha": 16,
            "unet.alpha_pattern": {"attn2.to_out.0": 2},
            "text_encoder.r": RANK,
            "text_encoder.lora_alpha": 3,
            "text_encoder.use_rslora": True,
        },
    )
    exported = export_kohya_lora(source, tmp_path / "exported" / "subject.safetensors")
    assert exported == str(tmp_path / "exported" / "subject.safetensors")

    state_dict, metadata = read_safetensors(exported)
    assert state_dict["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha"].item() == 2.0
    # rsLoRA scales by alpha / sqrt(rank); kohya by alpha / rank.
    assert state_dict["lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha"].item() == 3.0 * 2
    assert metadata["ss_network_alpha"] == "Dynamic"
    torch.testing.assert_close(
        state_dict["lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight"],
        read_safetensors(source)[0]["text_encoder.encoder.layers.1.self_attn.v_proj.lora_B.weight"],
    )


def test_alpha_defaults_to_the_rank_and_a_folder_output_gets_the_default_name(tmp_path):
    source = write_peft_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    (tmp_path / "kohya").mkdir()
    exported = export_kohya_lora(source, tmp_path / "kohya")
    assert exported == str(tmp_path / "kohya" / KOHYA_WEIGHT_NAME)
    state_dict, _ = read_safetensors(exported)
    alphas = {key: value.item() for key, value in state_dict.items() if key.endswith(".alpha")}
    assert alphas == {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha": float(RANK),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha": float(RANK),
    }


def test_a_folder_without_a_lora_file_is_an_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        export_kohya_lora(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        export_kohya_lora(tmp_path / "missing.safetensors")
    assert not (tmp_path / KOHYA_WEIGHT_NAME).exists()


def test_a_file_without_lora_weights_is_an_error(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(ValueError, match="unet.safetensors.*no LoRA weights"):
        export_kohya_lora(path)
