"""Tiny, offline, deterministic Stable Diffusion (1.x / 2.x / XL / 3), Flux and DeepFloyd IF (stage I and the
stage II super-resolution) pipelines for tests.

Everything is built from configs with random weights under fixed seeds; nothing is downloaded. The CLIP tokenizer is a
byte-level BPE learnt locally on a small corpus of prompt-like sentences; SD3's T5 tokenizer is a Unigram model whose
pieces are that corpus's words; Flux reuses both, IF the T5 one.

The families added since (Flux.2, Qwen-Image, Z-Image, Sana, ...) each have a module of this package named by their
key (`flux2_klein.py`) with a `build_tiny_pipeline(tmp_dir, seed)`: `get_dummy_pipeline` finds them by that name.
"""

import contextlib
import importlib
import itertools
import json
import math
import os
import pkgutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    IFPipeline,
    IFSuperResolutionPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnAddedKVProcessor
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_CORPUS",
    "DUMMY_IMAGE_SIZE",
    "DUMMY_LATENT_SIZE",
    "EOS_TOKEN",
    "PIPELINE_FAMILIES",
    "PipelineFamily",
    "build_clip_tokenizer",
    "build_llm_tokenizer",
    "build_t5_tokenizer",
    "get_dummy_flux_components",
    "get_dummy_if_components",
    "get_dummy_if_sr_components",
    "get_dummy_pipeline",
    "get_dummy_sd3_components",
    "get_dummy_sd_components",
    "get_dummy_sdxl_components",
    "save_dummy_pipeline",
]

#: The tiny pipelines built here; the keys of this package's family modules (`PIPELINE_FAMILIES`) come on top.
PipelineFamily = Literal["sd", "sd2", "sdxl", "sd3", "flux", "if", "if_sr"]
_FAMILY_MODULES: tuple[str, ...] = tuple(
    sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
)
#: Every key `get_dummy_pipeline` builds.
PIPELINE_FAMILIES: tuple[str, ...] = (*get_args(PipelineFamily), *_FAMILY_MODULES)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"

# Latent side of the dummy UNets; the VAEs have two blocks, i.e. a scale factor of 2.
DUMMY_LATENT_SIZE = 16
DUMMY_VAE_SCALE_FACTOR = 2
DUMMY_IMAGE_SIZE = DUMMY_LATENT_SIZE * DUMMY_VAE_SCALE_FACTOR

_TEXT_HIDDEN_SIZE = 32
_TEXT_PROJECTION_DIM = 32
_ADDITION_TIME_EMBED_DIM = 8
_NUM_TIME_IDS = 6
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# DeepFloyd IF: stage I samples 8x8 images, stage II upscales them 4x to 32x32 (IF: 64 -> 256).
_IF_T5_HIDDEN_SIZE = 32
_IF_STAGE_1_SIZE = 8

# SD3: two CLIP encoders of different widths (as CLIP-L and CLIP-G) whose concatenation (80) is zero-padded to T5's
# width (96), 16 latent channels, and 2x2 patches.
_SD3_CLIP_HIDDEN_SIZES = (32, 48)
_SD3_T5_HIDDEN_SIZE = 96
_SD3_LATENT_CHANNELS = 16
_SD3_PATCH_SIZE = 2
# Flux: 16 latent channels packed into 2x2 patches (64 values a token), one double- and one single-stream block whose
# rotary axes (4 + 4 + 8) span the 16-wide heads, and guidance embedding as FLUX.1-dev.
_FLUX_LATENT_CHANNELS = 16
_FLUX_T5_HIDDEN_SIZE = 32
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
# Characters every prompt may use beyond the corpus's own: single-character pieces, so no text maps to <unk>.
_T5_FALLBACK_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/{}<>"

# Same normalisation and pre-tokenisation as transformers' CLIP tokenizer.
_CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_SAVED_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

_SUBJECTS = (
    "dog",
    "cat",
    "sks dog",
    "sks cat",
    "sks toy",
    "sks backpack",
    "puppy",
    "person",
    "man",
    "woman",
    "car",
    "house",
    "tree",
    "bird",
    "flower",
    "backpack",
    "teapot",
    "toy",
    "robot",
    "vase",
    "clock",
    "boot",
    "bowl",
    "candle",
    "sunglasses",
    "bear plushie",
)
_TEMPLATES = (
    "a {}",
    "a photo of {}",
    "a photo of a {}",
    "a photo of the {}",
    "a close up photo of a {}",
    "a high quality photo of a {}",
    "a painting of a {}",
    "a {} on the beach",
    "a {} in the snow",
    "a {} in the jungle",
    "a {} on a cobblestone street",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} wearing a red hat",
)
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
_SHAPES = ("circle", "square", "triangle", "star")

DEFAULT_CORPUS: tuple[str, ...] = (
    "a photo of sks dog",
    "a photo of sks dog on the beach",
    "a dog",
    "a red circle on a blue background",
    *(template.format(subject) for subject in _SUBJECTS for template in _TEMPLATES),
    *(
        f"a {color} {shape} on a {background} background"
        for shape in _SHAPES
        for color in _COLORS
        for background in _COLORS
        if color != background
    ),
)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block under `torch.manual_seed(seed)` without touching the caller's CPU RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2/CLIP's reversible mapping from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


def _clip_pre_tokenize(texts: Iterable[str]) -> Counter[str]:
    """Count the byte-level words of `texts` exactly as CLIP's normaliser and pre-tokeniser split them."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts: Counter[str] = Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words if word not in (BOS_TOKEN, EOS_TOKEN))
    return counts


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of the adjacent symbols `pair` in `word` by their concatenation."""
    merged: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            merged.append(word[index] + word[index + 1])
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)


def _learn_clip_bpe(texts: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a deterministic CLIP-layout BPE: 256 bytes, 256 `</w>` bytes, merged symbols, then BOS and EOS."""
    byte_symbols = list(_bytes_to_unicode().values())
    symbols = [*byte_symbols, *(symbol + END_OF_WORD_SUFFIX for symbol in byte_symbols)]
    num_special = 2
    if vocab_size < len(symbols) + num_special:
        raise ValueError(f"vocab_size must be at least {len(symbols) + num_special}, got {vocab_size}.")

    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    words = {(*word[:-1], word[-1] + END_OF_WORD_SUFFIX): count for word, count in _clip_pre_tokenize(texts).items()}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size - num_special:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = {_merge_pair(word, best): count for word, count in words.items()}
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def build_clip_tokenizer(
    save_directory: str | os.PathLike,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1000,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """Learn a CLIP byte-level BPE of at most `vocab_size` tokens on `corpus`, save it and load it back."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _learn_clip_bpe(DEFAULT_CORPUS if corpus is None else corpus, vocab_size)

    for name in _TOKENIZER_FILES:
        (save_directory / name).unlink(missing_ok=True)
    (save_directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "".join(f"{left} {right}\n" for left, right in merges)
    (save_directory / "merges.txt").write_text(f"#version: 0.2\n{merges_text}", encoding="utf-8")

    tokenizer = CLIPTokenizer.from_pretrained(
        save_directory,
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tokenizer.save_pretrained(save_directory)
    return CLIPTokenizer.from_pretrained(save_directory)


def build_t5_tokenizer(
    save_directory: str | os.PathLike, corpus: Iterable[str] | None = None, model_max_length: int = 77
) -> T5TokenizerFast:
    """Build a T5 (SentencePiece Unigram) tokenizer on `corpus`, save it and load it back.

    Each word of the corpus is one piece `▁word`, scored by its log frequency; single characters are costly fallback
    pieces, so any text tokenizes. Ids follow T5's layout: `<pad>` 0, `</s>` 1, `<unk>` 2, and no sentinel tokens.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    counts = Counter(word for text in (DEFAULT_CORPUS if corpus is None else corpus) for word in text.split())
    total = sum(counts.values())
    characters = sorted(set("".join(counts)) | set(_T5_FALLBACK_CHARACTERS))
    vocab = [(token, 0.0) for token in _T5_SPECIAL_TOKENS]
    vocab += [(f"▁{word}", math.log(count / total)) for word, count in sorted(counts.items())]
    vocab += [(piece, -20.0) for piece in ("▁", *characters)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(save_directory)
    return T5TokenizerFast.from_pretrained(save_directory)


def build_llm_tokenizer(
    save_directory: str | os.PathLike,
    tokenizer_class: type[PreTrainedTokenizerFast] = PreTrainedTokenizerFast,
    special_tokens: Iterable[str] = (),
    chat_template: str | None = None,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1000,
    **token_roles: str,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE learnt on `corpus`, as the LLM tokenizers (Qwen, Gemma, Llama, Mistral) are, saved as
    `tokenizer_class` and loaded back.

    `special_tokens` (the chat-template markers, `<|im_start|>` say) are single tokens after the learnt ones;
    `token_roles` name some of them (`eos_token="<|im_end|>"`, `pad_token=...`); `chat_template` is the Jinja
    template `apply_chat_template` renders, for pipelines that call it. Classes that rebuild their own
    SentencePiece-style backend (transformers 5's `GemmaTokenizer`, `LlamaTokenizer`) drop this one's byte-level
    pre-tokenizer: build those as `PreTrainedTokenizerFast`.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _learn_clip_bpe(DEFAULT_CORPUS if corpus is None else corpus, vocab_size)
    vocab = {token.removesuffix(END_OF_WORD_SUFFIX): index for token, index in vocab.items()}
    specials = [*dict.fromkeys([*special_tokens, *token_roles.values()])]
    vocab = dict(zip(dict.fromkeys([*vocab, *specials]), itertools.count()))
    merges = [(left, right.removesuffix(END_OF_WORD_SUFFIX)) for left, right in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=token_roles.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = tokenizer_class(tokenizer_object=backend, **token_roles)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(save_directory)
    return tokenizer_class.from_pretrained(save_directory)


def _load_or_build_tokenizer(tokenizer_dir: str | os.PathLike) -> CLIPTokenizer:
    """Load the tokenizer saved in `tokenizer_dir`, building the default one there first if it is missing."""
    if any((Path(tokenizer_dir) / name).is_file() for name in _SAVED_TOKENIZER_MARKERS):
        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    return build_clip_tokenizer(tokenizer_dir)


def _load_or_build_t5_tokenizer(tokenizer_dir: str | os.PathLike) -> T5TokenizerFast:
    """Load the T5 tokenizer saved in `tokenizer_dir`, building the default one there first if it is missing."""
    if any((Path(tokenizer_dir) / name).is_file() for name in _SAVED_TOKENIZER_MARKERS):
        return T5TokenizerFast.from_pretrained(tokenizer_dir)
    return build_t5_tokenizer(tokenizer_dir)


def _dummy_t5_encoder(tokenizer: T5TokenizerFast, hidden_size: int, seed: int) -> T5EncoderModel:
    """A one-layer T5 encoder `hidden_size` wide whose vocabulary and special ids match `tokenizer`."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden_size,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def clip_text_config(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextConfig:
    """A CLIP text config whose vocabulary, context length and special token ids match `tokenizer`; `sizes` (hidden
    size, layers, ...) set the rest."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def _clip_text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    """Return a 2-layer, 32-wide CLIP text config whose vocabulary and special ids match `tokenizer`."""
    return clip_text_config(
        tokenizer,
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=hidden_act,
        layer_norm_eps=1e-05,
        projection_dim=_TEXT_PROJECTION_DIM,
    )


def _dummy_vae(seed: int, scaling_factor: float, latent_channels: int = 4, **options: Any) -> AutoencoderKL:
    """Return a two-block AutoencoderKL (2x downsampling) initialised under `seed`; `options` go to its config."""
    with _seeded(seed):
        return AutoencoderKL(
            block_out_channels=(8, 16),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=DUMMY_IMAGE_SIZE,
            scaling_factor=scaling_factor,
            **options,
        ).eval()


def get_dummy_sd_components(
    tokenizer_dir: str | os.PathLike, prediction_type: str = "epsilon", seed: int = 0
) -> dict[str, Any]:
    """Return tiny `StableDiffusionPipeline` components; `prediction_type="v_prediction"` gives an SD 2.x model."""
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")
    is_sd2 = prediction_type == "v_prediction"
    tokenizer = _load_or_build_tokenizer(tokenizer_dir)

    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=DUMMY_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_HIDDEN_SIZE,
            attention_head_dim=(2, 4) if is_sd2 else 2,
            use_linear_projection=is_sd2,
            norm_num_groups=4,
        ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    vae = _dummy_vae(seed, scaling_factor=0.18215)
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, "gelu" if is_sd2 else "quick_gelu")).eval()

    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def get_dummy_sdxl_components(tokenizer_dir: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Return tiny `StableDiffusionXLPipeline` components (two text encoders sharing one local tokenizer)."""
    tokenizer = _load_or_build_tokenizer(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_config = _clip_text_config(tokenizer, "gelu")

    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=DUMMY_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_ADDITION_TIME_EMBED_DIM,
            transformer_layers_per_block=1,
            projection_class_embeddings_input_dim=_NUM_TIME_IDS * _ADDITION_TIME_EMBED_DIM + _TEXT_PROJECTION_DIM,
            cross_attention_dim=2 * _TEXT_HIDDEN_SIZE,
            norm_num_groups=4,
        ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    vae = _dummy_vae(seed, scaling_factor=0.13025)
    with _seeded(seed):
        text_encoder = CLIPTextModel(text_config).eval()
    with _seeded(seed):
        text_encoder_2 = CLIPTextModelWithProjection(text_config).eval()

    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def get_dummy_sd3_components(
    tokenizer_dir: str | os.PathLike, t5_tokenizer_dir: str | os.PathLike, seed: int = 0
) -> dict[str, Any]:
    """Return tiny `StableDiffusion3Pipeline` components: a two-block 2x2-patch transformer, two CLIP encoders of
    different widths sharing one local tokenizer, a T5 encoder with a local tokenizer, and a 16-channel VAE."""
    tokenizer = _load_or_build_tokenizer(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_3 = _load_or_build_t5_tokenizer(t5_tokenizer_dir)

    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=DUMMY_LATENT_SIZE,
            patch_size=_SD3_PATCH_SIZE,
            in_channels=_SD3_LATENT_CHANNELS,
            out_channels=_SD3_LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=_SD3_T5_HIDDEN_SIZE,
            caption_projection_dim=32,
            pooled_projection_dim=sum(_SD3_CLIP_HIDDEN_SIZES),
            pos_embed_max_size=DUMMY_LATENT_SIZE // _SD3_PATCH_SIZE,
        ).eval()
    text_encoders = []
    for hidden_size in _SD3_CLIP_HIDDEN_SIZES:
        config = clip_text_config(
            tokenizer,
            hidden_size=hidden_size,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="gelu",
            layer_norm_eps=1e-05,
            projection_dim=hidden_size,
        )
        with _seeded(seed):
            text_encoders.append(CLIPTextModelWithProjection(config).eval())
    text_encoder_3 = _dummy_t5_encoder(tokenizer_3, _SD3_T5_HIDDEN_SIZE, seed)
    vae = _dummy_vae(
        seed,
        scaling_factor=1.5035,
        latent_channels=_SD3_LATENT_CHANNELS,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae,
        "text_encoder": text_encoders[0],
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoders[1],
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
        "image_encoder": None,
        "feature_extractor": None,
    }


def get_dummy_flux_components(
    tokenizer_dir: str | os.PathLike, t5_tokenizer_dir: str | os.PathLike, seed: int = 0
) -> dict[str, Any]:
    """Return tiny `FluxPipeline` components: a guidance-embedding transformer with one double- and one
    single-stream block, a CLIP encoder (pooled output) and a T5 encoder with local tokenizers, a 16-channel VAE, and
    FLUX.1-dev's scheduler (resolution-dependent shift)."""
    tokenizer = _load_or_build_tokenizer(tokenizer_dir)
    tokenizer_2 = _load_or_build_t5_tokenizer(t5_tokenizer_dir)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * _FLUX_LATENT_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_FLUX_T5_HIDDEN_SIZE,
            pooled_projection_dim=_TEXT_HIDDEN_SIZE,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ).eval()
    with _seeded(seed):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, "quick_gelu")).eval()
    text_encoder_2 = _dummy_t5_encoder(tokenizer_2, _FLUX_T5_HIDDEN_SIZE, seed)
    vae = _dummy_vae(
        seed,
        scaling_factor=0.3611,
        latent_channels=_FLUX_LATENT_CHANNELS,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _dummy_if_unet(seed: int, super_resolution: bool) -> UNet2DConditionModel:
    """IF's UNet layout in small (diffusers' IF pipeline tests): added-KV cross-attention, a text embedding added to
    the time embedding, and 6 output channels (epsilon and variance). Stage II also reads the upscaled low-resolution
    image (6 input channels) and embeds its noise level as `class_labels`."""
    options = dict(
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        in_channels=3,
        out_channels=6,
        cross_attention_dim=_IF_T5_HIDDEN_SIZE,
        encoder_hid_dim=_IF_T5_HIDDEN_SIZE,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        sample_size=_IF_STAGE_1_SIZE,
    )
    if super_resolution:
        options.update(
            in_channels=6,
            class_embed_type="timestep",
            mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu",
            time_embedding_dim=32,
            sample_size=_IF_STAGE_1_SIZE * 4,
        )
    with _seeded(seed):
        unet = UNet2DConditionModel(**options).eval()
    unet.set_attn_processor(AttnAddedKVProcessor())
    return unet


def _if_scheduler(**options: Any) -> DDPMScheduler:
    """IF's squared-cosine DDPM schedule over 1000 steps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", **options)


def get_dummy_if_components(t5_tokenizer_dir: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Return tiny `IFPipeline` components: a pixel-space UNet sampling 8x8 images with a learned variance, a T5
    encoder with a local tokenizer, IF's thresholded DDPM scheduler; no safety checker or watermarker."""
    tokenizer = _load_or_build_t5_tokenizer(t5_tokenizer_dir)
    scheduler = _if_scheduler(
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": _dummy_t5_encoder(tokenizer, _IF_T5_HIDDEN_SIZE, seed),
        "unet": _dummy_if_unet(seed, super_resolution=False),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": None,
    }


def get_dummy_if_sr_components(t5_tokenizer_dir: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Return tiny `IFSuperResolutionPipeline` components: stage I's, with a UNet upscaling 8x8 to 32x32 that reads
    the noisy image beside the upscaled one, and the `image_noising_scheduler` that noise-augments the latter."""
    components = get_dummy_if_components(t5_tokenizer_dir, seed=seed)
    components["unet"] = _dummy_if_unet(seed, super_resolution=True)
    components["image_noising_scheduler"] = _if_scheduler()
    return components


def get_dummy_pipeline(
    family: str,
    tmp_dir: str | os.PathLike,
    seed: int = 0,
    torch_dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """Build the tokenizer(s) under `tmp_dir` and return a tiny pipeline of the given family (`PIPELINE_FAMILIES`)."""
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"Unknown pipeline family {family!r}; expected one of {PIPELINE_FAMILIES}.")
    if family in _FAMILY_MODULES:
        pipe = importlib.import_module(f"{__name__}.{family}").build_tiny_pipeline(Path(tmp_dir), seed)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe
    if family in ("if", "if_sr"):
        t5_tokenizer_dir = Path(tmp_dir) / "tokenizer_t5"
        build_t5_tokenizer(t5_tokenizer_dir)
        if family == "if":
            pipe = IFPipeline(**get_dummy_if_components(t5_tokenizer_dir, seed=seed), requires_safety_checker=False)
        else:
            components = get_dummy_if_sr_components(t5_tokenizer_dir, seed=seed)
            pipe = IFSuperResolutionPipeline(**components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe
    tokenizer_dir = Path(tmp_dir) / "tokenizer"
    build_clip_tokenizer(tokenizer_dir)
    if family == "sd3":
        t5_tokenizer_dir = Path(tmp_dir) / "tokenizer_3"
        build_t5_tokenizer(t5_tokenizer_dir)
        pipe = StableDiffusion3Pipeline(**get_dummy_sd3_components(tokenizer_dir, t5_tokenizer_dir, seed=seed))
    elif family == "flux":
        t5_tokenizer_dir = Path(tmp_dir) / "tokenizer_2"
        build_t5_tokenizer(t5_tokenizer_dir)
        pipe = FluxPipeline(**get_dummy_flux_components(tokenizer_dir, t5_tokenizer_dir, seed=seed))
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(**get_dummy_sdxl_components(tokenizer_dir, seed=seed), add_watermarker=False)
    else:
        prediction_type = "v_prediction" if family == "sd2" else "epsilon"
        components = get_dummy_sd_components(tokenizer_dir, prediction_type=prediction_type, seed=seed)
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    if torch_dtype is not None:
        pipe = pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_dummy_pipeline(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny pipeline of the given family to `path` as safetensors and return the path as a string."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        pipe = get_dummy_pipeline(family, tmp_dir, seed=seed)
        pipe.save_pretrained(path, safe_serialization=True)
    return os.fspath(path)
