"""Wan2.1 image-to-video's CLIP input, as transformers' CLIPImageProcessor computes it, in numpy
and Pillow (its PIL backend, the one transformers uses without torchvision):

    uint8 (H, W, 3) --resize (shortest edge, bicubic)--> --centre crop S x S--> * rescale
                    --(x - mean) / std--> float32 (1, 3, S, S)

The settings come from the checkpoint's image_processor/preprocessor_config.json, copied into
the manifest by wan-export (`family_config["clip"]`). The pipeline gives CLIP the image as the
user passed it, not resized to the video first.

Equal, pixel for pixel, to transformers' PIL backend (`CLIPImageProcessorPil`, what
`CLIPImageProcessor` is where torchvision is not installed; tests/test_wan_i2v.py). Where it is,
transformers resizes with torchvision's antialiased bicubic instead, which differs from Pillow's by
rounding-level amounts; not measured here (no torchvision on this machine).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(height, width) after the resize: `shortest_edge` keeps the aspect ratio (the long side
    truncated, as transformers' get_resize_output_image_size does), else exactly height x width."""
    if "shortest_edge" not in size:
        return int(size["height"]), int(size["width"])
    edge = int(size["shortest_edge"])
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def clip_pixels(image: np.ndarray, cfg: dict) -> np.ndarray:
    """uint8 (H, W, 3) -> the image encoder's float32 pixels (1, 3, S, S)."""
    h, w = resize_size(image.shape[0], image.shape[1], cfg["size"])
    resized = np.asarray(Image.fromarray(image).resize((w, h), resample=Image.Resampling(cfg["resample"])))
    side = int(cfg["crop"])
    top, left = (h - side) // 2, (w - side) // 2  # the crop size never exceeds the resize (wan-export checks)
    crop = resized[top:top + side, left:left + side].transpose(2, 0, 1)  # (3, S, S)
    x = (crop.astype(np.float64) * cfg["rescale"]).astype(np.float32)
    mean = np.asarray(cfg["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(cfg["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(((x - mean) / std)[None])  # (1, 3, S, S)
