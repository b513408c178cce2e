"""`torchvision.transforms.v2.functional`, benchmark-only stand-in: transformers' fast image processors use it,
which the DreamBooth scripts never run; only `InterpolationMode` is here, for the names transformers reads.
"""

from .. import InterpolationMode

__all__ = ["InterpolationMode"]
