"""Loading a sample's image the way a model sees it: original → optional limit → the processor's smart resize.

One function for eval, GRPO and MCTS, so all three show a model the same pixels and keep the same Frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from vigorl_cli.vision.frames import Frame, qwen_smart_size, resize_image


def processor_pixel_limits(processor: Any) -> tuple[int | None, int | None, int]:
    """``(min_pixels, max_pixels, factor)`` of a Qwen-VL image processor (factor = patch size × merge size)."""
    ip = processor.image_processor
    size = ip.size if isinstance(ip.size, dict) else {"shortest_edge": ip.size.shortest_edge,
                                                       "longest_edge": ip.size.longest_edge}
    factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
    return size.get("shortest_edge"), size.get("longest_edge"), factor


def model_frame(width: int, height: int, processor: Any, max_side: int | None = None,
                max_pixels: int | None = None) -> Frame:
    """The Frame of the image the model sees: the original, optionally limited (max side, or max pixels, as the
    reference eval does), then smart-resized within the processor's own pixel budget (so the processor does not
    resize it again and the model's coordinates refer to exactly this image)."""
    if max_side:
        f = Frame.max_side(width, height, max_side)
    elif max_pixels:
        f = Frame.max_pixels(width, height, max_pixels)
    else:
        f = Frame.identity(width, height)
    lo, hi, factor = processor_pixel_limits(processor)
    w, h = qwen_smart_size(*f.size, min_pixels=lo, max_pixels=hi, factor=factor)
    return Frame.resized(width, height, w, h)


def load_for_model(path: str | Path, processor: Any, max_side: int | None = None,
                   max_pixels: int | None = None) -> tuple[Image.Image, Frame, Image.Image]:
    """``(original RGB, frame, shown image)``. Raises ``OSError``/``PIL.UnidentifiedImageError`` for a bad file."""
    with Image.open(path) as im:
        original = im.convert("RGB")
    frame = model_frame(*original.size, processor, max_side=max_side, max_pixels=max_pixels)
    return original, frame, resize_image(original, frame)
