"""A benchmark-only stand-in for torchvision: just the `transforms` that diffusers' DreamBooth scripts use.

`benchmarks/peak_memory.py --reference_dir` puts `benchmarks/reference_stand_in` on the `PYTHONPATH` of diffusers'
`train_dreambooth.py` / `train_dreambooth_lora.py` subprocesses only (no CPU torchvision is installable here);
neither the package nor its tests import it. transformers sees a `torchvision` and imports a few names from it at
import time (`transforms.InterpolationMode`, `transforms.functional.pil_to_tensor`, `transforms.v2.functional`,
`io`), so those modules exist too. Its memory is negligible: a few small pure-Python modules over torch, numpy and
PIL, which the scripts import anyway (importing it after them adds well under 1 MiB of resident memory).
"""

from . import io, transforms

#: No real torchvision version: transformers' `is_torchvision_greater_or_equal` checks read it as older than any.
__version__ = "0.0"

__all__ = ["io", "transforms"]
