"""Coordinate frames: how an image the model sees relates to the original image.

Why this module exists
----------------------
Qwen-VL models answer in absolute pixels *of the image they were shown*. That image is rarely the original: evaluation
shrinks it (``--max_image_side 1260`` for spatial tasks, ``--max_pixels`` for web grounding and V*), the multi-turn
linearizer rescales every image to 2.7-2.85 MP, and the zoom tool shows a crop blown up to 504/392/672 px. A point is
therefore meaningless without its frame. A :class:`Frame` describes one shown image:

* ``original_size`` ``(W, H)``: the original image;
* ``size`` ``(w, h)``: the image the model sees;
* ``window`` ``(left, top, right, bottom)``: the part of the original it shows, as *continuous edges* in original
  pixels (``(0, 0, W, H)`` for a full view; a sub-window for a crop; may be fractional);
* ``kind``: ``"full"`` or ``"crop"``.

This is the only module that scales points (``docs/architecture``: "coordinates are integers in the frame of the
image the model sees, converted to the original frame only in vision/frames.py"). Records that hold a point store
the point together with ``frame.to_dict()``.

The rounding rule (pixel centres)
---------------------------------
An integer point ``(x, y)`` names a *pixel*; the pixel's centre is the continuous point ``(x + 0.5, y + 0.5)``.
Continuous coordinates scale linearly with the window, so the exact (float) mapping, in pixel-index coordinates, is::

    X = left + (x + 0.5) * (right - left) / w - 0.5          # shown -> original   (to_original(..., exact=True))
    x = (X + 0.5 - left) * w / (right - left) - 0.5          # original -> shown   (from_original(..., exact=True))

the same alignment PIL uses when it resizes, so a mapped point lands on the same image content. Integer results
are the exact value rounded half up, ``floor(v + 0.5)``, which simplifies to "the pixel that contains the centre of
the input pixel":  ``X = floor(left + (x + 0.5) * sx)``.

Containment: integer points ``0 <= x <= w`` are inside (the reference linearizer's check, which accepts the far
edge ``x == w``); floats may also sit in the outer half of pixel 0 (``x >= -0.5``). With ``check=True`` (default)
accepted points are clamped into the image's extent before mapping and integer results into its pixels, so an
accepted point always maps to a pixel of the target image (far-edge points land on the last pixel).

Round-trip guarantees (property-tested in ``tests/test_frames.py``), per axis, with ``s = (right - left) / w``
original pixels per shown pixel:

* exact (float) round trips are the identity up to float error;
* integer shown -> original -> shown is exact when ``s >= 1`` (the model sees a downscaled image, e.g. every
  ``max_side`` frame), else off by at most ``floor(0.5 + 1 / (2 s))`` shown pixels (1 px for ``s > 1/3``);
* integer original -> shown -> original is exact when ``s <= 1``, else off by at most ``floor(0.5 + s / 2)``
  original pixels, i.e. within 1 px while ``s < 3``. Nothing can do better: one shown pixel covers ``s`` original
  pixels, and integer shown coordinates cannot say which of them was meant. Keep points in floats
  (``exact=True``) or in the shown frame when that matters.

Reference deviations (ViGoRL, ``Gabesarch/grounded-rl``): the reference rescales ground-truth points/boxes and the
chain coordinates of the multi-turn linearizer with ``int(v * s)`` (plain scaling, truncated). The pixel-centre rule
here gives ``floor((v + 0.5) * s)``, which differs by at most one shown pixel (it is what nearest-neighbour resizing
would do, and it keeps the mapping symmetric). Use :func:`reference_scale` where byte-exact reference numbers are
needed.

Failures are explicit: a point that is not two finite numbers raises :class:`InvalidPoint`
(``kind = "invalid_point"``), a point outside the image raises :class:`PointOutsideImage`
(``kind = "point_outside_image"``); :func:`check_point` returns the same kinds without raising, for per-sample
failure accounting.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence

from PIL import Image

Point = tuple[int, int]
FPoint = tuple[float, float]
Box = tuple[int, int, int, int]
FrameKind = Literal["full", "crop"]

# qwen_vl_utils defaults (``vision_process.py``): IMAGE_FACTOR 28, MIN_PIXELS 4*28*28, MAX_PIXELS 16384*28*28.
# ``fetch_image`` applies them whenever the caller leaves a limit out; we scale them with ``factor`` so that Qwen3-VL
# (factor 32 = patch 16 x merge 2) gets the analogous limits.
QWEN_FACTOR = 28
QWEN_MIN_TOKENS = 4
QWEN_MAX_TOKENS = 16384


# --------------------------------------------------------------------------------------------------------------------
# Errors and point validation
# --------------------------------------------------------------------------------------------------------------------

class PointError(ValueError):
    """A point (or box) that cannot be used. ``kind`` is the per-sample failure kind recorded by callers."""

    kind = "invalid_point"


class InvalidPoint(PointError):
    """Not two finite real numbers (wrong length, NaN, inf, bool, string ...)."""

    kind = "invalid_point"


class InvalidBox(PointError):
    """Not four finite real numbers with ``x1 <= x2`` and ``y1 <= y2``."""

    kind = "invalid_box"


class PointOutsideImage(PointError):
    """The point lies outside the image (or crop window) it is said to be in."""

    kind = "point_outside_image"


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _as_point(point: Any) -> FPoint:
    """Validate and return ``(x, y)``; raise :class:`InvalidPoint` otherwise."""
    try:
        x, y = point
    except (TypeError, ValueError):
        raise InvalidPoint(f"a point must be two numbers (x, y), got {point!r}") from None
    if not (_is_real(x) and _is_real(y)):
        raise InvalidPoint(f"a point must be two finite numbers (x, y), got {point!r}")
    return x, y


def _as_box(box: Any) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = box
    except (TypeError, ValueError):
        raise InvalidBox(f"a box must be four numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(_is_real(v) for v in (x1, y1, x2, y2)):
        raise InvalidBox(f"a box must be four finite numbers, got {box!r}")
    if x1 > x2 or y1 > y2:
        raise InvalidBox(f"a box needs x1 <= x2 and y1 <= y2, got {box!r}")
    return x1, y1, x2, y2


def check_point(point: Any, frame: Frame) -> str | None:
    """The failure kind of ``point`` as a point in ``frame``'s shown image, or ``None`` when it is usable.

    Returns ``"invalid_point"`` (not two finite numbers) or ``"point_outside_image"`` (see :meth:`Frame.contains`).
    Never raises for bad points: this is what the episode loop and judges call to record per-sample failures.
    """
    try:
        p = _as_point(point)
    except PointError as e:
        return e.kind
    return None if frame.contains(p) else PointOutsideImage.kind


def reference_scale(value: float, scale: float) -> int:
    """``int(value * scale)``: how the reference rescales GT coordinates and chain points (for byte-exact replays)."""
    return int(value * scale)


# --------------------------------------------------------------------------------------------------------------------
# Qwen smart resize (reused from transformers, not rewritten)
# --------------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _hf_smart_resize():
    # transformers 5.x: the PIL image processor module holds a copy that imports without torchvision; the
    # torchvision-backed module (the one named in older docs) refuses to import when torchvision is missing.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # transformers 4.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def qwen_smart_size(width: int, height: int, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    factor: int = QWEN_FACTOR) -> tuple[int, int]:
    """``(w, h)`` that Qwen's smart resize gives a ``width x height`` image: both sides multiples of ``factor``,
    ``w*h`` within ``[min_pixels, max_pixels]`` (approximately: the max branch floors, the min branch ceils), aspect
    ratio kept as well as the rounding allows.

    ``None`` limits mean qwen_vl_utils' defaults, ``4*factor**2`` and ``16384*factor**2`` (``fetch_image`` applies
    them when a limit is left out). Uses ``transformers``' ``smart_resize`` (the one the HF and vLLM processors run).
    It differs from ``qwen_vl_utils.smart_resize`` only for sides shorter than ``factor/2`` px (qwen_vl_utils clamps
    the first rounding to ``factor``, transformers clamps the max branch): those images get another size there.
    Raises ``ValueError`` for aspect ratios above 200 (Qwen cannot take them at all).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if min_pixels is None:
        min_pixels = QWEN_MIN_TOKENS * factor * factor
    if max_pixels is None:
        max_pixels = QWEN_MAX_TOKENS * factor * factor
    h, w = _hf_smart_resize()(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(w), int(h)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way ``qwen_vl_utils.fetch_image`` does it: RGBA is composited on white, anything else ``convert``-ed.

    (Older qwen_vl_utils used a plain ``convert("RGB")``, which turns transparent pixels black; they only differ for
    RGBA inputs.)
    """
    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.split()[3])
        return out
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Frame
# --------------------------------------------------------------------------------------------------------------------

def _int_if_integral(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


@dataclass(frozen=True)
class Frame:
    """How one image the model sees maps to the original image. See the module docstring for the rounding rule.

    ``original_size``: ``(W, H)`` of the original; ``size``: ``(w, h)`` of the shown image; ``window``:
    ``(left, top, right, bottom)`` continuous edges, in original pixels, of the region shown (may be fractional);
    ``kind``: ``"full"`` (window is the whole image) or ``"crop"``.
    """

    original_size: tuple[int, int]
    size: tuple[int, int]
    window: tuple[float, float, float, float]
    kind: FrameKind = "full"

    def __post_init__(self):
        W, H = self.original_size
        w, h = self.size
        for name, v in (("original width", W), ("original height", H), ("width", w), ("height", h)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Frame {name} must be a positive integer, got {v!r}")
        object.__setattr__(self, "original_size", (int(W), int(H)))
        object.__setattr__(self, "size", (int(w), int(h)))
        if len(self.window) != 4 or not all(_is_real(v) for v in self.window):
            raise ValueError(f"Frame window must be four finite numbers, got {self.window!r}")
        left, top, right, bottom = self.window
        if not (0 <= left < right <= W and 0 <= top < bottom <= H):
            raise ValueError(f"Frame window {self.window!r} must be non-empty and inside the {W}x{H} image")
        object.__setattr__(self, "window", tuple(_int_if_integral(v) for v in self.window))
        if self.kind not in ("full", "crop"):
            raise ValueError(f"Frame kind must be 'full' or 'crop', got {self.kind!r}")
        if self.kind == "full" and tuple(self.window) != (0, 0, W, H):
            raise ValueError(f"a 'full' frame shows the whole image (0, 0, {W}, {H}), got window {self.window!r}")

    # ---- constructors -----------------------------------------------------------------------------------------------

    @classmethod
    def identity(cls, W: int, H: int) -> Frame:
        """The model sees the original image unchanged."""
        return cls((W, H), (W, H), (0, 0, W, H), "full")

    @classmethod
    def resized(cls, W: int, H: int, w: int, h: int) -> Frame:
        """The whole ``W x H`` image shown at ``w x h`` (any resize of the full view)."""
        return cls((W, H), (w, h), (0, 0, W, H), "full")

    @classmethod
    def smart_resize(cls, W: int, H: int, min_pixels: int | None = None, max_pixels: int | None = None,
                     factor: int = QWEN_FACTOR) -> Frame:
        """Qwen smart resize of the full image (see :func:`qwen_smart_size`; ``None`` limits = qwen_vl_utils defaults).

        This is ``fetch_image({"image": img, "min_pixels": ..., "max_pixels": ...})``: always applied, so it may
        upscale (multi-turn linearizer: ``min_pixels=2_700_000, max_pixels=2_850_000`` rescales every image to
        2.7-2.85 MP) and rounds sides to multiples of ``factor`` even when no limit is hit.
        """
        w, h = qwen_smart_size(W, H, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
        return cls.resized(W, H, w, h)

    @classmethod
    def max_side(cls, W: int, H: int, max_side: int) -> Frame:
        """Reference eval ``--max_image_side`` (spatial tasks, 1260): when ``max(W, H) > max_side`` scale by
        ``s = max_side / max(W, H)`` with ``int(W * s)``, ``int(H * s)``; else the identity.

        Matches the reference, except that a side that would truncate to 0 px (aspect ratio above ``max_side``) is
        kept at 1 px, where the reference would crash in PIL.
        """
        if max(W, H) <= max_side:
            return cls.identity(W, H)
        s = max_side / max(W, H)
        return cls.resized(W, H, max(1, int(W * s)), max(1, int(H * s)))

    @classmethod
    def max_pixels(cls, W: int, H: int, max_pixels: int, factor: int | None = QWEN_FACTOR,
                   min_pixels: int | None = None) -> Frame:
        """Downscale only when ``W * H > max_pixels``; else the identity.

        Reference (eval ``--max_pixels``, web grounding 12 960 000 / V*): ``if w*h > max_pixels:
        img = qwen_vl_utils.fetch_image({"image": img, "max_pixels": max_pixels})``, i.e. a Qwen smart resize with the
        default ``min_pixels`` (3136): sides become multiples of 28 and the aspect ratio is kept only approximately;
        the product lands at or just under ``max_pixels`` (or is merely rounded to multiples of 28 when rounding
        alone brings it under the limit). With the default ``factor=28`` this constructor does exactly that
        (up to the transformers/qwen_vl_utils smart_resize difference for sides < 14 px, see
        :func:`qwen_smart_size`), so it matches the reference.

        ``factor=None`` (or 1) gives a plain aspect-preserving downscale instead: ``s = sqrt(max_pixels / (W*H))``,
        sides ``max(1, floor(W * s))`` and ``max(1, floor(H * s))`` (no multiple-of-28 rounding, no aspect limit).
        Not reference behaviour.
        """
        if W * H <= max_pixels:
            return cls.identity(W, H)
        if factor is None or factor == 1:
            s = math.sqrt(max_pixels / (W * H))
            return cls.resized(W, H, max(1, math.floor(W * s)), max(1, math.floor(H * s)))
        return cls.smart_resize(W, H, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)

    @classmethod
    def crop(cls, W: int, H: int, window: Sequence[float], size: int | Sequence[int]) -> Frame:
        """A crop: ``window`` ``(left, top, right, bottom)`` of the ``W x H`` original (continuous edges, original
        pixels) shown at ``size`` (``(w, h)``, or one int for a square). Non-square windows shown square are allowed
        (the reference's clipped zoom windows are): each axis scales on its own.
        """
        if isinstance(size, numbers.Integral):
            size = (int(size), int(size))
        return cls((W, H), tuple(size), tuple(window), "crop")

    # ---- properties -------------------------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def scale(self) -> tuple[float, float]:
        """``(sx, sy)``: original pixels per shown pixel along each axis."""
        left, top, right, bottom = self.window
        return (right - left) / self.size[0], (bottom - top) / self.size[1]

    @property
    def is_identity(self) -> bool:
        return self.kind == "full" and self.size == self.original_size

    # ---- containment ------------------------------------------------------------------------------------------------

    def contains(self, point: Sequence[float]) -> bool:
        """Is ``point`` (shown frame) inside the shown image: ``-0.5 <= x <= w`` and ``-0.5 <= y <= h``?

        For integer points that is ``0 <= x <= w``: the reference linearizer's check (``x > width`` or ``x < 0`` is
        outside), which also accepts the far edge ``x == w``; such points are moved onto the last pixel when
        converted. Floats may go down to -0.5, the left edge of pixel 0 in pixel-centre coordinates. Invalid points
        (see :func:`check_point`) are not contained.
        """
        try:
            x, y = _as_point(point)
        except PointError:
            return False
        return -0.5 <= x <= self.size[0] and -0.5 <= y <= self.size[1]

    def contains_original(self, point: Sequence[float]) -> bool:
        """Is ``point`` (original frame) inside this frame's window? The rule of :meth:`contains`, at pixel level:
        a point is inside when its pixel overlaps the window, ``floor(left) - 0.5 <= X <= max(right, ceil(right) -
        0.5)`` (likewise for Y). For a full frame that is ``0 <= X <= W`` for integer points, far edge included."""
        try:
            x, y = _as_point(point)
        except PointError:
            return False
        left, top, right, bottom = self.window
        return (math.floor(left) - 0.5 <= x <= max(right, math.ceil(right) - 0.5)
                and math.floor(top) - 0.5 <= y <= max(bottom, math.ceil(bottom) - 0.5))

    # ---- point conversions ------------------------------------------------------------------------------------------

    def to_original(self, point: Sequence[float], *, exact: bool = False, check: bool = True):
        """Shown-frame point -> original-frame point.

        ``exact=True`` returns floats (the affine pixel-centre map); otherwise ints, ``floor(exact + 0.5)``.
        ``check=True`` raises :class:`PointOutsideImage` unless :meth:`contains` holds, moves far-edge points
        (``x`` in ``(w - 0.5, w]``) onto the last pixel and clamps integer results to the pixels of the window;
        ``check=False`` converts any finite point, unclamped. Raises :class:`InvalidPoint` for anything but two
        finite numbers.
        """
        x, y = _as_point(point)
        w, h = self.size
        if check:
            if not self.contains((x, y)):
                raise PointOutsideImage(f"point ({x}, {y}) is outside the {w}x{h} image")
            x, y = min(x, w - 0.5), min(y, h - 0.5)
        left, top, right, bottom = self.window
        X = left + (x + 0.5) * (right - left) / w - 0.5
        Y = top + (y + 0.5) * (bottom - top) / h - 0.5
        if check:  # float fuzz must not push a checked result out of the window's extent
            X = min(max(X, left - 0.5), right - 0.5)
            Y = min(max(Y, top - 0.5), bottom - 0.5)
        if exact:
            return X, Y
        Xi, Yi = _round_half_up(X), _round_half_up(Y)
        if check:
            Xi = min(max(Xi, math.floor(left)), math.ceil(right) - 1)
            Yi = min(max(Yi, math.floor(top)), math.ceil(bottom) - 1)
        return Xi, Yi

    def from_original(self, point: Sequence[float], *, exact: bool = False, check: bool = True):
        """Original-frame point -> shown-frame point (inverse of :meth:`to_original`).

        ``check=True`` raises :class:`PointOutsideImage` unless :meth:`contains_original` holds (for a crop frame: the
        point must be inside the crop window), clamps the point into the window's extent ``[left - 0.5, right - 0.5]``
        (pixel-centre coordinates; this only moves far-edge points and points in pixels the window cuts through) and
        clamps integer results into ``[0, w-1] x [0, h-1]``.
        """
        X, Y = _as_point(point)
        left, top, right, bottom = self.window
        if check:
            if not self.contains_original((X, Y)):
                W, H = self.original_size
                raise PointOutsideImage(f"point ({X}, {Y}) is outside the window {self.window} of the {W}x{H} image")
            X = min(max(X, left - 0.5), right - 0.5)
            Y = min(max(Y, top - 0.5), bottom - 0.5)
        w, h = self.size
        x = (X + 0.5 - left) * w / (right - left) - 0.5
        y = (Y + 0.5 - top) * h / (bottom - top) - 0.5
        if check:  # float fuzz must not push a checked result out of the image's extent
            x, y = min(max(x, -0.5), w - 0.5), min(max(y, -0.5), h - 0.5)
        if exact:
            return x, y
        xi, yi = _round_half_up(x), _round_half_up(y)
        if check:
            xi = min(max(xi, 0), w - 1)
            yi = min(max(yi, 0), h - 1)
        return xi, yi

    def map_to(self, point: Sequence[float], other: Frame, *, exact: bool = False, check: bool = True):
        """This frame's shown point -> ``other``'s shown point, through the original (e.g. crop pixel -> full view).

        Both frames must describe the same original image. The intermediate original point is kept exact, so only
        the final result is rounded.
        """
        if other.original_size != self.original_size:
            raise ValueError(f"frames of different originals: {self.original_size} vs {other.original_size}")
        X = self.to_original(point, exact=True, check=check)
        return other.from_original(X, exact=exact, check=check)

    # ---- box conversions --------------------------------------------------------------------------------------------

    def box_to_original(self, box: Sequence[float], *, exact: bool = False) -> tuple:
        """Shown-frame box ``(x1, y1, x2, y2)`` (inclusive pixel corners) -> original frame.

        Each corner is mapped with :meth:`to_original`'s rule; boxes are not required to lie inside the image, but
        integer results are clamped into the window's pixels. The map is monotone, so a point inside a box stays
        inside the mapped box. Raises :class:`InvalidBox` for malformed boxes.
        """
        x1, y1, x2, y2 = _as_box(box)
        a = self.to_original((x1, y1), exact=exact, check=False)
        b = self.to_original((x2, y2), exact=exact, check=False)
        if not exact:
            left, top, right, bottom = self.window
            lo_x, hi_x = math.floor(left), math.ceil(right) - 1
            lo_y, hi_y = math.floor(top), math.ceil(bottom) - 1
            a = (min(max(a[0], lo_x), hi_x), min(max(a[1], lo_y), hi_y))
            b = (min(max(b[0], lo_x), hi_x), min(max(b[1], lo_y), hi_y))
        return (*a, *b)

    def box_from_original(self, box: Sequence[float], *, exact: bool = False) -> tuple:
        """Original-frame box -> shown frame (corners mapped with :meth:`from_original`'s rule, ints clamped into
        ``[0, w-1] x [0, h-1]``). The reference rescales GT boxes with ``int(v * s)`` per corner instead
        (:func:`reference_scale`); the two differ by at most one shown pixel."""
        x1, y1, x2, y2 = _as_box(box)
        a = self.from_original((x1, y1), exact=exact, check=False)
        b = self.from_original((x2, y2), exact=exact, check=False)
        if not exact:
            w, h = self.size
            a = (min(max(a[0], 0), w - 1), min(max(a[1], 0), h - 1))
            b = (min(max(b[0], 0), w - 1), min(max(b[1], 0), h - 1))
        return (*a, *b)

    # ---- serialisation ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe: ``{"kind", "original_size": [W, H], "size": [w, h], "window": [l, t, r, b]}``."""
        return {
            "kind": self.kind,
            "original_size": list(self.original_size),
            "size": list(self.size),
            "window": [_int_if_integral(v) for v in self.window],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Frame:
        """Inverse of :meth:`to_dict` (raises ``ValueError`` for a malformed dict)."""
        try:
            return cls(tuple(d["original_size"]), tuple(d["size"]), tuple(d["window"]), d.get("kind", "full"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a Frame dict: {d!r} ({e})") from None


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------

def resize_image(img: Image.Image, frame: Frame) -> Image.Image:
    """The image the model sees for ``frame``, given the ORIGINAL image.

    Full frames: RGB (as :func:`to_rgb`), then ``img.resize((w, h))`` with bicubic resampling, which is PIL's default
    for RGB and what ``qwen_vl_utils.fetch_image`` and the reference's ``--max_image_side`` branch use; an identity
    frame returns an RGB copy. Crop frames: the window is resampled straight from the original
    (``resize(..., box=window)``; no dot: use :class:`vigorl_cli.vision.zoom.ZoomTool` for reference crops).
    The input is never modified.
    """
    if img.size != frame.original_size:
        raise ValueError(f"image is {img.size[0]}x{img.size[1]} but the frame's original is "
                         f"{frame.original_size[0]}x{frame.original_size[1]}")
    rgb = to_rgb(img)
    if frame.kind == "full":
        if frame.size == rgb.size:
            return rgb  # to_rgb already returned a new image
        return rgb.resize(frame.size, Image.Resampling.BICUBIC)
    return rgb.resize(frame.size, Image.Resampling.BICUBIC, box=tuple(float(v) for v in frame.window))
