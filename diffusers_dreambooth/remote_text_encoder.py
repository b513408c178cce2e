"""FLUX.2 [dev]'s prompt embeddings from Hugging Face's hosted text encoder (`--remote_text_encoder`), so that its
24B-parameter Mistral 3 never loads.

The protocol is the one diffusers' `train_dreambooth_lora_flux2.py` speaks: one `POST` per prompt to
`--remote_text_encoder_url` with the JSON body `{"prompt": "..."}` and the header `Authorization: Bearer <token>`
(`--hub_token`, else the saved login), answered by a `torch.save`d tensor of the prompt's embeddings, shape
`(1, 512, 15360)`: the pipeline's default layers 10, 20 and 30 stacked. The answer is read with
`torch.load(weights_only=True)`, which loads tensors and refuses any other pickled object. The token goes in that
header alone: never into a log line, an error message or a file.

`use_remote_text_encoder` makes the pipeline's own `encode_prompt` ask the endpoint whenever it is given no
`prompt_embeds`, so training's cached embeddings, class images, validation, card samples and evaluation all use it
without knowing.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING

import huggingface_hub
import torch
from diffusers import DiffusionPipeline

from .safeguards import DreamBoothInputError

if TYPE_CHECKING:
    from .config import DreamBoothConfig

logger = logging.getLogger(__name__)


class RemoteTextEncoder:
    """Embeddings of prompts from a remote text-encoder endpoint, each prompt asked for once and then remembered."""

    def __init__(self, url: str, token: str, timeout: float = 120.0) -> None:
        self.url, self.timeout = url, timeout
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._embeddings: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:  # the token stays out of any repr that a log or traceback prints
        return f"RemoteTextEncoder(url={self.url!r})"

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """The embeddings of `prompts`, `(len(prompts), tokens, width)` in float32 on the CPU."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._embeddings]
        if missing:
            logger.info("Encoding %d prompt(s) with the remote text encoder at %s.", len(missing), self.url)
        for prompt in missing:
            self._embeddings[prompt] = self._request(prompt)
        return torch.cat([self._embeddings[prompt] for prompt in prompts])

    def _request(self, prompt: str) -> torch.Tensor:
        body = json.dumps({"prompt": prompt}).encode()
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        where = f"`--remote_text_encoder_url={self.url}`"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                content_type, content = response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            hint = " Check the token (`--hub_token` or `hf auth login`)." if error.code in (401, 403) else ""
            raise DreamBoothInputError(
                f"{where} answered HTTP {error.code} ({error.reason}) instead of prompt embeddings.{hint}"
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DreamBoothInputError(
                f"{where} could not be reached ({reason}). Check the URL and the network, or remove"
                " `--remote_text_encoder` to encode prompts with the model's own text encoder."
            ) from None
        try:
            if "text/html" in content_type:
                raise ValueError("an HTML page")
            embeddings = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
            if not isinstance(embeddings, torch.Tensor) or embeddings.ndim not in (2, 3):
                raise ValueError(f"a {type(embeddings).__name__}, not a tensor of prompt embeddings")
        except Exception as error:
            raise DreamBoothInputError(
                f"{where} did not answer with a saved tensor of prompt embeddings ({error}); the endpoint may have"
                " moved. Remove `--remote_text_encoder` to encode prompts with the model's own text encoder."
            ) from None
        return (embeddings if embeddings.ndim == 3 else embeddings[None]).float()


def remote_text_encoder_for(config: DreamBoothConfig) -> RemoteTextEncoder:
    """The endpoint of `--remote_text_encoder_url`, asked with `--hub_token` or the saved login; raises in one line
    when there is neither, or for a full fine-tune (its saved pipeline would lack the text encoder)."""
    if config.adapter != "lora":
        raise DreamBoothInputError(
            "`--remote_text_encoder` trains LoRA, as diffusers' FLUX.2 script does: a full fine-tune saves the whole"
            " pipeline, whose text encoder would never have been loaded. Add `--adapter lora`, or remove the flag."
        )
    token = config.hub_token or huggingface_hub.get_token()
    if not token:
        raise DreamBoothInputError(
            "`--remote_text_encoder` needs a Hugging Face token for the endpoint: log in with `hf auth login`, or"
            " pass `--hub_token`."
        )
    return RemoteTextEncoder(config.remote_text_encoder_url, token)


def use_remote_text_encoder(pipeline: DiffusionPipeline, encoder: RemoteTextEncoder) -> None:
    """Make `pipeline.encode_prompt` take its embeddings from `encoder` whenever none are passed, for every caller:
    the trainer's cache and each image the pipeline draws."""
    encode_prompt = type(pipeline).encode_prompt

    @functools.wraps(encode_prompt)
    def remote_encode_prompt(prompt=None, device=None, num_images_per_prompt=1, prompt_embeds=None, **kwargs):
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
            prompt_embeds = encoder(prompts).to(device or pipeline._execution_device, pipeline.transformer.dtype)
        return encode_prompt(
            pipeline, prompt, device=device, num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds
        )

    pipeline.encode_prompt = remote_encode_prompt
