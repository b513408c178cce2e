"""`torchvision.transforms.v2`, benchmark-only stand-in: present because transformers imports `v2.functional`."""

from . import functional

__all__ = ["functional"]
