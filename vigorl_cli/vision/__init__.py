"""Coordinate frames (original <-> image the model sees <-> crop) and the zoom tool.

``frames`` is the only place that scales points; ``zoom`` crops around a point and returns the crop with its frame.
"""

from vigorl_cli.vision.frames import (
    Frame,
    InvalidBox,
    InvalidPoint,
    PointError,
    PointOutsideImage,
    check_point,
    qwen_smart_size,
    reference_scale,
    resize_image,
)
from vigorl_cli.vision.zoom import PRESETS, VSTAR, WEB_GROUNDING, WEB_GROUNDING_RL, Crop, ZoomTool

__all__ = [
    "Frame", "PointError", "InvalidPoint", "InvalidBox", "PointOutsideImage", "check_point", "qwen_smart_size",
    "reference_scale", "resize_image", "Crop", "ZoomTool", "PRESETS", "VSTAR", "WEB_GROUNDING", "WEB_GROUNDING_RL",
]
