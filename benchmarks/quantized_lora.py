"""QLoRA (#17): memory and step time of LoRA on an NF4 / int8 bitsandbytes base against a bf16 base.

Two tables:
1. Measured, on this machine's CPU: Sana 600M's transformer (its exact configuration, written out below, from
   `Efficient-Large-Model/Sana_600M_1024px_diffusers/transformer/config.json`) with random weights, LoRA rank 16 on
   `to_q,to_k,to_v,to_out.0` trained with AdamW for a few steps at 256 px (8x8 latents of Sana's 32x DC-AE, 300 text
   tokens of Gemma 2's width). Each mode runs in its own process; the base is quantized with
   `diffusers_dreambooth.quantization.swap_linear_layers`, the trainer's CPU path. Peak memory is the process's peak
   resident set (VmHWM, reset once the model is built) during the steps; step time is the median after one warm-up.
2. Computed, per family, from the real configurations' exact parameter counts (each model instantiated on the `meta`
   device, so no weights): what the denoiser needs on a GPU per mode. Excluded: activations (they depend on the
   resolution, batch and gradient checkpointing), the VAE, CUDA context and allocator overhead, bitsandbytes'
   transient dequantization buffers, and the frozen text encoders, whose size is listed apart (the trainer caches
   prompt embeddings and sets them aside before the first step).

Run: `python3 benchmarks/quantized_lora.py` (add `--steps N`, `--resolution R`; `--table-only` skips the measurement).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

import torch

RANK = 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GIB = 1024**3

# Efficient-Large-Model/Sana_600M_1024px_diffusers, transformer/config.json.
SANA_600M = dict(
    in_channels=32,
    out_channels=32,
    num_attention_heads=36,
    attention_head_dim=32,
    num_layers=28,
    num_cross_attention_heads=16,
    cross_attention_head_dim=72,
    cross_attention_dim=1152,
    caption_channels=2304,
    mlp_ratio=2.5,
    dropout=0.0,
    attention_bias=False,
    sample_size=32,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)

# The real denoisers' configurations (the `transformer/config.json` or `unet/config.json` of each Hub repo, as
# diffusers' conversion scripts and the classes' defaults write them; keys left out are the class defaults).
DENOISERS = {
    "FLUX.1 [dev]": (
        "FluxTransformer2DModel",
        dict(
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "FLUX.2 [dev]": (
        "Flux2Transformer2DModel",
        dict(
            in_channels=128,
            num_layers=8,
            num_single_layers=48,
            attention_head_dim=128,
            num_attention_heads=48,
            joint_attention_dim=15360,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            guidance_embeds=True,
        ),
    ),
    "FLUX.2 [klein] 4B": (
        "Flux2Transformer2DModel",
        dict(
            in_channels=128,
            num_layers=5,
            num_single_layers=20,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=7680,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            guidance_embeds=False,
        ),
    ),
    "Qwen-Image": (
        "QwenImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "Z-Image": (
        "ZImageTransformer2DModel",
        dict(in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560),
    ),
    "Sana 1600M": ("SanaTransformer2DModel", dict()),  # the class defaults are Sana_1600M_1024px's config
    "Sana 600M": ("SanaTransformer2DModel", SANA_600M),
    "Lumina-Image 2.0": (
        "Lumina2Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            hidden_size=2304,
            num_layers=26,
            num_refiner_layers=2,
            num_attention_heads=24,
            num_kv_heads=8,
            multiple_of=256,
            cap_feat_dim=2304,
        ),
    ),
    "HiDream-I1": (
        "HiDreamImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=16,
            num_single_layers=32,
            attention_head_dim=128,
            num_attention_heads=20,
            caption_channels=[4096, 4096],
            text_emb_dim=2048,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=(64, 32, 32),
            max_resolution=(128, 128),
            llama_layers=list(range(48)),
        ),
    ),
    "SD3.5 Large": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
    ),
    "SDXL": (
        "UNet2DConditionModel",
        dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2048,
            transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[5, 10, 20],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
}

# The frozen text encoders' configurations (their Hub `config.json`s). Multimodal encoders count their language model
# only (Qwen2.5-VL's and Mistral Small 3.1's vision towers, about 0.7B and 0.4B, are left out), without `lm_head`.
CLIP_L = (
    "CLIPTextModelWithProjection",
    dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
    ),
)
CLIP_G = (
    "CLIPTextModelWithProjection",
    dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
    ),
)
T5_XXL = (
    "T5EncoderModel",
    dict(
        vocab_size=32128,
        d_model=4096,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        d_kv=64,
        feed_forward_proj="gated-gelu",
    ),
)
QWEN3_4B = (
    "Qwen3Model",
    dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
)
QWEN25_VL_7B = (
    "Qwen2Model",
    dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
)
MISTRAL_SMALL_31 = (
    "MistralModel",
    dict(
        vocab_size=131072,
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
)
GEMMA2_2B = (
    "Gemma2Model",
    dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
    ),
)
LLAMA31_8B = (
    "LlamaModel",
    dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
)
TEXT_ENCODERS = {
    "FLUX.1 [dev]": [CLIP_L, T5_XXL],
    "FLUX.2 [dev]": [MISTRAL_SMALL_31],
    "FLUX.2 [klein] 4B": [QWEN3_4B],
    "Qwen-Image": [QWEN25_VL_7B],
    "Z-Image": [QWEN3_4B],
    "Sana 1600M": [GEMMA2_2B],
    "Sana 600M": [GEMMA2_2B],
    "Lumina-Image 2.0": [GEMMA2_2B],
    "HiDream-I1": [CLIP_L, CLIP_G, T5_XXL, LLAMA31_8B],
    "SD3.5 Large": [CLIP_L, CLIP_G, T5_XXL],
    "SDXL": [CLIP_L, CLIP_G],
}


def meta_model(library: str, class_name: str, config: dict) -> torch.nn.Module:
    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            return getattr(diffusers, class_name)(**config)
        import transformers

        model_class = getattr(transformers, class_name)
        return model_class(model_class.config_class(**config))


def sizes(model: torch.nn.Module, lora_targets: tuple[str, ...] = ()) -> dict[str, float]:
    """Bytes of `model`'s weights in bf16, NF4 and int8 (bitsandbytes' layouts: NF4 packs two weights a byte plus a
    float32 absmax per 64 weights; int8 one byte plus a float32 scale per output row; biases and every non-Linear
    parameter stay bf16), its parameter count, and the LoRA parameters of rank `RANK` on `lora_targets`."""
    params = sum(p.numel() for p in model.parameters())
    linear = nf4 = int8 = adapter = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        numel, out = layer.weight.numel(), layer.out_features
        bias = 2 * out if layer.bias is not None else 0
        linear += numel + (out if layer.bias is not None else 0)
        nf4 += (numel + 1) // 2 + 4 * -(-numel // 64) + bias
        int8 += numel + 4 * out + bias
        if any(name == t or name.endswith(f".{t}") for t in lora_targets):
            adapter += RANK * (layer.in_features + out)
    other = 2 * (params - linear)
    return dict(params=params, bf16=2 * params, nf4=nf4 + other, int8=int8 + other, adapter=adapter)


def requirements_table() -> str:
    rows = [
        "| family | denoiser params | LoRA params (r16) | bf16 full FT + AdamW | bf16 LoRA | NF4 LoRA | int8 LoRA |"
        " text encoders: params, bf16 / NF4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, (class_name, config) in DENOISERS.items():
        denoiser = sizes(meta_model("diffusers", class_name, config), TARGETS)
        optimizer = 16 * denoiser["adapter"]  # float32 adapter, its gradient, AdamW's two moments
        full = 16 * denoiser["params"]  # float32 master weights, gradients, two moments (bf16 autocast copies aside)
        encoders = [sizes(meta_model("transformers", name, cfg)) for name, cfg in TEXT_ENCODERS[family]]
        enc_params = sum(e["params"] for e in encoders)
        enc_bf16, enc_nf4 = sum(e["bf16"] for e in encoders), sum(e["nf4"] for e in encoders)
        rows.append(
            f"| {family} | {denoiser['params'] / 1e9:.2f}B | {denoiser['adapter'] / 1e6:.1f}M"
            f" | {full / GIB:.1f} GiB | {(denoiser['bf16'] + optimizer) / GIB:.1f} GiB"
            f" | {(denoiser['nf4'] + optimizer) / GIB:.1f} GiB | {(denoiser['int8'] + optimizer) / GIB:.1f} GiB"
            f" | {enc_params / 1e9:.2f}B: {enc_bf16 / GIB:.1f} / {enc_nf4 / GIB:.1f} GiB |"
        )
    return "\n".join(rows)


def _memory_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def measure(mode: str, steps: int, resolution: int) -> dict:
    """One mode's run on Sana 600M's transformer (see the module docstring), in this process."""
    from diffusers import BitsAndBytesConfig, SanaTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from diffusers_dreambooth.quantization import QUANTIZE_BASE_CONFIGS, swap_linear_layers

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = SanaTransformer2DModel(**SANA_600M)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    if mode != "bf16":
        bnb_config = BitsAndBytesConfig(**QUANTIZE_BASE_CONFIGS[mode], bnb_4bit_compute_dtype=torch.bfloat16)
        swap_linear_layers(model, bnb_config, set())
        for layer in model.modules():  # training kernels only, as the trainer's swapped layers
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                layer.support_avx512bf16_for_cpu = False
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    cast_training_params(model, dtype=torch.float32)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    latent = resolution // 32
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 32, latent, latent, generator=generator).to(torch.bfloat16)
    text = torch.randn(1, 300, 2304, generator=generator).to(torch.bfloat16)
    timestep = torch.tensor([500.0])
    with open("/proc/self/clear_refs", "w") as clear:  # the peak from here on: the training steps only
        clear.write("5")
    start_rss = _memory_kib("VmRSS")
    times, losses = [], []
    for _ in range(steps + 1):
        began = time.perf_counter()
        prediction = model(latents, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]
        loss = (prediction.float() - latents.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    return dict(
        mode=mode,
        weights_gib=weights / GIB,
        trained_params=sum(p.numel() for p in trained),
        start_rss_gib=start_rss * 1024 / GIB,
        peak_rss_gib=_memory_kib("VmHWM") * 1024 / GIB,
        step_s=statistics.median(times[1:]),
        first_loss=losses[0],
        last_loss=losses[-1],
    )


def measured_table(steps: int, resolution: int) -> str:
    rows = [
        f"| base (Sana 600M, random weights) | weights + adapter | RSS before the steps | peak RSS in the steps"
        f" | step ({resolution} px, CPU) | loss, first -> last |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("bf16", "nf4", "int8"):
        command = [sys.executable, __file__, "--measure", mode, "--steps", str(steps), "--resolution", str(resolution)]
        result = json.loads(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        rows.append(
            f"| {mode} | {result['weights_gib']:.2f} GiB | {result['start_rss_gib']:.2f} GiB"
            f" | {result['peak_rss_gib']:.2f} GiB | {result['step_s']:.2f} s"
            f" | {result['first_loss']:.4f} -> {result['last_loss']:.4f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--measure", choices=("bf16", "nf4", "int8"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps, args.resolution)))
        return
    if not args.table_only:
        print(f"Measured: LoRA r{RANK} on {', '.join(TARGETS)}, AdamW, batch 1, {torch.get_num_threads()} threads\n")
        print(measured_table(args.steps, args.resolution), "\n")
    print(f"Computed: GPU memory of the denoiser per mode (LoRA r{RANK} on {', '.join(TARGETS)}; no activations)\n")
    print(requirements_table())


if __name__ == "__main__":
    main()
