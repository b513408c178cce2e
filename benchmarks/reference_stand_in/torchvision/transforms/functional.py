"""`torchvision.transforms.functional`, benchmark-only stand-in: the one function transformers imports."""

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 CHW tensor, as torchvision's `pil_to_tensor`."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
