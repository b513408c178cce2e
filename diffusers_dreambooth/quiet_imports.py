"""Keep a run's console to its progress and the trainer's own lines: drop what optional packages log when merely
imported, about backends the run does not use.

diffusers imports bitsandbytes and torchao whenever they are installed (for its quantizers), and diffusers' pipeline
modules ask transformers for image processors whose default backend needs torchvision. Each then warns, on every
run, about things no option of the run touches: bitsandbytes about its optional `kernels` package, torchao about
CUDA extensions a CPU or older GPU cannot load and about enums torch registers, diffusers about torchao tensor
classes it would allow when loading torchao checkpoints, transformers about falling back to its PIL image processors.
A filter on each of those loggers drops exactly these lines, and nothing else the packages log. Importing this module
installs them; the package imports it first, before anything imports diffusers.
"""

from __future__ import annotations

import logging

#: The loggers that warn on import, and a fragment of each warning that is dropped.
IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "torchao": "Could not load this library",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
}


class DropImportNoise(logging.Filter):
    """Drops the records whose message holds `fragment`."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_import_noise() -> None:
    """Install the filters of `IMPORT_NOISE` (once per logger)."""
    for name, fragment in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropImportNoise) for existing in logger.filters):
            logger.addFilter(DropImportNoise(fragment))


silence_import_noise()
