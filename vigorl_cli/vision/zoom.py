"""The zoom tool: crop around a point the model chose, and say exactly what the crop shows.

Reference behaviour (ViGoRL ``_get_point_crop``, identical in eval, the multi-turn RL rollout and the multi-turn
linearizer; digest §1.9)::

    left, top = max(0, x - offset), max(0, y - offset)
    right, bottom = min(W, x + offset), min(H, y + offset)
    if right <= left: right = left + 1          # same for bottom/top
    crop = image.crop((left, top, right, bottom))     # clipped at the border, NOT re-centred
    if draw_dot: ellipse [(x-left-7, y-top-7), (x-left+7, y-top+7)], fill red, outline white, width 2
    crop = qwen_vl_utils.fetch_image({"image": crop, "resized_width": S, "resized_height": S})

``fetch_image`` converts to RGB and smart-resizes ``S x S`` to multiples of 28 (512 -> 504, 384 -> 392, 672 -> 672),
then ``crop.resize((S', S'))`` with PIL's default resampling (bicubic for RGB). A window clipped at the border is
non-square but still resized to the square, so the crop is stretched; the dot stays on the true point. ``x, y``
are pixels of the *full image the model saw* (already resized by ``--max_pixels`` etc.), and crops are always
taken from that full image, never from a previous crop. :meth:`ZoomTool.crop` with ``source="shown"`` (default)
reproduces this pixel for pixel (see the deviations below).

``source="original"`` is the higher-resolution variant: the same window (same ``offset``, in the model's pixels,
so the model's view of the geometry is unchanged) is mapped to the original image and resampled from there, with
the dot scaled so it looks the same after resizing. It is not reference behaviour; it equals ``"shown"`` when the
model saw the original unresized, and only gains detail when the model saw a downscaled image.

Every :class:`Crop` carries a :class:`~vigorl_cli.vision.frames.Frame` mapping crop pixels to the ORIGINAL image
(``crop.frame.to_original(p)``), plus the parent frame the point was given in, so points the model names inside a
crop can be brought back to the full view (``crop.frame.map_to(p, crop.parent)``).

Deviations from the reference (all in cases where the reference misbehaves):

* A point outside the image raises :class:`~vigorl_cli.vision.frames.PointOutsideImage`
  (``kind = "point_outside_image"``); a malformed one :class:`~vigorl_cli.vision.frames.InvalidPoint`. The linearizer
  raised too (``x > W or y > H or x < 0 or y < 0``; the far edge ``x == W`` is accepted, as here); the RL rollout
  and eval cropped anyway, returning a black (out-of-image) crop.
* Float points are floored first (the linearizer does ``int(x)``; RL/eval passed floats to ``image.crop``).
* With ``offset == 0`` at the far edge (``x == W``) the reference's 1-px window ``(W, W+1)`` lies outside the image;
  here it is moved to the last pixel ``(W-1, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Sequence

from PIL import Image, ImageDraw

from vigorl_cli.vision.frames import (
    QWEN_FACTOR,
    Box,
    Frame,
    Point,
    PointOutsideImage,
    _as_point,
    qwen_smart_size,
    to_rgb,
)

ZoomSource = Literal["shown", "original"]


@dataclass(frozen=True, eq=False)  # identity equality: comparing pixels is never what a caller wants
class Crop:
    """One zoom-tool observation.

    ``image``: the crop as the model sees it (``S' x S'``, e.g. 504x504). ``frame``: crop pixels <-> ORIGINAL image
    (kind ``"crop"``). ``window``: the clipped window ``(left, top, right, bottom)`` in the parent (model) frame.
    ``point``: the requested point, ints, in the parent frame. ``parent``: the full frame the point was given in.
    ``source``: ``"shown"`` or ``"original"`` (which image the pixels came from).
    """

    image: Image.Image = field(repr=False)
    frame: Frame
    window: Box
    point: Point
    parent: Frame
    source: ZoomSource = "shown"

    def point_in_crop(self, *, exact: bool = False):
        """Where the requested point lies in the crop image (crop pixels), e.g. the dot's centre."""
        return self.parent.map_to(self.point, self.frame, exact=exact)

    def to_dict(self) -> dict:
        """JSON-safe record (no pixels): the point and window say their frame (``parent``); ``frame`` is the crop's."""
        return {
            "point": list(self.point),
            "window": list(self.window),
            "parent": self.parent.to_dict(),
            "frame": self.frame.to_dict(),
            "source": self.source,
        }


@dataclass(frozen=True)
class ZoomTool:
    """Crop ``[x - offset, x + offset] x [y - offset, y + offset]`` (clipped), optionally mark the point with a red
    dot, and resize to the Qwen-smart-resized ``crop_size`` square. See the module docstring for the exact reference
    behaviour and the deviations.

    ``offset``: half-width of the window, in pixels of the image the model sees (not the original; the two agree
    only when the model sees the original). ``crop_size``: requested side, rounded by smart resize to a multiple of
    ``factor`` (28 for Qwen2/2.5-VL; 32 would be the Qwen3-VL analogue, not used by the reference).
    ``draw_dot``: red dot, radius 7, white outline width 2. ``source``: ``"shown"`` (reference) or ``"original"``.
    """

    offset: int
    crop_size: int
    draw_dot: bool
    source: ZoomSource = "shown"
    factor: int = QWEN_FACTOR

    DOT_RADIUS: ClassVar[int] = 7
    DOT_OUTLINE_WIDTH: ClassVar[int] = 2

    def __post_init__(self):
        if not isinstance(self.offset, int) or isinstance(self.offset, bool) or self.offset < 0:
            raise ValueError(f"offset must be an integer >= 0, got {self.offset!r}")
        if not isinstance(self.crop_size, int) or isinstance(self.crop_size, bool) or self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive integer, got {self.crop_size!r}")
        if self.source not in ("shown", "original"):
            raise ValueError(f"source must be 'shown' or 'original', got {self.source!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ZoomTool:
        """A reference setting by name (see :data:`PRESETS`), with optional field overrides."""
        try:
            tool = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown zoom preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
        return replace(tool, **overrides)

    @property
    def output_size(self) -> tuple[int, int]:
        """Size of every crop image: ``fetch_image(resized_width=S, resized_height=S)`` -> smart resize of ``S x S``
        with qwen_vl_utils' default limits (512 -> 504x504, 384 -> 392x392, 672 -> 672x672)."""
        return qwen_smart_size(self.crop_size, self.crop_size, factor=self.factor)

    def window(self, point: Sequence[int], size: Sequence[int]) -> Box:
        """The reference window for integer ``point`` on an image of ``size`` ``(w, h)``: clipped, not re-centred,
        at least 1 px wide and tall. The point is assumed inside (``0 <= x <= w``)."""
        x, y = point
        w, h = size
        left, top = max(0, x - self.offset), max(0, y - self.offset)
        right, bottom = min(w, x + self.offset), min(h, y + self.offset)
        if right <= left:
            right = left + 1
        if bottom <= top:
            bottom = top + 1
        # Only reachable with offset == 0 and x == w (the reference would crop outside the image): last pixel.
        if right > w:
            left, right = w - 1, w
        if bottom > h:
            top, bottom = h - 1, h
        return left, top, right, bottom

    def crop(self, image: Image.Image, point: Sequence[float], frame: Frame | None = None) -> Crop:
        """Crop around ``point``.

        ``point``: in the frame of the full image the model saw, i.e. ``frame``'s shown coordinates (``frame=None``:
        the model saw ``image`` itself, unresized). ``frame`` must be a ``"full"`` frame: crops are always taken from
        the full image, never from a previous crop (map a point seen in a crop back first, with
        ``crop.frame.map_to(p, crop.parent)``).

        ``image``: the full image to cut from. ``source="shown"``: the image the model saw (size ``frame.size``),
        as the reference does. ``source="original"``: the original image (size ``frame.original_size``).

        Raises :class:`PointOutsideImage` / :class:`InvalidPoint` (both ``ValueError`` with a ``kind``) for unusable
        points, ``ValueError`` when the image or frame does not fit. ``image`` is never modified.
        """
        parent = frame if frame is not None else Frame.identity(*image.size)
        if parent.kind != "full":
            raise ValueError("ZoomTool.crop needs the full image's frame (kind 'full'), not a crop frame; map the "
                             "point to the full view first")
        px, py = _as_point(point)
        if not parent.contains((px, py)):
            raise PointOutsideImage(f"point ({px}, {py}) is outside the {parent.width}x{parent.height} image")
        # The reference's window arithmetic is on integer pixels: floor floats (== its int() for x >= 0).
        x, y = max(0, math.floor(px)), max(0, math.floor(py))
        window = self.window((x, y), parent.size)
        if self.source == "shown":
            out, orig_window = self._crop_shown(image, (x, y), window, parent)
        else:
            out, orig_window = self._crop_original(image, (x, y), window, parent)
        crop_frame = Frame.crop(*parent.original_size, orig_window, out.size)
        return Crop(image=out, frame=crop_frame, window=window, point=(x, y), parent=parent, source=self.source)

    # ---- the two sources --------------------------------------------------------------------------------------------

    def _crop_shown(self, image: Image.Image, point: Point, window: Box, parent: Frame):
        """Reference path: cut the window from the image the model saw, draw, resize."""
        if image.size != parent.size:
            raise ValueError(f"source='shown' needs the image the model saw ({parent.width}x{parent.height}), got "
                             f"{image.size[0]}x{image.size[1]}; pass that image, or use source='original'")
        left, top, right, bottom = window
        c = to_rgb(image.crop(window))  # a new image: drawing below never touches ``image``
        if self.draw_dot:
            r = self.DOT_RADIUS
            dx, dy = point[0] - left, point[1] - top
            ImageDraw.Draw(c).ellipse([(dx - r, dy - r), (dx + r, dy + r)], fill="red", outline="white",
                                      width=self.DOT_OUTLINE_WIDTH)
        out = c.resize(self.output_size, Image.Resampling.BICUBIC)
        return out, _window_to_original(window, parent)

    def _crop_original(self, image: Image.Image, point: Point, window: Box, parent: Frame):
        """Higher-resolution path: the same window, mapped to the original and resampled from it."""
        if image.size != parent.original_size:
            W, H = parent.original_size
            raise ValueError(f"source='original' needs the original image ({W}x{H}), got "
                             f"{image.size[0]}x{image.size[1]}")
        W, H = parent.original_size
        sx, sy = parent.scale
        # Window edges are continuous coordinates: they scale plainly. Cut the enclosing whole pixels, draw there,
        # then resample exactly the (possibly fractional) window with ``box=``.
        L, T, R, B = _window_to_original(window, parent)
        Li, Ti = max(0, math.floor(L)), max(0, math.floor(T))
        Ri, Bi = min(W, math.ceil(R)), min(H, math.ceil(B))
        c = to_rgb(image.crop((Li, Ti, Ri, Bi)))
        if self.draw_dot:
            # The reference's dot covers pixels x-7..x+7 of the shown image, centred on pixel x's centre (x + 0.5).
            cx, cy = (point[0] + 0.5) * sx - Li, (point[1] + 0.5) * sy - Ti
            rx, ry = self.DOT_RADIUS * sx, self.DOT_RADIUS * sy
            width = max(1, round(self.DOT_OUTLINE_WIDTH * (sx + sy) / 2))
            ImageDraw.Draw(c).ellipse([(cx - 0.5 - rx, cy - 0.5 - ry), (cx - 0.5 + rx, cy - 0.5 + ry)],
                                      fill="red", outline="white", width=width)
        out = c.resize(self.output_size, Image.Resampling.BICUBIC, box=(L - Li, T - Ti, R - Li, B - Ti))
        return out, (L, T, R, B)


def _window_to_original(window: Box, parent: Frame) -> tuple[float, float, float, float]:
    """Window edges (continuous, parent's shown pixels) -> original pixels. Multiply before dividing so that edges
    on the image border map exactly onto ``W`` / ``H`` (``w * (W / w)`` can overshoot ``W`` by one ulp)."""
    (W, H), (w, h) = parent.original_size, parent.size
    left, top, right, bottom = window
    return left * W / w, top * H / h, right * W / w, bottom * H / h


#: Reference settings (digest §1.9).
#: V* visual search SFT/RL/eval: 364x364 window -> 672x672, no dot.
VSTAR = ZoomTool(offset=182, crop_size=672, draw_dot=False)
#: Web grounding multi-turn SFT data and eval: 200x200 window -> 504x504 (512 requested), red dot.
WEB_GROUNDING = ZoomTool(offset=100, crop_size=512, draw_dot=True)
#: Web grounding multi-turn GRPO rollout: 100x100 window -> 392x392 (384 requested), red dot.
WEB_GROUNDING_RL = ZoomTool(offset=50, crop_size=384, draw_dot=True)

PRESETS: dict[str, ZoomTool] = {
    "vstar": VSTAR,
    "web_grounding": WEB_GROUNDING,
    "web_grounding_rl": WEB_GROUNDING_RL,
}
