"""The DreamBooth paper's metrics (Ruiz et al., CVPR 2023): DINO, CLIP-I, CLIP-T, PRES and DIV.

Subject fidelity (DINO, CLIP-I) is the mean cosine similarity of every generated image with every real subject
image; prompt fidelity (CLIP-T) is the mean CLIP cosine of each image with its prompt; prior preservation (PRES,
lower is better) is the DINO score of the plain class prompt's images against the real subject; diversity (DIV,
higher is better) is the mean LPIPS-style distance between images of one prompt.

The metrics take any embedder that follows the protocols below, so the transformers models (`DinoEmbedder`,
`ClipEmbedder`) can be swapped for other ones, e.g. a small judge model in a toy setting.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

from .model_card import is_hub_id
from .safeguards import PICKLE_REMEDY
from .toy.checker import ToyChecker
from .toy.metrics import ToyAttributeEmbedder

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "MAX_CLASS_IMAGES",
    "ClipEmbedder",
    "DinoEmbedder",
    "EvaluationResult",
    "FeatureMapDistance",
    "FeatureMapModel",
    "ImageEmbedder",
    "TextImageEmbedder",
    "diversity",
    "evaluate_subject",
    "load_evaluation_models",
    "mean_pairwise_cosine",
    "paper_prompts",
    "prompt_fidelity",
    "strip_identifier",
    "subject_fidelity",
]

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

#: Most images `evaluate_subject` generates for the class prompt (PRES).
MAX_CLASS_IMAGES = 32

#: Images per forward pass in the embedders: bounds memory when a whole evaluation set is embedded at once.
DEFAULT_BATCH_SIZE = 32

# The prompts of the DreamBooth dataset (google/dreambooth, dataset/prompts_and_classes.txt), `{}` standing for the
# identifier and class noun: 20 recontextualisations or accessories and 5 property changes per kind of subject.
_SHARED_CONTEXT_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_OBJECT_CONTEXT_PROMPTS = (
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
)
_LIVE_ACCESSORY_PROMPTS = (
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
)
_PROPERTY_PROMPTS = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")
_PAPER_PROMPTS: dict[str, tuple[str, ...]] = {
    "object": _SHARED_CONTEXT_PROMPTS + _OBJECT_CONTEXT_PROMPTS + _PROPERTY_PROMPTS,
    "live": _SHARED_CONTEXT_PROMPTS + _LIVE_ACCESSORY_PROMPTS + _PROPERTY_PROMPTS,
}


@runtime_checkable
class ImageEmbedder(Protocol):
    """Maps images to unit-length embeddings, one row each, so that a dot product is a cosine similarity."""

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


@runtime_checkable
class TextImageEmbedder(ImageEmbedder, Protocol):
    """An `ImageEmbedder` that also embeds texts, unit-length, in the same space as its images (e.g. CLIP)."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


@runtime_checkable
class FeatureMapModel(Protocol):
    """Gives one feature map per layer, (N, C, H, W) for convolutions or (N, T, C) for transformers."""

    def feature_maps(self, images: Sequence[Image.Image]) -> list[torch.Tensor]: ...


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image if image.mode == "RGB" else image.convert("RGB") for image in images]


def _batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    return batch_size


def _load_kwargs(torch_dtype: torch.dtype | None) -> dict:
    return {} if torch_dtype is None else {"dtype": torch_dtype}


_Embedder = TypeVar("_Embedder", bound="_PretrainedEmbedder")


class _PretrainedEmbedder:
    """A transformers model and its processor, loaded by repo id or folder, embedding images in batches."""

    default_model: str
    model_class: type  # the transformers class that loads the model
    processor_class: type  # the transformers class that loads its processor

    def __init__(self, model, processor, batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model.eval()
        self.processor = processor
        self.batch_size = _check_batch_size(batch_size)

    @classmethod
    def from_pretrained(
        cls: type[_Embedder],
        name_or_path: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
    ) -> _Embedder:
        """Load the model and its processor from a repo id or folder (default: the paper's model).

        Weights load from safetensors only unless `allow_pickle`: a Hub repo holding only `pytorch_model.bin` is
        read from the safetensors conversion the Hub's bot made of it, as transformers does with
        `use_safetensors=True`; a folder holding only pickles is refused in one line.
        """
        name_or_path = name_or_path or cls.default_model
        try:
            model = cls.model_class.from_pretrained(
                name_or_path, use_safetensors=None if allow_pickle else True, **_load_kwargs(torch_dtype)
            )
        except OSError as error:
            if allow_pickle or "safetensors" not in str(error):
                raise
            raise OSError(
                f"The evaluation model `{name_or_path}` has no safetensors weights, only pickle files (`.bin`);"
                f" {PICKLE_REMEDY}"
            ) from None
        if device is not None:
            model = model.to(device)
        return cls(model, cls.processor_class.from_pretrained(name_or_path))


class DinoEmbedder(_PretrainedEmbedder):
    """DINO embeddings (the CLS token of the last hidden state) of any transformers ViT-like vision backbone.

    Also a `FeatureMapModel`: its per-layer hidden states feed `FeatureMapDistance` for the DIV metric.
    """

    default_model = DEFAULT_DINO_MODEL
    model_class = AutoModel
    processor_class = AutoImageProcessor

    def _forward(self, images: Sequence[Image.Image], output_hidden_states: bool):
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.model.device, self.model.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=output_hidden_states)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length CLS tokens of the last hidden state, (N, D) float32 on the CPU."""
        rows = []
        for batch in _batches(images, self.batch_size):
            hidden = self._forward(batch, output_hidden_states=False).last_hidden_state
            if hidden.ndim != 3:
                raise ValueError(
                    f"`DinoEmbedder` takes the CLS token of a (N, T, C) token sequence, but "
                    f"{type(self.model).__name__} returns a last hidden state of shape {tuple(hidden.shape)}; use a "
                    "ViT-like backbone."
                )
            rows.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def feature_maps(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Each transformer layer's hidden states, (N, T, C) with the CLS token, without the embedding output."""
        layers: list[list[torch.Tensor]] = []
        for batch in _batches(images, self.batch_size):
            hidden_states = self._forward(batch, output_hidden_states=True).hidden_states[1:]
            layers = layers or [[] for _ in hidden_states]
            for maps, hidden in zip(layers, hidden_states):
                maps.append(hidden.float())
        return [torch.cat(maps) for maps in layers]


def _features(output) -> torch.Tensor:
    # transformers 4 returns the projected features, 5 a model output whose pooler output they are.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder(_PretrainedEmbedder):
    """CLIP image and text embeddings (`CLIPModel.get_image_features` / `get_text_features`), for CLIP-I and CLIP-T."""

    default_model = DEFAULT_CLIP_MODEL
    model_class = CLIPModel
    processor_class = AutoProcessor

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length projected image features, (N, D) float32 on the CPU."""
        rows = []
        for batch in _batches(images, self.batch_size):
            pixels = self.processor(images=_rgb(batch), return_tensors="pt")["pixel_values"]
            features = _features(self.model.get_image_features(pixels.to(self.model.device, self.model.dtype)))
            rows.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length projected text features, (N, D) float32 on the CPU; texts longer than the model's context are
        truncated, as CLIP was trained."""
        max_length = self.model.config.text_config.max_position_embeddings
        rows = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.processor(
                text=list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            features = _features(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.model.device),
                    attention_mask=tokens["attention_mask"].to(self.model.device),
                )
            )
            rows.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(rows)


def load_evaluation_models(
    dino_model: str = DEFAULT_DINO_MODEL,
    clip_model: str = DEFAULT_CLIP_MODEL,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
) -> tuple[ImageEmbedder, TextImageEmbedder]:
    """The DINO and CLIP embedders of `evaluate_subject`, from transformers repo ids or folders (safetensors weights
    only unless `allow_pickle`).

    A folder holding the toy world's checker (`diffusers_dreambooth.toy.ToyChecker`) stands in for either: its
    features as DINO, its (shape, colour, background) judgements as CLIP.
    """
    load = {"torch_dtype": torch_dtype, "device": device, "allow_pickle": allow_pickle}
    toy_dino = _toy_checker(dino_model)
    toy_clip = toy_dino if clip_model == dino_model else _toy_checker(clip_model)
    dino = toy_dino or DinoEmbedder.from_pretrained(dino_model, **load)
    clip = ToyAttributeEmbedder(toy_clip) if toy_clip is not None else None
    return dino, clip or ClipEmbedder.from_pretrained(clip_model, **load)


def describe_evaluation_model(name_or_path: str) -> str:
    """How a model card names an evaluation model: its Hub id, the toy checker, or "a local model" (no paths)."""
    if is_hub_id(name_or_path):
        return name_or_path
    return "the toy world's checker" if is_toy_checker(name_or_path) else "a local model"


def _toy_checker(name_or_path: str) -> ToyChecker | None:
    """The `ToyChecker` saved in folder `name_or_path`, or None when it holds something else (or is a repo id)."""
    return (
        ToyChecker.from_pretrained(name_or_path, use_safetensors=True).eval() if is_toy_checker(name_or_path) else None
    )


def is_toy_checker(name_or_path: str) -> bool:
    config_file = Path(name_or_path) / "config.json"
    return config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "ToyChecker"


class FeatureMapDistance:
    """LPIPS's distance on the feature maps of any `FeatureMapModel`, for the DIV metric.

    Per layer: unit-normalise the channel vector at each position, take the squared difference of the two images'
    vectors, sum it over channels and average it over positions; then average the layers with uniform weights. This
    is LPIPS without its learned per-channel linear calibration, which exists only for VGG/AlexNet/SqueezeNet, so the
    distance works with the DINO backbone the evaluation loads anyway.
    """

    def __init__(self, model: FeatureMapModel):
        if not isinstance(model, FeatureMapModel):
            raise TypeError(f"`model` must have a `feature_maps(images)` method, got {type(model).__name__}.")
        self.model = model

    @torch.no_grad()
    def __call__(self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]) -> torch.Tensor:
        """Distances of the pairs (images_a[i], images_b[i]), shape (N,); 0 for identical images."""
        if len(images_a) != len(images_b):
            raise ValueError(
                f"`images_a` and `images_b` are compared pair by pair, so they need equal lengths; got "
                f"{len(images_a)} and {len(images_b)}."
            )
        if not images_a:
            raise ValueError("`images_a` and `images_b` are empty; pass at least one pair of images.")
        count = len(images_a)
        maps = self.model.feature_maps([*images_a, *images_b])
        if not maps:
            raise ValueError(f"{type(self.model).__name__}.feature_maps returned no feature maps.")
        per_layer = []
        for layer in maps:
            if layer.ndim not in (3, 4):
                raise ValueError(
                    f"Feature maps must be (N, C, H, W) or (N, T, C); got shape {tuple(layer.shape)} from "
                    f"{type(self.model).__name__}.feature_maps."
                )
            channel_dim = 1 if layer.ndim == 4 else -1
            unit = _unit_channels(layer.float(), channel_dim)
            squared = (unit[:count] - unit[count:]).pow(2).sum(channel_dim)
            per_layer.append(squared.flatten(1).mean(1))
        return torch.stack(per_layer).mean(0)


def _unit_channels(features: torch.Tensor, dim: int, eps: float = 1e-10) -> torch.Tensor:
    # LPIPS's normalize_tensor: the epsilon keeps an all-zero position at zero instead of NaN.
    return features / (features.pow(2).sum(dim, keepdim=True).sqrt() + eps)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of `a @ b.T`: the mean cosine similarity of every row of `a` with every row of `b` (rows unit length)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`a` and `b` must be (N, D) and (M, D) embeddings of one size D; got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    if not len(a) or not len(b):
        raise ValueError(f"`a` and `b` need at least one row each; got {len(a)} and {len(b)}.")
    return (a.float() @ b.float().T).mean().item()


def subject_fidelity(generated: Sequence[Image.Image], real: Sequence[Image.Image], embedder: ImageEmbedder) -> float:
    """Mean cosine of every generated image with every real one: DINO or CLIP-I, depending on `embedder`."""
    if not generated or not real:
        raise ValueError(f"`generated` and `real` need an image each at least; got {len(generated)} and {len(real)}.")
    return mean_pairwise_cosine(embedder.embed_images(generated), embedder.embed_images(real))


def _check_prompt_count(num_images: int, num_prompts: int) -> None:
    if num_images != num_prompts:
        raise ValueError(
            f"CLIP-T compares each image with its own prompt, so `images` and `prompts` need equal lengths; got "
            f"{num_images} images and {num_prompts} prompts. Repeat each prompt once per image."
        )
    if not num_images:
        raise ValueError("`images` and `prompts` are empty; pass at least one image and its prompt.")


def _rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() * b.float()).sum(-1).mean().item()


def prompt_fidelity(images: Sequence[Image.Image], prompts: Sequence[str], embedder: TextImageEmbedder) -> float:
    """CLIP-T: the mean cosine of each image's embedding with its own prompt's, `images[i]` with `prompts[i]`."""
    _check_prompt_count(len(images), len(prompts))
    return _rowwise_cosine(embedder.embed_images(images), embedder.embed_texts(prompts))


def diversity(
    images_by_prompt: Sequence[Sequence[Image.Image]],
    distance: Callable[[Sequence[Image.Image], Sequence[Image.Image]], torch.Tensor],
) -> float:
    """DIV: the distance of every unordered pair of images within each group, averaged per group, then over groups.

    Averaging per group first weighs every prompt equally, whatever its number of images (the paper averages over
    prompts); with equal group sizes it equals the mean over all pairs.
    """
    if not images_by_prompt:
        raise ValueError("`images_by_prompt` is empty; pass one group of images per prompt.")
    group_means = []
    for index, group in enumerate(images_by_prompt):
        if len(group) < 2:
            raise ValueError(
                f"Diversity needs pairs of images of one prompt, but group {index} of `images_by_prompt` has "
                f"{len(group)} image(s); generate at least 2 per prompt."
            )
        pairs = [(i, j) for i in range(len(group)) for j in range(i + 1, len(group))]
        distances = distance([group[i] for i, _ in pairs], [group[j] for _, j in pairs])
        group_means.append(distances.float().mean())
    return torch.stack(group_means).mean().item()


def strip_identifier(prompt: str, identifier: str) -> str:
    """`prompt` without the word `identifier`, whitespace runs collapsed: "a photo of sks dog" -> "a photo of dog".

    `evaluate_subject` scores CLIP-T on these prompts: the rare-token identifier means nothing to CLIP, so it would
    only add noise to the text embedding, while the class noun and the context are what the image should match.
    """
    return " ".join(_identifier_pattern(identifier).sub(" ", prompt).split())


def _identifier_pattern(identifier: str) -> re.Pattern:
    if not identifier.strip():
        raise ValueError(f"`identifier` must be a non-empty word such as 'sks', got {identifier!r}.")
    return re.compile(rf"(?<!\w){re.escape(identifier.strip())}(?!\w)")


def paper_prompts(subject: str, kind: Literal["object", "live"] = "object") -> list[str]:
    """The 25 evaluation prompts of the DreamBooth dataset for `kind` of subject, `subject` (e.g. "sks dog") in each.

    "live" (animals) swaps the object list's ten last context prompts for ten accessories and outfits.
    """
    if kind not in _PAPER_PROMPTS:
        raise ValueError(f"`kind` must be one of {sorted(_PAPER_PROMPTS)} (objects or live subjects), got {kind!r}.")
    return [template.replace("{}", subject) for template in _PAPER_PROMPTS[kind]]


@dataclass
class EvaluationResult:
    """The paper's metrics of one subject; `num_images` counts the generated subject images they average over."""

    dino: float
    clip_i: float
    clip_t: float
    pres: float
    div: float
    num_images: int

    def as_dict(self) -> dict[str, float]:
        """The metrics under the paper's names (DINO, CLIP-I, CLIP-T, PRES, DIV) and `num_images`, e.g. for a card."""
        return {
            "DINO": self.dino,
            "CLIP-I": self.clip_i,
            "CLIP-T": self.clip_t,
            "PRES": self.pres,
            "DIV": self.div,
            "num_images": self.num_images,
        }


def _generate(
    generate: Callable[[list[str], int], list[Image.Image]], prompt: str, count: int, seed: int
) -> list[Image.Image]:
    images = list(generate([prompt] * count, seed))
    if len(images) != count:
        raise ValueError(f"`generate` must return one image per prompt; it returned {len(images)} for {count}.")
    return images


def evaluate_subject(
    generate: Callable[[list[str], int], list[Image.Image]],
    real_images: Sequence[Image.Image],
    prompts: Sequence[str],
    class_prompt: str,
    identifier: str,
    *,
    dino: ImageEmbedder,
    clip: TextImageEmbedder,
    distance: Callable[[Sequence[Image.Image], Sequence[Image.Image]], torch.Tensor] | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
) -> EvaluationResult:
    """The paper's DINO, CLIP-I, CLIP-T, PRES and DIV of a trained subject, generating with `generate(prompts, seed)`.

    Each prompt gets one `generate` call of `images_per_prompt` images with seed `seed + index`; the class prompt
    gets one call with seed `seed + len(prompts)` of `images_per_prompt * len(prompts)` images, at most
    `MAX_CLASS_IMAGES`. CLIP-T compares each image with its prompt without `identifier` (see `strip_identifier`).
    `distance` (DIV) defaults to `FeatureMapDistance(dino)`.
    """
    if not prompts:
        raise ValueError("`prompts` is empty; pass the evaluation prompts, e.g. `paper_prompts('sks dog')`.")
    if not real_images:
        raise ValueError("`real_images` is empty; pass the subject's real photos.")
    if images_per_prompt < 2:
        raise ValueError(f"`images_per_prompt` must be at least 2 for diversity (DIV), got {images_per_prompt}.")
    pattern = _identifier_pattern(identifier)
    missing = [prompt for prompt in prompts if not pattern.search(prompt)]
    if missing:
        raise ValueError(
            f"Every evaluation prompt must name the subject by its identifier {identifier!r}; these do not: "
            f"{missing}. Check `identifier` or the prompts."
        )
    if distance is None:
        if not isinstance(dino, FeatureMapModel):
            raise ValueError(
                f"DIV needs an image distance, and `dino` ({type(dino).__name__}) has no `feature_maps` to build "
                "`FeatureMapDistance` on; pass `distance`, e.g. `FeatureMapDistance(model)`."
            )
        distance = FeatureMapDistance(dino)

    groups = [_generate(generate, prompt, images_per_prompt, seed + index) for index, prompt in enumerate(prompts)]
    num_class_images = min(images_per_prompt * len(prompts), MAX_CLASS_IMAGES)
    class_images = _generate(generate, class_prompt, num_class_images, seed + len(prompts))
    generated = [image for group in groups for image in group]
    clip_prompts = [strip_identifier(prompt, identifier) for prompt in prompts]

    real_dino = dino.embed_images(real_images)
    generated_clip = clip.embed_images(generated)
    return EvaluationResult(
        dino=mean_pairwise_cosine(dino.embed_images(generated), real_dino),
        clip_i=mean_pairwise_cosine(generated_clip, clip.embed_images(real_images)),
        clip_t=_rowwise_cosine(generated_clip, clip.embed_texts(clip_prompts).repeat_interleave(images_per_prompt, 0)),
        pres=mean_pairwise_cosine(dino.embed_images(class_images), real_dino),
        div=diversity(groups, distance),
        num_images=len(generated),
    )
