"""Rare-token identifiers, looked up in the pipeline's own tokenizers as the DreamBooth paper does (Sec. 3.2).

The paper binds the subject to a *rare token*: a common word ("unique") carries a meaning the model must unlearn, and
random letters ("xxy5syt00") split into several common tokens. For Imagen it samples tokens of the T5-XXL vocabulary
range 5000-10000 that decode to 3 or fewer characters without spaces. `rare_token_identifiers` does the same for any
family, in three steps:

1. **Shape.** A token qualifies when it decodes to 1-3 ASCII letters and that word, written alone, tokenizes to
   exactly one token in *every* tokenizer of the family (SDXL's two CLIPs, SD3's two CLIPs and T5, Flux's CLIP and
   T5), so the subject binds to one token per text encoder.
2. **Rare range** of the first tokenizer's ids, relative to its vocabulary size so that small tokenizers work too.
   A SentencePiece vocabulary (T5) is sorted by score, so the paper's own range is kept: 5000/32100 to 10000/32100
   of the vocabulary. A CLIP BPE vocabulary holds 512 byte tokens, then merges in the order they were learnt (most
   frequent first): its rare end is the later half, ids from 50% of the vocabulary up (CLIP's 49408: ids 24704 and
   up, past its common words; the toy world's 586: the letters and late merges).
3. **Weak prior**, ranked by the text encoders' input embeddings: a token the encoder rarely saw in its training
   keeps an embedding near the vocabulary's mean (Land and Bartolo, "Fishing for Magikarp", 2024, find
   under-trained tokens this way). The score is the distance of the token's embedding from the mean embedding,
   divided by the median distance over the vocabulary, averaged over the family's text encoders; lowest first.

The ranking is deterministic (the paper samples uniformly among the candidates; a fixed order makes runs
reproducible). Without text encoders, candidates are ranked by id, latest (rarest) merge first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

#: The paper's T5-XXL range (ids 5000-10000 of 32100), as fractions of the vocabulary.
SENTENCEPIECE_RARE_RANGE = (5000 / 32100, 10000 / 32100)
#: The later half of a BPE vocabulary (CLIP): merges learnt last, for the rarest pairs.
BPE_RARE_RANGE = (0.5, 1.0)
MAX_IDENTIFIER_CHARS = 3
#: The value of `--identifier` that asks for the first token `rare_token_identifiers` returns.
AUTO_IDENTIFIER = "auto"
IDENTIFIER_PLACEHOLDER = "{identifier}"


def rare_token_identifiers(
    pipeline_or_tokenizers: Any,
    text_encoders: Sequence[torch.nn.Module] | None = None,
    count: int = 10,
    vocab_range: tuple[float, float] | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Rare single-token words to use as a DreamBooth identifier `[V]`, weakest prior first.

    Args:
        pipeline_or_tokenizers (`DiffusionPipeline` or list of tokenizers):
            a pipeline of a supported family (its tokenizers and text encoders are used), or the tokenizers alone.
        text_encoders (list of `torch.nn.Module`, *optional*):
            the text encoders matching the tokenizers, to rank candidates by their prior; taken from the pipeline
            when one is given. Without them, candidates are ranked by id, highest first.
        count (`int`, *optional*, defaults to `10`): how many identifiers to return at most.
        vocab_range (`tuple[float, float]`, *optional*):
            the rare range of the first tokenizer's ids as fractions of its vocabulary size; default: the paper's
            T5 range for SentencePiece tokenizers, the later half for BPE ones (see the module's docstring).
        exclude (iterable of `str`, *optional*): words never to return, e.g. those of the instance and class prompts.

    Returns:
        `list[str]`: up to `count` words of 1-3 letters, each a single token in every tokenizer.

    Example:

    ```python
    >>> from diffusers import DiffusionPipeline
    >>> from diffusers_dreambooth.identifiers import rare_token_identifiers

    >>> pipeline = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> identifier = rare_token_identifiers(pipeline, count=1)[0]
    >>> prompt = f"a photo of {identifier} dog"
    ```
    """
    tokenizers, text_encoders = _tokenizers_and_encoders(pipeline_or_tokenizers, text_encoders)
    if count < 1:
        raise ValueError(f"`count` must be at least 1, got {count}.")
    primary = tokenizers[0]
    low, high = vocab_range or default_rare_range(primary)
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"`vocab_range` must be two fractions 0 <= low < high <= 1, got {(low, high)}.")
    size = len(primary)
    excluded = {word.lower() for word in exclude}
    special = set(primary.all_special_ids)
    candidates: dict[str, list[int]] = {}  # word -> its token id in each tokenizer
    for token_id in range(int(low * size), min(int(high * size + 0.5), size)):
        if token_id in special:
            continue
        word = primary.decode([token_id]).strip()
        if not (word.isascii() and word.isalpha() and len(word) <= MAX_IDENTIFIER_CHARS) or word.lower() in excluded:
            continue
        ids = [single_token_id(tokenizer, word) for tokenizer in tokenizers]
        if ids[0] == token_id and all(i is not None for i in ids) and word not in candidates:
            candidates[word] = ids
    if not candidates:
        raise ValueError(
            f"No rare-token identifier found: no token with ids {int(low * size)}-{int(high * size)} of the"
            f" {size}-token vocabulary decodes to 1-{MAX_IDENTIFIER_CHARS} letters that every tokenizer keeps as one"
            " token. Widen `vocab_range`, or pass an identifier of your own (`--identifier sks`)."
        )
    if text_encoders:
        weakness = [prior_strength(encoder) for encoder in text_encoders]
        key = {w: sum(float(s[i]) for s, i in zip(weakness, ids)) / len(weakness) for w, ids in candidates.items()}
        ranked = sorted(candidates, key=lambda w: (key[w], -candidates[w][0]))
    else:
        ranked = sorted(candidates, key=lambda w: -candidates[w][0])
    return ranked[:count]


def default_rare_range(tokenizer: Any) -> tuple[float, float]:
    """The paper's range for SentencePiece vocabularies (T5), the later half for BPE ones (CLIP)."""
    names = [cls.__name__ for cls in type(tokenizer).__mro__]
    is_sentencepiece = any(name.startswith(("T5", "Llama", "Gemma", "Umt5")) for name in names)
    return SENTENCEPIECE_RARE_RANGE if is_sentencepiece else BPE_RARE_RANGE


def single_token_id(tokenizer: Any, word: str) -> int | None:
    """The id of `word` when the tokenizer keeps it whole (one token, special tokens aside), else None."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


@torch.no_grad()
def prior_strength(text_encoder: torch.nn.Module) -> torch.Tensor:
    """Per token id: distance of its input embedding from the vocabulary's mean, over the median distance.

    Tokens the encoder was rarely trained on stay near the mean (low values): a weak prior.
    """
    weight = text_encoder.get_input_embeddings().weight.detach().float()
    distance = (weight - weight.mean(dim=0)).norm(dim=1)
    return distance / distance.median().clamp_min(1e-12)


def fill_identifier(text: str | None, identifier: str | None, option: str) -> str | None:
    """Replace `{identifier}` in `text` (the value of `--option`) with `identifier`; raise if there is none."""
    if text is None or IDENTIFIER_PLACEHOLDER not in text:
        return text
    if not identifier or identifier == AUTO_IDENTIFIER:
        raise ValueError(
            f"`--{option}` contains `{IDENTIFIER_PLACEHOLDER}` ({text!r}) but no identifier is set. Pass"
            f" `--identifier {AUTO_IDENTIFIER}` to pick a rare token from the model's tokenizer, or `--identifier`"
            " with a word of your own (e.g. `sks`)."
        )
    return text.replace(IDENTIFIER_PLACEHOLDER, identifier)


def _tokenizers_and_encoders(source: Any, text_encoders: Sequence[torch.nn.Module] | None) -> tuple[list, list]:
    if hasattr(source, "components"):  # a pipeline
        from .families import family_for_pipeline

        family = family_for_pipeline(source)
        tokenizers = [t for t in family.tokenizers if t is not None]
        if text_encoders is None:
            text_encoders = [e for e in family.text_encoders if e is not None]
    else:
        tokenizers = list(source) if isinstance(source, (list, tuple)) else [source]
    if not tokenizers:
        raise ValueError("`rare_token_identifiers` needs at least one tokenizer (or a pipeline that has one).")
    return tokenizers, list(text_encoders or [])
